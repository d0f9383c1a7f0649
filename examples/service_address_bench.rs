//! Userspace mode: a service address against a member's loopback address,
//! in one run (`benches/service_address.sh`). Rootless; every packet stays
//! on loopback.
//!
//! A client member (10.240.0.1) and three instances of a service
//! (10.240.0.2–4), each an engine on loopback UDP with its own smoltcp
//! stack; every instance relays the service port to one echo/sink server
//! on 127.0.0.1. The client reaches them three ways:
//!
//! - `member`: the member listener for instance 1 (`Stack::forward_tcp`,
//!   what `<instance>.internal` names);
//! - `vip-1`: a service address whose only instance is instance 1 (the
//!   balancer's own cost, same path otherwise);
//! - `vip-3`: a service address over the three instances.
//!
//! Each is measured for connections/s (`CONNS` clients at once, each
//! connecting, echoing one byte and closing, for `DURATION` seconds) and
//! one stream's throughput (writing for `DURATION` seconds into the sink),
//! in `ROUNDS` rounds alternating the paths; medians are printed.
//!
//! Usage: `service_address_bench [<duration-secs> [<rounds> [<conns>]]]`

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use meshlib::ids::NetworkId;
use meshlib::keys::{PrivateKey, PublicKey};
use meshlib::netmap::{Member as MapMember, MemberState, NetworkMap, ServiceAddress};
use meshlib::userspace::ports::loopback_in;
use meshlib::userspace::vip::{ServicePlane, VipConfig};
use meshlib::userspace::{Stack, StackConfig};
use meshlib::wg::{Engine, EngineConfig, PeerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Second octet of the client's loopback addresses.
const OCTET: u8 = 251;

struct Member {
    stack: Arc<Stack>,
    engine: Engine,
    key: PublicKey,
    ip: Ipv4Addr,
}

fn member(ip: Ipv4Addr) -> anyhow::Result<Member> {
    let (stack, dev) = Stack::start(StackConfig::new(IpAddr::V4(ip), 22))?;
    let private = PrivateKey::generate();
    let key = private.public_key();
    let engine = Engine::start(
        dev,
        EngineConfig {
            listen_port: 0,
            private_key: Some(private),
            fwmark: 0,
            crypto_workers: 0,
        },
    )?;
    Ok(Member {
        stack: Arc::new(stack),
        engine,
        key,
        ip,
    })
}

fn peer(of: &Member, other: &Member) -> anyhow::Result<()> {
    of.engine.set_peer(PeerConfig {
        public_key: other.key,
        preshared_key: None,
        endpoint: Some(SocketAddr::from((
            [127, 0, 0, 1],
            other.engine.listen_port(),
        ))),
        allowed_ips: vec![ipnet::IpNet::from(IpAddr::V4(other.ip))],
        persistent_keepalive: 0,
    })?;
    Ok(())
}

fn entry(m: &Member, service: &str, index: u32, port: u16) -> anyhow::Result<MapMember> {
    Ok(MapMember {
        public_key: m.key,
        ip: m.ip,
        endpoints: vec![],
        service: service.into(),
        app_id: service.parse()?,
        process_type: Default::default(),
        index,
        instance: format!("{service}-{index}").parse()?,
        runner: "bench".into(),
        ports: vec![port],
        state: MemberState::Online,
    })
}

/// The server behind every instance: a first byte `e` echoes one byte and
/// closes; anything else is a stream, drained, answered with its length.
async fn server() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let mut buf = vec![0u8; 256 * 1024];
                let Ok(n) = s.read(&mut buf).await else {
                    return;
                };
                if n == 1 && buf[0] == b'e' {
                    let _ = s.write_all(b"e").await;
                    return;
                }
                let mut total = n as u64;
                while let Ok(k) = s.read(&mut buf).await {
                    if k == 0 {
                        break;
                    }
                    total += k as u64;
                }
                let _ = s.write_all(&total.to_be_bytes()).await;
            });
        }
    });
    Ok(addr)
}

/// Connections/s through `to`: `conns` clients in a loop for `secs`.
async fn conns_per_sec(to: SocketAddr, conns: usize, secs: Duration) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + secs;
    let mut joins = Vec::new();
    for _ in 0..conns {
        let (done, failed) = (done.clone(), failed.clone());
        joins.push(tokio::spawn(async move {
            while Instant::now() < end {
                let one = async {
                    let mut s = TcpStream::connect(to).await.ok()?;
                    s.set_nodelay(true).ok()?;
                    s.write_all(b"e").await.ok()?;
                    let mut b = [0u8; 1];
                    s.read_exact(&mut b).await.ok()?;
                    Some(())
                };
                match tokio::time::timeout(Duration::from_secs(5), one).await {
                    Ok(Some(())) => done.fetch_add(1, Relaxed),
                    _ => failed.fetch_add(1, Relaxed),
                };
            }
        }));
    }
    for j in joins {
        let _ = j.await;
    }
    let f = failed.load(Relaxed);
    if f > 0 {
        eprintln!("  {to}: {f} failed connections");
    }
    done.load(Relaxed) as f64 / secs.as_secs_f64()
}

/// One stream's Mbit/s through `to`, writing for `secs` (counted by the
/// sink).
async fn stream_mbits(to: SocketAddr, secs: Duration) -> anyhow::Result<f64> {
    let s = TcpStream::connect(to).await?;
    let (mut r, mut w) = s.into_split();
    let chunk = vec![0x5au8; 256 * 1024];
    let started = Instant::now();
    while started.elapsed() < secs {
        w.write_all(&chunk).await?;
    }
    w.shutdown().await?;
    let mut n = [0u8; 8];
    r.read_exact(&mut n).await?;
    let elapsed = started.elapsed().as_secs_f64();
    Ok(u64::from_be_bytes(n) as f64 * 8.0 / elapsed / 1e6)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let secs = Duration::from_secs(args.next().map_or(Ok(5), |a| a.parse())?);
    let rounds: usize = args.next().map_or(Ok(3), |a| a.parse())?;
    let conns: usize = args.next().map_or(Ok(8), |a| a.parse())?;

    let sink = server().await?;
    let client = member(Ipv4Addr::new(10, 240, 0, 1))?;
    let mut api = Vec::new();
    for i in 0..3 {
        api.push(member(Ipv4Addr::new(10, 240, 0, 2 + i))?);
    }
    // The service port: free on the loopback addresses of both services.
    let (a1, a3) = (Ipv4Addr::new(10, 240, 4, 1), Ipv4Addr::new(10, 240, 4, 2));
    let probe = std::net::TcpListener::bind((loopback_in(OCTET, IpAddr::V4(a1)), 0))
        .context("bind a loopback probe")?;
    let port = probe.local_addr()?.port();
    drop(probe);
    let mut map = NetworkMap::new(NetworkId::random(), "bench", meshlib::ipam::DEFAULT_RANGE);
    map.members
        .insert(client.key, entry(&client, "client", 1, port)?);
    for (i, m) in api.iter().enumerate() {
        peer(&client, m)?;
        peer(m, &client)?;
        m.stack.set_inbound_ports([port]);
        m.stack.set_inbound_target(port, Some(sink));
        // Instance 1 is in both services; 2 and 3 only in `api3`.
        let service = if i == 0 { "api1" } else { "api3" };
        map.members
            .insert(m.key, entry(m, service, i as u32 + 1, port)?);
    }
    for (service, ip) in [("api1", a1), ("api3", a3)] {
        map.addresses.insert(
            service.into(),
            ServiceAddress {
                service: service.into(),
                ip,
                wake_timeout_secs: None,
                ports: vec![],
            },
        );
    }
    // `api3` balances over all three: instance 1 is named in it too (a
    // member has one service, so a second map, for a second plane, says so).
    let mut map3 = map.clone();
    if let Some(m) = map3.members.get_mut(&api[0].key) {
        m.service = "api3".into();
    }
    map3.addresses.remove("api1");
    map.addresses.remove("api3");
    let mut plane = ServicePlane::new(client.stack.clone(), VipConfig::new(OCTET));
    plane.apply(&map, client.ip);
    let mut plane3 = ServicePlane::new(client.stack.clone(), VipConfig::new(OCTET));
    plane3.apply(&map3, client.ip);

    let member_listener = TcpListener::bind("127.0.0.1:0").await?;
    let member_addr = member_listener.local_addr()?;
    let stack = client.stack.clone();
    let dst = SocketAddr::new(IpAddr::V4(api[0].ip), port);
    tokio::spawn(async move { stack.forward_tcp(member_listener, dst).await });

    let paths = [
        ("member", member_addr),
        (
            "vip-1",
            SocketAddr::new(loopback_in(OCTET, IpAddr::V4(a1)).into(), port),
        ),
        (
            "vip-3",
            SocketAddr::new(loopback_in(OCTET, IpAddr::V4(a3)).into(), port),
        ),
    ];
    // Warm up every path (WireGuard handshakes, listeners).
    for (_, to) in paths {
        conns_per_sec(to, 2, Duration::from_millis(300)).await;
    }
    let mut cps: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut mbit: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for round in 0..rounds {
        for (name, to) in paths {
            let c = conns_per_sec(to, conns, secs).await;
            let t = stream_mbits(to, secs).await?;
            eprintln!(
                "round {}: {name:6} {c:8.0} conn/s {t:8.0} Mbit/s",
                round + 1
            );
            cps.entry(name).or_default().push(c);
            mbit.entry(name).or_default().push(t);
        }
    }
    let med = |m: &mut BTreeMap<&str, Vec<f64>>, k| {
        median(m.get_mut(k).map_or(&mut [][..], |v| &mut v[..]))
    };
    let (cm, c1, c3) = (
        med(&mut cps, "member"),
        med(&mut cps, "vip-1"),
        med(&mut cps, "vip-3"),
    );
    let (tm, t1, t3) = (
        med(&mut mbit, "member"),
        med(&mut mbit, "vip-1"),
        med(&mut mbit, "vip-3"),
    );
    println!("| path | conn/s | stream Mbit/s |");
    println!("|---|---:|---:|");
    println!("| member loopback | {cm:.0} | {tm:.0} |");
    println!("| service address, 1 instance | {c1:.0} | {t1:.0} |");
    println!("| service address, 3 instances | {c3:.0} | {t3:.0} |");
    println!(
        "service-address: {:.2}x conn/s, {:.2}x stream (1 instance); {:.2}x, {:.2}x (3 instances)",
        c1 / cm.max(1.0),
        t1 / tm.max(1.0),
        c3 / cm.max(1.0),
        t3 / tm.max(1.0)
    );
    drop((plane, plane3));
    Ok(())
}
