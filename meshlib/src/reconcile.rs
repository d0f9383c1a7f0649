//! Reconcile by pure diff: the peers a member's engine should have, computed
//! from its network map, and the changes that take one desired set to the
//! next. The sidecar applies the changes to the engine; peers untouched by a
//! change keep their sessions and roamed endpoints.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use ipnet::{IpNet, Ipv4Net};

use crate::keys::PublicKey;
use crate::netmap::{Member, NetworkMap};

/// One peer as the map says it should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredPeer {
    /// The peer's public key.
    pub public_key: PublicKey,
    /// Where to reach it first (the engine roams from there).
    pub endpoint: Option<SocketAddr>,
    /// Exactly its private address (`/32`): nothing else is accepted from it.
    pub allowed_ips: Vec<IpNet>,
    /// Persistent keepalive, seconds (0: off).
    pub persistent_keepalive: u16,
    /// Every endpoint the member advertised (local, server-reflexive, its
    /// relay's address): the engine's path selection probes them
    /// ([`crate::nat::path`]); empty leaves the endpoint to roaming.
    pub candidates: Vec<SocketAddr>,
}

/// The desired peers, by key.
pub type DesiredPeers = BTreeMap<PublicKey, DesiredPeer>;

/// One change to apply to the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerDiff {
    /// Add the peer, or replace its endpoint/allowed IPs/keepalive.
    Upsert(DesiredPeer),
    /// Remove the peer: its packets are refused from now on.
    Remove(PublicKey),
}

/// Picks the endpoint to try first: the first one of the member's family
/// preference (IPv4 if `prefer_v4`), else the first one at all.
fn pick_endpoint(m: &Member, prefer_v4: bool) -> Option<SocketAddr> {
    m.endpoints
        .iter()
        .find(|e| e.is_ipv4() == prefer_v4)
        .or_else(|| m.endpoints.first())
        .copied()
}

/// The peer one member should be: allowed exactly its own address, reached
/// first at its preferred endpoint (`prefer_v4` picks the family of our own
/// socket).
pub fn desired_peer(m: &Member, keepalive: u16, prefer_v4: bool) -> DesiredPeer {
    DesiredPeer {
        public_key: m.public_key,
        endpoint: pick_endpoint(m, prefer_v4),
        allowed_ips: vec![IpNet::V4(Ipv4Net::from(m.ip))],
        persistent_keepalive: keepalive,
        candidates: m.endpoints.clone(),
    }
}

/// The peers of `own` key in `map`: every other member, allowed exactly its
/// own address. Pass the map's [`NetworkMap::online`] view: offline members
/// are no peers.
pub fn desired_peers(
    map: &NetworkMap,
    own: &PublicKey,
    keepalive: u16,
    prefer_v4: bool,
) -> DesiredPeers {
    map.members
        .values()
        .filter(|m| &m.public_key != own)
        .map(|m| (m.public_key, desired_peer(m, keepalive, prefer_v4)))
        .collect()
}

/// The changes from `old` to `new`: removals first (so an address that moved
/// between peers is never claimed twice), then additions and updates.
pub fn diff(old: &DesiredPeers, new: &DesiredPeers) -> Vec<PeerDiff> {
    let removed = old
        .keys()
        .filter(|k| !new.contains_key(k))
        .map(|k| PeerDiff::Remove(*k));
    let upserts = new
        .values()
        .filter(|p| old.get(&p.public_key) != Some(p))
        .map(|p| PeerDiff::Upsert(p.clone()));
    removed.chain(upserts).collect()
}

/// Whether `addr` is a host address of the map's range (for routing checks).
pub fn in_range(map: &NetworkMap, addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(v4) => map.range.contains(&v4),
        IpAddr::V6(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netmap::tests::{empty_map, member};

    #[test]
    fn desired_excludes_self_and_pins_allowed_ips() {
        let mut map = empty_map();
        let mut a = member("a", "api", "web", 1, 1);
        a.endpoints = vec![
            "[2001:db8::1]:51820".parse().unwrap(),
            "192.0.2.1:51820".parse().unwrap(),
        ];
        let b = member("b", "api", "web", 2, 2);
        for m in [a.clone(), b.clone()] {
            map.members.insert(m.public_key, m);
        }
        let d = desired_peers(&map, &b.public_key, 25, true);
        assert_eq!(d.len(), 1);
        let p = &d[&a.public_key];
        assert_eq!(p.endpoint, Some("192.0.2.1:51820".parse().unwrap()));
        assert_eq!(p.allowed_ips, ["10.240.0.1/32".parse::<IpNet>().unwrap()]);
        assert_eq!(p.persistent_keepalive, 25);
        let d6 = desired_peers(&map, &b.public_key, 0, false);
        assert_eq!(
            d6[&a.public_key].endpoint,
            Some("[2001:db8::1]:51820".parse().unwrap())
        );
        assert!(in_range(&map, "10.240.3.254".parse().unwrap()));
        assert!(!in_range(&map, "10.241.0.1".parse().unwrap()));
    }

    #[test]
    fn diff_is_minimal_and_removes_first() {
        let mut map = empty_map();
        let me = member("me", "x", "web", 1, 9);
        let a = member("a", "api", "web", 1, 1);
        let b = member("b", "api", "web", 2, 2);
        for m in [me.clone(), a.clone(), b.clone()] {
            map.members.insert(m.public_key, m);
        }
        let old = desired_peers(&map, &me.public_key, 0, true);
        assert!(diff(&old, &old).is_empty());
        // b leaves, c arrives, a moves.
        map.members.remove(&b.public_key);
        let c = member("c", "api", "web", 3, 3);
        map.members.insert(c.public_key, c.clone());
        map.members.get_mut(&a.public_key).unwrap().endpoints =
            vec!["198.51.100.7:5000".parse().unwrap()];
        let new = desired_peers(&map, &me.public_key, 0, true);
        let changes = diff(&old, &new);
        assert_eq!(changes.len(), 3);
        assert_eq!(changes[0], PeerDiff::Remove(b.public_key));
        let upserted: Vec<PublicKey> = changes[1..]
            .iter()
            .map(|c| match c {
                PeerDiff::Upsert(p) => p.public_key,
                PeerDiff::Remove(_) => panic!("removal after upserts"),
            })
            .collect();
        assert!(upserted.contains(&a.public_key) && upserted.contains(&c.public_key));
    }
}
