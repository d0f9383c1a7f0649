//! A real keyserver in-process on loopback, and the real `sidecar` binary
//! as a child process (userspace mode, no privileges needed, every file in
//! a temporary directory). Children are stopped on drop, also on panic.

#![allow(dead_code)]

pub mod front;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use hyper::Method;
use keyserver::admin::AdminClient;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A running keyserver on loopback ports.
pub struct Keyserver {
    /// Its data directory.
    pub dir: PathBuf,
    /// Its QUIC address (in its tokens).
    pub quic: SocketAddr,
    /// Its admin API.
    pub admin: AdminClient,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Keyserver {
    /// Starts a keyserver on `dir`, QUIC on `quic` (port 0: any).
    pub async fn start(dir: &Path, quic: SocketAddr) -> Self {
        let config = keyserver::config::Config {
            data_dir: dir.to_owned(),
            quic_listen: quic,
            api_listen: "127.0.0.1:0".parse().unwrap(),
            ..keyserver::config::Config::default()
        };
        let ks = keyserver::Keyserver::open(&config).expect("open keyserver");
        let endpoint = ks.bind_quic(config.quic_listen).expect("bind quic");
        let quic = endpoint.local_addr().unwrap();
        let api = tokio::net::TcpListener::bind(config.api_listen)
            .await
            .unwrap();
        let admin = AdminClient::new(
            &format!("http://{}", api.local_addr().unwrap()),
            ks.admin_token(),
        );
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            ks.serve(endpoint, api, vec![], async {
                let _ = rx.await;
            })
            .await
            .expect("serve");
        });
        Self {
            dir: dir.to_owned(),
            quic,
            admin,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Stops it and waits until it is down.
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), self.task.take().unwrap())
            .await
            .expect("keyserver stops in time")
            .unwrap();
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        self.admin
            .call(method, path, body.as_ref())
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// Creates network `name`.
    pub async fn network(&self, name: &str) {
        self.call(Method::POST, "/v1/networks", Some(json!({ "name": name })))
            .await;
    }

    /// A token of `net` with `uses` uses.
    pub async fn token(&self, net: &str, uses: u32) -> String {
        let v = self
            .call(
                Method::POST,
                &format!("/v1/networks/{net}/tokens"),
                Some(json!({ "uses": uses })),
            )
            .await;
        v["token"].as_str().unwrap().to_owned()
    }

    /// The uses left of every token of `net`.
    pub async fn uses_left(&self, net: &str) -> Vec<u64> {
        let v = self
            .call(Method::GET, &format!("/v1/networks/{net}/tokens"), None)
            .await;
        v.as_array()
            .unwrap()
            .iter()
            .map(|t| t["uses_left"].as_u64().unwrap())
            .collect()
    }

    /// The members of `net`.
    pub async fn members(&self, net: &str) -> Vec<Value> {
        let v = self
            .call(Method::GET, &format!("/v1/networks/{net}/members"), None)
            .await;
        v.as_array().unwrap().clone()
    }
}

/// The `sidecar` binary of this build.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_sidecar")
}

/// A unique interface name (UAPI sockets are per name, host-wide).
pub fn interface() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "su{}x{}",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// One `sidecar` child process, its state directory and log.
pub struct Sidecar {
    /// The process.
    pub child: Child,
    /// Its state directory.
    pub state: PathBuf,
    /// Its stderr, in a file.
    pub log: PathBuf,
    /// Its interface (and UAPI socket) name.
    pub interface: String,
}

/// The flags of a rootless sidecar in `dir` (state in `dir/state`): no DNS,
/// no hosts file, no metrics, any WireGuard port.
pub fn rootless_args(dir: &Path, interface: &str) -> Vec<String> {
    [
        "--mode",
        "userspace",
        "--no-dns",
        "--hosts-file",
        "",
        "--metrics",
        "off",
        "--listen-port",
        "0",
        "--interface",
        interface,
        "--state-dir",
        dir.join("state").to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

impl Sidecar {
    /// Starts `sidecar <args>` with `env` (and `ISTM_LOG=info`), its state
    /// in `dir/state`, stderr to `dir/sidecar.log`.
    pub fn spawn(dir: &Path, args: &[String], env: &[(&str, &str)]) -> Self {
        let log = dir.join("sidecar.log");
        let file = std::fs::File::create(&log).unwrap();
        let interface = args
            .iter()
            .position(|a| a == "--interface")
            .map(|i| args[i + 1].clone())
            .unwrap_or_default();
        let child = Command::new(bin())
            .args(args)
            .env("ISTM_LOG", "info")
            .env_remove("ISTM_TOKEN")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start sidecar");
        Self {
            child,
            state: dir.join("state"),
            log,
            interface,
        }
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (polling, async) for the process to exit.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// Waits until the log holds `needle`; panics with the log after `limit`.
    pub async fn wait_log(&self, needle: &str, limit: Duration) {
        let start = Instant::now();
        while !self.log_text().contains(needle) {
            assert!(
                start.elapsed() < limit,
                "no {needle:?} in the log within {limit:?}:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `sidecar status --json`, if it answers.
    pub fn status(&self) -> Option<Value> {
        let out = Command::new(bin())
            .args(["status", "--json", "--state-dir"])
            .arg(&self.state)
            .output()
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Waits until `sidecar status` answers and `ok(status)` holds; panics
    /// with the log after `limit` or when the process exits.
    pub async fn wait_status(&mut self, limit: Duration, ok: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            if let Some(s) = self.status().filter(&ok) {
                return s;
            }
            if let Ok(Some(code)) = self.child.try_wait() {
                panic!("sidecar exited ({code}); log:\n{}", self.log_text());
            }
            assert!(
                start.elapsed() < limit,
                "status not as expected within {limit:?}: {:?}\nlog:\n{}",
                self.status(),
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM, then SIGKILL after 5 s.
    pub fn stop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let start = Instant::now();
        while matches!(self.child.try_wait(), Ok(None)) && start.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !self.interface.is_empty() {
            let sock = format!("/var/run/wireguard/{}.sock", self.interface);
            let _ = std::fs::remove_file(sock);
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.stop();
    }
}
