//! The one balancing policy of the mesh: which instance a new connection
//! (or flow) goes to, when it waits, when it is refused. Used by the
//! gateway for each service group (seed 002) and by the data plane for
//! each service address. Pure: no sockets, no tasks, time is an argument;
//! the driver (the gateway's routes, the sidecar's service listeners, the
//! engine's flow table) holds the waiters by id.
//!
//! ## Limits (seed 002), per instance, on this gateway
//!
//! - `active(i)`: connections forwarded to instance `i` and not finished
//!   (in HTTP mode: requests in flight, each request is balanced on its own;
//!   a WebSocket holds its slot while it is open).
//! - A new connection goes to an *eligible* instance (attached, online in
//!   the map, not marked down by a health check or a failed dial) with
//!   `active < soft_limit`: the one with the fewest active, ties in turn.
//! - When every eligible instance is at its soft limit, the connection
//!   waits in the group's FIFO queue, which holds at most
//!   `Σ (hard_limit - soft_limit)` over the eligible instances: together
//!   with the active ones, at most `hard_limit` connections per instance are
//!   admitted. A waiting connection is dispatched, in arrival order, to the
//!   first instance whose `active` drops below its soft limit (or that comes
//!   online), or refused when it has waited the gateway's `queue-timeout`.
//! - Past that (queue full: every instance at its hard limit) the
//!   connection is refused at once: 503 in HTTP mode, a closed connection
//!   in TCP mode, a dropped datagram for UDP.
//! - With no online instance at all, a connection is *held* (up to the
//!   group's `wake_timeout_secs`, at most [`MAX_HELD`] at a time) while the
//!   wake hook runs, and dispatched as soon as an instance is online.
//! - A failed dial marks the instance down for a backoff (1 s doubling to
//!   30 s) and the connection is balanced again over the others; an active
//!   health check's success brings it back at once.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::ids::InstanceName;
use crate::services::Limits;

/// Most connections held for a group without an online instance.
pub const MAX_HELD: usize = 1024;
/// First backoff after a failed dial.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Longest backoff.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Failed health checks in a row that mark an instance down (as HAProxy's
/// `fall`): one check lost to a path being set up (the gateway just
/// started, a WireGuard handshake under way) leaves the instance in.
pub const HEALTH_FALL: u32 = 2;
/// How long after coming online an instance is fresh ([`Pool::is_fresh`]):
/// a woken or new instance's path (a WireGuard handshake) or listener may
/// lag its `online` by a moment, so the gateway does not mark it down for a
/// failed dial then, and tries again after a pause.
pub const FRESH: Duration = Duration::from_secs(5);

/// An instance a connection was given to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pick {
    /// Its name.
    pub instance: InstanceName,
    /// Its private IP.
    pub ip: Ipv4Addr,
}

/// What to do with a new connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admit {
    /// Forward it to this instance now (its slot is taken).
    Go(Pick),
    /// It waits (queue or wake hold) under this id; `wake` says the group
    /// has no online instance and its wake hook should run.
    Wait {
        /// The waiter's id (for [`Pool::cancel`] and dispatches).
        id: u64,
        /// No instance is online: run the wake hook.
        wake: bool,
    },
    /// Refuse it.
    Reject,
}

/// One instance as the balancer sees it.
#[derive(Debug, Clone)]
struct Backend {
    pick: Pick,
    online: bool,
    active: u32,
    down_until: Option<Instant>,
    failures: u32,
    /// Failed health checks in a row.
    check_failures: u32,
    /// When it came online (as the map says), while it is.
    online_since: Option<Instant>,
}

impl Backend {
    fn eligible(&self, now: Instant) -> bool {
        self.online && self.down_until.is_none_or(|t| now >= t)
    }
}

/// The balancer of one group.
#[derive(Debug, Clone)]
pub struct Pool {
    limits: Limits,
    backends: Vec<Backend>,
    /// Waiters in arrival order.
    queue: VecDeque<u64>,
    next_id: u64,
    /// Round-robin cursor among equally loaded instances.
    turn: usize,
}

impl Pool {
    /// An empty pool with these limits.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            backends: Vec::new(),
            queue: VecDeque::new(),
            next_id: 1,
            turn: 0,
        }
    }

    /// Replaces the group's limits and instances (name, IP, online) from a
    /// new map, keeping the counts and health of those that stay; then
    /// dispatches waiters if there is room now.
    pub fn update(
        &mut self,
        limits: Limits,
        instances: Vec<(InstanceName, Ipv4Addr, bool)>,
        now: Instant,
    ) -> Vec<(u64, Pick)> {
        self.limits = limits;
        let mut next = Vec::with_capacity(instances.len());
        for (name, ip, online) in instances {
            let old = self.backends.iter().find(|b| b.pick.instance == name);
            let since = |was: Option<Instant>| match (online, was) {
                (false, _) => None,
                (true, Some(t)) => Some(t),
                (true, None) => Some(now),
            };
            next.push(match old {
                Some(b) => Backend {
                    pick: Pick { instance: name, ip },
                    online,
                    online_since: since(b.online_since),
                    ..b.clone()
                },
                None => Backend {
                    pick: Pick { instance: name, ip },
                    online,
                    active: 0,
                    down_until: None,
                    failures: 0,
                    check_failures: 0,
                    online_since: since(None),
                },
            });
        }
        self.backends = next;
        self.dispatch(now)
    }

    /// The least-loaded eligible instance below `limit`, in turn among equals.
    fn pick_below(&mut self, limit: u32, now: Instant) -> Option<usize> {
        let n = self.backends.len();
        let mut best: Option<usize> = None;
        for k in 0..n {
            let i = (self.turn + k) % n;
            let b = &self.backends[i];
            if b.eligible(now)
                && b.active < limit
                && best.is_none_or(|j| b.active < self.backends[j].active)
            {
                best = Some(i);
            }
        }
        if let Some(i) = best {
            self.turn = (i + 1) % n.max(1);
        }
        best
    }

    fn take(&mut self, i: usize) -> Pick {
        self.backends[i].active += 1;
        self.backends[i].pick.clone()
    }

    /// How many may wait: `Σ (hard - soft)` over eligible instances, or
    /// [`MAX_HELD`] while none is online.
    fn queue_capacity(&self, now: Instant) -> usize {
        let room = u32::from(
            self.limits
                .hard_limit
                .saturating_sub(self.limits.soft_limit),
        );
        let eligible = self.backends.iter().filter(|b| b.eligible(now)).count();
        if self.online() == 0 {
            MAX_HELD
        } else {
            eligible.saturating_mul(room as usize)
        }
    }

    /// A new connection. `may_wait`: false for UDP datagrams, which cannot
    /// wait (they go to the least-loaded instance below its hard limit).
    pub fn admit(&mut self, may_wait: bool, now: Instant) -> Admit {
        let soft = u32::from(self.limits.soft_limit);
        // Earlier waiters go first.
        if self.queue.is_empty() {
            if let Some(i) = self.pick_below(soft, now) {
                return Admit::Go(self.take(i));
            }
        }
        if !may_wait {
            let hard = u32::from(self.limits.hard_limit);
            return match self.pick_below(hard, now) {
                Some(i) => Admit::Go(self.take(i)),
                None => Admit::Reject,
            };
        }
        if self.queue.len() >= self.queue_capacity(now) {
            return Admit::Reject;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.queue.push_back(id);
        Admit::Wait {
            id,
            wake: self.online() == 0,
        }
    }

    /// Gives waiters the room there is now, in arrival order.
    fn dispatch(&mut self, now: Instant) -> Vec<(u64, Pick)> {
        let soft = u32::from(self.limits.soft_limit);
        let mut out = Vec::new();
        while !self.queue.is_empty() {
            let Some(i) = self.pick_below(soft, now) else {
                break;
            };
            let id = self.queue.pop_front().expect("not empty");
            out.push((id, self.take(i)));
        }
        out
    }

    /// A connection to `instance` finished: its slot is free; waiters that
    /// can go now are returned with their instance.
    pub fn release(&mut self, instance: &InstanceName, now: Instant) -> Vec<(u64, Pick)> {
        if let Some(b) = self
            .backends
            .iter_mut()
            .find(|b| &b.pick.instance == instance)
        {
            b.active = b.active.saturating_sub(1);
        }
        self.dispatch(now)
    }

    /// A waiter gave up (timeout, client gone); false if it was not waiting
    /// any more (it was dispatched meanwhile: release its slot instead).
    pub fn cancel(&mut self, id: u64) -> bool {
        match self.queue.iter().position(|w| *w == id) {
            Some(at) => {
                self.queue.remove(at);
                true
            }
            None => false,
        }
    }

    /// Whether `instance` came online less than [`FRESH`] ago.
    pub fn is_fresh(&self, instance: &InstanceName, now: Instant) -> bool {
        self.backends.iter().any(|b| {
            &b.pick.instance == instance
                && b.online_since
                    .is_some_and(|t| now.saturating_duration_since(t) < FRESH)
        })
    }

    /// A dial to `instance` failed or timed out: it is skipped until a
    /// backoff passes (or a health check succeeds). Its slot is released.
    /// (The gateway first asks [`Pool::is_fresh`]: a fresh instance's slot
    /// is only released, and the dial tried again after a pause.)
    pub fn failed(&mut self, instance: &InstanceName, now: Instant) -> Vec<(u64, Pick)> {
        if let Some(b) = self
            .backends
            .iter_mut()
            .find(|b| &b.pick.instance == instance)
        {
            b.failures = b.failures.saturating_add(1);
            let backoff = BACKOFF_MIN
                .saturating_mul(1 << b.failures.min(6).saturating_sub(1))
                .min(BACKOFF_MAX);
            b.down_until = Some(now + backoff);
        }
        self.release(instance, now)
    }

    /// A health check of `instance` succeeded: eligible again at once.
    pub fn healthy(&mut self, instance: &InstanceName, now: Instant) -> Vec<(u64, Pick)> {
        if let Some(b) = self
            .backends
            .iter_mut()
            .find(|b| &b.pick.instance == instance)
        {
            b.down_until = None;
            b.failures = 0;
            b.check_failures = 0;
        }
        self.dispatch(now)
    }

    /// A health check of `instance` failed: after [`HEALTH_FALL`] in a row,
    /// down until one succeeds. True when this check marked it down.
    pub fn unhealthy(&mut self, instance: &InstanceName, now: Instant) -> bool {
        let Some(b) = self
            .backends
            .iter_mut()
            .find(|b| &b.pick.instance == instance)
        else {
            return false;
        };
        b.check_failures = b.check_failures.saturating_add(1);
        if b.check_failures < HEALTH_FALL {
            return false;
        }
        b.failures = b.failures.saturating_add(1);
        b.down_until = Some(now + BACKOFF_MAX);
        b.check_failures == HEALTH_FALL
    }

    /// Whether `instance` is marked down at `now` (a failed dial's backoff
    /// not over, or a failed health check not yet followed by a success).
    pub fn is_down(&self, instance: &InstanceName, now: Instant) -> bool {
        self.backends
            .iter()
            .find(|b| &b.pick.instance == instance)
            .is_some_and(|b| !b.eligible(now) && b.online)
    }

    /// Instances online in the map.
    pub fn online(&self) -> usize {
        self.backends.iter().filter(|b| b.online).count()
    }

    /// Online instances, for health checks.
    pub fn online_instances(&self) -> Vec<Pick> {
        self.backends
            .iter()
            .filter(|b| b.online)
            .map(|b| b.pick.clone())
            .collect()
    }

    /// Connections waiting now.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Active connections per instance (for metrics).
    pub fn active(&self) -> Vec<(InstanceName, u32, bool)> {
        self.backends
            .iter()
            .map(|b| (b.pick.instance.clone(), b.active, b.down_until.is_some()))
            .collect()
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> InstanceName {
        s.parse().unwrap()
    }

    fn pool(soft: u16, hard: u16, n: u8) -> (Pool, Instant) {
        let now = Instant::now();
        let mut p = Pool::new(Limits {
            soft_limit: soft,
            hard_limit: hard,
        });
        let list = (1..=n)
            .map(|i| (name(&format!("i{i}")), Ipv4Addr::new(10, 240, 0, i), true))
            .collect();
        assert!(p.update(p.limits(), list, now).is_empty());
        (p, now)
    }

    #[test]
    fn below_soft_spreads_then_queues_then_rejects_exactly() {
        // 2 instances, soft 2, hard 3: 4 go, 2 wait, the 7th is refused.
        let (mut p, now) = pool(2, 3, 2);
        let mut got = Vec::new();
        for _ in 0..4 {
            match p.admit(true, now) {
                Admit::Go(pick) => got.push(pick.instance),
                other => panic!("{other:?}"),
            }
        }
        got.sort();
        assert_eq!(got, [name("i1"), name("i1"), name("i2"), name("i2")]);
        let w1 = p.admit(true, now);
        let w2 = p.admit(true, now);
        assert!(matches!(w1, Admit::Wait { id: 1, wake: false }), "{w1:?}");
        assert!(matches!(w2, Admit::Wait { id: 2, .. }));
        assert_eq!(p.admit(true, now), Admit::Reject);
        assert_eq!(p.queued(), 2);
        // A finished connection lets the first waiter go to that instance.
        let d = p.release(&name("i2"), now);
        assert_eq!(
            d,
            vec![(
                1,
                Pick {
                    instance: name("i2"),
                    ip: Ipv4Addr::new(10, 240, 0, 2)
                }
            )]
        );
        // A waiter that gave up leaves the queue; a dispatched one cannot.
        assert!(p.cancel(2));
        assert!(!p.cancel(1));
        assert_eq!(p.queued(), 0);
    }

    #[test]
    fn defaults_serve_one_at_a_time_per_instance() {
        let (mut p, now) = pool(1, 65535, 3);
        let picks: Vec<_> = (0..3).map(|_| p.admit(true, now)).collect();
        assert!(picks.iter().all(|a| matches!(a, Admit::Go(_))));
        assert!(matches!(p.admit(true, now), Admit::Wait { .. }));
    }

    #[test]
    fn failed_instances_are_skipped_then_retried() {
        let (mut p, now) = pool(10, 10, 2);
        let Admit::Go(first) = p.admit(true, now) else {
            panic!()
        };
        p.failed(&first.instance, now);
        assert!(p.is_down(&first.instance, now));
        for _ in 0..5 {
            let Admit::Go(pick) = p.admit(true, now) else {
                panic!()
            };
            assert_ne!(pick.instance, first.instance, "down instances are skipped");
        }
        // After the backoff it is picked again (it has the fewest).
        let later = now + Duration::from_secs(2);
        let Admit::Go(pick) = p.admit(true, later) else {
            panic!()
        };
        assert_eq!(pick.instance, first.instance);
        assert!(!p.is_down(&first.instance, later));
        // One failed health check leaves it in (a path being set up); two
        // in a row keep it out; a good one brings it back.
        assert!(!p.unhealthy(&first.instance, later));
        assert!(!p.is_down(&first.instance, later));
        p.healthy(&first.instance, later);
        assert!(
            !p.unhealthy(&first.instance, later),
            "the count starts again"
        );
        assert!(p.unhealthy(&first.instance, later));
        assert!(p.is_down(&first.instance, later));
        assert!(!p.unhealthy(&first.instance, later), "already down");
        assert!(p.is_down(&first.instance, later));
        assert!(p
            .active()
            .iter()
            .any(|(n, _, down)| *n == first.instance && *down));
        p.healthy(&first.instance, later);
        assert!(p.active().iter().all(|(_, _, down)| !down));
    }

    #[test]
    fn an_instance_is_fresh_for_a_while_after_it_comes_online() {
        let now = Instant::now();
        let mut p = Pool::new(Limits::default());
        let name: InstanceName = "web-1".parse().unwrap();
        let ip = Ipv4Addr::new(10, 240, 0, 9);
        p.update(Limits::default(), vec![(name.clone(), ip, false)], now);
        assert!(!p.is_fresh(&name, now), "offline: not fresh");
        let on = now + Duration::from_secs(60);
        p.update(Limits::default(), vec![(name.clone(), ip, true)], on);
        assert!(p.is_fresh(&name, on));
        // Still online in the next map: as fresh as it was, not renewed.
        let next = on + Duration::from_secs(1);
        p.update(Limits::default(), vec![(name.clone(), ip, true)], next);
        assert!(p.is_fresh(&name, next));
        assert!(!p.is_fresh(&name, on + FRESH));
        // Offline, then online again: fresh again.
        p.update(
            Limits::default(),
            vec![(name.clone(), ip, false)],
            on + FRESH,
        );
        assert!(!p.is_fresh(&name, on + FRESH));
        p.update(
            Limits::default(),
            vec![(name.clone(), ip, true)],
            on + FRESH,
        );
        assert!(p.is_fresh(&name, on + FRESH));
    }

    #[test]
    fn no_online_instance_holds_and_dispatches_when_one_comes() {
        let now = Instant::now();
        let mut p = Pool::new(Limits::default());
        let a = p.admit(true, now);
        assert_eq!(a, Admit::Wait { id: 1, wake: true });
        // Offline instances do not count.
        let off = vec![(name("a"), Ipv4Addr::new(10, 240, 0, 1), false)];
        assert!(p.update(Limits::default(), off, now).is_empty());
        let on = vec![(name("a"), Ipv4Addr::new(10, 240, 0, 1), true)];
        let d = p.update(Limits::default(), on, now);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].0, 1);
        // Datagrams never wait.
        let (mut u, now) = pool(1, 2, 1);
        assert!(matches!(u.admit(false, now), Admit::Go(_)));
        assert!(matches!(u.admit(false, now), Admit::Go(_)));
        assert_eq!(u.admit(false, now), Admit::Reject);
    }
}
