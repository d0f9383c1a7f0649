//! The web console's removal reaches a real member's DNS (issue 23): a
//! keyserver (in-process) and two real `sidecar up --mode userspace`
//! members (A and B) in one network namespace of their own, on its
//! loopback only; headless Chromium (through chromedriver, started in the
//! same namespace) signs in and removes B through the confirmation dialog;
//! `dig @<A's DNS> <B's name>` answered B's address before and stops
//! answering it within a bounded time. Needs root (the namespace) and
//! `chromium`, `chromedriver` and `dig`; prints SKIPPED otherwise.

#[path = "../keyserver/tests/console_support/mod.rs"]
mod console_support;
mod dataplane_support;
mod mesh_support;

use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use console_support::Browser;
use dataplane_support::{must, run};
use keyserver::config::Config;
use keyserver::Keyserver;
use meshlib::userspace::ports::loopback_for;
use serde_json::{json, Value};

const SETTLE: Duration = Duration::from_secs(30);
/// The removal must reach A's DNS within this (the live target is
/// 1 s for the page; the member's map follows the same push).
const GONE_WITHIN: Duration = Duration::from_secs(10);

/// Why this test cannot run here, if it cannot.
fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (a network namespace)".into());
    }
    for (tool, package) in [("dig", "dnsutils"), ("ip", "iproute2")] {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()));
        if !found {
            return Some(format!("needs {tool} (Debian {package})"));
        }
    }
    console_support::skip_reason()
}

/// A network namespace with only its loopback up; deleted on drop (with
/// whatever still runs in it).
struct Netns(String);

impl Netns {
    fn new() -> Netns {
        let name = format!("istcd{}", std::process::id());
        let _ = run("ip", &["netns", "del", &name]);
        must("ip", &["netns", "add", &name]);
        let ns = Netns(name);
        must("ip", &["-n", &ns.0, "link", "set", "lo", "up"]);
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let pids = run("ip", &["netns", "pids", &self.0]);
        for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
            let _ = run("kill", &["-9", pid]);
        }
        let _ = run("ip", &["netns", "del", &self.0]);
    }
}

/// A `sidecar up --mode userspace` process, stopped on drop (SIGTERM,
/// then SIGKILL); its UAPI socket removed.
struct Member {
    child: Child,
    state: tempfile::TempDir,
    log: PathBuf,
    uapi: PathBuf,
    dns: SocketAddr,
}

impl Member {
    /// Starts member `i` (1 or 2) of service `service` with `token`.
    fn start(i: u8, service: &str, token: &str, logs: &Path) -> Member {
        let state = tempfile::tempdir().unwrap();
        let iface = format!("cd{}m{i}", std::process::id() % 100_000);
        let dns: SocketAddr = format!("127.0.0.1:{}", 5300 + u16::from(i))
            .parse()
            .unwrap();
        let wg_port = (51900 + u16::from(i)).to_string();
        let log = logs.join(format!("sidecar-{i}.log"));
        let child = Command::new(mesh_support::bin("sidecar"))
            .args(["up", "--mode", "userspace", "--service", service])
            .args(["--token", token, "--interface", &iface, "--metrics", "off"])
            .args(["--listen-port", &wg_port, "--endpoint"])
            .arg(format!("127.0.0.1:{wg_port}"))
            .args(["--dns-listen", &dns.to_string()])
            .args(["--dns-upstream", "127.0.0.1:9", "--hosts-file", ""])
            .arg("--loopback-octet")
            .arg((76 + i).to_string())
            .arg("--state-dir")
            .arg(state.path())
            .env("ISTM_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("start sidecar");
        Member {
            child,
            state,
            log,
            uapi: meshlib::wg::uapi_server::socket_path(&iface),
            dns,
        }
    }

    /// `sidecar status --json`, if it answers.
    fn status(&self) -> Option<Value> {
        let out = Command::new(mesh_support::bin("sidecar"))
            .args(["status", "--json", "--state-dir"])
            .arg(self.state.path())
            .output()
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Waits until its status shows `peers` peers; the status.
    fn wait_peers(&self, peers: usize) -> Value {
        let start = Instant::now();
        loop {
            if let Some(s) = self.status() {
                if s["peers"].as_array().map_or(0, Vec::len) >= peers {
                    return s;
                }
            }
            assert!(
                start.elapsed() < SETTLE,
                "fewer than {peers} peers after {SETTLE:?}; log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What its DNS answers for `name` (`dig +short`), in order.
    fn dig(&self, name: &str) -> Vec<String> {
        let out = run(
            "dig",
            &[
                &format!("@{}", self.dns.ip()),
                "-p",
                &self.dns.port().to_string(),
                "+time=1",
                "+tries=2",
                "+short",
                name,
            ],
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let start = Instant::now();
        while matches!(self.child.try_wait(), Ok(None)) && start.elapsed() < Duration::from_secs(3)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.uapi);
    }
}

#[test]
fn a_member_removed_in_the_console_is_gone_from_a_members_dns() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let ns = Netns::new();
    let path = format!("/var/run/netns/{}", ns.0);
    // Everything (the keyserver's runtime, the sidecars, chromedriver and
    // its browser, dig) runs on this thread or what it starts, so inside
    // the namespace. A deep stack: the browser's polls nest deeply in a
    // debug build.
    let walk = std::thread::Builder::new()
        .stack_size(64 << 20)
        .spawn(move || {
            let file = File::open(&path).expect("open netns");
            // SAFETY: a valid namespace fd; affects only this thread (and
            // the threads and processes it starts).
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}");
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap()
                .block_on(walk_through())
        })
        .unwrap()
        .join();
    drop(ns);
    if let Err(panic) = walk {
        std::panic::resume_unwind(panic);
    }
}

/// The keyserver in this runtime; stopped when `stop` is sent or dropped.
struct Server {
    addr: String,
    token: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

async fn start_keyserver(dir: &Path) -> Server {
    let config = Config {
        data_dir: dir.to_owned(),
        quic_listen: "127.0.0.1:0".parse().unwrap(),
        api_listen: "127.0.0.1:0".parse().unwrap(),
        relay_listen: "off".parse().unwrap(),
        ..Config::default()
    };
    let ks = Keyserver::open(&config).expect("open keyserver");
    let quic = ks.bind_quic(config.quic_listen).expect("bind quic");
    let api = tokio::net::TcpListener::bind(config.api_listen)
        .await
        .unwrap();
    let addr = api.local_addr().unwrap().to_string();
    let token = ks.admin_token().to_owned();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        ks.serve(quic, api, vec![], async {
            let _ = rx.await;
        })
        .await
        .expect("serve");
    });
    Server {
        addr,
        token,
        stop: Some(tx),
        task,
    }
}

impl Server {
    async fn admin(&self, method: hyper::Method, path: &str, body: Option<Value>) -> Value {
        keyserver::admin::AdminClient::new(&format!("http://{}", self.addr), &self.token)
            .call(method, path, body.as_ref())
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"))
    }
}

/// Runs blocking work (a child's status, `dig`) on this worker thread.
fn block<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

async fn walk_through() {
    let dir = tempfile::tempdir().unwrap();
    let mut ks = start_keyserver(&dir.path().join("keyserver")).await;
    let origin = format!("http://{}", ks.addr);
    ks.admin(
        hyper::Method::POST,
        "/v1/networks",
        Some(json!({"name": "prod"})),
    )
    .await;
    let v = ks
        .admin(
            hyper::Method::POST,
            "/v1/networks/prod/tokens",
            Some(json!({"uses": 5})),
        )
        .await;
    let token = v["token"].as_str().unwrap().to_owned();

    // Members A and B, each sees the other; A's DNS answers B's name.
    let a = Member::start(1, "api", &token, dir.path());
    let b = Member::start(2, "web", &token, dir.path());
    block(|| a.wait_peers(1));
    let b_status = block(|| b.wait_peers(1));
    let b_name = format!("{}.internal", b_status["instance"].as_str().unwrap());
    let b_ip: IpAddr = b_status["ip"].as_str().unwrap().parse().unwrap();
    // A is a userspace member with loopback octet 77: B is 127.77.c.d to it.
    let b_there = loopback_for(b_ip).to_string();
    let start = Instant::now();
    while block(|| a.dig(&b_name)) != std::slice::from_ref(&b_there) {
        assert!(
            start.elapsed() < SETTLE,
            "A's DNS never answered {b_name} with {b_there}: {:?}",
            block(|| a.dig(&b_name))
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // In the console: sign in, remove B with confirmation.
    let browser = Browser::start().await;
    browser.goto(&format!("{origin}/ui/")).await;
    browser
        .wait(
            "the sign-in form",
            Duration::from_secs(10),
            "return !!document.getElementById('token')",
        )
        .await;
    browser.type_into("#token", &ks.token).await;
    browser.click("#signin-button").await;
    browser
        .wait(
            "the networks page",
            Duration::from_secs(10),
            "return document.querySelectorAll('#networks tbody tr').length",
        )
        .await;
    browser.goto(&format!("{origin}/ui/#/n/prod/members")).await;
    let instance = b_name.trim_end_matches(".internal").to_owned();
    let row = format!("#members tr[data-instance=\"{instance}\"]");
    browser
        .wait(
            "B's row",
            Duration::from_secs(10),
            &format!("return !!document.querySelector({row:?})"),
        )
        .await;
    browser.click(&format!("{row} button.remove")).await;
    let (question, _) = browser
        .wait(
            "the confirmation",
            Duration::from_secs(5),
            "return !document.getElementById('dialog').hidden && document.getElementById('dialog-text').textContent",
        )
        .await;
    assert!(
        question.as_str().unwrap_or_default().contains(&instance),
        "{question}"
    );
    assert_eq!(
        block(|| a.dig(&b_name)),
        std::slice::from_ref(&b_there),
        "B is answered until the removal is confirmed"
    );
    let confirmed = Instant::now();
    browser.click("#dialog-ok").await;
    browser
        .wait(
            "B's row gone",
            Duration::from_secs(5),
            &format!("return !document.querySelector({row:?})"),
        )
        .await;
    browser.screenshot("dns-removed").await;

    // A's DNS stops answering B.
    loop {
        let answer = block(|| a.dig(&b_name));
        if answer.is_empty() {
            break;
        }
        assert!(
            confirmed.elapsed() < GONE_WITHIN,
            "A's DNS still answers {b_name} with {answer:?} {:?} after the removal; A's log:\n{}",
            confirmed.elapsed(),
            std::fs::read_to_string(&a.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "console: removal of {instance} reached member A's DNS (dig) {} ms after the confirmation",
        confirmed.elapsed().as_millis()
    );
    let members = ks
        .admin(hyper::Method::GET, "/v1/networks/prod/members", None)
        .await;
    assert!(
        !members.to_string().contains(&instance),
        "B still listed: {members}"
    );
    drop(browser);
    block(|| {
        drop(a);
        drop(b);
    });
    let _ = ks.stop.take().map(|s| s.send(()));
    let _ = tokio::time::timeout(Duration::from_secs(20), &mut ks.task).await;
}
