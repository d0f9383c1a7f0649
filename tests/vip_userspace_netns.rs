//! Service addresses in userspace mode with the real binaries (issue 19):
//! a client that read `WARP_IST_api` once keeps opening connections every
//! 0.1 s while every `api` instance is replaced, one at a time, by a new
//! instance started with an empty state directory (new key, new slot),
//! each new one started first, each old one stopped gracefully: not one
//! connection fails after the first success. Every sidecar is `sidecar up
//! --mode userspace`, each instance on a runner (namespace) of its own.
//!
//! Needs root (namespaces); prints SKIPPED otherwise.

mod dataplane_support;
mod mesh_support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dataplane_support::{in_ns, wait_for, Host};
use mesh_support::{Mesh, Sidecar};

const SETTLE: Duration = Duration::from_secs(20);
/// The port every `api` instance serves.
const PORT: u16 = 9100;

macro_rules! require_netns {
    () => {
        if let Some(why) = dataplane_support::skip_reason() {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
}

/// An instance's application in `ns`: answers every connection on
/// 127.0.0.1:[`PORT`] with `name` and closes it, until `stop` is set; then
/// it answers the connections its listen queue already holds and stops
/// listening (as a server stopping gracefully does: one that dropped its
/// queue would reset connections the kernel had already accepted for it,
/// which no mesh can save).
fn app(ns: &str, name: &'static str, stop: Arc<AtomicBool>) {
    let (tx, rx) = std::sync::mpsc::channel();
    in_ns(ns, move || {
        let l = TcpListener::bind(("127.0.0.1", PORT)).expect("bind app");
        l.set_nonblocking(true).unwrap();
        tx.send(()).unwrap();
        let end = Instant::now() + Duration::from_secs(300);
        while !stop.load(Ordering::Relaxed) && Instant::now() < end {
            match l.accept() {
                Ok((mut s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let _ = s.write_all(name.as_bytes());
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        // Bounded: the queue holds at most the listen backlog.
        for _ in 0..4096 {
            let Ok((mut s, _)) = l.accept() else { break };
            let _ = s.set_nonblocking(false);
            let _ = s.write_all(name.as_bytes());
        }
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap();
}

/// One `api` instance: its sidecar and its application.
struct Instance {
    sidecar: Sidecar,
    stop: Arc<AtomicBool>,
}

impl Instance {
    /// Starts `name` on `host` with a state directory of its own (empty).
    fn start(mesh: &mut Mesh, host: &Host, name: &'static str, token: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        app(&host.ns, name, stop.clone());
        let args = ["--token", token, "--mode", "userspace", "--port", "9100"];
        let sidecar = mesh.sidecar_in(host, "api", "up", &args, name);
        Self { sidecar, stop }
    }

    /// Stops it as a platform stops a container: the application and the
    /// sidecar get their SIGTERM together.
    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.sidecar.stop();
    }
}

/// What the client saw: each attempt's answer (`None`: failed) and how
/// long it took.
type Log = Arc<Mutex<Vec<(Option<String>, Duration)>>>;

/// From `ns`, opens a connection to `to` every 0.1 s until `stop`, each
/// read to its end (5 s limits), logging the answers.
fn client_loop(ns: &str, to: SocketAddr, stop: Arc<AtomicBool>, log: Log) {
    in_ns(ns, move || {
        let end = Instant::now() + Duration::from_secs(240);
        while !stop.load(Ordering::Relaxed) && Instant::now() < end {
            let started = Instant::now();
            let got = (|| {
                let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).ok()?;
                s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
                let mut out = String::new();
                s.read_to_string(&mut out).ok()?;
                (!out.is_empty()).then_some(out)
            })();
            log.lock().unwrap().push((got, started.elapsed()));
            std::thread::sleep(Duration::from_millis(100).saturating_sub(started.elapsed()));
        }
    });
}

/// `WARP_IST_api` in the client's env file, once it names the service
/// address's loopback (`127.77.4.x`: the block after the /22).
fn read_warp_ist_api(client: &Sidecar) -> Ipv4Addr {
    let path = client.state_dir.join("ist.env");
    let mut found = None;
    wait_for(SETTLE, || {
        let env = std::fs::read_to_string(&path).unwrap_or_default();
        found = env
            .lines()
            .find_map(|l| l.strip_prefix("WARP_IST_api="))
            .and_then(|v| v.trim_matches('\'').trim_matches('"').parse().ok())
            .filter(|ip: &Ipv4Addr| ip.octets()[..3] == [127, 77, 4]);
        found.is_some()
    });
    found.unwrap()
}

#[test]
fn a_rolling_restart_behind_the_service_address_fails_no_connection() {
    require_netns!();
    let mut mesh = Mesh::with_keyserver_config("offline-after-secs = 4\n");
    let token = mesh.token_for("prod", 20);
    let (hc, r1, r2, r3) = (mesh.host(2), mesh.host(3), mesh.host(4), mesh.host(5));
    let mut a = Instance::start(&mut mesh, &r1, "api-a", &token);
    let mut b = Instance::start(&mut mesh, &r2, "api-b", &token);
    let client_args = [
        "--token",
        token.as_str(),
        "--mode",
        "userspace",
        "--service-addresses",
        "service",
    ];
    let client = mesh.sidecar(&hc, "client", "up", &client_args);
    client.wait_peers(2, SETTLE);
    // Read once, as an application reads its environment at start.
    let api = read_warp_ist_api(&client);
    let to = SocketAddr::from((api, PORT));
    eprintln!("WARP_IST_api={api}");

    let (stop, log): (_, Log) = (Arc::new(AtomicBool::new(false)), Log::default());
    client_loop(&hc.ns, to, stop.clone(), log.clone());
    wait_for(SETTLE, || {
        log.lock().unwrap().iter().any(|(a, _)| a.is_some())
    });

    // Replace a (runner 1) by c on runner 3, then b (runner 2) by d on
    // runner 1: each new one first, then the old one stopped.
    let mut c = Instance::start(&mut mesh, &r3, "api-c", &token);
    client.wait_peers(3, SETTLE);
    std::thread::sleep(Duration::from_secs(3));
    a.stop();
    std::thread::sleep(Duration::from_secs(3));
    let mut d = Instance::start(&mut mesh, &r1, "api-d", &token);
    wait_for(SETTLE, || {
        client
            .status()
            .and_then(|s| s["peers"].as_array().map(Vec::len))
            == Some(3)
    });
    std::thread::sleep(Duration::from_secs(3));
    b.stop();
    // A connection is logged when it ends: give the ones under way when
    // b stopped a second to end, then mark where the end's record starts.
    std::thread::sleep(Duration::from_secs(1));
    let settled = log.lock().unwrap().len();
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(300));

    let log = log.lock().unwrap().clone();
    let first = log.iter().position(|(a, _)| a.is_some()).unwrap();
    let after: Vec<Option<String>> = log[first..].iter().map(|(a, _)| a.clone()).collect();
    let slowest = log[first..]
        .iter()
        .map(|(_, t)| *t)
        .max()
        .unwrap_or_default();
    let failed = after.iter().filter(|a| a.is_none()).count();
    let count = |name: &str| after.iter().filter(|a| a.as_deref() == Some(name)).count();
    let by: Vec<(&str, usize)> = ["api-a", "api-b", "api-c", "api-d"]
        .into_iter()
        .map(|n| (n, count(n)))
        .collect();
    eprintln!(
        "{} connections after the first success, {failed} failed, slowest {slowest:?}; by instance: {by:?}",
        after.len()
    );
    assert_eq!(failed, 0, "{by:?}");
    assert!(
        after.len() >= 60,
        "the client kept connecting: {}",
        after.len()
    );
    // The replacements took over; the stopped ones serve nothing at the
    // end (the last 3 s; counted by time, not by a number of connections:
    // one that waits for a SYN retransmission takes 3 s alone).
    let tail: Vec<Option<String>> = log[settled..].iter().map(|(a, _)| a.clone()).collect();
    assert!(tail.len() >= 5, "the client kept connecting: {tail:?}");
    assert!(
        tail.iter()
            .all(|a| matches!(a.as_deref(), Some("api-c" | "api-d"))),
        "{tail:?}"
    );
    assert!(count("api-c") > 0 && count("api-d") > 0, "{by:?}");
    c.stop();
    d.stop();
}

/// The long-stream port: the application reads everything, then answers
/// its name and the SHA-256 (hex) of what it read.
const STREAM_PORT: u16 = 9101;

/// The long-stream application of one instance (see [`STREAM_PORT`]).
fn digest_app(ns: &str, name: &'static str, stop: Arc<AtomicBool>) {
    use sha2::{Digest, Sha256};
    let (tx, rx) = std::sync::mpsc::channel();
    in_ns(ns, move || {
        let l = TcpListener::bind(("127.0.0.1", STREAM_PORT)).expect("bind digest app");
        l.set_nonblocking(true).unwrap();
        tx.send(()).unwrap();
        let end = Instant::now() + Duration::from_secs(120);
        while !stop.load(Ordering::Relaxed) && Instant::now() < end {
            match l.accept() {
                Ok((mut s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
                    let mut hash = Sha256::new();
                    let mut buf = vec![0u8; 64 << 10];
                    while let Ok(n @ 1..) = s.read(&mut buf) {
                        hash.update(&buf[..n]);
                    }
                    let hex: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
                    let _ = s.write_all(format!("{name} {hex}").as_bytes());
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap();
}

#[test]
fn flows_spread_evenly_and_a_long_stream_stays_whole() {
    use sha2::{Digest, Sha256};
    require_netns!();
    let mut mesh = Mesh::new();
    let token = mesh.token_for("prod", 20);
    let (hc, r1, r2, r3) = (mesh.host(2), mesh.host(3), mesh.host(4), mesh.host(5));
    let stop = Arc::new(AtomicBool::new(false));
    let mut instances = Vec::new();
    for (host, name) in [(&r1, "api-1"), (&r2, "api-2"), (&r3, "api-3")] {
        app(&host.ns, name, stop.clone());
        digest_app(&host.ns, name, stop.clone());
        let args = [
            "--token",
            token.as_str(),
            "--mode",
            "userspace",
            "--port",
            "9100",
            "--port",
            "9101",
        ];
        instances.push(mesh.sidecar_in(host, "api", "up", &args, name));
    }
    // The default (`auto`) gives the service address in userspace mode.
    let client_args = ["--token", token.as_str(), "--mode", "userspace"];
    let client = mesh.sidecar(&hc, "client", "up", &client_args);
    client.wait_peers(3, SETTLE);
    let api = read_warp_ist_api(&client);

    // 300 connections, one after another: within ±20 % of even.
    let to = SocketAddr::from((api, PORT));
    let answers = in_ns(&hc.ns, move || {
        let mut answers = Vec::new();
        for _ in 0..300 {
            let got = (|| {
                let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).ok()?;
                s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
                let mut out = String::new();
                s.read_to_string(&mut out).ok()?;
                Some(out)
            })();
            answers.push(got);
        }
        answers
    })
    .join()
    .unwrap();
    let count = |n: &str| answers.iter().filter(|a| a.as_deref() == Some(n)).count();
    let by: Vec<usize> = ["api-1", "api-2", "api-3"]
        .iter()
        .map(|n| count(n))
        .collect();
    eprintln!("300 connections by instance: {by:?}");
    assert_eq!(by.iter().sum::<usize>(), 300, "every connection answered");
    for n in &by {
        assert!((80..=120).contains(n), "within ±20 % of 100: {by:?}");
    }

    // One long stream (32 MiB) through the service address: one instance
    // reads all of it, its checksum intact.
    let to = SocketAddr::from((api, STREAM_PORT));
    let (sent, answer) = in_ns(&hc.ns, move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut hash = Sha256::new();
        let mut chunk = vec![0u8; 64 << 10];
        for i in 0..512u32 {
            for (j, b) in chunk.iter_mut().enumerate() {
                *b = (i as usize * 31 + j) as u8;
            }
            s.write_all(&chunk).expect("write");
            hash.update(&chunk);
        }
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        let hex: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
        (hex, answer)
    })
    .join()
    .unwrap();
    let (who, got) = answer.split_once(' ').unwrap_or_default();
    assert!(
        who.starts_with("api-"),
        "answered by one instance: {answer:?}"
    );
    assert_eq!(got, sent, "the stream's SHA-256 at the instance");
    stop.store(true, Ordering::Relaxed);
    drop(instances);
}
