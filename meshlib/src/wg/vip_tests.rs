//! Service addresses through real engines on loopback (no root): a client
//! engine balances flows to a service address over two backend engines,
//! packets arrive unchanged, only the pinned backend may answer as the
//! address, and a backend that leaves gets its open flows reset.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use super::flows::wire::tests::{tcp, udp};
use super::flows::wire::{ACK, RST, SYN};
use super::flows::{Backend, FlowKey, Proto, Segment, ServiceBackends, Services};
use super::tests::{Node, WAIT};

const C: [u8; 4] = [10, 240, 0, 1];
const V: [u8; 4] = [10, 240, 4, 1];
const QUIET: Duration = Duration::from_millis(300);

fn backend(node: &Node, n: u8) -> Backend {
    Backend {
        key: node.key,
        instance: format!("api-{n}").parse().unwrap(),
        ip: Ipv4Addr::new(10, 240, 0, n),
        ports: vec![],
    }
}

fn services(backends: Vec<Backend>) -> Services {
    Services {
        range: Some("10.240.4.0/22".parse().unwrap()),
        addresses: vec![ServiceBackends {
            service: "api".into(),
            ip: V.into(),
            backends,
            wake_timeout: None,
        }],
    }
}

/// A client (10.240.0.1), two `api` backends (.2, .3) and a member of
/// another service (.4), all peers of the client.
fn mesh() -> (Node, Vec<Node>, Node) {
    let client = Node::new();
    let backends = vec![Node::new(), Node::new()];
    let other = Node::new();
    for (i, n) in backends.iter().chain([&other]).enumerate() {
        client.add(n, &format!("10.240.0.{}", i + 2));
        n.add(&client, "10.240.0.1");
    }
    let list = vec![backend(&backends[0], 2), backend(&backends[1], 3)];
    assert_eq!(client.engine.set_services(&services(list)), 0);
    (client, backends, other)
}

fn syn(port: u16) -> Vec<u8> {
    tcp((C, port), (V, 80), SYN, 100, 0, 0)
}

fn synack(port: u16) -> Vec<u8> {
    tcp((V, 80), (C, port), SYN | ACK, 900, 101, 0)
}

/// Which backend got `packet` (unchanged), waiting for it.
fn arrival(backends: &[Node], packet: &[u8]) -> usize {
    let deadline = std::time::Instant::now() + WAIT;
    while std::time::Instant::now() < deadline {
        for (i, b) in backends.iter().enumerate() {
            if let Some(p) = b.recv(Duration::from_millis(10)) {
                assert_eq!(p, packet, "arrives unchanged");
                return i;
            }
        }
    }
    panic!("no backend got the packet");
}

#[test]
fn flows_to_a_service_address_are_balanced_pinned_and_answered() {
    let (client, backends, other) = mesh();
    let mut pinned = HashMap::new();
    let mut count = [0u32; 2];
    for port in 40000..40010 {
        client.send(syn(port));
        let i = arrival(&backends, &syn(port));
        pinned.insert(port, i);
        count[i] += 1;
    }
    assert_eq!(count, [5, 5]);
    // Later packets of a flow stay on its backend.
    for port in 40000..40010 {
        let data = tcp((C, port), (V, 80), ACK, 101, 901, 200);
        client.send(data.clone());
        assert_eq!(arrival(&backends, &data), pinned[&port]);
    }
    // The pinned backend answers as the address; the other one, and a
    // member of another service, cannot.
    let i = pinned[&40000];
    backends[1 - i].send(synack(40000));
    other.send(synack(40000));
    assert_eq!(client.recv(QUIET), None);
    backends[i].send(synack(40000));
    assert_eq!(client.recv(WAIT), Some(synack(40000)));
    let stats = client.engine.flow_stats();
    assert_eq!(stats.foreign, 2, "{stats:?}");
    for (n, k) in [(&backends[1 - i], 1), (&other, 1), (&backends[i], 0)] {
        let drops = client.engine.peer_stats(&n.key).unwrap().drops;
        assert_eq!(drops.spoofed_source, k);
    }
    assert_eq!(stats.active, 10);
}

#[test]
fn leaving_backend_gets_its_open_flows_reset_and_no_new_ones() {
    let (client, backends, _other) = mesh();
    client.send(syn(40000));
    let i = arrival(&backends, &syn(40000));
    backends[i].send(synack(40000));
    assert_eq!(client.recv(WAIT), Some(synack(40000)));
    let ack = tcp((C, 40000), (V, 80), ACK, 101, 901, 0);
    client.send(ack.clone());
    assert_eq!(arrival(&backends, &ack), i);
    // Backend i leaves the service.
    let stay = 1 - i;
    let n = client
        .engine
        .set_services(&services(vec![backend(&backends[stay], stay as u8 + 2)]));
    assert_eq!(n, 1);
    let rst = client.recv(WAIT).expect("a reset for the local client");
    let seg = Segment::inbound(&rst).unwrap();
    assert_eq!(
        seg.key,
        FlowKey {
            client: C.into(),
            service: V.into(),
            client_port: 40000,
            service_port: 80,
            proto: Proto::Tcp,
        }
    );
    assert_eq!(seg.tcp_flags(), RST);
    assert_eq!(
        &rst[24..28],
        &901u32.to_be_bytes(),
        "at the client's next byte"
    );
    // New flows go to the backend that stays.
    for port in 41000..41004 {
        client.send(syn(port));
        assert_eq!(arrival(&backends, &syn(port)), stay);
    }
    // A segment of the forgotten flow is answered with a reset too.
    client.send(tcp((C, 40000), (V, 80), ACK, 101, 901, 10));
    let again = Segment::inbound(&client.recv(WAIT).unwrap()).unwrap();
    assert_eq!(again.tcp_flags(), RST);
}

#[test]
fn service_without_backends_refuses_at_once() {
    let (client, backends, _other) = mesh();
    client.engine.set_services(&services(vec![]));
    client.send(syn(40000));
    let answer = Segment::inbound(&client.recv(WAIT).expect("refused")).unwrap();
    assert_eq!(answer.tcp_flags(), RST | ACK);
    client.send(udp((C, 5000), (V, 53), 8));
    let unreachable = client.recv(WAIT).expect("port unreachable");
    assert_eq!(
        (unreachable[9], unreachable[20], unreachable[21]),
        (1, 3, 3)
    );
    for b in &backends {
        assert_eq!(b.recv(QUIET), None);
    }
    // No services at all: the range is an ordinary destination again.
    client.engine.set_services(&Services::default());
    client.send(syn(40001));
    assert_eq!(client.recv(QUIET), None);
    assert!(client.engine.stats().no_route >= 1);
}

#[test]
fn held_flows_wake_the_service_once_then_reach_it_or_are_refused() {
    let (client, backends, _other) = mesh();
    let asked = std::sync::Arc::new(parking_lot::Mutex::new(Vec::<String>::new()));
    let seen = asked.clone();
    client
        .engine
        .set_wake_hook(Some(std::sync::Arc::new(move |s: &str| {
            seen.lock().push(s.to_owned())
        })));
    let mut sleeping = services(vec![]);
    sleeping.addresses[0].wake_timeout = Some(Duration::from_secs(30));
    client.engine.set_services(&sleeping);
    for port in 40000..40003 {
        client.send(syn(port));
    }
    client.send(syn(40000));
    assert_eq!(client.recv(QUIET), None, "held, not refused");
    for b in &backends {
        assert_eq!(b.recv(Duration::from_millis(10)), None);
    }
    assert_eq!(*asked.lock(), vec!["api".to_owned()], "one wake");
    assert_eq!(client.engine.flow_stats().held, 3);
    // The service wakes: every held SYN reaches it, once.
    let mut awake = services(vec![backend(&backends[0], 2)]);
    awake.addresses[0].wake_timeout = Some(Duration::from_secs(30));
    client.engine.set_services(&awake);
    let mut got = Vec::new();
    while let Some(p) = backends[0].recv(QUIET) {
        got.push(p);
    }
    got.sort();
    let mut want: Vec<Vec<u8>> = (40000..40003).map(syn).collect();
    want.sort();
    assert_eq!(got, want);
    backends[0].send(synack(40000));
    assert_eq!(client.recv(WAIT), Some(synack(40000)));
    let report = client.engine.traffic();
    let c = report.get("api").unwrap();
    assert_eq!((c.held, c.opened, c.active), (3, 1, 3), "{c:?}");
    // Asleep again, with a short wake timeout: refused after it.
    let mut short = services(vec![]);
    short.addresses[0].wake_timeout = Some(Duration::from_secs(1));
    client.engine.set_services(&short);
    let start = std::time::Instant::now();
    client.send(syn(41000));
    let answer = client.recv(Duration::from_secs(5)).expect("refused");
    assert!(start.elapsed() >= Duration::from_millis(900));
    assert_eq!(Segment::inbound(&answer).unwrap().tcp_flags(), RST | ACK);
    assert_eq!(client.engine.flow_stats().wake_timeouts, 1);
    assert_eq!(asked.lock().len(), 2, "asleep anew: asked again");
}
