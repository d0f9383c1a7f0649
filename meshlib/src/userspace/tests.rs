//! In-process tests of userspace mode (no privileges): two members, each an
//! [`Engine`] on loopback UDP with a [`Stack`] as its device; "instances"
//! are tokio echo servers on 127.0.0.1.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use super::*;
use crate::keys::{PrivateKey, PublicKey};
use crate::wg::{Engine, EngineConfig, PeerConfig};

pub(super) const WAIT: Duration = Duration::from_secs(20);

/// One userspace member.
pub(crate) struct Member {
    pub stack: Arc<Stack>,
    pub engine: Engine,
    pub key: PublicKey,
    pub ip: IpAddr,
}

impl Member {
    pub fn new(ip: &str) -> Self {
        let ip: IpAddr = ip.parse().unwrap();
        let (stack, dev) = Stack::start(StackConfig::new(ip, 22)).unwrap();
        let private = PrivateKey::generate();
        let key = private.public_key();
        let config = EngineConfig {
            listen_port: 0,
            private_key: Some(private),
            fwmark: 0,
            crypto_workers: 0,
        };
        let engine = Engine::start(dev, config).unwrap();
        Self {
            stack: Arc::new(stack),
            engine,
            key,
            ip,
        }
    }

    pub fn add(&self, other: &Member) {
        let endpoint = SocketAddr::from(([127, 0, 0, 1], other.engine.listen_port()));
        self.engine
            .set_peer(PeerConfig {
                public_key: other.key,
                preshared_key: None,
                endpoint: Some(endpoint),
                allowed_ips: vec![ipnet::IpNet::from(other.ip)],
                persistent_keepalive: 0,
            })
            .unwrap();
    }

    /// A local listener relaying to `port` of `other` through the tunnel.
    pub async fn forward(&self, other: &Member, port: u16) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let local = l.local_addr().unwrap();
        let stack = self.stack.clone();
        let dst = SocketAddr::new(other.ip, port);
        tokio::spawn(async move { stack.forward_tcp(l, dst).await });
        local
    }
}

fn pair() -> (Member, Member) {
    let a = Member::new("10.240.0.1");
    let b = Member::new("10.240.0.2");
    a.add(&b);
    b.add(&a);
    (a, b)
}

/// A TCP echo server on 127.0.0.1 (the instance); returns its port.
pub(super) async fn tcp_echo() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    port
}

/// Deterministic test data (a checksum of sorts: every byte is checked).
pub(super) fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0] ^ seed)
        .collect()
}

/// Sends `payload` through `addr`, half-closes, reads the whole echo.
pub(super) async fn echo_through(addr: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let payload = payload.to_vec();
    let writer = tokio::spawn(async move {
        w.write_all(&payload).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    tokio::time::timeout(WAIT, r.read_to_end(&mut back))
        .await
        .expect("echo in time")
        .unwrap();
    writer.await.unwrap();
    back
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_both_ways_through_two_userspace_members() {
    let (a, b) = pair();
    let (echo_a, echo_b) = (tcp_echo().await, tcp_echo().await);
    a.stack.set_inbound_ports([echo_a]);
    b.stack.set_inbound_ports([echo_b]);
    let to_b = a.forward(&b, echo_b).await;
    let to_a = b.forward(&a, echo_a).await;
    let big = data(4 << 20, 1);
    assert!(
        echo_through(to_b, &big).await == big,
        "A -> B, 4 MiB intact"
    );
    let small = data(1000, 2);
    assert_eq!(echo_through(to_a, &small).await, small, "B -> A");
    // Several at once.
    let mut joins = Vec::new();
    for i in 0..4u8 {
        let p = data(200_000, i);
        joins.push(tokio::spawn(
            async move { echo_through(to_b, &p).await == p },
        ));
    }
    for j in joins {
        assert!(j.await.unwrap(), "concurrent stream intact");
    }
    assert_eq!(b.stack.stats().tcp_inbound, 5);
    assert_eq!(a.stack.stats().tcp_outbound, 5);
    assert_eq!(a.stack.stats().tcp_inbound, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_inbound_port_resets_the_connection() {
    let (a, b) = pair();
    // A port nothing listens on: bind and drop.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    b.stack.set_inbound_ports([port]);
    let to_b = a.forward(&b, port).await;
    let mut s = TcpStream::connect(to_b).await.unwrap();
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(WAIT, s.read(&mut buf))
        .await
        .expect("answer");
    assert!(matches!(r, Ok(0) | Err(_)), "closed, got {r:?}");
    assert_eq!(b.stack.stats().tcp_refused, 1);
    assert_eq!(b.stack.stats().tcp_inbound, 0);
    assert_eq!(b.stack.stats().inbound_refused, 0, "a served port");
}

#[test]
fn the_inbound_filter_admits_only_served_ports() {
    let served: BTreeSet<u16> = [8080, 53].into();
    let peer: SocketAddr = "10.240.0.1:40000".parse().unwrap();
    assert_eq!(
        verdict(Some(Opening::Tcp(8080, peer)), &served),
        Verdict::Open
    );
    assert_eq!(verdict(Some(Opening::Udp(53)), &served), Verdict::Open);
    assert_eq!(
        verdict(Some(Opening::Tcp(22, peer)), &served),
        Verdict::Refuse
    );
    assert_eq!(verdict(Some(Opening::Udp(9477)), &served), Verdict::Refuse);
    // Not an opening (data of a connection, or not for us): smoltcp decides.
    assert_eq!(verdict(None, &served), Verdict::Open);
    assert_eq!(
        verdict(Some(Opening::Tcp(8080, peer)), &BTreeSet::new()),
        Verdict::Refuse,
        "nothing served: everything refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_services_the_member_does_not_serve_are_unreachable() {
    let (a, b) = pair();
    // Two services on the host's loopback; B serves only the first.
    let (served, other) = (tcp_echo().await, tcp_echo().await);
    let udp_other = udp_echo().await;
    b.stack.set_inbound_ports([served]);
    let payload = data(1000, 3);
    assert_eq!(
        echo_through(a.forward(&b, served).await, &payload).await,
        payload
    );
    // The other one: reset by B's stack, counted, never connected to.
    let mut s = TcpStream::connect(a.forward(&b, other).await)
        .await
        .unwrap();
    let _ = s.write_all(b"hello").await;
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(WAIT, s.read(&mut buf))
        .await
        .expect("reset in time");
    assert!(matches!(r, Ok(0) | Err(_)), "refused, got {r:?}");
    let stats = b.stack.stats();
    assert!(stats.inbound_refused >= 1, "{stats:?}");
    assert_eq!(
        stats.tcp_inbound, 1,
        "only the served port reached the host"
    );
    assert_eq!(stats.tcp_refused, 0, "the host was never asked");
    // UDP to a port B does not serve: no answer, counted.
    let relay = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let stack = a.stack.clone();
    let dst = SocketAddr::new(b.ip, udp_other);
    tokio::spawn(async move { stack.forward_udp(relay, dst).await });
    let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let before = b.stack.stats().inbound_refused;
    for _ in 0..5 {
        c.send_to(b"ping", relay_addr).await.unwrap();
        let got = tokio::time::timeout(Duration::from_millis(300), c.recv(&mut buf)).await;
        assert!(got.is_err(), "no answer from an unserved UDP port");
    }
    assert!(b.stack.stats().inbound_refused > before);
    assert_eq!(b.stack.stats().udp_flows, 0);
    // Taking the served port away refuses it too; giving it back reopens it.
    b.stack.set_inbound_ports([]);
    let mut s = TcpStream::connect(a.forward(&b, served).await)
        .await
        .unwrap();
    let r = tokio::time::timeout(WAIT, s.read(&mut buf))
        .await
        .expect("reset");
    assert!(matches!(r, Ok(0) | Err(_)), "refused, got {r:?}");
    b.stack.set_inbound_ports([served]);
    assert_eq!(b.stack.inbound_ports(), [served].into());
    assert_eq!(
        echo_through(a.forward(&b, served).await, &payload).await,
        payload
    );
}

/// A UDP echo server on 127.0.0.1; returns its port.
async fn udp_echo() -> u16 {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = s.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            let _ = s.send_to(&buf[..n], from).await;
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_both_ways_with_flows_per_sender() {
    let (a, b) = pair();
    let echo_b = udp_echo().await;
    b.stack.set_inbound_ports([echo_b]);
    let relay = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let stack = a.stack.clone();
    let dst = SocketAddr::new(b.ip, echo_b);
    tokio::spawn(async move { stack.forward_udp(relay, dst).await });
    for client_no in 0..2u8 {
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        c.connect(relay_addr).await.unwrap();
        let mut buf = vec![0u8; 2048];
        for i in 0..5u8 {
            let msg = data(1200, client_no * 10 + i);
            // UDP may lose the first datagrams during the handshake: retry.
            let mut got = None;
            for _ in 0..20 {
                c.send(&msg).await.unwrap();
                if let Ok(Ok(n)) =
                    tokio::time::timeout(Duration::from_millis(500), c.recv(&mut buf)).await
                {
                    got = Some(buf[..n].to_vec());
                    break;
                }
            }
            assert_eq!(got.as_deref(), Some(&msg[..]), "client {client_no} #{i}");
        }
    }
    assert_eq!(a.stack.stats().udp_flows, 2, "one outbound flow per sender");
    assert_eq!(
        b.stack.stats().udp_flows,
        2,
        "one inbound flow per peer port"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_udp_flows_are_closed() {
    let ip: IpAddr = "10.240.0.1".parse().unwrap();
    let mut cfg = StackConfig::new(ip, 22);
    cfg.udp_idle = Duration::from_millis(200);
    let (stack, _dev) = Stack::start(cfg).unwrap();
    let relay = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let stack = Arc::new(stack);
    let s2 = stack.clone();
    tokio::spawn(async move { s2.forward_udp(relay, "10.240.0.2:9".parse().unwrap()).await });
    let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    c.send_to(b"x", relay_addr).await.unwrap();
    let count = || stack.inner.net.lock().sockets.iter().count();
    let deadline = tokio::time::Instant::now() + WAIT;
    while count() == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(count(), 1, "flow socket open");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(count(), 0, "closed after idle");
}

/// An IPv4 TCP packet from `src`:`sport` to `dst`:`dport` with `control`.
fn tcp_packet(
    src: [u8; 4],
    sport: u16,
    dst: [u8; 4],
    dport: u16,
    control: smoltcp::wire::TcpControl,
) -> Vec<u8> {
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{IpProtocol, Ipv4Packet, Ipv4Repr, TcpPacket, TcpRepr};
    let tcp = TcpRepr {
        src_port: sport,
        dst_port: dport,
        control,
        seq_number: smoltcp::wire::TcpSeqNumber(1),
        ack_number: None,
        window_len: 1000,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    let ip = Ipv4Repr {
        src_addr: src.into(),
        dst_addr: dst.into(),
        next_header: IpProtocol::Tcp,
        payload_len: tcp.buffer_len(),
        hop_limit: 64,
    };
    let mut buf = vec![0u8; 20 + tcp.buffer_len()];
    let caps = ChecksumCapabilities::default();
    let mut p = Ipv4Packet::new_unchecked(&mut buf[..]);
    ip.emit(&mut p, &caps);
    let mut t = TcpPacket::new_unchecked(p.payload_mut());
    tcp.emit(&mut t, &ip.src_addr.into(), &ip.dst_addr.into(), &caps);
    buf
}

#[test]
fn openings_are_recognised_only_for_our_address() {
    use smoltcp::wire::TcpControl;
    let me: IpAddr = "10.240.0.2".parse().unwrap();
    let from: SocketAddr = "10.240.0.1:40000".parse().unwrap();
    let syn = |dst, control| tcp_packet([10, 240, 0, 1], 40_000, dst, 8080, control);
    assert_eq!(
        opening(&syn([10, 240, 0, 2], TcpControl::Syn), me),
        Some(Opening::Tcp(8080, from))
    );
    assert_eq!(opening(&syn([10, 240, 0, 3], TcpControl::Syn), me), None);
    assert_eq!(opening(&syn([10, 240, 0, 2], TcpControl::None), me), None);
    assert_eq!(opening(&[0x45, 0, 0], me), None);
    assert_eq!(opening(&[], me), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_syns_open_one_connection() {
    use crate::wg::device::Device as _;
    use smoltcp::wire::TcpControl;
    let port = tcp_echo().await;
    let me: IpAddr = "10.240.0.2".parse().unwrap();
    let mut cfg = StackConfig::new(me, 22);
    cfg.inbound_ports = [port].into();
    let (stack, dev) = Stack::start(cfg).unwrap();
    let syn = tcp_packet(
        [10, 240, 0, 1],
        40_000,
        [10, 240, 0, 2],
        port,
        TcpControl::Syn,
    );
    let other = tcp_packet(
        [10, 240, 0, 1],
        40_001,
        [10, 240, 0, 2],
        port,
        TcpControl::Syn,
    );
    // A placeholder in the socket set's first slot, freed later, so that a
    // listener created afterwards sits before the connection's socket.
    let placeholder = stack.inner.net.lock().sockets.add(Net::tcp_socket(1024));
    // The same SYN twice in one batch, and a SYN of another peer port.
    dev.send_batch(&mut [syn.clone(), syn.clone(), other])
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stack.inner.net.lock().sockets.remove(placeholder);
    // The first SYN again (a retransmission).
    dev.send_batch(&mut [syn]).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let net = stack.inner.net.lock();
    let from = smoltcp::wire::IpEndpoint::from("10.240.0.1:40000".parse::<SocketAddr>().unwrap());
    let sockets: Vec<_> = net
        .sockets
        .iter()
        .filter_map(|(_, s)| match s {
            smoltcp::socket::Socket::Tcp(t) if t.remote_endpoint() == Some(from) => Some(t.state()),
            _ => None,
        })
        .collect();
    assert_eq!(sockets.len(), 1, "one socket for one peer: {sockets:?}");
    assert_eq!(stack.stats().tcp_inbound, 2, "two peers, two relays");
}

/// Proves "no privileges needed": as root, re-runs this module's other
/// tests as `nobody` (a copy of this test binary, via `runuser`). As a
/// non-root user the other tests already prove it, so it skips.
#[test]
fn rootless_subset_passes_as_nobody() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: already not root; the other userspace tests are the proof");
        return;
    }
    let runuser = std::path::Path::new("/usr/sbin/runuser");
    if !runuser.exists() {
        eprintln!("SKIPPED: needs runuser (util-linux) to drop to nobody");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = dir.path().join("meshlib-tests");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = std::process::Command::new(runuser)
        .args(["-u", "nobody", "--"])
        .arg(&exe)
        .args([
            "userspace::",
            "--skip",
            "rootless_subset",
            "--test-threads",
            "2",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "as nobody:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("test userspace::tests::tcp_both_ways_through_two_userspace_members ... ok")
            && text.contains("test userspace::tests::udp_both_ways_with_flows_per_sender ... ok"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_scan_is_bounded_and_real_connections_still_work() {
    let (a, b) = pair();
    let echo_b = tcp_echo().await;
    // B serves 300 ports nothing listens on (the filter would refuse
    // unserved ones before any listener): 300 SYNs to them.
    b.stack.set_inbound_ports((1..=300).chain([echo_b]));
    let mut joins = Vec::new();
    for port in 1..=300u16 {
        let to = a.forward(&b, port).await;
        joins.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(to).await.unwrap();
            let mut buf = [0u8; 1];
            let _ = tokio::time::timeout(WAIT, s.read(&mut buf)).await;
        }));
    }
    for j in joins {
        j.await.unwrap();
    }
    let idle: usize = b
        .stack
        .inner
        .net
        .lock()
        .listeners
        .values()
        .map(Vec::len)
        .sum();
    assert!(idle <= MAX_IDLE_LISTENERS, "{idle} idle listeners");
    let to_b = a.forward(&b, echo_b).await;
    let p = data(10_000, 9);
    assert_eq!(echo_through(to_b, &p).await, p, "still serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_reaches_a_service_on_ipv6_loopback_only() {
    let Ok(l) = TcpListener::bind("[::1]:0").await else {
        eprintln!("SKIPPED: no IPv6 loopback here");
        return;
    };
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        if let Ok((mut s, _)) = l.accept().await {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        }
    });
    let (a, b) = pair();
    b.stack.set_inbound_ports([port]);
    let to_b = a.forward(&b, port).await;
    let p = data(5000, 3);
    assert_eq!(echo_through(to_b, &p).await, p);
}

#[test]
fn a_refused_syn_gets_a_reset_from_its_destination() {
    use smoltcp::wire::{TcpControl, TcpPacket};
    let syn = tcp_packet(
        [10, 240, 0, 1],
        40_000,
        [10, 240, 0, 2],
        8080,
        TcpControl::Syn,
    );
    let rst = reset_reply(&syn).expect("a reset");
    let ip = Ipv4Packet::new_checked(&rst[..]).unwrap();
    assert_eq!(
        ip.src_addr(),
        smoltcp::wire::Ipv4Address::new(10, 240, 0, 2)
    );
    assert_eq!(
        ip.dst_addr(),
        smoltcp::wire::Ipv4Address::new(10, 240, 0, 1)
    );
    assert!(ip.verify_checksum());
    let t = TcpPacket::new_checked(ip.payload()).unwrap();
    assert!(t.rst() && t.ack() && !t.syn());
    assert_eq!((t.src_port(), t.dst_port()), (8080, 40_000));
    assert_eq!(
        t.ack_number(),
        smoltcp::wire::TcpSeqNumber(2),
        "SYN's seq + 1"
    );
    assert!(t.verify_checksum(&ip.src_addr().into(), &ip.dst_addr().into()));
    assert_eq!(reset_reply(&[0x45, 0, 0]), None);
    assert_eq!(reset_reply(&[]), None);
}

/// A connected loopback socket pair.
pub(super) async fn socket_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ours = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (theirs, _) = l.accept().await.unwrap();
    (ours, theirs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_tcp_tells_refused_from_gone_from_connected() {
    let (a, b) = pair();
    let echo = tcp_echo().await;
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    b.stack.set_inbound_ports([echo, closed_port]);
    // Served by B's sidecar but nothing listens: a reset to the SYN, as a
    // kernel would answer, never a connection that resets later.
    let r = a
        .stack
        .open_tcp(SocketAddr::new(b.ip, closed_port), WAIT)
        .await;
    assert!(matches!(r, Err(DialError::Refused)), "{:?}", r.err());
    assert_eq!(b.stack.stats().tcp_refused, 1);
    // Not opened to the tunnel at all: refused as well.
    let r = a.stack.open_tcp(SocketAddr::new(b.ip, 9), WAIT).await;
    assert!(matches!(r, Err(DialError::Refused)), "{:?}", r.err());
    // Nobody there: timed out.
    let nobody = SocketAddr::from(([10, 240, 0, 9], echo));
    let r = a.stack.open_tcp(nobody, Duration::from_millis(300)).await;
    assert!(matches!(r, Err(DialError::TimedOut(_))), "{:?}", r.err());
    // Served: connected, and a local stream relays over it.
    let conn = a
        .stack
        .open_tcp(SocketAddr::new(b.ip, echo), WAIT)
        .await
        .expect("connected");
    let (mut client, relayed) = socket_pair().await;
    let relay = tokio::spawn(conn.relay(relayed));
    let p = data(100_000, 5);
    client.write_all(&p).await.unwrap();
    client.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(WAIT, client.read_to_end(&mut back))
        .await
        .expect("echo")
        .unwrap();
    assert!(back == p, "intact");
    assert!(relay.await.unwrap(), "a clean end");
    assert_eq!(b.stack.stats().tcp_inbound, 1);
}
