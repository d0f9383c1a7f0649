//! Slots with the real binaries in namespaces (issue 18): a kernel-mode and
//! a userspace instance, each restarted three times without its state (a
//! new container: empty state directory, new WireGuard key), keep their
//! address, `<instance>.internal` and `1.web.<app>.<pn>.private-network.internal`;
//! a TCP client on a third member reconnects to the same address each time
//! and its WireGuard swaps the peer's key in place.
//!
//! Needs root (namespaces, TUN); prints SKIPPED otherwise.

mod dataplane_support;
mod mesh_support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dataplane_support::{in_ns, wait_for};
use mesh_support::{Mesh, Sidecar};

const SETTLE: Duration = Duration::from_secs(20);

/// Offline after 4 s of silence (a graceful stop is offline at once).
const TIMERS: &str = "offline-after-secs = 4\n";

macro_rules! require_netns {
    () => {
        if let Some(why) = dataplane_support::skip_reason() {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
}

/// A TCP server in `ns` on `bind` that answers every connection with
/// `reply` and closes it, until `stop` is set (or 5 minutes pass).
fn greeter(ns: &str, bind: SocketAddr, reply: &'static str, stop: Arc<AtomicBool>) {
    let (tx, rx) = std::sync::mpsc::channel();
    in_ns(ns, move || {
        let l = TcpListener::bind(bind).expect("bind");
        l.set_nonblocking(true).unwrap();
        tx.send(()).unwrap();
        let end = Instant::now() + Duration::from_secs(300);
        while !stop.load(Ordering::Relaxed) && Instant::now() < end {
            match l.accept() {
                Ok((mut s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let _ = s.write_all(reply.as_bytes());
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap();
}

/// Connects from `ns` to `to` and reads what the server says.
fn fetch(ns: &str, to: SocketAddr) -> Option<String> {
    in_ns(ns, move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    })
    .join()
    .unwrap()
}

fn status_field(sc: &Sidecar, field: &str) -> String {
    sc.status().expect("status")[field]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// The app id the keyserver gave `service`.
fn app_id(mesh: &Mesh, service: &str) -> String {
    let list = mesh.admin(&["member", "list", "--network", "prod", "--json"]);
    let members: serde_json::Value = serde_json::from_str(&list).expect("member list is JSON");
    members
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["service"] == service)
        .and_then(|m| m["app_id"].as_str())
        .expect("the service's member")
        .to_owned()
}

#[test]
fn stateless_restarts_keep_address_and_names_kernel_and_userspace() {
    require_netns!();
    let mut mesh = Mesh::with_keyserver_config(TIMERS);
    // Members' own addresses and names across restarts (issue 18): `.warp`
    // gives members here (the way back); service addresses have their suites.
    mesh.service_addresses = Some("members");
    let token = mesh.token_for("prod", 20);
    let (hc, hk, hu) = (mesh.host(2), mesh.host(3), mesh.host(4));
    let stop = Arc::new(AtomicBool::new(false));
    greeter(
        &hk.ns,
        "0.0.0.0:9000".parse().unwrap(),
        "hello from api",
        stop.clone(),
    );
    greeter(
        &hu.ns,
        "127.0.0.1:9001".parse().unwrap(),
        "hello from worker",
        stop.clone(),
    );
    let client = mesh.sidecar(&hc, "client", "up", &["--token", &token]);
    let kernel_args = ["--token", token.as_str(), "--port", "9000"];
    let user_args = [
        "--token",
        token.as_str(),
        "--mode",
        "userspace",
        "--port",
        "9001",
    ];
    let mut kernel = mesh.sidecar(&hk, "api", "up", &kernel_args);
    let mut user = mesh.sidecar(&hu, "worker", "up", &user_args);
    for sc in [&client, &kernel, &user] {
        sc.wait_peers(2, SETTLE);
    }
    let pn = status_field(&client, "network");
    let cases: [(&mut Sidecar, &[&str], u16, &str); 2] = [
        (&mut kernel, &kernel_args, 9000, "hello from api"),
        (&mut user, &user_args, 9001, "hello from worker"),
    ];
    for (sc, args, port, greeting) in cases {
        let (ip, instance) = (sc.ip(), status_field(sc, "instance"));
        let app = app_id(&mesh, &sc.service);
        let first = format!("1.web.{app}.{pn}.private-network.internal");
        let internal = format!("{instance}.internal");
        let warp = format!("{}.warp", sc.service);
        let to: SocketAddr = format!("{ip}:{port}").parse().unwrap();
        wait_for(SETTLE, || fetch(&hc.ns, to).as_deref() == Some(greeting));
        assert_eq!(client.dig(&first).as_deref(), Some(ip.as_str()));
        assert_eq!(client.dig(&internal).as_deref(), Some(ip.as_str()));
        for round in 1..=3 {
            let old_key = status_field(sc, "public_key");
            let restarted = Instant::now();
            sc.stop();
            // A new container: nothing of the old state is left.
            std::fs::remove_dir_all(&sc.state_dir).unwrap();
            sc.start("up", args);
            sc.wait_peers(2, SETTLE);
            let new_key = status_field(sc, "public_key");
            assert_ne!(new_key, old_key, "round {round}: a new key");
            assert_eq!(sc.ip(), ip, "round {round}: the slot's address");
            assert_eq!(status_field(sc, "instance"), instance, "round {round}");
            // The client's WireGuard swapped the key in place; its names
            // and the TCP service answer at the same address.
            wait_for(SETTLE, || {
                let peers = client.wg_peers();
                peers.contains(&new_key)
                    && !peers.contains(&old_key)
                    && fetch(&hc.ns, to).as_deref() == Some(greeting)
            });
            eprintln!(
                "{} restart {round} without state: client reconnected after {:?}",
                sc.service,
                restarted.elapsed()
            );
            assert_eq!(client.dig(&first).as_deref(), Some(ip.as_str()));
            assert_eq!(client.dig(&internal).as_deref(), Some(ip.as_str()));
            wait_for(SETTLE, || {
                client.getent(&warp).as_deref() == Some(ip.as_str())
            });
        }
        // One member per slot: the stopped keys are gone, not offline.
        let list = mesh.admin(&["member", "list", "--network", "prod", "--json"]);
        let members: serde_json::Value = serde_json::from_str(&list).unwrap();
        let of_service = members
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["service"] == sc.service.as_str())
            .count();
        assert_eq!(of_service, 1, "{list}");
    }
    stop.store(true, Ordering::Relaxed);
}
