//! The QUIC driver: accepts sidecars and drives one
//! [`StreamSession`] (the pure per-stream logic) per connection's
//! bidirectional stream: reads frames, forwards the network's pushes,
//! writes replies.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use meshlib::proto::{self, ClientMsg, ErrorCode, FrameError, Hello};
use rand_core::RngCore as _;
use tokio::sync::{mpsc, Semaphore};

use crate::server::Shared;
use crate::session::{Fatal, Next, Reply, StreamSession};

/// Why the QUIC endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum QuicSetupError {
    /// The certificate or key is unusable.
    #[error("TLS setup: {0}")]
    Tls(String),
    /// The UDP socket could not be bound.
    #[error("cannot bind QUIC endpoint on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
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
    let bind = |source| QuicSetupError::Bind { addr, source };
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

/// Accepts connections until `shutdown` completes, at most
/// `limits.max_connections` at a time (more are refused).
pub async fn run(
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(shared.limits.max_connections));
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
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(
                "connection limit reached, refusing {}",
                incoming.remote_address()
            );
            incoming.refuse();
            continue;
        };
        let shared = shared.clone();
        let mut stop = stop_rx.clone();
        tasks.spawn(async move {
            tokio::select! {
                () = connection(incoming, shared) => {}
                _ = stop.changed() => {}
            }
            drop(permit);
        });
    }
    let _ = stop_tx.send(true);
    endpoint.close(0u32.into(), b"shutdown");
    // Every session has released the shared state when this returns.
    while tasks.join_next().await.is_some() {}
}

/// Handles one connection from handshake to close.
async fn connection(incoming: quinn::Incoming, shared: Arc<Shared>) {
    let timeout = shared.limits.handshake_timeout;
    let Ok(Ok(conn)) = tokio::time::timeout(timeout, async { incoming.accept()?.await }).await
    else {
        return;
    };
    let Ok(Ok((mut send, recv))) = tokio::time::timeout(timeout, conn.accept_bi()).await else {
        conn.close(1u32.into(), b"no control stream");
        return;
    };
    let result = drive(&conn, &mut send, recv, &shared).await;
    if let Err(fatal) = result {
        tracing::debug!(remote = %conn.remote_address(), code = ?fatal.0, message = %fatal.1, "session ended");
        let _ = proto::write_frame(&mut send, &fatal.frame(), shared.limits.max_frame).await;
    }
    let _ = send.finish();
    // Let the client read the last frame before the connection goes away.
    let _ = tokio::time::timeout(timeout, send.stopped()).await;
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

/// Runs `f` on a blocking thread (store commits fsync).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Fatal> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Fatal(ErrorCode::Internal, e.to_string()))
}

/// Writes a session's replies.
async fn write(send: &mut quinn::SendStream, replies: Vec<Reply>, max: usize) -> Result<(), Fatal> {
    for r in replies {
        match r {
            Reply::Msg(m) => proto::write_frame(send, &m, max).await?,
            Reply::Frame(f) => send
                .write_all(&f)
                .await
                .map_err(|e| Fatal(ErrorCode::Internal, e.to_string()))?,
        }
    }
    Ok(())
}

/// Drives one member's [`StreamSession`] over the QUIC stream.
async fn drive(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    mut recv: quinn::RecvStream,
    shared: &Arc<Shared>,
) -> Result<(), Fatal> {
    let max = shared.limits.max_frame;
    let hello: Hello = tokio::time::timeout(
        shared.limits.handshake_timeout,
        proto::read_frame(&mut recv, max),
    )
    .await
    .map_err(|_| Fatal(ErrorCode::Malformed, "no hello in time".into()))??;
    let mut credential = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut credential);
    let (sh, observed) = (shared.clone(), conn.remote_address());
    let (mut session, first, mut pushes) =
        blocking(move || StreamSession::open(&sh, hello, observed, credential, SystemTime::now()))
            .await??;
    write(send, first, max).await?;
    let mut client = spawn_reader(recv, max);
    loop {
        tokio::select! {
            push = pushes.recv() => {
                let replies = session.on_push(shared, push)?;
                write(send, replies, max).await?;
            }
            msg = client.recv() => match msg {
                None | Some(Err(FrameError::Closed)) => return Ok(()),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(msg)) => {
                    let observed = conn.remote_address();
                    let (s, result) = if session.may_write(&msg, observed) {
                        let sh = shared.clone();
                        blocking(move || {
                            let r = session.on_client(&sh, msg, observed, SystemTime::now());
                            (session, r)
                        })
                        .await?
                    } else {
                        let r = session.on_client(shared, msg, observed, SystemTime::now());
                        (session, r)
                    };
                    session = s;
                    let (replies, next) = result?;
                    write(send, replies, max).await?;
                    if next == Next::Close {
                        return Ok(());
                    }
                }
            },
        }
    }
}
