//! The gateway's certificates per name (issue 21), in network namespaces:
//! a keyserver, a gateway (`sidecar gateway`, kernel mode) with the
//! platform's wildcard (`--tls-cert`), a directory of groups' own
//! certificates (`--tls-cert-dir`) and `--tls-self-signed`, one instance
//! (`sidecar up` beside the python3 backend) in several groups, and a
//! client host using `curl` and `openssl s_client`.
//!
//! - SNI picks the certificate: the platform's wildcard for a generated
//!   FQDN, a group's own for its own name, and each name's certificate
//!   verifies only against its own CA.
//! - A request whose `Host` the connection's certificate does not cover is
//!   answered 421 (never routed to the other group); one the certificate
//!   covers is routed by its `Host`.
//! - A group created after start, with its certificate dropped into the
//!   directory, is served without a restart; a renewed certificate is
//!   shown to new handshakes without a restart.
//! - A group's name no file covers gets a self-signed ECDSA P-256
//!   certificate the gateway makes.
//! - The certificate metrics pass `promtool check metrics`.

mod dataplane_support;
mod gateway_support;
mod mesh_support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use dataplane_support::Host;
use gateway_support::{counter, issue_cert, make_certs, out, script, sh, DOMAIN};
use mesh_support::{bin, Mesh, Sidecar};

/// Why this test cannot run here, if it cannot.
fn skip_reason() -> Option<String> {
    gateway_support::skip_reason(&["curl", "openssl", "python3"])
}

/// The test's world; everything is stopped and removed on drop.
struct World {
    mesh: Mesh,
    gw: Host,
    client: Host,
    gw_log: PathBuf,
    gateway: Option<Child>,
    backend: Option<Child>,
    instance: Option<Sidecar>,
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
    /// `curl -sS` from the client to the gateway (every name resolves to
    /// it), trusting `ca`; the whole output.
    fn curl(&self, ca: &Path, args: &str) -> Output {
        sh(
            &self.client.ns,
            &format!(
                "curl -sS --max-time 20 --cacert {} --connect-to '::{}:' {args}",
                ca.display(),
                self.gw.underlay
            ),
        )
    }

    /// `openssl s_client` to port 443 with SNI `name`: what it printed.
    fn s_client(&self, name: &str) -> String {
        out(&sh(
            &self.client.ns,
            &format!(
                "echo | timeout 10 openssl s_client -connect {}:443 -servername {name} 2>&1",
                self.gw.underlay
            ),
        ))
    }

    fn gw_log(&self) -> String {
        std::fs::read_to_string(&self.gw_log).unwrap_or_default()
    }

    fn admin(&self, args: &[&str]) -> String {
        self.mesh.admin(args)
    }

    /// Waits until `cond` holds, printing the gateway's log if not.
    fn wait(&self, what: &str, limit: Duration, cond: impl FnMut() -> bool) {
        gateway_support::wait_until(what, limit, || self.gw_log(), cond);
    }
}

fn step(name: &str, t: Instant) {
    eprintln!("== {name}: {:.2} s", t.elapsed().as_secs_f64());
}

/// A group `name` at `fqdn` publishing 443 (HTTP over TLS) to 8080.
fn group(w: &World, name: &str, fqdn: &str, instance: Option<&str>) {
    let mut args = vec![
        "service",
        "create",
        name,
        "--network",
        "prod",
        "--fqdn",
        fqdn,
        "-p",
        "443:8080/http+tls",
    ];
    if let Some(i) = instance {
        args.extend(["--instance", i]);
    }
    w.admin(&args);
}

#[test]
fn the_gateway_picks_and_reloads_certificates_per_name() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let t = Instant::now();
    let mut mesh = Mesh::new();
    let work = mesh.topo.temp_path("");
    let (platform_ca, cert, key) = make_certs(&work);
    let dir = mesh.topo.temp_path("certs");
    std::fs::create_dir_all(&dir).unwrap();
    // A group's own name, with its own CA.
    let shop_ca = issue_cert(&work, &dir, "shop", "shop-ca", &["shop.example.test"]);
    let logs = mesh.topo.temp_path("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let gw = mesh.host(2);
    let client = mesh.topo.host(6);
    let web = format!("web.{DOMAIN}");
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
        .arg("--tls-cert-dir")
        .arg(&dir)
        .args(["--tls-self-signed", "--tls-reload-interval", "1s"])
        .env("ISTM_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&gw_log).unwrap())
        .spawn()
        .expect("start the gateway");
    let mut w = World {
        mesh,
        gw,
        client,
        gw_log,
        gateway: Some(gateway),
        backend: None,
        instance: None,
    };
    group(&w, "web", &web, None);
    // The instance and its backend.
    let host = w.mesh.host(3);
    let log = logs.join("web-a.log");
    w.backend = Some(
        Command::new("ip")
            .args(["netns", "exec", &host.ns, "python3"])
            .arg(script("backend.py"))
            .args(["--name", "web-a", "--log"])
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 backend"),
    );
    w.wait("the backend starts", Duration::from_secs(10), || {
        std::fs::read_to_string(&log).is_ok_and(|s| s.contains("ready"))
    });
    let bound = w.admin(&[
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
        out(&w.curl(&platform_ca, &format!("https://{web}/who"))) == "web-a\n"
    });
    group(&w, "shop", "shop.example.test", Some("web-a"));
    step("setup: keyserver, gateway, instance in web and shop", t);

    // 1. SNI picks the certificate; each verifies against its own CA only.
    w.wait("the gateway serves shop", Duration::from_secs(20), || {
        out(&w.curl(&shop_ca, "https://shop.example.test/who")) == "web-a\n"
    });
    let wrong = w.curl(&platform_ca, "https://shop.example.test/who");
    assert_eq!(
        wrong.status.code(),
        Some(60),
        "shop's name is not shown the platform's certificate: {}",
        String::from_utf8_lossy(&wrong.stderr)
    );
    let wrong = w.curl(&shop_ca, &format!("https://{web}/who"));
    assert_eq!(wrong.status.code(), Some(60), "web is not shown shop's");
    let shown = w.s_client("shop.example.test");
    assert!(
        shown.contains("CN = shop.example.test") || shown.contains("CN=shop.example.test"),
        "{shown}"
    );
    let shown = w.s_client(&web);
    assert!(shown.contains(&format!("*.{DOMAIN}")), "{shown}");
    step("1. SNI picks the platform's or the group's certificate", t);

    // 2. A Host the connection's certificate does not cover: 421, and the
    // other group's instance never sees it. One the wildcard covers is
    // routed by its Host (here: no such group, 404).
    let before = std::fs::read_to_string(&log).unwrap_or_default().len();
    let misdirected = out(&w.curl(
        &shop_ca,
        &format!("-o /dev/null -w '%{{http_code}}' -H 'Host: {web}' https://shop.example.test/who"),
    ));
    assert_eq!(misdirected, "421");
    let misdirected = out(&w.curl(
        &platform_ca,
        &format!(
            "--http2 -o /dev/null -w '%{{http_code}}' -H 'Host: shop.example.test' https://{web}/who"
        ),
    ));
    assert_eq!(misdirected, "421", "over HTTP/2 too");
    assert_eq!(
        std::fs::read_to_string(&log).unwrap_or_default().len(),
        before,
        "a misdirected request reached the instance"
    );
    let covered = out(&w.curl(
        &platform_ca,
        &format!("-o /dev/null -w '%{{http_code}}' -H 'Host: nothing.{DOMAIN}' https://{web}/who"),
    ));
    assert_eq!(covered, "404");
    step("2. 421 for a name the certificate does not cover", t);

    // 3. A new group, its certificate dropped into the directory: served
    // without a restart.
    group(&w, "news", "news.example.test", Some("web-a"));
    let news_ca = issue_cert(&work, &dir, "news", "news-ca", &["news.example.test"]);
    w.wait(
        "news served with its own certificate",
        Duration::from_secs(20),
        || out(&w.curl(&news_ca, "https://news.example.test/who")) == "web-a\n",
    );
    step("3. a new group and its certificate, no restart", t);

    // 4. Renewal: shop's certificate replaced (by another CA); new
    // handshakes see the new one, no restart.
    let renewed_ca = issue_cert(&work, &dir, "shop", "renewed-ca", &["shop.example.test"]);
    w.wait(
        "the renewed certificate shown",
        Duration::from_secs(20),
        || out(&w.curl(&renewed_ca, "https://shop.example.test/who")) == "web-a\n",
    );
    let old = w.curl(&shop_ca, "https://shop.example.test/who");
    assert_eq!(old.status.code(), Some(60), "the old certificate is gone");
    // SIGHUP reloads at once too (and does not stop the gateway).
    let pid = w.gateway.as_ref().unwrap().id();
    // `ip netns exec` execs the gateway: the child is the gateway.
    let hup = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        w.gateway.as_mut().unwrap().try_wait().unwrap().is_none(),
        "SIGHUP stopped the gateway:\n{}",
        w.gw_log()
    );
    assert_eq!(
        out(&w.curl(&renewed_ca, "https://shop.example.test/who")),
        "web-a\n"
    );
    step("4. a renewed certificate, no restart; SIGHUP", t);

    // 5. A group's name no file covers: a self-signed ECDSA P-256
    // certificate made by the gateway.
    group(&w, "plain", "plain.other.test", Some("web-a"));
    w.wait("plain served", Duration::from_secs(20), || {
        out(&sh(
            &w.client.ns,
            &format!(
                "curl -sS -k --max-time 10 --connect-to '::{}:' https://plain.other.test/who",
                w.gw.underlay
            ),
        )) == "web-a\n"
    });
    let shown = w.s_client("plain.other.test");
    assert!(shown.contains("plain.other.test"), "{shown}");
    assert!(
        shown.contains("Server public key is 256 bit"),
        "a P-256 key: {shown}"
    );
    assert!(
        shown.contains("Peer signature type: ECDSA"),
        "an ECDSA signature: {shown}"
    );
    step(
        "5. a self-signed P-256 certificate for a name no file covers",
        t,
    );

    // 6. Metrics.
    let m = out(&sh(&w.gw.ns, "curl -sS http://127.0.0.1:9478/metrics"));
    assert_eq!(counter(&m, "istmesh_gateway_certificates"), 3, "{m}");
    assert!(
        counter(&m, "istmesh_gateway_certificate_reloads_total") >= 2,
        "{m}"
    );
    // plain's, and perhaps news's: a handshake for news between its group
    // and its file (within the reload interval) got a made one.
    let made = counter(&m, "istmesh_gateway_certificates_made_total");
    assert!((1..=2).contains(&made), "{m}");
    assert_eq!(
        counter(&m, "istmesh_gateway_certificate_files_failing"),
        0,
        "{m}"
    );
    assert_eq!(meshlib::metrics::lint(&m), Ok(()));
    gateway_support::promtool_check(&m);
    step("6. metrics", t);

    // 7. A group's own names beside its FQDN: added to a running group
    // (PATCH through the CLI) and given at creation, served without a
    // restart with the certificate that covers them; removed, no longer
    // routed to the group.
    let names_ca = issue_cert(
        &work,
        &dir,
        "shop-own",
        "names-ca",
        &["shop.test", "*.shop.test", "blog.test"],
    );
    let set = w.admin(&[
        "service",
        "set",
        "shop",
        "--network",
        "prod",
        "--also",
        "www.shop.test",
        "--also",
        "SHOP.test",
    ]);
    assert!(
        set.contains("\"shop.test\"") && set.contains("www.shop.test"),
        "{set}"
    );
    for name in ["shop.test", "www.shop.test"] {
        w.wait(
            &format!("shop served as {name}"),
            Duration::from_secs(20),
            || out(&w.curl(&names_ca, &format!("https://{name}/who"))) == "web-a\n",
        );
    }
    let shown = w.s_client("www.shop.test");
    assert!(shown.contains("names-ca"), "{shown}");
    // Its FQDN still works, with its own certificate.
    assert_eq!(
        out(&w.curl(&renewed_ca, "https://shop.example.test/who")),
        "web-a\n"
    );
    let blog = w.admin(&[
        "service",
        "create",
        "blog",
        "--network",
        "prod",
        "--also",
        "blog.test",
        "-p",
        "443:8080/http+tls",
        "--instance",
        "web-a",
    ]);
    assert!(blog.contains("blog.test"), "{blog}");
    w.wait("blog served as blog.test", Duration::from_secs(20), || {
        out(&w.curl(&names_ca, "https://blog.test/who")) == "web-a\n"
    });
    // A name another group holds is refused, and nothing changes.
    let taken = w.mesh.admin_fails(&[
        "service",
        "set",
        "blog",
        "--network",
        "prod",
        "--also",
        "shop.test",
    ]);
    assert!(taken.contains("already used"), "{taken}");
    let shown = w.admin(&["service", "get", "blog", "--network", "prod"]);
    assert!(!shown.contains("\"shop.test\""), "{shown}");
    // Removed: the name reaches no group (the certificate still covers
    // it, so the request is routed by its Host and finds none).
    w.admin(&["service", "set", "shop", "--network", "prod", "--no-names"]);
    w.wait(
        "www.shop.test no longer routed",
        Duration::from_secs(20),
        || {
            out(&w.curl(
                &names_ca,
                "-o /dev/null -w '%{http_code}' https://www.shop.test/who",
            )) == "404"
        },
    );
    assert_eq!(
        out(&w.curl(&renewed_ca, "https://shop.example.test/who")),
        "web-a\n"
    );
    step("7. a group's own names, added and removed live", t);
}
