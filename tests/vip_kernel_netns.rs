//! Service addresses in kernel mode, with the real binaries in namespaces
//! (issue 19): three `api` instances and a client on separate hosts, every
//! sidecar giving service addresses (`--service-addresses service`).
//!
//! - 300 connections to `api.warp` spread over the three instances within
//!   ±20 % of even;
//! - one long TCP stream stays on one instance, its SHA-256 intact;
//! - a member of another service answering as the service address is
//!   dropped (and counted), while the pinned instance's answers pass;
//! - a rolling restart of every `api` instance, each replaced by one
//!   started without its state directory, while a client that resolved
//!   `api.warp` once opens a connection every 0.1 s: no connection fails
//!   after the first success.
//!
//! Needs root (namespaces, TUN); prints SKIPPED otherwise.

mod dataplane_support;
mod mesh_support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dataplane_support::{in_ns, must, wait_for};
use mesh_support::{Mesh, Sidecar};
use sha2::{Digest, Sha256};

const SETTLE: Duration = Duration::from_secs(30);

/// Offline after 4 s of silence (a graceful stop is offline at once).
const TIMERS: &str = "offline-after-secs = 4\n";

/// The greeting port (answers the instance's name), the stream port
/// (answers the name and the SHA-256 of what it got), the UDP echo port.
const GREET: u16 = 9000;
const STREAM: u16 = 9001;
const ECHO: u16 = 9002;

macro_rules! require_netns {
    () => {
        if let Some(why) = dataplane_support::skip_reason() {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
}

/// Accepts on `port` (all addresses of `ns`) until `stop`, handling each
/// connection on its own thread.
fn serve(
    ns: &str,
    port: u16,
    stop: Arc<AtomicBool>,
    handle: impl Fn(TcpStream) + Send + Sync + 'static,
) {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = Arc::new(handle);
    in_ns(ns, move || {
        let l = TcpListener::bind(("0.0.0.0", port)).expect("bind");
        l.set_nonblocking(true).unwrap();
        tx.send(()).unwrap();
        let end = Instant::now() + Duration::from_secs(600);
        while !stop.load(Ordering::Relaxed) && Instant::now() < end {
            match l.accept() {
                Ok((s, _)) => {
                    let h = handle.clone();
                    std::thread::spawn(move || {
                        let _ = s.set_nonblocking(false);
                        h(s)
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap();
}

/// The greeting server of the `api` application on one host, until `stop`.
fn greeter(ns: &str, name: &'static str, stop: Arc<AtomicBool>) {
    serve(ns, GREET, stop, move |mut s| {
        let _ = s.write_all(name.as_bytes());
    });
}

/// The stream server of the `api` application on one host: it hashes
/// streams (counting their bytes in `streamed`).
fn hasher(ns: &str, name: &'static str, stop: &Arc<AtomicBool>, streamed: Arc<AtomicU64>) {
    serve(ns, STREAM, stop.clone(), move |mut s| {
        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            streamed.fetch_add(n as u64, Ordering::Relaxed);
        }
        let hex: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
        let _ = s.write_all(format!("{name} {hex}").as_bytes());
    });
}

/// A UDP echo on `vip:ECHO` in `ns` (bound to the service address, so its
/// answers come from it), once the sidecar put the address on its TUN.
fn udp_echo(ns: &str, vip: Ipv4Addr, stop: Arc<AtomicBool>) {
    let (tx, rx) = std::sync::mpsc::channel();
    in_ns(ns, move || {
        let start = Instant::now();
        let sock = loop {
            match UdpSocket::bind((vip, ECHO)) {
                Ok(s) => break s,
                Err(_) if start.elapsed() < SETTLE => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => panic!("the service address never came: {e}"),
            }
        };
        tx.send(()).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buf = [0u8; 1500];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                let _ = sock.send_to(&buf[..n], from);
            }
        }
    });
    rx.recv_timeout(SETTLE).unwrap();
}

/// One connection: what the server said, or why it failed.
fn greet(to: SocketAddr) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out)
        .map_err(|e| format!("read: {e}"))?;
    if out.is_empty() {
        return Err("nothing read".into());
    }
    Ok(out)
}

/// Deterministic bytes.
fn pattern(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn spoofed_from(client: &Sidecar, key: &str) -> u64 {
    let status = client.status().expect("status");
    status["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["public_key"] == key)
        .map_or(0, |p| p["drops_spoofed"].as_u64().unwrap_or(0))
}

fn public_key(sc: &Sidecar) -> String {
    sc.status().expect("status")["public_key"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn service_address_balances_survives_rolling_restarts_and_stays_exact() {
    require_netns!();
    let mut mesh = Mesh::with_keyserver_config(TIMERS);
    let token = mesh.token_for("prod", 20);
    let hc = mesh.host(2);
    let api_hosts = [mesh.host(3), mesh.host(4), mesh.host(5)];
    let hx = mesh.host(6);
    let stop = Arc::new(AtomicBool::new(false));
    let names = ["api-on-3", "api-on-4", "api-on-5"];
    let streamed: Vec<Arc<AtomicU64>> = (0..3).map(|_| Arc::default()).collect();
    let mut greeting: Vec<Arc<AtomicBool>> = (0..3).map(|_| Arc::default()).collect();
    for (i, h) in api_hosts.iter().enumerate() {
        greeter(&h.ns, names[i], greeting[i].clone());
        hasher(&h.ns, names[i], &stop, streamed[i].clone());
    }
    let base = ["--token", &token, "--service-addresses", "service"];
    let api_args: Vec<&str> = base
        .iter()
        .copied()
        .chain(["--port", "9000,9001,9002"])
        .collect();
    let client = mesh.sidecar(&hc, "client", "up", &base);
    let other = mesh.sidecar(&hx, "other", "up", &base);
    let mut apis: Vec<Sidecar> = api_hosts
        .iter()
        .map(|h| mesh.sidecar(h, "api", "up", &api_args))
        .collect();
    for sc in apis.iter().chain([&client, &other]) {
        sc.wait_peers(4, SETTLE);
    }
    // Tunnels up between the client and every instance (endpoints known,
    // handshakes done), as in a mesh that has been running for a while.
    for sc in &apis {
        let ip = sc.ip();
        wait_for(SETTLE, || {
            client.sh(&format!("ping -c 1 -W 1 {ip}")).status.success()
        });
    }

    // The client resolves the service address once, as an application
    // that reads WARP_IST_api at start would.
    let mut vip = None;
    wait_for(SETTLE, || {
        vip = client
            .getent("api.warp")
            .and_then(|s| s.parse::<Ipv4Addr>().ok())
            .filter(|ip| {
                "10.240.4.0/22"
                    .parse::<ipnet::Ipv4Net>()
                    .unwrap()
                    .contains(ip)
            });
        vip.is_some()
    });
    let vip = vip.unwrap();
    let greet_at = SocketAddr::from((vip, GREET));
    eprintln!("api.warp = {vip}");

    // 300 connections, spread.
    let counts = in_ns(&hc.ns, move || {
        let mut counts: HashMap<String, u32> = HashMap::new();
        for _ in 0..300 {
            let name = greet(greet_at).expect("connection to the service address");
            *counts.entry(name).or_default() += 1;
        }
        counts
    })
    .join()
    .unwrap();
    eprintln!(
        "300 connections: {counts:?}; client's flows: {}",
        client.status().expect("status")["service_flows"]
    );
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(
        counts.values().all(|&n| (80..=120).contains(&n)),
        "{counts:?}"
    );

    // One long stream: one instance gets all of it, intact.
    const LEN: usize = 48 << 20;
    let stream_at = SocketAddr::from((vip, STREAM));
    let (answer, sent_hash) = in_ns(&hc.ns, move || {
        let data = pattern(LEN);
        let mut s = TcpStream::connect_timeout(&stream_at, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.write_all(&data).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        let hex: String = Sha256::digest(&data)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        (answer, hex)
    })
    .join()
    .unwrap();
    let (who, got_hash) = answer.split_once(' ').expect("name and hash");
    assert_eq!(got_hash, sent_hash, "stream hash");
    let took: Vec<u64> = streamed.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    let at = names.iter().position(|n| *n == who).unwrap();
    assert_eq!(took[at], LEN as u64, "{took:?}");
    assert_eq!(
        took.iter().sum::<u64>(),
        LEN as u64,
        "one instance only: {took:?}"
    );

    // Isolation: a member of another service answering as the address.
    for h in &api_hosts {
        udp_echo(&h.ns, vip, stop.clone());
    }
    let (client_port_tx, client_port_rx) = std::sync::mpsc::channel();
    let (spoofed_tx, spoofed_rx) = std::sync::mpsc::channel::<()>();
    let echo_at = SocketAddr::from((vip, ECHO));
    let udp_client = in_ns(&hc.ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect(echo_at).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut buf = [0u8; 64];
        let mut round = |msg: &[u8]| -> Option<Vec<u8>> {
            s.send(msg).ok()?;
            let n = s.recv(&mut buf).ok()?;
            Some(buf[..n].to_vec())
        };
        let first = round(b"one");
        client_port_tx.send(s.local_addr().unwrap().port()).unwrap();
        spoofed_rx.recv().unwrap();
        s.set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        let mut buf2 = [0u8; 64];
        let sneaked = s.recv(&mut buf2).ok().map(|n| buf2[..n].to_vec());
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let second = round(b"two");
        (first, sneaked, second)
    });
    let client_port = client_port_rx.recv_timeout(SETTLE).unwrap();
    let client_ip: Ipv4Addr = client.ip().parse().unwrap();
    must(
        "ip",
        &[
            "-n",
            &hx.ns,
            "addr",
            "add",
            &format!("{vip}/32"),
            "dev",
            &other.interface,
        ],
    );
    let other_key = public_key(&other);
    let before = spoofed_from(&client, &other_key);
    in_ns(&hx.ns, move || {
        let s = UdpSocket::bind((vip, ECHO)).unwrap();
        for _ in 0..5 {
            s.send_to(b"spoof", (client_ip, client_port)).unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .join()
    .unwrap();
    wait_for(Duration::from_secs(5), || {
        spoofed_from(&client, &other_key) >= before + 5
    });
    spoofed_tx.send(()).unwrap();
    let (first, sneaked, second) = udp_client.join().unwrap();
    let flows = client.status().expect("status")["service_flows"].clone();
    eprintln!("client's service flows: {flows}");
    assert_eq!(first.as_deref(), Some(&b"one"[..]), "{flows}");
    assert_eq!(sneaked, None, "the other service's answer was dropped");
    assert_eq!(second.as_deref(), Some(&b"two"[..]));

    // Health: an instance whose application stops listening refuses; the
    // refused flows move to the others, and no connection fails.
    let flows_now = |what: &str| client.status().expect("status")["service_flows"][what].as_u64();
    let failures_before = flows_now("failures").unwrap();
    greeting[2].store(true, Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(200));
    let got = in_ns(&hc.ns, move || {
        (0..30)
            .map(|_| greet(greet_at).expect("refusals move the flow"))
            .collect::<Vec<_>>()
    })
    .join()
    .unwrap();
    assert!(got.iter().all(|n| n != names[2]), "{got:?}");
    assert!(flows_now("failures").unwrap() > failures_before);
    assert!(flows_now("repinned").unwrap() >= 1);
    // Listening again, it gets flows again once its backoff is over.
    greeting[2] = Arc::default();
    greeter(&api_hosts[2].ns, names[2], greeting[2].clone());
    let back = in_ns(&hc.ns, move || {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(40) {
            if greet(greet_at).as_deref() == Ok(names[2]) {
                return Some(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    })
    .join()
    .unwrap();
    eprintln!("refusing instance back after {back:?}");
    assert!(back.is_some());

    // An open connection whose instance goes away ends with a reset, not
    // a hang.
    let marks: Vec<u64> = streamed.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    let idle = in_ns(&hc.ns, move || {
        let mut s = TcpStream::connect_timeout(&stream_at, Duration::from_secs(5)).unwrap();
        s.write_all(b"0123456789").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let mut b = [0u8; 16];
        let r = s.read(&mut b);
        (Instant::now(), r.map_err(|e| e.kind()))
    });
    let mut idle_at = None;
    wait_for(SETTLE, || {
        idle_at = (0..3).find(|&i| streamed[i].load(Ordering::Relaxed) == marks[i] + 10);
        idle_at.is_some()
    });
    let idle_at = idle_at.unwrap();

    // Rolling restart while a client that resolved the address once
    // keeps connecting every 0.1 s.
    let looping = Arc::new(AtomicBool::new(true));
    let flag = looping.clone();
    let prober = in_ns(&hc.ns, move || {
        let mut log: Vec<(Instant, Result<String, String>)> = Vec::new();
        while flag.load(Ordering::Relaxed) {
            log.push((Instant::now(), greet(greet_at)));
            std::thread::sleep(Duration::from_millis(100));
        }
        log
    });
    std::thread::sleep(Duration::from_secs(1));
    let t0 = Instant::now();
    let mut stopped_at = Vec::new();
    for sc in &mut apis {
        let old_key = public_key(sc);
        let restarted = Instant::now();
        stopped_at.push(restarted);
        eprintln!("{:?}: stopping {}", t0.elapsed(), sc.host.ns);
        sc.stop();
        eprintln!("{:?}: stopped", t0.elapsed());
        std::fs::remove_dir_all(&sc.state_dir).unwrap();
        sc.start("up", &api_args);
        sc.wait_peers(4, SETTLE);
        let new_key = public_key(sc);
        assert_ne!(new_key, old_key);
        wait_for(SETTLE, || {
            let peers = client.wg_peers();
            peers.contains(&new_key) && !peers.contains(&old_key)
        });
        eprintln!(
            "{:?}: {} replaced without state after {:?}",
            t0.elapsed(),
            sc.host.ns,
            restarted.elapsed()
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    looping.store(false, Ordering::Relaxed);
    let log = prober.join().unwrap();
    let first_ok = log.iter().position(|(_, r)| r.is_ok()).expect("a success");
    let failures: Vec<_> = log[first_ok..]
        .iter()
        .filter_map(|(t, r)| r.as_ref().err().map(|e| (*t, e.clone())))
        .collect();
    let mut seen: HashMap<&str, u32> = HashMap::new();
    for (_, r) in &log {
        if let Ok(n) = r {
            *seen.entry(n.as_str()).or_default() += 1;
        }
    }
    eprintln!(
        "rolling restart: {} connections, {} failed after the first success; by instance {seen:?}",
        log.len(),
        failures.len()
    );
    let flows = client.status().expect("status")["service_flows"].clone();
    eprintln!("client's service flows: {flows}");
    let failures: Vec<_> = failures
        .into_iter()
        .map(|(t, e)| (t.saturating_duration_since(t0), e))
        .collect();
    assert!(failures.is_empty(), "{failures:?}");
    let (ended, result) = idle.join().unwrap();
    let after_stop = ended.saturating_duration_since(stopped_at[idle_at]);
    eprintln!(
        "idle connection on {}: {result:?} {after_stop:?} after its instance stopped",
        names[idle_at]
    );
    assert_eq!(result, Err(std::io::ErrorKind::ConnectionReset));
    assert!(after_stop < Duration::from_secs(5), "{after_stop:?}");
    // The replacements serve.
    let after = in_ns(&hc.ns, move || {
        (0..30)
            .map(|_| greet(greet_at).expect("after the restarts"))
            .collect::<std::collections::HashSet<_>>()
    })
    .join()
    .unwrap();
    assert_eq!(after.len(), 3, "{after:?}");
    stop.store(true, Ordering::Relaxed);
    for g in &greeting {
        g.store(true, Ordering::Relaxed);
    }
}
