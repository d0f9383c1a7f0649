//! The gateway under abuse and load (issue 21), in network namespaces: a
//! keyserver, a gateway (`sidecar gateway`, kernel mode), one instance
//! (`sidecar up` beside the python3 backend) and two client hosts using real
//! clients: python3's `socket`/`ssl` for idle connections, `curl`, `h2load`
//! (nghttp2-client) and `openssl s_client`.
//!
//! - Idle connections (nothing sent, half an HTTP/2 preface, preface and
//!   SETTINGS, an idle HTTP/1.1 keep-alive, an h2 TLS connection with no
//!   request) are closed within the configured deadline; a client past its
//!   connection budget has its new connections closed at once while
//!   another client is served.
//! - 20,000 requests to one instance reuse a few upstream connections.
//! - TLS 1.2 handshakes succeed (and 1.3 stays the default).
//!
//! The new settings are given as `ISTM_GATEWAY_*` variables, so that the
//! test also runs (and fails) against a gateway that predates them.

mod dataplane_support;
mod gateway_support;
mod mesh_support;

use std::io::BufRead as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dataplane_support::Host;
use gateway_support::{counter, make_certs, out, script, sh, DOMAIN};
use mesh_support::{bin, Mesh, Sidecar};

/// The deadline of the first request and the idle timeout in this test.
const DEADLINE_S: f64 = 2.0;
/// Connections one client address may hold in this test.
const BUDGET: usize = 300;

/// Why these tests cannot run here, if they cannot.
fn skip_reason() -> Option<String> {
    if let Some(why) = dataplane_support::skip_reason() {
        return Some(why.to_owned());
    }
    for tool in ["curl", "openssl", "python3", "h2load"] {
        let ok = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            return Some(format!(
                "needs {tool} (h2load: apt-get install nghttp2-client)"
            ));
        }
    }
    None
}

/// The test's world; everything is stopped and removed on drop.
struct World {
    mesh: Mesh,
    gw: Host,
    clients: [Host; 2],
    ca: PathBuf,
    logs: PathBuf,
    gw_log: PathBuf,
    gateway: Option<Child>,
    backend: Option<Child>,
    instance: Option<Sidecar>,
    web: String,
}

impl Drop for World {
    fn drop(&mut self) {
        for c in [self.gateway.take(), self.backend.take()]
            .into_iter()
            .flatten()
        {
            let mut c = c;
            let _ = c.kill();
            let _ = c.wait();
        }
        drop(self.instance.take());
        let _ = std::fs::remove_file(format!("/var/run/wireguard/g{}.sock", self.mesh.topo.tag));
    }
}

impl World {
    /// Keyserver, gateway, one instance `web-a` of group `web` (ports 80
    /// and 443, HTTP), two clients that resolve the group's name.
    fn new() -> Self {
        Self::with_client_share(None)
    }

    /// [`World::new`] with the gateway's `--client-share` (percent).
    fn with_client_share(share: Option<u8>) -> Self {
        let mut mesh = Mesh::new();
        let logs = mesh.topo.temp_path("logs");
        std::fs::create_dir_all(&logs).unwrap();
        let (ca, cert, key) = make_certs(&mesh.topo.temp_path(""));
        let gw = mesh.host(2);
        let web = format!("web.{DOMAIN}");
        let clients = [mesh.host(6), mesh.host(7)];
        for c in &clients {
            let hosts = PathBuf::from("/etc/netns").join(&c.ns).join("hosts");
            let mut text = std::fs::read_to_string(&hosts).unwrap();
            text.push_str(&format!("\n{} {web}\n", gw.underlay));
            std::fs::write(&hosts, text).unwrap();
        }
        mesh.admin(&[
            "service",
            "create",
            "web",
            "--network",
            "prod",
            "--fqdn",
            &web,
            "-p",
            "443:8080/http+tls",
            "-p",
            "80:8080/http",
            "--soft-limit",
            "64",
            "--hard-limit",
            "1024",
        ]);
        let gw_log = mesh.topo.temp_path("gateway.log");
        let gw_token = mesh.token_for("prod", 1);
        let gateway = Command::new("ip")
            .args(["netns", "exec", &gw.ns])
            .arg(bin("sidecar"))
            .args(["gateway", "--token", &gw_token])
            .args(["--interface", &format!("g{}", mesh.topo.tag)])
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .args(["--handshake-timeout", &format!("{DEADLINE_S}s")])
            .env("ISTM_GATEWAY_IDLE_TIMEOUT", format!("{DEADLINE_S}s"))
            .env(
                "ISTM_GATEWAY_MAX_CONNECTIONS_PER_CLIENT",
                BUDGET.to_string(),
            )
            .env("ISTM_LOG", "info")
            .env(
                "ISTM_GATEWAY_CLIENT_SHARE",
                share.map_or("100".to_owned(), |p| p.to_string()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&gw_log).unwrap())
            .spawn()
            .expect("start the gateway");
        let mut w = World {
            mesh,
            gw,
            clients,
            ca,
            logs,
            gw_log,
            gateway: Some(gateway),
            backend: None,
            instance: None,
            web,
        };
        let host = w.mesh.host(3);
        w.start_backend(&host);
        let bound = w.mesh.admin(&[
            "token",
            "create",
            "--network",
            "prod",
            "--service-group",
            "web",
        ]);
        let bound = bound
            .split(|c: char| c.is_whitespace() || c == '"')
            .find(|s| s.starts_with("istm1."))
            .unwrap()
            .to_owned();
        let args = [
            "--token",
            &bound,
            "--instance",
            "web-a",
            "--port",
            "8080",
            "--hosts-file",
            "",
            "--no-dns",
        ];
        w.instance = Some(w.mesh.sidecar(&host, "web", "up", &args));
        w.wait("the gateway serves web", Duration::from_secs(40), || {
            w.curl(0, &format!("http://{}/who", w.web)) == "web-a\n"
        });
        w
    }

    fn start_backend(&mut self, host: &Host) {
        let log = self.logs.join("web-a.log");
        let child = Command::new("ip")
            .args(["netns", "exec", &host.ns, "python3"])
            .arg(script("backend.py"))
            .args(["--name", "web-a", "--log"])
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 backend");
        self.backend = Some(child);
        self.wait("the backend starts", Duration::from_secs(10), || {
            std::fs::read_to_string(&log).is_ok_and(|s| s.contains("ready"))
        });
    }

    /// Connections the instance accepted so far.
    fn upstream_connections(&self) -> usize {
        std::fs::read_to_string(self.logs.join("web-a.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| *l == "conn")
            .count()
    }

    /// `curl -sS <args>` from client `i`; its standard output.
    fn curl(&self, i: usize, args: &str) -> String {
        out(&sh(
            &self.clients[i].ns,
            &format!(
                "curl -sS --max-time 20 --cacert {} {args}",
                self.ca.display()
            ),
        ))
    }

    fn gw_log(&self) -> String {
        std::fs::read_to_string(&self.gw_log).unwrap_or_default()
    }

    fn metrics(&self) -> String {
        out(&sh(&self.gw.ns, "curl -sS http://127.0.0.1:9478/metrics"))
    }

    /// Waits until `cond` holds, printing the gateway's log if not.
    fn wait(&self, what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
        let start = Instant::now();
        while !cond() {
            assert!(
                start.elapsed() < limit,
                "{what}: not within {limit:?}; gateway log:\n{}",
                self.gw_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts `count` idle clients of `kind` on client `i` against `port`,
    /// watching them for `wait` seconds; returns once all are open.
    fn idle(&self, i: usize, port: u16, kind: &str, count: usize, wait: f64) -> IdleRun {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.clients[i].ns, "python3"])
            .arg(script("idle_clients.py"))
            .args(["--host", &self.gw.underlay, "--port", &port.to_string()])
            .args(["--count", &count.to_string(), "--kind", kind])
            .args(["--sni", &self.web, "--wait", &wait.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 idle clients");
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().and_then(Result::ok).unwrap_or_default();
        assert_eq!(first, "opened", "idle clients of kind {kind}");
        IdleRun {
            child: Some(child),
            lines,
        }
    }
}

/// Idle clients at work.
struct IdleRun {
    child: Option<Child>,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl IdleRun {
    /// Their report (see `idle_clients.py`).
    fn report(mut self) -> serde_json::Value {
        let line = self.lines.next().and_then(Result::ok).unwrap_or_default();
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }
}

impl Drop for IdleRun {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn step(name: &str, t: Instant) {
    eprintln!("== {name}: {:.2} s", t.elapsed().as_secs_f64());
}

/// These tests load the gateway on purpose (thousands of idle
/// connections, 20,000 requests): run one at a time, so one test's load is
/// not another's dial timeouts on a two-core machine.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn gateway_closes_idle_connections_and_keeps_budgets() {
    let _one = one_at_a_time();
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let t = Instant::now();
    let w = World::new();
    step("setup", t);

    // 1. 250 idle connections of each kind are all closed within the
    // deadline (and none at once: they are within the budget).
    let wait = DEADLINE_S + 6.0;
    for (port, kind) in [
        (80, "nothing"),
        (80, "half-preface"),
        (80, "preface"),
        (80, "http1"),
        (443, "tls-h2"),
    ] {
        let r = w.idle(0, port, kind, 250, wait).report();
        eprintln!("{kind} on {port}: {r}");
        assert_eq!(r["opened"], 250, "{kind}: {r}");
        assert_eq!(r["still_open"], 0, "{kind}: open after {wait} s: {r}");
        assert_eq!(r["at_once"], 0, "{kind}: {r}");
        let latest = r["max_close_s"].as_f64().unwrap();
        assert!(
            latest <= DEADLINE_S + 2.0,
            "{kind}: closed after {latest} s"
        );
        step(&format!("1. {kind} on port {port}: closed"), t);
    }
    let m = w.metrics();
    assert!(
        counter(
            &m,
            "istmesh_gateway_client_connections_closed_total{reason=\"no-request\"}"
        ) >= 1000,
        "{m}"
    );
    assert!(
        counter(
            &m,
            "istmesh_gateway_client_connections_closed_total{reason=\"idle\"}"
        ) >= 250,
        "{m}"
    );

    // 2. Client 0 holds its whole budget (and 20 more): the 20 are closed at
    // once, and so is its next request, while client 1 is served.
    let hold = w.idle(0, 80, "nothing", BUDGET + 20, wait);
    let other = w.curl(1, &format!("http://{}/who", w.web));
    let other_tls = w.curl(1, &format!("https://{}/who", w.web));
    let own = w.curl(0, &format!("http://{}/who", w.web));
    let r = hold.report();
    eprintln!("budget: {r}; the other client got {other:?}, {other_tls:?}");
    assert_eq!(other, "web-a\n", "another address is served");
    assert_eq!(other_tls, "web-a\n", "another address is served");
    assert_ne!(own, "web-a\n", "past its budget, a client is refused");
    assert_eq!(
        r["at_once"], 20,
        "exactly the connections past the budget: {r}"
    );
    assert_eq!(r["still_open"], 0, "{r}");
    let m = w.metrics();
    assert!(
        counter(&m, "istmesh_gateway_client_connections_refused_total") >= 21,
        "{m}"
    );
    // Its connections closed, the client is served again.
    assert_eq!(w.curl(0, &format!("http://{}/who", w.web)), "web-a\n");
    assert!(!w.gw_log().contains("panicked"), "{}", w.gw_log());
    step("2. per-client budget", t);
}

#[test]
fn gateway_reuses_upstream_connections_under_load() {
    let _one = one_at_a_time();
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let t = Instant::now();
    let w = World::new();
    step("setup", t);
    let before = w.upstream_connections();
    let h2load = out(&sh(
        &w.clients[0].ns,
        &format!(
            "timeout 300 h2load -n 20000 -c 4 -m 8 http://{}/who 2>&1",
            w.web
        ),
    ));
    let opened = w.upstream_connections() - before;
    let time_wait = out(&sh(&w.gw.ns, "ss -Htan state time-wait | wc -l"));
    eprintln!(
        "{h2load}\nupstream connections opened: {opened}; TIME-WAIT on the gateway host: {}",
        time_wait.trim()
    );
    step("20,000 requests", t);
    assert!(
        h2load.contains("20000 succeeded, 0 failed"),
        "{h2load}\n{}",
        w.gw_log()
    );
    assert!(h2load.contains("status codes: 20000 2xx"), "{h2load}");
    assert!(
        opened < 100,
        "{opened} connections to the instance for 20,000 requests"
    );
    let m = w.metrics();
    assert_eq!(
        counter(
            &m,
            "istmesh_gateway_instance_down{group=\"web\",member=\"web-a\"}"
        ),
        0,
        "{m}"
    );
    // The gateway's own count agrees (its health checks' connects are not
    // in it).
    let dialed = counter(&m, "istmesh_gateway_upstream_connections_total");
    assert!(dialed < 100, "{dialed} upstream connections:\n{m}");
    assert!(counter(&m, "istmesh_gateway_upstream_reused_total") >= 19_900);
}

#[test]
fn gateway_speaks_tls_1_2_and_1_3() {
    let _one = one_at_a_time();
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let t = Instant::now();
    let w = World::new();
    step("setup", t);
    let s_client = |version: &str| {
        out(&sh(
            &w.clients[0].ns,
            &format!(
                "printf 'GET /who HTTP/1.1\\r\\nHost: {web}\\r\\nConnection: close\\r\\n\\r\\n' | timeout 10 openssl s_client -connect {web}:443 -servername {web} -CAfile {} -verify_return_error -ign_eof {version} 2>&1",
                w.ca.display(),
                web = w.web,
            ),
        ))
    };
    let v12 = s_client("-tls1_2");
    assert!(v12.contains("\nNew, TLSv1.2"), "{v12}");
    assert!(v12.contains("Verify return code: 0 (ok)"), "{v12}");
    assert!(v12.contains("web-a"), "{v12}");
    let v13 = s_client("");
    assert!(v13.contains("\nNew, TLSv1.3"), "{v13}");
    let curl = w.curl(
        0,
        &format!(
            "--tlsv1.2 --tls-max 1.2 -w ' %{{http_version}}' https://{}/who",
            w.web
        ),
    );
    assert_eq!(curl, "web-a\n 2", "curl over TLS 1.2 (h2 by ALPN)");
    let verbose = out(&sh(
        &w.clients[0].ns,
        &format!(
            "curl -sS -v --max-time 20 --cacert {} --tlsv1.2 --tls-max 1.2 https://{}/who 2>&1",
            w.ca.display(),
            w.web
        ),
    ));
    assert!(verbose.contains("TLSv1.2"), "{verbose}");
    step("TLS 1.2 with openssl and curl", t);
}

/// One client holding every slot of a group (slow requests here; idle
/// WebSockets alike) locks others out; with `--client-share 50` it holds
/// half and waits for the rest, and another client is served at once.
#[test]
fn a_client_holds_only_its_share_of_a_group() {
    let _one = one_at_a_time();
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let t = Instant::now();
    let w = World::with_client_share(Some(50));
    w.mesh.admin(&[
        "service",
        "set",
        "web",
        "--network",
        "prod",
        "--soft-limit",
        "4",
        "--hard-limit",
        "4",
    ]);
    w.wait("limits 4/4 applied", Duration::from_secs(20), || {
        let g: serde_json::Value =
            serde_json::from_str(
                &w.mesh
                    .admin(&["service", "get", "web", "--network", "prod"]),
            )
            .unwrap();
        g["hard_limit"] == 4
    });
    // Let the gateway's map follow.
    std::thread::sleep(Duration::from_secs(1));
    step("setup, limits 4/4, client share 50%", t);
    // Client 0: four slow requests at once (4 s each): two hold its share
    // (4 slots x 50%), two wait for them.
    let slow = format!(
        "for i in 1 2 3 4; do curl -sS --max-time 30 -o /dev/null -w '%{{http_code}} %{{time_total}}\\n' http://{}/slow?ms=4000 & done; wait",
        w.web
    );
    let ns = w.clients[0].ns.clone();
    let hog = std::thread::spawn(move || out(&sh(&ns, &slow)));
    std::thread::sleep(Duration::from_millis(800));
    let m = w.metrics();
    assert_eq!(
        counter(
            &m,
            "istmesh_gateway_active_connections{group=\"web\",member=\"web-a\"}"
        ),
        2,
        "client 0 holds its share, not the group:\n{m}"
    );
    // Client 1 is served at once, though client 0 asked for every slot.
    let started = Instant::now();
    let got = w.curl(1, &format!("http://{}/who", w.web));
    let took = started.elapsed();
    assert_eq!(got, "web-a\n");
    assert!(took < Duration::from_secs(2), "client 1 waited {took:?}");
    // Client 0's four all succeed: two after the first two.
    let lines = hog.join().unwrap();
    let times: Vec<f64> = lines
        .lines()
        .map(|l| {
            let (code, time) = l.split_once(' ').unwrap();
            assert_eq!(code, "200", "{lines}");
            time.parse().unwrap()
        })
        .collect();
    assert_eq!(times.len(), 4, "{lines}");
    assert_eq!(
        times.iter().filter(|t| **t > 7.0).count(),
        2,
        "two waited for the first two: {times:?}"
    );
    let m = w.metrics();
    assert_eq!(
        counter(
            &m,
            "istmesh_gateway_client_share_refused_total{group=\"web\"}"
        ),
        0,
        "{m}"
    );
    step("client share", t);
}

/// A second gateway of the same network, on its own host; killed (and its
/// UAPI socket removed) on drop.
struct SecondGateway {
    child: Child,
    host: Host,
    socket: String,
    log: PathBuf,
}

impl Drop for SecondGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Two gateways serve one group whose limits are 4/4 (one instance): each
/// takes half (`istmesh_gateway_limit` 2), and under a load of 3×
/// `hard_limit` (six slow requests through each gateway at once) the
/// instance serves 4 at most at once; the other 8 are refused (503).
#[test]
fn two_gateways_hold_one_groups_hard_limit() {
    let _one = one_at_a_time();
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let t = Instant::now();
    let mut w = World::new();
    let (_, cert, key) = (
        (),
        w.ca.with_file_name("gw.pem"),
        w.ca.with_file_name("gw.key"),
    );
    let host = w.mesh.host(8);
    let token = w.mesh.token_for("prod", 1);
    let iface = format!("h{}", w.mesh.topo.tag);
    let log = w.mesh.topo.temp_path("gateway2.log");
    let child = Command::new("ip")
        .args(["netns", "exec", &host.ns])
        .arg(bin("sidecar"))
        .args(["gateway", "--token", &token, "--interface", &iface])
        .args(["--tls-cert"])
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .env("ISTM_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start the second gateway");
    let second = SecondGateway {
        child,
        host,
        socket: format!("/var/run/wireguard/{iface}.sock"),
        log,
    };
    w.mesh.admin(&[
        "service",
        "set",
        "web",
        "--network",
        "prod",
        "--soft-limit",
        "4",
        "--hard-limit",
        "4",
    ]);
    let hard = "istmesh_gateway_limit{group=\"web\",limit=\"hard\"}";
    let metrics2 = || {
        out(&sh(
            &second.host.ns,
            "curl -sS http://127.0.0.1:9478/metrics",
        ))
    };
    let via2 = |path: &str| {
        format!(
            "curl -sS --max-time 30 --connect-to '::{}:' -o /dev/null -w '%{{http_code}}\\n' http://{}{path}",
            second.host.underlay, w.web
        )
    };
    w.wait(
        "both gateways hold half of 4",
        Duration::from_secs(30),
        || {
            counter(&w.metrics(), hard) == 2
                && counter(&metrics2(), hard) == 2
                && out(&sh(&w.clients[1].ns, &via2("/who"))) == "200\n"
        },
    );
    step("setup: two gateways, limits 4/4, 2 each", t);
    // 3 x hard_limit at once: six through each gateway.
    let six = |target: String| format!("for i in 1 2 3 4 5 6; do {target} & done; wait");
    let one = format!(
        "curl -sS --max-time 30 -o /dev/null -w '%{{http_code}}\\n' http://{}/slow?ms=3000",
        w.web
    );
    let (ns0, ns1) = (w.clients[0].ns.clone(), w.clients[1].ns.clone());
    let (load0, load1) = (six(one), six(via2("/slow?ms=3000")));
    let a = std::thread::spawn(move || out(&sh(&ns0, &load0)));
    let b = std::thread::spawn(move || out(&sh(&ns1, &load1)));
    let codes: Vec<String> = [a.join().unwrap(), b.join().unwrap()]
        .iter()
        .flat_map(|o| o.lines().map(str::to_owned).collect::<Vec<_>>())
        .collect();
    assert_eq!(codes.len(), 12, "{codes:?}");
    let most = std::fs::read_to_string(w.logs.join("web-a.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("inflight ")?.parse::<u32>().ok())
        .max()
        .unwrap_or(0);
    assert!(
        most <= 4,
        "the instance served {most} at once through two gateways (hard limit 4); log:\n{}",
        std::fs::read_to_string(&second.log).unwrap_or_default()
    );
    let ok = codes.iter().filter(|c| *c == "200").count();
    let refused = codes.iter().filter(|c| *c == "503").count();
    assert_eq!((ok, refused), (4, 8), "{codes:?}");
    assert_eq!(most, 4, "both gateways used their part");
    step("3 x hard_limit through two gateways: 4 at once", t);
}
