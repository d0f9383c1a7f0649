//! Prometheus metrics of the keyserver, served as text at `GET /metrics` on
//! the admin listener (no token: a scraper should not hold the admin
//! token, which can revoke members; the page holds counts, network ids and
//! build facts, no names, keys or addresses).
//!
//! Counters and histograms are atomics updated where things happen (joins
//! and refusals in the session driver, pushes when written, store commits
//! in [`crate::server::Shared::mutate`]); gauges (members by network and
//! state, connected members) are read from the registry at scrape time.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

/// Upper bounds (seconds) of the latency histograms.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Heap bytes in use, from glibc's allocator (`None` elsewhere).
fn heap_in_use() -> Option<u64> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's statistics.
        let info = unsafe { libc::mallinfo2() };
        Some((info.uordblks + info.hblkhd) as u64)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}

/// A latency histogram (fixed buckets, seconds).
#[derive(Debug)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (i, le) in BUCKETS.iter().enumerate() {
            if secs <= *le {
                self.counts[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, le) in BUCKETS.iter().enumerate() {
            let n = self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {n}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"+Inf\"}} {count}\n{name}_sum {sum}\n{name}_count {count}"
        );
    }
}

/// The keyserver's counters and histograms.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Joins that got a welcome (retried joins included).
    pub joins: AtomicU64,
    /// Pushes sent to networks' members (each to every member of one
    /// network; see [`crate::server::Shared::flush_pushes`]).
    pub pushes: AtomicU64,
    /// Generations those pushes carried (more than `pushes` when changes
    /// were merged).
    pub pushed_generations: AtomicU64,
    /// Sessions refused or ended with an error, by wire error code.
    refusals: Mutex<BTreeMap<String, u64>>,
    /// From a change's commit (or its arrival from another replica) to its
    /// frame written on a member's stream.
    pub push_latency: Histogram,
    /// Store commit time (successful or not).
    pub store_latency: Histogram,
    /// Store commits that failed, by kind.
    store_errors: Mutex<BTreeMap<&'static str, u64>>,
    /// Batches of records applied from other replicas.
    pub remote_batches: AtomicU64,
    /// Store commits that succeeded.
    commits: AtomicU64,
    /// Operations those commits held (more than one per commit when
    /// grouped).
    committed_operations: AtomicU64,
    /// When the process started (Unix seconds).
    pub started: AtomicU64,
    /// Wake requests from members, by result (`started`, `already_waking`,
    /// `refused`, `failed`).
    wake_requests: Mutex<BTreeMap<&'static str, u64>>,
    /// Service-address hooks started and failed ([`crate::hooks`]).
    pub hooks: std::sync::Arc<crate::hooks::HookStats>,
}

/// Most series of one per-service metric (idle services): the rest are
/// left out, so a network with very many services cannot grow the page
/// without bound.
pub const MAX_SERVICE_SERIES: usize = 1000;

/// The traffic reports' counts, read at scrape time.
#[derive(Debug, Clone, Default)]
pub struct TrafficStats {
    /// Reports taken.
    pub taken: u64,
    /// Reports (and unknown pairs) dropped, by reason.
    pub dropped: BTreeMap<&'static str, u64>,
    /// Members whose reports are held, and their pairs.
    pub held: (usize, usize),
}

/// A Prometheus label value: backslash, quote and newline escaped.
fn label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

impl Metrics {
    /// Counts a refusal (or an error ending a session) by its code.
    pub fn refused(&self, code: meshlib::proto::ErrorCode) {
        let reason = format!("{code:?}").to_lowercase();
        *self.refusals.lock().entry(reason).or_insert(0) += 1;
    }

    /// Counts a wake request by its result.
    pub fn wake_request(&self, result: &'static str) {
        *self.wake_requests.lock().entry(result).or_insert(0) += 1;
    }

    /// The scale-to-zero and traffic part of the page: wake requests,
    /// hooks, idle services (one series per watched service, at most
    /// [`MAX_SERVICE_SERIES`]; `idle` gives network id, service name and
    /// whether it is idle) and traffic reports.
    pub fn render_services(
        &self,
        idle: &[(String, String, bool)],
        traffic: &TrafficStats,
    ) -> String {
        use crate::registry::HookKind;
        let mut out = String::new();
        let _ = writeln!(out, "# HELP istmesh_keyserver_wake_requests_total Wake requests from members, by result.\n# TYPE istmesh_keyserver_wake_requests_total counter");
        for result in ["started", "already_waking", "refused", "failed"] {
            let n = self.wake_requests.lock().get(result).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "istmesh_keyserver_wake_requests_total{{result=\"{result}\"}} {n}"
            );
        }
        let _ = writeln!(out, "# HELP istmesh_keyserver_service_hooks_total Service-address hooks started, by hook.\n# TYPE istmesh_keyserver_service_hooks_total counter");
        for kind in [HookKind::Wake, HookKind::Idle] {
            let n = self.hooks.started_count(kind);
            let _ = writeln!(
                out,
                "istmesh_keyserver_service_hooks_total{{hook=\"{}\"}} {n}",
                kind.as_str()
            );
        }
        let _ = writeln!(out, "# HELP istmesh_keyserver_service_hook_failures_total Service-address hooks that failed or timed out, by hook.\n# TYPE istmesh_keyserver_service_hook_failures_total counter");
        for kind in [HookKind::Wake, HookKind::Idle] {
            let n = self.hooks.failed_count(kind);
            let _ = writeln!(
                out,
                "istmesh_keyserver_service_hook_failures_total{{hook=\"{}\"}} {n}",
                kind.as_str()
            );
        }
        let _ = writeln!(out, "# HELP istmesh_keyserver_service_idle Whether a service with idle-after set has had no flow for it (1) or not (0).\n# TYPE istmesh_keyserver_service_idle gauge");
        for (net, service, is_idle) in idle.iter().take(MAX_SERVICE_SERIES) {
            let _ = writeln!(
                out,
                "istmesh_keyserver_service_idle{{network=\"{net}\",service=\"{}\"}} {}",
                label(service),
                u8::from(*is_idle)
            );
        }
        let _ = writeln!(out, "# HELP istmesh_keyserver_traffic_reports_total Traffic reports from members taken.\n# TYPE istmesh_keyserver_traffic_reports_total counter\nistmesh_keyserver_traffic_reports_total {}", traffic.taken);
        let _ = writeln!(out, "# HELP istmesh_keyserver_traffic_dropped_total Traffic reports dropped, by reason (unknown_service counts pairs).\n# TYPE istmesh_keyserver_traffic_dropped_total counter");
        for reason in ["malformed", "too_often", "full", "unknown_service"] {
            let n = traffic.dropped.get(reason).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "istmesh_keyserver_traffic_dropped_total{{reason=\"{reason}\"}} {n}"
            );
        }
        let _ = writeln!(out, "# HELP istmesh_keyserver_traffic_pairs Service pairs held from members' reports.\n# TYPE istmesh_keyserver_traffic_pairs gauge\nistmesh_keyserver_traffic_pairs {}", traffic.held.1);
        out
    }

    /// Counts a successful store commit of `operations` operations.
    pub fn commit_group(&self, operations: usize) {
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.committed_operations
            .fetch_add(operations as u64, Ordering::Relaxed);
    }

    /// Counts a failed store commit.
    pub fn store_error(&self, e: &crate::store::StoreError) {
        use crate::store::StoreError;
        let kind = match e {
            StoreError::Conflict { .. } => "conflict",
            StoreError::Unavailable(_) => "unavailable",
            StoreError::TooLarge { .. } => "too_large",
            _ => "other",
        };
        *self.store_errors.lock().entry(kind).or_insert(0) += 1;
    }

    /// The text exposition. `members` gives, per network id, its online and
    /// offline members; `connected` the members with an open session here.
    pub fn render(&self, members: &[(String, usize, usize)], connected: usize) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP istmesh_keyserver_build_info Version of this keyserver.\n# TYPE istmesh_keyserver_build_info gauge\nistmesh_keyserver_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        let _ = writeln!(
            out,
            "# HELP istmesh_keyserver_start_timestamp_seconds When this keyserver started.\n# TYPE istmesh_keyserver_start_timestamp_seconds gauge\nistmesh_keyserver_start_timestamp_seconds {}",
            self.started.load(Ordering::Relaxed)
        );
        let _ = writeln!(out, "# HELP istmesh_keyserver_members Members by network and state.\n# TYPE istmesh_keyserver_members gauge");
        for (net, online, offline) in members {
            let _ = writeln!(
                out,
                "istmesh_keyserver_members{{network=\"{net}\",state=\"online\"}} {online}"
            );
            let _ = writeln!(
                out,
                "istmesh_keyserver_members{{network=\"{net}\",state=\"offline\"}} {offline}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP istmesh_keyserver_connected_members Members with an open session on this keyserver.\n# TYPE istmesh_keyserver_connected_members gauge\nistmesh_keyserver_connected_members {connected}"
        );
        let _ = writeln!(
            out,
            "# HELP istmesh_keyserver_joins_total Joins welcomed.\n# TYPE istmesh_keyserver_joins_total counter\nistmesh_keyserver_joins_total {}",
            self.joins.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP istmesh_keyserver_pushes_total Pushes sent, each to the members of one network.\n# TYPE istmesh_keyserver_pushes_total counter\nistmesh_keyserver_pushes_total {}",
            self.pushes.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP istmesh_keyserver_pushed_generations_total Generations those pushes carried (changes published while members were still taking the last push go out merged).\n# TYPE istmesh_keyserver_pushed_generations_total counter\nistmesh_keyserver_pushed_generations_total {}",
            self.pushed_generations.load(Ordering::Relaxed)
        );
        let _ = writeln!(out, "# HELP istmesh_keyserver_refusals_total Sessions refused or ended with an error, by reason.\n# TYPE istmesh_keyserver_refusals_total counter");
        for (reason, n) in self.refusals.lock().iter() {
            let _ = writeln!(
                out,
                "istmesh_keyserver_refusals_total{{reason=\"{reason}\"}} {n}"
            );
        }
        self.push_latency.render(
            &mut out,
            "istmesh_keyserver_push_latency_seconds",
            "From a change's commit to its frame written to a member.",
        );
        self.store_latency.render(
            &mut out,
            "istmesh_keyserver_store_commit_seconds",
            "Store commit time.",
        );
        let _ = writeln!(
            out,
            "# HELP istmesh_keyserver_store_commits_total Store commits that succeeded.\n# TYPE istmesh_keyserver_store_commits_total counter\nistmesh_keyserver_store_commits_total {}",
            self.commits.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP istmesh_keyserver_store_committed_operations_total Operations those commits held (a commit holds every operation run while the previous one was written).\n# TYPE istmesh_keyserver_store_committed_operations_total counter\nistmesh_keyserver_store_committed_operations_total {}",
            self.committed_operations.load(Ordering::Relaxed)
        );
        let _ = writeln!(out, "# HELP istmesh_keyserver_store_errors_total Failed store commits, by kind.\n# TYPE istmesh_keyserver_store_errors_total counter");
        for kind in ["conflict", "unavailable", "too_large", "other"] {
            let n = self.store_errors.lock().get(kind).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "istmesh_keyserver_store_errors_total{{kind=\"{kind}\"}} {n}"
            );
        }
        if let Some(bytes) = heap_in_use() {
            let _ = writeln!(
                out,
                "# HELP istmesh_keyserver_heap_in_use_bytes Heap memory in use (the allocator's count; RSS also holds freed pages not yet returned).\n# TYPE istmesh_keyserver_heap_in_use_bytes gauge\nistmesh_keyserver_heap_in_use_bytes {bytes}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP istmesh_keyserver_remote_batches_total Transactions of other replicas applied.\n# TYPE istmesh_keyserver_remote_batches_total counter\nistmesh_keyserver_remote_batches_total {}",
            self.remote_batches.load(Ordering::Relaxed)
        );
        out
    }
}
