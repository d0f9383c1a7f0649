//! The multi-runner suite (issue 7), as a platform runs the mesh: a keyserver
//! host and three runners on one underlay; each runner NATs its instances
//! (each instance its own namespace, its own sidecar, its WireGuard port
//! forwarded from the runner's address); two networks. Every scenario asserts
//! exact outcomes and records its time; the summary table is printed at the
//! end (and written to `target/mesh-suite-summary.txt`). Needs root.

mod dataplane_support;
mod mesh_support;

use std::collections::BTreeMap;
use std::net::{TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dataplane_support::{in_ns, wait_for};
use mesh_support::{Mesh, Runner, Sidecar};

const SETTLE: Duration = Duration::from_secs(40);

/// Everything an instance's listeners received: "tcp:<msg>" / "udp:<msg>".
#[derive(Clone, Default)]
struct Inbox(Arc<Mutex<Vec<String>>>);

impl Inbox {
    fn count(&self, needle: &str) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m.contains(needle))
            .count()
    }

    /// Waits (up to 3 s) until `needle` arrived exactly `n` times.
    fn expect(&self, needle: &str, n: usize) {
        let start = Instant::now();
        while self.count(needle) < n && start.elapsed() < Duration::from_secs(3) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(self.count(needle), n, "{needle}");
    }
}

/// TCP on :7000 and UDP on :7001 inside `ns`, recording what arrives, until
/// `stop` is set.
fn listen(ns: &str, stop: Arc<AtomicBool>) -> Inbox {
    let inbox = Inbox::default();
    let (tx, rx) = std::sync::mpsc::channel();
    let record = inbox.clone();
    in_ns(ns, move || {
        let tcp = TcpListener::bind("0.0.0.0:7000").expect("tcp listener");
        let udp = UdpSocket::bind("0.0.0.0:7001").expect("udp listener");
        tcp.set_nonblocking(true).unwrap();
        udp.set_read_timeout(Some(Duration::from_millis(10)))
            .unwrap();
        tx.send(()).unwrap();
        let mut buf = [0u8; 2048];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((mut s, _)) = tcp.accept() {
                use std::io::Read;
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut text = String::new();
                let _ = s.read_to_string(&mut text);
                record
                    .0
                    .lock()
                    .unwrap()
                    .push(format!("tcp:{}", text.trim()));
            }
            if let Ok(n) = udp.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).trim().to_owned();
                record.0.lock().unwrap().push(format!("udp:{text}"));
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("listeners up");
    inbox
}

/// One instance of the suite.
struct Inst {
    sc: Sidecar,
    network: &'static str,
    inbox: Inbox,
    ip: String,
    name: String,
}

impl Inst {
    /// Sends `msg` over TCP to `target:7000` (a name or an address).
    fn tcp(&self, target: &str, msg: &str) -> bool {
        let script = format!("timeout 5 bash -c 'echo {msg} > /dev/tcp/{target}/7000'");
        self.sc.sh(&script).status.success()
    }

    /// Sends `msg` three times over UDP to `target:7001`.
    fn udp(&self, target: &str, msg: &str) {
        let script = format!("for i in 1 2 3; do timeout 2 bash -c 'echo {msg} > /dev/udp/{target}/7001'; sleep 0.05; done");
        self.sc.sh(&script);
    }

    fn dig_short(&self, name: &str) -> Vec<String> {
        let out = self
            .sc
            .sh(&format!("dig @127.0.0.77 +time=2 +tries=1 +short {name}"));
        let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect();
        v.sort();
        v
    }
}

/// Times one scenario and records it for the summary.
struct Summary(Vec<(String, Duration, String)>);

impl Summary {
    fn run<T>(&mut self, name: &str, f: impl FnOnce() -> (T, String)) -> T {
        let start = Instant::now();
        let (value, detail) = f();
        self.0.push((name.to_owned(), start.elapsed(), detail));
        value
    }

    fn print(&self) {
        let mut table = String::from("\n| scenario | time | measured |\n|---|---:|---|\n");
        for (name, t, detail) in &self.0 {
            table.push_str(&format!(
                "| {name} | {:.2} s | {detail} |\n",
                t.as_secs_f64()
            ));
        }
        eprintln!("{table}");
        let target = mesh_support::bin("sidecar").with_file_name("mesh-suite-summary.txt");
        let _ = std::fs::write(target, table);
    }
}

/// Starts a sidecar for `service` on a new instance behind `runner`.
fn start(mesh: &mut Mesh, runner: &mut Runner, service: &str, token: &str, port: u16) -> Sidecar {
    let host = mesh.instance(runner, port);
    let (p, endpoint) = (port.to_string(), format!("{}:{port}", runner.host.underlay));
    mesh.sidecar(
        &host,
        service,
        "up",
        &[
            "--token",
            token,
            "--listen-port",
            &p,
            "--endpoint",
            &endpoint,
        ],
    )
}

fn peers_of(sc: &Sidecar) -> Vec<serde_json::Value> {
    sc.status()
        .and_then(|s| s["peers"].as_array().cloned())
        .unwrap_or_default()
}

#[test]
fn multi_runner_suite() {
    require_netns!();
    let mut summary = Summary(Vec::new());
    let mut mesh = Mesh::new();
    mesh.admin(&["network", "create", "staging"]);
    let (prod_token, staging_token) = (mesh.token_for("prod", 50), mesh.token_for("staging", 50));
    let mut runners: Vec<Runner> = (1..=3).map(|k| mesh.runner(k)).collect();
    let stop = Arc::new(AtomicBool::new(false));

    // Two networks across the three runners, joining at once.
    let layout: [(&str, usize, &'static str, u16); 6] = [
        ("web", 0, "prod", 51821),
        ("api", 1, "prod", 51822),
        ("api", 2, "prod", 51823),
        ("my db", 2, "prod", 51824),
        ("web", 0, "staging", 51825),
        ("api", 1, "staging", 51826),
    ];
    let mut insts: Vec<Inst> = summary.run("join: 6 instances, 2 networks, 3 runners", || {
        let scs: Vec<(Sidecar, &'static str)> = layout
            .iter()
            .map(|&(service, r, network, port)| {
                let token = if network == "prod" {
                    &prod_token
                } else {
                    &staging_token
                };
                (
                    start(&mut mesh, &mut runners[r], service, token, port),
                    network,
                )
            })
            .collect();
        let insts: Vec<Inst> = scs
            .into_iter()
            .map(|(sc, network)| {
                let want = if network == "prod" { 3 } else { 1 };
                let status = sc.wait_peers(want, SETTLE);
                let inbox = listen(&sc.host.ns, stop.clone());
                Inst {
                    ip: status["ip"].as_str().unwrap().to_owned(),
                    name: status["instance"].as_str().unwrap().to_owned(),
                    sc,
                    network,
                    inbox,
                }
            })
            .collect();
        (insts, "all members see their network's peers".into())
    });
    let members = mesh.admin(&["member", "list", "--network", "prod", "--json"]);
    let prod_id = insts[0].sc.status().unwrap()["network"]
        .as_str()
        .unwrap()
        .to_owned();
    let app_ids = app_ids(&members);

    // 1. Every instance reaches every other of its network by every name, TCP and UDP.
    summary.run("1. names and reach (TCP+UDP) across runners", || {
        let mut checks = 0;
        for (i, from) in insts.iter().enumerate() {
            for (j, to) in insts.iter().enumerate() {
                if i == j || from.network != to.network {
                    continue;
                }
                let tag = format!("{i}to{j}");
                let host = format!("{}.internal", to.name);
                let got = from.sc.must_sh(&format!("getent hosts {host}"));
                assert_eq!(got.split_whitespace().next(), Some(to.ip.as_str()), "{tag}: {got}");
                assert_eq!(from.dig_short(&host), std::slice::from_ref(&to.ip), "{tag}");
                assert!(from.tcp(&host, &format!("{tag}-tcp")), "{tag}: TCP to {host}");
                from.udp(&host, &format!("{tag}-udp"));
                to.inbox.expect(&format!("tcp:{tag}-tcp"), 1);
                wait_for(Duration::from_secs(3), || to.inbox.count(&format!("udp:{tag}-udp")) >= 1);
                checks += 1;
            }
        }
        // Seed-003 names: every A record; .warp and WARP_IST_* for "my db".
        let (web, db) = (&insts[0], &insts[3]);
        let mut api_ips = vec![insts[1].ip.clone(), insts[2].ip.clone()];
        api_ips.sort();
        let api = &app_ids["api"];
        assert_eq!(web.dig_short(&format!("{api}.{prod_id}.private-network.internal.")), api_ips);
        assert_eq!(web.dig_short(&format!("web.{api}.{prod_id}.private-network.internal.")), api_ips);
        assert_eq!(web.dig_short(&format!("1.web.{api}.{prod_id}.private-network.internal.")).len(), 1);
        assert!(web.tcp("my-db.warp", "by-warp-name"));
        db.inbox.expect("tcp:by-warp-name", 1);
        let state = web.sc.state_dir.display();
        let by_var = format!(". {state}/ist.sh && timeout 5 bash -c \"echo by-variable > /dev/tcp/$WARP_IST_my_db/7000\"");
        web.sc.must_sh(&by_var);
        db.inbox.expect("tcp:by-variable", 1);
        ((), format!("{checks} pairs by <instance>.internal (getent, dig, TCP, UDP), seed-003 A records, .warp, WARP_IST_*"))
    });

    // 2. Nothing crosses between the networks: names, addresses, crafted packets.
    summary.run("2. isolation between networks", || {
        let (sweb, prod) = (&insts[4], &insts[0..4]);
        // Instance names and overlay addresses are per network: staging may
        // have its own `web-web-1` at the same address. What must never
        // happen is a prod-only name resolving, or a packet reaching prod.
        let staging_names: Vec<&str> = insts[4..].iter().map(|i| i.name.as_str()).collect();
        let mut prod_only = 0;
        for p in prod {
            let host = format!("{}.internal", p.name);
            if !staging_names.contains(&p.name.as_str()) {
                prod_only += 1;
                assert!(!sweb.sc.sh(&format!("getent hosts {host}")).status.success(), "{host} resolves in staging");
                assert!(sweb.dig_short(&host).is_empty(), "staging DNS answers {host}");
            }
            sweb.tcp(&p.ip, "cross-network");
            sweb.udp(&p.ip, "cross-network");
        }
        assert!(sweb.dig_short(&format!("{}.{prod_id}.private-network.internal.", app_ids["api"])).is_empty());
        std::thread::sleep(Duration::from_millis(300));
        for p in prod {
            assert_eq!(p.inbox.count("cross-network"), 0, "{} got staging traffic", p.name);
        }
        // A handshake crafted with staging web's key, sent to a prod member's
        // endpoint from inside staging: no answer.
        let answered = crafted_handshake_answered(sweb, &prod[3], &mesh_runner_endpoint(&layout, 3, &runners));
        assert!(!answered, "prod answered a staging key");
        assert!(prod_only >= 2);
        ((), format!("{prod_only} prod-only names unresolvable; no packet to 4 prod addresses and no crafted handshake crosses"))
    });

    // 3. Scale in: the second api instance leaves.
    summary.run("3. scale in: removal reaches every peer", || {
        let gone = insts[2].name.clone();
        let gone_ip = insts[2].ip.clone();
        let t0 = Instant::now();
        mesh.admin(&["member", "remove", "--network", "prod", &gone]);
        for p in [&insts[0], &insts[1], &insts[3]] {
            wait_for(Duration::from_secs(1), || {
                p.dig_short(&format!("{gone}.internal")).is_empty()
                    && !p.sc.hosts_file().contains(&gone)
                    && peers_of(&p.sc).iter().all(|x| x["ip"] != gone_ip.as_str())
            });
        }
        let took = t0.elapsed();
        assert!(took < Duration::from_secs(1), "{took:?}");
        let before = insts[2].inbox.count("after-removal");
        for _ in 0..5 {
            assert!(insts[0].tcp("api.warp", "after-removal"));
        }
        assert_eq!(
            insts[2].inbox.count("after-removal"),
            before,
            "a connection reached the removed instance"
        );
        insts[1].inbox.expect("after-removal", 5);
        (
            (),
            format!(
                "gone from DNS, hosts and tunnels of 3 peers in {} ms",
                took.as_millis()
            ),
        )
    });

    // 4 + 5. Keyserver killed during traffic; a sidecar restarted meanwhile.
    summary.run("4. keyserver kill -9 during traffic", || {
        mesh.kill_keyserver();
        for n in 0..20 {
            assert!(insts[0].tcp("my-db.warp", &format!("during-outage-{n}")));
        }
        insts[3].inbox.expect("during-outage", 20);
        ((), "20 connections across the outage, all delivered".into())
    });
    summary.run("5. sidecar restart while the keyserver is down", || {
        let endpoint = format!("{}:51821", runners[0].host.underlay);
        insts[0].sc.stop();
        insts[0]
            .sc
            .start("up", &["--listen-port", "51821", "--endpoint", &endpoint]);
        insts[0].sc.wait_peers(2, SETTLE);
        let state = insts[0].sc.status().unwrap();
        assert_eq!(state["control"]["state"], "connecting", "{state}");
        assert_eq!(state["ip"].as_str(), Some(insts[0].ip.as_str()));
        wait_for(SETTLE, || insts[0].tcp("my-db.warp", "from-cache"));
        wait_for(Duration::from_secs(3), || {
            insts[3].inbox.count("from-cache") >= 1
        });
        ((), "back from the cached map, reaches my db".into())
    });
    summary.run("4b. keyserver back: members reconnect, IPs kept", || {
        mesh.start_keyserver();
        for i in &insts[..2] {
            wait_for(Duration::from_secs(40), || {
                i.sc.status()
                    .is_some_and(|s| s["control"]["state"] == "connected")
            });
            assert_eq!(i.sc.ip(), i.ip, "{} lost its IP", i.name);
        }
        ((), "reconnected with the same IPs".into())
    });

    // 6. Runner 2 changes its underlay address; its members' peers follow.
    summary.run("6. runner address change: peers follow", || {
        let r2 = &runners[1].host;
        let (old, new) = (r2.underlay.clone(), "192.0.2.42".to_string());
        let dev = dataplane_support::must(
            "ip",
            &["-n", &r2.ns, "-o", "-4", "addr", "show", "to", &old],
        );
        let dev = dev
            .split_whitespace()
            .nth(1)
            .expect("runner device")
            .trim_end_matches(':')
            .to_owned();
        // Delete first: deleting a primary address also deletes the
        // secondaries of its subnet (no promote_secondaries).
        dataplane_support::must(
            "ip",
            &[
                "-n",
                &r2.ns,
                "addr",
                "del",
                &format!("{old}/24"),
                "dev",
                &dev,
            ],
        );
        dataplane_support::must(
            "ip",
            &[
                "-n",
                &r2.ns,
                "addr",
                "add",
                &format!("{new}/24"),
                "dev",
                &dev,
            ],
        );
        // As on a real move, the old address is dead: the runner's NAT
        // forgets every mapping (as a router does when its WAN address
        // changes) and no neighbour still delivers to the old address.
        dataplane_support::must("ip", &["netns", "exec", &r2.ns, "conntrack", "-F"]);
        for other in [&runners[0].host, &runners[2].host, &mesh.ks] {
            dataplane_support::must("ip", &["-n", &other.ns, "neigh", "flush", "to", &old]);
        }
        let api = &insts[1];
        wait_for(SETTLE, || {
            api.tcp(&format!("{}.internal", insts[0].name), "after-move")
        });
        let seen = peers_of(&insts[0].sc)
            .iter()
            .find(|p| p["ip"] == api.ip.as_str())
            .and_then(|p| p["endpoint"].as_str().map(str::to_owned))
            .unwrap_or_default();
        assert!(
            seen.starts_with(&format!("{new}:")),
            "web still sends to {seen}"
        );
        wait_for(Duration::from_secs(10), || {
            insts[0].tcp(&format!("{}.internal", api.name), "back-to-moved")
        });
        ((), format!("web now reaches api at {seen}"))
    });

    // 7. 20 instances on 3 runners join a third network at once.
    summary.run("7. 20 instances join concurrently", || {
        mesh.admin(&["network", "create", "scale"]);
        let token = mesh.token_for("scale", 20);
        let scs: Vec<Sidecar> = (0..20u16)
            .map(|n| {
                start(
                    &mut mesh,
                    &mut runners[usize::from(n % 3)],
                    &format!("svc{n}"),
                    &token,
                    51830 + n,
                )
            })
            .collect();
        let t0 = Instant::now();
        for sc in &scs {
            sc.wait_peers(19, Duration::from_secs(90));
        }
        (
            (),
            format!(
                "each of 20 sees 19 peers after {:.1} s",
                t0.elapsed().as_secs_f64()
            ),
        )
    });

    stop.store(true, Ordering::Relaxed);
    summary.print();
}

/// App ids by service name, from the member list.
fn app_ids(members: &str) -> BTreeMap<String, String> {
    let json: serde_json::Value = serde_json::from_str(members).expect("member list JSON");
    let list = json
        .as_array()
        .or_else(|| json["members"].as_array())
        .expect("members");
    list.iter()
        .map(|m| {
            (
                m["service"].as_str().unwrap().to_owned(),
                m["app_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// The public endpoint (runner address and port) of layout entry `i`.
fn mesh_runner_endpoint(
    layout: &[(&str, usize, &str, u16)],
    i: usize,
    runners: &[Runner],
) -> String {
    let (_, r, _, port) = layout[i];
    format!("{}:{port}", runners[r].host.underlay)
}

/// Sends a WireGuard handshake initiation made with `from`'s own key to
/// `to`'s public key at `endpoint`, from inside `from`'s namespace; whether
/// anything came back within a second.
fn crafted_handshake_answered(from: &Inst, to: &Inst, endpoint: &str) -> bool {
    use boringtun::noise::{Tunn, TunnResult};
    let key_text = std::fs::read_to_string(from.sc.state_dir.join("private.key")).unwrap();
    let key_bytes: [u8; 32] = base64_decode(key_text.trim());
    let peer = to.sc.status().unwrap()["public_key"]
        .as_str()
        .unwrap()
        .to_owned();
    let peer_bytes: [u8; 32] = base64_decode(&peer);
    let endpoint = endpoint.to_owned();
    in_ns(&from.sc.host.ns, move || {
        let mut tunn = Tunn::new(
            x25519_dalek::StaticSecret::from(key_bytes),
            x25519_dalek::PublicKey::from(peer_bytes),
            None,
            None,
            1,
            None,
        );
        let mut buf = vec![0u8; 2048];
        let init = match tunn.format_handshake_initiation(&mut buf, false) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            _ => panic!("no initiation"),
        };
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        sock.send_to(&init, &endpoint).unwrap();
        sock.recv(&mut buf).is_ok()
    })
    .join()
    .unwrap()
}

fn base64_decode(text: &str) -> [u8; 32] {
    let key: meshlib::keys::PublicKey = text.parse().expect("base64 key");
    *key.as_bytes()
}
