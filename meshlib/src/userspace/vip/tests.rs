//! Service addresses in userspace mode, in process: a client member and
//! three instances of `api`, each an engine on loopback UDP with its own
//! stack; each instance's "application" is an echo server on an ephemeral
//! loopback port (the stack's inbound target for the service port), which
//! counts the connections it accepted and those that ended.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use super::*;
use crate::ids::NetworkId;
use crate::netmap::{Member as MapMember, MemberState, ServiceAddress};
use crate::traffic::TrafficReport;
use crate::userspace::tests::{data, echo_through, Member, WAIT};

/// The service address of `api`.
const API: Ipv4Addr = Ipv4Addr::new(10, 240, 4, 1);

/// An instance's application: a TCP echo server counting connections.
#[derive(Clone, Default)]
struct Counts {
    accepted: Arc<AtomicUsize>,
    ended: Arc<AtomicUsize>,
}

async fn counting_echo() -> (SocketAddr, Counts) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let counts = Counts::default();
    let c = counts.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            c.accepted.fetch_add(1, Relaxed);
            let c = c.clone();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
                c.ended.fetch_add(1, Relaxed);
            });
        }
    });
    (addr, counts)
}

/// A UDP echo server answering with its `tag` then the datagram.
async fn tagged_udp_echo(tag: u8) -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = s.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            let mut out = vec![tag];
            out.extend_from_slice(&buf[..n]);
            let _ = s.send_to(&out, from).await;
        }
    });
    addr
}

/// The client, the instances of `api`, and the map that names them.
struct Setup {
    /// Second octet of the client's loopback addresses (one per test).
    octet: u8,
    /// The port `api` serves, on its address and on its instances (inside
    /// the stacks; on the host only the address's loopback listener binds
    /// it): a free one, as tests run in parallel (and again as `nobody`).
    port: u16,
    client: Member,
    api: Vec<Member>,
    counts: Vec<Counts>,
    map: NetworkMap,
}

fn map_member(m: &Member, service: &str, index: u32, port: u16) -> MapMember {
    let IpAddr::V4(ip) = m.ip else { unreachable!() };
    MapMember {
        public_key: m.key,
        ip,
        endpoints: vec![],
        service: service.into(),
        app_id: service.parse().unwrap(),
        process_type: Default::default(),
        index,
        instance: format!("{service}-{index}").parse().unwrap(),
        runner: "r".into(),
        ports: vec![port],
        state: MemberState::Online,
    }
}

/// A port free for TCP and UDP on `ip`.
fn free_port(ip: Ipv4Addr) -> u16 {
    for _ in 0..100 {
        let t = std::net::TcpListener::bind((ip, 0)).unwrap();
        let port = t.local_addr().unwrap().port();
        if std::net::UdpSocket::bind((ip, port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on {ip}");
}

impl Setup {
    /// `n` instances of `api` and a client, all peers of each other; the
    /// client's loopback addresses in `127.<octet>/16`.
    async fn new(n: u8, octet: u8) -> Self {
        let port = free_port(loopback_in(octet, IpAddr::V4(API)));
        let client = Member::new("10.240.0.1");
        let mut map = NetworkMap::new(NetworkId::random(), "t", crate::ipam::DEFAULT_RANGE);
        map.members
            .insert(client.key, map_member(&client, "client", 1, port));
        let (mut api, mut counts) = (Vec::new(), Vec::new());
        for i in 0..n {
            let m = Member::new(&format!("10.240.0.{}", 2 + i));
            let (echo, c) = counting_echo().await;
            m.stack.set_inbound_ports([port]);
            m.stack.set_inbound_target(port, Some(echo));
            m.add(&client);
            client.add(&m);
            map.members
                .insert(m.key, map_member(&m, "api", u32::from(i) + 1, port));
            api.push(m);
            counts.push(c);
        }
        map.addresses.insert(
            "api".into(),
            ServiceAddress {
                service: "api".into(),
                ip: API,
                wake_timeout_secs: None,
                ports: vec![],
            },
        );
        Self {
            octet,
            port,
            client,
            api,
            counts,
            map,
        }
    }

    /// The client's service plane, applied.
    fn plane(&self, dial_timeout: Duration) -> ServicePlane {
        let mut cfg = VipConfig::new(self.octet);
        cfg.dial_timeout = dial_timeout;
        let mut plane = ServicePlane::new(self.client.stack.clone(), cfg);
        plane.apply(&self.map, self.own());
        plane
    }

    fn own(&self) -> Ipv4Addr {
        let IpAddr::V4(ip) = self.client.ip else {
            unreachable!()
        };
        ip
    }

    fn accepted(&self) -> Vec<usize> {
        self.counts
            .iter()
            .map(|c| c.accepted.load(Relaxed))
            .collect()
    }

    /// The map's entry of instance `i`.
    fn entry(&mut self, i: usize) -> &mut MapMember {
        let key = self.api[i].key;
        self.map.members.get_mut(&key).unwrap()
    }
}

impl Setup {
    /// The loopback address standing for `api`'s service address.
    fn vip(&self) -> SocketAddr {
        SocketAddr::new(
            IpAddr::V4(loopback_in(self.octet, IpAddr::V4(API))),
            self.port,
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_spread_evenly_over_three_instances() {
    let s = Setup::new(3, 201).await;
    let _plane = s.plane(Duration::from_secs(3));
    let to = s.vip();
    // 300 connections, 6 at a time, each an echo of its own payload.
    let mut left = 300usize;
    while left > 0 {
        let batch = left.min(6);
        left -= batch;
        let joins: Vec<_> = (0..batch)
            .map(|i| {
                tokio::spawn(async move {
                    let p = data(2000, i as u8);
                    echo_through(to, &p).await == p
                })
            })
            .collect();
        for j in joins {
            assert!(j.await.unwrap(), "echo intact");
        }
    }
    let got = s.accepted();
    assert_eq!(got.iter().sum::<usize>(), 300, "{got:?}");
    for n in &got {
        assert!((80..=120).contains(n), "within ±20 % of 100: {got:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_and_vanished_instances_are_skipped_transparently() {
    let mut s = Setup::new(3, 202).await;
    // Instance 2 still announces the port but nothing listens there any
    // more: its stack answers the SYN with a reset.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed_at = closed.local_addr().unwrap();
    drop(closed);
    s.api[1].stack.set_inbound_target(s.port, Some(closed_at));
    // Instance 3's host vanished (its engine is gone): no answer at all.
    let gone = s.api.pop().unwrap();
    drop(gone);
    s.counts.pop();
    let plane = s.plane(Duration::from_millis(400));
    for i in 0..20u8 {
        let p = data(3000, i);
        assert_eq!(echo_through(s.vip(), &p).await, p, "connection {i} served");
    }
    assert_eq!(s.accepted(), [20, 0], "only the healthy instance served");
    assert!(s.api[1].stack.stats().tcp_refused >= 1);
    // A relay ends just after its client saw the end.
    assert!(
        eventually(|| plane.relayed(s.vip()) == 0).await,
        "every relay finished"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_long_stream_stays_on_one_instance_intact() {
    let s = Setup::new(3, 203).await;
    let _plane = s.plane(Duration::from_secs(3));
    let payload = data(32 << 20, 7);
    let want = Sha256::digest(&payload);
    let back = echo_through(s.vip(), &payload).await;
    assert_eq!(back.len(), payload.len());
    assert!(Sha256::digest(&back) == want, "SHA-256 intact");
    let got = s.accepted();
    assert_eq!(got.iter().sum::<usize>(), 1, "{got:?}");
}

/// Opens a connection through `to` and checks it echoes.
async fn open_echoing(to: SocketAddr) -> TcpStream {
    let mut c = TcpStream::connect(to).await.unwrap();
    c.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(WAIT, c.read_exact(&mut buf))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(&buf, b"ping");
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_leaving_gets_no_new_connections_and_its_open_ones_end() {
    let mut s = Setup::new(3, 204).await;
    let mut plane = s.plane(Duration::from_secs(3));
    let to = s.vip();
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(open_echoing(to).await);
    }
    assert_eq!(s.accepted(), [1, 1, 1]);
    assert_eq!(plane.relayed(to), 3);
    // Instance 1 goes offline (the same for a removal or a key change).
    s.entry(0).state = MemberState::Offline;
    plane.apply(&s.map, s.own());
    // Its connection ends at once, with a reset, both ways; not a hang.
    let mut buf = [0u8; 4];
    let r = tokio::time::timeout(Duration::from_secs(5), open[0].read(&mut buf))
        .await
        .expect("ended, not hanging");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while s.counts[0].ended.load(Relaxed) == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        s.counts[0].ended.load(Relaxed),
        1,
        "the instance side ended too"
    );
    // The others are untouched.
    for c in &mut open[1..] {
        c.write_all(b"pong").await.unwrap();
        tokio::time::timeout(WAIT, c.read_exact(&mut buf))
            .await
            .expect("still echoing")
            .unwrap();
        assert_eq!(&buf, b"pong");
    }
    // New connections avoid it.
    for i in 0..30u8 {
        let p = data(500, i);
        assert_eq!(echo_through(to, &p).await, p);
    }
    let got = s.accepted();
    assert_eq!(got[0], 1, "none to the instance that left: {got:?}");
    assert_eq!(got[1] + got[2], 32);
    // Removed from the map entirely: the listener stays for the others.
    let key = s.api[1].key;
    s.map.members.remove(&key);
    plane.apply(&s.map, s.own());
    let r = tokio::time::timeout(Duration::from_secs(5), open[1].read(&mut buf))
        .await
        .expect("ended, not hanging");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    assert_eq!(echo_through(to, b"x").await, b"x");
    assert_eq!(plane.listening(), [to]);
}

/// Whether a connection to `to` is refused (reset at connect, or closed
/// before any byte) within `limit`.
async fn refused(to: SocketAddr, limit: Duration) -> bool {
    let attempt = async {
        let Ok(mut c) = TcpStream::connect(to).await else {
            return true;
        };
        let mut buf = [0u8; 1];
        matches!(c.read(&mut buf).await, Ok(0) | Err(_))
    };
    tokio::time::timeout(limit, attempt).await.unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_instance_refuses_at_once_and_a_wakeable_address_holds() {
    let mut s = Setup::new(1, 205).await;
    s.entry(0).state = MemberState::Offline;
    let mut plane = s.plane(Duration::from_secs(3));
    assert_eq!(plane.listening(), [s.vip()], "offline instances' ports");
    // Not wakeable: closed at once.
    let started = std::time::Instant::now();
    assert!(refused(s.vip(), Duration::from_secs(2)).await);
    assert!(started.elapsed() < Duration::from_secs(1));
    // Wakeable: held until the instance comes, then served.
    let woken = Arc::new(AtomicUsize::new(0));
    let w = woken.clone();
    plane.set_wake_hook(Arc::new(move |service| {
        assert_eq!(service, "api");
        w.fetch_add(1, Relaxed);
    }));
    s.map.addresses.get_mut("api").unwrap().wake_timeout_secs = Some(10);
    plane.apply(&s.map, s.own());
    let to = s.vip();
    let held = tokio::spawn(async move { echo_through(to, b"held").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(woken.load(Relaxed), 1, "one wake for one held connection");
    s.entry(0).state = MemberState::Online;
    plane.apply(&s.map, s.own());
    assert_eq!(held.await.unwrap(), b"held");
    // Past the wake timeout: closed, not left hanging.
    s.entry(0).state = MemberState::Offline;
    s.map.addresses.get_mut("api").unwrap().wake_timeout_secs = Some(1);
    plane.apply(&s.map, s.own());
    let started = std::time::Instant::now();
    assert!(refused(s.vip(), Duration::from_secs(5)).await);
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(900), "{waited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_senders_are_pinned_and_spread() {
    let mut s = Setup::new(2, 206).await;
    for (i, m) in s.api.iter().enumerate() {
        let echo = tagged_udp_echo(i as u8).await;
        m.stack.set_inbound_target(s.port, Some(echo));
    }
    let mut plane = s.plane(Duration::from_secs(3));
    let mut tags = BTreeMap::new();
    for sender in 0..4u8 {
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        c.connect(s.vip()).await.unwrap();
        let mut seen = Vec::new();
        for i in 0..5u8 {
            let msg = data(800, sender * 10 + i);
            let mut buf = vec![0u8; 2048];
            // The first datagrams may meet a WireGuard handshake: retried.
            let mut got = None;
            for _ in 0..20 {
                c.send(&msg).await.unwrap();
                if let Ok(Ok(n)) =
                    tokio::time::timeout(Duration::from_millis(300), c.recv(&mut buf)).await
                {
                    got = Some(buf[..n].to_vec());
                    break;
                }
            }
            let got = got.expect("an answer");
            assert_eq!(&got[1..], &msg[..]);
            seen.push(got[0]);
        }
        seen.dedup();
        assert_eq!(seen.len(), 1, "sender {sender} pinned to one instance");
        *tags.entry(seen[0]).or_insert(0) += 1;
    }
    assert_eq!(tags.into_values().collect::<Vec<_>>(), [2, 2], "spread");
    assert_eq!(plane.relayed(s.vip()), 4, "four flows");
    // An instance leaving ends its flows.
    s.entry(0).state = MemberState::Offline;
    plane.apply(&s.map, s.own());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while plane.relayed(s.vip()) != 2 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(plane.relayed(s.vip()), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn this_member_is_an_instance_too() {
    // The client is itself an `api` instance: its share of connections is
    // served on the host.
    let mut s = Setup::new(1, 207).await;
    let (echo, own_counts) = counting_echo().await;
    s.client.stack.set_inbound_target(s.port, Some(echo));
    let key = s.client.key;
    let me = s.map.members.get_mut(&key).unwrap();
    me.service = "api".into();
    me.instance = "api-9".parse().unwrap();
    me.ports = vec![s.port];
    let plane = s.plane(Duration::from_secs(3));
    for i in 0..10u8 {
        let p = data(100, i);
        assert_eq!(echo_through(s.vip(), &p).await, p);
        // A connection's slot is freed just after its client saw the end:
        // the next one starts once it is, so it finds both instances idle.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while plane.relayed(s.vip()) != 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    // In turn.
    let own = own_counts.accepted.load(Relaxed);
    assert_eq!(own + s.accepted()[0], 10);
    assert!((3..=7).contains(&own), "{own}");
}

/// Waits until `f` holds, at most 5 s.
async fn eventually(mut f: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !f() {
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_is_counted_per_destination_service() {
    let s = Setup::new(1, 208).await;
    let plane = s.plane(Duration::from_secs(3));
    assert_eq!(plane.traffic(), TrafficReport::default(), "nothing yet");
    for i in 0..3u8 {
        let p = data(1000, i);
        assert_eq!(echo_through(s.vip(), &p).await, p);
    }
    let report = plane.traffic();
    assert_eq!(report.check(), Ok(()));
    assert_eq!(report.pairs.len(), 1);
    let c = *report.get("api").unwrap();
    assert_eq!((c.opened, c.refused, c.held, c.connect_count), (3, 0, 0, 3));
    assert_eq!(c.connect_buckets.iter().sum::<u64>(), 3);
    // The relay's last bytes are counted as it ends, just after the client
    // saw them.
    assert!(
        eventually(|| {
            let c = *plane.traffic().get("api").unwrap();
            (c.bytes_sent, c.bytes_received, c.active) == (3000, 3000, 0)
        })
        .await,
        "{:?}",
        plane.traffic()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_connections_are_bounded_per_service_and_reset_after_the_timeout() {
    let mut s = Setup::new(1, 209).await;
    s.entry(0).state = MemberState::Offline;
    s.map.addresses.get_mut("api").unwrap().wake_timeout_secs = Some(2);
    let plane = s.plane(Duration::from_secs(3));
    let woken = Arc::new(AtomicUsize::new(0));
    let w = woken.clone();
    plane.set_wake_hook(Arc::new(move |_| {
        w.fetch_add(1, Relaxed);
    }));
    // More connections than the budget: the budget's worth is held, the
    // rest reset at once.
    let n = MAX_HELD_PER_SERVICE + 20;
    let mut conns = Vec::new();
    for _ in 0..n {
        // A refusal may come before the connect returns (then its error).
        if let Ok(c) = TcpStream::connect(s.vip()).await {
            conns.push(c);
        }
    }
    assert!(conns.len() >= MAX_HELD_PER_SERVICE);
    assert!(
        eventually(|| plane.traffic().get("api").is_some_and(|c| c.refused == 20)).await,
        "{:?}",
        plane.traffic()
    );
    assert_eq!(plane.held("api"), MAX_HELD_PER_SERVICE);
    // The hook is asked only while a connection is first held (the node
    // dedups further).
    assert!(woken.load(Relaxed) >= 1);
    // Past the wake timeout: every held connection is reset, none hangs.
    let started = std::time::Instant::now();
    for mut c in conns {
        let mut buf = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await;
        assert!(matches!(r, Ok(Ok(0) | Err(_))), "{r:?}");
    }
    assert!(started.elapsed() < Duration::from_secs(4));
    assert!(eventually(|| plane.held("api") == 0).await);
    let c = *plane.traffic().get("api").unwrap();
    assert_eq!(c.held, MAX_HELD_PER_SERVICE as u64);
    assert_eq!(c.refused, n as u64);
    assert_eq!((c.opened, c.active), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_datagrams_are_held_for_a_wake_then_sent_in_order() {
    let mut s = Setup::new(1, 210).await;
    let echo = tagged_udp_echo(7).await;
    s.api[0].stack.set_inbound_target(s.port, Some(echo));
    s.entry(0).state = MemberState::Offline;
    s.map.addresses.get_mut("api").unwrap().wake_timeout_secs = Some(10);
    let mut plane = s.plane(Duration::from_secs(3));
    let woken = Arc::new(AtomicUsize::new(0));
    let w = woken.clone();
    plane.set_wake_hook(Arc::new(move |service| {
        assert_eq!(service, "api");
        w.fetch_add(1, Relaxed);
    }));
    let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    c.connect(s.vip()).await.unwrap();
    // Six datagrams: the first four are held (the bound), the rest dropped.
    for i in 0..6u8 {
        c.send(&[i; 100]).await.unwrap();
    }
    assert!(eventually(|| plane.held("api") == 1).await);
    // The hold is counted just before the wake is asked for (another
    // thread): wait for the wake, then check it stays one.
    assert!(eventually(|| woken.load(Relaxed) >= 1).await);
    // The plane holds the sender from its first datagram on; give it time
    // to read the other five (loopback queued them all at once) before the
    // instance comes online, or the last two would find it online.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(woken.load(Relaxed), 1, "one wake for the held sender");
    s.entry(0).state = MemberState::Online;
    plane.apply(&s.map, s.own());
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(3), c.recv(&mut buf)).await {
        assert_eq!((n, buf[0]), (101, 7));
        got.push(buf[1]);
        if got.len() == 6 {
            break;
        }
    }
    // The held ones arrive, in order (a first datagram through the tunnel
    // may meet the WireGuard handshake: smoltcp queues it meanwhile).
    assert_eq!(got, [0, 1, 2, 3], "held datagrams in order");
    assert_eq!(plane.held("api"), 0);
    let t = *plane.traffic().get("api").unwrap();
    assert_eq!((t.held, t.opened, t.refused, t.active), (1, 1, 0, 1));
    assert_eq!((t.bytes_sent, t.bytes_received), (400, 404));
    assert_eq!(t.connect_count, 1);

    // With no instance coming, a held sender is forgotten after the
    // timeout: its datagrams dropped, the flow refused.
    s.entry(0).state = MemberState::Offline;
    s.map.addresses.get_mut("api").unwrap().wake_timeout_secs = Some(1);
    plane.apply(&s.map, s.own());
    let c2 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    c2.connect(s.vip()).await.unwrap();
    c2.send(b"late").await.unwrap();
    assert!(eventually(|| plane.held("api") == 1).await);
    assert!(eventually(|| plane.held("api") == 0).await);
    let t = *plane.traffic().get("api").unwrap();
    assert_eq!((t.held, t.refused), (2, 1));
    let r = tokio::time::timeout(Duration::from_millis(300), c2.recv(&mut buf)).await;
    assert!(r.is_err() || r.unwrap().is_err(), "nothing answered");
}

fn plan_member(n: u8, service: &str, ports: Vec<u16>, web: bool, online: bool) -> MapMember {
    MapMember {
        public_key: crate::keys::PrivateKey::generate().public_key(),
        ip: Ipv4Addr::new(10, 240, 0, n),
        endpoints: vec![],
        service: service.into(),
        app_id: service.parse().unwrap(),
        process_type: if web {
            Default::default()
        } else {
            "worker".parse().unwrap()
        },
        index: u32::from(n),
        instance: format!("{service}-{n}").parse().unwrap(),
        runner: "r".into(),
        ports,
        state: if online {
            MemberState::Online
        } else {
            MemberState::Offline
        },
    }
}

#[test]
fn the_plan_follows_ports_health_and_roles() {
    let mut map = NetworkMap::new(NetworkId::random(), "t", crate::ipam::DEFAULT_RANGE);
    let members = [
        plan_member(1, "api", vec![80, 81], true, true),
        plan_member(2, "api", vec![80], true, true),
        plan_member(3, "api", vec![], true, true),
        plan_member(4, "api", vec![90], true, false),
        plan_member(5, "api", vec![80], false, true),
        plan_member(6, "db", vec![5432], false, true),
    ];
    for m in &members {
        map.members.insert(m.public_key, m.clone());
    }
    for (service, last, wake) in [("api", 1, None), ("db", 2, Some(30))] {
        map.addresses.insert(
            service.into(),
            ServiceAddress {
                service: service.into(),
                ip: Ipv4Addr::new(10, 240, 4, last),
                wake_timeout_secs: wake,
                ports: vec![],
            },
        );
    }
    let own = Ipv4Addr::new(10, 240, 0, 2);
    let p = plan(&map, own, 77);
    let names = |port: SocketAddr| -> Vec<String> {
        p[&port]
            .backends
            .iter()
            .map(|b| b.instance.to_string())
            .collect()
    };
    let at = |c, d, port| SocketAddr::from(([127, 77, c, d], port));
    // Every port an instance announces (the offline one's too; the worker's
    // 80 is already there), on 127.77.4.1; db on 127.77.4.2.
    assert_eq!(
        p.keys().copied().collect::<Vec<_>>(),
        [at(4, 1, 80), at(4, 1, 81), at(4, 1, 90), at(4, 2, 5432)]
    );
    // Web members only (api has some); by port; "no ports" serves any.
    assert_eq!(names(at(4, 1, 80)), ["api-1", "api-2", "api-3"]);
    assert_eq!(names(at(4, 1, 81)), ["api-1", "api-3"]);
    assert_eq!(
        names(at(4, 1, 90)),
        ["api-3"],
        "the offline one is no backend"
    );
    assert!(
        p[&at(4, 1, 80)].backends[1].local,
        "this member, on the host"
    );
    assert!(!p[&at(4, 1, 80)].backends[0].local);
    assert_eq!(p[&at(4, 1, 80)].members.len(), 3);
    // A service without web members balances over all of them.
    assert_eq!(names(at(4, 2, 5432)), ["db-6"]);
    assert_eq!(
        p[&at(4, 2, 5432)].wake_timeout,
        Some(Duration::from_secs(30))
    );
    assert_eq!(p[&at(4, 1, 80)].wake_timeout, None);
    // No address in the map: no listener.
    map.addresses.clear();
    assert!(plan(&map, own, 77).is_empty());
}

#[test]
fn a_service_keeps_its_ports_after_its_instances_left_the_map() {
    let mut map = NetworkMap::new(NetworkId::random(), "t", crate::ipam::DEFAULT_RANGE);
    let m = plan_member(1, "api", vec![80, 81], true, true);
    map.members.insert(m.public_key, m.clone());
    map.addresses.insert(
        "api".into(),
        ServiceAddress {
            service: "api".into(),
            ip: Ipv4Addr::new(10, 240, 4, 1),
            wake_timeout_secs: Some(30),
            ports: vec![],
        },
    );
    let own = Ipv4Addr::new(10, 240, 0, 9);
    let mut seen = HashMap::new();
    assert_eq!(plan_remembering(&map, own, 77, &mut seen).len(), 2);
    // The ephemeral instance stopped and was removed: the address still
    // listens on its ports (held for a wake), with no backend.
    map.members.clear();
    let p = plan_remembering(&map, own, 77, &mut seen);
    assert_eq!(p.len(), 2);
    assert!(p.values().all(|p| p.backends.is_empty()));
    assert!(plan(&map, own, 77).is_empty(), "plan alone knows no port");
    // The address gone: forgotten.
    map.addresses.clear();
    assert!(plan_remembering(&map, own, 77, &mut seen).is_empty());
    assert!(seen.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_connection_waits_out_a_woken_instance_still_starting() {
    let mut s = Setup::new(1, 211).await;
    // The woken instance's application does not listen yet.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed_at = closed.local_addr().unwrap();
    drop(closed);
    let (echo, counts) = counting_echo().await;
    s.api[0].stack.set_inbound_target(s.port, Some(closed_at));
    s.entry(0).state = MemberState::Offline;
    s.map.addresses.get_mut("api").unwrap().wake_timeout_secs = Some(10);
    let mut plane = s.plane(Duration::from_secs(3));
    let to = s.vip();
    let held = tokio::spawn(async move { echo_through(to, b"late").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(plane.held("api"), 1);
    // Woken: online, but refusing for a while.
    s.entry(0).state = MemberState::Online;
    plane.apply(&s.map, s.own());
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!held.is_finished(), "still held while the instance refuses");
    let listening = std::time::Instant::now();
    s.api[0].stack.set_inbound_target(s.port, Some(echo));
    assert_eq!(held.await.unwrap(), b"late");
    let after = listening.elapsed();
    assert!(after < Duration::from_millis(700), "served soon: {after:?}");
    assert_eq!(counts.accepted.load(Relaxed), 1);
    let t = *plane.traffic().get("api").unwrap();
    assert_eq!((t.held, t.opened, t.refused), (1, 1, 0));
    assert!(
        t.connect_micros >= 800_000,
        "the wake is in the connect time"
    );
}

#[test]
fn a_sidecar_started_while_the_service_sleeps_listens_on_the_address_ports() {
    // No member of `api` in the map (its ephemeral instances are gone), but
    // its address remembers the ports: a plane that never saw an instance
    // listens on them, with no backend (a wakeable address holds there).
    let mut map = NetworkMap::new(NetworkId::random(), "t", crate::ipam::DEFAULT_RANGE);
    map.addresses.insert(
        "api".into(),
        ServiceAddress {
            service: "api".into(),
            ip: Ipv4Addr::new(10, 240, 4, 1),
            wake_timeout_secs: Some(30),
            ports: vec![80, 443],
        },
    );
    let own = Ipv4Addr::new(10, 240, 0, 9);
    let p = plan(&map, own, 77);
    let listens: Vec<SocketAddr> = p.keys().copied().collect();
    assert_eq!(
        listens,
        vec![
            "127.77.4.1:80".parse().unwrap(),
            "127.77.4.1:443".parse().unwrap()
        ]
    );
    assert!(p
        .values()
        .all(|p| p.backends.is_empty() && p.wake_timeout.is_some()));
}
