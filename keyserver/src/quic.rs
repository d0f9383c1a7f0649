//! The QUIC driver: accepts sidecars, runs the control protocol
//! ([`meshlib::proto`]) on one bidirectional stream per connection, and
//! forwards the network's pushes.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use meshlib::ids::NetworkId;
use meshlib::keys::PublicKey;
use meshlib::proto::{
    self, ClientMsg, ErrorCode, FrameError, Hello, ProtoError, Request, ServerMsg, Welcome,
};
use parking_lot::Mutex;
use rand_core::RngCore as _;
use tokio::sync::{broadcast, mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use meshlib::netmap::Member;

use crate::admission::Admission;
use crate::registry::{Catchup, Change, ProtoOpError};
use crate::server::{Online, OpError, Push, Shared};

/// Why the QUIC endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum QuicSetupError {
    /// The certificate or key is unusable.
    #[error("TLS setup: {0}")]
    Tls(String),
    /// The UDP socket could not be bound.
    #[error("cannot bind QUIC endpoint on {addr}: {cause}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        cause: std::io::Error,
    },
}

/// Builds the QUIC server endpoint on `addr` with the keyserver's certificate.
pub fn endpoint(
    addr: SocketAddr,
    cert_der: Vec<u8>,
    key_der: Vec<u8>,
    limits: &crate::server::Limits,
) -> Result<quinn::Endpoint, QuicSetupError> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls_err = |e: &dyn std::fmt::Display| QuicSetupError::Tls(e.to_string());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_err(&e))?
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert_der)],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der)),
        )
        .map_err(|e| tls_err(&e))?;
    tls.alpn_protocols = vec![proto::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| tls_err(&e))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    let idle = quinn::IdleTimeout::try_from(limits.idle_timeout).map_err(|e| tls_err(&e))?;
    transport
        .max_idle_timeout(Some(idle))
        .max_concurrent_bidi_streams(1u32.into())
        .max_concurrent_uni_streams(0u32.into());
    config.transport_config(Arc::new(transport));
    let bind = |cause| QuicSetupError::Bind { addr, cause };
    let socket = udp_socket(addr).map_err(bind)?;
    let runtime = Arc::new(quinn::TokioRuntime);
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(config),
        socket,
        runtime,
    )
    .map_err(bind)
}

/// Socket buffer size asked for: one keyserver socket carries the pushes to
/// every member, and a burst (one change to a thousand members, a snapshot
/// per join) overflows the kernel's default buffers, turning into losses and
/// retransmission delays. Best effort: the kernel caps it at `rmem_max`/`wmem_max`.
const SOCKET_BUFFER: usize = 8 << 20;

/// The UDP socket of the endpoint, with large buffers.
fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        let _ = socket.set_only_v6(false);
    }
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Accepts connections until `shutdown` completes. Connections without a
/// hello yet are admitted by [`Admission`] (their own budget, oldest evicted
/// when full, a deadline of `limits.hello_timeout`); past the hello, at most
/// `limits.max_connections` sessions run at a time (more are told `Busy`).
pub async fn run(
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()>,
) {
    let gate = Arc::new(Gate {
        state: Mutex::new((
            Admission::new(
                shared.limits.max_unauthenticated,
                shared.limits.max_unauthenticated_per_source,
            ),
            HashMap::new(),
        )),
        slots: Arc::new(Semaphore::new(shared.limits.max_connections)),
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            () = &mut shutdown => break,
        };
        let Some(incoming) = incoming else { break };
        let ticket = gate.admit(incoming.remote_address(), shared.limits.hello_timeout);
        let shared = shared.clone();
        let mut stop = stop_rx.clone();
        tasks.spawn(async move {
            tokio::select! {
                () = connection(incoming, shared, ticket) => {}
                _ = stop.changed() => {}
            }
        });
    }
    let _ = stop_tx.send(true);
    endpoint.close(0u32.into(), b"shutdown");
    // Every session has released the shared state when this returns.
    while tasks.join_next().await.is_some() {}
}

/// Connection admission shared by the accept loop and the connections.
struct Gate {
    /// Pending connections, and how to end each (by admission id).
    state: Mutex<(Admission, HashMap<u64, oneshot::Sender<()>>)>,
    /// Established sessions.
    slots: Arc<Semaphore>,
}

impl Gate {
    /// Admits a new connection, ending the ones it evicts.
    fn admit(self: &Arc<Self>, remote: SocketAddr, timeout: std::time::Duration) -> Ticket {
        let (tx, evicted) = oneshot::channel();
        let mut state = self.state.lock();
        let admitted = state.0.admit(remote.ip());
        for id in &admitted.evict {
            if let Some(end) = state.1.remove(id) {
                let _ = end.send(());
            }
        }
        state.1.insert(admitted.id, tx);
        if !admitted.evict.is_empty() {
            tracing::debug!(
                %remote,
                pending = state.0.pending(),
                "connections without a hello at their limit: evicted the oldest"
            );
        }
        Ticket {
            id: admitted.id,
            gate: self.clone(),
            evicted,
            deadline: tokio::time::Instant::now() + timeout,
            pending: true,
            _slot: None,
        }
    }

    fn leave(&self, id: u64) {
        let mut state = self.state.lock();
        state.0.leave(id);
        state.1.remove(&id);
    }
}

/// One connection's place: pending until its hello, then an established
/// slot held until it ends.
struct Ticket {
    id: u64,
    gate: Arc<Gate>,
    /// Fires when a newer connection evicted this one.
    evicted: oneshot::Receiver<()>,
    /// End of the hello deadline.
    deadline: tokio::time::Instant,
    pending: bool,
    _slot: Option<OwnedSemaphorePermit>,
}

/// Why a pending step did not finish.
#[derive(Debug)]
enum NotInTime {
    Deadline,
    Evicted,
}

impl Ticket {
    /// Runs a step of the pending phase (handshake, stream, hello) within
    /// the hello deadline and unless evicted.
    async fn pending<T>(&mut self, step: impl Future<Output = T>) -> Result<T, NotInTime> {
        tokio::select! {
            r = tokio::time::timeout_at(self.deadline, step) => r.map_err(|_| NotInTime::Deadline),
            _ = &mut self.evicted => Err(NotInTime::Evicted),
        }
    }

    /// The hello arrived: leave the pending budget and take an established
    /// slot, or refuse with `Busy`.
    fn promote(&mut self) -> Result<(), Fatal> {
        self.gate.leave(self.id);
        self.pending = false;
        let slot = self.gate.slots.clone().try_acquire_owned().map_err(|_| {
            Fatal(
                ErrorCode::Busy,
                "the keyserver is at its connection limit; retry later".into(),
            )
        })?;
        self._slot = Some(slot);
        Ok(())
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.pending {
            self.gate.leave(self.id);
        }
    }
}

/// A session's fatal end: tell the client why, then close.
struct Fatal(ErrorCode, String);

impl From<FrameError> for Fatal {
    fn from(e: FrameError) -> Self {
        Fatal(ErrorCode::Malformed, e.to_string())
    }
}

impl From<NotInTime> for Fatal {
    fn from(e: NotInTime) -> Self {
        match e {
            NotInTime::Deadline => Fatal(ErrorCode::Malformed, "no hello in time".into()),
            NotInTime::Evicted => Fatal(
                ErrorCode::Busy,
                "too many connections without a hello; this one was the oldest".into(),
            ),
        }
    }
}

/// Handles one connection from handshake to close.
async fn connection(incoming: quinn::Incoming, shared: Arc<Shared>, mut ticket: Ticket) {
    let remote = incoming.remote_address();
    let conn = match ticket.pending(async { incoming.accept()?.await }).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            tracing::debug!(%remote, "QUIC handshake with {remote} failed: {e}");
            return;
        }
        Err(e) => {
            tracing::debug!(%remote, "QUIC handshake with {remote} not done: {e:?}");
            return;
        }
    };
    let Ok(Ok((mut send, recv))) = ticket.pending(conn.accept_bi()).await else {
        conn.close(1u32.into(), b"no control stream");
        return;
    };
    let result = session(&conn, &mut send, recv, &shared, &mut ticket).await;
    if let Err(Fatal(code, message)) = result {
        tracing::debug!(remote = %conn.remote_address(), ?code, %message, "session ended");
        let msg = ServerMsg::Error(ProtoError { code, message });
        let _ = proto::write_frame(&mut send, &msg, shared.limits.max_frame).await;
    }
    let _ = send.finish();
    // Let the client read the last frame before the connection goes away.
    let _ = tokio::time::timeout(shared.limits.hello_timeout, send.stopped()).await;
    conn.close(0u32.into(), b"done");
}

/// Spawns the task that reads client frames (keeps the session loop cancel-safe).
fn spawn_reader(
    mut recv: quinn::RecvStream,
    max: usize,
) -> mpsc::Receiver<Result<ClientMsg, FrameError>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let msg = proto::read_frame::<ClientMsg, _>(&mut recv, max).await;
            let stop = msg.is_err();
            if tx.send(msg).await.is_err() || stop {
                break;
            }
        }
    });
    rx
}

/// Where a session stands.
struct Session {
    network: NetworkId,
    key: PublicKey,
    /// Last generation sent to the client.
    sent: u64,
    /// The client's address as last seen on the connection (QUIC follows a
    /// client whose address changes, e.g. a NAT rebinding).
    observed: SocketAddr,
    /// The endpoints the member advertised last.
    advertised: Vec<SocketAddr>,
}

/// Runs `f` on a blocking thread (store commits fsync).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Fatal> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Fatal(ErrorCode::Internal, e.to_string()))
}

/// Maps a refused or failed operation to a fatal session error.
fn op_fatal(e: OpError<ProtoOpError>) -> Fatal {
    match e {
        OpError::Refused(e) => Fatal(e.code(), e.to_string()),
        OpError::Store(e) => Fatal(ErrorCode::Internal, e.to_string()),
    }
}

/// The control protocol on one stream.
async fn session(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    mut recv: quinn::RecvStream,
    shared: &Arc<Shared>,
    ticket: &mut Ticket,
) -> Result<(), Fatal> {
    let max = shared.limits.max_frame;
    let hello: Hello = ticket.pending(proto::read_frame(&mut recv, max)).await??;
    ticket.promote()?;
    if hello.version != proto::VERSION {
        return Err(Fatal(
            ErrorCode::UnsupportedVersion,
            format!(
                "server speaks version {}, client {}",
                proto::VERSION,
                hello.version
            ),
        ));
    }
    let observed = conn.remote_address();
    let ((welcome, first, mut pushes, _online), advertised) = match hello.request {
        Request::Join(req) => {
            let advertised = req.endpoints.clone();
            (join(shared, req, observed).await?, advertised)
        }
        Request::Resume(req) => {
            let advertised = req.endpoints.clone();
            (resume(shared, req, observed).await?, advertised)
        }
    };
    let mut s = Session {
        network: welcome.network,
        key: match &first {
            First::Snapshot(_, key) | First::Catchup(_, key, _) => *key,
        },
        sent: 0,
        observed,
        advertised,
    };
    proto::write_frame(send, &ServerMsg::Welcome(welcome), max).await?;
    match first {
        First::Snapshot(map, _) => {
            s.sent = map.generation;
            proto::write_frame(send, &ServerMsg::Snapshot(map), max).await?;
        }
        First::Catchup(c, _, gen) => {
            s.sent = gen;
            send_catchup(send, &mut s, c, max).await?;
        }
    }
    let mut client = spawn_reader(recv, max);
    loop {
        tokio::select! {
            push = pushes.recv() => on_push(send, &mut s, shared, push).await?,
            msg = client.recv() => match msg {
                None | Some(Err(FrameError::Closed)) => return Ok(()),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(msg)) => {
                    let roamed = conn.remote_address() != s.observed;
                    s.observed = conn.remote_address();
                    on_client(send, &mut s, shared, msg, roamed).await?;
                }
            },
        }
    }
}

/// What a fresh session sends after the welcome.
enum First {
    /// A join: the whole map.
    Snapshot(meshlib::netmap::NetworkMap, PublicKey),
    /// A resume: catch-up (including the resume's own endpoint change) from
    /// the client's generation.
    Catchup(Catchup, PublicKey, u64),
}

/// What a session starts with; [`Online`] counts it open until it ends.
type Started = (Welcome, First, broadcast::Receiver<Push>, Online);

async fn join(
    shared: &Arc<Shared>,
    req: proto::JoinRequest,
    observed: SocketAddr,
) -> Result<Started, Fatal> {
    let mut credential = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut credential);
    let sh = shared.clone();
    let (joined, (pushes, online)) = blocking(move || {
        sh.mutate(
            |reg| {
                let online = sh.is_online(req.network, &req.public_key);
                let j = reg.join(&req, observed, &credential, online, SystemTime::now())?;
                let (ops, change) = (j.ops.clone(), j.change.clone());
                Ok((j, ops, change.into_iter().collect()))
            },
            |_, j, sh| {
                let key = j.member.public_key;
                (sh.subscribe(j.map.network), sh.online(j.map.network, key))
            },
        )
    })
    .await?
    .map_err(op_fatal)?;
    if joined.rejoined {
        tracing::info!(network = %joined.map.network, member = %joined.member.public_key, "retried join: membership given back with a new credential");
    }
    let welcome = welcome_of(
        &joined.member,
        joined.map.network,
        Some(credential),
        observed,
    );
    let key = joined.member.public_key;
    Ok((welcome, First::Snapshot(joined.map, key), pushes, online))
}

async fn resume(
    shared: &Arc<Shared>,
    req: proto::ResumeRequest,
    observed: SocketAddr,
) -> Result<Started, Fatal> {
    let sh = shared.clone();
    let (network, from) = (req.network, req.generation);
    let key = req.public_key;
    let (resumed, (pushes, online)) = blocking(move || {
        sh.mutate(
            |reg| {
                let r = reg.resume(&req, observed, SystemTime::now())?;
                let changes: Vec<Change> = r.change.iter().cloned().collect();
                let ops = r.ops.clone();
                Ok((r, ops, changes))
            },
            |_, _, sh| (sh.subscribe(network), sh.online(network, key)),
        )
    })
    .await?
    .map_err(op_fatal)?;
    let welcome = welcome_of(&resumed.member, network, None, observed);
    Ok((
        welcome,
        First::Catchup(resumed.catchup, key, from),
        pushes,
        online,
    ))
}

fn welcome_of(
    m: &Member,
    network: NetworkId,
    credential: Option<[u8; 32]>,
    observed: SocketAddr,
) -> Welcome {
    Welcome {
        version: proto::VERSION,
        network,
        ip: m.ip,
        index: m.index,
        instance: m.instance.clone(),
        app_id: m.app_id.clone(),
        credential,
        observed,
    }
}

/// Sends a catch-up and advances `s.sent`.
async fn send_catchup(
    send: &mut quinn::SendStream,
    s: &mut Session,
    c: Catchup,
    max: usize,
) -> Result<(), Fatal> {
    match c {
        Catchup::UpToDate => {}
        Catchup::Delta(d) => {
            s.sent = d.to;
            proto::write_frame(send, &ServerMsg::Delta(d), max).await?;
        }
        Catchup::Snapshot(map) => {
            s.sent = map.generation;
            proto::write_frame(send, &ServerMsg::Snapshot(map), max).await?;
        }
    }
    Ok(())
}

/// Forwards one push (or catches up after a gap or lag).
async fn on_push(
    send: &mut quinn::SendStream,
    s: &mut Session,
    shared: &Arc<Shared>,
    push: Result<Push, broadcast::error::RecvError>,
) -> Result<(), Fatal> {
    let revoked = || {
        Fatal(
            ErrorCode::Revoked,
            "this member was removed from its network".into(),
        )
    };
    match push {
        Ok(p) if p.to <= s.sent => Ok(()),
        Ok(p) if p.from == s.sent => {
            send.write_all(&p.frame)
                .await
                .map_err(|e| Fatal(ErrorCode::Internal, e.to_string()))?;
            s.sent = p.to;
            if p.removed == Some(s.key) {
                return Err(revoked());
            }
            Ok(())
        }
        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
            let (net, key, sent) = (s.network, s.key, s.sent);
            let (still, c) = shared.read(|r| (r.is_member(net, &key), r.catchup(net, sent)));
            if !still {
                return Err(revoked());
            }
            if let Some(c) = c {
                send_catchup(send, s, c, shared.limits.max_frame).await?;
            }
            Ok(())
        }
        Err(broadcast::error::RecvError::Closed) => {
            Err(Fatal(ErrorCode::Internal, "shutting down".into()))
        }
    }
}

/// Handles one client message. `roamed`: the client's address changed
/// since the last message, so its observed endpoint is updated too.
async fn on_client(
    send: &mut quinn::SendStream,
    s: &mut Session,
    shared: &Arc<Shared>,
    msg: ClientMsg,
    roamed: bool,
) -> Result<(), Fatal> {
    let max = shared.limits.max_frame;
    if let ClientMsg::UpdateEndpoints(eps) = &msg {
        s.advertised.clone_from(eps);
    }
    if roamed || matches!(msg, ClientMsg::UpdateEndpoints(_)) {
        let (sh, net, key) = (shared.clone(), s.network, s.key);
        let (eps, obs) = (s.advertised.clone(), s.observed);
        blocking(move || {
            sh.mutate(
                |reg| {
                    let (change, ops) =
                        reg.update_endpoints(net, &key, &eps, obs, SystemTime::now());
                    Ok::<_, ProtoOpError>(((), ops, change.into_iter().collect()))
                },
                |_, _, _| (),
            )
        })
        .await?
        .map_err(op_fatal)?;
    }
    match msg {
        ClientMsg::Heartbeat => {
            shared.heartbeat(s.network, &s.key, SystemTime::now());
            // The generation this session has delivered: the client compares
            // it with its map to notice anything lost.
            let generation = s.sent;
            proto::write_frame(send, &ServerMsg::HeartbeatAck { generation }, max).await?;
        }
        ClientMsg::UpdateEndpoints(_) => {}
        ClientMsg::GetMap(net) if net == s.network => {
            if let Some(map) = shared.read(|r| r.snapshot(net)) {
                s.sent = map.generation;
                proto::write_frame(send, &ServerMsg::Snapshot(map), max).await?;
            }
        }
        ClientMsg::UpdatePorts(ports) => {
            let (sh, net, key) = (shared.clone(), s.network, s.key);
            blocking(move || {
                sh.mutate(
                    |reg| {
                        let (change, ops) = reg.update_ports(net, &key, &ports);
                        Ok::<_, ProtoOpError>(((), ops, change.into_iter().collect()))
                    },
                    |_, _, _| (),
                )
            })
            .await?
            .map_err(op_fatal)?;
        }
        ClientMsg::Leave => {
            let (sh, net, key) = (shared.clone(), s.network, s.key);
            let left = blocking(move || {
                sh.mutate(
                    |reg| {
                        let (change, ops) =
                            reg.remove_member(net, &key.to_string(), SystemTime::now())?;
                        tracing::info!(network = %net, member = %key, "member left");
                        Ok::<_, crate::registry::AdminError>(((), ops, vec![change]))
                    },
                    |_, _, _| (),
                )
            })
            .await?;
            if let Err(e) = left {
                tracing::warn!(member = %s.key, "leave failed: {e}");
                return Err(Fatal(ErrorCode::Internal, e.to_string()));
            }
            return Err(Fatal(ErrorCode::Revoked, "left the network".into()));
        }
        ClientMsg::GetMap(other) => {
            let err = ProtoError {
                code: ErrorCode::Forbidden,
                message: format!("not a member of network {other}"),
            };
            proto::write_frame(send, &ServerMsg::Error(err), max).await?;
        }
    }
    Ok(())
}
