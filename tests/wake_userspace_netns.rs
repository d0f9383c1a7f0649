//! Scale to zero on internal traffic in userspace mode, with the real
//! binaries (issue 19, item 5): a wakeable service with no online instance;
//! client members (`sidecar up --mode userspace`, each in a namespace
//! of its own) connect at once to the loopback standing for its service
//! address (`WARP_IST_api`), with a fourth started only after the
//! service's last instance left the map (it learns the service's ports from
//! the address); the keyserver's wake hook (a command) starts an
//! instance (its server and its sidecar) and runs once; every held
//! connection is answered by it. Then, for a service whose hook starts
//! nothing: the held connections are reset after the wake timeout, never
//! left hanging, and a flood of 2000 connections keeps the client sidecar's
//! memory flat (at most 256 held, the rest reset at once) and all end.
//!
//! Packets stay on loopback and inside the namespaces the test creates;
//! everything (namespaces, sidecars, the hook's processes) is removed on
//! drop, also on failure. Needs root; prints SKIPPED otherwise.

mod dataplane_support;
mod mesh_support;

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dataplane_support::{in_ns, run, wait_for, Host};
use mesh_support::{bin, Mesh, Sidecar};

const SETTLE: Duration = Duration::from_secs(20);
/// The port `api` serves (woken by a hook that starts an instance).
const API_PORT: u16 = 9100;
/// The port `cold` serves (its hook starts nothing).
const COLD_PORT: u16 = 9200;

/// The two tests share the machine's two cores: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

macro_rules! require_netns {
    () => {
        if let Some(why) = dataplane_support::skip_reason() {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// `WARP_IST_<service>` in a client's env file, once it names a service
/// address's loopback (`127.77.4.x`: the block after the /22).
fn read_warp_ist(client: &Sidecar, service: &str) -> Ipv4Addr {
    let path = client.state_dir.join("ist.env");
    let prefix = format!("WARP_IST_{service}=");
    let mut found = None;
    wait_for(SETTLE, || {
        let env = std::fs::read_to_string(&path).unwrap_or_default();
        found = env
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.trim_matches('\'').trim_matches('"').parse().ok())
            .filter(|ip: &Ipv4Addr| ip.octets()[..3] == [127, 77, 4]);
        found.is_some()
    });
    found.unwrap()
}

/// Peers in a sidecar's status.
fn peers(s: &Sidecar) -> usize {
    s.status()
        .and_then(|s| s["peers"].as_array().map(Vec::len))
        .unwrap_or(usize::MAX)
}

/// A mesh with three clients and one service that joined once (one
/// instance announcing `port`, then stopped): the service has an address,
/// listeners on every client, and no online instance.
struct Setup {
    mesh: Mesh,
    token: String,
    /// The runner namespace where instances of the service start.
    runner: Host,
    clients: Vec<Sidecar>,
    /// The service address's loopback, as each client's env gives it.
    vip: Ipv4Addr,
}

impl Setup {
    fn new(service: &str, port: u16) -> Self {
        let mut mesh =
            Mesh::with_keyserver_config("offline-after-secs = 4\nallow-wake-commands = true\n");
        let token = mesh.token_for("prod", 20);
        let runner = mesh.host(2);
        let port_s = port.to_string();
        let args = [
            "--token",
            token.as_str(),
            "--mode",
            "userspace",
            "--port",
            port_s.as_str(),
        ];
        let mut first = mesh.sidecar_in(&runner, service, "up", &args, "first");
        let client_args = [
            "--token",
            token.as_str(),
            "--mode",
            "userspace",
            "--service-addresses",
            "service",
        ];
        let clients: Vec<Sidecar> = (3..6)
            .map(|i| {
                let h = mesh.host(i);
                mesh.sidecar(&h, &format!("client{i}"), "up", &client_args)
            })
            .collect();
        for c in &clients {
            c.wait_peers(3, SETTLE);
        }
        let vip = read_warp_ist(&clients[0], service);
        for c in &clients[1..] {
            assert_eq!(read_warp_ist(c, service), vip);
        }
        // The only instance stops gracefully: the service sleeps.
        first.stop();
        wait_for(SETTLE, || clients.iter().all(|c| peers(c) == 2));
        Self {
            mesh,
            token,
            runner,
            clients,
            vip,
        }
    }

    /// Makes `service` wakeable with `hook` (a command) and `timeout`, and
    /// gives the push time to reach the clients.
    fn wakeable(&self, service: &str, timeout: &str, hook: &[&str]) {
        let mut args = vec![
            "service-address",
            "set",
            service,
            "--network",
            "prod",
            "--wake-timeout",
            timeout,
            "--wake-command",
        ];
        args.extend_from_slice(hook);
        self.mesh.admin(&args);
        let got = self
            .mesh
            .admin(&["service-address", "get", service, "--network", "prod"]);
        eprintln!("{got}");
        std::thread::sleep(Duration::from_secs(2));
    }

    /// Prints the keyserver's, the clients' and `extra` logs (on failure).
    fn dump(&self, extra: &[&str]) {
        let tail = |p: &Path| {
            let t = std::fs::read_to_string(p).unwrap_or_default();
            let lines: Vec<&str> = t.lines().collect();
            let keep = if std::env::var_os("ISTM_TEST_DUMP").is_some() {
                lines.len()
            } else {
                40
            };
            lines[lines.len().saturating_sub(keep)..].join("\n")
        };
        eprintln!("== keyserver\n{}", tail(&self.path("keyserver.log")));
        for c in &self.clients {
            eprintln!("== {}\n{}", c.host.ns, tail(&c.log));
        }
        for e in extra {
            eprintln!("== {e}\n{}", tail(&self.path(e)));
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.mesh.topo.temp_path(name)
    }
}

/// What one client saw: the answer (`None`: reset or closed empty), when
/// its SYN left (seconds since the epoch) and how long until the answer or
/// the end.
type Outcome = (Option<String>, f64, Duration);

/// From `ns`, one connection to `to`, read to its end (limits 20 s).
fn connect_once(ns: &str, to: SocketAddr) -> std::thread::JoinHandle<Outcome> {
    in_ns(ns, move || {
        let syn = now_secs();
        let started = Instant::now();
        let got = (|| {
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(20)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).ok()?;
            (!out.is_empty()).then_some(out)
        })();
        (got, syn, started.elapsed())
    })
}

/// The wake hook: counts its runs (a line with its start time), starts a
/// server answering `api-woken` on 127.0.0.1:[`API_PORT`] and an `api`
/// sidecar (fresh state: a new instance) in `ns`, together, as a platform
/// starts a container; waits until the server listens and the sidecar
/// joined (its env file), and records that time.
fn write_wake_hook(dir: &Path, ns: &str, token: &str, log: &Path) -> PathBuf {
    let count = dir.join("hook.count");
    let state = dir.join("state-woken");
    let server_ready = dir.join("server.ready");
    let server = format!(
        "import socket\n\
         s = socket.socket()\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('127.0.0.1', {API_PORT}))\n\
         s.listen(64)\n\
         open('{ready}', 'w').write('up')\n\
         while True:\n    c, _ = s.accept()\n    c.sendall(b'api-woken')\n    c.close()\n",
        ready = server_ready.display()
    );
    std::fs::write(dir.join("server.py"), server).unwrap();
    let script = format!(
        "#!/bin/sh\n\
         echo \"start $(date +%s.%N) $ISTM_HOOK_SERVICE\" >> {count}\n\
         ip netns exec {ns} python3 {dir}/server.py >/dev/null 2>&1 &\n\
         ISTM_LOG=${{ISTM_TEST_LOG:-info}} ip netns exec {ns} {sidecar} up --service api --interface wkn{tag} \
           --metrics off --state-dir {state} --token {token} --mode userspace --port {API_PORT} \
           </dev/null >>{log} 2>&1 &\n\
         i=0\n\
         while {{ [ ! -s {state}/ist.env ] || [ ! -s {ready} ]; }} && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done\n\
         echo \"ready $(date +%s.%N)\" >> {count}\n",
        count = count.display(),
        dir = dir.display(),
        sidecar = bin("sidecar").display(),
        state = state.display(),
        ready = server_ready.display(),
        log = log.display(),
        tag = std::process::id() % 100_000,
    );
    let path = dir.join("wake.sh");
    std::fs::write(&path, script).unwrap();
    path
}

/// The `start` and `ready` times the hook recorded.
fn hook_times(count: &Path) -> (Vec<f64>, Vec<f64>) {
    let text = std::fs::read_to_string(count).unwrap_or_default();
    let times = |what: &str| -> Vec<f64> {
        text.lines()
            .filter_map(|l| l.strip_prefix(what))
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect()
    };
    (times("start "), times("ready "))
}

/// Removes the woken sidecar's UAPI socket (its process dies with the
/// namespaces).
struct SocketGuard(PathBuf);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn three_members_wake_a_sleeping_service_once_and_are_all_answered() {
    require_netns!();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = Setup::new("api", API_PORT);
    let _sock = SocketGuard(PathBuf::from(format!(
        "/var/run/wireguard/wkn{}.sock",
        std::process::id() % 100_000
    )));
    let dir = s.path("");
    let log = s.path("woken.log");
    let hook = write_wake_hook(&dir, &s.runner.ns, &s.token, &log);
    let hook_s = hook.display().to_string();
    s.wakeable("api", "10s", &["/bin/sh", &hook_s]);

    // The stopped instance was ephemeral (a first join): once the keyserver
    // removed it, a member started now has never seen an instance of `api`
    // and learns its ports from the address (which remembers them).
    wait_for(SETTLE, || {
        let out = s
            .mesh
            .admin(&["member", "list", "--network", "prod", "--json"]);
        let json: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        let list = json.as_array().or_else(|| json["members"].as_array());
        list.is_some_and(|l| l.iter().all(|m| m["service"] != "api"))
    });
    let late_host = s.mesh.host(6);
    let late_args = [
        "--token",
        s.token.as_str(),
        "--mode",
        "userspace",
        "--service-addresses",
        "service",
    ];
    let late = s.mesh.sidecar(&late_host, "client6", "up", &late_args);
    late.wait_peers(3, SETTLE);
    assert_eq!(read_warp_ist(&late, "api"), s.vip);
    s.clients.push(late);

    let to = SocketAddr::from((s.vip, API_PORT));
    let joins: Vec<_> = s
        .clients
        .iter()
        .map(|c| connect_once(&c.host.ns, to))
        .collect();
    let outcomes: Vec<Outcome> = joins.into_iter().map(|j| j.join().unwrap()).collect();
    let count = dir.join("hook.count");
    // The hook may still be writing its `ready` line.
    let deadline = Instant::now() + Duration::from_secs(12);
    while hook_times(&count).1.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let (starts, readies) = hook_times(&count);
    // `ISTM_TEST_DUMP=1` prints the logs also when all went well.
    let dump = std::env::var_os("ISTM_TEST_DUMP").is_some();
    if dump || readies.is_empty() || outcomes.iter().any(|o| o.0.is_none()) {
        s.dump(&["woken.log"]);
    }
    eprintln!("hook: {starts:?} {readies:?}; outcomes: {outcomes:?}");
    assert_eq!(starts.len(), 1, "the hook ran exactly once");
    let (start, ready) = (starts[0], readies[0]);
    let hook_own = ready - start;
    for (i, (got, syn, took)) in outcomes.iter().enumerate() {
        assert_eq!(got.as_deref(), Some("api-woken"), "client {i} answered");
        let answer = syn + took.as_secs_f64();
        eprintln!(
            "client {i}: SYN to answer {:.3} s; hook started {:.3} s after the SYN and took {hook_own:.3} s to bring the instance up (polled every 50 ms: an upper bound); SYN to answer minus the hook's own start time: {:.3} s",
            took.as_secs_f64(),
            start - syn,
            took.as_secs_f64() - hook_own,
        );
        assert!(answer >= start, "answered after the hook started");
    }
    // Still once, a while later (the wake is deduplicated, not repeated).
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(hook_times(&count).0.len(), 1);

    // Traffic per service: each client's status counts its flow to `api`
    // (held, then opened), and the agent's reports (every 10 s) reach the
    // keyserver's service graph as one edge per client service.
    for c in &s.clients {
        let status = c.status().expect("status");
        let traffic = &status["traffic"];
        assert_eq!(traffic["source"], c.service.as_str(), "{traffic}");
        let api = traffic["pairs"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["destination"] == "api")
            .unwrap_or_else(|| panic!("no api pair: {traffic}"));
        assert_eq!(api["counters"]["opened"], 1, "{api}");
        assert_eq!(api["counters"]["held"], 1, "{api}");
        assert!(
            api["counters"]["bytes_received"].as_u64() > Some(0),
            "{api}"
        );
    }
    let mut edges = Vec::new();
    wait_for(Duration::from_secs(25), || {
        let out = s.mesh.admin(&["network", "traffic", "prod", "--json"]);
        let graph: serde_json::Value = serde_json::from_str(&out).expect("json");
        edges = graph["edges"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["destination"] == "api" && e["opened"] == 1 && e["held"] == 1)
            .cloned()
            .collect();
        edges.len() == s.clients.len()
    });
    eprintln!("client -> api at the keyserver: {edges:?}");
}

/// The client sidecar's resident memory, KiB (`VmRSS`).
fn rss_kib(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The one process in `ns` (the client's sidecar: `ip netns exec` execs it).
fn sidecar_pid(ns: &str) -> String {
    let out = run("ip", &["netns", "pids", ns]);
    let pids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert_eq!(pids.len(), 1, "{pids:?}");
    pids[0].clone()
}

/// Raises this process's open-file limit to its hard limit (the flood
/// keeps 2000 sockets open).
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max.min(65_536);
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

#[test]
fn a_wake_that_never_comes_resets_held_connections_and_a_flood_stays_flat() {
    require_netns!();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    raise_nofile();
    let s = Setup::new("cold", COLD_PORT);
    let count = s.path("cold.count");
    let hook = format!("echo run >> {}", count.display());
    s.wakeable("cold", "3s", &["/bin/sh", "-c", &hook]);
    let to = SocketAddr::from((s.vip, COLD_PORT));

    // Three members at once: each held, then reset after the wake timeout.
    let joins: Vec<_> = s
        .clients
        .iter()
        .map(|c| connect_once(&c.host.ns, to))
        .collect();
    for (i, j) in joins.into_iter().enumerate() {
        let (got, _, took) = j.join().unwrap();
        eprintln!("client {i}: {got:?} after {took:?}");
        assert_eq!(got, None, "nothing answers");
        assert!(
            took >= Duration::from_millis(2500) && took < Duration::from_secs(6),
            "ended at the wake timeout, not at once nor hanging: {took:?}"
        );
    }
    let runs = std::fs::read_to_string(&count).unwrap_or_default();
    assert_eq!(runs.lines().count(), 1, "the hook ran once");

    // A flood: 2000 connections from one member to the sleeping service.
    let ns = s.clients[0].host.ns.clone();
    let pid = sidecar_pid(&ns);
    let before = rss_kib(&pid);
    let flood = in_ns(&ns, move || {
        let started = Instant::now();
        let mut open = Vec::new();
        let mut refused_at_connect = 0;
        for _ in 0..2000 {
            match TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
                Ok(c) => open.push(c),
                Err(_) => refused_at_connect += 1,
            }
        }
        let opened_in = started.elapsed();
        (open, refused_at_connect, opened_in)
    });
    let (open, refused_at_connect, opened_in) = flood.join().unwrap();
    let during = rss_kib(&pid);
    let ended = Instant::now();
    let mut hung = 0;
    for mut c in open {
        c.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
        let mut buf = [0u8; 1];
        match c.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => {}
            _ => hung += 1,
        }
    }
    let all_closed_in = ended.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let after = rss_kib(&pid);
    eprintln!(
        "flood: 2000 connections in {opened_in:?} ({refused_at_connect} refused at connect); sidecar RSS {before} KiB before, {during} KiB during, {after} KiB after; all ended within {all_closed_in:?} more"
    );
    assert_eq!(hung, 0, "every connection ended");
    assert!(all_closed_in < Duration::from_secs(6), "{all_closed_in:?}");
    let grew = during.max(after).saturating_sub(before);
    assert!(grew < 8 * 1024, "sidecar memory grew by {grew} KiB");
    // The sidecar still serves: its status answers.
    assert!(s.clients[0].status().is_some());
}
