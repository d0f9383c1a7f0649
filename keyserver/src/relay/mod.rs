//! STUN and the relay: the keyserver's UDP port for members' NAT traversal
//! ([`meshlib::nat`]).
//!
//! One UDP socket (default `0.0.0.0:3478`) answers STUN binding requests
//! (any client; it is how members learn the address their WireGuard socket
//! has behind NAT) and relays members' datagrams ([`core::RelayCore`]).
//! Members get a relay ticket over their control stream
//! ([`meshlib::proto::ClientMsg::GetRelay`], answered by [`info_for`]):
//! signed with the relay secret (`<data-dir>/relay-secret`), it names the
//! member's network and private address, and it is all a relay checks. So
//! the relay runs inside the keyserver by default, or as its own process
//! (`keyserver relay`) given a copy of the secret.

pub mod core;

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc;

use meshlib::ids::NetworkId;
use meshlib::nat::relay::{Ticket, TicketBody};
use meshlib::netmap::Member;
use meshlib::proto::RelayInfo;

pub use self::core::{RelayCore, RelayLimits, RelayMetrics};

/// How long a ticket stays valid: shorter than the address quarantine
/// (5 minutes by default), so a removed member's ticket has expired
/// before its address can go to another member.
pub const TICKET_LIFETIME: Duration = Duration::from_secs(240);

/// What the keyserver tells members about STUN and the relay.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// Signs tickets (shared with every relay).
    pub secret: [u8; 32],
    /// The relay's UDP address members use (`None`: no relay).
    pub relay: Option<SocketAddr>,
    /// STUN servers members ask (the relay's address first, when it runs
    /// here, then any configured ones).
    pub stun: Vec<SocketAddr>,
    /// The relay over TLS on TCP (the keyserver's TCP port), if it runs.
    pub tcp: Option<SocketAddr>,
    /// SHA-256 of the certificate that TCP port presents.
    pub cert_sha256: [u8; 32],
}

/// The answer to a member's [`meshlib::proto::ClientMsg::GetRelay`]: a
/// ticket for its network and address, valid [`TICKET_LIFETIME`].
pub fn info_for(settings: &RelaySettings, network: NetworkId, m: &Member) -> RelayInfo {
    let unix = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let ticket = Ticket::sign(
        &settings.secret,
        TicketBody {
            network,
            public_key: m.public_key,
            ip: m.ip,
            expires: unix + TICKET_LIFETIME.as_secs(),
        },
    );
    RelayInfo {
        stun: settings.stun.clone(),
        relay: settings.relay,
        ticket: ticket.to_bytes(),
        lifetime_secs: TICKET_LIFETIME.as_secs() as u32,
        tcp: settings.tcp,
        cert_sha256: settings.cert_sha256,
    }
}

/// Why the relay's socket could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot bind the STUN/relay UDP socket on {addr}: {cause}")]
pub struct RelayBindError {
    /// The address.
    pub addr: SocketAddr,
    /// The cause.
    pub cause: std::io::Error,
}

/// Binds the STUN/relay UDP socket (large buffers; the relay carries bulk
/// traffic).
pub fn bind(addr: SocketAddr) -> Result<UdpSocket, RelayBindError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let err = |cause| RelayBindError { addr, cause };
    let s =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    if addr.is_ipv6() {
        let _ = s.set_only_v6(false);
    }
    let _ = s.set_recv_buffer_size(8 << 20);
    let _ = s.set_send_buffer_size(8 << 20);
    s.bind(&addr.into()).map_err(err)?;
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(err)?;
    Ok(s.into())
}

/// The relay's state shared by its UDP thread and its TCP sessions.
pub struct RelayShared {
    core: Mutex<RelayCore>,
    /// Its counters.
    pub metrics: Arc<RelayMetrics>,
    udp: UdpSocket,
    /// Members registered over TCP: their writer, by the synthetic address
    /// standing for the connection in the core.
    tcp: Mutex<HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>>,
    next_tcp: AtomicU64,
    clock: (Instant, SystemTime),
}

impl RelayShared {
    fn unix(&self, now: Instant) -> u64 {
        (self.clock.1 + now.duration_since(self.clock.0))
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
    }

    /// Whether `addr` (a TCP connection's synthetic address) holds a
    /// registration.
    fn is_registered(&self, addr: SocketAddr) -> bool {
        self.core.lock().is_registered(addr)
    }

    /// One datagram or frame from `from`: handled, and whatever it yields
    /// sent (by UDP, or to a TCP member's writer).
    fn handle(&self, from: SocketAddr, d: &[u8], out: &mut [u8]) {
        let now = Instant::now();
        let unix = self.unix(now);
        let result = self
            .core
            .lock()
            .handle(now, unix, from, d, out, &self.metrics);
        let Some((to, len)) = result else { return };
        if let Some(w) = self.tcp.lock().get(&to) {
            // A full writer (a slow TCP member) drops, as UDP would.
            let _ = w.try_send(out[..len].to_vec());
            return;
        }
        if let Err(e) = self.udp.send_to(&out[..len], to) {
            tracing::trace!(%to, "relay send: {e}");
        }
    }
}

/// A running relay: its thread stops when this is dropped or stopped.
pub struct RelayHandle {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Its counters.
    pub metrics: Arc<RelayMetrics>,
    /// Where it listens.
    pub local: SocketAddr,
    /// The state TCP sessions share.
    pub shared: Arc<RelayShared>,
}

impl std::fmt::Debug for RelayHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayHandle")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl RelayHandle {
    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs STUN and the relay on `socket` in a thread of its own (blocking
/// receive, one datagram at a time: the work per datagram is a lookup and a
/// copy).
pub fn serve_udp(
    socket: UdpSocket,
    secret: [u8; 32],
    limits: RelayLimits,
) -> std::io::Result<RelayHandle> {
    let local = socket.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let metrics = Arc::new(RelayMetrics::default());
    let shared = Arc::new(RelayShared {
        core: Mutex::new(RelayCore::new(secret, limits)),
        metrics: metrics.clone(),
        udp: socket,
        tcp: Mutex::new(HashMap::new()),
        next_tcp: AtomicU64::new(1),
        clock: (Instant::now(), SystemTime::now()),
    });
    let (s, sh) = (stop.clone(), shared.clone());
    let thread = std::thread::Builder::new()
        .name("relay-udp".into())
        .spawn(move || udp_loop(&sh, &s))?;
    Ok(RelayHandle {
        stop,
        thread: Some(thread),
        metrics,
        local,
        shared,
    })
}

fn udp_loop(shared: &RelayShared, stop: &AtomicBool) {
    let mut buf = vec![0u8; 65_535];
    let mut out = vec![0u8; 65_535];
    while !stop.load(Relaxed) {
        let (n, from) = match shared.udp.recv_from(&mut buf) {
            Ok(x) => x,
            // Timeouts (to look at `stop`), and ICMP errors from earlier
            // sends: keep going.
            Err(e) => {
                tracing::trace!("relay receive: {e}");
                continue;
            }
        };
        let from = SocketAddr::new(from.ip().to_canonical(), from.port());
        shared.handle(from, &buf[..n], &mut out);
    }
}

/// Longest frame on a TCP relay connection.
const MAX_TCP_FRAME: usize = 65_535;

/// One member's relay connection over TLS on TCP (UDP blocked): the same
/// frames as on UDP, each behind a 2-byte big-endian length. The
/// connection stands for the member's address in the relay (a synthetic
/// one from the discard prefix `100::/64`, never a real source), so
/// everything else, isolation and limits included, is the UDP relay's.
pub(crate) async fn tcp_session<S>(
    stream: S,
    shared: Arc<RelayShared>,
    mut unregistered: Option<crate::quic::Ticket>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let id = shared.next_tcp.fetch_add(1, Relaxed);
    let addr = SocketAddr::new(
        std::net::Ipv6Addr::new(
            0x100,
            0,
            0,
            0,
            (id >> 48) as u16,
            (id >> 32) as u16,
            (id >> 16) as u16,
            id as u16,
        )
        .into(),
        1,
    );
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(1024);
    shared.tcp.lock().insert(addr, tx);
    let (mut r, mut w) = tokio::io::split(stream);
    let writer = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            let len = (frame.len() as u16).to_be_bytes();
            if w.write_all(&len).await.is_err() || w.write_all(&frame).await.is_err() {
                return;
            }
        }
    });
    let mut buf = vec![0u8; MAX_TCP_FRAME];
    let mut out = vec![0u8; MAX_TCP_FRAME + 64];
    loop {
        let read = async {
            let mut len = [0u8; 2];
            r.read_exact(&mut len).await?;
            let len = usize::from(u16::from_be_bytes(len));
            r.read_exact(&mut buf[..len]).await.map(|_| len)
        };
        // Until it registers, the connection lives on the unauthenticated
        // budget and deadline of the keyserver's port (as a hello-less
        // control connection does).
        let len = match unregistered.as_mut() {
            Some(ticket) => match ticket.pending(read).await {
                Ok(Ok(len)) => len,
                _ => break,
            },
            None => match read.await {
                Ok(len) => len,
                Err(_) => break,
            },
        };
        shared.handle(addr, &buf[..len], &mut out);
        if unregistered.is_some() && shared.is_registered(addr) {
            unregistered = None;
        }
    }
    shared.tcp.lock().remove(&addr);
    writer.abort();
}

/// Reads the relay secret at `path` (32 raw bytes), or creates it (0600).
pub fn load_or_create_secret(path: &std::path::Path) -> std::io::Result<[u8; 32]> {
    match std::fs::read(path) {
        Ok(bytes) => bytes.try_into().map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: not a 32-byte relay secret", path.display()),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            use rand_core::RngCore as _;
            let mut secret = [0u8; 32];
            rand_core::OsRng.fill_bytes(&mut secret);
            meshlib::fsutil::write_secret(path, &secret).map_err(std::io::Error::other)?;
            Ok(secret)
        }
        Err(e) => Err(e),
    }
}
