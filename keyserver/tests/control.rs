//! The control protocol against a real keyserver on loopback: join, map,
//! deltas, endpoint updates, heartbeats, resume, revocation timing.

mod common;

use std::time::{Duration, Instant};

use common::*;
use hyper::Method;
use meshlib::control::{self, ControlError, Event};
use meshlib::netmap::MapChange;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_map_deltas_heartbeat_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path(), |_| {}).await;
    let net = h.network("prod", "10.240.0.0/22").await;
    let token = h.token("prod", json!({"uses": 5, "expires": "1h"})).await;
    assert_eq!(token.network, net);
    let ep = client_endpoint();

    let (_ka, mut a) = join(&ep, &token, "api").await;
    assert_eq!(a.welcome().ip.to_string(), "10.240.0.1");
    assert_eq!(a.welcome().index, 1);
    assert!(a.welcome().credential.is_some());
    assert_eq!(a.map().members.len(), 1);
    assert_eq!(a.map().network, net);
    let me = &a.map().members[&_ka.public_key()];
    // Advertised endpoint first, then the observed address with the
    // WireGuard port (the observed port is QUIC's, useless to peers).
    assert_eq!(me.endpoints[0].to_string(), "192.0.2.10:51820");
    let observed = a.welcome().observed;
    assert_eq!(
        me.endpoints[1],
        std::net::SocketAddr::new(observed.ip(), 51820)
    );
    assert_eq!(me.endpoints.len(), 2);

    let (kb, mut b) = join(&ep, &token, "api").await;
    assert_eq!(b.welcome().ip.to_string(), "10.240.0.2");
    assert_eq!(b.welcome().index, 2);
    assert_eq!(
        b.welcome().app_id,
        a.welcome().app_id,
        "same service, same app id"
    );
    assert_eq!(b.map().members.len(), 2);
    // A receives B as a delta.
    until(&mut a, Duration::from_secs(5), |s| {
        s.map().members.len() == 2
    })
    .await;
    assert_eq!(a.map(), b.map());

    // Endpoint update reaches A.
    let new_ep = "198.51.100.7:4000".parse().unwrap();
    b.update_endpoints(vec![new_ep]).await.unwrap();
    until(&mut a, Duration::from_secs(5), |s| {
        s.map().members[&kb.public_key()].endpoints.first() == Some(&new_ep)
    })
    .await;
    // Every heartbeat answer reports a generation B has applied; B's own
    // change (generation 3) reaches it through its stream, possibly after an
    // answer that was already on its way.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        b.heartbeat().await.unwrap();
        let generation = loop {
            match next_relevant(&mut b).await.unwrap() {
                Event::HeartbeatAck { generation } => break generation,
                Event::Delta(_) => continue,
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(
            generation,
            b.map().generation,
            "everything before the ack was applied"
        );
        if generation >= 3 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "B never saw its own endpoint change"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // B goes away; C joins; B resumes from its generation and gets only the delta.
    let resume_req = b.resume_request(kb.public_key(), vec![new_ep]);
    let cached = b.map().clone();
    b.close();
    let (kc, _c) = join(&ep, &token, "worker").await;
    until(&mut a, Duration::from_secs(5), |s| {
        s.map().members.len() == 3
    })
    .await;
    let mut b2 = control::resume(&ep, &[h.quic], h.fingerprint, cached, resume_req, &cfg())
        .await
        .unwrap();
    assert_eq!(b2.welcome().ip.to_string(), "10.240.0.2");
    assert!(b2.welcome().credential.is_none());
    let ev = tokio::time::timeout(Duration::from_secs(5), next_relevant(&mut b2))
        .await
        .unwrap()
        .unwrap();
    match ev {
        Event::Delta(d) => assert!(d
            .changes
            .iter()
            .any(|c| matches!(c, MapChange::Upsert(m) if m.public_key == kc.public_key()))),
        other => panic!("expected a delta, got {other:?}"),
    }
    until(&mut a, Duration::from_secs(5), |s| {
        s.map().generation == b2.map().generation
    })
    .await;
    assert_eq!(b2.map(), a.map());
    assert_eq!(h.members("prod").await.len(), 3);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_reaches_every_member_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path(), |_| {}).await;
    h.network("prod", "10.240.0.0/22").await;
    let token = h.token("prod", json!({"uses": 50})).await;
    let ep = client_endpoint();
    let mut sessions = Vec::new();
    for _ in 0..30 {
        sessions.push(join(&ep, &token, "api").await);
    }
    for (_, s) in sessions.iter_mut() {
        until(s, Duration::from_secs(10), |s| s.map().members.len() == 30).await;
    }
    let (victim_key, mut victim) = sessions.remove(0);
    let victim_pk = victim_key.public_key();
    let start = Instant::now();
    let path = format!("/v1/networks/prod/members/{}", victim.welcome().instance);
    h.call(Method::DELETE, &path, None).await.unwrap();
    let waits = sessions.into_iter().map(|(_, mut s)| async move {
        until(&mut s, Duration::from_secs(5), |s| {
            !s.map().members.contains_key(&victim_pk)
        })
        .await;
        start.elapsed()
    });
    let times = futures_join_all(waits).await;
    let last = times.iter().max().unwrap();
    eprintln!("revocation reached the last of 29 members in {last:?}");
    assert!(*last < Duration::from_secs(1), "took {last:?}");
    // The victim is told, and cannot come back with its credential.
    let err = loop {
        match next_relevant(&mut victim).await {
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert!(matches!(err, ControlError::Revoked(_)), "{err:?}");
    let req = victim.resume_request(victim_pk, vec![]);
    let again = control::resume(
        &ep,
        &[h.quic],
        h.fingerprint,
        victim.map().clone(),
        req,
        &cfg(),
    )
    .await;
    match again {
        Err(ControlError::Refused(e)) => {
            assert_eq!(e.code, meshlib::proto::ErrorCode::BadCredential)
        }
        other => panic!("revoked member resumed: {other:?}"),
    }
    assert_eq!(h.members("prod").await.len(), 29);
    h.stop().await;
}

/// Runs futures concurrently on the runtime.
async fn futures_join_all<F>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

/// A raw join hello of protocol `version` with `token` for `meta`.
fn join_hello(
    version: u16,
    token: &meshlib::proto::JoinToken,
    meta: meshlib::control::MemberMeta,
) -> meshlib::proto::Hello {
    use meshlib::proto::{Hello, JoinRequest, Request};
    Hello {
        version,
        request: Request::Join(JoinRequest {
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
    }
}

/// A member that stops reading falls behind the push buffer; once it reads
/// again it is caught up from the change log (or a snapshot) and converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_member_catches_up() {
    use meshlib::proto::{self, ServerMsg};
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path(), |c| c.push_buffer = 16).await;
    h.network("prod", "10.240.0.0/22").await;
    let token = h.token("prod", json!({"uses": 5})).await;
    let ep = client_endpoint();
    // A raw client with a tiny stream window, so the server's writes to it
    // block as soon as it stops reading.
    let mut config = control::quic_config(h.fingerprint, &cfg()).unwrap();
    let mut transport = quinn::TransportConfig::default();
    transport.stream_receive_window(2048u32.into());
    config.transport_config(std::sync::Arc::new(transport));
    let conn = ep
        .connect_with(config, h.quic, proto::SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let (_ka, meta_a) = meta("api");
    let hello = join_hello(proto::VERSION, &token, meta_a);
    proto::write_frame(&mut send, &hello, 1 << 20)
        .await
        .unwrap();
    let max = 1 << 20;
    assert!(matches!(
        proto::read_frame(&mut recv, max).await.unwrap(),
        ServerMsg::Welcome(_)
    ));
    let ServerMsg::Snapshot(mut map) = proto::read_frame(&mut recv, max).await.unwrap() else {
        panic!("expected a snapshot");
    };
    // B makes 200 changes while A does not read.
    let (kb, mut b) = join(&ep, &token, "api").await;
    for port in 1..=200u16 {
        let addr = std::net::SocketAddr::from(([198, 51, 100, 9], port));
        b.update_endpoints(vec![addr]).await.unwrap();
    }
    let want_last = std::net::SocketAddr::from(([198, 51, 100, 9], 200));
    until(&mut b, Duration::from_secs(10), |s| {
        s.map().members[&kb.public_key()].endpoints.first() == Some(&want_last)
    })
    .await;
    let target = b.map().generation;
    // A reads again: deltas, then a catch-up, until it reaches B's generation.
    let (mut snapshots, mut widest) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while map.generation < target {
        assert!(
            Instant::now() < deadline,
            "stuck at {} of {target}",
            map.generation
        );
        match proto::read_frame(&mut recv, max).await.unwrap() {
            ServerMsg::Delta(d) => {
                widest = widest.max(d.to - d.from);
                assert!(
                    d.changes.len() <= 2,
                    "catch-up deltas hold one change per member"
                );
                map.apply(&d).expect("deltas arrive without gaps");
            }
            ServerMsg::Snapshot(m) => {
                snapshots += 1;
                map = m;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(&map, b.map());
    eprintln!(
        "lagging member converged: {snapshots} snapshot(s), widest delta {widest} generations"
    );
    // The push buffer (16) overflowed: the member got a merged catch-up
    // delta from the change log or a snapshot, not 200 single steps.
    assert!(
        snapshots > 0 || widest > 1,
        "the lag path was not exercised"
    );
    h.stop().await;
}

/// A member whose address changes under the same connection (a NAT
/// rebinding) gets its observed endpoint updated for every peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observed_endpoint_follows_a_rebinding() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path(), |_| {}).await;
    h.network("prod", "10.240.0.0/22").await;
    let token = h.token("prod", json!({"uses": 2})).await;
    let (ep_a, ep_b) = (client_endpoint(), client_endpoint());
    let (_ka, mut a) = join(&ep_a, &token, "api").await;
    let (kb, mut b) = join(&ep_b, &token, "api").await;
    let first = b.welcome().observed;
    assert_eq!(first, ep_b.local_addr().unwrap());
    until(&mut a, Duration::from_secs(5), |s| {
        s.map().members.len() == 2
    })
    .await;
    // The member moves to another address (as after a NAT rebinding).
    ep_b.rebind(std::net::UdpSocket::bind("127.0.0.2:0").unwrap())
        .unwrap();
    let moved = ep_b.local_addr().unwrap();
    assert_ne!(moved.ip(), first.ip());
    b.heartbeat().await.unwrap();
    let (old_wg, new_wg) = (
        std::net::SocketAddr::new(first.ip(), 51820),
        std::net::SocketAddr::new(moved.ip(), 51820),
    );
    until(&mut a, Duration::from_secs(5), |s| {
        let eps = &s.map().members[&kb.public_key()].endpoints;
        eps.contains(&new_wg) && !eps.contains(&old_wg)
    })
    .await;
    // The advertised endpoint stays first.
    assert_eq!(
        a.map().members[&kb.public_key()].endpoints[0].to_string(),
        "192.0.2.10:51820"
    );
    h.stop().await;
}

/// A group's own names (protocol version 5) reach a current member by
/// snapshot and delta; a member that joined with version 4 gets the same
/// generations with the names left out of its deltas (it could not decode
/// them), and everything else it can decode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_4_member_is_not_sent_group_names() {
    use meshlib::proto::{self, ServerMsg};
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path(), |_| {}).await;
    h.network("prod", "10.240.0.0/22").await;
    let token = h.token("prod", json!({"uses": 5})).await;
    let ep = client_endpoint();
    let config = control::quic_config(h.fingerprint, &cfg()).unwrap();
    let conn = ep
        .connect_with(config, h.quic, proto::SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let (_ka, meta_a) = meta("api");
    let hello = join_hello(4, &token, meta_a);
    proto::write_frame(&mut send, &hello, 1 << 20)
        .await
        .unwrap();
    let max = 1 << 20;
    let first: ServerMsg = proto::read_frame(&mut recv, max).await.unwrap();
    assert!(matches!(first, ServerMsg::Welcome(_)), "{first:?}");
    let ServerMsg::Snapshot(mut old) = proto::read_frame(&mut recv, max).await.unwrap() else {
        panic!("expected a snapshot");
    };
    let (_kb, mut b) = join(&ep, &token, "api").await;
    let services = "/v1/networks/prod/services";
    h.call(
        Method::POST,
        services,
        Some(json!({"name": "shop", "fqdn": "shop.example.test",
            "names": ["www.shop.test"], "ports": [{"port": 443, "destination_port": 8080,
            "handlers": ["http", "tls"]}]})),
    )
    .await
    .unwrap();
    h.call(
        Method::PATCH,
        &format!("{services}/shop"),
        Some(json!({"names": ["www.shop.test", "shop.test"]})),
    )
    .await
    .unwrap();
    let shop: meshlib::services::GroupName = "shop".parse().unwrap();
    until(&mut b, Duration::from_secs(10), |s| {
        s.map().group_names(&shop) == ["shop.example.test", "shop.test", "www.shop.test"]
    })
    .await;
    let target = b.map().generation;
    let deadline = Instant::now() + Duration::from_secs(10);
    while old.generation < target {
        assert!(Instant::now() < deadline, "stuck at {}", old.generation);
        let next = tokio::time::timeout(Duration::from_secs(10), proto::read_frame(&mut recv, max));
        match next.await.unwrap().unwrap() {
            ServerMsg::Delta(d) => {
                assert!(
                    d.changes.iter().all(|c| c.since() <= 4),
                    "a version 4 member was sent {:?}",
                    d.changes
                );
                old.apply(&d).expect("no gaps");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(old.services[&shop].fqdn, "shop.example.test");
    assert!(old.names.is_empty(), "{:?}", old.names);
    // A current member's snapshot holds them.
    let (_kc, c) = join(&ep, &token, "api").await;
    assert_eq!(c.map().names[&shop], ["shop.test", "www.shop.test"]);
}

/// A large snapshot goes packed (protocol version 6) to a member that
/// reads packed messages, and plain to a member of version 5: the same
/// map either way, and the library's member gets it unpacked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_snapshots_go_packed_only_to_members_that_read_them() {
    use meshlib::proto::{self, ServerMsg};
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path(), |_| {}).await;
    h.network("prod", "10.240.0.0/22").await;
    let token = h.token("prod", json!({"uses": 100})).await;
    let ep = client_endpoint();
    let mut members = Vec::new();
    for _ in 0..30 {
        members.push(join(&ep, &token, "api").await);
    }
    // The raw snapshot frame a member of `version` is sent on joining.
    let raw_snapshot = |version: u16| {
        let (ep, token, fingerprint, quic) = (&ep, &token, h.fingerprint, h.quic);
        async move {
            let config = control::quic_config(fingerprint, &cfg()).unwrap();
            let conn = ep
                .connect_with(config, quic, proto::SERVER_NAME)
                .unwrap()
                .await
                .unwrap();
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            let (_k, m) = meta("api");
            let hello = join_hello(version, token, m);
            proto::write_frame(&mut send, &hello, 1 << 20)
                .await
                .unwrap();
            let welcome = proto::read_payload(&mut recv, 1 << 20).await.unwrap();
            assert!(matches!(
                proto::decode_payload::<ServerMsg>(&welcome).unwrap(),
                ServerMsg::Welcome(_)
            ));
            let payload = proto::read_payload(&mut recv, 1 << 20).await.unwrap();
            let (variant, _) = postcard::take_from_bytes::<u32>(&payload).unwrap();
            let ServerMsg::Snapshot(map) = proto::decode_payload(&payload).unwrap() else {
                panic!("expected a snapshot");
            };
            (variant, payload.len(), map, conn)
        }
    };
    let (v5, plain_len, old_map, _c5) = raw_snapshot(5).await;
    let (v6, packed_len, new_map, _c6) = raw_snapshot(proto::VERSION).await;
    assert_eq!(v5, 1, "a version 5 member reads a plain snapshot");
    assert_eq!(v6, 9, "a current member gets it packed");
    assert_eq!(proto::PACKED_VERSION, proto::VERSION);
    assert!(
        packed_len * 2 < plain_len,
        "packed {packed_len} of {plain_len} bytes"
    );
    assert_eq!(old_map.members.len(), 31);
    assert_eq!(new_map.members.len(), 32);
    // The library's member decodes it unpacked and agrees.
    let (_k, last) = join(&ep, &token, "api").await;
    assert_eq!(last.map().members.len(), 33);
    for (k, m) in &new_map.members {
        assert_eq!(&last.map().members[k].ip, &m.ip);
    }
    h.stop().await;
}
