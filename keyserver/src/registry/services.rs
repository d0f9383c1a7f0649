//! Service groups (seed 002) in the registry: create, change, delete,
//! attach and detach instances; groups joined at a member's join (token
//! binding, `--service-group`) and the group its `--publish` creates;
//! cleanup when an instance leaves or expires.
//!
//! Every change to a group is a [`MapChange::ServiceUpsert`] or
//! [`MapChange::ServiceRemove`] in the network's delta log, so gateways
//! (members like any other) follow it with no restart.

use std::collections::BTreeMap;
use std::time::SystemTime;

use meshlib::ids::{InstanceName, NetworkId};
use meshlib::netmap::MapChange;
use meshlib::proto::{sha256, JoinRequest, Secret};
use meshlib::services::{
    self, GroupName, GroupPatch, GroupSpec, Protocol, ServiceError, ServiceGroup,
};

use super::network::Network;
use super::{
    unix, AdminError, Change, ProtoOpError, Registry, ServiceRecord, StoreOp, TokenRecord,
};

/// The domain of generated FQDNs (`<name>-<random>.<domain>`) unless the
/// keyserver's `service-domain` says otherwise.
pub const DEFAULT_SERVICE_DOMAIN: &str = "apps.ist-mesh.internal";

/// Lowercase letters derived from `seed` (a fresh secret's hash: the
/// registry itself has no randomness).
pub(super) fn letters(seed: &[u8; 32], n: usize) -> String {
    seed.iter()
        .cycle()
        .take(n)
        .map(|b| char::from(b'a' + b % 26))
        .collect()
}

/// A UDP port is told apart by nothing but its address: one group per
/// (ip, port) in a network.
fn check_udp(net: &Network, group: &ServiceGroup) -> Result<(), ServiceError> {
    for p in group.ports.iter().filter(|p| p.protocol == Protocol::Udp) {
        let taken = net.services.values().find(|other| {
            other.group.name != group.name
                && other
                    .group
                    .ports
                    .iter()
                    .any(|q| q.protocol == Protocol::Udp && q.port == p.port && q.ip == p.ip)
        });
        if let (Some(other), Some(ip)) = (taken, p.ip) {
            return Err(ServiceError::UdpPortTaken {
                port: p.port,
                ip,
                other: other.group.name.to_string(),
            });
        }
    }
    Ok(())
}

/// The name, or one of the names it answers to (`names`: its FQDN and its
/// own), is used by another group of the network.
fn check_unique(net: &Network, group: &ServiceGroup, names: &[&str]) -> Result<(), AdminError> {
    if net.services.contains_key(&group.name) {
        return Err(AdminError::ServiceTaken(format!(
            "a service group named {:?} already exists in this network",
            group.name.as_str()
        )));
    }
    check_names_free(net, &group.name, names)
}

/// No other group of the network answers to one of `names`.
fn check_names_free(net: &Network, group: &GroupName, names: &[&str]) -> Result<(), AdminError> {
    for other in net.services.values().filter(|r| &r.group.name != group) {
        if let Some(n) = other.all_names().find(|n| names.contains(n)) {
            return Err(AdminError::ServiceTaken(format!(
                "{} {n:?} is already used by service group {:?}",
                if n == group_fqdn_of(names) {
                    "fqdn"
                } else {
                    "name"
                },
                other.group.name.as_str()
            )));
        }
    }
    Ok(())
}

/// The FQDN in a list of names whose first is the FQDN.
fn group_fqdn_of<'a>(names: &[&'a str]) -> &'a str {
    names.first().copied().unwrap_or_default()
}

/// The group changes, recorded as one delta.
fn record(
    net: &mut Network,
    changes: Vec<MapChange>,
    log_cap: usize,
    mut ops: Vec<StoreOp>,
) -> (Vec<StoreOp>, Change) {
    let (change, net_op) = net.record(changes, None, log_cap);
    ops.push(net_op);
    (ops, change)
}

/// What a join does to service groups, decided before anything changes.
#[derive(Debug, Default)]
pub(super) struct JoinPlan {
    /// Groups to attach the new instance to.
    attach: Vec<GroupName>,
    /// The group its `--publish` creates.
    pub(super) owned: Option<ServiceGroup>,
}

/// Checks a join's service requests against the network: the token's group
/// and `--service-group`s must exist; `--publish` ports must keep seed
/// 002's rules (the error names the port and the rule).
pub(super) fn plan_join(
    net: &Network,
    req: &JoinRequest,
    token_group: Option<&GroupName>,
    instance: &InstanceName,
    credential: &Secret,
    domain: &str,
) -> Result<JoinPlan, ProtoOpError> {
    let mut plan = JoinPlan::default();
    if let Some(g) = token_group {
        if !net.services.contains_key(g) {
            return Err(ProtoOpError::TokenBinding(format!(
                "service group {:?}, which no longer exists",
                g.as_str()
            )));
        }
        plan.attach.push(g.clone());
    }
    if req.service_groups.len() > 16 {
        return Err(ProtoOpError::InvalidMetadata(
            "at most 16 service groups".into(),
        ));
    }
    for g in &req.service_groups {
        if !net.services.contains_key(g) {
            return Err(ProtoOpError::InvalidMetadata(format!(
                "no service group {:?} in this network",
                g.as_str()
            )));
        }
        if !plan.attach.contains(g) {
            plan.attach.push(g.clone());
        }
    }
    if req.publish.is_empty() {
        return Ok(plan);
    }
    let specs: Vec<_> = req.publish.iter().map(|p| p.to_spec()).collect();
    let bad = |e: ServiceError| ProtoOpError::InvalidMetadata(format!("--publish: {e}"));
    let ports = services::check_ports(&specs).map_err(bad)?;
    // A slot taken over keeps the group its instance owns: same name and
    // FQDN, the new ports.
    if let Some(own) = net
        .services
        .values()
        .find(|r| r.group.owner.as_ref() == Some(instance))
    {
        let mut group = own.group.clone();
        group.ports = ports;
        group.attach(instance.clone());
        check_udp(net, &group).map_err(bad)?;
        plan.owned = Some(group);
        return Ok(plan);
    }
    let seed = sha256(&[&credential[..], b"service-group"].concat());
    let name = services::owned_group_name(instance, &letters(&seed, 6));
    let mut group = ServiceGroup {
        fqdn: services::external_fqdn(&name, &letters(&sha256(&seed), 8), domain),
        name,
        ports,
        limits: Default::default(),
        owner: Some(instance.clone()),
        instances: vec![],
        wake: None,
        wake_timeout_secs: services::DEFAULT_WAKE_TIMEOUT_SECS,
    };
    group.attach(instance.clone());
    check_udp(net, &group).map_err(bad)?;
    if net.services.contains_key(&group.name)
        || net
            .services
            .values()
            .any(|r| r.all_names().any(|n| n == group.fqdn))
    {
        return Err(ProtoOpError::InvalidMetadata(
            "--publish: the generated service group name is taken; join again".into(),
        ));
    }
    plan.owned = Some(group);
    Ok(plan)
}

/// Applies a [`JoinPlan`] for the instance that just joined.
pub(super) fn apply_join(
    net: &mut Network,
    plan: JoinPlan,
    instance: &InstanceName,
    now: SystemTime,
) -> (Vec<MapChange>, Vec<StoreOp>) {
    let (mut changes, mut ops) = (Vec::new(), Vec::new());
    for name in plan.attach {
        if let Some(rec) = net.services.get_mut(&name) {
            if rec.group.attach(instance.clone()) {
                changes.push(MapChange::ServiceUpsert(rec.group.clone()));
                ops.push(StoreOp::PutService(rec.clone()));
            }
        }
    }
    if let Some(group) = plan.owned {
        let (created, names) = net
            .services
            .get(&group.name)
            .map_or((unix(now), Vec::new()), |r| (r.created, r.names.clone()));
        let rec = ServiceRecord {
            network: net.rec.id,
            group,
            created,
            names,
        };
        if net.services.get(&rec.group.name) != Some(&rec) {
            changes.push(MapChange::ServiceUpsert(rec.group.clone()));
            ops.push(StoreOp::PutService(rec.clone()));
            net.services.insert(rec.group.name.clone(), rec);
        }
    }
    (changes, ops)
}

/// Applies a [`JoinPlan`] for a slot taken over: the instance keeps its
/// groups; the group it owns follows the new join's `--publish` (same name
/// and FQDN, the new ports), or goes if the new join publishes nothing.
pub(super) fn apply_takeover(
    net: &mut Network,
    plan: JoinPlan,
    instance: &InstanceName,
    now: SystemTime,
) -> (Vec<MapChange>, Vec<StoreOp>) {
    let (mut changes, mut ops) = if plan.owned.is_none() {
        delete_owned(net, instance)
    } else {
        (Vec::new(), Vec::new())
    };
    let (more_changes, more_ops) = apply_join(net, plan, instance, now);
    changes.extend(more_changes);
    ops.extend(more_ops);
    (changes, ops)
}

/// Deletes the groups `instance` owns.
fn delete_owned(net: &mut Network, instance: &InstanceName) -> (Vec<MapChange>, Vec<StoreOp>) {
    let (mut changes, mut ops) = (Vec::new(), Vec::new());
    let id = net.rec.id;
    let owned: Vec<GroupName> = net
        .services
        .values()
        .filter(|r| r.group.owner.as_ref() == Some(instance))
        .map(|r| r.group.name.clone())
        .collect();
    for name in owned {
        net.services.remove(&name);
        changes.push(MapChange::ServiceRemove(name.clone()));
        ops.push(StoreOp::DeleteService(id, name));
    }
    (changes, ops)
}

/// An instance left or expired: the groups it owns are deleted, and it is
/// detached from the others.
pub(super) fn instance_gone(
    net: &mut Network,
    instance: &InstanceName,
) -> (Vec<MapChange>, Vec<StoreOp>) {
    let (mut changes, mut ops) = delete_owned(net, instance);
    for rec in net.services.values_mut() {
        if rec.group.detach(instance) {
            changes.push(MapChange::ServiceUpsert(rec.group.clone()));
            ops.push(StoreOp::PutService(rec.clone()));
        }
    }
    (changes, ops)
}

impl Registry {
    /// Sets the domain of generated FQDNs.
    pub fn set_service_domain(&mut self, domain: &str) {
        domain
            .trim_matches('.')
            .to_ascii_lowercase()
            .clone_into(&mut self.service_domain);
    }

    /// The domain of generated FQDNs.
    pub fn service_domain(&self) -> &str {
        &self.service_domain
    }

    fn network_mut(&mut self, network: NetworkId) -> Result<&mut Network, AdminError> {
        self.networks
            .get_mut(&network)
            .ok_or_else(|| AdminError::UnknownNetwork(network.to_string()))
    }

    /// The networks a gateway credential of `scope` serves: those of the
    /// scope with at least one service group, sorted by id, with names.
    pub fn gateway_networks(&self, scope: &crate::auth::Scope) -> Vec<(NetworkId, String)> {
        let mut out: Vec<(NetworkId, String)> = self
            .networks
            .values()
            .filter(|n| !n.services.is_empty() && scope.covers(n.rec.tenant.as_deref()))
            .map(|n| (n.rec.id, n.rec.name.clone()))
            .collect();
        out.sort_by_key(|(id, _)| *id);
        out
    }

    /// The service groups of a network, by name.
    pub fn services(&self, network: NetworkId) -> Vec<ServiceRecord> {
        self.networks
            .get(&network)
            .map(|n| n.services.values().cloned().collect())
            .unwrap_or_default()
    }

    /// One service group.
    pub fn service(&self, network: NetworkId, name: &str) -> Result<ServiceRecord, AdminError> {
        let net = self
            .networks
            .get(&network)
            .ok_or_else(|| AdminError::UnknownNetwork(network.to_string()))?;
        let key: GroupName = name
            .parse()
            .map_err(|_| AdminError::UnknownService(name.to_owned()))?;
        net.services
            .get(&key)
            .cloned()
            .ok_or_else(|| AdminError::UnknownService(name.to_owned()))
    }

    /// Creates a persistent service group (made through the API or CLI: it
    /// survives its instances). `random` gives the default FQDN's random
    /// part. Instances named in the spec must be members.
    pub fn create_service(
        &mut self,
        network: NetworkId,
        spec: &GroupSpec,
        random: &str,
        now: SystemTime,
    ) -> Result<(ServiceRecord, Vec<StoreOp>, Change), AdminError> {
        let (domain, log_cap) = (self.service_domain.clone(), self.log_cap);
        let mut group =
            services::check_group(spec, None, random, &domain).map_err(AdminError::Service)?;
        let names = services::check_names(&spec.names, &group.fqdn).map_err(AdminError::Service)?;
        let fqdn = group.fqdn.clone();
        let all: Vec<&str> = std::iter::once(fqdn.as_str())
            .chain(names.iter().map(String::as_str))
            .collect();
        self.check_other_networks(network, &group, &all)?;
        let net = self.network_mut(network)?;
        for text in &spec.instances {
            group.attach(member_instance(net, text)?);
        }
        check_unique(net, &group, &all)?;
        check_udp(net, &group).map_err(AdminError::Service)?;
        let rec = ServiceRecord {
            network,
            group,
            created: unix(now),
            names,
        };
        net.services.insert(rec.group.name.clone(), rec.clone());
        let mut changes = vec![MapChange::ServiceUpsert(rec.group.clone())];
        if !rec.names.is_empty() {
            changes.push(MapChange::GroupNames(
                rec.group.name.clone(),
                rec.names.clone(),
            ));
        }
        let (ops, change) = record(
            net,
            changes,
            log_cap,
            vec![StoreOp::PutService(rec.clone())],
        );
        Ok((rec, ops, change))
    }

    /// A group's FQDN and UDP addresses are the whole keyserver's, not one
    /// network's: one gateway serves every network, and routes a
    /// connection by name (and a UDP datagram by address) alone. The other
    /// network is not named (it may be another tenant's).
    pub(super) fn check_other_networks(
        &self,
        network: NetworkId,
        group: &ServiceGroup,
        names: &[&str],
    ) -> Result<(), AdminError> {
        let udp: Vec<(Option<std::net::IpAddr>, u16)> = group
            .ports
            .iter()
            .filter(|p| p.protocol == meshlib::services::Protocol::Udp)
            .map(|p| (p.ip, p.port))
            .collect();
        for other in self.networks.values().filter(|n| n.rec.id != network) {
            for r in other.services.values() {
                if let Some(n) = r
                    .all_names()
                    .find(|n| names.iter().any(|m| m.eq_ignore_ascii_case(n)))
                {
                    return Err(AdminError::ServiceTaken(format!(
                        "{} {n:?} is already used by a service group of another network",
                        if n == group.fqdn { "fqdn" } else { "name" }
                    )));
                }
                let clash = r.group.ports.iter().any(|p| {
                    p.protocol == meshlib::services::Protocol::Udp && udp.contains(&(p.ip, p.port))
                });
                if clash {
                    return Err(AdminError::ServiceTaken(
                        "a UDP port of this group is already published on that address by a service group of another network".into(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Replaces a group after `f` changed a copy of it and of its names
    /// (nothing changes on error; no delta when nothing changed).
    fn change_service(
        &mut self,
        network: NetworkId,
        name: &str,
        f: impl FnOnce(&Network, &mut ServiceGroup, &mut Vec<String>) -> Result<(), AdminError>,
    ) -> Result<(ServiceRecord, Vec<StoreOp>, Option<Change>), AdminError> {
        let current = self.service(network, name)?;
        let log_cap = self.log_cap;
        let mut group = current.group.clone();
        let mut names = current.names.clone();
        {
            let net = self
                .networks
                .get(&network)
                .ok_or_else(|| AdminError::UnknownNetwork(network.to_string()))?;
            f(net, &mut group, &mut names)?;
            if group == current.group && names == current.names {
                return Ok((current, vec![], None));
            }
            check_udp(net, &group).map_err(AdminError::Service)?;
            let all: Vec<&str> = std::iter::once(group.fqdn.as_str())
                .chain(names.iter().map(String::as_str))
                .collect();
            check_names_free(net, &group.name, &all)?;
        }
        let all: Vec<&str> = std::iter::once(group.fqdn.as_str())
            .chain(names.iter().map(String::as_str))
            .collect();
        self.check_other_networks(network, &group, &all)?;
        let net = self.network_mut(network)?;
        let mut changes = Vec::new();
        if group != current.group {
            changes.push(MapChange::ServiceUpsert(group.clone()));
        }
        if names != current.names {
            changes.push(MapChange::GroupNames(group.name.clone(), names.clone()));
        }
        let rec = ServiceRecord {
            group,
            names,
            ..current
        };
        net.services.insert(rec.group.name.clone(), rec.clone());
        let (ops, change) = record(
            net,
            changes,
            log_cap,
            vec![StoreOp::PutService(rec.clone())],
        );
        Ok((rec, ops, Some(change)))
    }

    /// Changes a group's ports, limits, wake hook or names (`PATCH`).
    pub fn update_service(
        &mut self,
        network: NetworkId,
        name: &str,
        patch: &GroupPatch,
    ) -> Result<(ServiceRecord, Vec<StoreOp>, Option<Change>), AdminError> {
        self.change_service(network, name, |_, g, names| {
            *g = services::patch_group(g, patch).map_err(AdminError::Service)?;
            if let Some(new) = &patch.names {
                *names = services::check_names(new, &g.fqdn).map_err(AdminError::Service)?;
            }
            Ok(())
        })
    }

    /// Attaches a member (by instance name or public key) to a group.
    pub fn attach_instance(
        &mut self,
        network: NetworkId,
        name: &str,
        member: &str,
    ) -> Result<(ServiceRecord, Vec<StoreOp>, Option<Change>), AdminError> {
        self.change_service(network, name, |net, g, _| {
            if g.instances.len() >= services::MAX_INSTANCES {
                return Err(AdminError::Service(ServiceError::BadName {
                    name: g.name.to_string(),
                    reason: format!("at most {} instances", services::MAX_INSTANCES),
                }));
            }
            g.attach(member_instance(net, member)?);
            Ok(())
        })
    }

    /// Detaches an instance (by instance name or public key) from a group.
    pub fn detach_instance(
        &mut self,
        network: NetworkId,
        name: &str,
        member: &str,
    ) -> Result<(ServiceRecord, Vec<StoreOp>, Option<Change>), AdminError> {
        self.change_service(network, name, |net, g, _| {
            let instance = member_instance(net, member).or_else(|_| {
                member
                    .parse()
                    .map_err(|_| AdminError::UnknownMember(member.into()))
            })?;
            if g.detach(&instance) {
                Ok(())
            } else {
                Err(AdminError::UnknownMember(format!(
                    "{member} (not attached to {})",
                    g.name
                )))
            }
        })
    }

    /// Deletes a group (persistent or owned).
    pub fn delete_service(
        &mut self,
        network: NetworkId,
        name: &str,
    ) -> Result<(Vec<StoreOp>, Change), AdminError> {
        let rec = self.service(network, name)?;
        let log_cap = self.log_cap;
        let net = self.network_mut(network)?;
        net.services.remove(&rec.group.name);
        let changes = vec![MapChange::ServiceRemove(rec.group.name.clone())];
        let ops = vec![StoreOp::DeleteService(network, rec.group.name)];
        Ok(record(net, changes, log_cap, ops))
    }

    /// Binds a token to a group: members joining with it are attached.
    pub fn set_token_service_group(
        &mut self,
        network: NetworkId,
        token_id: &str,
        group: &str,
    ) -> Result<(TokenRecord, Vec<StoreOp>), AdminError> {
        let name = self.service(network, group)?.group.name;
        let tok = self
            .tokens
            .values_mut()
            .find(|t| t.network == network && t.id == token_id)
            .ok_or_else(|| AdminError::UnknownToken(token_id.to_owned()))?;
        tok.service_group = Some(name);
        Ok((tok.clone(), vec![StoreOp::PutToken(tok.clone())]))
    }

    /// The groups each instance of a network is attached to (for listing).
    pub fn groups_by_instance(&self, network: NetworkId) -> BTreeMap<InstanceName, Vec<GroupName>> {
        let mut out: BTreeMap<InstanceName, Vec<GroupName>> = BTreeMap::new();
        for rec in self.services(network) {
            for i in &rec.group.instances {
                out.entry(i.clone())
                    .or_default()
                    .push(rec.group.name.clone());
            }
        }
        out
    }
}

/// The instance name of a member given by instance name or public key.
fn member_instance(net: &Network, text: &str) -> Result<InstanceName, AdminError> {
    let unknown = || AdminError::UnknownMember(text.to_owned());
    if let Ok(key) = text.parse::<meshlib::keys::PublicKey>() {
        return net
            .members
            .get(&key)
            .map(|r| r.member.instance.clone())
            .ok_or_else(unknown);
    }
    let name: InstanceName = text.parse().map_err(|_| unknown())?;
    net.instances
        .contains_key(&name)
        .then_some(name)
        .ok_or_else(unknown)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use meshlib::keys::PrivateKey;
    use meshlib::netmap::NetworkMap;
    use meshlib::services::PortSpec;

    use super::*;
    use crate::registry::Records;

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    fn port(p: i64, handlers: &[&str]) -> PortSpec {
        PortSpec {
            port: p,
            destination_port: Some(8080),
            handlers: handlers.iter().map(|h| (*h).to_owned()).collect(),
            ..PortSpec::default()
        }
    }

    fn setup() -> (Registry, NetworkId) {
        let (mut reg, _) = Registry::load(Records::default(), 16, Duration::from_secs(60), now());
        let (net, _) = reg
            .create_network("prod", meshlib::ipam::DEFAULT_RANGE, now())
            .unwrap();
        reg.create_token(
            net.id,
            &[1; 32],
            10,
            Duration::from_secs(600),
            None,
            None,
            now(),
        )
        .unwrap();
        (reg, net.id)
    }

    fn join(
        reg: &mut Registry,
        net: NetworkId,
        instance: &str,
        req_edit: impl FnOnce(&mut JoinRequest),
    ) -> Result<super::super::Joined, ProtoOpError> {
        let mut req = JoinRequest {
            network: net,
            token_secret: [1; 32],
            public_key: PrivateKey::generate().public_key(),
            service: "web".into(),
            app_id: None,
            process_type: Default::default(),
            instance: Some(instance.parse().unwrap()),
            runner: "r".into(),
            endpoints: vec![],
            ports: vec![8080],
            service_groups: vec![],
            publish: vec![],
            replace: false,
            ephemeral: false,
        };
        req_edit(&mut req);
        let mut cred = [0u8; 32];
        cred[..instance.len().min(32)]
            .copy_from_slice(&instance.as_bytes()[..instance.len().min(32)]);
        reg.join(&req, "127.0.0.1:9".parse().unwrap(), &cred, false, now())
    }

    #[test]
    fn persistent_group_survives_its_instances_owned_group_does_not() {
        let (mut reg, net) = setup();
        let spec = GroupSpec {
            name: "my-service".into(),
            ports: vec![port(443, &["http", "tls"])],
            ..GroupSpec::default()
        };
        let (rec, _, change) = reg.create_service(net, &spec, "rrtckyyi", now()).unwrap();
        assert!(rec.group.persistent());
        assert_eq!(rec.group.fqdn, "my-service-rrtckyyi.apps.ist-mesh.internal");
        assert!(
            matches!(&change.delta.changes[0], MapChange::ServiceUpsert(g) if g.name.as_str() == "my-service")
        );
        // Joining by --service-group attaches; --publish makes an owned group.
        let publish = port(443, &["http", "tls"]).check().unwrap();
        let j = join(&mut reg, net, "web-1", |r| {
            r.service_groups = vec!["my-service".parse().unwrap()];
            r.publish = vec![publish];
        })
        .unwrap();
        let changes = &j.changes.last().unwrap().delta.changes;
        assert_eq!(
            changes.len(),
            4,
            "member, the service's new address, attach, owned group in one delta"
        );
        assert!(matches!(&changes[1], MapChange::AddressUpsert(a) if a.service == "web"));
        let groups = reg.services(net);
        assert_eq!(groups.len(), 2);
        let owned = groups.iter().find(|r| !r.group.persistent()).unwrap();
        assert_eq!(owned.group.owner.as_ref().unwrap().as_str(), "web-1");
        assert!(owned.group.name.as_str().starts_with("web-1-"));
        assert_eq!(reg.snapshot(j.network).unwrap().services.len(), 2);
        // The instance leaves: its group goes, it is detached from the other.
        let (change, ops) = reg.remove_member(net, "web-1", now()).unwrap();
        assert!(ops
            .iter()
            .any(|o| matches!(o, StoreOp::DeleteService(_, n) if *n == owned.group.name)));
        assert!(change
            .delta
            .changes
            .iter()
            .any(|c| matches!(c, MapChange::ServiceRemove(_))));
        let left = reg.services(net);
        assert_eq!(left.len(), 1);
        assert!(left[0].group.instances.is_empty() && left[0].group.persistent());
    }

    /// One gateway serves every network: a name or a UDP address is the
    /// keyserver's, not one network's; a gateway credential lists the
    /// networks of its scope that have groups.
    #[test]
    fn names_and_udp_addresses_are_unique_across_networks() {
        let (mut reg, a) = setup();
        let (b, _) = reg
            .create_network("other", meshlib::ipam::DEFAULT_RANGE, now())
            .unwrap();
        let b = b.id;
        let spec = |name: &str, fqdn: &str, ports: Vec<PortSpec>| GroupSpec {
            name: name.into(),
            fqdn: Some(fqdn.into()),
            ports,
            ..GroupSpec::default()
        };
        let udp = |ip: &str| PortSpec {
            port: 5353,
            destination_port: Some(53),
            protocol: Some("udp".into()),
            ip: Some(ip.into()),
            ..PortSpec::default()
        };
        reg.create_service(
            a,
            &spec(
                "shop",
                "shop.example.test",
                vec![port(443, &["http", "tls"]), udp("192.0.2.7")],
            ),
            "aaaaaaaa",
            now(),
        )
        .unwrap();
        // The same name in another network: refused, the other not named.
        let e = reg
            .create_service(
                b,
                &spec(
                    "shop",
                    "SHOP.example.test",
                    vec![port(443, &["http", "tls"])],
                ),
                "bbbbbbbb",
                now(),
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("another network") && !e.contains("prod"), "{e}");
        // The same UDP address in another network: refused.
        let e = reg
            .create_service(
                b,
                &spec("dns", "dns.example.test", vec![udp("192.0.2.7")]),
                "cccccccc",
                now(),
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("UDP"), "{e}");
        // Another address, another name: fine; a PATCH onto a taken UDP
        // address is refused and changes nothing.
        reg.create_service(
            b,
            &spec("dns", "dns.example.test", vec![udp("192.0.2.8")]),
            "cccccccc",
            now(),
        )
        .unwrap();
        let patch = GroupPatch {
            ports: Some(vec![udp("192.0.2.7")]),
            ..GroupPatch::default()
        };
        assert!(reg.update_service(b, "dns", &patch).is_err());
        assert_eq!(
            reg.service(b, "dns").unwrap().group.ports[0].ip,
            Some("192.0.2.8".parse().unwrap())
        );
        // Within one network the old rule holds.
        assert!(reg
            .create_service(
                a,
                &spec(
                    "shop2",
                    "shop.example.test",
                    vec![port(443, &["http", "tls"])]
                ),
                "dddddddd",
                now()
            )
            .is_err());

        // Gateway listings: networks with groups, in scope.
        let (c, _) = reg
            .create_network("empty", meshlib::ipam::DEFAULT_RANGE, now())
            .unwrap();
        reg.set_tenant(b, Some("acme".into())).unwrap();
        let all = reg.gateway_networks(&crate::auth::Scope::All);
        let mut want = vec![a, b];
        want.sort();
        assert_eq!(all.iter().map(|(id, _)| *id).collect::<Vec<_>>(), want);
        assert!(
            !all.iter().any(|(id, _)| *id == c.id),
            "no groups: not listed"
        );
        let acme = reg.gateway_networks(&crate::auth::Scope::Tenant("acme".into()));
        assert_eq!(acme, vec![(b, "other".to_owned())]);
        assert!(reg
            .gateway_networks(&crate::auth::Scope::Tenant("nobody".into()))
            .is_empty());
    }

    /// A group's own names: pushed as their own change, in snapshots and
    /// catch-ups, unique across every group of every network (against
    /// FQDNs too), replaced and cleared by PATCH, gone with the group.
    #[test]
    fn own_names_are_pushed_unique_and_patched() {
        use crate::registry::Catchup;
        let (mut reg, a) = setup();
        let (b, _) = reg
            .create_network("other", meshlib::ipam::DEFAULT_RANGE, now())
            .unwrap();
        let b = b.id;
        let spec = |name: &str, fqdn: &str, names: &[&str]| GroupSpec {
            name: name.into(),
            fqdn: Some(fqdn.into()),
            names: names.iter().map(|n| (*n).to_owned()).collect(),
            ports: vec![port(443, &["http", "tls"])],
            ..GroupSpec::default()
        };
        // (A generation past 0, so that a catch-up is a delta.)
        reg.create_service(a, &spec("pre", "pre.example.test", &[]), "p", now())
            .unwrap();
        let start = reg.snapshot(a).unwrap().generation;
        let (rec, _, change) = reg
            .create_service(
                a,
                &spec(
                    "shop",
                    "shop.example.test",
                    &["WWW.Shop.test", "shop.test."],
                ),
                "aaaaaaaa",
                now(),
            )
            .unwrap();
        assert_eq!(rec.names, ["shop.test", "www.shop.test"]);
        let shop: GroupName = "shop".parse().unwrap();
        assert!(matches!(
            &change.delta.changes[..],
            [MapChange::ServiceUpsert(g), MapChange::GroupNames(n, names)]
                if g.name == shop && n == &shop && names == &rec.names
        ));
        let map = reg.snapshot(a).unwrap();
        assert_eq!(
            map.group_names(&shop),
            ["shop.example.test", "shop.test", "www.shop.test"]
        );
        match reg.catchup(a, start).unwrap() {
            Catchup::Delta(d) => {
                let mut m = NetworkMap::new(a, "prod", meshlib::ipam::DEFAULT_RANGE);
                m.generation = start;
                m.apply(&d).unwrap();
                assert_eq!(m.names, map.names);
            }
            other => panic!("expected a delta, got {other:?}"),
        }
        // Taken: an own name as another group's FQDN or name, in this
        // network or another; an FQDN that is another group's own name.
        for (net, s) in [
            (a, spec("blog", "shop.test", &[])),
            (b, spec("blog", "blog.example.test", &["www.shop.test"])),
            (b, spec("blog", "www.shop.test", &[])),
            (a, spec("blog", "blog.example.test", &["shop.example.test"])),
        ] {
            let e = reg.create_service(net, &s, "bbbbbbbb", now()).unwrap_err();
            assert!(e.to_string().contains("already used"), "{e}");
            assert!(reg.service(net, "blog").is_err(), "nothing made");
        }
        reg.create_service(
            b,
            &spec("blog", "blog.example.test", &["blog.test"]),
            "b",
            now(),
        )
        .unwrap();
        // PATCH: onto a taken name is refused and changes nothing.
        let patch = |names: &[&str]| GroupPatch {
            names: Some(names.iter().map(|n| (*n).to_owned()).collect()),
            ..GroupPatch::default()
        };
        let gen = reg.snapshot(a).unwrap().generation;
        let e = reg
            .update_service(a, "shop", &patch(&["blog.test"]))
            .unwrap_err();
        assert!(e.to_string().contains("another network"), "{e}");
        assert_eq!(reg.snapshot(a).unwrap().generation, gen);
        // A change of names alone is one GroupNames change.
        let (rec, _, change) = reg
            .update_service(a, "shop", &patch(&["shop.test"]))
            .unwrap();
        assert_eq!(rec.names, ["shop.test"]);
        assert!(matches!(
            &change.unwrap().delta.changes[..],
            [MapChange::GroupNames(n, names)] if n == &shop && names == &["shop.test"]
        ));
        // The same names again: no change at all.
        let (_, _, change) = reg
            .update_service(a, "shop", &patch(&["SHOP.test"]))
            .unwrap();
        assert!(change.is_none());
        // Freed names can be taken: www.shop.test is free again.
        reg.update_service(b, "blog", &patch(&["blog.test", "www.shop.test"]))
            .unwrap();
        // Cleared with [].
        let (rec, _, _) = reg.update_service(a, "shop", &patch(&[])).unwrap();
        assert!(rec.names.is_empty());
        assert!(reg.snapshot(a).unwrap().names.is_empty());
        // Deleted with the group: a catch-up across a delete and a
        // re-create without names leaves no stale names.
        let gen = reg.snapshot(b).unwrap().generation;
        reg.delete_service(b, "blog").unwrap();
        reg.create_service(b, &spec("blog", "blog.example.test", &[]), "c", now())
            .unwrap();
        match reg.catchup(b, gen).unwrap() {
            Catchup::Delta(d) => {
                let mut m = reg.snapshot(b).unwrap();
                m.generation = gen;
                m.names
                    .insert("blog".parse().unwrap(), vec!["blog.test".into()]);
                m.apply(&d).unwrap();
                assert!(m.names.is_empty(), "{:?}", m.names);
            }
            other => panic!("expected a delta, got {other:?}"),
        }
    }

    #[test]
    fn an_expired_owner_takes_its_group_along() {
        let (mut reg, net) = setup();
        let publish = port(10000, &["tls"]).check().unwrap();
        let j = join(&mut reg, net, "lazy", |r| r.publish = vec![publish]).unwrap();
        assert_eq!(reg.services(net).len(), 1);
        reg.set_offline(net, &j.member.public_key, now());
        let expire = reg.expire_after(net);
        let later = now() + expire + Duration::from_secs(1);
        let (changes, ops) = reg.sweep(later, |_, _| None, 16);
        assert!(changes.iter().any(|c| c
            .delta
            .changes
            .iter()
            .any(|m| matches!(m, MapChange::ServiceRemove(_)))));
        assert!(ops.iter().any(|o| matches!(o, StoreOp::DeleteService(..))));
        assert!(reg.services(net).is_empty());
    }

    #[test]
    fn joins_with_bad_service_requests_change_nothing() {
        let (mut reg, net) = setup();
        let e = join(&mut reg, net, "a", |r| {
            r.service_groups = vec!["nope".parse().unwrap()]
        })
        .unwrap_err();
        assert!(
            matches!(e, ProtoOpError::InvalidMetadata(ref m) if m.contains("nope")),
            "{e}"
        );
        let bad = meshlib::services::PublishedPort {
            port: 8080,
            destination_port: 80,
            protocol: Protocol::Tcp,
            handlers: [meshlib::services::Handler::Http].into(),
            ip: None,
        };
        let e = join(&mut reg, net, "a", |r| r.publish = vec![bad]).unwrap_err();
        assert!(e.to_string().contains("port 8080"), "{e}");
        assert_eq!(reg.member_count(net), 0);
        assert_eq!(reg.tokens(net)[0].uses_left, 10, "no token use");
    }

    #[test]
    fn token_binding_attaches_and_api_changes_are_checked() {
        let (mut reg, net) = setup();
        let spec = GroupSpec {
            name: "g".into(),
            ports: vec![port(10000, &["tls"])],
            ..GroupSpec::default()
        };
        reg.create_service(net, &spec, "abcdefgh", now()).unwrap();
        assert!(matches!(
            reg.create_service(net, &spec, "zzzzzzzz", now()),
            Err(AdminError::ServiceTaken(_))
        ));
        let tid = reg.tokens(net)[0].id.clone();
        reg.set_token_service_group(net, &tid, "g").unwrap();
        join(&mut reg, net, "b", |_| {}).unwrap();
        assert_eq!(reg.service(net, "g").unwrap().group.instances.len(), 1);
        // PATCH: soft > hard is refused and nothing changes.
        let patch = GroupPatch {
            soft_limit: Some(9),
            hard_limit: Some(3),
            ..GroupPatch::default()
        };
        assert!(matches!(
            reg.update_service(net, "g", &patch),
            Err(AdminError::Service(ServiceError::SoftAboveHard { .. }))
        ));
        let patch = GroupPatch {
            soft_limit: Some(2),
            ..GroupPatch::default()
        };
        let (rec, _, change) = reg.update_service(net, "g", &patch).unwrap();
        assert_eq!(rec.group.limits.soft_limit, 2);
        assert!(change.is_some());
        let (_, _, none) = reg.update_service(net, "g", &patch).unwrap();
        assert!(none.is_none(), "no change, no delta");
        // Detach and attach through the API.
        reg.detach_instance(net, "g", "b").unwrap();
        assert!(reg.detach_instance(net, "g", "b").is_err());
        reg.attach_instance(net, "g", "b").unwrap();
        assert!(matches!(
            reg.attach_instance(net, "g", "zz"),
            Err(AdminError::UnknownMember(_))
        ));
        // UDP: one group per address and port.
        let udp = PortSpec {
            port: 5353,
            protocol: Some("udp".into()),
            ip: Some("203.0.113.5".into()),
            ..PortSpec::default()
        };
        let a = GroupSpec {
            name: "u1".into(),
            ports: vec![udp.clone()],
            ..GroupSpec::default()
        };
        let b = GroupSpec {
            name: "u2".into(),
            ports: vec![udp],
            ..GroupSpec::default()
        };
        reg.create_service(net, &a, "aaaaaaaa", now()).unwrap();
        assert!(matches!(
            reg.create_service(net, &b, "bbbbbbbb", now()),
            Err(AdminError::Service(ServiceError::UdpPortTaken { .. }))
        ));
        let (ops, _) = reg.delete_service(net, "u1").unwrap();
        assert!(matches!(ops[0], StoreOp::DeleteService(..)));
        assert!(matches!(
            reg.service(net, "u1"),
            Err(AdminError::UnknownService(_))
        ));
    }
}
