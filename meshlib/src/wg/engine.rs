//! The engine: peer table + key + UDP socket + device, and the Rust API to
//! change them live. The packet loops are in [`super::io`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::Tunn;
use parking_lot::{Mutex, RwLock};
use rand_core::RngCore;

use super::device::Device;
use super::peer::{Peer, PeerConfig, PeerStats};
use super::shared::{Counters, Shared, StaticKey, HANDSHAKE_RATE_LIMIT};
use super::table::PeerTable;
use super::transport::{RelaySetting, Sink, Transport};
use super::uapi::{self, InterfaceInfo, PeerChange, PeerInfo, SetRequest};
use super::udp::Udp;
use super::{batch, io};
use crate::keys::{PrivateKey, PublicKey};

/// Why an engine operation failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The UDP socket could not be created or bound (port in use, ...).
    #[error("cannot bind UDP port {port}: {source}")]
    Bind {
        /// The port asked for.
        port: u16,
        /// The OS error.
        source: std::io::Error,
    },
    /// A worker thread could not be started.
    #[error("cannot start engine thread: {0}")]
    Thread(std::io::Error),
    /// No free 24-bit receiver index was found (table full).
    #[error("no free peer index")]
    NoFreeIndex,
}

impl EngineError {
    /// The UAPI `errno=` value for this error.
    pub fn errno(&self) -> i32 {
        match self {
            EngineError::Bind { .. } => uapi::ERRNO_PORT_IN_USE,
            _ => uapi::ERRNO_INVALID,
        }
    }
}

/// A relay for [`Engine::set_relay`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayTarget {
    /// Its UDP address.
    pub udp: SocketAddr,
    /// Its TLS-over-TCP address and certificate fingerprint, if it has one.
    pub tcp: Option<(SocketAddr, [u8; 32])>,
    /// This member's ticket.
    pub ticket: Vec<u8>,
}

/// Most crypto workers an engine starts.
pub const MAX_CRYPTO_WORKERS: usize = 64;

/// Engine-wide configuration at start.
#[derive(Clone, Default)]
pub struct EngineConfig {
    /// UDP port to listen on; 0 (the default) picks a free one.
    pub listen_port: u16,
    /// The interface's private key; `None` until set (nothing flows).
    pub private_key: Option<PrivateKey>,
    /// Firewall mark for the UDP socket; 0 (the default) sets none.
    pub fwmark: u32,
    /// Threads that seal and open packets for the packet loops, so one
    /// busy peer's traffic uses several cores, in order (wireguard-go's
    /// design). 0 (the default): none, each loop does its own crypto,
    /// which measured faster on two cores (`benches/RESULTS.md`).
    pub crypto_workers: usize,
}

/// Drops not attributable to a configured peer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Handshake initiations from a key that is not a peer (not answered).
    pub unknown_key: u64,
    /// Datagrams naming a receiver index no peer holds (e.g. removed peers).
    pub unknown_index: u64,
    /// Datagrams that are not WireGuard messages.
    pub malformed: u64,
    /// Outbound packets to an address no peer's allowed IPs cover.
    pub no_route: u64,
    /// Datagrams the UDP socket refused to send (no route, buffer full
    /// after waiting, ...): not counted in any peer's `tx_bytes`.
    pub send_failed: u64,
    /// Datagrams that arrived while the link was down, dropped unanswered
    /// (wireguard-go's socket is closed then; the sender tries again).
    pub link_down: u64,
}

/// A packet loop's body.
type LoopFn = Box<dyn FnOnce(Arc<Shared>) + Send>;

/// A multi-peer WireGuard engine: one `boringtun::noise::Tunn` per peer, a
/// UDP socket, a [`Device`] for the clear-text side, and its threads (device
/// → network with encryption, network → device with decryption, timers,
/// and one following the device's link state).
///
/// Every method may be called while traffic flows; changes to one peer do
/// not disturb the others. Dropping the engine stops it.
pub struct Engine {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

fn static_key(key: &PrivateKey) -> StaticKey {
    let secret = key.to_dalek();
    let public = x25519_dalek::PublicKey::from(&secret);
    let limiter = Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT));
    StaticKey {
        secret,
        public,
        limiter,
    }
}

impl Engine {
    /// Binds the UDP socket and starts the packet loops on `device`.
    pub fn start(device: Arc<dyn Device>, config: EngineConfig) -> Result<Self, EngineError> {
        let udp =
            Udp::bind(config.listen_port, config.fwmark).map_err(|source| EngineError::Bind {
                port: config.listen_port,
                source,
            })?;
        let key = config.private_key.as_ref().map(static_key);
        let transport = Transport::new(udp, key.as_ref().map(|k| &k.secret));
        let shared = Arc::new(Shared {
            table: RwLock::new(PeerTable::new()),
            key: RwLock::new(key),
            transport,
            fwmark: AtomicU32::new(config.fwmark),
            device: device.clone(),
            stop: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            link_up: AtomicBool::new(device.is_up()),
            counters: Counters::default(),
            epoch: Instant::now(),
            vips: super::vips::Vips::new(Instant::now()),
            crypt: match config.crypto_workers {
                0 => None,
                n => Some(
                    super::crypt::Pool::start(n.min(MAX_CRYPTO_WORKERS))
                        .map_err(EngineError::Thread)?,
                ),
            },
        });
        // WireGuard datagrams that come over the relay's TCP connection
        // are decrypted here (the transport knows no peers).
        let weak = Arc::downgrade(&shared);
        shared.transport.set_sink_factory(Box::new(move || {
            let shared = weak.upgrade()?;
            Some(Box::new(io::TcpSink::new(shared)) as Box<dyn Sink>)
        }));
        let engine = Engine {
            shared: shared.clone(),
            threads: Mutex::new(Vec::new()),
        };
        let network: LoopFn = match shared.crypt.clone() {
            Some(pool) => Box::new(move |s| batch::network_loop(s, pool)),
            None => Box::new(io::network_loop),
        };
        let mut loops: Vec<(String, LoopFn)> = vec![
            ("wg-udp".into(), network),
            ("wg-timers".into(), Box::new(io::timer_loop)),
            ("wg-link".into(), Box::new(io::link_loop)),
        ];
        for q in 0..shared.device.queues() {
            let device: LoopFn = match shared.crypt.clone() {
                Some(pool) => Box::new(move |s| batch::device_loop(s, q, pool)),
                None => Box::new(move |s| io::device_loop(s, q)),
            };
            loops.push((format!("wg-tun{q}"), device));
        }
        for (name, f) in loops {
            let s = shared.clone();
            let handle = std::thread::Builder::new()
                .name(name)
                .spawn(move || f(s))
                .map_err(EngineError::Thread)?;
            engine.threads.lock().push(handle);
        }
        Ok(engine)
    }

    /// Sets (or with `None` clears) the private key; sessions restart
    /// unless the key is the one already set (`wg setconf` re-sends it).
    pub fn set_private_key(&self, key: Option<PrivateKey>) {
        let new = key.as_ref().map(static_key);
        // Lock order everywhere: table, then key.
        let table = self.shared.table.read();
        let mut slot = self.shared.key.write();
        let same = match (&*slot, &new) {
            (Some(old), Some(new)) => old.public == new.public,
            (None, None) => true,
            _ => false,
        };
        if same {
            return;
        }
        if let Some(k) = &new {
            for (_, peer) in table.iter() {
                peer.tunn
                    .lock()
                    .set_static_private(k.secret.clone(), k.public, None);
            }
        }
        self.shared
            .transport
            .set_key(new.as_ref().map(|k| &k.secret));
        *slot = new;
    }

    /// The public key of the interface, if a private key is set.
    pub fn public_key(&self) -> Option<PublicKey> {
        self.shared.key.read().as_ref().map(|k| k.public.into())
    }

    /// The bound UDP port.
    pub fn listen_port(&self) -> u16 {
        self.shared.transport.udp().0.port
    }

    /// Rebinds the UDP socket to `port` (0: any). Peers and sessions stay.
    /// The new socket lives in the network namespace of the calling thread.
    pub fn set_listen_port(&self, port: u16) -> Result<(), EngineError> {
        if port != 0 && port == self.listen_port() {
            return Ok(());
        }
        let fwmark = self.shared.fwmark.load(Relaxed);
        let udp = Udp::bind(port, fwmark).map_err(|source| EngineError::Bind { port, source })?;
        self.shared.transport.rebind(udp);
        Ok(())
    }

    /// Sets the firewall mark of the UDP socket (0 clears it).
    pub fn set_fwmark(&self, mark: u32) -> Result<(), EngineError> {
        self.shared.fwmark.store(mark, Relaxed);
        let (udp, _) = self.shared.transport.udp();
        udp.set_mark(mark).map_err(|source| EngineError::Bind {
            port: udp.port,
            source,
        })
    }

    /// Adds the peer, or replaces the configuration of an existing one
    /// (allowed IPs, endpoint, keepalive, preshared key) keeping its session.
    pub fn set_peer(&self, config: PeerConfig) -> Result<(), EngineError> {
        self.apply_peer_change(&PeerChange {
            public_key: config.public_key,
            remove: false,
            update_only: false,
            preshared_key: Some(config.preshared_key.unwrap_or([0; 32])),
            endpoint: config.endpoint,
            persistent_keepalive: Some(config.persistent_keepalive),
            replace_allowed_ips: true,
            allowed_ips: config.allowed_ips,
        })
    }

    /// Makes the peer set exactly `desired` (the sidecar's network map):
    /// peers not in it are removed, the others added or updated in place
    /// (sessions kept; an endpoint of `None` keeps the roamed one).
    pub fn sync_peers(&self, desired: &[PeerConfig]) -> Result<(), EngineError> {
        let keep: std::collections::HashSet<PublicKey> =
            desired.iter().map(|p| p.public_key).collect();
        let current: Vec<PublicKey> = self
            .shared
            .table
            .read()
            .iter()
            .map(|(_, p)| p.key)
            .collect();
        for key in current.iter().filter(|k| !keep.contains(k)) {
            self.remove_peer(key);
        }
        desired.iter().try_for_each(|p| self.set_peer(p.clone()))
    }

    /// Applies the changes of [`crate::reconcile::diff`] in order. A peer
    /// that cannot be configured is skipped and reported; the others are
    /// still applied. Returns the failures.
    pub fn apply_diff(
        &self,
        changes: Vec<crate::reconcile::PeerDiff>,
    ) -> Vec<(PublicKey, EngineError)> {
        use crate::reconcile::PeerDiff;
        let mut failed = Vec::new();
        for change in changes {
            match change {
                PeerDiff::Remove(key) => {
                    self.remove_peer(&key);
                }
                PeerDiff::Upsert(peer) => {
                    let key = peer.public_key;
                    let candidates = peer.candidates.clone();
                    let mut config: PeerConfig = peer.into();
                    if !candidates.is_empty() && self.is_managed(&key) {
                        // Path selection owns the endpoint.
                        config.endpoint = None;
                    }
                    if let Err(e) = self.set_peer(config) {
                        failed.push((key, e));
                    } else if !candidates.is_empty() {
                        self.set_peer_candidates(&key, &candidates);
                    }
                }
            }
        }
        failed
    }

    /// Removes a peer; its packets are refused from this call on. Returns
    /// whether it existed.
    pub fn remove_peer(&self, key: &PublicKey) -> bool {
        self.shared.transport.forget(key);
        self.shared.table.write().remove(key).is_some()
    }

    /// Counters and state of one peer.
    pub fn peer_stats(&self, key: &PublicKey) -> Option<PeerStats> {
        let table = self.shared.table.read();
        let (index, peer) = table.by_key(key)?;
        Some(peer.stats(table.allowed_of(index)))
    }

    /// Counters and state of every peer, sorted by public key.
    pub fn peers(&self) -> Vec<PeerStats> {
        let table = self.shared.table.read();
        let mut all: Vec<_> = table
            .iter()
            .map(|(i, p)| p.stats(table.allowed_of(i)))
            .collect();
        all.sort_by_key(|p| p.public_key);
        all
    }

    /// Drops not attributable to a peer.
    pub fn stats(&self) -> EngineStats {
        let c = &self.shared.counters;
        EngineStats {
            unknown_key: c.unknown_key.load(Relaxed),
            unknown_index: c.unknown_index.load(Relaxed),
            malformed: c.malformed.load(Relaxed),
            no_route: c.no_route.load(Relaxed),
            send_failed: c.send_failed.load(Relaxed),
            link_down: c.link_down.load(Relaxed),
        }
    }

    /// Whether the device's link is up, as the engine last learned it (from
    /// the device's link notifications, [`Device::wait_link`]): while it is
    /// down the engine sends nothing.
    pub fn link_up(&self) -> bool {
        self.shared.link_up.load(Relaxed)
    }

    /// True once a packet loop has ended by itself (device gone).
    pub fn has_failed(&self) -> bool {
        self.shared.failed.load(Relaxed)
    }

    /// Applies one UAPI peer section (add, update, remove).
    pub fn apply_peer_change(&self, change: &PeerChange) -> Result<(), EngineError> {
        let mut table = self.shared.table.write();
        if change.remove {
            table.remove(&change.public_key);
            self.shared.transport.forget(&change.public_key);
            return Ok(());
        }
        let index = match table.by_key(&change.public_key) {
            Some((index, _)) => index,
            None if change.update_only => return Ok(()),
            None => self.insert_peer(&mut table, change.public_key)?,
        };
        let Some(peer) = table.by_index(index).cloned() else {
            return Ok(());
        };
        if let Some(psk) = change.preshared_key {
            self.set_preshared_key(&peer, index, psk);
        }
        if let Some(ep) = change.endpoint {
            *peer.endpoint.lock() = Some(ep);
        }
        if let Some(ka) = change.persistent_keepalive {
            peer.keepalive.store(ka, Relaxed);
        }
        if change.replace_allowed_ips {
            table.clear_allowed(index);
        }
        for net in &change.allowed_ips {
            table.add_allowed(index, *net);
        }
        Ok(())
    }

    fn new_tunn(&self, key: PublicKey, psk: Option<[u8; 32]>, index: u32) -> Tunn {
        let secret = match &*self.shared.key.read() {
            Some(k) => k.secret.clone(),
            // Placeholder until a key is set (`set_private_key` replaces it);
            // the loops move no packet while the key is unset.
            None => x25519_dalek::StaticSecret::random_from_rng(rand_core::OsRng),
        };
        Tunn::new(secret, key.to_dalek(), psk, None, index, None)
    }

    fn insert_peer(&self, table: &mut PeerTable<Peer>, key: PublicKey) -> Result<u32, EngineError> {
        let index = (0..64)
            .map(|_| rand_core::OsRng.next_u32() & 0x00ff_ffff)
            .find(|i| *i != 0 && !table.index_in_use(*i))
            .ok_or(EngineError::NoFreeIndex)?;
        let peer = Peer::new(key, self.new_tunn(key, None, index));
        table.insert(key, index, Arc::new(peer));
        Ok(index)
    }

    fn set_preshared_key(&self, peer: &Peer, index: u32, psk: [u8; 32]) {
        let psk = (psk != [0; 32]).then_some(psk);
        let mut current = peer.preshared_key.lock();
        if *current != psk {
            *current = psk;
            *peer.tunn.lock() = self.new_tunn(peer.key, psk, index);
        }
    }

    /// Applies a UAPI `set=1` request, in order.
    pub fn apply_set(&self, req: &SetRequest) -> Result<(), EngineError> {
        if let Some(key) = &req.private_key {
            self.set_private_key(key.clone());
        }
        if let Some(port) = req.listen_port {
            self.set_listen_port(port)?;
        }
        if let Some(mark) = req.fwmark {
            self.set_fwmark(mark)?;
        }
        if req.replace_peers {
            self.shared.table.write().clear();
            self.shared.transport.forget_all();
        }
        for change in &req.peers {
            self.apply_peer_change(change)?;
        }
        Ok(())
    }

    /// The state a UAPI `get=1` reports.
    pub fn interface_info(&self, private_key: Option<PrivateKey>) -> InterfaceInfo {
        let table = self.shared.table.read();
        let mut peers: Vec<PeerInfo> = table
            .iter()
            .map(|(i, p)| {
                let s = p.stats(table.allowed_of(i));
                PeerInfo {
                    public_key: s.public_key,
                    preshared_key: *p.preshared_key.lock(),
                    endpoint: s.endpoint,
                    allowed_ips: s.allowed_ips,
                    last_handshake: s.last_handshake,
                    rx_bytes: s.rx_bytes,
                    tx_bytes: s.tx_bytes,
                    persistent_keepalive: s.persistent_keepalive,
                }
            })
            .collect();
        peers.sort_by_key(|p| p.public_key);
        InterfaceInfo {
            private_key,
            listen_port: self.listen_port(),
            fwmark: self.shared.fwmark.load(Relaxed),
            peers,
        }
    }

    /// The private key, for the UAPI `get=1` answer only.
    pub(crate) fn private_key(&self) -> Option<PrivateKey> {
        self.shared
            .key
            .read()
            .as_ref()
            .map(|k| PrivateKey::from_bytes(k.secret.to_bytes()))
    }

    /// The endpoint the engine currently sends to for `key`.
    pub fn endpoint(&self, key: &PublicKey) -> Option<SocketAddr> {
        let table = self.shared.table.read();
        let (_, peer) = table.by_key(key)?;
        let ep = *peer.endpoint.lock();
        ep
    }

    /// Whether path selection decides `key`'s endpoint.
    fn is_managed(&self, key: &PublicKey) -> bool {
        let table = self.shared.table.read();
        table.by_key(key).is_some_and(|(_, p)| p.is_managed())
    }

    /// Gives a peer its candidates (the endpoints it advertised, the relay's
    /// address among them if it is registered there): from now on its path
    /// manager probes them and chooses its endpoint ([`crate::nat::path`]).
    /// Returns whether the peer exists and a private key is set.
    pub fn set_peer_candidates(&self, key: &PublicKey, candidates: &[SocketAddr]) -> bool {
        let table = self.shared.table.read();
        let Some((index, peer)) = table.by_key(key) else {
            return false;
        };
        let ip = super::transport::relay_ip_of(&table.allowed_of(index));
        if !self.shared.transport.manage(key, ip, candidates) {
            return false;
        }
        peer.relay_ip.store(ip.map_or(0, u32::from), Relaxed);
        peer.managed.store(true, Relaxed);
        true
    }

    /// The path state of a managed peer (path, round trip, candidates).
    pub fn peer_path(&self, key: &PublicKey) -> Option<crate::nat::path::PathState> {
        let table = self.shared.table.read();
        let (_, peer) = table.by_key(key)?;
        if !peer.is_managed() {
            return None;
        }
        self.shared.transport.path_state(key, Instant::now())
    }

    /// How this member reaches each peer now (at most
    /// [`crate::traffic::MAX_PATHS`]), for its traffic report: a managed
    /// peer's chosen path and round trip; an unmanaged peer (fixed
    /// endpoint) is direct, working if it completed a handshake within the
    /// last three minutes, with no round trip measured.
    pub fn peer_paths(&self) -> Vec<crate::traffic::PeerPath> {
        use crate::nat::path::Path;
        let now = Instant::now();
        let recent = std::time::SystemTime::now() - std::time::Duration::from_secs(180);
        let table = self.shared.table.read();
        let mut out: Vec<_> = table
            .iter()
            .map(|(_, peer)| {
                let state = peer
                    .is_managed()
                    .then(|| self.shared.transport.path_state(&peer.key, now))
                    .flatten();
                match state {
                    Some(st) => crate::traffic::PeerPath {
                        peer: peer.key,
                        relay: st.path == Path::Relay,
                        working: matches!(st.path, Path::Direct(_) | Path::Relay),
                        rtt_micros: st
                            .rtt
                            .map(|d| u32::try_from(d.as_micros()).unwrap_or(u32::MAX)),
                    },
                    None => crate::traffic::PeerPath {
                        peer: peer.key,
                        relay: false,
                        working: peer.last_handshake.lock().is_some_and(|t| t > recent),
                        rtt_micros: None,
                    },
                }
            })
            .collect();
        out.sort_by_key(|p| p.peer);
        out.truncate(crate::traffic::MAX_PATHS);
        out
    }

    /// STUN servers to learn the socket's server-reflexive addresses from
    /// (binding requests sent from the WireGuard socket every 20 s).
    pub fn set_stun_servers(&self, servers: Vec<SocketAddr>) {
        self.shared.transport.set_stun_servers(servers);
    }

    /// The relay to register with (its UDP address, its TCP address and
    /// pinned certificate fingerprint for when UDP is blocked, and this
    /// member's ticket), or none. A new ticket for the same relay keeps the
    /// registration.
    pub fn set_relay(&self, relay: Option<RelayTarget>) {
        self.shared.transport.set_relay(relay.map(|t| RelaySetting {
            udp: t.udp,
            tcp: t.tcp,
            ticket: t.ticket,
        }));
    }

    /// The relay's address once registered with it (a candidate to
    /// advertise: peers reach this member there).
    pub fn relay_addr(&self) -> Option<SocketAddr> {
        self.shared.transport.route().map(|(a, _)| a)
    }

    /// This socket's server-reflexive addresses: fresh STUN answers and the
    /// address the relay saw.
    pub fn reflexive_addrs(&self) -> Vec<SocketAddr> {
        self.shared.transport.reflexive(Instant::now())
    }

    /// The candidates a member advertises: its `local` addresses (configured,
    /// or detected, with the WireGuard port), then the engine's
    /// server-reflexive addresses (STUN, relay-observed), then the relay's
    /// address if registered; without duplicates, at most
    /// [`crate::nat::MAX_ADVERTISED`]. Also tells the engine, which sends them in
    /// call-me-maybe probes.
    ///
    /// The sidecar calls this wherever it computes the endpoints it announces
    /// (at join, at resume, and on every re-check), so that learned addresses
    /// reach the map with the next announcement.
    pub fn advertise(&self, local: &[SocketAddr]) -> Vec<SocketAddr> {
        let relay = self.relay_addr();
        let mut out: Vec<SocketAddr> = Vec::new();
        for a in local
            .iter()
            .copied()
            .chain(self.reflexive_addrs())
            .chain(relay)
        {
            if !out.contains(&a) && out.len() < crate::nat::MAX_ADVERTISED {
                out.push(a);
            }
        }
        // The relay's address must survive the cap: peers reach us there.
        if let Some(r) = relay {
            if !out.contains(&r) {
                out.pop();
                out.push(r);
            }
        }
        self.set_own_candidates(out.iter().filter(|a| Some(**a) != relay).copied().collect());
        out
    }

    /// Gives the engine what the keyserver said about STUN and the relay
    /// ([`crate::proto::RelayInfo`], from [`crate::member::Event::Relay`]).
    pub fn use_relay_info(&self, info: &crate::proto::RelayInfo) {
        self.set_stun_servers(info.stun.clone());
        self.set_relay(info.relay.map(|udp| RelayTarget {
            udp,
            tcp: info.tcp.map(|t| (t, info.cert_sha256)),
            ticket: info.ticket.clone(),
        }));
    }

    /// Our own candidates, as advertised (sent in call-me-maybe probes).
    pub fn set_own_candidates(&self, candidates: Vec<SocketAddr>) {
        self.shared.transport.set_own_candidates(candidates);
    }

    /// Balances flows to service addresses (kernel mode; see
    /// [`super::flows`] for the policy): packets from the device to
    /// `services.range` go, flow by flow, to the peer of the instance the
    /// flow is pinned to, and peers may answer as a service address only
    /// for their own flows. Call with every map. Open TCP flows of
    /// instances that are no longer backends are reset at once (a reset
    /// written to the device for the local client); returns how many.
    pub fn set_services(&self, services: &super::flows::Services) -> usize {
        let (ended, held) = {
            let mut table = self.shared.vips.table.lock();
            let ended = table.set_services(services, Instant::now());
            (ended, table.take_held())
        };
        let range = services.range.filter(|_| !services.addresses.is_empty());
        self.shared.vips.set_range(range);
        super::vip::write_resets(&self.shared, &ended);
        super::vip::write_held(&self.shared, held);
        ended.len()
    }

    /// Sets (or with `None` clears) the hook called with a service's name
    /// when a new flow to its wakeable address is held because it has no
    /// instance (scale to zero; see [`super::flows`]): once per address
    /// and wake timeout, from a packet loop, with no lock held. Keep it
    /// quick (queue the request): [`crate::node::Node`] calls
    /// [`crate::node::ControlRequests::wake`].
    pub fn set_wake_hook(&self, hook: Option<super::WakeHook>) {
        *self.shared.vips.hook.write() = hook;
    }

    /// Traffic per destination service of this member's flows to service
    /// addresses, cumulative since the engine started (destination: the
    /// service's name; at most [`crate::traffic::MAX_PAIRS`]).
    pub fn traffic(&self) -> crate::traffic::TrafficReport {
        self.shared.vips.table.lock().traffic()
    }

    /// Counters of the service-address flow table.
    pub fn flow_stats(&self) -> super::flows::FlowStats {
        let mut stats = self.shared.vips.table.lock().stats();
        stats.unreadable = self.shared.vips.unreadable.load(Relaxed);
        stats
    }

    /// Stops the loops and waits for them.
    pub fn shutdown(&self) {
        self.shared.stop.store(true, Relaxed);
        self.shared.transport.stop();
        self.shared.device.interrupt();
        if let Some(pool) = &self.shared.crypt {
            // The workers finish what is queued; loops waiting for a job
            // see the pool stopped.
            pool.stop();
        }
        for handle in self.threads.lock().drain(..) {
            let _ = handle.join();
        }
        if let Some(pool) = &self.shared.crypt {
            // Jobs a loop queued after the workers left.
            pool.clear();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}
