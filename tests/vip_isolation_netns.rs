//! Service addresses and tenants (issue 19, "bad input and isolation"):
//! two networks on one keyserver each have a service `api`, so both get a
//! service address, and the two addresses may well be the same IP (each
//! network has its own ranges). A client of each network, one in kernel
//! mode and one in userspace mode, reaches only its own network's
//! instance through `api.warp` / `WARP_IST_api`; neither network's client
//! gets an answer from the other network's instance, also by the other
//! network's instance address.
//!
//! Needs root (namespaces, TUN); prints SKIPPED otherwise.

mod dataplane_support;
mod mesh_support;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dataplane_support::{in_ns, wait_for};
use mesh_support::{Mesh, Sidecar};

const SETTLE: Duration = Duration::from_secs(20);
const PORT: u16 = 9200;

macro_rules! require_netns {
    () => {
        if let Some(why) = dataplane_support::skip_reason() {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
}

/// Answers every connection on `0.0.0.0:PORT` in `ns` with `name`.
fn greeter(ns: &str, name: &'static str, stop: Arc<AtomicBool>) {
    let (tx, rx) = std::sync::mpsc::channel();
    in_ns(ns, move || {
        let l = TcpListener::bind(("0.0.0.0", PORT)).expect("bind");
        l.set_nonblocking(true).unwrap();
        tx.send(()).unwrap();
        let end = Instant::now() + Duration::from_secs(120);
        while !stop.load(Ordering::Relaxed) && Instant::now() < end {
            match l.accept() {
                Ok((mut s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let _ = s.write_all(name.as_bytes());
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap();
}

/// From `ns`, `n` connections to `to`: each answer (`None`: failed).
fn greet_n(ns: &str, to: SocketAddr, n: usize) -> Vec<Option<String>> {
    in_ns(ns, move || {
        (0..n)
            .map(|_| {
                let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3)).ok()?;
                s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
                let mut out = String::new();
                s.read_to_string(&mut out).ok()?;
                (!out.is_empty()).then_some(out)
            })
            .collect()
    })
    .join()
    .unwrap()
}

/// `WARP_IST_api` of a sidecar, once set.
fn warp_ist_api(sc: &Sidecar) -> Ipv4Addr {
    let path = sc.state_dir.join("ist.env");
    let mut found = None;
    wait_for(SETTLE, || {
        let env = std::fs::read_to_string(&path).unwrap_or_default();
        found = env
            .lines()
            .find_map(|l| l.strip_prefix("WARP_IST_api="))
            .and_then(|v| v.trim_matches('\'').parse().ok());
        found.is_some()
    });
    found.unwrap()
}

#[test]
fn a_service_address_only_ever_reaches_its_own_network() {
    require_netns!();
    let mut mesh = Mesh::new();
    mesh.admin(&["network", "create", "other"]);
    let prod = mesh.token_for("prod", 5);
    let other = mesh.token_for("other", 5);
    let (h_pa, h_oa, h_pc, h_oc) = (mesh.host(2), mesh.host(3), mesh.host(4), mesh.host(5));
    let stop = Arc::new(AtomicBool::new(false));
    greeter(&h_pa.ns, "prod-api", stop.clone());
    greeter(&h_oa.ns, "other-api", stop.clone());
    let port = PORT.to_string();
    let prod_api = mesh.sidecar(&h_pa, "api", "up", &["--token", &prod, "--port", &port]);
    let other_api = mesh.sidecar(&h_oa, "api", "up", &["--token", &other, "--port", &port]);
    // prod's client in kernel mode, other's in userspace mode.
    let prod_client = mesh.sidecar(&h_pc, "client", "up", &["--token", &prod]);
    let other_client = mesh.sidecar(
        &h_oc,
        "client",
        "up",
        &["--token", &other, "--mode", "userspace"],
    );
    prod_client.wait_peers(1, SETTLE);
    other_client.wait_peers(1, SETTLE);

    let prod_vip = warp_ist_api(&prod_client);
    let other_local = warp_ist_api(&other_client);
    eprintln!("prod WARP_IST_api={prod_vip}, other WARP_IST_api={other_local}");
    assert_eq!(prod_vip.octets()[..2], [10, 240]);
    assert!((4..8).contains(&prod_vip.octets()[2]), "service range");
    assert_eq!(other_local.octets()[..2], [127, 77]);

    // Each client reaches its own network's api, every time.
    let got = greet_n(&h_pc.ns, SocketAddr::from((prod_vip, PORT)), 20);
    assert!(
        got.iter().all(|g| g.as_deref() == Some("prod-api")),
        "{got:?}"
    );
    let got = greet_n(&h_oc.ns, SocketAddr::from((other_local, PORT)), 20);
    assert!(
        got.iter().all(|g| g.as_deref() == Some("other-api")),
        "{got:?}"
    );

    // The other network's instance is no peer of prod's client: neither its
    // member address nor the service address (the same IP in both
    // networks, or not) reaches it from the wrong network.
    let other_ip: Ipv4Addr = other_api.ip().parse().unwrap();
    let prod_ip: Ipv4Addr = prod_api.ip().parse().unwrap();
    let got = greet_n(&h_pc.ns, SocketAddr::from((other_ip, PORT)), 3);
    assert!(
        got.iter().all(|g| g.as_deref() != Some("other-api")),
        "prod reached other's instance: {got:?}"
    );
    let peers = |sc: &Sidecar| -> Vec<String> {
        sc.status()
            .and_then(|s| {
                s["peers"].as_array().map(|p| {
                    p.iter()
                        .filter_map(|p| p["ip"].as_str().map(str::to_owned))
                        .collect()
                })
            })
            .unwrap_or_default()
    };
    let (pp, op) = (peers(&prod_client), peers(&other_client));
    assert!(
        !pp.iter()
            .any(|ip| ip == &other_ip.to_string() && other_ip != prod_ip),
        "{pp:?}"
    );
    assert_eq!(pp.len(), 1, "prod's client knows prod's api only: {pp:?}");
    assert_eq!(op.len(), 1, "other's client knows other's api only: {op:?}");
    // The userspace client has no listener for prod's instance address.
    let loopback_of_prod = Ipv4Addr::new(127, 77, prod_ip.octets()[2], prod_ip.octets()[3]);
    if IpAddr::V4(prod_ip) != IpAddr::V4(other_ip) {
        let got = greet_n(&h_oc.ns, SocketAddr::from((loopback_of_prod, PORT)), 3);
        assert!(
            got.iter().all(|g| g.as_deref() != Some("prod-api")),
            "other reached prod's instance: {got:?}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    drop((prod_api, other_api, prod_client, other_client));
}
