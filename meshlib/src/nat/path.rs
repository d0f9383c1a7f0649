//! One peer's path selection, as a state machine without I/O (the engine's
//! timer and network threads drive it; time is an argument).
//!
//! The model is Tailscale's magicsock endpoint: the peer's candidates (the
//! addresses it advertised in the map, plus addresses its probes came from)
//! are probed with authenticated pings ([`super::disco`]); a candidate that
//! answered within [`PathConfig::trust`] is a working direct path; the best
//! working direct path (lowest round trip, with some hysteresis) is used,
//! else the relay, else the first candidate blindly (a peer that never
//! answers probes, e.g. behind a forwarded port, still gets its packets).
//!
//! - The path in use is pinged every [`PathConfig::heartbeat`]: that keeps
//!   the NAT mappings open and notices a path that went quiet within
//!   `trust`, after which the relay takes over. A heartbeat left
//!   unanswered makes the pings four times as frequent until one is
//!   answered, so a lost datagram or two does not cost a working path.
//! - Every candidate is probed ("full probe") at once when the candidates
//!   change, when the peer asks (call-me-maybe), and when the direct path is
//!   lost; then every [`PathConfig::probe_fast`] for
//!   [`PathConfig::fast_probes`] rounds, then every
//!   [`PathConfig::probe_slow`] while no direct path works, and every
//!   [`PathConfig::upgrade`] while one does (a better one may appear).
//! - A full probe also sends a call-me-maybe through the relay, so the peer
//!   probes back at the same moment and both NATs open.
//! - A ping from an address that is not a candidate adds it (peer-reflexive:
//!   a NAT that mapped the peer to a port nobody advertised) and, while no
//!   direct path works, is pinged back at once.
//!
//! Call order: [`PathManager::handle_timeout`] at [`PathManager::poll_timeout`],
//! the `handle_*` methods as messages arrive, then drain
//! [`PathManager::poll_transmit`] and read [`PathManager::path`].

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::disco::{TxId, MAX_CANDIDATES};

/// Timers of path selection (plain data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathConfig {
    /// Ping the path in use this often. Default 1 s.
    pub heartbeat: Duration,
    /// A candidate whose last answer is older than this no longer counts as
    /// working. Default 2.5 s (a broken direct path falls back within it).
    pub trust: Duration,
    /// Full probes this often right after a trigger. Default 1 s.
    pub probe_fast: Duration,
    /// That many fast rounds. Default 8.
    pub fast_probes: u32,
    /// Full probes this often while no direct path works. Default 10 s.
    pub probe_slow: Duration,
    /// Full probes this often while a direct path works. Default 30 s.
    pub upgrade: Duration,
    /// Ping the relay path this often while it is in use (round trip for
    /// status). Default 5 s.
    pub relay_ping: Duration,
    /// A ping unanswered this long is forgotten. Default 5 s.
    pub ping_timeout: Duration,
    /// Peer-reflexive candidates unheard of this long are dropped. Default 60 s.
    pub learned_ttl: Duration,
}

impl Default for PathConfig {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(1),
            trust: Duration::from_millis(2500),
            probe_fast: Duration::from_secs(1),
            fast_probes: 8,
            probe_slow: Duration::from_secs(10),
            upgrade: Duration::from_secs(30),
            relay_ping: Duration::from_secs(5),
            ping_timeout: Duration::from_secs(5),
            learned_ttl: Duration::from_secs(60),
        }
    }
}

/// Where a probe goes, or came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Via {
    /// Straight to (from) this address.
    Direct(SocketAddr),
    /// Through the relay.
    Relay,
}

/// The path packets to the peer take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// No candidate and no relay: nothing can be sent.
    None,
    /// A direct path that answered probes.
    Direct(SocketAddr),
    /// The relay: no direct path works (yet).
    Relay,
    /// No answer from anywhere and no relay: the first candidate, blindly.
    Blind(SocketAddr),
}

impl Path {
    /// The direct address, if the path is one.
    pub fn addr(&self) -> Option<SocketAddr> {
        match self {
            Path::Direct(a) | Path::Blind(a) => Some(*a),
            _ => None,
        }
    }
}

/// Something to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outgoing {
    /// A ping.
    Ping {
        /// Where.
        via: Via,
        /// Its transaction id.
        tx: TxId,
    },
    /// A pong to a ping that arrived through `via` from `seen`.
    Pong {
        /// Where.
        via: Via,
        /// The ping's transaction id.
        tx: TxId,
        /// The ping's source address (unspecified for the relay).
        seen: SocketAddr,
    },
    /// A call-me-maybe with our own candidates, through the relay.
    CallMeMaybe {
        /// Message id.
        tx: TxId,
    },
}

/// One candidate as status shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CandidateState {
    /// The address.
    pub addr: SocketAddr,
    /// Learned from a probe's source rather than advertised.
    pub learned: bool,
    /// Last round trip measured, if it ever answered.
    pub rtt: Option<Duration>,
    /// It answered within the trust window.
    pub working: bool,
}

/// The peer's path state, for status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathState {
    /// The path in use.
    pub path: Path,
    /// Its round trip, if measured.
    pub rtt: Option<Duration>,
    /// Every candidate.
    pub candidates: Vec<CandidateState>,
    /// The relay can carry this peer's packets (both of us registered).
    pub relay_available: bool,
    /// Times the path changed.
    pub switches: u64,
}

#[derive(Debug, Clone)]
struct Candidate {
    addr: SocketAddr,
    learned: bool,
    /// When it was last advertised or heard from (learned ones expire).
    seen: Instant,
    last_ping: Option<Instant>,
    last_pong: Option<Instant>,
    rtt: Option<Duration>,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    tx: TxId,
    via: Via,
    at: Instant,
}

/// One peer's path selection. See the module docs.
#[derive(Debug)]
pub struct PathManager {
    cfg: PathConfig,
    candidates: Vec<Candidate>,
    relay: bool,
    relay_rtt: Option<Duration>,
    relay_ping: Option<Instant>,
    path: Path,
    switches: u64,
    pending: Vec<Pending>,
    /// Next full probe, and fast rounds left.
    next_probe: Instant,
    fast_left: u32,
    next_heartbeat: Instant,
    out: VecDeque<Outgoing>,
    rng: u64,
    /// The latest time passed in (a deadline already passed is no timer).
    now: Instant,
}

/// Most pings outstanding per peer.
const MAX_PENDING: usize = 64;
/// Most candidates kept (advertised and learned).
const MAX_KEPT: usize = 2 * MAX_CANDIDATES;

impl PathManager {
    /// A manager for a new peer; `seed` feeds transaction ids (use random
    /// bytes). It probes at once.
    pub fn new(cfg: PathConfig, seed: u64, now: Instant) -> Self {
        Self {
            cfg,
            candidates: Vec::new(),
            relay: false,
            relay_rtt: None,
            relay_ping: None,
            path: Path::None,
            switches: 0,
            pending: Vec::new(),
            next_probe: now,
            fast_left: 0,
            next_heartbeat: now,
            out: VecDeque::new(),
            rng: seed | 1,
            now,
        }
    }

    /// The advertised candidates (from the map); learned ones are kept.
    /// A change triggers a full probe.
    pub fn set_candidates(&mut self, now: Instant, addrs: &[SocketAddr]) {
        let old: Vec<SocketAddr> = self
            .candidates
            .iter()
            .filter(|c| !c.learned)
            .map(|c| c.addr)
            .collect();
        if old == addrs {
            return;
        }
        let mut next: Vec<Candidate> = Vec::new();
        for a in addrs.iter().take(MAX_CANDIDATES) {
            let mut c = self
                .candidates
                .iter()
                .find(|c| c.addr == *a)
                .cloned()
                .unwrap_or_else(|| Candidate::new(*a, now));
            c.learned = false;
            c.seen = now;
            if !next.iter().any(|n| n.addr == *a) {
                next.push(c);
            }
        }
        for c in self.candidates.drain(..).filter(|c| c.learned) {
            if !next.iter().any(|n| n.addr == c.addr) {
                next.push(c);
            }
        }
        next.truncate(MAX_KEPT);
        self.candidates = next;
        self.trigger(now);
        self.choose(now);
    }

    /// Whether the relay can carry packets to this peer now.
    pub fn set_relay(&mut self, now: Instant, available: bool) {
        if self.relay != available {
            self.relay = available;
            if !available {
                self.relay_rtt = None;
            }
            self.trigger(now);
            self.choose(now);
        }
    }

    /// The path in use.
    pub fn path(&self) -> Path {
        self.path
    }

    /// The state for status.
    pub fn state(&self, now: Instant) -> PathState {
        let rtt = match self.path {
            Path::Direct(a) => self.find(a).and_then(|c| c.rtt),
            Path::Relay => self.relay_rtt,
            _ => None,
        };
        PathState {
            path: self.path,
            rtt,
            candidates: self
                .candidates
                .iter()
                .map(|c| CandidateState {
                    addr: c.addr,
                    learned: c.learned,
                    rtt: c.rtt,
                    working: self.working(c, now),
                })
                .collect(),
            relay_available: self.relay,
            switches: self.switches,
        }
    }

    /// The next message to send.
    pub fn poll_transmit(&mut self) -> Option<Outgoing> {
        self.out.pop_front()
    }

    /// When [`PathManager::handle_timeout`] is due: the next probe or
    /// heartbeat, or the moment a working candidate's trust runs out (one
    /// that ran out before the last call is no deadline: a driver that
    /// sleeps until this never spins).
    pub fn poll_timeout(&self) -> Instant {
        let trust_end = self
            .candidates
            .iter()
            .filter_map(|c| c.last_pong)
            .map(|t| t + self.cfg.trust)
            .filter(|end| *end > self.now)
            .min();
        [Some(self.next_probe), Some(self.next_heartbeat), trust_end]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(self.next_probe)
    }

    /// Timers: forget stale pings and learned candidates, heartbeat, full
    /// probes, and re-choose the path.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = self.now.max(now);
        let timeout = self.cfg.ping_timeout;
        self.pending.retain(|p| now.duration_since(p.at) < timeout);
        let ttl = self.cfg.learned_ttl;
        self.candidates
            .retain(|c| !c.learned || now.duration_since(c.seen) < ttl);
        let had_direct = matches!(self.path, Path::Direct(_));
        self.choose(now);
        if had_direct && !matches!(self.path, Path::Direct(_)) {
            // The direct path went quiet: look for another one now.
            self.trigger(now);
        }
        if now >= self.next_probe {
            self.full_probe(now);
        }
        if now >= self.next_heartbeat {
            self.heartbeat(now);
        }
    }

    /// A ping arrived through `via` (already authenticated).
    pub fn handle_ping(&mut self, now: Instant, via: Via, tx: TxId) {
        let seen = match via {
            Via::Direct(a) => a,
            Via::Relay => SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        self.out.push_back(Outgoing::Pong { via, tx, seen });
        let Via::Direct(addr) = via else { return };
        self.learn(now, addr);
        if !matches!(self.path, Path::Direct(_)) {
            // It can reach us there; our answer-ping opens our side too.
            self.ping(now, Via::Direct(addr));
        }
    }

    /// A pong arrived (already authenticated): a working path if it answers
    /// one of our pings.
    pub fn handle_pong(&mut self, now: Instant, tx: TxId) {
        let Some(i) = self.pending.iter().position(|p| p.tx == tx) else {
            return;
        };
        let p = self.pending.swap_remove(i);
        let rtt = now.duration_since(p.at);
        match p.via {
            Via::Relay => self.relay_rtt = Some(rtt),
            Via::Direct(a) => {
                if let Some(c) = self.candidates.iter_mut().find(|c| c.addr == a) {
                    c.last_pong = Some(now);
                    c.seen = now;
                    c.rtt = Some(rtt);
                }
            }
        }
        self.choose(now);
    }

    /// The peer asked us to probe it (it is probing us now) on these
    /// candidates.
    pub fn handle_call_me_maybe(&mut self, now: Instant, addrs: &[SocketAddr]) {
        for a in addrs.iter().take(MAX_CANDIDATES) {
            self.learn(now, *a);
        }
        // Answer at once (without asking back: the peer is probing now).
        self.probe_all(now);
        self.fast_left = self.cfg.fast_probes;
        self.next_probe = now + self.cfg.probe_fast;
    }

    // ---- internals -------------------------------------------------------

    /// Notes that `addr` is a live address of the peer (learned if new).
    fn learn(&mut self, now: Instant, addr: SocketAddr) {
        let len = self.candidates.len();
        match self.candidates.iter_mut().find(|c| c.addr == addr) {
            Some(c) => c.seen = now,
            None if len < MAX_KEPT => {
                let mut c = Candidate::new(addr, now);
                c.learned = true;
                self.candidates.push(c);
            }
            None => {}
        }
    }

    fn find(&self, a: SocketAddr) -> Option<&Candidate> {
        self.candidates.iter().find(|c| c.addr == a)
    }

    fn working(&self, c: &Candidate, now: Instant) -> bool {
        c.last_pong
            .is_some_and(|t| now.duration_since(t) < self.cfg.trust)
    }

    fn trigger(&mut self, now: Instant) {
        self.fast_left = self.cfg.fast_probes;
        self.next_probe = now;
    }

    fn full_probe(&mut self, now: Instant) {
        self.probe_all(now);
        if self.relay {
            let tx = self.tx();
            self.out.push_back(Outgoing::CallMeMaybe { tx });
        }
        let wait = if self.fast_left > 0 {
            self.fast_left -= 1;
            self.cfg.probe_fast
        } else if matches!(self.path, Path::Direct(_)) {
            self.cfg.upgrade
        } else {
            self.cfg.probe_slow
        };
        self.next_probe = now + wait;
    }

    fn probe_all(&mut self, now: Instant) {
        let addrs: Vec<SocketAddr> = self.candidates.iter().map(|c| c.addr).collect();
        for a in addrs {
            self.ping(now, Via::Direct(a));
        }
    }

    fn heartbeat(&mut self, now: Instant) {
        // A direct path whose last heartbeat went unanswered is pinged four
        // times as often until it answers or its trust runs out: one lost
        // ping (or pong) does not cost the path, a dead one still falls
        // back when its trust ends.
        let unanswered = match self.path {
            Path::Direct(a) => self
                .find(a)
                .is_some_and(|c| c.last_ping.is_some() && c.last_pong < c.last_ping),
            _ => false,
        };
        self.next_heartbeat = now
            + if unanswered {
                self.cfg.heartbeat / 4
            } else {
                self.cfg.heartbeat
            };
        match self.path {
            Path::Direct(a) => self.ping(now, Via::Direct(a)),
            Path::Relay
                if self
                    .relay_ping
                    .is_none_or(|t| now.duration_since(t) >= self.cfg.relay_ping) =>
            {
                self.relay_ping = Some(now);
                self.ping(now, Via::Relay);
            }
            _ => {}
        }
    }

    fn ping(&mut self, now: Instant, via: Via) {
        if let Via::Direct(a) = via {
            if let Some(c) = self.candidates.iter_mut().find(|c| c.addr == a) {
                // At most one ping per candidate per 100 ms.
                if c.last_ping
                    .is_some_and(|t| now.duration_since(t) < Duration::from_millis(100))
                {
                    return;
                }
                c.last_ping = Some(now);
            }
        }
        if self.pending.len() >= MAX_PENDING {
            self.pending.remove(0);
        }
        let tx = self.tx();
        self.pending.push(Pending { tx, via, at: now });
        self.out.push_back(Outgoing::Ping { via, tx });
    }

    /// Picks the path: the best working direct one (a new one must be
    /// clearly faster to replace a working one), else the relay, else the
    /// first candidate blindly.
    fn choose(&mut self, now: Instant) {
        let best = self
            .candidates
            .iter()
            .filter(|c| self.working(c, now))
            .min_by_key(|c| c.rtt.unwrap_or(Duration::MAX));
        let next = match (best, self.path) {
            (Some(b), Path::Direct(cur)) => {
                let keep = self
                    .find(cur)
                    .filter(|c| self.working(c, now))
                    .is_some_and(|c| {
                        let (old, new) = (c.rtt.unwrap_or_default(), b.rtt.unwrap_or_default());
                        new.as_micros() * 10 >= old.as_micros() * 7
                    });
                if keep {
                    Path::Direct(cur)
                } else {
                    Path::Direct(b.addr)
                }
            }
            (Some(b), _) => Path::Direct(b.addr),
            (None, _) if self.relay => Path::Relay,
            (None, _) => self
                .candidates
                .iter()
                .find(|c| !c.learned)
                .or(self.candidates.first())
                .map_or(Path::None, |c| Path::Blind(c.addr)),
        };
        if next != self.path {
            self.switches += 1;
            self.path = next;
            // Check the new path at once.
            self.next_heartbeat = now;
            self.relay_ping = None;
        }
    }

    fn tx(&mut self) -> TxId {
        let mut out = [0u8; 12];
        for chunk in out.chunks_mut(4) {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            chunk.copy_from_slice(&(self.rng as u32).to_le_bytes());
        }
        out
    }
}

impl Candidate {
    fn new(addr: SocketAddr, now: Instant) -> Self {
        Self {
            addr,
            learned: false,
            seen: now,
            last_ping: None,
            last_pong: None,
            rtt: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Drains the pings, answering those to `alive` after `rtt`.
    fn answer(pm: &mut PathManager, now: Instant, alive: &[Via], rtt: Duration) -> Vec<Outgoing> {
        let mut sent = Vec::new();
        while let Some(o) = pm.poll_transmit() {
            sent.push(o.clone());
        }
        for o in &sent {
            if let Outgoing::Ping { via, tx } = o {
                if alive.contains(via) {
                    pm.handle_pong(now + rtt, *tx);
                }
            }
        }
        sent
    }

    #[test]
    fn relay_first_then_the_fastest_working_direct_path() {
        let t0 = Instant::now();
        let mut pm = PathManager::new(PathConfig::default(), 1, t0);
        let (lan, wan) = (addr("198.51.100.2:51820"), addr("203.0.113.7:51820"));
        pm.set_relay(t0, true);
        pm.set_candidates(t0, &[lan, wan]);
        assert_eq!(pm.path(), Path::Relay, "nothing answered yet");
        pm.handle_timeout(t0);
        let sent = answer(
            &mut pm,
            t0,
            &[Via::Direct(wan), Via::Direct(lan)],
            Duration::from_millis(5),
        );
        assert!(sent.contains(&Outgoing::CallMeMaybe {
            tx: match sent
                .iter()
                .find(|o| matches!(o, Outgoing::CallMeMaybe { .. }))
            {
                Some(Outgoing::CallMeMaybe { tx }) => *tx,
                _ => panic!("no call-me-maybe: {sent:?}"),
            }
        }));
        assert!(matches!(pm.path(), Path::Direct(_)));
        // Both answered alike: the first stays; a clearly faster one wins.
        let first = pm.path();
        let t1 = t0 + Duration::from_millis(1100);
        pm.handle_timeout(t1);
        let _ = answer(&mut pm, t1, &[Via::Direct(wan)], Duration::from_millis(40));
        let _ = answer(&mut pm, t1, &[Via::Direct(lan)], Duration::from_millis(1));
        assert!(matches!(pm.path(), Path::Direct(_)), "{first:?}");
    }

    #[test]
    fn a_quiet_direct_path_falls_back_to_the_relay_within_the_trust_window() {
        let t0 = Instant::now();
        let cfg = PathConfig::default();
        let mut pm = PathManager::new(cfg.clone(), 2, t0);
        let a = addr("203.0.113.7:51820");
        pm.set_relay(t0, true);
        pm.set_candidates(t0, &[a]);
        pm.handle_timeout(t0);
        answer(&mut pm, t0, &[Via::Direct(a)], Duration::from_millis(2));
        assert_eq!(pm.path(), Path::Direct(a));
        // The path breaks: heartbeats go unanswered.
        let mut t = t0;
        let mut fell_back = None;
        while t < t0 + Duration::from_secs(5) {
            t += Duration::from_millis(100);
            pm.handle_timeout(t);
            answer(&mut pm, t, &[Via::Relay], Duration::from_millis(1));
            if pm.path() == Path::Relay && fell_back.is_none() {
                fell_back = Some(t - t0);
            }
        }
        let after = fell_back.expect("fell back");
        assert!(after <= cfg.trust + Duration::from_millis(200), "{after:?}");
        assert!(pm.state(t).rtt.is_some(), "relay round trip measured");
        // It comes back: the next probe finds it and switches back.
        let mut back = false;
        for _ in 0..200 {
            t += Duration::from_millis(100);
            pm.handle_timeout(t);
            answer(
                &mut pm,
                t,
                &[Via::Direct(a), Via::Relay],
                Duration::from_millis(1),
            );
            if pm.path() == Path::Direct(a) {
                back = true;
                break;
            }
        }
        assert!(back, "upgraded back to direct");
    }

    /// A lost heartbeat (or its pong) does not cost a working path: the
    /// next pings come sooner and one answer keeps it. A trust window that
    /// ran out is no deadline any more (a driver sleeping until
    /// `poll_timeout` does not spin).
    #[test]
    fn a_lost_heartbeat_is_retried_sooner_and_expired_trust_is_no_timer() {
        let t0 = Instant::now();
        let cfg = PathConfig::default();
        let mut pm = PathManager::new(cfg.clone(), 6, t0);
        let a = addr("203.0.113.7:51820");
        pm.set_relay(t0, true);
        pm.set_candidates(t0, &[a]);
        pm.handle_timeout(t0);
        answer(&mut pm, t0, &[Via::Direct(a)], Duration::from_millis(2));
        assert_eq!(pm.path(), Path::Direct(a));
        // Heartbeats at 1 s and 2 s are lost; the retries every 250 ms
        // after the first loss mean one answered before 2.5 s keeps it.
        let mut t = t0;
        let (mut pings, mut last) = (0, None);
        while t < t0 + Duration::from_millis(2200) {
            t = pm.poll_timeout().max(t + Duration::from_millis(1));
            pm.handle_timeout(t);
            while let Some(o) = pm.poll_transmit() {
                if let Outgoing::Ping {
                    via: Via::Direct(_),
                    tx,
                } = o
                {
                    pings += 1;
                    last = Some(tx);
                }
            }
        }
        assert!(pings >= 4, "{pings} pings between 1 s and 2.2 s");
        // The last one is answered.
        pm.handle_pong(t + Duration::from_millis(2), last.unwrap());
        pm.handle_timeout(t0 + Duration::from_millis(2600));
        assert_eq!(pm.path(), Path::Direct(a), "kept by the retried ping");
        // Now nothing answers: the path falls back once its trust ends,
        // and that passed deadline is not offered again.
        let mut t = t0 + Duration::from_millis(2600);
        let end = t + Duration::from_secs(10);
        let mut wakeups = 0;
        while t < end {
            t = pm.poll_timeout().max(t + Duration::from_millis(1));
            pm.handle_timeout(t);
            while pm.poll_transmit().is_some() {}
            wakeups += 1;
            assert!(wakeups < 200, "the timer spins at {:?}", t - t0);
        }
        assert_eq!(pm.path(), Path::Relay);
        assert!(pm.poll_timeout() > t, "a past deadline is offered again");
    }

    #[test]
    fn without_relay_the_first_advertised_candidate_is_used_blindly() {
        let t0 = Instant::now();
        let mut pm = PathManager::new(PathConfig::default(), 3, t0);
        assert_eq!(pm.path(), Path::None);
        let a = addr("192.0.2.5:1");
        pm.set_candidates(t0, &[a]);
        assert_eq!(pm.path(), Path::Blind(a));
    }

    #[test]
    fn pings_from_new_addresses_are_answered_and_learned() {
        let t0 = Instant::now();
        let mut pm = PathManager::new(PathConfig::default(), 4, t0);
        let prflx = addr("203.0.113.9:40001");
        pm.handle_ping(t0, Via::Direct(prflx), [7; 12]);
        let sent = answer(&mut pm, t0, &[Via::Direct(prflx)], Duration::from_millis(3));
        assert_eq!(
            sent[0],
            Outgoing::Pong {
                via: Via::Direct(prflx),
                tx: [7; 12],
                seen: prflx
            }
        );
        assert_eq!(pm.path(), Path::Direct(prflx));
        assert!(pm.state(t0).candidates[0].learned);
        // Unknown pongs change nothing.
        pm.handle_pong(t0, [0; 12]);
        // A learned candidate nobody hears from expires.
        let later = t0 + Duration::from_secs(120);
        pm.handle_timeout(later);
        assert!(pm.state(later).candidates.is_empty());
    }

    #[test]
    fn call_me_maybe_probes_every_candidate_at_once() {
        let t0 = Instant::now();
        let mut pm = PathManager::new(PathConfig::default(), 5, t0);
        pm.set_candidates(t0, &[addr("192.0.2.1:1")]);
        pm.handle_timeout(t0);
        while pm.poll_transmit().is_some() {}
        let t1 = t0 + Duration::from_millis(300);
        pm.handle_call_me_maybe(t1, &[addr("192.0.2.1:1"), addr("203.0.113.1:2")]);
        let pings = std::iter::from_fn(|| pm.poll_transmit())
            .filter(|o| matches!(o, Outgoing::Ping { .. }))
            .count();
        assert_eq!(pings, 2);
    }
}
