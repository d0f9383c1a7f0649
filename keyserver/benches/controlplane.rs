//! Control-plane benchmark: simulated members joining a real keyserver
//! process over QUIC on loopback, and changes fanning out to them.
//!
//! `cargo bench -p keyserver --bench controlplane` (set `CP_BENCH_LARGE` to
//! change the large network size, default 1000).
//!
//! Reports, for one network of 100 members, one of 1000, and 10 networks of
//! 100: the join rate, the time for one change (a revocation) to reach every
//! member, the keyserver's CPU time per change, and its resident memory. Each
//! figure at 1000 members is also given as a ratio against the same figure at
//! 100 members measured in the same run (the anchor): linear work per change
//! gives ~10x, quadratic (every change rebuilding every map) ~100x.
//!
//! Then, when `etcd` is installed: the same 100-member network on a 3-node
//! etcd cluster (loopback) with one keyserver replica and with three
//! (members spread over them), as ratios against the redb anchor; 10,000
//! members in 100 networks on one keyserver (RSS per connected member, CPU
//! per join); and the registry's own CPU per join into a network of 1000
//! members (the pure core, no I/O).
//!
//! `CP_BENCH_ONLY=joins` stops after the etcd scenarios (no 10,000-member
//! run, no restarts); `CP_BENCH_ONLY=size` runs the 100- and the 1000-member
//! networks only (join rate against network size), then the same two with
//! thin members (see [`ThinMember`]) on a keyserver of their own: the
//! keyserver's own cost of a network's size, without the members' maps
//! decoded and kept in this process on the same cores
//! (`CP_BENCH_DEBUG=1` names thin members that took over 300 ms to join
//! or needed another attempt).
//!
//! `CP_BENCH_ONLY=100k` runs only the large run (issue 20): 100 networks
//! of 1000 members (`CP_BENCH_NETS`, `CP_BENCH_PER`) joined through three
//! keyserver replicas on a 3-node etcd, members spread over the replicas.
//! Its members are thin (see [`ThinMember`]): 100,000 maps of 1000 peers
//! would not fit in this machine's memory beside the keyservers.
//! `CP_BENCH_KEEPALIVE_S=10` makes its members keep their connections alive
//! every 10 s instead of a member's default 3 (their idle timeout and the
//! replicas' `idle-timeout-secs` become three keep-alives, at least the
//! defaults): at 70,000 members the keep-alives and their ACKs were most of
//! the machine's packets. A run with it says so.
//!
//! `CP_BENCH_WRAP=heaptrack` (any command) starts the keyserver under it,
//! e.g. for a heap profile of the 10,000-member run.
//! `CP_BENCH_CONFIG='push-hold-ms = 250'` (a keyserver configuration
//! file's text) starts the single keyservers on the embedded store with
//! it, to compare settings.
//!
//! Then stateless restarts (issue 18; `CP_BENCH_ONLY=restarts` alone): one
//! network of 1000 members, and 10,000 restarts of 10 ephemeral instances
//! (each a graceful stop, then a new key joining as the same service, which
//! takes the slot over): the restart rate, the addresses held at the end,
//! and the change->all latency of a slot takeover against a plain join
//! (the anchor, same run).

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use hyper::Method;
use keyserver::admin::AdminClient;
use meshlib::control::{self, ClientConfig, MemberMeta};
use meshlib::keys::PrivateKey;
use meshlib::proto::JoinToken;
use serde_json::json;
use tokio::sync::{mpsc, Semaphore};

/// The keyserver under test, as a separate process (so its memory and CPU
/// are its own); killed on drop.
struct Server {
    child: Child,
    admin: AdminClient,
    /// `host:port` of the admin API.
    api: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// A keyserver on its embedded store, with `CP_BENCH_CONFIG`'s
    /// configuration if set.
    fn start(dir: &Path) -> anyhow::Result<Self> {
        let text = std::env::var("CP_BENCH_CONFIG").ok();
        Self::start_with(dir, None, text.as_deref())
    }

    /// A keyserver on `store` (`None`: its embedded store). Replicas on
    /// etcd need a known QUIC port (it goes into the others' tokens).
    fn start_on(dir: &Path, store: Option<&str>) -> anyhow::Result<Self> {
        Self::start_with(dir, store, None)
    }

    /// [`Server::start_on`] with a configuration file's text.
    fn start_with(dir: &Path, store: Option<&str>, config: Option<&str>) -> anyhow::Result<Self> {
        let quic = match store {
            None => "127.0.0.1:0".to_owned(),
            Some(_) => format!("127.0.0.1:{}", free_port()?),
        };
        let mut cmd = match std::env::var("CP_BENCH_WRAP") {
            Ok(w) => {
                let mut c = Command::new(w);
                c.arg(env!("CARGO_BIN_EXE_keyserver"));
                c
            }
            Err(_) => Command::new(env!("CARGO_BIN_EXE_keyserver")),
        };
        cmd.args([
            "serve",
            "--quic-listen",
            &quic,
            "--api-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir)
        .env("KEYSERVER_LOG", "warn")
        .stdout(Stdio::null());
        if let Some(url) = store {
            cmd.args(["--store", url]);
        }
        if let Some(text) = config {
            let path = dir.join("keyserver.toml");
            std::fs::write(&path, text)?;
            cmd.arg("--config").arg(path);
        }
        let child = cmd.spawn()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !dir.join("api.url").exists() {
            if Instant::now() > deadline {
                bail!("keyserver did not start");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let url = std::fs::read_to_string(dir.join("api.url"))?;
        let token = std::fs::read_to_string(dir.join("admin-token"))?;
        Ok(Self {
            child,
            admin: AdminClient::new(url.trim(), &token),
            api: url.trim().trim_start_matches("http://").to_owned(),
        })
    }

    /// Pushes sent and generations they carried, so far.
    async fn push_counters(&self) -> (f64, f64) {
        (
            self.metric("istmesh_keyserver_pushes_total").await,
            self.metric("istmesh_keyserver_pushed_generations_total")
                .await,
        )
    }

    /// One value of `/metrics` (0 if absent).
    async fn metric(&self, name: &str) -> f64 {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let Ok(mut s) = tokio::net::TcpStream::connect(&self.api).await else {
            return 0.0;
        };
        let req = "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        let mut text = String::new();
        if s.write_all(req.as_bytes()).await.is_err() || s.read_to_string(&mut text).await.is_err()
        {
            return 0.0;
        }
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    /// Resident memory in KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// CPU time of the keyserver: the sum over its threads of
    /// `/proc/<pid>/task/<tid>/schedstat` (nanoseconds on CPU).
    fn cpu(&self) -> Duration {
        let dir = format!("/proc/{}/task", self.child.id());
        let mut ns = 0u64;
        for task in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
            ns += stat
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
        Duration::from_nanos(ns)
    }

    async fn network(&self, name: &str) -> anyhow::Result<JoinToken> {
        self.admin
            .call(Method::POST, "/v1/networks", Some(&json!({"name": name})))
            .await?;
        self.token(name, 1).await
    }

    /// A join token of network `name` once it carries `replicas` addresses
    /// (valid 24 h: the large run takes over an hour, and 1 h tokens ended
    /// one at its 95,795th join).
    async fn token(&self, name: &str, replicas: usize) -> anyhow::Result<JoinToken> {
        let path = format!("/v1/networks/{name}/tokens");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let t = self
                .admin
                .call(
                    Method::POST,
                    &path,
                    Some(&json!({"uses": 10_000, "expires": "24h"})),
                )
                .await?;
            let t: JoinToken = t["token"].as_str().context("token")?.parse()?;
            if t.addrs.len() >= replicas {
                return Ok(t);
            }
            if Instant::now() > deadline {
                bail!("the replicas did not find each other");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A free loopback port (bound, then released).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A 3-node etcd cluster on loopback for the replica scenarios; killed on
/// drop (its directory goes with the temporary directory).
struct Etcd {
    children: Vec<Child>,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Etcd {
    /// `None` when the `etcd` binary is missing.
    fn start() -> anyhow::Result<Option<Self>> {
        if Command::new("etcd").arg("--version").output().is_err() {
            return Ok(None);
        }
        let dir = tempfile::tempdir()?;
        let ports: Vec<u16> = (0..6).map(|_| free_port()).collect::<Result<_, _>>()?;
        let initial = (0..3)
            .map(|i| format!("n{i}=http://127.0.0.1:{}", ports[2 * i + 1]))
            .collect::<Vec<_>>()
            .join(",");
        let mut children = Vec::new();
        for i in 0..3 {
            let (client, peer) = (ports[2 * i], ports[2 * i + 1]);
            children.push(
                Command::new("etcd")
                    .args(["--name", &format!("n{i}")])
                    .arg("--data-dir")
                    .arg(dir.path().join(format!("n{i}")))
                    .args([
                        "--listen-client-urls",
                        &format!("http://127.0.0.1:{client}"),
                    ])
                    .args([
                        "--advertise-client-urls",
                        &format!("http://127.0.0.1:{client}"),
                    ])
                    .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
                    .args([
                        "--initial-advertise-peer-urls",
                        &format!("http://127.0.0.1:{peer}"),
                    ])
                    .args([
                        "--initial-cluster",
                        &initial,
                        "--initial-cluster-state",
                        "new",
                    ])
                    .args(["--log-level", "error"])
                    // As keyserver/README asks of an operator: bounded
                    // history (the large run writes ~100,000 members).
                    .args([
                        "--auto-compaction-mode",
                        "revision",
                        "--auto-compaction-retention",
                        "20000",
                        "--quota-backend-bytes",
                        "8589934592",
                    ])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()?,
            );
        }
        let eps: Vec<String> = (0..3)
            .map(|i| format!("127.0.0.1:{}", ports[2 * i]))
            .collect();
        let url = format!("etcd://{}", eps.join(","));
        // Up when a quorum read answers.
        let conn =
            keyserver::store::etcd::conn::Conn::new(&eps).map_err(|e| anyhow::anyhow!("{e}"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while conn
            .range(etcdv3client::pb::RangeRequest {
                key: b"/probe".to_vec(),
                ..Default::default()
            })
            .is_err()
        {
            if Instant::now() > deadline {
                bail!("etcd did not start");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Some(Self {
            children,
            url,
            _dir: dir,
        }))
    }
}

/// A simulated member: its session runs in a task reporting each generation
/// it reaches.
struct Member {
    instance: String,
    task: tokio::task::JoinHandle<()>,
}

/// (member id, generation reached, when).
type Report = (usize, u64, Instant);

/// A bench member's join: a fresh key, `service`, one underlay endpoint.
fn bench_meta(service: String, ephemeral: bool) -> MemberMeta {
    MemberMeta {
        public_key: PrivateKey::generate().public_key(),
        service,
        app_id: None,
        process_type: Default::default(),
        instance: None,
        runner: "bench".into(),
        ports: vec![],
        endpoints: vec![std::net::SocketAddr::from(([192, 0, 2, 1], 51820))],
        replace: false,
        ephemeral,
    }
}

/// Joins `n` members to `token`'s network, 64 at a time. Returns the members
/// and the elapsed time.
async fn join_many(
    eps: &[quinn::Endpoint],
    token: &JoinToken,
    n: usize,
    first_id: usize,
    reports: &mpsc::UnboundedSender<Report>,
) -> anyhow::Result<(Vec<Member>, Duration)> {
    let slots = Arc::new(Semaphore::new(64));
    let cfg = ClientConfig {
        connect_timeout: Duration::from_secs(60),
        ..ClientConfig::default()
    };
    let start = Instant::now();
    let mut joins = Vec::new();
    for i in 0..n {
        let (ep, mut token, cfg, slots, tx) = (
            eps[(first_id + i) / 25 % eps.len()].clone(),
            token.clone(),
            cfg.clone(),
            slots.clone(),
            reports.clone(),
        );
        // Spread over the replicas (a no-op with one address).
        let spread = i % token.addrs.len().max(1);
        token.addrs.rotate_left(spread);
        joins.push(tokio::spawn(async move {
            let start = Instant::now();
            let _permit = slots.acquire_owned().await?;
            let meta = bench_meta(format!("svc{}", i % 10), false);
            let mut s = control::join(&ep, &token, meta, &cfg)
                .await
                .map_err(|e| anyhow::anyhow!("member {i} after {:?}: {e:?}", start.elapsed()))?;
            let instance = s.welcome().instance.to_string();
            let id = first_id + i;
            let task = tokio::spawn(async move {
                while s.next_event().await.is_ok() {
                    let _ = tx.send((id, s.map().generation, Instant::now()));
                }
            });
            anyhow::Ok(Member { instance, task })
        }));
    }
    let mut members = Vec::new();
    for j in joins {
        members.push(j.await??);
    }
    Ok((members, start.elapsed()))
}

/// Removes members one at a time and measures, for each removal, the time
/// until every other member reached the new generation. Returns the median
/// and worst fan-out time and the keyserver CPU per change.
async fn fan_out(
    server: &Server,
    net: &str,
    members: &mut Vec<Member>,
    first_id: usize,
    changes: usize,
    reports: &mut mpsc::UnboundedReceiver<Report>,
) -> anyhow::Result<(Duration, Duration, Duration)> {
    // Let join deltas settle, then forget old reports.
    tokio::time::sleep(Duration::from_millis(500)).await;
    while reports.try_recv().is_ok() {}
    let info = server
        .admin
        .call(Method::GET, &format!("/v1/networks/{net}"), None)
        .await?;
    let mut generation = info["generation"].as_u64().context("generation")?;
    let mut times = Vec::new();
    let cpu0 = server.cpu();
    for _ in 0..changes {
        let victim = members.pop().context("no member left")?;
        let victim_id = first_id + members.len();
        let start = Instant::now();
        let path = format!("/v1/networks/{net}/members/{}", victim.instance);
        server.admin.call(Method::DELETE, &path, None).await?;
        generation += 1;
        let mut reached: HashMap<usize, Instant> = HashMap::new();
        let deadline = start + Duration::from_secs(30);
        while reached.len() < members.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(Some((id, g, at))) = tokio::time::timeout(left, reports.recv()).await else {
                bail!(
                    "change reached {} of {} members in 30 s",
                    reached.len(),
                    members.len()
                );
            };
            if g >= generation
                && id != victim_id
                && (first_id..first_id + members.len()).contains(&id)
            {
                reached.entry(id).or_insert(at);
            }
        }
        let last = reached.values().max().copied().unwrap_or(start);
        times.push(last - start);
        victim.task.abort();
    }
    let cpu = (server.cpu() - cpu0) / changes as u32;
    times.sort();
    Ok((
        times[times.len() / 2],
        *times.last().unwrap_or(&Duration::ZERO),
        cpu,
    ))
}

/// One scenario's figures.
struct Figures {
    joins: usize,
    join_rate: f64,
    cpu_per_join: Duration,
    fan_median: Duration,
    fan_worst: Duration,
    cpu_per_change: Duration,
    rss_kib: u64,
    /// Generations per push while joining (changes merged into one push).
    merged: f64,
}

async fn scenario(
    server: &Server,
    eps: &[quinn::Endpoint],
    networks: usize,
    per_network: usize,
    tag: &str,
    next_id: &mut usize,
) -> anyhow::Result<(Figures, Vec<Member>)> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut all = Vec::new();
    let mut join_time = Duration::ZERO;
    let cpu0 = server.cpu();
    let (pushes0, gens0) = server.push_counters().await;
    let mut first = (String::new(), Vec::new(), 0);
    for n in 0..networks {
        let name = format!("{tag}-{n}");
        let token = server.network(&name).await?;
        let id0 = *next_id;
        let (members, t) = join_many(eps, &token, per_network, id0, &tx).await?;
        eprintln!("{name}: {per_network} joined in {t:?}");
        *next_id += per_network;
        join_time += t;
        if n == 0 {
            first = (name, members, id0);
        } else {
            all.extend(members);
        }
    }
    let cpu_per_join = (server.cpu() - cpu0) / (networks * per_network) as u32;
    let (pushes, gens) = server.push_counters().await;
    let (pushes, gens) = (pushes - pushes0, gens - gens0);
    let rss_kib = server.rss_kib();
    let (name, mut members, id0) = first;
    let changes = 10;
    let (fan_median, fan_worst, cpu_per_change) =
        fan_out(server, &name, &mut members, id0, changes, &mut rx).await?;
    all.extend(members);
    let joins = networks * per_network;
    Ok((
        Figures {
            joins,
            join_rate: joins as f64 / join_time.as_secs_f64(),
            cpu_per_join,
            fan_median,
            fan_worst,
            cpu_per_change,
            rss_kib,
            merged: gens / pushes.max(1.0),
        },
        all,
    ))
}

/// One network of `n` members on `replicas` keyserver replicas sharing
/// `etcd` (prefix `prefix`): join rate and change fan-out, members spread
/// over the replicas.
async fn etcd_scenario(
    etcd: &Etcd,
    eps: &[quinn::Endpoint],
    replicas: usize,
    n: usize,
    prefix: &str,
    next_id: &mut usize,
) -> anyhow::Result<Figures> {
    let url = format!("{}/{prefix}", etcd.url);
    let dirs: Vec<tempfile::TempDir> = (0..replicas)
        .map(|_| tempfile::tempdir())
        .collect::<Result<_, _>>()?;
    let mut servers = Vec::new();
    for d in &dirs {
        servers.push(Server::start_on(d.path(), Some(&url))?);
    }
    let first = &servers[0];
    first
        .admin
        .call(Method::POST, "/v1/networks", Some(&json!({"name": prefix})))
        .await?;
    let token = first.token(prefix, replicas).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let cpu0 = first.cpu();
    let (pushes0, gens0) = first.push_counters().await;
    let id0 = *next_id;
    let (mut members, t) = join_many(eps, &token, n, id0, &tx).await?;
    *next_id += n;
    let cpu_per_join = (first.cpu() - cpu0) / n as u32;
    let (pushes, gens) = first.push_counters().await;
    let (pushes, gens) = (pushes - pushes0, gens - gens0);
    let rss_kib = first.rss_kib();
    let (fan_median, fan_worst, cpu_per_change) =
        fan_out(first, prefix, &mut members, id0, 10, &mut rx).await?;
    for m in members {
        m.task.abort();
    }
    Ok(Figures {
        joins: n,
        join_rate: n as f64 / t.as_secs_f64(),
        cpu_per_join,
        fan_median,
        fan_worst,
        cpu_per_change,
        rss_kib,
        merged: gens / pushes.max(1.0),
    })
}

/// The registry's own CPU per join into a network of `size` members (the
/// pure core: validation, allocation, catalog, snapshot for the joiner),
/// and of that the snapshot alone.
fn registry_join_cpu(size: usize) -> (Duration, Duration) {
    use keyserver::registry::{Records, Registry};
    let now = std::time::SystemTime::now();
    // No quarantine: the benchmark joins and removes in a loop.
    let (mut reg, _) = Registry::load(Records::default(), 1024, Duration::ZERO, now);
    let (net, _) = reg
        .create_network("bench", meshlib::ipam::DEFAULT_RANGE, now)
        .expect("network");
    reg.create_token(
        net.id,
        &[1; 32],
        100_000,
        Duration::from_secs(3600),
        None,
        None,
        now,
    )
    .expect("token");
    let req = |i: usize| meshlib::proto::JoinRequest {
        network: net.id,
        token_secret: [1; 32],
        public_key: PrivateKey::generate().public_key(),
        service: format!("svc{}", i % 10),
        app_id: None,
        process_type: Default::default(),
        instance: None,
        runner: "bench".into(),
        ports: vec![],
        endpoints: vec!["192.0.2.1:51820".parse().expect("literal")],
        service_groups: vec![],
        publish: vec![],
        replace: false,
        ephemeral: false,
    };
    let observed = "127.0.0.1:1".parse().expect("literal");
    for i in 0..size {
        reg.join(&req(i), observed, &[2; 32], false, now)
            .expect("join");
    }
    // Join one more and take it back out, many times: the network stays at
    // `size` members.
    let rounds = 200;
    let reqs: Vec<_> = (0..rounds).map(req).collect();
    let start = Instant::now();
    for r in &reqs {
        let j = reg.join(r, observed, &[2; 32], false, now).expect("join");
        std::hint::black_box(&j);
        reg.remove_member(net.id, &j.member.public_key.to_string(), now)
            .expect("remove");
    }
    let per_join = start.elapsed() / rounds as u32;
    let start = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(reg.snapshot(net.id));
    }
    (per_join, start.elapsed() / rounds as u32)
}

fn print(name: &str, f: &Figures) {
    println!(
        "{name:<22} joins {:>5}  join rate {:>5.0}/s (keyserver CPU/join {:>6.1?}, {:.1} generations per push)  change->all median {:>8.1?} worst {:>8.1?}  keyserver CPU/change {:>6.1?}  keyserver RSS {:>6} KiB",
        f.joins, f.join_rate, f.cpu_per_join, f.merged, f.fan_median, f.fan_worst, f.cpu_per_change, f.rss_kib
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `cargo test --benches` runs this with no `--bench` flag: keep it quick then.
    let quick = !std::env::args().any(|a| a == "--bench");
    let large: usize = std::env::var("CP_BENCH_LARGE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 200 } else { 1000 });
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path())?;
    let idle_rss = server.rss_kib();
    // One client socket per 25 members: sidecars each have their own socket;
    // a single socket for a thousand sessions would measure its own losses.
    let eps: Vec<quinn::Endpoint> = (0..(100 + large + 1000) / 25 + 1)
        .map(|_| control::client_endpoint("127.0.0.1:0".parse().expect("literal")))
        .collect::<Result<_, _>>()?;
    let mut next_id = 0;
    let mut keep = Vec::new();

    // `CP_BENCH_ONLY=scale`: only the 10,000-member scenario;
    // `CP_BENCH_ONLY=restarts`: only the stateless restarts.
    match std::env::var("CP_BENCH_ONLY").as_deref() {
        Ok("scale") => {
            drop(server);
            return scale_scenario(quick, &mut next_id).await;
        }
        Ok("restarts") => {
            drop(server);
            return restarts_scenario(quick, &mut next_id).await;
        }
        Ok("100k") => {
            drop(server);
            let var = |name: &str, default: usize| {
                std::env::var(name)
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(default)
            };
            return hundred_k_scenario(var("CP_BENCH_NETS", 100), var("CP_BENCH_PER", 1000)).await;
        }
        _ => {}
    }
    let (small, m) = scenario(&server, &eps, 1, 100, "small", &mut next_id).await?;
    keep.extend(m);
    let rss_before_large = server.rss_kib();
    let (big, m) = scenario(&server, &eps, 1, large, "large", &mut next_id).await?;
    keep.extend(m);
    let rss_after_large = server.rss_kib();
    if std::env::var("CP_BENCH_ONLY").as_deref() == Ok("size") {
        // `CP_BENCH_ONLY=size`: the 100- and the large network only.
        print("1 network x 100", &small);
        print(&format!("1 network x {large}"), &big);
        println!(
            "  join rate {large} vs 100 members: {:.2}x",
            big.join_rate / small.join_rate
        );
        for m in keep {
            m.task.abort();
        }
        drop(server);
        return thin_size(&eps, large).await;
    }
    let (multi, m) = scenario(&server, &eps, 10, 100, "multi", &mut next_id).await?;
    keep.extend(m);
    let rss_end = server.rss_kib();

    println!("control-plane benchmark (keyserver process on loopback, members = QUIC sessions in this process)");
    println!("keyserver idle RSS {idle_rss} KiB");
    print("1 network x 100", &small);
    print(&format!("1 network x {large}"), &big);
    print("10 networks x 100", &multi);
    let per_member = (rss_after_large.saturating_sub(rss_before_large)) as f64 / large as f64;
    println!("keyserver memory per connected member: {per_member:.1} KiB ({} members connected at the end, RSS {rss_end} KiB)", keep.len());
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-6);
    let scale = large as f64 / 100.0;
    println!("ratios {large} vs 100 members (anchor = the 100-member network of this run; linear = {scale:.0}x, quadratic = {:.0}x):", scale * scale);
    println!(
        "  change->all median: {:.1}x",
        ratio(big.fan_median, small.fan_median)
    );
    println!(
        "  keyserver CPU per change: {:.1}x",
        ratio(big.cpu_per_change, small.cpu_per_change)
    );
    println!("  join rate: {:.2}x", big.join_rate / small.join_rate);
    for m in keep {
        m.task.abort();
    }
    drop(server);

    // The registry alone: CPU per join (and removal) into 1000 members.
    let (reg_join, snap) = registry_join_cpu(1000);
    let (reg_small, snap_small) = registry_join_cpu(100);
    println!(
        "registry (pure core) CPU per join+removal: into 1000 members {reg_join:.1?} (of which the joiner's snapshot {snap:.1?}), into 100 {reg_small:.1?} ({snap_small:.1?}); {:.1}x",
        ratio(reg_join, reg_small)
    );

    // Replicas on etcd, against the redb anchor (1 network x 100).
    match Etcd::start()? {
        None => println!("etcd scenarios SKIPPED: etcd is not installed"),
        Some(etcd) => {
            let one = etcd_scenario(&etcd, &eps, 1, 100, "bench1", &mut next_id).await?;
            let three = etcd_scenario(&etcd, &eps, 3, 100, "bench3", &mut next_id).await?;
            print("etcd, 1 replica x 100", &one);
            print("etcd, 3 replicas x 100", &three);
            println!("ratios against redb 1 network x 100 (anchor, this run):");
            for (name, f) in [("etcd 1 replica", &one), ("etcd 3 replicas", &three)] {
                println!(
                    "  {name}: join rate {:.2}x, change->all median {:.2}x",
                    f.join_rate / small.join_rate,
                    ratio(f.fan_median, small.fan_median)
                );
            }
        }
    }

    for ep in eps {
        ep.close(0u32.into(), b"done");
    }
    if std::env::var("CP_BENCH_ONLY").as_deref() == Ok("joins") {
        return Ok(());
    }
    scale_scenario(quick, &mut next_id).await?;
    restarts_scenario(quick, &mut next_id).await
}

/// Waits until every observer in `ids` reported `generation` or later;
/// the time from `start` to the last one.
async fn reach_all(
    reports: &mut mpsc::UnboundedReceiver<Report>,
    ids: std::ops::Range<usize>,
    generation: u64,
    start: Instant,
) -> anyhow::Result<Duration> {
    let mut reached: HashMap<usize, Instant> = HashMap::new();
    let deadline = start + Duration::from_secs(30);
    while reached.len() < ids.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Some((id, g, at))) = tokio::time::timeout(left, reports.recv()).await else {
            bail!(
                "generation {generation} reached {} of {} members in 30 s",
                reached.len(),
                ids.len()
            );
        };
        if g >= generation && ids.contains(&id) {
            reached.entry(id).or_insert(at);
        }
    }
    Ok(reached.values().max().copied().unwrap_or(start) - start)
}

/// One ephemeral member of `service` joining with a fresh key (a stateless
/// start).
async fn stateless_join(
    ep: &quinn::Endpoint,
    token: &JoinToken,
    service: &str,
) -> anyhow::Result<control::Session> {
    let meta = bench_meta(service.into(), true);
    let cfg = ClientConfig {
        connect_timeout: Duration::from_secs(60),
        ..ClientConfig::default()
    };
    control::join(ep, token, meta, &cfg)
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))
}

/// Stateless restarts into one network of 1000 members (quick: 200
/// members, 500 restarts).
async fn restarts_scenario(quick: bool, next_id: &mut usize) -> anyhow::Result<()> {
    let (size, restarts, loops) = if quick {
        (200, 500, 10)
    } else {
        (1000, 10_000, 10)
    };
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path())?;
    let eps: Vec<quinn::Endpoint> = (0..size / 25 + 2)
        .map(|_| control::client_endpoint("127.0.0.1:0".parse().expect("literal")))
        .collect::<Result<_, _>>()?;
    server.network("restarts").await?;
    let token: JoinToken = server
        .admin
        .call(
            Method::POST,
            "/v1/networks/restarts/tokens",
            Some(&json!({"uses": size + restarts + 100, "expires": "1d"})),
        )
        .await?["token"]
        .as_str()
        .context("token")?
        .parse()?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let id0 = *next_id;
    let (observers, t) = join_many(&eps, &token, size, id0, &tx).await?;
    *next_id += size;
    eprintln!("restarts: {size} members joined in {t:?}");
    // The restarting instances, `loops` at a time, each on its own socket.
    let per_loop = restarts / loops;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..loops {
        let (ep, token) = (eps[k % eps.len()].clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            let service = format!("restart{k}");
            let mut s = stateless_join(&ep, &token, &service).await?;
            let ip = s.welcome().ip;
            let mut moved = 0usize;
            for _ in 0..per_loop {
                s.shutdown().await;
                s = stateless_join(&ep, &token, &service).await?;
                moved += usize::from(s.welcome().ip != ip);
            }
            anyhow::Ok((s, moved))
        }));
    }
    let mut live = Vec::new();
    let mut moved = 0;
    for t in tasks {
        let (s, m) = t.await??;
        live.push(s);
        moved += m;
    }
    let elapsed = start.elapsed();
    let cpu_note = server.cpu();
    let held = server
        .admin
        .call(Method::GET, "/v1/networks/restarts/members", None)
        .await?
        .as_array()
        .map_or(0, Vec::len);
    // Change->all: a takeover against a plain join, alternating, 10 each.
    tokio::time::sleep(Duration::from_millis(500)).await;
    while rx.try_recv().is_ok() {}
    let ids = id0..id0 + size;
    let (mut takeover, mut plain) = (Vec::new(), Vec::new());
    let mut s = live.pop().context("a restarting instance")?;
    for j in 0..10 {
        s.shutdown().await;
        let info = server
            .admin
            .call(Method::GET, "/v1/networks/restarts", None)
            .await?;
        let g = info["generation"].as_u64().context("generation")?;
        reach_all(&mut rx, ids.clone(), g, Instant::now()).await?;
        let t0 = Instant::now();
        s = stateless_join(&eps[0], &token, "restart9").await?;
        takeover.push(reach_all(&mut rx, ids.clone(), s.welcome().generation, t0).await?);
        let t0 = Instant::now();
        let p = stateless_join(&eps[1], &token, &format!("plain{j}")).await?;
        plain.push(reach_all(&mut rx, ids.clone(), p.welcome().generation, t0).await?);
        live.push(p);
    }
    takeover.sort();
    plain.sort();
    let (tk, pl) = (takeover[takeover.len() / 2], plain[plain.len() / 2]);
    println!(
        "stateless restarts: {restarts} restarts of {loops} ephemeral instances into a network of {size} members in {elapsed:.1?}: {:.0} restarts/s (each a graceful stop and a join that takes the slot over); {moved} changed address; {held} members hold addresses at the end ({size} + {loops} expected, keyserver CPU {:.1?} in all)",
        restarts as f64 / elapsed.as_secs_f64(),
        cpu_note,
    );
    println!(
        "  change->all median: slot takeover {tk:.1?}, plain join {pl:.1?} (anchor, same run): {:.2}x",
        tk.as_secs_f64() / pl.as_secs_f64().max(1e-6)
    );
    drop(s);
    drop(live);
    for m in observers {
        m.task.abort();
    }
    Ok(())
}

/// 10,000 members in 100 networks on one keyserver (quick: 1000 in 10):
/// RSS per connected member and CPU per join.
async fn scale_scenario(quick: bool, next_id: &mut usize) -> anyhow::Result<()> {
    let (nets, per) = if quick { (10, 100) } else { (100, 100) };
    let scale_dir = tempfile::tempdir()?;
    let server = Server::start(scale_dir.path())?;
    let scale_eps: Vec<quinn::Endpoint> = (0..nets * per / 25 + 1)
        .map(|_| control::client_endpoint("127.0.0.1:0".parse().expect("literal")))
        .collect::<Result<_, _>>()?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss0 = server.rss_kib();
    let (scale, m) = scenario(&server, &scale_eps, nets, per, "scale", next_id).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss1 = server.rss_kib();
    let heap_kib = server.metric("istmesh_keyserver_heap_in_use_bytes").await / 1024.0;
    print(&format!("{nets} networks x {per}"), &scale);
    println!(
        "{} members connected: keyserver RSS {rss0} -> {rss1} KiB, {:.1} KiB per connected member (heap in use {:.1} KiB per member); keyserver CPU per join {:.1?} (fan-out to the network included)",
        nets * per,
        rss1.saturating_sub(rss0) as f64 / (nets * per) as f64,
        heap_kib / (nets * per) as f64,
        scale.cpu_per_join
    );
    for m in m {
        m.task.abort();
    }
    for ep in scale_eps {
        ep.close(0u32.into(), b"done");
    }
    Ok(())
}

/// A member that speaks the control protocol without keeping a map: it
/// reads every frame the keyserver sends, decodes only the head of
/// snapshots and deltas (the generation; on two cores shared with the
/// keyservers, 100,000 members decoding every map would measure the
/// clients), and keeps the generation it reached and when.
struct ThinMember {
    instance: String,
    task: tokio::task::JoinHandle<()>,
}

/// Per thin member: the generation reached, and when (nanoseconds since
/// the run's start).
struct Reached {
    generation: Vec<AtomicU64>,
    at: Vec<AtomicU64>,
    start: Instant,
}

impl Reached {
    fn new(n: usize) -> Self {
        Self {
            generation: (0..n).map(|_| AtomicU64::new(0)).collect(),
            at: (0..n).map(|_| AtomicU64::new(0)).collect(),
            start: Instant::now(),
        }
    }

    fn set(&self, id: usize, generation: u64) {
        self.at[id].store(self.start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.generation[id].store(generation, Ordering::Release);
    }
}

/// The generation a `Snapshot` or `Delta` payload carries (postcard: the
/// variant's index, then the fields in order); `None` for other messages.
fn generation_of(payload: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct MapHead {
        _network: meshlib::ids::NetworkId,
        _name: String,
        _range: ipnet::Ipv4Net,
        generation: u64,
    }
    let (variant, rest) = postcard::take_from_bytes::<u32>(payload).ok()?;
    match variant {
        // `ServerMsg::Snapshot(NetworkMap)`
        1 => Some(
            postcard::take_from_bytes::<MapHead>(rest)
                .ok()?
                .0
                .generation,
        ),
        // `ServerMsg::Delta(MapDelta { from, to, .. })`
        2 => Some(postcard::take_from_bytes::<(u64, u64)>(rest).ok()?.0 .1),
        // `ServerMsg::Packed`: unpacked (never packed twice), not decoded.
        9 => {
            let packed = postcard::take_from_bytes::<meshlib::proto::Packed>(rest)
                .ok()?
                .0;
            generation_of(&packed.payload().ok()?)
        }
        _ => None,
    }
}

/// Attempts of a thin member to join (a loaded replica closes a handshake
/// that does not finish within its hello deadline).
const ATTEMPTS: u32 = 8;

/// Joins one thin member (the first address of `token` first); retried on
/// a refusal or a failed connection, [`ATTEMPTS`] times in all.
async fn thin_join(
    ep: &quinn::Endpoint,
    token: &JoinToken,
    config: &quinn::ClientConfig,
    id: usize,
    reached: Arc<Reached>,
) -> anyhow::Result<ThinMember> {
    use meshlib::proto::{Hello, JoinRequest, Request, ServerMsg};
    let max = ClientConfig::default().max_frame;
    let mut last = anyhow::anyhow!("no address");
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis((200 << attempt).min(5000))).await;
        }
        let addr = token.addrs[attempt as usize % token.addrs.len()];
        let opened = async {
            let conn = ep
                .connect_with(config.clone(), addr, meshlib::proto::SERVER_NAME)?
                .await?;
            let (mut send, mut recv) = conn.open_bi().await?;
            let meta = bench_meta(format!("svc{}", id % 10), false);
            let hello = Hello {
                version: meshlib::proto::VERSION,
                request: Request::Join(JoinRequest {
                    network: token.network,
                    token_secret: token.secret,
                    public_key: meta.public_key,
                    service: meta.service,
                    app_id: meta.app_id,
                    process_type: meta.process_type,
                    instance: meta.instance,
                    runner: meta.runner,
                    ports: meta.ports,
                    endpoints: meta.endpoints,
                    service_groups: vec![],
                    publish: vec![],
                    replace: meta.replace,
                    ephemeral: meta.ephemeral,
                }),
            };
            meshlib::proto::write_frame(&mut send, &hello, max).await?;
            let mut instance = None;
            loop {
                let payload = meshlib::proto::read_payload(&mut recv, max).await?;
                if let Some(generation) = generation_of(&payload) {
                    if id == 0 {
                        // The head read agrees with a full decode.
                        let full = match meshlib::proto::decode_payload::<ServerMsg>(&payload)? {
                            ServerMsg::Snapshot(m) => m.generation,
                            ServerMsg::Delta(d) => d.to,
                            _ => bail!("not a map message"),
                        };
                        anyhow::ensure!(full == generation, "head {generation} != {full}");
                    }
                    reached.set(id, generation);
                    if let Some(instance) = instance.take() {
                        return anyhow::Ok((conn, send, recv, instance));
                    }
                    continue;
                }
                match meshlib::proto::decode_payload::<ServerMsg>(&payload)? {
                    ServerMsg::Welcome(w) => instance = Some(w.instance.to_string()),
                    ServerMsg::Error(e) => bail!("refused: {e:?}"),
                    _ => {}
                }
            }
        };
        match tokio::time::timeout(Duration::from_secs(60), opened).await {
            Ok(Ok((conn, send, mut recv, instance))) => {
                let task = tokio::spawn(async move {
                    // Kept open: a finished stream ends the session.
                    let _send = send;
                    let _conn = conn;
                    while let Ok(payload) = meshlib::proto::read_payload(&mut recv, max).await {
                        if let Some(generation) = generation_of(&payload) {
                            reached.set(id, generation);
                        }
                    }
                });
                return Ok(ThinMember { instance, task });
            }
            Ok(Err(e)) => {
                if std::env::var("CP_BENCH_DEBUG").is_ok() {
                    eprintln!("thin member {id} attempt {attempt}: {e:#}");
                }
                last = e
            }
            Err(_) => last = anyhow::anyhow!("timed out"),
        }
    }
    Err(last.context(format!("member {id} to {:?}", token.addrs)))
}

/// Join rate into one network of `n` thin members (one at a time per
/// slot, 64 slots), keyserver CPU per join and generations per push: the
/// keyserver's own cost of a network's size, without `n` full maps
/// decoded and kept in this process on the same two cores.
async fn thin_joins(
    server: &Server,
    eps: &[quinn::Endpoint],
    name: &str,
    n: usize,
) -> anyhow::Result<(f64, Duration, f64)> {
    let token = server.network(name).await?;
    let config = control::quic_config(token.cert_sha256, &ClientConfig::default())?;
    let reached = Arc::new(Reached::new(n));
    let cpu0 = server.cpu();
    let (pushes0, gens0) = server.push_counters().await;
    let slots = Arc::new(Semaphore::new(64));
    let start = Instant::now();
    let mut joins = Vec::with_capacity(n);
    for i in 0..n {
        let (ep, token, config, slots, reached) = (
            eps[i / 25 % eps.len()].clone(),
            token.clone(),
            config.clone(),
            slots.clone(),
            reached.clone(),
        );
        joins.push(tokio::spawn(async move {
            let _permit = slots.acquire_owned().await?;
            let t0 = Instant::now();
            let m = thin_join(&ep, &token, &config, i, reached).await;
            if std::env::var("CP_BENCH_DEBUG").is_ok() && t0.elapsed() > Duration::from_millis(300)
            {
                eprintln!("thin member {i}: joined in {:?}", t0.elapsed());
            }
            m
        }));
    }
    let mut members = Vec::with_capacity(n);
    for j in joins {
        members.push(j.await??);
    }
    let t = start.elapsed();
    let cpu = (server.cpu() - cpu0) / n as u32;
    let (pushes, gens) = server.push_counters().await;
    let (pushes, gens) = (pushes - pushes0, gens - gens0);
    for m in members {
        m.task.abort();
    }
    Ok((n as f64 / t.as_secs_f64(), cpu, gens / pushes.max(1.0)))
}

/// [`thin_joins`] into 100 members (the anchor) and into `large`, on a
/// keyserver of their own; printed with the ratio.
async fn thin_size(eps: &[quinn::Endpoint], large: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path())?;
    let small = thin_joins(&server, eps, "thin-small", 100).await?;
    let big = thin_joins(&server, eps, "thin-large", large).await?;
    for (n, (rate, cpu, merged)) in [(100, small), (large, big)] {
        println!(
            "thin members, 1 network x {n:<5} join rate {rate:>5.0}/s (keyserver CPU/join {cpu:>6.1?}, {merged:.1} generations per push)"
        );
    }
    println!(
        "  join rate {large} vs 100 thin members (the keyserver's own cost): {:.2}x",
        big.0 / small.0
    );
    Ok(())
}

/// Sum of the resident memory (KiB) of the processes `pids`.
fn rss_of(pids: &[u32]) -> u64 {
    pids.iter()
        .map(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum()
}

/// `CP_BENCH_ONLY=100k`: `nets` networks of `per` members joined through
/// three keyserver replicas on a 3-node etcd (issue 20's large run).
async fn hundred_k_scenario(nets: usize, per: usize) -> anyhow::Result<()> {
    let Some(etcd) = Etcd::start()? else {
        bail!("the large run needs etcd (apt-get install etcd-server)");
    };
    let total = nets * per;
    let keep_alive = std::env::var("CP_BENCH_KEEPALIVE_S")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(ClientConfig::default().keep_alive, |s| {
            Duration::from_secs(s.max(1))
        });
    let client = ClientConfig {
        keep_alive,
        idle_timeout: (3 * keep_alive).max(ClientConfig::default().idle_timeout),
        ..ClientConfig::default()
    };
    // Past the defaults: a third of the members on each replica, and every
    // member from 127.0.0.1 (a default of 64 handshakes per source).
    let config = format!(
        "max-connections = {}\nmax-unauthenticated = 4096\nmax-unauthenticated-per-source = 4096\nidle-timeout-secs = {}\n",
        total / 2 + 1000,
        (3 * keep_alive.as_secs()).max(30)
    );
    println!(
        "large run: members keep alive every {keep_alive:?} (idle timeout {:?})",
        client.idle_timeout
    );
    let url = format!("{}/large", etcd.url);
    let dirs: Vec<tempfile::TempDir> = (0..3)
        .map(|_| tempfile::tempdir())
        .collect::<Result<_, _>>()?;
    let mut servers = Vec::new();
    for d in &dirs {
        servers.push(Server::start_with(d.path(), Some(&url), Some(&config))?);
    }
    let first = &servers[0];
    let mut tokens = Vec::new();
    for n in 0..nets {
        let name = format!("large-{n}");
        first
            .admin
            .call(Method::POST, "/v1/networks", Some(&json!({"name": name})))
            .await?;
        tokens.push(first.token(&name, 3).await?);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let etcd_pids: Vec<u32> = etcd.children.iter().map(|c| c.id()).collect();
    let rss0: Vec<u64> = servers.iter().map(Server::rss_kib).collect();
    let etcd_rss0 = rss_of(&etcd_pids);
    let cpu0: Vec<Duration> = servers.iter().map(Server::cpu).collect();
    // One client socket per 50 members.
    let eps: Vec<quinn::Endpoint> = (0..total / 50 + 1)
        .map(|_| control::client_endpoint("127.0.0.1:0".parse().expect("literal")))
        .collect::<Result<_, _>>()?;
    let config = control::quic_config(tokens[0].cert_sha256, &client)?;
    let reached = Arc::new(Reached::new(total));
    // Members join the networks in turn (member i into network i % nets),
    // each starting at replica i % 3, 96 joins at a time.
    let slots = Arc::new(Semaphore::new(96));
    let start = Instant::now();
    let mut joins = Vec::with_capacity(total);
    for i in 0..total {
        let mut token = tokens[i % nets].clone();
        let spread = i % token.addrs.len().max(1);
        token.addrs.rotate_left(spread);
        let (ep, config, slots, reached) = (
            eps[i / 50].clone(),
            config.clone(),
            slots.clone(),
            reached.clone(),
        );
        joins.push(tokio::spawn(async move {
            let _permit = slots.acquire_owned().await?;
            thin_join(&ep, &token, &config, i, reached).await
        }));
        if (i + 1) % 10_000 == 0 {
            eprintln!("large: {} joins started, {:?}", i + 1, start.elapsed());
        }
    }
    // A member that cannot join after its attempts is counted and left
    // out: the run still reports what it reached.
    let mut members: Vec<Option<ThinMember>> = Vec::with_capacity(total);
    let mut failed: Vec<(usize, String)> = Vec::new();
    for (i, j) in joins.into_iter().enumerate() {
        match j.await {
            Ok(Ok(m)) => members.push(Some(m)),
            Ok(Err(e)) => {
                failed.push((i, format!("{e:#}")));
                members.push(None);
            }
            Err(e) => {
                failed.push((i, format!("join task: {e}")));
                members.push(None);
            }
        }
        if (i + 1) % 10_000 == 0 {
            eprintln!(
                "large: {} joined ({} failed), {:?}",
                i + 1 - failed.len(),
                failed.len(),
                start.elapsed()
            );
        }
    }
    let join_time = start.elapsed();
    let joined = total - failed.len();
    if let Some((i, e)) = failed.first() {
        println!(
            "large run: {} of {total} members did not join after their attempts (the first, member {i}: {e})",
            failed.len()
        );
    }
    let cpu_join: Duration = servers.iter().zip(&cpu0).map(|(s, c0)| s.cpu() - *c0).sum();
    // Let the last pushes land, then read memory.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss1: Vec<u64> = servers.iter().map(Server::rss_kib).collect();
    let etcd_rss1 = rss_of(&etcd_pids);
    let connected: Vec<f64> = {
        let mut v = Vec::new();
        for s in &servers {
            v.push(s.metric("istmesh_keyserver_connected_members").await);
        }
        v
    };
    // Changes to network 0: remove one of its members at a time (through
    // replica 0); each must reach the others, spread over the replicas.
    let net0: Vec<usize> = (0..total)
        .step_by(nets)
        .filter(|&i| members[i].is_some())
        .collect();
    let info = first
        .admin
        .call(Method::GET, "/v1/networks/large-0", None)
        .await?;
    let generation0 = info["generation"].as_u64().context("generation")?;
    let mut alive: Vec<usize> = net0.clone();
    let mut times = Vec::new();
    for change in 1..=10 {
        let victim = alive.pop().context("no member left")?;
        let t0 = reached.start.elapsed().as_nanos() as u64;
        let instance = &members[victim].as_ref().context("joined")?.instance;
        let path = format!("/v1/networks/large-0/members/{instance}");
        first.admin.call(Method::DELETE, &path, None).await?;
        let generation = generation0 + change;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let behind = alive
                .iter()
                .filter(|&&m| reached.generation[m].load(Ordering::Acquire) < generation)
                .count();
            if behind == 0 {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "a change reached {} of {} members in 60 s",
                    alive.len() - behind,
                    alive.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let last = alive
            .iter()
            .map(|&m| reached.at[m].load(Ordering::Relaxed))
            .max()
            .unwrap_or(t0);
        times.push(Duration::from_nanos(last.saturating_sub(t0)));
        if let Some(m) = &members[victim] {
            m.task.abort();
        }
    }
    times.sort();
    println!(
        "{joined} of {total} members ({nets} networks x {per}) over 3 replicas on a 3-node etcd: joined in {join_time:.1?}, {:.0} joins/s; keyserver CPU per join {:.2?} (the three replicas together)",
        joined as f64 / join_time.as_secs_f64(),
        cpu_join / joined.max(1) as u32,
    );
    for (r, ((a, b), c)) in rss0.iter().zip(&rss1).zip(&connected).enumerate() {
        println!(
            "  replica {r}: {c} members connected, RSS {a} -> {b} KiB ({:.1} KiB per member connected to it; each replica also holds the registry of all {joined})",
            b.saturating_sub(*a) as f64 / c.max(1.0)
        );
    }
    let grown: u64 = rss0
        .iter()
        .zip(&rss1)
        .map(|(a, b)| b.saturating_sub(*a))
        .sum();
    println!(
        "  keyservers together: +{} MiB, {:.1} KiB per member; etcd (3 nodes) {} -> {} MiB",
        grown / 1024,
        grown as f64 / joined.max(1) as f64,
        etcd_rss0 / 1024,
        etcd_rss1 / 1024
    );
    println!(
        "  a change to the {} members of one network (spread over the replicas): median {:.1?}, worst {:.1?} (10 removals)",
        alive.len(),
        times[times.len() / 2],
        times[times.len() - 1]
    );
    for m in members.into_iter().flatten() {
        m.task.abort();
    }
    for ep in eps {
        ep.close(0u32.into(), b"done");
    }
    Ok(())
}
