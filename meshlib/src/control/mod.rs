//! The key-distribution client: the QUIC driver of the member core
//! ([`crate::member::MemberCore`]). Everything the protocol means — joining,
//! following the map, heartbeats, reconnecting with backoff, re-announcing,
//! rotation, offline and leave — lives in the core; this module opens
//! connections, moves frames and keeps time.
//!
//! ```text
//! let ep = control::client_endpoint("0.0.0.0:0".parse()?)?;
//! let mut s = control::join(&ep, &token, meta, &ClientConfig::default()).await?;
//! // s.map() is the network map; s.welcome() the assigned IP, index, name;
//! // s.membership() what to keep (0600) to come back without the token.
//! loop { match s.next_event().await? { Event::Delta(_) | Event::Snapshot => use s.map(), .. } }
//! // later, after a restart:
//! let s = control::resume_membership(&ep, &membership, cached_map, endpoints, &cfg).await?;
//! ```
//!
//! Call order: [`join`] or [`resume`] once, then [`Session::next_event`] in a
//! loop. It is cancel-safe (frames are written by a task per connection, and
//! a connection being opened is kept across calls), so it can sit in a
//! `select!` next to the caller's own work; requests
//! ([`Session::update_endpoints`], [`Session::rotate_key`], …) take effect on
//! the next call. The server's certificate is pinned by SHA-256
//! ([`tls::PinnedCert`]).

/// Certificate pinning (moved to [`crate::pinned`]; kept here by name).
pub mod tls {
    pub use crate::pinned::PinnedCert;
}

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::ids::NetworkId;
use crate::keys::PublicKey;
use crate::member::{End, Frame, MemberConfig, MemberCore, Revocation, Transmit};
use crate::netmap::NetworkMap;
use crate::proto::{
    self, ClientMsg, FrameError, JoinToken, ProtoError, ResumeRequest, Secret, ServerMsg, Welcome,
};

pub use crate::member::{
    Connection, Event, MemberMeta, Membership, MembershipError, Revoked, Setback,
};

/// Client settings (plain data).
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Largest frame accepted from the server. Default [`proto::DEFAULT_MAX_FRAME`].
    pub max_frame: usize,
    /// Time allowed for the QUIC handshake plus the welcome. Default 5 s.
    pub connect_timeout: Duration,
    /// QUIC keep-alive interval, so NATs keep the path open and a dead
    /// keyserver shows within the idle timeout. Default 3 s.
    pub keep_alive: Duration,
    /// QUIC idle timeout: a silent server is given up after this, and the
    /// member moves to the next keyserver replica. Default 10 s (a killed
    /// keyserver sends nothing; its replicas take over within it).
    pub idle_timeout: Duration,
    /// The member core's timers (its `connect_timeout` is replaced by the
    /// one above).
    pub member: MemberConfig,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            max_frame: proto::DEFAULT_MAX_FRAME,
            connect_timeout: Duration::from_secs(5),
            keep_alive: Duration::from_secs(3),
            idle_timeout: Duration::from_secs(10),
            member: MemberConfig::default(),
        }
    }
}

impl ClientConfig {
    /// A configuration that does not reconnect: the session ends at the
    /// first lost or failed connection (probes, tests).
    pub fn one_shot() -> Self {
        let mut c = Self::default();
        c.member.reconnect = false;
        c
    }

    fn core_config(&self) -> MemberConfig {
        MemberConfig {
            connect_timeout: self.connect_timeout,
            ..self.member.clone()
        }
    }
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
    /// The server refused the hello (bad token, full network, busy, ...).
    /// A resume refused with [`proto::ErrorCode::BadCredential`] means the
    /// membership is gone ([`Session::end`] holds it as
    /// [`End::Revoked`]); other codes leave it to a later try.
    #[error("keyserver refused: {0}")]
    Refused(ProtoError),
    /// The keyserver removed this member, or another key took its slot.
    #[error("member revoked: {0}")]
    Revoked(Revoked),
    /// The server sent something out of order.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The server did not answer in time.
    #[error("timed out")]
    Timeout,
    /// The session ended as asked (offline or leave); nothing more comes.
    #[error("the session has ended")]
    Ended,
}

/// A QUIC client endpoint bound to `bind` (use port 0).
pub fn client_endpoint(bind: SocketAddr) -> Result<quinn::Endpoint, ControlError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let setup = |e: std::io::Error| ControlError::Setup(e.to_string());
    let socket =
        Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP)).map_err(setup)?;
    if bind.is_ipv6() {
        let _ = socket.set_only_v6(false);
    }
    // The map of a large network arrives as one burst (a snapshot of a
    // thousand members is ~120 KB, and several sessions may share the
    // endpoint): the kernel's default buffer drops part of it, and each
    // loss costs a retransmission timeout. Best effort: capped at
    // `rmem_max`.
    let _ = socket.set_recv_buffer_size(CLIENT_SOCKET_BUFFER);
    socket.bind(&bind.into()).map_err(setup)?;
    let runtime =
        quinn::default_runtime().ok_or_else(|| ControlError::Setup("no async runtime".into()))?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket.into(),
        runtime,
    )
    .map_err(setup)
}

/// Receive buffer a control client's socket asks for
/// ([`client_endpoint`]).
const CLIENT_SOCKET_BUFFER: usize = 2 << 20;

/// The quinn client configuration pinning `fingerprint` (ALPN, TLS 1.3,
/// keep-alive and idle timeout from `cfg`).
pub fn quic_config(
    fingerprint: [u8; 32],
    cfg: &ClientConfig,
) -> Result<quinn::ClientConfig, ControlError> {
    let tls = tls_client_config(fingerprint, proto::ALPN)?;
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

/// One open control connection: frames go out through a writer task (so
/// nothing is ever half-written by a cancelled call), frames come in through
/// a reader task.
#[derive(Debug)]
struct Link {
    /// The keyserver's address.
    addr: SocketAddr,
    conn: Conn,
    tx: mpsc::UnboundedSender<Vec<u8>>,
    rx: mpsc::Receiver<Result<ServerMsg, FrameError>>,
}

/// The connection under a [`Link`]: QUIC, or TLS over TCP when UDP is
/// blocked (its tasks are aborted to close it).
#[derive(Debug)]
enum Conn {
    Quic(quinn::Connection),
    Tcp(Vec<tokio::task::AbortHandle>),
}

impl Conn {
    fn close_now(&self) {
        match self {
            Conn::Quic(c) => c.close(0u32.into(), b"bye"),
            Conn::Tcp(tasks) => tasks.iter().for_each(|t| t.abort()),
        }
    }
}

impl Link {
    fn start(
        addr: SocketAddr,
        conn: quinn::Connection,
        mut send: quinn::SendStream,
        recv: quinn::RecvStream,
        max: usize,
    ) -> Self {
        let (tx, mut out) = mpsc::unbounded_channel::<Vec<u8>>();
        let writer_conn = conn.clone();
        tokio::spawn(async move {
            while let Some(frame) = out.recv().await {
                if send.write_all(&frame).await.is_err() {
                    writer_conn.close(1u32.into(), b"write failed");
                    return;
                }
            }
            let _ = send.finish();
        });
        let (rx, _) = spawn_reader(recv, max);
        Self {
            addr,
            conn: Conn::Quic(conn),
            tx,
            rx,
        }
    }

    /// A link over TLS on TCP.
    fn start_tcp<S>(addr: SocketAddr, stream: S, max: usize) -> Self
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
    {
        use tokio::io::AsyncWriteExt as _;
        let (recv, mut send) = tokio::io::split(stream);
        let (tx, mut out) = mpsc::unbounded_channel::<Vec<u8>>();
        let writer = tokio::spawn(async move {
            while let Some(frame) = out.recv().await {
                if send.write_all(&frame).await.is_err() {
                    return;
                }
            }
            let _ = send.shutdown().await;
        });
        let (rx, reader) = spawn_reader(recv, max);
        Self {
            addr,
            conn: Conn::Tcp(vec![writer.abort_handle(), reader]),
            tx,
            rx,
        }
    }

    fn close(self) {
        // Closing the channel lets the writer flush and finish; the
        // connection closes once the stream is done or the peer is gone.
        drop(self.tx);
        let conn = self.conn;
        tokio::spawn(async move {
            if let Conn::Quic(c) = &conn {
                let _ = tokio::time::timeout(Duration::from_millis(500), c.closed()).await;
            } else {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            conn.close_now();
        });
    }
}

/// A connection being opened.
type Opening = Pin<Box<dyn Future<Output = Result<Link, ControlError>> + Send>>;

/// How long QUIC has before TLS over TCP (same address and port number)
/// is tried too: the first to connect wins. A member whose UDP is blocked
/// still reaches the keyserver, a fraction of a second later.
const TCP_AFTER: Duration = Duration::from_millis(300);

/// Connects to the first reachable address and opens the control stream.
async fn open(
    endpoint: quinn::Endpoint,
    addrs: Vec<SocketAddr>,
    fingerprint: [u8; 32],
    cfg: ClientConfig,
) -> Result<Link, ControlError> {
    let config = quic_config(fingerprint, &cfg)?;
    let mut last = ControlError::NoAddress;
    for addr in addrs {
        let quic = async {
            let connecting = endpoint
                .connect_with(config.clone(), addr, proto::SERVER_NAME)
                .map_err(|e| ControlError::Connect(format!("{addr}: {e}")))?;
            let conn = connecting
                .await
                .map_err(|e| ControlError::Connect(format!("{addr}: {e}")))?;
            let (send, recv) = conn
                .open_bi()
                .await
                .map_err(|e| ControlError::Connection(format!("{addr}: {e}")))?;
            Ok::<_, ControlError>(Link::start(addr, conn, send, recv, cfg.max_frame))
        };
        let tcp = async {
            tokio::time::sleep(TCP_AFTER).await;
            let stream = tls_over_tcp(addr, fingerprint, proto::ALPN).await?;
            Ok::<_, ControlError>(Link::start_tcp(addr, stream, cfg.max_frame))
        };
        match tokio::time::timeout(cfg.connect_timeout, first_ok(quic, tcp)).await {
            Ok(Ok(link)) => return Ok(link),
            Ok(Err(e)) => last = e,
            Err(_) => last = ControlError::Connect(format!("{addr}: timed out")),
        }
    }
    Err(last)
}

/// The first of two attempts to succeed; if both fail, both reasons (a
/// certificate refused over QUIC says more than a refused TCP port, and
/// which of them fails last depends on timing).
async fn first_ok<T>(
    a: impl Future<Output = Result<T, ControlError>>,
    b: impl Future<Output = Result<T, ControlError>>,
) -> Result<T, ControlError> {
    tokio::pin!(a, b);
    let (mut a_err, mut b_err) = (None, None);
    loop {
        tokio::select! {
            r = &mut a, if a_err.is_none() => match r {
                Ok(v) => return Ok(v),
                Err(e) => a_err = Some(e),
            },
            r = &mut b, if b_err.is_none() => match r {
                Ok(v) => return Ok(v),
                Err(e) => b_err = Some(e),
            },
        }
        if let (Some(a), Some(b)) = (&a_err, &b_err) {
            return Err(match (a, b) {
                (ControlError::Connect(x), ControlError::Connect(y)) => {
                    ControlError::Connect(format!("{x}; {y}"))
                }
                _ => a_err.take().unwrap_or(ControlError::NoAddress),
            });
        }
    }
}

/// A TLS 1.3 connection over TCP to `addr` with the pinned certificate and
/// `alpn` (the control protocol or the relay).
pub async fn tls_over_tcp(
    addr: SocketAddr,
    fingerprint: [u8; 32],
    alpn: &[u8],
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, ControlError> {
    let tls = Arc::new(tls_client_config(fingerprint, alpn)?);
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| ControlError::Connect(format!("{addr} (tcp): {e}")))?;
    let _ = tcp.set_nodelay(true);
    let name = rustls::pki_types::ServerName::try_from(proto::SERVER_NAME)
        .map_err(|e| ControlError::Setup(e.to_string()))?;
    tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| ControlError::Connect(format!("{addr} (tcp): {e}")))
}

/// The rustls client configuration pinning `fingerprint`, TLS 1.3, ALPN
/// `alpn` ([`crate::pinned::client_config`]).
pub fn tls_client_config(
    fingerprint: [u8; 32],
    alpn: &[u8],
) -> Result<rustls::ClientConfig, ControlError> {
    crate::pinned::client_config(fingerprint, alpn).map_err(|e| ControlError::Setup(e.to_string()))
}

/// Spawns the task that reads server frames into a channel.
fn spawn_reader<R>(
    mut recv: R,
    max_frame: usize,
) -> (
    mpsc::Receiver<Result<ServerMsg, FrameError>>,
    tokio::task::AbortHandle,
)
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    let task = tokio::spawn(async move {
        loop {
            let msg = proto::read_frame::<ServerMsg, _>(&mut recv, max_frame).await;
            let stop = msg.is_err();
            if tx.send(msg).await.is_err() || stop {
                break;
            }
        }
    });
    (rx, task.abort_handle())
}

/// The current instant, from tokio's clock (so a paused test clock works).
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Asks the keyserver, with a gateway's credential, which networks the
/// gateway serves, with a one-use join token for each network of `join`
/// that the answer lists ([`proto::Request::Gateway`]). One connection,
/// one question, one answer; a refused credential is
/// [`ControlError::Refused`].
pub async fn gateway_grant(
    endpoint: &quinn::Endpoint,
    token: &proto::GatewayToken,
    join: Vec<crate::ids::NetworkId>,
    cfg: &ClientConfig,
) -> Result<proto::GatewayGrant, ControlError> {
    let link = open(
        endpoint.clone(),
        token.addrs.clone(),
        token.cert_sha256,
        cfg.clone(),
    )
    .await?;
    let hello = proto::Hello {
        version: proto::VERSION,
        request: proto::Request::Gateway(proto::GatewayRequest {
            secret: token.secret,
            join,
        }),
    };
    let frame = proto::encode_frame(&hello, cfg.max_frame)?;
    let mut link = link;
    let answer = async {
        link.tx
            .send(frame)
            .map_err(|_| ControlError::Connection("the link closed".into()))?;
        match link.rx.recv().await {
            Some(msg) => Ok(msg?),
            None => Err(ControlError::Connection("closed before an answer".into())),
        }
    };
    let answer = tokio::time::timeout(cfg.connect_timeout, answer)
        .await
        .map_err(|_| ControlError::Timeout)
        .and_then(|r| r);
    link.close();
    match answer? {
        ServerMsg::GatewayGrant(g) => Ok(g),
        ServerMsg::Error(e) => Err(ControlError::Refused(e)),
        other => Err(ControlError::Protocol(format!(
            "a {} in answer to a gateway's request",
            crate::member::kind_name(&other)
        ))),
    }
}

/// Joins the network of `token` with this member's metadata. Returns once
/// the welcome and the first snapshot arrived; a refusal is an error. With
/// [`MemberConfig::reconnect`] (the default) an unreachable keyserver is
/// retried until the caller gives up (drop the future).
pub async fn join(
    endpoint: &quinn::Endpoint,
    token: &JoinToken,
    meta: MemberMeta,
    cfg: &ClientConfig,
) -> Result<Session, ControlError> {
    join_with_services(endpoint, token, meta, Default::default(), cfg).await
}

/// [`join`], also asking for service groups (seed 002): the groups to
/// join and the ports to publish in a group owned by this member.
pub async fn join_with_services(
    endpoint: &quinn::Endpoint,
    token: &JoinToken,
    meta: MemberMeta,
    services: crate::services::JoinServices,
    cfg: &ClientConfig,
) -> Result<Session, ControlError> {
    let mut session = start_join_with_services(endpoint, token, meta, services, cfg)?;
    loop {
        if let Event::Snapshot = session.next_event().await? {
            return Ok(session);
        }
    }
}

/// A joining session that has not connected yet: every event, connection
/// attempts and their failures included, comes from
/// [`Session::next_event`]; the join is done at [`Event::Joined`] (persist
/// the membership) and the map is there at the following
/// [`Event::Snapshot`]. With [`MemberConfig::reconnect`], a keyserver that
/// is unreachable or busy is retried with backoff.
pub fn start_join(
    endpoint: &quinn::Endpoint,
    token: &JoinToken,
    meta: MemberMeta,
    cfg: &ClientConfig,
) -> Result<Session, ControlError> {
    start_join_with_services(endpoint, token, meta, Default::default(), cfg)
}

/// [`start_join`], also asking for service groups (seed 002): the groups
/// to join and the ports to publish in a group owned by this member.
pub fn start_join_with_services(
    endpoint: &quinn::Endpoint,
    token: &JoinToken,
    meta: MemberMeta,
    services: crate::services::JoinServices,
    cfg: &ClientConfig,
) -> Result<Session, ControlError> {
    if token.addrs.is_empty() {
        return Err(ControlError::NoAddress);
    }
    let mut core = MemberCore::join(cfg.core_config(), token.clone(), meta, now());
    core.set_join_services(services);
    Ok(Session::new(endpoint.clone(), core, cfg.clone()))
}

/// Reconnects an existing member, starting from its cached `map`: returns
/// once the welcome arrived; the missed deltas (or a snapshot) follow as
/// events.
pub async fn resume(
    endpoint: &quinn::Endpoint,
    addrs: &[SocketAddr],
    fingerprint: [u8; 32],
    map: NetworkMap,
    request: ResumeRequest,
    cfg: &ClientConfig,
) -> Result<Session, ControlError> {
    let membership = Membership {
        addrs: addrs.to_vec(),
        cert_sha256: fingerprint,
        network: request.network,
        public_key: request.public_key,
        credential: request.credential,
    };
    let mut map = map;
    map.generation = request.generation.min(map.generation);
    resume_membership(endpoint, &membership, map, request.endpoints, cfg).await
}

/// Resumes a stored [`Membership`] from a cached map (use an empty map of
/// generation 0 to get a snapshot). Returns once the welcome arrived.
pub async fn resume_membership(
    endpoint: &quinn::Endpoint,
    membership: &Membership,
    map: NetworkMap,
    endpoints: Vec<SocketAddr>,
    cfg: &ClientConfig,
) -> Result<Session, ControlError> {
    let mut session = start_resume(endpoint, membership, map, endpoints, vec![], cfg)?;
    loop {
        if let Event::Welcomed(_) = session.next_event().await? {
            return Ok(session);
        }
    }
}

/// A resuming session that has not connected yet: every event, the first
/// connection's included, comes from [`Session::next_event`] (the sidecar
/// starts this way, so that its data plane runs from the cache while the
/// keyserver is away).
pub fn start_resume(
    endpoint: &quinn::Endpoint,
    membership: &Membership,
    map: NetworkMap,
    endpoints: Vec<SocketAddr>,
    ports: Vec<u16>,
    cfg: &ClientConfig,
) -> Result<Session, ControlError> {
    if membership.addrs.is_empty() {
        return Err(ControlError::NoAddress);
    }
    let core = MemberCore::resume(
        cfg.core_config(),
        membership.clone(),
        map,
        endpoints,
        ports,
        now(),
    );
    Ok(Session::new(endpoint.clone(), core, cfg.clone()))
}

/// A membership's session with the keyserver: the member core plus the QUIC
/// connection it asks for.
pub struct Session {
    core: MemberCore,
    endpoint: quinn::Endpoint,
    cfg: ClientConfig,
    link: Option<Link>,
    opening: Option<Opening>,
    ended: bool,
    /// How the session ended, once it has.
    end: Option<End>,
    /// The keyserver of the open connection, or of the last one (whose
    /// loss or refusal is the latest news); `None` after a failed attempt.
    keyserver: Option<SocketAddr>,
    /// Why the last connection attempt failed (reported as is if the
    /// session ends on it).
    connect_error: Option<ControlError>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("core", &self.core)
            .field("connected", &self.link.is_some())
            .finish_non_exhaustive()
    }
}

impl Session {
    fn new(endpoint: quinn::Endpoint, core: MemberCore, cfg: ClientConfig) -> Self {
        Self {
            core,
            endpoint,
            cfg,
            link: None,
            opening: None,
            ended: false,
            end: None,
            keyserver: None,
            connect_error: None,
        }
    }

    /// What the keyserver assigned (IP, index, instance name, ...). Panics
    /// only if called before the first welcome, which [`join`] and
    /// [`resume`] wait for.
    pub fn welcome(&self) -> &Welcome {
        self.core
            .welcome()
            .expect("join and resume return after the welcome")
    }

    /// The last welcome, if any arrived (a [`start_resume`] session may not
    /// have connected yet).
    pub fn last_welcome(&self) -> Option<&Welcome> {
        self.core.welcome()
    }

    /// The current network map.
    pub fn map(&self) -> &NetworkMap {
        self.core.map()
    }

    /// The member's network.
    pub fn network(&self) -> NetworkId {
        self.core.map().network
    }

    /// The member core (state, connection, caught-up).
    pub fn core(&self) -> &MemberCore {
        &self.core
    }

    /// How the session ended, once it has: the typed end behind a terminal
    /// error of [`Session::next_event`] (a revocation, a final refusal of a
    /// join, a one-shot session's setback) or an asked-for end.
    pub fn end(&self) -> Option<&End> {
        self.end.as_ref()
    }

    /// The address of the keyserver on the open connection, or on the last
    /// one (the one whose refusal or loss was reported last); `None` before
    /// any connection and after an attempt that reached no keyserver.
    pub fn keyserver(&self) -> Option<SocketAddr> {
        self.keyserver
    }

    /// The reconnect credential; keep it (mode 0600) to [`resume`] later.
    pub fn credential(&self) -> Secret {
        self.core.membership().map_or([0; 32], |m| m.credential)
    }

    /// What to keep to [`resume_membership`] later without the token (its
    /// key is the current one, after rotations).
    pub fn membership(&self) -> Membership {
        self.core
            .membership()
            .cloned()
            .unwrap_or_else(|| Membership {
                addrs: vec![],
                cert_sha256: [0; 32],
                network: self.network(),
                public_key: self.core.public_key(),
                credential: [0; 32],
            })
    }

    /// The request to resume this membership later from the current map.
    pub fn resume_request(
        &self,
        public_key: PublicKey,
        endpoints: Vec<SocketAddr>,
    ) -> ResumeRequest {
        ResumeRequest {
            network: self.network(),
            public_key,
            credential: self.credential(),
            generation: self.map().generation,
            endpoints,
        }
    }

    /// Carries out what the core asked for.
    fn flush(&mut self) {
        while let Some(t) = self.core.poll_transmit() {
            match t {
                Transmit::Connect { addrs, cert_sha256 } => {
                    if let Some(link) = self.link.take() {
                        link.close();
                    }
                    let (ep, cfg) = (self.endpoint.clone(), self.cfg.clone());
                    self.opening = Some(Box::pin(open(ep, addrs, cert_sha256, cfg)));
                }
                Transmit::Send(frame) => {
                    let bytes = match &frame {
                        Frame::Hello(h) => proto::encode_frame(h, self.cfg.max_frame),
                        Frame::Msg(m) => proto::encode_frame(m, self.cfg.max_frame),
                    };
                    let sent = match (&self.link, bytes) {
                        (Some(link), Ok(b)) => link.tx.send(b).is_ok(),
                        _ => false,
                    };
                    if !sent && self.link.is_some() {
                        self.link = None;
                        self.core
                            .handle_disconnected(now(), "the control stream is closed".into());
                    }
                }
                Transmit::Close => {
                    self.opening = None;
                    if let Some(link) = self.link.take() {
                        link.close();
                    }
                }
            }
        }
    }

    /// Waits for the next event, driving the connection meanwhile.
    /// Cancel-safe. Terminal ends are errors: [`ControlError::Revoked`]
    /// (removed, or replaced by another key), [`ControlError::Refused`] (a
    /// join refused for good, a resume whose credential is unknown, or any
    /// refusal of a one-shot session), [`ControlError::Connection`] (a
    /// one-shot session lost its connection); [`Session::end`] then holds
    /// the typed end. An end the caller asked for (offline, leave) is
    /// `Ok(Event::Ended(_))`, and every call after an end is
    /// [`ControlError::Ended`].
    pub async fn next_event(&mut self) -> Result<Event, ControlError> {
        loop {
            self.flush();
            if let Some(ev) = self.core.poll_event() {
                return self.surface(ev);
            }
            if self.ended {
                return Err(ControlError::Ended);
            }
            self.wait().await;
        }
    }

    /// Turns terminal events into errors.
    fn surface(&mut self, ev: Event) -> Result<Event, ControlError> {
        let Event::Ended(end) = &ev else {
            return Ok(ev);
        };
        self.ended = true;
        self.end = Some(end.clone());
        self.opening = None;
        if let Some(link) = self.link.take() {
            link.close();
        }
        match end.clone() {
            // A credential the keyserver does not know is its refusal of
            // the hello (the caller may have sent a wrong one).
            End::Revoked(r) if r.reason == Revocation::UnknownCredential => {
                Err(ControlError::Refused(r.to_proto_error()))
            }
            End::Revoked(r) => Err(ControlError::Revoked(r)),
            End::Refused(e) | End::Lost(Setback::Refused(e)) => Err(ControlError::Refused(e)),
            End::Lost(Setback::Protocol(why)) => Err(ControlError::Protocol(why)),
            End::Lost(Setback::Unreachable(why)) => Err(self
                .connect_error
                .take()
                .unwrap_or(ControlError::Connection(why))),
            End::Offline { .. } | End::Left | End::LeaveUnconfirmed(_) => Ok(ev),
        }
    }

    /// Waits for one input and feeds it to the core.
    async fn wait(&mut self) {
        let deadline = self.core.poll_timeout();
        let Self {
            core,
            link,
            opening,
            connect_error,
            keyserver,
            ..
        } = self;
        tokio::select! {
            res = async { opening.as_mut().expect("guarded").await }, if opening.is_some() => {
                *opening = None;
                match res {
                    Ok(l) => {
                        *keyserver = Some(l.addr);
                        *link = Some(l);
                        *connect_error = None;
                        core.handle_connected(now());
                    }
                    Err(e) => {
                        *keyserver = None;
                        core.handle_connect_failed(now(), e.to_string());
                        *connect_error = Some(e);
                    }
                }
            }
            msg = async { link.as_mut().expect("guarded").rx.recv().await }, if link.is_some() => match msg {
                Some(Ok(m)) => core.handle_message(now(), m),
                Some(Err(e)) => {
                    *link = None;
                    let why = match e {
                        FrameError::Closed => "the keyserver closed the connection".to_owned(),
                        e => e.to_string(),
                    };
                    core.handle_disconnected(now(), why);
                }
                None => {
                    *link = None;
                    core.handle_disconnected(now(), "the control stream is closed".into());
                }
            },
            () = sleep_until(deadline) => core.handle_timeout(now()),
        }
    }

    /// Sends a message the member core did not ask for, as is (probes and
    /// tests of the keyserver's handling of odd clients). The answer, if
    /// any, arrives through [`Session::next_event`].
    pub async fn send_raw(&mut self, msg: &ClientMsg) -> Result<(), ControlError> {
        let link = self
            .link
            .as_ref()
            .ok_or_else(|| ControlError::Connection("not connected".into()))?;
        let frame = proto::encode_frame(msg, self.cfg.max_frame)?;
        link.tx
            .send(frame)
            .map_err(|_| ControlError::Connection("the control stream is closed".into()))
    }

    /// Sends a heartbeat now (the answer arrives as [`Event::HeartbeatAck`]).
    pub async fn heartbeat(&mut self) -> Result<(), ControlError> {
        self.live()?;
        self.core.heartbeat_now(now());
        self.flush();
        Ok(())
    }

    /// Tells the keyserver about new underlay endpoints (now if connected,
    /// else on the next connection).
    pub async fn update_endpoints(
        &mut self,
        endpoints: Vec<SocketAddr>,
    ) -> Result<(), ControlError> {
        self.live()?;
        self.core.set_endpoints(endpoints);
        self.flush();
        Ok(())
    }

    /// Tells the keyserver the ports the instance now serves.
    pub async fn update_ports(&mut self, ports: Vec<u16>) -> Result<(), ControlError> {
        self.live()?;
        self.core.set_ports(ports);
        self.flush();
        Ok(())
    }

    /// Starts replacing the member's key by `new`; [`Event::KeyRotated`] or
    /// [`Event::RotationFailed`] follows from [`Session::next_event`].
    pub fn rotate_key(&mut self, new: PublicKey) -> Result<(), crate::member::RequestError> {
        let r = self.core.rotate_key(now(), new);
        self.flush();
        r
    }

    /// Asks the keyserver to wake `service` (see [`MemberCore::wake`]):
    /// `Ok(true)` when a request went out or waits for the connection,
    /// `Ok(false)` when one already did within the wake timeout.
    pub fn wake(&mut self, service: &str) -> Result<bool, crate::member::RequestError> {
        let r = self.core.wake(now(), service);
        self.flush();
        r
    }

    /// Replaces the traffic report the core sends (see
    /// [`MemberCore::report_traffic`]).
    pub fn report_traffic(
        &mut self,
        report: crate::traffic::TrafficReport,
    ) -> Result<(), crate::member::RequestError> {
        let r = self.core.report_traffic(now(), report);
        self.flush();
        r
    }

    /// Finishes a rotation to `new` that a previous run left unconfirmed
    /// (see [`MemberCore::resume_rotation`]).
    pub fn resume_rotation(&mut self, new: PublicKey) {
        self.core.resume_rotation(new);
    }

    /// Restarts the key lifetime clock (after a rotation).
    pub fn key_renewed(&mut self) {
        self.core.key_renewed(now());
    }

    fn live(&self) -> Result<(), ControlError> {
        if self.ended {
            Err(ControlError::Ended)
        } else {
            Ok(())
        }
    }

    /// Drives the session until it ends, at most `limit`; the end, if seen.
    async fn finish(&mut self, limit: Duration) -> Option<End> {
        let run = async {
            loop {
                match self.next_event().await {
                    Ok(Event::Ended(end)) => return Some(end),
                    Ok(_) => {}
                    Err(_) => return self.end.clone(),
                }
            }
        };
        tokio::time::timeout(limit, run).await.ok().flatten()
    }

    /// Stops gracefully: the keyserver marks the member offline at once
    /// (peers stop naming and reaching it; its address and names stay
    /// reserved). Waits for the confirmation, bounded by the member
    /// config's `goodbye_timeout`. True when confirmed.
    pub async fn shutdown(&mut self) -> bool {
        self.core.shutdown(now());
        let limit = self.cfg.member.goodbye_timeout + Duration::from_millis(500);
        let end = self.finish(limit).await;
        self.disconnect();
        matches!(end, Some(End::Offline { confirmed: true }))
    }

    /// Leaves the network: the keyserver releases this membership (peers
    /// drop it within a second) and confirms; connects first if needed.
    /// Waits up to `limit`. True when the keyserver confirmed, or said the
    /// membership was already gone (revoked, or its credential unknown).
    pub async fn leave(&mut self, limit: Duration) -> bool {
        if self.core.leave(now()).is_err() {
            self.disconnect();
            return false;
        }
        let end = self.finish(limit).await;
        self.disconnect();
        matches!(end, Some(End::Left | End::Revoked(_)))
    }

    /// Closes the connection at once, saying nothing (the keyserver notices
    /// the silence after `offline-after`).
    pub fn close(mut self) {
        self.disconnect();
    }

    fn disconnect(&mut self) {
        self.ended = true;
        self.opening = None;
        if let Some(link) = self.link.take() {
            link.conn.close_now();
        }
    }
}

/// Sleeps until `deadline`, or forever.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both attempts failing report both reasons, whichever failed last;
    /// the first success wins.
    #[tokio::test]
    async fn first_ok_keeps_both_reasons() {
        let fail = |msg: &'static str, ms: u64| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Err::<(), _>(ControlError::Connect(msg.into()))
        };
        for (qa, tb) in [(1, 20), (20, 1)] {
            let e = first_ok(fail("bad certificate", qa), fail("(tcp): refused", tb))
                .await
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("bad certificate") && e.contains("refused"),
                "{e}"
            );
        }
        let ok = first_ok(fail("quic", 1), async { Ok::<_, ControlError>(()) }).await;
        assert!(ok.is_ok());
    }
}
