//! Lifecycle requests against the real registry and stream sessions, with an
//! in-memory store and explicit times: what is refused changes nothing.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keyserver::registry::Lifecycle;
use keyserver::server::{Limits, Shared};
use keyserver::session::{Next, Reply, StreamSession};
use keyserver::store::MemStore;
use meshlib::ids::NetworkId;
use meshlib::keys::PrivateKey;
use meshlib::netmap::{MapChange, MemberState, NetworkMap};
use meshlib::proto::{
    ClientMsg, ErrorCode, Goodbye, Hello, JoinRequest, Request, ResumeRequest, RotateKey,
    ServerMsg, VERSION,
};

fn t(s: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000 + s)
}

const OBS: &str = "192.0.2.7:40000";

struct World {
    shared: Shared,
    net: NetworkId,
}

impl World {
    fn new() -> Self {
        let limits = Limits {
            lifecycle: Lifecycle {
                offline_after: Duration::from_secs(30),
                expire_after: Duration::from_secs(600),
                ephemeral_after: None,
            },
            ..Limits::default()
        };
        let (shared, _) = Shared::new(Box::new(MemStore::new()), limits, [0; 32], t(0)).unwrap();
        let (net, ()) = shared
            .mutate(
                |r| {
                    let (n, ops) = r.create_network("prod", meshlib::ipam::DEFAULT_RANGE, t(0))?;
                    let (_, more) = r.create_token(
                        n.id,
                        &[1; 32],
                        10,
                        Duration::from_secs(3600),
                        None,
                        None,
                        t(0),
                    )?;
                    Ok::<_, keyserver::registry::AdminError>((n.id, [ops, more].concat(), vec![]))
                },
                |_, _, _| (),
            )
            .unwrap();
        Self { shared, net }
    }

    fn map(&self) -> NetworkMap {
        self.shared.read(|r| r.snapshot(self.net)).unwrap()
    }

    /// Joins `service`; the session, its key and its credential.
    fn join(&self, service: &str, credential: [u8; 32]) -> (StreamSession, PrivateKey) {
        let key = PrivateKey::generate();
        let hello = Hello {
            version: VERSION,
            request: Request::Join(JoinRequest {
                network: self.net,
                token_secret: [1; 32],
                public_key: key.public_key(),
                service: service.into(),
                app_id: None,
                process_type: Default::default(),
                instance: None,
                runner: "r".into(),
                endpoints: vec![],
                ports: vec![],
                service_groups: vec![],
                publish: vec![],
                replace: false,
                ephemeral: false,
            }),
        };
        let (s, replies, _pushes) =
            StreamSession::open(&self.shared, hello, OBS.parse().unwrap(), credential, t(1))
                .unwrap();
        assert!(matches!(&replies[0], Reply::Msg(ServerMsg::Welcome(w)) if w.heartbeat_secs == 10));
        (s, key)
    }

    fn send(&self, s: &mut StreamSession, msg: ClientMsg, at: u64) -> Vec<ServerMsg> {
        let obs: SocketAddr = OBS.parse().unwrap();
        let (replies, _) = s.on_client(&self.shared, msg, obs, t(at)).unwrap();
        replies
            .into_iter()
            .map(|r| match r {
                Reply::Msg(m) => m,
                Reply::Frame(_) => panic!("a push among replies"),
            })
            .collect()
    }
}

fn error_code(msgs: &[ServerMsg]) -> ErrorCode {
    match msgs {
        [ServerMsg::Error(e)] => e.code,
        other => panic!("expected one error, got {other:?}"),
    }
}

#[test]
fn resume_with_a_wrong_credential_is_refused_and_changes_nothing() {
    let w = World::new();
    let (_s, key) = w.join("api", [5; 32]);
    let before = w.map();
    let hello = Hello {
        version: VERSION,
        request: Request::Resume(ResumeRequest {
            network: w.net,
            public_key: key.public_key(),
            credential: [6; 32],
            generation: 0,
            endpoints: vec!["198.51.100.1:1".parse().unwrap()],
        }),
    };
    let err =
        StreamSession::open(&w.shared, hello, OBS.parse().unwrap(), [0; 32], t(2)).unwrap_err();
    assert_eq!(err.0, ErrorCode::BadCredential);
    assert_eq!(w.map(), before);
}

#[test]
fn rotation_refusals_change_nothing() {
    let w = World::new();
    let (mut a, ka) = w.join("api", [5; 32]);
    let (_b, kb) = w.join("db", [6; 32]);
    let before = w.map();
    // Wrong credential.
    let msgs = w.send(
        &mut a,
        ClientMsg::RotateKey(RotateKey {
            new_public_key: PrivateKey::generate().public_key(),
            credential: [9; 32],
        }),
        2,
    );
    assert_eq!(error_code(&msgs), ErrorCode::BadCredential);
    // Another member's key, and its own key.
    for taken in [kb.public_key(), ka.public_key()] {
        let msgs = w.send(
            &mut a,
            ClientMsg::RotateKey(RotateKey {
                new_public_key: taken,
                credential: [5; 32],
            }),
            3,
        );
        assert_eq!(error_code(&msgs), ErrorCode::KeyInUse);
    }
    assert_eq!(w.map(), before, "nothing changed");
    // A good one, then back to the old key: refused too.
    let new = PrivateKey::generate().public_key();
    let msgs = w.send(
        &mut a,
        ClientMsg::RotateKey(RotateKey {
            new_public_key: new,
            credential: [5; 32],
        }),
        4,
    );
    assert_eq!(msgs, [ServerMsg::KeyRotated { public_key: new }]);
    let map = w.map();
    assert!(map.members.contains_key(&new) && !map.members.contains_key(&ka.public_key()));
    assert_eq!(map.generation, before.generation + 1, "one delta");
    let msgs = w.send(
        &mut a,
        ClientMsg::RotateKey(RotateKey {
            new_public_key: ka.public_key(),
            credential: [5; 32],
        }),
        5,
    );
    assert_eq!(error_code(&msgs), ErrorCode::KeyInUse);
    assert_eq!(w.map(), map);
    // The delta replaces the key and keeps the address.
    match w
        .shared
        .read(|r| r.catchup(w.net, before.generation))
        .unwrap()
    {
        keyserver::registry::Catchup::Delta(d) => {
            assert_eq!(d.changes.len(), 2);
            assert!(matches!(&d.changes[0], MapChange::Remove(k) if *k == ka.public_key()));
            assert!(matches!(&d.changes[1], MapChange::Upsert(m)
                if m.public_key == new && m.ip == before.members[&ka.public_key()].ip));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn lifecycle_messages_out_of_order_are_refused() {
    let w = World::new();
    let (mut a, ka) = w.join("api", [5; 32]);
    let obs: SocketAddr = OBS.parse().unwrap();
    let (replies, next) = a
        .on_client(&w.shared, ClientMsg::Offline, obs, t(2))
        .unwrap();
    assert!(matches!(
        &replies[..],
        [Reply::Msg(ServerMsg::Goodbye(Goodbye::Offline))]
    ));
    assert_eq!(next, Next::Close);
    assert_eq!(
        w.map().members[&ka.public_key()].state,
        MemberState::Offline
    );
    let after = w.map();
    // Anything after the goodbye on the same session: refused.
    for msg in [
        ClientMsg::Heartbeat,
        ClientMsg::Leave,
        ClientMsg::Offline,
        ClientMsg::RotateKey(RotateKey {
            new_public_key: PrivateKey::generate().public_key(),
            credential: [5; 32],
        }),
    ] {
        let err = a.on_client(&w.shared, msg, obs, t(3)).unwrap_err();
        assert_eq!(err.0, ErrorCode::Malformed);
        assert!(err.1.contains("ended"), "{}", err.1);
    }
    assert_eq!(w.map(), after, "nothing changed");
    // A hello that is not a hello (a client message first): not decodable.
    let frame = postcard::to_stdvec(&ClientMsg::Offline).unwrap();
    assert!(meshlib::proto::decode_payload::<Hello>(&frame).is_err());
}

#[test]
fn sweep_offline_then_expiry_and_heartbeat_brings_back() {
    let w = World::new();
    let (mut a, ka) = w.join("api", [5; 32]);
    let (_b, kb) = w.join("db", [6; 32]);
    // a heartbeats, b is silent.
    w.send(&mut a, ClientMsg::Heartbeat, 25);
    assert_eq!(
        w.shared.sweep(t(30)).unwrap(),
        0,
        "offline-after not reached"
    );
    assert_eq!(w.shared.sweep(t(31)).unwrap(), 1);
    let map = w.map();
    assert_eq!(map.members[&kb.public_key()].state, MemberState::Offline);
    assert_eq!(map.members[&ka.public_key()].state, MemberState::Online);
    // Its resume brings it back, as does a heartbeat on a session that
    // outlived the silence.
    let resume = Hello {
        version: VERSION,
        request: Request::Resume(ResumeRequest {
            network: w.net,
            public_key: kb.public_key(),
            credential: [6; 32],
            generation: map.generation,
            endpoints: vec![],
        }),
    };
    let (mut b2, _, _) =
        StreamSession::open(&w.shared, resume, OBS.parse().unwrap(), [0; 32], t(40)).unwrap();
    assert_eq!(w.map().members[&kb.public_key()].state, MemberState::Online);
    w.shared.sweep(t(71)).unwrap();
    assert_eq!(
        w.map().members[&kb.public_key()].state,
        MemberState::Offline
    );
    w.send(&mut b2, ClientMsg::Heartbeat, 72);
    assert_eq!(w.map().members[&kb.public_key()].state, MemberState::Online);
    // Silent again until expiry: offline after 30 s, released 600 s later
    // (a keeps heartbeating).
    for at in [100, 400, 700, 1000] {
        w.send(&mut a, ClientMsg::Heartbeat, at);
    }
    w.shared.sweep(t(102)).unwrap();
    assert_eq!(
        w.map().members[&kb.public_key()].state,
        MemberState::Offline
    );
    w.shared.sweep(t(701)).unwrap();
    assert!(w.map().members.contains_key(&kb.public_key()), "not yet");
    w.shared.sweep(t(702)).unwrap();
    assert!(!w.map().members.contains_key(&kb.public_key()), "expired");
    assert!(w.map().members.contains_key(&ka.public_key()));
}

mod common;

/// Over QUIC with a real keyserver: a graceful stop is offline at once, a
/// silent member goes offline after `offline-after`, a resume brings it
/// back; the admin API shows states, `last_seen` and the network's
/// `expire-after`, which expires the offline member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn states_over_quic_and_the_admin_api() {
    use common::*;
    use hyper::Method;
    use serde_json::json;
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path(), |c| {
        c.offline_after_secs = 2;
    })
    .await;
    h.call(
        Method::POST,
        "/v1/networks",
        Some(json!({"name": "prod", "expire_after": "4s"})),
    )
    .await
    .unwrap();
    let net = h
        .call(Method::GET, "/v1/networks/prod", None)
        .await
        .unwrap();
    assert_eq!(net["expire_after"], 4);
    let token = h.token("prod", json!({"uses": 5})).await;
    let ep = client_endpoint();
    let (_ka, mut a) = join(&ep, &token, "api").await;
    let (_kb, mut b) = join(&ep, &token, "db").await;
    let (kc, c) = join(&ep, &token, "web").await;
    assert_eq!(a.welcome().heartbeat_secs, 1, "a third of offline-after");
    let state = |members: &[serde_json::Value], key: &str| {
        members
            .iter()
            .find(|m| m["public_key"] == key)
            .map(|m| m["state"].as_str().unwrap().to_owned())
    };
    // b stops gracefully: offline at once, seen by a.
    let kb = b.membership().public_key;
    assert!(b.shutdown().await, "the keyserver confirmed");
    until(&mut a, Duration::from_secs(3), |s| {
        s.map().members.get(&kb).map(|m| m.state) == Some(MemberState::Offline)
    })
    .await;
    let members = h.members("prod").await;
    assert_eq!(state(&members, &kb.to_string()).as_deref(), Some("offline"));
    assert!(members
        .iter()
        .any(|m| m["public_key"] == kb.to_string() && m["offline_since"].is_u64()));
    // c goes silent: offline after ~2 s, then expires 4 s later.
    c.close();
    let kc = kc.public_key();
    until(&mut a, Duration::from_secs(6), |s| {
        s.map().members.get(&kc).map(|m| m.state) == Some(MemberState::Offline)
    })
    .await;
    until(&mut a, Duration::from_secs(8), |s| {
        !s.map().members.contains_key(&kc)
    })
    .await;
    // a, heartbeating all along, stayed online.
    let members = h.members("prod").await;
    assert_eq!(
        state(&members, &a.membership().public_key.to_string()).as_deref(),
        Some("online")
    );
    // PATCH back to the default (24 h).
    let net = h
        .call(
            Method::PATCH,
            "/v1/networks/prod",
            Some(json!({"expire_after": null})),
        )
        .await
        .unwrap();
    assert!(net["expire_after"].is_null());
    let bad = h
        .call(
            Method::PATCH,
            "/v1/networks/prod",
            Some(json!({"expire_after": "0s"})),
        )
        .await;
    assert!(bad.is_err());
    h.stop().await;
}
