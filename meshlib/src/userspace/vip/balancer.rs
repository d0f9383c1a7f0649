//! The state of one service address's port: its [`Pool`] (the one
//! balancing policy), the instances it balances over, the connections held
//! for a wake, and the relayed connections by instance (so that an instance
//! leaving ends them). Driven by the listeners of [`super::tcp`] and
//! [`super::udp`]; no socket here.
//!
//! Lock order: this state, then the stack (`Inner::net`); never across an
//! await.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::stats::ServiceStats;
use super::{Backend, PortPlan};
use crate::balance::{Admit, Pick, Pool};
use crate::ids::InstanceName;
use crate::keys::PublicKey;
use crate::services::Limits;

/// Service addresses set no limits of their own: every instance takes as
/// many connections as it accepts (the pool's least-active order still
/// spreads them).
const UNLIMITED: Limits = Limits {
    soft_limit: u16::MAX,
    hard_limit: u16::MAX,
};

/// What to do with a new connection or flow.
pub(super) enum Choice {
    /// Dial this instance now (its slot in the pool is taken: give it back
    /// with [`Balancer::release`] or [`Balancer::failed`]).
    Go(Backend),
    /// No instance is online and the address is wakeable: wait for one on
    /// `rx`, at most `timeout`, then [`Balancer::give_up`].
    Hold {
        /// The waiter's id in the pool.
        id: u64,
        /// Where the instance comes.
        rx: oneshot::Receiver<Backend>,
        /// The address's `wake_timeout_secs`.
        timeout: Duration,
        /// The pool asks for a wake (no instance online).
        wake: bool,
    },
    /// Refuse it now.
    Refuse,
}

/// A relayed connection's registration: its end is signalled when the
/// sender is dropped ([`Balancer::register`]).
pub(super) type Cancelled = oneshot::Receiver<()>;

struct State {
    pool: Pool,
    /// The pool's instances with what the listeners need to dial them.
    backends: HashMap<InstanceName, Backend>,
    /// The keys of the service's instances: a relayed connection to any
    /// other key is ended.
    members: BTreeSet<PublicKey>,
    wake_timeout: Option<Duration>,
    /// Connections held for a wake, by pool waiter id.
    waiters: HashMap<u64, oneshot::Sender<Backend>>,
    /// Relayed connections and flows: their instance's key, and the sender
    /// whose drop ends them.
    conns: HashMap<u64, (PublicKey, oneshot::Sender<()>)>,
    next_conn: u64,
    /// The port is no longer served ([`Balancer::close`]).
    closed: bool,
}

/// One service address's port.
pub(super) struct Balancer {
    /// The service (for the wake hook and logs).
    pub service: String,
    /// The port, on the address and on the instances.
    pub port: u16,
    /// The service's traffic counters and hold budget (shared by the
    /// address's ports).
    pub stats: Arc<ServiceStats>,
    state: Mutex<State>,
}

impl Balancer {
    /// An empty balancer for `plan`'s port (call [`Balancer::update`]).
    pub fn new(plan: &PortPlan, stats: Arc<ServiceStats>) -> Self {
        Self {
            service: plan.service.clone(),
            port: plan.port,
            stats,
            state: Mutex::new(State {
                pool: Pool::new(UNLIMITED),
                backends: HashMap::new(),
                members: BTreeSet::new(),
                wake_timeout: None,
                waiters: HashMap::new(),
                conns: HashMap::new(),
                next_conn: 1,
                closed: false,
            }),
        }
    }

    /// Takes a new plan: the pool's instances (health and counts of those
    /// that stay are kept), held connections dispatched to instances that
    /// came, relayed connections of instances that left ended.
    pub fn update(&self, plan: &PortPlan, now: Instant) {
        let mut st = self.state.lock();
        st.backends = plan
            .backends
            .iter()
            .map(|b| (b.instance.clone(), b.clone()))
            .collect();
        st.members = plan.members.clone();
        st.wake_timeout = plan.wake_timeout;
        let list = plan
            .backends
            .iter()
            .map(|b| (b.instance.clone(), b.ip, true))
            .collect();
        let go = st.pool.update(UNLIMITED, list, now);
        deliver(&mut st, go, now);
        let members = std::mem::take(&mut st.members);
        // Dropping a sender ends its connection.
        st.conns.retain(|_, (key, _)| members.contains(key));
        st.members = members;
    }

    /// A new connection (`may_wait`) or UDP flow (not).
    pub fn choose(&self, may_wait: bool, now: Instant) -> Choice {
        let mut st = self.state.lock();
        if st.closed {
            return Choice::Refuse;
        }
        match st.pool.admit(may_wait, now) {
            Admit::Go(pick) => match st.backends.get(&pick.instance).cloned() {
                Some(b) => Choice::Go(b),
                None => {
                    // Not reachable: the pool and the table change together.
                    let go = st.pool.release(&pick.instance, now);
                    deliver(&mut st, go, now);
                    Choice::Refuse
                }
            },
            Admit::Wait { id, wake } => match st.wake_timeout {
                Some(timeout) if may_wait => {
                    let (tx, rx) = oneshot::channel();
                    st.waiters.insert(id, tx);
                    Choice::Hold {
                        id,
                        rx,
                        timeout,
                        wake,
                    }
                }
                _ => {
                    st.pool.cancel(id);
                    Choice::Refuse
                }
            },
            Admit::Reject => Choice::Refuse,
        }
    }

    /// A new UDP sender: an instance now, or, when no instance is online
    /// and the address is wakeable, a hold (its first datagrams wait for
    /// the wake); otherwise refused (a datagram never waits behind
    /// instances that are online but busy or down).
    pub fn choose_datagram(&self, now: Instant) -> Choice {
        let sleeping = {
            let st = self.state.lock();
            st.backends.is_empty() && st.wake_timeout.is_some()
        };
        self.choose(sleeping, now)
    }

    /// A held connection stopped waiting (its time is up): `None` when it
    /// left the queue, or the instance it was given meanwhile.
    pub fn give_up(&self, id: u64, mut rx: oneshot::Receiver<Backend>) -> Option<Backend> {
        let mut st = self.state.lock();
        st.waiters.remove(&id);
        if st.pool.cancel(id) {
            return None;
        }
        rx.try_recv().ok()
    }

    /// A connection or flow to `b` finished.
    pub fn release(&self, b: &Backend, now: Instant) {
        let mut st = self.state.lock();
        let go = st.pool.release(&b.instance, now);
        deliver(&mut st, go, now);
    }

    /// A dial to `b` was refused or timed out: `b` backs off (the pool's
    /// policy) and its slot is free.
    pub fn failed(&self, b: &Backend, now: Instant) {
        let mut st = self.state.lock();
        let go = st.pool.failed(&b.instance, now);
        deliver(&mut st, go, now);
    }

    /// A held connection dials `b` again although it refused (a woken
    /// instance still starting): eligible again at once.
    pub fn retry(&self, b: &Backend, now: Instant) {
        let mut st = self.state.lock();
        let go = st.pool.healthy(&b.instance, now);
        deliver(&mut st, go, now);
    }

    /// Registers a connection relayed to `key`: `None` when that instance
    /// left meanwhile (end the connection); else its id (for
    /// [`Balancer::unregister`]) and what resolves when it must end.
    pub fn register(&self, key: PublicKey) -> Option<(u64, Cancelled)> {
        let mut st = self.state.lock();
        if !st.members.contains(&key) {
            return None;
        }
        let id = st.next_conn;
        st.next_conn += 1;
        let (tx, rx) = oneshot::channel();
        st.conns.insert(id, (key, tx));
        Some((id, rx))
    }

    /// A registered connection ended.
    pub fn unregister(&self, id: u64) {
        self.state.lock().conns.remove(&id);
    }

    /// The port is no longer served: every relayed and held connection
    /// ends.
    pub fn close(&self) {
        let mut st = self.state.lock();
        st.closed = true;
        st.conns.clear();
        st.waiters.clear();
    }

    /// Whether [`Balancer::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.state.lock().closed
    }

    /// Relayed connections and flows now (for tests and status).
    pub fn relayed(&self) -> usize {
        self.state.lock().conns.len()
    }
}

/// Hands instances the pool dispatched to their held connections; one whose
/// connection gave up meanwhile is released (which may dispatch the next).
/// Bounded: each round removes a waiter.
fn deliver(st: &mut State, mut go: Vec<(u64, Pick)>, now: Instant) {
    while let Some((id, pick)) = go.pop() {
        let tx = st.waiters.remove(&id);
        let backend = st.backends.get(&pick.instance).cloned();
        let rejected = match (tx, backend) {
            (Some(tx), Some(b)) => tx.send(b).is_err(),
            _ => true,
        };
        if rejected {
            go.extend(st.pool.release(&pick.instance, now));
        }
    }
}
