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

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

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

/// A running relay: its thread stops when this is dropped or stopped.
pub struct RelayHandle {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Its counters.
    pub metrics: Arc<RelayMetrics>,
    /// Where it listens.
    pub local: SocketAddr,
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
    let (s, m) = (stop.clone(), metrics.clone());
    let thread = std::thread::Builder::new()
        .name("relay-udp".into())
        .spawn(move || udp_loop(socket, RelayCore::new(secret, limits), &s, &m))?;
    Ok(RelayHandle {
        stop,
        thread: Some(thread),
        metrics,
        local,
    })
}

fn udp_loop(socket: UdpSocket, mut core: RelayCore, stop: &AtomicBool, m: &RelayMetrics) {
    let mut buf = vec![0u8; 65_535];
    let mut out = vec![0u8; 65_535];
    let start = (Instant::now(), SystemTime::now());
    while !stop.load(Relaxed) {
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => {
                // ICMP errors from earlier sends surface here; keep going.
                tracing::trace!("relay receive: {e}");
                continue;
            }
        };
        let from = SocketAddr::new(from.ip().to_canonical(), from.port());
        let now = Instant::now();
        let unix = (start.1 + now.duration_since(start.0))
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        if let Some((to, len)) = core.handle(now, unix, from, &buf[..n], &mut out, m) {
            if let Err(e) = socket.send_to(&out[..len], to) {
                tracing::trace!(%to, "relay send: {e}");
            }
        }
    }
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
