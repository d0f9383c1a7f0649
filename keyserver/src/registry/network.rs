//! One network in memory: members, allocator, change log, catch-up.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use ipnet::Ipv4Net;
use meshlib::ids::{AppId, InstanceName, ProcessType};
use meshlib::ipam::{Allocator, IpamError};
use meshlib::keys::PublicKey;
use meshlib::netmap::{MapChange, MapDelta, NetworkMap};

use super::{Catchup, Change, MemberRecord, NetworkRecord, ServiceRecord, StoreOp};

/// One network in memory.
#[derive(Debug)]
pub(super) struct Network {
    pub(super) rec: NetworkRecord,
    pub(super) alloc: Allocator,
    pub(super) members: BTreeMap<PublicKey, MemberRecord>,
    pub(super) instances: HashMap<InstanceName, PublicKey>,
    /// Recent deltas, oldest first, contiguous, ending at `rec.generation`.
    pub(super) log: VecDeque<MapDelta>,
    /// Service groups (seed 002), by name.
    pub(super) services: BTreeMap<meshlib::services::GroupName, ServiceRecord>,
    /// Services, app ids and indexes in use (joins read it, not the members).
    pub(super) catalog: super::catalog::Catalog,
    /// The address each freed slot (instance name) had, with its app and
    /// type, while that address is in quarantine: the same slot coming
    /// back (a stateful member whose ephemeral membership was freed, the
    /// next instance of the type) gets its address back, which no stale
    /// answer can misdirect. Memory only: after a restart, or on another
    /// replica, the slot simply gets a fresh address.
    pub(super) released: HashMap<InstanceName, FreedSlot>,
    /// Service addresses in use (`None`: the network has no service range).
    pub(super) vips: Option<Allocator>,
}

/// What a freed slot had (see [`Network::released`]).
#[derive(Debug, Clone)]
pub(super) struct FreedSlot {
    pub(super) ip: std::net::Ipv4Addr,
    pub(super) service: String,
    pub(super) app_id: AppId,
    pub(super) process_type: ProcessType,
}

impl Network {
    pub(super) fn new(rec: NetworkRecord, quarantine: Duration) -> Result<Self, IpamError> {
        let mut net = Self {
            alloc: Allocator::new(rec.range, quarantine)?,
            rec,
            members: BTreeMap::new(),
            instances: HashMap::new(),
            log: VecDeque::new(),
            services: BTreeMap::new(),
            catalog: Default::default(),
            released: HashMap::new(),
            vips: None,
        };
        net.sync_addresses(quarantine);
        Ok(net)
    }

    /// The network's service range in force.
    pub(super) fn service_range(&self) -> Option<Ipv4Net> {
        self.rec
            .service_range
            .or_else(|| meshlib::netmap::default_service_range(self.rec.range))
    }

    /// Rebuilds the service-address allocator from the record (at load,
    /// and when a replica follows another's write of it).
    pub(super) fn sync_addresses(&mut self, quarantine: Duration) {
        self.vips = self
            .service_range()
            .and_then(|r| Allocator::new(r, quarantine).ok())
            .map(|mut a| {
                for addr in self.rec.addresses.values() {
                    let _ = a.reserve(addr.address.ip);
                }
                a
            });
    }

    /// Gives `service` its own address if it has none (and the service
    /// range has room), remembering the `ports` its joining member
    /// announces: the change to push with the join. A full range leaves the
    /// service without one (its names give its members).
    pub(super) fn ensure_address(
        &mut self,
        service: &str,
        ports: &[u16],
        now: std::time::SystemTime,
    ) -> Option<MapChange> {
        if self.rec.addresses.contains_key(service) {
            return self.note_address_ports(service, ports);
        }
        let ip = self.vips.as_mut()?.allocate(now).ok()?;
        let address = meshlib::netmap::ServiceAddress {
            service: service.to_owned(),
            ip,
            wake_timeout_secs: None,
            ports: merge_ports(&[], ports),
        };
        self.rec.addresses.insert(
            service.to_owned(),
            super::AddressRecord::new(address.clone()),
        );
        Some(MapChange::AddressUpsert(address))
    }

    /// Adds `ports` (announced by a member of `service`) to those its
    /// address remembers, so that members started while the service has no
    /// instance know them: the change to push when they grew. Never
    /// shrinks while the address exists.
    pub(super) fn note_address_ports(&mut self, service: &str, ports: &[u16]) -> Option<MapChange> {
        let rec = self.rec.addresses.get_mut(service)?;
        let merged = merge_ports(&rec.address.ports, ports);
        if merged == rec.address.ports {
            return None;
        }
        rec.address.ports = merged;
        Some(MapChange::AddressUpsert(rec.address.clone()))
    }

    pub(super) fn snapshot(&self) -> NetworkMap {
        let mut map = NetworkMap::new(self.rec.id, self.rec.name.clone(), self.rec.range);
        map.generation = self.rec.generation;
        map.members = self
            .members
            .iter()
            .map(|(k, r)| (*k, r.member.clone()))
            .collect();
        map.services = self
            .services
            .iter()
            .map(|(n, r)| (n.clone(), r.group.clone()))
            .collect();
        map.names = self
            .services
            .iter()
            .filter(|(_, r)| !r.names.is_empty())
            .map(|(n, r)| (n.clone(), r.names.clone()))
            .collect();
        map.service_range = self.service_range();
        map.addresses = self
            .rec
            .addresses
            .iter()
            .map(|(s, a)| (s.clone(), a.address.clone()))
            .collect();
        map
    }

    /// Bumps the generation with one delta of `changes`; returns the change
    /// to push and the network record write.
    pub(super) fn record(
        &mut self,
        changes: Vec<MapChange>,
        removed: Option<PublicKey>,
        cap: usize,
    ) -> (Change, StoreOp) {
        let from = self.rec.generation;
        self.rec.generation += 1;
        let delta = MapDelta {
            from,
            to: self.rec.generation,
            changes,
        };
        self.log.push_back(delta.clone());
        while self.log.len() > cap {
            self.log.pop_front();
        }
        let change = Change {
            network: self.rec.id,
            delta,
            removed,
        };
        (change, StoreOp::PutNetwork(self.rec.clone()))
    }

    /// How to bring a member at `generation` up to date. Generation 0 means
    /// "no map at all" (the protocol promises a snapshot: a delta carries no
    /// network name or range); a generation the log no longer covers, or one
    /// ahead of the network's, gets a snapshot too.
    pub(super) fn catchup(&self, generation: u64) -> Catchup {
        let now = self.rec.generation;
        if generation == 0 {
            return Catchup::Snapshot(self.snapshot());
        }
        if generation == now {
            return Catchup::UpToDate;
        }
        match self.log.front() {
            Some(first) if generation >= first.from && generation < now => {
                let changes = compact(
                    self.log
                        .iter()
                        .filter(|d| d.from >= generation)
                        .flat_map(|d| d.changes.iter()),
                );
                Catchup::Delta(MapDelta {
                    from: generation,
                    to: now,
                    changes,
                })
            }
            _ => Catchup::Snapshot(self.snapshot()),
        }
    }
}

/// What a change is about: a member, a service group, a group's own names
/// or a service address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Subject {
    Member(PublicKey),
    Service(meshlib::services::GroupName),
    Names(meshlib::services::GroupName),
    Address(String),
}

/// Keeps only the changes that a later one does not supersede: changes to
/// different subjects commute, and a later change of one subject replaces
/// its earlier ones, so the result takes a map to the same state with at
/// most one change per subject. A group's removal is about the group and
/// its names (it clears both), so it goes only once both were set again.
pub fn compact<'a>(changes: impl Iterator<Item = &'a MapChange>) -> Vec<MapChange> {
    let subjects = |c: &MapChange| -> Vec<Subject> {
        match c {
            MapChange::Upsert(m) => vec![Subject::Member(m.public_key)],
            MapChange::Remove(k) => vec![Subject::Member(*k)],
            MapChange::ServiceUpsert(g) => vec![Subject::Service(g.name.clone())],
            MapChange::ServiceRemove(n) => {
                vec![Subject::Service(n.clone()), Subject::Names(n.clone())]
            }
            MapChange::GroupNames(n, _) => vec![Subject::Names(n.clone())],
            MapChange::AddressUpsert(a) => vec![Subject::Address(a.service.clone())],
            MapChange::AddressRemove(s) => vec![Subject::Address(s.clone())],
        }
    };
    let all: Vec<&MapChange> = changes.collect();
    let mut last: HashMap<Subject, usize> = HashMap::new();
    for (i, c) in all.iter().enumerate() {
        for s in subjects(c) {
            last.insert(s, i);
        }
    }
    all.iter()
        .enumerate()
        .filter(|(i, c)| subjects(c).iter().any(|s| last[s] == *i))
        .map(|(_, c)| (*c).clone())
        .collect()
}

/// `<service>-<type>-<index>` (the service's `.warp` label, e.g.
/// `my-db-web-1`; the app id when the service has no usable label), made
/// unique with a numeric suffix `-<n>` if an explicit name took it.
///
/// The name is always a valid DNS label: when it would pass 63 bytes, the
/// `<service>-<type>` part is cut, never the `-<index>` or `-<n>` suffix, so
/// candidates stay distinct. The search is bounded: at most one candidate
/// more than there are names in the network, so one of them is free unless
/// cutting made two candidates equal; `None` then (the join is refused).
pub(super) fn default_instance(
    net: &Network,
    service: &str,
    app: &AppId,
    ptype: &ProcessType,
    index: u32,
) -> Option<InstanceName> {
    let label = meshlib::ist::hostname_label(service)
        .ok()
        .map(|l| l.trim_matches('-').to_owned())
        .filter(|l| !l.is_empty() && l.len() <= 40 && l.parse::<AppId>().is_ok())
        .unwrap_or_else(|| app.to_string());
    let base = format!("{label}-{ptype}");
    let tries = u32::try_from(net.instances.len())
        .unwrap_or(u32::MAX)
        .saturating_add(1);
    (1..=tries).find_map(|n| {
        let suffix = if n == 1 {
            format!("-{index}")
        } else {
            format!("-{index}-{n}")
        };
        let name = instance_with_suffix(&base, &suffix)?;
        (!net.instances.contains_key(&name)).then_some(name)
    })
}

/// `base` cut so that `base + suffix` fits one DNS label (63 bytes), without
/// a trailing `-` before the suffix.
fn instance_with_suffix(base: &str, suffix: &str) -> Option<InstanceName> {
    let room = 63usize.checked_sub(suffix.len())?;
    let mut end = base.len().min(room);
    // `base` is ASCII (a hostname label and a process type); stay on a
    // character boundary all the same.
    while !base.is_char_boundary(end) {
        end -= 1;
    }
    let cut = &base[..end];
    format!("{}{suffix}", cut.trim_end_matches('-'))
        .parse()
        .ok()
}

/// `known` and `more`, sorted, without duplicates, at most
/// [`meshlib::netmap::MAX_ADDRESS_PORTS`] (the lowest).
fn merge_ports(known: &[u16], more: &[u16]) -> Vec<u16> {
    let mut all: Vec<u16> = known
        .iter()
        .chain(more)
        .copied()
        .filter(|p| *p != 0)
        .collect();
    all.sort_unstable();
    all.dedup();
    all.truncate(meshlib::netmap::MAX_ADDRESS_PORTS);
    all
}
