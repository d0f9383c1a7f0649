//! Private DNS names and what they answer.
//!
//! Forms (DESIGN.md, "Names"):
//! - `<instance>.internal.` — one member (seeds 000/001);
//! - `<app-id>.<pn-id>.private-network.internal.` — every `web` member of the app;
//! - `<type>.<app-id>.<pn-id>.private-network.internal.` — every member of that type;
//! - `<n>.<type>.<app-id>.<pn-id>.private-network.internal.` — the n-th (1-based)
//!   member of that type (seed 003) in index order: in the online view of a
//!   map (what every name answers from, [`NetworkMap::online`]) that is the
//!   member of index n while the online members hold 1..N, and `1.web…`
//!   answers a live member whenever one exists, also while a lower index
//!   waits for an offline member to come back (the keyserver's numbering
//!   rule keeps the indexes of live members at 1..N otherwise);
//! - `<encoded-service>.warp.` and override hostnames — the service's address
//!   when the map has one (its VIP, balanced per flow by the data plane),
//!   else its primary members (seed 004).
//!
//! [`InternalName`] parses and prints the first four; [`InternalName::resolve`]
//! answers one against a [`NetworkMap`]. [`NameIndex`] precomputes every name
//! of a map (with human-readable aliases: the service's `.warp` label in place
//! of the app id, the network's name in place of its id) for O(1) lookups by
//! the DNS server. Names compare case-insensitively; the trailing dot is optional.
//!
//! The index also knows which names exist without an address of their own
//! (RFC 8020 "empty non-terminals"): the zone apexes ([`ZONES`]) and every
//! parent of a name, such as `<pn-id>.private-network.internal.` or
//! `web.<app-id>.<pn-id>.private-network.internal.` when only
//! `1.web.<app-id>...` holds addresses. The DNS answers those with NODATA,
//! never NXDOMAIN, so that resolvers do not cut off the names below them.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use crate::ids::{AppId, IdError, InstanceName, NetworkId, ProcessType};
use crate::ist::table::IstTable;
use crate::netmap::{Member, NetworkMap};

/// The zone of instance names.
pub const INTERNAL_ZONE: &str = "internal.";
/// The zone of seed-003 names.
pub const PRIVATE_NETWORK_ZONE: &str = "private-network.internal.";
/// The zone of IST hostnames.
pub const WARP_ZONE: &str = "warp.";

/// The zones the private DNS is authoritative for, most specific first (so
/// the first that contains a name is the one it belongs to).
pub const ZONES: [&str; 3] = [PRIVATE_NETWORK_ZONE, INTERNAL_ZONE, WARP_ZONE];

/// The apex of the zone of ours that holds `name` (normalized: lowercase,
/// trailing dot), if any.
pub fn zone_of(name: &str) -> Option<&'static str> {
    ZONES
        .into_iter()
        .find(|zone| name == *zone || name.ends_with(&format!(".{zone}")))
}

/// Why a name is not one of ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is not under `internal.`.
    #[error("{0:?} is not under .internal")]
    NotInternal(String),
    /// The name has the wrong number of labels for its zone.
    #[error("{0:?} does not have the form <instance>.internal or [<n>.][<type>.]<app-id>.<pn-id>.private-network.internal")]
    Shape(String),
    /// The index is not a positive integer.
    #[error("{0:?} is not a 1-based member number")]
    BadIndex(String),
    /// A label is not a valid id.
    #[error(transparent)]
    Id(#[from] IdError),
}

/// A seed-003 name: `[<n>.][<type>.]<app-id>.<pn-id>.private-network.internal.`
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PrivateNetworkName {
    /// The 1-based member number, if given. `<n>.<app-id>...` (no type) is
    /// read as `<n>.web.<app-id>...`, so a number always comes with a type.
    pub index: Option<u32>,
    /// The process type, if given (absent means `web`).
    pub process_type: Option<ProcessType>,
    /// The app id.
    pub app: AppId,
    /// The network id.
    pub network: NetworkId,
}

/// A name under `.internal`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum InternalName {
    /// `<instance>.internal.`
    Instance(InstanceName),
    /// A seed-003 `private-network.internal.` name.
    PrivateNetwork(PrivateNetworkName),
}

/// Lowercases and adds the trailing dot: the key form of every name.
pub fn normalize(name: &str) -> String {
    let mut out = name.to_ascii_lowercase();
    if !out.ends_with('.') {
        out.push('.');
    }
    out
}

impl FromStr for InternalName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        let name = normalize(s);
        if let Some(prefix) = name.strip_suffix(PRIVATE_NETWORK_ZONE) {
            let labels: Vec<&str> = prefix.trim_end_matches('.').split('.').collect();
            return parse_private(&labels, s).map(InternalName::PrivateNetwork);
        }
        let prefix = name
            .strip_suffix(INTERNAL_ZONE)
            .ok_or_else(|| NameError::NotInternal(s.to_owned()))?;
        let label = prefix
            .strip_suffix('.')
            .ok_or_else(|| NameError::Shape(s.to_owned()))?;
        if label.contains('.') {
            return Err(NameError::Shape(s.to_owned()));
        }
        Ok(InternalName::Instance(label.parse()?))
    }
}

fn parse_index(label: &str) -> Result<u32, NameError> {
    match label.parse::<u32>() {
        Ok(n) if n > 0 && label.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
        _ => Err(NameError::BadIndex(label.to_owned())),
    }
}

fn is_number(label: &str) -> bool {
    !label.is_empty() && label.bytes().all(|b| b.is_ascii_digit())
}

fn parse_private(labels: &[&str], original: &str) -> Result<PrivateNetworkName, NameError> {
    let (index, ptype, app, network) = match labels {
        [app, pn] => (None, None, app, pn),
        // An all-digit label before the app is a member number of `web`.
        [n, app, pn] if is_number(n) => {
            (Some(parse_index(n)?), Some(ProcessType::default()), app, pn)
        }
        [t, app, pn] => (None, Some(t.parse()?), app, pn),
        [n, t, app, pn] => (Some(parse_index(n)?), Some(t.parse()?), app, pn),
        _ => return Err(NameError::Shape(original.to_owned())),
    };
    Ok(PrivateNetworkName {
        index,
        process_type: ptype,
        app: app.parse()?,
        network: network.parse()?,
    })
}

impl fmt::Display for InternalName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InternalName::Instance(i) => write!(f, "{i}.{INTERNAL_ZONE}"),
            InternalName::PrivateNetwork(p) => {
                if let Some(n) = p.index {
                    write!(f, "{n}.")?;
                }
                if let Some(t) = &p.process_type {
                    write!(f, "{t}.")?;
                }
                write!(f, "{}.{}.{PRIVATE_NETWORK_ZONE}", p.app, p.network)
            }
        }
    }
}

/// The members a seed-003 name selects, ordered by index; `<n>.` picks the
/// n-th of them.
fn select<'a>(
    map: &'a NetworkMap,
    p: &PrivateNetworkName,
    app_matches: impl Fn(&Member) -> bool,
) -> Vec<&'a Member> {
    let web = ProcessType::default();
    let ptype = p.process_type.as_ref().unwrap_or(&web);
    let mut out: Vec<&Member> = map
        .members
        .values()
        .filter(|m| app_matches(m) && &m.process_type == ptype)
        .collect();
    out.sort_by_key(|m| (m.index, m.public_key));
    match p.index {
        None => out,
        Some(n) => out
            .get(n as usize - 1)
            .map(|m| vec![*m])
            .unwrap_or_default(),
    }
}

/// Each member's rank (1-based) among the members of its (app, type) in
/// index order: the `<n>` of its `<n>.<type>…` name.
fn ranks(map: &NetworkMap) -> HashMap<crate::keys::PublicKey, u32> {
    let mut by_type: HashMap<(&AppId, &ProcessType), Vec<&Member>> = HashMap::new();
    for m in map.members.values() {
        by_type
            .entry((&m.app_id, &m.process_type))
            .or_default()
            .push(m);
    }
    let mut out = HashMap::with_capacity(map.members.len());
    for members in by_type.values_mut() {
        members.sort_by_key(|m| (m.index, m.public_key));
        for (i, m) in members.iter().enumerate() {
            out.insert(m.public_key, u32::try_from(i + 1).unwrap_or(u32::MAX));
        }
    }
    out
}

impl InternalName {
    /// The addresses this name answers in `map`; empty when no member matches
    /// (NXDOMAIN), including a name of another network.
    pub fn resolve(&self, map: &NetworkMap) -> Vec<Ipv4Addr> {
        match self {
            InternalName::Instance(i) => map.by_instance(i).map(|m| m.ip).into_iter().collect(),
            InternalName::PrivateNetwork(p) if p.network == map.network => {
                select(map, p, |m| m.app_id == p.app)
                    .iter()
                    .map(|m| m.ip)
                    .collect()
            }
            InternalName::PrivateNetwork(_) => Vec::new(),
        }
    }
}

/// What a lookup in a [`NameIndex`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup<'a> {
    /// The name exists: its addresses.
    Found(&'a [Ipv4Addr]),
    /// The name exists but has no address of its own: a zone apex, or the
    /// parent of names that do (answer NODATA, RFC 8020).
    Empty,
    /// The name is in one of our zones (`.internal`, `.warp`) but does not
    /// exist: answer NXDOMAIN, do not forward.
    NxDomain,
    /// Not our name: forward it upstream.
    NotOurs,
}

/// Every name of one network map, precomputed for the DNS server and the
/// hosts file. Rebuilt on every map change (O(members)).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NameIndex {
    records: HashMap<String, Vec<Ipv4Addr>>,
    /// Names in our zones that exist only as parents of records.
    parents: HashSet<String>,
    /// The map generation the index was built from (the zones' SOA serial).
    generation: u64,
}

impl NameIndex {
    /// All names of `map`, plus the IST hostnames of `ist` (computed and
    /// overridden) pointing at each service's members.
    pub fn build(map: &NetworkMap, ist: &IstTable) -> Self {
        let mut index = NameIndex::default();
        let net_alias = crate::ist::hostname_label(&map.name).ok();
        let networks: Vec<String> = std::iter::once(map.network.to_string())
            .chain(net_alias.filter(|a| a.parse::<AppId>().is_ok()))
            .collect();
        let ranks = ranks(map);
        for m in map.members.values() {
            let rank = ranks.get(&m.public_key).copied().unwrap_or(m.index);
            index.add(format!("{}.{INTERNAL_ZONE}", m.instance), m.ip);
            let mut apps = vec![m.app_id.to_string()];
            if let Ok(alias) = crate::ist::hostname_label(&m.service) {
                if alias != apps[0] && alias.parse::<AppId>().is_ok() {
                    apps.push(alias);
                }
            }
            for app in &apps {
                for net in &networks {
                    index.add_member_names(m, rank, app, net);
                }
            }
        }
        for entry in &ist.entries {
            let ips = map.service_answer(&entry.service);
            for host in &entry.hostnames {
                for ip in &ips {
                    index.add(normalize(host), *ip);
                }
            }
        }
        for ips in index.records.values_mut() {
            ips.sort_unstable();
            ips.dedup();
        }
        index.parents = parents_of(index.records.keys());
        index.generation = map.generation;
        index
    }

    /// The generation of the network map this index was built from.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn add(&mut self, name: String, ip: Ipv4Addr) {
        self.records.entry(name).or_default().push(ip);
    }

    fn add_member_names(&mut self, m: &Member, rank: u32, app: &str, net: &str) {
        let base = format!("{app}.{net}.{PRIVATE_NETWORK_ZONE}");
        let t = &m.process_type;
        if t.is_web() {
            self.add(base.clone(), m.ip);
        }
        self.add(format!("{t}.{base}"), m.ip);
        self.add(format!("{rank}.{t}.{base}"), m.ip);
    }

    /// Looks a name up (any case, trailing dot optional).
    pub fn lookup(&self, name: &str) -> Lookup<'_> {
        let key = normalize(name);
        if let Some(ips) = self.records.get(&key) {
            return Lookup::Found(ips);
        }
        if ZONES.contains(&key.as_str()) || self.parents.contains(&key) {
            return Lookup::Empty;
        }
        if zone_of(&key).is_some() {
            Lookup::NxDomain
        } else {
            Lookup::NotOurs
        }
    }

    /// Every (name, addresses) pair, sorted by name.
    pub fn entries(&self) -> Vec<(&str, &[Ipv4Addr])> {
        let mut out: Vec<(&str, &[Ipv4Addr])> = self
            .records
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect();
        out.sort_unstable_by_key(|(k, _)| *k);
        out
    }
}

/// Every proper ancestor of `names` that lies inside one of our zones and is
/// not an apex itself (apexes always exist). Override hostnames outside our
/// zones (`mysql.local`) give none: `local.` is not ours to answer.
fn parents_of<'a>(names: impl Iterator<Item = &'a String>) -> HashSet<String> {
    let mut out = HashSet::new();
    for name in names {
        let mut rest = name.as_str();
        while let Some((_, parent)) = rest.split_once('.') {
            if parent.is_empty() || ZONES.contains(&parent) || zone_of(parent).is_none() {
                break;
            }
            out.insert(parent.to_owned());
            rest = parent;
        }
    }
    out
}

/// The members a service name points at: its `web` members, or every member
/// when it has none (a worker-only service still gets an address).
pub fn primary_members<'a>(map: &'a NetworkMap, service: &str) -> Vec<&'a Member> {
    let all = map.service_members(service);
    let web: Vec<&Member> = all
        .iter()
        .copied()
        .filter(|m| m.process_type.is_web())
        .collect();
    if web.is_empty() {
        all
    } else {
        web
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ist::config::{parse_toml, Overrides};
    use crate::netmap::tests::{empty_map, member};

    const PN: &str = "pn-ad0fd6a1-d05e-40ea-bf63-c4f8a75a9d8c";

    fn map() -> NetworkMap {
        let mut map = empty_map();
        for m in [
            member("api-1", "api", "web", 1, 1),
            member("api-2", "api", "web", 2, 2),
            member("api-w1", "api", "worker", 1, 3),
            member("db-1", "my db", "web", 1, 4),
        ] {
            map.members.insert(m.public_key, m);
        }
        map
    }

    fn ip(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 240, 0, n)
    }

    #[test]
    fn parse_and_print() {
        for (text, canon) in [
            ("api-1.internal", "api-1.internal."),
            ("API-1.Internal.", "api-1.internal."),
            (&format!("api.{PN}.private-network.internal."), ""),
            (&format!("worker.api.{PN}.private-network.internal."), ""),
            (&format!("1.web.api.{PN}.private-network.internal"), ""),
            (&format!("2.api.{PN}.private-network.internal"), "2.web.api"),
        ] {
            let name: InternalName = text.parse().unwrap();
            let printed = name.to_string();
            if canon.is_empty() {
                assert_eq!(printed, normalize(text));
            } else {
                assert!(printed.starts_with(canon), "{printed}");
            }
            assert_eq!(printed.parse::<InternalName>().unwrap(), name);
        }
        for bad in [
            "example.com",
            "internal",
            "a.b.internal",
            &format!("0.web.api.{PN}.private-network.internal"),
            &format!("x.1.web.api.{PN}.private-network.internal"),
            "api.pn-nope.private-network.internal",
            &format!("{PN}.private-network.internal"),
            "under_score.internal",
        ] {
            assert!(bad.parse::<InternalName>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn resolve_seed_003_names() {
        let map = map();
        let r = |s: &str| s.parse::<InternalName>().unwrap().resolve(&map);
        assert_eq!(r("api-2.internal"), [ip(2)]);
        assert_eq!(
            r(&format!("api.{PN}.private-network.internal")),
            [ip(1), ip(2)]
        );
        assert_eq!(
            r(&format!("web.api.{PN}.private-network.internal")),
            [ip(1), ip(2)]
        );
        assert_eq!(
            r(&format!("2.web.api.{PN}.private-network.internal")),
            [ip(2)]
        );
        assert_eq!(
            r(&format!("worker.api.{PN}.private-network.internal")),
            [ip(3)]
        );
        assert_eq!(
            r(&format!("1.worker.api.{PN}.private-network.internal")),
            [ip(3)]
        );
        assert!(r(&format!("3.web.api.{PN}.private-network.internal")).is_empty());
        assert!(r("nobody.internal").is_empty());
        // Another network's name answers nothing here.
        let other = "pn-00000000-0000-4000-8000-000000000000";
        assert!(r(&format!("api.{other}.private-network.internal")).is_empty());
    }

    /// `<n>.<type>…` is the n-th online member in index order: a gap left
    /// by an offline member moves the later ones up, so `1.web…` answers
    /// whenever a web member is online; index and rank agree without gaps.
    #[test]
    fn numbered_names_follow_the_online_members() {
        let mut map = empty_map();
        let mut web1 = member("api-web-1", "api", "web", 1, 1);
        web1.state = crate::netmap::MemberState::Offline;
        for m in [
            web1,
            member("api-web-2", "api", "web", 2, 2),
            member("api-web-3", "api", "web", 3, 3),
            member("api-worker-2", "api", "worker", 2, 4),
        ] {
            map.members.insert(m.public_key, m);
        }
        let online = map.online();
        let idx = NameIndex::build(
            &online,
            &IstTable::build(online.services(), &Overrides::default()),
        );
        let name = |n: u32, t: &str| format!("{n}.{t}.api.{PN}.private-network.internal");
        for (n, t, want) in [
            (1, "web", Some(ip(2))),
            (2, "web", Some(ip(3))),
            (3, "web", None),
            (1, "worker", Some(ip(4))),
            (2, "worker", None),
        ] {
            let got = name(n, t).parse::<InternalName>().unwrap().resolve(&online);
            assert_eq!(got, want.into_iter().collect::<Vec<_>>(), "{n}.{t}");
            match want {
                Some(a) => assert_eq!(idx.lookup(&name(n, t)), Lookup::Found(&[a])),
                None => assert_eq!(idx.lookup(&name(n, t)), Lookup::NxDomain),
            }
        }
        // The offline member's own name is gone; the others keep theirs.
        assert_eq!(idx.lookup("api-web-1.internal"), Lookup::NxDomain);
        assert_eq!(idx.lookup("api-web-2.internal"), Lookup::Found(&[ip(2)]));
    }

    #[test]
    fn index_matches_resolve_and_has_aliases() {
        let map = map();
        let idx = NameIndex::build(
            &map,
            &IstTable::build(map.services(), &Overrides::default()),
        );
        for name in [
            "api-1.internal.".to_string(),
            format!("api.{PN}.private-network.internal."),
            format!("worker.api.{PN}.private-network.internal."),
            format!("2.web.api.{PN}.private-network.internal."),
        ] {
            let want = name.parse::<InternalName>().unwrap().resolve(&map);
            assert_eq!(idx.lookup(&name), Lookup::Found(&want), "{name}");
        }
        // Aliases: service label for the app id (here equal), network name.
        assert_eq!(
            idx.lookup("1.worker.api.prod.private-network.internal"),
            Lookup::Found(&[ip(3)])
        );
        assert_eq!(
            idx.lookup("my-db.prod.private-network.internal"),
            Lookup::Found(&[ip(4)])
        );
        // IST hostnames point at the service's web members.
        assert_eq!(idx.lookup("API.warp"), Lookup::Found(&[ip(1), ip(2)]));
        assert_eq!(idx.lookup("my-db.warp."), Lookup::Found(&[ip(4)]));
        assert_eq!(idx.lookup("nope.warp"), Lookup::NxDomain);
        assert_eq!(idx.lookup("nope.internal"), Lookup::NxDomain);
        assert_eq!(idx.lookup("example.com"), Lookup::NotOurs);
    }

    #[test]
    fn apexes_and_parents_exist_without_addresses() {
        let map = map();
        let idx = NameIndex::build(
            &map,
            &IstTable::build(map.services(), &Overrides::default()),
        );
        for zone in ["internal", "WARP.", "private-network.internal."] {
            assert_eq!(idx.lookup(zone), Lookup::Empty, "{zone}");
        }
        // Parents of seed-003 names (by id and by alias) exist, empty.
        for parent in [
            format!("{PN}.private-network.internal"),
            "prod.private-network.internal.".to_string(),
        ] {
            assert_ne!(idx.lookup(&parent), Lookup::NxDomain, "{parent}");
        }
        assert_eq!(
            idx.lookup(&format!("{PN}.private-network.internal")),
            Lookup::Empty
        );
        // api has workers but no `worker` member numbered 2, and no such type.
        assert_eq!(
            idx.lookup(&format!("2.worker.api.{PN}.private-network.internal")),
            Lookup::NxDomain
        );
        assert_eq!(
            idx.lookup(&format!("cron.api.{PN}.private-network.internal")),
            Lookup::NxDomain
        );
        // A worker-only service: its app name exists only as a parent.
        let mut map = empty_map();
        let m = member("cron-1", "cron", "clock", 1, 9);
        map.members.insert(m.public_key, m);
        map.generation = 7;
        let idx = NameIndex::build(
            &map,
            &IstTable::build(map.services(), &Overrides::default()),
        );
        assert_eq!(
            idx.lookup(&format!("cron.{PN}.private-network.internal")),
            Lookup::Empty
        );
        assert_eq!(
            idx.lookup(&format!("clock.cron.{PN}.private-network.internal")),
            Lookup::Found(&[ip(9)])
        );
        assert_eq!(idx.generation(), 7);
        assert_eq!(
            zone_of("a.b.private-network.internal."),
            Some(PRIVATE_NETWORK_ZONE)
        );
        assert_eq!(zone_of("a.internal."), Some(INTERNAL_ZONE));
        assert_eq!(zone_of("xinternal."), None);
    }

    #[test]
    fn override_hostnames_outside_our_zones_claim_no_parent() {
        let map = map();
        let o = parse_toml(
            "[[ist]]\nservice = \"my db\"\nhostnames = [\"db.mysql.local\", \"a.b.warp\"]\n",
        )
        .unwrap();
        let idx = NameIndex::build(&map, &IstTable::build(map.services(), &o));
        assert_eq!(idx.lookup("mysql.local"), Lookup::NotOurs);
        assert_eq!(idx.lookup("local"), Lookup::NotOurs);
        assert_eq!(idx.lookup("b.warp"), Lookup::Empty);
    }

    #[test]
    fn override_hostnames_are_indexed() {
        let map = map();
        let o =
            parse_toml("[[ist]]\nservice = \"my db\"\nhostnames = [\"mysql.local\"]\n").unwrap();
        let idx = NameIndex::build(&map, &IstTable::build(map.services(), &o));
        assert_eq!(idx.lookup("mysql.local"), Lookup::Found(&[ip(4)]));
        assert_eq!(idx.lookup("my-db.warp"), Lookup::NxDomain);
    }

    #[test]
    fn worker_only_service_gets_addresses() {
        let mut map = empty_map();
        let m = member("cron-1", "cron", "clock", 1, 9);
        map.members.insert(m.public_key, m);
        assert_eq!(primary_members(&map, "cron").len(), 1);
    }
}
