//! A whole mesh in network namespaces: a keyserver host and sidecar hosts on
//! one bridged underlay (192.0.2.0/24, from [`Topo`]). Sidecars run as the
//! real `sidecar` binary under `ip netns exec`, so each sees its own
//! `/etc/hosts` and `/etc/resolv.conf` (bind-mounted from
//! `/etc/netns/<ns>/`). Everything is removed on drop, also on panic.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::dataplane_support::{must, run, Host, Topo};

/// A binary of this workspace, next to the test executable's directory
/// (`target/<profile>/`). `cargo test --workspace` builds them.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} missing: run `cargo build --workspace` (or `cargo test --workspace`) first",
        path.display()
    );
    path
}

/// The keyserver's QUIC port inside its namespace.
pub const QUIC_PORT: u16 = 7000;

/// A runner: a host on the underlay that NATs its instances.
pub struct Runner {
    /// The runner's host (its underlay address is the instances' public one).
    pub host: Host,
    /// Its number (1..=3).
    pub k: u8,
    next: u8,
}

/// One running sidecar.
pub struct Sidecar {
    /// Its host (namespace, underlay address).
    pub host: Host,
    /// Its state directory.
    pub state_dir: PathBuf,
    /// Its TUN interface (unique: UAPI sockets are shared by namespaces).
    pub interface: String,
    /// The service it joined as.
    pub service: String,
    /// Its log file.
    pub log: PathBuf,
    /// What `.warp` names and `WARP_IST_*` give (`ISTM_SERVICE_ADDRESSES`;
    /// `None`: the default).
    pub service_addresses: Option<&'static str>,
    child: Option<Child>,
}

/// A keyserver host, sidecar hosts, and their cleanup.
pub struct Mesh {
    /// The namespaces (dropped last: it kills what runs inside).
    pub topo: Topo,
    /// Instance namespaces made here (not by `topo`), removed on drop.
    extra_ns: Vec<String>,
    /// The keyserver's host.
    pub ks: Host,
    /// The keyserver's data directory.
    pub ks_dir: PathBuf,
    keyserver: Option<Child>,
    /// A TOML config file for the keyserver, if set.
    ks_config: Option<PathBuf>,
    etc_dirs: Vec<PathBuf>,
    sockets: Vec<PathBuf>,
    /// `ISTM_SERVICE_ADDRESSES` for the sidecars started from now on
    /// (`Some("members")`: names give members, for tests of members' own
    /// lifecycle); `None`: the default (service addresses).
    pub service_addresses: Option<&'static str>,
}

impl Mesh {
    /// A topology with a running keyserver on host 1 and one network `prod`.
    pub fn new() -> Self {
        Self::with_keyserver_config("")
    }

    /// As [`Mesh::new`], the keyserver reading `toml` as its config file
    /// (e.g. short lifecycle timers).
    pub fn with_keyserver_config(toml: &str) -> Self {
        let mut topo = Topo::new();
        let ks = topo.host(1);
        let ks_dir = topo.temp_path("keyserver");
        let ks_config = (!toml.is_empty()).then(|| {
            let path = topo.temp_path("keyserver.toml");
            std::fs::write(&path, toml).unwrap();
            path
        });
        let mut mesh = Mesh {
            topo,
            ks,
            ks_dir,
            keyserver: None,
            ks_config,
            extra_ns: Vec::new(),
            etc_dirs: Vec::new(),
            sockets: Vec::new(),
            service_addresses: None,
        };
        mesh.start_keyserver();
        mesh.admin(&["network", "create", "prod"]);
        mesh
    }

    /// Starts (or restarts) the keyserver and waits for its admin API.
    pub fn start_keyserver(&mut self) {
        let log = std::fs::File::create(self.topo.temp_path("keyserver.log")).unwrap();
        let quic = format!("{}:{QUIC_PORT}", self.ks.underlay);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ks.ns])
            .arg(bin("keyserver"))
            .args(["serve", "--data-dir"])
            .arg(&self.ks_dir);
        if let Some(config) = &self.ks_config {
            cmd.arg("--config").arg(config);
        }
        let child = cmd
            .args(["--quic-listen", &quic, "--api-listen", "127.0.0.1:7001"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start keyserver");
        self.keyserver = Some(child);
        let api = self.ks_dir.join("api.url");
        let start = Instant::now();
        while !(api.exists() && self.try_admin(&["network", "list"]).is_some()) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "keyserver did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the keyserver with SIGKILL.
    pub fn kill_keyserver(&mut self) {
        if let Some(mut c) = self.keyserver.take() {
            // `ip netns exec` execs the keyserver: the child is the keyserver.
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs a keyserver admin subcommand in the keyserver's namespace.
    fn run_admin(&self, args: &[&str]) -> std::io::Result<std::process::Output> {
        Command::new("ip")
            .args(["netns", "exec", &self.ks.ns])
            .arg(bin("keyserver"))
            .arg("--data-dir")
            .arg(&self.ks_dir)
            .args(args)
            .output()
    }

    fn try_admin(&self, args: &[&str]) -> Option<String> {
        let out = self.run_admin(args).ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs a keyserver admin subcommand that must fail; its stderr.
    pub fn admin_fails(&self, args: &[&str]) -> String {
        let out = self.run_admin(args).expect("run keyserver");
        assert!(!out.status.success(), "keyserver {args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Runs a keyserver admin subcommand that must succeed.
    pub fn admin(&self, args: &[&str]) -> String {
        self.try_admin(args)
            .unwrap_or_else(|| panic!("keyserver {args:?} failed"))
    }

    /// A fresh join token for `prod` (10 uses).
    pub fn token(&self) -> String {
        self.token_for("prod", 10)
    }

    /// A fresh join token for `network` with `uses` uses.
    pub fn token_for(&self, network: &str, uses: u32) -> String {
        let uses = uses.to_string();
        let out = self.admin(&["token", "create", "--network", network, "--uses", &uses]);
        out.split(|c: char| c.is_whitespace() || c == '"')
            .find(|w| w.starts_with("istm1."))
            .expect("token in output")
            .to_owned()
    }

    /// Adds runner `k` (1..=3): host `k + 1` on the underlay, with a bridge
    /// for its instances on `198.51.100.<64(k-1)>/26` (gateway `.1` of it),
    /// forwarding, and NAT: instances leave as the runner's address, and
    /// each instance's WireGuard port is forwarded to it.
    pub fn runner(&mut self, k: u8) -> Runner {
        let host = self.topo.host(k + 1);
        let base = 64 * (k - 1);
        let ns = host.ns.clone();
        must("ip", &["-n", &ns, "link", "add", "ibr", "type", "bridge"]);
        must(
            "ip",
            &[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("198.51.100.{}/26", base + 1),
                "dev",
                "ibr",
            ],
        );
        must("ip", &["-n", &ns, "link", "set", "ibr", "up"]);
        must(
            "ip",
            &[
                "netns",
                "exec",
                &ns,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ],
        );
        for rule in [
            "add table ip istnat".to_string(),
            "add chain ip istnat pre { type nat hook prerouting priority -100 ; }".to_string(),
            "add chain ip istnat post { type nat hook postrouting priority 100 ; }".to_string(),
            format!("add rule ip istnat post ip saddr 198.51.100.{base}/26 oifname != \"ibr\" masquerade"),
        ] {
            must("ip", &["netns", "exec", &ns, "nft", &rule]);
        }
        Runner { host, k, next: 2 }
    }

    /// Adds an instance namespace behind `runner`, with its own /etc files;
    /// its WireGuard port `port` is forwarded from the runner's address.
    pub fn instance(&mut self, runner: &mut Runner, port: u16) -> Host {
        let n = runner.next;
        runner.next += 1;
        let ns = format!("{}i{n}", runner.host.ns);
        must("ip", &["netns", "add", &ns]);
        self.extra_ns.push(ns.clone());
        let (v, b) = (
            format!("iv{}{}{n}", self.topo.tag, runner.k),
            format!("ib{}{}{n}", self.topo.tag, runner.k),
        );
        must(
            "ip",
            &[
                "link",
                "add",
                &v,
                "netns",
                &ns,
                "type",
                "veth",
                "peer",
                "name",
                &b,
                "netns",
                &runner.host.ns,
            ],
        );
        must(
            "ip",
            &[
                "-n",
                &runner.host.ns,
                "link",
                "set",
                &b,
                "master",
                "ibr",
                "up",
            ],
        );
        let base = 64 * (u16::from(runner.k) - 1);
        let ip = format!("198.51.100.{}", base + u16::from(n));
        must(
            "ip",
            &["-n", &ns, "addr", "add", &format!("{ip}/26"), "dev", &v],
        );
        must("ip", &["-n", &ns, "link", "set", &v, "up"]);
        must("ip", &["-n", &ns, "link", "set", "lo", "up"]);
        must(
            "ip",
            &[
                "-n",
                &ns,
                "route",
                "add",
                "default",
                "via",
                &format!("198.51.100.{}", base + 1),
            ],
        );
        let rule = format!("add rule ip istnat pre udp dport {port} dnat to {ip}:{port}");
        must("ip", &["netns", "exec", &runner.host.ns, "nft", &rule]);
        let etc = PathBuf::from("/etc/netns").join(&ns);
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(etc.join("hosts"), "127.0.0.1\tlocalhost\n").unwrap();
        std::fs::write(
            etc.join("resolv.conf"),
            "nameserver 127.0.0.77\noptions timeout:1 attempts:1\n",
        )
        .unwrap();
        self.etc_dirs.push(etc);
        Host {
            ns,
            ifname: format!("x{}{}{n}", self.topo.tag, runner.k),
            underlay: ip,
            overlay: String::new(),
            private_key: String::new(),
            public_key: String::new(),
            key_file: PathBuf::new(),
        }
    }

    /// Adds host `i` with its own `/etc/hosts` (a user line, no trailing
    /// newline) and `/etc/resolv.conf`.
    pub fn host(&mut self, i: u8) -> Host {
        let host = self.topo.host(i);
        let etc = PathBuf::from("/etc/netns").join(&host.ns);
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(
            etc.join("hosts"),
            "127.0.0.1\tlocalhost\n# user's line\n192.0.2.250 keep.me",
        )
        .unwrap();
        std::fs::write(
            etc.join("resolv.conf"),
            "nameserver 127.0.0.77\noptions timeout:1 attempts:1\n",
        )
        .unwrap();
        self.etc_dirs.push(etc);
        host
    }

    /// Starts `sidecar <args...>` on `host` as `service`; `extra` are more flags.
    pub fn sidecar(
        &mut self,
        host: &Host,
        service: &str,
        subcommand: &str,
        extra: &[&str],
    ) -> Sidecar {
        self.sidecar_in(host, service, subcommand, extra, "")
    }

    /// As [`Mesh::sidecar`], with a state directory of its own (`name`
    /// tells it apart): a new instance on the same host.
    pub fn sidecar_in(
        &mut self,
        host: &Host,
        service: &str,
        subcommand: &str,
        extra: &[&str],
        name: &str,
    ) -> Sidecar {
        let state_dir = self.topo.temp_path(&format!("state-{}{name}", host.ns));
        let interface = format!("m{}", &host.ifname[1..]);
        self.sockets.push(PathBuf::from(format!(
            "/var/run/wireguard/{interface}.sock"
        )));
        let log = self.topo.temp_path(&format!("{}.log", host.ns));
        let mut sc = Sidecar {
            host: host.clone(),
            state_dir,
            interface,
            service: service.to_owned(),
            log,
            service_addresses: self.service_addresses,
            child: None,
        };
        sc.start(subcommand, extra);
        sc
    }
}

impl Sidecar {
    /// (Re)starts the sidecar process.
    pub fn start(&mut self, subcommand: &str, extra: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new("ip");
        if let Some(mode) = self.service_addresses {
            cmd.env("ISTM_SERVICE_ADDRESSES", mode);
        }
        let child = cmd
            .args(["netns", "exec", &self.host.ns])
            .arg(bin("sidecar"))
            .arg(subcommand)
            .args([
                "--service",
                &self.service,
                "--interface",
                &self.interface,
                "--metrics",
                "off",
            ])
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(extra)
            // `ISTM_TEST_LOG=debug cargo test …` for more.
            .env(
                "ISTM_LOG",
                std::env::var("ISTM_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start sidecar");
        self.child = Some(child);
    }

    /// Stops the process (SIGTERM, then SIGKILL after 3 s).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            let start = Instant::now();
            while matches!(c.try_wait(), Ok(None)) && start.elapsed() < Duration::from_secs(3) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills the process with SIGKILL (no goodbye).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // `ip netns exec` execs the sidecar: the child is the sidecar.
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the process to exit; its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let c = self.child.as_mut()?;
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(status)) = c.try_wait() {
                self.child = None;
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// `sidecar status --json`, parsed, if the sidecar answers.
    pub fn status(&self) -> Option<serde_json::Value> {
        let out = Command::new(bin("sidecar"))
            .args(["status", "--json", "--state-dir"])
            .arg(&self.state_dir)
            .output()
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Waits until the status shows at least `peers` peers; returns the status.
    pub fn wait_peers(&self, peers: usize, limit: Duration) -> serde_json::Value {
        let start = Instant::now();
        loop {
            if let Some(s) = self.status() {
                if s["peers"].as_array().map_or(0, Vec::len) >= peers {
                    return s;
                }
            }
            assert!(
                start.elapsed() < limit,
                "{}: fewer than {peers} peers after {limit:?}; log:\n{}",
                self.host.ns,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// This member's private IP (from its status).
    pub fn ip(&self) -> String {
        self.status().expect("status")["ip"]
            .as_str()
            .expect("ip")
            .to_owned()
    }

    /// Runs a shell command inside the host's namespace (with its /etc files).
    pub fn sh(&self, script: &str) -> std::process::Output {
        run("ip", &["netns", "exec", &self.host.ns, "sh", "-c", script])
    }

    /// Runs a shell command inside the host's namespace that must succeed.
    pub fn must_sh(&self, script: &str) -> String {
        must("ip", &["netns", "exec", &self.host.ns, "sh", "-c", script])
    }

    /// Its WireGuard peers (`wg show <if> peers`).
    pub fn wg_peers(&self) -> Vec<String> {
        let out = self.sh(&format!("wg show {} peers", self.interface));
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    }

    /// What `name` resolves to on its host through the hosts file
    /// (`getent hosts`).
    pub fn getent(&self, name: &str) -> Option<String> {
        let out = self.sh(&format!("getent hosts {name}"));
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .map(str::to_owned)
    }

    /// The first address `name` resolves to through its private DNS (`dig`).
    pub fn dig(&self, name: &str) -> Option<String> {
        let out = self.sh(&format!("dig +short +time=1 +tries=2 @127.0.0.77 {name}"));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .map(str::to_owned)
    }

    /// The host's `/etc/hosts` as its processes see it.
    pub fn hosts_file(&self) -> String {
        std::fs::read_to_string(
            PathBuf::from("/etc/netns")
                .join(&self.host.ns)
                .join("hosts"),
        )
        .unwrap()
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.kill_keyserver();
        for ns in &self.extra_ns {
            let pids = run("ip", &["netns", "pids", ns]);
            for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                let _ = run("kill", &["-9", pid]);
            }
            let _ = run("ip", &["netns", "del", ns]);
        }
        for dir in &self.etc_dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
        for s in &self.sockets {
            let _ = std::fs::remove_file(s);
        }
        // `topo` drops next: it kills what is left in the namespaces and
        // deletes them.
    }
}
