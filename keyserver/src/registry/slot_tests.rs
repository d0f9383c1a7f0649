//! Unit tests of slots: takeover, `--replace`, ephemeral members, the
//! numbering rule and reclaiming addresses (see `slots.rs`).

use std::collections::BTreeMap;

use super::*;
use meshlib::keys::PrivateKey;
use meshlib::netmap::MemberState;
use proptest::prelude::*;

fn t0() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn at(secs: u64) -> SystemTime {
    t0() + Duration::from_secs(secs)
}

const OBS: &str = "127.0.0.1:5000";

/// A registry with one network of `range` and a token of 100000 uses.
fn setup(range: &str) -> (Registry, NetworkId, Secret) {
    let (mut reg, _) = Registry::load(Records::default(), 64, Duration::from_secs(300), t0());
    reg.set_lifecycle(Lifecycle {
        offline_after: Duration::from_secs(30),
        expire_after: Duration::from_secs(24 * 3600),
        ephemeral_after: None,
    });
    let (net, _) = reg
        .create_network("prod", range.parse().unwrap(), t0())
        .unwrap();
    let secret = [1; 32];
    reg.create_token(
        net.id,
        &secret,
        100_000,
        Duration::from_secs(365 * 86400),
        None,
        None,
        t0(),
    )
    .unwrap();
    (reg, net.id, secret)
}

fn join_req(net: NetworkId, secret: Secret, service: &str, ptype: &str) -> JoinRequest {
    JoinRequest {
        network: net,
        token_secret: secret,
        public_key: PrivateKey::generate().public_key(),
        service: service.into(),
        app_id: None,
        process_type: ptype.parse().unwrap(),
        instance: None,
        runner: "r1".into(),
        ports: vec![],
        endpoints: vec![],
        service_groups: vec![],
        publish: vec![],
        replace: false,
        ephemeral: true,
    }
}

fn join(reg: &mut Registry, req: &JoinRequest, now: SystemTime) -> Result<Joined, ProtoOpError> {
    reg.join(req, OBS.parse().unwrap(), &[7; 32], false, now)
}

/// Everything of a network a refused join must leave alone.
fn state(reg: &Registry, net: NetworkId) -> String {
    format!(
        "{:?}|{:?}|{:?}",
        reg.snapshot(net).unwrap(),
        reg.tokens(net),
        reg.members(net)
            .iter()
            .map(|m| (m.member.public_key, m.offline_since, m.ephemeral))
            .collect::<Vec<_>>()
    )
}

fn online_indexes(reg: &Registry, net: NetworkId, ptype: &str) -> Vec<u32> {
    let mut v: Vec<u32> = reg
        .members(net)
        .iter()
        .filter(|m| {
            m.member.state == MemberState::Online && m.member.process_type.as_str() == ptype
        })
        .map(|m| m.member.index)
        .collect();
    v.sort_unstable();
    v
}

#[test]
fn a_stateless_restart_takes_the_slot_over() {
    let (mut reg, net, secret) = setup("10.240.0.0/22");
    let first = join(&mut reg, &join_req(net, secret, "web", "web"), t0()).unwrap();
    assert_eq!(first.member.index, 1);
    reg.set_offline(net, &first.member.public_key, at(1));
    let second = join(&mut reg, &join_req(net, secret, "web", "web"), at(2)).unwrap();
    let (a, b) = (&first.member, &second.member);
    assert_ne!(a.public_key, b.public_key);
    assert_eq!((b.ip, b.index, &b.instance), (a.ip, a.index, &a.instance));
    assert_eq!(second.replaced, Some(a.public_key));
    // One delta: the old key out, the new in, the old key's session ends.
    let [change] = &second.changes[..] else {
        panic!("{:?}", second.changes)
    };
    assert_eq!(change.removed, Some(a.public_key));
    assert_eq!(
        change.delta.changes,
        vec![
            MapChange::Remove(a.public_key),
            MapChange::Upsert(b.clone())
        ]
    );
    assert_eq!(reg.member_count(net), 1);
    assert_eq!(
        reg.instance_holder(net, &a.instance),
        Some(b.public_key),
        "the slot's holder is the new key"
    );
    assert!(second
        .ops
        .contains(&StoreOp::DeleteMember(net, a.public_key)));
}

#[test]
fn a_thousand_stateless_restarts_hold_one_address() {
    let (mut reg, net, secret) = setup("10.240.0.0/22");
    let mut live = join(&mut reg, &join_req(net, secret, "web", "web"), t0())
        .unwrap()
        .member;
    let first = live.clone();
    for i in 1..=1000u64 {
        reg.set_offline(net, &live.public_key, at(i));
        live = join(&mut reg, &join_req(net, secret, "web", "web"), at(i))
            .unwrap()
            .member;
        assert_eq!((live.ip, live.index), (first.ip, 1), "restart {i}");
    }
    assert_eq!(reg.member_count(net), 1);
    assert_eq!(reg.networks[&net].alloc.used(), 1);
}

#[test]
fn a_crashed_instance_frees_its_index_once_offline() {
    let (mut reg, net, secret) = setup("10.240.0.0/22");
    let a = join(&mut reg, &join_req(net, secret, "web", "web"), t0())
        .unwrap()
        .member;
    // Killed: still online at the keyserver. The restart gets a new slot.
    let b = join(&mut reg, &join_req(net, secret, "web", "web"), at(1))
        .unwrap()
        .member;
    assert_eq!(b.index, 2);
    assert_ne!(b.ip, a.ip);
    // The sweep notices the silence; the next instance takes index 1 back.
    let (changes, _) = reg.sweep(
        at(31),
        |_, k| (*k == b.public_key).then_some(unix(at(31))),
        100,
    );
    assert_eq!(changes.len(), 1);
    assert!(reg.is_offline(net, &a.public_key));
    let c = join(&mut reg, &join_req(net, secret, "web", "web"), at(32))
        .unwrap()
        .member;
    assert_eq!((c.index, c.ip, &c.instance), (1, a.ip, &a.instance));
    assert_eq!(online_indexes(&reg, net, "web"), [1, 2]);
}

#[test]
fn instance_names_take_offline_slots_and_replace_online_ones() {
    let (mut reg, net, secret) = setup("10.240.0.0/22");
    let mut r = join_req(net, secret, "api", "web");
    r.ephemeral = false;
    let a = join(&mut reg, &r, t0()).unwrap().member;
    // Online: refused without --replace, with nothing changed.
    let mut again = join_req(net, secret, "api", "web");
    again.instance = Some(a.instance.clone());
    let before = state(&reg, net);
    let err = join(&mut reg, &again, at(1)).unwrap_err();
    assert_eq!(err, ProtoOpError::InstanceTaken(a.instance.clone()));
    assert!(err.to_string().contains("--replace"), "{err}");
    assert_eq!(state(&reg, net), before);
    // With --replace: taken over, the old key's session is told.
    again.replace = true;
    let b = join(&mut reg, &again, at(2)).unwrap();
    assert_eq!(b.replaced, Some(a.public_key));
    assert_eq!((b.member.ip, b.member.index), (a.ip, a.index));
    // A non-ephemeral member gone offline: its name takes it over.
    reg.set_offline(net, &b.member.public_key, at(3));
    let mut by_name = join_req(net, secret, "api", "web");
    by_name.instance = Some(a.instance.clone());
    by_name.ephemeral = false;
    let c = join(&mut reg, &by_name, at(4)).unwrap();
    assert_eq!(c.replaced, Some(b.member.public_key));
    assert_eq!(c.member.ip, a.ip);
    // Without a name, a non-ephemeral offline member keeps its index.
    reg.set_offline(net, &c.member.public_key, at(5));
    let mut plain = join_req(net, secret, "api", "web");
    plain.ephemeral = false;
    let d = join(&mut reg, &plain, at(6)).unwrap();
    assert_eq!(d.member.index, 2);
    assert_eq!(d.replaced, None);
}

#[test]
fn refused_slot_requests_change_nothing() {
    let (mut reg, net, secret) = setup("10.240.0.0/22");
    let api = join(&mut reg, &join_req(net, secret, "api", "web"), t0())
        .unwrap()
        .member;
    let worker = join(&mut reg, &join_req(net, secret, "api", "worker"), t0())
        .unwrap()
        .member;
    reg.set_offline(net, &api.public_key, at(1));
    reg.set_offline(net, &worker.public_key, at(1));
    // A token bound to web.
    let web_secret = [2; 32];
    reg.create_token(
        net,
        &web_secret,
        5,
        Duration::from_secs(3600),
        Some("web".into()),
        None,
        t0(),
    )
    .unwrap();
    // ... asking for api's slot as api: the binding refuses.
    let mut as_api = join_req(net, web_secret, "api", "web");
    as_api.instance = Some(api.instance.clone());
    as_api.replace = true;
    let before = state(&reg, net);
    assert!(matches!(
        join(&mut reg, &as_api, at(2)),
        Err(ProtoOpError::TokenBinding(_))
    ));
    // ... asking for it as web: the slot is another service's.
    let mut as_web = join_req(net, web_secret, "web", "web");
    as_web.instance = Some(api.instance.clone());
    as_web.replace = true;
    let err = join(&mut reg, &as_web, at(2)).unwrap_err();
    assert!(matches!(err, ProtoOpError::SlotMismatch { .. }), "{err}");
    assert_eq!(err.code(), ErrorCode::InstanceTaken);
    // Another process type of the same service: refused too.
    let mut as_worker = join_req(net, secret, "api", "web");
    as_worker.instance = Some(worker.instance.clone());
    assert!(matches!(
        join(&mut reg, &as_worker, at(2)),
        Err(ProtoOpError::SlotMismatch { .. })
    ));
    assert_eq!(state(&reg, net), before);
    // --replace with a used-up token.
    let used = [3; 32];
    reg.create_token(net, &used, 1, Duration::from_secs(3600), None, None, t0())
        .unwrap();
    let mut r = join_req(net, used, "db", "web");
    r.ephemeral = false;
    let db = join(&mut reg, &r, at(3)).unwrap().member;
    let mut replace = join_req(net, used, "db", "web");
    replace.instance = Some(db.instance.clone());
    replace.replace = true;
    let before = state(&reg, net);
    assert_eq!(
        join(&mut reg, &replace, at(4)).unwrap_err(),
        ProtoOpError::TokenUsedUp
    );
    // An ephemeral join of a name that is online.
    let mut eph = join_req(net, secret, "db", "web");
    eph.instance = Some(db.instance.clone());
    assert_eq!(
        join(&mut reg, &eph, at(4)).unwrap_err(),
        ProtoOpError::InstanceTaken(db.instance.clone())
    );
    assert_eq!(state(&reg, net), before);
}

#[test]
fn ephemeral_members_expire_after_ephemeral_after() {
    let (mut reg, net, secret) = setup("10.240.0.0/22");
    let e = join(&mut reg, &join_req(net, secret, "web", "web"), t0())
        .unwrap()
        .member;
    let mut r = join_req(net, secret, "web", "web");
    r.ephemeral = false;
    let s = join(&mut reg, &r, t0()).unwrap().member;
    reg.set_offline(net, &e.public_key, at(10));
    reg.set_offline(net, &s.public_key, at(10));
    let (changes, _) = reg.sweep(at(39), |_, _| None, 100);
    assert!(changes.is_empty(), "not yet: 29 s offline");
    let (changes, ops) = reg.sweep(at(40), |_, _| None, 100);
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].removed, Some(e.public_key));
    assert!(ops.contains(&StoreOp::DeleteMember(net, e.public_key)));
    assert!(reg.is_member(net, &s.public_key), "not ephemeral: kept");
    // A token can make every member ephemeral.
    let tok = reg.tokens(net)[0].id.clone();
    reg.set_token_ephemeral(net, &tok, true).unwrap();
    let mut plain = join_req(net, secret, "api", "web");
    plain.ephemeral = false;
    let p = join(&mut reg, &plain, at(50)).unwrap().member;
    assert!(reg
        .members(net)
        .iter()
        .any(|m| m.member.public_key == p.public_key && m.ephemeral));
    // A keyserver setting of its own.
    let mut lc = reg.lifecycle();
    lc.ephemeral_after = Some(Duration::from_secs(5));
    reg.set_lifecycle(lc);
    reg.set_offline(net, &p.public_key, at(60));
    let (changes, _) = reg.sweep(at(65), |_, _| None, 100);
    assert_eq!(changes.len(), 1);
    assert!(!reg.is_member(net, &p.public_key));
}

/// A freed slot that comes back (the next instance of its type, or the
/// stateful member whose ephemeral membership was freed, joining again by
/// name) gets its address back, quarantine or not; another service asking
/// for the same name does not.
#[test]
fn a_freed_slot_gets_its_address_back() {
    let (mut reg, net, secret) = setup("10.240.0.0/22");
    let others: Vec<_> = (0..3)
        .map(|_| {
            join(&mut reg, &join_req(net, secret, "filler", "web"), t0())
                .unwrap()
                .member
        })
        .collect();
    let a = join(&mut reg, &join_req(net, secret, "api", "web"), t0())
        .unwrap()
        .member;
    reg.set_offline(net, &a.public_key, at(1));
    reg.sweep(
        at(31),
        |_, k| (*k != a.public_key).then_some(unix(at(31))),
        100,
    );
    assert!(!reg.is_member(net, &a.public_key), "freed");
    // Within the 300 s quarantine: the same slot, the same address.
    let mut back = join_req(net, secret, "api", "web");
    back.instance = Some(a.instance.clone());
    let b = join(&mut reg, &back, at(40)).unwrap().member;
    assert_eq!((b.ip, b.index, &b.instance), (a.ip, 1, &a.instance));
    // Freed again; a filler asking for that name gets a fresh address.
    reg.set_offline(net, &b.public_key, at(50));
    reg.sweep(
        at(80),
        |_, k| (*k != b.public_key).then_some(unix(at(80))),
        100,
    );
    assert!(!reg.is_member(net, &b.public_key), "freed");
    let mut squat = join_req(net, secret, "filler", "web");
    squat.instance = Some(a.instance.clone());
    let c = join(&mut reg, &squat, at(90)).unwrap().member;
    assert_ne!(c.ip, a.ip);
    // The service's next instance still finds its slot's address and app.
    reg.remove_member(net, &c.public_key.to_string(), at(95))
        .unwrap();
    let d = join(&mut reg, &join_req(net, secret, "api", "web"), at(100))
        .unwrap()
        .member;
    assert_eq!(
        (d.ip, &d.app_id, &d.instance),
        (a.ip, &a.app_id, &a.instance)
    );
    assert!(others.iter().all(|o| o.ip != c.ip));
}

#[test]
fn a_full_network_reclaims_the_longest_offline_member() {
    // A /29: 6 addresses.
    let (mut reg, net, secret) = setup("10.240.0.0/29");
    let mut keys = vec![];
    for i in 0..6 {
        let mut r = join_req(net, secret, &format!("s{i}"), "web");
        r.ephemeral = false;
        keys.push(join(&mut reg, &r, t0()).unwrap().member);
    }
    let extra = |reg: &mut Registry, now| {
        let mut r = join_req(net, secret, "late", "web");
        r.ephemeral = false;
        join(reg, &r, now)
    };
    // All online: full for good.
    assert!(matches!(
        extra(&mut reg, at(1)),
        Err(ProtoOpError::NetworkFull(_))
    ));
    // Offline for less than offline-after: busy (retry), nothing changed.
    reg.set_offline(net, &keys[2].public_key, at(10));
    reg.set_offline(net, &keys[4].public_key, at(20));
    let before = state(&reg, net);
    let err = extra(&mut reg, at(30)).unwrap_err();
    assert!(matches!(err, ProtoOpError::NetworkBusy(_)), "{err}");
    assert_eq!(err.code(), ErrorCode::Busy);
    assert_eq!(state(&reg, net), before);
    // 30 s later: the longest offline goes (pushed as its removal), the
    // newcomer gets its address; the other offline member stays.
    let j = extra(&mut reg, at(40)).unwrap();
    assert_eq!(j.member.ip, keys[2].ip);
    assert_eq!(j.changes.len(), 2);
    assert_eq!(j.changes[0].removed, Some(keys[2].public_key));
    assert!(!reg.is_member(net, &keys[2].public_key));
    assert!(reg.is_member(net, &keys[4].public_key));
    // Online members are never reclaimed.
    for k in &keys {
        if k.public_key != keys[2].public_key && k.public_key != keys[4].public_key {
            assert!(reg.is_member(net, &k.public_key));
        }
    }
}

#[test]
fn quarantined_addresses_yield_under_pressure_after_the_ttl() {
    let (mut reg, net, secret) = setup("10.240.0.0/29");
    let mut members = vec![];
    for i in 0..6 {
        members.push(
            join(
                &mut reg,
                &join_req(net, secret, &format!("s{i}"), "web"),
                t0(),
            )
            .unwrap()
            .member,
        );
    }
    // Removed while online: quarantined from now (300 s).
    reg.remove_member(net, &members[0].public_key.to_string(), at(100))
        .unwrap();
    assert!(matches!(
        join(&mut reg, &join_req(net, secret, "x", "web"), at(110)),
        Err(ProtoOpError::NetworkBusy(_))
    ));
    // Past the DNS TTL (offline-after, 30 s), short of the quarantine.
    let j = join(&mut reg, &join_req(net, secret, "x", "web"), at(130)).unwrap();
    assert_eq!(j.member.ip, members[0].ip);
}

/// A crash-looping deployment: 50 instances, each killed and restarted
/// without state 200 times (every 10 s, the old one left online until the
/// sweep notices): the /22 never fills.
#[test]
fn a_crash_looping_deployment_never_exhausts_a_22() {
    let (mut reg, net, secret) = setup("10.240.0.0/22");
    let mut live: Vec<PublicKey> = (0..50)
        .map(|i| {
            join(
                &mut reg,
                &join_req(net, secret, &format!("svc{}", i % 5), "web"),
                t0(),
            )
            .unwrap()
            .member
            .public_key
        })
        .collect();
    let mut heard: BTreeMap<PublicKey, u64> = live.iter().map(|k| (*k, unix(t0()))).collect();
    let mut max_held = 0;
    for round in 1..=200u64 {
        let now = at(round * 10);
        for (i, slot) in live.iter_mut().enumerate() {
            heard.remove(slot);
            let j = join(
                &mut reg,
                &join_req(net, secret, &format!("svc{}", i % 5), "web"),
                now,
            )
            .unwrap_or_else(|e| panic!("round {round}, instance {i}: {e}"));
            *slot = j.member.public_key;
            heard.insert(*slot, unix(now));
        }
        reg.sweep(now, |_, k| heard.get(k).copied(), 10_000);
        max_held = max_held.max(reg.networks[&net].alloc.used());
    }
    assert!(max_held < 1022, "held {max_held}");
    // The live ones hold 1..10 of each service's web type.
    for s in 0..5 {
        let app = reg
            .members(net)
            .iter()
            .find(|m| m.member.service == format!("svc{s}"))
            .unwrap()
            .member
            .app_id
            .clone();
        let mut idx: Vec<u32> = reg
            .members(net)
            .iter()
            .filter(|m| m.member.app_id == app && live.contains(&m.member.public_key))
            .map(|m| m.member.index)
            .collect();
        idx.sort_unstable();
        assert!(idx.len() == 10, "{idx:?}");
    }
}

/// What the platform does to one (app, type).
#[derive(Debug, Clone)]
enum Op {
    /// Scale out by one.
    Out,
    /// Stop the instance at this position of the live list gracefully
    /// (scale-in, or the first half of a restart).
    Stop(usize),
    /// Restart the instance at this position without its state, after a
    /// graceful stop.
    Restart(usize),
    /// Kill the instance at this position (the keyserver notices after
    /// `offline-after`) and start a new one.
    Crash(usize),
    /// Let time pass (sweeps run).
    Wait(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Out),
        2 => (0usize..16).prop_map(Op::Stop),
        3 => (0usize..16).prop_map(Op::Restart),
        1 => (0usize..16).prop_map(Op::Crash),
        2 => (1u64..90).prop_map(Op::Wait),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// After any sequence of scale-outs, scale-ins, restarts and crashes of
    /// ephemeral instances, once the keyserver has noticed every silence,
    /// a new instance takes the lowest index whose holder is gone, and the
    /// online members hold distinct indexes; when the platform scales in
    /// from the top (as Scalingo and Kubernetes do), they hold exactly 1..N.
    #[test]
    fn numbering_follows_the_live_instances(ops in proptest::collection::vec(op(), 1..60)) {
        let (mut reg, net, secret) = setup("10.240.0.0/22");
        let mut live: Vec<PublicKey> = vec![];
        let mut heard: BTreeMap<PublicKey, u64> = BTreeMap::new();
        let mut now = 0u64;
        let mut from_top = true;
        let new = |reg: &mut Registry, now: u64| {
            let j = join(reg, &join_req(net, secret, "web", "web"), at(now)).unwrap();
            j.member
        };
        for op in ops {
            now += 1;
            match op {
                Op::Out => {
                    let m = new(&mut reg, now);
                    // The lowest index whose holder is gone.
                    let held: Vec<u32> = reg.members(net).iter()
                        .filter(|i| i.member.public_key != m.public_key)
                        .filter(|i| !(i.ephemeral && i.member.state == MemberState::Offline))
                        .map(|i| i.member.index)
                        .collect();
                    let want = (1..).find(|n| !held.contains(n)).unwrap();
                    prop_assert_eq!(m.index, want);
                    live.push(m.public_key);
                    heard.insert(m.public_key, unix(at(now)));
                }
                Op::Stop(i) if !live.is_empty() => {
                    let i = i % live.len();
                    from_top &= reg.members(net).iter()
                        .filter(|m| live.contains(&m.member.public_key))
                        .map(|m| m.member.index)
                        .max() == reg.member(net, &live[i]).map(|m| m.index);
                    let k = live.remove(i);
                    heard.remove(&k);
                    reg.set_offline(net, &k, at(now));
                }
                Op::Restart(i) if !live.is_empty() => {
                    let i = i % live.len();
                    let old = reg.member(net, &live[i]).cloned().unwrap();
                    reg.set_offline(net, &live[i], at(now));
                    heard.remove(&live[i]);
                    let m = new(&mut reg, now);
                    prop_assert!(m.index <= old.index, "{} > {}", m.index, old.index);
                    live[i] = m.public_key;
                    heard.insert(m.public_key, unix(at(now)));
                }
                Op::Crash(i) if !live.is_empty() => {
                    // The new instance cannot know it replaces the dead one:
                    // it takes the lowest free index, maybe above N.
                    from_top = false;
                    let i = i % live.len();
                    heard.remove(&live[i]);
                    let m = new(&mut reg, now);
                    live[i] = m.public_key;
                    heard.insert(m.public_key, unix(at(now)));
                }
                Op::Wait(s) => {
                    now += s;
                    for k in &live {
                        heard.insert(*k, unix(at(now)));
                    }
                    reg.sweep(at(now), |_, k| heard.get(k).copied(), 10_000);
                }
                _ => {}
            }
            // Live instances always hold distinct indexes.
            let mut idx: Vec<u32> = live.iter().map(|k| reg.member(net, k).unwrap().index).collect();
            idx.sort_unstable();
            idx.dedup();
            prop_assert_eq!(idx.len(), live.len());
        }
        // Settle: every silence noticed, every crashed or stopped
        // ephemeral member gone.
        now += 200;
        for k in &live {
            heard.insert(*k, unix(at(now)));
        }
        reg.sweep(at(now), |_, k| heard.get(k).copied(), 10_000);
        now += 100;
        for k in &live {
            heard.insert(*k, unix(at(now)));
        }
        reg.sweep(at(now), |_, k| heard.get(k).copied(), 10_000);
        prop_assert_eq!(reg.member_count(net), live.len());
        // A new instance takes the lowest free index.
        let mut idx: Vec<u32> = live.iter().map(|k| reg.member(net, k).unwrap().index).collect();
        idx.sort_unstable();
        let m = new(&mut reg, now + 1);
        prop_assert_eq!(m.index, (1..).find(|n| !idx.contains(n)).unwrap());
        let n = u32::try_from(live.len()).unwrap();
        if from_top {
            prop_assert_eq!(&idx, &(1..=n).collect::<Vec<_>>());
        }
        // Whatever happened, the seed-003 names `1.web` … `N.web` answer
        // the live instances, in index order.
        let live: Vec<PublicKey> = live.into_iter().chain([m.public_key]).collect();
        let map = reg.snapshot(net).unwrap().online();
        let names = meshlib::names::NameIndex::build(&map, &Default::default());
        let mut by_index: Vec<&meshlib::netmap::Member> = live.iter().map(|k| &map.members[k]).collect();
        by_index.sort_by_key(|m| m.index);
        for (rank, m) in by_index.iter().enumerate() {
            let name = format!("{}.web.{}.{}.private-network.internal", rank + 1, m.app_id, net);
            prop_assert_eq!(names.lookup(&name), meshlib::names::Lookup::Found(&[m.ip]));
        }
        let past = format!("{}.web.{}.{}.private-network.internal", n + 2, by_index[0].app_id, net);
        prop_assert_eq!(names.lookup(&past), meshlib::names::Lookup::NxDomain);
    }
}
