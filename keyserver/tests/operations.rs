//! What an operator meets: file modes of the data directory, a full disk,
//! health and readiness, and the logs.

mod common;

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use hyper::Method;
use keyserver::admin::AdminClientError;
use serde_json::json;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_dir_and_its_secrets_are_private() {
    let top = tempfile::tempdir().unwrap();
    let dir = top.path().join("data");
    // An operator made the directory with a lax umask, and copied an admin
    // token in with mode 0644.
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(dir.join("admin-token"), "operator-chosen-token\n").unwrap();
    std::fs::set_permissions(
        dir.join("admin-token"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let h = Harness::start(&dir, |_| {}).await;
    assert_eq!(h.admin_token, "operator-chosen-token");
    h.network("prod", "10.240.0.0/22").await;
    assert_eq!(mode(&dir), 0o700, "data dir");
    assert_eq!(mode(&dir.join("state.redb")), 0o600, "state.redb");
    assert_eq!(mode(&dir.join("admin-token")), 0o600, "admin-token");
    assert_eq!(mode(&dir.join("key.der")), 0o600, "key.der");
    h.stop().await;
    // A shared sticky directory (like /tmp) is refused, not chmod-ed.
    let shared = top.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let config = keyserver::config::Config {
        data_dir: shared.clone(),
        ..Default::default()
    };
    let err = keyserver::Keyserver::open(&config).unwrap_err();
    assert!(err.to_string().contains("shared directory"), "{err}");
    assert_eq!(mode(&shared), 0o1777);
}

/// A small tmpfs, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Self> {
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .ok()?
            .success();
        ok.then(|| Self(dir.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes zeros to `path` until the file system is full (bounded).
fn fill(path: &Path) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    for _ in 0..10_000 {
        if f.write_all(&chunk).is_err() {
            break;
        }
    }
    let _ = f.sync_all();
}

fn status_of(r: Result<serde_json::Value, AdminClientError>) -> Option<(u16, String)> {
    match r {
        Err(AdminClientError::Status { status, message }) => Some((status, message)),
        _ => None,
    }
}

/// GET on a route without the token; status and JSON body.
async fn get(h: &Harness, path: &str) -> (u16, serde_json::Value) {
    use http_body_util::BodyExt as _;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<hyper::body::Bytes>>();
    let uri: hyper::Uri = format!("{}{path}", h.api).parse().unwrap();
    let resp = client.get(uri).await.unwrap();
    let status = resp.status().as_u16();
    let ctype = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ctype.starts_with("application/json"), "{path}: {ctype}");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_makes_it_not_ready_and_freeing_space_heals_it() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: a_full_disk_makes_it_not_ready_and_freeing_space_heals_it needs root (tmpfs mount)");
        return;
    }
    let top = tempfile::tempdir().unwrap();
    let Some(_fs) = Tmpfs::mount(top.path(), "4m") else {
        eprintln!("SKIPPED: cannot mount a tmpfs");
        return;
    };
    let dir = top.path().join("data");
    let h = Harness::start(&dir, |c| c.token_gc_secs = 0).await;
    h.network("prod", "10.240.0.0/22").await;
    assert_eq!(get(&h, "/readyz").await.0, 200);

    let filler = top.path().join("filler");
    fill(&filler);
    // Writes now fail; the error is JSON and says why.
    let mut failure = None;
    for i in 0..500 {
        let body = json!({"uses": 1, "service": format!("service-{i}-{}", "x".repeat(100))});
        let r = h
            .call(Method::POST, "/v1/networks/prod/tokens", Some(body))
            .await;
        if let Some(f) = status_of(r) {
            failure = Some(f);
            break;
        }
    }
    let (status, message) = failure.expect("a write fails on a full disk");
    eprintln!("write on a full disk: {status} {message}");
    assert_eq!(status, 500);
    // Not ready while writes fail, though the process is alive and reads work.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, body) = get(&h, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body["error"].as_str().unwrap().contains("store"), "{body}");
    assert_eq!(get(&h, "/healthz").await.0, 200);
    assert_eq!(h.members("prod").await.len(), 0);

    // Space comes back: ready again, and writes work without a restart.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = get(&h, "/readyz").await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "still not ready: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let tok = h.token("prod", json!({"uses": 1})).await;
    h.network("after", "10.240.4.0/24").await;
    let (_k, s) = join(&client_endpoint(), &tok, "api").await;
    assert_eq!(s.map().members.len(), 1);
    h.stop().await;
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_keyserver")
}

/// A child process, killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `keyserver serve` with `args` and `env`, its stderr piped; returns
/// it with the stderr lines read until one contains `until` (bounded).
fn serve_until(
    dir: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    until: &str,
) -> (Proc, Vec<String>) {
    let mut cmd = Command::new(bin());
    cmd.args([
        "serve",
        "--quic-listen",
        "127.0.0.1:0",
        "--api-listen",
        "127.0.0.1:0",
    ])
    .arg("--data-dir")
    .arg(dir)
    .args(args)
    .env_remove("NO_COLOR")
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !lines.iter().any(|l: &String| l.contains(until)) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => lines.push(line),
            Err(_) => panic!("no {until:?} in the logs: {lines:?}"),
        }
    }
    (Proc(child), lines)
}

#[test]
fn logs_are_plain_off_a_terminal_json_on_request_and_never_repeat() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("KEYSERVER_LOG", "info")];
    // Piped stderr: no colour codes.
    let (server, lines) = serve_until(dir.path(), &[], &env, "keyserver started");
    assert!(lines.iter().all(|l| !l.contains('\u{1b}')), "{lines:?}");
    // A second keyserver on the same directory fails, saying so once.
    let out = Command::new(bin())
        .args([
            "serve",
            "--quic-listen",
            "127.0.0.1:0",
            "--api-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("second keyserver: {err}");
    let cause = "Database already open";
    assert_eq!(err.matches(cause).count(), 1, "{err}");
    assert!(err.contains("state.redb"), "{err}");
    drop(server);

    // JSON lines.
    let (server, lines) = serve_until(
        dir.path(),
        &["--log-format", "json"],
        &env,
        "keyserver started",
    );
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
    drop(server);

    // On a terminal colours appear, unless NO_COLOR says otherwise (script(1)
    // gives the child a pseudo-terminal).
    let on_tty = |no_color: Option<&str>| -> String {
        let cmd = format!(
            "{} serve --quic-listen 127.0.0.1:0 --api-listen 127.0.0.1:0 --data-dir {} & pid=$!; sleep 3; kill $pid; wait $pid",
            bin(),
            dir.path().display()
        );
        let mut c = Command::new("script");
        c.args(["-qec", &cmd, "/dev/null"])
            .env("KEYSERVER_LOG", "info")
            .env_remove("NO_COLOR");
        if let Some(v) = no_color {
            c.env("NO_COLOR", v);
        }
        String::from_utf8_lossy(&c.output().unwrap().stdout).into_owned()
    };
    let coloured = on_tty(None);
    if coloured.contains("keyserver started") {
        assert!(
            coloured.contains('\u{1b}'),
            "colours on a terminal: {coloured:?}"
        );
        let plain = on_tty(Some("1"));
        assert!(plain.contains("keyserver started"), "{plain:?}");
        assert!(!plain.contains("\u{1b}["), "NO_COLOR: {plain:?}");
    } else {
        eprintln!("SKIPPED (terminal part): script(1) gave no output: {coloured:?}");
    }
}

#[test]
fn a_failed_connection_names_the_address_it_tried() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("admin-token"), "t").unwrap();
    // Port 1 on loopback: nothing listens there.
    let out = Command::new(bin())
        .args(["network", "list", "--api", "http://127.0.0.1:1"])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("{err}");
    assert!(err.contains("http://127.0.0.1:1/v1/networks"), "{err}");
    assert!(err.to_lowercase().contains("refused"), "{err}");
    assert!(!err.contains("\u{1b}"), "{err}");
}
