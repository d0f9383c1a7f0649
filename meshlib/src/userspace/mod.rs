//! Rootless (userspace) mode: a smoltcp TCP/IP stack in place of the TUN
//! interface, behind the same [`crate::wg::Engine`].
//!
//! ## Layout
//! - [`queue`] — the engine ↔ stack bridge: bounded packet queues over a
//!   pool of recycled buffers ([`StackDevice`] implements
//!   [`crate::wg::device::Device`]; no allocation per packet).
//! - this module — [`Stack`]: the smoltcp interface with the member's
//!   address and its socket set, driven by one thread (`ist-stack`); it
//!   accepts TCP connections and UDP datagrams to the member's IP on the
//!   ports the instance serves ([`Stack::set_inbound_ports`]; it looks at
//!   connection openings before smoltcp does and opens a listening socket
//!   for them), relaying them to the instance on
//!   `<inbound_host>:<port>` (`127.0.0.1` by default). A TCP opening is
//!   answered only once the instance accepted the local connection: a SYN
//!   to a port nothing listens on gets a reset, as from a kernel, so a
//!   dialer tells "refused" from "connected" ([`Stack::open_tcp`]). An
//!   opening to any other port is refused (TCP: reset; UDP: dropped) and
//!   counted ([`StackStats::inbound_refused`]): the host's other loopback
//!   services are never reachable from the tunnel.
//! - `tcp` / `udp` — the relays between tokio sockets and smoltcp sockets,
//!   woken by smoltcp's socket wakers (no polling, no channels per packet).
//! - [`ports`] — pure helpers: the loopback address standing for a remote
//!   member, and the listening ports of the instance read from
//!   `/proc/net/tcp`.
//! - [`vip`] — service addresses: loopback listeners that balance each new
//!   connection (or UDP flow) over a service's instances with
//!   [`crate::balance::Pool`].
//!
//! ## Call order
//! [`Stack::start`] (inside a tokio runtime) gives the stack and its device;
//! start the engine on the device; [`Stack::set_inbound_ports`] whenever
//! the served ports change (or [`StackConfig::inbound_ports`] at start);
//! then [`Stack::forward_tcp`] / [`Stack::forward_udp`] for each remote
//! member's port, and [`vip::ServicePlane::apply`] with each map for the
//! service addresses.

pub mod ports;
pub mod queue;
mod tcp;
mod udp;
pub mod vip;

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rand_core::RngCore;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp as stcp;
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{
    HardwareAddress, IpAddress, IpCidr, IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket, UdpPacket,
};

pub use queue::StackDevice;
use queue::{Phy, Queues};
pub use tcp::{DialError, TunnelStream};

/// Why the stack could not start.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    /// [`Stack::start`] was called outside a tokio runtime.
    #[error("the userspace stack must start inside a tokio runtime")]
    NoRuntime,
    /// The prefix length does not fit the address family.
    #[error("invalid prefix length {0}")]
    Prefix(u8),
    /// The stack thread could not be started.
    #[error("cannot start stack thread: {0}")]
    Thread(std::io::Error),
}

/// How the stack is set up. Plain data; [`StackConfig::new`] gives defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackConfig {
    /// The member's private IP (the stack's only address).
    pub address: IpAddr,
    /// The network's prefix length (e.g. 22): destinations inside it are
    /// on the tunnel.
    pub prefix_len: u8,
    /// MTU of the stack's link; [`crate::wg::device::DEFAULT_MTU`] by
    /// default, as the TUN interface.
    pub mtu: u16,
    /// Receive and send buffer of each TCP socket, bytes; 1 MiB by default
    /// (with window scaling: one loopback stream needs a large window).
    pub tcp_buffer: usize,
    /// Where inbound connections and datagrams go: `<inbound_host>:<port>`;
    /// 127.0.0.1 by default (the instance).
    pub inbound_host: IpAddr,
    /// The ports inbound connections and datagrams may reach (the ports the
    /// instance serves); every other port is refused and counted. Empty by
    /// default: nothing from the tunnel reaches the host until the member
    /// says what it serves.
    pub inbound_ports: BTreeSet<u16>,
    /// A UDP flow without traffic for this long is closed; 60 s by default.
    pub udp_idle: Duration,
}

impl StackConfig {
    /// The defaults for a member at `address` in a `/prefix_len` network.
    pub fn new(address: IpAddr, prefix_len: u8) -> Self {
        Self {
            address,
            prefix_len,
            mtu: crate::wg::device::DEFAULT_MTU,
            tcp_buffer: 1 << 20,
            inbound_host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            inbound_ports: BTreeSet::new(),
            udp_idle: Duration::from_secs(60),
        }
    }
}

/// Counters of the stack.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StackStats {
    /// TCP connections relayed from the tunnel to the instance.
    pub tcp_inbound: u64,
    /// TCP connections relayed from loopback into the tunnel.
    pub tcp_outbound: u64,
    /// Inbound connections the instance refused (answered with a reset).
    pub tcp_refused: u64,
    /// UDP flows opened (both directions).
    pub udp_flows: u64,
    /// Inbound openings to a port the instance does not serve (TCP SYNs
    /// answered with a reset, UDP datagrams refused).
    pub inbound_refused: u64,
}

/// Listening sockets kept per port at most (connection openings arriving
/// together).
const MAX_LISTENERS: usize = 16;
/// Idle listening sockets over all ports at most: a peer scanning ports
/// gets resets beyond this instead of growing the socket set.
const MAX_IDLE_LISTENERS: usize = 256;
/// Time given to a closing socket to finish its FIN exchange.
const CLOSE_GRACE: Duration = Duration::from_secs(30);
/// Longest sleep of the stack thread (bounds shutdown latency).
const MAX_SLEEP: Duration = Duration::from_millis(50);
/// Inbound packets handled per poll round.
const RX_ROUND: usize = 256;
/// TCP openings waiting for the instance's answer at most; more SYNs are
/// dropped (their peers repeat them).
const MAX_PENDING: usize = 1024;
/// How long an opening's outcome is kept for its replayed SYN (or a repeat
/// of it, should the replay be lost).
const PENDING_TTL: Duration = Duration::from_secs(10);
/// How long the stack waits for the instance to accept a local connection
/// before it refuses the opening.
const LOCAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A TCP opening from the tunnel while the instance is asked first.
pub(crate) enum Pending {
    /// The local connection is being opened; repeats of the SYN are
    /// dropped.
    Connecting,
    /// The instance accepted: the SYN (replayed) opens a listener, and the
    /// connection it accepts is relayed to this stream.
    Ready(tokio::net::TcpStream),
    /// The instance refused: the SYN (replayed) is answered with a reset.
    Refused,
}

/// The smoltcp side, under one lock.
pub(crate) struct Net {
    iface: Interface,
    pub sockets: SocketSet<'static>,
    /// Idle listening TCP sockets by port.
    listeners: HashMap<u16, Vec<SocketHandle>>,
    /// UDP sockets bound for inbound datagrams, by port.
    udp_ports: HashMap<u16, SocketHandle>,
    /// Sockets whose relay ended, removed once closed (or at the deadline).
    closing: Vec<(SocketHandle, Instant)>,
    /// The ports inbound openings may reach.
    inbound_ports: BTreeSet<u16>,
    /// TCP openings asked of the instance, by (port, peer), with when.
    pending: HashMap<(u16, SocketAddr), (Pending, Instant)>,
    next_port: u16,
}

impl Net {
    /// An ephemeral local port for an outbound flow.
    pub fn ephemeral_port(&mut self) -> u16 {
        self.next_port = if self.next_port == u16::MAX {
            49_152
        } else {
            self.next_port + 1
        };
        self.next_port
    }

    /// Hands a finished relay's TCP socket over for removal.
    pub fn retire(&mut self, h: SocketHandle) {
        self.closing.push((h, Instant::now() + CLOSE_GRACE));
    }

    /// A new TCP socket with `size`-byte buffers.
    fn tcp_socket(size: usize) -> stcp::Socket<'static> {
        let mut s = stcp::Socket::new(
            stcp::SocketBuffer::new(vec![0; size]),
            stcp::SocketBuffer::new(vec![0; size]),
        );
        s.set_nagle_enabled(false);
        s.set_ack_delay(None);
        s.set_keep_alive(Some(smoltcp::time::Duration::from_secs(25)));
        s.set_timeout(Some(smoltcp::time::Duration::from_secs(120)));
        s
    }
}

/// State shared by the stack thread, the relays and the API.
pub(crate) struct Inner {
    pub net: Mutex<Net>,
    pub queues: Arc<Queues>,
    pub cfg: StackConfig,
    pub rt: tokio::runtime::Handle,
    epoch: Instant,
    pub tcp_inbound: AtomicU64,
    pub tcp_outbound: AtomicU64,
    pub tcp_refused: AtomicU64,
    pub udp_flows: AtomicU64,
    pub inbound_refused: AtomicU64,
    /// Per-port inbound targets that replace `<inbound_host>:<port>`
    /// ([`Stack::set_inbound_target`]).
    pub targets: Mutex<HashMap<u16, SocketAddr>>,
}

impl Inner {
    /// Where an inbound connection or datagram to `port` goes.
    pub fn inbound_target(&self, port: u16) -> SocketAddr {
        self.targets
            .lock()
            .get(&port)
            .copied()
            .unwrap_or(SocketAddr::new(self.cfg.inbound_host, port))
    }

    /// Runs `f` on a TCP socket of the set.
    pub fn with_tcp<R>(
        &self,
        h: SocketHandle,
        f: impl FnOnce(&mut stcp::Socket<'static>) -> R,
    ) -> R {
        f(self.net.lock().sockets.get_mut::<stcp::Socket>(h))
    }

    /// Asks the stack thread for a poll (after a socket changed).
    pub fn kick(&self) {
        self.queues.kick.kick();
    }

    /// Milliseconds on the stack's clock (UDP idle times).
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn now(&self) -> SmolInstant {
        SmolInstant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }
}

/// The userspace TCP/IP stack of one member. Dropping it stops its thread
/// (relay tasks end when their sockets do).
pub struct Stack {
    inner: Arc<Inner>,
    thread: Option<JoinHandle<()>>,
}

impl Stack {
    /// Builds the interface and starts its thread; returns the device to
    /// give to [`crate::wg::Engine::start`]. Must run inside a tokio runtime
    /// (relays are spawned on it).
    pub fn start(cfg: StackConfig) -> Result<(Self, Arc<StackDevice>), StackError> {
        let rt = tokio::runtime::Handle::try_current().map_err(|_| StackError::NoRuntime)?;
        let cidr = IpCidr::new(IpAddress::from(cfg.address), cfg.prefix_len);
        let max = if cfg.address.is_ipv4() { 32 } else { 128 };
        if cfg.prefix_len > max {
            return Err(StackError::Prefix(cfg.prefix_len));
        }
        let queues = Arc::new(Queues::new(cfg.mtu as usize));
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = rand_core::OsRng.next_u64();
        let mut phy = Phy {
            queues: &queues,
            rx_budget: 0,
        };
        let epoch = Instant::now();
        let mut iface = Interface::new(config, &mut phy, SmolInstant::from_micros(0));
        iface.update_ip_addrs(|a| {
            let _ = a.push(cidr);
        });
        let next_port = 49_152 + (rand_core::OsRng.next_u32() % 16_000) as u16;
        let inner = Arc::new(Inner {
            net: Mutex::new(Net {
                iface,
                sockets: SocketSet::new(Vec::new()),
                listeners: HashMap::new(),
                udp_ports: HashMap::new(),
                closing: Vec::new(),
                inbound_ports: cfg.inbound_ports.clone(),
                pending: HashMap::new(),
                next_port,
            }),
            queues: queues.clone(),
            cfg,
            rt,
            epoch,
            tcp_inbound: AtomicU64::new(0),
            tcp_outbound: AtomicU64::new(0),
            tcp_refused: AtomicU64::new(0),
            udp_flows: AtomicU64::new(0),
            inbound_refused: AtomicU64::new(0),
            targets: Mutex::new(HashMap::new()),
        });
        let run = inner.clone();
        let thread = std::thread::Builder::new()
            .name("ist-stack".into())
            .spawn(move || stack_loop(run))
            .map_err(StackError::Thread)?;
        let device = Arc::new(StackDevice { queues });
        Ok((
            Self {
                inner,
                thread: Some(thread),
            },
            device,
        ))
    }

    /// The member's address.
    pub fn address(&self) -> IpAddr {
        self.inner.cfg.address
    }

    /// Sets the ports inbound connections and datagrams may reach (the
    /// ports the instance serves). Connections already open stay open; a
    /// port taken away refuses new ones at once.
    pub fn set_inbound_ports(&self, ports: impl IntoIterator<Item = u16>) {
        let ports: BTreeSet<u16> = ports.into_iter().collect();
        let mut net = self.inner.net.lock();
        if net.inbound_ports == ports {
            return;
        }
        // Idle listeners of ports taken away would still accept a SYN.
        let gone: Vec<u16> = net
            .listeners
            .keys()
            .copied()
            .filter(|p| !ports.contains(p))
            .collect();
        for port in gone {
            for h in net.listeners.remove(&port).unwrap_or_default() {
                net.sockets.remove(h);
            }
        }
        net.inbound_ports = ports;
    }

    /// Sends inbound traffic for `port` to `target` instead of
    /// `<inbound_host>:<port>` (`None`: back to the default). An embedder
    /// listening on an ephemeral loopback port serves an overlay port this
    /// way ([`crate::node::Node::listen`]); the port must also be among the
    /// inbound ports.
    pub fn set_inbound_target(&self, port: u16, target: Option<SocketAddr>) {
        let mut targets = self.inner.targets.lock();
        match target {
            Some(t) => targets.insert(port, t),
            None => targets.remove(&port),
        };
    }

    /// The ports inbound traffic may reach.
    pub fn inbound_ports(&self) -> BTreeSet<u16> {
        self.inner.net.lock().inbound_ports.clone()
    }

    /// Relays one accepted local connection to `dst` (an overlay address)
    /// through the tunnel, on a task of the runtime.
    pub fn connect_tcp(&self, stream: tokio::net::TcpStream, dst: SocketAddr) {
        tcp::spawn_outbound(self.inner.clone(), stream, dst);
    }

    /// A TCP connection to `dst` (an overlay address) through the tunnel,
    /// as a tokio stream: a loopback socket pair whose far end is relayed
    /// into the stack. A peer that refuses shows as a closed stream.
    pub async fn dial_tcp(&self, dst: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
        let relay = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let ours = tokio::net::TcpStream::connect(relay.local_addr()?).await?;
        let (theirs, _) = relay.accept().await?;
        self.connect_tcp(theirs, dst);
        Ok(ours)
    }

    /// Opens a TCP connection to `dst` (an overlay address) through the
    /// tunnel and waits for the handshake, at most `timeout`: a peer whose
    /// port is closed answers with a reset ([`DialError::Refused`]), one
    /// that is gone does not answer ([`DialError::TimedOut`]). Relay a
    /// local stream over the result with [`TunnelStream::relay`].
    pub async fn open_tcp(
        &self,
        dst: SocketAddr,
        timeout: Duration,
    ) -> Result<TunnelStream, DialError> {
        tcp::open(&self.inner, dst, timeout).await
    }

    /// Accepts connections on `listener` and relays each one to `dst`.
    /// Runs until the listener fails; abort the task to stop it.
    pub async fn forward_tcp(&self, listener: tokio::net::TcpListener, dst: SocketAddr) {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => self.connect_tcp(stream, dst),
                Err(e) => {
                    tracing::debug!("forward to {dst}: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Relays datagrams arriving on `socket` to `dst` through the tunnel, and
    /// the answers back to each sender (one flow per sender, closed after
    /// [`StackConfig::udp_idle`]). Runs until aborted.
    pub async fn forward_udp(&self, socket: tokio::net::UdpSocket, dst: SocketAddr) {
        udp::forward(self.inner.clone(), socket, dst).await
    }

    /// The stack's counters.
    pub fn stats(&self) -> StackStats {
        let i = &self.inner;
        StackStats {
            tcp_inbound: i.tcp_inbound.load(Relaxed),
            tcp_outbound: i.tcp_outbound.load(Relaxed),
            tcp_refused: i.tcp_refused.load(Relaxed),
            udp_flows: i.udp_flows.load(Relaxed),
            inbound_refused: i.inbound_refused.load(Relaxed),
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.inner.queues.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A connection opening seen in an inbound packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Opening {
    /// A TCP SYN (without ACK) to this port, from this peer.
    Tcp(u16, SocketAddr),
    /// A UDP datagram to this port.
    Udp(u16),
}

impl Opening {
    /// The local port opened.
    fn port(self) -> u16 {
        match self {
            Opening::Tcp(port, _) | Opening::Udp(port) => port,
        }
    }
}

/// What the stack does with an inbound packet, by its opening (pure).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Not an opening, or one to a served port: on to smoltcp (a listener
    /// or UDP socket is opened for it).
    Open,
    /// An opening to a port the instance does not serve: counted, never
    /// relayed. TCP goes on to smoltcp, which has no socket for it and
    /// answers with a reset; UDP is dropped.
    Refuse,
}

/// The inbound filter: openings reach only `served` ports (pure).
pub(crate) fn verdict(opening: Option<Opening>, served: &BTreeSet<u16>) -> Verdict {
    match opening {
        Some(o) if !served.contains(&o.port()) => Verdict::Refuse,
        _ => Verdict::Open,
    }
}

/// What `packet` opens on `me`, if anything (pure; malformed packets give
/// `None`).
pub(crate) fn opening(packet: &[u8], me: IpAddr) -> Option<Opening> {
    let (proto, src, dst, payload): (IpProtocol, IpAddr, IpAddr, &[u8]) = match packet.first()? >> 4
    {
        4 => {
            let ip = Ipv4Packet::new_checked(packet).ok()?;
            if ip.more_frags() || ip.frag_offset() != 0 {
                return None;
            }
            let (s, d) = (IpAddr::V4(ip.src_addr()), IpAddr::V4(ip.dst_addr()));
            (ip.next_header(), s, d, ip.payload())
        }
        6 => {
            let ip = Ipv6Packet::new_checked(packet).ok()?;
            let (s, d) = (IpAddr::V6(ip.src_addr()), IpAddr::V6(ip.dst_addr()));
            (ip.next_header(), s, d, ip.payload())
        }
        _ => return None,
    };
    if dst != me {
        return None;
    }
    match proto {
        IpProtocol::Tcp => {
            let t = TcpPacket::new_checked(payload).ok()?;
            let from = SocketAddr::new(src, t.src_port());
            (t.syn() && !t.ack()).then_some(Opening::Tcp(t.dst_port(), from))
        }
        IpProtocol::Udp => Some(Opening::Udp(
            UdpPacket::new_checked(payload).ok()?.dst_port(),
        )),
        _ => None,
    }
}

/// The stack thread: scan openings, poll smoltcp, hand accepted sockets to
/// relays, reap closed sockets, sleep until kicked or smoltcp's next timer.
fn stack_loop(inner: Arc<Inner>) {
    let mut seen: Vec<Opening> = Vec::with_capacity(RX_ROUND);
    while !inner.queues.stopped() {
        let delay = {
            let mut net = inner.net.lock();
            seen.clear();
            let n = &mut *net;
            let budget = inner
                .queues
                .scan_inbound(RX_ROUND, |p| admit_inbound(&inner, n, &mut seen, p));
            open_for(&inner, &mut net, &seen);
            let now = inner.now();
            let mut phy = Phy {
                queues: &inner.queues,
                rx_budget: budget,
            };
            let n = &mut *net;
            n.iface.poll(now, &mut phy, &mut n.sockets);
            accept_ready(&inner, n);
            reap(n);
            if inner.queues.inbound_len() > 0 {
                Some(Duration::ZERO)
            } else {
                n.iface
                    .poll_delay(now, &n.sockets)
                    .map(|d| Duration::from_micros(d.total_micros()))
            }
        };
        let sleep = delay.unwrap_or(MAX_SLEEP).min(MAX_SLEEP);
        if !sleep.is_zero() {
            inner.queues.kick.wait(sleep);
        }
    }
}

/// The inbound filter, per packet before smoltcp sees it: false drops it.
/// Openings of served ports are collected in `seen`; a new TCP opening is
/// held while the instance is asked ([`ask_instance`]).
fn admit_inbound(inner: &Arc<Inner>, net: &mut Net, seen: &mut Vec<Opening>, p: &[u8]) -> bool {
    let o = opening(p, inner.cfg.address);
    if verdict(o, &net.inbound_ports) == Verdict::Refuse {
        inner.inbound_refused.fetch_add(1, Relaxed);
        // TCP: no listener, smoltcp resets. UDP: a socket may
        // still be bound from before the port was taken away.
        return matches!(o, Some(Opening::Tcp(..)))
            || !o.is_some_and(|o| net.udp_ports.contains_key(&o.port()));
    }
    match o {
        Some(Opening::Tcp(port, from)) if has_connection(net, port, from) => {
            // A repeated SYN of a connection being opened: an idle
            // listener earlier in the socket set would take it and
            // open a second socket for the same peer. Dropped when
            // such a listener exists; the socket repeats its SYN-ACK
            // on its own.
            net.listeners.get(&port).is_none_or(Vec::is_empty)
        }
        Some(Opening::Tcp(port, from)) => match net.pending.get(&(port, from)) {
            None => {
                if net.pending.len() < MAX_PENDING {
                    net.pending
                        .insert((port, from), (Pending::Connecting, Instant::now()));
                    ask_instance(inner, port, from, p.to_vec());
                }
                false
            }
            Some((Pending::Connecting, _)) => false,
            Some((Pending::Ready(_), _)) => {
                seen.push(Opening::Tcp(port, from));
                true
            }
            Some((Pending::Refused, _)) => {
                net.pending.remove(&(port, from));
                inner.tcp_refused.fetch_add(1, Relaxed);
                if let Some(rst) = reset_reply(p) {
                    inner.queues.push_outbound(&rst);
                }
                false
            }
        },
        Some(o) => {
            seen.push(o);
            true
        }
        None => true,
    }
}

/// Opens the local connection for a TCP opening from `from` to `port`,
/// then replays its `syn`: answered once the instance accepted, reset if it
/// refused or did not answer within [`LOCAL_CONNECT_TIMEOUT`].
fn ask_instance(inner: &Arc<Inner>, port: u16, from: SocketAddr, syn: Vec<u8>) {
    let inner = inner.clone();
    let rt = inner.rt.clone();
    rt.spawn(async move {
        let target = inner.inbound_target(port);
        let conn = tokio::time::timeout(LOCAL_CONNECT_TIMEOUT, tcp::connect_local(target)).await;
        let outcome = match conn {
            Ok(Ok(stream)) => Pending::Ready(stream),
            Ok(Err(e)) => {
                tracing::debug!("inbound to {target}: {e}");
                Pending::Refused
            }
            Err(_) => {
                tracing::debug!("inbound to {target}: no answer in {LOCAL_CONNECT_TIMEOUT:?}");
                Pending::Refused
            }
        };
        inner
            .net
            .lock()
            .pending
            .insert((port, from), (outcome, Instant::now()));
        inner.queues.push_inbound(&syn);
        inner.kick();
    });
}

/// The reset answering a TCP `syn` (RST+ACK of its sequence number plus
/// one, from its destination to its source); `None` for anything that is
/// not a well-formed TCP packet (pure).
pub(crate) fn reset_reply(syn: &[u8]) -> Option<Vec<u8>> {
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{Ipv4Repr, Ipv6Repr, TcpControl, TcpRepr, TcpSeqNumber};
    let caps = ChecksumCapabilities::default();
    let reply = |t: &TcpPacket<&[u8]>| TcpRepr {
        src_port: t.dst_port(),
        dst_port: t.src_port(),
        control: TcpControl::Rst,
        seq_number: TcpSeqNumber(0),
        ack_number: Some(t.seq_number() + 1),
        window_len: 0,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    match syn.first()? >> 4 {
        4 => {
            let ip = Ipv4Packet::new_checked(syn).ok()?;
            let t = TcpPacket::new_checked(ip.payload()).ok()?;
            let tcp = reply(&t);
            let repr = Ipv4Repr {
                src_addr: ip.dst_addr(),
                dst_addr: ip.src_addr(),
                next_header: IpProtocol::Tcp,
                payload_len: tcp.buffer_len(),
                hop_limit: 64,
            };
            let mut buf = vec![0u8; repr.buffer_len() + tcp.buffer_len()];
            let mut out = Ipv4Packet::new_unchecked(&mut buf[..]);
            repr.emit(&mut out, &caps);
            let (src, dst) = (repr.src_addr.into(), repr.dst_addr.into());
            tcp.emit(
                &mut TcpPacket::new_unchecked(out.payload_mut()),
                &src,
                &dst,
                &caps,
            );
            Some(buf)
        }
        6 => {
            let ip = Ipv6Packet::new_checked(syn).ok()?;
            let t = TcpPacket::new_checked(ip.payload()).ok()?;
            let tcp = reply(&t);
            let repr = Ipv6Repr {
                src_addr: ip.dst_addr(),
                dst_addr: ip.src_addr(),
                next_header: IpProtocol::Tcp,
                payload_len: tcp.buffer_len(),
                hop_limit: 64,
            };
            let mut buf = vec![0u8; repr.buffer_len() + tcp.buffer_len()];
            let mut out = Ipv6Packet::new_unchecked(&mut buf[..]);
            repr.emit(&mut out);
            let (src, dst) = (repr.src_addr.into(), repr.dst_addr.into());
            tcp.emit(
                &mut TcpPacket::new_unchecked(out.payload_mut()),
                &src,
                &dst,
                &caps,
            );
            Some(buf)
        }
        _ => None,
    }
}

/// Makes sure a listening TCP socket (per SYN) or a bound UDP socket waits
/// for each opening about to be processed.
fn open_for(inner: &Arc<Inner>, net: &mut Net, seen: &[Opening]) {
    for (i, o) in seen.iter().enumerate() {
        match *o {
            Opening::Tcp(port, _) => {
                // Distinct peers opening this port (a SYN repeated in one
                // batch needs no second listener).
                let want = seen[..=i]
                    .iter()
                    .enumerate()
                    .filter(|&(j, x)| {
                        matches!(x, Opening::Tcp(p, _) if *p == port) && !seen[..j].contains(x)
                    })
                    .count();
                let have = net.listeners.get(&port).map_or(0, Vec::len);
                let idle: usize = net.listeners.values().map(Vec::len).sum();
                if have < want.min(MAX_LISTENERS) && idle < MAX_IDLE_LISTENERS {
                    let mut s = Net::tcp_socket(inner.cfg.tcp_buffer);
                    if s.listen((IpAddress::from(inner.cfg.address), port)).is_ok() {
                        let h = net.sockets.add(s);
                        net.listeners.entry(port).or_default().push(h);
                    }
                }
            }
            Opening::Udp(port) => {
                if !net.udp_ports.contains_key(&port) {
                    if let Some(h) = udp::bind_inbound(inner, net, port) {
                        net.udp_ports.insert(port, h);
                    }
                }
            }
        }
    }
}

/// True when a TCP socket (not listening) already serves `from` on `port`.
fn has_connection(net: &Net, port: u16, from: SocketAddr) -> bool {
    let from = smoltcp::wire::IpEndpoint::from(from);
    net.sockets.iter().any(|(_, s)| match s {
        smoltcp::socket::Socket::Tcp(t) => {
            t.remote_endpoint() == Some(from) && t.local_endpoint().is_some_and(|l| l.port == port)
        }
        _ => false,
    })
}

/// Listening sockets that left `Listen` got a connection: relay them (to
/// the local connection opened for their SYN, when there is one).
fn accept_ready(inner: &Arc<Inner>, net: &mut Net) {
    let mut accepted = Vec::new();
    for (port, hs) in net.listeners.iter_mut() {
        hs.retain(|&h| {
            let listening = net.sockets.get::<stcp::Socket>(h).is_listening();
            if !listening {
                accepted.push((*port, h));
            }
            listening
        });
    }
    for (port, h) in accepted {
        let s = net.sockets.get::<stcp::Socket>(h);
        if s.state() == stcp::State::Closed {
            net.sockets.remove(h);
            continue;
        }
        let local = s
            .remote_endpoint()
            .map(|ep| (port, SocketAddr::new(ep.addr.into(), ep.port)))
            .and_then(|key| match net.pending.remove(&key) {
                Some((Pending::Ready(stream), _)) => Some(stream),
                Some(other) => {
                    net.pending.insert(key, other);
                    None
                }
                None => None,
            });
        tcp::spawn_inbound(inner.clone(), h, port, local);
    }
}

/// Removes retired sockets once closed or past their grace period, and
/// openings whose SYN never came back.
fn reap(net: &mut Net) {
    let now = Instant::now();
    if !net.pending.is_empty() {
        net.pending
            .retain(|_, (_, since)| now.duration_since(*since) < PENDING_TTL);
    }
    if net.closing.is_empty() {
        return;
    }
    let sockets = &mut net.sockets;
    net.closing.retain(|&(h, deadline)| {
        let state = sockets.get::<stcp::Socket>(h).state();
        let done = matches!(state, stcp::State::Closed | stcp::State::TimeWait);
        if done || now >= deadline {
            sockets.remove(h);
            false
        } else {
            true
        }
    });
}

#[cfg(test)]
mod tests;
