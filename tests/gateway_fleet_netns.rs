//! One gateway for many networks (issue 21), in network namespaces: a
//! keyserver, one gateway (`sidecar gateway --gateway-token-file`: a
//! gateway credential, no join token) and instances of two networks
//! (tenants), each publishing 443 with its own FQDN, and a client host
//! using `curl`.
//!
//! - Both networks are served on the one gateway address, each name to its
//!   own network's instance (the instances hold the same overlay address
//!   in their networks).
//! - Cross-tenant attempts never reach the other tenant: a `Host` of the
//!   other network on a TLS connection made for one network's name (HTTP/1.1
//!   and HTTP/2, as connection coalescing under the shared wildcard would
//!   send it) is answered 421; a member of one network cannot reach
//!   anything through the gateway's address in its network.
//! - A network created after the gateway started, with its group, is
//!   served without a restart; once its last group is deleted, the gateway
//!   leaves it.
//! - The credential reaches nothing in the admin API; a credential of one
//!   tenant serves that tenant's networks only.

mod dataplane_support;
mod gateway_support;
mod mesh_support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use dataplane_support::Host;
use gateway_support::{make_certs, out, script, sh, DOMAIN};
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
    ca: PathBuf,
    logs: PathBuf,
    gateways: Vec<(Child, PathBuf)>,
    backends: Vec<Child>,
    instances: Vec<Sidecar>,
}

impl Drop for World {
    fn drop(&mut self) {
        for (c, _) in &mut self.gateways {
            let _ = c.kill();
            let _ = c.wait();
        }
        for c in &mut self.backends {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.instances.clear();
        // The gateways' UAPI sockets (`<prefix>n<k>`), also of the one
        // killed without leaving.
        if let Ok(rd) = std::fs::read_dir("/var/run/wireguard") {
            let tag = &self.mesh.topo.tag;
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let ours = [format!("g{tag}n"), format!("h{tag}n")]
                    .iter()
                    .any(|p| name.starts_with(p.as_str()));
                if ours {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

impl World {
    /// `curl -sS` from the client to the gateway (every name resolves to
    /// it); the whole output.
    fn curl(&self, args: &str) -> Output {
        sh(
            &self.client.ns,
            &format!(
                "curl -sS --max-time 20 --cacert {} --connect-to '::{}:' {args}",
                self.ca.display(),
                self.gw.underlay
            ),
        )
    }

    fn get(&self, fqdn: &str) -> String {
        out(&self.curl(&format!("https://{fqdn}/who")))
    }

    fn logs(&self) -> String {
        self.gateways
            .iter()
            .map(|(_, log)| std::fs::read_to_string(log).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n----\n")
    }

    /// Waits until `cond` holds, printing the gateway's log if not.
    fn wait(&self, what: &str, limit: Duration, cond: impl FnMut() -> bool) {
        gateway_support::wait_until(what, limit, || self.logs(), cond);
    }

    /// A gateway with the credential in `credential` (a file), on the
    /// gateway host, its UAPI sockets named `<prefix>n<k>`.
    fn start_gateway(&mut self, credential: &Path, prefix: &str, metrics: &str) {
        let (_, cert, key) = (
            (),
            self.ca.with_file_name("gw.pem"),
            self.ca.with_file_name("gw.key"),
        );
        let log = self.logs.join(format!("gateway-{prefix}.log"));
        let child = Command::new("ip")
            .args(["netns", "exec", &self.gw.ns])
            .arg(bin("sidecar"))
            .arg("gateway")
            .arg("--gateway-token-file")
            .arg(credential)
            .args(["--interface", prefix, "--metrics", metrics])
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .args(["--networks-interval", "1s", "--health-interval", "1s"])
            .env("ISTM_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start the gateway");
        self.gateways.push((child, log));
    }

    /// An instance `name` of network `net` on host `i`, beside a backend
    /// that answers `/who` with its name, attached to group `group`.
    fn instance(&mut self, i: u8, net: &str, name: &str, group: &str) -> Host {
        let host = self.mesh.host(i);
        let log = self.logs.join(format!("{name}.log"));
        self.backends.push(
            Command::new("ip")
                .args(["netns", "exec", &host.ns, "python3"])
                .arg(script("backend.py"))
                .args(["--name", name, "--log"])
                .arg(&log)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("python3 backend"),
        );
        self.wait("a backend starts", Duration::from_secs(10), || {
            std::fs::read_to_string(&log).is_ok_and(|s| s.contains("ready"))
        });
        let bound = self.mesh.admin(&[
            "token",
            "create",
            "--network",
            net,
            "--service-group",
            group,
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
            name,
            "--port",
            "8080",
            "--hosts-file",
            "",
            "--no-dns",
        ];
        let s = self.mesh.sidecar(&host, "web", "up", &args);
        self.instances.push(s);
        host
    }

    /// The gateway members of `net` (their overlay addresses).
    fn gateway_members(&self, net: &str) -> Vec<String> {
        let list: serde_json::Value =
            serde_json::from_str(
                &self
                    .mesh
                    .admin(&["member", "list", "--network", net, "--json"]),
            )
            .expect("member list JSON");
        list.as_array()
            .into_iter()
            .flatten()
            .filter(|m| m["service"] == "gateway")
            .filter_map(|m| m["ip"].as_str().map(str::to_owned))
            .collect()
    }

    /// Requests the backend of `name` saw.
    fn served(&self, name: &str) -> usize {
        std::fs::read_to_string(self.logs.join(format!("{name}.log")))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("http"))
            .count()
    }
}

fn step(name: &str, t: Instant) {
    eprintln!("== {name}: {:.2} s", t.elapsed().as_secs_f64());
}

/// A group `name` at `fqdn` publishing 443 (HTTP over TLS) to 8080.
fn group(mesh: &Mesh, net: &str, name: &str, fqdn: &str) {
    mesh.admin(&[
        "service",
        "create",
        name,
        "--network",
        net,
        "--fqdn",
        fqdn,
        "-p",
        "443:8080/http+tls",
    ]);
}

/// A gateway credential (`istg1.`) written to a file.
fn credential(mesh: &Mesh, path: &Path, tenant: Option<&str>) -> String {
    let mut args = vec![
        "api-token",
        "create",
        "--name",
        "edge",
        "--role",
        "gateway",
        "--bare",
    ];
    if let Some(t) = tenant {
        args.extend(["--tenant", t]);
    }
    let text = mesh.admin(&args).trim().to_owned();
    assert!(text.starts_with("istg1."), "{text}");
    std::fs::write(path, &text).unwrap();
    text
}

#[test]
fn one_gateway_serves_every_network_and_keeps_tenants_apart() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let t = Instant::now();
    let mut mesh = Mesh::new();
    let work = mesh.topo.temp_path("");
    let (ca, _, _) = make_certs(&work);
    let logs = mesh.topo.temp_path("logs");
    std::fs::create_dir_all(&logs).unwrap();
    mesh.admin(&["network", "create", "acme", "--tenant", "acme"]);
    let (web, shop) = (format!("web.{DOMAIN}"), format!("shop.{DOMAIN}"));
    group(&mesh, "prod", "web", &web);
    group(&mesh, "acme", "shop", &shop);
    let cred = work.join("gateway.cred");
    let text = credential(&mesh, &cred, None);
    let gw = mesh.host(2);
    let client = mesh.topo.host(6);
    let mut w = World {
        mesh,
        gw,
        client,
        ca,
        logs,
        gateways: Vec::new(),
        backends: Vec::new(),
        instances: Vec::new(),
    };
    // The first member of each network: the same overlay address in both.
    w.instance(3, "prod", "web-a", "web");
    let acme_host = w.instance(4, "acme", "shop-a", "shop");
    let prefix = format!("g{}", w.mesh.topo.tag);
    w.start_gateway(&cred, &prefix, "127.0.0.1:9478");
    step("setup: two networks, one gateway with a credential", t);

    // 1. Both networks on one address and port, each name to its own.
    w.wait("both networks served", Duration::from_secs(40), || {
        w.get(&web) == "web-a\n" && w.get(&shop) == "shop-a\n"
    });
    for _ in 0..5 {
        assert_eq!(w.get(&web), "web-a\n");
        assert_eq!(w.get(&shop), "shop-a\n");
    }
    step("1. two networks' groups on one gateway", t);

    // 2. Cross-tenant: a Host of the other network on a connection made
    // for this one's name is refused with 421, over HTTP/1.1 and HTTP/2,
    // and never reaches the other network's instance.
    let (web_seen, shop_seen) = (w.served("web-a"), w.served("shop-a"));
    for version in ["--http1.1", "--http2"] {
        let code = out(&w.curl(&format!(
            "{version} -o /dev/null -w '%{{http_code}}' -H 'Host: {shop}' https://{web}/who"
        )));
        assert_eq!(code, "421", "{version}");
        let code = out(&w.curl(&format!(
            "{version} -o /dev/null -w '%{{http_code}}' -H 'Host: {web}' https://{shop}/who"
        )));
        assert_eq!(code, "421", "{version}");
    }
    assert_eq!(
        (w.served("web-a"), w.served("shop-a")),
        (web_seen, shop_seen),
        "a misdirected request reached an instance"
    );
    // Still served properly afterwards.
    assert_eq!(w.get(&shop), "shop-a\n");
    // A member of acme reaches nothing through the gateway's address in
    // acme (no port of it is served to members).
    let gw_in_acme = w.gateway_members("acme");
    assert_eq!(gw_in_acme.len(), 1, "one gateway member in acme");
    for port in [443, 8080, 80] {
        let o = sh(
            &acme_host.ns,
            &format!(
                "timeout 3 python3 -c 'import socket; socket.create_connection((\"{}\", {port}), 2)'",
                gw_in_acme[0]
            ),
        );
        assert!(
            !o.status.success(),
            "a member of acme connected to the gateway's {}:{port}",
            gw_in_acme[0]
        );
    }
    step(
        "2. cross-tenant Host gets 421; the gateway's address serves members nothing",
        t,
    );

    // 3. A network created now, with a group and an instance: served
    // without a restart.
    w.mesh.admin(&["network", "create", "third"]);
    let news = format!("news.{DOMAIN}");
    group(&w.mesh, "third", "news", &news);
    w.instance(5, "third", "three", "news");
    w.wait("the new network served", Duration::from_secs(40), || {
        w.get(&news) == "three\n"
    });
    assert_eq!(w.get(&web), "web-a\n");
    step("3. a new network served without a restart", t);

    // 4. Its last group deleted: the gateway leaves the network.
    w.mesh
        .admin(&["service", "delete", "news", "--network", "third"]);
    w.wait(
        "the gateway left the network",
        Duration::from_secs(30),
        || w.gateway_members("third").is_empty(),
    );
    let code = out(&w.curl(&format!(
        "-o /dev/null -w '%{{http_code}}' https://{news}/who"
    )));
    assert_eq!(code, "404");
    assert_eq!(w.get(&shop), "shop-a\n", "the others stay served");
    step("4. a network without groups is left", t);

    // 5. The credential reaches nothing in the admin API.
    let ks = &w.mesh.ks;
    let api = out(&sh(
        &ks.ns,
        &format!(
            "curl -s -o /dev/null -w '%{{http_code}}' -H 'Authorization: Bearer {text}' http://127.0.0.1:7001/v1/networks"
        ),
    ));
    assert_eq!(api, "403", "admin API with a gateway credential");
    step("5. no admin API for the credential", t);

    // 6. A tenant's credential: that tenant's networks only.
    let acme_cred = work.join("acme.cred");
    credential(&w.mesh, &acme_cred, Some("acme"));
    // Stop the first gateway: the public ports are the second one's.
    let (mut first, _) = w.gateways.remove(0);
    let _ = first.kill();
    let _ = first.wait();
    let prefix2 = format!("h{}", w.mesh.topo.tag);
    w.start_gateway(&acme_cred, &prefix2, "127.0.0.1:9479");
    w.wait(
        "acme served by its own gateway",
        Duration::from_secs(40),
        || w.get(&shop) == "shop-a\n",
    );
    let code = out(&w.curl(&format!(
        "-o /dev/null -w '%{{http_code}}' https://{web}/who"
    )));
    assert_eq!(code, "404", "prod is not acme's");
    step("6. a tenant's credential serves that tenant only", t);
}
