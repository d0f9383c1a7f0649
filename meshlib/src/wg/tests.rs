//! In-process engine tests on loopback UDP with an in-memory [`Device`]
//! (no root needed): handshake and data, allowed-IP enforcement, live
//! removal, unknown keys, and the UAPI socket.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::*;
use crate::keys::{PrivateKey, PublicKey};

/// A device whose "kernel side" is a pair of channels.
struct MemDevice {
    inbox: Mutex<mpsc::Receiver<Vec<u8>>>,
    outbox: Mutex<mpsc::Sender<Vec<u8>>>,
    stop: AtomicBool,
    /// The link state the engine sees.
    up: Arc<AtomicBool>,
}

impl Device for MemDevice {
    fn headroom(&self) -> usize {
        0
    }

    fn recv_batch(
        &self,
        _queue: usize,
        _scratch: &mut [u8],
        bufs: &mut [Vec<u8>],
        sizes: &mut [usize],
    ) -> io::Result<usize> {
        let inbox = self.inbox.lock();
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Err(io::ErrorKind::Interrupted.into());
            }
            if let Ok(p) = inbox.recv_timeout(Duration::from_millis(20)) {
                bufs[0][..p.len()].copy_from_slice(&p);
                sizes[0] = p.len();
                // Whatever else is queued comes in the same batch, as a
                // TUN read drains the queue.
                let mut n = 1;
                while n < bufs.len() {
                    let Ok(p) = inbox.try_recv() else { break };
                    bufs[n][..p.len()].copy_from_slice(&p);
                    sizes[n] = p.len();
                    n += 1;
                }
                return Ok(n);
            }
        }
    }

    fn send_batch(&self, bufs: &mut [Vec<u8>]) -> io::Result<()> {
        let out = self.outbox.lock();
        for b in bufs {
            let _ = out.send(b.clone());
        }
        Ok(())
    }

    fn interrupt(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }
}

/// An engine on a loopback port with its device's two ends.
pub(super) struct Node {
    pub(super) engine: Arc<Engine>,
    pub(super) key: PublicKey,
    /// The device's link state (up unless a test takes it down).
    up: Arc<AtomicBool>,
    to_engine: mpsc::Sender<Vec<u8>>,
    from_engine: Mutex<mpsc::Receiver<Vec<u8>>>,
}

impl Node {
    pub(super) fn new() -> Self {
        Self::with_link(true)
    }

    /// An engine with `n` crypto workers.
    pub(super) fn with_workers(n: usize) -> Self {
        Self::build(true, n)
    }

    fn with_link(up: bool) -> Self {
        Self::build(up, 0)
    }

    fn build(up: bool, crypto_workers: usize) -> Self {
        let (to_engine, inbox) = mpsc::channel();
        let (outbox, from_engine) = mpsc::channel();
        let up = Arc::new(AtomicBool::new(up));
        let dev = MemDevice {
            inbox: Mutex::new(inbox),
            outbox: Mutex::new(outbox),
            stop: AtomicBool::new(false),
            up: up.clone(),
        };
        let private = PrivateKey::generate();
        let key = private.public_key();
        let config = EngineConfig {
            listen_port: 0,
            private_key: Some(private),
            fwmark: 0,
            crypto_workers,
        };
        let engine = Arc::new(Engine::start(Arc::new(dev), config).expect("engine"));
        Node {
            engine,
            key,
            up,
            to_engine,
            from_engine: Mutex::new(from_engine),
        }
    }

    fn endpoint(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.engine.listen_port()))
    }

    /// Makes `other` a peer with allowed IP `ip`/32.
    pub(super) fn add(&self, other: &Node, ip: &str) {
        self.engine
            .set_peer(PeerConfig {
                public_key: other.key,
                preshared_key: None,
                endpoint: Some(other.endpoint()),
                allowed_ips: vec![format!("{ip}/32").parse().unwrap()],
                persistent_keepalive: 0,
            })
            .unwrap();
    }

    pub(super) fn send(&self, packet: Vec<u8>) {
        self.to_engine.send(packet).unwrap();
    }

    pub(super) fn recv(&self, wait: Duration) -> Option<Vec<u8>> {
        self.from_engine.lock().recv_timeout(wait).ok()
    }
}

/// An IPv4/UDP packet of `len` bytes from `src` to `dst`.
fn packet(src: [u8; 4], dst: [u8; 4], len: usize, fill: u8) -> Vec<u8> {
    let mut p = vec![fill; len];
    p[0] = 0x45;
    p[1] = 0;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p
}

const A_IP: [u8; 4] = [10, 240, 0, 1];
const B_IP: [u8; 4] = [10, 240, 0, 2];
pub(super) const WAIT: Duration = Duration::from_secs(5);

fn pair() -> (Node, Node) {
    let (a, b) = (Node::new(), Node::new());
    a.add(&b, "10.240.0.2");
    b.add(&a, "10.240.0.1");
    (a, b)
}

#[test]
fn handshake_then_data_both_ways_with_counters() {
    let (a, b) = pair();
    let p = packet(A_IP, B_IP, 1000, 7);
    a.send(p.clone());
    assert_eq!(b.recv(WAIT), Some(p), "A -> B");
    let q = packet(B_IP, A_IP, 60, 9);
    b.send(q.clone());
    assert_eq!(a.recv(WAIT), Some(q), "B -> A");
    let s = a.engine.peer_stats(&b.key).unwrap();
    assert!(s.last_handshake.is_some());
    assert!(s.tx_bytes >= 1000 && s.rx_bytes >= 60, "{s:?}");
    assert_eq!(s.endpoint, Some(b.endpoint()));
    assert_eq!(s.drops, PeerDrops::default());
}

#[test]
fn spoofed_inner_source_is_dropped_and_counted() {
    let (a, b) = pair();
    a.send(packet(A_IP, B_IP, 100, 1));
    assert!(b.recv(WAIT).is_some());
    a.send(packet([10, 240, 0, 9], B_IP, 100, 2));
    assert_eq!(b.recv(Duration::from_millis(500)), None);
    let drops = b.engine.peer_stats(&a.key).unwrap().drops;
    assert_eq!(drops.spoofed_source, 1);
}

#[test]
fn removed_peer_is_refused_at_once_and_others_keep_flowing() {
    let (a, b) = pair();
    let c = Node::new();
    c.add(&b, "10.240.0.2");
    b.add(&c, "10.240.0.3");
    a.send(packet(A_IP, B_IP, 100, 1));
    c.send(packet([10, 240, 0, 3], B_IP, 100, 3));
    assert!(b.recv(WAIT).is_some() && b.recv(WAIT).is_some());
    assert!(b.engine.remove_peer(&a.key));
    a.send(packet(A_IP, B_IP, 100, 4));
    let deadline = Instant::now() + Duration::from_secs(2);
    while b.engine.stats().unknown_index == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(b.engine.stats().unknown_index, 1);
    let q = packet([10, 240, 0, 3], B_IP, 200, 5);
    c.send(q.clone());
    assert_eq!(b.recv(WAIT), Some(q), "C still flows");
    assert!(b.engine.peer_stats(&a.key).is_none());
}

#[test]
fn unknown_key_gets_no_handshake() {
    let (_a, b) = pair();
    let c = Node::new();
    c.add(&b, "10.240.0.2");
    c.send(packet([10, 240, 0, 3], B_IP, 100, 1));
    let deadline = Instant::now() + Duration::from_secs(2);
    while b.engine.stats().unknown_key == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(b.engine.stats().unknown_key >= 1);
    std::thread::sleep(Duration::from_millis(200));
    let s = c.engine.peer_stats(&b.key).unwrap();
    assert_eq!((s.last_handshake, s.rx_bytes), (None, 0));
}

#[test]
fn live_update_of_allowed_ips_and_endpoint() {
    let (a, b) = pair();
    a.send(packet(A_IP, B_IP, 100, 1));
    assert!(b.recv(WAIT).is_some());
    // B now also accepts 10.240.1.0/24 from A (UAPI-style incremental add).
    let change = uapi::PeerChange {
        public_key: a.key,
        remove: false,
        update_only: true,
        preshared_key: None,
        endpoint: None,
        persistent_keepalive: Some(5),
        replace_allowed_ips: false,
        allowed_ips: vec!["10.240.1.0/24".parse().unwrap()],
    };
    b.engine.apply_peer_change(&change).unwrap();
    let p = packet([10, 240, 1, 77], B_IP, 100, 2);
    a.send(p.clone());
    assert_eq!(b.recv(WAIT), Some(p));
    let s = b.engine.peer_stats(&a.key).unwrap();
    assert_eq!(s.persistent_keepalive, 5);
    assert_eq!(s.allowed_ips.len(), 2);
}

fn uapi_exchange(path: &std::path::Path, request: &str) -> String {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let mut out = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap() == 0 {
            break;
        }
        out.push_str(&line);
        if line.starts_with("errno=") {
            break;
        }
    }
    out
}

#[test]
fn uapi_socket_get_set_and_malformed_input() {
    let (a, b) = pair();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.sock");
    let _server = UapiServer::start(b.engine.clone(), &path).unwrap();
    let got = uapi_exchange(&path, "get=1\n\n");
    assert!(
        got.contains(&format!("public_key={}\n", a.key.to_hex())),
        "{got}"
    );
    assert!(got.contains(&format!("listen_port={}\n", b.engine.listen_port())));
    assert!(got.contains("allowed_ip=10.240.0.1/32\n"));
    assert!(got.ends_with("errno=0\n"));

    assert_eq!(
        uapi_exchange(&path, "set=1\nlisten_port=abc\n\n"),
        "errno=-22\n"
    );
    assert_eq!(
        uapi_exchange(&path, "set=1\nallowed_ip=1.2.3.4/32\n\n"),
        "errno=-22\n"
    );
    // `get=1` with more than its empty line: invalid, as for wireguard-go.
    assert_eq!(uapi_exchange(&path, "get=1\nx\n"), "errno=-22\n");
    let k = PrivateKey::generate().public_key();
    let set = format!(
        "set=1\npublic_key={}\nallowed_ip=10.9.0.0/16\n\n",
        k.to_hex()
    );
    assert_eq!(uapi_exchange(&path, &set), "errno=0\n");
    assert_eq!(b.engine.peer_stats(&k).unwrap().allowed_ips.len(), 1);
    let rm = format!("set=1\npublic_key={}\nremove=true\n\n", k.to_hex());
    assert_eq!(uapi_exchange(&path, &rm), "errno=0\n");
    assert!(b.engine.peer_stats(&k).is_none());
    // A second server on a live socket is refused.
    assert!(matches!(
        UapiServer::start(b.engine.clone(), &path),
        Err(uapi_server::UapiServerError::InUse(_))
    ));
}

/// What the server sends to `request` before it closes the connection
/// (`None`: it kept it open for 2 s).
fn uapi_until_closed(path: &std::path::Path, request: &str) -> Option<Vec<u8>> {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).ok().map(|_| got)
}

#[test]
fn uapi_socket_is_0700_and_an_unknown_operation_is_not_answered() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let a = Node::new();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.sock");
    let _server = UapiServer::start(a.engine.clone(), &path).unwrap();
    // As wireguard-go's (bound under umask 077): srwx------.
    let meta = std::fs::metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o700);
    // An unknown operation: the connection is closed, not a byte answered,
    // at once (its body is not waited for), and what follows is ignored.
    for request in ["bogus=1\n\n", "bogus=1\n", "get=2\n\nget=1\n\n", "\n"] {
        assert_eq!(
            uapi_until_closed(&path, request),
            Some(Vec::new()),
            "{request:?}"
        );
    }
    // The server still serves the next connection.
    assert!(uapi_exchange(&path, "get=1\n\n").ends_with("errno=0\n"));
}

#[test]
fn ipv6_underlay_endpoint_works_on_the_dual_stack_socket() {
    let (a, b) = (Node::new(), Node::new());
    let v6 = |n: &Node| SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, n.engine.listen_port()));
    for (me, other, ip) in [(&a, &b, "10.240.0.2/32"), (&b, &a, "10.240.0.1/32")] {
        me.engine
            .set_peer(PeerConfig {
                public_key: other.key,
                preshared_key: None,
                endpoint: Some(v6(other)),
                allowed_ips: vec![ip.parse().unwrap()],
                persistent_keepalive: 0,
            })
            .unwrap();
    }
    let p = packet(A_IP, B_IP, 300, 3);
    a.send(p.clone());
    assert_eq!(b.recv(WAIT), Some(p));
    assert_eq!(b.engine.endpoint(&a.key), Some(v6(&a)));
}

/// Polls `cond` every 10 ms for at most `limit`.
fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

#[test]
fn persistent_keepalive_handshakes_without_traffic() {
    let (a, b) = (Node::new(), Node::new());
    b.add(&a, "10.240.0.1");
    a.engine
        .set_peer(PeerConfig {
            public_key: b.key,
            preshared_key: None,
            endpoint: Some(b.endpoint()),
            allowed_ips: vec!["10.240.0.2/32".parse().unwrap()],
            persistent_keepalive: 1,
        })
        .unwrap();
    assert!(eventually(Duration::from_secs(3), || {
        b.engine
            .peer_stats(&a.key)
            .unwrap()
            .last_handshake
            .is_some()
    }));
    let rx = b.engine.peer_stats(&a.key).unwrap().rx_bytes;
    // Keepalives keep arriving, one a second.
    assert!(eventually(Duration::from_secs(3), || {
        b.engine.peer_stats(&a.key).unwrap().rx_bytes > rx
    }));
    assert_eq!(
        b.recv(Duration::from_millis(50)),
        None,
        "keepalives are not packets"
    );
}

#[test]
fn preshared_key_must_match() {
    let (a, b) = pair();
    let with_psk = |me: &Node, other: &Node, ip: &str, psk: [u8; 32]| {
        me.engine
            .set_peer(PeerConfig {
                public_key: other.key,
                preshared_key: Some(psk),
                endpoint: Some(other.endpoint()),
                allowed_ips: vec![ip.parse().unwrap()],
                persistent_keepalive: 0,
            })
            .unwrap();
    };
    with_psk(&a, &b, "10.240.0.2/32", [5; 32]);
    with_psk(&b, &a, "10.240.0.1/32", [5; 32]);
    let p = packet(A_IP, B_IP, 100, 1);
    a.send(p.clone());
    assert_eq!(b.recv(WAIT), Some(p), "same preshared key");

    let (c, d) = pair();
    with_psk(&c, &d, "10.240.0.2/32", [6; 32]);
    with_psk(&d, &c, "10.240.0.1/32", [7; 32]);
    c.send(packet(A_IP, B_IP, 100, 2));
    assert_eq!(d.recv(Duration::from_millis(800)), None, "different keys");
    assert!(c
        .engine
        .peer_stats(&d.key)
        .unwrap()
        .last_handshake
        .is_none());
}

#[test]
fn garbage_datagrams_are_counted_and_change_nothing() {
    let (a, b) = pair();
    let raw = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut forged_init = [0x5au8; 148];
    forged_init[..4].copy_from_slice(&1u32.to_le_bytes()); // bad mac1
    let mut data = [0u8; 64];
    data[..4].copy_from_slice(&4u32.to_le_bytes()); // unknown receiver index 0
    for d in [&b"x"[..], &[0xff; 40][..], &forged_init[..], &data[..]] {
        raw.send_to(d, b.endpoint()).unwrap();
    }
    assert!(
        eventually(Duration::from_secs(2), || {
            let s = b.engine.stats();
            s.malformed == 3 && s.unknown_index == 1
        }),
        "{:?}",
        b.engine.stats()
    );
    assert_eq!(b.engine.stats().unknown_key, 0, "no DH for a bad mac1");
    // The real peer is unaffected.
    let p = packet(A_IP, B_IP, 100, 1);
    a.send(p.clone());
    assert_eq!(b.recv(WAIT), Some(p));
}

#[test]
fn sync_peers_removes_the_absent_and_keeps_sessions() {
    let (a, b) = pair();
    let c = Node::new();
    b.add(&c, "10.240.0.3");
    a.send(packet(A_IP, B_IP, 100, 1));
    assert!(b.recv(WAIT).is_some());
    let before = b.engine.peer_stats(&a.key).unwrap().last_handshake;
    assert!(before.is_some());
    // A new session would now be at least 30 ms younger.
    std::thread::sleep(Duration::from_millis(30));
    let desired = PeerConfig {
        public_key: a.key,
        preshared_key: None,
        endpoint: None,
        allowed_ips: vec![
            "10.240.0.1/32".parse().unwrap(),
            "10.240.2.0/24".parse().unwrap(),
        ],
        persistent_keepalive: 0,
    };
    b.engine.sync_peers(&[desired]).unwrap();
    let peers = b.engine.peers();
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].public_key, a.key);
    assert_eq!(peers[0].allowed_ips.len(), 2);
    assert_eq!(
        peers[0].endpoint,
        Some(a.endpoint()),
        "roamed endpoint kept"
    );
    let p = packet([10, 240, 2, 5], B_IP, 100, 2);
    a.send(p.clone());
    assert_eq!(b.recv(WAIT), Some(p));
    let after = b.engine.peer_stats(&a.key).unwrap().last_handshake;
    assert_eq!(after, before, "same session");
}

#[test]
fn apply_diff_follows_the_map_and_traffic_flows() {
    use crate::reconcile::{diff, DesiredPeer, DesiredPeers};
    let (a, b) = (Node::new(), Node::new());
    let peer = |endpoint| DesiredPeer {
        public_key: b.key,
        endpoint,
        allowed_ips: vec!["10.240.0.2/32".parse().unwrap()],
        persistent_keepalive: 0,
        candidates: vec![],
    };
    let one: DesiredPeers = [(b.key, peer(Some(b.endpoint())))].into();
    assert!(a
        .engine
        .apply_diff(diff(&DesiredPeers::new(), &one))
        .is_empty());
    b.add(&a, "10.240.0.1");
    let p = packet(A_IP, B_IP, 200, 3);
    a.send(p.clone());
    assert_eq!(
        b.recv(WAIT),
        Some(p),
        "peer added by the diff carries traffic"
    );
    assert_eq!(a.engine.peers().len(), 1);
    // Removal through the diff: gone, and its packets refused.
    assert!(a
        .engine
        .apply_diff(diff(&one, &DesiredPeers::new()))
        .is_empty());
    assert!(a.engine.peers().is_empty());
}

/// A peer `b` of `a` at `endpoint`, with a 1 s persistent keepalive (so `a`
/// starts a handshake by itself).
fn keepalive_peer(a: &Node, b: PublicKey, endpoint: SocketAddr) {
    a.engine
        .set_peer(PeerConfig {
            public_key: b,
            preshared_key: None,
            endpoint: Some(endpoint),
            allowed_ips: vec!["10.240.0.2/32".parse().unwrap()],
            persistent_keepalive: 1,
        })
        .unwrap();
}

#[test]
fn nothing_is_sent_while_the_link_is_down() {
    let a = Node::with_link(false);
    let listener = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    listener
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let b = PrivateKey::generate().public_key();
    keepalive_peer(&a, b, listener.local_addr().unwrap());
    a.send(packet(A_IP, B_IP, 100, 1));
    let mut buf = [0u8; 2048];
    assert!(
        listener.recv(&mut buf).is_err(),
        "a datagram left while the link was down"
    );
    assert!(!a.engine.link_up());
    assert_eq!(a.engine.peer_stats(&b).unwrap().tx_bytes, 0);
    // Up: the keepalive's handshake initiation goes out, and is counted.
    a.up.store(true, Ordering::Relaxed);
    listener
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let n = listener.recv(&mut buf).expect("a handshake once up");
    assert_eq!((n, buf[0]), (148, 1), "a handshake initiation");
    assert!(eventually(Duration::from_secs(2), || {
        a.engine.peer_stats(&b).unwrap().tx_bytes >= 148
    }));
    assert!(a.engine.link_up());
}

#[test]
fn a_handshake_arriving_as_the_link_comes_up_is_answered() {
    // Down: B's first handshake initiation is dropped, and counted.
    let a = Node::with_link(false);
    let (b, c) = (Node::new(), Node::new());
    a.add(&b, "10.240.0.2");
    a.add(&c, "10.240.0.3");
    b.add(&a, "10.240.0.1");
    b.send(packet(B_IP, A_IP, 100, 1));
    assert!(eventually(WAIT, || a.engine.stats().link_down >= 1));
    assert_eq!(a.recv(Duration::from_millis(200)), None);
    // Up, and C's first initiation at once, before the link loop looks
    // again (this device has no link notifications: every 100 ms). It is
    // answered: dropped, C would try again only after 5 s.
    a.up.store(true, Ordering::Relaxed);
    c.add(&a, "10.240.0.1");
    let p = packet([10, 240, 0, 3], A_IP, 100, 2);
    c.send(p.clone());
    assert_eq!(
        a.recv(Duration::from_secs(2)),
        Some(p),
        "first handshake lost"
    );
}

#[test]
fn failed_sends_are_not_counted_as_sent() {
    let a = Node::new();
    let b = PrivateKey::generate().public_key();
    // Port 0 cannot be sent to (EINVAL): every datagram fails.
    keepalive_peer(&a, b, "127.0.0.1:0".parse().unwrap());
    a.send(packet(A_IP, B_IP, 100, 1));
    assert!(eventually(Duration::from_secs(5), || {
        a.engine.stats().send_failed >= 1
    }));
    assert_eq!(a.engine.peer_stats(&b).unwrap().tx_bytes, 0);
    // The same peer at a reachable address: sent and counted.
    let listener = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    keepalive_peer(&a, b, listener.local_addr().unwrap());
    listener
        .set_read_timeout(Some(Duration::from_secs(8)))
        .unwrap();
    let mut buf = [0u8; 2048];
    let n = listener.recv(&mut buf).expect("a datagram");
    assert!(eventually(Duration::from_secs(2), || {
        a.engine.peer_stats(&b).unwrap().tx_bytes >= n as u64
    }));
}

#[test]
fn probes_find_the_direct_path_and_a_stranger_gets_no_answer() {
    use crate::nat::path::Path;
    let (a, b) = pair();
    assert!(a.engine.set_peer_candidates(&b.key, &[b.endpoint()]));
    assert!(b.engine.set_peer_candidates(&a.key, &[a.endpoint()]));
    let direct = eventually(WAIT, || {
        a.engine
            .peer_path(&b.key)
            .is_some_and(|s| s.path == Path::Direct(b.endpoint()) && s.rtt.is_some())
    });
    assert!(direct, "{:?}", a.engine.peer_path(&b.key));
    let p = packet(A_IP, B_IP, 120, 4);
    a.send(p.clone());
    assert_eq!(
        b.recv(WAIT),
        Some(p),
        "probes and WireGuard share the socket"
    );
    // A stranger that has b as a peer probes b: b does not know its key,
    // so nothing comes back, and its path never confirms.
    let c = Node::new();
    c.add(&b, "10.240.0.2");
    assert!(c.engine.set_peer_candidates(&b.key, &[b.endpoint()]));
    std::thread::sleep(Duration::from_secs(3));
    let state = c.engine.peer_path(&b.key).unwrap();
    assert_eq!(state.path, Path::Blind(b.endpoint()), "{state:?}");
    assert_eq!(c.engine.peer_stats(&b.key).unwrap().rx_bytes, 0);
    assert!(b.engine.stats().unknown_key > 0, "counted, not answered");
}

#[test]
fn stun_answers_on_the_wireguard_socket_become_reflexive_addresses() {
    let a = Node::new();
    // A STUN server on loopback (the codec's answer, as any server's).
    let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    server
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let srv = server.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let t = std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while !s.load(Ordering::Relaxed) {
            if let Ok((n, from)) = server.recv_from(&mut buf) {
                if let Some(tx) = crate::nat::stun::parse_request(&buf[..n]) {
                    let resp = crate::nat::stun::binding_response(&tx, from);
                    let _ = server.send_to(&resp, from);
                }
            }
        }
    });
    a.engine.set_stun_servers(vec![srv]);
    let found = eventually(WAIT, || a.engine.reflexive_addrs() == vec![a.endpoint()]);
    stop.store(true, Ordering::Relaxed);
    t.join().unwrap();
    assert!(found, "{:?}", a.engine.reflexive_addrs());
    assert_eq!(
        a.engine.stats().malformed,
        0,
        "the answer was not taken for WireGuard"
    );
    // The candidates a member advertises: local first, then reflexive.
    let local: SocketAddr = "192.0.2.9:51820".parse().unwrap();
    assert_eq!(a.engine.advertise(&[local]), vec![local, a.endpoint()]);
}

/// A managed peer that is removed loses its path state in the transport:
/// probing its candidates stops at once, and the same key added again is
/// unmanaged (its endpoint is the configured one) until it gets
/// candidates again. A probe from it meanwhile is a stranger's.
#[test]
fn a_removed_peer_is_no_longer_probed() {
    let a = Node::new();
    // A "peer" that only counts what reaches its candidate address.
    let sink = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sink.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let candidate = sink.local_addr().unwrap();
    let b = PrivateKey::generate().public_key();
    let config = PeerConfig {
        public_key: b,
        preshared_key: None,
        endpoint: None,
        allowed_ips: vec!["10.240.0.2/32".parse().unwrap()],
        persistent_keepalive: 0,
    };
    a.engine.set_peer(config.clone()).unwrap();
    assert!(a.engine.set_peer_candidates(&b, &[candidate]));
    let mut buf = [0u8; 1500];
    let probed = eventually(WAIT, || {
        sink.recv_from(&mut buf)
            .is_ok_and(|(n, _)| crate::nat::disco::is_disco(&buf[..n]))
    });
    assert!(probed, "the candidate is probed while the peer is managed");
    assert!(a.engine.peer_path(&b).is_some());

    assert!(a.engine.remove_peer(&b));
    assert!(a.engine.peer_path(&b).is_none());
    // What was in flight drains; then nothing comes for 3 s (probes run
    // every tick while a path is not confirmed).
    std::thread::sleep(Duration::from_millis(300));
    while sink.recv_from(&mut buf).is_ok() {}
    let quiet_until = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < quiet_until {
        if let Ok((n, _)) = sink.recv_from(&mut buf) {
            panic!("sent to a removed peer's candidate: {:?}", &buf[..n.min(8)]);
        }
    }
    // Added again without candidates: unmanaged, its configured endpoint.
    let endpoint: SocketAddr = "127.0.0.1:9".parse().unwrap();
    a.engine
        .set_peer(PeerConfig {
            endpoint: Some(endpoint),
            ..config
        })
        .unwrap();
    assert!(a.engine.peer_path(&b).is_none());
    assert_eq!(a.engine.endpoint(&b), Some(endpoint));
}

/// A packet numbered `seq` (in its payload), of a size that varies with it.
fn numbered(src: [u8; 4], dst: [u8; 4], seq: u32) -> Vec<u8> {
    let len = 60 + (seq as usize * 37) % 1340;
    let mut p = packet(src, dst, len, (seq % 251) as u8);
    p[28..32].copy_from_slice(&seq.to_be_bytes());
    p
}

/// Sends `total` numbered packets from `from` to `to` in bursts of
/// `burst` (each burst waited for, so loopback's socket buffer never
/// overflows) and returns what arrived, in arrival order.
fn numbered_bursts(
    from: &Node,
    to: &Node,
    src: [u8; 4],
    dst: [u8; 4],
    total: u32,
    burst: u32,
) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let mut seq = 0;
    while seq < total {
        let end = (seq + burst).min(total);
        for s in seq..end {
            from.send(numbered(src, dst, s));
        }
        for _ in seq..end {
            match to.recv(WAIT) {
                Some(p) => got.push(p),
                None => return got,
            }
        }
        seq = end;
    }
    got
}

#[test]
fn crypto_workers_keep_one_peers_packets_in_order_both_ways() {
    in_order_both_ways(2, 3, true);
}

#[test]
fn packets_read_during_the_handshake_leave_first_and_in_order() {
    // Both sides start at once, so each side's first packets wait in its
    // queue while the handshakes cross: they must not be passed by the
    // packets read once the session is up (without workers as with: a
    // pooled packet loop that found no session let go of the tunnel
    // before queueing the packet, and a session coming up in between
    // sealed it ahead of the queue).
    for workers in [(0, 0), (2, 3), (0, 0), (2, 3)] {
        in_order_both_ways(workers.0, workers.1, false);
    }
}

/// Asserts that `got` holds the packets numbered `0..total` from `src` to
/// `dst`, in order and intact (naming the first misplaced numbers), and
/// returns them.
fn assert_numbered_in_order(
    dir: &str,
    got: &[Vec<u8>],
    src: [u8; 4],
    dst: [u8; 4],
    total: u32,
) -> Vec<Vec<u8>> {
    let want: Vec<_> = (0..total).map(|i| numbered(src, dst, i)).collect();
    assert_eq!(got.len(), want.len(), "{dir}: packets lost");
    let first_bad = got.iter().zip(&want).position(|(g, w)| g != w);
    let seqs: Vec<u32> = got
        .iter()
        .map(|p| u32::from_be_bytes(p[28..32].try_into().unwrap()))
        .collect();
    let around = first_bad.map(|i| &seqs[i.saturating_sub(3)..(i + 8).min(seqs.len())]);
    assert_eq!(
        first_bad, None,
        "{dir}: out of order or changed: {around:?}"
    );
    want
}

/// Packets numbered 0..3000 both ways at once between engines with these
/// crypto workers, every one arriving in order and intact; `warm`: one
/// packet each way first, so the session is up before the flood.
fn in_order_both_ways(workers_a: usize, workers_b: usize, warm: bool) {
    let (a, b) = (Node::with_workers(workers_a), Node::with_workers(workers_b));
    a.add(&b, "10.240.0.2");
    b.add(&a, "10.240.0.1");
    if warm {
        let hello = packet(A_IP, B_IP, 100, 1);
        a.send(hello.clone());
        assert_eq!(b.recv(WAIT), Some(hello));
        let hello = packet(B_IP, A_IP, 100, 2);
        b.send(hello.clone());
        assert_eq!(a.recv(WAIT), Some(hello));
    }
    // Both directions at once, so both sides seal and open in parallel.
    let total = 3000;
    let back = std::thread::scope(|s| {
        let back = s.spawn(|| numbered_bursts(&b, &a, B_IP, A_IP, total, 60));
        let there = numbered_bursts(&a, &b, A_IP, B_IP, total, 60);
        assert_numbered_in_order("A -> B", &there, A_IP, B_IP, total);
        back.join().unwrap()
    });
    let want = assert_numbered_in_order("B -> A", &back, B_IP, A_IP, total);
    // The tunnels' books agree with what moved.
    let s = a.engine.peer_stats(&b.key).unwrap();
    let bytes: u64 = want.iter().map(|p| p.len() as u64).sum();
    assert!(s.rx_bytes >= bytes && s.tx_bytes >= bytes, "{s:?}");
    // Both sides initiated at once: answering B's initiation replaces A's
    // own, so B's answer to A's is refused (at most that one).
    assert_eq!((s.drops.spoofed_source, s.drops.no_endpoint), (0, 0));
    assert!(s.drops.rejected <= 1, "{s:?}");
}

#[test]
fn an_engine_with_crypto_workers_talks_to_one_without_and_drops_spoofs() {
    let (a, b) = (Node::with_workers(2), Node::new());
    a.add(&b, "10.240.0.2");
    b.add(&a, "10.240.0.1");
    let there = numbered_bursts(&a, &b, A_IP, B_IP, 500, 50);
    assert!(
        there
            == (0..500)
                .map(|i| numbered(A_IP, B_IP, i))
                .collect::<Vec<_>>()
    );
    let back = numbered_bursts(&b, &a, B_IP, A_IP, 500, 50);
    assert!(
        back == (0..500)
            .map(|i| numbered(B_IP, A_IP, i))
            .collect::<Vec<_>>()
    );
    // A source outside B's allowed IPs, in a batch of good ones: only it
    // is dropped, and counted, on the pooled side.
    for i in 0..20 {
        let src = if i == 7 { [10, 240, 0, 9] } else { B_IP };
        b.send(numbered(src, A_IP, 1000 + i));
    }
    let mut got = Vec::new();
    while let Some(p) = a.recv(Duration::from_millis(500)) {
        got.push(p);
    }
    let want: Vec<_> = (0..20u32)
        .filter(|&i| i != 7)
        .map(|i| numbered(B_IP, A_IP, 1000 + i))
        .collect();
    assert!(got == want, "{} of {} arrived", got.len(), want.len());
    assert_eq!(a.engine.peer_stats(&b.key).unwrap().drops.spoofed_source, 1);
}

#[test]
fn an_engine_with_crypto_workers_stops_cleanly_under_traffic() {
    let (a, b) = (Node::with_workers(2), Node::with_workers(2));
    a.add(&b, "10.240.0.2");
    b.add(&a, "10.240.0.1");
    a.send(packet(A_IP, B_IP, 100, 1));
    assert!(b.recv(WAIT).is_some());
    for i in 0..2000 {
        a.send(numbered(A_IP, B_IP, i));
    }
    let started = Instant::now();
    a.engine.shutdown();
    b.engine.shutdown();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}
