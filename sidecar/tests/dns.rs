//! The private DNS server against the real `dig`: names of seeds 001, 003 and
//! 004, TTL, NXDOMAIN, answers that change the moment the index changes,
//! truncation then TCP, and forwarding to a real upstream (a second instance
//! of the server, authoritative for a name the first one does not know);
//! SOA and NS at the zone apexes, NODATA for names that exist only as
//! parents, BADVERS; and the limits: idle TCP connections and a slow
//! upstream do not block anyone else. Everything on 127.0.0.1.

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
    stats: Arc<sidecar::dns::DnsStats>,
    _stop: oneshot::Sender<()>,
}

async fn start(initial: Arc<NameIndex>, upstreams: Vec<SocketAddr>) -> Server {
    start_with(
        initial,
        DnsConfig {
            upstreams,
            upstream_timeout: Duration::from_millis(500),
            ..DnsConfig::default()
        },
    )
    .await
}

async fn start_with(initial: Arc<NameIndex>, config: DnsConfig) -> Server {
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
        tokio::spawn(serve(udp, tcp, rx, config.clone(), async move {
            let _ = stopped.await;
        }));
        return Server {
            addr,
            names,
            stats: config.stats.clone(),
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

/// The lines of one section of a `dig` answer, each as its words.
type Lines = Vec<Vec<String>>;

/// The sections of a full `dig` answer: (status, answer lines, authority
/// lines, additional lines).
fn sections(out: &str) -> (String, Lines, Lines, Lines) {
    let status = out
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("")
        .to_string();
    let section = |title: &str| -> Lines {
        let Some(start) = out.find(&format!(";; {title} SECTION:")) else {
            return vec![];
        };
        out[start..]
            .lines()
            .skip(1)
            .take_while(|l| !l.trim().is_empty())
            .map(|l| l.split_whitespace().map(str::to_owned).collect())
            .collect()
    };
    (
        status,
        section("ANSWER"),
        section("AUTHORITY"),
        section("ADDITIONAL"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_apexes_nodata_and_badvers_with_dig() {
    if !have_dig() {
        return;
    }
    // A web app with two members and a worker-only app.
    let map = map_with(vec![
        member("api-1", "api", "web", 1, ip(1)),
        member("api-2", "api", "web", 2, ip(2)),
        member("cron-1", "cron", "clock", 1, ip(3)),
    ]);
    let s = start_with(
        index(&map, &Overrides::default()),
        DnsConfig {
            ttl: 45,
            ..DnsConfig::default()
        },
    )
    .await;
    let ns = meshlib::dns::NAMESERVER;
    for zone in ["internal.", "warp.", "private-network.internal."] {
        // SOA at the apex: our server as primary, the TTL as minimum.
        let (status, answer, _, _) = sections(&dig(s.addr, &["+norec", zone, "SOA"]).await);
        assert_eq!(status, "NOERROR", "{zone}");
        let [soa] = &answer[..] else {
            panic!("{zone} SOA: {answer:?}")
        };
        assert_eq!(&soa[..5], [zone, "45", "IN", "SOA", ns], "{zone}");
        assert_eq!(soa.last().map(String::as_str), Some("45"), "minimum");
        // NS at the apex names the sidecar, with its address as glue.
        let (status, answer, _, additional) = sections(&dig(s.addr, &[zone, "NS"]).await);
        assert_eq!(status, "NOERROR");
        assert_eq!(answer, [vec![zone, "45", "IN", "NS", ns]]);
        assert_eq!(additional.iter().filter(|l| l[0] == ns).count(), 1);
        assert!(additional.iter().any(|l| l[0] == ns && l[4] == "127.0.0.1"));
        // Over TCP too.
        let tcp = dig(s.addr, &["+tcp", "+short", zone, "NS"]).await;
        assert_eq!(tcp.trim(), ns);
    }
    // The server's own name answers its address.
    assert_eq!(dig(s.addr, &["+short", ns]).await.trim(), "127.0.0.1");

    // NODATA (NOERROR, no answer, the SOA in authority) for names that exist
    // only as parents, and for existing names asked with another type.
    let app = meshlib::ist::hostname_label("api").unwrap();
    let cron = meshlib::ist::hostname_label("cron").unwrap();
    for (name, qtype) in [
        (format!("{PN}.private-network.internal."), "A"),
        ("prod.private-network.internal.".to_string(), "A"),
        (format!("{cron}.{PN}.private-network.internal."), "A"),
        (format!("web.{app}.{PN}.private-network.internal."), "AAAA"),
        ("api-1.internal.".to_string(), "AAAA"),
        ("api.warp.".to_string(), "TXT"),
    ] {
        let out = dig(s.addr, &[&name, qtype]).await;
        let (status, answer, authority, _) = sections(&out);
        assert_eq!(status, "NOERROR", "{name} {qtype}:\n{out}");
        assert!(answer.is_empty(), "{name} {qtype}:\n{out}");
        let [soa] = &authority[..] else {
            panic!("{name} {qtype}: no SOA in authority:\n{out}")
        };
        assert_eq!(soa[3], "SOA", "{out}");
        assert!(out.contains(" aa "), "authoritative:\n{out}");
    }
    // Below an existing name, and beside it: NXDOMAIN with the zone's SOA.
    for (name, zone) in [
        (
            format!("9.web.{app}.{PN}.private-network.internal."),
            "private-network.internal.",
        ),
        (
            format!("x.{PN}.private-network.internal."),
            "private-network.internal.",
        ),
        ("ghost.internal.".to_string(), "internal."),
        ("ghost.warp.".to_string(), "warp."),
    ] {
        let out = dig(s.addr, &[&name]).await;
        let (status, _, authority, _) = sections(&out);
        assert_eq!(status, "NXDOMAIN", "{name}:\n{out}");
        assert_eq!(authority[0][0], zone, "{out}");
        assert_eq!(authority[0][3], "SOA", "{out}");
    }
    // EDNS version 1: BADVERS, with an OPT record saying we speak version 0.
    let out = dig(s.addr, &["+edns=1", "+noednsnegotiation", "api.warp"]).await;
    assert!(out.contains("status: BADVERS"), "{out}");
    assert!(out.contains("; EDNS: version: 0"), "{out}");
    // dig's own negotiation then falls back to version 0 and gets the answer.
    let out = dig(s.addr, &["+edns=1", "+short", "api-1.internal"]).await;
    assert_eq!(out.trim(), "10.240.0.1");
    let out = dig(s.addr, &["+edns=0", "api-1.internal"]).await;
    assert!(out.contains("status: NOERROR"), "{out}");

    // Every answer above was counted by RCODE.
    let counts = s.stats.snapshot();
    assert!(counts["NOERROR"] >= 15, "{counts:?}");
    assert_eq!(counts["NXDOMAIN"], 4, "{counts:?}");
    assert!(counts["BADVERS"] >= 1, "{counts:?}");
}

/// The upstream for the limit tests: a server authoritative for
/// `db.example.test` (10.240.0.9).
async fn example_upstream() -> Server {
    let map = map_with(vec![member("db-1", "db", "web", 1, ip(9))]);
    let o = parse_toml("[[ist]]\nservice = \"db\"\nhostnames = [\"db.example.test\"]\n").unwrap();
    start(index(&map, &o), vec![]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tcp_connections_do_not_block_lookups() {
    if !have_dig() {
        return;
    }
    let upstream = example_upstream().await;
    let map = map_with(vec![member("api-1", "api", "web", 1, ip(1))]);
    let s = start(index(&map, &Overrides::default()), vec![upstream.addr]).await;
    // 300 connections that never send a query (slowloris), plus 20 that
    // send half a length prefix, held open during the lookups below.
    let mut idle = Vec::new();
    for i in 0..320 {
        let mut c = tokio::net::TcpStream::connect(s.addr)
            .await
            .expect("connect");
        if i >= 300 {
            use tokio::io::AsyncWriteExt;
            c.write_all(&[0]).await.unwrap();
        }
        idle.push(c);
    }
    let started = std::time::Instant::now();
    // Our name over TCP, a forwarded name over TCP and over UDP; dig gives
    // each 2 s and one try.
    let tcp = dig(s.addr, &["+tcp", "+short", "api-1.internal"]).await;
    assert_eq!(
        tcp.trim(),
        "10.240.0.1",
        "TCP lookup with 320 idle connections"
    );
    let fwd_tcp = dig(s.addr, &["+tcp", "+short", "db.example.test"]).await;
    assert_eq!(fwd_tcp.trim(), "10.240.0.9", "forwarded TCP lookup");
    let fwd_udp = dig(s.addr, &["+short", "db.example.test"]).await;
    assert_eq!(fwd_udp.trim(), "10.240.0.9", "forwarded UDP lookup");
    let udp = dig(s.addr, &["+short", "api-1.internal"]).await;
    assert_eq!(udp.trim(), "10.240.0.1");
    let took = started.elapsed();
    eprintln!("4 lookups with 320 idle TCP connections open: {took:?}");
    assert!(took < Duration::from_secs(4), "lookups took {took:?}");
    // The server closed most idle connections to make room: at most its
    // limit is still open.
    let mut open = 0;
    for c in &idle {
        let mut b = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(5), c.peek(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {}
            _ => open += 1,
        }
    }
    let limit = DnsConfig::default().max_tcp_per_source;
    assert!(
        open <= limit,
        "{open} idle connections still open (limit {limit})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tcp_connections_are_closed_after_the_idle_timeout() {
    let map = map_with(vec![]);
    let s = start_with(
        index(&map, &Overrides::default()),
        DnsConfig {
            tcp_idle: Duration::from_millis(300),
            tcp_read: Duration::from_millis(300),
            ..DnsConfig::default()
        },
    )
    .await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut silent = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let mut half = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    half.write_all(&[0, 40, 1, 2]).await.unwrap(); // 40 bytes announced, 2 sent
    let mut b = [0u8; 1];
    for c in [&mut silent, &mut half] {
        let r = tokio::time::timeout(Duration::from_secs(3), c.read(&mut b)).await;
        assert!(
            matches!(r, Ok(Ok(0)) | Ok(Err(_))),
            "connection not closed by the server: {r:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upstream_does_not_starve_the_others() {
    let upstream = example_upstream().await;
    // The slow upstream: a socket that reads nothing and answers nothing.
    let slow = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let s = start_with(
        index(&map_with(vec![]), &Overrides::default()),
        DnsConfig {
            upstreams: vec![slow.local_addr().unwrap(), upstream.addr],
            upstream_timeout: Duration::from_secs(3),
            max_per_upstream: 8,
            ..DnsConfig::default()
        },
    )
    .await;
    // 64 lookups at once from one socket; count the answers within 1.5 s.
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for id in 0..64u16 {
        let mut m = hickory_proto::op::Message::new();
        m.set_id(id).set_recursion_desired(true);
        m.add_query(hickory_proto::op::Query::query(
            hickory_proto::rr::Name::from_ascii("db.example.test.").unwrap(),
            hickory_proto::rr::RecordType::A,
        ));
        client.send_to(&m.to_vec().unwrap(), s.addr).await.unwrap();
    }
    let mut answered = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
    let mut buf = vec![0u8; 2048];
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, client.recv(&mut buf)).await {
        let m = hickory_proto::op::Message::from_vec(&buf[..n]).unwrap();
        if m.answers().len() == 1 {
            answered += 1;
        }
    }
    // Only the 8 that went to the slow upstream first wait for it.
    assert!(answered >= 56, "{answered} of 64 answered within 1.5 s");
}
