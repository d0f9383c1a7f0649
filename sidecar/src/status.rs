//! Observability: a [`Status`] snapshot, taken on demand, served as JSON on a
//! local unix socket (`sidecar status` reads it) and as Prometheus metrics on
//! a local HTTP port.
//!
//! The socket is mode 0600 (bound under a temporary name, narrowed, then
//! renamed into place, so it is never open to others even for a moment).
//! Names in the status come from other members: the human rendering
//! escapes control and bidi characters ([`meshlib::render::text`]).

use std::fmt::Write as _;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use meshlib::render::text::Escaped;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener, UnixStream};

/// The control connection's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum ControlState {
    /// Connected to a keyserver.
    Connected {
        /// The keyserver's address.
        server: String,
    },
    /// Trying to (re)connect; the data plane runs from the cached map.
    Connecting {
        /// Attempts so far.
        attempt: u32,
        /// Why the last attempt failed.
        last_error: Option<String>,
    },
    /// The keyserver answered but did not take this member, for a reason
    /// that does not end the membership (another protocol version, a
    /// malformed or forbidden answer, busy, ...): the membership is kept
    /// and the member retries with backoff, running from the cached map.
    Retrying {
        /// Attempts so far.
        attempt: u32,
        /// The keyserver's address.
        keyserver: String,
        /// Why, with the keyserver's words.
        reason: String,
    },
    /// The keyserver ended the membership: tunnels are down, the stored
    /// membership is forgotten.
    Revoked {
        /// Why, with the keyserver's words.
        reason: String,
        /// `removed`, `replaced` or `unknown-credential`.
        #[serde(default)]
        revocation: String,
        /// The keyserver's address.
        #[serde(default)]
        keyserver: String,
    },
}

/// One peer's line in the status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// The peer's public key (base64).
    pub public_key: String,
    /// Its instance name, from the map.
    pub instance: String,
    /// Its service name, from the map.
    pub service: String,
    /// Its private IP.
    pub ip: Ipv4Addr,
    /// Current endpoint (configured or roamed to).
    pub endpoint: Option<SocketAddr>,
    /// Unix time of the last handshake, seconds.
    pub last_handshake: Option<u64>,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Inbound packets dropped for a spoofed inner source.
    pub drops_spoofed: u64,
    /// `online` or `offline` (an offline member is listed, but is no
    /// WireGuard peer until it comes back).
    #[serde(default)]
    pub state: String,
    /// Path selection: the path in use, its round trip, the candidates
    /// (`None`: the peer has no candidates, its endpoint roams).
    #[serde(default)]
    pub path: Option<PathStatus>,
}

/// The flow table of service addresses ([`meshlib::wg::flows::FlowStats`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowStatus {
    /// Flows in the table now.
    pub active: u64,
    /// Flows opened.
    pub opened: u64,
    /// New flows refused: no eligible instance.
    pub rejected: u64,
    /// New flows refused: the table was full.
    pub full: u64,
    /// SYNs refused or unanswered by their instance.
    pub failures: u64,
    /// Flows moved to another instance after such a failure.
    pub repinned: u64,
    /// Open flows reset because their instance left.
    pub reset: u64,
    /// Answers as a service address from a peer the flow is not pinned to
    /// (dropped).
    pub foreign: u64,
    /// Flows ended idle.
    pub expired: u64,
    /// Packets to or from a service address that could not be read.
    pub unreadable: u64,
    /// Flows held now while their service wakes (in `active` too).
    #[serde(default)]
    pub held: u64,
    /// Flows ever held while their service woke.
    #[serde(default)]
    pub held_total: u64,
    /// Held flows refused: no instance came within the wake timeout.
    #[serde(default)]
    pub wake_timeouts: u64,
    /// New flows refused: the hold bounds were reached.
    #[serde(default)]
    pub hold_full: u64,
    /// Bytes of packets held now.
    #[serde(default)]
    pub held_bytes: u64,
}

impl From<meshlib::wg::flows::FlowStats> for FlowStatus {
    fn from(s: meshlib::wg::flows::FlowStats) -> Self {
        Self {
            active: s.active as u64,
            opened: s.opened,
            rejected: s.rejected,
            full: s.full,
            failures: s.failures,
            repinned: s.repinned,
            reset: s.reset,
            foreign: s.foreign,
            expired: s.expired,
            unreadable: s.unreadable,
            held: s.held as u64,
            held_total: s.held_total,
            wake_timeouts: s.wake_timeouts,
            hold_full: s.hold_full,
            held_bytes: s.held_bytes as u64,
        }
    }
}

/// How packets reach one peer ([`meshlib::nat::path::PathState`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathStatus {
    /// `direct`, `relay`, `unconfirmed` (no answer yet, no relay: the first
    /// candidate) or `none`.
    pub kind: String,
    /// Round trip of the path in use, microseconds, if measured.
    pub rtt_us: Option<u64>,
    /// Every candidate: `addr`, with `learned` (from a probe's source),
    /// `working` (answered recently) and its last round trip.
    pub candidates: Vec<CandidateStatus>,
    /// The relay can carry this peer's packets.
    pub relay_available: bool,
    /// Times the path changed.
    pub switches: u64,
}

/// One candidate of a peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CandidateStatus {
    /// The address.
    pub addr: SocketAddr,
    /// Learned from a probe's source rather than advertised.
    pub learned: bool,
    /// Answered within the trust window.
    pub working: bool,
    /// Last round trip, microseconds.
    pub rtt_us: Option<u64>,
}

impl From<&meshlib::nat::path::PathState> for PathStatus {
    fn from(s: &meshlib::nat::path::PathState) -> Self {
        use meshlib::nat::path::Path;
        let us = |d: std::time::Duration| d.as_micros() as u64;
        Self {
            kind: match s.path {
                Path::Direct(_) => "direct",
                Path::Relay => "relay",
                Path::Blind(_) => "unconfirmed",
                Path::None => "none",
            }
            .into(),
            rtt_us: s.rtt.map(us),
            candidates: s
                .candidates
                .iter()
                .map(|c| CandidateStatus {
                    addr: c.addr,
                    learned: c.learned,
                    working: c.working,
                    rtt_us: c.rtt.map(us),
                })
                .collect(),
            relay_available: s.relay_available,
            switches: s.switches,
        }
    }
}

/// Everything `sidecar status` shows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The network id.
    pub network: String,
    /// This member's instance name.
    pub instance: String,
    /// This member's private IP.
    pub ip: Option<Ipv4Addr>,
    /// This member's public key.
    pub public_key: String,
    /// The interface (TUN) name, or the UAPI name in userspace mode.
    pub interface: String,
    /// WireGuard listen port.
    pub listen_port: u16,
    /// The applied map generation.
    pub generation: u64,
    /// The control connection.
    pub control: Option<ControlState>,
    /// IST conflicts, as sentences naming the services.
    pub conflicts: Vec<String>,
    /// The ports this instance serves, as its peers know them.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Userspace mode: inbound openings refused because they were for a
    /// port this instance does not serve (`None` in kernel mode).
    #[serde(default)]
    pub inbound_refused: Option<u64>,
    /// Kernel mode: the flow table of service addresses (`None` in
    /// userspace mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_flows: Option<FlowStatus>,
    /// Traffic per service (issue 19): this member's flows per destination
    /// service, as it reports them to the keyserver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic: Option<TrafficStatus>,
    /// Peers.
    pub peers: Vec<PeerStatus>,
    /// Private DNS responses sent, by RCODE label (`NOERROR`, `NXDOMAIN`,
    /// ...); empty when the DNS counters are not reported.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub dns_responses: std::collections::BTreeMap<String, u64>,
}

/// Traffic per service: the pairs (this member's service → a destination
/// service) its data plane counted, cumulative since it started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficStatus {
    /// This member's own service (the source of every pair).
    pub source: String,
    /// Per destination service.
    pub pairs: Vec<meshlib::traffic::PairTraffic>,
}

/// Takes a fresh snapshot.
pub type StatusSource = Arc<dyn Fn() -> Status + Send + Sync>;

/// Mode of the status socket: the sidecar's user only.
pub const SOCKET_MODE: u32 = 0o600;

/// Binds the status socket at `path` with mode [`SOCKET_MODE`]: bound under
/// a temporary name in the same directory, narrowed, then renamed over
/// `path` (replacing a stale socket). A missing directory is created with
/// mode 0700.
pub fn bind_status_socket(path: &Path) -> std::io::Result<UnixListener> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = match std::os::unix::net::UnixListener::bind(&tmp) {
        Ok(l) => l,
        // The longer temporary name may not fit a socket address: bind in
        // place and narrow at once (by default the socket is in the 0700
        // state directory, where nobody else can reach it meanwhile).
        Err(_) => {
            let _ = std::fs::remove_file(path);
            let l = std::os::unix::net::UnixListener::bind(path)?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))?;
            l.set_nonblocking(true)?;
            return UnixListener::from_std(l);
        }
    };
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(SOCKET_MODE))
        .and_then(|()| std::fs::rename(&tmp, path))
        .and_then(|()| listener.set_nonblocking(true));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    UnixListener::from_std(listener)
}
/// Serves the status as one JSON document per connection on `listener`.
pub async fn serve_status(
    listener: UnixListener,
    source: StatusSource,
    shutdown: impl Future<Output = ()>,
) {
    let accept = async {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let json = serde_json::to_vec(&source()).unwrap_or_default();
            tokio::spawn(async move {
                let _ = stream.write_all(&json).await;
                let _ = stream.shutdown().await;
            });
        }
    };
    tokio::select! {
        () = accept => {}
        () = shutdown => {}
    }
}

/// Why `sidecar status` could not get the status.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// No sidecar listens there.
    #[error("cannot reach the sidecar at {path}: {error} (is `sidecar up` running?)")]
    Connect {
        /// The socket path.
        path: String,
        /// The system error.
        error: std::io::Error,
    },
    /// The answer is not a status document.
    #[error("bad answer from the sidecar: {0}")]
    Bad(String),
}

/// Largest status document read (a network of the largest range fits).
pub const MAX_STATUS_BYTES: u64 = 64 << 20;
/// Time allowed for the whole answer.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads the status from a running sidecar (at most [`MAX_STATUS_BYTES`],
/// within [`QUERY_TIMEOUT`]).
pub async fn query_status(path: &Path) -> Result<Status, QueryError> {
    let read = async {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|error| QueryError::Connect {
                path: path.display().to_string(),
                error,
            })?;
        let mut buf = Vec::new();
        stream
            .take(MAX_STATUS_BYTES + 1)
            .read_to_end(&mut buf)
            .await
            .map_err(|e| QueryError::Bad(e.to_string()))?;
        if buf.len() as u64 > MAX_STATUS_BYTES {
            return Err(QueryError::Bad(format!(
                "answer over {MAX_STATUS_BYTES} bytes"
            )));
        }
        serde_json::from_slice(&buf).map_err(|e| QueryError::Bad(e.to_string()))
    };
    tokio::time::timeout(QUERY_TIMEOUT, read)
        .await
        .map_err(|_| QueryError::Bad(format!("no answer within {QUERY_TIMEOUT:?}")))?
}

/// Human-readable status, in the spirit of `wg show`. Every name is
/// escaped: it may come from another member.
pub fn render_human(s: &Status, now_unix: u64) -> String {
    let mut out = String::new();
    let e = Escaped;
    let ip = s.ip.map_or("-".to_string(), |ip| ip.to_string());
    let _ = writeln!(
        out,
        "network: {}\ninstance: {} ({ip})",
        e(&s.network),
        e(&s.instance)
    );
    let _ = writeln!(
        out,
        "interface: {} (listening on port {})",
        e(&s.interface),
        s.listen_port
    );
    let _ = writeln!(out, "public key: {}", e(&s.public_key));
    let control = match &s.control {
        Some(ControlState::Connected { server }) => format!("connected to {}", e(server)),
        Some(ControlState::Connecting {
            attempt,
            last_error,
        }) => format!(
            "reconnecting (attempt {attempt}{}); running from the cached map",
            last_error
                .as_ref()
                .map(|m| format!(": {}", e(m)))
                .unwrap_or_default()
        ),
        Some(ControlState::Retrying {
            attempt,
            keyserver,
            reason,
        }) => format!(
            "retrying: keyserver {} {} (attempt {attempt}); membership kept, running from the cached map",
            e(keyserver),
            e(reason)
        ),
        Some(ControlState::Revoked {
            reason, keyserver, ..
        }) if !keyserver.is_empty() => {
            format!("revoked: keyserver {}: {}", e(keyserver), e(reason))
        }
        Some(ControlState::Revoked { reason, .. }) => format!("revoked: {}", e(reason)),
        None => "not started".into(),
    };
    let _ = writeln!(out, "control: {control}\nmap generation: {}", s.generation);
    if !s.ports.is_empty() {
        let ports: Vec<String> = s.ports.iter().map(u16::to_string).collect();
        let _ = writeln!(out, "serving ports: {}", ports.join(", "));
    }
    if let Some(n) = s.inbound_refused {
        let _ = writeln!(out, "inbound refused (port not served): {n}");
    }
    if let Some(f) = &s.service_flows {
        let _ = writeln!(
            out,
            "service flows: {} active; {} opened, {} refused ({} table full), {} instance failures ({} moved), {} reset, {} foreign answers dropped, {} expired",
            f.active, f.opened, f.rejected + f.full, f.full, f.failures, f.repinned, f.reset, f.foreign, f.expired
        );
        if f.held_total > 0 || f.hold_full > 0 {
            let _ = writeln!(
                out,
                "held for a wake: {} now ({} B), {} in all, {} refused after the wake timeout, {} refused (hold bounds)",
                f.held, f.held_bytes, f.held_total, f.wake_timeouts, f.hold_full
            );
        }
    }
    if let Some(t) = &s.traffic {
        for p in &t.pairs {
            let c = &p.counters;
            let connect = if c.connect_count > 0 {
                format!(
                    ", connect {:.1} ms avg",
                    c.connect_micros as f64 / c.connect_count as f64 / 1000.0
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "traffic {} -> {}: {} active, {} opened, {} refused, {} held for a wake; {} B sent, {} B received{connect}",
                e(&t.source),
                e(&p.destination),
                c.active,
                c.opened,
                c.refused,
                c.held,
                c.bytes_sent,
                c.bytes_received
            );
        }
    }
    for c in &s.conflicts {
        let _ = writeln!(out, "conflict: {}", e(c));
    }
    for p in &s.peers {
        let _ = writeln!(
            out,
            "\npeer: {} ({} / {}, {})",
            e(&p.public_key),
            e(&p.instance),
            e(&p.service),
            p.ip
        );
        if !p.state.is_empty() {
            let _ = writeln!(out, "  state: {}", e(&p.state));
        }
        let endpoint = p.endpoint.map_or("(none)".to_string(), |e| e.to_string());
        let _ = writeln!(out, "  endpoint: {endpoint}");
        if let Some(path) = &p.path {
            let rtt = path.rtt_us.map_or(String::new(), |us| {
                format!(", rtt {:.1} ms", us as f64 / 1000.0)
            });
            let cands: Vec<String> = path.candidates.iter().map(|c| c.addr.to_string()).collect();
            let _ = writeln!(
                out,
                "  path: {}{rtt}; candidates: {}",
                path.kind,
                cands.join(" ")
            );
        }
        let hs = match p.last_handshake {
            Some(t) => format!("{} seconds ago", now_unix.saturating_sub(t)),
            None => "never".into(),
        };
        let _ = writeln!(out, "  latest handshake: {hs}");
        let _ = writeln!(
            out,
            "  transfer: {} B received, {} B sent",
            p.rx_bytes, p.tx_bytes
        );
        if p.drops_spoofed > 0 {
            let _ = writeln!(out, "  dropped (spoofed source): {}", p.drops_spoofed);
        }
    }
    out
}

/// A per-peer metric: name, help, type, and how to read it.
type PeerMetric = (
    &'static str,
    &'static str,
    &'static str,
    fn(&PeerStatus) -> u64,
);

/// Escapes a Prometheus label value.
fn label(v: &str) -> String {
    v.replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The status in the Prometheus text exposition format. Per-peer series
/// are labelled `peer_instance` and `public_key` (a target label
/// `instance` would be renamed `exported_instance` by Prometheus); Unix
/// times end in `_timestamp_seconds`.
pub fn render_prometheus(s: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP istmesh_sidecar_build_info The sidecar's version (always 1).\n# TYPE istmesh_sidecar_build_info gauge\nistmesh_sidecar_build_info{{version=\"{}\"}} 1",
        label(env!("CARGO_PKG_VERSION"))
    );
    let connected = matches!(s.control, Some(ControlState::Connected { .. }));
    let gauges = [
        (
            "istmesh_map_generation",
            "Applied network map generation.",
            s.generation,
        ),
        (
            "istmesh_control_connected",
            "1 when connected to the keyserver.",
            u64::from(connected),
        ),
        ("istmesh_peers", "Configured peers.", s.peers.len() as u64),
        (
            "istmesh_ist_conflicts",
            "IST name conflicts.",
            s.conflicts.len() as u64,
        ),
    ];
    for (name, help, value) in gauges {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
        );
    }
    if let Some(f) = &s.service_flows {
        let name = "istmesh_service_flows";
        let _ = writeln!(
            out,
            "# HELP {name} Flows to service addresses in the flow table (kernel mode).\n# TYPE {name} gauge\n{name} {}",
            f.active
        );
        let name = "istmesh_service_flows_held";
        let _ = writeln!(
            out,
            "# HELP {name} Flows held now while their service wakes (kernel mode).\n# TYPE {name} gauge\n{name} {}",
            f.held
        );
        let name = "istmesh_service_flow_events_total";
        let _ = writeln!(
            out,
            "# HELP {name} Flows to service addresses by what happened to them (kernel mode).\n# TYPE {name} counter"
        );
        for (event, n) in [
            ("opened", f.opened),
            ("rejected", f.rejected),
            ("full", f.full),
            ("failure", f.failures),
            ("repinned", f.repinned),
            ("reset", f.reset),
            ("foreign", f.foreign),
            ("expired", f.expired),
            ("held", f.held_total),
            ("wake_timeout", f.wake_timeouts),
            ("hold_full", f.hold_full),
        ] {
            let _ = writeln!(out, "{name}{{event=\"{event}\"}} {n}");
        }
    }
    if let Some(t) = &s.traffic {
        traffic_metrics(&mut out, t);
    }
    if let Some(n) = s.inbound_refused {
        let name = "istmesh_inbound_refused_total";
        let _ = writeln!(
            out,
            "# HELP {name} Inbound openings refused: a port this instance does not serve (userspace mode).\n# TYPE {name} counter\n{name} {n}"
        );
    }
    let per_peer: [PeerMetric; 4] = [
        (
            "istmesh_peer_rx_bytes_total",
            "Bytes received from the peer.",
            "counter",
            |p| p.rx_bytes,
        ),
        (
            "istmesh_peer_tx_bytes_total",
            "Bytes sent to the peer.",
            "counter",
            |p| p.tx_bytes,
        ),
        (
            "istmesh_peer_dropped_spoofed_total",
            "Inbound packets dropped for a spoofed source.",
            "counter",
            |p| p.drops_spoofed,
        ),
        (
            "istmesh_peer_last_handshake_timestamp_seconds",
            "Unix time of the last handshake (0: never).",
            "gauge",
            |p| p.last_handshake.unwrap_or(0),
        ),
    ];
    if !s.dns_responses.is_empty() {
        let name = "istmesh_dns_responses_total";
        let _ = writeln!(
            out,
            "# HELP {name} Private DNS responses sent, by RCODE.\n# TYPE {name} counter"
        );
        for (rcode, n) in &s.dns_responses {
            let _ = writeln!(out, "{name}{{rcode=\"{}\"}} {n}", label(rcode));
        }
    }
    for (name, help, kind, get) in per_peer {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for p in &s.peers {
            let _ = writeln!(
                out,
                "{name}{{peer_instance=\"{}\",public_key=\"{}\"}} {}",
                label(&p.instance),
                label(&p.public_key),
                get(p)
            );
        }
    }
    out.push_str(&meshlib::metrics::process_text());
    out
}

/// Traffic per service as metrics: labels are the two service names (a
/// member reports at most [`meshlib::traffic::MAX_PAIRS`] destinations),
/// never flows.
fn traffic_metrics(out: &mut String, t: &TrafficStatus) {
    use meshlib::traffic::{TrafficCounters, CONNECT_BUCKETS_MS};
    let pair = |d: &str| {
        format!(
            "source=\"{}\",destination=\"{}\"",
            label(&t.source),
            label(d)
        )
    };
    type Counter = (
        &'static str,
        &'static str,
        &'static str,
        fn(&TrafficCounters) -> u64,
    );
    let simple: [Counter; 4] = [
        (
            "istmesh_service_flows_opened_total",
            "Flows opened to a service that reached an instance.",
            "counter",
            |c| c.opened,
        ),
        (
            "istmesh_service_flows_active",
            "Flows to a service open now (held ones included).",
            "gauge",
            |c| c.active,
        ),
        (
            "istmesh_service_flows_refused_total",
            "Flows to a service refused (no instance, or none woke in time).",
            "counter",
            |c| c.refused,
        ),
        (
            "istmesh_service_flows_held_total",
            "Flows to a service held while it was woken (scale to zero).",
            "counter",
            |c| c.held,
        ),
    ];
    for (name, help, kind, get) in simple {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for p in &t.pairs {
            let _ = writeln!(
                out,
                "{name}{{{}}} {}",
                pair(&p.destination),
                get(&p.counters)
            );
        }
    }
    let name = "istmesh_service_bytes_total";
    let _ = writeln!(
        out,
        "# HELP {name} Bytes of flows to a service, by direction (sent: to the service).\n# TYPE {name} counter"
    );
    for p in &t.pairs {
        let labels = pair(&p.destination);
        let c = &p.counters;
        let _ = writeln!(
            out,
            "{name}{{{labels},direction=\"sent\"}} {}",
            c.bytes_sent
        );
        let _ = writeln!(
            out,
            "{name}{{{labels},direction=\"received\"}} {}",
            c.bytes_received
        );
    }
    let name = "istmesh_service_connect_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Time from a flow's first packet to the service's first answer.\n# TYPE {name} histogram"
    );
    for p in &t.pairs {
        let labels = pair(&p.destination);
        let c = &p.counters;
        let mut cumulative = 0u64;
        for (i, le_ms) in CONNECT_BUCKETS_MS.iter().enumerate() {
            cumulative = cumulative.saturating_add(c.connect_buckets[i]);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels},le=\"{}\"}} {cumulative}",
                *le_ms as f64 / 1000.0
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels},le=\"+Inf\"}} {}",
            c.connect_count
        );
        let _ = writeln!(
            out,
            "{name}_sum{{{labels}}} {}",
            c.connect_micros as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", c.connect_count);
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown`.
pub async fn serve_metrics(
    listener: TcpListener,
    source: StatusSource,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let source = source.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    render_prometheus(&source()),
                )
            }
        }),
    );
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::warn!(error = %e, "metrics server stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    fn sample() -> Status {
        Status {
            network: "pn-x".into(),
            instance: "api-1".into(),
            ip: Some(Ipv4Addr::new(10, 240, 0, 1)),
            public_key: "K".into(),
            interface: "istm0".into(),
            listen_port: 51820,
            generation: 12,
            control: Some(ControlState::Connecting {
                attempt: 3,
                last_error: Some("refused".into()),
            }),
            conflicts: vec!["hostname my-db.warp ...".into()],
            ports: vec![8080],
            inbound_refused: Some(4),
            service_flows: Some(FlowStatus {
                active: 3,
                opened: 9,
                foreign: 2,
                ..FlowStatus::default()
            }),
            traffic: Some(TrafficStatus {
                source: "web".into(),
                pairs: vec![meshlib::traffic::PairTraffic {
                    destination: "a\"pi".into(),
                    counters: {
                        let mut c = meshlib::traffic::TrafficCounters {
                            opened: 5,
                            active: 1,
                            refused: 2,
                            held: 1,
                            bytes_sent: 300,
                            bytes_received: 4000,
                            ..Default::default()
                        };
                        c.observe_connect(std::time::Duration::from_micros(500));
                        c.observe_connect(std::time::Duration::from_millis(50));
                        c
                    },
                }],
            }),
            peers: vec![PeerStatus {
                public_key: "P\"Q".into(),
                instance: "db-1".into(),
                service: "my db".into(),
                ip: Ipv4Addr::new(10, 240, 0, 2),
                endpoint: Some("192.0.2.2:51820".parse().unwrap()),
                last_handshake: Some(100),
                rx_bytes: 10,
                tx_bytes: 20,
                drops_spoofed: 1,
                state: "online".into(),
                path: None,
            }],
            dns_responses: [("NOERROR".to_string(), 7), ("NXDOMAIN".to_string(), 2)].into(),
        }
    }

    #[test]
    fn human_and_prometheus() {
        let h = render_human(&sample(), 130);
        assert!(h.contains("latest handshake: 30 seconds ago"), "{h}");
        assert!(h.contains("reconnecting (attempt 3: refused)"), "{h}");
        assert!(h.contains("transfer: 10 B received, 20 B sent"), "{h}");
        assert!(h.contains("serving ports: 8080\n"), "{h}");
        assert!(h.contains("inbound refused (port not served): 4\n"), "{h}");
        assert!(h.contains("service flows: 3 active; 9 opened"), "{h}");
        assert!(h.contains("2 foreign answers dropped"), "{h}");
        let p = render_prometheus(&sample());
        assert!(p.contains("istmesh_service_flows 3\n"), "{p}");
        assert!(
            p.contains("istmesh_service_flow_events_total{event=\"foreign\"} 2\n"),
            "{p}"
        );
        assert!(p.contains("istmesh_map_generation 12\n"), "{p}");
        // Traffic per service: labels are service names, escaped.
        assert!(
            h.contains("traffic web -> a\"pi: 1 active, 5 opened, 2 refused, 1 held for a wake; 300 B sent, 4000 B received, connect 25.2 ms avg"),
            "{h}"
        );
        let labels = "source=\"web\",destination=\"a\\\"pi\"";
        for line in [
            format!("istmesh_service_flows_opened_total{{{labels}}} 5\n"),
            format!("istmesh_service_flows_active{{{labels}}} 1\n"),
            format!("istmesh_service_flows_refused_total{{{labels}}} 2\n"),
            format!("istmesh_service_flows_held_total{{{labels}}} 1\n"),
            format!("istmesh_service_bytes_total{{{labels},direction=\"sent\"}} 300\n"),
            format!("istmesh_service_bytes_total{{{labels},direction=\"received\"}} 4000\n"),
            format!("istmesh_service_connect_seconds_bucket{{{labels},le=\"0.001\"}} 1\n"),
            format!("istmesh_service_connect_seconds_bucket{{{labels},le=\"0.01\"}} 1\n"),
            format!("istmesh_service_connect_seconds_bucket{{{labels},le=\"0.1\"}} 2\n"),
            format!("istmesh_service_connect_seconds_bucket{{{labels},le=\"+Inf\"}} 2\n"),
            format!("istmesh_service_connect_seconds_count{{{labels}}} 2\n"),
            format!("istmesh_service_connect_seconds_sum{{{labels}}} 0.0505\n"),
        ] {
            assert!(p.contains(&line), "{line} in {p}");
        }
        assert!(p.contains("istmesh_control_connected 0\n"));
        assert!(
            p.contains(
                "istmesh_peer_rx_bytes_total{peer_instance=\"db-1\",public_key=\"P\\\"Q\"} 10\n"
            ),
            "{p}"
        );
        assert!(p.contains("istmesh_inbound_refused_total 4\n"), "{p}");
        assert!(
            p.contains("istmesh_dns_responses_total{rcode=\"NXDOMAIN\"} 2\n"),
            "{p}"
        );
    }

    #[test]
    fn metric_names_follow_prometheus_conventions() {
        let p = render_prometheus(&sample());
        // A target label `instance` would become `exported_instance`.
        assert!(
            !p.contains("{instance=") && !p.contains(",instance="),
            "{p}"
        );
        // Unix times are *_timestamp_seconds.
        assert!(
            p.contains("istmesh_peer_last_handshake_timestamp_seconds{peer_instance=\"db-1\""),
            "{p}"
        );
        assert!(!p.contains("istmesh_peer_last_handshake_seconds"), "{p}");
        let build = format!(
            "istmesh_sidecar_build_info{{version=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        );
        assert!(p.contains(&build), "{p}");
        assert!(
            p.contains("# TYPE process_cpu_seconds_total counter"),
            "{p}"
        );
        assert_eq!(meshlib::metrics::lint(&p), Ok(()), "{p}");
        // Every series has its HELP and TYPE; counters end in _total.
        for line in p.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            // A histogram's series share its base name's TYPE.
            let histogram = ["_bucket", "_sum", "_count"]
                .iter()
                .filter_map(|s| name.strip_suffix(s))
                .find(|base| p.contains(&format!("# TYPE {base} histogram")));
            if let Some(base) = histogram {
                assert!(!base.ends_with("_total"), "{base}");
                continue;
            }
            assert!(p.contains(&format!("# TYPE {name} ")), "{name}");
            if p.contains(&format!("# TYPE {name} counter")) {
                assert!(name.ends_with("_total"), "{name}");
            }
        }
    }

    #[test]
    fn names_from_the_network_are_escaped() {
        let mut s = sample();
        s.peers[0].service = "evil\u{1b}[2J\nnetwork: forged\u{202e}".into();
        s.peers[0].instance = "db\r1".into();
        s.conflicts = vec!["x\u{1b}]0;title\u{7}".into()];
        s.control = Some(ControlState::Revoked {
            reason: "bye\nnetwork: fake".into(),
            revocation: "removed".into(),
            keyserver: "127.0.0.1:7443".into(),
        });
        let h = render_human(&s, 130);
        assert!(!h.contains(['\u{1b}', '\r', '\u{7}', '\u{202e}']), "{h:?}");
        assert_eq!(
            h.lines().filter(|l| l.starts_with("network:")).count(),
            1,
            "no forged line: {h}"
        );
        assert!(
            h.contains("evil\\u{1b}[2J\\u{a}network: forged\\u{202e}"),
            "{h}"
        );
        assert!(
            h.contains("revoked: keyserver 127.0.0.1:7443: bye\\u{a}network: fake"),
            "{h}"
        );
        s.control = Some(ControlState::Retrying {
            attempt: 2,
            keyserver: "127.0.0.1:7443".into(),
            reason: "refused (Malformed): x\u{1b}[2J\nnetwork: forged".into(),
        });
        let h = render_human(&s, 130);
        assert!(!h.contains('\u{1b}'), "{h:?}");
        assert_eq!(h.lines().filter(|l| l.starts_with("network:")).count(), 1);
        assert!(
            h.contains("control: retrying: keyserver 127.0.0.1:7443 refused (Malformed): x\\u{1b}[2J\\u{a}network: forged (attempt 2)"),
            "{h}"
        );
    }

    #[tokio::test]
    async fn socket_round_trip_and_metrics_over_http() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let source: StatusSource = Arc::new(sample);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve_status(listener, source.clone(), async move {
            let _ = stop_rx.await;
        }));
        assert_eq!(query_status(&path).await.unwrap(), sample());
        drop(stop_tx);
        let missing = query_status(&dir.path().join("nope.sock"))
            .await
            .unwrap_err();
        assert!(missing.to_string().contains("sidecar up"), "{missing}");

        // The socket is the sidecar user's only, also when bound over a
        // stale one in a directory others can enter.
        use std::os::unix::fs::MetadataExt;
        let open_dir = dir.path().join("shared");
        std::fs::create_dir(&open_dir).unwrap();
        std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let path = open_dir.join("status.sock");
        std::fs::write(&path, "stale").unwrap();
        let l = bind_status_socket(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert!(std::fs::metadata(&path).unwrap().file_type().is_socket());
        assert_eq!(
            std::fs::read_dir(&open_dir).unwrap().count(),
            1,
            "no temporary left"
        );
        tokio::spawn(serve_status(l, source.clone(), std::future::pending()));
        assert_eq!(query_status(&path).await.unwrap(), sample());
        let nested = dir.path().join("new/dir/status.sock");
        drop(bind_status_socket(&nested).unwrap());
        assert_eq!(
            std::fs::metadata(nested.parent().unwrap()).unwrap().mode() & 0o777,
            0o700
        );

        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        tokio::spawn(serve_metrics(tcp, source, std::future::pending()));
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).await.unwrap();
        assert!(
            body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200"),
            "{body}"
        );
        assert!(body.contains("istmesh_peers 1"), "{body}");
    }
}
