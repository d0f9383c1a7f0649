//! A NAT lab in network namespaces: a hub bridge (the underlay,
//! 192.0.2.0/24), a keyserver host (192.0.2.2, STUN and relay on 3478),
//! and members that sit either straight on the underlay ("public") or
//! behind a router namespace whose nftables NAT is one of the kinds of
//! issue 12. Each router has its own LAN (a /29 of 198.51.100.0/24).
//! Sidecars run as the real `sidecar` binary in kernel mode. Everything is
//! removed on drop, also on panic.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::dataplane_support::{in_ns, must, run};
use crate::mesh_support::bin;

/// How a member reaches the underlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// On the underlay itself.
    Public,
    /// `masquerade`: endpoint-independent mapping, port-restricted filtering.
    /// Like every router here, it drops unsolicited packets to itself (as
    /// OpenWrt's wan zone does): a router that let them reach its own
    /// stack would keep a conntrack entry for the first probe that arrived
    /// and give its member's answer another port, so two such routers
    /// could never open a direct path.
    PortPreserving,
    /// `masquerade fully-random`: endpoint-dependent mapping.
    Symmetric,
    /// Every UDP datagram dropped (TCP only).
    UdpBlocked,
}

impl Nat {
    pub const ALL: [Nat; 4] = [
        Nat::Public,
        Nat::PortPreserving,
        Nat::Symmetric,
        Nat::UdpBlocked,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Nat::Public => "public",
            Nat::PortPreserving => "port-preserving",
            Nat::Symmetric => "symmetric",
            Nat::UdpBlocked => "udp-blocked",
        }
    }

    /// The router's postrouting and forward rules.
    fn rules(self) -> (String, String) {
        let masq = match self {
            Nat::Symmetric => "masquerade fully-random",
            _ => "masquerade",
        };
        let udp = if self == Nat::UdpBlocked {
            "meta l4proto udp drop"
        } else {
            ""
        };
        (
            format!("oifname \"wan\" {masq}"),
            format!("iifname \"wan\" ct state new drop\n{udp}"),
        )
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The lab: namespaces, processes, files.
pub struct Lab {
    pub tag: String,
    hub: String,
    pub ks_ns: String,
    pub ks_dir: PathBuf,
    namespaces: Mutex<Vec<String>>,
    children: Mutex<Vec<Child>>,
    sockets: Mutex<Vec<PathBuf>>,
    next_host: AtomicU32,
    next_lan: AtomicU32,
    pub dir: tempfile::TempDir,
}

/// A router namespace.
pub struct Router {
    pub ns: String,
    pub wan: String,
    pub nat: Nat,
    lan_base: u32,
    next: AtomicU32,
}

/// A member host.
#[derive(Clone, Debug)]
pub struct Member {
    pub ns: String,
    pub addr: String,
}

/// One running sidecar.
pub struct Sidecar {
    pub host: Member,
    pub state_dir: PathBuf,
    pub interface: String,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Lab {
    /// The hub, the keyserver (serving), nothing else.
    pub fn new() -> Self {
        Self::with_keyserver_args(&[], |_| {})
    }

    /// The same, with more `keyserver serve` flags, and `before` run once
    /// the keyserver's namespace exists (to start a service there first).
    pub fn with_keyserver_args(args: &[&str], before: impl FnOnce(&Lab)) -> Self {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let tag = format!(
            "{}{}",
            std::process::id() % 10_000,
            (b'a' + n as u8) as char
        );
        let hub = format!("nt{tag}hub");
        must("ip", &["netns", "add", &hub]);
        must("ip", &["-n", &hub, "link", "add", "br0", "type", "bridge"]);
        must("ip", &["-n", &hub, "link", "set", "br0", "up"]);
        let dir = tempfile::tempdir().expect("tempdir");
        let lab = Lab {
            ks_ns: format!("nt{tag}ks"),
            ks_dir: dir.path().join("keyserver"),
            tag,
            hub: hub.clone(),
            namespaces: Mutex::new(vec![hub]),
            children: Mutex::new(Vec::new()),
            sockets: Mutex::new(Vec::new()),
            next_host: AtomicU32::new(10),
            next_lan: AtomicU32::new(0),
            dir,
        };
        let ks = lab.ks_ns.clone();
        lab.underlay_ns(&ks, "192.0.2.2");
        before(&lab);
        lab.start_keyserver(args);
        lab
    }

    /// Starts `program args` in namespace `ns` (stderr into `log`), killed
    /// when the lab is dropped.
    pub fn spawn_in(&self, ns: &str, program: &str, args: &[&str], log: &str) {
        let mut cmd = Command::new(program);
        cmd.args(args);
        self.spawn(ns, &mut cmd, &self.dir.path().join(log));
    }

    /// A namespace with a veth on the hub at `addr`/24.
    fn underlay_ns(&self, ns: &str, addr: &str) {
        must("ip", &["netns", "add", ns]);
        self.namespaces.lock().unwrap().push(ns.to_owned());
        let k = self.namespaces.lock().unwrap().len();
        let (v, b) = (format!("u{}{k}", self.tag), format!("h{}{k}", self.tag));
        must(
            "ip",
            &[
                "link", "add", &v, "netns", ns, "type", "veth", "peer", "name", &b, "netns",
                &self.hub,
            ],
        );
        must(
            "ip",
            &["-n", &self.hub, "link", "set", &b, "master", "br0", "up"],
        );
        must("ip", &["-n", ns, "link", "set", &v, "name", "wan"]);
        must(
            "ip",
            &["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", "wan"],
        );
        must("ip", &["-n", ns, "link", "set", "wan", "up"]);
        must("ip", &["-n", ns, "link", "set", "lo", "up"]);
    }

    fn spawn(&self, ns: &str, cmd: &mut Command, log: &PathBuf) {
        let f = std::fs::File::create(log).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(cmd.get_program())
            .args(cmd.get_args())
            .envs(cmd.get_envs().filter_map(|(k, v)| Some((k, v?))))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .expect("spawn");
        self.children.lock().unwrap().push(child);
    }

    fn start_keyserver(&self, extra: &[&str]) {
        let mut cmd = Command::new(bin("keyserver"));
        cmd.args(["serve", "--data-dir"])
            .arg(&self.ks_dir)
            .args(["--quic-listen", "192.0.2.2:7000"])
            .args(["--api-listen", "127.0.0.1:7001"])
            .args(extra);
        self.spawn(
            &self.ks_ns.clone(),
            &mut cmd,
            &self.dir.path().join("keyserver.log"),
        );
        let start = Instant::now();
        while self.try_admin(&["network", "list"]).is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "keyserver did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts etcd (one node) on the keyserver host's loopback, waits
    /// until it answers, and returns the `--store` URL for `prefix`. Call
    /// from [`Lab::with_keyserver_args`]'s `before`.
    pub fn start_etcd(&self, prefix: &str) -> String {
        let data = self.dir.path().join("etcd");
        let data = data.to_str().unwrap();
        self.spawn_in(
            &self.ks_ns.clone(),
            "/usr/bin/etcd",
            &[
                "--data-dir",
                data,
                "--listen-client-urls",
                "http://127.0.0.1:2379",
                "--advertise-client-urls",
                "http://127.0.0.1:2379",
                "--listen-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-cluster",
                "default=http://127.0.0.1:2380",
            ],
            "etcd.log",
        );
        let start = Instant::now();
        loop {
            let ok = Command::new("ip")
                .args(["netns", "exec", &self.ks_ns, "curl", "-sf", "-m", "1"])
                .arg("http://127.0.0.1:2379/health")
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "etcd did not start: {}",
                std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        format!("etcd://127.0.0.1:2379/{prefix}")
    }

    /// Starts replica `n` (1, 2, ...) of the keyserver on the same host
    /// and `store` (QUIC 192.0.2.2:7000+100n, admin API 127.0.0.1:7001+100n,
    /// relay 192.0.2.2:3478+n); returns its data directory.
    pub fn start_replica(&self, n: u16, store: &str) -> PathBuf {
        let dir = self.dir.path().join(format!("keyserver{n}"));
        let mut cmd = Command::new(bin("keyserver"));
        cmd.args(["serve", "--data-dir"])
            .arg(&dir)
            .args(["--quic-listen", &format!("192.0.2.2:{}", 7000 + 100 * n)])
            .args(["--api-listen", &format!("127.0.0.1:{}", 7001 + 100 * n)])
            .args(["--relay-listen", &format!("192.0.2.2:{}", 3478 + n)])
            .args(["--store", store]);
        self.spawn(
            &self.ks_ns.clone(),
            &mut cmd,
            &self.dir.path().join(format!("keyserver{n}.log")),
        );
        let start = Instant::now();
        while self.try_admin_at(&dir, &["network", "list"]).is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "keyserver replica {n} did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        dir
    }

    /// A keyserver admin command against the keyserver with data
    /// directory `dir`, which must succeed.
    pub fn admin_at(&self, dir: &std::path::Path, args: &[&str]) -> String {
        self.try_admin_at(dir, args)
            .unwrap_or_else(|| panic!("keyserver {args:?} at {} failed", dir.display()))
    }

    /// A token (10 uses) for the existing network `name`, made by the
    /// keyserver with data directory `dir` (its addresses first).
    pub fn token_at(&self, dir: &std::path::Path, name: &str) -> String {
        let out = self.admin_at(dir, &["token", "create", "--network", name, "--uses", "10"]);
        out.split(|c: char| c.is_whitespace() || c == '"')
            .find(|w| w.starts_with("istm1."))
            .expect("token")
            .to_owned()
    }

    fn try_admin(&self, args: &[&str]) -> Option<String> {
        self.try_admin_at(&self.ks_dir.clone(), args)
    }

    fn try_admin_at(&self, dir: &std::path::Path, args: &[&str]) -> Option<String> {
        if !dir.join("api.url").exists() {
            return None;
        }
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ks_ns])
            .arg(bin("keyserver"))
            .arg("--data-dir")
            .arg(dir)
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A keyserver admin command that must succeed.
    pub fn admin(&self, args: &[&str]) -> String {
        self.try_admin(args)
            .unwrap_or_else(|| panic!("keyserver {args:?} failed"))
    }

    /// A new network and a token for it (10 uses).
    pub fn network(&self, name: &str) -> String {
        self.admin(&["network", "create", name]);
        let out = self.admin(&["token", "create", "--network", name, "--uses", "10"]);
        out.split(|c: char| c.is_whitespace() || c == '"')
            .find(|w| w.starts_with("istm1."))
            .expect("token")
            .to_owned()
    }

    /// The next host number on the underlay and its address: one
    /// `fetch_add`, so threads setting up pairs at once (the matrix) never
    /// get the same number (a namespace named from a separate `load` once
    /// collided: "File exists").
    fn next_underlay(&self) -> (u32, String) {
        let i = self.next_host.fetch_add(1, Ordering::SeqCst);
        (i, format!("192.0.2.{i}"))
    }

    /// A host on the underlay at `addr` (outside the members' range).
    pub fn host_at(&self, name: &str, addr: &str) -> Member {
        let ns = format!("nt{}{name}", self.tag);
        self.underlay_ns(&ns, addr);
        Member {
            ns,
            addr: addr.to_owned(),
        }
    }

    /// A member on the underlay itself.
    pub fn public(&self) -> Member {
        let (i, addr) = self.next_underlay();
        let ns = format!("nt{}p{i}", self.tag);
        self.underlay_ns(&ns, &addr);
        Member { ns, addr }
    }

    /// A router of kind `nat` with a LAN bridge.
    pub fn router(&self, nat: Nat) -> Router {
        let (i, wan) = self.next_underlay();
        let ns = format!("nt{}r{i}", self.tag);
        self.underlay_ns(&ns, &wan);
        let lan_base = 8 * self.next_lan.fetch_add(1, Ordering::SeqCst);
        must("ip", &["-n", &ns, "link", "add", "lan", "type", "bridge"]);
        must(
            "ip",
            &[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("198.51.100.{}/29", lan_base + 1),
                "dev",
                "lan",
            ],
        );
        must("ip", &["-n", &ns, "link", "set", "lan", "up"]);
        must(
            "ip",
            &[
                "netns",
                "exec",
                &ns,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ],
        );
        let r = Router {
            ns,
            wan,
            nat,
            lan_base,
            next: AtomicU32::new(2),
        };
        r.set_nat(nat);
        r
    }

    /// A member behind `router`.
    pub fn behind(&self, router: &Router) -> Member {
        let n = router.next.fetch_add(1, Ordering::SeqCst);
        let ns = format!("{}m{n}", router.ns);
        must("ip", &["netns", "add", &ns]);
        self.namespaces.lock().unwrap().push(ns.clone());
        let (v, b) = (format!("l{}", &ns[2..]), format!("k{}", &ns[2..]));
        must(
            "ip",
            &[
                "link", "add", &v, "netns", &ns, "type", "veth", "peer", "name", &b, "netns",
                &router.ns,
            ],
        );
        must(
            "ip",
            &["-n", &router.ns, "link", "set", &b, "master", "lan", "up"],
        );
        let addr = format!("198.51.100.{}", router.lan_base + n);
        must(
            "ip",
            &["-n", &ns, "addr", "add", &format!("{addr}/29"), "dev", &v],
        );
        must("ip", &["-n", &ns, "link", "set", &v, "up"]);
        must("ip", &["-n", &ns, "link", "set", "lo", "up"]);
        let gw = format!("198.51.100.{}", router.lan_base + 1);
        must("ip", &["-n", &ns, "route", "add", "default", "via", &gw]);
        Member { ns, addr }
    }

    /// A member of kind `nat` (behind a router of its own unless public).
    pub fn member(&self, nat: Nat) -> (Member, Option<Router>) {
        match nat {
            Nat::Public => (self.public(), None),
            _ => {
                let r = self.router(nat);
                (self.behind(&r), Some(r))
            }
        }
    }

    /// Starts a kernel-mode sidecar on `m` with `token`.
    pub fn sidecar(&self, m: &Member, token: &str, service: &str) -> Sidecar {
        self.sidecar_with(m, token, service, &[])
    }

    /// The same with more flags (`--mode userspace`, ...).
    pub fn sidecar_with(&self, m: &Member, token: &str, service: &str, extra: &[&str]) -> Sidecar {
        let k = self.sockets.lock().unwrap().len();
        let interface = format!("n{}{k}", self.tag);
        self.sockets.lock().unwrap().push(PathBuf::from(format!(
            "/var/run/wireguard/{interface}.sock"
        )));
        let state_dir = self.dir.path().join(format!("state-{}", m.ns));
        let log = self.dir.path().join(format!("{}.log", m.ns));
        let mut cmd = Command::new(bin("sidecar"));
        cmd.args([
            "up",
            "--token",
            token,
            "--service",
            service,
            "--interface",
            &interface,
        ])
        .args([
            "--metrics",
            "off",
            "--no-dns",
            "--hosts-file",
            "",
            "--listen-port",
            "51820",
        ])
        .arg("--state-dir")
        .arg(&state_dir)
        .args(extra);
        let f = std::fs::File::create(&log).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &m.ns])
            .arg(cmd.get_program())
            .args(cmd.get_args())
            .env("ISTM_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .expect("start sidecar");
        Sidecar {
            host: m.clone(),
            state_dir,
            interface,
            log,
            child: Some(child),
        }
    }
}

impl Router {
    /// Replaces the router's NAT and filter rules, and forgets every
    /// mapping (conntrack flush), as a NAT that rebooted would.
    pub fn set_nat(&self, nat: Nat) {
        let (post, fwd) = nat.rules();
        let script = format!(
            "table ip natlab\ndelete table ip natlab\ntable ip natlab {{\n chain post {{\n  type nat hook postrouting priority 100;\n  {post}\n }}\n chain forw {{\n  type filter hook forward priority 0; policy accept;\n  {fwd}\n }}\n chain inp {{\n  type filter hook input priority 0; policy accept;\n  iifname \"wan\" ct state new drop\n }}\n}}\n"
        );
        let path = std::env::temp_dir().join(format!("{}.nft", self.ns));
        std::fs::write(&path, script).unwrap();
        must(
            "ip",
            &[
                "netns",
                "exec",
                &self.ns,
                "nft",
                "-f",
                path.to_str().unwrap(),
            ],
        );
        let _ = std::fs::remove_file(path);
        let _ = run("ip", &["netns", "exec", &self.ns, "conntrack", "-F"]);
    }

    /// Drops (or with `false`, stops dropping) everything between this
    /// router and `addr` (a direct path breaking; the relay stays).
    pub fn block(&self, addr: &str, on: bool) {
        let cmd = if on {
            format!("add table ip cut\nadd chain ip cut forw {{ type filter hook forward priority -10; }}\nadd rule ip cut forw ip daddr {addr} drop\nadd rule ip cut forw ip saddr {addr} drop\n")
        } else {
            "delete table ip cut\n".to_owned()
        };
        let path = std::env::temp_dir().join(format!("{}.cut.nft", self.ns));
        std::fs::write(&path, cmd).unwrap();
        must(
            "ip",
            &[
                "netns",
                "exec",
                &self.ns,
                "nft",
                "-f",
                path.to_str().unwrap(),
            ],
        );
        let _ = std::fs::remove_file(path);
    }
}

impl Sidecar {
    /// `sidecar status --json`.
    pub fn status(&self) -> Option<serde_json::Value> {
        let out = Command::new(bin("sidecar"))
            .args(["status", "--json", "--state-dir"])
            .arg(&self.state_dir)
            .output()
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    /// The first peer's status, if any.
    pub fn peer(&self) -> Option<serde_json::Value> {
        self.status()?["peers"].as_array()?.first().cloned()
    }

    /// The first peer's path kind (`direct`, `relay`, ...).
    pub fn path(&self) -> String {
        self.peer()
            .and_then(|p| p["path"]["kind"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    /// This member's private IP, once joined.
    pub fn ip(&self) -> Option<String> {
        self.status()?["ip"].as_str().map(str::to_owned)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            let start = Instant::now();
            while matches!(c.try_wait(), Ok(None)) && start.elapsed() < Duration::from_secs(3) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in self.children.lock().unwrap().iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for s in self.sockets.lock().unwrap().iter() {
            let _ = std::fs::remove_file(s);
        }
        let namespaces = self.namespaces.lock().unwrap().clone();
        for ns in &namespaces {
            let pids = run("ip", &["netns", "pids", ns]);
            for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                let _ = run("kill", &["-9", pid]);
            }
        }
        for ns in namespaces.iter().rev() {
            let _ = run("ip", &["netns", "del", ns]);
        }
    }
}

/// A TCP transfer through the tunnel: a server in `server_ns` on
/// `port`, a client in `client_ns` connecting to `ip:port` (retrying until
/// `limit`), `bytes` bytes (the first at once, the rest paced by `pace`
/// per 64 KiB), SHA-256 at both ends.
pub struct Transfer {
    /// When the server read the first byte.
    pub first_byte: Option<Instant>,
    pub sent_sha: String,
    pub received_sha: String,
    pub error: Option<String>,
}

pub fn transfer(
    server_ns: &str,
    client_ns: &str,
    ip: &str,
    port: u16,
    bytes: usize,
    pace: Duration,
    limit: Duration,
) -> Transfer {
    transfer_until(server_ns, client_ns, ip, port, bytes, pace, limit, None)
}

/// [`transfer`] that also ends early when `stop` is set.
#[allow(clippy::too_many_arguments)]
pub fn transfer_until(
    server_ns: &str,
    client_ns: &str,
    ip: &str,
    port: u16,
    bytes: usize,
    pace: Duration,
    limit: Duration,
    stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
) -> Transfer {
    let (tx, rx) = std::sync::mpsc::channel();
    // A loopback target is a userspace member's listener: its service is
    // on 127.0.0.1 (the sidecar holds 127.77.x.y itself).
    let bind = if ip.starts_with("127.") {
        "127.0.0.1"
    } else {
        "0.0.0.0"
    };
    let server = in_ns(server_ns, move || {
        let l = TcpListener::bind((bind, port)).expect("listen");
        l.set_nonblocking(true).unwrap();
        tx.send(()).unwrap();
        let start = Instant::now();
        let mut conn = loop {
            match l.accept() {
                Ok((c, _)) => break Some(c),
                Err(_) if start.elapsed() < limit => std::thread::sleep(Duration::from_millis(5)),
                Err(_) => break None,
            }
        };
        let Some(c) = conn.as_mut() else {
            return (None, String::new());
        };
        c.set_nonblocking(false).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut h = Sha256::new();
        let mut first = None;
        let mut buf = vec![0u8; 65536];
        loop {
            match c.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    first.get_or_insert_with(Instant::now);
                    h.update(&buf[..n]);
                }
            }
        }
        (first, hex(&h.finalize()))
    });
    rx.recv_timeout(Duration::from_secs(10)).expect("server up");
    let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
    let client = in_ns(client_ns, move || {
        let start = Instant::now();
        let mut s = loop {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                Ok(s) => break s,
                Err(e) if start.elapsed() > limit => {
                    return (String::new(), Some(format!("connect: {e}")))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        let mut h = Sha256::new();
        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(port);
        let mut left = bytes;
        let mut chunk = vec![0u8; 65536];
        let mut first = true;
        while left > 0 && !stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed)) {
            let n = if first { 1 } else { left.min(chunk.len()) };
            first = false;
            for b in chunk[..n].iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            if let Err(e) = s.write_all(&chunk[..n]) {
                return (hex(&h.finalize()), Some(format!("write: {e}")));
            }
            h.update(&chunk[..n]);
            left -= n;
            if !pace.is_zero() {
                std::thread::sleep(pace);
            }
        }
        let _ = s.shutdown(std::net::Shutdown::Write);
        (hex(&h.finalize()), None)
    });
    let (sent_sha, error) = client.join().unwrap();
    let (first_byte, received_sha) = server.join().unwrap();
    Transfer {
        first_byte,
        sent_sha,
        received_sha,
        error,
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
