//! What a hostile or careless neighbour can do over the control protocol,
//! against a real keyserver on loopback: connections that never say hello,
//! a join whose welcome was lost, app ids of other services, a resume with no
//! map at all.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use meshlib::control::{self, ControlError, Event};
use meshlib::netmap::NetworkMap;
use meshlib::proto::{self, ErrorCode, Hello, Request};
use serde_json::json;

/// The refusal of a failed join or resume.
fn refusal(r: Result<control::Session, ControlError>) -> proto::ProtoError {
    match r {
        Err(ControlError::Refused(e)) => e,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// A QUIC connection to the keyserver at `server` (pinned `fp`) that
/// completes its handshake and then says nothing.
async fn silent(
    ep: quinn::Endpoint,
    server: SocketAddr,
    fp: [u8; 32],
) -> Option<quinn::Connection> {
    let config = control::quic_config(fp, &cfg()).ok()?;
    let connecting = ep.connect_with(config, server, proto::SERVER_NAME).ok()?;
    tokio::time::timeout(Duration::from_secs(10), connecting)
        .await
        .ok()?
        .ok()
}

/// Opens `n` silent connections from `ep`, at most 100 handshakes at a time;
/// returns the ones the server let complete.
async fn silent_many(
    ep: &quinn::Endpoint,
    server: SocketAddr,
    fp: [u8; 32],
    n: usize,
) -> Vec<quinn::Connection> {
    let mut open = Vec::new();
    let mut left = n;
    while left > 0 {
        let batch = left.min(100);
        left -= batch;
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..batch {
            set.spawn(silent(ep.clone(), server, fp));
        }
        while let Some(done) = set.join_next().await {
            open.extend(done.ok().flatten());
        }
    }
    open
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_less_connections_do_not_lock_out_joins() {
    let dir = tempfile::tempdir().unwrap();
    // Few established slots: before separate budgets, 1000 silent
    // connections took all of them for seconds each.
    let h = Harness::start(dir.path(), |c| {
        c.max_connections = 64;
        c.max_unauthenticated = 256;
        c.max_unauthenticated_per_source = 16;
        c.hello_timeout_secs = 3;
    })
    .await;
    h.network("a", "10.240.0.0/22").await;
    let token = h.token("a", json!({"uses": 10})).await;

    // 1000 silent connections from 20 loopback addresses other than the
    // member's.
    let attackers: Vec<quinn::Endpoint> = (1..=20)
        .map(|i| {
            let bind: SocketAddr = format!("127.0.9.{i}:0").parse().unwrap();
            control::client_endpoint(bind).unwrap()
        })
        .collect();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for ep in &attackers {
        let (ep, server, fp) = (ep.clone(), h.quic, h.fingerprint);
        tasks.spawn(async move { silent_many(&ep, server, fp, 50).await });
    }
    let mut held = Vec::new();
    while let Some(done) = tasks.join_next().await {
        held.extend(done.unwrap());
    }
    let opening = started.elapsed();
    // Let the closes of evicted connections arrive.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let still_open = held.iter().filter(|c| c.close_reason().is_none()).count();
    eprintln!(
        "1000 silent connections attempted in {opening:?}: {} completed their handshake, {still_open} still open",
        held.len()
    );
    assert!(
        still_open <= 256 + 20,
        "the budget holds: {still_open} open"
    );

    // A real member joins while they are held.
    let ep = client_endpoint();
    let t = Instant::now();
    let (_k, s) = tokio::time::timeout(Duration::from_secs(10), join(&ep, &token, "api"))
        .await
        .expect("join in time");
    let took = t.elapsed();
    eprintln!("join with 1000 silent connections around: {took:?}");
    assert_eq!(s.map().members.len(), 1);
    assert!(took < Duration::from_secs(3), "join took {took:?}");

    // Silent connections from the member's own address evict each other,
    // not the member: 200 of them, then another join from that address.
    let own = silent_many(&ep, h.quic, h.fingerprint, 200).await;
    let t = Instant::now();
    let (_k2, s2) = tokio::time::timeout(Duration::from_secs(10), join(&ep, &token, "api"))
        .await
        .expect("join in time");
    eprintln!(
        "join with 200 silent connections from its own address ({} completed): {:?}",
        own.len(),
        t.elapsed()
    );
    assert_eq!(s2.map().members.len(), 2);

    // The hello deadline closes what is left, in about 3 s.
    let t = Instant::now();
    let last = own.last().expect("some completed").clone();
    tokio::time::timeout(Duration::from_secs(8), last.closed())
        .await
        .expect("a silent connection is closed by the hello deadline");
    eprintln!(
        "last silent connection closed {:?} after the join",
        t.elapsed()
    );
    drop((held, own, attackers));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_whose_welcome_was_lost_gets_its_membership_back() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path(), |_| {}).await;
    h.network("a", "10.240.0.0/22").await;
    let token = h.token("a", json!({"uses": 1})).await;
    let ep = client_endpoint();
    let (key, meta) = meta("api");

    // The join reaches the keyserver and is committed, but its welcome is
    // never read (as if the keyserver died right after the commit).
    let hello = Hello {
        version: proto::VERSION,
        request: Request::Join(proto::JoinRequest {
            network: token.network,
            token_secret: token.secret,
            public_key: meta.public_key,
            service: meta.service.clone(),
            app_id: None,
            process_type: meta.process_type.clone(),
            instance: None,
            runner: meta.runner.clone(),
            ports: vec![],
            endpoints: meta.endpoints.clone(),
            service_groups: vec![],
            publish: vec![],
            replace: false,
            ephemeral: false,
        }),
    };
    let conn = silent(ep.clone(), h.quic, h.fingerprint)
        .await
        .expect("handshake");
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    proto::write_frame(&mut send, &hello, 1 << 20)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.members("a").await.is_empty() {
        assert!(Instant::now() < deadline, "the join was not committed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    conn.close(0u32.into(), b"lost");
    let first = h.members("a").await[0].clone();
    assert_eq!(
        h.tokens("a").await[0]["uses_left"],
        0,
        "its only use is gone"
    );

    // The sidecar retries with the same token and key: same membership,
    // fresh credential (the server may take a moment to see the old
    // connection gone).
    let retry = async {
        loop {
            match control::join(&ep, &token, meta.clone(), &cfg()).await {
                Err(ControlError::Refused(e))
                    if e.code == ErrorCode::Busy && e.message.contains("session") =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => break other,
            }
        }
    };
    let mut s = tokio::time::timeout(Duration::from_secs(10), retry)
        .await
        .expect("retry in time")
        .expect("the retried join is welcomed");
    assert_eq!(s.welcome().ip.to_string(), first["ip"]);
    assert_eq!(s.welcome().instance.as_str(), first["instance"]);
    assert!(s.welcome().credential.is_some());
    assert_eq!(s.map().members.len(), 1);
    assert_eq!(h.members("a").await.len(), 1);
    // The new credential resumes.
    s.heartbeat().await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), next_relevant(&mut s))
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(ev, Event::HeartbeatAck { .. }), "{ev:?}");
    let req = s.resume_request(key.public_key(), vec![]);
    let map = s.map().clone();
    s.close();
    let resumed = async {
        loop {
            let r = control::resume(
                &ep,
                &[h.quic],
                h.fingerprint,
                map.clone(),
                req.clone(),
                &cfg(),
            )
            .await;
            match r {
                Err(ControlError::Refused(e)) if e.code == ErrorCode::KeyInUse => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                other => break other,
            }
        }
    };
    let resumed = tokio::time::timeout(Duration::from_secs(10), resumed)
        .await
        .unwrap()
        .expect("the new credential resumes");
    resumed.close();

    // Not a retry: the same key with another token...
    let other = h.token("a", json!({"uses": 1})).await;
    let e = refusal(control::join(&ep, &other, meta.clone(), &cfg()).await);
    assert_eq!(e.code, ErrorCode::KeyInUse);
    assert!(e.message.contains("another token"), "{}", e.message);
    // ...and, once the credential was used, the same token again.
    let deadline = Instant::now() + Duration::from_secs(10);
    let e = loop {
        let e = refusal(control::join(&ep, &token, meta.clone(), &cfg()).await);
        if !e.message.contains("session") || Instant::now() > deadline {
            break e;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(e.code, ErrorCode::KeyInUse);
    assert!(
        e.message.contains("credential has been used"),
        "{}",
        e.message
    );
    assert_eq!(h.members("a").await.len(), 1);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_of_one_service_cannot_take_another_services_names() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path(), |_| {}).await;
    h.network("a", "10.240.0.0/22").await;
    let open = h.token("a", json!({"uses": 5})).await;
    let web_only = h.token("a", json!({"uses": 5, "service": "web"})).await;
    let ep = client_endpoint();
    let (_ka, api) = join(&ep, &open, "api").await;
    let api_id = api.welcome().app_id.clone();
    for hint in [api_id.to_string(), "api".to_owned()] {
        let (_, mut m) = meta("web");
        m.app_id = Some(hint.parse().unwrap());
        let s = control::join(&ep, &web_only, m, &cfg()).await.unwrap();
        assert_ne!(s.welcome().app_id, api_id, "hint {hint}");
        assert_ne!(s.welcome().app_id.as_str(), "api", "hint {hint}");
        // Nothing but api's own member answers under api's id.
        let under_api: Vec<String> = s
            .map()
            .members
            .values()
            .filter(|m| m.app_id == api_id || m.app_id.as_str() == "api")
            .map(|m| m.service.clone())
            .collect();
        assert_eq!(under_api, vec!["api".to_owned()]);
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_without_a_map_gets_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path(), |_| {}).await;
    h.network("prod", "10.240.0.0/22").await;
    let token = h.token("prod", json!({"uses": 5})).await;
    let ep = client_endpoint();
    let (ka, a) = join(&ep, &token, "api").await;
    let (_kb, _b) = join(&ep, &token, "web").await;
    // The sidecar lost its map.json: it resumes from generation 0 with an
    // empty map.
    let mut req = a.resume_request(ka.public_key(), vec![]);
    req.generation = 0;
    let empty = NetworkMap::new(token.network, "", "0.0.0.0/32".parse().unwrap());
    a.close();
    let mut s = tokio::time::timeout(
        Duration::from_secs(10),
        control::resume(&ep, &[h.quic], h.fingerprint, empty, req, &cfg()),
    )
    .await
    .unwrap()
    .expect("resume");
    let ev = tokio::time::timeout(Duration::from_secs(5), next_relevant(&mut s))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        ev,
        Event::Snapshot,
        "a resume from generation 0 gets a snapshot"
    );
    assert_eq!(s.map().name, "prod");
    assert_eq!(s.map().range.to_string(), "10.240.0.0/22");
    assert_eq!(s.map().members.len(), 2);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_and_bidi_characters_in_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path(), |_| {}).await;
    h.network("a", "10.240.0.0/22").await;
    let token = h.token("a", json!({"uses": 10})).await;
    let ep = client_endpoint();
    let cases = [
        ("api\u{1b}[2J\u{1b}[31mforged", "runner-1"),
        ("api\n10.240.0.9 web-web-1", "runner-1"),
        ("evil\u{202E}txt.exe", "runner-1"),
        ("api", "r\u{1b}]0;title\u{7}"),
        ("api", "r\u{2066}x"),
        ("api", &"r".repeat(129)),
    ];
    for (service, runner) in cases {
        let (_, mut m) = meta(service);
        m.runner = runner.to_owned();
        let e = refusal(control::join(&ep, &token, m, &cfg()).await);
        assert_eq!(e.code, ErrorCode::InvalidMetadata, "{service:?} {runner:?}");
        assert!(
            !e.message.contains('\u{1b}'),
            "the refusal does not echo it"
        );
    }
    assert!(h.members("a").await.is_empty());
    assert_eq!(h.tokens("a").await[0]["uses_left"], 10);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_used_its_credential_cannot_be_joined_again() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path(), |_| {}).await;
    h.network("a", "10.240.0.0/22").await;
    let token = h.token("a", json!({"uses": 5})).await;
    let ep = client_endpoint();
    let (_key, meta) = meta("api");
    // A token holder who knows the member's public key (every peer does)
    // tries to join as it while its session is open...
    let mut s = control::join(&ep, &token, meta.clone(), &cfg())
        .await
        .unwrap();
    let e = refusal(control::join(&ep, &token, meta.clone(), &cfg()).await);
    assert_eq!(
        e.code,
        ErrorCode::Busy,
        "a passing refusal: the member retries"
    );
    assert!(e.message.contains("session"), "{}", e.message);
    // ...and after it went away, once it had heartbeated (so it had its
    // welcome and credential).
    s.heartbeat().await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), next_relevant(&mut s))
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(ev, Event::HeartbeatAck { .. }), "{ev:?}");
    s.close();
    let deadline = Instant::now() + Duration::from_secs(10);
    let e = loop {
        let e = refusal(control::join(&ep, &token, meta.clone(), &cfg()).await);
        if !e.message.contains("session") || Instant::now() > deadline {
            break e;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(e.code, ErrorCode::KeyInUse);
    assert!(
        e.message.contains("credential has been used"),
        "{}",
        e.message
    );
    h.stop().await;
}
