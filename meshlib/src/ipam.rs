//! Address management for one network range.
//!
//! [`Allocator`] hands out the lowest free host address of a range (never the
//! network address or the broadcast address), and keeps released addresses in
//! quarantine for a while before reuse, so that a stale DNS answer or peer
//! entry for a departed member never reaches a newcomer. Pure: time is an
//! argument; the keyserver persists used and quarantined addresses and rebuilds
//! an allocator with [`Allocator::reserve`] and [`Allocator::quarantine_until`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime};

use ipnet::Ipv4Net;

/// The default network range of seed 003: 1022 host addresses,
/// `10.240.0.1`–`10.240.3.254`.
pub const DEFAULT_RANGE: Ipv4Net = match Ipv4Net::new(Ipv4Addr::new(10, 240, 0, 0), 22) {
    Ok(net) => net,
    Err(_) => panic!("constant range"),
};

/// The default quarantine of a released address: longer than the DNS TTL
/// (30 s) with a wide margin.
pub const DEFAULT_QUARANTINE: Duration = Duration::from_secs(300);

/// Why an address operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    /// The range has no host addresses besides network and broadcast (a /31 or /32).
    #[error("range {0} is too small: it needs at least 2 host addresses (prefix /30 or shorter)")]
    RangeTooSmall(Ipv4Net),
    /// The range is not in canonical form (host bits set), e.g. `10.240.0.1/22`.
    #[error("range {given} has host bits set; did you mean {canonical}?")]
    NotCanonical {
        /// The range as given.
        given: Ipv4Net,
        /// The range with host bits cleared.
        canonical: Ipv4Net,
    },
    /// Every host address is in use or in quarantine.
    #[error("network range {range} is full: {used} addresses in use, {quarantined} in quarantine")]
    Full {
        /// The range.
        range: Ipv4Net,
        /// Addresses in use.
        used: usize,
        /// Addresses released but not yet reusable.
        quarantined: usize,
    },
    /// The address is not a host address of the range.
    #[error("{ip} is not a host address of {range}")]
    OutOfRange {
        /// The address.
        ip: Ipv4Addr,
        /// The range.
        range: Ipv4Net,
    },
    /// The address is already in use.
    #[error("{0} is already in use")]
    InUse(Ipv4Addr),
}

/// Allocates host addresses of one range: lowest free first, with quarantine.
#[derive(Debug, Clone)]
pub struct Allocator {
    range: Ipv4Net,
    quarantine: Duration,
    used: BTreeSet<u32>,
    /// Released addresses and when they become free again.
    quarantined: BTreeMap<u32, SystemTime>,
}

impl Allocator {
    /// An allocator over `range` with nothing in use; released addresses are
    /// held for `quarantine` before reuse.
    pub fn new(range: Ipv4Net, quarantine: Duration) -> Result<Self, IpamError> {
        if range.trunc() != range {
            return Err(IpamError::NotCanonical {
                given: range,
                canonical: range.trunc(),
            });
        }
        if range.prefix_len() > 30 {
            return Err(IpamError::RangeTooSmall(range));
        }
        Ok(Self {
            range,
            quarantine,
            used: BTreeSet::new(),
            quarantined: BTreeMap::new(),
        })
    }

    /// The range this allocator manages.
    pub fn range(&self) -> Ipv4Net {
        self.range
    }

    /// Number of host addresses in the range (network and broadcast excluded).
    pub fn capacity(&self) -> usize {
        (self.last_host() - self.first_host() + 1) as usize
    }

    /// Number of addresses in use.
    pub fn used(&self) -> usize {
        self.used.len()
    }

    fn first_host(&self) -> u32 {
        u32::from(self.range.network()) + 1
    }

    fn last_host(&self) -> u32 {
        u32::from(self.range.broadcast()) - 1
    }

    fn host_index(&self, ip: Ipv4Addr) -> Result<u32, IpamError> {
        let n = u32::from(ip);
        if n < self.first_host() || n > self.last_host() {
            return Err(IpamError::OutOfRange {
                ip,
                range: self.range,
            });
        }
        Ok(n)
    }

    /// Whether `n` may be handed out at `now`.
    fn is_free(&self, n: u32, now: SystemTime) -> bool {
        !self.used.contains(&n) && self.quarantined.get(&n).is_none_or(|until| *until <= now)
    }

    /// Hands out the lowest free address at `now`.
    pub fn allocate(&mut self, now: SystemTime) -> Result<Ipv4Addr, IpamError> {
        // A linear scan from the lowest host: bounded by the range size (1022
        // for the default /22), which is cheap next to a join round trip.
        let mut candidate = self.first_host();
        while candidate <= self.last_host() {
            if self.is_free(candidate, now) {
                self.quarantined.remove(&candidate);
                self.used.insert(candidate);
                return Ok(Ipv4Addr::from(candidate));
            }
            candidate += 1;
        }
        let quarantined = self.quarantined.values().filter(|u| **u > now).count();
        Err(IpamError::Full {
            range: self.range,
            used: self.used.len(),
            quarantined,
        })
    }

    /// Marks `ip` as in use (rebuilding from a store, or a requested address).
    /// A quarantine on it is lifted: the caller decided.
    pub fn reserve(&mut self, ip: Ipv4Addr) -> Result<(), IpamError> {
        let n = self.host_index(ip)?;
        if !self.used.insert(n) {
            return Err(IpamError::InUse(ip));
        }
        self.quarantined.remove(&n);
        Ok(())
    }

    /// Releases `ip` at `now`: it is reusable after the quarantine period.
    /// Releasing an address that is not in use does nothing.
    pub fn release(&mut self, ip: Ipv4Addr, now: SystemTime) {
        let n = u32::from(ip);
        if self.used.remove(&n) {
            self.quarantined.insert(n, now + self.quarantine);
        }
    }

    /// Releases `ip`, counting its quarantine from `since` (at or before
    /// now): the moment the address stopped being named, e.g. when its
    /// member went offline. An address unnamed longer than the quarantine
    /// is free at once. Returns when it becomes free (to persist), `None`
    /// if the address was not in use.
    pub fn release_since(&mut self, ip: Ipv4Addr, since: SystemTime) -> Option<SystemTime> {
        let n = u32::from(ip);
        if !self.used.remove(&n) {
            return None;
        }
        let until = since + self.quarantine;
        self.quarantined.insert(n, until);
        Some(until)
    }

    /// Whether `ip` is handed out.
    pub fn in_use(&self, ip: Ipv4Addr) -> bool {
        self.used.contains(&u32::from(ip))
    }

    /// The quarantine period of this allocator.
    pub fn quarantine(&self) -> Duration {
        self.quarantine
    }

    /// Hands out an address still in quarantine when nothing else is free:
    /// the one released longest ago, provided it was released at least
    /// `min_age` before `now` (the DNS TTL: no cached answer can still
    /// name it). `None` if no quarantined address is that old. The caller
    /// tries [`Allocator::allocate`] first.
    pub fn allocate_under_pressure(
        &mut self,
        now: SystemTime,
        min_age: Duration,
    ) -> Option<Ipv4Addr> {
        let (n, until) = self
            .quarantined
            .iter()
            .filter(|(n, _)| !self.used.contains(n))
            .min_by_key(|(n, until)| (**until, **n))
            .map(|(n, until)| (*n, *until))?;
        let released = until.checked_sub(self.quarantine)?;
        if released + min_age > now {
            return None;
        }
        self.quarantined.remove(&n);
        self.used.insert(n);
        Some(Ipv4Addr::from(n))
    }

    /// Frees `ip` at once, without quarantine: a reservation that never
    /// took effect (a replica putting back what a refused commit tried, or
    /// following another replica's records). Freeing an unused address does
    /// nothing.
    pub fn free(&mut self, ip: Ipv4Addr) {
        self.used.remove(&u32::from(ip));
    }

    /// Lifts a quarantine on `ip` (another replica handed it out, or its
    /// quarantine record was deleted).
    pub fn unquarantine(&mut self, ip: Ipv4Addr) {
        self.quarantined.remove(&u32::from(ip));
    }

    /// Addresses in quarantine with the time each becomes free (to persist).
    pub fn quarantined(&self) -> impl Iterator<Item = (Ipv4Addr, SystemTime)> + '_ {
        self.quarantined
            .iter()
            .map(|(n, until)| (Ipv4Addr::from(*n), *until))
    }

    /// Puts `ip` in quarantine until `until` (rebuilding from a store).
    /// Addresses outside the range or in use are ignored.
    pub fn quarantine_until(&mut self, ip: Ipv4Addr, until: SystemTime) {
        if let Ok(n) = self.host_index(ip) {
            if !self.used.contains(&n) {
                self.quarantined.insert(n, until);
            }
        }
    }

    /// Drops quarantine entries that ended before `now` (bookkeeping only;
    /// allocation already ignores them).
    pub fn expire(&mut self, now: SystemTime) {
        self.quarantined.retain(|_, until| *until > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn free_and_unquarantine_take_effect_at_once() {
        let mut a = Allocator::new(DEFAULT_RANGE, DEFAULT_QUARANTINE).unwrap();
        let first = a.allocate(t(10)).unwrap();
        a.free(first);
        assert_eq!(
            a.allocate(t(10)).unwrap(),
            first,
            "freed without quarantine"
        );
        a.release(first, t(10));
        assert_ne!(a.allocate(t(11)).unwrap(), first, "released: quarantined");
        a.unquarantine(first);
        assert_eq!(a.allocate(t(11)).unwrap(), first);
    }

    #[test]
    fn default_range_holds_1022_hosts_and_never_network_or_broadcast() {
        let mut a = Allocator::new(DEFAULT_RANGE, DEFAULT_QUARANTINE).unwrap();
        assert_eq!(a.capacity(), 1022);
        let first = a.allocate(t(0)).unwrap();
        assert_eq!(first, Ipv4Addr::new(10, 240, 0, 1));
        let mut last = first;
        for _ in 1..1022 {
            last = a.allocate(t(0)).unwrap();
        }
        assert_eq!(last, Ipv4Addr::new(10, 240, 3, 254));
        match a.allocate(t(0)) {
            Err(IpamError::Full {
                used: 1022,
                quarantined: 0,
                ..
            }) => {}
            other => panic!("expected Full, got {other:?}"),
        }
        // .255 and .0 inside the range are ordinary hosts of a /22.
        assert!(a.reserve(Ipv4Addr::new(10, 240, 0, 255)).is_err());
        assert!(matches!(
            a.reserve(Ipv4Addr::new(10, 240, 0, 0)),
            Err(IpamError::OutOfRange { .. })
        ));
        assert!(matches!(
            a.reserve(Ipv4Addr::new(10, 240, 3, 255)),
            Err(IpamError::OutOfRange { .. })
        ));
    }

    #[test]
    fn lowest_free_and_quarantine() {
        let mut a =
            Allocator::new("10.240.0.0/29".parse().unwrap(), Duration::from_secs(60)).unwrap();
        assert_eq!(a.capacity(), 6);
        let ips: Vec<_> = (0..3).map(|_| a.allocate(t(0)).unwrap()).collect();
        a.release(ips[0], t(10));
        // .1 is quarantined until t=70: the next is .4.
        assert_eq!(a.allocate(t(20)).unwrap(), Ipv4Addr::new(10, 240, 0, 4));
        assert_eq!(
            a.quarantined().collect::<Vec<_>>(),
            vec![(Ipv4Addr::new(10, 240, 0, 1), t(70))]
        );
        // After the quarantine the lowest is reused.
        assert_eq!(a.allocate(t(70)).unwrap(), Ipv4Addr::new(10, 240, 0, 1));
        assert_eq!(a.quarantined().count(), 0);
    }

    #[test]
    fn full_counts_quarantine() {
        let mut a =
            Allocator::new("10.240.0.0/30".parse().unwrap(), Duration::from_secs(60)).unwrap();
        let x = a.allocate(t(0)).unwrap();
        a.allocate(t(0)).unwrap();
        a.release(x, t(0));
        let err = a.allocate(t(1)).unwrap_err();
        assert_eq!(
            err,
            IpamError::Full {
                range: "10.240.0.0/30".parse().unwrap(),
                used: 1,
                quarantined: 1
            }
        );
        assert!(err.to_string().contains("full"));
    }

    #[test]
    fn rebuild_from_store() {
        let mut a = Allocator::new(DEFAULT_RANGE, DEFAULT_QUARANTINE).unwrap();
        a.reserve(Ipv4Addr::new(10, 240, 0, 1)).unwrap();
        assert_eq!(
            a.reserve(Ipv4Addr::new(10, 240, 0, 1)),
            Err(IpamError::InUse(Ipv4Addr::new(10, 240, 0, 1)))
        );
        a.quarantine_until(Ipv4Addr::new(10, 240, 0, 2), t(100));
        assert_eq!(a.allocate(t(50)).unwrap(), Ipv4Addr::new(10, 240, 0, 3));
        a.expire(t(100));
        assert_eq!(a.quarantined().count(), 0);
        assert_eq!(a.used(), 2);
    }

    #[test]
    fn release_since_counts_from_when_the_address_went_unnamed() {
        let mut a =
            Allocator::new("10.240.0.0/29".parse().unwrap(), Duration::from_secs(60)).unwrap();
        let x = a.allocate(t(0)).unwrap();
        assert_eq!(a.release_since(x, t(10)), Some(t(70)));
        assert_eq!(a.release_since(x, t(10)), None, "not in use any more");
        assert_ne!(a.allocate(t(69)).unwrap(), x);
        let y = a.allocate(t(0)).unwrap();
        // Unnamed for longer than the quarantine: free at once.
        assert_eq!(a.release_since(y, t(0)), Some(t(60)));
        assert_eq!(a.allocate(t(100)).unwrap(), Ipv4Addr::new(10, 240, 0, 1));
    }

    #[test]
    fn pressure_takes_the_oldest_quarantined_address_past_the_ttl() {
        let mut a =
            Allocator::new("10.240.0.0/30".parse().unwrap(), Duration::from_secs(300)).unwrap();
        let x = a.allocate(t(0)).unwrap();
        let y = a.allocate(t(0)).unwrap();
        a.release(y, t(10));
        a.release(x, t(20));
        assert!(a.allocate(t(25)).is_err());
        let ttl = Duration::from_secs(30);
        // Neither was released 30 s ago yet.
        assert_eq!(a.allocate_under_pressure(t(39), ttl), None);
        // y was released first: it goes first, x stays quarantined.
        assert_eq!(a.allocate_under_pressure(t(40), ttl), Some(y));
        assert_eq!(a.allocate_under_pressure(t(40), ttl), None);
        assert_eq!(a.allocate_under_pressure(t(50), ttl), Some(x));
        assert_eq!(a.allocate_under_pressure(t(500), ttl), None, "all in use");
        assert_eq!(a.used(), 2);
    }

    #[test]
    fn bad_ranges() {
        assert!(matches!(
            Allocator::new("10.240.0.1/22".parse().unwrap(), DEFAULT_QUARANTINE),
            Err(IpamError::NotCanonical { .. })
        ));
        assert!(matches!(
            Allocator::new("10.240.0.0/31".parse().unwrap(), DEFAULT_QUARANTINE),
            Err(IpamError::RangeTooSmall(_))
        ));
    }
}
