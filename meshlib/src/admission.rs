//! Connection budgets per source address (pure: no I/O, no clock).
//!
//! [`PerSource`] counts open connections per source (an IPv4 address, or an
//! IPv6 /64, [`source_of`]) under a budget: the gateway closes a client's
//! connection at once when its address already holds its budget.
//!
//! [`Admission`] admits connections that have not said hello yet (the
//! keyserver's).
//! A QUIC connection costs the keyserver memory and a task before the
//! client has proven anything. Such pending connections get their own
//! budget, apart from the established members' `max-connections`: at most
//! `max_pending` in all and `max_pending_per_source` per source (an IPv4
//! address, or an IPv6 /64). When a budget is full, the *oldest* pending
//! connection of that source (or overall) is evicted to make room, rather
//! than the newcomer refused: clients that hold connections open without a
//! hello cannot lock real members out, since a real client finishes its
//! hello within a round trip or two, long before it becomes the oldest. To
//! keep a newcomer out, an attacker has to open a whole budget of
//! handshakes within that round trip.
//!
//! Call order: [`Admission::admit`] for every new connection (then end the
//! connections it lists in `evict`), [`Admission::leave`] when a pending
//! connection says hello, fails or times out.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

/// Open connections per source, each source under the same budget.
#[derive(Debug)]
pub struct PerSource {
    max: usize,
    counts: HashMap<IpAddr, usize>,
}

impl PerSource {
    /// At most `max` connections per source (at least 1).
    pub fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            counts: HashMap::new(),
        }
    }

    /// Counts a new connection from `ip`: its source (for
    /// [`PerSource::remove`]), or `None` if the source holds its budget
    /// already (nothing is counted).
    pub fn try_add(&mut self, ip: IpAddr) -> Option<IpAddr> {
        let source = source_of(ip);
        if self.is_full(source) {
            return None;
        }
        self.add(source);
        Some(source)
    }

    /// Whether `source` holds its whole budget.
    pub fn is_full(&self, source: IpAddr) -> bool {
        self.count(source) >= self.max
    }

    /// Counts a connection from `source`, budget or not.
    pub fn add(&mut self, source: IpAddr) {
        *self.counts.entry(source).or_insert(0) += 1;
    }

    /// A connection from `source` ended.
    pub fn remove(&mut self, source: IpAddr) {
        if let Some(n) = self.counts.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                self.counts.remove(&source);
            }
        }
    }

    /// Connections from `source` now.
    pub fn count(&self, source: IpAddr) -> usize {
        self.counts.get(&source).copied().unwrap_or(0)
    }

    /// Connections from every source now.
    pub fn total(&self) -> usize {
        self.counts.values().sum()
    }
}

/// The pending connections and their budgets.
#[derive(Debug)]
pub struct Admission {
    max_pending: usize,
    /// Pending connections by id; ids grow, so the first is the oldest.
    pending: BTreeMap<u64, IpAddr>,
    /// Pending connections per source.
    per_source: PerSource,
    next_id: u64,
}

/// The answer to [`Admission::admit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    /// The new connection's id (for [`Admission::leave`]).
    pub id: u64,
    /// Pending connections to end now to make room, oldest first.
    pub evict: Vec<u64>,
}

/// The budget key of an address: IPv4 (also v4-mapped) as is, IPv6 by /64
/// (one site gets a whole /64).
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

impl Admission {
    /// Budgets of at most `max_pending` pending connections, and
    /// `max_per_source` from one source (both at least 1).
    pub fn new(max_pending: usize, max_per_source: usize) -> Self {
        Self {
            max_pending: max_pending.max(1),
            pending: BTreeMap::new(),
            per_source: PerSource::new(max_per_source),
            next_id: 0,
        }
    }

    /// Admits a connection from `ip`, evicting what it must.
    pub fn admit(&mut self, ip: IpAddr) -> Admitted {
        let source = source_of(ip);
        let mut evict = Vec::new();
        if self.per_source.is_full(source) {
            let oldest = self
                .pending
                .iter()
                .find(|(_, s)| **s == source)
                .map(|(id, _)| *id);
            evict.extend(oldest);
        }
        if evict.is_empty() && self.pending.len() >= self.max_pending {
            evict.extend(self.pending.keys().next().copied());
        }
        for id in &evict {
            self.leave(*id);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.pending.insert(id, source);
        self.per_source.add(source);
        Admitted { id, evict }
    }

    /// A pending connection said hello, failed or timed out (unknown ids,
    /// e.g. already evicted, are ignored).
    pub fn leave(&mut self, id: u64) {
        if let Some(source) = self.pending.remove(&id) {
            self.per_source.remove(source);
        }
    }

    /// Number of pending connections.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Whether `id` is still pending.
    pub fn is_pending(&self, id: u64) -> bool {
        self.pending.contains_key(&id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn per_source_budget_evicts_that_sources_oldest() {
        let mut a = Admission::new(100, 2);
        let x1 = a.admit(ip("192.0.2.1"));
        let y1 = a.admit(ip("192.0.2.2"));
        let x2 = a.admit(ip("192.0.2.1"));
        assert!(x1.evict.is_empty() && y1.evict.is_empty() && x2.evict.is_empty());
        let x3 = a.admit(ip("192.0.2.1"));
        assert_eq!(x3.evict, vec![x1.id], "the source's oldest, not y1");
        assert_eq!(a.pending(), 3);
        assert!(a.is_pending(y1.id) && !a.is_pending(x1.id));
        // v4-mapped is the same source.
        let x4 = a.admit(ip("::ffff:192.0.2.1"));
        assert_eq!(x4.evict, vec![x2.id]);
    }

    #[test]
    fn global_budget_evicts_the_oldest_and_leave_frees() {
        let mut a = Admission::new(3, 3);
        let ids: Vec<u64> = ["192.0.2.1", "192.0.2.2", "192.0.2.3"]
            .iter()
            .map(|s| a.admit(ip(s)).id)
            .collect();
        let d = a.admit(ip("192.0.2.4"));
        assert_eq!(d.evict, vec![ids[0]]);
        a.leave(ids[1]);
        a.leave(ids[1]);
        assert_eq!(a.pending(), 2);
        assert!(a.admit(ip("192.0.2.5")).evict.is_empty());
        // Thousands of connections never grow the table past its budget.
        for i in 0..5000u32 {
            a.admit(IpAddr::from(std::net::Ipv4Addr::from(
                0xC000_0200 + (i % 200),
            )));
        }
        assert_eq!(a.pending(), 3);
        assert_eq!(a.per_source.total(), 3);
    }

    #[test]
    fn per_source_budget_refuses_past_it_and_frees_on_remove() {
        let mut b = PerSource::new(2);
        let s = b.try_add(ip("192.0.2.1")).unwrap();
        assert_eq!(b.try_add(ip("::ffff:192.0.2.1")), Some(s), "v4-mapped");
        assert_eq!(b.try_add(ip("192.0.2.1")), None, "at its budget");
        assert!(b.try_add(ip("192.0.2.2")).is_some(), "another source");
        assert_eq!((b.count(s), b.total()), (2, 3));
        b.remove(s);
        assert!(b.try_add(ip("192.0.2.1")).is_some());
        b.remove(ip("192.0.2.9"));
        assert_eq!(b.total(), 3);
    }

    #[test]
    fn ipv6_counts_per_64() {
        assert_eq!(
            source_of(ip("2001:db8:1:2::5")),
            source_of(ip("2001:db8:1:2:ffff::1"))
        );
        assert_ne!(
            source_of(ip("2001:db8:1:2::5")),
            source_of(ip("2001:db8:1:3::5"))
        );
        let mut a = Admission::new(10, 1);
        let first = a.admit(ip("2001:db8::1"));
        assert_eq!(a.admit(ip("2001:db8::2")).evict, vec![first.id]);
    }
}
