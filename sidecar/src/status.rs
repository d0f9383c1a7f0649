//! Observability: a [`Status`] snapshot, taken on demand, served as JSON on a
//! local unix socket (`sidecar status` reads it) and as Prometheus metrics on
//! a local HTTP port.

use std::fmt::Write as _;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

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
    /// Revoked by the keyserver: tunnels are down.
    Revoked {
        /// The keyserver's reason.
        reason: String,
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
    /// Peers.
    pub peers: Vec<PeerStatus>,
    /// Private DNS responses sent, by RCODE label (`NOERROR`, `NXDOMAIN`,
    /// ...); empty when the DNS counters are not reported.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub dns_responses: std::collections::BTreeMap<String, u64>,
}

/// Takes a fresh snapshot.
pub type StatusSource = Arc<dyn Fn() -> Status + Send + Sync>;

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
    #[error("cannot reach the sidecar at {path}: {source} (is `sidecar up` running?)")]
    Connect {
        /// The socket path.
        path: String,
        /// The system error.
        source: std::io::Error,
    },
    /// The answer is not a status document.
    #[error("bad answer from the sidecar: {0}")]
    Bad(String),
}

/// Reads the status from a running sidecar.
pub async fn query_status(path: &Path) -> Result<Status, QueryError> {
    let mut stream = UnixStream::connect(path)
        .await
        .map_err(|source| QueryError::Connect {
            path: path.display().to_string(),
            source,
        })?;
    let mut buf = Vec::new();
    stream
        .read_to_end(&mut buf)
        .await
        .map_err(|e| QueryError::Bad(e.to_string()))?;
    serde_json::from_slice(&buf).map_err(|e| QueryError::Bad(e.to_string()))
}

/// Human-readable status, in the spirit of `wg show`.
pub fn render_human(s: &Status, now_unix: u64) -> String {
    let mut out = String::new();
    let ip = s.ip.map_or("-".to_string(), |ip| ip.to_string());
    let _ = writeln!(
        out,
        "network: {}\ninstance: {} ({ip})",
        s.network, s.instance
    );
    let _ = writeln!(
        out,
        "interface: {} (listening on port {})",
        s.interface, s.listen_port
    );
    let _ = writeln!(out, "public key: {}", s.public_key);
    let control = match &s.control {
        Some(ControlState::Connected { server }) => format!("connected to {server}"),
        Some(ControlState::Connecting {
            attempt,
            last_error,
        }) => format!(
            "reconnecting (attempt {attempt}{}); running from the cached map",
            last_error
                .as_ref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        ),
        Some(ControlState::Revoked { reason }) => format!("revoked: {reason}"),
        None => "not started".into(),
    };
    let _ = writeln!(out, "control: {control}\nmap generation: {}", s.generation);
    for c in &s.conflicts {
        let _ = writeln!(out, "conflict: {c}");
    }
    for p in &s.peers {
        let _ = writeln!(
            out,
            "\npeer: {} ({} / {}, {})",
            p.public_key, p.instance, p.service, p.ip
        );
        let endpoint = p.endpoint.map_or("(none)".to_string(), |e| e.to_string());
        let _ = writeln!(out, "  endpoint: {endpoint}");
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

/// The status in the Prometheus text exposition format.
pub fn render_prometheus(s: &Status) -> String {
    let mut out = String::new();
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
            "istmesh_peer_last_handshake_seconds",
            "Unix time of the last handshake (0: never).",
            "gauge",
            |p| p.last_handshake.unwrap_or(0),
        ),
    ];
    if !s.dns_responses.is_empty() {
        let name = "istm_dns_responses_total";
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
                "{name}{{instance=\"{}\",public_key=\"{}\"}} {}",
                label(&p.instance),
                label(&p.public_key),
                get(p)
            );
        }
    }
    out
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
        let p = render_prometheus(&sample());
        assert!(p.contains("istmesh_map_generation 12\n"), "{p}");
        assert!(p.contains("istmesh_control_connected 0\n"));
        assert!(
            p.contains("istmesh_peer_rx_bytes_total{instance=\"db-1\",public_key=\"P\\\"Q\"} 10\n"),
            "{p}"
        );
        assert!(
            p.contains("istm_dns_responses_total{rcode=\"NXDOMAIN\"} 2\n"),
            "{p}"
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
