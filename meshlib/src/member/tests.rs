//! The member core alone, driven by hand: every server message is written
//! here, every output checked.

use std::time::{Duration, Instant};

use super::*;
use crate::keys::PrivateKey;
use crate::netmap::{MapChange, MapDelta, Member, MemberState};

fn token() -> JoinToken {
    JoinToken {
        addrs: vec!["127.0.0.1:7443".parse().unwrap()],
        cert_sha256: [3; 32],
        network: "pn-ad0fd6a1-d05e-40ea-bf63-c4f8a75a9d8c".parse().unwrap(),
        secret: [9; 32],
        service: None,
        process_type: None,
    }
}

fn meta(key: PublicKey) -> MemberMeta {
    MemberMeta {
        public_key: key,
        service: "api".into(),
        app_id: None,
        process_type: ProcessType::default(),
        instance: None,
        runner: "r1".into(),
        endpoints: vec!["192.0.2.1:51820".parse().unwrap()],
        ports: vec![8080],
        replace: false,
        ephemeral: false,
    }
}

fn welcome(credential: Option<Secret>, generation: u64) -> Welcome {
    Welcome {
        version: proto::VERSION,
        network: token().network,
        ip: "10.240.0.1".parse().unwrap(),
        index: 1,
        instance: "api-web-1".parse().unwrap(),
        app_id: "api".parse().unwrap(),
        credential,
        observed: "192.0.2.1:40000".parse().unwrap(),
        generation,
        heartbeat_secs: 10,
    }
}

fn member(key: PublicKey, n: u8) -> Member {
    Member {
        public_key: key,
        ip: std::net::Ipv4Addr::new(10, 240, 0, n),
        endpoints: vec![],
        service: "api".into(),
        app_id: "api".parse().unwrap(),
        process_type: ProcessType::default(),
        index: n.into(),
        instance: format!("api-web-{n}").parse().unwrap(),
        runner: "r1".into(),
        ports: vec![],
        state: MemberState::Online,
    }
}

fn snapshot(generation: u64, members: &[Member]) -> NetworkMap {
    let mut map = NetworkMap::new(token().network, "prod", "10.240.0.0/22".parse().unwrap());
    map.generation = generation;
    for m in members {
        map.members.insert(m.public_key, m.clone());
    }
    map
}

fn transmits(core: &mut MemberCore) -> Vec<Transmit> {
    std::iter::from_fn(|| core.poll_transmit()).collect()
}

fn events(core: &mut MemberCore) -> Vec<Event> {
    std::iter::from_fn(|| core.poll_event()).collect()
}

fn sent_msgs(core: &mut MemberCore) -> Vec<ClientMsg> {
    transmits(core)
        .into_iter()
        .filter_map(|t| match t {
            Transmit::Send(Frame::Msg(m)) => Some(m),
            _ => None,
        })
        .collect()
}

/// A joined, live member at generation 1 with itself in the map.
fn joined(now: Instant) -> (MemberCore, PublicKey) {
    let key = PrivateKey::generate().public_key();
    let mut core = MemberCore::join(MemberConfig::default(), token(), meta(key), now);
    core.handle_timeout(now);
    assert!(matches!(
        transmits(&mut core)[..],
        [Transmit::Connect { .. }]
    ));
    core.handle_connected(now);
    core.handle_message(now, ServerMsg::Welcome(welcome(Some([7; 32]), 1)));
    core.handle_message(now, ServerMsg::Snapshot(snapshot(1, &[member(key, 1)])));
    transmits(&mut core);
    events(&mut core);
    (core, key)
}

#[test]
fn join_sends_hello_persists_membership_and_catches_up() {
    let now = Instant::now();
    let key = PrivateKey::generate().public_key();
    let mut core = MemberCore::join(MemberConfig::default(), token(), meta(key), now);
    assert_eq!(core.poll_timeout(), Some(now));
    core.handle_timeout(now);
    let t = transmits(&mut core);
    assert_eq!(
        t,
        [Transmit::Connect {
            addrs: token().addrs,
            cert_sha256: [3; 32]
        }]
    );
    core.handle_connected(now);
    match &transmits(&mut core)[..] {
        [Transmit::Send(Frame::Hello(Hello {
            request: Request::Join(j),
            version,
        }))] => {
            assert_eq!(*version, proto::VERSION);
            assert_eq!(j.public_key, key);
            assert_eq!(j.ports, [8080]);
        }
        other => panic!("expected a join hello, got {other:?}"),
    }
    core.handle_message(now, ServerMsg::Welcome(welcome(Some([7; 32]), 1)));
    let ev = events(&mut core);
    assert!(matches!(&ev[0], Event::Joined(m) if m.credential == [7; 32] && m.public_key == key));
    assert!(
        !core.is_caught_up(),
        "welcome says generation 1, map is at 0"
    );
    // Nothing to announce (the join carried endpoints and ports); only the
    // relay ticket is asked for.
    assert_eq!(sent_msgs(&mut core), [ClientMsg::GetRelay]);
    core.handle_message(now, ServerMsg::Snapshot(snapshot(1, &[member(key, 1)])));
    let ev = events(&mut core);
    assert_eq!(ev, [Event::Snapshot, Event::CaughtUp { generation: 1 }]);
    assert_eq!(core.connection(), Connection::Connected);
}

#[test]
fn heartbeats_and_a_silent_server_means_reconnect() {
    let t0 = Instant::now();
    let (mut core, _) = joined(t0);
    let hb = core.poll_timeout().unwrap();
    assert_eq!(hb, t0 + Duration::from_secs(10));
    core.handle_timeout(hb);
    assert_eq!(sent_msgs(&mut core), [ClientMsg::Heartbeat]);
    core.handle_message(hb, ServerMsg::HeartbeatAck { generation: 1 });
    // Now the server goes silent: heartbeats keep going out, and after the
    // reply timeout the connection is given up and retried.
    let mut now;
    let mut closed_at = None;
    for _ in 0..10 {
        now = core.poll_timeout().unwrap();
        core.handle_timeout(now);
        if transmits(&mut core).contains(&Transmit::Close) {
            closed_at = Some(now);
            break;
        }
    }
    let closed_at = closed_at.expect("gave up on the silent server");
    assert!(closed_at - hb >= Duration::from_secs(20));
    assert!(matches!(
        core.connection(),
        Connection::Connecting { attempt: 1, .. }
    ));
    // Reconnects after a backoff with a resume from generation 1.
    let at = core.poll_timeout().unwrap();
    assert!(at > closed_at && at <= closed_at + Duration::from_millis(500));
    core.handle_timeout(at);
    assert!(matches!(
        transmits(&mut core)[..],
        [Transmit::Connect { .. }]
    ));
    core.handle_connected(at);
    match &transmits(&mut core)[..] {
        [Transmit::Send(Frame::Hello(Hello {
            request: Request::Resume(r),
            ..
        }))] => {
            assert_eq!(r.generation, 1);
            assert_eq!(r.credential, [7; 32]);
        }
        other => panic!("expected a resume, got {other:?}"),
    }
}

#[test]
fn a_gap_asks_for_the_map_once_and_a_stale_ack_too() {
    let t0 = Instant::now();
    let (mut core, key) = joined(t0);
    let other = PrivateKey::generate().public_key();
    let gap = MapDelta {
        from: 5,
        to: 6,
        changes: vec![MapChange::Upsert(member(other, 2))],
    };
    core.handle_message(t0, ServerMsg::Delta(gap.clone()));
    core.handle_message(t0, ServerMsg::Delta(gap));
    assert_eq!(sent_msgs(&mut core), [ClientMsg::GetMap(token().network)]);
    assert_eq!(
        core.map().generation,
        1,
        "a delta with a gap changes nothing"
    );
    core.handle_message(
        t0,
        ServerMsg::Snapshot(snapshot(6, &[member(key, 1), member(other, 2)])),
    );
    assert_eq!(core.map().members.len(), 2);
    // An ack ahead of the map: something was lost.
    core.handle_message(t0, ServerMsg::HeartbeatAck { generation: 9 });
    assert_eq!(sent_msgs(&mut core), [ClientMsg::GetMap(token().network)]);
    assert!(!core.is_caught_up());
}

#[test]
fn endpoints_and_ports_are_announced_when_they_change_and_after_resume() {
    let t0 = Instant::now();
    let (mut core, _) = joined(t0);
    let ep: SocketAddr = "198.51.100.9:51820".parse().unwrap();
    core.set_endpoints(vec![ep]);
    core.set_ports(vec![8080]); // unchanged: nothing sent
    assert_eq!(sent_msgs(&mut core), [ClientMsg::UpdateEndpoints(vec![ep])]);
    core.handle_disconnected(t0, "reset".into());
    core.set_ports(vec![9090]);
    assert!(sent_msgs(&mut core).is_empty(), "not connected");
    let at = core.poll_timeout().unwrap();
    core.handle_timeout(at);
    core.handle_connected(at);
    transmits(&mut core);
    core.handle_message(at, ServerMsg::Welcome(welcome(None, 1)));
    // The resume carried the endpoints; the ports follow.
    assert_eq!(
        sent_msgs(&mut core),
        [ClientMsg::GetRelay, ClientMsg::UpdatePorts(vec![9090])]
    );
}

#[test]
fn relay_tickets_are_passed_on_and_renewed_before_they_expire() {
    let t0 = Instant::now();
    let (mut core, _) = joined(t0);
    let info = proto::RelayInfo {
        stun: vec!["192.0.2.1:3478".parse().unwrap()],
        relay: Some("192.0.2.1:3478".parse().unwrap()),
        ticket: vec![1, 2, 3],
        lifetime_secs: 240,
        tcp: None,
        cert_sha256: [0; 32],
    };
    core.handle_message(t0, ServerMsg::Relay(info.clone()));
    assert!(events(&mut core).contains(&Event::Relay(info)));
    sent_msgs(&mut core);
    // Half the ticket's life later (heartbeats answered meanwhile), it
    // asks again, and not before.
    let mut t = t0;
    let mut asked_at = None;
    for _ in 0..1000 {
        t = core.poll_timeout().unwrap().max(t);
        core.handle_timeout(t);
        let msgs = sent_msgs(&mut core);
        if msgs.contains(&ClientMsg::Heartbeat) {
            core.handle_message(t, ServerMsg::HeartbeatAck { generation: 1 });
        }
        if msgs.contains(&ClientMsg::GetRelay) {
            asked_at = Some(t);
            break;
        }
    }
    let after = asked_at.expect("asked again").duration_since(t0);
    assert_eq!(after, std::time::Duration::from_secs(120));
}

#[test]
fn refusals_are_final_or_retried_by_kind() {
    let t0 = Instant::now();
    let refuse = |code| {
        let key = PrivateKey::generate().public_key();
        let mut core = MemberCore::join(MemberConfig::default(), token(), meta(key), t0);
        core.handle_timeout(t0);
        core.handle_connected(t0);
        core.handle_message(
            t0,
            ServerMsg::Error(ProtoError {
                code,
                message: "no".into(),
            }),
        );
        events(&mut core)
    };
    for code in [ErrorCode::Busy, ErrorCode::Internal] {
        let ev = refuse(code);
        assert!(
            matches!(&ev[..], [Event::Connection(Connection::Connecting { .. })]),
            "{code:?} is retried: {ev:?}"
        );
    }
    for code in [
        ErrorCode::InvalidToken,
        ErrorCode::TokenUsedUp,
        ErrorCode::KeyInUse,
    ] {
        let ev = refuse(code);
        assert!(
            matches!(ev.last(), Some(Event::Ended(End::Refused(e))) if e.code == code),
            "{code:?} is final: {ev:?}"
        );
    }
}

#[test]
fn backoff_doubles_with_jitter_and_caps() {
    let t0 = Instant::now();
    let key = PrivateKey::generate().public_key();
    let mut core = MemberCore::join(MemberConfig::default(), token(), meta(key), t0);
    let mut now = t0;
    let mut delays = vec![];
    for _ in 0..8 {
        core.handle_timeout(now);
        core.handle_connect_failed(now, "refused".into());
        let at = core.poll_timeout().unwrap();
        delays.push(at - now);
        now = at;
    }
    assert!(delays[0] <= Duration::from_millis(500));
    assert!(delays[0] >= Duration::from_millis(375));
    assert!(delays[3] >= Duration::from_secs(3));
    assert!(delays.iter().all(|d| *d <= Duration::from_secs(15)));
    assert!(delays[7] >= Duration::from_millis(11_250));
}

#[test]
fn rotation_confirmed_switches_the_membership_key() {
    let t0 = Instant::now();
    let (mut core, old) = joined(t0);
    let new = PrivateKey::generate().public_key();
    assert_eq!(core.rotate_key(t0, old), Err(RequestError::SameKey));
    core.rotate_key(t0, new).unwrap();
    assert_eq!(
        core.rotate_key(t0, PrivateKey::generate().public_key()),
        Err(RequestError::RotationPending)
    );
    match &sent_msgs(&mut core)[..] {
        [ClientMsg::RotateKey(r)] => {
            assert_eq!(r.new_public_key, new);
            assert_eq!(r.credential, [7; 32]);
        }
        other => panic!("{other:?}"),
    }
    core.handle_message(t0, ServerMsg::KeyRotated { public_key: new });
    assert_eq!(events(&mut core), [Event::KeyRotated { old, new }]);
    assert_eq!(core.membership().unwrap().public_key, new);
}

#[test]
fn rotation_refused_keeps_the_old_key() {
    let t0 = Instant::now();
    let (mut core, old) = joined(t0);
    let new = PrivateKey::generate().public_key();
    core.rotate_key(t0, new).unwrap();
    sent_msgs(&mut core);
    let e = ProtoError {
        code: ErrorCode::KeyInUse,
        message: "taken".into(),
    };
    core.handle_message(t0, ServerMsg::Error(e.clone()));
    assert_eq!(events(&mut core), [Event::RotationFailed(e)]);
    assert_eq!(core.membership().unwrap().public_key, old);
}

#[test]
fn rotation_cut_off_is_finished_with_the_new_key() {
    let t0 = Instant::now();
    let (mut core, old) = joined(t0);
    let new = PrivateKey::generate().public_key();
    core.rotate_key(t0, new).unwrap();
    sent_msgs(&mut core);
    // The keyserver took it, but the connection died before the answer.
    core.handle_disconnected(t0, "reset".into());
    let mut now = core.poll_timeout().unwrap();
    core.handle_timeout(now);
    transmits(&mut core);
    core.handle_connected(now);
    let key_of = |t: Vec<Transmit>| match &t[..] {
        [Transmit::Send(Frame::Hello(Hello {
            request: Request::Resume(r),
            ..
        }))] => r.public_key,
        other => panic!("{other:?}"),
    };
    assert_eq!(key_of(transmits(&mut core)), old);
    core.handle_message(
        now,
        ServerMsg::Error(ProtoError {
            code: ErrorCode::BadCredential,
            message: "unknown member".into(),
        }),
    );
    now = core.poll_timeout().unwrap();
    core.handle_timeout(now);
    transmits(&mut core);
    core.handle_connected(now);
    assert_eq!(key_of(transmits(&mut core)), new);
    core.handle_message(now, ServerMsg::Welcome(welcome(None, 1)));
    assert!(events(&mut core).contains(&Event::KeyRotated { old, new }));
    assert_eq!(core.membership().unwrap().public_key, new);
}

#[test]
fn shutdown_says_offline_and_ends_on_goodbye_or_timeout() {
    let t0 = Instant::now();
    let (mut core, _) = joined(t0);
    core.shutdown(t0);
    assert_eq!(sent_msgs(&mut core), [ClientMsg::Offline]);
    core.handle_message(t0, ServerMsg::Goodbye(Goodbye::Offline));
    assert!(events(&mut core).contains(&Event::Ended(End::Offline { confirmed: true })));
    assert!(core.is_ended() && core.poll_timeout().is_none());

    let (mut core, _) = joined(t0);
    core.shutdown(t0);
    transmits(&mut core);
    let deadline = core.poll_timeout().unwrap();
    assert_eq!(deadline, t0 + Duration::from_secs(3));
    core.handle_timeout(deadline);
    assert_eq!(transmits(&mut core), [Transmit::Close]);
    assert!(events(&mut core).contains(&Event::Ended(End::Offline { confirmed: false })));
}

#[test]
fn leave_while_disconnected_connects_first_then_gives_up_in_time() {
    let t0 = Instant::now();
    let (mut core, _) = joined(t0);
    core.handle_disconnected(t0, "reset".into());
    transmits(&mut core);
    core.leave(t0).unwrap();
    core.handle_timeout(t0);
    assert!(matches!(
        transmits(&mut core)[..],
        [Transmit::Connect { .. }]
    ));
    core.handle_connected(t0);
    transmits(&mut core);
    core.handle_message(t0, ServerMsg::Welcome(welcome(None, 1)));
    assert_eq!(sent_msgs(&mut core), [ClientMsg::Leave]);
    core.handle_message(t0, ServerMsg::Goodbye(Goodbye::Left));
    assert!(events(&mut core).contains(&Event::Ended(End::Left)));

    // Unreachable keyserver: bounded by the leave timeout.
    let (mut core, _) = joined(t0);
    core.handle_disconnected(t0, "reset".into());
    core.leave(t0).unwrap();
    let mut now = t0;
    for _ in 0..100 {
        let Some(at) = core.poll_timeout() else { break };
        now = at;
        core.handle_timeout(now);
        if transmits(&mut core).contains(&Transmit::Connect {
            addrs: token().addrs,
            cert_sha256: [3; 32],
        }) {
            core.handle_connect_failed(now, "unreachable".into());
        }
    }
    assert!(core.is_ended());
    assert!(now <= t0 + Duration::from_secs(10));
    assert!(events(&mut core)
        .iter()
        .any(|e| matches!(e, Event::Ended(End::LeaveUnconfirmed(_)))));
}

#[test]
fn revocation_and_one_shot_sessions_end() {
    let t0 = Instant::now();
    let (mut core, _) = joined(t0);
    core.handle_message(
        t0,
        ServerMsg::Error(ProtoError {
            code: ErrorCode::Revoked,
            message: "removed".into(),
        }),
    );
    assert!(
        events(&mut core).contains(&Event::Ended(End::Revoked(Revoked {
            reason: Revocation::Removed,
            message: "removed".into()
        })))
    );

    let key = PrivateKey::generate().public_key();
    let cfg = MemberConfig {
        reconnect: false,
        ..MemberConfig::default()
    };
    let mut core = MemberCore::join(cfg, token(), meta(key), t0);
    core.handle_timeout(t0);
    core.handle_connect_failed(t0, "refused".into());
    assert!(
        events(&mut core).contains(&Event::Ended(End::Lost(Setback::Unreachable(
            "refused".into()
        ))))
    );
}

#[test]
fn key_lifetime_asks_for_a_rotation() {
    let t0 = Instant::now();
    let key = PrivateKey::generate().public_key();
    let cfg = MemberConfig {
        key_lifetime: Some(Duration::from_secs(3600)),
        ..MemberConfig::default()
    };
    let mut core = MemberCore::join(cfg, token(), meta(key), t0);
    core.handle_timeout(t0);
    core.handle_connected(t0);
    core.handle_message(t0, ServerMsg::Welcome(welcome(Some([1; 32]), 0)));
    events(&mut core);
    let due = t0 + Duration::from_secs(3600);
    let mut now = t0;
    while now < due {
        now = core.poll_timeout().unwrap();
        core.handle_timeout(now);
        core.handle_message(now, ServerMsg::HeartbeatAck { generation: 0 });
        transmits(&mut core);
        if events(&mut core).contains(&Event::RotationDue) {
            break;
        }
    }
    assert_eq!(now, due);
}

#[test]
fn reconnects_start_at_the_next_keyserver_address() {
    let t0 = Instant::now();
    let a: Vec<SocketAddr> = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    let key = PrivateKey::generate().public_key();
    let t = JoinToken {
        addrs: a.clone(),
        ..token()
    };
    let mut core = MemberCore::join(MemberConfig::default(), t, meta(key), t0);
    let mut firsts = Vec::new();
    let mut now = t0;
    for _ in 0..4 {
        now = core.poll_timeout().unwrap().max(now);
        core.handle_timeout(now);
        match &transmits(&mut core)[..] {
            [Transmit::Connect { addrs, .. }] => {
                assert_eq!(addrs.len(), 3, "every address is still tried");
                firsts.push(addrs[0]);
            }
            other => panic!("expected a connect, got {other:?}"),
        }
        core.handle_connect_failed(now, "refused".into());
    }
    // Each attempt starts one address further: a dead replica listed first
    // costs one attempt, not every one.
    assert_eq!(firsts, [a[0], a[1], a[2], a[0]]);
}

/// Every error code, so that the tables below cover each (the match makes
/// a new code a compile error here until it is placed).
fn all_codes() -> Vec<ErrorCode> {
    let all = vec![
        ErrorCode::UnsupportedVersion,
        ErrorCode::InvalidToken,
        ErrorCode::TokenExpired,
        ErrorCode::TokenUsedUp,
        ErrorCode::TokenBinding,
        ErrorCode::UnknownNetwork,
        ErrorCode::NetworkFull,
        ErrorCode::KeyInUse,
        ErrorCode::InstanceTaken,
        ErrorCode::BadCredential,
        ErrorCode::Forbidden,
        ErrorCode::Revoked,
        ErrorCode::Malformed,
        ErrorCode::InvalidMetadata,
        ErrorCode::Busy,
        ErrorCode::Internal,
        ErrorCode::Replaced,
    ];
    for code in &all {
        match code {
            ErrorCode::UnsupportedVersion
            | ErrorCode::InvalidToken
            | ErrorCode::TokenExpired
            | ErrorCode::TokenUsedUp
            | ErrorCode::TokenBinding
            | ErrorCode::UnknownNetwork
            | ErrorCode::NetworkFull
            | ErrorCode::KeyInUse
            | ErrorCode::InstanceTaken
            | ErrorCode::BadCredential
            | ErrorCode::Forbidden
            | ErrorCode::Revoked
            | ErrorCode::Malformed
            | ErrorCode::InvalidMetadata
            | ErrorCode::Busy
            | ErrorCode::Internal
            | ErrorCode::Replaced => {}
        }
    }
    all
}

fn refusal(code: ErrorCode) -> ServerMsg {
    ServerMsg::Error(ProtoError {
        code,
        message: format!("says {code:?}"),
    })
}

/// The request of the next hello, after the backoff (earlier transmits,
/// such as the refused connection's close, are dropped).
fn next_hello(core: &mut MemberCore) -> Request {
    transmits(core);
    let at = core.poll_timeout().expect("a retry is due");
    core.handle_timeout(at);
    assert!(
        matches!(transmits(core)[..], [Transmit::Connect { .. }]),
        "reconnects"
    );
    core.handle_connected(at);
    match transmits(core).pop() {
        Some(Transmit::Send(Frame::Hello(h))) => h.request,
        other => panic!("expected a hello, got {other:?}"),
    }
}

/// A member resuming a stored membership, its hello sent.
fn resuming(cfg: MemberConfig, now: Instant) -> (MemberCore, Membership) {
    let m = Membership {
        addrs: token().addrs,
        cert_sha256: [3; 32],
        network: token().network,
        public_key: PrivateKey::generate().public_key(),
        credential: [7; 32],
    };
    let map = snapshot(4, &[member(m.public_key, 1)]);
    let mut core = MemberCore::resume(cfg, m.clone(), map, vec![], vec![], now);
    core.handle_timeout(now);
    core.handle_connected(now);
    transmits(&mut core);
    (core, m)
}

#[test]
fn a_first_join_ends_on_token_refusals_and_retries_the_rest_with_the_same_key() {
    let t0 = Instant::now();
    let retried = [
        ErrorCode::UnsupportedVersion,
        ErrorCode::Malformed,
        ErrorCode::Forbidden,
        ErrorCode::Busy,
        ErrorCode::Internal,
    ];
    for code in all_codes() {
        let key = PrivateKey::generate().public_key();
        let mut core = MemberCore::join(MemberConfig::default(), token(), meta(key), t0);
        core.handle_timeout(t0);
        core.handle_connected(t0);
        transmits(&mut core);
        core.handle_message(t0, refusal(code));
        let ev = events(&mut core);
        assert_eq!(transmits(&mut core), [Transmit::Close], "{code:?}");
        assert_eq!(join_refusal_is_final(code), !retried.contains(&code));
        if retried.contains(&code) {
            let setback = Setback::Refused(ProtoError {
                code,
                message: format!("says {code:?}"),
            });
            assert_eq!(
                ev,
                [Event::Connection(Connection::Connecting {
                    attempt: 1,
                    last_error: Some(setback.clone()),
                })],
                "{code:?} is retried"
            );
            assert_eq!(
                core.connection(),
                Connection::Connecting {
                    attempt: 1,
                    last_error: Some(setback)
                }
            );
            match next_hello(&mut core) {
                Request::Join(j) => assert_eq!(j.public_key, key, "{code:?}: same key"),
                other => panic!("{code:?}: expected a join, got {other:?}"),
            }
        } else {
            assert!(
                matches!(ev.last(), Some(Event::Ended(End::Refused(e))) if e.code == code),
                "{code:?} ends the join: {ev:?}"
            );
            assert!(core.is_ended() && core.membership().is_none());
        }
    }
}

#[test]
fn a_resume_ends_only_on_a_revocation_and_retries_everything_else() {
    let t0 = Instant::now();
    for code in all_codes() {
        let (mut core, m) = resuming(MemberConfig::default(), t0);
        core.handle_message(t0, refusal(code));
        let ev = events(&mut core);
        assert_eq!(transmits(&mut core), [Transmit::Close], "{code:?}");
        let message = format!("says {code:?}");
        match Revocation::from_code(code) {
            Some(reason) => {
                assert!(code.ends_membership(), "{code:?}");
                assert_eq!(reason.code(), code);
                assert_eq!(
                    ev.last(),
                    Some(&Event::Ended(End::Revoked(Revoked { reason, message }))),
                    "{code:?} ends the membership"
                );
                assert!(core.is_ended());
            }
            None => {
                assert!(!code.ends_membership(), "{code:?}");
                assert_eq!(
                    ev,
                    [Event::Connection(Connection::Connecting {
                        attempt: 1,
                        last_error: Some(Setback::Refused(ProtoError { code, message })),
                    })],
                    "{code:?} is retried"
                );
                assert_eq!(core.membership(), Some(&m), "{code:?}: membership kept");
                match next_hello(&mut core) {
                    Request::Resume(r) => {
                        assert_eq!(r.public_key, m.public_key);
                        assert_eq!(r.credential, m.credential);
                        assert_eq!(r.generation, 4, "{code:?}: from the cached map");
                    }
                    other => panic!("{code:?}: expected a resume, got {other:?}"),
                }
            }
        }
    }
    let revocations: Vec<_> = all_codes()
        .into_iter()
        .filter_map(Revocation::from_code)
        .collect();
    assert_eq!(
        revocations,
        [
            Revocation::UnknownCredential,
            Revocation::Removed,
            Revocation::Replaced
        ]
    );
}

#[test]
fn repeated_refusals_back_off_and_keep_the_membership() {
    let t0 = Instant::now();
    let (mut core, m) = resuming(MemberConfig::default(), t0);
    let mut now = t0;
    let mut delays = vec![];
    for code in [
        ErrorCode::UnsupportedVersion,
        ErrorCode::Malformed,
        ErrorCode::Forbidden,
        ErrorCode::UnsupportedVersion,
        ErrorCode::InvalidMetadata,
    ] {
        core.handle_message(now, refusal(code));
        let at = core.poll_timeout().unwrap();
        delays.push(at - now);
        assert!(matches!(next_hello(&mut core), Request::Resume(_)));
        now = at;
    }
    events(&mut core);
    assert!(delays.windows(2).all(|w| w[1] > w[0]), "{delays:?}");
    assert!(matches!(
        core.connection(),
        Connection::Connecting { attempt: 5, .. }
    ));
    // The keyserver comes back: the same membership resumes.
    core.handle_message(now, ServerMsg::Welcome(welcome(None, 4)));
    assert_eq!(core.connection(), Connection::Connected);
    assert_eq!(core.membership(), Some(&m));
}

#[test]
fn a_live_session_ends_on_removal_or_replacement_only() {
    let t0 = Instant::now();
    for code in all_codes() {
        let (mut core, _) = joined(t0);
        core.handle_message(t0, refusal(code));
        let ev = events(&mut core);
        let message = format!("says {code:?}");
        match code {
            ErrorCode::Revoked | ErrorCode::Replaced => {
                let reason = Revocation::from_code(code).unwrap();
                assert_eq!(transmits(&mut core), [Transmit::Close]);
                assert_eq!(
                    ev.last(),
                    Some(&Event::Ended(End::Revoked(Revoked { reason, message })))
                );
            }
            _ => {
                // A refused request; the session goes on (the keyserver
                // closes it if it means to, which is retried).
                assert_eq!(
                    ev,
                    [Event::Rejected(ProtoError { code, message })],
                    "{code:?}"
                );
                assert_eq!(core.connection(), Connection::Connected);
                core.handle_disconnected(t0, "closed".into());
                assert!(matches!(next_hello(&mut core), Request::Resume(_)));
            }
        }
    }
}

#[test]
fn protocol_violations_and_silence_are_retried() {
    let t0 = Instant::now();
    let (mut core, m) = resuming(MemberConfig::default(), t0);
    core.handle_message(t0, ServerMsg::HeartbeatAck { generation: 1 });
    assert_eq!(transmits(&mut core), [Transmit::Close]);
    assert_eq!(
        events(&mut core),
        [Event::Connection(Connection::Connecting {
            attempt: 1,
            last_error: Some(Setback::Protocol(
                "heartbeat answer before the welcome".into()
            )),
        })]
    );
    assert!(matches!(next_hello(&mut core), Request::Resume(_)));
    // No welcome in time.
    let at = core.poll_timeout().unwrap();
    core.handle_timeout(at);
    assert!(matches!(
        core.connection(),
        Connection::Connecting {
            attempt: 2,
            last_error: Some(Setback::Unreachable(_))
        }
    ));
    assert_eq!(core.membership(), Some(&m));
}

#[test]
fn a_one_shot_session_ends_instead_of_retrying_but_keeps_the_membership() {
    let t0 = Instant::now();
    let cfg = MemberConfig {
        reconnect: false,
        ..MemberConfig::default()
    };
    for code in all_codes() {
        let (mut core, m) = resuming(cfg.clone(), t0);
        core.handle_message(t0, refusal(code));
        let ev = events(&mut core);
        let message = format!("says {code:?}");
        let end = match Revocation::from_code(code) {
            Some(reason) => End::Revoked(Revoked { reason, message }),
            None => End::Lost(Setback::Refused(ProtoError { code, message })),
        };
        assert_eq!(ev.last(), Some(&Event::Ended(end)), "{code:?}");
        assert_eq!(core.membership(), Some(&m));
    }
    let key = PrivateKey::generate().public_key();
    let mut core = MemberCore::join(cfg, token(), meta(key), t0);
    core.handle_timeout(t0);
    core.handle_connected(t0);
    core.handle_message(t0, refusal(ErrorCode::Busy));
    assert!(matches!(
        events(&mut core).last(),
        Some(Event::Ended(End::Lost(Setback::Refused(e)))) if e.code == ErrorCode::Busy
    ));
}

#[test]
fn during_a_rotation_a_revocation_is_believed_only_after_the_new_key_is_tried() {
    let t0 = Instant::now();
    for code in [
        ErrorCode::BadCredential,
        ErrorCode::Revoked,
        ErrorCode::Replaced,
    ] {
        let (mut core, old) = joined(t0);
        let new = PrivateKey::generate().public_key();
        core.rotate_key(t0, new).unwrap();
        core.handle_disconnected(t0, "reset".into());
        transmits(&mut core);
        match next_hello(&mut core) {
            Request::Resume(r) => assert_eq!(r.public_key, old),
            other => panic!("{other:?}"),
        }
        core.handle_message(t0, refusal(code));
        assert!(!core.is_ended(), "{code:?}: the new key is tried first");
        match next_hello(&mut core) {
            Request::Resume(r) => assert_eq!(r.public_key, new),
            other => panic!("{other:?}"),
        }
        events(&mut core);
        core.handle_message(t0, refusal(code));
        let reason = Revocation::from_code(code).unwrap();
        assert!(
            matches!(events(&mut core).last(), Some(Event::Ended(End::Revoked(r))) if r.reason == reason),
            "{code:?}"
        );
    }
}

#[test]
fn setbacks_and_revocations_read_well() {
    let v = Setback::Refused(ProtoError {
        code: ErrorCode::UnsupportedVersion,
        message: "server speaks versions 2 to 3, client 4".into(),
    });
    assert_eq!(
        v.to_string(),
        format!(
            "speaks another protocol version (this member speaks {}): server speaks versions 2 to 3, client 4",
            proto::VERSION
        )
    );
    let m = Setback::Refused(ProtoError {
        code: ErrorCode::Malformed,
        message: "bad frame".into(),
    });
    assert_eq!(m.to_string(), "refused (Malformed): bad frame");
    let r = Revoked {
        reason: Revocation::Replaced,
        message: "slot taken".into(),
    };
    assert_eq!(
        r.to_string(),
        "replaced by another key that took this member's slot (the keyserver said: slot taken)"
    );
    assert_eq!(r.to_proto_error().code, ErrorCode::Replaced);
}

/// A snapshot with a wakeable `db` address (timeout 20 s) and a plain `web`
/// one, at generation 2.
fn with_addresses(key: PublicKey) -> NetworkMap {
    let mut map = snapshot(2, &[member(key, 1)]);
    for (service, n, wake) in [("db", 1, Some(20)), ("web", 2, None)] {
        map.addresses.insert(
            service.into(),
            crate::netmap::ServiceAddress {
                service: service.into(),
                ip: std::net::Ipv4Addr::new(10, 240, 4, n),
                wake_timeout_secs: wake,
                ports: vec![],
            },
        );
    }
    map
}

/// Wake requests: one per service and wake timeout however often the data
/// plane asks; refused for a service the map does not have or that is not
/// wakeable; kept while disconnected and sent after the next welcome.
#[test]
fn wake_requests_are_sent_once_per_timeout_and_kept_across_reconnects() {
    let t0 = Instant::now();
    let (mut core, key) = joined(t0);
    core.handle_message(t0, ServerMsg::Snapshot(with_addresses(key)));
    events(&mut core);
    assert_eq!(core.wake(t0, "db"), Ok(true));
    assert_eq!(core.wake(t0, "db"), Ok(false));
    let later = t0 + Duration::from_secs(19);
    assert_eq!(core.wake(later, "db"), Ok(false));
    assert_eq!(
        sent_msgs(&mut core),
        [ClientMsg::Wake {
            service: "db".into()
        }]
    );
    assert_eq!(
        core.wake(t0, "web"),
        Err(RequestError::NotWakeable("web".into()))
    );
    assert_eq!(
        core.wake(t0, "nope"),
        Err(RequestError::UnknownService("nope".into()))
    );
    // After the wake timeout, again.
    let t1 = t0 + Duration::from_secs(21);
    assert_eq!(core.wake(t1, "db"), Ok(true));
    assert_eq!(sent_msgs(&mut core).len(), 1);
    // Disconnected: kept, then sent after the welcome (if still fresh).
    core.handle_disconnected(t1, "lost".into());
    let t2 = t1 + Duration::from_secs(25);
    assert_eq!(core.wake(t2, "db"), Ok(true));
    core.handle_timeout(core.poll_timeout().unwrap());
    let t3 = t2 + Duration::from_secs(1);
    core.handle_connected(t3);
    core.handle_message(t3, ServerMsg::Welcome(welcome(None, 2)));
    let sent = sent_msgs(&mut core);
    assert!(
        sent.contains(&ClientMsg::Wake {
            service: "db".into()
        }),
        "{sent:?}"
    );
    // An ended session takes no request.
    core.shutdown(t3);
    assert_eq!(core.wake(t3, "db"), Err(RequestError::Ended));
}

/// Traffic reports: sent at once, then at most every interval and only
/// when changed; resent on a new connection; a report out of bounds is
/// refused; a keyserver older than version 4 gets none.
#[test]
fn traffic_reports_are_rate_limited_and_resent_after_a_reconnect() {
    use crate::traffic::{PairTraffic, TrafficCounters, TrafficReport};
    let report = |opened| TrafficReport {
        pairs: vec![PairTraffic {
            destination: "db".into(),
            counters: TrafficCounters {
                opened,
                ..Default::default()
            },
        }],
        ..Default::default()
    };
    let is_report = |m: &ClientMsg| matches!(m, ClientMsg::Traffic(_));
    let t0 = Instant::now();
    let (mut core, _) = joined(t0);
    core.report_traffic(t0, report(1)).unwrap();
    assert_eq!(sent_msgs(&mut core), [ClientMsg::Traffic(report(1))]);
    // Changed within the interval: sent when it ends.
    let t1 = t0 + Duration::from_secs(3);
    core.report_traffic(t1, report(2)).unwrap();
    assert!(sent_msgs(&mut core).is_empty());
    let due = t0 + Duration::from_secs(10);
    assert_eq!(core.poll_timeout(), Some(due));
    core.handle_timeout(due);
    assert!(sent_msgs(&mut core)
        .iter()
        .any(|m| m == &ClientMsg::Traffic(report(2))));
    // Unchanged: nothing more, and no timer for it.
    let t2 = due + Duration::from_secs(10);
    core.report_traffic(t2, report(2)).unwrap();
    assert!(!sent_msgs(&mut core).iter().any(is_report));
    assert_ne!(core.poll_timeout(), Some(t2 + Duration::from_secs(10)));
    // A new connection gets it again.
    core.handle_disconnected(t2, "lost".into());
    core.handle_timeout(core.poll_timeout().unwrap());
    let t3 = t2 + Duration::from_secs(2);
    core.handle_connected(t3);
    core.handle_message(t3, ServerMsg::Welcome(welcome(None, 1)));
    assert!(sent_msgs(&mut core).contains(&ClientMsg::Traffic(report(2))));
    // Out of bounds.
    let mut twice = report(1);
    twice.pairs.push(twice.pairs[0].clone());
    assert!(matches!(
        core.report_traffic(t3, twice),
        Err(RequestError::BadReport(_))
    ));
    // An older keyserver: nothing sent, no busy timer.
    core.handle_disconnected(t3, "lost".into());
    core.handle_timeout(core.poll_timeout().unwrap());
    let t4 = t3 + Duration::from_secs(2);
    core.handle_connected(t4);
    let mut old = welcome(None, 1);
    old.version = 3;
    core.handle_message(t4, ServerMsg::Welcome(old));
    core.report_traffic(t4, report(9)).unwrap();
    assert!(!sent_msgs(&mut core).iter().any(is_report));
    assert!(core.poll_timeout().is_some_and(|t| t > t4));
    assert_eq!(
        core.wake(t4, "db"),
        Err(RequestError::UnknownService("db".into())),
        "this map has no addresses"
    );
}
