//! State survives a clean restart and a `kill -9`: networks, members (same
//! IPs), tokens (use counts), credentials, generations. Also drives the admin
//! subcommands of the real binary.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use meshlib::control::{self, Event};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_restart_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path(), |_| {}).await;
    h.network("prod", "10.240.0.0/22").await;
    let token = h.token("prod", json!({"uses": 5})).await;
    let ep = client_endpoint();
    let (k1, s1) = join(&ep, &token, "api").await;
    let (_k2, _s2) = join(&ep, &token, "api").await;
    let (_k3, s3) = join(&ep, &token, "db").await;
    let members = h.members("prod").await;
    // What a sidecar keeps on disk to come back without its token.
    let kept = s1.membership().to_bytes();
    assert_eq!(s1.membership().public_key, k1.public_key());
    let map = s1.map().clone();
    // Remove one member: its address goes into quarantine.
    let path = format!("/v1/networks/prod/members/{}", s3.welcome().instance);
    h.call(hyper::Method::DELETE, &path, None).await.unwrap();
    let fp = h.fingerprint;
    h.stop().await;
    drop((s1, s3));

    let h = Harness::start(dir.path(), |_| {}).await;
    assert_eq!(h.fingerprint, fp, "certificate kept");
    let after = h.members("prod").await;
    assert_eq!(after, members[..2].to_vec(), "members and their IPs kept");
    assert_eq!(h.tokens("prod").await[0]["uses_left"], 2);
    // Resume from the old map: catch-up by snapshot (log is memory-only) or delta.
    // The new instance listens on new ports: point the kept membership there.
    let mut membership = control::Membership::from_bytes(&kept).unwrap();
    membership.addrs = vec![h.quic];
    let endpoints = vec!["192.0.2.10:51820".parse().unwrap()];
    let mut s1 = control::resume_membership(&ep, &membership, map, endpoints, &cfg())
        .await
        .unwrap();
    assert_eq!(s1.welcome().ip.to_string(), "10.240.0.1");
    until(&mut s1, Duration::from_secs(5), |s| {
        s.map().members.len() == 2
    })
    .await;
    // A newcomer gets .4: .3 is quarantined across the restart.
    let token = h.token("prod", json!({"uses": 1})).await;
    let (_k4, s4) = join(&ep, &token, "api").await;
    assert_eq!(s4.welcome().ip.to_string(), "10.240.0.4");
    // The newcomer's join reaches s1; a heartbeat answer may overtake it
    // (the server's stream task picks between the two), never pass it.
    let target = s4.map().generation;
    for attempt in 0.. {
        assert!(attempt < 250, "s1 never reached generation {target}");
        s1.heartbeat().await.unwrap();
        let generation = loop {
            if let Event::HeartbeatAck { generation } = next_relevant(&mut s1).await.unwrap() {
                break generation;
            }
        };
        assert!(generation <= target, "ack {generation} beyond {target}");
        if generation == target {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.stop().await;
}

/// A keyserver child process; killed with SIGKILL on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_keyserver")
}

/// Starts `keyserver serve` on loopback port 0; returns it once `api.url` exists.
fn spawn_server(dir: &Path) -> Proc {
    let _ = std::fs::remove_file(dir.join("api.url"));
    let child = Command::new(bin())
        .args([
            "serve",
            "--quic-listen",
            "127.0.0.1:0",
            "--api-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir)
        .env("KEYSERVER_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let proc = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !dir.join("api.url").exists() {
        assert!(Instant::now() < deadline, "keyserver did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    proc
}

/// Runs an admin subcommand against the server of `dir`; returns its JSON.
fn cli(dir: &Path, args: &[&str]) -> Value {
    let out = Command::new(bin())
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_nothing_committed() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let server = spawn_server(dir);
    let net = cli(dir, &["network", "create", "prod"]);
    assert_eq!(net["range"], "10.240.0.0/22");
    let tok = cli(
        dir,
        &[
            "token",
            "create",
            "--network",
            "prod",
            "--uses",
            "20",
            "--expires",
            "1h",
            "--app",
            "api",
        ],
    );
    let token: meshlib::proto::JoinToken = tok["token"].as_str().unwrap().parse().unwrap();
    let ep = client_endpoint();
    let mut sessions = Vec::new();
    for _ in 0..10 {
        sessions.push(join(&ep, &token, "api").await);
    }
    let before = cli(dir, &["member", "list", "--network", "prod", "--json"]);
    assert_eq!(before.as_array().unwrap().len(), 10);
    let victim = sessions[0].1.welcome().instance.to_string();
    cli(dir, &["member", "remove", "--network", "prod", &victim]);
    let before = cli(dir, &["member", "list", "--network", "prod", "--json"]);
    let (k, s) = sessions.pop().unwrap();
    let req = s.resume_request(k.public_key(), vec!["192.0.2.10:51820".parse().unwrap()]);
    // SIGKILL, no shutdown path at all.
    drop(server);
    drop(sessions);

    let _server = spawn_server(dir);
    let after = cli(dir, &["member", "list", "--network", "prod", "--json"]);
    let ips = |v: &Value| -> Vec<(String, String)> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["public_key"].as_str().unwrap().into(),
                    m["ip"].as_str().unwrap().into(),
                )
            })
            .collect()
    };
    assert_eq!(ips(&after), ips(&before));
    assert_eq!(after.as_array().unwrap().len(), 9);
    let tokens = cli(dir, &["token", "list", "--network", "prod"]);
    assert_eq!(tokens[0]["uses_left"], 10);
    assert_eq!(tokens[0]["service"], "api");
    // The member resumes with its credential at the new address.
    let url = std::fs::read_to_string(dir.join("api.url")).unwrap();
    let h_token = std::fs::read_to_string(dir.join("admin-token")).unwrap();
    let admin = keyserver::admin::AdminClient::new(url.trim(), &h_token);
    let fresh = admin
        .call(
            hyper::Method::POST,
            "/v1/networks/prod/tokens",
            Some(&json!({"uses": 1})),
        )
        .await
        .unwrap();
    let fresh: meshlib::proto::JoinToken = fresh["token"].as_str().unwrap().parse().unwrap();
    let mut s = control::resume(
        &ep,
        &fresh.addrs,
        fresh.cert_sha256,
        s.map().clone(),
        req,
        &cfg(),
    )
    .await
    .unwrap();
    until(&mut s, Duration::from_secs(5), |s| {
        s.map().members.len() == 9
    })
    .await;
    // The admin token file is private.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(dir.join("admin-token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn sigterm_stops_cleanly_and_a_restart_opens_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let mut server = spawn_server(dir);
    cli(dir, &["network", "create", "prod"]);
    let pid = libc::pid_t::try_from(server.0.id()).unwrap();
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(rc, 0, "kill(SIGTERM) failed");
    let deadline = Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(exit) = server.0.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "keyserver ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "{exit:?}");
    let _server = spawn_server(dir);
    let nets = cli(dir, &["network", "list"]);
    assert_eq!(nets[0]["name"], "prod");
}

#[test]
fn serve_reads_a_toml_file_and_env_overrides_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("keyserver.toml");
    let toml = format!(
        "data-dir = {:?}\nquic-listen = \"127.0.0.1:0\"\napi-listen = \"127.0.0.1:1\"\nlog-level = \"warn\"\nmax-connections = 8\n",
        data.display().to_string()
    );
    std::fs::write(&config, toml).unwrap();
    // The environment overrides the file's (unusable) API port.
    let child = Command::new(bin())
        .args(["serve", "--config"])
        .arg(&config)
        .env("KEYSERVER_API_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _server = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !data.join("api.url").exists() {
        assert!(
            Instant::now() < deadline,
            "keyserver did not start from its config file"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Admin subcommands find it through KEYSERVER_DATA_DIR.
    let out = Command::new(bin())
        .args(["network", "create", "from-env"])
        .env("KEYSERVER_DATA_DIR", &data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["name"], "from-env");
    // A bad config file is a clear error, not a panic.
    std::fs::write(&config, "max-frames = 1\n").unwrap();
    let out = Command::new(bin())
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("max-frames") && !err.contains("panicked"),
        "{err}"
    );
}

/// A join storm into a real `keyserver serve`, killed (SIGKILL) while
/// joins are in flight: every join that was answered is stored after the
/// restart, with its address; no address is stored twice; the token's
/// uses match the stored members. Commits are grouped while the storm
/// runs (fewer commits than operations in `/metrics`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_mid_group_keeps_every_answered_join() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().to_owned();
    let server = spawn_server(&dir);
    cli(&dir, &["network", "create", "prod"]);
    let tok = cli(
        &dir,
        &[
            "token",
            "create",
            "--network",
            "prod",
            "--uses",
            "400",
            "--expires",
            "1h",
        ],
    );
    let token: meshlib::proto::JoinToken = tok["token"].as_str().unwrap().parse().unwrap();
    let answered = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, String)>::new()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..24 {
        let (token, answered, stop) = (token.clone(), answered.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let ep = client_endpoint();
            let mut held = Vec::new();
            // Bounded: at most 20 joins per task.
            for _ in 0..20 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let (_k, m) = meta("api");
                let cfg = control::ClientConfig {
                    connect_timeout: Duration::from_secs(2),
                    ..control::ClientConfig::default()
                };
                let joined = tokio::time::timeout(
                    Duration::from_secs(5),
                    control::join(&ep, &token, m, &cfg),
                )
                .await;
                match joined {
                    Ok(Ok(s)) => {
                        let w = s.welcome();
                        answered
                            .lock()
                            .unwrap()
                            .push((s.membership().public_key.to_string(), w.ip.to_string()));
                        held.push(s);
                    }
                    // The server is gone (an error, or no answer).
                    Ok(Err(_)) | Err(_) => break,
                }
            }
            held.len()
        }));
    }
    // Let the storm run, then check grouping and kill mid-flight.
    let deadline = Instant::now() + Duration::from_secs(30);
    while answered.lock().unwrap().len() < 120 {
        assert!(Instant::now() < deadline, "the storm did not get going");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let url = std::fs::read_to_string(dir.join("api.url")).unwrap();
    let metrics = reqwest_text(url.trim(), "/metrics").await;
    let counter = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics"))
    };
    let (commits, operations) = (
        counter("istmesh_keyserver_store_commits_total"),
        counter("istmesh_keyserver_store_committed_operations_total"),
    );
    eprintln!("{operations} operations in {commits} commits");
    assert!(
        commits < operations,
        "joins in flight together share commits: {operations} operations, {commits} commits"
    );
    drop(server); // SIGKILL with joins in flight
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let answered = answered.lock().unwrap().clone();
    let _server = spawn_server(&dir);
    let stored = cli(&dir, &["member", "list", "--network", "prod", "--json"]);
    let stored: std::collections::HashMap<String, String> = stored
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["public_key"].as_str().unwrap().to_owned(),
                m["ip"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for (key, ip) in &answered {
        assert_eq!(
            stored.get(key),
            Some(ip),
            "an answered join was lost: {key}"
        );
    }
    let ips: std::collections::HashSet<&String> = stored.values().collect();
    assert_eq!(ips.len(), stored.len(), "an address stored twice");
    let tokens = cli(&dir, &["token", "list", "--network", "prod"]);
    assert_eq!(
        tokens[0]["uses_left"].as_u64(),
        Some(400 - stored.len() as u64),
        "one token use per stored member"
    );
    eprintln!(
        "{} joins answered, {} stored after the kill",
        answered.len(),
        stored.len()
    );
}

/// The body of an unauthenticated GET.
async fn reqwest_text(api: &str, path: &str) -> String {
    let addr = api.trim_start_matches("http://").to_owned();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split_once("\r\n\r\n").unwrap().1.to_owned()
}
