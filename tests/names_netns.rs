//! Seed 003's listing against real sidecars in namespaces: every name
//! `keyserver network names` lists, a kernel-mode sidecar's DNS answers with
//! exactly the listed addresses (`dig`), and a member stopped gracefully is
//! named by neither. Needs root; prints SKIPPED otherwise.

mod dataplane_support;
mod mesh_support;

use std::time::{Duration, Instant};

use mesh_support::{Mesh, Sidecar};

const SETTLE: Duration = Duration::from_secs(20);

/// `dig +short` of `name` through `sc`'s private DNS, sorted.
fn dig(sc: &Sidecar, name: &str) -> Vec<String> {
    let out = sc.sh(&format!("dig @127.0.0.77 +time=2 +tries=1 +short {name}"));
    let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    lines.sort();
    lines
}

/// The listing's names, each with its addresses sorted.
fn listed(mesh: &Mesh) -> Vec<(String, Vec<String>)> {
    let out = mesh.admin(&["network", "names", "prod", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("names JSON");
    v["names"]
        .as_array()
        .expect("names")
        .iter()
        .map(|e| {
            let mut ips: Vec<String> = e["answers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a["ip"].as_str().unwrap().to_owned())
                .collect();
            ips.sort();
            (e["name"].as_str().unwrap().to_owned(), ips)
        })
        .collect()
}

#[test]
fn every_listed_name_is_answered_by_a_sidecar() {
    require_netns!();
    let mut mesh = Mesh::new();
    let token = mesh.token();
    let (ha, hb, hc) = (mesh.host(2), mesh.host(3), mesh.host(4));
    // `.warp` names answer service addresses, as the listing gives them.
    let args = ["--token", token.as_str(), "--service-addresses", "service"];
    let a = mesh.sidecar(&ha, "api", "up", &args);
    let b = mesh.sidecar(&hb, "my db", "up", &args);
    let mut c = mesh.sidecar(&hc, "api", "up", &args);
    a.wait_peers(2, SETTLE);
    b.wait_peers(2, SETTLE);
    let c_status = c.wait_peers(2, SETTLE);
    let c_name = format!("{}.internal.", c_status["instance"].as_str().unwrap());
    let c_ip = c.ip();
    assert_eq!(dig(&a, &c_name), std::slice::from_ref(&c_ip));

    // c stops gracefully: offline, unnamed in the listing and in a's DNS.
    c.stop();
    let start = Instant::now();
    let names = loop {
        let names = listed(&mesh);
        if !names.iter().any(|(n, _)| *n == c_name) && dig(&a, &c_name).is_empty() {
            break names;
        }
        assert!(start.elapsed() < SETTLE, "{c_name} still named");
        std::thread::sleep(Duration::from_millis(100));
    };
    let kinds = ["internal.", "private-network.internal.", "warp."];
    for kind in kinds {
        assert!(
            names.iter().any(|(n, _)| n.ends_with(kind)),
            "no {kind} name"
        );
    }
    for (name, ips) in &names {
        assert!(!ips.contains(&c_ip), "{name} answers the offline member");
        assert_eq!(&dig(&a, name), ips, "{name}");
    }
    eprintln!(
        "{} listed names answered by a sidecar's DNS as listed",
        names.len()
    );
    let shown = mesh.admin(&[
        "member",
        "get",
        "--network",
        "prod",
        c_name.trim_end_matches(".internal."),
        "--json",
    ]);
    let c_view: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(c_view["state"], "offline");
    assert_eq!(c_view["names"], serde_json::json!([]));
}
