//! Seed 003's listing: every private name of a network with what it answers
//! now, as Scalingo's `private-networks-domain-names` lists them, and one
//! member with the names that answer it.
//!
//! The answers come from the code members' DNS servers run:
//! [`NameIndex::build`] over the map's online members, with the default IST
//! entries of every service (the keyserver sees no `warp.config.js`
//! overrides). So the listing cannot drift from what a member answers, even
//! when the naming rules change. The addresses are the members' private
//! addresses, what a kernel-mode member's DNS answers; a userspace-mode
//! sidecar answers loopback addresses standing for the same members
//! (`sidecar --userspace`), one per member, each its own.
//!
//! Pure: a [`NetworkMap`] in, plain data out; [`render_names`] and
//! [`render_member`] turn the API's answers into the CLI's tables, with every
//! character that could rewrite a terminal escaped.
//!
//! Layout: [`NameListing::of`] builds the listing, [`MemberView::of`] one
//! member's view, [`find_member`] finds a member by key or instance name.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::{Duration, UNIX_EPOCH};

use meshlib::ids::{InstanceName, NetworkId};
use meshlib::ist::config::Overrides;
use meshlib::ist::table::IstTable;
use meshlib::keys::PublicKey;
use meshlib::names::{NameIndex, INTERNAL_ZONE, PRIVATE_NETWORK_ZONE};
use meshlib::netmap::{MemberState, NetworkMap};
use meshlib::render::text::Escaped;
use serde::{Deserialize, Serialize};

use crate::registry::MemberInfo;
use crate::traffic::{MemberPaths, PathSummary};

/// Which form of private name an entry is (DESIGN.md, "Names").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NameKind {
    /// `<instance>.internal.`: one member.
    Instance,
    /// `<app>.<network>.private-network.internal.`: the app's `web` members.
    App,
    /// `<type>.<app>.<network>.private-network.internal.`: the app's members
    /// of that type.
    Type,
    /// `<n>.<type>.<app>.<network>.private-network.internal.`: the n-th
    /// member of that type.
    Numbered,
    /// `<encoded-service>.warp.` (seed 004): the service's members.
    Warp,
}

impl NameKind {
    /// The kind of `name` (normalized, as [`NameIndex::entries`] gives it),
    /// read from its shape: the index knows no other kind.
    fn of(name: &str) -> Self {
        if let Some(prefix) = name.strip_suffix(PRIVATE_NETWORK_ZONE) {
            return match prefix.trim_end_matches('.').split('.').count() {
                0..=2 => Self::App,
                3 => Self::Type,
                _ => Self::Numbered,
            };
        }
        match name.strip_suffix(INTERNAL_ZONE) {
            Some(label) if !label.trim_end_matches('.').contains('.') => Self::Instance,
            _ => Self::Warp,
        }
    }
}

/// One address a name answers, and the member that holds it (or the
/// service it belongs to, for a service address).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    /// The A record.
    pub ip: Ipv4Addr,
    /// The online member holding that address; `None` for a service
    /// address (balanced over the service's online instances).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<InstanceName>,
    /// For a service address: the service whose own address it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_address: Option<String>,
}

/// One private name and its current answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameEntry {
    /// The name, lowercase, with the trailing dot.
    pub name: String,
    /// Its form.
    pub kind: NameKind,
    /// True for the human aliases the sidecars also serve: a seed-003 name
    /// spelled with the service's `.warp` label in place of the app id, or
    /// the network's name in place of its id.
    pub alias: bool,
    /// For a `.warp` name: the service it names (as its members wrote it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Its A records, in the order the DNS gives them, each with its member.
    pub answers: Vec<Answer>,
}

/// Every private name of one network, at one map generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameListing {
    /// The network's id.
    pub network: NetworkId,
    /// The network's human name.
    pub name: String,
    /// The map generation the names were computed from.
    pub generation: u64,
    /// Every name that answers now: instance names, then seed-003 names (by
    /// id, then aliases), then `.warp` names.
    pub names: Vec<NameEntry>,
    /// Why a service has no `.warp` name: two services whose names encode
    /// to the same hostname or variable (the name is withheld from both),
    /// or a name that cannot be encoded. Empty when every service is named.
    #[serde(default)]
    pub warnings: Vec<String>,
}

impl NameListing {
    /// The names of `map`'s online members, as their DNS answers them.
    pub fn of(map: &NetworkMap) -> Self {
        let online = map.online();
        let ist = IstTable::build(online.services(), &Overrides::default());
        let index = NameIndex::build(&online, &ist);
        let holders: BTreeMap<Ipv4Addr, &InstanceName> = online
            .members
            .values()
            .map(|m| (m.ip, &m.instance))
            .collect();
        let services: BTreeMap<String, &str> = ist
            .entries
            .iter()
            .flat_map(|e| {
                e.hostnames
                    .iter()
                    .map(|h| (meshlib::names::normalize(h), e.service.as_str()))
            })
            .collect();
        let ids = Ids::of(&online);
        let mut names: Vec<NameEntry> = index
            .entries()
            .into_iter()
            .map(|(name, ips)| {
                let kind = NameKind::of(name);
                NameEntry {
                    name: name.to_owned(),
                    kind,
                    alias: ids.is_alias(name, kind),
                    service: services.get(name).map(|s| (*s).to_owned()),
                    answers: ips
                        .iter()
                        .filter_map(|ip| {
                            let instance = holders.get(ip).map(|i| (*i).clone());
                            let service_address = online.address_of(*ip).map(|a| a.service.clone());
                            (instance.is_some() || service_address.is_some()).then_some(Answer {
                                ip: *ip,
                                instance,
                                service_address,
                            })
                        })
                        .collect(),
                }
            })
            .collect();
        names.sort_by_cached_key(sort_key);
        let mut warnings: Vec<String> = ist.conflicts.iter().map(ToString::to_string).collect();
        warnings.extend(
            ist.invalid
                .iter()
                .map(|(s, e)| format!("service {s:?} has no IST names: {e}")),
        );
        Self {
            network: map.network,
            name: map.name.clone(),
            generation: map.generation,
            names,
            warnings,
        }
    }

    /// The entries that answer `ip` (one member's names).
    pub fn answering(&self, ip: Ipv4Addr) -> impl Iterator<Item = &NameEntry> {
        self.names
            .iter()
            .filter(move |e| e.answers.iter().any(|a| a.ip == ip))
    }
}

/// The ids a seed-003 name spelled without aliases uses.
struct Ids {
    network: String,
    apps: HashSet<String>,
}

impl Ids {
    fn of(map: &NetworkMap) -> Self {
        Self {
            network: map.network.to_string(),
            apps: map.members.values().map(|m| m.app_id.to_string()).collect(),
        }
    }

    /// Whether a seed-003 name uses a human label in place of the app id
    /// or the network id.
    fn is_alias(&self, name: &str, kind: NameKind) -> bool {
        if !matches!(kind, NameKind::App | NameKind::Type | NameKind::Numbered) {
            return false;
        }
        let prefix = name
            .strip_suffix(PRIVATE_NETWORK_ZONE)
            .unwrap_or(name)
            .trim_end_matches('.');
        let mut labels = prefix.rsplit('.');
        let network = labels.next().unwrap_or_default();
        let app = labels.next().unwrap_or_default();
        network != self.network || !self.apps.contains(app)
    }
}

/// Instance names first, then seed-003 names by id, then their aliases,
/// then `.warp` names; `<n>.` names in numeric order.
fn sort_key(e: &NameEntry) -> (u8, bool, String, u64) {
    let rank = match e.kind {
        NameKind::Instance => 0,
        NameKind::Warp => 2,
        _ => 1,
    };
    let (base, n) = match e.name.split_once('.') {
        Some((first, rest)) if e.kind == NameKind::Numbered => {
            (rest.to_owned(), first.parse().unwrap_or(u64::MAX))
        }
        _ => (e.name.clone(), 0),
    };
    (rank, e.alias, base, n)
}

/// One member as `GET …/members/{member}` shows it: everything the registry
/// keeps about it (its slot, state, address, endpoints, runner, ports,
/// times), plus the names that answer it now.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberView {
    /// The network's id.
    pub network: NetworkId,
    /// The map generation `names` were computed from.
    pub generation: u64,
    /// The member as the registry keeps it (the fields of `member list`).
    #[serde(flatten)]
    pub info: MemberInfo,
    /// Every private name that answers this member now (empty while it is
    /// offline: offline members are not named).
    pub names: Vec<NameEntry>,
    /// The names that answer it, aliases left out, as `member list` has
    /// them ([`MemberRow::dns_names`]).
    #[serde(default)]
    pub dns_names: Vec<String>,
    /// How it reaches its peers, as it last reported (as `member list`
    /// has it); absent when it reported no path (to this replica).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathSummary>,
    /// Its path to each peer, as it last reported it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peer_paths: Vec<PeerPathView>,
}

/// The path to one peer, as a member reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerPathView {
    /// The peer's public key.
    pub peer: PublicKey,
    /// The peer's instance name, when it is still a member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<InstanceName>,
    /// Through the relay.
    pub relay: bool,
    /// Whether a path answered probes.
    pub working: bool,
    /// The path's last measured round trip, microseconds.
    pub rtt_micros: Option<u32>,
}

impl MemberView {
    /// `info`'s view in `map` (the map it was read with), with the paths
    /// it reported.
    pub fn of(map: &NetworkMap, info: MemberInfo, paths: Option<&MemberPaths>) -> Self {
        let names = if info.member.is_online() {
            NameListing::of(map)
                .answering(info.member.ip)
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        let dns_names = if info.member.is_online() {
            names_by_address(map)
                .remove(&info.member.ip)
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let peer_paths = paths.map_or_else(Vec::new, |p| {
            p.paths
                .iter()
                .map(|pp| PeerPathView {
                    peer: pp.peer,
                    instance: map.members.get(&pp.peer).map(|m| m.instance.clone()),
                    relay: pp.relay,
                    working: pp.working,
                    rtt_micros: pp.rtt_micros,
                })
                .collect()
        });
        Self {
            network: map.network,
            generation: map.generation,
            info,
            names,
            dns_names,
            path: paths.map(|p| PathSummary::of(p.at, &p.paths)),
            peer_paths,
        }
    }
}

/// One member as `GET …/members` lists it: the registry's fields, the
/// names that answer it now, and the summary of the paths it reported.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberRow {
    /// The member as the registry keeps it.
    #[serde(flatten)]
    pub info: MemberInfo,
    /// The names that answer it now, aliases left out (instance name,
    /// seed-003 names by id, `.warp` names); empty while it is offline.
    /// `GET …/members/{member}` has every one with its answers.
    #[serde(default)]
    pub dns_names: Vec<String>,
    /// How it reaches its peers, as it last reported; absent when it
    /// reported no path (to this keyserver replica).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathSummary>,
}

impl MemberRow {
    /// The rows of `members` (read together with `map`), with their names
    /// from `map` and the path summaries reported (`paths`, by key). One
    /// pass over the network's names: O(names + answers), not per member.
    pub fn list(
        map: &NetworkMap,
        members: Vec<MemberInfo>,
        mut paths: HashMap<PublicKey, PathSummary>,
    ) -> Vec<Self> {
        let mut names = names_by_address(map);
        members
            .into_iter()
            .map(|info| {
                let own = if info.member.is_online() {
                    names.remove(&info.member.ip).unwrap_or_default()
                } else {
                    Vec::new()
                };
                Self {
                    path: paths.remove(&info.member.public_key),
                    dns_names: own,
                    info,
                }
            })
            .collect()
    }
}

/// The names (aliases left out) that answer each online member's address,
/// in the listing's order.
fn names_by_address(map: &NetworkMap) -> HashMap<Ipv4Addr, Vec<String>> {
    let online = map.online();
    let ist = IstTable::build(online.services(), &Overrides::default());
    let index = NameIndex::build(&online, &ist);
    let ids = Ids::of(&online);
    let mut out: HashMap<Ipv4Addr, Vec<(u8, &str)>> = HashMap::new();
    for (name, ips) in index.entries() {
        let kind = NameKind::of(name);
        if ids.is_alias(name, kind) {
            continue;
        }
        let rank = match kind {
            NameKind::Instance => 0,
            NameKind::Warp => 2,
            _ => 1,
        };
        for ip in ips {
            out.entry(*ip).or_default().push((rank, name));
        }
    }
    out.into_iter()
        .map(|(ip, mut list)| {
            list.sort_unstable();
            (ip, list.into_iter().map(|(_, n)| n.to_owned()).collect())
        })
        .collect()
}

/// The member `key_or_instance` names (a public key, or an instance name)
/// among `members` (one network's).
pub fn find_member(members: Vec<MemberInfo>, key_or_instance: &str) -> Option<MemberInfo> {
    if let Ok(key) = key_or_instance.parse::<PublicKey>() {
        return members.into_iter().find(|m| m.member.public_key == key);
    }
    let instance: InstanceName = key_or_instance.parse().ok()?;
    members.into_iter().find(|m| m.member.instance == instance)
}

/// `text`, escaped for a terminal ([`Escaped`]).
fn safe(text: &str) -> String {
    Escaped(text).to_string()
}

/// The listing as the CLI prints it: a header, then one line per answer
/// (`NAME  ADDRESS  INSTANCE`), the name on its first line only, then the
/// warnings. Every text from the network is escaped.
pub fn render_names(listing: &NameListing) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "network {} ({}), map generation {}: {} names",
        safe(&listing.name),
        listing.network,
        listing.generation,
        listing.names.len()
    );
    let shown: Vec<(String, &NameEntry)> =
        listing.names.iter().map(|e| (safe(&e.name), e)).collect();
    let width = shown
        .iter()
        .map(|(n, _)| n.chars().count())
        .chain([4])
        .max()
        .unwrap_or(4);
    let _ = writeln!(out, "{:width$}  {:15}  INSTANCE", "NAME", "ADDRESS");
    for (name, e) in &shown {
        let mut label = name.as_str();
        for a in &e.answers {
            let note = match (&e.service, e.alias) {
                (Some(s), _) => format!("  (service {})", safe(s)),
                (None, true) => "  (alias)".to_owned(),
                (None, false) => String::new(),
            };
            let holder = match (&a.instance, &a.service_address) {
                (Some(i), _) => safe(i.as_str()),
                (None, Some(_)) => "(service address)".to_owned(),
                (None, None) => "-".to_owned(),
            };
            let _ = writeln!(
                out,
                "{label:width$}  {:15}  {holder}{note}",
                a.ip.to_string(),
            );
            label = "";
        }
    }
    for w in &listing.warnings {
        let _ = writeln!(out, "warning: {}", safe(w));
    }
    out
}

/// Columns padded to their widest cell (two spaces apart), the header
/// first; the last column is not padded.
fn table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: [&str; N]| {
        let mut text = String::new();
        for (cell, w) in cells.iter().zip(widths) {
            text.push_str(cell);
            text.push_str(&" ".repeat(w.saturating_sub(cell.chars().count()) + 2));
        }
        let _ = writeln!(out, "{}", text.trim_end());
    };
    line(*header);
    for row in rows {
        line(row.each_ref().map(String::as_str));
    }
    out
}

/// The audit trail as `keyserver audit` prints it: one line per entry,
/// oldest first (time in UTC, token id and name, role, client, method and
/// path, network, target, status). Every text is escaped.
pub fn render_audit(entries: &[crate::auth::AuditRecord]) -> String {
    let header = [
        "TIME", "TOKEN", "ROLE", "CLIENT", "REQUEST", "NETWORK", "TARGET", "STATUS",
    ];
    let rows: Vec<[String; 8]> = entries
        .iter()
        .map(|e| {
            let secs = e.time_ms / 1000;
            let time = rfc3339(secs);
            [
                time,
                safe(&format!("{} ({})", e.token, e.token_name)),
                e.role.to_string(),
                safe(e.client.as_deref().unwrap_or("-")),
                safe(&format!("{} {}", e.method, e.path)),
                safe(e.network_name.as_deref().unwrap_or("-")),
                safe(e.target.as_deref().unwrap_or("-")),
                e.status.to_string(),
            ]
        })
        .collect();
    let mut out = table(&header, &rows);
    if rows.is_empty() {
        let _ = writeln!(out, "(no entries)");
    }
    out
}

/// How long ago `then` was, from `now` (Unix seconds): `5s ago`, `3m ago`,
/// `2h ago`, `4d ago`; `-` for never (0).
fn ago(then: u64, now: u64) -> String {
    if then == 0 {
        return "-".into();
    }
    let d = now.saturating_sub(then);
    match d {
        0..=59 => format!("{d}s ago"),
        60..=3599 => format!("{}m ago", d / 60),
        3600..=86_399 => format!("{}h ago", d / 3600),
        _ => format!("{}d ago", d / 86_400),
    }
}

/// `GET …/members` as the CLI prints it by default (as `wg show` does for
/// peers), the facts the web console shows: one line per member with its
/// instance name, address, state, last contact (relative to `now`, Unix
/// seconds), path to its peers and median round trip (as it reported
/// them), endpoints (the first, and how many more), service, process type
/// and index, how many names answer it, and runner. Every text from the
/// network is escaped.
pub fn render_members(members: &[MemberRow], now: u64) -> String {
    let header = [
        "INSTANCE",
        "ADDRESS",
        "STATE",
        "LAST SEEN",
        "PATH",
        "RTT",
        "ENDPOINT",
        "SERVICE",
        "TYPE",
        "NAMES",
        "RUNNER",
    ];
    let rows: Vec<[String; 11]> = members
        .iter()
        .map(|row| {
            let m = &row.info;
            let (path, rtt) = row.path.as_ref().map_or_else(
                || ("-".to_owned(), "-".to_owned()),
                |p| (p.path_text(), p.rtt_text()),
            );
            let endpoint = match m.member.endpoints.as_slice() {
                [] => "-".to_owned(),
                [one] => one.to_string(),
                [first, rest @ ..] => format!("{first} (+{})", rest.len()),
            };
            let state = match (m.member.state, m.ephemeral) {
                (MemberState::Online, false) => "online",
                (MemberState::Online, true) => "online, ephemeral",
                (MemberState::Offline, false) => "offline",
                (MemberState::Offline, true) => "offline, ephemeral",
            };
            [
                safe(m.member.instance.as_str()),
                m.member.ip.to_string(),
                state.to_owned(),
                ago(m.last_seen, now),
                path,
                rtt,
                endpoint,
                safe(&m.member.service),
                format!(
                    "{} #{}",
                    safe(m.member.process_type.as_str()),
                    m.member.index
                ),
                row.dns_names.len().to_string(),
                safe(&m.member.runner),
            ]
        })
        .collect();
    let mut out = table(&header, &rows);
    if rows.is_empty() {
        let _ = writeln!(out, "(no members)");
    }
    out
}

/// Fields `render_member` prints first, in this order; any other field the
/// API adds follows, sorted, so the table never hides one.
const MEMBER_FIELDS: [&str; 15] = [
    "instance",
    "public_key",
    "service",
    "app_id",
    "process_type",
    "index",
    "state",
    "offline_since",
    "ephemeral",
    "last_seen",
    "ip",
    "endpoints",
    "runner",
    "ports",
    "joined",
];

/// Fields holding Unix seconds, printed as RFC 3339 UTC.
const TIME_FIELDS: [&str; 3] = ["joined", "last_seen", "offline_since"];

/// The first second of year 10000: humantime cannot print it (its
/// `Display` fails, and `to_string` would panic), so such a time is shown
/// as its number.
const LAST_RFC3339_SECOND: u64 = 253_402_300_800;

/// `secs` (Unix seconds) as an RFC 3339 time in UTC; the number itself
/// past the year 9999.
fn rfc3339(secs: u64) -> String {
    if secs < LAST_RFC3339_SECOND {
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
    } else {
        secs.to_string()
    }
}

/// `GET …/members/{member}`'s answer as the CLI prints it: one `field:
/// value` line per field of the member, then its names. Works on the JSON
/// value so fields the keyserver adds later are printed too.
pub fn render_member(view: &serde_json::Value) -> String {
    let Some(obj) = view.as_object() else {
        return format!("{}\n", safe(&view.to_string()));
    };
    let mut keys: Vec<&str> = MEMBER_FIELDS
        .iter()
        .copied()
        .filter(|k| obj.contains_key(*k))
        .collect();
    let mut rest: Vec<&str> = obj
        .keys()
        .map(String::as_str)
        .filter(|k| {
            !MEMBER_FIELDS.contains(k)
                && !matches!(
                    *k,
                    "names" | "network" | "generation" | "dns_names" | "path" | "peer_paths"
                )
        })
        .collect();
    rest.sort_unstable();
    keys.extend(rest);
    let width = keys.iter().map(|k| k.len()).max().unwrap_or(0).max(5);
    let mut out = String::new();
    for key in keys {
        let value = field_text(key, &obj[key]);
        let _ = writeln!(out, "{key:width$}  {}", safe(&value));
    }
    let names: Vec<NameEntry> = obj
        .get("names")
        .and_then(|n| serde_json::from_value(n.clone()).ok())
        .unwrap_or_default();
    let generation = obj
        .get("generation")
        .map_or_else(String::new, |g| g.to_string());
    if names.is_empty() {
        let _ = writeln!(
            out,
            "{:width$}  (none: offline members are not named)",
            "names"
        );
    }
    let mut label = "names";
    for e in &names {
        let others = e.answers.len().saturating_sub(1);
        let note = match others {
            0 => String::new(),
            1 => "  (and 1 other member)".to_owned(),
            n => format!("  (and {n} other members)"),
        };
        let _ = writeln!(out, "{label:width$}  {}{note}", safe(&e.name));
        label = "";
    }
    let path: Option<PathSummary> = obj
        .get("path")
        .and_then(|p| serde_json::from_value(p.clone()).ok());
    let peers: Vec<PeerPathView> = obj
        .get("peer_paths")
        .and_then(|p| serde_json::from_value(p.clone()).ok())
        .unwrap_or_default();
    match path {
        None => {
            let _ = writeln!(out, "{:width$}  (none reported)", "path");
        }
        Some(s) => {
            let _ = writeln!(
                out,
                "{:width$}  {}, median round trip {} (reported {})",
                "path",
                s.path_text(),
                s.rtt_text(),
                rfc3339(s.reported)
            );
            for peer in &peers {
                let who = peer
                    .instance
                    .as_ref()
                    .map_or_else(|| peer.peer.to_string(), |i| safe(i.as_str()));
                let kind = match (peer.working, peer.relay) {
                    (false, _) => "no path",
                    (true, true) => "relay",
                    (true, false) => "direct",
                };
                let rtt = PathSummary {
                    rtt_micros: peer.rtt_micros,
                    ..s.clone()
                }
                .rtt_text();
                let _ = writeln!(out, "{:width$}  {who}: {kind} {rtt}", "");
            }
        }
    }
    if !generation.is_empty() {
        let _ = writeln!(out, "(map generation {generation})");
    }
    out
}

/// One field's value as text: times as RFC 3339, lists joined by `, `,
/// `null` as `-`.
fn field_text(key: &str, value: &serde_json::Value) -> String {
    use serde_json::Value;
    match value {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        Value::Number(n) if TIME_FIELDS.contains(&key) => n
            .as_u64()
            .filter(|s| *s < LAST_RFC3339_SECOND)
            .map(|s| humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(s)))
            .map_or_else(|| n.to_string(), |t| t.to_string()),
        Value::Array(items) if items.is_empty() => "-".to_owned(),
        Value::Array(items) => items
            .iter()
            .map(|v| field_text("", v))
            .collect::<Vec<_>>()
            .join(", "),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshlib::keys::PrivateKey;
    use meshlib::names::Lookup;
    use meshlib::netmap::{Member, MemberState};
    use meshlib::traffic::PeerPath;
    use serde_json::json;

    const PN: &str = "pn-ad0fd6a1-d05e-40ea-bf63-c4f8a75a9d8c";
    /// The last octets of `api`'s online web members.
    const WEBS: [u8; 10] = [1, 2, 4, 5, 6, 7, 8, 9, 10, 11];

    fn member(inst: &str, service: &str, app: &str, ptype: &str, index: u32, n: u8) -> Member {
        Member {
            public_key: PrivateKey::generate().public_key(),
            ip: Ipv4Addr::new(10, 240, 0, n),
            endpoints: vec![],
            service: service.to_owned(),
            app_id: app.parse().unwrap(),
            process_type: ptype.parse().unwrap(),
            index,
            instance: inst.parse().unwrap(),
            runner: "r1".to_owned(),
            ports: vec![],
            state: MemberState::Online,
        }
    }

    /// `api` (app `ap-1`): web 1, 2 and 4..=11 online (10.240.0.<index>),
    /// web 3 offline, worker 1 (.20); `my db` (app `my-db`): web 1 (.21).
    fn map() -> NetworkMap {
        let mut map = NetworkMap::new(
            PN.parse().unwrap(),
            "prod",
            "10.240.0.0/22".parse().unwrap(),
        );
        map.generation = 9;
        let mut offline = member("api-web-3", "api", "ap-1", "web", 3, 3);
        offline.state = MemberState::Offline;
        let webs = WEBS.map(|n| member(&format!("api-web-{n}"), "api", "ap-1", "web", n.into(), n));
        for m in webs.into_iter().chain([
            offline,
            member("api-worker-1", "api", "ap-1", "worker", 1, 20),
            member("db-1", "my db", "my-db", "web", 1, 21),
        ]) {
            map.members.insert(m.public_key, m);
        }
        map
    }

    fn entry<'a>(l: &'a NameListing, name: &str) -> &'a NameEntry {
        l.names
            .iter()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("{name} not listed"))
    }

    fn ips(e: &NameEntry) -> Vec<u8> {
        e.answers.iter().map(|a| a.ip.octets()[3]).collect()
    }

    #[test]
    fn every_name_answers_what_the_dns_answers() {
        let map = map();
        let l = NameListing::of(&map);
        assert_eq!((l.generation, l.network.to_string()), (9, PN.to_owned()));
        let online = map.online();
        let index = NameIndex::build(
            &online,
            &IstTable::build(online.services(), &Overrides::default()),
        );
        assert_eq!(l.names.len(), index.entries().len());
        for e in &l.names {
            let want: Vec<Ipv4Addr> = e.answers.iter().map(|a| a.ip).collect();
            assert_eq!(index.lookup(&e.name), Lookup::Found(&want), "{}", e.name);
            for a in &e.answers {
                let i = a.instance.as_ref().unwrap();
                assert_eq!(online.by_instance(i).unwrap().ip, a.ip);
            }
        }
    }

    /// A service with its own address: its `.warp` name answers that
    /// address, listed as the service's, not a member's; the seed-003 and
    /// instance names keep answering members.
    #[test]
    fn service_addresses_are_listed_as_such() {
        let mut map = map();
        let vip = Ipv4Addr::new(10, 240, 4, 1);
        map.addresses.insert(
            "api".into(),
            meshlib::netmap::ServiceAddress {
                service: "api".into(),
                ip: vip,
                wake_timeout_secs: None,
                ports: vec![],
            },
        );
        let l = NameListing::of(&map);
        let warp = entry(&l, "api.warp.");
        assert_eq!(
            warp.answers,
            [Answer {
                ip: vip,
                instance: None,
                service_address: Some("api".into()),
            }]
        );
        let web1 = entry(&l, "api-web-1.internal.");
        assert_eq!(
            web1.answers[0].instance.as_ref().unwrap().as_str(),
            "api-web-1"
        );
        assert!(render_names(&l).contains("(service address)"));
    }

    #[test]
    fn kinds_aliases_services_and_order() {
        let l = NameListing::of(&map());
        let seed = |p: &str| format!("{p}{PN}.private-network.internal.");
        let e = entry(&l, "api-web-1.internal.");
        assert_eq!(
            (e.kind, e.alias, ips(e)),
            (NameKind::Instance, false, vec![1])
        );
        let e = entry(&l, &seed("ap-1."));
        assert_eq!(
            (e.kind, e.alias, ips(e)),
            (NameKind::App, false, WEBS.to_vec())
        );
        let e = entry(&l, &seed("worker.ap-1."));
        assert_eq!((e.kind, ips(e)), (NameKind::Type, vec![20]));
        let e = entry(&l, &seed("2.web.ap-1."));
        assert_eq!((e.kind, ips(e)), (NameKind::Numbered, vec![2]));
        // `<n>.` is whatever the DNS index says (the n-th online member):
        // never computed here.
        assert_eq!(ips(entry(&l, &seed("10.web.ap-1."))), [11]);
        // Aliases: the service's label for the app id, the network's name.
        let e = entry(&l, "1.worker.api.prod.private-network.internal.");
        assert_eq!(
            (e.kind, e.alias, ips(e)),
            (NameKind::Numbered, true, vec![20])
        );
        assert!(entry(&l, &seed("api.")).alias);
        assert!(entry(&l, "my-db.prod.private-network.internal.").alias);
        let e = entry(&l, "my-db.warp.");
        assert_eq!(
            (e.kind, e.service.as_deref(), ips(e)),
            (NameKind::Warp, Some("my db"), vec![21])
        );
        assert_eq!(ips(entry(&l, "api.warp.")), WEBS);
        // Offline members are not named.
        assert!(l.names.iter().all(|e| !e.name.starts_with("api-web-3")));
        assert!(l.answering(Ipv4Addr::new(10, 240, 0, 3)).next().is_none());
        // Order: instances, seed-003 names by id then aliases, `.warp`;
        // numbered names in numeric order.
        let ranks: Vec<u8> = l.names.iter().map(|e| sort_key(e).0).collect();
        assert!(ranks.windows(2).all(|w| w[0] <= w[1]), "{ranks:?}");
        let pos = |n: &str| l.names.iter().position(|e| e.name == n).unwrap();
        assert!(pos(&seed("2.web.ap-1.")) < pos(&seed("10.web.ap-1.")));
        assert!(pos(&seed("ap-1.")) < pos("ap-1.prod.private-network.internal."));
        assert!(l.warnings.is_empty());
    }

    #[test]
    fn a_member_view_has_the_names_that_answer_it() {
        let map = map();
        let info = |inst: &str| MemberInfo {
            member: map.by_instance(&inst.parse().unwrap()).unwrap().clone(),
            joined: 1,
            last_seen: 2,
            offline_since: None,
            ephemeral: false,
        };
        let v = MemberView::of(&map, info("api-worker-1"), None);
        let names: Vec<&str> = v.names.iter().map(|e| e.name.as_str()).collect();
        assert!(names.contains(&"api-worker-1.internal."), "{names:?}");
        assert!(names.contains(&format!("1.worker.ap-1.{PN}.private-network.internal.").as_str()));
        // `api.warp` answers the web members only.
        assert!(!names.contains(&"api.warp."), "{names:?}");
        assert!(MemberView::of(&map, info("api-web-3"), None)
            .names
            .is_empty());
        assert!(json_has_no_paths(&v));
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["instance"], "api-worker-1");
        assert_eq!(json["generation"], 9);
        assert_eq!(json["index"], 1);
    }

    fn json_has_no_paths(v: &MemberView) -> bool {
        let json = serde_json::to_value(v).unwrap();
        json.get("path").is_none() && json.get("peer_paths").is_none()
    }

    /// The listing's rows carry the names that answer each member (as the
    /// name listing has them, aliases left out) and the paths reported.
    #[test]
    fn member_rows_have_their_names_and_paths() {
        let map = map();
        let list: Vec<MemberInfo> = map
            .members
            .values()
            .map(|m| MemberInfo {
                member: m.clone(),
                joined: 0,
                last_seen: 0,
                offline_since: None,
                ephemeral: false,
            })
            .collect();
        let worker = map.by_instance(&"api-worker-1".parse().unwrap()).unwrap();
        let summary = PathSummary::of(
            5,
            &[PeerPath {
                peer: worker.public_key,
                relay: true,
                working: true,
                rtt_micros: Some(1500),
            }],
        );
        let paths = HashMap::from([(worker.public_key, summary.clone())]);
        let rows = MemberRow::list(&map, list, paths);
        let listing = NameListing::of(&map);
        for row in &rows {
            let m = &row.info.member;
            let want: Vec<&str> = listing
                .answering(m.ip)
                .filter(|e| !e.alias)
                .map(|e| e.name.as_str())
                .collect();
            let mut got: Vec<&str> = row.dns_names.iter().map(String::as_str).collect();
            got.sort_unstable();
            let mut want_sorted = want.clone();
            want_sorted.sort_unstable();
            assert_eq!(got, want_sorted, "{}", m.instance);
            if m.is_online() {
                assert_eq!(row.dns_names[0], format!("{}.internal.", m.instance));
            } else {
                assert!(row.dns_names.is_empty());
            }
            let expect = (m.public_key == worker.public_key).then_some(&summary);
            assert_eq!(row.path.as_ref(), expect, "{}", m.instance);
            // `member get` has the same.
            let view = MemberView::of(&map, row.info.clone(), None);
            assert_eq!(view.dns_names, row.dns_names, "{}", m.instance);
        }
        let json = serde_json::to_value(&rows).unwrap();
        let back: Vec<MemberRow> = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back.len(), rows.len());
        let w = json
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["instance"] == "api-worker-1")
            .unwrap();
        assert_eq!(
            (
                &w["path"]["relay"],
                &w["path"]["rtt_micros"],
                &w["path"]["reported"]
            ),
            (&json!(1), &json!(1500), &json!(5))
        );
    }

    #[test]
    fn members_are_found_by_key_or_instance_only() {
        let map = map();
        let list: Vec<MemberInfo> = map
            .members
            .values()
            .map(|m| MemberInfo {
                member: m.clone(),
                joined: 0,
                last_seen: 0,
                offline_since: None,
                ephemeral: false,
            })
            .collect();
        let db = map.by_instance(&"db-1".parse().unwrap()).unwrap();
        let found = |q: &str| find_member(list.clone(), q).map(|m| m.member.instance.to_string());
        assert_eq!(found("db-1").as_deref(), Some("db-1"));
        assert_eq!(found(&db.public_key.to_string()).as_deref(), Some("db-1"));
        let stranger = PrivateKey::generate().public_key().to_string();
        for q in [
            &stranger as &str,
            "nobody",
            "DB-1",
            "",
            "../x",
            "a\u{202e}b",
            "\u{1b}[2J",
        ] {
            assert_eq!(found(q), None, "{q:?}");
        }
    }

    #[test]
    fn tables_escape_what_the_network_chose() {
        let mut map = map();
        let evil = member("evil-1", "x\u{202e}y\u{1b}[2J", "evil", "web", 1, 30);
        map.members.insert(evil.public_key, evil);
        let l = NameListing::of(&map);
        let table = render_names(&l);
        assert!(
            !table.chars().any(|c| c == '\u{1b}' || c == '\u{202e}'),
            "{table}"
        );
        assert!(table.contains("\\u{202e}"), "{table}");
        assert!(table.contains(&format!("ap-1.{PN}.private-network.internal.")));
        // Several answers: the name once, one line per address.
        assert_eq!(table.matches("api.warp.").count(), 1, "{table}");
        assert!(table.contains("10.240.0.10"), "{table}");

        let api = map.by_instance(&"api-web-1".parse().unwrap()).unwrap();
        let reported = MemberPaths {
            member: api.public_key,
            at: 1_700_000_000,
            paths: vec![
                PeerPath {
                    peer: api.public_key,
                    relay: true,
                    working: true,
                    rtt_micros: Some(1500),
                },
                PeerPath {
                    peer: PrivateKey::generate().public_key(),
                    relay: false,
                    working: false,
                    rtt_micros: None,
                },
            ],
        };
        let mut v = serde_json::to_value(MemberView::of(
            &map,
            MemberInfo {
                member: map.by_instance(&"evil-1".parse().unwrap()).unwrap().clone(),
                joined: 1_700_000_000,
                last_seen: u64::MAX,
                offline_since: None,
                ephemeral: false,
            },
            Some(&reported),
        ))
        .unwrap();
        v["future_field"] = serde_json::json!("a\nb");
        let text = render_member(&v);
        assert!(
            !text.chars().any(|c| c == '\u{1b}' || c == '\u{202e}'),
            "{text}"
        );
        assert!(text.contains("2023-11-14T22:13:20Z"), "{text}");
        assert!(text.contains(&u64::MAX.to_string()), "{text}");
        assert!(
            text.contains("future_field") && text.contains("a\\u{a}b"),
            "{text}"
        );
        assert!(text.contains("evil-1.internal."), "{text}");
        // Its reported paths: the summary, then each peer by name (or key).
        assert_eq!(v["path"]["relay"], 1, "{v}");
        assert_eq!(v["peer_paths"][0]["instance"], "api-web-1", "{v}");
        assert!(
            text.contains(
                "relay 1, no path 1, median round trip 1.50 ms (reported 2023-11-14T22:13:20Z)"
            ),
            "{text}"
        );
        assert!(text.contains("api-web-1: relay 1.50 ms"), "{text}");
        assert!(text.contains(": no path -"), "{text}");
        // Not an object: printed as is, escaped.
        assert!(!render_member(&serde_json::json!("\u{1b}")).contains('\u{1b}'));
    }

    #[test]
    fn member_table_shows_what_wg_show_would() {
        let mut a = member("api-web-1", "api", "ap-1", "web", 1, 1);
        a.endpoints = vec![
            "192.0.2.10:51820".parse().unwrap(),
            "198.51.100.7:40000".parse().unwrap(),
        ];
        let mut b = member("evil-1", "x\u{202e}y\u{1b}[2J", "evil", "web", 1, 2);
        b.state = MemberState::Offline;
        let info = |m: Member, last_seen: u64, ephemeral: bool| MemberInfo {
            member: m,
            joined: 1,
            last_seen,
            offline_since: None,
            ephemeral,
        };
        let reported = PathSummary::of(
            9990,
            &[
                PeerPath {
                    peer: b.public_key,
                    relay: false,
                    working: true,
                    rtt_micros: Some(800),
                },
                PeerPath {
                    peer: b.public_key,
                    relay: true,
                    working: true,
                    rtt_micros: Some(40_000),
                },
                PeerPath {
                    peer: b.public_key,
                    relay: false,
                    working: true,
                    rtt_micros: Some(2_250),
                },
            ],
        );
        let rows = [
            MemberRow {
                info: info(a, 9995, false),
                dns_names: vec!["api-web-1.internal.".into(), "api.warp.".into()],
                path: Some(reported),
            },
            MemberRow {
                info: info(b, 10_000 - 7200, true),
                dns_names: vec![],
                path: None,
            },
        ];
        let text = render_members(&rows, 10_000);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("INSTANCE") && lines[0].contains("LAST SEEN"));
        assert!(lines[1].starts_with("api-web-1"), "{text}");
        for part in [
            "10.240.0.1",
            "online",
            "5s ago",
            "192.0.2.10:51820 (+1)",
            "api",
            "r1",
            "direct 2, relay 1",
            "2.25 ms",
            "web #1",
        ] {
            assert!(lines[1].contains(part), "{part}: {text}");
        }
        assert!(
            lines[0].contains("PATH") && lines[0].contains("RTT"),
            "{text}"
        );
        let names_col = lines[0].find("NAMES").unwrap();
        assert_eq!(lines[1][names_col..].split_whitespace().next(), Some("2"));
        assert_eq!(lines[2][names_col..].split_whitespace().next(), Some("0"));
        for part in ["offline, ephemeral", "2h ago", "  -  "] {
            assert!(lines[2].contains(part), "{part}: {text}");
        }
        assert!(!text.contains('\u{1b}') && !text.contains('\u{202e}'));
        // Columns line up: the address starts at the same place on every line.
        let col = lines[0].find("ADDRESS").unwrap();
        assert_eq!(lines[1].find("10.240.0.1"), Some(col));
        assert_eq!(render_members(&[], 0).lines().nth(1), Some("(no members)"));
    }
}
