//! Scale to zero in the registry: address settings, wake requests (one
//! hook run however many ask, across replicas too), flows and idleness.

use std::time::{Duration, SystemTime};

use meshlib::ids::NetworkId;
use meshlib::keys::PrivateKey;
use meshlib::netmap::MapChange;
use meshlib::proto::{ErrorCode, JoinRequest};
use meshlib::services::{WakeHook, WakeSpec};

use super::*;

fn t(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
}

fn join_req(net: NetworkId, service: &str) -> JoinRequest {
    JoinRequest {
        network: net,
        token_secret: [1; 32],
        public_key: PrivateKey::generate().public_key(),
        service: service.into(),
        app_id: None,
        process_type: Default::default(),
        instance: None,
        runner: "r".into(),
        ports: vec![],
        endpoints: vec![],
        service_groups: vec![],
        publish: vec![],
        replace: false,
        ephemeral: false,
    }
}

/// A registry with network `prod` whose service `api` had one member,
/// removed: an address at zero instances. Returns the records written,
/// one batch per operation.
fn setup() -> (Registry, NetworkId, Vec<Vec<StoreOp>>) {
    let (mut r, _) = Registry::load(Records::default(), 64, Duration::from_secs(300), t(0));
    let (net, created) = r
        .create_network("prod", meshlib::ipam::DEFAULT_RANGE, t(0))
        .unwrap();
    let (_, tok) = r
        .create_token(
            net.id,
            &[1; 32],
            100,
            Duration::from_secs(3600),
            None,
            None,
            t(0),
        )
        .unwrap();
    let mut ops = vec![created, tok];
    let obs = "127.0.0.1:1".parse().unwrap();
    let j = r
        .join(&join_req(net.id, "api"), obs, &[2; 32], false, t(0))
        .unwrap();
    ops.push(j.ops);
    let (_, gone) = r
        .remove_member(net.id, &j.member.public_key.to_string(), t(0))
        .unwrap();
    ops.push(gone);
    (r, net.id, ops)
}

fn wake_settings(cmd: &str, timeout: Option<u16>) -> AddressSettings {
    AddressSettings {
        wake: Some(Some(WakeHook::Command(vec![cmd.into()]))),
        wake_timeout_secs: timeout,
        ..Default::default()
    }
}

#[test]
fn wake_settings_are_checked_stored_and_pushed() {
    let (mut r, net, _) = setup();
    // A wake hook makes the pushed address wakeable (default 30 s).
    let (info, ops, changes) = r
        .set_address(net, "api", &wake_settings("wake-api", None), t(1))
        .unwrap();
    assert_eq!(info.record.address.wake_timeout_secs, Some(30));
    assert_eq!(ops.len(), 1);
    assert!(matches!(
        &changes[0].delta.changes[..],
        [MapChange::AddressUpsert(a)] if a.wake_timeout_secs == Some(30)
    ));
    assert_eq!(
        r.snapshot(net).unwrap().addresses["api"].wake_timeout_secs,
        Some(30)
    );
    // The same again changes nothing.
    let (_, ops, changes) = r
        .set_address(net, "api", &wake_settings("wake-api", None), t(1))
        .unwrap();
    assert!(ops.is_empty() && changes.is_empty());
    // Only what members do not see: stored, not pushed.
    let idle = AddressSettings {
        idle_after_secs: Some(Some(600)),
        ..Default::default()
    };
    let (info, ops, changes) = r.set_address(net, "api", &idle, t(2)).unwrap();
    assert_eq!((ops.len(), changes.len()), (1, 0));
    assert_eq!(info.record.watch_since, Some(1_000_002));
    // Unusable combinations and values: 400s, nothing changed.
    let gen = r.network(net).unwrap().generation;
    let bad = [
        AddressSettings {
            wake: Some(None),
            wake_timeout_secs: Some(10),
            ..Default::default()
        },
        AddressSettings {
            idle_after_secs: Some(None),
            idle_hook: Some(Some(WakeHook::Url("http://127.0.0.1:9/idle".into()))),
            ..Default::default()
        },
    ];
    for s in bad {
        assert!(matches!(
            r.set_address(net, "api", &s, t(3)),
            Err(AdminError::BadAddress(_))
        ));
    }
    assert_eq!(r.network(net).unwrap().generation, gen);
    let patch = |json: &str| {
        serde_json::from_str::<AddressPatch>(json)
            .unwrap()
            .settings()
    };
    for json in [
        r#"{"wake_timeout_secs": 0}"#,
        r#"{"wake_timeout_secs": 3601}"#,
        r#"{"idle_after_secs": 0}"#,
        r#"{"wake": {"url": "ftp://x"}}"#,
        r#"{"wake": {}}"#,
        r#"{"idle": {"command": []}}"#,
    ] {
        assert!(
            matches!(patch(json), Err(AdminError::BadAddress(_))),
            "{json}"
        );
    }
    assert!(serde_json::from_str::<AddressPatch>(r#"{"nope": 1}"#).is_err());
    let s =
        patch(r#"{"wake": null, "idle": {"url": "http://127.0.0.1:1/x"}, "idle_after_secs": 60}"#)
            .unwrap();
    assert_eq!(s.wake, Some(None));
    assert!(matches!(s.idle_hook, Some(Some(WakeHook::Url(_)))));
    let _ = WakeSpec::default();
    // Unknown service or network: 404s.
    assert!(matches!(
        r.set_address(net, "nope", &idle, t(3)),
        Err(AdminError::UnknownAddress(_))
    ));
    assert!(matches!(
        r.set_address(NetworkId::random(), "api", &idle, t(3)),
        Err(AdminError::UnknownNetwork(_))
    ));
    // Removing the hook makes it unwakeable again, pushed.
    let off = AddressSettings {
        wake: Some(None),
        ..Default::default()
    };
    let (info, _, changes) = r.set_address(net, "api", &off, t(4)).unwrap();
    assert_eq!(info.record.address.wake_timeout_secs, None);
    assert_eq!(changes.len(), 1);
}

/// Many requests, one run; again only after the wake timeout; never with
/// an online instance, without a hook, or for a service the network lacks.
#[test]
fn many_wake_requests_run_the_hook_once() {
    let (mut r, net, _) = setup();
    r.set_address(net, "api", &wake_settings("wake-api", Some(20)), t(1))
        .unwrap();
    let mut runs = 0;
    for i in 0..10 {
        match r.request_wake(net, "api", t(10 + i / 5)).unwrap() {
            (Wake::Run(job), ops) => {
                runs += 1;
                assert_eq!(ops.len(), 1, "the wake is stored");
                assert_eq!(job.kind, HookKind::Wake);
                assert_eq!(job.timeout, Duration::from_secs(20));
                assert_eq!(job.hook, WakeHook::Command(vec!["wake-api".into()]));
            }
            (Wake::Waking(since), ops) => {
                assert_eq!(since, 1_000_010);
                assert!(ops.is_empty());
            }
        }
    }
    assert_eq!(runs, 1);
    assert!(r.address(net, "api", t(11)).unwrap().waking);
    // Still nothing online after the timeout: a new request runs it again.
    assert!(matches!(
        r.request_wake(net, "api", t(29)),
        Ok((Wake::Waking(_), _))
    ));
    assert!(matches!(
        r.request_wake(net, "api", t(30)),
        Ok((Wake::Run(_), _))
    ));
    // An instance online: refused.
    let obs = "127.0.0.1:1".parse().unwrap();
    r.join(&join_req(net, "api"), obs, &[2; 32], false, t(31))
        .unwrap();
    let err = r.request_wake(net, "api", t(60)).unwrap_err();
    assert!(matches!(err, WakeError::Online { online: 1, .. }));
    assert_eq!(err.code(), ErrorCode::Forbidden);
    assert!(!r.address(net, "api", t(32)).unwrap().waking);
    // A service without a hook, one the network lacks, another network.
    r.join(&join_req(net, "db"), obs, &[2; 32], false, t(31))
        .unwrap();
    assert_eq!(
        r.request_wake(net, "db", t(40)),
        Err(WakeError::NotWakeable("db".into()))
    );
    let unknown = r.request_wake(net, "nope", t(40)).unwrap_err();
    assert_eq!(unknown.code(), ErrorCode::InvalidMetadata);
    let (other, _) = r
        .create_network("other", "10.250.0.0/22".parse().unwrap(), t(0))
        .unwrap();
    assert_eq!(
        r.request_wake(other.id, "api", t(40)),
        Err(WakeError::UnknownService("api".into()))
    );
}

/// Two replicas over the same records, both asked at once: the first
/// commit wins; the other's compare fails, it puts its memory back, takes
/// the winner's record and, run again, finds the wake under way.
#[test]
fn replicas_run_a_wake_once() {
    let (mut a, net, base) = setup();
    let (mut b, _) = Registry::load(Records::default(), 64, Duration::from_secs(300), t(0));
    for batch in &base {
        assert!(b.apply(batch).is_empty());
    }
    let (_, set, changes) = a
        .set_address(net, "api", &wake_settings("wake-api", Some(30)), t(1))
        .unwrap();
    let mut ops = set;
    ops.extend(a.log_ops(&changes));
    assert!(b.apply(&ops).is_empty());
    let before = b.network(net).unwrap().clone();
    // Both decide to run it; A commits first.
    let (wa, ops_a) = a.request_wake(net, "api", t(10)).unwrap();
    let (wb, _ops_b) = b.request_wake(net, "api", t(10)).unwrap();
    assert!(matches!((&wa, &wb), (Wake::Run(_), Wake::Run(_))));
    // B's commit is refused (the network record changed): memory back to
    // the record it read, then A's commit applied, then B runs again.
    assert!(b.apply(&[StoreOp::PutNetwork(before)]).is_empty());
    assert!(b.apply(&ops_a).is_empty());
    let (again, ops) = b.request_wake(net, "api", t(10)).unwrap();
    assert_eq!(again, Wake::Waking(1_000_010));
    assert!(ops.is_empty());
    // And any later request on either, within the timeout.
    assert!(matches!(
        a.request_wake(net, "api", t(20)),
        Ok((Wake::Waking(_), _))
    ));
}

/// A watched service with no flow for `idle-after` turns idle once (its
/// hook once per idle period); a flow ends the period; stored
/// `last_flow` moves at most once per granularity.
#[test]
fn idleness_is_reported_once_per_period() {
    let (mut r, net, _) = setup();
    let s = AddressSettings {
        idle_after_secs: Some(Some(60)),
        idle_hook: Some(Some(WakeHook::Url("http://127.0.0.1:9/idle".into()))),
        ..Default::default()
    };
    r.set_address(net, "api", &s, t(0)).unwrap();
    let api = vec!["api".to_owned()];
    assert_eq!(r.note_flows(net, &api, t(10)).len(), 1);
    // Within the granularity (60 / 4 = 15 s): nothing to write.
    assert!(!r.flows_need_write(net, &api, t(20)));
    assert!(r.note_flows(net, &api, t(20)).is_empty());
    assert!(r.flows_need_write(net, &api, t(25)));
    assert_eq!(r.note_flows(net, &api, t(25)).len(), 1);
    // Stored at 25, written every 15 s: the last flow may have been up to
    // 15 s later, so idle from 25 + 15 + 60.
    assert_eq!(r.idle_sweep(t(99), 10), (vec![], vec![]));
    let (jobs, ops) = r.idle_sweep(t(100), 10);
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].kind, HookKind::Idle);
    assert_eq!(ops.len(), 1);
    let info = r.address(net, "api", t(101)).unwrap();
    assert!(info.idle);
    assert_eq!(info.record.idle_since, Some(1_000_100));
    assert_eq!(r.idle_states(10), [(net.to_string(), "api".into(), true)]);
    // Still idle: no second run.
    assert_eq!(r.idle_sweep(t(500), 10), (vec![], vec![]));
    // A flow: not idle; idle again 60 s later, the hook again.
    assert!(r.flows_need_write(net, &api, t(501)));
    r.note_flows(net, &api, t(501));
    assert!(!r.address(net, "api", t(502)).unwrap().idle);
    assert_eq!(r.idle_sweep(t(575), 10).0.len(), 0);
    assert_eq!(r.idle_sweep(t(576), 10).0.len(), 1);
    // A wake request counts as a flow.
    r.set_address(net, "api", &wake_settings("wake-api", Some(5)), t(562))
        .unwrap();
    r.request_wake(net, "api", t(600)).unwrap();
    assert!(!r.address(net, "api", t(600)).unwrap().idle);
    assert!(r.idle_sweep(t(674), 10).0.is_empty());
    assert_eq!(r.idle_sweep(t(675), 10).0.len(), 1);
    // Unknown names are skipped.
    assert!(r.note_flows(net, &["nope".into()], t(700)).is_empty());
}

/// Network records written before wake settings existed read as
/// unwakeable, unwatched addresses; the new fields round-trip.
#[test]
fn address_records_read_old_json_and_round_trip() {
    let (mut r, net, _) = setup();
    r.set_address(net, "api", &wake_settings("wake-api", Some(9)), t(1))
        .unwrap();
    let rec = r.network(net).unwrap().clone();
    let json = serde_json::to_value(&rec).unwrap();
    assert_eq!(json["addresses"]["api"]["wake_timeout_secs"], 9);
    assert_eq!(json["addresses"]["api"]["wake"]["command"][0], "wake-api");
    let back: NetworkRecord = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(back, rec);
    let mut old = json;
    old["addresses"]["api"] =
        serde_json::json!({"service": "api", "ip": "10.240.4.1", "wake_timeout_secs": null});
    let read: NetworkRecord = serde_json::from_value(old).unwrap();
    let api = &read.addresses["api"];
    assert_eq!(api.wake, None);
    assert_eq!(api.idle_after_secs, None);
    assert_eq!(
        api.address.ip,
        "10.240.4.1".parse::<std::net::Ipv4Addr>().unwrap()
    );
}

#[test]
fn an_address_remembers_the_ports_its_instances_announced() {
    let (mut r, _) = Registry::load(Records::default(), 64, Duration::from_secs(300), t(0));
    let (net, _) = r
        .create_network("prod", meshlib::ipam::DEFAULT_RANGE, t(0))
        .unwrap();
    r.create_token(
        net.id,
        &[1; 32],
        100,
        Duration::from_secs(3600),
        None,
        None,
        t(0),
    )
    .unwrap();
    let obs = "127.0.0.1:1".parse().unwrap();
    let mut req = join_req(net.id, "api");
    req.ports = vec![8080, 9000];
    let j = r.join(&req, obs, &[2; 32], false, t(0)).unwrap();
    let pushed = j
        .changes
        .iter()
        .flat_map(|c| &c.delta.changes)
        .find_map(|c| match c {
            MapChange::AddressUpsert(a) => Some(a.clone()),
            _ => None,
        })
        .expect("the new address is pushed");
    assert_eq!(pushed.ports, vec![8080, 9000]);
    // A port announced later grows the list (pushed); one dropped stays.
    let key = j.member.public_key;
    let (change, ops) = r.update_ports(net.id, &key, &[7000]);
    let change = change.expect("a change");
    assert!(
        change
            .delta
            .changes
            .iter()
            .any(|c| matches!(c, MapChange::AddressUpsert(a) if a.ports == vec![7000, 8080, 9000])),
        "{change:?}"
    );
    assert!(ops
        .iter()
        .any(|op| matches!(op, StoreOp::PutNetwork(n) if n.addresses["api"].address.ports == vec![7000, 8080, 9000])));
    // The same ports again: no address change.
    let mut second = join_req(net.id, "api");
    second.ports = vec![9000];
    let j2 = r.join(&second, obs, &[2; 32], false, t(1)).unwrap();
    assert!(!j2
        .changes
        .iter()
        .flat_map(|c| &c.delta.changes)
        .any(|c| matches!(c, MapChange::AddressUpsert(_))));
    // Every instance gone: the address keeps its ports in the map.
    r.remove_member(net.id, &key.to_string(), t(2)).unwrap();
    r.remove_member(net.id, &j2.member.public_key.to_string(), t(2))
        .unwrap();
    let map = r.snapshot(net.id).unwrap();
    assert!(map.members.is_empty());
    assert_eq!(map.addresses["api"].ports, vec![7000, 8080, 9000]);
}
