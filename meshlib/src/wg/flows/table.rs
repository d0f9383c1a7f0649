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
                self.pools.push(PoolSlot { key, pool, members });
                pools.insert((proto, class), id);
            }
            addresses.insert(s.ip, Address { announced, pools });
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
        self.remap_flows(&old_backends, &pool_map, &backend_map, now)
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

    /// A packet from the local client to a service address.
    pub fn outbound(&mut self, seg: &Segment, now: Instant) -> Outbound {
        let t = self.ms(now);
        let key = seg.key;
        if !self.addresses.contains_key(&key.service) {
            // An address the map does not know (any more): no service.
            return match seg.kind {
                Kind::IcmpError { .. } => Outbound::Drop,
                _ => Outbound::Reject,
            };
        }
        let flow = self.flows.get(&key).copied();
        match (seg.kind, flow) {
            (
                Kind::Tcp {
                    flags, seq, ack, ..
                },
                Some(f),
            ) => self.tcp_out(key, f, (flags, seq, ack), t, now),
            (Kind::Tcp { flags, .. }, None) => {
                if flags & (SYN | ACK) == SYN {
                    self.open(seg, t, now)
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
                Outbound::Forward(self.backend_key(f.backend))
            }
            (_, None) => self.open(seg, t, now),
        }
    }

    fn tcp_out(
        &mut self,
        key: FlowKey,
        mut f: Flow,
        (flags, seq, ack): (u8, u32, u32),
        t: u32,
        now: Instant,
    ) -> Outbound {
        if flags & (SYN | ACK) == SYN {
            if seq != f.isn {
                // A new connection on the same ports.
                self.end(&key, now);
                let seg = Segment {
                    key,
                    kind: Kind::Tcp {
                        flags,
                        seq,
                        ack,
                        len: 0,
                    },
                };
                return self.open(&seg, t, now);
            }
            if f.state == State::SynSent {
                return self.syn_again(key, f, t, now);
            }
        }
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

    /// A new flow: pinned to an instance of its pool, or refused.
    fn open(&mut self, seg: &Segment, t: u32, now: Instant) -> Outbound {
        let key = seg.key;
        let pool = self
            .addresses
            .get(&key.service)
            .and_then(|a| a.pools.get(&(key.proto, class_of(a, &key))))
            .copied();
        let Some(pool) = pool else {
            self.stats.rejected += 1;
            return Outbound::Reject;
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
                return Outbound::Reject;
            }
        }
        let Some(backend) = self.admit(pool, now) else {
            self.stats.rejected += 1;
            return Outbound::Reject;
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
                isn,
                ack: 0,
                state,
                bits: HOLDS_SLOT,
            },
        );
        self.stats.opened += 1;
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
        f.last = self.ms(now);
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
                Inbound::Accept
            }
            None => {
                self.flows.insert(key, f);
                self.end(&key, now);
                Inbound::Accept
            }
        }
    }

    /// Records a run of plain packets of flow `key` the driver sent without
    /// asking (`ack`: the last acknowledgment among them, if TCP).
    pub fn touch(&mut self, key: &FlowKey, ack: Option<u32>, now: Instant) {
        let t = self.ms(now);
        if let Some(f) = self.flows.get_mut(key) {
            f.last = t;
            if let Some(a) = ack {
                f.ack = a;
                f.bits |= HAS_ACK;
            }
        }
    }

    /// Ends idle flows and counts SYNs unanswered for [`SYN_TIMEOUT`] as
    /// failures. Returns how many flows ended.
    pub fn expire(&mut self, now: Instant) -> usize {
        let t = self.ms(now);
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

/// The pool class a flow's port falls in.
fn class_of(a: &Address, key: &FlowKey) -> Class {
    match key.proto {
        Proto::Icmp => Class::All,
        _ if a.announced.contains(&key.service_port) => Class::Port(key.service_port),
        _ => Class::Unlisted,
    }
}
