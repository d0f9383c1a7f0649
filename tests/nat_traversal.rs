//! NAT traversal end to end (issue 12): members behind nftables NAT routers
//! in namespaces, running the real `sidecar` (kernel mode) against a real
//! keyserver with its STUN and relay. Every pair of the four kinds (public,
//! port-preserving, symmetric, UDP blocked) plus two members behind one
//! NAT; a pair that gains a direct path mid-run; a direct path that breaks.
//! Prints the pair table (also written to `target/<profile>/nat-matrix.txt`).
//! Needs root, nft and conntrack.

mod dataplane_support;
mod mesh_support;
mod nat_support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicBool, Ordering};

use nat_support::{transfer, transfer_until, Lab, Nat, Sidecar};

fn skip() -> Option<&'static str> {
    if let Some(why) = dataplane_support::skip_reason() {
        return Some(why);
    }
    for tool in ["/usr/sbin/nft", "/usr/sbin/conntrack"] {
        if !std::path::Path::new(tool).exists() {
            return Some("needs nft and conntrack");
        }
    }
    None
}

macro_rules! require_lab {
    () => {
        if let Some(why) = skip() {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
}

/// Bounds asserted (the targets are 2 s and 5 s; CI machines are loaded).
const RELAY_FIRST_BYTE: Duration = Duration::from_secs(4);
const DIRECT_FOUND: Duration = Duration::from_secs(8);

/// Waits until `sc` has joined (its IP), at most `limit`.
fn joined_ip(sc: &Sidecar, limit: Duration) -> Option<String> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(ip) = sc.ip() {
            return Some(ip);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// Polls `sc`'s path every 100 ms from now until `limit`; the first time
/// (since `t0`) it was `kind`.
fn first_path(sc: &Sidecar, kind: &str, t0: Instant, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if sc.path() == kind {
            return Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// What a pair is expected to get.
fn expected(a: Nat, b: Nat) -> &'static str {
    use Nat::*;
    match (a, b) {
        (UdpBlocked, _) | (_, UdpBlocked) => "relay",
        (Public, _) | (_, Public) | (PortPreserving, PortPreserving) => "direct",
        _ => "relay",
    }
}

struct Row {
    name: String,
    connected: bool,
    path: String,
    expected: &'static str,
    first_byte: Option<Duration>,
    direct_after: Option<Duration>,
    checksum: bool,
    note: String,
}

/// Runs one pair: joins both, a 1 MiB transfer a → b, the path.
fn run_pair(lab: &Lab, i: usize, a: Nat, b: Nat, same_nat: bool) -> Row {
    let token = lab.network(&format!("pair{i}"));
    let (ma, ra) = lab.member(a);
    let mb = if same_nat {
        lab.behind(ra.as_ref().expect("a router"))
    } else {
        lab.member(b).0
    };
    let t0 = Instant::now();
    let sa = lab.sidecar(&ma, &token, "a");
    let sb = lab.sidecar(&mb, &token, "b");
    let name = if same_nat {
        format!("{} + same NAT", a.name())
    } else {
        format!("{} + {}", a.name(), b.name())
    };
    let expect = if same_nat { "direct" } else { expected(a, b) };
    let Some(ip_b) = joined_ip(&sb, Duration::from_secs(20)) else {
        return Row {
            name,
            connected: false,
            path: "-".into(),
            expected: expect,
            first_byte: None,
            direct_after: None,
            checksum: false,
            note: "b never joined".into(),
        };
    };
    let tr = transfer(
        &mb.ns,
        &ma.ns,
        &ip_b,
        7100,
        1 << 20,
        Duration::ZERO,
        Duration::from_secs(20),
    );
    let direct_after = if expect == "direct" {
        first_path(&sa, "direct", t0, DIRECT_FOUND)
    } else {
        // Give a wrong direct path a chance to show up.
        std::thread::sleep(Duration::from_secs(2));
        None
    };
    let connected = tr.first_byte.is_some() && tr.error.is_none();
    let row = Row {
        name,
        connected,
        path: sa.path(),
        expected: expect,
        first_byte: tr.first_byte.map(|t| t.duration_since(t0)),
        direct_after,
        checksum: connected && tr.sent_sha == tr.received_sha,
        note: tr.error.unwrap_or_default(),
    };
    let slow = row.path == "relay" && row.first_byte.is_some_and(|t| t > RELAY_FIRST_BYTE);
    if !row.connected || row.path != expect || slow {
        eprintln!(
            "--- {} failed: a's log:\n{}\n--- b's log:\n{}",
            row.name,
            sa.log_text(),
            sb.log_text()
        );
    }
    row
}

fn print_table(rows: &[Row]) -> String {
    let ms =
        |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.2} s", d.as_secs_f64()));
    let mut t = String::from(
        "\n| pair | connected | path | expected | first byte | direct after | checksum |\n|---|---|---|---|---:|---:|---|\n",
    );
    for r in rows {
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |{}\n",
            r.name,
            if r.connected { "yes" } else { "no" },
            r.path,
            r.expected,
            ms(r.first_byte),
            ms(r.direct_after),
            if r.checksum { "ok" } else { "-" },
            if r.note.is_empty() {
                String::new()
            } else {
                format!(" {}", r.note)
            }
        ));
    }
    eprintln!("{t}");
    let out = mesh_support::bin("sidecar").with_file_name("nat-matrix.txt");
    let _ = std::fs::write(out, &t);
    t
}

/// Taken by the tests that load both cores for long (the matrix's eight
/// sidecars, the 100 MiB relayed transfer): together, joins in the matrix
/// took over its 20 s bound once in CI.
static HEAVY: Mutex<()> = Mutex::new(());

fn heavy() -> std::sync::MutexGuard<'static, ()> {
    HEAVY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[test]
fn nat_matrix() {
    require_lab!();
    let _heavy = heavy();
    let lab = Arc::new(Lab::new());
    let mut jobs: Vec<(usize, Nat, Nat, bool)> = Vec::new();
    for a in Nat::ALL {
        for b in Nat::ALL {
            jobs.push((jobs.len(), a, b, false));
        }
    }
    jobs.push((jobs.len(), Nat::PortPreserving, Nat::PortPreserving, true));
    let queue = Arc::new(Mutex::new(jobs));
    let rows = Arc::new(Mutex::new(Vec::new()));
    // Four pairs at a time: eight sidecars on two cores.
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (lab, queue, rows) = (lab.clone(), queue.clone(), rows.clone());
            std::thread::spawn(move || loop {
                let Some((i, a, b, same)) = queue.lock().unwrap().pop() else {
                    return;
                };
                let row = run_pair(&lab, i, a, b, same);
                rows.lock().unwrap().push((i, row));
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let mut rows = std::mem::take(&mut *rows.lock().unwrap());
    rows.sort_by_key(|(i, _)| *i);
    let rows: Vec<Row> = rows.into_iter().map(|(_, r)| r).collect();
    print_table(&rows);
    // The embedded relay's counters, on the admin API (bearer token).
    let token = std::fs::read_to_string(lab.ks_dir.join("admin-token")).unwrap();
    let metrics = dataplane_support::must(
        "ip",
        &[
            "netns",
            "exec",
            &lab.ks_ns,
            "curl",
            "-s",
            "-H",
            &format!("Authorization: Bearer {}", token.trim()),
            "http://127.0.0.1:7001/metrics",
        ],
    );
    let forwarded: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("istmesh_relay_forwarded_bytes_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        forwarded > 7 << 20,
        "seven relayed pairs moved 1 MiB each: {metrics}"
    );
    let mut bad = Vec::new();
    for r in &rows {
        if !r.connected || !r.checksum {
            bad.push(format!("{}: not connected", r.name));
            continue;
        }
        if r.path != r.expected {
            bad.push(format!(
                "{}: path {} (expected {})",
                r.name, r.path, r.expected
            ));
        }
        // Targets: 2 s to the first byte on the relay, 5 s to a direct
        // path; asserted with room for a loaded machine (the table shows
        // the figures).
        if r.path == "relay" && r.first_byte.is_some_and(|t| t > RELAY_FIRST_BYTE) {
            bad.push(format!("{}: first byte after {:?}", r.name, r.first_byte));
        }
        if r.expected == "direct" && r.direct_after.is_none_or(|t| t > DIRECT_FOUND) {
            bad.push(format!("{}: direct after {:?}", r.name, r.direct_after));
        }
    }
    assert!(bad.is_empty(), "{bad:#?}");
}

/// A TCP transfer a → b running in the background until stopped.
fn background(
    server_ns: &str,
    client_ns: &str,
    ip: &str,
) -> (
    Arc<AtomicBool>,
    std::thread::JoinHandle<nat_support::Transfer>,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let (s, c, ip, flag) = (
        server_ns.to_owned(),
        client_ns.to_owned(),
        ip.to_owned(),
        stop.clone(),
    );
    let t = std::thread::spawn(move || {
        // About 3 MB/s: 64 KiB every 20 ms.
        transfer_until(
            &s,
            &c,
            &ip,
            7200,
            1 << 30,
            Duration::from_millis(20),
            Duration::from_secs(20),
            Some(flag),
        )
    });
    (stop, t)
}

fn finish(stop: Arc<AtomicBool>, t: std::thread::JoinHandle<nat_support::Transfer>) {
    stop.store(true, Ordering::Relaxed);
    let tr = t.join().unwrap();
    assert!(
        tr.error.is_none(),
        "the TCP connection broke: {:?}",
        tr.error
    );
    assert!(tr.first_byte.is_some(), "nothing arrived");
    assert_eq!(tr.sent_sha, tr.received_sha, "checksums differ");
}

#[test]
fn a_relayed_pair_moves_to_a_new_direct_path_without_a_reset() {
    require_lab!();
    let lab = Lab::new();
    let token = lab.network("upgrade");
    let (ma, ra) = lab.member(Nat::Symmetric);
    let (mb, rb) = lab.member(Nat::Symmetric);
    let t0 = Instant::now();
    let sa = lab.sidecar(&ma, &token, "a");
    let sb = lab.sidecar(&mb, &token, "b");
    let ip_b = joined_ip(&sb, Duration::from_secs(20)).expect("b joined");
    assert!(
        first_path(&sa, "relay", t0, Duration::from_secs(10)).is_some(),
        "starts on the relay: {}",
        sa.log_text()
    );
    let (stop, t) = background(&mb.ns, &ma.ns, &ip_b);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(sa.path(), "relay", "symmetric NATs: no direct path");
    // Both NATs become port-preserving (their mappings are forgotten).
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    ra.set_nat(Nat::PortPreserving);
    rb.set_nat(Nat::PortPreserving);
    let changed = Instant::now();
    let a_direct = first_path(&sa, "direct", changed, Duration::from_secs(45));
    let b_direct = first_path(&sb, "direct", changed, Duration::from_secs(45));
    eprintln!("direct after the NAT change: a {a_direct:?}, b {b_direct:?}");
    assert!(
        a_direct.is_some() && b_direct.is_some(),
        "no direct path: a's log:\n{}\nb's log:\n{}",
        sa.log_text(),
        sb.log_text()
    );
    std::thread::sleep(Duration::from_secs(2));
    finish(stop, t);
}

#[test]
fn a_broken_direct_path_falls_back_to_the_relay_within_3s() {
    require_lab!();
    let lab = Lab::new();
    let token = lab.network("fallback");
    let (ma, ra) = lab.member(Nat::PortPreserving);
    let (mb, rb) = lab.member(Nat::PortPreserving);
    let t0 = Instant::now();
    let sa = lab.sidecar(&ma, &token, "a");
    let sb = lab.sidecar(&mb, &token, "b");
    let ip_b = joined_ip(&sb, Duration::from_secs(20)).expect("b joined");
    assert!(first_path(&sa, "direct", t0, Duration::from_secs(10)).is_some());
    assert!(first_path(&sb, "direct", t0, Duration::from_secs(10)).is_some());
    let (stop, t) = background(&mb.ns, &ma.ns, &ip_b);
    std::thread::sleep(Duration::from_secs(2));
    // The direct path breaks (a's router drops everything to and from b's
    // router); the relay is still reachable.
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    ra.block(&rb.wan, true);
    let broke = Instant::now();
    let a_relay = first_path(&sa, "relay", broke, Duration::from_secs(10));
    let b_relay = first_path(&sb, "relay", broke, Duration::from_secs(10));
    eprintln!("relay after the break: a {a_relay:?}, b {b_relay:?}");
    for (who, t) in [("a", a_relay), ("b", b_relay)] {
        let t = t.unwrap_or_else(|| panic!("{who} never fell back"));
        assert!(t <= Duration::from_secs(3), "{who} fell back after {t:?}");
    }
    std::thread::sleep(Duration::from_secs(3));
    finish(stop, t);
}

#[test]
fn coturn_gives_members_their_server_reflexive_address() {
    require_lab!();
    if !std::path::Path::new("/usr/bin/turnserver").exists() {
        eprintln!("SKIPPED: needs coturn's turnserver");
        return;
    }
    // coturn in STUN-only mode beside the keyserver; the keyserver runs no
    // STUN or relay of its own, and names coturn as the STUN server.
    let lab = Lab::with_keyserver_args(
        &["--relay-listen", "off", "--stun-server", "192.0.2.2:3479"],
        |lab| {
            lab.spawn_in(
                &lab.ks_ns,
                "/usr/bin/turnserver",
                &[
                    "-n",
                    "--stun-only",
                    "--no-cli",
                    "--no-tls",
                    "--no-dtls",
                    "-L",
                    "192.0.2.2",
                    "-p",
                    "3479",
                    "--log-file",
                    "stdout",
                    "--pidfile",
                    "/dev/null",
                ],
                "coturn.log",
            );
        },
    );
    let token = lab.network("coturn");
    // Behind a symmetric NAT: the WireGuard socket's mapping toward coturn
    // is a random port, which only STUN from that socket can learn (the
    // keyserver's own guess uses the WireGuard port, 51820).
    let (ma, ra) = lab.member(Nat::Symmetric);
    let wan = ra.as_ref().unwrap().wan.clone();
    let mb = lab.public();
    let sa = lab.sidecar(&ma, &token, "a");
    let sb = lab.sidecar(&mb, &token, "b");
    let start = Instant::now();
    let mut learned = None;
    while start.elapsed() < Duration::from_secs(20) && learned.is_none() {
        let list = lab.admin(&["member", "list", "--network", "coturn", "--json"]);
        let members: serde_json::Value = serde_json::from_str(&list).unwrap();
        learned = members
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|m| m["endpoints"].as_array().cloned().unwrap_or_default())
            .filter_map(|e| e.as_str().map(str::to_owned))
            .find(|e| e.starts_with(&format!("{wan}:")) && !e.ends_with(":51820"));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        learned.is_some(),
        "no server-reflexive candidate from coturn; a's log:\n{}",
        sa.log_text()
    );
    eprintln!("a learned {learned:?} from coturn");
    // And the pair connects directly (b is public).
    let ip_b = joined_ip(&sb, Duration::from_secs(10)).unwrap();
    let tr = transfer(
        &mb.ns,
        &ma.ns,
        &ip_b,
        7300,
        64 << 10,
        Duration::ZERO,
        Duration::from_secs(20),
    );
    assert_eq!(tr.sent_sha, tr.received_sha);
    assert!(first_path(&sa, "direct", Instant::now(), Duration::from_secs(8)).is_some());
}

#[test]
fn the_relay_runs_as_its_own_process() {
    require_lab!();
    let _heavy = heavy();
    // The keyserver runs no relay; members are told about `keyserver
    // relay` on another host, which has a copy of the relay secret.
    let lab = Lab::with_keyserver_args(
        &[
            "--relay-listen",
            "off",
            "--relay-advertise",
            "192.0.2.3:3478",
        ],
        |_| {},
    );
    let relay = lab.host_at("rl", "192.0.2.3");
    let secret = lab.ks_dir.join("relay-secret");
    let copy = lab.dir.path().join("relay-secret.copy");
    std::fs::copy(&secret, &copy).expect("the keyserver made its relay secret");
    let keyserver = mesh_support::bin("keyserver");
    lab.spawn_in(
        &relay.ns,
        keyserver.to_str().unwrap(),
        &[
            "relay",
            "--listen",
            "192.0.2.3:3478",
            "--secret-file",
            copy.to_str().unwrap(),
            "--metrics",
            "127.0.0.1:9478",
        ],
        "relay.log",
    );
    let token = lab.network("standalone");
    let (ma, _ra) = lab.member(Nat::Symmetric);
    let (mb, _rb) = lab.member(Nat::Symmetric);
    let t0 = Instant::now();
    // A opens and seals on two crypto workers (relayed datagrams too: the
    // WireGuard datagram inside a relay frame); B on its loops.
    let sa = lab.sidecar_with(&ma, &token, "a", &["--crypto-workers", "2"]);
    let sb = lab.sidecar(&mb, &token, "b");
    let ip_b = joined_ip(&sb, Duration::from_secs(20)).expect("b joined");
    let tr = transfer(
        &mb.ns,
        &ma.ns,
        &ip_b,
        7400,
        1 << 20,
        Duration::ZERO,
        Duration::from_secs(20),
    );
    assert!(
        tr.error.is_none() && tr.first_byte.is_some(),
        "{:?}\n{}",
        tr.error,
        sa.log_text()
    );
    assert_eq!(tr.sent_sha, tr.received_sha);
    eprintln!("first byte after {:?}", tr.first_byte.map(|t| t - t0));
    assert_eq!(sa.path(), "relay");
    let peer = sa.peer().unwrap();
    assert_eq!(
        peer["endpoint"].as_str(),
        Some("192.0.2.3:3478"),
        "wg show's endpoint is the relay"
    );
    // Its metrics count what it forwarded.
    let out = dataplane_support::must(
        "ip",
        &[
            "netns",
            "exec",
            &relay.ns,
            "curl",
            "-s",
            "http://127.0.0.1:9478/metrics",
        ],
    );
    let forwarded: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("istmesh_relay_forwarded_bytes_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(forwarded > 1 << 20, "{out}");
    assert!(out.contains("istmesh_relay_members 2"), "{out}");
    // 100 MiB through the relay's batches (GRO in, GSO out, a thread per
    // socket): intact, and without the stalls reordering would cause
    // (TCP would crawl on retransmissions: the bound is generous for a
    // debug build on two cores, a stall-free run takes a fraction).
    let started = Instant::now();
    let big = transfer(
        &mb.ns,
        &ma.ns,
        &ip_b,
        7401,
        100 << 20,
        Duration::ZERO,
        Duration::from_secs(150),
    );
    let took = started.elapsed();
    assert!(big.error.is_none(), "{:?}", big.error);
    assert_eq!(big.sent_sha, big.received_sha, "100 MiB, checksum intact");
    assert!(took < Duration::from_secs(150), "100 MiB took {took:?}");
    eprintln!(
        "100 MiB through the relay in {took:?} ({:.0} Mbit/s)",
        (100u64 << 23) as f64 / took.as_secs_f64() / 1e6
    );
    assert_eq!(sa.path(), "relay");
    assert!(out.contains("istmesh_relay_build_info{version=\""), "{out}");
    assert!(out.contains("# TYPE process_open_fds gauge"), "{out}");
    assert_eq!(meshlib::metrics::lint(&out), Ok(()));
}

#[test]
fn userspace_members_behind_nats_use_the_same_paths() {
    require_lab!();
    // Rootless mode runs the same engine: a relayed pair (symmetric NATs)
    // and a direct one (port-preserving), each serving port 7500 on
    // loopback and reaching the other at 127.77.<c>.<d>.
    let lab = Lab::new();
    for (name, nat, want) in [
        ("usrelay", Nat::Symmetric, "relay"),
        ("usdirect", Nat::PortPreserving, "direct"),
    ] {
        let token = lab.network(name);
        let (ma, _ra) = lab.member(nat);
        let (mb, _rb) = lab.member(nat);
        let flags = ["--mode", "userspace", "--port", "7500"];
        let t0 = Instant::now();
        let sa = lab.sidecar_with(&ma, &token, "a", &flags);
        let sb = lab.sidecar_with(&mb, &token, "b", &flags);
        let ip_b = joined_ip(&sb, Duration::from_secs(20)).expect("b joined");
        let octets: Vec<&str> = ip_b.split('.').collect();
        let loopback = format!("127.77.{}.{}", octets[2], octets[3]);
        let tr = transfer(
            &mb.ns,
            &ma.ns,
            &loopback,
            7500,
            1 << 20,
            Duration::ZERO,
            Duration::from_secs(20),
        );
        assert!(
            tr.error.is_none() && tr.first_byte.is_some(),
            "{name}: {:?}\n{}",
            tr.error,
            sa.log_text()
        );
        assert_eq!(tr.sent_sha, tr.received_sha, "{name}");
        assert!(
            first_path(&sa, want, t0, Duration::from_secs(8)).is_some(),
            "{name}: path {}",
            sa.path()
        );
    }
}

#[test]
fn a_member_on_the_tcp_relay_returns_to_udp_when_udp_works_again() {
    require_lab!();
    let lab = Lab::new();
    let token = lab.network("tcpback");
    let (ma, ra) = lab.member(Nat::UdpBlocked);
    let (mb, _rb) = lab.member(Nat::Symmetric);
    let t0 = Instant::now();
    let sa = lab.sidecar(&ma, &token, "a");
    let sb = lab.sidecar(&mb, &token, "b");
    let ip_b = joined_ip(&sb, Duration::from_secs(20)).expect("b joined");
    assert!(first_path(&sa, "relay", t0, Duration::from_secs(10)).is_some());
    assert!(sa.log_text().contains("using TCP"), "{}", sa.log_text());
    let (stop, t) = background(&mb.ns, &ma.ns, &ip_b);
    std::thread::sleep(Duration::from_secs(2));
    // UDP passes again: within a retry period the relay is used over UDP.
    ra.unwrap().set_nat(Nat::PortPreserving);
    let start = Instant::now();
    while !sa.log_text().contains("relay over UDP works again") {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "still on TCP: {}",
            sa.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(sa.path(), "relay", "b is behind a symmetric NAT");
    finish(stop, t);
}

#[test]
fn members_on_two_replicas_behind_symmetric_nats_meet_at_one_relay() {
    require_lab!();
    if !std::path::Path::new("/usr/bin/etcd").exists() {
        eprintln!("SKIPPED: needs etcd");
        return;
    }
    // Two keyserver replicas on one etcd; a on the first, b on the second.
    // Symmetric NATs on both sides: only a relay joins them, and only if
    // both are told the same one and its secret signed both tickets.
    let store = "etcd://127.0.0.1:2379/replicas";
    let lab = Lab::with_keyserver_args(&["--store", store], |lab| {
        lab.start_etcd("replicas");
    });
    let second = lab.start_replica(1, store);
    let token_a = lab.network("two-replicas");
    let token_b = lab.token_at(&second, "two-replicas");
    let (ma, _ra) = lab.member(Nat::Symmetric);
    let (mb, _rb) = lab.member(Nat::Symmetric);
    let sa = lab.sidecar(&ma, &token_a, "a");
    let sb = lab.sidecar(&mb, &token_b, "b");
    let ip_b = joined_ip(&sb, Duration::from_secs(20)).expect("b joined");
    joined_ip(&sa, Duration::from_secs(20)).expect("a joined");
    let server = |sc: &Sidecar| {
        sc.status()
            .and_then(|s| s["control"]["server"].as_str().map(str::to_owned))
    };
    assert_eq!(
        server(&sa).as_deref(),
        Some("192.0.2.2:7000"),
        "a on the first replica"
    );
    assert_eq!(
        server(&sb).as_deref(),
        Some("192.0.2.2:7100"),
        "b on the second"
    );
    let tr = transfer(
        &mb.ns,
        &ma.ns,
        &ip_b,
        7600,
        1 << 20,
        Duration::ZERO,
        Duration::from_secs(30),
    );
    assert!(
        tr.error.is_none() && tr.first_byte.is_some(),
        "{:?}\n--- a:\n{}\n--- b:\n{}\n--- ks0:\n{}\n--- ks1:\n{}",
        tr.error,
        sa.log_text(),
        sb.log_text(),
        std::fs::read_to_string(lab.dir.path().join("keyserver.log")).unwrap_or_default(),
        std::fs::read_to_string(lab.dir.path().join("keyserver1.log")).unwrap_or_default()
    );
    assert_eq!(tr.sent_sha, tr.received_sha, "1 MiB, checksum intact");
    assert_eq!(sa.path(), "relay");
    let (ea, eb) = (sa.peer().unwrap(), sb.peer().unwrap());
    assert_eq!(
        ea["endpoint"], eb["endpoint"],
        "both relay through the same relay"
    );
}
