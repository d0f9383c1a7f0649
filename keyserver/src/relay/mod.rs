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
    // `SO_REUSEPORT` would let a second relay on this host bind the same
    // port and take half its flows without a word: a plain bind first
    // fails as before when the port is taken (a relay started later fails
    // the same way, as our sockets hold the port), and gives the port
    // asked for with port 0.
    let addr = {
        let probe = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
            .map_err(err)?;
        if addr.is_ipv6() {
            let _ = probe.set_only_v6(false);
        }
        probe.bind(&addr.into()).map_err(err)?;
        probe.local_addr().map_err(err)?.as_socket().unwrap_or(addr)
    };
    let err = |cause| RelayBindError { addr, cause };
    let s =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    if addr.is_ipv6() {
        let _ = s.set_only_v6(false);
    }
    let _ = s.set_recv_buffer_size(8 << 20);
    let _ = s.set_send_buffer_size(8 << 20);
    // The relay's threads each read their own socket on this port (the
    // kernel keeps each flow on one socket, so a flow keeps its order).
    s.set_reuse_port(true).map_err(err)?;
    s.bind(&addr.into()).map_err(err)?;
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(err)?;
    Ok(s.into())
}

/// Another socket on the port of `first` (which was bound by [`bind`], with
/// `SO_REUSEPORT`), for one more relay thread.
fn sibling(first: &UdpSocket) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let addr = first.local_addr()?;
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        s.set_only_v6(socket2::SockRef::from(first).only_v6()?)?;
    }
    let _ = s.set_recv_buffer_size(8 << 20);
    let _ = s.set_send_buffer_size(8 << 20);
    s.set_reuse_port(true)?;
    s.bind(&addr.into())?;
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

/// A running relay: its threads stop when this is dropped or stopped.
pub struct RelayHandle {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
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
    /// Stops the threads and waits for them.
    pub fn stop(&mut self) {
        self.stop.store(true, Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs STUN and the relay on `socket` (from [`bind`]) and on sibling
/// sockets of its port, a thread each (one per core, at most 4): batches in (`recvmmsg`, GRO), one lock of the state per
/// batch, GSO sends out. `socket` becomes non-blocking: a frame a TCP member
/// sends to a UDP one is dropped when the socket buffer is full, as UDP
/// would.
pub fn serve_udp(
    socket: UdpSocket,
    secret: [u8; 32],
    limits: RelayLimits,
) -> std::io::Result<RelayHandle> {
    let local = socket.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let metrics = Arc::new(RelayMetrics::default());
    // One thread per core (at most MAX_THREADS), each on its own socket of
    // the port; the first socket also sends what TCP members relay to UDP
    // ones.
    let wanted = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_THREADS);
    let mut sockets = vec![socket.try_clone()?];
    for _ in 1..wanted {
        match sibling(&socket) {
            Ok(s) => sockets.push(s),
            Err(e) => {
                tracing::debug!(%local, "relay: one socket fewer ({e})");
                break;
            }
        }
    }
    let shared = Arc::new(RelayShared {
        core: Mutex::new(RelayCore::new(secret, limits)),
        metrics: metrics.clone(),
        udp: socket,
        tcp: Mutex::new(HashMap::new()),
        next_tcp: AtomicU64::new(1),
        clock: (Instant::now(), SystemTime::now()),
    });
    let mut threads = Vec::new();
    for (i, sock) in sockets.into_iter().enumerate() {
        let batch = Batch::new(sock)?;
        let (s, sh) = (stop.clone(), shared.clone());
        threads.push(
            std::thread::Builder::new()
                .name(format!("relay-udp-{i}"))
                .spawn(move || udp_loop(&sh, batch, &s))?,
        );
    }
    Ok(RelayHandle {
        stop,
        threads,
        metrics,
        local,
        shared,
    })
}

/// Most relay threads (and sockets).
const MAX_THREADS: usize = 4;
/// Most bytes in one GSO send (a UDP datagram's limit, 65,507 over IPv4,
/// with room).
const GSO_MAX_BYTES: usize = 64_000;
/// Bytes of one receive buffer: a datagram, or a GRO batch of one flow's.
const RECV_BUFFER: usize = 64 * 1024;

/// One relay thread's socket, its quinn-udp state (`recvmmsg`, GRO, GSO)
/// and buffers, allocated once.
struct Batch {
    sock: UdpSocket,
    state: quinn_udp::UdpSocketState,
    /// An IPv6 socket also carrying IPv4 (destinations are v4-mapped).
    dual: bool,
    bufs: Vec<Vec<u8>>,
    meta: Vec<quinn_udp::RecvMeta>,
    /// What goes out: the frames, back to back.
    out: Vec<u8>,
    /// Per frame: destination, start in `out`, length.
    sends: Vec<(SocketAddr, usize, usize)>,
}

impl Batch {
    fn new(sock: UdpSocket) -> std::io::Result<Self> {
        sock.set_nonblocking(true)?;
        let state = quinn_udp::UdpSocketState::new(quinn_udp::UdpSockRef::from(&sock))?;
        let dual = sock.local_addr()?.is_ipv6();
        let n = quinn_udp::BATCH_SIZE;
        Ok(Self {
            sock,
            state,
            dual,
            bufs: vec![vec![0u8; RECV_BUFFER]; n],
            meta: vec![quinn_udp::RecvMeta::default(); n],
            out: vec![0u8; n * RECV_BUFFER + RECV_BUFFER],
            sends: Vec::with_capacity(n * 64),
        })
    }

    /// Waits until the socket is readable, at most 200 ms.
    fn wait(&self) {
        use std::os::fd::AsRawFd as _;
        let mut pfd = libc::pollfd {
            fd: self.sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, count 1.
        unsafe { libc::poll(&mut pfd, 1, 200) };
    }

    /// Sends the frames collected, consecutive ones to the same destination
    /// of the same size (the last may be shorter) as one GSO send.
    fn flush(&mut self, metrics: &RelayMetrics) {
        let max = self.state.max_gso_segments().max(1);
        let mut i = 0;
        while i < self.sends.len() {
            let j = i + gso_run(&self.sends[i..], max);
            let (to, start, len) = self.sends[i];
            let (_, last_start, last_len) = self.sends[j - 1];
            let end = last_start + last_len;
            let destination = match to {
                SocketAddr::V4(v4) if self.dual => {
                    SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
                }
                _ => to,
            };
            let t = quinn_udp::Transmit {
                destination,
                ecn: None,
                contents: &self.out[start..end],
                segment_size: (j - i > 1).then_some(len),
                src_ip: None,
            };
            if let Err(e) = self.send(&t) {
                tracing::trace!(%to, "relay send: {e}");
                metrics.dropped_send.fetch_add((j - i) as u64, Relaxed);
            }
            i = j;
        }
        self.sends.clear();
    }

    /// One send; a full socket buffer is waited on (a little), as a
    /// blocking send would.
    fn send(&self, t: &quinn_udp::Transmit<'_>) -> std::io::Result<()> {
        use std::os::fd::AsRawFd as _;
        for _ in 0..8 {
            match self
                .state
                .try_send(quinn_udp::UdpSockRef::from(&self.sock), t)
            {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let mut pfd = libc::pollfd {
                        fd: self.sock.as_raw_fd(),
                        events: libc::POLLOUT,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd, count 1.
                    unsafe { libc::poll(&mut pfd, 1, 50) };
                }
                other => return other,
            }
        }
        Err(std::io::ErrorKind::WouldBlock.into())
    }
}

/// How many of `sends` (frames: destination, start, length; at least one)
/// go out as one GSO send: consecutive frames, back to back in the buffer,
/// to the first one's destination, as long as the first (only the last may
/// be shorter), at most `max` of them and [`GSO_MAX_BYTES`] together.
fn gso_run(sends: &[(SocketAddr, usize, usize)], max: usize) -> usize {
    let Some(&(to, start, len)) = sends.first() else {
        return 0;
    };
    let mut end = start + len;
    let mut n = 1;
    while let Some(&(t2, s2, l2)) = sends.get(n) {
        if n >= max || t2 != to || s2 != end || l2 > len || end - start + l2 > GSO_MAX_BYTES {
            break;
        }
        end += l2;
        n += 1;
        if l2 < len {
            break;
        }
    }
    n
}

/// One relay thread: reads batches (`recvmmsg`, GRO), handles them under
/// one lock of the core, then sends without it (GSO where frames allow).
fn udp_loop(shared: &RelayShared, mut b: Batch, stop: &AtomicBool) {
    use std::io::IoSliceMut;
    while !stop.load(Relaxed) {
        let n = {
            let mut slices: Vec<IoSliceMut<'_>> =
                b.bufs.iter_mut().map(|v| IoSliceMut::new(v)).collect();
            match b.state.recv(
                quinn_udp::UdpSockRef::from(&b.sock),
                &mut slices,
                &mut b.meta,
            ) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    drop(slices);
                    b.wait();
                    continue;
                }
                // ICMP errors from earlier sends: keep going.
                Err(e) => {
                    tracing::trace!("relay receive: {e}");
                    continue;
                }
            }
        };
        let now = Instant::now();
        let unix = shared.unix(now);
        let mut pos = 0;
        let mut tcp = Vec::new();
        {
            let mut core = shared.core.lock();
            for (meta, buf) in b.meta.iter().zip(&b.bufs).take(n) {
                let from = SocketAddr::new(meta.addr.ip().to_canonical(), meta.addr.port());
                let stride = meta.stride.max(1);
                for d in buf[..meta.len.min(buf.len())].chunks(stride) {
                    let room = &mut b.out[pos..pos + RECV_BUFFER];
                    let Some((to, len)) = core.handle(now, unix, from, d, room, &shared.metrics)
                    else {
                        continue;
                    };
                    if is_tcp_member(&to) {
                        tcp.push((to, room[..len].to_vec()));
                    } else {
                        b.sends.push((to, pos, len));
                        pos += len;
                    }
                    if pos + RECV_BUFFER > b.out.len() {
                        break;
                    }
                }
            }
        }
        if !tcp.is_empty() {
            let writers = shared.tcp.lock();
            for (to, frame) in tcp {
                if let Some(w) = writers.get(&to) {
                    let _ = w.try_send(frame);
                }
            }
        }
        b.flush(&shared.metrics);
    }
}

/// Whether `addr` stands for a member on a TCP relay connection (see
/// [`tcp_session`]: addresses from `100::/64`).
fn is_tcp_member(addr: &SocketAddr) -> bool {
    match addr.ip() {
        std::net::IpAddr::V6(v6) => v6.segments()[..4] == [0x100, 0, 0, 0],
        std::net::IpAddr::V4(_) => false,
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
        // Frames waiting are written together (one TLS record and one
        // write for many), each behind its length.
        let mut batch = Vec::with_capacity(TCP_BATCH + MAX_TCP_FRAME + 2);
        while let Some(frame) = rx.recv().await {
            batch.clear();
            push_frame(&mut batch, &frame);
            while batch.len() < TCP_BATCH {
                match rx.try_recv() {
                    Ok(frame) => push_frame(&mut batch, &frame),
                    Err(_) => break,
                }
            }
            if w.write_all(&batch).await.is_err() || w.flush().await.is_err() {
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

/// Bytes of frames a TCP relay connection writes at once (at most; one
/// frame more may follow the last that fit).
const TCP_BATCH: usize = 64 * 1024;

/// Appends a frame behind its 2-byte big-endian length.
fn push_frame(batch: &mut Vec<u8>, frame: &[u8]) {
    batch.extend_from_slice(&(frame.len() as u16).to_be_bytes());
    batch.extend_from_slice(frame);
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

#[cfg(test)]
mod tests {
    use super::*;
    use meshlib::keys::PrivateKey;
    use meshlib::nat::relay::{self as frames, Frame};
    use std::net::Ipv4Addr;

    fn ticket(secret: &[u8; 32], network: NetworkId, ip: Ipv4Addr) -> Vec<u8> {
        Ticket::sign(
            secret,
            TicketBody {
                network,
                public_key: PrivateKey::generate().public_key(),
                ip,
                expires: u64::MAX,
            },
        )
        .to_bytes()
    }

    /// Registers `sock` with the relay at `relay`: its token.
    fn register(sock: &UdpSocket, relay: SocketAddr, ticket: &[u8]) -> [u8; 8] {
        sock.send_to(&frames::register(ticket), relay).unwrap();
        let mut buf = [0u8; 2048];
        let (n, _) = sock.recv_from(&mut buf).expect("registered in time");
        match frames::parse(&buf[..n]) {
            Some(Frame::Registered { token, .. }) => token,
            other => panic!("not a registration answer: {other:?}"),
        }
    }

    #[test]
    fn gso_runs_hold_one_destination_one_size_and_fit_a_datagram() {
        let a: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let b: SocketAddr = "192.0.2.2:1".parse().unwrap();
        let frames = |list: &[(SocketAddr, usize)]| {
            let mut pos = 0;
            list.iter()
                .map(|(to, len)| {
                    pos += len;
                    (*to, pos - len, *len)
                })
                .collect::<Vec<_>>()
        };
        // 64 full-size frames: at most 64,000 bytes in one send.
        let full = frames(&[(a, 1460); 64]);
        assert_eq!(gso_run(&full, 64), 43);
        assert_eq!(gso_run(&full[43..], 64), 21);
        assert_eq!(gso_run(&full, 10), 10);
        // A shorter frame ends a run (it is its last); a longer one or
        // another destination starts the next.
        let mixed = frames(&[
            (a, 1000),
            (a, 1000),
            (a, 500),
            (a, 1000),
            (b, 1000),
            (a, 1200),
        ]);
        assert_eq!(gso_run(&mixed, 64), 3);
        assert_eq!(gso_run(&mixed[3..], 64), 1);
        assert_eq!(gso_run(&mixed[4..], 64), 1);
        assert_eq!(gso_run(&frames(&[(a, 100), (a, 200)]), 64), 1);
        assert_eq!(gso_run(&[], 64), 0);
    }

    #[test]
    fn a_second_relay_cannot_take_the_port() {
        let first = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = first.local_addr().unwrap();
        let _relay = serve_udp(first, [1; 32], RelayLimits::default()).unwrap();
        let err = bind(addr).expect_err("the port is taken");
        assert_eq!(err.cause.kind(), std::io::ErrorKind::AddrInUse, "{err}");
    }

    /// Bursts of datagrams of one flow (the relay reads them as GRO
    /// batches and sends them as GSO batches), with a shorter last one and
    /// sizes that change within a burst: every datagram arrives, intact and
    /// in order.
    #[test]
    fn bursts_arrive_whole_and_in_order() {
        let secret = [3; 32];
        let limits = RelayLimits {
            rate: 1 << 30,
            burst: 1 << 30,
            ..RelayLimits::default()
        };
        let socket = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let relay = socket.local_addr().unwrap();
        let handle = serve_udp(socket, secret, limits).unwrap();
        let net = NetworkId::random();
        let (ip_a, ip_b) = (Ipv4Addr::new(10, 240, 0, 1), Ipv4Addr::new(10, 240, 0, 2));
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        for s in [&a, &b] {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            socket2::SockRef::from(s)
                .set_recv_buffer_size(4 << 20)
                .unwrap();
        }
        let token = register(&a, relay, &ticket(&secret, net, ip_a));
        register(&b, relay, &ticket(&secret, net, ip_b));
        let mut seq: u32 = 0;
        let mut frame = vec![0u8; 2048];
        let mut buf = vec![0u8; 4096];
        for burst in 0..40u32 {
            let sizes: Vec<usize> = (0..64u32)
                .map(|i| match (burst % 3, i) {
                    (_, 63) => 100,                             // a shorter last one
                    (1, i) if i % 16 == 15 => 700,              // shorter in the middle
                    (2, i) => 200 + ((i * 37) % 1000) as usize, // every size differs
                    _ => 1200,
                })
                .collect();
            for size in &sizes {
                let body = &mut frame[..frames::SEND_HEADER + size];
                frames::send_header(body, ip_b, token);
                let payload = &mut body[frames::SEND_HEADER..];
                payload[..4].copy_from_slice(&seq.to_be_bytes());
                for (k, byte) in payload[4..].iter_mut().enumerate() {
                    *byte = (seq as usize + k) as u8;
                }
                a.send_to(body, relay).unwrap();
                seq += 1;
            }
            for (i, size) in sizes.iter().enumerate() {
                let (n, from) = b.recv_from(&mut buf).unwrap_or_else(|e| {
                    panic!("burst {burst}: datagram {i} of {}: {e}", sizes.len())
                });
                assert_eq!(from, relay);
                let Some(Frame::Deliver { src, packet }) = frames::parse(&buf[..n]) else {
                    panic!("not a delivery");
                };
                assert_eq!(src, ip_a);
                assert_eq!(packet.len(), *size, "burst {burst}, datagram {i}");
                let want = seq - sizes.len() as u32 + i as u32;
                let got = u32::from_be_bytes(packet[..4].try_into().unwrap());
                assert_eq!(got, want, "in order");
                assert!(packet[4..]
                    .iter()
                    .enumerate()
                    .all(|(k, byte)| *byte == (want as usize + k) as u8));
            }
        }
        assert_eq!(
            handle.metrics.forwarded_packets.load(Relaxed),
            u64::from(seq)
        );
        assert_eq!(handle.metrics.dropped_send.load(Relaxed), 0);
    }
}
