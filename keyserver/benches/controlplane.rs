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

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
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
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(dir: &Path) -> anyhow::Result<Self> {
        let child = Command::new(env!("CARGO_BIN_EXE_keyserver"))
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
            .spawn()?;
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
        })
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
        let path = format!("/v1/networks/{name}/tokens");
        let t = self
            .admin
            .call(
                Method::POST,
                &path,
                Some(&json!({"uses": 10_000, "expires": "1h"})),
            )
            .await?;
        Ok(t["token"].as_str().context("token")?.parse()?)
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
        let (ep, token, cfg, slots, tx) = (
            eps[(first_id + i) / 25 % eps.len()].clone(),
            token.clone(),
            cfg.clone(),
            slots.clone(),
            reports.clone(),
        );
        joins.push(tokio::spawn(async move {
            let start = Instant::now();
            let _permit = slots.acquire_owned().await?;
            let meta = MemberMeta {
                public_key: PrivateKey::generate().public_key(),
                service: format!("svc{}", i % 10),
                app_id: None,
                process_type: Default::default(),
                instance: None,
                runner: "bench".into(),
                ports: vec![],
                endpoints: vec!["192.0.2.1:51820".parse()?],
            };
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
        },
        all,
    ))
}

fn print(name: &str, f: &Figures) {
    println!(
        "{name:<22} joins {:>5}  join rate {:>5.0}/s (keyserver CPU/join {:>6.1?})  change->all median {:>8.1?} worst {:>8.1?}  keyserver CPU/change {:>6.1?}  keyserver RSS {:>6} KiB",
        f.joins, f.join_rate, f.cpu_per_join, f.fan_median, f.fan_worst, f.cpu_per_change, f.rss_kib
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

    let (small, m) = scenario(&server, &eps, 1, 100, "small", &mut next_id).await?;
    keep.extend(m);
    let rss_before_large = server.rss_kib();
    let (big, m) = scenario(&server, &eps, 1, large, "large", &mut next_id).await?;
    keep.extend(m);
    let rss_after_large = server.rss_kib();
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
    for ep in eps {
        ep.close(0u32.into(), b"done");
    }
    Ok(())
}
