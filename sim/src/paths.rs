//! Path selection on a virtual clock (issue 22): two peers, each with the
//! real [`PathManager`] it would run for the other, exchanging its pings,
//! pongs and call-me-maybes over a simulated underlay.
//!
//! ## Model
//!
//! - Each peer has one UDP socket at a private address behind a NAT, or a
//!   public one. A NAT maps a socket's flows to ports of its public
//!   address: once per socket (*endpoint-independent*; the socket's own
//!   port when `port_preserving`) or once per destination (*symmetric*),
//!   and lets a datagram in to a mapped port from anyone (*open*), from an
//!   address (*address-restricted*) or an address and port
//!   (*port-restricted*) the port sent to. [`PathSim::rebind`] gives every
//!   flow a new port (a NAT that restarted); [`PathSim::set_nat`] changes
//!   its behaviour (a symmetric NAT that turns port-preserving).
//! - Candidates are what the engine advertises: the socket's address and
//!   its STUN answer (the mapping to a STUN server, refreshed every
//!   [`PathSimConfig::stun_every`] as the engine's `STUN_EVERY`), reaching
//!   the other peer [`PathSimConfig::map_delay`] later (through the
//!   keyserver's map); a peer that loses its direct path asks STUN again
//!   at once, as the engine does.
//! - Direct datagrams take `direct_delay` ± `jitter` and are lost with
//!   probability `direct_loss`; [`PathSim::block_direct`] drops all of them
//!   (a direct path that dies). Relayed ones take `relay_delay` ± `jitter`.
//! - Relays: each peer is connected to one of several relays; the relay
//!   path works while both peers' relays are up (relays forward to each
//!   other). [`PathSim::kill_relay`] stops one: its datagrams vanish at
//!   once, its peers notice after [`PathSimConfig::relay_detect`] (then the
//!   relay is unavailable to both) and connect to the next live relay
//!   [`PathSimConfig::relay_reconnect`] later.
//!
//! Nothing sleeps: [`PathSim::run_until`] jumps to the next delivery or
//! timer. The same seed gives the same trace; every path change is kept
//! ([`PathSim::trace`]).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use meshlib::nat::disco::TxId;
use meshlib::nat::path::{Outgoing, Path, PathConfig, PathManager, Via};

/// How a NAT maps flows to its public ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// One public port per socket, whatever the destination.
    EndpointIndependent,
    /// One public port per destination (address and port).
    Symmetric,
}

/// Which senders a NAT lets in to a mapped port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filtering {
    /// Anyone (full cone).
    Open,
    /// Addresses the port sent to.
    Address,
    /// Addresses and ports the port sent to.
    AddressPort,
}

/// A NAT's behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatKind {
    /// How flows map to ports.
    pub mapping: Mapping,
    /// Who may send in.
    pub filtering: Filtering,
    /// A new mapping takes the socket's own port when it is free.
    pub port_preserving: bool,
}

impl NatKind {
    /// A home router: endpoint-independent, port-restricted, port-preserving.
    pub fn easy() -> Self {
        Self {
            mapping: Mapping::EndpointIndependent,
            filtering: Filtering::AddressPort,
            port_preserving: true,
        }
    }

    /// A carrier-grade or corporate NAT: a port per destination,
    /// port-restricted.
    pub fn symmetric() -> Self {
        Self {
            mapping: Mapping::Symmetric,
            filtering: Filtering::AddressPort,
            port_preserving: false,
        }
    }
}

/// One peer's NAT state.
#[derive(Debug)]
struct Nat {
    public: Ipv4Addr,
    kind: NatKind,
    /// Mapping key (`None`: endpoint-independent) → public port.
    ports: HashMap<Option<SocketAddr>, u16>,
    /// Who a public port sent to.
    sent_to: HashMap<u16, HashSet<SocketAddr>>,
    /// Ports given up by a rebinding (never handed out again).
    retired: HashSet<u16>,
    next_port: u16,
}

impl Nat {
    fn outbound(&mut self, local: SocketAddr, to: SocketAddr) -> SocketAddr {
        let key = match self.kind.mapping {
            Mapping::EndpointIndependent => None,
            Mapping::Symmetric => Some(to),
        };
        let port = match self.ports.get(&key) {
            Some(p) => *p,
            None => {
                let taken =
                    |p: u16| self.retired.contains(&p) || self.ports.values().any(|q| *q == p);
                let p = if self.kind.port_preserving && !taken(local.port()) {
                    local.port()
                } else {
                    let mut p = self.next_port;
                    while taken(p) {
                        p = p.wrapping_add(1).max(1024);
                    }
                    self.next_port = p.wrapping_add(1).max(1024);
                    p
                };
                self.ports.insert(key, p);
                p
            }
        };
        self.sent_to.entry(port).or_default().insert(to);
        SocketAddr::new(self.public.into(), port)
    }

    fn inbound(&self, port: u16, from: SocketAddr) -> bool {
        if !self.ports.values().any(|p| *p == port) {
            return false;
        }
        let sent = self.sent_to.get(&port);
        match self.kind.filtering {
            Filtering::Open => true,
            Filtering::Address => sent.is_some_and(|s| s.iter().any(|a| a.ip() == from.ip())),
            Filtering::AddressPort => sent.is_some_and(|s| s.contains(&from)),
        }
    }

    /// Every flow gets a new port.
    fn rebind(&mut self) {
        self.retired.extend(self.ports.values().copied());
        self.ports.clear();
        self.sent_to.clear();
        self.next_port = self.next_port.wrapping_add(977).max(1024);
    }
}

/// The world's timings and losses.
#[derive(Debug, Clone)]
pub struct PathSimConfig {
    /// The path managers' timers.
    pub path: PathConfig,
    /// One-way delay of a direct datagram.
    pub direct_delay: Duration,
    /// One-way delay through a relay.
    pub relay_delay: Duration,
    /// Each datagram's delay varies by up to this much either way.
    pub jitter: Duration,
    /// Probability that a direct datagram is lost.
    pub direct_loss: f64,
    /// Probability that a relayed datagram is lost.
    pub relay_loss: f64,
    /// How long a candidate change takes to reach the other peer.
    pub map_delay: Duration,
    /// STUN refresh interval (the engine's `STUN_EVERY`).
    pub stun_every: Duration,
    /// How long a peer takes to notice its relay died.
    pub relay_detect: Duration,
    /// How long it then takes to connect to the next live relay.
    pub relay_reconnect: Duration,
    /// Number of relays.
    pub relays: usize,
    /// Seed of the loss and jitter.
    pub seed: u64,
}

impl Default for PathSimConfig {
    fn default() -> Self {
        Self {
            path: PathConfig::default(),
            direct_delay: Duration::from_millis(10),
            relay_delay: Duration::from_millis(30),
            jitter: Duration::ZERO,
            direct_loss: 0.0,
            relay_loss: 0.0,
            map_delay: Duration::from_millis(50),
            stun_every: Duration::from_secs(20),
            relay_detect: Duration::from_secs(3),
            relay_reconnect: Duration::from_secs(1),
            relays: 2,
            seed: 1,
        }
    }
}

/// A disco message on the wire.
#[derive(Debug, Clone)]
enum Msg {
    Ping(TxId),
    Pong(TxId),
    CallMeMaybe(Vec<SocketAddr>),
}

/// Something that happens at a time.
#[derive(Debug)]
enum Event {
    /// A direct datagram arrives at `to` (a public or private address).
    Direct {
        src: SocketAddr,
        to: SocketAddr,
        msg: Msg,
    },
    /// A relayed datagram for peer `to`, through relay `relay`.
    Relayed { to: usize, relay: usize, msg: Msg },
    /// Peer `peer`'s advertised candidates reach the other.
    Candidates { peer: usize, addrs: Vec<SocketAddr> },
    /// Peer `peer` notices its relay is gone.
    RelayLost { peer: usize },
    /// Peer `peer` connects to the next live relay.
    RelayConnect { peer: usize },
}

/// One simulated peer.
#[derive(Debug)]
struct Peer {
    /// Its path manager for the other peer.
    pm: PathManager,
    /// Its socket's address (private behind a NAT).
    local: SocketAddr,
    nat: Option<Nat>,
    /// The relay it is connected to.
    relay: Option<usize>,
    /// What it advertised last.
    advertised: Vec<SocketAddr>,
    next_stun: Duration,
}

/// One path change: when, which peer, the new path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    /// Virtual time since the start.
    pub at: Duration,
    /// Peer 0 or 1.
    pub peer: usize,
    /// Its new path to the other.
    pub path: Path,
}

/// The STUN server's address (on the public underlay).
const STUN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 250), 3478));

/// Two peers finding their path to each other. See the module docs.
#[derive(Debug)]
pub struct PathSim {
    cfg: PathSimConfig,
    t0: Instant,
    now: Duration,
    peers: [Peer; 2],
    relays_up: Vec<bool>,
    blocked: bool,
    queue: BinaryHeap<Reverse<(Duration, u64)>>,
    events: BTreeMap<u64, Event>,
    seq: u64,
    rng: crate::Rng,
    trace: Vec<Change>,
    /// Datagrams sent and lost, direct and relayed.
    pub sent: u64,
    /// Of which lost (loss, a dead relay, a block, a NAT's filter).
    pub dropped: u64,
}

impl PathSim {
    /// Two peers, each behind `nats[i]` (`None`: a public address), both
    /// connected to relay 0, starting now with their candidates known to
    /// each other after one map delay.
    pub fn new(cfg: PathSimConfig, nats: [Option<NatKind>; 2]) -> Self {
        let t0 = Instant::now();
        let peer = |i: usize, nat: Option<NatKind>| {
            let octet = 10 + u8::try_from(i).unwrap_or(0);
            let public = Ipv4Addr::new(203, 0, 113, octet);
            let local = match nat {
                Some(_) => SocketAddr::new(Ipv4Addr::new(10, octet, 0, 2).into(), 51820),
                None => SocketAddr::new(public.into(), 51820),
            };
            Peer {
                pm: PathManager::new(cfg.path.clone(), cfg.seed.wrapping_add(i as u64 + 1), t0),
                local,
                nat: nat.map(|kind| Nat {
                    public,
                    kind,
                    ports: HashMap::new(),
                    sent_to: HashMap::new(),
                    retired: HashSet::new(),
                    next_port: 40000 + 1000 * u16::from(octet),
                }),
                relay: Some(0),
                advertised: Vec::new(),
                next_stun: Duration::ZERO,
            }
        };
        let relays = cfg.relays.max(1);
        let mut sim = Self {
            rng: crate::Rng(cfg.seed | 1),
            t0,
            now: Duration::ZERO,
            peers: [peer(0, nats[0]), peer(1, nats[1])],
            relays_up: vec![true; relays],
            blocked: false,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            seq: 0,
            trace: Vec::new(),
            sent: 0,
            dropped: 0,
            cfg,
        };
        sim.relay_changed();
        for i in 0..2 {
            sim.stun(i);
        }
        sim
    }

    /// Virtual time since the start.
    pub fn now(&self) -> Duration {
        self.now
    }

    /// Peer `i`'s path to the other now.
    pub fn path(&self, i: usize) -> Path {
        self.peers[i].pm.path()
    }

    /// Every path change so far, in order.
    pub fn trace(&self) -> &[Change] {
        &self.trace
    }

    /// Whether peer `i`'s path is direct.
    pub fn is_direct(&self, i: usize) -> bool {
        matches!(self.path(i), Path::Direct(_))
    }

    /// Runs until virtual time `until` (since the start).
    pub fn run_until(&mut self, until: Duration) {
        // Bounded: every turn either delivers a queued event or handles a
        // timer that lies in the future of the last one (the managers
        // never offer a past deadline twice), and at most this many turns.
        for _ in 0..10_000_000u32 {
            let timer = (0..2)
                .map(|i| (self.offset(self.peers[i].pm.poll_timeout()), i))
                .min()
                .map(|(t, i)| (t.max(self.now), i));
            let stun = (0..2)
                .map(|i| (self.peers[i].next_stun, i))
                .min()
                .unwrap_or((Duration::MAX, 0));
            let event = self.queue.peek().map(|Reverse((t, _))| *t);
            let next = [timer.map(|t| t.0), Some(stun.0), event]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(Duration::MAX);
            if next > until {
                self.now = until;
                return;
            }
            self.now = next;
            if event == Some(next) {
                let Some(Reverse((_, seq))) = self.queue.pop() else {
                    continue;
                };
                if let Some(e) = self.events.remove(&seq) {
                    self.handle(e);
                }
            } else if stun.0 == next {
                self.stun(stun.1);
            } else if let Some((_, i)) = timer {
                let now = self.instant();
                self.peers[i].pm.handle_timeout(now);
                self.flush(i);
            }
        }
        panic!("the path simulation did not reach {until:?}");
    }

    /// Runs until `cond` holds (checked after every step) or `limit` more
    /// virtual time passed; the time it took, if it held.
    pub fn run_until_cond(
        &mut self,
        limit: Duration,
        mut cond: impl FnMut(&Self) -> bool,
    ) -> Option<Duration> {
        let start = self.now;
        let step = Duration::from_millis(5);
        while self.now < start + limit {
            if cond(self) {
                return Some(self.now - start);
            }
            let next = (self.now + step).min(start + limit);
            self.run_until(next);
        }
        cond(self).then(|| self.now - start)
    }

    /// Drops every direct datagram between the peers (`true`) or lets
    /// them through again.
    pub fn block_direct(&mut self, blocked: bool) {
        self.blocked = blocked;
    }

    /// Gives every flow of peer `i`'s NAT a new port.
    pub fn rebind(&mut self, i: usize) {
        if let Some(nat) = &mut self.peers[i].nat {
            nat.rebind();
        }
    }

    /// Changes peer `i`'s NAT behaviour (its mappings start over).
    pub fn set_nat(&mut self, i: usize, kind: NatKind) {
        if let Some(nat) = &mut self.peers[i].nat {
            nat.kind = kind;
            nat.rebind();
        }
    }

    /// Stops relay `r`: its datagrams vanish; its peers notice after
    /// `relay_detect` and move to the next live relay.
    pub fn kill_relay(&mut self, r: usize) {
        if let Some(up) = self.relays_up.get_mut(r) {
            *up = false;
        }
        for i in 0..2 {
            if self.peers[i].relay == Some(r) {
                let at = self.now + self.cfg.relay_detect;
                self.schedule(at, Event::RelayLost { peer: i });
            }
        }
    }

    /// The relay peer `i` is connected to.
    pub fn relay_of(&self, i: usize) -> Option<usize> {
        self.peers[i].relay
    }

    // ---- internals -------------------------------------------------------

    fn instant(&self) -> Instant {
        self.t0 + self.now
    }

    fn offset(&self, t: Instant) -> Duration {
        t.saturating_duration_since(self.t0)
    }

    fn schedule(&mut self, at: Duration, e: Event) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq)));
        self.events.insert(self.seq, e);
    }

    /// True with probability `p`.
    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.rng.unit() < p
    }

    /// `base` ± jitter.
    fn delay(&mut self, base: Duration) -> Duration {
        let j = self.cfg.jitter.as_micros() as u64;
        if j == 0 {
            return base;
        }
        let offset = self.rng.next() % (2 * j + 1);
        (base + Duration::from_micros(offset)).saturating_sub(Duration::from_micros(j))
    }

    /// Peer `i` asks the STUN server for its address; a changed answer is
    /// advertised.
    fn stun(&mut self, i: usize) {
        let p = &mut self.peers[i];
        p.next_stun = self.now + self.cfg.stun_every;
        let mut addrs = vec![p.local];
        if let Some(nat) = &mut p.nat {
            let mapped = nat.outbound(p.local, STUN);
            addrs.push(mapped);
        }
        if addrs != p.advertised {
            p.advertised = addrs.clone();
            let at = self.now + self.cfg.map_delay;
            self.schedule(at, Event::Candidates { peer: i, addrs });
        }
    }

    fn relay_works(&self) -> bool {
        self.peers
            .iter()
            .all(|p| p.relay.is_some_and(|r| self.relays_up[r]))
    }

    /// Tells both managers whether the relay path works (as the engine
    /// does once both peers are registered).
    fn relay_changed(&mut self) {
        let works = self.peers.iter().all(|p| p.relay.is_some());
        let now = self.instant();
        for i in 0..2 {
            self.peers[i].pm.set_relay(now, works);
            self.flush(i);
        }
    }

    fn handle(&mut self, e: Event) {
        let now = self.instant();
        match e {
            Event::Direct { src, to, msg } => {
                let Some(i) = self.owner(to) else {
                    self.dropped += 1;
                    return;
                };
                let admitted = match &self.peers[i].nat {
                    Some(nat) => nat.inbound(to.port(), src),
                    None => true,
                };
                if !admitted {
                    self.dropped += 1;
                    return;
                }
                self.receive(i, Via::Direct(src), msg, now);
            }
            Event::Relayed { to, relay, msg } => {
                if !self.relays_up[relay] || !self.relay_works() {
                    self.dropped += 1;
                    return;
                }
                self.receive(to, Via::Relay, msg, now);
            }
            Event::Candidates { peer, addrs } => {
                let other = 1 - peer;
                self.peers[other].pm.set_candidates(now, &addrs);
                self.flush(other);
            }
            Event::RelayLost { peer } => {
                self.peers[peer].relay = None;
                self.relay_changed();
                let at = self.now + self.cfg.relay_reconnect;
                self.schedule(at, Event::RelayConnect { peer });
            }
            Event::RelayConnect { peer } => match self.relays_up.iter().position(|up| *up) {
                Some(r) => {
                    self.peers[peer].relay = Some(r);
                    self.relay_changed();
                }
                None => {
                    let at = self.now + self.cfg.relay_reconnect;
                    self.schedule(at, Event::RelayConnect { peer });
                }
            },
        }
    }

    /// The peer whose socket `to` reaches (its public mapping or its
    /// public address).
    fn owner(&self, to: SocketAddr) -> Option<usize> {
        self.peers.iter().position(|p| match &p.nat {
            Some(nat) => to.ip() == std::net::IpAddr::V4(nat.public),
            None => p.local == to,
        })
    }

    fn receive(&mut self, i: usize, via: Via, msg: Msg, now: Instant) {
        let pm = &mut self.peers[i].pm;
        match msg {
            Msg::Ping(tx) => pm.handle_ping(now, via, tx),
            Msg::Pong(tx) => pm.handle_pong(now, tx),
            Msg::CallMeMaybe(addrs) => pm.handle_call_me_maybe(now, &addrs),
        }
        self.flush(i);
    }

    /// Sends what peer `i`'s manager queued, and records a path change.
    fn flush(&mut self, i: usize) {
        while let Some(o) = self.peers[i].pm.poll_transmit() {
            let (via, msg) = match o {
                Outgoing::Ping { via, tx } => (via, Msg::Ping(tx)),
                Outgoing::Pong { via, tx, .. } => (via, Msg::Pong(tx)),
                Outgoing::CallMeMaybe { .. } => (
                    Via::Relay,
                    Msg::CallMeMaybe(self.peers[i].advertised.clone()),
                ),
            };
            self.send(i, via, msg);
        }
        let path = self.peers[i].pm.path();
        let last = self
            .trace
            .iter()
            .rev()
            .find(|c| c.peer == i)
            .map(|c| c.path);
        if matches!(last, Some(Path::Direct(_))) && !matches!(path, Path::Direct(_)) {
            // The engine asks STUN again when a direct path is lost.
            self.peers[i].next_stun = self.now;
        }
        if last != Some(path) {
            self.trace.push(Change {
                at: self.now,
                peer: i,
                path,
            });
        }
    }

    fn send(&mut self, i: usize, via: Via, msg: Msg) {
        self.sent += 1;
        match via {
            Via::Direct(to) => {
                let p = &mut self.peers[i];
                let src = match &mut p.nat {
                    Some(nat) => nat.outbound(p.local, to),
                    None => p.local,
                };
                let loss = self.cfg.direct_loss;
                if self.blocked || self.chance(loss) {
                    self.dropped += 1;
                    return;
                }
                let at = self.now + self.delay(self.cfg.direct_delay);
                self.schedule(at, Event::Direct { src, to, msg });
            }
            Via::Relay => {
                let Some(relay) = self.peers[i].relay.filter(|r| self.relays_up[*r]) else {
                    self.dropped += 1;
                    return;
                };
                let loss = self.cfg.relay_loss;
                if self.chance(loss) {
                    self.dropped += 1;
                    return;
                }
                let at = self.now + self.delay(self.cfg.relay_delay);
                self.schedule(
                    at,
                    Event::Relayed {
                        to: 1 - i,
                        relay,
                        msg,
                    },
                );
            }
        }
    }
}
