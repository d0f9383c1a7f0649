//! Peer tables (pure): a longest-prefix-match table generic over what it
//! stores, and the three-way peer index (by public key, by receiver index, by
//! allowed IP) built on it. No sockets, no clock.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::keys::PublicKey;

/// One address family of an [`AllowedIps`] table: for each prefix length in
/// use, a hash map from the masked address to the value. A lookup probes the
/// lengths from the longest down, so a mesh whose routes are all `/32` costs
/// one hash probe.
#[derive(Debug, Clone)]
struct Family<T> {
    /// Prefix length → (masked address bits → value). Ordered so iteration
    /// from the back yields the longest prefixes first.
    by_len: BTreeMap<u8, HashMap<u128, T>>,
}

impl<T> Default for Family<T> {
    fn default() -> Self {
        Self {
            by_len: BTreeMap::new(),
        }
    }
}

/// Keeps the top `len` bits of a `bits`-wide address held in a `u128`.
fn mask(addr: u128, len: u8, bits: u8) -> u128 {
    if len == 0 {
        return 0;
    }
    let keep = u128::MAX << (128 - u32::from(len));
    (addr << (128 - u32::from(bits))) & keep
}

impl<T> Family<T> {
    fn insert(&mut self, addr: u128, len: u8, bits: u8, value: T) -> Option<T> {
        let key = mask(addr, len, bits);
        self.by_len.entry(len).or_default().insert(key, value)
    }

    fn remove(&mut self, addr: u128, len: u8, bits: u8) -> Option<T> {
        let key = mask(addr, len, bits);
        let map = self.by_len.get_mut(&len)?;
        let old = map.remove(&key);
        if map.is_empty() {
            self.by_len.remove(&len);
        }
        old
    }

    fn get(&self, addr: u128, bits: u8) -> Option<&T> {
        self.by_len
            .iter()
            .rev()
            .find_map(|(&len, map)| map.get(&mask(addr, len, bits)))
    }

    fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        for map in self.by_len.values_mut() {
            map.retain(|_, v| keep(v));
        }
        self.by_len.retain(|_, map| !map.is_empty());
    }
}

/// A longest-prefix-match table from IP networks to values of type `T`
/// (WireGuard's "allowed IPs" / cryptokey routing table).
#[derive(Debug, Clone)]
pub struct AllowedIps<T> {
    v4: Family<T>,
    v6: Family<T>,
}

impl<T> Default for AllowedIps<T> {
    fn default() -> Self {
        Self {
            v4: Family::default(),
            v6: Family::default(),
        }
    }
}

/// Splits an address into (bits as u128, width).
fn bits_of(addr: IpAddr) -> (u128, u8) {
    match addr {
        IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
        IpAddr::V6(a) => (u128::from(a), 128),
    }
}

impl<T> AllowedIps<T> {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    fn family(&mut self, addr: IpAddr) -> &mut Family<T> {
        match addr {
            IpAddr::V4(_) => &mut self.v4,
            IpAddr::V6(_) => &mut self.v6,
        }
    }

    /// Maps `net` (host bits ignored) to `value`; returns the value it replaces.
    pub fn insert(&mut self, net: IpNet, value: T) -> Option<T> {
        let (addr, bits) = bits_of(net.addr());
        self.family(net.addr())
            .insert(addr, net.prefix_len(), bits, value)
    }

    /// Removes exactly `net`; returns its value.
    pub fn remove(&mut self, net: IpNet) -> Option<T> {
        let (addr, bits) = bits_of(net.addr());
        self.family(net.addr()).remove(addr, net.prefix_len(), bits)
    }

    /// The value of the longest prefix containing `addr`.
    pub fn get(&self, addr: IpAddr) -> Option<&T> {
        let (bits, width) = bits_of(addr);
        match addr {
            IpAddr::V4(_) => self.v4.get(bits, width),
            IpAddr::V6(_) => self.v6.get(bits, width),
        }
    }

    /// Keeps only the entries whose value passes `keep`.
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        self.v4.retain(&mut keep);
        self.v6.retain(&mut keep);
    }

    /// Every entry as (network, value), IPv4 first, longest prefixes first.
    pub fn iter(&self) -> impl Iterator<Item = (IpNet, &T)> + '_ {
        let v4 = self.v4.by_len.iter().rev().flat_map(|(&len, map)| {
            map.iter().map(move |(&a, v)| {
                let addr = std::net::Ipv4Addr::from(((a >> 96) as u32).to_be_bytes());
                (IpNet::new_assert(addr.into(), len), v)
            })
        });
        let v6 = self.v6.by_len.iter().rev().flat_map(|(&len, map)| {
            map.iter().map(move |(&a, v)| {
                (
                    IpNet::new_assert(std::net::Ipv6Addr::from(a).into(), len),
                    v,
                )
            })
        });
        v4.chain(v6)
    }
}

/// The peers of one interface, indexed three ways, generic over the peer
/// record `T`: by public key (handshake initiations), by 24-bit receiver
/// index (every other message), and by allowed IP (outbound routing and the
/// inbound source check). Each peer's allowed IPs also keep the order they
/// were added in, which `wg show` lists (as wireguard-go keeps them).
#[derive(Debug)]
pub struct PeerTable<T> {
    by_index: HashMap<u32, Arc<T>>,
    by_key: HashMap<PublicKey, u32>,
    allowed: AllowedIps<(u32, Arc<T>)>,
    /// Each peer's allowed IPs in insertion order.
    order: HashMap<u32, Vec<IpNet>>,
}

impl<T> Default for PeerTable<T> {
    fn default() -> Self {
        Self {
            by_index: HashMap::new(),
            by_key: HashMap::new(),
            allowed: AllowedIps::new(),
            order: HashMap::new(),
        }
    }
}

impl<T> PeerTable<T> {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of peers.
    pub fn len(&self) -> usize {
        self.by_index.len()
    }

    /// True when there is no peer.
    pub fn is_empty(&self) -> bool {
        self.by_index.is_empty()
    }

    /// True when `index` is already taken.
    pub fn index_in_use(&self, index: u32) -> bool {
        self.by_index.contains_key(&index)
    }

    /// Adds a peer under `key` and `index` (both must be unused: the caller
    /// checks with [`Self::by_key`] and [`Self::index_in_use`]).
    pub fn insert(&mut self, key: PublicKey, index: u32, peer: Arc<T>) {
        self.by_key.insert(key, index);
        self.by_index.insert(index, peer);
        self.order.insert(index, Vec::new());
    }

    /// Removes the peer with `key`, and every allowed IP that routes to it.
    pub fn remove(&mut self, key: &PublicKey) -> Option<Arc<T>> {
        let index = self.by_key.remove(key)?;
        self.allowed.retain(|(i, _)| *i != index);
        self.order.remove(&index);
        self.by_index.remove(&index)
    }

    /// Removes everything.
    pub fn clear(&mut self) {
        *self = Self::default();
    }

    /// The peer with this public key, and its index.
    pub fn by_key(&self, key: &PublicKey) -> Option<(u32, &Arc<T>)> {
        let index = *self.by_key.get(key)?;
        self.by_index.get(&index).map(|p| (index, p))
    }

    /// The peer with this receiver index.
    pub fn by_index(&self, index: u32) -> Option<&Arc<T>> {
        self.by_index.get(&index)
    }

    /// The peer whose allowed IPs hold the longest prefix containing `addr`,
    /// and its index.
    pub fn by_ip(&self, addr: IpAddr) -> Option<(u32, &Arc<T>)> {
        self.allowed.get(addr).map(|(i, p)| (*i, p))
    }

    /// Routes `net` to the peer `index` (taking it from any other peer, as
    /// WireGuard does). Does nothing for an unknown index. A network the
    /// peer already has keeps its place in [`Self::allowed_of`]; a new one
    /// (or one taken from another peer) goes last.
    pub fn add_allowed(&mut self, index: u32, net: IpNet) {
        let Some(peer) = self.by_index.get(&index) else {
            return;
        };
        let net = net.trunc();
        match self.allowed.insert(net, (index, peer.clone())) {
            Some((old, _)) if old == index => return,
            Some((old, _)) => {
                if let Some(list) = self.order.get_mut(&old) {
                    list.retain(|n| *n != net);
                }
            }
            None => {}
        }
        self.order.entry(index).or_default().push(net);
    }

    /// Removes every allowed IP of peer `index`.
    pub fn clear_allowed(&mut self, index: u32) {
        self.allowed.retain(|(i, _)| *i != index);
        if let Some(list) = self.order.get_mut(&index) {
            list.clear();
        }
    }

    /// The allowed IPs of peer `index`, in the order they were added.
    pub fn allowed_of(&self, index: u32) -> Vec<IpNet> {
        self.order.get(&index).cloned().unwrap_or_default()
    }

    /// Every peer with its index, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &Arc<T>)> + '_ {
        self.by_index.iter().map(|(i, p)| (*i, p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins() {
        let mut t = AllowedIps::new();
        t.insert(net("10.240.0.0/22"), 'a');
        t.insert(net("10.240.1.0/24"), 'b');
        t.insert(net("10.240.1.7/32"), 'c');
        t.insert(net("0.0.0.0/0"), 'd');
        assert_eq!(t.get(ip("10.240.1.7")), Some(&'c'));
        assert_eq!(t.get(ip("10.240.1.8")), Some(&'b'));
        assert_eq!(t.get(ip("10.240.3.1")), Some(&'a'));
        assert_eq!(t.get(ip("192.0.2.1")), Some(&'d'));
        assert_eq!(t.get(ip("::1")), None);
        assert_eq!(t.remove(net("10.240.1.7/32")), Some('c'));
        assert_eq!(t.get(ip("10.240.1.7")), Some(&'b'));
    }

    #[test]
    fn host_bits_are_ignored_and_v6_works() {
        let mut t = AllowedIps::new();
        t.insert(net("fd00:1::5/64"), 1);
        t.insert(net("fd00:1::5/128"), 2);
        assert_eq!(t.get(ip("fd00:1::9")), Some(&1));
        assert_eq!(t.get(ip("fd00:1::5")), Some(&2));
        assert_eq!(t.get(ip("fd00:2::5")), None);
        let mut all: Vec<_> = t.iter().map(|(n, v)| (n.to_string(), *v)).collect();
        all.sort();
        assert_eq!(
            all,
            vec![("fd00:1::/64".into(), 1), ("fd00:1::5/128".into(), 2)]
        );
    }

    #[test]
    fn iter_renders_v4_networks() {
        let mut t = AllowedIps::new();
        t.insert(net("10.240.0.9/22"), ());
        t.insert(net("10.240.0.9/32"), ());
        let mut all: Vec<_> = t.iter().map(|(n, _)| n.to_string()).collect();
        all.sort();
        assert_eq!(all, vec!["10.240.0.0/22", "10.240.0.9/32"]);
    }

    #[test]
    fn peer_table_indexes_stay_consistent() {
        let k1 = PublicKey::from_bytes([1; 32]);
        let k2 = PublicKey::from_bytes([2; 32]);
        let mut t = PeerTable::new();
        t.insert(k1, 10, Arc::new("one"));
        t.insert(k2, 20, Arc::new("two"));
        t.add_allowed(10, net("10.240.0.1/32"));
        t.add_allowed(20, net("10.240.0.2/32"));
        t.add_allowed(20, net("10.240.0.1/32")); // moves to peer 20
        assert_eq!(t.by_ip(ip("10.240.0.1")).map(|(i, _)| i), Some(20));
        assert_eq!(t.allowed_of(10), Vec::<IpNet>::new());
        assert_eq!(t.by_key(&k1).map(|(i, p)| (i, **p)), Some((10, "one")));
        assert_eq!(t.remove(&k2).as_deref(), Some(&"two"));
        assert!(t.by_ip(ip("10.240.0.2")).is_none());
        assert!(t.by_index(20).is_none());
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn allowed_ips_keep_insertion_order() {
        let (k1, k2) = (
            PublicKey::from_bytes([1; 32]),
            PublicKey::from_bytes([2; 32]),
        );
        let mut t = PeerTable::new();
        t.insert(k1, 10, Arc::new(1));
        t.insert(k2, 20, Arc::new(2));
        // Deliberately not sorted by family, length or address.
        for n in [
            "10.240.3.0/24",
            "fd00:1::/64",
            "10.240.0.9/32",
            "10.240.0.0/23",
        ] {
            t.add_allowed(10, net(n));
        }
        t.add_allowed(10, net("10.240.3.7/24")); // same network: keeps its place
        let names = |t: &PeerTable<i32>, i| -> Vec<String> {
            t.allowed_of(i).iter().map(ToString::to_string).collect()
        };
        assert_eq!(
            names(&t, 10),
            [
                "10.240.3.0/24",
                "fd00:1::/64",
                "10.240.0.9/32",
                "10.240.0.0/23"
            ]
        );
        // Taken by another peer: gone here, last there.
        t.add_allowed(20, net("10.240.2.0/24"));
        t.add_allowed(20, net("fd00:1::/64"));
        assert_eq!(
            names(&t, 10),
            ["10.240.3.0/24", "10.240.0.9/32", "10.240.0.0/23"]
        );
        assert_eq!(names(&t, 20), ["10.240.2.0/24", "fd00:1::/64"]);
        t.clear_allowed(10);
        assert!(t.allowed_of(10).is_empty());
        assert!(t.by_ip(ip("10.240.3.1")).is_none());
        assert_eq!(t.remove(&k2).as_deref(), Some(&2));
        assert!(t.allowed_of(20).is_empty());
    }
}
