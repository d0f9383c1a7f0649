//! Start-up of the real `sidecar` binary against a real keyserver
//! (in-process, loopback, userspace mode, no privileges): a first join is
//! retried until it works, whatever passing failure it meets; bad values
//! fail before the join and cost no token use; the token can come from a
//! file, and the state directory, key, membership and status socket are
//! private.

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use meshlib::proto::ErrorCode;
use support::front::{Front, FrontCert, Step};
use support::{rootless_args, Keyserver, Sidecar};

const LIMIT: Duration = Duration::from_secs(60);

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().mode() & 0o777
}

fn args(extra: &[&str], dir: &Path) -> Vec<String> {
    let mut a: Vec<String> = vec!["up".into(), "--service".into(), "api".into()];
    a.extend(rootless_args(dir, &support::interface()));
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn secret_file(dir: &Path, text: &str) -> String {
    let p = dir.join("token");
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p.to_str().unwrap().to_owned()
}

/// A free loopback UDP port (bound, then released).
fn free_udp_port() -> std::net::SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_join_is_retried_until_it_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let ks = Keyserver::start(&dir.path().join("ks"), "127.0.0.1:0".parse().unwrap()).await;
    ks.network("prod").await;
    let token = ks.token("prod", 1).await;
    let fp = token
        .parse::<meshlib::proto::JoinToken>()
        .unwrap()
        .cert_sha256;
    // The sidecar talks to a front that is not up yet; once up, the front
    // refuses with Busy twice, then Internal, then drops the connection
    // after reading the join, then passes it to the keyserver.
    let front_addr = free_udp_port();
    let cert = FrontCert::new();
    let sc_dir = dir.path().join("sc");
    std::fs::create_dir(&sc_dir).unwrap();
    let file = secret_file(&sc_dir, &cert.token(&token, front_addr));
    let mut sc = Sidecar::spawn(&sc_dir, &args(&["--token-file", &file], &sc_dir), &[]);
    sc.wait_log("join failed; retrying", LIMIT).await;
    let log = sc.log_text();
    assert!(
        log.contains(&format!("keyserver={front_addr}")),
        "the log names the address tried:\n{log}"
    );
    // The key is on disk before any join succeeded, private; no membership.
    let key = sc.state.join("private.key");
    assert_eq!(mode(&key), 0o600);
    assert!(!sc.state.join("membership.json").exists());
    assert!(sc.child.try_wait().unwrap().is_none(), "still trying");
    let key_before = std::fs::read_to_string(&key).unwrap();

    let front = Front::start(
        front_addr,
        &cert,
        ks.quic,
        fp,
        vec![
            Step::Refuse(ErrorCode::Busy),
            Step::Refuse(ErrorCode::Busy),
            Step::Refuse(ErrorCode::Internal),
            Step::Drop,
        ],
    );
    let status = sc.wait_status(LIMIT, |s| s["ip"].as_str().is_some()).await;
    assert_eq!(
        *front.seen.lock(),
        [
            Step::Refuse(ErrorCode::Busy),
            Step::Refuse(ErrorCode::Busy),
            Step::Refuse(ErrorCode::Internal),
            Step::Drop,
            Step::Forward
        ]
    );
    // Each distinct reason is logged once (with its attempt number), not
    // every attempt: the second Busy says nothing new.
    let log = sc.log_text();
    let retries: Vec<&str> = log.lines().filter(|l| l.contains("join failed")).collect();
    for said in ["Busy", "Internal", "connection lost"] {
        assert_eq!(
            retries.iter().filter(|l| l.contains(said)).count(),
            1,
            "{said} is logged once:\n{log}"
        );
    }
    assert!(
        retries
            .iter()
            .any(|l| l.contains("Internal") && l.contains("attempt=4")),
        "with its attempt number:\n{log}"
    );
    assert_eq!(
        std::fs::read_to_string(&key).unwrap(),
        key_before,
        "same key"
    );
    assert_eq!(mode(&sc.state.join("membership.json")), 0o600);
    let members = ks.members("prod").await;
    assert_eq!(members.len(), 1, "{members:?}");
    assert_eq!(members[0]["ip"], status["ip"]);
    assert_eq!(ks.uses_left("prod").await, [0]);
    sc.stop();
    ks.stop().await;
}

/// A second listener on a port: `addr` stays taken while it lives.
fn taken_udp() -> (std::net::UdpSocket, u16) {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    let port = s.local_addr().unwrap().port();
    (s, port)
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_values_fail_before_the_join_and_cost_no_token_use() {
    let dir = tempfile::tempdir().unwrap();
    let ks = Keyserver::start(&dir.path().join("ks"), "127.0.0.1:0".parse().unwrap()).await;
    ks.network("prod").await;
    let token = ks.token("prod", 1).await;
    let d = dir.path();
    let deep = d.join("deep.js");
    std::fs::write(
        &deep,
        format!(
            "module.exports = {{ ist: {}1{} }}",
            "{a:".repeat(100_000),
            "}".repeat(100_000)
        ),
    )
    .unwrap();
    let fifo = d.join("fifo");
    mkfifo(&fifo);
    let (_udp, busy) = taken_udp();
    let busy_tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dns_busy = busy_tcp.local_addr().unwrap().to_string();
    let p = |x: &Path| x.to_str().unwrap().to_owned();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--warp-config".into(), p(&d.join("missing.js"))],
            "warp-config:",
        ),
        (vec!["--warp-config".into(), p(&deep)], "warp-config:"),
        (vec!["--hosts-file".into(), p(&fifo)], "hosts-file:"),
        (
            vec!["--hosts-file".into(), p(&d.join("nodir/hosts"))],
            "hosts-file:",
        ),
        (vec!["--port".into(), "0".into()], "ports:"),
        (
            vec!["--service-address".into(), "0.0.0.0".into()],
            "service-address:",
        ),
        (
            vec!["--listen-port".into(), busy.to_string()],
            "listen-port:",
        ),
        (vec!["--dns-listen".into(), dns_busy], "dns.listen:"),
        (
            vec!["--loopback-octet".into(), "0".into()],
            "loopback-octet",
        ),
    ];
    for (i, (extra, key)) in cases.iter().enumerate() {
        let sc_dir = d.join(format!("sc{i}"));
        std::fs::create_dir(&sc_dir).unwrap();
        let file = secret_file(&sc_dir, &token);
        let mut a = args(&["--token-file", &file], &sc_dir);
        if key.starts_with("dns") {
            a.retain(|x| x != "--no-dns");
        }
        for pair in extra.chunks(2) {
            match a.iter().position(|x| *x == pair[0]) {
                Some(at) => a[at + 1] = pair[1].clone(),
                None => a.extend(pair.iter().cloned()),
            }
        }
        let mut sc = Sidecar::spawn(&sc_dir, &a, &[]);
        let status = sc.wait_exit(Duration::from_secs(20)).await;
        let log = sc.log_text();
        assert!(
            status.is_some_and(|s| !s.success()),
            "{extra:?}: exits with an error, got {status:?}:\n{log}"
        );
        assert!(
            log.contains(&format!("sidecar: {key}")),
            "{extra:?}: names {key}:\n{log}"
        );
        assert!(!log.contains("joined"), "{extra:?}:\n{log}");
    }
    assert_eq!(ks.uses_left("prod").await, [1], "no token use spent");
    assert!(ks.members("prod").await.is_empty());
    ks.stop().await;
}

/// A second sidecar on a host that shares another's interface name fails
/// before joining (`wg show` would lose one of them), naming every setting
/// that clashes at once and the settings each sidecar needs its own of.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_interface_is_an_error_with_every_clash_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let iface = support::interface();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    // Another sidecar's WireGuard socket for this interface name, where a
    // sidecar without access to /var/run/wireguard serves it.
    let _other =
        std::os::unix::net::UnixListener::bind(state.join(format!("{iface}.sock"))).unwrap();
    let (_udp, busy) = taken_udp();
    let mut a: Vec<String> = vec!["up".into(), "--service".into(), "api".into()];
    a.extend(rootless_args(dir.path(), &iface));
    let at = a.iter().position(|x| x == "--listen-port").unwrap();
    a[at + 1] = busy.to_string();
    let mut sc = Sidecar::spawn(dir.path(), &a, &[]);
    let status = sc.wait_exit(Duration::from_secs(20)).await;
    let log = sc.log_text();
    assert!(status.is_some_and(|s| !s.success()), "{log}");
    for part in [
        "sidecar: listen-port:",
        &format!("; interface: \"{iface}\" is in use on this host"),
        "each sidecar on a host needs its own state-dir, interface, listen-port",
        "loopback-octet",
    ] {
        assert!(log.contains(part), "{part}:\n{log}");
    }
}

#[test]
fn mode_help_shows_its_default_and_values() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sidecar"))
        .args(["up", "--help"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mode: String = text
        .split("--mode <MODE>")
        .nth(1)
        .unwrap_or_else(|| panic!("{text}"))
        .split("\n      --")
        .next()
        .unwrap()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    assert!(mode.contains("[default: kernel]"), "{mode}");
    assert!(
        mode.contains("[possible values: kernel, userspace]"),
        "{mode}"
    );
    assert!(!text.contains("seed 00"), "{text}");
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_sidecar"))
        .args(["up", "--mode", "kernal"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&bad.stderr).contains("possible values: kernel, userspace"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_stays_out_of_ps_and_state_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let ks = Keyserver::start(&dir.path().join("ks"), "127.0.0.1:0".parse().unwrap()).await;
    ks.network("prod").await;
    let token = ks.token("prod", 3).await;

    // --token-file: joins; the token is in no process's command line; no
    // warning. A state directory others could enter is tightened.
    let a_dir = dir.path().join("a");
    std::fs::create_dir(&a_dir).unwrap();
    std::fs::create_dir(a_dir.join("state")).unwrap();
    std::fs::set_permissions(a_dir.join("state"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let file = secret_file(&a_dir, &token);
    let mut a = Sidecar::spawn(&a_dir, &args(&["--token-file", &file], &a_dir), &[]);
    a.wait_status(LIMIT, |s| s["ip"].as_str().is_some()).await;
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", a.child.id())).unwrap();
    assert!(!String::from_utf8_lossy(&cmdline).contains(&token));
    assert!(!a.log_text().contains("--token"), "{}", a.log_text());
    assert_eq!(mode(&a.state), 0o700, "state directory tightened");
    assert!(
        a.log_text().contains("set to mode 0700"),
        "{}",
        a.log_text()
    );
    assert_eq!(mode(&a.state.join("private.key")), 0o600);
    assert_eq!(mode(&a.state.join("membership.json")), 0o600);
    let sock = a.state.join("status.sock");
    assert_eq!(mode(&sock), 0o600, "status socket not world-writable");

    // ISTM_TOKEN: joins without a warning.
    let b_dir = dir.path().join("b");
    std::fs::create_dir(&b_dir).unwrap();
    let mut b = Sidecar::spawn(&b_dir, &args(&[], &b_dir), &[("ISTM_TOKEN", &token)]);
    b.wait_status(LIMIT, |s| s["ip"].as_str().is_some()).await;
    assert!(!b.log_text().contains("--token"), "{}", b.log_text());
    assert_eq!(mode(&b.state), 0o700, "state directory created private");

    // --token: works, with a warning naming the alternatives.
    let c_dir = dir.path().join("c");
    std::fs::create_dir(&c_dir).unwrap();
    let mut c = Sidecar::spawn(&c_dir, &args(&["--token", &token], &c_dir), &[]);
    c.wait_status(LIMIT, |s| s["ip"].as_str().is_some()).await;
    let log = c.log_text();
    assert!(
        log.contains("given with --token") && log.contains("--token-file"),
        "{log}"
    );
    assert_eq!(ks.members("prod").await.len(), 3);
    for s in [&mut a, &mut b, &mut c] {
        s.stop();
    }
    ks.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_rootless_example_makes_its_state_directory() {
    let dir = tempfile::tempdir().unwrap();
    let ks = Keyserver::start(&dir.path().join("ks"), "127.0.0.1:0".parse().unwrap()).await;
    ks.network("prod").await;
    let token = ks.token("prod", 1).await;
    // `--state-dir ~/.ist-mesh --hosts-file ~/.ist-mesh/hosts` on a first
    // start, with missing parents too (`~/.local/state/ist-mesh`).
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let state = home.join(".local/state/ist-mesh");
    let hosts = state.join("hosts");
    let file = secret_file(&home, &token);
    let dns = std::net::UdpSocket::bind("127.0.0.77:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let interface = support::interface();
    let p = |x: &Path| x.to_str().unwrap().to_owned();
    let a: Vec<String> = [
        "up",
        "--mode",
        "userspace",
        "--token-file",
        &file,
        "--service",
        "api",
        "--state-dir",
        &p(&state),
        "--hosts-file",
        &p(&hosts),
        "--dns-listen",
        &dns.to_string(),
        "--port",
        "8080",
        "--metrics",
        "off",
        "--listen-port",
        "0",
        "--interface",
        &interface,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut sc = Sidecar::spawn(&home, &a, &[]);
    sc.state = state.clone();
    sc.wait_status(LIMIT, |s| s["control"]["state"] == "connected")
        .await;
    assert_eq!(mode(&state), 0o700, "the state directory is private");
    // Its missing parents are made as `mkdir -p` makes them.
    let umask = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .map(|m| u32::from_str_radix(m.trim(), 8).unwrap())
        .unwrap();
    for parent in [home.join(".local"), home.join(".local/state")] {
        assert_eq!(mode(&parent), 0o777 & !umask, "{}", parent.display());
    }
    assert_eq!(mode(&state.join("membership.json")), 0o600);
    sc.wait_log("network map applied", LIMIT).await;
    let start = std::time::Instant::now();
    while !std::fs::read_to_string(&hosts)
        .unwrap_or_default()
        .contains("# BEGIN ist-mesh")
    {
        assert!(
            start.elapsed() < LIMIT,
            "no hosts section:\n{}",
            sc.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sc.stop();
    ks.stop().await;
}
