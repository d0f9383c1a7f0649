//! Member lifecycle with real processes in namespaces: a killed sidecar goes
//! offline for its peers after `offline-after`, a graceful stop at once, a
//! restart brings it back with the same address and names, `sidecar leave`
//! frees the address after the quarantine, a new instance after an expired
//! one takes index 1 and the `.warp` name, `sidecar run` sees a service that
//! joined while it was down, and a key rotation under a running TCP stream
//! keeps the stream (checksum at both ends) with a short pause.
//!
//! The sidecars give members for `.warp` and `WARP_IST_*`
//! (`service-addresses = members`, the documented way back): these tests
//! follow members' own addresses; the service addresses that are the
//! default have their own suites (`vip_kernel_netns`, `vip_userspace_netns`).
//!
//! Needs root (namespaces, TUN); prints SKIPPED otherwise.

mod dataplane_support;
mod mesh_support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use dataplane_support::{in_ns, wait_for};
use mesh_support::{Mesh, Sidecar};
use sha2::{Digest, Sha256};

const SETTLE: Duration = Duration::from_secs(20);

/// Short timers: offline after 4 s of silence, expired 8 s after that,
/// addresses quarantined 3 s.
const TIMERS: &str = "offline-after-secs = 4\nexpire-after-secs = 8\nquarantine-secs = 3\n";

macro_rules! require_netns {
    () => {
        if let Some(why) = dataplane_support::skip_reason() {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
}

fn wg_peers(sc: &Sidecar) -> Vec<String> {
    sc.wg_peers()
}

fn hosts_lookup(sc: &Sidecar, name: &str) -> Option<String> {
    sc.getent(name)
}

fn dns_lookup(sc: &Sidecar, name: &str) -> Option<String> {
    sc.dig(name)
}

fn public_key(sc: &Sidecar) -> String {
    sc.status().expect("status")["public_key"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Whether `who` has `whom` as a peer or a name.
fn knows(who: &Sidecar, whom_key: &str, name: &str) -> bool {
    wg_peers(who).iter().any(|k| k == whom_key) || hosts_lookup(who, name).is_some()
}

#[test]
fn kill_stop_restart_leave_and_a_new_instance() {
    require_netns!();
    let mut mesh = Mesh::with_keyserver_config(TIMERS);
    mesh.service_addresses = Some("members");
    let token = mesh.token();
    let (ha, hb, hc) = (mesh.host(2), mesh.host(3), mesh.host(4));
    let a = mesh.sidecar(&ha, "web", "up", &["--token", &token]);
    // b and c keep their state directories across restarts: not
    // ephemeral, so their slots wait for them while they are down (until
    // `expire-after`).
    let mut b = mesh.sidecar(&hb, "api", "up", &["--token", &token, "--ephemeral=false"]);
    let mut c = mesh.sidecar(
        &hc,
        "cache",
        "up",
        &["--token", &token, "--ephemeral=false"],
    );
    for sc in [&a, &b, &c] {
        sc.wait_peers(2, SETTLE);
    }
    let (c_key, c_ip) = (public_key(&c), c.ip());
    wait_for(SETTLE, || {
        hosts_lookup(&a, "cache.warp").as_deref() == Some(c_ip.as_str())
    });
    assert_eq!(dns_lookup(&b, "cache.warp").as_deref(), Some(c_ip.as_str()));

    // kill -9: gone from both peers (WireGuard peer, hosts, DNS) within
    // offline-after + 2 s.
    let killed = Instant::now();
    c.kill();
    wait_for(Duration::from_secs(12), || {
        !knows(&a, &c_key, "cache.warp")
            && !knows(&b, &c_key, "cache.warp")
            && dns_lookup(&a, "cache.warp").is_none()
    });
    let offline = killed.elapsed();
    eprintln!("kill -9 to gone from both peers: {offline:?} (offline-after 4 s)");
    assert!(offline <= Duration::from_secs(6), "{offline:?}");
    // Listed as offline, address kept.
    let listed = mesh.admin(&["member", "list", "--network", "prod", "--json"]);
    assert!(listed.contains("\"offline\""), "{listed}");
    assert!(listed.contains(&c_ip), "{listed}");

    // Restarted: back with the same address and names.
    c.start("up", &[]);
    wait_for(SETTLE, || {
        wg_peers(&a).contains(&c_key)
            && hosts_lookup(&a, "cache.warp").as_deref() == Some(c_ip.as_str())
    });
    assert_eq!(c.ip(), c_ip);

    // A graceful stop: gone within a second.
    let (b_key, b_ip) = (public_key(&b), b.ip());
    wait_for(SETTLE, || hosts_lookup(&a, "api.warp").is_some());
    let stopped = Instant::now();
    b.stop();
    wait_for(Duration::from_secs(5), || !knows(&a, &b_key, "api.warp"));
    let graceful = stopped.elapsed();
    eprintln!("graceful stop to gone: {graceful:?}");
    assert!(
        graceful <= Duration::from_secs(1) + Duration::from_millis(300),
        "{graceful:?}"
    );

    // `sidecar leave` (through the running sidecar): released; after the
    // quarantine, a newcomer gets its address.
    let left = c.must_sh(&format!(
        "{} leave --state-dir {}",
        mesh_support::bin("sidecar").display(),
        c.state_dir.display()
    ));
    assert!(left.contains("left the network"), "{left}");
    assert_eq!(
        c.wait_exit(Duration::from_secs(5)),
        Some(0),
        "leave stops the sidecar"
    );
    wait_for(Duration::from_secs(5), || !knows(&a, &c_key, "cache.warp"));
    let listed = mesh.admin(&["member", "list", "--network", "prod", "--json"]);
    assert!(!listed.contains(&c_key), "left members are gone: {listed}");
    std::thread::sleep(Duration::from_secs(4));
    let hd = mesh.host(5);
    let d = mesh.sidecar(&hd, "newcomer", "up", &["--token", &token]);
    d.wait_peers(1, SETTLE);
    assert_eq!(
        d.ip(),
        c_ip,
        "the left member's address, after the quarantine"
    );

    // b is offline (stopped); it expires 8 s later. A new api instance
    // then takes index 1 and api.warp.
    wait_for(Duration::from_secs(20), || {
        !mesh
            .admin(&["member", "list", "--network", "prod", "--json"])
            .contains(&b_key)
    });
    let b2 = mesh.sidecar_in(&hb, "api", "up", &["--token", &token], "-new");
    b2.wait_peers(2, SETTLE);
    let s = b2.status().unwrap();
    assert_eq!(s["instance"], "api-web-1", "{s}");
    let b2_ip = b2.ip();
    wait_for(SETTLE, || {
        hosts_lookup(&a, "api.warp").as_deref() == Some(b2_ip.as_str())
    });
    eprintln!("old api at {b_ip}, new api at {b2_ip}");
}

#[test]
fn run_waits_for_the_map_and_sets_its_variables() {
    require_netns!();
    let mut mesh = Mesh::with_keyserver_config(TIMERS);
    mesh.service_addresses = Some("members");
    let token = mesh.token();
    let (ha, hb) = (mesh.host(2), mesh.host(3));
    // a restarts with its state: not ephemeral.
    let mut a = mesh.sidecar(&ha, "web", "up", &["--token", &token, "--ephemeral=false"]);
    a.wait_peers(0, SETTLE);
    a.stop();
    // While a is down, a service joins.
    let b = mesh.sidecar(&hb, "late service", "up", &["--token", &token]);
    b.wait_peers(0, SETTLE);
    let b_ip = b.ip();
    // `run` starts from the cached map (without the newcomer), catches up,
    // then starts the command.
    let out = a.state_dir.join("child.env");
    a.start(
        "run",
        &[
            "--",
            "sh",
            "-c",
            &format!("env > {}; sleep 30", out.display()),
        ],
    );
    wait_for(SETTLE, || {
        out.exists() && std::fs::read_to_string(&out).is_ok_and(|t| t.contains("ISTM_PRIVATE_IP"))
    });
    let env = std::fs::read_to_string(&out).unwrap();
    assert!(
        env.contains(&format!("WARP_IST_late_service={b_ip}\n")),
        "{env}"
    );
    assert!(env.contains("ISTM_NETWORK_ID=pn-"), "{env}");
    assert!(env.contains("ISTM_APP_ID="), "{env}");
    assert!(env.contains("ISTM_INSTANCE=web-web-1\n"), "{env}");
    assert!(
        env.contains(&format!("ISTM_PRIVATE_IP={}\n", a.ip())),
        "{env}"
    );
}

/// Streams timestamped chunks from `ns` to `to` for `secs`; the SHA-256 of
/// what was sent.
fn timed_sender(ns: &str, to: SocketAddr, secs: u64) -> std::thread::JoinHandle<Vec<u8>> {
    in_ns(ns, move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).expect("connect");
        let mut h = Sha256::new();
        let end = Instant::now() + Duration::from_secs(secs);
        let mut i = 0u64;
        while Instant::now() < end {
            let chunk: Vec<u8> = (0..1024).map(|j| (i as usize * 31 + j) as u8).collect();
            s.write_all(&chunk).expect("the stream survives");
            h.update(&chunk);
            i += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut echo = Vec::new();
        s.read_to_end(&mut echo).unwrap();
        assert_eq!(echo, h.clone().finalize().to_vec(), "receiver's checksum");
        h.finalize().to_vec()
    })
}

/// Receives in `ns` on `bind`: answers the SHA-256 of everything; returns
/// (checksum, longest gap between two reads).
fn timed_receiver(ns: &str, bind: SocketAddr) -> std::thread::JoinHandle<(Vec<u8>, Duration)> {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = in_ns(ns, move || {
        let l = TcpListener::bind(bind).expect("bind");
        tx.send(()).unwrap();
        let (mut s, _) = l.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 65536];
        let mut last = Instant::now();
        let mut gap = Duration::ZERO;
        loop {
            let n = s.read(&mut buf).expect("read");
            if n == 0 {
                break;
            }
            gap = gap.max(last.elapsed());
            last = Instant::now();
            h.update(&buf[..n]);
        }
        let sum = h.finalize().to_vec();
        s.write_all(&sum).unwrap();
        (sum, gap)
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap();
    handle
}

#[test]
fn rotation_under_a_running_tcp_stream() {
    require_netns!();
    let mut mesh = Mesh::with_keyserver_config(TIMERS);
    mesh.service_addresses = Some("members");
    let token = mesh.token();
    let (ha, hb) = (mesh.host(2), mesh.host(3));
    let a = mesh.sidecar(&ha, "sender", "up", &["--token", &token]);
    let b = mesh.sidecar(&hb, "receiver", "up", &["--token", &token]);
    a.wait_peers(1, SETTLE);
    b.wait_peers(1, SETTLE);
    let (b_ip, b_old) = (b.ip(), public_key(&b));
    let to: SocketAddr = format!("{b_ip}:9100").parse().unwrap();
    let receiver = timed_receiver(&hb.ns, to);
    let sender = timed_sender(&ha.ns, to, 6);
    std::thread::sleep(Duration::from_secs(2));
    let out = b.must_sh(&format!(
        "{} rotate-key --state-dir {}",
        mesh_support::bin("sidecar").display(),
        b.state_dir.display()
    ));
    assert!(out.contains("new public key:"), "{out}");
    let b_new = public_key(&b);
    assert_ne!(b_new, b_old);
    let sent = sender.join().expect("sender");
    let (got, gap) = receiver.join().expect("receiver");
    assert_eq!(sent, got, "checksums at both ends");
    eprintln!("rotation pause (longest gap between reads): {gap:?}");
    assert!(gap < Duration::from_secs(1), "pause {gap:?}");
    // The peer replaced the key in place; the address and names stayed.
    let peers = wg_peers(&a);
    assert!(
        peers.contains(&b_new) && !peers.contains(&b_old),
        "{peers:?}"
    );
    assert_eq!(b.ip(), b_ip);
    assert_eq!(
        hosts_lookup(&a, "receiver.warp").as_deref(),
        Some(b_ip.as_str())
    );
}
