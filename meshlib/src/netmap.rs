//! The network map: everything one member needs to know about its network,
//! versioned by a generation number.
//!
//! The keyserver sends a [`NetworkMap`] snapshot, then [`MapDelta`]s; a member
//! applies them in order with [`NetworkMap::apply`]. Pure data, no I/O.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::ids::{AppId, InstanceName, NetworkId, ProcessType};
use crate::keys::PublicKey;
use crate::services::{GroupName, ServiceGroup};

/// One instance's sidecar in one network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The membership's WireGuard public key (the private key never leaves the
    /// instance). Unique in the network; the member's identity in the map.
    pub public_key: PublicKey,
    /// The member's private (overlay) address, inside the network's range.
    pub ip: Ipv4Addr,
    /// Underlay endpoints where the member's WireGuard socket can be reached:
    /// those it advertised first, then the address the keyserver observed.
    pub endpoints: Vec<SocketAddr>,
    /// The service (app) name as the user wrote it, any Unicode: the input of
    /// the IST encodings (`<encoded>.warp`, `WARP_IST_<encoded>`).
    pub service: String,
    /// The DNS-label id of the app (seed 003's `<app-id>`).
    pub app_id: AppId,
    /// The process type (`web` by default).
    pub process_type: ProcessType,
    /// 1-based index of the member within (app, process type).
    pub index: u32,
    /// The instance name, unique in the network (`<instance>.internal`).
    pub instance: InstanceName,
    /// Free-form label of the runner (host) the instance runs on.
    pub runner: String,
    /// TCP/UDP ports the instance serves (declared in its config, or found
    /// listening on loopback at join): a userspace-mode peer listens on
    /// these, on the loopback address standing for this member. Empty when
    /// unknown (kernel-mode peers reach any port anyway).
    pub ports: Vec<u16>,
    /// Whether the member is online (heartbeats arrive) or offline (stopped
    /// gracefully, or silent for the keyserver's `offline-after`). An offline
    /// member keeps its address, index and name, but peers neither name it
    /// nor route to it: see [`NetworkMap::online`].
    #[serde(default)]
    pub state: MemberState,
}

/// A member's lifecycle state as its peers see it. Members that left or
/// expired are not in the map at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemberState {
    /// Heartbeats arrive: named, resolvable, a peer.
    #[default]
    Online,
    /// Stopped or silent: address, index and name kept for its return, but
    /// invisible to names, variables and peer lists.
    Offline,
}

impl MemberState {
    /// `online` or `offline`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Online => "online",
            Self::Offline => "offline",
        }
    }
}

impl std::fmt::Display for MemberState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Member {
    /// Whether peers should name and reach this member.
    pub fn is_online(&self) -> bool {
        self.state == MemberState::Online
    }
}

/// Everything one member needs about its network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkMap {
    /// The network's id (`pn-<uuid>`).
    pub network: NetworkId,
    /// The network's human name.
    pub name: String,
    /// The network's address range (default `10.240.0.0/22`).
    pub range: Ipv4Net,
    /// Version of this map; every change the keyserver makes increments it.
    pub generation: u64,
    /// All members, keyed by public key.
    pub members: BTreeMap<PublicKey, Member>,
    /// The network's service groups (seed 002), keyed by name: what
    /// gateways publish. Appended; older caches read as none.
    #[serde(default)]
    pub services: BTreeMap<GroupName, ServiceGroup>,
    /// The range service addresses are taken from (the block of the same
    /// size right after [`NetworkMap::range`]: `10.240.4.0/22` for the
    /// default range), routed by members like the network's own range.
    /// `None` from a keyserver without service addresses. Appended.
    #[serde(default)]
    pub service_range: Option<Ipv4Net>,
    /// Every service's own stable address, by service name
    /// ([`ServiceAddress`]). Appended; older maps have none.
    #[serde(default)]
    pub addresses: BTreeMap<String, ServiceAddress>,
    /// The names a service group answers to beside its
    /// [`ServiceGroup::fqdn`] (its own domains: `Host` and SNI pick the
    /// group by any of them), by group; a group without is absent.
    /// Version 5, appended: older members read the map without it.
    #[serde(default)]
    pub names: BTreeMap<GroupName, Vec<String>>,
}

/// A service's own stable private address (its VIP): what `<service>.warp`
/// and `WARP_IST_*` name. It outlives every instance of the service (also
/// at zero instances); the data plane sends each new flow to it to one
/// online, healthy instance of the service ([`NetworkMap::backends`]) and
/// keeps the flow there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceAddress {
    /// The service name, as its members carry it ([`Member::service`]).
    pub service: String,
    /// The address, inside [`NetworkMap::service_range`].
    pub ip: Ipv4Addr,
    /// Scale to zero (seed 001): how long a new flow with no online
    /// instance is held while the keyserver wakes the service, seconds;
    /// `None`: the service is not wakeable and such a flow is refused at
    /// once.
    pub wake_timeout_secs: Option<u16>,
    /// The ports the service's instances have announced while the address
    /// existed (sorted, at most [`MAX_ADDRESS_PORTS`]): a member started
    /// while the service has no instance in the map (scaled to zero, its
    /// ephemeral instances gone) still knows where to expect it (userspace
    /// mode listens on them for the wake).
    #[serde(default)]
    pub ports: Vec<u16>,
}

/// Most ports a service address remembers ([`ServiceAddress::ports`]).
pub const MAX_ADDRESS_PORTS: usize = 256;

/// The service range of a network range: the block of the same size right
/// after it (`None` past the end of the address space).
pub fn default_service_range(range: Ipv4Net) -> Option<Ipv4Net> {
    let next = u32::from(range.broadcast()).checked_add(1)?;
    Ipv4Net::new(Ipv4Addr::from(next), range.prefix_len()).ok()
}

/// One change to a network map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MapChange {
    /// A member joined or one of its fields changed (endpoints, mostly).
    Upsert(Member),
    /// A member left or was revoked.
    Remove(PublicKey),
    /// A service group was created or changed (ports, limits, instances).
    ServiceUpsert(ServiceGroup),
    /// A service group was deleted.
    ServiceRemove(GroupName),
    /// A service address was allocated or changed (its wake setting).
    /// Version 4: older members are sent deltas without it.
    AddressUpsert(ServiceAddress),
    /// A service address was released (its service is gone). Version 4.
    AddressRemove(String),
    /// A service group's own names ([`NetworkMap::names`]) were set; empty:
    /// it has none. Version 5: older members are sent deltas without it.
    GroupNames(GroupName, Vec<String>),
}

impl MapChange {
    /// The first protocol version whose members can decode this change
    /// (service addresses came with version 4, a group's own names with
    /// version 5); the keyserver leaves it out of what older members are
    /// sent.
    pub fn since(&self) -> u16 {
        match self {
            Self::Upsert(_) | Self::Remove(_) | Self::ServiceUpsert(_) | Self::ServiceRemove(_) => {
                2
            }
            Self::AddressUpsert(_) | Self::AddressRemove(_) => 4,
            Self::GroupNames(..) => 5,
        }
    }

    /// Whether a member of protocol version 3 or older can decode this
    /// change (service addresses came with version 4).
    pub fn before_v4(&self) -> bool {
        self.since() < 4
    }
}

/// The changes that take a map from generation `from` to generation `to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapDelta {
    /// The generation the delta applies to.
    pub from: u64,
    /// The generation after the delta.
    pub to: u64,
    /// The changes, applied in order.
    pub changes: Vec<MapChange>,
}

/// Why a delta cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    /// The delta starts at another generation than the map's: the member must
    /// ask for a snapshot (or the deltas it missed).
    #[error("delta from generation {delta_from} does not apply to map generation {map}")]
    GenerationGap {
        /// The map's generation.
        map: u64,
        /// The delta's starting generation.
        delta_from: u64,
    },
    /// The delta goes backwards.
    #[error("delta goes from generation {from} back to {to}")]
    Backwards {
        /// Starting generation.
        from: u64,
        /// Ending generation.
        to: u64,
    },
}

impl NetworkMap {
    /// An empty map of a network, at generation 0.
    pub fn new(network: NetworkId, name: impl Into<String>, range: Ipv4Net) -> Self {
        Self {
            network,
            name: name.into(),
            range,
            generation: 0,
            members: BTreeMap::new(),
            services: BTreeMap::new(),
            service_range: None,
            addresses: BTreeMap::new(),
            names: BTreeMap::new(),
        }
    }

    /// Applies `delta` if it starts at this map's generation. On error the map
    /// is unchanged.
    pub fn apply(&mut self, delta: &MapDelta) -> Result<(), DeltaError> {
        if delta.from != self.generation {
            return Err(DeltaError::GenerationGap {
                map: self.generation,
                delta_from: delta.from,
            });
        }
        if delta.to < delta.from {
            return Err(DeltaError::Backwards {
                from: delta.from,
                to: delta.to,
            });
        }
        for change in &delta.changes {
            match change {
                MapChange::Upsert(m) => {
                    self.members.insert(m.public_key, m.clone());
                }
                MapChange::Remove(k) => {
                    self.members.remove(k);
                }
                MapChange::ServiceUpsert(g) => {
                    self.services.insert(g.name.clone(), g.clone());
                }
                MapChange::ServiceRemove(name) => {
                    self.services.remove(name);
                    self.names.remove(name);
                }
                MapChange::AddressUpsert(a) => {
                    self.addresses.insert(a.service.clone(), a.clone());
                }
                MapChange::AddressRemove(service) => {
                    self.addresses.remove(service);
                }
                MapChange::GroupNames(group, names) => {
                    if names.is_empty() {
                        self.names.remove(group);
                    } else {
                        self.names.insert(group.clone(), names.clone());
                    }
                }
            }
        }
        self.generation = delta.to;
        Ok(())
    }

    /// The same map with only its online members: what names, `.warp`
    /// answers, variables and peer lists are built from (an offline member
    /// keeps its reservation at the keyserver but is invisible to peers).
    pub fn online(&self) -> NetworkMap {
        NetworkMap {
            network: self.network,
            name: self.name.clone(),
            range: self.range,
            generation: self.generation,
            members: self
                .members
                .iter()
                .filter(|(_, m)| m.is_online())
                .map(|(k, m)| (*k, m.clone()))
                .collect(),
            services: self.services.clone(),
            service_range: self.service_range,
            addresses: self.addresses.clone(),
            names: self.names.clone(),
        }
    }

    /// The instances a service address balances over: the service's online
    /// `web` members, or all its online members when it has no `web` one
    /// (the members its name always pointed at), by index.
    pub fn backends(&self, service: &str) -> Vec<&Member> {
        let online: Vec<&Member> = self
            .service_members(service)
            .into_iter()
            .filter(|m| m.is_online())
            .collect();
        if online.iter().any(|m| m.process_type.is_web()) {
            online
                .into_iter()
                .filter(|m| m.process_type.is_web())
                .collect()
        } else {
            online
        }
    }

    /// The service whose address is `ip`, if any.
    pub fn address_of(&self, ip: Ipv4Addr) -> Option<&ServiceAddress> {
        self.addresses.values().find(|a| a.ip == ip)
    }

    /// Every name service group `group` answers to: its FQDN, then its
    /// own names ([`NetworkMap::names`]); empty for no such group.
    pub fn group_names(&self, group: &GroupName) -> Vec<&str> {
        let Some(g) = self.services.get(group) else {
            return Vec::new();
        };
        std::iter::once(g.fqdn.as_str())
            .chain(
                self.names
                    .get(group)
                    .into_iter()
                    .flatten()
                    .map(String::as_str),
            )
            .collect()
    }

    /// The member with this instance name.
    pub fn by_instance(&self, name: &InstanceName) -> Option<&Member> {
        self.members.values().find(|m| &m.instance == name)
    }

    /// The members that offer one service, ordered by (process type is `web`
    /// first, then type, then index): the first is the service's primary
    /// address for the IST variables.
    pub fn service_members<'a>(&'a self, service: &str) -> Vec<&'a Member> {
        let mut out: Vec<&Member> = self
            .members
            .values()
            .filter(|m| m.service == service)
            .collect();
        out.sort_by(|a, b| {
            (!a.process_type.is_web(), &a.process_type, a.index).cmp(&(
                !b.process_type.is_web(),
                &b.process_type,
                b.index,
            ))
        });
        out
    }

    /// The distinct service names of the network, sorted: those of its
    /// members and those with a service address (a service at zero
    /// instances keeps its names and variables).
    pub fn services(&self) -> Vec<&str> {
        let mut out: Vec<&str> = self
            .members
            .values()
            .map(|m| m.service.as_str())
            .chain(self.addresses.keys().map(String::as_str))
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// What a service's names (`<service>.warp`, override hostnames) and
    /// variables (`WARP_IST_*`) answer: its service address when the map
    /// has one, else the addresses of its primary members
    /// ([`crate::names::primary_members`]); empty for neither.
    pub fn service_answer(&self, service: &str) -> Vec<Ipv4Addr> {
        match self.addresses.get(service) {
            Some(a) => vec![a.ip],
            None => crate::names::primary_members(self, service)
                .iter()
                .map(|m| m.ip)
                .collect(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::keys::PrivateKey;

    /// A member for tests: `service`/`ptype`/`index`, instance `inst`, ip `10.240.0.<n>`.
    pub(crate) fn member(inst: &str, service: &str, ptype: &str, index: u32, n: u8) -> Member {
        Member {
            public_key: PrivateKey::generate().public_key(),
            ip: Ipv4Addr::new(10, 240, 0, n),
            endpoints: vec![],
            service: service.to_owned(),
            app_id: crate::ist::hostname_label(service)
                .unwrap()
                .parse()
                .unwrap(),
            process_type: ptype.parse().unwrap(),
            index,
            instance: inst.parse().unwrap(),
            runner: "r1".to_owned(),
            ports: vec![],
            state: MemberState::Online,
        }
    }

    pub(crate) fn empty_map() -> NetworkMap {
        NetworkMap::new(
            "pn-ad0fd6a1-d05e-40ea-bf63-c4f8a75a9d8c".parse().unwrap(),
            "prod",
            "10.240.0.0/22".parse().unwrap(),
        )
    }

    #[test]
    fn deltas_apply_in_order_only() {
        let mut map = empty_map();
        let a = member("a", "api", "web", 1, 1);
        let b = member("b", "api", "worker", 1, 2);
        let d1 = MapDelta {
            from: 0,
            to: 2,
            changes: vec![MapChange::Upsert(a.clone()), MapChange::Upsert(b.clone())],
        };
        map.apply(&d1).unwrap();
        assert_eq!(map.members.len(), 2);
        // Replaying the same delta is a gap, and changes nothing.
        let before = map.clone();
        assert!(matches!(
            map.apply(&d1),
            Err(DeltaError::GenerationGap { .. })
        ));
        assert_eq!(map, before);
        let d2 = MapDelta {
            from: 2,
            to: 3,
            changes: vec![MapChange::Remove(a.public_key)],
        };
        map.apply(&d2).unwrap();
        assert_eq!(map.generation, 3);
        assert_eq!(map.service_members("api"), vec![&b]);
        let back = MapDelta {
            from: 3,
            to: 1,
            changes: vec![],
        };
        assert!(matches!(
            map.apply(&back),
            Err(DeltaError::Backwards { .. })
        ));
    }

    /// A member of protocol version 3 decodes a version-4 snapshot (the
    /// appended map fields come last in the frame and are ignored), but not
    /// a service-address change: the keyserver leaves those out for it.
    #[test]
    fn version_3_members_read_snapshots_but_not_address_changes() {
        #[derive(Deserialize)]
        struct MapV3 {
            network: NetworkId,
            _name: String,
            _range: Ipv4Net,
            generation: u64,
            members: BTreeMap<PublicKey, Member>,
            _services: BTreeMap<GroupName, ServiceGroup>,
        }
        #[derive(Deserialize)]
        #[allow(dead_code)]
        enum ChangeV3 {
            _Upsert(Member),
            _Remove(PublicKey),
            _ServiceUpsert(ServiceGroup),
            _ServiceRemove(GroupName),
        }
        #[derive(Deserialize)]
        #[allow(dead_code)]
        enum ServerMsgV3 {
            _Welcome(crate::proto::Welcome),
            Snapshot(MapV3),
            Delta {
                _from: u64,
                _to: u64,
                _changes: Vec<ChangeV3>,
            },
        }
        let mut map = empty_map();
        let m = member("api-1", "api", "web", 1, 1);
        map.members.insert(m.public_key, m.clone());
        map.generation = 9;
        map.service_range = default_service_range(map.range);
        let addr = ServiceAddress {
            service: "api".into(),
            ip: Ipv4Addr::new(10, 240, 4, 1),
            wake_timeout_secs: Some(30),
            ports: vec![],
        };
        map.addresses.insert("api".into(), addr.clone());
        let frame =
            crate::proto::encode_frame(&crate::proto::ServerMsg::Snapshot(map.clone()), 1 << 20)
                .unwrap();
        match crate::proto::decode_payload::<ServerMsgV3>(&frame[4..]).unwrap() {
            ServerMsgV3::Snapshot(old) => {
                assert_eq!((old.network, old.generation), (map.network, 9));
                assert_eq!(old.members[&m.public_key], m);
            }
            _ => panic!("not a snapshot"),
        }
        let delta = MapDelta {
            from: 9,
            to: 10,
            changes: vec![MapChange::AddressUpsert(addr.clone())],
        };
        let frame =
            crate::proto::encode_frame(&crate::proto::ServerMsg::Delta(delta.clone()), 1 << 20)
                .unwrap();
        assert!(crate::proto::decode_payload::<ServerMsgV3>(&frame[4..]).is_err());
        assert!(!delta.changes[0].before_v4());
        // The same delta without it (what the keyserver sends them) decodes.
        let old_style = MapDelta {
            changes: vec![MapChange::Remove(m.public_key)],
            ..delta.clone()
        };
        let frame = crate::proto::encode_frame(&crate::proto::ServerMsg::Delta(old_style), 1 << 20)
            .unwrap();
        assert!(matches!(
            crate::proto::decode_payload::<ServerMsgV3>(&frame[4..]),
            Ok(ServerMsgV3::Delta { .. })
        ));
        // Applied by a current member.
        let mut later = map.clone();
        later.addresses.clear();
        later.apply(&delta).unwrap();
        assert_eq!(later.addresses["api"], addr);
        assert_eq!(later.address_of(addr.ip), Some(&addr));
        assert_eq!(
            default_service_range("10.240.0.0/22".parse().unwrap()),
            Some("10.240.4.0/22".parse().unwrap())
        );
        assert_eq!(
            default_service_range("255.255.255.0/24".parse().unwrap()),
            None
        );
    }

    /// A group's own names (version 5): applied by a current member and
    /// cleared with the group; a version 4 member reads a snapshot that
    /// holds them (they come last in the frame) but not the change, which
    /// the keyserver leaves out for it.
    #[test]
    fn group_names_travel_to_current_members_only() {
        use crate::services::{check_group, check_names, GroupSpec, PortSpec};
        #[derive(Deserialize)]
        struct MapV4 {
            _network: NetworkId,
            _name: String,
            _range: Ipv4Net,
            generation: u64,
            _members: BTreeMap<PublicKey, Member>,
            services: BTreeMap<GroupName, ServiceGroup>,
            _service_range: Option<Ipv4Net>,
            _addresses: BTreeMap<String, ServiceAddress>,
        }
        #[derive(Deserialize)]
        #[allow(dead_code)]
        enum ChangeV4 {
            _Upsert(Member),
            _Remove(PublicKey),
            _ServiceUpsert(ServiceGroup),
            _ServiceRemove(GroupName),
            _AddressUpsert(ServiceAddress),
            _AddressRemove(String),
        }
        #[derive(Deserialize)]
        #[allow(dead_code)]
        enum ServerMsgV4 {
            _Welcome(crate::proto::Welcome),
            Snapshot(MapV4),
            Delta {
                _from: u64,
                _to: u64,
                _changes: Vec<ChangeV4>,
            },
        }
        let spec = GroupSpec {
            name: "web".into(),
            ports: vec![PortSpec {
                port: 443,
                handlers: vec!["http".into(), "tls".into()],
                ..PortSpec::default()
            }],
            ..GroupSpec::default()
        };
        let g = check_group(&spec, None, "abcdefgh", "example.test").unwrap();
        let names = check_names(&["WWW.Shop.test.".into(), "shop.test".into()], &g.fqdn).unwrap();
        assert_eq!(names, ["shop.test", "www.shop.test"]);
        let mut map = empty_map();
        map.apply(&MapDelta {
            from: 0,
            to: 1,
            changes: vec![
                MapChange::ServiceUpsert(g.clone()),
                MapChange::GroupNames(g.name.clone(), names.clone()),
            ],
        })
        .unwrap();
        assert_eq!(
            map.group_names(&g.name),
            ["web-abcdefgh.example.test", "shop.test", "www.shop.test"]
        );
        let frame =
            crate::proto::encode_frame(&crate::proto::ServerMsg::Snapshot(map.clone()), 1 << 20)
                .unwrap();
        match crate::proto::decode_payload::<ServerMsgV4>(&frame[4..]).unwrap() {
            ServerMsgV4::Snapshot(old) => {
                assert_eq!(old.generation, 1);
                assert_eq!(old.services[&g.name], g);
            }
            _ => panic!("not a snapshot"),
        }
        let set = MapChange::GroupNames(g.name.clone(), vec![]);
        assert_eq!((set.since(), set.before_v4()), (5, false));
        let delta = MapDelta {
            from: 1,
            to: 2,
            changes: vec![set],
        };
        let frame =
            crate::proto::encode_frame(&crate::proto::ServerMsg::Delta(delta.clone()), 1 << 20)
                .unwrap();
        assert!(crate::proto::decode_payload::<ServerMsgV4>(&frame[4..]).is_err());
        // Empty names clear them; the group stays.
        let mut cleared = map.clone();
        cleared.apply(&delta).unwrap();
        assert_eq!(cleared.group_names(&g.name), ["web-abcdefgh.example.test"]);
        assert!(cleared.names.is_empty());
        // Removing the group takes its names with it.
        map.apply(&MapDelta {
            from: 1,
            to: 2,
            changes: vec![MapChange::ServiceRemove(g.name.clone())],
        })
        .unwrap();
        assert!(map.names.is_empty() && map.group_names(&g.name).is_empty());
        // Bad names are refused with the rule.
        let e = check_names(&["shop.test".into(), "SHOP.test".into()], &g.fqdn).unwrap_err();
        assert_eq!(e.rule(), "name-twice");
        let e = check_names(std::slice::from_ref(&g.fqdn), &g.fqdn).unwrap_err();
        assert_eq!(e.rule(), "name-twice");
        assert_eq!(
            check_names(&["no_dots".into()], &g.fqdn)
                .unwrap_err()
                .rule(),
            "fqdn"
        );
        let many: Vec<String> = (0..17).map(|i| format!("n{i}.shop.test")).collect();
        assert_eq!(
            check_names(&many, &g.fqdn).unwrap_err().rule(),
            "too-many-names"
        );
    }

    #[test]
    fn online_view_hides_offline_members_only() {
        let mut map = empty_map();
        let a = member("a", "api", "web", 1, 1);
        let mut b = member("b", "api", "web", 2, 2);
        b.state = MemberState::Offline;
        for m in [a.clone(), b.clone()] {
            map.members.insert(m.public_key, m);
        }
        map.generation = 7;
        let online = map.online();
        assert_eq!(online.generation, 7);
        assert_eq!(online.members.len(), 1);
        assert!(online.members.contains_key(&a.public_key));
        assert_eq!(map.members.len(), 2, "the full map keeps the reservation");
        // JSON caches written before the state existed read as online.
        let mut json = serde_json::to_value(&a).unwrap();
        json.as_object_mut().unwrap().remove("state");
        let back: Member = serde_json::from_value(json).unwrap();
        assert_eq!(back.state, MemberState::Online);
        assert_eq!(MemberState::Offline.to_string(), "offline");
    }

    #[test]
    fn service_groups_travel_in_deltas_and_the_online_view() {
        use crate::services::{check_group, GroupSpec, PortSpec};
        let mut map = empty_map();
        let spec = GroupSpec {
            name: "web".into(),
            ports: vec![PortSpec {
                port: 443,
                destination_port: Some(8080),
                handlers: vec!["http".into(), "tls".into()],
                ..PortSpec::default()
            }],
            ..GroupSpec::default()
        };
        let mut g = check_group(&spec, None, "abcdefgh", "example.test").unwrap();
        map.apply(&MapDelta {
            from: 0,
            to: 1,
            changes: vec![MapChange::ServiceUpsert(g.clone())],
        })
        .unwrap();
        assert_eq!(map.online().services[&g.name], g);
        g.attach("a".parse().unwrap());
        map.apply(&MapDelta {
            from: 1,
            to: 2,
            changes: vec![MapChange::ServiceUpsert(g.clone())],
        })
        .unwrap();
        assert_eq!(map.services[&g.name].instances.len(), 1);
        map.apply(&MapDelta {
            from: 2,
            to: 3,
            changes: vec![MapChange::ServiceRemove(g.name.clone())],
        })
        .unwrap();
        assert!(map.services.is_empty());
        // Caches written before services existed read as none.
        let mut json = serde_json::to_value(&map).unwrap();
        json.as_object_mut().unwrap().remove("services");
        let back: NetworkMap = serde_json::from_value(json).unwrap();
        assert!(back.services.is_empty());
    }

    #[test]
    fn service_members_web_first() {
        let mut map = empty_map();
        for m in [
            member("w2", "api", "worker", 1, 5),
            member("a2", "api", "web", 2, 4),
            member("a1", "api", "web", 1, 3),
        ] {
            map.members.insert(m.public_key, m);
        }
        let names: Vec<&str> = map
            .service_members("api")
            .iter()
            .map(|m| m.instance.as_str())
            .collect();
        assert_eq!(names, ["a1", "a2", "w2"]);
    }
}
