//! Network-namespace topologies for the data-plane tests: hosts on one
//! bridged underlay (192.0.2.0/24), overlay 10.240.0.0/22 inside them only.
//! Everything created is removed by `Drop`, also when a test panics.

#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Our implementation: `sidecar wg`, built into the root package.
pub const OURS: &str = env!("CARGO_BIN_EXE_ist-wg");

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Why the tests cannot run here, if they cannot.
pub fn skip_reason() -> Option<&'static str> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (network namespaces, TUN)");
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("needs /dev/net/tun");
    }
    for tool in ["/usr/bin/wireguard-go", "/usr/bin/wg", "/usr/bin/ping"] {
        if !Path::new(tool).exists() {
            return Some("needs wireguard-go, wg and ping from Debian");
        }
    }
    None
}

/// Skips the calling test (visibly) when it cannot run here.
#[macro_export]
macro_rules! require_netns {
    () => {
        if let Some(why) = dataplane_support::skip_reason() {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
}

/// Which implementation runs an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Impl {
    /// `sidecar wg -f` (as `ist-wg -f`).
    Ours,
    /// Debian's `wireguard-go -f`.
    WireguardGo,
}

/// One host: its namespace, interface name and addresses.
#[derive(Clone, Debug)]
pub struct Host {
    pub ns: String,
    pub ifname: String,
    pub underlay: String,
    pub overlay: String,
    pub private_key: String,
    pub public_key: String,
    pub key_file: PathBuf,
}

/// A topology: a hub namespace with a bridge, and hosts attached to it.
pub struct Topo {
    pub tag: String,
    hub: String,
    namespaces: Vec<String>,
    children: Vec<Child>,
    sockets: Vec<PathBuf>,
    dir: tempfile::TempDir,
}

/// Runs a command, returning its output (never panics on failure status).
pub fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"))
}

/// Runs a command that must succeed.
pub fn must(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Topo {
    /// A new empty topology with names unique to this process and call.
    pub fn new() -> Self {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let tag = format!(
            "{}{}",
            std::process::id() % 100_000,
            (b'a' + n as u8) as char
        );
        let hub = format!("dp{tag}hub");
        must("ip", &["netns", "add", &hub]);
        let topo = Topo {
            tag,
            hub: hub.clone(),
            namespaces: vec![hub.clone()],
            children: Vec::new(),
            sockets: Vec::new(),
            dir: tempfile::tempdir().expect("tempdir"),
        };
        must("ip", &["-n", &hub, "link", "add", "br0", "type", "bridge"]);
        must("ip", &["-n", &hub, "link", "set", "br0", "up"]);
        topo
    }

    /// Adds host `i` (1..=9): namespace, veth to the hub, underlay address
    /// 192.0.2.1i, and a fresh key pair (private key file mode 0600).
    pub fn host(&mut self, i: u8) -> Host {
        let ns = format!("dp{}h{i}", self.tag);
        must("ip", &["netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        let (v, b) = (format!("v{}{i}", self.tag), format!("b{}{i}", self.tag));
        must(
            "ip",
            &[
                "link", "add", &v, "netns", &ns, "type", "veth", "peer", "name", &b, "netns",
                &self.hub,
            ],
        );
        must(
            "ip",
            &["-n", &self.hub, "link", "set", &b, "master", "br0", "up"],
        );
        let underlay = format!("192.0.2.{}", 10 + i);
        must(
            "ip",
            &[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{underlay}/24"),
                "dev",
                &v,
            ],
        );
        must("ip", &["-n", &ns, "link", "set", &v, "up"]);
        must("ip", &["-n", &ns, "link", "set", "lo", "up"]);
        let private_key = must("wg", &["genkey"]).trim().to_string();
        let public_key = pubkey(&private_key);
        let key_file = self.dir.path().join(format!("key{i}"));
        write_secret(&key_file, &private_key);
        Host {
            ns,
            ifname: format!("w{}{i}", self.tag),
            underlay,
            overlay: format!("10.240.0.{i}"),
            private_key,
            public_key,
            key_file,
        }
    }

    /// Starts `which` on `host`'s interface (foreground child), waits for its
    /// UAPI socket, sets key and port 51820, the overlay address, and up.
    pub fn start(&mut self, which: Impl, host: &Host) {
        self.launch(which, host, None);
        self.overlay_up(host);
    }

    /// Starts `which` on `host`'s interface (foreground child, its stdout and
    /// stderr into `log` if given), waits for its UAPI socket and sets key
    /// and port 51820; leaves the interface as the implementation made it.
    pub fn launch(&mut self, which: Impl, host: &Host, log: Option<&Path>) {
        let prog = match which {
            Impl::Ours => OURS,
            Impl::WireguardGo => "wireguard-go",
        };
        let (out, err) = match log {
            Some(path) => {
                let f = File::create(path).expect("log file");
                (Stdio::from(f.try_clone().expect("log fd")), Stdio::from(f))
            }
            None => (Stdio::null(), Stdio::null()),
        };
        let child = Command::new("ip")
            .args(["netns", "exec", &host.ns, prog, "-f", &host.ifname])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn implementation");
        self.children.push(child);
        let sock = PathBuf::from(format!("/var/run/wireguard/{}.sock", host.ifname));
        self.sockets.push(sock.clone());
        wait_for(Duration::from_secs(10), || sock.exists());
        let key = host.key_file.to_str().unwrap();
        wg(
            host,
            &[
                "set",
                &host.ifname,
                "private-key",
                key,
                "listen-port",
                "51820",
            ],
        );
    }

    /// Adds the overlay address (/22: the kernel routes the range) and
    /// brings the interface up.
    pub fn overlay_up(&self, host: &Host) {
        let addr = format!("{}/22", host.overlay);
        must(
            "ip",
            &["-n", &host.ns, "addr", "add", &addr, "dev", &host.ifname],
        );
        must("ip", &["-n", &host.ns, "link", "set", &host.ifname, "up"]);
    }

    /// A path in the topology's private temporary directory.
    pub fn temp_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Topo {
    fn drop(&mut self) {
        // SIGTERM first so the daemons remove their sockets, then SIGKILL.
        for child in &mut self.children {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        for child in &mut self.children {
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        for sock in &self.sockets {
            let _ = std::fs::remove_file(sock);
        }
        for ns in &self.namespaces {
            let pids = run("ip", &["netns", "pids", ns]);
            for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                let _ = run("kill", &["-9", pid]);
            }
        }
        for ns in self.namespaces.iter().rev() {
            let _ = run("ip", &["netns", "del", ns]);
        }
    }
}

fn write_secret(path: &Path, text: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .expect("key file");
    writeln!(f, "{text}").expect("write key");
}

/// `wg pubkey` of a base64 private key.
pub fn pubkey(private_key: &str) -> String {
    let mut child = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("wg pubkey");
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "{private_key}").unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Runs `wg ARGS` in `host`'s namespace; must succeed.
pub fn wg(host: &Host, args: &[&str]) -> String {
    let mut full = vec!["netns", "exec", &host.ns, "wg"];
    full.extend_from_slice(args);
    must("ip", &full)
}

/// Makes `peer` a peer of `host` (allowed IPs: its overlay /32 plus
/// `extra`), with its endpoint when `endpoint` is true.
pub fn add_peer(host: &Host, peer: &Host, endpoint: bool, extra: &[&str]) {
    let mut allowed = format!("{}/32", peer.overlay);
    for e in extra {
        allowed.push(',');
        allowed.push_str(e);
    }
    let ep = format!("{}:51820", peer.underlay);
    let mut args = vec![
        "set",
        &host.ifname,
        "peer",
        &peer.public_key,
        "allowed-ips",
        &allowed,
    ];
    if endpoint {
        args.extend_from_slice(&["endpoint", &ep]);
    }
    wg(host, &args);
}

/// Removes `peer` from `host`.
pub fn remove_peer(host: &Host, peer: &Host) {
    wg(
        host,
        &["set", &host.ifname, "peer", &peer.public_key, "remove"],
    );
}

/// True if a ping from `from` (optionally from source `src`) to `to` gets
/// at least one answer out of `count` (1 s apart at most 0.3 s).
pub fn ping(from: &Host, to: &str, src: Option<&str>, count: u32) -> bool {
    let c = count.to_string();
    let mut args = vec![
        "netns", "exec", &from.ns, "ping", "-c", &c, "-i", "0.3", "-W", "2",
    ];
    if let Some(s) = src {
        args.extend_from_slice(&["-I", s]);
    }
    args.push(to);
    run("ip", &args).status.success()
}

/// One peer line of `wg show <if> dump`.
#[derive(Debug, Clone)]
pub struct DumpPeer {
    pub public_key: String,
    pub endpoint: String,
    pub allowed_ips: String,
    pub latest_handshake: u64,
    pub rx: u64,
    pub tx: u64,
}

/// Sets `host`'s interface up or down (`ip link set`).
pub fn link(host: &Host, up: bool) {
    let state = if up { "up" } else { "down" };
    must("ip", &["-n", &host.ns, "link", "set", &host.ifname, state]);
}

/// The flags of `host`'s interface as `ip link show` prints them
/// (`POINTOPOINT,MULTICAST,NOARP,UP,LOWER_UP`).
pub fn link_flags(host: &Host) -> Vec<String> {
    let out = must("ip", &["-n", &host.ns, "link", "show", &host.ifname]);
    out.split('<')
        .nth(1)
        .and_then(|s| s.split('>').next())
        .unwrap_or("")
        .split(',')
        .map(str::to_owned)
        .collect()
}

/// Parses `wg show <if> dump` of `host` into its peers.
pub fn dump(host: &Host) -> Vec<DumpPeer> {
    let text = wg(host, &["show", &host.ifname, "dump"]);
    text.lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert!(f.len() >= 8, "bad dump line {l:?}");
            DumpPeer {
                public_key: f[0].into(),
                endpoint: f[2].into(),
                allowed_ips: f[3].into(),
                latest_handshake: f[4].parse().unwrap(),
                rx: f[5].parse().unwrap(),
                tx: f[6].parse().unwrap(),
            }
        })
        .collect()
}

/// Polls `cond` every 20 ms until true; panics after `limit`.
pub fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "condition not met within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `f` on a new thread inside namespace `ns` (sockets it opens, and
/// threads it starts, live there).
pub fn in_ns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = File::open(&path).expect("open netns");
        // SAFETY: valid namespace fd; affects only this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}");
        f()
    })
}

/// Deterministic test bytes.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sends `len` bytes over TCP from `from` to `to`'s overlay address and
/// returns (bytes sent, sender's SHA-256, bytes received, receiver's SHA-256).
pub fn tcp_transfer(
    from: &Host,
    to: &Host,
    port: u16,
    len: usize,
) -> (usize, Vec<u8>, usize, Vec<u8>) {
    let addr: SocketAddr = format!("{}:{port}", to.overlay).parse().unwrap();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = in_ns(&to.ns, move || {
        let listener = TcpListener::bind(addr).expect("bind overlay");
        ready_tx.send(()).unwrap();
        listener.set_nonblocking(true).unwrap();
        let start = Instant::now();
        let mut stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(_) if start.elapsed() < Duration::from_secs(20) => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("no connection: {e}"),
            }
        };
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 65536];
        let mut total = 0;
        loop {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    hash.update(&buf[..n]);
                    total += n;
                }
                Err(e) => panic!("receive after {total} bytes: {e}"),
            }
        }
        (total, hash.finalize().to_vec())
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("server ready");
    let client = in_ns(&from.ns, move || {
        let data = pattern(len, 42);
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
        s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(&data).expect("send");
        (data.len(), Sha256::digest(&data).to_vec())
    });
    let (sent, sent_hash) = client.join().expect("client");
    let (got, got_hash) = server.join().expect("server");
    (sent, sent_hash, got, got_hash)
}

/// Sends `count` UDP datagrams of varied sizes from `from` to an echo
/// server at `to`; returns how many came back intact (each retried 3 times).
pub fn udp_echo(from: &Host, to: &Host, port: u16, count: usize) -> usize {
    let addr: SocketAddr = format!("{}:{port}", to.overlay).parse().unwrap();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = in_ns(&to.ns, move || {
        let sock = UdpSocket::bind(addr).expect("bind udp");
        ready_tx.send(()).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut buf = vec![0u8; 2048];
        while let Ok((n, peer)) = sock.recv_from(&mut buf) {
            if &buf[..n] == b"stop" {
                break;
            }
            let _ = sock.send_to(&buf[..n], peer);
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("udp server ready");
    let client = in_ns(&from.ns, move || {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut ok = 0;
        let mut buf = vec![0u8; 2048];
        for i in 0..count {
            let msg = pattern(1 + (i * 37) % 1300, i as u64 + 1);
            for _ in 0..3 {
                sock.send_to(&msg, addr).unwrap();
                if let Ok(n) = sock.recv(&mut buf) {
                    if buf[..n] == msg[..] {
                        ok += 1;
                        break;
                    }
                }
            }
        }
        let _ = sock.send_to(b"stop", addr);
        ok
    });
    let ok = client.join().expect("udp client");
    server.join().expect("udp server");
    ok
}
