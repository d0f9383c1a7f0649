//! The QUIC driver: admits connections (a budget for those that have not
//! said hello, a limit on established sessions) and drives one
//! [`StreamSession`] (the pure per-stream logic) per connection's
//! bidirectional stream: reads frames, forwards the network's pushes,
//! writes replies.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use meshlib::proto::{self, ClientMsg, ErrorCode, FrameError, Hello};
use parking_lot::Mutex;
use rand_core::RngCore as _;
use tokio::sync::{broadcast, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::admission::Admission;
use crate::server::{Push, Shared};
use crate::session::{Fatal, Next, Reply, StreamSession};

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
    // Members never resume TLS sessions (they reconnect with a credential):
    // tickets would be work and buffers for nothing.
    tls.send_tls13_tickets = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| tls_err(&e))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    let idle = quinn::IdleTimeout::try_from(limits.idle_timeout).map_err(|e| tls_err(&e))?;
    // A member sends small messages (heartbeats, endpoints, ports): small
    // receive windows bound what one connection can make the keyserver
    // buffer; no datagrams are used. The send window still takes a full
    // snapshot (about 290 KB for a /22) with room.
    transport
        .max_idle_timeout(Some(idle))
        .max_concurrent_bidi_streams(1u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window(quinn::VarInt::from_u32(64 * 1024))
        .receive_window(quinn::VarInt::from_u32(128 * 1024))
        .send_window(2 * 1024 * 1024)
        .datagram_receive_buffer_size(None)
        // One datagram per send: with segmentation offload every
        // connection keeps a send buffer of up to ten datagrams (about
        // 14 KB) once a snapshot went out, which at 10,000 members is
        // more than the rest of its state.
        .enable_segmentation_offload(false);
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
    let gate = Gate::new(&shared);
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
        // Boxed: what a task captures stays in it for as long as it runs.
        let incoming = Box::new(incoming);
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
pub(crate) struct Gate {
    /// Pending connections, and how to end each (by admission id).
    state: Mutex<(Admission, HashMap<u64, oneshot::Sender<()>>)>,
    /// Established sessions.
    slots: Arc<Semaphore>,
}

impl Gate {
    /// A gate with the limits of `shared`.
    pub(crate) fn new(shared: &Shared) -> Arc<Self> {
        Arc::new(Gate {
            state: Mutex::new((
                Admission::new(
                    shared.limits.max_unauthenticated,
                    shared.limits.max_unauthenticated_per_source,
                ),
                HashMap::new(),
            )),
            slots: Arc::new(Semaphore::new(shared.limits.max_connections)),
        })
    }

    /// Admits a new connection, ending the ones it evicts.
    pub(crate) fn admit(
        self: &Arc<Self>,
        remote: SocketAddr,
        timeout: std::time::Duration,
    ) -> Ticket {
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
pub(crate) struct Ticket {
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
pub(crate) enum NotInTime {
    Deadline,
    Evicted,
}

impl Ticket {
    /// Runs a step of the pending phase (handshake, stream, hello) within
    /// the hello deadline and unless evicted.
    pub(crate) async fn pending<T>(
        &mut self,
        step: impl Future<Output = T>,
    ) -> Result<T, NotInTime> {
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
///
/// Every step but the session is boxed while it runs: a task's memory is
/// that of its largest state for as long as it lives, and a member's task
/// lives as long as its session.
async fn connection(incoming: Box<quinn::Incoming>, shared: Arc<Shared>, mut ticket: Ticket) {
    let remote = incoming.remote_address();
    let handshake = Box::pin(ticket.pending(async { (*incoming).accept()?.await }));
    let conn = match handshake.await {
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
    let Ok(Ok((mut send, recv))) = Box::pin(ticket.pending(conn.accept_bi())).await else {
        conn.close(1u32.into(), b"no control stream");
        return;
    };
    let result = Box::pin(drive(&conn, &mut send, recv, &shared, &mut ticket)).await;
    Box::pin(end(&conn, send, result, &shared)).await;
}

/// Ends a connection: the reason if it failed, then the stream's end, which
/// the client gets to read before the connection goes away.
async fn end(
    conn: &quinn::Connection,
    mut send: quinn::SendStream,
    result: Result<(), Fatal>,
    shared: &Shared,
) {
    if let Err(fatal) = result {
        shared.metrics.refused(fatal.0);
        tracing::debug!(remote = %conn.remote_address(), code = ?fatal.0, message = %fatal.1, "session ended");
        let _ = proto::write_frame(&mut send, &fatal.frame(), shared.limits.max_frame).await;
    }
    let _ = send.finish();
    let _ = tokio::time::timeout(shared.limits.hello_timeout, send.stopped()).await;
    conn.close(0u32.into(), b"done");
}

/// Reads client frames in the session loop itself, cancel-safe: what has
/// arrived of a frame is kept here between calls (`AsyncReadExt::read` is
/// cancel-safe), so no task and channel per session are needed. Works on
/// the QUIC stream and on TLS over TCP alike.
struct FrameReader<R> {
    recv: R,
    max: usize,
    /// The length prefix as far as read.
    len: [u8; 4],
    got_len: usize,
    /// The payload as far as read (allocated once its length is known).
    payload: Vec<u8>,
    got: usize,
}

impl<R: tokio::io::AsyncRead + Unpin> FrameReader<R> {
    fn new(recv: R, max: usize) -> Self {
        Self {
            recv,
            max,
            len: [0; 4],
            got_len: 0,
            payload: Vec::new(),
            got: 0,
        }
    }

    /// The next client message. Cancel-safe.
    async fn next(&mut self) -> Result<ClientMsg, FrameError> {
        use tokio::io::AsyncReadExt as _;
        while self.got_len < 4 {
            match self.recv.read(&mut self.len[self.got_len..]).await? {
                0 if self.got_len == 0 => return Err(FrameError::Closed),
                0 => return Err(FrameError::Truncated),
                n => self.got_len += n,
            }
            if self.got_len == 4 {
                let len = u32::from_be_bytes(self.len) as usize;
                if len > self.max {
                    return Err(FrameError::TooLarge { len, max: self.max });
                }
                self.payload = vec![0; len];
                self.got = 0;
            }
        }
        while self.got < self.payload.len() {
            match self.recv.read(&mut self.payload[self.got..]).await? {
                0 => return Err(FrameError::Truncated),
                n => self.got += n,
            }
        }
        self.got_len = 0;
        let payload = std::mem::take(&mut self.payload);
        proto::decode_payload(&payload)
    }
}

/// Runs `f` on a blocking thread (store commits fsync).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Fatal> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Fatal(ErrorCode::Internal, e.to_string()))
}

/// Writes a session's replies.
async fn write<W>(send: &mut W, replies: Vec<Reply>, max: usize) -> Result<(), Fatal>
where
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt as _;
    let io = |e: std::io::Error| Fatal(ErrorCode::Internal, e.to_string());
    match replies.as_slice() {
        [] => Ok(()),
        [Reply::Frame(f)] => send.write_all(f).await.map_err(io),
        _ if replies
            .iter()
            .any(|r| matches!(r, Reply::Frame(f) if f.len() > COPY_BELOW)) =>
        {
            // A shared snapshot: written from its shared bytes, not copied.
            for r in replies {
                match r {
                    Reply::Msg(m) => proto::write_frame(send, &m, max).await?,
                    Reply::Frame(f) => send.write_all(&f).await.map_err(io)?,
                }
            }
            Ok(())
        }
        _ => {
            // Several small frames: one write, so the transport sends them
            // in as few packets as fit (and wakes its driver once).
            let mut buf = Vec::new();
            for r in &replies {
                match r {
                    Reply::Msg(m) => buf.extend(proto::encode_frame(m, max)?),
                    Reply::Frame(f) => buf.extend_from_slice(f),
                }
            }
            send.write_all(&buf).await.map_err(io)
        }
    }
}

/// Frames up to this size are copied to be written together ([`write`]).
const COPY_BELOW: usize = 16 * 1024;

/// Most pushes taken together into one write (see [`drive_stream`]).
const PUSH_BATCH: usize = 64;

/// The pushes already waiting after `first`, up to [`PUSH_BATCH`] in all,
/// turned into replies in order: a member that fell behind (a change storm
/// while its task waited for a core) gets what piled up in one write rather
/// than one write per change. Waits for nothing.
fn take_pushes(
    session: &mut StreamSession,
    shared: &Shared,
    pushes: &mut broadcast::Receiver<Push>,
    first: Result<Push, broadcast::error::RecvError>,
) -> Result<(Vec<Reply>, Option<Instant>), Fatal> {
    use broadcast::error::{RecvError, TryRecvError};
    let mut oldest = first.as_ref().ok().map(|p| p.at);
    let mut replies = session.on_push(shared, first)?;
    for _ in 1..PUSH_BATCH {
        let next = match pushes.try_recv() {
            Ok(p) => Ok(p),
            Err(TryRecvError::Empty) => break,
            Err(TryRecvError::Lagged(n)) => Err(RecvError::Lagged(n)),
            Err(TryRecvError::Closed) => Err(RecvError::Closed),
        };
        if let Ok(p) = &next {
            oldest = Some(oldest.map_or(p.at, |o| o.min(p.at)));
        }
        replies.extend(session.on_push(shared, next)?);
    }
    Ok((replies, oldest))
}

/// Drives one member's [`StreamSession`] over the QUIC stream.
async fn drive(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    recv: quinn::RecvStream,
    shared: &Arc<Shared>,
    ticket: &mut Ticket,
) -> Result<(), Fatal> {
    drive_stream(&|| conn.remote_address(), send, recv, shared, ticket).await
}

/// Drives one member's [`StreamSession`] over any ordered byte stream (the
/// QUIC stream, or TLS over TCP for members whose UDP is blocked);
/// `observed` says where the client is seen now.
///
/// A member's task lives as long as its session and its memory is that of
/// its largest state, so the opening (hello, snapshot) runs in its own
/// boxed future, freed once done, and the loop's transient steps (a write,
/// a commit) are boxed while they run: what stays per member is the
/// session, the reader and the loop's select.
pub(crate) async fn drive_stream<W, R>(
    observe: &(dyn Fn() -> SocketAddr + Sync),
    send: &mut W,
    recv: R,
    shared: &Arc<Shared>,
    ticket: &mut Ticket,
) -> Result<(), Fatal>
where
    W: tokio::io::AsyncWrite + Unpin + Send,
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    let Some((session, mut live)) = Box::pin(open(observe, send, recv, shared, ticket)).await?
    else {
        return Ok(());
    };
    session_loop(observe, send, session, &mut live, shared).await
}

/// What a running session's loop waits on, besides the session itself.
struct Live<R> {
    client: FrameReader<R>,
    pushes: broadcast::Receiver<Push>,
    relay: tokio::sync::watch::Receiver<Option<SocketAddr>>,
}

/// Reads the hello and opens the session (or answers a gateway's question
/// and ends: `None`).
async fn open<W, R>(
    observe: &(dyn Fn() -> SocketAddr + Sync),
    send: &mut W,
    mut recv: R,
    shared: &Arc<Shared>,
    ticket: &mut Ticket,
) -> Result<Option<(Box<StreamSession>, Box<Live<R>>)>, Fatal>
where
    W: tokio::io::AsyncWrite + Unpin + Send,
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    let max = shared.limits.max_frame;
    let payload = ticket
        .pending(proto::read_payload(&mut recv, max))
        .await??;
    let hello: Hello = proto::parse_hello(&payload)?;
    ticket.promote()?;
    if let proto::Request::Gateway(req) = hello.request {
        // A gateway's question: one answer, then the stream ends.
        let sh = shared.clone();
        let grant = blocking(move || crate::gateway::grant(&sh, &req, SystemTime::now())).await??;
        write(
            send,
            vec![Reply::Msg(proto::ServerMsg::GatewayGrant(grant))],
            max,
        )
        .await?;
        return Ok(None);
    }
    let mut credential = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut credential);
    let (sh, observed) = (shared.clone(), observe());
    let (session, first, pushes) =
        blocking(move || StreamSession::open(&sh, hello, observed, credential, SystemTime::now()))
            .await??;
    write(send, first, max).await?;
    let mut relay = shared.watch_relay();
    relay.borrow_and_update();
    Ok(Some((
        Box::new(session),
        Box::new(Live {
            client: FrameReader::new(recv, max),
            pushes,
            relay,
        }),
    )))
}

/// The session's loop: pushes out, client messages in, relay changes.
async fn session_loop<W, R>(
    observe: &(dyn Fn() -> SocketAddr + Sync),
    send: &mut W,
    mut session: Box<StreamSession>,
    live: &mut Live<R>,
    shared: &Arc<Shared>,
) -> Result<(), Fatal>
where
    W: tokio::io::AsyncWrite + Unpin + Send,
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    let max = shared.limits.max_frame;
    loop {
        tokio::select! {
            Ok(()) = live.relay.changed() => {
                live.relay.borrow_and_update();
                let replies = session.on_relay_change(shared);
                Box::pin(write(send, replies, max)).await?;
            }
            push = live.pushes.recv() => {
                let (replies, at) = take_pushes(&mut session, shared, &mut live.pushes, push)?;
                if replies.is_empty() {
                    continue;
                }
                Box::pin(write(send, replies, max)).await?;
                if let Some(at) = at {
                    shared.metrics.push_latency.observe(at.elapsed());
                }
            }
            msg = live.client.next() => match msg {
                Err(FrameError::Closed) => return Ok(()),
                Err(e) => return Err(e.into()),
                Ok(msg) => {
                    let observed = observe();
                    let (s, result) = if session.may_write(&msg, observed) {
                        let sh = shared.clone();
                        Box::pin(blocking(move || {
                            let r = session.on_client(&sh, msg, observed, SystemTime::now());
                            (session, r)
                        }))
                        .await?
                    } else {
                        let r = session.on_client(shared, msg, observed, SystemTime::now());
                        (session, r)
                    };
                    session = s;
                    let (replies, next) = result?;
                    Box::pin(write(send, replies, max)).await?;
                    if next == Next::Close {
                        return Ok(());
                    }
                }
            },
        }
    }
}
