//! The flow table's operations: services from a map, packets each way,
//! expiry. See the parent module for the policy.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use super::wire::{ACK, FIN, RST, SYN};
use super::*;

/// Milliseconds from `then` to `t`; 0 when `then` is later (another
/// thread touched the flow with a later clock reading).
fn age(t: u32, then: u32) -> u32 {
    let d = t.wrapping_sub(then);
    if d > u32::MAX / 2 {
        0
    } else {
        d
    }
}

fn idle_limit(proto: Proto, state: State) -> Duration {
    match (state, proto) {
        (State::SynSent, _) => TCP_SYN_IDLE,
        (State::Open, _) => TCP_OPEN_IDLE,
        (State::Closing, _) => TCP_CLOSING,
        (State::Datagram, Proto::Icmp) => ICMP_IDLE,
        (State::Datagram, _) => UDP_IDLE,
    }
}

/// The pools one service address needs: pings, unlisted ports, and each
/// announced port, for TCP and UDP.
fn classes(announced: &BTreeSet<u16>) -> Vec<(Proto, Class)> {
    let mut out = vec![
        (Proto::Icmp, Class::All),
        (Proto::Tcp, Class::Unlisted),
        (Proto::Udp, Class::Unlisted),
    ];
    for p in announced {
        out.push((Proto::Tcp, Class::Port(*p)));
        out.push((Proto::Udp, Class::Port(*p)));
    }
    out
}

/// The traffic counters of slot `counter`, if any.
fn tally(traffic: &mut [(String, TrafficCounters)], counter: u32) -> Option<&mut TrafficCounters> {
    traffic.get_mut(counter as usize).map(|(_, c)| c)
}

/// The traffic slot of service `name`, made if new (none past
/// [`MAX_PAIRS`] services, or for a name no report may carry).
fn counter_for(traffic: &mut Vec<(String, TrafficCounters)>, name: &str) -> u32 {
    if let Some(i) = traffic.iter().position(|(n, _)| n == name) {
        return i as u32;
    }
    let reportable = !name.is_empty()
        && name.len() <= crate::traffic::MAX_SERVICE_LEN
        && !name.chars().any(char::is_control);
    if traffic.len() >= MAX_PAIRS || !reportable {
        return NO_COUNTER;
    }
    traffic.push((name.to_owned(), TrafficCounters::default()));
    (traffic.len() - 1) as u32
}

fn serves(b: &Backend, class: Class) -> bool {
    match class {
        Class::All => true,
        Class::Port(p) => b.ports.is_empty() || b.ports.contains(&p),
        Class::Unlisted => b.ports.is_empty(),
    }
}

impl FlowTable {
    /// Takes a new set of services (from each map): pools keep the counts
    /// and health of instances that stay; flows whose instance is no
    /// longer a backend for them end. Returns the open TCP flows to reset.
    pub fn set_services(&mut self, services: &Services, now: Instant) -> Vec<Ended> {
        if *services == self.applied {
            return Vec::new();
        }
        self.applied = services.clone();
        let backends: Vec<BackendSlot> = services
            .addresses
            .iter()
            .flat_map(|s| {
                s.backends.iter().map(|b| BackendSlot {
                    service: s.ip,
                    b: b.clone(),
                })
            })
            .collect();
        let mut old: Vec<Option<PoolSlot>> = std::mem::take(&mut self.pools)
            .into_iter()
            .map(Some)
            .collect();
        let old_index: HashMap<PoolKey, usize> = old
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.as_ref().map(|p| (p.key, i)))
            .collect();
        let mut pool_map: Vec<Option<u32>> = vec![None; old.len()];
        let mut addresses = HashMap::new();
        for s in &services.addresses {
            let counter = counter_for(&mut self.traffic, &s.service);
            let announced: BTreeSet<u16> = s
                .backends
                .iter()
                .flat_map(|b| b.ports.iter().copied())
                .collect();
            let mut pools = HashMap::new();
            for (proto, class) in classes(&announced) {
                let key = PoolKey {
                    service: s.ip,
                    proto,
                    class,
                };
                let members: Vec<u32> = (0..backends.len() as u32)
                    .filter(|&i| {
                        let slot = &backends[i as usize];
                        slot.service == s.ip && serves(&slot.b, class)
                    })
                    .collect();
                let previous = old_index.get(&key).copied();
                let mut pool = previous
                    .and_then(|i| old[i].take())
                    .map_or_else(|| Pool::new(NO_LIMITS), |p| p.pool);
                let list = members
                    .iter()
                    .map(|&i| {
                        let b = &backends[i as usize].b;
                        (b.instance.clone(), b.ip, true)
                    })
                    .collect();
                pool.update(NO_LIMITS, list, now);
                let id = self.pools.len() as u32;
                if let Some(i) = previous {
                    pool_map[i] = Some(id);
                }
                self.pools.push(PoolSlot {
                    key,
                    pool,
                    members,
                    counter,
                });
                pools.insert((proto, class), id);
            }
            let wake = s.wake_timeout.map(|d| ms(d).max(1));
            let address = Address {
                announced,
                pools,
                service: s.service.clone(),
                wake,
                idle: s.backends.is_empty(),
                counter,
            };
            addresses.insert(s.ip, address);
        }
        let old_backends = std::mem::replace(&mut self.backends, backends);
        let backend_map: Vec<Option<u32>> = old_backends
            .iter()
            .map(|o| {
                self.backends
                    .iter()
                    .position(|n| n.service == o.service && n.b.key == o.b.key)
                    .map(|i| i as u32)
            })
            .collect();
        self.addresses = addresses;
        if !self.addresses.is_empty() && self.flows.capacity() == 0 {
            self.flows.reserve(256);
        }
        let ended = self.remap_flows(&old_backends, &pool_map, &backend_map, now);
        let Self {
            asked, addresses, ..
        } = self;
        asked.retain(|ip, _| {
            addresses
                .get(ip)
                .is_some_and(|a| a.wake.is_some() && a.idle)
        });
        self.settle_holds(now);
        ended
    }

    /// Points every flow at its new pool and backend slots, ending those
    /// whose instance no longer serves them.
    fn remap_flows(
        &mut self,
        old_backends: &[BackendSlot],
        pool_map: &[Option<u32>],
        backend_map: &[Option<u32>],
        now: Instant,
    ) -> Vec<Ended> {
        let mut ended = Vec::new();
        let Self {
            flows,
            pools,
            addresses,
            stats,
            ..
        } = self;
        flows.retain(|key, f| {
            let backend = backend_map.get(f.backend as usize).copied().flatten();
            let same_pool = pool_map.get(f.pool as usize).copied().flatten();
            // A pool that went away (its port no longer announced): the
            // flow moves to the pool its port falls in now, holding no slot.
            let pool = same_pool.or_else(|| {
                let a = addresses.get(&key.service)?;
                a.pools.get(&(key.proto, class_of(a, key))).copied()
            });
            let kept = match (backend, pool) {
                (Some(b), Some(p)) => pools[p as usize].members.contains(&b),
                _ => false,
            };
            if kept {
                if same_pool.is_none() {
                    f.bits &= !HOLDS_SLOT;
                }
                f.backend = backend.unwrap_or_default();
                f.pool = pool.unwrap_or_default();
                return true;
            }
            if let (true, Some(p), Some(old)) = (
                f.bits & HOLDS_SLOT != 0,
                same_pool,
                old_backends.get(f.backend as usize),
            ) {
                pools[p as usize].pool.release(&old.b.instance, now);
            }
            if f.state == State::Open && f.bits & HAS_ACK != 0 {
                stats.reset += 1;
                ended.push(Ended {
                    key: *key,
                    seq: f.ack,
                });
            }
            false
        });
        ended
    }

    /// A packet from the local client to a service address (`seg` is
    /// `packet` read by [`Segment::outbound`]; the packet itself is
    /// copied only if its flow is held for a wake).
    pub fn outbound(&mut self, seg: &Segment, packet: &[u8], now: Instant) -> Outbound {
        let t = self.ms(now);
        let key = seg.key;
        if !self.addresses.contains_key(&key.service) {
            // An address the map does not know (any more): no service.
            return match seg.kind {
                Kind::IcmpError { .. } => Outbound::Drop,
                _ => Outbound::Reject,
            };
        }
        if !self.holds.is_empty() {
            if let Some(verdict) = self.held_packet(seg, packet) {
                return verdict;
            }
        }
        let flow = self.flows.get(&key).copied();
        match (seg.kind, flow) {
            (
                Kind::Tcp {
                    flags, seq, ack, ..
                },
                Some(f),
            ) => self.tcp_out(seg, packet, f, (flags, seq, ack), t, now),
            (Kind::Tcp { flags, .. }, None) => {
                if flags & (SYN | ACK) == SYN {
                    self.open(seg, packet, t, now)
                } else if flags & RST != 0 {
                    Outbound::Drop
                } else {
                    // No flow (expired, or from before a restart): reset,
                    // so the connection does not hang.
                    Outbound::Reject
                }
            }
            (Kind::IcmpError { .. }, None) => Outbound::Drop,
            (_, Some(mut f)) => {
                f.last = t;
                self.flows.insert(key, f);
                self.count_sent(&f, u64::from(seg.len));
                Outbound::Forward(self.backend_key(f.backend))
            }
            (_, None) => self.open(seg, packet, t, now),
        }
    }

    fn count_sent(&mut self, f: &Flow, bytes: u64) {
        let counter = self
            .pools
            .get(f.pool as usize)
            .map_or(NO_COUNTER, |p| p.counter);
        if let Some(c) = tally(&mut self.traffic, counter) {
            c.bytes_sent = c.bytes_sent.saturating_add(bytes);
        }
    }

    fn tcp_out(
        &mut self,
        seg: &Segment,
        packet: &[u8],
        mut f: Flow,
        (flags, seq, ack): (u8, u32, u32),
        t: u32,
        now: Instant,
    ) -> Outbound {
        let key = seg.key;
        if flags & (SYN | ACK) == SYN {
            if seq != f.isn {
                // A new connection on the same ports.
                self.end(&key, now);
                return self.open(seg, packet, t, now);
            }
            if f.state == State::SynSent {
                return self.syn_again(key, f, t, now);
            }
        }
        self.count_sent(&f, u64::from(seg.len));
        f.last = t;
        if flags & ACK != 0 {
            f.ack = ack;
            f.bits |= HAS_ACK;
        }
        let to = self.backend_key(f.backend);
        if flags & RST != 0 {
            self.end(&key, now);
            return Outbound::Forward(to);
        }
        if flags & FIN != 0 {
            f.bits |= FIN_CLIENT;
            if f.bits & FIN_SERVICE != 0 {
                self.closing(&mut f, now);
            }
        }
        self.flows.insert(key, f);
        Outbound::Forward(to)
    }

    /// The client sent its SYN again: the instance did not answer it (or
    /// this is the first SYN the flow's new instance gets).
    fn syn_again(&mut self, key: FlowKey, mut f: Flow, t: u32, now: Instant) -> Outbound {
        f.last = t;
        if f.bits & AWAIT_SYN != 0 {
            f.bits &= !AWAIT_SYN;
            f.since = t;
        } else if age(t, f.since) >= ms(SYN_RETRY_AFTER) {
            if f.bits & SYN_FAILED == 0 {
                self.fail(&mut f, now);
            }
            if let Some(b) = self.admit(f.pool, now) {
                if b != f.backend {
                    self.stats.repinned += 1;
                }
                self.release_slot(&f, now);
                f.backend = b;
                f.bits = (f.bits | HOLDS_SLOT) & !SYN_FAILED;
            }
            f.since = t;
        }
        self.flows.insert(key, f);
        Outbound::Forward(self.backend_key(f.backend))
    }

    /// A refused new flow of service slot `counter`.
    fn refused(&mut self, counter: u32) -> Outbound {
        if let Some(c) = tally(&mut self.traffic, counter) {
            c.refused += 1;
        }
        Outbound::Reject
    }

    /// A new flow: pinned to an instance of its pool, held while its
    /// service wakes, or refused.
    fn open(&mut self, seg: &Segment, packet: &[u8], t: u32, now: Instant) -> Outbound {
        let key = seg.key;
        let Some(a) = self.addresses.get(&key.service) else {
            self.stats.rejected += 1;
            return Outbound::Reject;
        };
        let pool = a.pools.get(&(key.proto, class_of(a, &key))).copied();
        let counter = a.counter;
        if let (Some(timeout), true) = (a.wake, a.idle) {
            return self.hold(seg, packet, counter, timeout, t);
        }
        let Some(pool) = pool else {
            self.stats.rejected += 1;
            return self.refused(counter);
        };
        if self.flows.len() >= self.limit {
            let due = self
                .full_sweep
                .is_none_or(|s| age(t, s) >= ms(FULL_SWEEP_EVERY));
            if due {
                self.full_sweep = Some(t);
                self.expire(now);
            }
            if self.flows.len() >= self.limit {
                self.stats.full += 1;
                return self.refused(counter);
            }
        }
        let Some(backend) = self.admit(pool, now) else {
            self.stats.rejected += 1;
            return self.refused(counter);
        };
        let (state, isn) = match seg.kind {
            Kind::Tcp { seq, .. } => (State::SynSent, seq),
            _ => (State::Datagram, 0),
        };
        self.flows.insert(
            key,
            Flow {
                backend,
                pool,
                last: t,
                since: t,
                start: t,
                isn,
                ack: 0,
                state,
                bits: HOLDS_SLOT,
            },
        );
        self.stats.opened += 1;
        if let Some(c) = tally(&mut self.traffic, counter) {
            c.bytes_sent = c.bytes_sent.saturating_add(u64::from(seg.len));
            if state == State::Datagram {
                c.opened += 1;
            }
        }
        Outbound::Forward(self.backend_key(backend))
    }

    /// A packet from peer `from` whose source is a service address.
    pub fn inbound(&mut self, from: &PublicKey, seg: &Segment, now: Instant) -> Inbound {
        let key = seg.key;
        let mine = self
            .flows
            .get(&key)
            .copied()
            .filter(|f| self.backends.get(f.backend as usize).map(|s| &s.b.key) == Some(from));
        let Some(mut f) = mine else {
            self.stats.foreign += 1;
            return Inbound::Foreign;
        };
        let t = self.ms(now);
        f.last = t;
        let counter = self
            .pools
            .get(f.pool as usize)
            .map_or(NO_COUNTER, |p| p.counter);
        let answered = match seg.kind {
            Kind::Tcp { flags, .. } => {
                flags & (SYN | ACK) == SYN | ACK && f.state == State::SynSent
            }
            Kind::Udp | Kind::Echo => f.bits & ANSWERED == 0,
            Kind::IcmpError { .. } => false,
        };
        if let Some(c) = tally(&mut self.traffic, counter) {
            c.bytes_received = c.bytes_received.saturating_add(u64::from(seg.len));
            if answered {
                c.observe_connect(Duration::from_millis(u64::from(age(t, f.start))));
                if f.state == State::SynSent {
                    c.opened += 1;
                }
            }
        }
        if answered {
            f.bits |= ANSWERED;
        }
        match seg.kind {
            Kind::Tcp { flags, .. } => {
                if flags & RST != 0 {
                    return self.reset_in(key, f, now);
                }
                if flags & (SYN | ACK) == SYN | ACK && f.state == State::SynSent {
                    f.state = State::Open;
                    if let Some((p, name)) = self.slot_names(&f) {
                        p.healthy(name, now);
                    }
                }
                if flags & FIN != 0 {
                    f.bits |= FIN_SERVICE;
                    if f.bits & FIN_CLIENT != 0 {
                        self.closing(&mut f, now);
                    }
                }
            }
            Kind::IcmpError { kind: 3, code: 3 } if key.proto == Proto::Udp => {
                // Port unreachable: the instance does not serve the port.
                self.fail(&mut f, now);
                self.flows.insert(key, f);
                self.end(&key, now);
                return Inbound::Accept;
            }
            _ => {}
        }
        self.flows.insert(key, f);
        Inbound::Accept
    }

    /// A reset from the flow's instance: a refusal of a SYN moves the flow
    /// to another instance if there is one (and is not passed on).
    fn reset_in(&mut self, key: FlowKey, mut f: Flow, now: Instant) -> Inbound {
        if f.state != State::SynSent || f.bits & AWAIT_SYN != 0 {
            self.end(&key, now);
            return Inbound::Accept;
        }
        if f.bits & SYN_FAILED == 0 {
            self.fail(&mut f, now);
        }
        match self.admit(f.pool, now) {
            Some(b) if b != f.backend => {
                self.release_slot(&f, now);
                f.backend = b;
                f.bits = (f.bits | HOLDS_SLOT | AWAIT_SYN) & !SYN_FAILED;
                self.stats.repinned += 1;
                self.flows.insert(key, f);
                Inbound::Drop
            }
            Some(b) => {
                // The same instance again: the refusal stands.
                f.backend = b;
                f.bits |= HOLDS_SLOT;
                self.flows.insert(key, f);
                self.end(&key, now);
                self.refused_in(&f);
                Inbound::Accept
            }
            None => {
                self.flows.insert(key, f);
                self.end(&key, now);
                self.refused_in(&f);
                Inbound::Accept
            }
        }
    }

    /// A refusal of flow `f`'s SYN reached the client.
    fn refused_in(&mut self, f: &Flow) {
        let counter = self
            .pools
            .get(f.pool as usize)
            .map_or(NO_COUNTER, |p| p.counter);
        if let Some(c) = tally(&mut self.traffic, counter) {
            c.refused += 1;
        }
    }

    /// Records a run of plain packets of flow `key` the driver sent without
    /// asking (`ack`: the last acknowledgment among them, if TCP; `bytes`:
    /// theirs).
    pub fn touch(&mut self, key: &FlowKey, ack: Option<u32>, bytes: u64, now: Instant) {
        let t = self.ms(now);
        if let Some(f) = self.flows.get_mut(key) {
            f.last = t;
            if let Some(a) = ack {
                f.ack = a;
                f.bits |= HAS_ACK;
            }
            let f = *f;
            self.count_sent(&f, bytes);
        }
    }

    /// Records a run of plain packets of flow `key` the driver accepted
    /// from its instance without asking (`bytes`: theirs).
    pub fn touch_in(&mut self, key: &FlowKey, bytes: u64, now: Instant) {
        let t = self.ms(now);
        let Some(f) = self.flows.get_mut(key) else {
            return;
        };
        f.last = t;
        let counter = self
            .pools
            .get(f.pool as usize)
            .map_or(NO_COUNTER, |p| p.counter);
        if let Some(c) = tally(&mut self.traffic, counter) {
            c.bytes_received = c.bytes_received.saturating_add(bytes);
        }
    }

    /// Ends idle flows and counts SYNs unanswered for [`SYN_TIMEOUT`] as
    /// failures. Returns how many flows ended.
    pub fn expire(&mut self, now: Instant) -> usize {
        let t = self.ms(now);
        if !self.holds.is_empty() {
            self.settle_holds(now);
            self.time_out_holds(t);
        }
        let before = self.flows.len();
        let Self {
            flows,
            pools,
            backends,
            stats,
            ..
        } = self;
        flows.retain(|key, f| {
            let name = backends.get(f.backend as usize).map(|s| &s.b.instance);
            let pool = pools.get_mut(f.pool as usize).map(|p| &mut p.pool);
            if age(t, f.last) >= ms(idle_limit(key.proto, f.state)) {
                if let (true, Some(p), Some(n)) = (f.bits & HOLDS_SLOT != 0, pool, name) {
                    p.release(n, now);
                }
                stats.expired += 1;
                return false;
            }
            let unanswered = f.state == State::SynSent
                && f.bits & (SYN_FAILED | AWAIT_SYN) == 0
                && age(t, f.since) >= ms(SYN_TIMEOUT);
            if unanswered {
                if let (true, Some(p), Some(n)) = (f.bits & HOLDS_SLOT != 0, pool, name) {
                    p.failed(n, now);
                    f.bits &= !HOLDS_SLOT;
                }
                f.bits |= SYN_FAILED;
                stats.failures += 1;
            }
            true
        });
        before - self.flows.len()
    }

    fn backend_key(&self, backend: u32) -> PublicKey {
        self.backends[backend as usize].b.key
    }

    /// The pool and instance name of a flow's slot.
    fn slot_names(&mut self, f: &Flow) -> Option<(&mut Pool, &InstanceName)> {
        let name = &self.backends.get(f.backend as usize)?.b.instance;
        let pool = &mut self.pools.get_mut(f.pool as usize)?.pool;
        Some((pool, name))
    }

    /// A health failure of the flow's instance (its slot is released).
    fn fail(&mut self, f: &mut Flow, now: Instant) {
        self.stats.failures += 1;
        f.bits |= SYN_FAILED;
        if f.bits & HOLDS_SLOT != 0 {
            if let Some((p, name)) = self.slot_names(f) {
                p.failed(name, now);
            }
            f.bits &= !HOLDS_SLOT;
        }
    }

    /// FIN both ways: the connection is over for the balance (its slot is
    /// free); the flow stays for the last acknowledgments.
    fn closing(&mut self, f: &mut Flow, now: Instant) {
        f.state = State::Closing;
        self.release_slot(f, now);
        f.bits &= !HOLDS_SLOT;
    }

    fn release_slot(&mut self, f: &Flow, now: Instant) {
        if f.bits & HOLDS_SLOT != 0 {
            if let Some((p, name)) = self.slot_names(f) {
                p.release(name, now);
            }
        }
    }

    /// Removes a flow, releasing its slot.
    fn end(&mut self, key: &FlowKey, now: Instant) {
        if let Some(f) = self.flows.remove(key) {
            self.release_slot(&f, now);
        }
    }

    /// An instance of pool `pool` for a new flow (its slot taken).
    fn admit(&mut self, pool: u32, now: Instant) -> Option<u32> {
        let slot = self.pools.get_mut(pool as usize)?;
        match slot.pool.admit(false, now) {
            Admit::Go(pick) => {
                let found = slot
                    .members
                    .iter()
                    .copied()
                    .find(|&i| self.backends[i as usize].b.instance == pick.instance);
                if found.is_none() {
                    slot.pool.release(&pick.instance, now);
                }
                found
            }
            Admit::Wait { id, .. } => {
                slot.pool.cancel(id);
                None
            }
            Admit::Reject => None,
        }
    }
}

impl FlowTable {
    /// Holds a new flow's first packet while its service wakes (or
    /// refuses it past the bounds).
    fn hold(
        &mut self,
        seg: &Segment,
        packet: &[u8],
        counter: u32,
        timeout: u32,
        t: u32,
    ) -> Outbound {
        let len = packet.len();
        let (flows, bytes) = self
            .holds
            .get(&seg.key.service)
            .map_or((0, 0), |h| (h.flows.len(), h.bytes));
        let fits = len <= HOLD_FLOW_BYTES
            && flows < HOLD_FLOWS_PER_ADDRESS
            && bytes + len <= HOLD_BYTES_PER_ADDRESS
            && self.held_flows < HOLD_FLOWS
            && self.held_bytes + len <= HOLD_BYTES;
        if !fits {
            self.stats.hold_full += 1;
            return self.refused(counter);
        }
        let isn = match seg.kind {
            Kind::Tcp { seq, .. } => seq,
            _ => 0,
        };
        let h = self.holds.entry(seg.key.service).or_insert_with(|| Hold {
            flows: HashMap::new(),
            bytes: 0,
            counter,
        });
        h.flows.insert(
            seg.key,
            Held {
                since: t,
                isn,
                packets: vec![packet.to_vec()],
                bytes: len,
            },
        );
        h.bytes += len;
        let asked = self.asked.get(&seg.key.service).copied();
        let wake = asked.is_none_or(|a| age(t, a) >= timeout);
        if wake {
            self.asked.insert(seg.key.service, t);
        }
        self.held_flows += 1;
        self.held_bytes += len;
        self.stats.held_total += 1;
        if let Some(c) = tally(&mut self.traffic, counter) {
            c.held += 1;
        }
        Outbound::Hold { wake }
    }

    /// A packet of a held flow (`None`: its flow is not held): kept within
    /// the bounds, else dropped. A client's reset ends the held flow; a
    /// retransmitted SYN is dropped (the held one goes); a SYN with another
    /// sequence number (a new connection on the same ports) replaces it.
    fn held_packet(&mut self, seg: &Segment, packet: &[u8]) -> Option<Outbound> {
        let h = self.holds.get_mut(&seg.key.service)?;
        let f = h.flows.get_mut(&seg.key)?;
        let len = packet.len();
        let keep = Outbound::Hold { wake: false };
        match seg.kind {
            Kind::IcmpError { .. } => return Some(Outbound::Drop),
            Kind::Tcp { flags, .. } if flags & RST != 0 => {
                let gone = h.flows.remove(&seg.key).map_or(0, |f| f.bytes);
                h.bytes -= gone;
                self.held_bytes -= gone;
                self.held_flows -= 1;
                let counter = h.counter;
                if h.flows.is_empty() {
                    self.holds.remove(&seg.key.service);
                }
                if let Some(c) = tally(&mut self.traffic, counter) {
                    c.refused += 1;
                }
                return Some(Outbound::Drop);
            }
            Kind::Tcp { flags, seq, .. } if flags & (SYN | ACK) == SYN => {
                if seq == f.isn || len > HOLD_FLOW_BYTES {
                    return Some(keep);
                }
                let freed = f.bytes;
                if self.held_bytes - freed + len > HOLD_BYTES
                    || h.bytes - freed + len > HOLD_BYTES_PER_ADDRESS
                {
                    return Some(keep);
                }
                f.isn = seq;
                f.packets.clear();
                f.packets.push(packet.to_vec());
                f.bytes = len;
                h.bytes = h.bytes - freed + len;
                self.held_bytes = self.held_bytes - freed + len;
                return Some(keep);
            }
            _ => {}
        }
        let fits = f.packets.len() < HOLD_PACKETS
            && f.bytes + len <= HOLD_FLOW_BYTES
            && h.bytes + len <= HOLD_BYTES_PER_ADDRESS
            && self.held_bytes + len <= HOLD_BYTES;
        if fits {
            f.packets.push(packet.to_vec());
            f.bytes += len;
            h.bytes += len;
            self.held_bytes += len;
        }
        Some(keep)
    }

    /// Held flows after a map or a sweep: those of an address with an
    /// eligible instance now are pinned to one and released; those of an
    /// address gone or no longer wakeable are refused.
    fn settle_holds(&mut self, now: Instant) {
        let t = self.ms(now);
        let ips: Vec<Ipv4Addr> = self.holds.keys().copied().collect();
        for ip in ips {
            let Some(mut h) = self.holds.remove(&ip) else {
                continue;
            };
            let state = self.addresses.get(&ip).map(|a| (a.wake.is_some(), a.idle));
            match state {
                Some((true, true)) => {
                    // Still no instance: held on.
                    self.holds.insert(ip, h);
                    continue;
                }
                None | Some((false, _)) => {
                    for (_, f) in h.flows.drain() {
                        self.refuse_held(h.counter, f);
                    }
                    continue;
                }
                Some((true, false)) => {}
            }
            let keys: Vec<FlowKey> = h.flows.keys().copied().collect();
            for key in keys {
                let pool = self
                    .addresses
                    .get(&ip)
                    .and_then(|a| a.pools.get(&(key.proto, class_of(a, &key))))
                    .copied();
                if self.flows.len() >= self.limit {
                    break;
                }
                let Some((pool, backend)) = pool.and_then(|p| Some((p, self.admit(p, now)?)))
                else {
                    // None eligible now (backing off, or not serving the
                    // port): held on until the wake timeout.
                    continue;
                };
                let Some(held) = h.flows.remove(&key) else {
                    continue;
                };
                h.bytes -= held.bytes;
                self.held_bytes -= held.bytes;
                self.held_flows -= 1;
                let state = if key.proto == Proto::Tcp {
                    State::SynSent
                } else {
                    State::Datagram
                };
                let f = Flow {
                    backend,
                    pool,
                    last: t,
                    since: t,
                    start: held.since,
                    isn: held.isn,
                    ack: 0,
                    state,
                    bits: HOLDS_SLOT,
                };
                self.flows.insert(key, f);
                self.stats.opened += 1;
                let counter = self
                    .pools
                    .get(pool as usize)
                    .map_or(NO_COUNTER, |p| p.counter);
                if let Some(c) = tally(&mut self.traffic, counter) {
                    c.bytes_sent = c.bytes_sent.saturating_add(held.bytes as u64);
                    if state == State::Datagram {
                        c.opened += 1;
                    }
                }
                let to = self.backend_key(backend);
                self.held_out.released.push((to, held.packets));
            }
            if !h.flows.is_empty() {
                self.holds.insert(ip, h);
            }
        }
    }

    /// Refuses held flows older than their address's wake timeout.
    fn time_out_holds(&mut self, t: u32) {
        let ips: Vec<Ipv4Addr> = self.holds.keys().copied().collect();
        for ip in ips {
            let timeout = self.addresses.get(&ip).and_then(|a| a.wake).unwrap_or(0);
            let Some(mut h) = self.holds.remove(&ip) else {
                continue;
            };
            let late: Vec<FlowKey> = h
                .flows
                .iter()
                .filter(|(_, f)| age(t, f.since) >= timeout)
                .map(|(k, _)| *k)
                .collect();
            for key in late {
                if let Some(f) = h.flows.remove(&key) {
                    h.bytes -= f.bytes;
                    self.refuse_held(h.counter, f);
                }
            }
            if !h.flows.is_empty() {
                self.holds.insert(ip, h);
            }
        }
    }

    /// Held flows only (what [`FlowTable::expire`] does for them, cheap
    /// when none is held): released if an instance is eligible now,
    /// refused after the wake timeout. The driver calls it between sweeps.
    pub fn expire_held(&mut self, now: Instant) {
        if !self.holds.is_empty() {
            self.settle_holds(now);
            self.time_out_holds(self.ms(now));
        }
    }

    /// A held flow is refused: its first packet is answered.
    fn refuse_held(&mut self, counter: u32, f: Held) {
        self.held_bytes -= f.bytes;
        self.held_flows -= 1;
        self.stats.wake_timeouts += 1;
        if let Some(c) = tally(&mut self.traffic, counter) {
            c.refused += 1;
        }
        if let Some(first) = f.packets.into_iter().next() {
            self.held_out.refused.push(first);
        }
    }

    /// What held flows became since the last call: packets to send to the
    /// instances they were pinned to, first packets to refuse. The engine
    /// takes them after [`FlowTable::set_services`] and
    /// [`FlowTable::expire`] and acts on them outside the table's lock.
    pub fn take_held(&mut self) -> HeldOutput {
        std::mem::take(&mut self.held_out)
    }

    /// The service of service address `ip` (to name it in a wake request).
    pub fn held_service(&self, ip: &Ipv4Addr) -> Option<String> {
        self.addresses.get(ip).map(|a| a.service.clone())
    }

    /// Traffic per destination service, cumulative since the table was
    /// made (`active`: flows open now, held ones included; services with
    /// nothing counted are left out).
    pub fn traffic(&self) -> TrafficReport {
        let mut active = vec![0u64; self.traffic.len()];
        for f in self.flows.values().filter(|f| f.state != State::Closing) {
            let counter = self
                .pools
                .get(f.pool as usize)
                .map_or(NO_COUNTER, |p| p.counter);
            if let Some(a) = active.get_mut(counter as usize) {
                *a += 1;
            }
        }
        for h in self.holds.values() {
            if let Some(a) = active.get_mut(h.counter as usize) {
                *a += h.flows.len() as u64;
            }
        }
        let pairs = self
            .traffic
            .iter()
            .zip(active)
            .map(|((name, c), active)| PairTraffic {
                destination: name.clone(),
                counters: TrafficCounters { active, ..*c },
            })
            .filter(|p| p.counters != TrafficCounters::default())
            .collect();
        TrafficReport {
            pairs,
            paths: vec![],
            groups: vec![],
        }
    }
}

/// The pool class a flow's port falls in.
fn class_of(a: &Address, key: &FlowKey) -> Class {
    match key.proto {
        Proto::Icmp => Class::All,
        _ if a.announced.contains(&key.service_port) => Class::Port(key.service_port),
        _ => Class::Unlisted,
    }
}
