//! Traffic per service (issue 19, item 6), the keyserver's half (and the
//! CLI tables of service addresses and of the graph): the latest
//! traffic report of each member, in memory only (never stored: counters
//! are cumulative per member, so the next report brings everything back),
//! and the service graph of a network summed from them
//! (`GET /v1/networks/{net}/traffic`, `keyserver network traffic`).
//! Pure: no I/O, time is an argument.
//!
//! Bounds: at most [`MAX_PAIRS_KEPT`] pairs over all members (a report
//! that would pass it is dropped, after forgetting members that are gone);
//! a member's reports closer than [`MIN_REPORT_GAP`] are dropped. A report
//! out of shape ([`meshlib::traffic::TrafficReport::check`]) is dropped
//! whole; pairs naming a service that is not in the member's network are
//! dropped one by one. Each drop is counted ([`TrafficBook::dropped`]).
//!
//! Each replica sees the reports of the members connected to it: its graph
//! covers them (the stored `last_flow` of every service covers them all).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use meshlib::ids::NetworkId;
use meshlib::keys::PublicKey;
use meshlib::netmap::NetworkMap;
use meshlib::render::text::escape;
use meshlib::traffic::{GroupLoad, ReportError, TrafficCounters, TrafficReport};
use serde::{Deserialize, Serialize};

use crate::registry::AddressInfo;

/// Most pairs kept over all members' reports (about 100 bytes each).
pub const MAX_PAIRS_KEPT: usize = 65_536;

/// Shortest time between two reports of one member that are taken
/// (seconds); members send one every 10 s.
pub const MIN_REPORT_GAP: u64 = 2;

/// Why a report was dropped whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Dropped {
    /// Out of shape (too many pairs, a name twice or unusable).
    #[error("malformed: {0}")]
    Malformed(ReportError),
    /// Sooner than [`MIN_REPORT_GAP`] after the member's last one.
    #[error("sooner than {MIN_REPORT_GAP} s after the last report")]
    TooOften,
    /// Keeping it would pass [`MAX_PAIRS_KEPT`].
    #[error("the keyserver holds as many traffic pairs as it keeps")]
    Full,
}

impl Dropped {
    /// A metrics label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::TooOften => "too_often",
            Self::Full => "full",
        }
    }
}

/// What taking a report found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Taken {
    /// Destination services that had a flow since the member's previous
    /// report (or open flows now): they are not idle.
    pub flows: Vec<String>,
    /// Pairs dropped for naming a service not in the network.
    pub unknown: usize,
}

#[derive(Debug, Clone)]
struct Entry {
    /// The reporting member's service (the pairs' source).
    service: String,
    report: TrafficReport,
    /// When it arrived (Unix seconds).
    at: u64,
}

/// How one member reaches its peers, as it last reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemberPaths {
    /// The reporting member.
    pub member: PublicKey,
    /// When its report arrived (Unix seconds).
    pub at: u64,
    /// Its path to each peer.
    pub paths: Vec<meshlib::traffic::PeerPath>,
}

/// How one member reaches its peers, summed up from its last report
/// ([`MemberPaths`]): what `GET …/members` lists per member, and the
/// console and `keyserver member list` show (path, round trip).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathSummary {
    /// When its report arrived (Unix seconds).
    pub reported: u64,
    /// Peers reached on a direct path that answers probes.
    pub direct: usize,
    /// Peers reached through the relay.
    pub relay: usize,
    /// Peers with no working path (none chosen yet, or blind).
    pub none: usize,
    /// The median of the round trips measured to its peers,
    /// microseconds; `None` when none was measured.
    pub rtt_micros: Option<u32>,
}

impl PathSummary {
    /// The summary of `paths`, reported at `at` (Unix seconds).
    pub fn of(at: u64, paths: &[meshlib::traffic::PeerPath]) -> Self {
        let mut s = Self {
            reported: at,
            direct: 0,
            relay: 0,
            none: 0,
            rtt_micros: None,
        };
        let mut rtts: Vec<u32> = Vec::with_capacity(paths.len());
        for p in paths {
            match (p.working, p.relay) {
                (false, _) => s.none += 1,
                (true, true) => s.relay += 1,
                (true, false) => s.direct += 1,
            }
            rtts.extend(p.rtt_micros);
        }
        rtts.sort_unstable();
        s.rtt_micros = rtts.get(rtts.len() / 2).copied();
        s
    }

    /// The path column of the tables: `direct 3, relay 1, no path 1`
    /// (only the kinds present; `-` for none).
    pub fn path_text(&self) -> String {
        let parts: Vec<String> = [
            ("direct", self.direct),
            ("relay", self.relay),
            ("no path", self.none),
        ]
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
        if parts.is_empty() {
            "-".to_owned()
        } else {
            parts.join(", ")
        }
    }

    /// The round-trip column: `1.50 ms`, or `-`.
    pub fn rtt_text(&self) -> String {
        self.rtt_micros.map_or_else(
            || "-".to_owned(),
            |us| format!("{:.2} ms", f64::from(us) / 1000.0),
        )
    }
}

/// The latest report of every member, and the last flow seen per service.
#[derive(Debug, Default)]
pub struct TrafficBook {
    reports: HashMap<(NetworkId, PublicKey), Entry>,
    /// Pairs held in `reports`.
    pairs: usize,
    /// The last flow seen in a report here, per network and service.
    recent: HashMap<(NetworkId, String), u64>,
    /// Reports taken.
    pub taken: u64,
    /// Reports dropped, by reason; pairs dropped as unknown under
    /// `unknown_service`.
    pub dropped: BTreeMap<&'static str, u64>,
}

impl TrafficBook {
    /// Takes one member's report at `now`: checks it, drops pairs whose
    /// destination is not a service of the network (`known` says), keeps
    /// the rest in place of the member's previous report, and says which
    /// destinations had flows since.
    pub fn take(
        &mut self,
        id: (NetworkId, PublicKey),
        service: &str,
        mut report: TrafficReport,
        known: impl Fn(&str) -> bool,
        now: u64,
    ) -> Result<Taken, Dropped> {
        let result = self.take_inner(id, service, &mut report, known, now);
        match &result {
            Ok(t) => {
                self.taken += 1;
                if t.unknown > 0 {
                    *self.dropped.entry("unknown_service").or_insert(0) += t.unknown as u64;
                }
            }
            Err(d) => *self.dropped.entry(d.reason()).or_insert(0) += 1,
        }
        result
    }

    fn take_inner(
        &mut self,
        id: (NetworkId, PublicKey),
        service: &str,
        report: &mut TrafficReport,
        known: impl Fn(&str) -> bool,
        now: u64,
    ) -> Result<Taken, Dropped> {
        report.check().map_err(Dropped::Malformed)?;
        let before = self.reports.get(&id);
        if before.is_some_and(|e| now < e.at.saturating_add(MIN_REPORT_GAP)) {
            return Err(Dropped::TooOften);
        }
        let count = report.pairs.len();
        report.pairs.retain(|p| known(&p.destination));
        let unknown = count - report.pairs.len();
        let held = before.map_or(0, |e| e.report.pairs.len());
        if self.pairs - held + report.pairs.len() > MAX_PAIRS_KEPT {
            return Err(Dropped::Full);
        }
        let flows: Vec<String> = report
            .pairs
            .iter()
            .filter(|p| {
                let prev = before.and_then(|e| e.report.get(&p.destination));
                p.counters.shows_flow_since(prev)
            })
            .map(|p| p.destination.clone())
            .collect();
        for dest in &flows {
            self.recent.insert((id.0, dest.clone()), now);
        }
        self.pairs = self.pairs - held + report.pairs.len();
        self.reports.insert(
            id,
            Entry {
                service: service.to_owned(),
                report: std::mem::take(report),
                at: now,
            },
        );
        Ok(Taken { flows, unknown })
    }

    /// Forgets the reports of members for which `keep` is false (gone from
    /// the registry), and the flows seen for services of networks gone.
    pub fn retain(&mut self, keep: impl Fn(NetworkId, &PublicKey) -> bool) {
        self.reports.retain(|(n, k), _| keep(*n, k));
        self.pairs = self.reports.values().map(|e| e.report.pairs.len()).sum();
        let live: std::collections::HashSet<NetworkId> =
            self.reports.keys().map(|(n, _)| *n).collect();
        self.recent.retain(|(n, _), _| live.contains(n));
    }

    /// Members whose reports are held, and their pairs.
    pub fn size(&self) -> (usize, usize) {
        (self.reports.len(), self.pairs)
    }

    /// The last flow to `service` seen in a report here (Unix seconds).
    pub fn last_flow(&self, network: NetworkId, service: &str) -> Option<u64> {
        self.recent.get(&(network, service.to_owned())).copied()
    }

    /// The peer paths each member of `network` last reported
    /// ([`meshlib::traffic::TrafficReport::paths`]), with when (Unix
    /// seconds), by member.
    pub fn paths(&self, network: NetworkId) -> Vec<MemberPaths> {
        self.reports
            .iter()
            .filter(|((n, _), e)| *n == network && !e.report.paths.is_empty())
            .map(|((_, member), e)| MemberPaths {
                member: *member,
                at: e.at,
                paths: e.report.paths.clone(),
            })
            .collect()
    }

    /// The [`PathSummary`] of each member of `network` that reported
    /// paths, by member (what the member listing shows).
    pub fn path_summaries(&self, network: NetworkId) -> HashMap<PublicKey, PathSummary> {
        self.reports
            .iter()
            .filter(|((n, _), e)| *n == network && !e.report.paths.is_empty())
            .map(|((_, member), e)| (*member, PathSummary::of(e.at, &e.report.paths)))
            .collect()
    }

    /// The service-group loads the gateways of `network` last reported
    /// ([`meshlib::traffic::TrafficReport::groups`]), by group name: each
    /// reporting member with its load and when it reported (Unix seconds).
    pub fn group_loads(
        &self,
        network: NetworkId,
    ) -> HashMap<String, Vec<(PublicKey, GroupLoad, u64)>> {
        let mut out: HashMap<String, Vec<_>> = HashMap::new();
        for ((n, member), e) in &self.reports {
            if *n != network {
                continue;
            }
            for g in &e.report.groups {
                out.entry(g.group.clone())
                    .or_default()
                    .push((*member, g.clone(), e.at));
            }
        }
        out
    }

    /// The peer paths `member` of `network` last reported, if any.
    pub fn paths_of(&self, network: NetworkId, member: &PublicKey) -> Option<MemberPaths> {
        let e = self.reports.get(&(network, *member))?;
        (!e.report.paths.is_empty()).then(|| MemberPaths {
            member: *member,
            at: e.at,
            paths: e.report.paths.clone(),
        })
    }

    /// The service graph of `map`'s network: every service with its
    /// address, online instances and scale-to-zero state (`addresses`,
    /// from the registry), and the pairs reported, summed over members.
    pub fn graph(&self, map: &NetworkMap, addresses: &[AddressInfo]) -> TrafficGraph {
        let network = map.network;
        let by_service: HashMap<&str, &AddressInfo> = addresses
            .iter()
            .map(|a| (a.record.address.service.as_str(), a))
            .collect();
        let services: Vec<ServiceNode> = map
            .services()
            .into_iter()
            .map(|s| {
                let info = by_service.get(s);
                let stored = info.and_then(|a| a.record.last_flow);
                ServiceNode {
                    service: s.to_owned(),
                    address: map.addresses.get(s).map(|a| a.ip),
                    instances: map
                        .service_members(s)
                        .into_iter()
                        .filter(|m| m.is_online())
                        .map(|m| m.instance.to_string())
                        .collect(),
                    wakeable: info.is_some_and(|a| a.record.wake.is_some()),
                    waking: info.is_some_and(|a| a.waking),
                    idle: info.is_some_and(|a| a.idle),
                    idle_since: info.and_then(|a| a.record.idle_since),
                    last_flow: stored.max(self.last_flow(network, s)),
                }
            })
            .collect();
        let mut edges: BTreeMap<(String, String), TrafficEdge> = BTreeMap::new();
        let mut reporters = 0;
        for ((n, _), e) in &self.reports {
            if *n != network {
                continue;
            }
            reporters += 1;
            for p in &e.report.pairs {
                let edge = edges
                    .entry((e.service.clone(), p.destination.clone()))
                    .or_insert_with(|| TrafficEdge {
                        source: e.service.clone(),
                        destination: p.destination.clone(),
                        reporters: 0,
                        counters: TrafficCounters::default(),
                    });
                edge.reporters += 1;
                edge.counters.add(&p.counters);
            }
        }
        TrafficGraph {
            network,
            name: map.name.clone(),
            generation: map.generation,
            idle: services
                .iter()
                .filter(|s| s.idle)
                .map(|s| s.service.clone())
                .collect(),
            services,
            edges: edges.into_values().collect(),
            reporters,
        }
    }
}

/// A network's service graph (`GET /v1/networks/{net}/traffic`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficGraph {
    /// The network.
    pub network: NetworkId,
    /// Its name.
    pub name: String,
    /// The map generation the services were read at.
    pub generation: u64,
    /// Every service (members' and addresses'), by name.
    pub services: Vec<ServiceNode>,
    /// Every reported pair, by source then destination.
    pub edges: Vec<TrafficEdge>,
    /// The services idle now (no flow for their `idle-after`).
    pub idle: Vec<String>,
    /// Members whose reports are summed (those connected to this
    /// keyserver replica).
    pub reporters: usize,
}

/// A service in the graph.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceNode {
    /// Its name.
    pub service: String,
    /// Its service address, if it has one.
    pub address: Option<Ipv4Addr>,
    /// Its online instances (instance names).
    pub instances: Vec<String>,
    /// It has a wake hook.
    pub wakeable: bool,
    /// A wake is under way.
    pub waking: bool,
    /// No flow for its `idle-after`.
    pub idle: bool,
    /// Since when it is idle (Unix seconds).
    pub idle_since: Option<u64>,
    /// The last flow to it known here (Unix seconds).
    pub last_flow: Option<u64>,
}

/// One pair's counters summed over the members of the source service
/// that reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficEdge {
    /// The source service.
    pub source: String,
    /// The destination service.
    pub destination: String,
    /// Members whose reports are summed.
    pub reporters: usize,
    /// The sums.
    #[serde(flatten)]
    pub counters: TrafficCounters,
}

/// The graph as a terminal table (network text escaped).
pub fn render_traffic(g: &TrafficGraph) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "network {} ({}), generation {}, {} reporting members",
        escape(&g.name),
        g.network,
        g.generation,
        g.reporters
    );
    let _ = writeln!(
        out,
        "\n{:<24} {:<15} {:>6} {:<8} LAST FLOW",
        "SERVICE", "ADDRESS", "ONLINE", "STATE"
    );
    for s in &g.services {
        let state = match (s.idle, s.waking, s.wakeable) {
            (true, _, _) => "idle",
            (_, true, _) => "waking",
            (_, _, true) => "wakeable",
            _ => "-",
        };
        let _ = writeln!(
            out,
            "{:<24} {:<15} {:>6} {:<8} {}",
            escape(&s.service),
            s.address.map_or_else(|| "-".to_owned(), |a| a.to_string()),
            s.instances.len(),
            state,
            s.last_flow
                .map_or_else(|| "-".to_owned(), |t| t.to_string())
        );
    }
    let _ = writeln!(
        out,
        "\n{:<32} {:>8} {:>6} {:>7} {:>6} {:>12} {:>12} {:>10}",
        "SOURCE -> DESTINATION",
        "OPENED",
        "ACTIVE",
        "REFUSED",
        "HELD",
        "BYTES OUT",
        "BYTES IN",
        "CONNECT MS"
    );
    for e in &g.edges {
        let c = &e.counters;
        let avg = if c.connect_count > 0 {
            let ms = c.connect_micros as f64 / c.connect_count as f64 / 1e3;
            format!("{ms:.1}")
        } else {
            "-".into()
        };
        let _ = writeln!(
            out,
            "{:<32} {:>8} {:>6} {:>7} {:>6} {:>12} {:>12} {:>10}",
            format!("{} -> {}", escape(&e.source), escape(&e.destination)),
            c.opened,
            c.active,
            c.refused,
            c.held,
            c.bytes_sent,
            c.bytes_received,
            avg
        );
    }
    out
}

/// A network's service addresses as a terminal table (network text
/// escaped): address, online instances, wake and idle settings and state.
pub fn render_addresses(list: &[AddressInfo]) -> String {
    let mut out = format!(
        "{:<24} {:<15} {:>6} {:<9} {:>8} {:>10} {:<6} LAST FLOW\n",
        "SERVICE", "ADDRESS", "ONLINE", "WAKE", "TIMEOUT", "IDLE AFTER", "STATE"
    );
    for a in list {
        let r = &a.record;
        let hook = |h: &Option<meshlib::services::WakeHook>| match h {
            Some(meshlib::services::WakeHook::Command(_)) => "command",
            Some(meshlib::services::WakeHook::Url(_)) => "url",
            None => "-",
        };
        let state = match (a.idle, a.waking) {
            (true, _) => "idle",
            (_, true) => "waking",
            _ => "-",
        };
        let opt =
            |v: Option<u64>, unit: &str| v.map_or_else(|| "-".to_owned(), |v| format!("{v}{unit}"));
        let _ = writeln!(
            out,
            "{:<24} {:<15} {:>6} {:<9} {:>8} {:>10} {:<6} {}",
            escape(&r.address.service),
            r.address.ip,
            a.online,
            hook(&r.wake),
            opt(r.address.wake_timeout_secs.map(u64::from), "s"),
            opt(r.idle_after_secs.map(u64::from), "s"),
            state,
            opt(r.last_flow, "")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use meshlib::keys::PrivateKey;
    use meshlib::traffic::{PairTraffic, MAX_PAIRS};

    use super::*;

    fn report(pairs: &[(&str, u64)]) -> TrafficReport {
        TrafficReport {
            pairs: pairs
                .iter()
                .map(|(d, opened)| PairTraffic {
                    destination: (*d).into(),
                    counters: TrafficCounters {
                        opened: *opened,
                        bytes_sent: 10 * opened,
                        ..Default::default()
                    },
                })
                .collect(),
            ..Default::default()
        }
    }

    /// Reports replace each other per member; flows are seen against the
    /// member's previous report; unknown services, floods and malformed
    /// reports are dropped and counted; the graph sums members.
    #[test]
    fn keeps_the_latest_report_and_drops_bad_ones() {
        let net = NetworkId::random();
        let (a, b) = (
            PrivateKey::generate().public_key(),
            PrivateKey::generate().public_key(),
        );
        let known = |s: &str| s == "api" || s == "db";
        let mut book = TrafficBook::default();
        let t = book
            .take(
                (net, a),
                "web",
                report(&[("api", 2), ("nope", 1)]),
                known,
                100,
            )
            .unwrap();
        assert_eq!(t.flows, ["api"]);
        assert_eq!(t.unknown, 1);
        assert_eq!(
            book.take((net, a), "web", report(&[("api", 3)]), known, 101),
            Err(Dropped::TooOften)
        );
        let t = book
            .take(
                (net, a),
                "web",
                report(&[("api", 2), ("db", 0)]),
                known,
                110,
            )
            .unwrap();
        assert!(t.flows.is_empty(), "nothing new: {t:?}");
        book.take((net, b), "web", report(&[("api", 5)]), known, 110)
            .unwrap();
        let dup = report(&[("api", 1), ("api", 2)]);
        assert!(matches!(
            book.take((net, b), "web", dup, known, 200),
            Err(Dropped::Malformed(_))
        ));
        let huge = TrafficReport {
            pairs: (0..=MAX_PAIRS)
                .map(|i| report(&[(&format!("s{i}"), 1)]).pairs.remove(0))
                .collect(),
            ..Default::default()
        };
        assert!(matches!(
            book.take((net, b), "web", huge, known, 300),
            Err(Dropped::Malformed(_))
        ));
        assert_eq!(book.dropped["unknown_service"], 1);
        assert_eq!(book.dropped["malformed"], 2);
        assert_eq!(book.dropped["too_often"], 1);
        assert_eq!(book.size(), (2, 3));
        assert_eq!(book.last_flow(net, "api"), Some(110));
        let mut map = NetworkMap::new(net, "prod", meshlib::ipam::DEFAULT_RANGE);
        map.addresses.insert(
            "api".into(),
            meshlib::netmap::ServiceAddress {
                service: "api".into(),
                ip: "10.240.4.1".parse().unwrap(),
                wake_timeout_secs: None,
                ports: vec![],
            },
        );
        let g = book.graph(&map, &[]);
        assert_eq!(g.reporters, 2);
        let api = &g.edges[0];
        assert_eq!(
            (api.source.as_str(), api.destination.as_str()),
            ("web", "api")
        );
        assert_eq!((api.reporters, api.counters.opened), (2, 7));
        assert_eq!(api.counters.bytes_sent, 70);
        assert_eq!(g.services[0].last_flow, Some(110));
        assert!(render_traffic(&g).contains("web -> api"));
        // Members gone: their reports go too.
        book.retain(|_, k| *k == b);
        assert_eq!(book.size(), (1, 1));
    }
}
