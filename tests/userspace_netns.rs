//! Userspace mode against other implementations, across network namespaces
//! (issue 6): an in-process userspace member (engine + smoltcp stack, no TUN)
//! and a stock `wireguard-go` peer; and a `sidecar up --mode userspace`
//! member and a kernel-mode (TUN) sidecar through a real keyserver. TCP with
//! SHA-256 checks and UDP, both ways. Needs root (namespaces, TUN for the
//! other side); skipped with a message otherwise. The rootless subset is in
//! `meshlib/src/userspace/tests.rs`.

mod dataplane_support;
mod mesh_support;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::mpsc;
use std::time::Duration;

use dataplane_support::{in_ns, wg, Impl, Topo};
use mesh_support::Mesh;
use meshlib::keys::PrivateKey;
use meshlib::userspace::ports::loopback_for;
use meshlib::userspace::{Stack, StackConfig};
use meshlib::wg::{Engine, EngineConfig, PeerConfig};
use sha2::{Digest, Sha256};

const SETTLE: Duration = Duration::from_secs(20);

/// A TCP server in `ns` on `bind` that answers each connection (4 at most,
/// for 60 s at most) with the SHA-256 of everything it read (until the
/// client half-closes).
fn sha_server(ns: &str, bind: SocketAddr) {
    let (tx, rx) = mpsc::channel();
    in_ns(ns, move || {
        let l = TcpListener::bind(bind).expect("bind sha server");
        l.set_nonblocking(true).unwrap();
        tx.send(()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut served = 0;
        while served < 4 && std::time::Instant::now() < deadline {
            let Ok((mut s, _)) = l.accept() else {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            };
            served += 1;
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 65_536];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            let _ = s.write_all(&h.finalize());
        }
    });
    rx.recv_timeout(Duration::from_secs(10)).expect("server up");
}

/// From `ns`, sends `len` pseudo-random bytes to `to` and checks the SHA-256
/// that comes back; retried while the path comes up.
fn sha_transfer(ns: &str, to: SocketAddr, len: usize) -> bool {
    in_ns(ns, move || {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
        let want = Sha256::digest(&data).to_vec();
        for _ in 0..10 {
            let Ok(mut s) = TcpStream::connect_timeout(&to, Duration::from_secs(5)) else {
                std::thread::sleep(Duration::from_millis(500));
                continue;
            };
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            if s.write_all(&data).is_err() {
                continue;
            }
            let _ = s.shutdown(std::net::Shutdown::Write);
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got);
            return got == want;
        }
        false
    })
    .join()
    .unwrap()
}

/// A UDP echo server in `ns` on `bind` (for 30 s at most).
fn udp_echo_server(ns: &str, bind: SocketAddr) {
    let (tx, rx) = mpsc::channel();
    in_ns(ns, move || {
        let s = UdpSocket::bind(bind).expect("bind udp echo");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        tx.send(()).unwrap();
        let mut buf = vec![0u8; 2048];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(&buf[..n], from);
        }
    });
    rx.recv_timeout(Duration::from_secs(10)).expect("udp up");
}

/// From `ns`, `count` datagrams to `to`; how many came back intact.
fn udp_round_trips(ns: &str, to: SocketAddr, count: usize) -> usize {
    in_ns(ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut ok = 0;
        let mut buf = vec![0u8; 2048];
        for i in 0..count {
            let msg = vec![i as u8; 1000];
            for _ in 0..10 {
                s.send_to(&msg, to).unwrap();
                if let Ok(n) = s.recv(&mut buf) {
                    ok += usize::from(buf[..n] == msg[..]);
                    break;
                }
            }
        }
        ok
    })
    .join()
    .unwrap()
}

#[test]
fn userspace_member_talks_to_wireguard_go() {
    require_netns!();
    let mut topo = Topo::new();
    let (h1, h2) = (topo.host(1), topo.host(2));
    topo.start(Impl::WireguardGo, &h1);
    let key = PrivateKey::generate();
    let us_pub = key.public_key().to_string();
    let us_ip: IpAddr = h2.overlay.parse().unwrap();
    wg(
        &h1,
        &[
            "set",
            &h1.ifname,
            "peer",
            &us_pub,
            "allowed-ips",
            &format!("{us_ip}/32"),
            "endpoint",
            &format!("{}:51820", h2.underlay),
        ],
    );
    // h1's instance (kernel stack behind wireguard-go) and h2's (loopback).
    let go_ip: IpAddr = h1.overlay.parse().unwrap();
    sha_server(&h1.ns, SocketAddr::new(go_ip, 7001));
    udp_echo_server(&h1.ns, SocketAddr::new(go_ip, 7003));
    sha_server(&h2.ns, "127.0.0.1:7002".parse().unwrap());
    udp_echo_server(&h2.ns, "127.0.0.1:7004".parse().unwrap());

    // The userspace member, in h2's namespace (its threads inherit it).
    let (ready_tx, ready_rx) = mpsc::channel();
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let go_pub: meshlib::keys::PublicKey = h1.public_key.parse().unwrap();
    let go_ep: SocketAddr = format!("{}:51820", h1.underlay).parse().unwrap();
    let member = in_ns(&h2.ns, move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            // The instance serves 7002 (TCP) and 7004 (UDP): only those
            // are reachable from the tunnel.
            let mut cfg = StackConfig::new(us_ip, 22);
            cfg.inbound_ports = [7002, 7004].into();
            let (stack, dev) = Stack::start(cfg).unwrap();
            let engine = Engine::start(
                dev,
                EngineConfig {
                    listen_port: 51820,
                    private_key: Some(key),
                    fwmark: 0,
                    crypto_workers: 0,
                },
            )
            .unwrap();
            engine
                .set_peer(PeerConfig {
                    public_key: go_pub,
                    preshared_key: None,
                    endpoint: Some(go_ep),
                    allowed_ips: vec![ipnet::IpNet::from(go_ip)],
                    persistent_keepalive: 0,
                })
                .unwrap();
            let stack = std::sync::Arc::new(stack);
            let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let addrs = (tcp.local_addr().unwrap(), udp.local_addr().unwrap());
            let (s1, s2) = (stack.clone(), stack.clone());
            tokio::spawn(async move { s1.forward_tcp(tcp, SocketAddr::new(go_ip, 7001)).await });
            tokio::spawn(async move { s2.forward_udp(udp, SocketAddr::new(go_ip, 7003)).await });
            ready_tx.send(addrs).unwrap();
            let _ =
                tokio::task::spawn_blocking(move || stop_rx.recv_timeout(Duration::from_secs(120)))
                    .await;
            engine.shutdown();
        });
    });
    let (tcp_fwd, udp_fwd) = ready_rx.recv_timeout(SETTLE).expect("userspace member up");

    assert!(
        sha_transfer(&h1.ns, SocketAddr::new(us_ip, 7002), 2 << 20),
        "wireguard-go -> userspace TCP, SHA-256 intact"
    );
    assert!(
        sha_transfer(&h2.ns, tcp_fwd, 2 << 20),
        "userspace -> wireguard-go TCP, SHA-256 intact"
    );
    assert_eq!(
        udp_round_trips(&h1.ns, SocketAddr::new(us_ip, 7004), 5),
        5,
        "wireguard-go -> userspace UDP"
    );
    assert_eq!(
        udp_round_trips(&h2.ns, udp_fwd, 5),
        5,
        "userspace -> wireguard-go UDP"
    );
    stop_tx.send(()).unwrap();
    member.join().unwrap();
}

#[test]
fn userspace_sidecar_and_tun_sidecar_talk_both_ways() {
    require_netns!();
    let mut mesh = Mesh::new();
    let token = mesh.token();
    let (ha, hb) = (mesh.host(2), mesh.host(3));
    // A declares no ports: with --discover-ports they are found listening
    // (after the join).
    let a = mesh.sidecar(&ha, "api", "up", &["--token", &token, "--discover-ports"]);
    let b = mesh.sidecar(
        &hb,
        "web",
        "up",
        &["--token", &token, "--mode", "userspace", "--port", "8080"],
    );
    a.wait_peers(1, SETTLE);
    let b_status = b.wait_peers(1, SETTLE);
    assert_eq!(
        b_status["peers"][0]["service"], "api",
        "status works in userspace mode: {b_status}"
    );
    let (a_ip, b_ip): (Ipv4Addr, Ipv4Addr) = (a.ip().parse().unwrap(), b.ip().parse().unwrap());
    let a_local = loopback_for(IpAddr::V4(a_ip));

    // Outputs of the userspace member point at the loopback standing for
    // the service's own address (the default), balanced over its instances.
    let by_name = b.must_sh("getent hosts api.warp");
    let api_local: Ipv4Addr = by_name
        .split_whitespace()
        .next()
        .and_then(|w| w.parse().ok())
        .expect("api.warp in the hosts file");
    assert_eq!(api_local.octets()[..2], [127, 77], "{by_name}");
    assert!(
        (4..8).contains(&api_local.octets()[2]),
        "service range: {by_name}"
    );
    let hosts = b.hosts_file();
    assert!(hosts.contains(&format!("{api_local}\tapi.warp")), "{hosts}");
    let env = std::fs::read_to_string(b.state_dir.join("ist.env")).unwrap();
    assert!(
        env.contains(&format!("WARP_IST_api={api_local}\n")),
        "{env}"
    );
    // The UAPI socket answers `wg show` in userspace mode too.
    let show = b.must_sh(&format!("wg show {} peers", b.interface));
    assert!(!show.trim().is_empty(), "wg show lists the peer");

    // TUN member -> userspace member's instance (127.0.0.1:8080 in B).
    sha_server(&hb.ns, "127.0.0.1:8080".parse().unwrap());
    udp_echo_server(&hb.ns, "127.0.0.1:8080".parse().unwrap());
    assert!(
        sha_transfer(&ha.ns, SocketAddr::from((b_ip, 8080)), 1 << 20),
        "A -> B TCP"
    );
    assert_eq!(
        udp_round_trips(&ha.ns, SocketAddr::from((b_ip, 8080)), 5),
        5,
        "A -> B UDP"
    );
    // Userspace member -> TUN member, through the loopback relay. A's port
    // is discovered from its listening sockets and announced with the next
    // heartbeat (10 s); B then listens on it.
    sha_server(&ha.ns, "0.0.0.0:9090".parse().unwrap());
    udp_echo_server(&ha.ns, "0.0.0.0:9090".parse().unwrap());
    let relay = SocketAddr::from((a_local, 9090));
    let up = in_ns(&hb.ns, move || {
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_secs(40) {
            if TcpStream::connect_timeout(&relay, Duration::from_secs(1)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    });
    assert!(up.join().unwrap(), "B listens for A's discovered port 9090");
    assert!(
        sha_transfer(&hb.ns, SocketAddr::from((a_local, 9090)), 1 << 20),
        "B -> A TCP"
    );
    assert_eq!(
        udp_round_trips(&hb.ns, SocketAddr::from((a_local, 9090)), 5),
        5,
        "B -> A UDP"
    );
    // The service address's loopback reaches A too.
    assert!(
        sha_transfer(&hb.ns, SocketAddr::from((api_local, 9090)), 1 << 20),
        "B -> api by its service address"
    );
    // The private DNS answers the loopback address too.
    let dns = b.must_sh("dig @127.0.0.77 +time=2 +tries=3 +short api.warp");
    assert_eq!(dns.trim(), api_local.to_string(), "DNS in userspace mode");
}

#[test]
fn tunnel_forwards_a_local_port_by_name_and_leaves_on_exit() {
    require_netns!();
    let mut mesh = Mesh::new();
    let token = mesh.token();
    let (ha, ht) = (mesh.host(2), mesh.host(3));
    let a = mesh.sidecar(&ha, "api", "up", &["--token", &token]);
    let a_status = a.wait_peers(0, SETTLE);
    let a_ip: Ipv4Addr = a.ip().parse().unwrap();
    let instance = a_status["instance"].as_str().unwrap().to_owned();
    sha_server(&ha.ns, SocketAddr::from((a_ip, 9090)));

    let log = std::fs::File::create(mesh.topo.temp_path("tunnel.log")).unwrap();
    let mut tunnel = std::process::Command::new("ip")
        .args(["netns", "exec", &ht.ns])
        .arg(mesh_support::bin("sidecar"))
        .args(["tunnel", "--token", &token, "127.0.0.1:15000"])
        .arg(format!("{instance}.internal:9090"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("start tunnel");
    let mut line = String::new();
    let mut out = std::io::BufReader::new(tunnel.stdout.take().unwrap());
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert!(line.starts_with("forwarding 127.0.0.1:15000"), "{line:?}");
    a.wait_peers(1, SETTLE);
    assert!(
        sha_transfer(&ht.ns, "127.0.0.1:15000".parse().unwrap(), 1 << 20),
        "tunnel -> {instance}.internal:9090, SHA-256 intact"
    );
    // SAFETY: kill(2) on our own child (`ip netns exec` execs the sidecar).
    unsafe { libc::kill(tunnel.id() as libc::pid_t, libc::SIGTERM) };
    let start = std::time::Instant::now();
    while matches!(tunnel.try_wait(), Ok(None)) && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = tunnel.try_wait().unwrap();
    let _ = tunnel.kill();
    let _ = tunnel.wait();
    assert!(
        status.is_some_and(|s| s.success()),
        "tunnel exits cleanly: {status:?}"
    );
    // The keyserver removed the tunnel member: A forgets it.
    let start = std::time::Instant::now();
    loop {
        let peers = a.status().and_then(|s| s["peers"].as_array().map(Vec::len));
        if peers == Some(0) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "tunnel member not removed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Kills a child process on drop (also when the test panics).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn rootless_userspace_sidecar_reaches_and_serves_a_tun_sidecar() {
    require_netns!();
    const NOBODY: u32 = 65534;
    let mut mesh = Mesh::new();
    let token = mesh.token();
    let (ha, hb) = (mesh.host(2), mesh.host(3));
    // A's instance listens before A joins: its port is announced at join.
    sha_server(&ha.ns, "0.0.0.0:9090".parse().unwrap());
    let a = mesh.sidecar(&ha, "api", "up", &["--token", &token, "--port", "9090"]);

    // B: `sidecar up --mode userspace` as nobody, with a state directory
    // of its own and an unprivileged DNS port.
    let state = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(state.path(), Some(NOBODY), Some(NOBODY)).unwrap();
    let iface = format!("nb{}", std::process::id() % 100_000);
    let log = std::fs::File::create(mesh.topo.temp_path("rootless.log")).unwrap();
    let child = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &hb.ns,
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
        ])
        .args(["--clear-groups", "--"])
        .arg(mesh_support::bin("sidecar"))
        .args([
            "up",
            "--mode",
            "userspace",
            "--service",
            "web",
            "--token",
            &token,
        ])
        .args(["--interface", &iface, "--metrics", "off", "--port", "8080"])
        .args(["--dns-listen", "127.0.0.77:5353", "--hosts-file"])
        .arg(state.path().join("hosts"))
        .arg("--state-dir")
        .arg(state.path())
        .env("ISTM_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start rootless sidecar");
    let b = KillOnDrop(child);
    // `ip netns exec` and `setpriv` exec, so the child becomes the sidecar.
    let as_nobody = || {
        std::fs::read_to_string(format!("/proc/{}/status", b.0.id()))
            .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:\t65534\t")))
    };
    let start = std::time::Instant::now();
    while !as_nobody() && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(as_nobody(), "the sidecar runs as nobody");
    let status = || -> Option<serde_json::Value> {
        let out = std::process::Command::new(mesh_support::bin("sidecar"))
            .args(["status", "--json", "--state-dir"])
            .arg(state.path())
            .output()
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    };
    let start = std::time::Instant::now();
    let b_status = loop {
        if let Some(s) = status().filter(|s| s["peers"].as_array().is_some_and(|p| !p.is_empty())) {
            break s;
        }
        assert!(
            start.elapsed() < SETTLE,
            "rootless sidecar: no peer; log:\n{}",
            std::fs::read_to_string(mesh.topo.temp_path("rootless.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let b_ip: Ipv4Addr = b_status["ip"].as_str().unwrap().parse().unwrap();
    a.wait_peers(1, SETTLE);

    // UAPI without privileges: the socket is in the state directory.
    let mut uapi =
        std::os::unix::net::UnixStream::connect(state.path().join(format!("{iface}.sock")))
            .expect("UAPI socket in the state directory");
    uapi.write_all(b"get=1\n\n").unwrap();
    let mut answer = String::new();
    uapi.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(&uapi), &mut answer);
    assert!(
        answer.starts_with("private_key=") || answer.starts_with("listen_port="),
        "{answer:?}"
    );

    // B -> A through the loopback relay; A -> B's instance on 127.0.0.1.
    let a_local = loopback_for(IpAddr::V4(a.ip().parse().unwrap()));
    let env = std::fs::read_to_string(state.path().join("ist.env")).unwrap();
    let api_local = env
        .lines()
        .find_map(|l| l.strip_prefix("WARP_IST_api="))
        .and_then(|v| v.parse::<Ipv4Addr>().ok())
        .unwrap_or_else(|| panic!("WARP_IST_api in {env}"));
    assert_eq!(api_local.octets()[..2], [127, 77], "{env}");
    assert_ne!(api_local, a_local, "the service's loopback, not A's: {env}");
    assert!(
        sha_transfer(&hb.ns, SocketAddr::from((api_local, 9090)), 1 << 20),
        "rootless B -> api by its service address"
    );
    assert!(
        sha_transfer(&hb.ns, SocketAddr::from((a_local, 9090)), 1 << 20),
        "rootless B -> A TCP"
    );
    sha_server(&hb.ns, "127.0.0.1:8080".parse().unwrap());
    assert!(
        sha_transfer(&ha.ns, SocketAddr::from((b_ip, 8080)), 1 << 20),
        "A -> rootless B TCP"
    );
}

/// From `ns`, whether a TCP connection to `to` gets anywhere: `Some(true)`
/// if it connects and the server answers a byte, `Some(false)` if it is
/// refused or reset, `None` on timeout.
fn tcp_answers(ns: &str, to: SocketAddr) -> Option<bool> {
    in_ns(ns, move || {
        let mut s = match TcpStream::connect_timeout(&to, Duration::from_secs(5)) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return None,
            Err(_) => return Some(false),
        };
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(b"x");
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(n) if n > 0 => Some(true),
            Ok(_) => Some(false),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
            Err(_) => Some(false),
        }
    })
    .join()
    .unwrap()
}

#[test]
fn a_userspace_member_exposes_only_its_declared_ports() {
    require_netns!();
    let mut mesh = Mesh::new();
    let token = mesh.token();
    let (ha, hb) = (mesh.host(2), mesh.host(3));
    // B's host runs two loopback services: the one B declares (8080) and
    // another (7001, like the keyserver's admin API) that is not B's.
    sha_server(&hb.ns, "127.0.0.1:8080".parse().unwrap());
    sha_server(&hb.ns, "127.0.0.1:7001".parse().unwrap());
    let a = mesh.sidecar(&ha, "api", "up", &["--token", &token]);
    let b = mesh.sidecar(
        &hb,
        "web",
        "up",
        &["--token", &token, "--mode", "userspace", "--port", "8080"],
    );
    a.wait_peers(1, SETTLE);
    b.wait_peers(1, SETTLE);
    let b_ip: Ipv4Addr = b.ip().parse().unwrap();
    assert!(
        sha_transfer(&ha.ns, SocketAddr::from((b_ip, 8080)), 1 << 16),
        "the declared port is reachable"
    );
    assert_eq!(
        tcp_answers(&ha.ns, SocketAddr::from((b_ip, 7001))),
        Some(false),
        "another loopback service of B's host is refused (reset)"
    );
    let status = b.status().expect("status");
    assert!(
        status["inbound_refused"].as_u64().is_some_and(|n| n >= 1),
        "counted: {status}"
    );
    assert_eq!(status["ports"], serde_json::json!([8080]));
    let text = b.must_sh(&format!(
        "{} status --state-dir {}",
        mesh_support::bin("sidecar").display(),
        b.state_dir.display()
    ));
    assert!(
        text.contains("inbound refused (port not served): "),
        "{text}"
    );
    // A itself serves nothing (kernel mode, no --port, no discovery): B
    // has no loopback listener for it at all.
    let a_local = loopback_for(IpAddr::V4(a.ip().parse().unwrap()));
    assert_eq!(
        tcp_answers(&hb.ns, SocketAddr::from((a_local, 7001))),
        Some(false),
        "nothing announced, nothing relayed"
    );
}
