//! The engine's NAT-traversal driver: everything on the WireGuard socket
//! that is not WireGuard. STUN binding requests to learn the socket's
//! server-reflexive addresses, the relay registration and relayed packets,
//! and the probes of each managed peer's [`PathManager`]. The pure parts are
//! in [`crate::nat`]; this module moves their bytes and reads the clock.
//!
//! A peer is *managed* once [`super::Engine::set_peer_candidates`] gave it
//! candidates: from then on its path manager, not the source of the last
//! authenticated packet, decides its endpoint (both sides may use different
//! paths for a while; WireGuard does not mind where a packet came from).
//! Unmanaged peers (`wg set`) roam as in stock WireGuard.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rand_core::RngCore;

use super::peer::Peer;
use super::shared::Shared;
use super::udp::Udp;
use crate::keys::PublicKey;
use crate::nat::disco::{self, Message, PairKey};
use crate::nat::path::{Outgoing, Path, PathConfig, PathManager, Via};
use crate::nat::{relay, stun};

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

/// One managed peer's path state (inside its [`Peer`]).
pub(crate) struct PeerPath {
    pub manager: PathManager,
    pub key: PairKey,
    /// The peer's private address: how the relay names it.
    pub ip: Option<Ipv4Addr>,
    /// Everything the peer advertised (the relay's address included).
    pub advertised: Vec<SocketAddr>,
    /// Until then, while no session exists, the handshake is sent again
    /// every [`KICK_EVERY`] (the peer may register with the relay, or open
    /// its NAT, a moment after our path came up).
    pub kick_until: Option<Instant>,
    /// When the handshake was last sent so.
    pub last_kick: Option<Instant>,
    /// The path in use was a direct one (its loss asks STUN again).
    pub was_direct: bool,
}

/// How often a handshake is re-sent on a new path while no session exists.
const KICK_EVERY: Duration = Duration::from_millis(500);
/// For how long after the path came up.
const KICK_FOR: Duration = Duration::from_secs(10);

/// The relay this engine uses.
#[derive(Debug, Clone)]
pub(crate) struct RelayClient {
    pub addr: SocketAddr,
    /// The relay over TLS on TCP, when UDP gets no answer.
    pub tcp: Option<(SocketAddr, [u8; 32])>,
    /// Registered (or registering) over TCP instead of UDP.
    pub over_tcp: bool,
    /// When UDP registration started (TCP is tried after [`TCP_AFTER`]).
    pub since: Instant,
    pub ticket: Vec<u8>,
    pub token: Option<[u8; 8]>,
    pub confirmed: Option<Instant>,
    pub sent: Option<Instant>,
    pub keepalive: Duration,
    pub observed: Option<SocketAddr>,
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

/// Engine-wide NAT state.
#[derive(Default)]
pub(crate) struct Nat {
    stun: Mutex<StunState>,
    /// A peer's direct path was lost: ask the STUN servers at the next
    /// tick, not at the next [`STUN_EVERY`] (our NAT may have given our
    /// socket a new port, which the map must advertise).
    restun: std::sync::atomic::AtomicBool,
    pub relay: parking_lot::RwLock<Option<RelayClient>>,
    /// The relay over TCP, while in use.
    pub tcp: Mutex<Option<super::relay_tcp::TcpRelay>>,
    /// Our own candidates (what the map advertises), for call-me-maybe.
    pub own: Mutex<Vec<SocketAddr>>,
    pub cfg: PathConfig,
}

impl Nat {
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

    pub fn set_stun_servers(&self, servers: Vec<SocketAddr>) {
        let mut s = self.stun.lock();
        if s.servers != servers {
            s.answers.retain(|(srv, _, _)| servers.contains(srv));
            s.servers = servers;
            s.next = None;
        }
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

/// Sends `data` (GSO segments of `segment` bytes) to `to`: into the TCP
/// relay connection when `to` is its address, else on the UDP socket.
pub(crate) fn transmit(
    shared: &Shared,
    udp: &Udp,
    to: SocketAddr,
    data: &[u8],
    segment: usize,
) -> std::io::Result<()> {
    {
        let tcp = shared.nat.tcp.lock();
        if let Some(t) = tcp.as_ref().filter(|t| t.addr == to) {
            for d in data.chunks(segment.max(1)) {
                t.send(d);
            }
            return Ok(());
        }
    }
    udp.send(to, data, segment)
}

/// The relay confirmed a registration (over UDP from `from`, or over TCP).
pub(crate) fn registered(
    shared: &Shared,
    from: SocketAddr,
    token: [u8; 8],
    keepalive: u16,
    observed: Option<SocketAddr>,
) {
    if let Some(r) = shared.nat.relay.write().as_mut() {
        if r.over_tcp && observed.is_some() {
            // A UDP registration while on TCP: UDP works (again); the TCP
            // connection is closed (its thread ends by itself).
            tracing::info!(relay = %from, "relay over UDP works again; leaving TCP");
            r.over_tcp = false;
            r.token = None;
            *shared.nat.tcp.lock() = None;
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

/// Sends `bytes` for `peer` to `to`, through the relay when `to` is the
/// relay's address.
pub(crate) fn send_to(
    shared: &Shared,
    udp: &Udp,
    peer: &Peer,
    to: SocketAddr,
    bytes: &[u8],
) -> std::io::Result<()> {
    if let Some((addr, token)) = shared.nat.route().filter(|(a, _)| *a == to) {
        let Some(ip) = peer.relay_ip() else {
            return Err(std::io::ErrorKind::AddrNotAvailable.into());
        };
        let mut buf = vec![0u8; relay::SEND_HEADER + bytes.len()];
        relay::send_header(&mut buf, ip, token);
        buf[relay::SEND_HEADER..].copy_from_slice(bytes);
        return transmit(shared, udp, addr, &buf, buf.len());
    }
    udp.send(to, bytes, bytes.len())
}

/// What to do with a datagram that is not WireGuard.
pub(crate) enum Inbound<'a> {
    /// A WireGuard packet that came through the relay: decrypt it as from
    /// the relay's address.
    Relayed(SocketAddr, &'a [u8]),
    /// Handled (or dropped) here.
    Done,
}

/// Handles a non-WireGuard datagram: STUN answers, relay frames, probes.
/// `None` for anything unrecognised or unauthenticated (the caller counts
/// it as malformed; nothing is answered).
pub(crate) fn on_datagram<'a>(
    shared: &Shared,
    udp: &Udp,
    from: SocketAddr,
    d: &'a [u8],
) -> Option<Inbound<'a>> {
    let now = Instant::now();
    if relay::is_relay(d) {
        let relay_addr = shared.nat.relay.read().as_ref().map(|r| r.addr);
        if relay_addr != Some(from) {
            return None;
        }
        return match relay::parse(d)? {
            relay::Frame::Registered {
                token,
                keepalive,
                observed,
            } => {
                registered(shared, from, token, keepalive, Some(observed));
                Some(Inbound::Done)
            }
            relay::Frame::Deliver { packet, .. } if is_wireguard(packet) => {
                Some(Inbound::Relayed(from, packet))
            }
            relay::Frame::Deliver { packet, .. } if disco::is_disco(packet) => {
                on_disco(shared, udp, Via::Relay, packet, now).then_some(Inbound::Done)
            }
            _ => None,
        };
    }
    if disco::is_disco(d) {
        return on_disco(shared, udp, Via::Direct(from), d, now).then_some(Inbound::Done);
    }
    if let Some((tx, mapped)) = stun::parse_response(d) {
        let mut s = shared.nat.stun.lock();
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

/// An authenticated probe from a peer; `false` if it is not one (unknown
/// sender, bad tag: no answer, counted as malformed).
pub(crate) fn on_disco(shared: &Shared, udp: &Udp, via: Via, d: &[u8], now: Instant) -> bool {
    let Some(sender) = disco::sender(d) else {
        return false;
    };
    let Some(peer) = shared.table.read().by_key(&sender).map(|(_, p)| p.clone()) else {
        shared.counters.unknown_key.fetch_add(1, Relaxed);
        return true;
    };
    let mut slot = peer.path.lock();
    let Some(pp) = slot.as_mut() else {
        return false;
    };
    let Some(msg) = disco::open(d, &pp.key) else {
        return false;
    };
    match msg {
        Message::Ping(tx) => pp.manager.handle_ping(now, via, tx),
        Message::Pong { tx, .. } => pp.manager.handle_pong(now, tx),
        Message::CallMeMaybe { candidates, .. } => {
            let relay = shared.nat.relay.read().as_ref().map(|r| r.addr);
            let direct: Vec<SocketAddr> = candidates
                .into_iter()
                .filter(|c| Some(*c) != relay)
                .collect();
            pp.manager.handle_call_me_maybe(now, &direct);
        }
    }
    flush_peer(shared, udp, &peer, pp);
    true
}

/// Sends what the peer's path manager queued and applies its path choice.
fn flush_peer(shared: &Shared, udp: &Udp, peer: &Peer, pp: &mut PeerPath) {
    let Some(own) = shared
        .key
        .read()
        .as_ref()
        .map(|k| PublicKey::from(k.public))
    else {
        return;
    };
    let route = shared.nat.route();
    while let Some(o) = pp.manager.poll_transmit() {
        let (via, msg) = match o {
            Outgoing::Ping { via, tx } => (via, Message::Ping(tx)),
            Outgoing::Pong { via, tx, seen } => (via, Message::Pong { tx, seen }),
            Outgoing::CallMeMaybe { tx } => {
                let candidates = shared.nat.own.lock().clone();
                (Via::Relay, Message::CallMeMaybe { tx, candidates })
            }
        };
        let bytes = disco::encode(&msg, &own, &pp.key);
        let result = match (via, route, pp.ip) {
            (Via::Direct(to), _, _) => udp.send(to, &bytes, bytes.len()),
            (Via::Relay, Some((addr, token)), Some(ip)) => {
                let mut buf = vec![0u8; relay::SEND_HEADER + bytes.len()];
                relay::send_header(&mut buf, ip, token);
                buf[relay::SEND_HEADER..].copy_from_slice(&bytes);
                transmit(shared, udp, addr, &buf, buf.len())
            }
            (Via::Relay, _, _) => Ok(()),
        };
        if let Err(e) = result {
            tracing::trace!(peer = %peer.key, ?via, "probe not sent: {e}");
        }
    }
    apply_path(shared, udp, peer, pp);
}

/// Points the peer's endpoint at the manager's path. A handshake that
/// went out on no path or a dead one is sent again at once on a confirmed
/// path (not after WireGuard's 5 s retry), so the first packets of a new
/// peer wait for the relay or a direct path only as long as those take.
fn apply_path(shared: &Shared, udp: &Udp, peer: &Peer, pp: &mut PeerPath) {
    let path = pp.manager.path();
    let direct = matches!(path, Path::Direct(_));
    if pp.was_direct && !direct {
        shared.nat.restun.store(true, Relaxed);
    }
    pp.was_direct = direct;
    let target = match path {
        Path::Direct(a) | Path::Blind(a) => Some(a),
        Path::Relay => shared.nat.route().map(|(a, _)| a),
        Path::None => None,
    };
    peer.via_relay.store(matches!(path, Path::Relay), Relaxed);
    let Some(t) = target else { return };
    let now = Instant::now();
    let changed = {
        let mut ep = peer.endpoint.lock();
        let changed = *ep != Some(t);
        if changed {
            tracing::info!(peer = %peer.key, from = ?*ep, to = %t, ?path, "peer path changed");
            *ep = Some(t);
        }
        changed
    };
    if matches!(path, Path::Blind(_)) {
        return;
    }
    if changed {
        pp.kick_until = Some(now + KICK_FOR);
    } else if pp.kick_until.is_none_or(|u| now >= u)
        || pp
            .last_kick
            .is_some_and(|k| now.duration_since(k) < KICK_EVERY)
    {
        return;
    }
    pp.last_kick = Some(now);
    let mut buf = [0u8; 256];
    let mut tunn = peer.tunn.lock();
    if tunn.time_since_last_handshake().is_some() {
        return;
    }
    if let boringtun::noise::TunnResult::WriteToNetwork(p) =
        tunn.format_handshake_initiation(&mut buf, true)
    {
        let n = p.len();
        drop(tunn);
        let result = send_to(shared, udp, peer, t, &buf[..n]);
        super::io::sent(shared, peer, t, n, result);
    }
}

/// Every timer tick: STUN, relay registration, and every managed peer.
pub(crate) fn tick(shared: &Arc<Shared>, udp: &Udp, peers: &[Arc<Peer>]) {
    let now = Instant::now();
    stun_tick(shared, udp, now);
    relay_tick(shared, udp, now);
    let relay = shared.nat.route().map(|(a, _)| a);
    for peer in peers {
        let mut slot = peer.path.lock();
        let Some(pp) = slot.as_mut() else { continue };
        // The relay's address is no direct candidate; advertising it means
        // the peer is registered there.
        let direct: Vec<SocketAddr> = pp
            .advertised
            .iter()
            .filter(|a| Some(**a) != relay)
            .copied()
            .collect();
        pp.manager.set_candidates(now, &direct);
        // Every member of a deployment is told the same relay: once we are
        // registered, the peer is reachable there as soon as it registers
        // too (before its announcement of the relay's address arrives).
        pp.manager
            .set_relay(now, relay.is_some() && pp.ip.is_some());
        if now >= pp.manager.poll_timeout() {
            pp.manager.handle_timeout(now);
        }
        flush_peer(shared, udp, peer, pp);
    }
}

fn stun_tick(shared: &Shared, udp: &Udp, now: Instant) {
    let mut s = shared.nat.stun.lock();
    let restun = shared.nat.restun.swap(false, Relaxed);
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
        if let Err(e) = udp.send(srv, &stun::binding_request(&tx), stun::HEADER_LEN) {
            tracing::debug!(server = %srv, "STUN request not sent: {e}");
        }
    }
}

fn relay_tick(shared: &Arc<Shared>, udp: &Udp, now: Instant) {
    let mut slot = shared.nat.relay.write();
    let Some(r) = slot.as_mut() else { return };
    if r.over_tcp {
        // The TCP connection registers and renews by itself; when it ends,
        // start over with UDP. Meanwhile UDP is tried now and then: an
        // answer moves the relay back to it (`registered`).
        let mut tcp = shared.nat.tcp.lock();
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
            let frame = relay::register(&r.ticket);
            let _ = udp.send(r.addr, &frame, frame.len());
        }
        return;
    }
    if r.token.is_none() && now.duration_since(r.since) >= TCP_AFTER {
        if let Some((addr, fingerprint)) = r.tcp {
            match super::relay_tcp::TcpRelay::start(
                shared.clone(),
                addr,
                fingerprint,
                r.ticket.clone(),
            ) {
                Ok(t) => {
                    tracing::info!(relay = %addr, "no answer from the relay over UDP; using TCP");
                    *shared.nat.tcp.lock() = Some(t);
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
    let frame = relay::register(&r.ticket);
    if let Err(e) = udp.send(r.addr, &frame, frame.len()) {
        tracing::debug!(relay = %r.addr, "relay registration not sent: {e}");
    }
}

/// A fresh path state for a peer.
pub(crate) fn new_peer_path(
    secret: &x25519_dalek::StaticSecret,
    peer: &PublicKey,
    cfg: &PathConfig,
) -> PeerPath {
    PeerPath {
        manager: PathManager::new(cfg.clone(), rand_core::OsRng.next_u64(), Instant::now()),
        key: PairKey::from_dalek(secret, peer),
        ip: None,
        advertised: Vec::new(),
        kick_until: None,
        last_kick: None,
        was_direct: false,
    }
}

/// The first IPv4 host address of a peer's allowed IPs (its relay name).
pub(crate) fn relay_ip_of(allowed: &[ipnet::IpNet]) -> Option<Ipv4Addr> {
    allowed.iter().find_map(|n| match n.addr() {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(_) => None,
    })
}
