//! The sidecar end to end (issue 5), against a real keyserver and real
//! engines in network namespaces: names by `getent hosts` and `dig`, TCP by
//! `.warp` name and by `WARP_IST_*` in `sidecar run` (the service's own
//! address, the default), revocation reaching DNS,
//! hosts and the tunnel within a second, and static stability with the
//! keyserver down. Needs root; skipped with a message otherwise.

mod dataplane_support;
mod mesh_support;

use std::io::Read;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use dataplane_support::{in_ns, ping};
use mesh_support::{Mesh, Sidecar};

const SETTLE: Duration = Duration::from_secs(20);

/// Accepts one TCP connection on `ip:port` inside `ns` and returns what it read.
fn one_tcp_message(ns: &str, ip: &str, port: u16) -> std::thread::JoinHandle<String> {
    let addr = format!("{ip}:{port}");
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = in_ns(ns, move || {
        let listener = TcpListener::bind(&addr).expect("bind");
        listener.set_nonblocking(true).unwrap();
        tx.send(()).unwrap();
        let start = Instant::now();
        let (mut s, _) = loop {
            match listener.accept() {
                Ok(x) => break x,
                Err(_) if start.elapsed() < Duration::from_secs(30) => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("no connection on {addr}: {e}"),
            }
        };
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        text
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("listener ready");
    handle
}

/// Polls `cond` every 10 ms; the time it took, or panics after `limit`.
fn time_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    start.elapsed()
}

fn dig(sc: &Sidecar, args: &str) -> String {
    String::from_utf8_lossy(
        &sc.sh(&format!("dig @127.0.0.77 +time=2 +tries=1 {args}"))
            .stdout,
    )
    .into_owned()
}

#[test]
fn sidecars_resolve_reach_and_forget_each_other() {
    require_netns!();
    let mut mesh = Mesh::new();
    let token = mesh.token();
    let (ha, hb, hc) = (mesh.host(2), mesh.host(3), mesh.host(4));
    let a = mesh.sidecar(&ha, "api", "up", &["--token", &token]);
    let b = mesh.sidecar(&hb, "my db", "up", &["--token", &token]);
    a.wait_peers(1, SETTLE);
    let b_status = b.wait_peers(1, SETTLE);
    let (b_ip, b_instance) = (b.ip(), b_status["instance"].as_str().unwrap().to_owned());
    let network = b_status["network"].as_str().unwrap().to_owned();

    // Names: the hosts file (read by getent) and the private DNS (dig).
    let hosts = a.hosts_file();
    assert!(
        hosts.starts_with(
            "127.0.0.1\tlocalhost\n# user's line\n192.0.2.250 keep.me\n# BEGIN ist-mesh"
        ),
        "{hosts}"
    );
    // `.warp` gives the service's own address (the default), from the
    // service range after the network's /22; the instance's names give b.
    let getent = a.must_sh("getent hosts my-db.warp");
    let db_vip = getent
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    let vip: std::net::Ipv4Addr = db_vip.parse().expect("an IPv4 service address");
    assert_eq!(vip.octets()[..2], [10, 240], "{getent}");
    assert!((4..8).contains(&vip.octets()[2]), "service range: {getent}");
    let getent = a.must_sh(&format!("getent hosts {b_instance}.internal"));
    assert_eq!(getent.split_whitespace().next(), Some(b_ip.as_str()));
    assert_eq!(dig(&a, "+short my-db.warp").trim(), db_vip);
    assert_eq!(
        dig(&a, &format!("+short {b_instance}.internal")).trim(),
        b_ip
    );
    let members = mesh.admin(&["member", "list", "--network", "prod", "--json"]);
    let app_id = members
        .split(|c: char| c == '"' || c.is_whitespace())
        .find(|w| w.starts_with("ap-"))
        .expect("an app id in the member list")
        .to_owned();
    let (app_a, app_b) = (app_of(&members, "api"), app_of(&members, "my db"));
    assert!(app_id == app_a || app_id == app_b);
    for name in [
        format!("{app_b}.{network}.private-network.internal."),
        format!("web.{app_b}.{network}.private-network.internal."),
        format!("1.web.{app_b}.{network}.private-network.internal."),
    ] {
        assert_eq!(dig(&a, &format!("+short {name}")).trim(), b_ip, "{name}");
    }
    let answer = dig(&a, "+noall +answer my-db.warp");
    assert_eq!(
        answer.split_whitespace().nth(1),
        Some("30"),
        "TTL: {answer}"
    );
    assert!(dig(&a, "nobody.internal").contains("status: NXDOMAIN"));

    // TCP by .warp name through the tunnel (bash resolves with getaddrinfo):
    // the service address, balanced to b, which holds it while it serves.
    let got = one_tcp_message(&hb.ns, "0.0.0.0", 7001);
    a.must_sh("bash -c 'echo hello-by-name > /dev/tcp/my-db.warp/7001'");
    assert_eq!(got.join().unwrap(), "hello-by-name\n");

    // `sidecar run`: the child reaches "my db" by its variable, and its exit
    // code becomes the sidecar's.
    let got = one_tcp_message(&hb.ns, "0.0.0.0", 7002);
    let script = "test -n \"$WARP_IST_my_db\" && bash -c \"echo hello-by-var-$WARP_IST_my_db > /dev/tcp/$WARP_IST_my_db/7002\" && exit 7";
    let mut c = mesh.sidecar(
        &hc,
        "worker",
        "run",
        &["--token", &token, "--", "sh", "-c", script],
    );
    assert_eq!(
        c.wait_exit(SETTLE),
        Some(7),
        "log:\n{}",
        std::fs::read_to_string(&c.log).unwrap_or_default()
    );
    assert_eq!(got.join().unwrap(), format!("hello-by-var-{db_vip}\n"));
    c.stop();

    // Revocation: b leaves every view of a within a second. The service
    // keeps its address (in names too), now with no instance behind it.
    assert!(ping(&ha, &b_ip, None, 1));
    assert!(ping(&ha, &db_vip, None, 1), "ping by the service address");
    let removed_at = Instant::now();
    mesh.admin(&["member", "remove", "--network", "prod", &b_instance]);
    let b_name = format!("{b_instance}.internal");
    let dns = time_until(Duration::from_secs(1), "DNS forgets b", || {
        dig(&a, &b_name).contains("NXDOMAIN")
    });
    let hosts = time_until(Duration::from_secs(1), "hosts forgets b", || {
        !a.hosts_file().contains(&b_ip)
    });
    let wg = time_until(Duration::from_secs(1), "engine drops b", || {
        a.status().is_some_and(|s| {
            s["peers"]
                .as_array()
                .is_some_and(|p| p.iter().all(|p| p["ip"] != b_ip.as_str()))
        })
    });
    eprintln!(
        "revocation: dns {dns:?}, hosts {hosts:?}, engine {wg:?} (total {:?})",
        removed_at.elapsed()
    );
    assert!(removed_at.elapsed() < Duration::from_millis(1500));
    assert!(
        !ping(&ha, &b_ip, None, 1),
        "b still reachable after revocation"
    );
    assert_eq!(dig(&a, "+short my-db.warp").trim(), db_vip, "kept");
    // No instance: a connection to the service address is refused at once
    // (a reset), never left hanging.
    let started = Instant::now();
    let out = a.sh("bash -c 'echo x > /dev/tcp/my-db.warp/7003'");
    assert!(!out.status.success(), "refused");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "refused at once"
    );
    // b itself learns it was revoked and exits with an error.
    let mut b = b;
    assert_eq!(b.wait_exit(Duration::from_secs(10)), Some(1));
}

/// The app id of `service` in the member-list JSON.
fn app_of(members: &str, service: &str) -> String {
    let json: serde_json::Value = serde_json::from_str(members).expect("member list JSON");
    let list = json
        .as_array()
        .or_else(|| json["members"].as_array())
        .expect("members array");
    list.iter()
        .find(|m| m["service"] == service)
        .and_then(|m| m["app_id"].as_str())
        .unwrap_or_else(|| panic!("no member of {service} in {members}"))
        .to_owned()
}

#[test]
fn data_plane_outlives_the_keyserver() {
    require_netns!();
    let mut mesh = Mesh::new();
    let token = mesh.token();
    let (ha, hb) = (mesh.host(2), mesh.host(3));
    let mut a = mesh.sidecar(&ha, "api", "up", &["--token", &token]);
    let b = mesh.sidecar(&hb, "db", "up", &["--token", &token]);
    a.wait_peers(1, SETTLE);
    b.wait_peers(1, SETTLE);
    let b_ip = b.ip();
    let a_ip = a.ip();
    assert!(ping(&ha, &b_ip, None, 1));

    // The keyserver dies: existing flows continue.
    mesh.kill_keyserver();
    assert!(ping(&ha, &b_ip, None, 3));

    // A sidecar restarted while the keyserver is down comes back from its
    // cache: same key, same IP, same peers; names still resolve.
    a.stop();
    a.start("up", &[]);
    let s = a.wait_peers(1, SETTLE);
    assert_eq!(
        s["ip"].as_str(),
        Some(a_ip.as_str()),
        "IP changed across restart"
    );
    assert_eq!(s["control"]["state"], "connecting", "{s}");
    dataplane_support::wait_for(SETTLE, || ping(&ha, &b_ip, None, 1));
    // Names from the cache: the service's address, which reaches b.
    let db_vip = a.must_sh("getent hosts db.warp");
    let db_vip = db_vip.split_whitespace().next().unwrap_or_default();
    assert_ne!(db_vip, b_ip);
    assert!(ping(&ha, db_vip, None, 1), "b by the service address");

    // The keyserver returns: the sidecar reconnects by itself.
    mesh.start_keyserver();
    dataplane_support::wait_for(Duration::from_secs(30), || {
        a.status()
            .is_some_and(|s| s["control"]["state"] == "connected")
    });
    assert_eq!(a.ip(), a_ip);
}
