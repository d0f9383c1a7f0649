//! Services (seed 002) end to end, in network namespaces: a keyserver, a
//! gateway (`sidecar gateway`, kernel mode), instances running `sidecar up`
//! beside a small python3 backend, and a client host on the "internet"
//! side using real clients nobody here wrote: `curl` (HTTPS with a test CA
//! made by `openssl`, HTTP/2, the redirect), `openssl s_client` (TLS TCP
//! mode), `socat` (UDP), python3's `ssl`/`socket` (a WebSocket client).
//!
//! One topology, scenarios in order (each prints its time): routing and
//! headers, HTTP/2, redirect, TCP mode, UDP, WebSocket, balancing over three
//! instances, held requests shown as the group's live connections in the
//! keyserver's API (the gateway's report) and back to 0, an unpublished port and a private instance have no listener,
//! a killed instance is skipped within the health interval, soft and hard
//! limits with exact counts, instance-owned versus persistent groups, the
//! wake hook holding a connection, malformed input, and metrics.

mod dataplane_support;
mod gateway_support;
mod mesh_support;

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use dataplane_support::{run, Host};
use gateway_support::{counter, make_certs, out, script, sh, DOMAIN};
use mesh_support::{bin, Mesh, Sidecar};

fn backend_script() -> PathBuf {
    script("backend.py")
}

fn ws_script() -> PathBuf {
    script("ws_client.py")
}

/// Why these tests cannot run here, if they cannot.
fn skip_reason() -> Option<String> {
    gateway_support::skip_reason(&["curl", "openssl", "socat", "python3"])
}

/// The test's world.
struct World {
    mesh: Mesh,
    gw: Host,
    client: Host,
    ca: PathBuf,
    logs: PathBuf,
    gateway: Option<Child>,
    gw_log: PathBuf,
    backends: Vec<Child>,
    extra_sockets: Vec<String>,
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(mut g) = self.gateway.take() {
            let _ = g.kill();
            let _ = g.wait();
        }
        let _ = std::fs::remove_file(format!("/var/run/wireguard/g{}.sock", self.mesh.topo.tag));
        for s in &self.extra_sockets {
            let _ = std::fs::remove_file(s);
        }
        for b in &mut self.backends {
            let _ = b.kill();
            let _ = b.wait();
        }
    }
}

impl World {
    fn fqdn(name: &str) -> String {
        format!("{name}.{DOMAIN}")
    }

    /// `curl` from the client host to the gateway; returns stdout.
    fn curl(&self, args: &str) -> Output {
        let script = format!(
            "curl -sS --max-time 40 --cacert {} --connect-to '::{gw}:' {args}",
            self.ca.display(),
            gw = self.gw.underlay
        );
        sh(&self.client.ns, &script)
    }

    /// GET `https://<fqdn><path>` and its body.
    fn get(&self, fqdn: &str, path: &str) -> String {
        out(&self.curl(&format!("https://{fqdn}{path}")))
    }

    /// Starts a backend for instance `name` on `host`.
    fn backend(&mut self, host: &Host, name: &str) {
        let log = self.logs.join(format!("{name}.log"));
        let child = Command::new("ip")
            .args(["netns", "exec", &host.ns, "python3"])
            .arg(backend_script())
            .args(["--name", name, "--log"])
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 backend");
        self.backends.push(child);
        let start = Instant::now();
        while !std::fs::read_to_string(&log).is_ok_and(|s| s.contains("ready")) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "backend {name} did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// How many requests of `kind` (`http /who`, `tcp`, `udp`) instance
    /// `name`'s backend saw.
    fn served(&self, name: &str, kind: &str) -> usize {
        std::fs::read_to_string(self.logs.join(format!("{name}.log")))
            .unwrap_or_default()
            .lines()
            .filter(|l| *l == kind)
            .count()
    }

    fn admin(&self, args: &[&str]) -> serde_json::Value {
        serde_json::from_str(&self.mesh.admin(args)).expect("admin JSON")
    }

    fn metrics(&self) -> String {
        out(&sh(&self.gw.ns, "curl -sS http://127.0.0.1:9478/metrics"))
    }

    fn gw_log(&self) -> String {
        std::fs::read_to_string(&self.gw_log).unwrap_or_default()
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
}

/// A sidecar for instance `name` joining with `token`, serving 8080, 9000.
fn instance(mesh: &mut Mesh, host: &Host, name: &str, token: &str, extra: &[&str]) -> Sidecar {
    let mut args = vec![
        "--token",
        token,
        "--instance",
        name,
        "--port",
        "8080",
        "--port",
        "9000",
        "--port",
        "5353",
        "--hosts-file",
        "",
        "--no-dns",
    ];
    args.extend_from_slice(extra);
    mesh.sidecar(host, "web", "up", &args)
}

fn step(name: &str, t: Instant) {
    eprintln!("== {name}: {:.2} s", t.elapsed().as_secs_f64());
}

#[test]
fn gateway_serves_service_groups() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let t = Instant::now();
    let mut mesh = Mesh::new();
    let logs = mesh.topo.temp_path("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let (ca, cert, key) = make_certs(&mesh.topo.temp_path(""));
    let gw = mesh.host(2);
    let client = mesh.topo.host(6);
    let gw_ip = gw.underlay.clone();
    // Seed 002's example group, with a UDP port on the gateway's address.
    let web = World::fqdn("web");
    let udp_port = format!("{gw_ip}:5353:5353/udp");
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
        "80:8080/http+redirect",
        "-p",
        "10000:9000/tls",
        "-p",
        &udp_port,
        "--soft-limit",
        "8",
        "--hard-limit",
        "16",
    ]);
    let gw_log = mesh.topo.temp_path("gateway.log");
    let gw_token = mesh.token_for("prod", 1);
    let gateway = Command::new("ip")
        .args(["netns", "exec", &gw.ns])
        .arg(bin("sidecar"))
        .args([
            "gateway",
            "--token",
            &gw_token,
            "--interface",
            &format!("g{}", mesh.topo.tag),
            "--instance",
            "gw-main",
        ])
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .args([
            "--health-interval",
            "1s",
            "--connect-timeout",
            "1s",
            "--queue-timeout",
            "20s",
        ])
        .args(["--allow-wake-commands", "--udp-idle-timeout", "5s"])
        .env("ISTM_LOG", "info,sidecar::gateway=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&gw_log).unwrap())
        .spawn()
        .expect("start the gateway");
    let mut w = World {
        gw,
        client,
        ca,
        logs,
        gateway: Some(gateway),
        gw_log,
        backends: Vec::new(),
        extra_sockets: Vec::new(),
        mesh,
    };
    // Three instances attached by their token's binding.
    let bound = w.mesh.admin(&[
        "token",
        "create",
        "--network",
        "prod",
        "--uses",
        "3",
        "--service-group",
        "web",
    ]);
    let bound = bound
        .split(|c: char| c.is_whitespace() || c == '"')
        .find(|s| s.starts_with("istm1."))
        .unwrap()
        .to_owned();
    let names = ["web-a", "web-b", "web-c"];
    let mut hosts = Vec::new();
    let mut sidecars = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let host = w.mesh.host(3 + i as u8);
        w.backend(&host, name);
        sidecars.push(instance(&mut w.mesh, &host, name, &bound, &[]));
        hosts.push(host);
    }
    let group = w.admin(&["service", "get", "web", "--network", "prod"]);
    assert_eq!(group["persistent"], true);
    w.wait("three online instances", Duration::from_secs(30), || {
        let g = w.admin(&["service", "get", "web", "--network", "prod"]);
        g["instances"]
            .as_array()
            .is_some_and(|l| l.iter().filter(|i| i["state"] == "online").count() == 3)
    });
    step("setup: keyserver, gateway, 3 instances", t);

    // 1. HTTPS through the test CA; headers.
    w.wait("the gateway serves web", Duration::from_secs(30), || {
        w.get(&web, "/who").starts_with("web-")
    });
    let headers: serde_json::Value = serde_json::from_str(&w.get(&web, "/headers")).unwrap();
    assert_eq!(
        headers["x-forwarded-for"],
        w.client.underlay.as_str(),
        "{headers}"
    );
    assert_eq!(headers["x-forwarded-proto"], "https");
    assert_eq!(headers["host"], web.as_str());
    // An upgrade to cleartext HTTP/2 never reaches an instance (h2c
    // smuggling): the request goes through as a plain one.
    let smuggle: serde_json::Value = serde_json::from_str(&out(&w.curl(&format!(
        "--http1.1 -H 'Connection: Upgrade, HTTP2-Settings' -H 'Upgrade: h2c' \
         -H 'HTTP2-Settings: AAMAAABkAAQAAP__' https://{web}/headers"
    ))))
    .unwrap();
    for h in ["upgrade", "http2-settings"] {
        assert!(
            smuggle.get(h).is_none(),
            "{h} reached the instance: {smuggle}"
        );
    }
    assert!(
        smuggle["connection"]
            .as_str()
            .is_none_or(|c| !c.to_ascii_lowercase().contains("upgrade")),
        "{smuggle}"
    );
    step(
        "1. HTTPS with the test CA, X-Forwarded-*, no h2c upgrade",
        t,
    );

    // 2. HTTP/2.
    let v = out(&w.curl(&format!(
        "--http2 -o /dev/null -w '%{{http_version}}' https://{web}/who"
    )));
    assert_eq!(v, "2");
    let h1 = out(&w.curl(&format!(
        "--http1.1 -o /dev/null -w '%{{http_version}}' https://{web}/who"
    )));
    assert_eq!(h1, "1.1");
    step("2. HTTP/2 and HTTP/1.1", t);

    // 2b. A returning client resumes its TLS 1.3 session (a ticket; no
    // certificate or signature the second time).
    let sess = w.ca.with_file_name("session.pem");
    let s_client = |extra: &str| {
        sh(
            &w.client.ns,
            &format!(
                "printf 'GET /who HTTP/1.1\\r\\nHost: {web}\\r\\nConnection: close\\r\\n\\r\\n' | timeout 10 openssl s_client -connect {gw_ip}:443 -servername {web} -CAfile {} -verify_return_error -ign_eof {extra} 2>&1",
                w.ca.display()
            ),
        )
    };
    let first = out(&s_client(&format!("-sess_out {}", sess.display())));
    assert!(first.contains("\nNew, TLSv1.3"), "{first}");
    let again = out(&s_client(&format!("-sess_in {}", sess.display())));
    assert!(again.contains("\nReused, TLSv1.3"), "{again}");
    assert!(again.contains("web-"), "{again}");
    step("2b. TLS session resumption", t);

    // 3. Redirect on port 80.
    let r = out(&w.curl(&format!(
        "-o /dev/null -w '%{{http_code}} %{{redirect_url}}' 'http://{web}/a/b?c=1'"
    )));
    assert_eq!(r, format!("308 https://{web}/a/b?c=1"));
    let followed = out(&w.curl(&format!("-L http://{web}/who")));
    assert!(followed.starts_with("web-"), "{followed}");
    step("3. 308 redirect to https", t);

    // 4. TCP mode after TLS: openssl s_client.
    let s = sh(
        &w.client.ns,
        &format!(
            "(printf 'hello\\n'; sleep 1) | timeout 10 openssl s_client -quiet -no_ign_eof -connect {gw_ip}:10000 -servername {web} -CAfile {} -verify_return_error 2>/dev/null",
            w.ca.display()
        ),
    );
    let echoed = out(&s);
    assert!(
        echoed.starts_with("web-") && echoed.trim_end().ends_with(":hello"),
        "{echoed:?} {}",
        String::from_utf8_lossy(&s.stderr)
    );
    step("4. TLS + TCP mode (openssl s_client)", t);

    // 5. UDP through socat.
    let u = out(&sh(
        &w.client.ns,
        &format!("printf ping | timeout 5 socat -T 3 - UDP:{gw_ip}:5353"),
    ));
    assert!(u.starts_with("web-") && u.ends_with(":ping"), "{u:?}");
    step("5. UDP (socat)", t);

    // 6. WebSocket upgrade through HTTPS.
    let ws = sh(
        &w.client.ns,
        &format!(
            "python3 {} {gw_ip} 443 {web} {} hi-there",
            ws_script().display(),
            w.ca.display()
        ),
    );
    let text = out(&ws);
    assert!(
        text.trim_end().ends_with(":hi-there"),
        "{text:?} {}",
        String::from_utf8_lossy(&ws.stderr)
    );
    step("6. WebSocket upgrade", t);

    // 7. Balancing over three instances (once the UDP flow has idled out:
    // the least-loaded instance goes first, and a flow is a connection).
    w.wait("no active connection", Duration::from_secs(15), || {
        let m = w.metrics();
        m.lines()
            .filter(|l| l.starts_with("istmesh_gateway_active_connections"))
            .all(|l| l.ends_with(" 0"))
    });
    let before: Vec<usize> = names.iter().map(|n| w.served(n, "http /who")).collect();
    for _ in 0..30 {
        assert!(w.get(&web, "/who").starts_with("web-"));
    }
    let got: Vec<usize> = names
        .iter()
        .zip(&before)
        .map(|(n, b)| w.served(n, "http /who") - b)
        .collect();
    assert_eq!(got.iter().sum::<usize>(), 30);
    assert!(
        got.iter().all(|n| *n >= 5),
        "each instance gets connections: {got:?}\n{}\n{}",
        w.metrics(),
        w.gw_log()
    );
    eprintln!("   30 requests over 3 instances: {got:?}");
    step("7. balancing", t);

    // 7b. The gateway reports its open connections per group to the
    // keyserver (with its traffic report, at most every 10 s when they
    // change): N requests held open show as live connections in the
    // admin API under this gateway's instance, and 0 once they close.
    const HELD: u64 = 4;
    let pids = w.logs.join("held.pids");
    let hold = (0..HELD)
        .map(|_| {
            format!(
                "curl -sS --max-time 70 --cacert {ca} --connect-to '::{gw_ip}:' -o /dev/null https://{web}/slow?ms=60000 & echo $! >> {pids};",
                ca = w.ca.display(),
                pids = pids.display()
            )
        })
        .collect::<String>();
    let holder = Command::new("ip")
        .args(["netns", "exec", &w.client.ns, "sh", "-c"])
        .arg(format!("{hold} wait"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("held requests");
    w.backends.push(holder);
    // The curls themselves end with their --max-time if the test fails.
    let loads = |w: &World| {
        let g = w.admin(&["service", "get", "web", "--network", "prod"]);
        let mine = g["gateways"]
            .as_array()
            .and_then(|l| l.iter().find(|e| e["instance"] == "gw-main").cloned());
        (g["live_connections"].as_u64(), mine, g)
    };
    let held_at = Instant::now();
    w.wait("held connections reported", Duration::from_secs(20), || {
        let (live, mine, _) = loads(&w);
        live == Some(HELD) && mine.is_some_and(|m| m["open"] == HELD)
    });
    let shown = held_at.elapsed();
    let (_, mine, g) = loads(&w);
    let mine = mine.unwrap();
    assert_eq!(g["queued_connections"], 0, "{g}");
    assert_eq!(mine["queued"], 0, "{g}");
    assert!(mine["reported"].as_u64().unwrap_or(0) > 0, "{g}");
    eprintln!(
        "   {HELD} held requests shown as live_connections in {:.1} s",
        shown.as_secs_f64()
    );
    let held_pids = std::fs::read_to_string(&pids).unwrap_or_default();
    assert_eq!(held_pids.split_whitespace().count() as u64, HELD);
    let closed = Instant::now();
    sh(
        &w.client.ns,
        &format!(
            "kill {}",
            held_pids.split_whitespace().collect::<Vec<_>>().join(" ")
        ),
    );
    w.wait(
        "closed connections reported",
        Duration::from_secs(20),
        || {
            let (live, mine, _) = loads(&w);
            live == Some(0) && mine.is_some_and(|m| m["open"] == 0)
        },
    );
    eprintln!(
        "   closed: live_connections back to 0 in {:.1} s",
        closed.elapsed().as_secs_f64()
    );
    step(
        "7b. live connections per group reported to the keyserver",
        t,
    );

    // 8. Private by default: no listener for an unpublished port, nor for
    // an instance in no group.
    let private_host = w.mesh.host(7);
    w.backend(&private_host, "private-a");
    let plain = w.mesh.token_for("prod", 1);
    let _private = instance(&mut w.mesh, &private_host, "private-a", &plain, &[]);
    std::thread::sleep(Duration::from_secs(2));
    let listening = out(&sh(&w.gw.ns, "ss -Htln"));
    for port in ["8080", "9000"] {
        assert!(
            !listening.contains(&format!(":{port} ")),
            "{port} must not listen: {listening}"
        );
    }
    assert!(
        listening.contains(":443 ") && listening.contains(":80 ") && listening.contains(":10000 "),
        "{listening}"
    );
    let refused = w.curl(&format!(
        "-o /dev/null -w '%{{http_code}}' http://{gw_ip}:8080/who"
    ));
    assert!(!refused.status.success(), "nothing answers on 8080");
    step("8. private by default: no listener", t);

    // 8b. A second gateway for the same network (on the private host's
    // namespace: its own WireGuard port, in userspace mode: no TUN) serves
    // the same group.
    let gw2_token = w.mesh.token_for("prod", 1);
    let gw2_if = format!("h{}", w.mesh.topo.tag);
    w.extra_sockets
        .push(format!("/var/run/wireguard/{gw2_if}.sock"));
    let gw2 = Command::new("ip")
        .args(["netns", "exec", &private_host.ns])
        .arg(bin("sidecar"))
        .args([
            "gateway",
            "--token",
            &gw2_token,
            "--interface",
            &gw2_if,
            "--listen-port",
            "51821",
            "--mode",
            "userspace",
        ])
        .args(["--metrics", "127.0.0.1:9479"])
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("second gateway");
    let gw2_pid = gw2.id();
    w.backends.push(gw2);
    let via_gw2 = format!(
        "curl -sS --max-time 10 --cacert {} --connect-to '::{}:' https://{web}/who",
        w.ca.display(),
        private_host.underlay
    );
    w.wait(
        "the second gateway serves web",
        Duration::from_secs(30),
        || out(&sh(&w.client.ns, &via_gw2)).starts_with("web-"),
    );
    // Two gateways split the group's limits (8 and 16 per instance: 4 and
    // 8 each).
    let limit = |text: &str, kind: &str| {
        counter(
            text,
            &format!("istmesh_gateway_limit{{group=\"web\",limit=\"{kind}\"}}"),
        )
    };
    w.wait(
        "the gateways split the limits",
        Duration::from_secs(20),
        || {
            let (a, b) = (
                w.metrics(),
                out(&sh(
                    &private_host.ns,
                    "curl -sS http://127.0.0.1:9479/metrics",
                )),
            );
            (
                limit(&a, "soft"),
                limit(&a, "hard"),
                limit(&b, "soft"),
                limit(&b, "hard"),
            ) == (4, 8, 4, 8)
        },
    );
    // It stops (SIGTERM: it leaves the network): the first one holds the
    // whole limits again, as the steps below expect.
    // `ip netns exec` execs the gateway: the child is the gateway.
    assert!(Command::new("kill")
        .args(["-TERM", &gw2_pid.to_string()])
        .status()
        .unwrap()
        .success());
    w.wait(
        "the first gateway holds the whole limits",
        Duration::from_secs(20),
        || {
            let m = w.metrics();
            (limit(&m, "soft"), limit(&m, "hard")) == (8, 16)
        },
    );
    step(
        "8b. a second gateway (userspace mode) serves the same network; the two split the limits; it leaves",
        t,
    );

    // 9. A killed instance stops getting connections within the health
    // interval (1 s, plus the 1 s connect timeout).
    let pids = out(&run("ip", &["netns", "pids", &hosts[2].ns]));
    for pid in pids.split_whitespace() {
        let _ = run("kill", &["-9", pid]);
    }
    let killed = Instant::now();
    std::thread::sleep(Duration::from_millis(3000));
    let before_c = w.served("web-c", "http /who");
    for _ in 0..20 {
        assert!(
            w.get(&web, "/who").starts_with("web-"),
            "every request is served"
        );
    }
    assert_eq!(
        w.served("web-c", "http /who"),
        before_c,
        "the killed instance gets nothing"
    );
    eprintln!(
        "   killed web-c: none of 20 requests went to it, starting 3 s after the kill (health interval 1 s, connect timeout 1 s); {:.1} s",
        killed.elapsed().as_secs_f64()
    );
    step("9. killed instance skipped", t);

    // 10. Limits: soft 1, hard 2 over the 2 live instances: 2 go, 2 wait,
    // 2 are refused with 503.
    let applied = w.gw_log().matches("service groups applied").count();
    w.mesh.admin(&[
        "service",
        "set",
        "web",
        "--network",
        "prod",
        "--soft-limit",
        "1",
        "--hard-limit",
        "2",
    ]);
    w.wait("limits applied", Duration::from_secs(10), || {
        w.gw_log().matches("service groups applied").count() > applied
    });
    std::thread::sleep(Duration::from_millis(500));
    let m0 = w.metrics();
    let before_q = counter(
        &m0,
        "istmesh_gateway_connections_total{group=\"web\",outcome=\"queued\"}",
    );
    let before_r = counter(
        &m0,
        "istmesh_gateway_connections_total{group=\"web\",outcome=\"rejected\"}",
    );
    let script = (0..6)
        .map(|i| {
            format!(
                "(curl -sS --max-time 40 --cacert {ca} --connect-to '::{gw_ip}:' -o /dev/null -w '%{{http_code}} %{{time_total}}\\n' https://{web}/slow?ms=2000 > {dir}/c{i}) &",
                ca = w.ca.display(),
                dir = w.logs.display()
            )
        })
        .collect::<Vec<_>>()
        .join(" sleep 0.1; ");
    sh(&w.client.ns, &format!("{script} wait"));
    let mut codes: Vec<(u16, f64)> = (0..6)
        .map(|i| {
            let line = std::fs::read_to_string(w.logs.join(format!("c{i}"))).unwrap();
            let (c, t) = line.trim().split_once(' ').unwrap();
            (c.parse().unwrap(), t.parse().unwrap())
        })
        .collect();
    codes.sort_by(|a, b| a.1.total_cmp(&b.1));
    let served: Vec<&(u16, f64)> = codes.iter().filter(|c| c.0 == 200).collect();
    let rejected: Vec<&(u16, f64)> = codes.iter().filter(|c| c.0 == 503).collect();
    eprintln!("   6 concurrent 2 s requests, soft 1 hard 2, 2 instances: {codes:?}");
    assert_eq!((served.len(), rejected.len()), (4, 2), "{codes:?}");
    assert!(
        rejected.iter().all(|r| r.1 < 1.5),
        "refused at once: {codes:?}"
    );
    assert_eq!(
        served.iter().filter(|s| s.1 > 3.5).count(),
        2,
        "two waited for a slot: {codes:?}"
    );
    let m1 = w.metrics();
    assert_eq!(
        counter(
            &m1,
            "istmesh_gateway_connections_total{group=\"web\",outcome=\"queued\"}"
        ) - before_q,
        2
    );
    assert_eq!(
        counter(
            &m1,
            "istmesh_gateway_connections_total{group=\"web\",outcome=\"rejected\"}"
        ) - before_r,
        2
    );
    step(
        "10. soft and hard limits: 2 served, 2 queued then served, 2 refused",
        t,
    );

    // 10b. TCP mode at the hard limit: a closed connection. soft 1 hard 1,
    // two held connections take both instances, the third is closed.
    let applied = w.gw_log().matches("service groups applied").count();
    w.mesh.admin(&[
        "service",
        "set",
        "web",
        "--network",
        "prod",
        "--soft-limit",
        "1",
        "--hard-limit",
        "1",
    ]);
    w.wait("limits applied", Duration::from_secs(10), || {
        w.gw_log().matches("service groups applied").count() > applied
    });
    let hold = format!(
        "(sleep 6 | timeout 8 openssl s_client -quiet -connect {gw_ip}:10000 -servername {web} -CAfile {} >/dev/null 2>&1) &",
        w.ca.display()
    );
    let third = sh(
        &w.client.ns,
        &format!(
            "{hold} {hold} sleep 2; printf 'x\\n' | timeout 5 openssl s_client -quiet -connect {gw_ip}:10000 -servername {web} -CAfile {} 2>&1; echo rc=$?",
            w.ca.display()
        ),
    );
    let third = out(&third);
    assert!(
        !third.contains(":x"),
        "the third connection is not served: {third}"
    );
    step("10b. TCP mode at the hard limit: closed", t);
    w.mesh.admin(&[
        "service",
        "set",
        "web",
        "--network",
        "prod",
        "--soft-limit",
        "8",
        "--hard-limit",
        "16",
    ]);

    // 11. An instance-owned group (--publish): made at join, served with
    // its generated FQDN, deleted when the instance is removed.
    let owned_host = w.mesh.host(8);
    w.backend(&owned_host, "solo");
    let plain = w.mesh.token_for("prod", 1);
    let _solo = instance(
        &mut w.mesh,
        &owned_host,
        "solo",
        &plain,
        &["--publish", "443:8080/http+tls"],
    );
    let mut owned_fqdn = String::new();
    w.wait("owned group", Duration::from_secs(30), || {
        let list = w.admin(&["service", "list", "--network", "prod"]);
        if let Some(g) = list
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["owner"] == "solo")
        {
            owned_fqdn = g["fqdn"].as_str().unwrap().to_owned();
            assert_eq!(g["persistent"], false);
            true
        } else {
            false
        }
    });
    w.wait("owned group served", Duration::from_secs(30), || {
        w.get(&owned_fqdn, "/who") == "solo\n"
    });
    w.mesh
        .admin(&["member", "remove", "--network", "prod", "solo"]);
    w.wait("owned group gone", Duration::from_secs(10), || {
        out(&w.curl(&format!(
            "-o /dev/null -w '%{{http_code}}' https://{owned_fqdn}/who"
        ))) == "404"
    });
    let list = w.admin(&["service", "list", "--network", "prod"]);
    assert!(list
        .as_array()
        .unwrap()
        .iter()
        .all(|g| g["owner"] != "solo"));
    // The persistent group survives its instances being removed.
    w.mesh
        .admin(&["member", "remove", "--network", "prod", "web-c"]);
    let g = w.admin(&["service", "get", "web", "--network", "prod"]);
    assert_eq!(g["persistent"], true);
    assert_eq!(g["instances"].as_array().unwrap().len(), 2);
    step(
        "11. owned group deleted with its instance; persistent group stays",
        t,
    );

    // 12. Scale to zero: a group with no instance and a wake hook; the
    // connection is held while the hook runs and served once one is online.
    let woken = w.logs.join("woken");
    let touch = format!("touch {}", woken.display());
    w.mesh.admin(&[
        "service",
        "create",
        "lazy",
        "--network",
        "prod",
        "--fqdn",
        &World::fqdn("lazy"),
        "-p",
        "443:8080/http+tls",
        "--wake-timeout-secs",
        "40",
        "--wake-command",
        "sh",
        "-c",
        &touch,
    ]);
    w.wait("lazy served", Duration::from_secs(10), || {
        w.gw_log().contains("\"lazy\"") || w.metrics().contains("group=\"lazy\"")
    });
    let lazy_fqdn = World::fqdn("lazy");
    let held = {
        let script = format!(
            "curl -sS --max-time 45 --cacert {} --connect-to '::{gw_ip}:' -w ' %{{http_code}} %{{time_total}}' https://{lazy_fqdn}/who",
            w.ca.display()
        );
        Command::new("ip")
            .args(["netns", "exec", &w.client.ns, "sh", "-c", &script])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    w.wait("the wake hook ran", Duration::from_secs(20), || {
        woken.exists()
    });
    let lazy_host = w.mesh.host(9);
    w.backend(&lazy_host, "lazy-a");
    let lazy_token = w.mesh.admin(&[
        "token",
        "create",
        "--network",
        "prod",
        "--service-group",
        "lazy",
    ]);
    let lazy_token = lazy_token
        .split(|c: char| c.is_whitespace() || c == '"')
        .find(|s| s.starts_with("istm1."))
        .unwrap()
        .to_owned();
    let _lazy = instance(&mut w.mesh, &lazy_host, "lazy-a", &lazy_token, &[]);
    let answer = held.wait_with_output().unwrap();
    let answer = out(&answer);
    assert!(answer.starts_with("lazy-a\n 200"), "{answer:?}");
    eprintln!("   held connection answered: {}", answer.replace('\n', " "));
    assert!(counter(&w.metrics(), "istmesh_gateway_wakes_total{group=\"lazy\"}") >= 1);
    step("12. wake hook with a held connection", t);

    // 13. Malformed input: closed or an error answer; the gateway lives on.
    let garbage = sh(
        &w.client.ns,
        &format!("printf 'GARBAGE\\r\\n\\r\\n' | timeout 5 socat -T 3 - TCP:{gw_ip}:80"),
    );
    assert!(
        out(&garbage).starts_with("HTTP/1.1 400"),
        "{:?}",
        out(&garbage)
    );
    let not_tls = sh(&w.client.ns, &format!("printf 'GET / HTTP/1.1\\r\\n\\r\\n' | timeout 5 socat -T 3 - TCP:{gw_ip}:443; echo rc=$?"));
    assert!(!out(&not_tls).contains("200"), "{:?}", out(&not_tls));
    let tcp_garbage = sh(
        &w.client.ns,
        &format!("head -c 4096 /dev/urandom | timeout 5 socat -T 3 - TCP:{gw_ip}:10000 | wc -c"),
    );
    let back: usize = out(&tcp_garbage).trim().parse().unwrap_or(0);
    assert!(
        back < 16,
        "random bytes get at most a TLS alert back: {back}"
    );
    let big = "x".repeat(100_000);
    let oversized = out(&w.curl(&format!(
        "-o /dev/null -w '%{{http_code}}' -H 'X-Big: {big}' http://{web}/who"
    )));
    assert_eq!(oversized, "431");
    let unknown = out(&w.curl(&format!(
        "-o /dev/null -w '%{{http_code}}' https://nope.{DOMAIN}/"
    )));
    assert!(unknown == "404" || unknown == "000", "{unknown}");
    assert!(w.get(&web, "/who").starts_with("web-"), "still serving");
    assert!(!w.gw_log().contains("panicked"), "{}", w.gw_log());
    step("13. malformed TLS, HTTP and oversized headers", t);

    // 14. Map changes with no restart: a port no longer published closes.
    w.mesh.admin(&[
        "service",
        "set",
        "web",
        "--network",
        "prod",
        "-p",
        "443:8080/http+tls",
        "-p",
        "80:8080/http+redirect",
    ]);
    w.wait("port 10000 closed", Duration::from_secs(10), || {
        !out(&sh(&w.gw.ns, "ss -Htln")).contains(":10000 ")
    });
    step("14. unpublished on the fly", t);

    // 15. Metrics per group and instance.
    let m = w.metrics();
    for needle in [
        "istmesh_gateway_active_connections{group=\"web\",member=\"web-a\"}",
        "istmesh_gateway_instance_forwarded_total{group=\"web\",member=\"web-b\"}",
        "istmesh_gateway_http_responses_total{group=\"web\",code=\"200\"}",
        "istmesh_gateway_http_responses_total{group=\"web\",code=\"503\"}",
        "istmesh_gateway_request_duration_seconds_bucket{group=\"web\",le=\"+Inf\"}",
        "istmesh_gateway_bytes_total{group=\"web\",direction=\"out\"}",
        "istmesh_gateway_queued_connections{group=\"lazy\"}",
    ] {
        assert!(m.contains(needle), "{needle} missing:\n{m}");
    }
    // One naming scheme, the build and process families, and what
    // promtool checks.
    for line in m.lines().filter(|l| !l.starts_with('#')) {
        assert!(
            line.starts_with("istmesh_gateway_") || line.starts_with("process_"),
            "{line}"
        );
    }
    assert!(m.contains("istmesh_gateway_build_info{version=\""), "{m}");
    assert!(counter(&m, "process_resident_memory_bytes") > 0, "{m}");
    assert_eq!(meshlib::metrics::lint(&m), Ok(()));
    gateway_support::promtool_check(&m);
    step("15. metrics", t);
    drop(sidecars);
}
