//! Slots over the real protocol (issue 18): a stateless restart takes the
//! slot over and the peers' maps swap the key; `--replace` ends the old
//! session with `Replaced`; refused slot requests leave every stored
//! record as it was, byte for byte (`GET /v1/backup` before and after).

mod common;

use std::time::Duration;

use common::{cfg, client_endpoint, meta, until, Harness};
use hyper::Method;
use meshlib::control::{self, ControlError, Session};
use meshlib::proto::{ErrorCode, JoinToken};
use serde_json::json;

/// Everything the keyserver stores, as the backup has it.
async fn stored(h: &Harness) -> String {
    let v = h.call(Method::GET, "/v1/backup", None).await.unwrap();
    serde_json::to_string(&v).unwrap()
}

async fn join_as(
    ep: &quinn::Endpoint,
    token: &JoinToken,
    service: &str,
    set: impl FnOnce(&mut control::MemberMeta),
) -> Result<Session, ControlError> {
    let (_, mut m) = meta(service);
    set(&mut m);
    control::join(ep, token, m, &cfg()).await
}

fn refused(r: Result<Session, ControlError>) -> meshlib::proto::ProtoError {
    match r {
        Err(ControlError::Refused(e)) => e,
        Err(other) => panic!("refused expected, got {other:?}"),
        Ok(_) => panic!("refused expected, got a session"),
    }
}

#[tokio::test]
async fn takeover_replace_and_refusals_over_quic() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path(), |_| {}).await;
    h.network("prod", "10.240.0.0/22").await;
    let token = h.token("prod", json!({"uses": 20})).await;
    let ep = client_endpoint();
    let mut observer = join_as(&ep, &token, "client", |_| {}).await.unwrap();
    let mut first = join_as(&ep, &token, "api", |m| m.ephemeral = true)
        .await
        .unwrap();
    let w = first.welcome().clone();
    let first_key = first.membership().public_key;
    until(&mut observer, Duration::from_secs(5), |s| {
        s.map().members.contains_key(&first_key)
    })
    .await;

    // A stateless restart: stop, a new key joins, takes the slot over.
    assert!(first.shutdown().await);
    let mut second = join_as(&ep, &token, "api", |m| m.ephemeral = true)
        .await
        .unwrap();
    let w2 = second.welcome().clone();
    assert_eq!(
        (w2.ip, w2.index, &w2.instance),
        (w.ip, w.index, &w.instance)
    );
    let second_key = second.membership().public_key;
    until(&mut observer, Duration::from_secs(5), |s| {
        s.map().members.contains_key(&second_key) && !s.map().members.contains_key(&first_key)
    })
    .await;
    assert_eq!(observer.map().members[&second_key].ip, w.ip);
    let listed = h.members("prod").await;
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(listed.iter().any(|m| m["ephemeral"] == true));

    // Online: refused without --replace, nothing stored changes.
    let before = stored(&h).await;
    let e = refused(
        join_as(&ep, &token, "api", |m| {
            m.instance = Some(w.instance.clone())
        })
        .await,
    );
    assert_eq!(e.code, ErrorCode::InstanceTaken);
    assert!(e.message.contains("--replace"), "{}", e.message);
    // Another service asking for that slot.
    let e = refused(
        join_as(&ep, &token, "web", |m| {
            m.instance = Some(w.instance.clone());
            m.replace = true;
        })
        .await,
    );
    assert_eq!(e.code, ErrorCode::InstanceTaken);
    // A token bound to web asking for api's slot.
    let web_token = h.token("prod", json!({"uses": 5, "service": "web"})).await;
    let e = refused(
        join_as(&ep, &web_token, "api", |m| {
            m.instance = Some(w.instance.clone());
            m.replace = true;
        })
        .await,
    );
    assert_eq!(e.code, ErrorCode::TokenBinding);
    let after = stored(&h).await;
    // The web token itself is a new record: compare without it.
    let strip = |s: &str| {
        let mut v: serde_json::Value = serde_json::from_str(s).unwrap();
        // When the backup was taken, not what it holds.
        v.as_object_mut().unwrap().remove("created");
        if let Some(t) = v["tokens"].as_array_mut() {
            t.retain(|t| t["service"] != "web");
        }
        // The audit trail records the admin API's changes (the web token's
        // creation); joins, refused or not, add nothing to it.
        if let Some(a) = v["audit"].as_array_mut() {
            a.retain(|e| e["route"] != "/v1/networks/{net}/tokens");
        }
        serde_json::to_string(&v).unwrap()
    };
    assert_eq!(strip(&before), strip(&after), "refusals changed the store");
    // --replace with a used-up token.
    let one = h.token("prod", json!({"uses": 1})).await;
    let mut db = join_as(&ep, &one, "db", |_| {}).await.unwrap();
    let db_instance = db.welcome().instance.clone();
    let before = stored(&h).await;
    let e = refused(
        join_as(&ep, &one, "db", |m| {
            m.instance = Some(db_instance.clone());
            m.replace = true;
        })
        .await,
    );
    assert_eq!(e.code, ErrorCode::TokenUsedUp);
    // An ephemeral join of a name that is online.
    let e = refused(
        join_as(&ep, &token, "db", |m| {
            m.instance = Some(db_instance.clone());
            m.ephemeral = true;
        })
        .await,
    );
    assert_eq!(e.code, ErrorCode::InstanceTaken);
    assert_eq!(
        strip(&before),
        strip(&stored(&h).await),
        "refusals changed the store"
    );

    // --replace: the old session ends with Replaced, the new key holds the
    // slot.
    let third = join_as(&ep, &token, "api", |m| {
        m.instance = Some(w.instance.clone());
        m.replace = true;
    })
    .await
    .unwrap();
    assert_eq!(third.welcome().ip, w.ip);
    let seen = tokio::time::timeout(Duration::from_secs(5), async {
        let mut seen = String::new();
        loop {
            match second.next_event().await {
                Ok(ev) => seen.push_str(&format!("{ev:?}\n")),
                Err(e) => return seen + &format!("{e:?}"),
            }
        }
    })
    .await
    .expect("the replaced session ends");
    assert!(seen.contains("Replaced"), "{seen}");
    let third_key = third.membership().public_key;
    until(&mut observer, Duration::from_secs(5), |s| {
        s.map().members.contains_key(&third_key) && !s.map().members.contains_key(&second_key)
    })
    .await;
    let _ = db.shutdown().await;
    h.stop().await;
}
