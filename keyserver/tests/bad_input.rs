//! Every bad input gets a clear error, no panic, no state change.

mod common;

use std::time::Duration;

use common::*;
use hyper::Method;
use meshlib::control::{self, ControlError, Event};
use meshlib::proto::{self, ClientMsg, ErrorCode, Hello, Request, ServerMsg};
use serde_json::{json, Value};

/// The refusal code of a failed join.
fn refused(r: Result<meshlib::control::Session, ControlError>) -> ErrorCode {
    match r {
        Err(ControlError::Refused(e)) => e.code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Members and token uses: what must not change on a refused request.
/// Members and tokens of `net`, without the members' `last_seen` (liveness,
/// which the test's own legitimate heartbeats refresh).
async fn state(h: &Harness, net: &str) -> (Vec<Value>, Vec<Value>) {
    let mut members = h.members(net).await;
    for m in &mut members {
        if let Some(obj) = m.as_object_mut() {
            obj.remove("last_seen");
        }
    }
    (members, h.tokens(net).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_pins_keys_networks_and_full_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path(), |_| {}).await;
    h.network("a", "10.240.0.0/30").await; // two host addresses
    let net_b = h.network("b", "10.240.4.0/24").await;
    let good = h.token("a", json!({"uses": 10})).await;
    let ep = client_endpoint();
    let (ka, mut a) = join(&ep, &good, "api").await;
    let before = state(&h, "a").await;

    // Wrong secret.
    let mut wrong = good.clone();
    wrong.secret = [0; 32];
    assert_eq!(
        refused(control::join(&ep, &wrong, meta("api").1, &cfg()).await),
        ErrorCode::InvalidToken
    );
    // A token of network A presented for network B.
    let mut other_net = good.clone();
    other_net.network = net_b;
    assert_eq!(
        refused(control::join(&ep, &other_net, meta("api").1, &cfg()).await),
        ErrorCode::InvalidToken
    );
    // Expired (the shortest lifetime is 1 s).
    let expired = h.token("a", json!({"uses": 1, "expires": "1s"})).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        refused(control::join(&ep, &expired, meta("api").1, &cfg()).await),
        ErrorCode::TokenExpired
    );
    // Bound to another app / type.
    let bound = h
        .token(
            "a",
            json!({"uses": 1, "service": "db", "process_type": "worker"}),
        )
        .await;
    assert_eq!(
        bound.service.as_deref(),
        Some("db"),
        "the token carries its binding"
    );
    assert_eq!(
        bound.process_type.as_ref().map(|p| p.as_str()),
        Some("worker")
    );
    assert_eq!(
        refused(control::join(&ep, &bound, meta("api").1, &cfg()).await),
        ErrorCode::TokenBinding
    );
    // Oversized metadata (every peer would carry it).
    let mut fat = meta("api").1;
    fat.service = "x".repeat(10_000);
    assert_eq!(
        refused(control::join(&ep, &good, fat, &cfg()).await),
        ErrorCode::InvalidMetadata
    );
    let mut many = meta("api").1;
    many.endpoints = vec!["192.0.2.1:1".parse().unwrap(); 100];
    assert_eq!(
        refused(control::join(&ep, &good, many, &cfg()).await),
        ErrorCode::InvalidMetadata
    );
    // The same public key again (a stolen key cannot join as that member).
    // While the member's session is open it is `Busy` (a lost welcome's
    // retry waits for the old session to end), else `KeyInUse`: never a
    // welcome.
    let mut dup = meta("api").1;
    dup.public_key = ka.public_key();
    let code = refused(control::join(&ep, &good, dup, &cfg()).await);
    assert!(
        matches!(code, ErrorCode::KeyInUse | ErrorCode::Busy),
        "{code:?}"
    );
    // A stolen public key cannot resume without the credential.
    let mut stolen = a.resume_request(ka.public_key(), vec![]);
    stolen.credential = [1; 32];
    let r = control::resume(
        &ep,
        &[h.quic],
        h.fingerprint,
        a.map().clone(),
        stolen,
        &cfg(),
    )
    .await;
    assert_eq!(refused(r), ErrorCode::BadCredential);
    // Wrong certificate pin: the handshake fails.
    let mut pin = good.clone();
    pin.cert_sha256[0] ^= 1;
    match control::join(&ep, &pin, meta("api").1, &cfg()).await {
        Err(ControlError::Connect(msg)) => {
            assert!(msg.to_lowercase().contains("certificate"), "{msg}")
        }
        other => panic!("wrong pin accepted: {other:?}"),
    }
    // A member of A asking about B: refused, session kept.
    a.send_raw(&ClientMsg::GetMap(net_b)).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(5), next_relevant(&mut a))
        .await
        .unwrap()
        .unwrap()
    {
        Event::Rejected(e) => assert_eq!(e.code, ErrorCode::Forbidden),
        other => panic!("expected a refusal, got {other:?}"),
    }
    a.heartbeat().await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), next_relevant(&mut a))
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(ev, Event::HeartbeatAck { .. }), "{ev:?}");
    assert_eq!(state(&h, "a").await.0, before.0, "no member changed");

    // Used up, then full.
    let once = h.token("a", json!({"uses": 1})).await;
    let (_kb, _b) = join(&ep, &once, "api").await;
    assert_eq!(
        refused(control::join(&ep, &once, meta("api").1, &cfg()).await),
        ErrorCode::TokenUsedUp
    );
    let members_full = h.members("a").await;
    assert_eq!(members_full.len(), 2);
    assert_eq!(
        refused(control::join(&ep, &good, meta("api").1, &cfg()).await),
        ErrorCode::NetworkFull
    );
    assert_eq!(h.members("a").await, members_full);
    let uses: Vec<u64> = h
        .tokens("a")
        .await
        .iter()
        .map(|t| t["uses_left"].as_u64().unwrap())
        .collect();
    assert!(
        uses.contains(&9),
        "the good token was used once only: {uses:?}"
    );
    h.stop().await;
}

/// Opens a raw control stream, writes `bytes`, finishes, and returns the
/// server's first message.
async fn raw(h: &Harness, ep: &quinn::Endpoint, bytes: &[u8]) -> ServerMsg {
    let config = control::quic_config(h.fingerprint, &cfg()).unwrap();
    let conn = ep
        .connect_with(config, h.quic, proto::SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    send.finish().unwrap();
    let msg = tokio::time::timeout(
        Duration::from_secs(5),
        proto::read_frame(&mut recv, 1 << 20),
    )
    .await
    .expect("server answers")
    .expect("a frame");
    conn.close(0u32.into(), b"");
    msg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_truncated_oversized_frames_and_versions() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path(), |c| c.max_frame = 64 * 1024).await;
    h.network("a", "10.240.0.0/22").await;
    let token = h.token("a", json!({"uses": 3})).await;
    let ep = client_endpoint();
    let code = |m: ServerMsg| match m {
        ServerMsg::Error(e) => e.code,
        other => panic!("expected an error, got {other:?}"),
    };
    // Garbage payload.
    assert_eq!(
        code(raw(&h, &ep, &[0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff]).await),
        ErrorCode::Malformed
    );
    // Truncated: announces 100 bytes, sends 3.
    assert_eq!(
        code(raw(&h, &ep, &[0, 0, 0, 100, 1, 2, 3]).await),
        ErrorCode::Malformed
    );
    // Truncated inside the length prefix.
    assert_eq!(code(raw(&h, &ep, &[0, 0]).await), ErrorCode::Malformed);
    // Oversized announcement (1 GiB) against a 64 KiB limit.
    let m = raw(&h, &ep, &(1u32 << 30).to_be_bytes()).await;
    match m {
        ServerMsg::Error(e) => {
            assert_eq!(e.code, ErrorCode::Malformed);
            assert!(e.message.contains("exceeds"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
    // Another protocol version.
    let (_, meta) = meta("api");
    let hello = Hello {
        version: proto::VERSION + 1,
        request: Request::Join(proto::JoinRequest {
            network: token.network,
            token_secret: token.secret,
            public_key: meta.public_key,
            service: meta.service,
            app_id: None,
            process_type: meta.process_type,
            instance: None,
            runner: meta.runner,
            ports: vec![],
            endpoints: vec![],
            service_groups: vec![],
            publish: vec![],
            replace: false,
            ephemeral: false,
        }),
    };
    let frame = proto::encode_frame(&hello, 1 << 20).unwrap();
    assert_eq!(
        code(raw(&h, &ep, &frame).await),
        ErrorCode::UnsupportedVersion
    );
    // Nothing joined, no token used; the server still works.
    assert!(h.members("a").await.is_empty());
    assert_eq!(h.tokens("a").await[0]["uses_left"], 3);
    let (_k, s) = join(&ep, &token, "api").await;
    assert_eq!(s.map().members.len(), 1);
    // A malformed frame after the hello ends only that session.
    let config = control::quic_config(h.fingerprint, &cfg()).unwrap();
    let conn = ep
        .connect_with(config, h.quic, proto::SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&[0, 0, 0, 1, 0xff]).await.unwrap();
    drop(send);
    assert_eq!(h.members("a").await.len(), 1);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_refuses_extra_clients() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path(), |c| c.max_connections = 2).await;
    h.network("a", "10.240.0.0/22").await;
    let token = h.token("a", json!({"uses": 5})).await;
    let ep = client_endpoint();
    let (_k1, _s1) = join(&ep, &token, "api").await;
    let (_k2, _s2) = join(&ep, &token, "api").await;
    match control::join(&ep, &token, meta("api").1, &cfg()).await {
        Err(ControlError::Refused(e)) => assert_eq!(e.code, ErrorCode::Busy, "{e:?}"),
        other => panic!("third connection accepted: {other:?}"),
    }
    assert_eq!(h.members("a").await.len(), 2);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_auth_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path(), |_| {}).await;
    // Every route needs the bearer token, the OpenAPI document included.
    let anon = keyserver::admin::AdminClient::new(&h.api, "wrong");
    for path in ["/openapi.json", "/v1/networks"] {
        match anon.call(Method::GET, path, None).await {
            Err(keyserver::admin::AdminClientError::Status { status, .. }) => {
                assert_eq!(status, 401)
            }
            other => panic!("{path}: {other:?}"),
        }
    }
    let doc = h.call(Method::GET, "/openapi.json", None).await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["paths"]["/v1/networks/{net}/members/{member}"]["delete"].is_object());
    let status = |r: Result<Value, keyserver::admin::AdminClientError>| match r {
        Err(keyserver::admin::AdminClientError::Status { status, .. }) => status,
        other => panic!("expected an error status, got {other:?}"),
    };
    h.network("prod", "10.240.0.0/22").await;
    assert_eq!(
        status(
            h.call(Method::POST, "/v1/networks", Some(json!({"name": "prod"})))
                .await
        ),
        409
    );
    assert_eq!(
        status(
            h.call(
                Method::POST,
                "/v1/networks",
                Some(json!({"name": "x", "range": "10.0.0.1/32"}))
            )
            .await
        ),
        400
    );
    assert_eq!(
        status(
            h.call(Method::POST, "/v1/networks", Some(json!({"name": ""})))
                .await
        ),
        400
    );
    assert_eq!(
        status(h.call(Method::GET, "/v1/networks/nope/members", None).await),
        404
    );
    let bad_ttl = h
        .call(
            Method::POST,
            "/v1/networks/prod/tokens",
            Some(json!({"expires": "soon"})),
        )
        .await;
    assert_eq!(status(bad_ttl), 400);
    assert_eq!(
        status(
            h.call(
                Method::POST,
                "/v1/networks/prod/tokens",
                Some(json!({"uses": 0}))
            )
            .await
        ),
        400
    );
    assert_eq!(
        status(
            h.call(Method::DELETE, "/v1/networks/prod/members/ghost", None)
                .await
        ),
        404
    );
    // Token listing never shows a secret or hash; deletion works.
    let created = h
        .call(
            Method::POST,
            "/v1/networks/prod/tokens",
            Some(json!({"uses": 2})),
        )
        .await
        .unwrap();
    assert!(created["token"].as_str().unwrap().starts_with("istm1."));
    let list = h.tokens("prod").await;
    assert!(list[0].get("token").is_none() && list[0].get("hash").is_none());
    let path = format!(
        "/v1/networks/prod/tokens/{}",
        created["id"].as_str().unwrap()
    );
    h.call(Method::DELETE, &path, None).await.unwrap();
    assert!(h.tokens("prod").await.is_empty());
    let nets = h.call(Method::GET, "/v1/networks", None).await.unwrap();
    assert_eq!(nets.as_array().unwrap().len(), 1);
    h.stop().await;
}
