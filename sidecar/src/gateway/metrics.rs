//! Per group and per instance counters of the gateway, and their Prometheus
//! text form (`GET /metrics` on the gateway's metrics address).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use meshlib::metrics::{Exposition, Kind};
use parking_lot::RwLock;

/// Upper bounds of the latency histogram buckets, in seconds.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A latency histogram (cumulative buckets when rendered).
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    over: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        match BUCKETS.iter().position(|b| secs <= *b) {
            Some(i) => self.counts[i].fetch_add(1, Relaxed),
            None => self.over.fetch_add(1, Relaxed),
        };
        self.sum_micros
            .fetch_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX), Relaxed);
    }

    fn render(&self, e: &mut Exposition, name: &str, labels: &[(&str, &str)]) {
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.counts[i].load(Relaxed);
            let le = bound.to_string();
            e.sample(name, "_bucket", &with(labels, ("le", &le)), cumulative);
        }
        cumulative += self.over.load(Relaxed);
        e.sample(name, "_bucket", &with(labels, ("le", "+Inf")), cumulative);
        let sum = self.sum_micros.load(Relaxed) as f64 / 1e6;
        e.sample(name, "_sum", labels, sum);
        e.sample(name, "_count", labels, cumulative);
    }
}

/// `labels` and one more.
fn with<'a>(labels: &[(&'a str, &'a str)], more: (&'a str, &'a str)) -> Vec<(&'a str, &'a str)> {
    let mut all = labels.to_vec();
    all.push(more);
    all
}

/// Counters shared by a group and each of its instances.
#[derive(Debug, Default)]
pub struct Counters {
    /// Connections (HTTP mode: requests) forwarded.
    pub forwarded: AtomicU64,
    /// Bytes from clients to instances.
    pub bytes_in: AtomicU64,
    /// Bytes from instances to clients.
    pub bytes_out: AtomicU64,
    /// HTTP responses by status code (100-599; index `code - 100`).
    pub status: StatusCounts,
    /// Request latency (to the response head).
    pub latency: Histogram,
    /// Dials that failed or timed out.
    pub dial_failures: AtomicU64,
}

impl Counters {
    /// Counts one HTTP response.
    pub fn response(&self, code: u16, latency: Duration) {
        self.status.add(code);
        self.latency.observe(latency);
    }
}

/// Responses per status code, lock-free.
#[derive(Debug)]
pub struct StatusCounts(Box<[AtomicU64; 500]>);

impl Default for StatusCounts {
    fn default() -> Self {
        Self(Box::new(std::array::from_fn(|_| AtomicU64::new(0))))
    }
}

impl StatusCounts {
    /// Counts one response with `code` (outside 100-599: ignored).
    pub fn add(&self, code: u16) {
        if let Some(c) = code
            .checked_sub(100)
            .and_then(|i| self.0.get(usize::from(i)))
        {
            c.fetch_add(1, Relaxed);
        }
    }

    /// The codes seen, with their counts.
    pub fn seen(&self) -> Vec<(u16, u64)> {
        self.0
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let n = c.load(Relaxed);
                (n > 0).then(|| (100 + i as u16, n))
            })
            .collect()
    }
}

/// A group's counters.
#[derive(Debug, Default)]
pub struct GroupStats {
    /// Totals of the group.
    pub total: Counters,
    /// Connections that had to wait (queue or wake hold), whatever came next.
    pub queued: AtomicU64,
    /// Connections refused (hard limit, queue timeout, no instance).
    pub rejected: AtomicU64,
    /// Wake hook runs.
    pub wakes: AtomicU64,
    /// Connections refused: their client held its share of the group past
    /// the queue timeout.
    pub client_share_refused: AtomicU64,
    instances: RwLock<BTreeMap<String, Arc<Counters>>>,
}

impl GroupStats {
    /// The counters of one instance.
    pub fn instance(&self, name: &str) -> Arc<Counters> {
        if let Some(c) = self.instances.read().get(name) {
            return c.clone();
        }
        self.instances
            .write()
            .entry(name.to_owned())
            .or_default()
            .clone()
    }
}

/// Counters of the gateway as a whole (client connections before any group
/// is known, upstream connections, local errors).
#[derive(Debug, Default)]
pub struct GatewayStats {
    /// Client connections closed at once: their address held its budget.
    pub refused_per_client: AtomicU64,
    /// HTTP connections closed without a request within the deadline.
    pub closed_no_request: AtomicU64,
    /// HTTP connections closed after the idle timeout.
    pub closed_idle: AtomicU64,
    /// Connections opened to instances for HTTP requests.
    pub upstream_opened: AtomicU64,
    /// HTTP requests sent on a kept upstream connection.
    pub upstream_reused: AtomicU64,
    /// Dials that failed for the gateway's own lack of resources.
    pub local_errors: AtomicU64,
    /// When a local error was last logged (ms since `UNIX_EPOCH`).
    last_local_warn_ms: AtomicU64,
}

impl GatewayStats {
    /// Counts a dial that failed for the gateway's own lack of resources
    /// (`what`: the dial's purpose), logging it at warn at most once a
    /// second (with the count so far).
    pub fn local_error(&self, what: &str, error: &std::io::Error) {
        let n = self.local_errors.fetch_add(1, Relaxed) + 1;
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let last = self.last_local_warn_ms.load(Relaxed);
        let due = now_ms.saturating_sub(last) >= 1000;
        if due
            && self
                .last_local_warn_ms
                .compare_exchange(last, now_ms, Relaxed, Relaxed)
                .is_ok()
        {
            tracing::warn!(
                %error,
                what,
                local_errors = n,
                "the gateway is out of local resources (ports, descriptors or buffers): \
                 this request gets 503, the instance is not marked down"
            );
        }
    }

    fn render(&self, e: &mut Exposition) {
        e.single(
            "istmesh_gateway_client_connections_refused_total",
            Kind::Counter,
            "Client connections closed at once: their address held its budget.",
            self.refused_per_client.load(Relaxed),
        );
        let closed = "istmesh_gateway_client_connections_closed_total";
        e.family(
            closed,
            Kind::Counter,
            "HTTP client connections closed by the gateway, by reason (no-request: none within the deadline; idle: the idle timeout).",
        )
        .sample(closed, "", &[("reason", "no-request")], self.closed_no_request.load(Relaxed))
        .sample(closed, "", &[("reason", "idle")], self.closed_idle.load(Relaxed));
        e.single(
            "istmesh_gateway_upstream_connections_total",
            Kind::Counter,
            "Connections opened to instances for HTTP requests.",
            self.upstream_opened.load(Relaxed),
        )
        .single(
            "istmesh_gateway_upstream_reused_total",
            Kind::Counter,
            "HTTP requests sent on a kept upstream connection.",
            self.upstream_reused.load(Relaxed),
        )
        .single(
            "istmesh_gateway_local_errors_total",
            Kind::Counter,
            "Dials that failed for the gateway's own lack of resources (ports, descriptors, buffers).",
            self.local_errors.load(Relaxed),
        );
    }
}

/// Gauges read from the balancers at render time.
#[derive(Debug, Clone)]
pub struct GroupGauges {
    /// The group's network's name.
    pub network: String,
    /// Group name.
    pub group: String,
    /// Waiting connections.
    pub queued: usize,
    /// This gateway's part of the per-instance limits (soft, hard): the
    /// group's own when it is the network's only gateway.
    pub limits: (u16, u16),
    /// Per instance: name, active connections, marked down.
    pub instances: Vec<(String, u32, bool)>,
}

/// The families of a group's or an instance's counters (`prefix`: `""`
/// or `"_instance"`).
fn counter_families(e: &mut Exposition, prefix: &str, whose: &str) {
    let name = |n: &str| format!("istmesh_gateway{prefix}_{n}");
    e.family(
        &name("forwarded_total"),
        Kind::Counter,
        &format!("Connections (HTTP: requests) forwarded to {whose}."),
    )
    .family(
        &name("bytes_total"),
        Kind::Counter,
        &format!("Bytes between clients and {whose}, by direction (in: from clients)."),
    )
    .family(
        &name("dial_failures_total"),
        Kind::Counter,
        &format!("Dials to {whose} that failed or timed out."),
    )
    .family(
        &name("http_responses_total"),
        Kind::Counter,
        &format!("HTTP responses from {whose}, by status code."),
    )
    .family(
        &name("request_duration_seconds"),
        Kind::Histogram,
        &format!("Time from a request to the response head of {whose}."),
    );
}

fn counters(e: &mut Exposition, labels: &[(&str, &str)], c: &Counters, prefix: &str) {
    let name = |n: &str| format!("istmesh_gateway{prefix}_{n}");
    e.sample(
        &name("forwarded_total"),
        "",
        labels,
        c.forwarded.load(Relaxed),
    );
    let bytes = name("bytes_total");
    e.sample(
        &bytes,
        "",
        &with(labels, ("direction", "in")),
        c.bytes_in.load(Relaxed),
    );
    e.sample(
        &bytes,
        "",
        &with(labels, ("direction", "out")),
        c.bytes_out.load(Relaxed),
    );
    e.sample(
        &name("dial_failures_total"),
        "",
        labels,
        c.dial_failures.load(Relaxed),
    );
    for (code, n) in c.status.seen() {
        let code = code.to_string();
        e.sample(
            &name("http_responses_total"),
            "",
            &with(labels, ("code", &code)),
            n,
        );
    }
    c.latency
        .render(e, &name("request_duration_seconds"), labels);
}

/// Renders the gateway's and every group's metrics in the Prometheus text
/// format, with the build and `process_*` families. Instances are labelled
/// `member` (Prometheus owns the label `instance`).
///
/// `groups` are (network, group, counters); with `multi` (a gateway serving
/// several networks) every group's samples carry a `network` label first,
/// and the map generation is one sample per network.
pub fn render(
    gateway: &GatewayStats,
    groups: &[(String, String, Arc<GroupStats>)],
    gauges: &[GroupGauges],
    generations: &[(String, u64)],
    multi: bool,
) -> String {
    let mut out = meshlib::metrics::build_info_text("gateway", env!("CARGO_PKG_VERSION"));
    let mut e = Exposition::new();
    gateway.render(&mut e);
    let generation = "istmesh_gateway_map_generation";
    e.family(
        generation,
        Kind::Gauge,
        "Generation of the network map the gateway routes by.",
    );
    if multi {
        for (net, g) in generations {
            e.sample(generation, "", &[("network", net.as_str())], g);
        }
    } else {
        let g = generations.first().map_or(0, |(_, g)| *g);
        e.sample(generation, "", &[], g);
    }
    e.single(
        "istmesh_gateway_groups",
        Kind::Gauge,
        "Service groups served.",
        gauges.len(),
    );
    e.family(
        "istmesh_gateway_queued_connections",
        Kind::Gauge,
        "Connections waiting for a slot of the group.",
    )
    .family(
        "istmesh_gateway_limit",
        Kind::Gauge,
        "This gateway's part of the group's per-instance limit (soft, hard): the network's online gateways split each limit between them.",
    )
    .family(
        "istmesh_gateway_active_connections",
        Kind::Gauge,
        "Connections open to an instance.",
    )
    .family(
        "istmesh_gateway_instance_down",
        Kind::Gauge,
        "1 while an instance is marked down after failed dials.",
    )
    .family(
        "istmesh_gateway_connections_total",
        Kind::Counter,
        "Client connections of a group by outcome (forwarded, queued: had to wait, rejected).",
    )
    .family(
        "istmesh_gateway_wakes_total",
        Kind::Counter,
        "Wake hook runs for a group scaled to zero.",
    )
    .family(
        "istmesh_gateway_client_share_refused_total",
        Kind::Counter,
        "Connections refused because their client address held its share of the group (--client-share) past the queue timeout.",
    );
    counter_families(&mut e, "", "a group's instances");
    counter_families(&mut e, "_instance", "one instance");
    let labels = |net: &'_ str, group: &'_ str| -> Vec<(&'static str, String)> {
        let mut l = Vec::with_capacity(2);
        if multi {
            l.push(("network", net.to_owned()));
        }
        l.push(("group", group.to_owned()));
        l
    };
    for g in gauges {
        let owned = labels(&g.network, &g.group);
        let gl: Vec<(&str, &str)> = owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let gl = gl.as_slice();
        e.sample("istmesh_gateway_queued_connections", "", gl, g.queued);
        for (kind, v) in [("soft", g.limits.0), ("hard", g.limits.1)] {
            e.sample("istmesh_gateway_limit", "", &with(gl, ("limit", kind)), v);
        }
        for (i, active, down) in &g.instances {
            let il = with(gl, ("member", i));
            e.sample("istmesh_gateway_active_connections", "", &il, active);
            e.sample("istmesh_gateway_instance_down", "", &il, u8::from(*down));
        }
    }
    for (net, group, s) in groups {
        let owned = labels(net, group);
        let gl: Vec<(&str, &str)> = owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let gl = gl.as_slice();
        for (outcome, n) in [
            ("forwarded", s.total.forwarded.load(Relaxed)),
            ("queued", s.queued.load(Relaxed)),
            ("rejected", s.rejected.load(Relaxed)),
        ] {
            e.sample(
                "istmesh_gateway_connections_total",
                "",
                &with(gl, ("outcome", outcome)),
                n,
            );
        }
        e.sample("istmesh_gateway_wakes_total", "", gl, s.wakes.load(Relaxed));
        counters(&mut e, gl, &s.total, "");
        for (inst, c) in s.instances.read().iter() {
            counters(&mut e, &with(gl, ("member", inst)), c, "_instance");
        }
    }
    meshlib::metrics::process_families(&mut e);
    e.render_into(&mut out);
    out
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_groups_instances_and_histograms() {
        let s = Arc::new(GroupStats::default());
        s.total.forwarded.fetch_add(3, Relaxed);
        s.rejected.fetch_add(1, Relaxed);
        s.total.response(200, Duration::from_millis(3));
        s.instance("web-1").response(503, Duration::from_secs(20));
        let gauges = vec![GroupGauges {
            network: "prod".into(),
            group: "my \"svc\"".into(),
            queued: 2,
            limits: (2, 5),
            instances: vec![("web-1".into(), 1, false)],
        }];
        let gw = GatewayStats::default();
        gw.closed_idle.fetch_add(2, Relaxed);
        gw.refused_per_client.fetch_add(1, Relaxed);
        let groups = [("prod".to_owned(), "g".to_owned(), s)];
        let text = render(&gw, &groups, &gauges, &[("prod".into(), 7)], false);
        assert!(text.contains("istmesh_gateway_client_connections_closed_total{reason=\"idle\"} 2"));
        assert!(text
            .contains("istmesh_gateway_client_connections_closed_total{reason=\"no-request\"} 0"));
        assert!(text.contains("istmesh_gateway_client_connections_refused_total 1"));
        assert_eq!(
            text.matches("# TYPE istmesh_gateway_client_connections_closed_total")
                .count(),
            1
        );
        assert!(
            text.contains("istmesh_gateway_connections_total{group=\"g\",outcome=\"rejected\"} 1")
        );
        assert!(text.contains("istmesh_gateway_queued_connections{group=\"my \\\"svc\\\"\"} 2"));
        assert!(text.contains("istmesh_gateway_http_responses_total{group=\"g\",code=\"200\"} 1"));
        assert!(text.contains(
            "istmesh_gateway_request_duration_seconds_bucket{group=\"g\",le=\"0.005\"} 1"
        ));
        assert!(text.contains(
            "istmesh_gateway_instance_request_duration_seconds_bucket{group=\"g\",member=\"web-1\",le=\"+Inf\"} 1"
        ));
        assert!(text.contains("istmesh_gateway_map_generation 7"));
        assert!(text.contains("istmesh_gateway_limit{group=\"my \\\"svc\\\"\",limit=\"hard\"} 5"));
        assert!(text.contains("istmesh_gateway_build_info{version=\""));
        assert!(text.contains("# TYPE process_resident_memory_bytes gauge"));
        // Every family once, with HELP and TYPE, its samples together.
        assert_eq!(meshlib::metrics::lint(&text), Ok(()));

        // Several networks: a `network` label first, a generation each.
        let more = GroupStats::default();
        more.rejected.fetch_add(5, Relaxed);
        let groups = [
            groups[0].clone(),
            ("acme".to_owned(), "g".to_owned(), Arc::new(more)),
        ];
        let text = render(
            &gw,
            &groups,
            &gauges,
            &[("prod".into(), 7), ("acme".into(), 3)],
            true,
        );
        assert!(text.contains(
            "istmesh_gateway_connections_total{network=\"prod\",group=\"g\",outcome=\"rejected\"} 1"
        ));
        assert!(text.contains(
            "istmesh_gateway_connections_total{network=\"acme\",group=\"g\",outcome=\"rejected\"} 5"
        ));
        assert!(text.contains("istmesh_gateway_map_generation{network=\"acme\"} 3"));
        assert_eq!(meshlib::metrics::lint(&text), Ok(()));
    }
}
