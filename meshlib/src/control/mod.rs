//! The key-distribution client: a member's side of the control protocol
//! ([`crate::proto`]) over QUIC.
//!
//! ```text
//! let ep = control::client_endpoint("0.0.0.0:0".parse()?)?;
//! let mut s = control::join(&ep, &token, meta, &ClientConfig::default()).await?;
//! // s.map() is the network map; s.welcome() the assigned IP, index, name.
//! loop { match s.next_event().await? { Event::Delta(_) | Event::Snapshot => use s.map(), .. } }
//! // later, after a restart or a lost connection:
//! let s = control::resume(&ep, &token.addrs, token.cert_sha256, &cached_map,
//!                         s.resume_request(endpoints), &cfg).await?;
//! ```
//!
//! Call order: [`join`] or [`resume`] once, then [`Session::next_event`] in a
//! loop (cancel-safe, so it can sit in a `select!` next to a heartbeat timer
//! calling [`Session::heartbeat`]). The server's certificate is pinned by
//! SHA-256 ([`tls::PinnedCert`]).

pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::ids::{AppId, InstanceName, NetworkId, ProcessType};
use crate::keys::PublicKey;
use crate::netmap::{MapDelta, NetworkMap};
use crate::proto::{
    self, ClientMsg, ErrorCode, FrameError, Hello, JoinRequest, JoinToken, ProtoError, Request,
    ResumeRequest, Secret, ServerMsg, Welcome,
};

/// Client settings (plain data).
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Largest frame accepted from the server. Default [`proto::DEFAULT_MAX_FRAME`].
    pub max_frame: usize,
    /// Time allowed for the QUIC handshake plus the welcome. Default 5 s.
    pub connect_timeout: Duration,
    /// QUIC keep-alive interval, so NATs keep the path open. Default 5 s.
    pub keep_alive: Duration,
    /// QUIC idle timeout: a silent server is given up after this. Default 30 s.
    pub idle_timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            max_frame: proto::DEFAULT_MAX_FRAME,
            connect_timeout: Duration::from_secs(5),
            keep_alive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
        }
    }
}

/// What a joining member tells the keyserver about itself.
#[derive(Debug, Clone)]
pub struct MemberMeta {
    /// The membership's public key.
    pub public_key: PublicKey,
    /// The service (app) name.
    pub service: String,
    /// The app id, if the member knows it.
    pub app_id: Option<AppId>,
    /// The process type.
    pub process_type: ProcessType,
    /// The wanted instance name, if any.
    pub instance: Option<InstanceName>,
    /// The runner label.
    pub runner: String,
    /// Underlay endpoints of the member's WireGuard socket.
    pub endpoints: Vec<SocketAddr>,
    /// Ports the instance serves ([`crate::netmap::Member::ports`]).
    pub ports: Vec<u16>,
}

/// Why a control session failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The token or address list holds no address.
    #[error("no keyserver address to connect to")]
    NoAddress,
    /// TLS or QUIC setup failed locally.
    #[error("client setup failed: {0}")]
    Setup(String),
    /// No address could be connected (includes a certificate pin mismatch).
    #[error("cannot connect to the keyserver: {0}")]
    Connect(String),
    /// The connection or stream failed.
    #[error("connection lost: {0}")]
    Connection(String),
    /// Reading or writing a frame failed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The server refused the request (bad token, full network, ...).
    #[error("keyserver refused: {0}")]
    Refused(ProtoError),
    /// This member was removed from its network.
    #[error("member revoked: {0}")]
    Revoked(String),
    /// The server sent something out of order.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The server did not answer in time.
    #[error("timed out")]
    Timeout,
}

/// What a member keeps (mode 0600) to come back without its token: where the
/// keyserver is, its pinned certificate, and the member's credential.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Membership {
    /// Keyserver QUIC addresses.
    pub addrs: Vec<SocketAddr>,
    /// SHA-256 of the keyserver's certificate.
    pub cert_sha256: [u8; 32],
    /// The member's network.
    pub network: NetworkId,
    /// The membership's public key.
    pub public_key: PublicKey,
    /// The reconnect credential.
    pub credential: Secret,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("addrs", &self.addrs)
            .field("network", &self.network)
            .field("public_key", &self.public_key)
            .finish_non_exhaustive()
    }
}

impl Membership {
    /// The stored form (postcard); write it with mode 0600.
    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("plain struct encodes")
    }

    /// Parses the stored form.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ControlError> {
        postcard::from_bytes(bytes)
            .map_err(|e| ControlError::Protocol(format!("membership file: {e}")))
    }
}

/// Something the session received, already applied to [`Session::map`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A delta was applied.
    Delta(MapDelta),
    /// The map was replaced by a snapshot.
    Snapshot,
    /// The server answered a heartbeat.
    HeartbeatAck {
        /// The last generation the server sent on this stream (equal to the
        /// map's generation once everything before the answer is applied).
        generation: u64,
    },
    /// The server refused one request but keeps the session (e.g.
    /// [`ErrorCode::Forbidden`] for a question about another network).
    Rejected(ProtoError),
}

/// A QUIC client endpoint bound to `bind` (use port 0).
pub fn client_endpoint(bind: SocketAddr) -> Result<quinn::Endpoint, ControlError> {
    quinn::Endpoint::client(bind).map_err(|e| ControlError::Setup(e.to_string()))
}

/// The quinn client configuration pinning `fingerprint` (ALPN, TLS 1.3,
/// keep-alive and idle timeout from `cfg`).
pub fn quic_config(
    fingerprint: [u8; 32],
    cfg: &ClientConfig,
) -> Result<quinn::ClientConfig, ControlError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = tls::PinnedCert::new(fingerprint, provider.clone());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ControlError::Setup(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    tls.alpn_protocols = vec![proto::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| ControlError::Setup(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(cfg.keep_alive));
    let idle = quinn::IdleTimeout::try_from(cfg.idle_timeout)
        .map_err(|e| ControlError::Setup(e.to_string()))?;
    transport.max_idle_timeout(Some(idle));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Connects to the first reachable address and sends the hello.
async fn open(
    endpoint: &quinn::Endpoint,
    addrs: &[SocketAddr],
    fingerprint: [u8; 32],
    hello: &Hello,
    cfg: &ClientConfig,
) -> Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream), ControlError> {
    let config = quic_config(fingerprint, cfg)?;
    let mut last = ControlError::NoAddress;
    for addr in addrs {
        let attempt = async {
            let connecting = endpoint
                .connect_with(config.clone(), *addr, proto::SERVER_NAME)
                .map_err(|e| ControlError::Connect(e.to_string()))?;
            let conn = connecting
                .await
                .map_err(|e| ControlError::Connect(e.to_string()))?;
            let (mut send, recv) = conn
                .open_bi()
                .await
                .map_err(|e| ControlError::Connection(e.to_string()))?;
            proto::write_frame(&mut send, hello, cfg.max_frame).await?;
            Ok::<_, ControlError>((conn, send, recv))
        };
        match tokio::time::timeout(cfg.connect_timeout, attempt).await {
            Ok(Ok(done)) => return Ok(done),
            Ok(Err(e)) => last = e,
            Err(_) => last = ControlError::Timeout,
        }
    }
    Err(last)
}

/// Spawns the task that reads server frames into a channel (so that
/// [`Session::next_event`] is cancel-safe).
fn spawn_reader(
    mut recv: quinn::RecvStream,
    max_frame: usize,
) -> mpsc::Receiver<Result<ServerMsg, FrameError>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let msg = proto::read_frame::<ServerMsg, _>(&mut recv, max_frame).await;
            let stop = msg.is_err();
            if tx.send(msg).await.is_err() || stop {
                break;
            }
        }
    });
    rx
}

/// Joins the network of `token` with this member's metadata. Returns once
/// the welcome and the first snapshot arrived.
pub async fn join(
    endpoint: &quinn::Endpoint,
    token: &JoinToken,
    meta: MemberMeta,
    cfg: &ClientConfig,
) -> Result<Session, ControlError> {
    let hello = Hello {
        version: proto::VERSION,
        request: Request::Join(JoinRequest {
            network: token.network,
            token_secret: token.secret,
            public_key: meta.public_key,
            service: meta.service,
            app_id: meta.app_id,
            process_type: meta.process_type,
            instance: meta.instance,
            runner: meta.runner,
            endpoints: meta.endpoints,
            ports: meta.ports,
        }),
    };
    let placeholder = NetworkMap::new(token.network, "", "0.0.0.0/32".parse().expect("literal"));
    let mut session = start(
        endpoint,
        &token.addrs,
        token.cert_sha256,
        hello,
        placeholder,
        cfg,
    )
    .await?;
    let first = tokio::time::timeout(cfg.connect_timeout, session.next_event())
        .await
        .map_err(|_| ControlError::Timeout)??;
    match first {
        Event::Snapshot => Ok(session),
        other => Err(ControlError::Protocol(format!(
            "expected a snapshot after the welcome, got {other:?}"
        ))),
    }
}

/// Reconnects an existing member, starting from its cached `map`: the server
/// sends the missed deltas (or a snapshot) as events.
pub async fn resume(
    endpoint: &quinn::Endpoint,
    addrs: &[SocketAddr],
    fingerprint: [u8; 32],
    map: NetworkMap,
    request: ResumeRequest,
    cfg: &ClientConfig,
) -> Result<Session, ControlError> {
    let credential = request.credential;
    let hello = Hello {
        version: proto::VERSION,
        request: Request::Resume(request),
    };
    let mut session = start(endpoint, addrs, fingerprint, hello, map, cfg).await?;
    session.credential = credential;
    Ok(session)
}

/// Resumes a stored [`Membership`] from a cached map (use an empty map of
/// generation 0 to get a snapshot).
pub async fn resume_membership(
    endpoint: &quinn::Endpoint,
    membership: &Membership,
    map: NetworkMap,
    endpoints: Vec<SocketAddr>,
    cfg: &ClientConfig,
) -> Result<Session, ControlError> {
    let request = ResumeRequest {
        network: membership.network,
        public_key: membership.public_key,
        credential: membership.credential,
        generation: map.generation,
        endpoints,
    };
    resume(
        endpoint,
        &membership.addrs,
        membership.cert_sha256,
        map,
        request,
        cfg,
    )
    .await
}

/// Opens the stream, sends `hello` and waits for the welcome.
async fn start(
    endpoint: &quinn::Endpoint,
    addrs: &[SocketAddr],
    fingerprint: [u8; 32],
    hello: Hello,
    map: NetworkMap,
    cfg: &ClientConfig,
) -> Result<Session, ControlError> {
    let (conn, send, recv) = open(endpoint, addrs, fingerprint, &hello, cfg).await?;
    let mut rx = spawn_reader(recv, cfg.max_frame);
    let first = tokio::time::timeout(cfg.connect_timeout, rx.recv())
        .await
        .map_err(|_| ControlError::Timeout)?;
    let welcome = match first {
        Some(Ok(ServerMsg::Welcome(w))) => w,
        Some(Ok(ServerMsg::Error(e))) => return Err(ControlError::Refused(e)),
        Some(Ok(other)) => {
            return Err(ControlError::Protocol(format!(
                "expected a welcome, got {other:?}"
            )))
        }
        Some(Err(e)) => return Err(e.into()),
        None => return Err(ControlError::Connection("stream closed".into())),
    };
    let public_key = match &hello.request {
        Request::Join(j) => j.public_key,
        Request::Resume(r) => r.public_key,
    };
    Ok(Session {
        credential: welcome.credential.unwrap_or_default(),
        conn,
        send,
        rx,
        welcome,
        map,
        max_frame: cfg.max_frame,
        addrs: addrs.to_vec(),
        fingerprint,
        public_key,
    })
}

/// An open membership session.
#[derive(Debug)]
pub struct Session {
    /// The QUIC connection (kept to close it).
    conn: quinn::Connection,
    /// Our half of the control stream.
    send: quinn::SendStream,
    /// Frames read by the reader task.
    rx: mpsc::Receiver<Result<ServerMsg, FrameError>>,
    /// What the server assigned.
    welcome: Welcome,
    /// The current network map.
    map: NetworkMap,
    /// The reconnect credential (from the join's welcome or the resume request).
    credential: Secret,
    /// Frame size limit.
    max_frame: usize,
    /// The keyserver addresses used (for [`Session::membership`]).
    addrs: Vec<SocketAddr>,
    /// The pinned certificate fingerprint.
    fingerprint: [u8; 32],
    /// The member's public key.
    public_key: PublicKey,
}

impl Session {
    /// What the keyserver assigned (IP, index, instance name, ...).
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// The current network map.
    pub fn map(&self) -> &NetworkMap {
        &self.map
    }

    /// The member's network.
    pub fn network(&self) -> NetworkId {
        self.welcome.network
    }

    /// The reconnect credential; keep it (mode 0600) to [`resume`] later.
    pub fn credential(&self) -> Secret {
        self.credential
    }

    /// What to keep to [`resume_membership`] later without the token.
    pub fn membership(&self) -> Membership {
        Membership {
            addrs: self.addrs.clone(),
            cert_sha256: self.fingerprint,
            network: self.welcome.network,
            public_key: self.public_key,
            credential: self.credential,
        }
    }

    /// The request to resume this membership later from the current map.
    pub fn resume_request(
        &self,
        public_key: PublicKey,
        endpoints: Vec<SocketAddr>,
    ) -> ResumeRequest {
        ResumeRequest {
            network: self.welcome.network,
            public_key,
            credential: self.credential,
            generation: self.map.generation,
            endpoints,
        }
    }

    /// Waits for the next message and applies it to the map. Cancel-safe.
    /// A delta that does not apply (gap) makes the session ask for a snapshot.
    pub async fn next_event(&mut self) -> Result<Event, ControlError> {
        loop {
            let msg = match self.rx.recv().await {
                Some(msg) => msg?,
                None => return Err(ControlError::Connection("stream closed".into())),
            };
            match msg {
                ServerMsg::Snapshot(map) => {
                    self.map = map;
                    return Ok(Event::Snapshot);
                }
                ServerMsg::Delta(delta) => {
                    if delta.to <= self.map.generation {
                        continue; // already have it
                    }
                    if self.map.apply(&delta).is_err() {
                        self.send(&ClientMsg::GetMap(self.welcome.network)).await?;
                        continue;
                    }
                    return Ok(Event::Delta(delta));
                }
                ServerMsg::HeartbeatAck { generation } => {
                    return Ok(Event::HeartbeatAck { generation })
                }
                ServerMsg::Error(e) if e.code == ErrorCode::Revoked => {
                    return Err(ControlError::Revoked(e.message))
                }
                ServerMsg::Error(e) => return Ok(Event::Rejected(e)),
                ServerMsg::Welcome(_) => {
                    return Err(ControlError::Protocol("second welcome".into()))
                }
            }
        }
    }

    /// Sends one message to the server.
    pub async fn send(&mut self, msg: &ClientMsg) -> Result<(), ControlError> {
        proto::write_frame(&mut self.send, msg, self.max_frame).await?;
        Ok(())
    }

    /// Sends a heartbeat (the answer arrives as [`Event::HeartbeatAck`]).
    pub async fn heartbeat(&mut self) -> Result<(), ControlError> {
        self.send(&ClientMsg::Heartbeat).await
    }

    /// Tells the server about new underlay endpoints.
    pub async fn update_endpoints(
        &mut self,
        endpoints: Vec<SocketAddr>,
    ) -> Result<(), ControlError> {
        self.send(&ClientMsg::UpdateEndpoints(endpoints)).await
    }

    /// Tells the server the ports the instance now serves.
    pub async fn update_ports(&mut self, ports: Vec<u16>) -> Result<(), ControlError> {
        self.send(&ClientMsg::UpdatePorts(ports)).await
    }

    /// Leaves the network: the keyserver removes this member (peers drop it
    /// within a second) and ends the stream; waits up to `limit` for that
    /// end, then closes the connection. True when the end was seen.
    pub async fn leave(mut self, limit: std::time::Duration) -> bool {
        let mut ended = false;
        if self.send(&ClientMsg::Leave).await.is_ok() {
            ended = tokio::time::timeout(limit, async { while self.next_event().await.is_ok() {} })
                .await
                .is_ok();
        }
        self.close();
        ended
    }

    /// Closes the connection.
    pub fn close(self) {
        self.conn.close(0u32.into(), b"bye");
    }
}
