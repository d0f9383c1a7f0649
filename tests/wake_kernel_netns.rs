//! Scale to zero on internal traffic in kernel mode, with the real binaries
//! in namespaces (issue 19, item 5): a keyserver (command hooks allowed),
//! a wakeable service `api` with no online instance, three client members
//! on three hosts (`--service-addresses service`).
//!
//! - The three clients connect to the service address at once: their
//!   sidecars hold the SYNs and ask for a wake; the keyserver runs the hook
//!   once; the hook starts the `api` sidecar and its server on their host;
//!   all three connections are answered (SYN-to-answer minus the hook's
//!   own start time is printed).
//! - With a hook that starts nothing (wake timeout 3 s), the connections
//!   are refused after the wake timeout, not left hanging.
//! - A flood of 2000 SYNs to the sleeping service: held flows stay within
//!   their bound (`service_flows.active` in `sidecar status`), the
//!   client's sidecar's memory stays flat, and everything ends refused.
//!
//! Needs root (namespaces, TUN); prints SKIPPED otherwise. Everything it
//! starts lives in namespaces it made (the hook's processes too), which the
//! mesh's guards kill and remove on exit, also on failure.

mod dataplane_support;
mod mesh_support;

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dataplane_support::{in_ns, run, wait_for};
use mesh_support::{bin, Mesh, Sidecar};

const SETTLE: Duration = Duration::from_secs(30);

/// Offline after 4 s of silence (a graceful stop is offline at once);
/// command hooks allowed.
const CONFIG: &str = "offline-after-secs = 4\nallow-wake-commands = true\n";

/// The port the `api` server answers on.
const PORT: u16 = 9000;

/// The bound of held flows per service address (`meshlib::wg::flows`).
const HOLD_FLOWS_PER_ADDRESS: u64 = 256;

macro_rules! require_netns {
    () => {
        if let Some(why) = dataplane_support::skip_reason() {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
}

fn wall() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// One connection to `to`: what the server said, or why it failed, with
/// the wall-clock times of the connect and of its end.
fn connect(to: SocketAddr, limit: Duration) -> (f64, Result<String, std::io::ErrorKind>, f64) {
    let start = wall();
    let result = TcpStream::connect_timeout(&to, limit).and_then(|mut s| {
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    });
    (start, result.map_err(|e| e.kind()), wall())
}

/// Three clients connect to `to` at once, each from its namespace.
fn three_at_once(
    clients: &[Sidecar],
    to: SocketAddr,
    limit: Duration,
) -> Vec<(f64, Result<String, std::io::ErrorKind>, f64)> {
    let barrier = Arc::new(Barrier::new(clients.len()));
    let threads: Vec<_> = clients
        .iter()
        .map(|c| {
            let b = barrier.clone();
            in_ns(&c.host.ns, move || {
                b.wait();
                connect(to, limit)
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// The sidecar process of namespace `ns` (`ip netns exec` execs it).
fn sidecar_pid(ns: &str) -> u32 {
    let out = run("ip", &["netns", "pids", ns]);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "sidecar")
        })
        .expect("the sidecar's pid")
}

/// Resident memory of `pid`, KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

fn flows(sc: &Sidecar, what: &str) -> u64 {
    sc.status().expect("status")["service_flows"][what]
        .as_u64()
        .unwrap_or(0)
}

/// Lines in `path` (the hook's run counter), 0 if none.
fn runs(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |s| s.lines().count())
}

/// Writes an executable hook script.
fn script(path: &std::path::Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn wakeable_service_holds_wakes_once_refuses_after_timeout_and_bounds_floods() {
    require_netns!();
    let mut mesh = Mesh::with_keyserver_config(CONFIG);
    let token = mesh.token_for("prod", 20);
    let client_hosts = [mesh.host(2), mesh.host(3), mesh.host(4)];
    let api_host = mesh.host(5);
    let api_args = [
        "--token",
        &token,
        "--service-addresses",
        "service",
        "--port",
        "9000",
    ];

    // `api` joins once (its service gets its address), then stops: the
    // service has no online instance.
    let mut api = mesh.sidecar(&api_host, "api", "up", &api_args);
    wait_for(SETTLE, || api.status().is_some_and(|s| s["ip"].is_string()));
    api.stop();
    let vip: Ipv4Addr = {
        let out = mesh.admin(&["service-address", "get", "api", "--network", "prod"]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("json");
        v["ip"].as_str().expect("the address").parse().unwrap()
    };
    eprintln!("api's service address: {vip}");

    // The wake hook: counts its runs, notes its start, and starts the api
    // sidecar (resuming from its state directory) and its server.
    let dir = mesh.topo.temp_path("hooks");
    std::fs::create_dir_all(&dir).unwrap();
    let counter = dir.join("wake.count");
    let wake = dir.join("wake.sh");
    let log = api.log.display().to_string();
    script(
        &wake,
        &format!(
            "date +%s.%N >> {counter}\n\
             ip netns exec {ns} setsid socat TCP-LISTEN:{PORT},fork,reuseaddr SYSTEM:'echo woke' </dev/null >/dev/null 2>&1 &\n\
             ISTM_LOG=info ip netns exec {ns} setsid {sidecar} up --service api --interface {iface} --metrics off --state-dir {state} {args} </dev/null >>{log} 2>&1 &\n\
             exit 0\n",
            counter = counter.display(),
            ns = api_host.ns,
            sidecar = bin("sidecar").display(),
            iface = api.interface,
            state = api.state_dir.display(),
            args = api_args.join(" "),
        ),
    );
    let wake_path = wake.display().to_string();
    mesh.admin(&[
        "service-address",
        "set",
        "api",
        "--network",
        "prod",
        "--wake-timeout",
        "10s",
        "--wake-command",
        &wake_path,
    ]);

    let clients: Vec<Sidecar> = client_hosts
        .iter()
        .map(|h| {
            mesh.sidecar(
                h,
                "client",
                "up",
                &["--token", &token, "--service-addresses", "service"],
            )
        })
        .collect();
    for c in &clients {
        c.wait_peers(2, SETTLE);
        wait_for(SETTLE, || {
            c.getent("api.warp").as_deref() == Some(&*vip.to_string())
        });
    }
    let to = SocketAddr::from((vip, PORT));

    // 1. Three clients at once: held, one wake, all answered.
    let results = three_at_once(&clients, to, Duration::from_secs(15));
    let hook_runs = std::fs::read_to_string(&counter).unwrap_or_default();
    let hook_start: f64 = hook_runs
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .expect("the hook ran");
    for (syn, r, end) in &results {
        eprintln!(
            "woken: {r:?}; SYN to answer {:.3} s, of which before the hook started {:.3} s, after it {:.3} s",
            end - syn,
            hook_start - syn,
            end - hook_start
        );
    }
    let statuses: Vec<_> = clients
        .iter()
        .map(|c| c.status().unwrap()["service_flows"].clone())
        .collect();
    eprintln!("clients' service flows: {statuses:?}");
    assert!(
        results.iter().all(|(_, r, _)| r.as_deref() == Ok("woke\n")),
        "{results:?}"
    );
    assert_eq!(runs(&counter), 1, "the hook ran once: {hook_runs}");
    // The clients report their traffic (every 10 s): the keyserver's
    // service graph shows client → api, three flows held and opened.
    let mut edge = serde_json::Value::Null;
    wait_for(Duration::from_secs(15), || {
        let out = mesh.admin(&["network", "traffic", "prod", "--json"]);
        let graph: serde_json::Value = serde_json::from_str(&out).expect("json");
        edge = graph["edges"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["source"] == "client" && e["destination"] == "api")
            .cloned()
            .unwrap_or_default();
        edge["reporters"] == 3 && edge["opened"] == 3
    });
    eprintln!("client -> api at the keyserver: {edge}");
    assert_eq!(edge["held"], 3, "{edge}");
    assert_eq!(edge["refused"], 0, "{edge}");
    assert_eq!(edge["connect_count"], 3, "{edge}");
    assert!(edge["bytes_received"].as_u64().unwrap() > 0, "{edge}");
    // The same counters in each client's `sidecar status`.
    for c in &clients {
        let status = c.status().expect("status");
        let traffic = &status["traffic"];
        assert_eq!(traffic["source"], "client", "{traffic}");
        let api = traffic["pairs"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["destination"] == "api")
            .unwrap_or_else(|| panic!("no api pair: {traffic}"));
        assert_eq!(api["counters"]["opened"], 1, "{api}");
        assert_eq!(api["counters"]["held"], 1, "{api}");
    }

    // 2. A hook that starts nothing: refused after the wake timeout.
    let api_pid = sidecar_pid(&api_host.ns);
    run("kill", &["-TERM", &api_pid.to_string()]);
    wait_for(SETTLE, || {
        clients.iter().all(|c| {
            c.status()
                .is_some_and(|s| s["peers"].as_array().map_or(0, Vec::len) == 2)
        })
    });
    let idle_counter = dir.join("idle.count");
    let idle = dir.join("idle.sh");
    script(
        &idle,
        &format!("date +%s.%N >> {}\nexit 0\n", idle_counter.display()),
    );
    let idle_path = idle.display().to_string();
    mesh.admin(&[
        "service-address",
        "set",
        "api",
        "--network",
        "prod",
        "--wake-timeout",
        "3s",
        "--wake-command",
        &idle_path,
    ]);
    // The clients' maps carry the new timeout; their member cores ask
    // again once the first wake's timeout (10 s) is over.
    let since = wall() - hook_start;
    std::thread::sleep(Duration::from_secs_f64((11.0 - since).max(1.0)));
    let results = three_at_once(&clients, to, Duration::from_secs(15));
    for (syn, r, end) in &results {
        eprintln!("never woken: {r:?} after {:.3} s", end - syn);
    }
    for (syn, r, end) in &results {
        assert_eq!(
            *r,
            Err(std::io::ErrorKind::ConnectionRefused),
            "{results:?}"
        );
        let took = end - syn;
        assert!((2.9..4.5).contains(&took), "refused after {took:.3} s");
    }
    wait_for(Duration::from_secs(5), || runs(&idle_counter) >= 1);
    assert_eq!(runs(&counter), 1, "the first hook did not run again");

    // 3. A SYN flood to the sleeping service from one client.
    let flooder = &clients[0];
    let pid = sidecar_pid(&flooder.host.ns);
    let rss_before = rss_kib(pid);
    let max_active = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let flooding = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flood = {
        let flag = flooding.clone();
        in_ns(&flooder.host.ns, move || {
            // Non-blocking connects given up at once: each is one SYN of a
            // new flow (the kernel retransmits none of them).
            let mut outcomes = [0u32; 3];
            for _ in 0..2000 {
                match TcpStream::connect_timeout(&to, Duration::from_millis(2)) {
                    Ok(_) => outcomes[0] += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => outcomes[1] += 1,
                    Err(_) => outcomes[2] += 1,
                }
            }
            flag.store(false, std::sync::atomic::Ordering::Relaxed);
            outcomes
        })
    };
    let started = Instant::now();
    while flooding.load(std::sync::atomic::Ordering::Relaxed) && started.elapsed() < SETTLE {
        let active = flows(flooder, "active");
        max_active.fetch_max(active, std::sync::atomic::Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(100));
    }
    let outcomes = flood.join().unwrap();
    let max_active = max_active.load(std::sync::atomic::Ordering::Relaxed);
    let rss_after = rss_kib(pid);
    eprintln!(
        "flood of 2000 SYNs in {:?}: connected {}, refused at once {}, given up {}; at most {max_active} flows held; RSS {rss_before} KiB -> {rss_after} KiB",
        started.elapsed(),
        outcomes[0],
        outcomes[1],
        outcomes[2]
    );
    assert_eq!(outcomes[0], 0);
    assert!(max_active <= HOLD_FLOWS_PER_ADDRESS, "{max_active}");
    assert!(outcomes[1] > 0, "past the bound, refused at once");
    assert!(
        rss_after < rss_before + 4 * 1024,
        "RSS {rss_before} KiB -> {rss_after} KiB"
    );
    // Every held flow ends (refused after the wake timeout).
    wait_for(Duration::from_secs(8), || flows(flooder, "active") == 0);
    eprintln!(
        "flooder's service flows: {}",
        flooder.status().unwrap()["service_flows"]
    );
    drop(clients);
}
