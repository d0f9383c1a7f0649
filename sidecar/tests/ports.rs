//! Which ports a member announces, with the real `sidecar` binary and a
//! real keyserver (in-process, loopback, userspace mode): `sidecar run`
//! announces the ports its command listens on and never another program's
//! listener on the same host; `sidecar up` announces only declared ports
//! unless discovery is asked for.

mod support;

use std::net::TcpListener;
use std::time::Duration;

use support::{rootless_args, Keyserver, Sidecar};

const LIMIT: Duration = Duration::from_secs(60);

/// A free loopback TCP port (bound, then released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn ports(v: &serde_json::Value) -> Vec<u64> {
    v["ports"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p.as_u64()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_announces_its_commands_ports_and_no_other_listener() {
    let dir = tempfile::tempdir().unwrap();
    let ks = Keyserver::start(&dir.path().join("ks"), "127.0.0.1:0".parse().unwrap()).await;
    ks.network("prod").await;
    let token = ks.token("prod", 2).await;
    // Another program on this host listens on loopback (the keyserver's
    // admin API would be one): it must never be announced.
    let unrelated = TcpListener::bind("127.0.0.1:0").unwrap();
    let unrelated_port = u64::from(unrelated.local_addr().unwrap().port());

    // `sidecar run` whose command starts a listener (in a child of a shell).
    let port = free_port();
    let run_dir = dir.path().join("run");
    std::fs::create_dir(&run_dir).unwrap();
    let mut args: Vec<String> = vec!["run".into(), "--service".into(), "api".into()];
    args.extend(rootless_args(&run_dir, &support::interface()));
    args.extend(["--".into(), "sh".into(), "-c".into()]);
    args.push(format!(
        "exec timeout 60 socat TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork EXEC:/bin/cat"
    ));
    let mut run = Sidecar::spawn(&run_dir, &args, &[("ISTM_TOKEN", &token)]);
    let status = run
        .wait_status(LIMIT, |s| ports(s) == [u64::from(port)])
        .await;
    assert!(!ports(&status).contains(&unrelated_port));
    let members = ks.members("prod").await;
    assert_eq!(ports(&members[0]), [u64::from(port)], "{members:?}");

    // `sidecar up` without --port announces nothing, even with listeners
    // around (the run's command, the unrelated one).
    let up_dir = dir.path().join("up");
    std::fs::create_dir(&up_dir).unwrap();
    let mut args: Vec<String> = vec!["up".into(), "--service".into(), "web".into()];
    args.extend(rootless_args(&up_dir, &support::interface()));
    let mut up = Sidecar::spawn(&up_dir, &args, &[("ISTM_TOKEN", &token)]);
    let status = up
        .wait_status(LIMIT, |s| {
            s["peers"].as_array().is_some_and(|p| p.len() == 1)
        })
        .await;
    assert!(ports(&status).is_empty(), "{status}");
    // It sees the run member's port (and only it) as a peer's.
    let members = ks.members("prod").await;
    let announced: Vec<Vec<u64>> = members.iter().map(ports).collect();
    assert!(
        announced.contains(&vec![u64::from(port)]) && announced.contains(&vec![]),
        "{announced:?}"
    );
    up.stop();
    run.stop();
    drop(unrelated);
    ks.stop().await;
}
