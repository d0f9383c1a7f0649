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
            now(),
        )
        .unwrap();
    let b = reg
        .join(
            &req(net, secret, "api"),
            OBS.parse().unwrap(),
            &[3; 32],
            now(),
        )
        .unwrap();
    assert_eq!(a.member.ip, Ipv4Addr::new(10, 240, 0, 1));
    assert_eq!(b.member.ip, Ipv4Addr::new(10, 240, 0, 2));
    assert_eq!((a.member.index, b.member.index), (1, 2));
    assert_eq!(a.member.app_id, b.member.app_id);
    assert_ne!(a.member.instance, b.member.instance);
    assert_eq!(b.map.members.len(), 2);
    assert_eq!(b.change.delta.from, 1);
    assert_eq!(b.change.delta.to, 2);
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
        reg.join(&req(net, [9; 32], "api"), obs, &[2; 32], now())
            .unwrap_err(),
        ProtoOpError::InvalidToken
    );
    let later = now() + Duration::from_secs(7200);
    assert_eq!(
        reg.join(&req(net, secret, "api"), obs, &[2; 32], later)
            .unwrap_err(),
        ProtoOpError::TokenExpired
    );
    assert_eq!(reg.member_count(net), 0);
    assert_eq!(reg.tokens(net)[0].uses_left, 1);
    reg.join(&req(net, secret, "api"), obs, &[2; 32], now())
        .unwrap();
    assert_eq!(
        reg.join(&req(net, secret, "api"), obs, &[2; 32], now())
            .unwrap_err(),
        ProtoOpError::TokenUsedUp
    );
    // /30 has two hosts: a second token fills it, the third join is refused.
    let (t2, _) = reg
        .create_token(net, &[5; 32], 5, Duration::from_secs(60), None, None, now())
        .unwrap();
    reg.join(&req(net, [5; 32], "api"), obs, &[2; 32], now())
        .unwrap();
    let gen = reg.network(net).unwrap().generation;
    let err = reg
        .join(&req(net, [5; 32], "api"), obs, &[2; 32], now())
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
        .join(&req(net, secret, "api"), obs, &[7; 32], now())
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
        .join(&req(net, secret, "api"), obs, &[1; 32], now())
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
        reg.join(&r, obs, &[0; 32], now()).unwrap();
    }
    let err = reg
        .join(&req(net, secret, "x"), obs, &[0; 32], now())
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
        .join(&bad, OBS.parse().unwrap(), &[2; 32], now())
        .is_err());
    bad.ports = (1..=65).collect();
    assert!(reg
        .join(&bad, OBS.parse().unwrap(), &[2; 32], now())
        .is_err());
    let mut good = req(net, secret, "api");
    good.ports = vec![8080, 80, 8080];
    let j = reg
        .join(&good, OBS.parse().unwrap(), &[2; 32], now())
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
