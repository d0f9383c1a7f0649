//! The agent's local servers: private DNS, the status socket, metrics, and
//! the control socket through which `sidecar rotate-key` and `sidecar
//! leave` reach a running sidecar.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch, RwLock};

use super::{Agent, AgentError, Request, RESOLV_CONF};

/// The control socket's file in the state directory (mode 0600).
pub const CONTROL_SOCKET: &str = "control.sock";

/// Where the agent's local servers listen.
#[derive(Debug, Clone)]
pub struct LocalServers {
    /// The DNS address, if serving.
    pub dns: Option<SocketAddr>,
    /// The status socket.
    pub status: PathBuf,
    /// The metrics address, if serving.
    pub metrics: Option<SocketAddr>,
    /// The control socket (`sidecar rotate-key`, `sidecar leave`).
    pub control: PathBuf,
    /// Held (shared) by each control request being answered: a sidecar
    /// that leaves on request stops before its answer is written, and
    /// must not exit before it is ([`LocalServers::answered`]).
    answering: Arc<RwLock<()>>,
}

impl LocalServers {
    /// Waits (at most `limit`) until every control request taken has been
    /// answered. Call before the process exits.
    pub async fn answered(&self, limit: std::time::Duration) {
        let _ = tokio::time::timeout(limit, self.answering.write()).await;
    }
}

/// Starts DNS, the status socket and metrics for `agent`; they stop when
/// `shutdown` turns true. A port that cannot be bound is a warning (the
/// tunnels matter more), except DNS when it was asked for explicitly.
pub async fn start_servers(
    agent: &Agent,
    shutdown: watch::Receiver<bool>,
) -> Result<LocalServers, AgentError> {
    let config = &agent.config;
    let stop = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let shutdown_control = shutdown.clone();
    let mut dns = None;
    let dns_stats = Arc::new(crate::dns::DnsStats::default());
    if config.dns.enabled {
        let listen = config.dns.listen;
        let io = |what: &str| {
            let what = format!("{what} {listen}");
            move |error| AgentError::Io { what, error }
        };
        let udp = tokio::net::UdpSocket::bind(listen)
            .await
            .map_err(io("DNS (UDP) on"))?;
        let tcp = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(io("DNS (TCP) on"))?;
        let resolv = std::path::Path::new(RESOLV_CONF);
        let upstreams =
            crate::resolver::upstreams(&config.dns.upstreams, &config.state_dir, resolv, listen);
        if config.dns.set_resolver {
            if let Err(e) = crate::resolver::take_over(resolv, listen, &config.state_dir) {
                tracing::warn!(error = %e, "cannot point resolv.conf at the sidecar");
            }
        }
        let dns_config = crate::dns::DnsConfig {
            ttl: config.dns.ttl,
            upstreams,
            stats: dns_stats.clone(),
            ..crate::dns::DnsConfig::default()
        };
        tokio::spawn(crate::dns::serve(
            udp,
            tcp,
            agent.names(),
            dns_config,
            stop(shutdown.clone()),
        ));
        dns = Some(listen);
    }
    let status = config.status_socket_path();
    match crate::status::bind_status_socket(&status) {
        Ok(l) => {
            tokio::spawn(crate::status::serve_status(
                l,
                agent.status_source(),
                stop(shutdown.clone()),
            ));
        }
        Err(e) => tracing::warn!(path = %status.display(), error = %e, "no status socket"),
    }
    let mut metrics = None;
    if let Some(addr) = config.metrics {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => {
                metrics = l.local_addr().ok();
                tokio::spawn(crate::status::serve_metrics(
                    l,
                    crate::dns::with_stats(agent.status_source(), dns_stats.clone()),
                    stop(shutdown),
                ));
            }
            Err(e) => tracing::warn!(%addr, error = %e, "no metrics listener"),
        }
    }
    let control = config.state_dir.join(CONTROL_SOCKET);
    let answering = Arc::new(RwLock::new(()));
    match crate::status::bind_status_socket(&control) {
        Ok(l) => {
            tokio::spawn(serve_control(
                l,
                agent.requests.clone(),
                answering.clone(),
                stop(shutdown_control),
            ));
        }
        Err(e) => tracing::warn!(path = %control.display(), error = %e, "no control socket"),
    }
    Ok(LocalServers {
        dns,
        status,
        metrics,
        control,
        answering,
    })
}

/// Answers control requests: one line (`rotate-key` or `leave`) per
/// connection, one JSON line back.
async fn serve_control(
    listener: UnixListener,
    requests: mpsc::Sender<Request>,
    answering: Arc<RwLock<()>>,
    shutdown: impl Future<Output = ()>,
) {
    let accept = async {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (requests, answering) = (requests.clone(), answering.clone());
            tokio::spawn(async move {
                let _ = control_connection(stream, requests, answering).await;
            });
        }
    };
    tokio::select! {
        () = accept => {}
        () = shutdown => {}
    }
}

/// Longest control request line.
const MAX_REQUEST: u64 = 256;

async fn control_connection(
    stream: UnixStream,
    requests: mpsc::Sender<Request>,
    answering: Arc<RwLock<()>>,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        BufReader::new(read.take(MAX_REQUEST)).read_line(&mut line),
    )
    .await;
    if !matches!(read, Ok(Ok(_))) {
        return Ok(());
    }
    let (tx, rx) = oneshot::channel();
    let request = match line.trim() {
        "rotate-key" => Request::RotateKey(tx),
        "leave" => Request::Leave(tx),
        other => {
            let answer = serde_json::json!({"ok": false, "error": format!("unknown request {:?}", other.chars().take(40).collect::<String>())});
            write.write_all(format!("{answer}\n").as_bytes()).await?;
            return Ok(());
        }
    };
    // Until the answer is written (the process may be about to exit).
    let _answering = answering.read_owned().await;
    let answer = if requests.send(request).await.is_err() {
        serde_json::json!({"ok": false, "error": "the sidecar is stopping"})
    } else {
        match rx.await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => serde_json::json!({"ok": false, "error": e}),
            Err(_) => serde_json::json!({"ok": false, "error": "the sidecar stopped"}),
        }
    };
    write.write_all(format!("{answer}\n").as_bytes()).await?;
    write.shutdown().await
}

/// Why a control request could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ControlRequestError {
    /// No sidecar listens on the socket.
    #[error("no running sidecar at {path}: {error}")]
    NotRunning {
        /// The socket.
        path: String,
        /// The system error.
        error: std::io::Error,
    },
    /// The exchange failed.
    #[error("control socket: {0}")]
    Io(std::io::Error),
    /// The sidecar refused or failed.
    #[error("{0}")]
    Failed(String),
}

/// Sends one control request (`rotate-key`, `leave`) to the sidecar whose
/// control socket is `path`; its JSON answer.
pub async fn request(path: &Path, what: &str) -> Result<serde_json::Value, ControlRequestError> {
    let mut stream =
        UnixStream::connect(path)
            .await
            .map_err(|error| ControlRequestError::NotRunning {
                path: path.display().to_string(),
                error,
            })?;
    stream
        .write_all(format!("{what}\n").as_bytes())
        .await
        .map_err(ControlRequestError::Io)?;
    let mut answer = String::new();
    stream
        .take(64 * 1024)
        .read_to_string(&mut answer)
        .await
        .map_err(ControlRequestError::Io)?;
    let v: serde_json::Value = serde_json::from_str(answer.trim())
        .map_err(|e| ControlRequestError::Failed(format!("bad answer: {e}")))?;
    if v["ok"] == true {
        Ok(v)
    } else {
        Err(ControlRequestError::Failed(
            v["error"].as_str().unwrap_or("failed").to_owned(),
        ))
    }
}
