//! The flow table on a virtual clock: balance, stickiness, replies,
//! health, map changes, expiry and the bound.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use super::wire::tests::{echo, tcp, udp};
use super::wire::{ACK, FIN, RST, SYN};
use super::*;
use crate::keys::PrivateKey;

const C: [u8; 4] = [10, 240, 0, 9];
const V: [u8; 4] = [10, 240, 4, 1];

fn backend(n: u8, ports: &[u16]) -> Backend {
    Backend {
        key: PrivateKey::generate().public_key(),
        instance: format!("api-{n}").parse().unwrap(),
        ip: Ipv4Addr::new(10, 240, 0, n),
        ports: ports.to_vec(),
    }
}

fn services(backends: &[Backend]) -> Services {
    Services {
        range: Some("10.240.4.0/22".parse().unwrap()),
        addresses: vec![ServiceBackends {
            service: "api".into(),
            ip: V.into(),
            backends: backends.to_vec(),
            wake_timeout: None,
        }],
    }
}

fn table(backends: &[Backend]) -> (FlowTable, Instant) {
    let now = Instant::now();
    let mut t = FlowTable::new(now);
    assert!(t.set_services(&services(backends), now).is_empty());
    (t, now)
}

fn out(t: &mut FlowTable, packet: &[u8], now: Instant) -> Outbound {
    t.outbound(&Segment::outbound(packet).unwrap(), packet, now)
}

fn inb(t: &mut FlowTable, from: &PublicKey, packet: &[u8], now: Instant) -> Inbound {
    t.inbound(from, &Segment::inbound(packet).unwrap(), now)
}

fn syn(port: u16, isn: u32) -> Vec<u8> {
    tcp((C, port), (V, 80), SYN, isn, 0, 0)
}

fn synack(port: u16, isn: u32) -> Vec<u8> {
    tcp((V, 80), (C, port), SYN | ACK, 5000, isn + 1, 0)
}

fn to(o: Outbound) -> PublicKey {
    match o {
        Outbound::Forward(k) => k,
        other => panic!("not forwarded: {other:?}"),
    }
}

/// Total active slots over every pool (all must be released in the end).
fn slots(t: &FlowTable) -> u32 {
    t.pools
        .iter()
        .flat_map(|p| p.pool.active())
        .map(|(_, n, _)| n)
        .sum()
}

#[test]
fn flows_spread_evenly_and_stay_put() {
    let bs = [backend(1, &[]), backend(2, &[]), backend(3, &[])];
    let (mut t, now) = table(&bs);
    let mut per: HashMap<PublicKey, u32> = HashMap::new();
    let mut pinned = Vec::new();
    for port in 40000..40300 {
        let k = to(out(&mut t, &syn(port, 1), now));
        *per.entry(k).or_default() += 1;
        pinned.push(k);
    }
    assert_eq!(per.len(), 3);
    assert!(per.values().all(|&n| n == 100), "{per:?}");
    // Every later packet of a flow goes the same way.
    for (i, port) in (40000..40300).enumerate() {
        let data = tcp((C, port), (V, 80), ACK, 2, 5001, 100);
        assert_eq!(to(out(&mut t, &data, now)), pinned[i]);
    }
    // UDP 5-tuples and ping identifiers are flows too.
    let u = to(out(&mut t, &udp((C, 5353), (V, 53), 10), now));
    assert_eq!(to(out(&mut t, &udp((C, 5353), (V, 53), 99), now)), u);
    let e = to(out(&mut t, &echo(C, V, true, 7), now));
    assert_eq!(to(out(&mut t, &echo(C, V, true, 7), now)), e);
    assert_eq!(t.stats().active, 302);
    assert_eq!(t.stats().opened, 302);
}

#[test]
fn only_the_pinned_instance_may_answer() {
    let bs = [backend(1, &[]), backend(2, &[])];
    let (mut t, now) = table(&bs);
    let k = to(out(&mut t, &syn(40000, 1), now));
    let other = bs.iter().find(|b| b.key != k).unwrap().key;
    let stranger = PrivateKey::generate().public_key();
    assert_eq!(inb(&mut t, &k, &synack(40000, 1), now), Inbound::Accept);
    assert_eq!(
        inb(&mut t, &other, &synack(40000, 1), now),
        Inbound::Foreign
    );
    assert_eq!(
        inb(&mut t, &stranger, &synack(40000, 1), now),
        Inbound::Foreign
    );
    // No flow at all: foreign too (another port, a ping never sent).
    assert_eq!(inb(&mut t, &k, &synack(40001, 1), now), Inbound::Foreign);
    assert_eq!(
        inb(&mut t, &k, &echo(V, C, false, 3), now),
        Inbound::Foreign
    );
    assert_eq!(t.stats().foreign, 4);
}

#[test]
fn refused_syn_moves_the_flow_and_backs_the_instance_off() {
    let bs = [backend(1, &[]), backend(2, &[])];
    let (mut t, now) = table(&bs);
    let first = to(out(&mut t, &syn(40000, 1), now));
    let rst = tcp((V, 80), (C, 40000), RST | ACK, 0, 2, 0);
    // The refusal is swallowed; the retransmitted SYN goes elsewhere.
    assert_eq!(inb(&mut t, &first, &rst, now), Inbound::Drop);
    let later = now + Duration::from_millis(900);
    let second = to(out(&mut t, &syn(40000, 1), later));
    assert_ne!(second, first);
    // The new instance got its first SYN: no failure counted for it.
    assert_eq!(t.stats().failures, 1);
    assert_eq!(t.stats().repinned, 1);
    assert_eq!(
        inb(&mut t, &second, &synack(40000, 1), later),
        Inbound::Accept
    );
    // While it backs off, new flows avoid the refusing instance.
    for port in 41000..41010 {
        assert_eq!(to(out(&mut t, &syn(port, 1), later)), second);
    }
    // After the backoff (1 s from the failure) it is chosen again.
    let after = now + Duration::from_millis(2100);
    let picks: Vec<_> = (42000..42004)
        .map(|p| to(out(&mut t, &syn(p, 1), after)))
        .collect();
    assert!(picks.contains(&first));
}

#[test]
fn refusal_stands_when_no_other_instance_is_eligible() {
    let bs = [backend(1, &[])];
    let (mut t, now) = table(&bs);
    let k = to(out(&mut t, &syn(40000, 1), now));
    let rst = tcp((V, 80), (C, 40000), RST | ACK, 0, 2, 0);
    assert_eq!(inb(&mut t, &k, &rst, now), Inbound::Accept);
    assert_eq!(t.stats().active, 0);
    // Backing off, the only instance takes no new flow: refused at once.
    assert_eq!(out(&mut t, &syn(40001, 1), now), Outbound::Reject);
    assert_eq!(t.stats().rejected, 1);
    assert_eq!(slots(&t), 0);
}

#[test]
fn unanswered_syn_retransmission_moves_the_flow() {
    let bs = [backend(1, &[]), backend(2, &[])];
    let (mut t, now) = table(&bs);
    let first = to(out(&mut t, &syn(40000, 9), now));
    // A copy soon after is a duplicate, not a timeout.
    let soon = now + Duration::from_millis(100);
    assert_eq!(to(out(&mut t, &syn(40000, 9), soon)), first);
    let retry = now + Duration::from_secs(1);
    let second = to(out(&mut t, &syn(40000, 9), retry));
    assert_ne!(second, first);
    assert_eq!((t.stats().failures, t.stats().repinned), (1, 1));
    // The new instance answers: open; then data and FINs both ways.
    assert_eq!(
        inb(&mut t, &second, &synack(40000, 9), retry),
        Inbound::Accept
    );
    let fin_c = tcp((C, 40000), (V, 80), FIN | ACK, 10, 5001, 0);
    let fin_s = tcp((V, 80), (C, 40000), FIN | ACK, 5001, 11, 0);
    assert_eq!(to(out(&mut t, &fin_c, retry)), second);
    assert_eq!(inb(&mut t, &second, &fin_s, retry), Inbound::Accept);
    // Closed both ways: no longer counted by the balance.
    assert_eq!(slots(&t), 0);
    // Closing: gone 10 s after the last packet.
    assert_eq!(t.expire(retry + Duration::from_secs(9)), 0);
    assert_eq!(t.expire(retry + Duration::from_secs(10)), 1);
    assert_eq!(slots(&t), 0);
}

#[test]
fn syn_timeout_marks_the_instance_down_and_synack_heals_it() {
    let bs = [backend(1, &[]), backend(2, &[])];
    let (mut t, now) = table(&bs);
    let silent = to(out(&mut t, &syn(40000, 1), now));
    let other = bs.iter().find(|b| b.key != silent).unwrap().key;
    t.expire(now + Duration::from_secs(2));
    assert_eq!(t.stats().failures, 0);
    let at = now + Duration::from_secs(3);
    t.expire(at);
    assert_eq!(t.stats().failures, 1);
    for port in 41000..41004 {
        assert_eq!(to(out(&mut t, &syn(port, 1), at)), other);
    }
    // A late answer to the timed-out SYN brings the instance back at once.
    assert_eq!(inb(&mut t, &silent, &synack(40000, 1), at), Inbound::Accept);
    let picks: Vec<_> = (42000..42004)
        .map(|p| to(out(&mut t, &syn(p, 1), at)))
        .collect();
    assert!(picks.contains(&silent));
}

#[test]
fn instances_serve_the_ports_they_announce() {
    let bs = [backend(1, &[80]), backend(2, &[]), backend(3, &[8080])];
    let (mut t, now) = table(&bs);
    let on = |t: &mut FlowTable, port: u16, n: u16| -> Vec<PublicKey> {
        (0..n)
            .map(|i| to(out(t, &tcp((C, 40000 + i), (V, port), SYN, 1, 0, 0), now)))
            .collect()
    };
    let p80 = on(&mut t, 80, 10);
    assert!(p80.iter().all(|k| *k == bs[0].key || *k == bs[1].key));
    assert!(p80.contains(&bs[0].key) && p80.contains(&bs[1].key));
    let p8080 = on(&mut t, 8080, 10);
    assert!(p8080.iter().all(|k| *k == bs[1].key || *k == bs[2].key));
    // A port nobody announces: the instance announcing none.
    assert!(on(&mut t, 9, 5).iter().all(|k| *k == bs[1].key));
    // Without such an instance, an unannounced port is refused.
    let (mut t, now) = table(&[backend(1, &[80])]);
    assert_eq!(
        out(&mut t, &tcp((C, 1), (V, 81), SYN, 1, 0, 0), now),
        Outbound::Reject
    );
    assert_eq!(out(&mut t, &udp((C, 1), (V, 81), 1), now), Outbound::Reject);
    // Pings reach any instance.
    assert!(matches!(
        out(&mut t, &echo(C, V, true, 1), now),
        Outbound::Forward(_)
    ));
}

#[test]
fn map_change_resets_open_flows_of_gone_instances_only() {
    let bs = [backend(1, &[]), backend(2, &[])];
    let (mut t, now) = table(&bs);
    // Two open flows, one half-open and a UDP flow on each instance.
    let mut open: HashMap<u16, PublicKey> = HashMap::new();
    for port in 40000..40004 {
        let k = to(out(&mut t, &syn(port, 1), now));
        if port < 40002 || k == bs[0].key {
            assert_eq!(inb(&mut t, &k, &synack(port, 1), now), Inbound::Accept);
            let ack = tcp((C, port), (V, 80), ACK, 2, 5001 + u32::from(port), 0);
            to(out(&mut t, &ack, now));
            open.insert(port, k);
        }
    }
    to(out(&mut t, &udp((C, 5000), (V, 53), 1), now));
    to(out(&mut t, &udp((C, 5001), (V, 53), 1), now));
    // Instance 1 leaves.
    let ended = t.set_services(&services(&bs[1..]), now);
    let mut want: Vec<(u16, u32)> = open
        .iter()
        .filter(|(_, k)| **k == bs[0].key)
        .map(|(p, _)| (*p, 5001 + u32::from(*p)))
        .collect();
    let mut got: Vec<(u16, u32)> = ended.iter().map(|e| (e.key.client_port, e.seq)).collect();
    want.sort_unstable();
    got.sort_unstable();
    assert_eq!(got, want);
    assert_eq!(t.stats().reset, want.len() as u64);
    // Every remaining flow is on instance 2; new ones too.
    assert_eq!(t.stats().active, 3);
    assert_eq!(slots(&t), 3);
    for port in 41000..41004 {
        assert_eq!(to(out(&mut t, &syn(port, 1), now)), bs[1].key);
    }
    // Nothing left: the address refuses; its flows are gone.
    let open_on_2 = open.values().filter(|k| **k == bs[1].key).count();
    assert_eq!(t.set_services(&services(&[]), now).len(), open_on_2);
    assert_eq!(out(&mut t, &syn(42000, 1), now), Outbound::Reject);
    assert_eq!(t.stats().active, 0);
    // The address itself gone: refused too.
    t.set_services(&Services::default(), now);
    assert_eq!(out(&mut t, &syn(42001, 1), now), Outbound::Reject);
}

#[test]
fn a_new_key_in_the_same_slot_takes_no_old_flow() {
    let b1 = backend(1, &[]);
    let (mut t, now) = table(std::slice::from_ref(&b1));
    let k = to(out(&mut t, &syn(40000, 1), now));
    inb(&mut t, &k, &synack(40000, 1), now);
    to(out(&mut t, &tcp((C, 40000), (V, 80), ACK, 2, 5001, 0), now));
    // Restarted without its state: same instance and address, new key.
    let mut b1b = b1.clone();
    b1b.key = PrivateKey::generate().public_key();
    let ended = t.set_services(&services(std::slice::from_ref(&b1b)), now);
    assert_eq!(ended.len(), 1);
    assert_eq!(slots(&t), 0);
    assert_eq!(to(out(&mut t, &syn(40001, 1), now)), b1b.key);
    // The old key's answers are foreign now.
    assert_eq!(inb(&mut t, &k, &synack(40001, 1), now), Inbound::Foreign);
}

#[test]
fn segments_without_a_flow_are_reset_and_unknown_addresses_refused() {
    let (mut t, now) = table(&[backend(1, &[])]);
    let data = tcp((C, 40000), (V, 80), ACK, 2, 3, 10);
    assert_eq!(out(&mut t, &data, now), Outbound::Reject);
    let rst = tcp((C, 40000), (V, 80), RST, 2, 0, 0);
    assert_eq!(out(&mut t, &rst, now), Outbound::Drop);
    let elsewhere = tcp((C, 40000), ([10, 240, 4, 9], 80), SYN, 1, 0, 0);
    assert_eq!(out(&mut t, &elsewhere, now), Outbound::Reject);
    assert_eq!(t.stats().opened, 0);
}

#[test]
fn idle_flows_expire_by_kind() {
    let (mut t, now) = table(&[backend(1, &[]), backend(2, &[])]);
    let k = to(out(&mut t, &syn(40000, 1), now));
    inb(&mut t, &k, &synack(40000, 1), now);
    to(out(&mut t, &syn(40001, 1), now)); // half-open
    to(out(&mut t, &udp((C, 5000), (V, 53), 1), now));
    to(out(&mut t, &echo(C, V, true, 1), now));
    let at = |s: u64| now + Duration::from_secs(s);
    assert_eq!(t.expire(at(29)), 0);
    assert_eq!(t.expire(at(30)), 2, "half-open and ping");
    assert_eq!(t.expire(at(60)), 1, "udp");
    // A reply refreshes a flow too.
    let keep = tcp((V, 80), (C, 40000), ACK, 5001, 2, 10);
    assert_eq!(inb(&mut t, &k, &keep, at(3600)), Inbound::Accept);
    assert_eq!(t.expire(at(3600 + 7499)), 0);
    assert_eq!(t.expire(at(3600 + 7500)), 1, "open TCP");
    assert_eq!(t.stats().expired, 4);
    assert_eq!(slots(&t), 0);
    // A reset ends a flow at once, either way.
    let k = to(out(&mut t, &syn(40002, 1), now));
    inb(&mut t, &k, &synack(40002, 1), now);
    to(out(&mut t, &tcp((C, 40002), (V, 80), RST, 2, 0, 0), now));
    let k = to(out(&mut t, &syn(40003, 1), now));
    inb(&mut t, &k, &synack(40003, 1), now);
    let rst = tcp((V, 80), (C, 40003), RST, 5001, 0, 0);
    assert_eq!(inb(&mut t, &k, &rst, now), Inbound::Accept);
    assert_eq!(t.stats().active, 0);
    assert_eq!(slots(&t), 0);
}

#[test]
fn a_full_table_refuses_new_flows_and_keeps_old_ones() {
    let now = Instant::now();
    let mut t = FlowTable::with_limit(now, 4);
    let bs = [backend(1, &[])];
    t.set_services(&services(&bs), now);
    for port in 0..4 {
        to(out(&mut t, &udp((C, port), (V, 53), 1), now));
    }
    assert_eq!(out(&mut t, &udp((C, 9), (V, 53), 1), now), Outbound::Reject);
    assert_eq!(t.stats().full, 1);
    to(out(&mut t, &udp((C, 0), (V, 53), 1), now));
    // Once they expire, a new flow sweeps them out and takes a place.
    let later = now + UDP_IDLE;
    to(out(&mut t, &udp((C, 9), (V, 53), 1), later));
    assert_eq!(t.stats().active, 1);
}

#[test]
fn new_connection_on_the_same_ports_is_a_new_flow() {
    let (mut t, now) = table(&[backend(1, &[]), backend(2, &[])]);
    let k = to(out(&mut t, &syn(40000, 1), now));
    inb(&mut t, &k, &synack(40000, 1), now);
    // Another ISN: the old connection is gone; balanced afresh.
    let k2 = to(out(&mut t, &syn(40000, 77), now));
    assert_ne!(k2, k);
    assert_eq!(t.stats().active, 1);
    assert_eq!(slots(&t), 1);
}

#[test]
fn udp_port_unreachable_is_a_failure_and_ends_the_flow() {
    let (mut t, now) = table(&[backend(1, &[]), backend(2, &[])]);
    let d = udp((C, 5000), (V, 53), 4);
    let k = to(out(&mut t, &d, now));
    let mut l4 = vec![3u8, 3, 0, 0, 0, 0, 0, 0];
    l4.extend_from_slice(&d[..28]);
    let err = super::wire::tests::ipv4(1, V, C, &l4);
    assert_eq!(inb(&mut t, &k, &err, now), Inbound::Accept);
    assert_eq!((t.stats().active, t.stats().failures), (0, 1));
    assert_ne!(to(out(&mut t, &d, now)), k);
}

#[test]
fn services_from_a_map_are_the_online_web_members_but_self() {
    use crate::netmap::tests::{empty_map, member};
    use crate::netmap::{MemberState, ServiceAddress};
    let mut map = empty_map();
    let me = member("api-1", "api", "web", 1, 1);
    let web2 = member("api-2", "api", "web", 2, 2);
    let mut off = member("api-3", "api", "web", 3, 3);
    off.state = MemberState::Offline;
    let worker = member("api-w", "api", "worker", 1, 4);
    for m in [&me, &web2, &off, &worker] {
        map.members.insert(m.public_key, m.clone());
    }
    map.addresses.insert(
        "api".into(),
        ServiceAddress {
            service: "api".into(),
            ip: V.into(),
            wake_timeout_secs: None,
            ports: vec![],
        },
    );
    map.addresses.insert(
        "far".into(),
        ServiceAddress {
            service: "far".into(),
            ip: Ipv4Addr::new(192, 0, 2, 1),
            wake_timeout_secs: None,
            ports: vec![],
        },
    );
    let s = Services::from_map(&map, &me.public_key);
    assert_eq!(s.range, Some("10.240.4.0/22".parse().unwrap()));
    assert_eq!(s.addresses.len(), 1, "outside the range: left out");
    let keys: Vec<_> = s.addresses[0].backends.iter().map(|b| b.key).collect();
    assert_eq!(keys, vec![web2.public_key]);
    // No addresses: nothing to balance.
    map.addresses.clear();
    assert_eq!(
        Services::from_map(&map, &me.public_key),
        Services::default()
    );
}

#[test]
fn a_member_holds_its_service_address_while_it_is_a_backend() {
    use crate::netmap::tests::{empty_map, member};
    use crate::netmap::{MemberState, ServiceAddress};
    let mut map = empty_map();
    let mut web = member("api-1", "api", "web", 1, 1);
    let worker = member("api-w", "api", "worker", 1, 2);
    let lone = member("db-1", "db", "web", 1, 3);
    web.state = MemberState::Offline; // a cached map: itself offline
    for m in [&web, &worker, &lone] {
        map.members.insert(m.public_key, m.clone());
    }
    map.addresses.insert(
        "api".into(),
        ServiceAddress {
            service: "api".into(),
            ip: V.into(),
            wake_timeout_secs: None,
            ports: vec![],
        },
    );
    let ip = |n| Ipv4Addr::new(10, 240, 0, n);
    assert_eq!(own_address(&map, ip(1)), Some(V.into()));
    // The worker is no backend while a web member is online.
    web.state = MemberState::Online;
    map.members.insert(web.public_key, web.clone());
    assert_eq!(own_address(&map, ip(2)), None);
    map.members.remove(&web.public_key);
    assert_eq!(own_address(&map, ip(2)), Some(V.into()));
    // No address for its service, or not a member: nothing.
    assert_eq!(own_address(&map, ip(3)), None);
    assert_eq!(own_address(&map, ip(9)), None);
}

#[test]
fn memory_per_flow_is_bounded() {
    let now = Instant::now();
    let mut t = FlowTable::new(now);
    // Four instances: a pool counts at most 65535 flows per instance (as
    // many as one client has ports).
    let bs: Vec<Backend> = (1..=4).map(|n| backend(n, &[])).collect();
    t.set_services(&services(&bs), now);
    for i in 0..100_000u32 {
        let src = [10, 240, (i >> 16) as u8 + 1, (i >> 8) as u8];
        to(out(&mut t, &udp((src, i as u16), (V, 53), 1), now));
    }
    let bytes = t.flow_bytes();
    eprintln!(
        "100000 flows: {} bytes ({} per flow)",
        bytes,
        bytes / 100_000
    );
    assert!(bytes / 100_000 < 100, "{bytes}");
}

/// `api` at V, wakeable after `wake` with `backends`.
fn wakeable(backends: &[Backend], wake: Duration) -> Services {
    let mut s = services(backends);
    s.addresses[0].wake_timeout = Some(wake);
    s
}

fn hold(o: Outbound) -> bool {
    match o {
        Outbound::Hold { wake } => wake,
        other => panic!("not held: {other:?}"),
    }
}

#[test]
fn held_flows_ask_one_wake_and_go_to_the_first_instance_in_order() {
    let now = Instant::now();
    let mut t = FlowTable::new(now);
    t.set_services(&wakeable(&[], Duration::from_secs(10)), now);
    assert!(hold(out(&mut t, &syn(40000, 1), now)), "the first asks");
    assert!(
        !hold(out(&mut t, &syn(40001, 1), now)),
        "one ask per address"
    );
    assert!(!hold(out(&mut t, &syn(40002, 1), now)));
    // The client retransmits its SYN: not a second flow, not held twice.
    let later = now + Duration::from_secs(1);
    assert!(!hold(out(&mut t, &syn(40000, 1), later)));
    // A UDP flow keeps its datagrams in order.
    let d1 = udp((C, 5000), (V, 53), 10);
    let d2 = udp((C, 5000), (V, 53), 20);
    assert!(!hold(out(&mut t, &d1, later)));
    assert!(!hold(out(&mut t, &d2, later)));
    assert_eq!(t.held_service(&V.into()).as_deref(), Some("api"));
    let s = t.stats();
    assert_eq!((s.held, s.held_total, s.active), (4, 4, 4));
    assert!(t.take_held().is_empty());
    // Still no instance: a map change holds on.
    t.set_services(&wakeable(&[], Duration::from_secs(10)), later);
    assert!(t.take_held().is_empty());
    // The first instance comes online.
    let bs = [backend(1, &[]), backend(2, &[])];
    let woke = now + Duration::from_secs(4);
    assert!(t
        .set_services(&wakeable(&bs, Duration::from_secs(10)), woke)
        .is_empty());
    let held = t.take_held();
    assert!(held.refused.is_empty());
    assert_eq!(held.released.len(), 4);
    let mut per: HashMap<PublicKey, u32> = HashMap::new();
    for (k, packets) in &held.released {
        *per.entry(*k).or_default() += 1;
        let first = Segment::outbound(&packets[0]).unwrap();
        if first.key.proto == Proto::Udp {
            assert_eq!(packets, &vec![d1.clone(), d2.clone()]);
        } else {
            assert_eq!(packets.len(), 1, "one SYN per flow");
        }
    }
    assert_eq!(per.len(), 2, "balanced: {per:?}");
    let s = t.stats();
    assert_eq!((s.held, s.held_bytes, s.active, s.opened), (0, 0, 4, 4));
    // Later packets follow; a copy of the SYN is no new flow.
    let k = held
        .released
        .iter()
        .find(|(_, p)| p[0] == syn(40000, 1))
        .unwrap()
        .0;
    assert_eq!(to(out(&mut t, &syn(40000, 1), woke)), k);
    assert_eq!(t.stats().active, 4);
    assert_eq!(inb(&mut t, &k, &synack(40000, 1), woke), Inbound::Accept);
    // Its connect time includes the wake (4 s).
    let api = t.traffic();
    let c = api.get("api").unwrap();
    assert_eq!((c.held, c.opened, c.refused, c.active), (4, 2, 0, 4));
    assert_eq!(c.connect_count, 1);
    assert_eq!(c.connect_buckets[4], 1, "1-10 s: {c:?}");
    assert_eq!(slots(&t), 4);
}

#[test]
fn held_flows_are_refused_after_the_wake_timeout() {
    let now = Instant::now();
    let mut t = FlowTable::new(now);
    let wait = Duration::from_secs(3);
    t.set_services(&wakeable(&[], wait), now);
    assert!(hold(out(&mut t, &syn(40000, 7), now)));
    let d = udp((C, 5000), (V, 53), 10);
    assert!(!hold(out(&mut t, &d, now + Duration::from_secs(1))));
    t.expire(now + Duration::from_millis(2999));
    assert!(t.take_held().is_empty());
    t.expire(now + wait);
    let held = t.take_held();
    assert_eq!(held.refused, vec![syn(40000, 7)]);
    t.expire(now + Duration::from_secs(4));
    assert_eq!(t.take_held().refused, vec![d]);
    let s = t.stats();
    assert_eq!((s.held, s.active, s.wake_timeouts), (0, 0, 2));
    let c = *t.traffic().get("api").unwrap();
    assert_eq!((c.held, c.refused, c.opened, c.active), (2, 2, 0, 0));
    // A flow after the timeout asks again.
    assert!(hold(out(
        &mut t,
        &syn(40001, 1),
        now + Duration::from_secs(5)
    )));
    // The client gives up (reset): the held flow ends, nothing answered.
    let rst = tcp((C, 40001), (V, 80), RST, 2, 0, 0);
    assert_eq!(
        out(&mut t, &rst, now + Duration::from_secs(5)),
        Outbound::Drop
    );
    assert_eq!(t.stats().held, 0);
    // The address stops being wakeable, or goes away: refused at once.
    assert!(!hold(out(
        &mut t,
        &syn(40002, 1),
        now + Duration::from_secs(5)
    )));
    t.set_services(&services(&[]), now + Duration::from_secs(5));
    assert_eq!(t.take_held().refused, vec![syn(40002, 1)]);
    assert_eq!(out(&mut t, &syn(40003, 1), now), Outbound::Reject);
    t.set_services(&wakeable(&[], wait), now);
    assert!(
        hold(out(&mut t, &syn(40004, 1), now)),
        "wakeable anew: asks"
    );
    t.set_services(&Services::default(), now);
    assert_eq!(t.take_held().refused, vec![syn(40004, 1)]);
    assert_eq!(t.stats().held, 0);
}

#[test]
fn holding_is_bounded_per_flow_per_address_and_in_all() {
    let now = Instant::now();
    let mut t = FlowTable::new(now);
    let mut s = wakeable(&[], Duration::from_secs(10));
    for n in 2..=6u8 {
        s.addresses.push(ServiceBackends {
            service: format!("svc{n}"),
            ip: Ipv4Addr::new(10, 240, 4, n),
            backends: vec![],
            wake_timeout: Some(Duration::from_secs(10)),
        });
    }
    t.set_services(&s, now);
    // Per flow: 4 datagrams.
    for _ in 0..10 {
        hold(out(&mut t, &udp((C, 5000), (V, 53), 100), now));
    }
    // Per address: 256 flows (a SYN flood of 2000).
    let mut held = 1;
    for port in 1..2000u16 {
        match out(&mut t, &syn(port, 1), now) {
            Outbound::Hold { .. } => held += 1,
            Outbound::Reject => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(held, HOLD_FLOWS_PER_ADDRESS);
    // In all: 1024 flows over five more addresses.
    for n in 2..=6u8 {
        for port in 1..300u16 {
            let p = tcp((C, port), ([10, 240, 4, n], 80), SYN, 1, 0, 0);
            let _ = out(&mut t, &p, now);
        }
    }
    let st = t.stats();
    assert_eq!(st.held, HOLD_FLOWS, "{st:?}");
    assert!(st.held_bytes <= HOLD_BYTES);
    assert_eq!(st.hold_full, (2000 - 256) + (5 * 299 - (1024 - 256)) as u64);
    // A large datagram: within the bytes a flow may hold.
    let big = udp((C, 6000), ([10, 240, 4, 2], 53), HOLD_FLOW_BYTES);
    assert_eq!(out(&mut t, &big, now), Outbound::Reject);
    let bytes_before = t.stats().held_bytes;
    // Everything times out: memory back to nothing.
    t.expire(now + Duration::from_secs(10));
    assert_eq!(t.take_held().refused.len(), HOLD_FLOWS);
    let st = t.stats();
    assert_eq!((st.held, st.held_bytes, st.active), (0, 0, 0));
    assert!(bytes_before > 0);
    assert!(t.holds.is_empty());
}

#[test]
fn traffic_is_counted_per_destination_service() {
    let bs = [backend(1, &[])];
    let (mut t, now) = table(&bs);
    let k = bs[0].key;
    assert!(t.traffic().pairs.is_empty(), "nothing counted yet");
    to(out(&mut t, &syn(40000, 1), now));
    let later = now + Duration::from_millis(5);
    inb(&mut t, &k, &synack(40000, 1), later);
    let data = tcp((C, 40000), (V, 80), ACK, 2, 5001, 100);
    to(out(&mut t, &data, later));
    // A run of packets the driver passed without asking.
    let key = Segment::outbound(&data).unwrap().key;
    t.touch(&key, Some(5001), 1000, later);
    let reply = tcp((V, 80), (C, 40000), ACK, 5001, 102, 300);
    assert_eq!(inb(&mut t, &k, &reply, later), Inbound::Accept);
    t.touch_in(&key, 2000, later);
    // A refused SYN (no other instance): refused.
    to(out(&mut t, &syn(40001, 1), later));
    let rst = tcp((V, 80), (C, 40001), RST | ACK, 0, 2, 0);
    assert_eq!(inb(&mut t, &k, &rst, later), Inbound::Accept);
    // UDP: opened when sent on, answered later.
    to(out(&mut t, &udp((C, 5000), (V, 53), 10), later));
    inb(
        &mut t,
        &k,
        &udp((V, 53), (C, 5000), 30),
        later + Duration::from_millis(50),
    );
    let r = t.traffic();
    assert_eq!(r.check(), Ok(()));
    assert_eq!(r.pairs.len(), 1);
    let c = r.get("api").unwrap();
    assert_eq!((c.opened, c.active, c.refused, c.held), (2, 2, 1, 0));
    let syn_len = syn(40000, 1).len() as u64;
    assert_eq!(
        c.bytes_sent,
        2 * syn_len + data.len() as u64 + 1000 + 38,
        "{c:?}"
    );
    assert_eq!(
        c.bytes_received,
        synack(40000, 1).len() as u64 + reply.len() as u64 + 2000 + rst.len() as u64 + 58
    );
    assert_eq!(c.connect_count, 2);
    assert_eq!(c.connect_buckets[1], 1, "5 ms");
    assert_eq!(c.connect_buckets[2], 1, "50 ms");
    // No instance, not wakeable: refused at once, counted.
    t.set_services(&services(&[]), later);
    assert_eq!(out(&mut t, &syn(40002, 1), later), Outbound::Reject);
    let c = *t.traffic().get("api").unwrap();
    assert_eq!(c.refused, 2);
    assert_eq!(c.bytes_sent, 2 * syn_len + data.len() as u64 + 1000 + 38);
}

/// The hold accounting agrees with what is held, within every bound.
fn check_holds(t: &FlowTable) {
    let mut flows = 0;
    let mut bytes = 0;
    for h in t.holds.values() {
        assert!(h.flows.len() <= HOLD_FLOWS_PER_ADDRESS);
        assert!(!h.flows.is_empty(), "no empty hold is kept");
        let sum: usize = h.flows.values().map(|f| f.bytes).sum();
        assert_eq!(h.bytes, sum);
        assert!(h.bytes <= HOLD_BYTES_PER_ADDRESS);
        for f in h.flows.values() {
            assert!(!f.packets.is_empty() && f.packets.len() <= HOLD_PACKETS);
            assert_eq!(f.bytes, f.packets.iter().map(Vec::len).sum::<usize>());
            assert!(f.bytes <= HOLD_FLOW_BYTES);
        }
        flows += h.flows.len();
        bytes += h.bytes;
    }
    let s = t.stats();
    assert_eq!((s.held, s.held_bytes), (flows, bytes));
    assert!(flows <= HOLD_FLOWS && bytes <= HOLD_BYTES);
}

#[test]
fn random_traffic_through_sleep_and_wake_keeps_the_hold_accounting() {
    let bs = [backend(1, &[80]), backend(2, &[])];
    let wait = Duration::from_secs(2);
    let states = [
        wakeable(&[], wait),
        wakeable(&bs, wait),
        wakeable(&bs[..1], wait),
        services(&[]),
        Services::default(),
    ];
    let start = Instant::now();
    let mut now = start;
    let mut t = FlowTable::with_limit(start, 512);
    t.set_services(&states[0], now);
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let (mut released, mut refused) = (0usize, 0usize);
    for _ in 0..50_000 {
        now += Duration::from_millis(next(40));
        let port = 40000 + next(600) as u16;
        let sport = [80, 81][next(2) as usize];
        match next(100) {
            0..=39 => {
                let p = tcp(
                    (C, port),
                    (V, sport),
                    SYN,
                    next(3) as u32,
                    0,
                    next(3) as usize * 700,
                );
                let _ = out(&mut t, &p, now);
            }
            40..=59 => {
                let p = udp((C, port), (V, 53), next(3000) as usize);
                let _ = out(&mut t, &p, now);
            }
            60..=64 => {
                let p = tcp((C, port), (V, sport), RST, 1, 0, 0);
                let _ = out(&mut t, &p, now);
            }
            65..=79 => {
                let p = tcp((V, sport), (C, port), SYN | ACK, 9, 1, 0);
                let _ = inb(&mut t, &bs[next(2) as usize].key, &p, now);
            }
            80..=84 => {
                t.set_services(&states[next(states.len() as u64) as usize], now);
            }
            85..=94 => t.expire_held(now),
            _ => {
                t.expire(now);
            }
        }
        let held = t.take_held();
        released += held.released.len();
        refused += held.refused.len();
        for (k, _) in &held.released {
            assert!(bs.iter().any(|b| b.key == *k));
        }
        check_holds(&t);
    }
    eprintln!(
        "released {released}, refused {refused}, stats {:?}",
        t.stats()
    );
    assert!(released > 0 && refused > 0);
    t.set_services(&Services::default(), now);
    t.expire(now + Duration::from_secs(3 * 3600));
    check_holds(&t);
    assert_eq!(t.stats().active, 0);
}
