//! Unit tests of the registry core.

use std::net::Ipv4Addr;

use super::*;
use meshlib::keys::PrivateKey;

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn req(net: NetworkId, secret: Secret, service: &str) -> JoinRequest {
    JoinRequest {
        network: net,
        token_secret: secret,
        public_key: PrivateKey::generate().public_key(),
        service: service.into(),
        app_id: None,
        process_type: ProcessType::default(),
        instance: None,
        runner: "r1".into(),
        ports: vec![],
        endpoints: vec![],
        service_groups: vec![],
        publish: vec![],
        replace: false,
        ephemeral: false,
    }
}

fn setup(range: &str, uses: u32) -> (Registry, NetworkId, Secret) {
    let (mut reg, _) = Registry::load(Records::default(), 4, Duration::from_secs(60), now());
    let (net, _) = reg
        .create_network("prod", range.parse().unwrap(), now())
        .unwrap();
    let secret = [1; 32];
    reg.create_token(
        net.id,
        &secret,
        uses,
        Duration::from_secs(3600),
        None,
        None,
        now(),
    )
    .unwrap();
    (reg, net.id, secret)
}

const OBS: &str = "127.0.0.1:5000";

#[test]
fn join_assigns_ip_index_name_and_logs() {
    let (mut reg, net, secret) = setup("10.240.0.0/22", 10);
    let a = reg
        .join(
            &req(net, secret, "api"),
            OBS.parse().unwrap(),
            &[2; 32],
            false,
            now(),
        )
        .unwrap();
    let b = reg
        .join(
            &req(net, secret, "api"),
            OBS.parse().unwrap(),
            &[3; 32],
            false,
            now(),
        )
        .unwrap();
    assert_eq!(a.member.ip, Ipv4Addr::new(10, 240, 0, 1));
    assert_eq!(b.member.ip, Ipv4Addr::new(10, 240, 0, 2));
    assert_eq!((a.member.index, b.member.index), (1, 2));
    assert_eq!(a.member.app_id, b.member.app_id);
    assert_ne!(a.member.instance, b.member.instance);
    assert_eq!(b.generation, 2);
    assert_eq!(reg.snapshot(b.network).unwrap().members.len(), 2);
    let change = b.changes.last().unwrap();
    assert_eq!((change.delta.from, change.delta.to), (1, 2));
    assert_eq!(reg.tokens(net)[0].uses_left, 8);
    // Catch-up by deltas, then by snapshot once the log (cap 4) is exceeded.
    match reg.catchup(net, 1).unwrap() {
        Catchup::Delta(d) => assert_eq!((d.from, d.to, d.changes.len()), (1, 2, 1)),
        other => panic!("{other:?}"),
    }
    for i in 0..4 {
        reg.join(
            &req(net, secret, "db"),
            OBS.parse().unwrap(),
            &[i; 32],
            false,
            now(),
        )
        .unwrap();
    }
    assert!(matches!(reg.catchup(net, 1), Some(Catchup::Snapshot(_))));
    assert!(matches!(reg.catchup(net, 6), Some(Catchup::UpToDate)));
    assert!(matches!(reg.catchup(net, 99), Some(Catchup::Snapshot(_))));
}

#[test]
fn token_rules_leave_state_unchanged() {
    let (mut reg, net, secret) = setup("10.240.0.0/30", 1);
    let obs = OBS.parse().unwrap();
    assert_eq!(
        reg.join(&req(net, [9; 32], "api"), obs, &[2; 32], false, now())
            .unwrap_err(),
        ProtoOpError::InvalidToken
    );
    let later = now() + Duration::from_secs(7200);
    assert_eq!(
        reg.join(&req(net, secret, "api"), obs, &[2; 32], false, later)
            .unwrap_err(),
        ProtoOpError::TokenExpired
    );
    assert_eq!(reg.member_count(net), 0);
    assert_eq!(reg.tokens(net)[0].uses_left, 1);
    reg.join(&req(net, secret, "api"), obs, &[2; 32], false, now())
        .unwrap();
    assert_eq!(
        reg.join(&req(net, secret, "api"), obs, &[2; 32], false, now())
            .unwrap_err(),
        ProtoOpError::TokenUsedUp
    );
    // /30 has two hosts: a second token fills it, the third join is refused.
    let (t2, _) = reg
        .create_token(net, &[5; 32], 5, Duration::from_secs(60), None, None, now())
        .unwrap();
    reg.join(&req(net, [5; 32], "api"), obs, &[2; 32], false, now())
        .unwrap();
    let gen = reg.network(net).unwrap().generation;
    let err = reg
        .join(&req(net, [5; 32], "api"), obs, &[2; 32], false, now())
        .unwrap_err();
    assert!(matches!(err, ProtoOpError::NetworkFull(_)), "{err:?}");
    let left = reg
        .tokens(net)
        .into_iter()
        .find(|t| t.id == t2.id)
        .unwrap()
        .uses_left;
    assert_eq!(left, 4);
    assert_eq!(reg.network(net).unwrap().generation, gen);
}

#[test]
fn resume_needs_the_credential_and_remove_releases() {
    let (mut reg, net, secret) = setup("10.240.0.0/22", 5);
    let obs: SocketAddr = OBS.parse().unwrap();
    let j = reg
        .join(&req(net, secret, "api"), obs, &[7; 32], false, now())
        .unwrap();
    let key = j.member.public_key;
    let mut r = ResumeRequest {
        network: net,
        public_key: key,
        credential: [8; 32],
        generation: 1,
        endpoints: vec![],
    };
    assert_eq!(
        reg.resume(&r, obs, now()).unwrap_err(),
        ProtoOpError::BadCredential
    );
    r.credential = [7; 32];
    let res = reg.resume(&r, obs, now()).unwrap();
    assert!(matches!(res.catchup, Catchup::UpToDate));
    assert!(res.change.is_none());
    let (change, _) = reg
        .remove_member(net, j.member.instance.as_str(), now())
        .unwrap();
    assert_eq!(change.removed, Some(key));
    assert_eq!(
        reg.resume(&r, obs, now()).unwrap_err(),
        ProtoOpError::BadCredential
    );
    // The released address is quarantined: the next member gets .2.
    let k = reg
        .join(&req(net, secret, "api"), obs, &[1; 32], false, now())
        .unwrap();
    assert_eq!(k.member.ip, Ipv4Addr::new(10, 240, 0, 2));
    assert_eq!(k.member.index, 1);
}

#[test]
fn full_default_range_holds_1022_and_its_snapshot_fits_a_frame() {
    let (mut reg, net, secret) = setup("10.240.0.0/22", 2000);
    let obs: SocketAddr = "[2001:db8::1]:51820".parse().unwrap();
    for i in 0..1022u32 {
        let mut r = req(
            net,
            secret,
            &format!("a-rather-long-service-name-number-{:04}", i % 50),
        );
        r.endpoints = vec![
            "203.0.113.200:51820".parse().unwrap(),
            "[2001:db8::2]:51820".parse().unwrap(),
        ];
        r.runner = "runner-with-a-long-label-eu-west-3".into();
        reg.join(&r, obs, &[0; 32], false, now()).unwrap();
    }
    let err = reg
        .join(&req(net, secret, "x"), obs, &[0; 32], false, now())
        .unwrap_err();
    assert!(matches!(err, ProtoOpError::NetworkFull(_)), "{err:?}");
    let map = reg.snapshot(net).unwrap();
    assert_eq!(map.members.len(), 1022);
    let frame = meshlib::proto::encode_frame(
        &meshlib::proto::ServerMsg::Snapshot(map),
        meshlib::proto::DEFAULT_MAX_FRAME,
    )
    .expect("a full /22 snapshot fits the default frame limit");
    eprintln!("full /22 snapshot frame: {} bytes", frame.len());
    assert!(
        frame.len() < meshlib::proto::DEFAULT_MAX_FRAME / 2,
        "{} bytes",
        frame.len()
    );
}

#[test]
fn observed_endpoint_takes_the_wireguard_port() {
    use super::observed_endpoint;
    let adv: Vec<std::net::SocketAddr> = vec!["192.0.2.10:51820".parse().unwrap()];
    // Behind NAT: the public address, with the WireGuard port.
    assert_eq!(
        observed_endpoint(&adv, "203.0.113.5:40000".parse().unwrap()),
        Some("203.0.113.5:51820".parse().unwrap())
    );
    // Same address as advertised: nothing new.
    assert_eq!(
        observed_endpoint(&adv, "192.0.2.10:40000".parse().unwrap()),
        None
    );
    // A v4-mapped observation is the IPv4 address.
    assert_eq!(
        observed_endpoint(&adv, "[::ffff:192.0.2.10]:1".parse().unwrap()),
        None
    );
    // Nothing advertised: the QUIC port would be wrong, so nothing is added.
    assert_eq!(
        observed_endpoint(&[], "203.0.113.5:40000".parse().unwrap()),
        None
    );
}

#[test]
fn ports_are_validated_at_join_and_updated_as_changes() {
    let (mut reg, net, secret) = setup("10.240.0.0/22", 10);
    let mut bad = req(net, secret, "api");
    bad.ports = vec![80, 0];
    assert!(reg
        .join(&bad, OBS.parse().unwrap(), &[2; 32], false, now())
        .is_err());
    bad.ports = (1..=65).collect();
    assert!(reg
        .join(&bad, OBS.parse().unwrap(), &[2; 32], false, now())
        .is_err());
    let mut good = req(net, secret, "api");
    good.ports = vec![8080, 80, 8080];
    let j = reg
        .join(&good, OBS.parse().unwrap(), &[2; 32], false, now())
        .unwrap();
    assert_eq!(j.member.ports, vec![80, 8080], "sorted, deduplicated");
    let key = good.public_key;
    let (same, ops) = reg.update_ports(net, &key, &[8080, 80]);
    assert!(same.is_none() && ops.is_empty(), "no change, no generation");
    let (none, _) = reg.update_ports(net, &key, &[0]);
    assert!(none.is_none(), "port 0 ignored");
    let (change, ops) = reg.update_ports(net, &key, &[5432]);
    let change = change.expect("a change");
    assert_eq!(ops.len(), 2);
    assert_eq!(change.delta.from + 1, change.delta.to);
    let map = reg.snapshot(net).unwrap();
    assert_eq!(map.members[&key].ports, vec![5432]);
}

/// Runs `f` on a thread and fails the test if it does not finish in `limit`
/// (an endless loop would otherwise hang the test run).
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .expect("registry operation did not finish in time (endless loop?)")
}

#[test]
fn long_service_and_type_give_distinct_valid_default_names_quickly() {
    let names = within(Duration::from_secs(20), || {
        let (mut reg, net, secret) = setup("10.240.0.0/22", 1000);
        let ptype: ProcessType = "nightly-batch-export-of-customer-invoices-to-s3"
            .parse()
            .unwrap();
        let mut names = Vec::new();
        for i in 0..300u32 {
            let mut r = req(net, secret, "invoice-renderer");
            r.process_type = ptype.clone();
            let j = reg
                .join(&r, OBS.parse().unwrap(), &[0; 32], false, now())
                .unwrap();
            assert_eq!(j.member.index, i + 1);
            names.push((j.member.index, j.member.instance));
        }
        names
    });
    let mut seen = std::collections::HashSet::new();
    for (index, name) in &names {
        let text = name.as_str();
        assert!(text.len() <= 63, "{text}");
        assert!(text.parse::<InstanceName>().is_ok(), "{text}");
        assert!(text.ends_with(&format!("-{index}")), "{text}: suffix kept");
        assert!(text.starts_with("invoice-renderer-nightly-batch"), "{text}");
        assert!(seen.insert(text.to_owned()), "{text} given twice");
    }
}

#[test]
fn default_names_taken_by_explicit_names_get_a_bounded_suffix() {
    within(Duration::from_secs(20), || {
        let (mut reg, net, secret) = setup("10.240.0.0/22", 1000);
        let ptype: ProcessType = "nightly-batch-export-of-customer-invoices-to-s3"
            .parse()
            .unwrap();
        // Someone took the default names of index 1 (plain and with the
        // first suffixes) explicitly.
        let first = "invoice-renderer-nightly-batch-export-of-customer-invoices-to-1";
        let mut explicit = vec![first.to_owned()];
        for n in 2..5 {
            explicit.push(format!(
                "invoice-renderer-nightly-batch-export-of-customer-invoices-1-{n}"
            ));
        }
        for name in &explicit {
            let mut r = req(net, secret, "squatter");
            r.instance = Some(name.parse().unwrap());
            reg.join(&r, OBS.parse().unwrap(), &[0; 32], false, now())
                .unwrap();
        }
        let mut r = req(net, secret, "invoice-renderer");
        r.process_type = ptype;
        let j = reg
            .join(&r, OBS.parse().unwrap(), &[0; 32], false, now())
            .unwrap();
        let name = j.member.instance.to_string();
        assert!(!explicit.contains(&name), "{name}");
        assert!(name.ends_with("-1-5"), "{name}");
        assert!(name.len() <= 63);
    });
}

#[test]
fn the_keyserver_decides_the_app_id() {
    let (mut reg, net, secret) = setup("10.240.0.0/22", 100);
    let obs: SocketAddr = OBS.parse().unwrap();
    let api = reg
        .join(&req(net, secret, "api"), obs, &[1; 32], false, now())
        .unwrap();
    let api_id = api.member.app_id.clone();
    reg.create_token(
        net,
        &[7; 32],
        10,
        Duration::from_secs(60),
        Some("web".into()),
        None,
        now(),
    )
    .unwrap();
    // A member of `web` asks for api's id, then for api's `.warp` label.
    for hint in [api_id.clone(), "api".parse().unwrap()] {
        let mut r = req(net, [7; 32], "web");
        r.app_id = Some(hint.clone());
        let j = reg.join(&r, obs, &[2; 32], false, now()).unwrap();
        assert_ne!(j.member.app_id, api_id, "took api's id with hint {hint}");
        assert_ne!(j.member.app_id.as_str(), "api");
        // api's names still hold api's member only.
        let map = reg.snapshot(net).unwrap();
        let under_api: Vec<_> = map
            .members
            .values()
            .filter(|m| m.app_id == api_id)
            .map(|m| m.service.clone())
            .collect();
        assert_eq!(under_api, vec!["api".to_owned()]);
    }
    // Both `web` members share one id, whatever their hints said.
    let webs: Vec<AppId> = reg
        .snapshot(net)
        .unwrap()
        .members
        .values()
        .filter(|m| m.service == "web")
        .map(|m| m.app_id.clone())
        .collect();
    assert_eq!(webs.len(), 2);
    assert_eq!(webs[0], webs[1]);
    // A new service may keep an unused id of the keyserver's own form.
    let mine = AppId::random();
    let mut r = req(net, secret, "db");
    r.app_id = Some(mine.clone());
    assert_eq!(
        reg.join(&r, obs, &[3; 32], false, now())
            .unwrap()
            .member
            .app_id,
        mine
    );
    // ...but not a free-form label.
    let mut r = req(net, secret, "cache");
    r.app_id = Some("cache-app".parse().unwrap());
    let got = reg
        .join(&r, obs, &[4; 32], false, now())
        .unwrap()
        .member
        .app_id;
    assert!(got.as_str().starts_with("ap-"), "{got}");
}

#[test]
fn a_retried_join_gets_its_membership_back() {
    let (mut reg, net, secret) = setup("10.240.0.0/22", 1);
    let obs: SocketAddr = OBS.parse().unwrap();
    let r = req(net, secret, "api");
    let first = reg.join(&r, obs, &[1; 32], false, now()).unwrap();
    assert!(!first.rejoined);
    assert_eq!(reg.tokens(net)[0].uses_left, 0, "the only use is gone");
    // While a session of the member is open, it is not a lost welcome.
    let err = reg.join(&r, obs, &[2; 32], true, now()).unwrap_err();
    assert_eq!(err, ProtoOpError::SessionOpen);
    assert_eq!(err.code(), ErrorCode::Busy, "the member retries");
    // The welcome was lost: the same token and key come back.
    let again = reg.join(&r, obs, &[2; 32], false, now()).unwrap();
    assert!(again.rejoined);
    assert_eq!(again.member, first.member);
    assert!(again.changes.is_empty(), "nothing the peers see changed");
    assert_eq!(reg.snapshot(again.network).unwrap().members.len(), 1);
    assert_eq!(reg.tokens(net)[0].uses_left, 0);
    // The new credential resumes; the lost one does not.
    let resume = |cred: Secret| ResumeRequest {
        network: net,
        public_key: r.public_key,
        credential: cred,
        generation: 1,
        endpoints: vec![],
    };
    assert_eq!(
        reg.resume(&resume([1; 32]), obs, now()).unwrap_err(),
        ProtoOpError::BadCredential
    );
    // Another token, or other metadata: not a retry.
    reg.create_token(net, &[5; 32], 5, Duration::from_secs(60), None, None, now())
        .unwrap();
    let mut other_token = r.clone();
    other_token.token_secret = [5; 32];
    let err = reg
        .join(&other_token, obs, &[3; 32], false, now())
        .unwrap_err();
    assert!(
        matches!(&err, ProtoOpError::KeyInUse(why) if why.contains("another token")),
        "{err}"
    );
    let mut other_type = r.clone();
    other_type.process_type = "worker".parse().unwrap();
    let err = reg
        .join(&other_type, obs, &[3; 32], false, now())
        .unwrap_err();
    assert!(
        matches!(&err, ProtoOpError::KeyInUse(why) if why.contains("differ")),
        "{err}"
    );
    // Once the credential was used, only the credential brings it back.
    let res = reg.resume(&resume([2; 32]), obs, now()).unwrap();
    assert!(res
        .ops
        .iter()
        .any(|op| matches!(op, StoreOp::PutMember(m) if m.credential_used)));
    let err = reg.join(&r, obs, &[4; 32], false, now()).unwrap_err();
    assert!(
        matches!(&err, ProtoOpError::KeyInUse(why) if why.contains("used")),
        "{err}"
    );
    assert!(
        err.to_string().contains("resume with its credential"),
        "{err}"
    );
    assert_eq!(reg.member_count(net), 1);
}

#[test]
fn a_resume_from_generation_zero_gets_a_snapshot() {
    let (mut reg, net, secret) = setup("10.240.0.0/22", 10);
    let obs: SocketAddr = OBS.parse().unwrap();
    reg.join(&req(net, secret, "api"), obs, &[1; 32], false, now())
        .unwrap();
    reg.join(&req(net, secret, "web"), obs, &[1; 32], false, now())
        .unwrap();
    // The log (cap 4) still covers generation 0 -> 2: a delta would be
    // possible, but it carries no network name; the protocol says snapshot.
    match reg.catchup(net, 0) {
        Some(Catchup::Snapshot(map)) => {
            assert_eq!(map.name, "prod");
            assert_eq!(map.members.len(), 2);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(reg.catchup(net, 1), Some(Catchup::Delta(_))));
    assert!(matches!(reg.catchup(net, 2), Some(Catchup::UpToDate)));
    assert!(matches!(reg.catchup(net, 3), Some(Catchup::Snapshot(_))));
    assert!(matches!(
        reg.catchup(net, u64::MAX),
        Some(Catchup::Snapshot(_))
    ));
}

#[test]
fn names_ranges_and_tokens_are_validated() {
    let (mut reg, net, secret) = setup("10.240.0.0/22", 10);
    let range = "10.240.0.0/22".parse().unwrap();
    for bad in [".", "..", "", "  ", "pro\u{200B}d", "x\u{1b}[2J"] {
        let err = reg.create_network(bad, range, now()).unwrap_err();
        assert!(matches!(err, AdminError::BadName { .. }), "{bad:?}: {err}");
    }
    for twin in ["prоd", "PROD", "ｐｒｏｄ"] {
        let err = reg.create_network(twin, range, now()).unwrap_err();
        assert!(
            matches!(err, AdminError::LookAlike { .. }),
            "{twin:?}: {err}"
        );
    }
    for bad in [
        "0.0.0.0/0",
        "127.0.0.0/24",
        "224.0.0.0/24",
        "10.0.0.0/8",
        "10.1.0.0/31",
    ] {
        let err = reg
            .create_network("other", bad.parse().unwrap(), now())
            .unwrap_err();
        assert!(matches!(err, AdminError::BadRange(_)), "{bad}: {err}");
    }
    assert!(reg.create_network("a/b", range, now()).is_ok());
    let tok = |reg: &mut Registry, ttl: u64, service: Option<String>| {
        reg.create_token(
            net,
            &[9; 32],
            1,
            Duration::from_secs(ttl),
            service,
            None,
            now(),
        )
    };
    assert!(matches!(
        tok(&mut reg, 0, None),
        Err(AdminError::BadExpiry(_))
    ));
    assert!(matches!(
        tok(&mut reg, 400 * 86400, None),
        Err(AdminError::BadExpiry(_))
    ));
    assert!(matches!(
        tok(&mut reg, 60, Some("x".repeat(1 << 20))),
        Err(AdminError::BadBinding(_))
    ));
    assert!(matches!(
        tok(&mut reg, 60, Some("a\u{202E}b".into())),
        Err(AdminError::BadBinding(_))
    ));
    // Joins: control and bidi characters in service names and runner labels.
    let obs: SocketAddr = OBS.parse().unwrap();
    for (service, runner) in [
        ("a\u{1b}[31m", "r"),
        ("api", "r\nforged"),
        ("api\u{2066}", "r"),
    ] {
        let mut r = req(net, secret, service);
        r.runner = runner.into();
        let err = reg.join(&r, obs, &[1; 32], false, now()).unwrap_err();
        assert_eq!(
            err.code(),
            ErrorCode::InvalidMetadata,
            "{service:?} {runner:?}"
        );
    }
    assert_eq!(reg.member_count(net), 0);
}

#[test]
fn networks_are_deleted_and_dead_tokens_collected() {
    let (mut reg, net, secret) = setup("10.240.0.0/22", 2);
    let obs: SocketAddr = OBS.parse().unwrap();
    let a = reg
        .join(&req(net, secret, "api"), obs, &[1; 32], false, now())
        .unwrap();
    let err = reg.delete_network(net, false, now()).unwrap_err();
    assert!(
        matches!(err, AdminError::NetworkInUse { members: 1, .. }),
        "{err}"
    );
    reg.create_token(net, &[3; 32], 1, Duration::from_secs(10), None, None, now())
        .unwrap();
    // Expired (the 10 s one) and used up (none yet) are collected.
    reg.join(&req(net, secret, "api"), obs, &[1; 32], false, now())
        .unwrap();
    let ops = reg.collect_tokens(now() + Duration::from_secs(20));
    assert_eq!(ops.len(), 2, "{ops:?}");
    assert!(reg.tokens(net).is_empty());
    let (changes, ops) = reg.delete_network(net, true, now()).unwrap();
    assert_eq!(changes.len(), 2);
    assert!(changes
        .iter()
        .any(|c| c.removed == Some(a.member.public_key)));
    assert!(ops.contains(&StoreOp::DeleteNetwork(net)));
    assert!(reg.network(net).is_none());
    assert!(reg.resolve("prod").is_err());
    // The name is free again.
    reg.create_network("prod", "10.240.0.0/22".parse().unwrap(), now())
        .unwrap();
}
