//! The private DNS server against the real `dig`: names of seeds 001, 003 and
//! 004, TTL, NXDOMAIN, answers that change the moment the index changes,
//! truncation then TCP, and forwarding to a real upstream (a second instance
//! of the server, authoritative for a name the first one does not know).
//! Everything on 127.0.0.1.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use meshlib::ist::config::{parse_toml, Overrides};
use meshlib::ist::table::IstTable;
use meshlib::keys::PrivateKey;
use meshlib::names::NameIndex;
use meshlib::netmap::{Member, NetworkMap};
use sidecar::dns::{serve, DnsConfig};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{oneshot, watch};

const PN: &str = "pn-ad0fd6a1-d05e-40ea-bf63-c4f8a75a9d8c";

fn member(instance: &str, service: &str, ptype: &str, index: u32, ip: Ipv4Addr) -> Member {
    Member {
        public_key: PrivateKey::generate().public_key(),
        ip,
        endpoints: vec![],
        service: service.into(),
        app_id: meshlib::ist::hostname_label(service)
            .unwrap()
            .parse()
            .unwrap(),
        process_type: ptype.parse().unwrap(),
        index,
        instance: instance.parse().unwrap(),
        runner: "r1".into(),
        ports: vec![],
        state: Default::default(),
    }
}

fn map_with(members: Vec<Member>) -> NetworkMap {
    let mut map = NetworkMap::new(PN.parse().unwrap(), "prod", meshlib::ipam::DEFAULT_RANGE);
    for m in members {
        map.members.insert(m.public_key, m);
    }
    map
}

fn index(map: &NetworkMap, overrides: &Overrides) -> Arc<NameIndex> {
    Arc::new(NameIndex::build(
        map,
        &IstTable::build(map.services(), overrides),
    ))
}

/// A running server; stops when dropped.
struct Server {
    addr: SocketAddr,
    names: watch::Sender<Arc<NameIndex>>,
    _stop: oneshot::Sender<()>,
}

async fn start(initial: Arc<NameIndex>, upstreams: Vec<SocketAddr>) -> Server {
    // UDP and TCP on the same port: take a UDP port, then TCP on it (retry
    // if that TCP port happens to be taken).
    for _ in 0..20 {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = udp.local_addr().unwrap();
        let Ok(tcp) = TcpListener::bind(addr).await else {
            continue;
        };
        let (names, rx) = watch::channel(initial);
        let (stop, stopped) = oneshot::channel::<()>();
        let config = DnsConfig {
            upstreams,
            upstream_timeout: Duration::from_millis(500),
            ..DnsConfig::default()
        };
        tokio::spawn(serve(udp, tcp, rx, config, async move {
            let _ = stopped.await;
        }));
        return Server {
            addr,
            names,
            _stop: stop,
        };
    }
    panic!("no free port pair");
}

/// Runs dig against `server` and returns its stdout.
async fn dig(server: SocketAddr, args: &[&str]) -> String {
    let mut cmd = Command::new("dig");
    cmd.arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string(), "+time=2", "+tries=1"])
        .args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .expect("run dig");
    String::from_utf8(out.stdout).unwrap()
}

fn have_dig() -> bool {
    let ok = Command::new("dig").arg("-v").output().is_ok();
    if !ok {
        eprintln!("SKIPPED: dig not installed (apt-get install dnsutils)");
    }
    ok
}

fn ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 240, 0, n)
}

fn sorted_lines(s: &str) -> Vec<String> {
    let mut v: Vec<String> = s.lines().map(str::to_owned).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_resolve_with_dig() {
    if !have_dig() {
        return;
    }
    let map = map_with(vec![
        member("api-1", "api", "web", 1, ip(1)),
        member("api-2", "api", "web", 2, ip(2)),
        member("api-w1", "api", "worker", 1, ip(3)),
        member("db-1", "my db", "web", 1, ip(4)),
    ]);
    let s = start(index(&map, &Overrides::default()), vec![]).await;
    let short = |name: String| {
        let addr = s.addr;
        async move { sorted_lines(&dig(addr, &["+short", &name]).await) }
    };
    assert_eq!(short("api-2.internal".into()).await, ["10.240.0.2"]);
    assert_eq!(
        short(format!("api.{PN}.private-network.internal.")).await,
        ["10.240.0.1", "10.240.0.2"]
    );
    assert_eq!(
        short(format!("web.api.{PN}.private-network.internal.")).await,
        ["10.240.0.1", "10.240.0.2"]
    );
    assert_eq!(
        short(format!("worker.api.{PN}.private-network.internal.")).await,
        ["10.240.0.3"]
    );
    assert_eq!(
        short(format!("2.web.api.{PN}.private-network.internal.")).await,
        ["10.240.0.2"]
    );
    assert_eq!(
        short(format!("1.worker.api.{PN}.private-network.internal.")).await,
        ["10.240.0.3"]
    );
    assert_eq!(short("my-db.warp".into()).await, ["10.240.0.4"]);
    assert_eq!(
        short("api.prod.private-network.internal".into()).await,
        ["10.240.0.1", "10.240.0.2"]
    );
    // TTL 30 and the exact answer line; over TCP too.
    let answer = dig(s.addr, &["+noall", "+answer", "api-1.internal"]).await;
    assert_eq!(
        answer.split_whitespace().collect::<Vec<_>>(),
        ["api-1.internal.", "30", "IN", "A", "10.240.0.1"]
    );
    let tcp = dig(s.addr, &["+tcp", "+short", "db-1.internal"]).await;
    assert_eq!(tcp.trim(), "10.240.0.4");
    // NXDOMAIN in our zones, authoritative.
    let nx = dig(s.addr, &["ghost.internal"]).await;
    assert!(
        nx.contains("status: NXDOMAIN") && nx.contains(" aa "),
        "{nx}"
    );
    let nx = dig(
        s.addr,
        &[&format!("3.web.api.{PN}.private-network.internal.")],
    )
    .await;
    assert!(nx.contains("status: NXDOMAIN"), "{nx}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_change_the_moment_the_index_changes() {
    if !have_dig() {
        return;
    }
    let a = member("api-1", "api", "web", 1, ip(1));
    let b = member("api-2", "api", "web", 2, ip(2));
    let s = start(
        index(&map_with(vec![a.clone(), b]), &Overrides::default()),
        vec![],
    )
    .await;
    assert_eq!(
        sorted_lines(&dig(s.addr, &["+short", "api.warp"]).await),
        ["10.240.0.1", "10.240.0.2"]
    );
    // api-2 is removed: the very next query no longer has it.
    s.names
        .send(index(&map_with(vec![a]), &Overrides::default()))
        .unwrap();
    assert_eq!(
        sorted_lines(&dig(s.addr, &["+short", "api.warp"]).await),
        ["10.240.0.1"]
    );
    let nx = dig(s.addr, &["api-2.internal"]).await;
    assert!(nx.contains("status: NXDOMAIN"), "{nx}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_answers_truncate_then_tcp() {
    if !have_dig() {
        return;
    }
    let members = (1..=200u32)
        .map(|i| {
            member(
                &format!("w-{i}"),
                "api",
                "web",
                i,
                Ipv4Addr::from(u32::from(ip(0)) + i),
            )
        })
        .collect();
    let s = start(index(&map_with(members), &Overrides::default()), vec![]).await;
    // dig retries over TCP by itself when it sees TC.
    let out = dig(s.addr, &["+short", "+notcp", "api.warp"]).await;
    assert_eq!(out.lines().count(), 200, "{out}");
    let no_retry = dig(s.addr, &["+ignore", "+notcp", "api.warp"]).await;
    assert!(no_retry.contains(" tc "), "{no_retry}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_names_are_forwarded_upstream() {
    if !have_dig() {
        return;
    }
    // The upstream: another server, authoritative for db.example.test.
    let map = map_with(vec![member("db-1", "db", "web", 1, ip(9))]);
    let o = parse_toml("[[ist]]\nservice = \"db\"\nhostnames = [\"db.example.test\"]\n").unwrap();
    let upstream = start(index(&map, &o), vec![]).await;
    // A dead upstream first (nothing listens there), then the live one.
    let dead = {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.local_addr().unwrap()
    };
    let s = start(
        index(&map_with(vec![]), &Overrides::default()),
        vec![dead, upstream.addr],
    )
    .await;
    assert_eq!(
        dig(s.addr, &["+short", "db.example.test"]).await.trim(),
        "10.240.0.9"
    );
    assert_eq!(
        dig(s.addr, &["+tcp", "+short", "db.example.test"])
            .await
            .trim(),
        "10.240.0.9"
    );
    // Our own zones are never forwarded: db-1.internal is the upstream's name only.
    let nx = dig(s.addr, &["db-1.internal"]).await;
    assert!(nx.contains("status: NXDOMAIN"), "{nx}");
    // No live upstream at all: SERVFAIL, promptly.
    let lonely = start(index(&map_with(vec![]), &Overrides::default()), vec![dead]).await;
    let fail = dig(lonely.addr, &["nothing.example.test"]).await;
    assert!(fail.contains("status: SERVFAIL"), "{fail}");
}
