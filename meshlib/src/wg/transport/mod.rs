//! The transport owner, in the manner of tailscale's magicsock `Conn`:
//! everything on the WireGuard socket that is not WireGuard. It owns the
//! UDP socket, STUN (binding requests to learn the socket's
//! server-reflexive addresses), the relay (registration over UDP, or over
//! TLS on TCP when UDP gets no answer) and each managed peer's endpoint
//! state: its candidates, its [`PathManager`] and the key its probes are
//! sealed with. The pure parts are in [`crate::nat`].
//!
//! The engine ([`super::io`]) sees a bind-like interface: it sends
//! datagrams to an endpoint ([`Transport::transmit`], [`Transport::send_to`],
//! which add the relay's header when the endpoint is the relay), and hands
//! every received datagram that is not WireGuard to
//! [`Transport::on_datagram`], which takes probes, STUN answers and relay
//! frames and gives back only WireGuard datagrams. Path choices come back
//! as [`PathUse`]s the engine applies to its peers (their endpoint, and a
//! handshake on a new path); WireGuard datagrams that arrive over the TCP
//! relay go to a [`Sink`] the engine provides. So this module knows
//! nothing of the engine's peers, table or loops, and they know nothing of
//! its state.
//!
//! Time is passed in (`now`) to everything that decides ([`Transport::tick`],
//! [`Transport::on_datagram`]): the [`PathManager`]s run on it, as they do
//! in the simulator.
//!
//! Locks: `stun`, `relay`, `tcp`, `own` and `peers` are each taken alone
//! (never two at once, except `relay` then `tcp` when the relay changes),
//! and none is held across a send: what a locked section decides to send
//! is collected and sent after.
//!
//! A peer is *managed* once [`Transport::manage`] gave it candidates: from
//! then on its path manager, not the source of the last authenticated
//! packet, decides its endpoint (both sides may use different paths for a
//! while; WireGuard does not mind where a packet came from). Unmanaged
//! peers (`wg set`) roam as in stock WireGuard.

mod relay_tcp;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use rand_core::RngCore;

use super::udp::Udp;
use crate::keys::PublicKey;
use crate::nat::disco::{self, Message, PairKey};
use crate::nat::path::{Outgoing, Path, PathConfig, PathManager, PathState, Via};
use crate::nat::{relay, stun};
use relay_tcp::{Frames, TcpRelay};

/// STUN servers are asked this often while their answer is fresh.
const STUN_EVERY: Duration = Duration::from_secs(20);
/// ... and this often while some server has not answered yet.
const STUN_RETRY: Duration = Duration::from_secs(2);
/// An answer older than this is no longer a candidate.
const STUN_FRESH: Duration = Duration::from_secs(75);
/// Registration retries while the relay has not answered.
const REGISTER_RETRY: Duration = Duration::from_millis(500);
/// A registration unconfirmed for this long is given up (re-registered).
const REGISTRATION_LOST: Duration = Duration::from_secs(45);

/// One managed peer's endpoint state.
struct PeerPath {
    manager: PathManager,
    key: PairKey,
    /// The peer's private address: how the relay names it.
    ip: Option<Ipv4Addr>,
    /// Everything the peer advertised (the relay's address included).
    advertised: Vec<SocketAddr>,
    /// The path in use was a direct one (its loss asks STUN again).
    was_direct: bool,
}

/// A managed peer's path, for the engine to apply: point the peer's
/// endpoint at `target` (unless `None`), through the relay or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PathUse {
    /// The peer.
    pub key: PublicKey,
    /// The path its manager chose.
    pub path: Path,
    /// Where its datagrams go: the path's address, or the relay's.
    pub target: Option<SocketAddr>,
}

/// Where WireGuard datagrams that arrived over the relay's TCP connection
/// go (the engine decrypts them), with the path choices made on that
/// connection's thread. Made by the factory the engine gives
/// [`Transport::set_sink_factory`].
pub(crate) trait Sink: Send {
    /// One WireGuard datagram, as if from `from` (the relay's address).
    fn wireguard(&mut self, from: SocketAddr, dgram: &[u8]);
    /// Paths to apply.
    fn paths(&mut self, uses: &[PathUse]);
    /// The end of a batch: write what is pending.
    fn flush(&mut self);
}

/// Makes a [`Sink`] for a new TCP relay connection; `None` once the engine
/// is gone.
pub(crate) type SinkFactory = Box<dyn Fn() -> Option<Box<dyn Sink>> + Send + Sync>;

/// The relay this engine uses.
#[derive(Debug, Clone)]
struct RelayClient {
    addr: SocketAddr,
    /// The relay over TLS on TCP, when UDP gets no answer.
    tcp: Option<(SocketAddr, [u8; 32])>,
    /// Registered (or registering) over TCP instead of UDP.
    over_tcp: bool,
    /// When UDP registration started (TCP is tried after [`TCP_AFTER`]).
    since: Instant,
    ticket: Vec<u8>,
    token: Option<[u8; 8]>,
    confirmed: Option<Instant>,
    sent: Option<Instant>,
    keepalive: Duration,
    observed: Option<SocketAddr>,
}

/// The relay to register with ([`Transport::set_relay`]).
#[derive(Debug, Clone)]
pub(crate) struct RelaySetting {
    /// Its UDP address.
    pub udp: SocketAddr,
    /// Its TCP address and pinned certificate fingerprint.
    pub tcp: Option<(SocketAddr, [u8; 32])>,
    /// This member's ticket.
    pub ticket: Vec<u8>,
}

#[derive(Debug, Default)]
struct StunState {
    servers: Vec<SocketAddr>,
    /// Outstanding requests: id, server.
    pending: Vec<(stun::TxId, SocketAddr)>,
    /// Answers: server, mapped address, when.
    answers: Vec<(SocketAddr, SocketAddr, Instant)>,
    next: Option<Instant>,
}

/// What a received datagram that is not WireGuard was.
#[derive(Debug)]
pub(crate) enum Inbound<'a> {
    /// A WireGuard packet that came through the relay: decrypt it as from
    /// the relay's address.
    Relayed(SocketAddr, &'a [u8]),
    /// Handled here (a STUN answer, a relay frame, a probe).
    Done,
    /// A probe from a key that is no managed peer (dropped, unanswered).
    UnknownKey,
}

/// The transport: the socket, STUN, the relay and managed peers' paths.
pub(crate) struct Transport {
    udp: RwLock<Arc<Udp>>,
    /// Bumped whenever `udp` is replaced, so loops notice cheaply.
    generation: AtomicU64,
    stun: Mutex<StunState>,
    /// A peer's direct path was lost: ask the STUN servers at the next
    /// tick, not at the next [`STUN_EVERY`] (our NAT may have given our
    /// socket a new port, which the map must advertise).
    restun: AtomicBool,
    relay: RwLock<Option<RelayClient>>,
    /// The relay over TCP, while in use.
    tcp: Mutex<Option<Arc<TcpRelay>>>,
    /// Our own candidates (what the map advertises), for call-me-maybe.
    own: Mutex<Vec<SocketAddr>>,
    /// Our static key (probes are sealed with pair keys made from it).
    key: RwLock<Option<(x25519_dalek::StaticSecret, PublicKey)>>,
    /// Managed peers' paths.
    peers: Mutex<HashMap<PublicKey, PeerPath>>,
    cfg: PathConfig,
    sinks: OnceLock<SinkFactory>,
    /// The engine stopped: the TCP relay's thread ends.
    stopped: AtomicBool,
    /// This transport (for the TCP relay's thread, which must not keep it).
    me: std::sync::Weak<Transport>,
}

/// A datagram to send once no lock is held.
struct Out {
    to: SocketAddr,
    bytes: Vec<u8>,
    /// For the relay (behind its header): into the TCP relay connection
    /// when `to` is its address. Otherwise always on the UDP socket (STUN,
    /// registrations and direct probes test UDP itself).
    relayed: bool,
}

impl Transport {
    /// A transport on `udp`, with our static key if one is set.
    pub fn new(udp: Udp, key: Option<&x25519_dalek::StaticSecret>) -> Arc<Self> {
        let t = Arc::new_cyclic(|me| Self {
            udp: RwLock::new(Arc::new(udp)),
            generation: AtomicU64::new(0),
            stun: Mutex::default(),
            restun: AtomicBool::new(false),
            relay: RwLock::new(None),
            tcp: Mutex::new(None),
            own: Mutex::default(),
            key: RwLock::new(None),
            peers: Mutex::default(),
            cfg: PathConfig::default(),
            sinks: OnceLock::new(),
            stopped: AtomicBool::new(false),
            me: me.clone(),
        });
        t.set_key(key);
        t
    }

    /// Where WireGuard datagrams from the relay's TCP connection go (set
    /// once, when the engine starts).
    pub fn set_sink_factory(&self, f: SinkFactory) {
        let _ = self.sinks.set(f);
    }

    /// The engine stopped: a TCP relay connection ends within a second.
    pub fn stop(&self) {
        self.stopped.store(true, Relaxed);
        *self.tcp.lock() = None;
    }

    /// The socket now, and its generation.
    pub fn udp(&self) -> (Arc<Udp>, u64) {
        let udp = self.udp.read().clone();
        (udp, self.generation.load(Relaxed))
    }

    /// The socket's generation (bumped when it is replaced).
    pub fn generation(&self) -> u64 {
        self.generation.load(Relaxed)
    }

    /// Replaces the socket (a new port); peers and paths stay.
    pub fn rebind(&self, udp: Udp) {
        *self.udp.write() = Arc::new(udp);
        self.generation.fetch_add(1, Relaxed);
    }

    /// Our static key changed (or was cleared): every managed peer's pair
    /// key follows.
    pub fn set_key(&self, secret: Option<&x25519_dalek::StaticSecret>) {
        let key = secret.map(|s| {
            let public = PublicKey::from(x25519_dalek::PublicKey::from(s));
            (s.clone(), public)
        });
        if let Some((s, _)) = &key {
            for (peer, pp) in self.peers.lock().iter_mut() {
                pp.key = PairKey::from_dalek(s, peer);
            }
        }
        *self.key.write() = key;
    }

    /// Gives peer `key` (relay name `ip`) its `candidates`: from now on its
    /// path manager probes them and chooses its endpoint. `false` without
    /// a static key.
    pub fn manage(&self, key: &PublicKey, ip: Option<Ipv4Addr>, candidates: &[SocketAddr]) -> bool {
        let Some(secret) = self.key.read().as_ref().map(|(s, _)| s.clone()) else {
            return false;
        };
        let mut peers = self.peers.lock();
        let pp = peers.entry(*key).or_insert_with(|| PeerPath {
            manager: PathManager::new(
                self.cfg.clone(),
                rand_core::OsRng.next_u64(),
                Instant::now(),
            ),
            key: PairKey::from_dalek(&secret, key),
            ip: None,
            advertised: Vec::new(),
            was_direct: false,
        });
        pp.ip = ip;
        pp.advertised = candidates.iter().take(32).copied().collect();
        true
    }

    /// Forgets peer `key`'s path (the peer was removed).
    pub fn forget(&self, key: &PublicKey) {
        self.peers.lock().remove(key);
    }

    /// Forgets every peer's path.
    pub fn forget_all(&self) {
        self.peers.lock().clear();
    }

    /// A managed peer's path state at `now`.
    pub fn path_state(&self, key: &PublicKey, now: Instant) -> Option<PathState> {
        self.peers.lock().get(key).map(|pp| pp.manager.state(now))
    }

    /// The relay's address and our token, once registered.
    pub fn route(&self) -> Option<(SocketAddr, [u8; 8])> {
        let r = self.relay.read();
        let r = r.as_ref()?;
        let addr = match (r.over_tcp, r.tcp) {
            (true, Some((tcp, _))) => tcp,
            _ => r.addr,
        };
        Some((addr, r.token?))
    }

    /// STUN servers to ask.
    pub fn set_stun_servers(&self, servers: Vec<SocketAddr>) {
        let mut s = self.stun.lock();
        if s.servers != servers {
            s.answers.retain(|(srv, _, _)| servers.contains(srv));
            s.servers = servers;
            s.next = None;
        }
    }

    /// The relay to register with, or none. A new ticket for the same
    /// relay keeps the registration.
    pub fn set_relay(&self, relay: Option<RelaySetting>) {
        let mut slot = self.relay.write();
        match (slot.as_mut(), relay) {
            (Some(r), Some(t)) if r.addr == t.udp => r.ticket = t.ticket,
            (_, Some(t)) => {
                *self.tcp.lock() = None;
                *slot = Some(RelayClient {
                    addr: t.udp,
                    tcp: t.tcp,
                    over_tcp: false,
                    since: Instant::now(),
                    ticket: t.ticket,
                    token: None,
                    confirmed: None,
                    sent: None,
                    keepalive: Duration::from_secs(15),
                    observed: None,
                })
            }
            (_, None) => {
                *self.tcp.lock() = None;
                *slot = None
            }
        }
    }

    /// Our own candidates, as advertised (sent in call-me-maybe probes).
    pub fn set_own_candidates(&self, candidates: Vec<SocketAddr>) {
        *self.own.lock() = candidates;
    }

    /// Server-reflexive addresses from fresh STUN answers and the relay.
    pub fn reflexive(&self, now: Instant) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = self
            .stun
            .lock()
            .answers
            .iter()
            .filter(|(_, _, at)| now.duration_since(*at) < STUN_FRESH)
            .map(|(_, a, _)| *a)
            .collect();
        if let Some(o) = self.relay.read().as_ref().and_then(|r| r.observed) {
            out.push(o);
        }
        out.sort();
        out.dedup();
        out
    }
}

/// Whether a datagram is WireGuard (type 1-4, then three zero bytes).
pub(crate) fn is_wireguard(d: &[u8]) -> bool {
    d.len() >= 4 && (1..=4).contains(&d[0]) && d[1..4] == [0, 0, 0]
}

/// When UDP registration gets no answer this long, the relay over TCP is
/// tried.
const TCP_AFTER: Duration = Duration::from_millis(500);
/// While on TCP, UDP registration is tried again this often.
const UDP_RETRY: Duration = Duration::from_secs(10);

/// `bytes` behind the relay's `send` header for private address `ip`.
fn relay_frame(ip: Ipv4Addr, token: [u8; 8], bytes: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; relay::SEND_HEADER + bytes.len()];
    relay::send_header(&mut buf, ip, token);
    buf[relay::SEND_HEADER..].copy_from_slice(bytes);
    buf
}

impl Transport {
    /// Sends `data` (GSO segments of `segment` bytes) to `to`: into the TCP
    /// relay connection when `to` is its address, else on the UDP socket.
    pub fn transmit(
        &self,
        udp: &Udp,
        to: SocketAddr,
        data: &[u8],
        segment: usize,
    ) -> std::io::Result<()> {
        let tcp = self.tcp.lock().as_ref().filter(|t| t.addr == to).cloned();
        if let Some(t) = tcp {
            for d in data.chunks(segment.max(1)) {
                t.send(d);
            }
            return Ok(());
        }
        udp.send(to, data, segment)
    }

    /// Sends `bytes` for a peer (relay name `relay_ip`) to `to`, through
    /// the relay when `to` is the relay's address.
    pub fn send_to(
        &self,
        udp: &Udp,
        relay_ip: Option<Ipv4Addr>,
        to: SocketAddr,
        bytes: &[u8],
    ) -> std::io::Result<()> {
        if let Some((addr, token)) = self.route().filter(|(a, _)| *a == to) {
            let Some(ip) = relay_ip else {
                return Err(std::io::ErrorKind::AddrNotAvailable.into());
            };
            let buf = relay_frame(ip, token, bytes);
            return self.transmit(udp, addr, &buf, buf.len());
        }
        udp.send(to, bytes, bytes.len())
    }

    /// The relay confirmed a registration (over UDP from `from`, or over
    /// TCP).
    fn registered(
        &self,
        from: SocketAddr,
        token: [u8; 8],
        keepalive: u16,
        observed: Option<SocketAddr>,
    ) {
        if let Some(r) = self.relay.write().as_mut() {
            if r.over_tcp && observed.is_some() {
                // A UDP registration while on TCP: UDP works (again); the
                // TCP connection is closed (its thread ends by itself).
                tracing::info!(relay = %from, "relay over UDP works again; leaving TCP");
                r.over_tcp = false;
                r.token = None;
                *self.tcp.lock() = None;
            }
            let first = r.token.is_none();
            r.token = Some(token);
            r.confirmed = Some(Instant::now());
            r.keepalive = Duration::from_secs(u64::from(keepalive.clamp(5, 300)));
            if observed.is_some() {
                r.observed = observed;
            }
            if first {
                tracing::info!(relay = %from, over_tcp = r.over_tcp, ?observed, "registered with the relay");
            }
        }
    }

    /// Takes a datagram that is not WireGuard: a STUN answer, a relay
    /// frame, a probe. Path choices it leads to are pushed to `uses`.
    /// `None` for anything unrecognised or unauthenticated (the caller
    /// counts it as malformed; nothing is answered).
    pub fn on_datagram<'a>(
        &self,
        udp: &Udp,
        from: SocketAddr,
        d: &'a [u8],
        now: Instant,
        uses: &mut Vec<PathUse>,
    ) -> Option<Inbound<'a>> {
        if relay::is_relay(d) {
            let relay_addr = self.relay.read().as_ref().map(|r| r.addr);
            if relay_addr != Some(from) {
                return None;
            }
            return match relay::parse(d)? {
                relay::Frame::Registered {
                    token,
                    keepalive,
                    observed,
                } => {
                    self.registered(from, token, keepalive, Some(observed));
                    Some(Inbound::Done)
                }
                relay::Frame::Deliver { packet, .. } if is_wireguard(packet) => {
                    Some(Inbound::Relayed(from, packet))
                }
                relay::Frame::Deliver { packet, .. } if disco::is_disco(packet) => {
                    self.on_disco(udp, Via::Relay, packet, now, uses)
                }
                _ => None,
            };
        }
        if disco::is_disco(d) {
            return self.on_disco(udp, Via::Direct(from), d, now, uses);
        }
        if let Some((tx, mapped)) = stun::parse_response(d) {
            let mut s = self.stun.lock();
            let i = s
                .pending
                .iter()
                .position(|(t, srv)| *t == tx && *srv == from)?;
            s.pending.swap_remove(i);
            let known = s
                .answers
                .iter()
                .any(|(srv, a, _)| *srv == from && *a == mapped);
            s.answers.retain(|(srv, _, _)| *srv != from);
            s.answers.push((from, mapped, now));
            if !known {
                tracing::info!(server = %from, %mapped, "STUN: server-reflexive address");
            }
            return Some(Inbound::Done);
        }
        None
    }

    /// A probe from a peer: `None` if it does not open with its pair key
    /// (no answer, counted as malformed).
    fn on_disco(
        &self,
        udp: &Udp,
        via: Via,
        d: &[u8],
        now: Instant,
        uses: &mut Vec<PathUse>,
    ) -> Option<Inbound<'static>> {
        let sender = disco::sender(d)?;
        let relay = self.relay.read().as_ref().map(|r| r.addr);
        let mut out = Vec::new();
        {
            let mut peers = self.peers.lock();
            let Some(pp) = peers.get_mut(&sender) else {
                return Some(Inbound::UnknownKey);
            };
            let msg = disco::open(d, &pp.key)?;
            match msg {
                Message::Ping(tx) => pp.manager.handle_ping(now, via, tx),
                Message::Pong { tx, .. } => pp.manager.handle_pong(now, tx),
                Message::CallMeMaybe { candidates, .. } => {
                    let direct: Vec<SocketAddr> = candidates
                        .into_iter()
                        .filter(|c| Some(*c) != relay)
                        .collect();
                    pp.manager.handle_call_me_maybe(now, &direct);
                }
            }
            self.drain_peer(&sender, pp, &mut out, uses);
        }
        self.send_all(udp, out);
        Some(Inbound::Done)
    }

    /// Takes what the peer's path manager queued (probes, into `out`) and
    /// its path choice (into `uses`). Called under the `peers` lock: sends
    /// nothing itself.
    fn drain_peer(
        &self,
        key: &PublicKey,
        pp: &mut PeerPath,
        out: &mut Vec<Out>,
        uses: &mut Vec<PathUse>,
    ) {
        let own = self.key.read().as_ref().map(|(_, public)| *public);
        let route = self.route();
        while let Some(o) = pp.manager.poll_transmit() {
            let Some(own) = own else { continue };
            let (via, msg) = match o {
                Outgoing::Ping { via, tx } => (via, Message::Ping(tx)),
                Outgoing::Pong { via, tx, seen } => (via, Message::Pong { tx, seen }),
                Outgoing::CallMeMaybe { tx } => {
                    let candidates = self.own.lock().clone();
                    (Via::Relay, Message::CallMeMaybe { tx, candidates })
                }
            };
            let bytes = disco::encode(&msg, &own, &pp.key);
            match (via, route, pp.ip) {
                (Via::Direct(to), _, _) => out.push(Out {
                    to,
                    bytes,
                    relayed: false,
                }),
                (Via::Relay, Some((addr, token)), Some(ip)) => out.push(Out {
                    to: addr,
                    bytes: relay_frame(ip, token, &bytes),
                    relayed: true,
                }),
                (Via::Relay, _, _) => {}
            }
        }
        let path = pp.manager.path();
        let direct = matches!(path, Path::Direct(_));
        if pp.was_direct && !direct {
            self.restun.store(true, Relaxed);
        }
        pp.was_direct = direct;
        let target = match path {
            Path::Direct(a) | Path::Blind(a) => Some(a),
            Path::Relay => route.map(|(a, _)| a),
            Path::None => None,
        };
        uses.push(PathUse {
            key: *key,
            path,
            target,
        });
    }

    /// Sends what a locked section collected.
    fn send_all(&self, udp: &Udp, out: Vec<Out>) {
        for o in out {
            let result = if o.relayed {
                self.transmit(udp, o.to, &o.bytes, o.bytes.len())
            } else {
                udp.send(o.to, &o.bytes, o.bytes.len())
            };
            if let Err(e) = result {
                tracing::debug!(to = %o.to, "not sent: {e}");
            }
        }
    }

    /// Every timer tick: STUN, relay registration, and every managed peer
    /// of `live` (the others' paths are forgotten). Returns the managed
    /// peers' paths to apply.
    pub fn tick(&self, udp: &Udp, now: Instant, live: &[PublicKey]) -> Vec<PathUse> {
        let mut out = Vec::new();
        self.stun_tick(now, &mut out);
        self.relay_tick(now, &mut out);
        let relay = self.route().map(|(a, _)| a);
        let mut uses = Vec::new();
        {
            let live: std::collections::HashSet<&PublicKey> = live.iter().collect();
            let mut peers = self.peers.lock();
            peers.retain(|k, _| live.contains(k));
            for (key, pp) in peers.iter_mut() {
                // The relay's address is no direct candidate; advertising
                // it means the peer is registered there.
                let direct: Vec<SocketAddr> = pp
                    .advertised
                    .iter()
                    .filter(|a| Some(**a) != relay)
                    .copied()
                    .collect();
                pp.manager.set_candidates(now, &direct);
                // Every member of a deployment is told the same relay: once
                // we are registered, the peer is reachable there as soon as
                // it registers too (before its announcement of the relay's
                // address arrives).
                pp.manager
                    .set_relay(now, relay.is_some() && pp.ip.is_some());
                if now >= pp.manager.poll_timeout() {
                    pp.manager.handle_timeout(now);
                }
                self.drain_peer(key, pp, &mut out, &mut uses);
            }
        }
        self.send_all(udp, out);
        uses
    }

    fn stun_tick(&self, now: Instant, out: &mut Vec<Out>) {
        let mut s = self.stun.lock();
        let restun = self.restun.swap(false, Relaxed);
        if s.servers.is_empty() || (!restun && s.next.is_some_and(|t| now < t)) {
            return;
        }
        let all_answered = s
            .servers
            .iter()
            .all(|srv| s.answers.iter().any(|(a, _, _)| a == srv));
        s.next = Some(now + if all_answered { STUN_EVERY } else { STUN_RETRY });
        s.pending.clear();
        for srv in s.servers.clone() {
            let mut tx = [0u8; 12];
            rand_core::OsRng.fill_bytes(&mut tx);
            s.pending.push((tx, srv));
            out.push(Out {
                to: srv,
                bytes: stun::binding_request(&tx).to_vec(),
                relayed: false,
            });
        }
    }

    fn relay_tick(&self, now: Instant, out: &mut Vec<Out>) {
        let mut slot = self.relay.write();
        let Some(r) = slot.as_mut() else { return };
        if r.over_tcp {
            // The TCP connection registers and renews by itself; when it
            // ends, start over with UDP. Meanwhile UDP is tried now and
            // then: an answer moves the relay back to it (`registered`).
            let mut tcp = self.tcp.lock();
            if tcp.as_ref().is_none_or(|t| t.is_dead()) {
                tracing::warn!(relay = ?r.tcp, "relay over TCP lost; trying UDP again");
                *tcp = None;
                r.over_tcp = false;
                r.token = None;
                r.confirmed = None;
                r.sent = None;
                r.since = now;
            } else if r.sent.is_none_or(|t| now.duration_since(t) >= UDP_RETRY) {
                r.sent = Some(now);
                out.push(Out {
                    to: r.addr,
                    bytes: relay::register(&r.ticket),
                    relayed: false,
                });
            }
            return;
        }
        if r.token.is_none() && now.duration_since(r.since) >= TCP_AFTER {
            if let Some((addr, fingerprint)) = r.tcp {
                let frames = self.sinks.get().and_then(|f| f()).map(|sink| RelayFrames {
                    transport: self.me.clone(),
                    sink,
                    addr,
                });
                let started = match frames {
                    Some(frames) => TcpRelay::start(addr, fingerprint, r.ticket.clone(), frames),
                    None => Err(std::io::Error::other("the engine is stopping")),
                };
                match started {
                    Ok(t) => {
                        tracing::info!(relay = %addr, "no answer from the relay over UDP; using TCP");
                        *self.tcp.lock() = Some(Arc::new(t));
                        r.over_tcp = true;
                        r.sent = Some(now);
                        return;
                    }
                    Err(e) => tracing::warn!(relay = %addr, "relay over TCP: {e}"),
                }
            }
        }
        if r.confirmed
            .is_some_and(|t| now.duration_since(t) > REGISTRATION_LOST)
        {
            tracing::warn!(relay = %r.addr, "relay registration lost; registering again");
            r.token = None;
            r.confirmed = None;
        }
        let every = if r.token.is_some() {
            r.keepalive
        } else {
            REGISTER_RETRY
        };
        if r.sent.is_some_and(|t| now.duration_since(t) < every) {
            return;
        }
        r.sent = Some(now);
        out.push(Out {
            to: r.addr,
            bytes: relay::register(&r.ticket),
            relayed: false,
        });
    }
}

/// What the TCP relay's thread does with the frames it reads.
struct RelayFrames {
    transport: std::sync::Weak<Transport>,
    sink: Box<dyn Sink>,
    addr: SocketAddr,
}

impl Frames for RelayFrames {
    fn registered(&mut self, token: [u8; 8], keepalive: u16) {
        if let Some(t) = self.transport.upgrade() {
            t.registered(self.addr, token, keepalive, None);
        }
    }

    fn deliver(&mut self, packet: &[u8]) {
        let Some(t) = self.transport.upgrade() else {
            return;
        };
        if is_wireguard(packet) {
            self.sink.wireguard(self.addr, packet);
        } else if disco::is_disco(packet) {
            let mut uses = Vec::new();
            let (udp, _) = t.udp();
            t.on_disco(&udp, Via::Relay, packet, Instant::now(), &mut uses);
            self.sink.paths(&uses);
        }
    }

    fn flush(&mut self) {
        self.sink.flush();
    }

    fn ticket(&self) -> Option<Vec<u8>> {
        let t = self.transport.upgrade()?;
        let r = t.relay.read();
        r.as_ref().map(|r| r.ticket.clone())
    }

    fn stopped(&self) -> bool {
        self.transport
            .upgrade()
            .is_none_or(|t| t.stopped.load(Relaxed))
    }
}

/// The first IPv4 host address of a peer's allowed IPs (its relay name).
pub(crate) fn relay_ip_of(allowed: &[ipnet::IpNet]) -> Option<Ipv4Addr> {
    allowed.iter().find_map(|n| match n.addr() {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(_) => None,
    })
}
