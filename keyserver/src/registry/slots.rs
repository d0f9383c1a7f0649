//! Slots: a member's place in its network — instance name, (app, process
//! type, index), private address and names — which outlives the WireGuard
//! key that holds it.
//!
//! Platforms restart instances without their state: the new container has
//! a new key. A join therefore lands either in a *new slot* or *takes over*
//! an existing one, keeping its address, index and names; peers see one
//! delta that removes the old key and adds the new (as a key rotation).
//!
//! ## Where a join lands
//!
//! - With an instance name (`--instance`): the slot of that name. Held by
//!   an offline member of the same service and process type: taken over.
//!   Held by an online one: refused ([`ProtoOpError::InstanceTaken`])
//!   unless the join says `replace`; then taken over and the old session
//!   closed with [`meshlib::proto::ErrorCode::Replaced`]. Held by another
//!   service or type: always refused (a token can only ever take slots of
//!   the app and type it may join). Free: a new slot of that name.
//! - Without one: the *numbering rule* picks the index, and with it the
//!   slot.
//!
//! ## The numbering rule
//!
//! A new instance of (app, type) takes the lowest index from 1 whose
//! holder is gone: no member holds it (it left, expired, was removed or
//! replaced), or its holder is an ephemeral member that is offline. In the
//! second case the new instance takes that member's slot over (address and
//! instance name too). A non-ephemeral offline member keeps its index until
//! it comes back or expires. So after restarts of stateless instances, and
//! scale-ins and scale-outs, the online members of a type hold 1..N;
//! the seed-003 `<n>.<type>…` names answer the n-th online member of the
//! type in index order (`meshlib::names`), so `1.web…` answers a live
//! member whenever one exists, even while a lower index waits for a
//! stateful member to come back.
//!
//! ## No exhaustion by the dead
//!
//! A join that finds no free address (see [`meshlib::ipam`]) first reuses
//! a quarantined address released at least `offline-after` ago (the DNS
//! TTL: no answer naming it can still be cached), oldest first; failing
//! that it reclaims the member that has been offline longest, if that is
//! at least `offline-after` (it expires early, pushed as an expiry), and
//! takes the address that frees. The quarantine of an offline member's
//! address counts from when it went offline, the moment names stopped
//! answering it. An online member is never reclaimed. If only younger
//! offline members or quarantined addresses are left, the join is answered
//! `Busy` (they become usable within `offline-after`); with none at all it
//! is refused as [`ProtoOpError::NetworkFull`].

use std::net::{Ipv4Addr, SocketAddr};
use std::time::SystemTime;

use meshlib::ids::{AppId, InstanceName, NetworkId};
use meshlib::keys::PublicKey;
use meshlib::netmap::{MapChange, MemberState};
use meshlib::proto::{sha256, JoinRequest, Secret};

use super::network::{default_instance, Network};
use super::{
    dedup_ports, resolved_endpoints, services, unix, Joined, MemberRecord, ProtoOpError, Registry,
    StoreOp,
};

/// Where a join lands (decided before anything changes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Landing {
    /// A new slot with this index and name and a fresh address; `evict` is
    /// an offline ephemeral member holding the index under another name
    /// (it is removed first).
    New {
        index: u32,
        instance: InstanceName,
        evict: Option<PublicKey>,
    },
    /// The slot held by `old` (offline, or online and replaced).
    Takeover { old: PublicKey },
}

impl Landing {
    /// The instance name the join ends up with.
    pub(super) fn instance(&self, net: &Network) -> InstanceName {
        match self {
            Landing::New { instance, .. } => instance.clone(),
            Landing::Takeover { old } => net.members[old].member.instance.clone(),
        }
    }
}

impl Network {
    /// Whether a member's index counts as free: ephemeral and offline.
    fn gone(&self, key: &PublicKey) -> bool {
        self.members
            .get(key)
            .is_some_and(|r| r.ephemeral && r.member.state == MemberState::Offline)
    }

    /// Where `req` lands (see the module docs); `app` is the service's app
    /// id. Refusals change nothing.
    pub(super) fn landing(&self, req: &JoinRequest, app: &AppId) -> Result<Landing, ProtoOpError> {
        let (index, holder) = self
            .catalog
            .lowest_index(app, &req.process_type, |k| self.gone(k));
        let Some(name) = &req.instance else {
            if let Some(old) = holder {
                return Ok(Landing::Takeover { old });
            }
            let instance =
                default_instance(self, &req.service, app, &req.process_type, index).ok_or_else(
                    || {
                        ProtoOpError::InvalidMetadata(format!(
                            "no free default instance name for service {:?}, type {} and index {index} within 63 bytes; choose one (--instance)",
                            req.service, req.process_type
                        ))
                    },
                )?;
            return Ok(Landing::New {
                index,
                instance,
                evict: None,
            });
        };
        let Some(old) = self.instances.get(name) else {
            return Ok(Landing::New {
                index,
                instance: name.clone(),
                evict: holder,
            });
        };
        let m = &self.members[old].member;
        if m.app_id != *app || m.process_type != req.process_type {
            return Err(ProtoOpError::SlotMismatch {
                instance: name.clone(),
                service: m.service.clone(),
                process_type: m.process_type.to_string(),
            });
        }
        if m.state == MemberState::Online && !req.replace {
            return Err(ProtoOpError::InstanceTaken(name.clone()));
        }
        Ok(Landing::Takeover { old: *old })
    }

    /// The address the slot `instance` had before it was freed, if nobody
    /// holds it now and the slot is of the same app and type: reserved for
    /// it again (a quarantine on it is lifted: it is the same slot).
    fn slot_address(
        &mut self,
        (instance, app, ptype): (&InstanceName, &AppId, &meshlib::ids::ProcessType),
    ) -> Option<Ipv4Addr> {
        let freed = self.released.get(instance)?;
        if freed.app_id != *app || freed.process_type != *ptype {
            return None;
        }
        let ip = freed.ip;
        self.released.remove(instance);
        self.alloc.reserve(ip).ok()?;
        Some(ip)
    }

    /// The member offline longest, if it has been offline at least
    /// `min_age` at `now` (a candidate to reclaim when addresses run out).
    fn longest_offline(&self, now: u64, min_age: u64) -> Option<PublicKey> {
        self.members
            .iter()
            .filter_map(|(k, r)| r.offline_since.map(|s| (s, *k)))
            .min()
            .filter(|(since, _)| now.saturating_sub(*since) >= min_age)
            .map(|(_, k)| k)
    }

    /// Whether an address will come free within the pressure age: an
    /// offline member or a quarantined address exists.
    fn frees_soon(&self, now: SystemTime) -> bool {
        self.members.values().any(|r| r.offline_since.is_some())
            || self.alloc.quarantined().any(|(_, until)| until > now)
    }
}

/// Where a new slot's address comes from.
enum Address {
    /// Allocated.
    Ready(Ipv4Addr),
    /// The address of this offline member, reclaimed first.
    Reclaim(PublicKey),
}

/// What a takeover or a new slot needs besides the request.
pub(super) struct JoinInputs<'a> {
    pub(super) req: &'a JoinRequest,
    pub(super) observed: SocketAddr,
    pub(super) credential: &'a Secret,
    pub(super) token_hash: [u8; 32],
    pub(super) ephemeral: bool,
    pub(super) plan: services::JoinPlan,
    pub(super) now: SystemTime,
}

impl JoinInputs<'_> {
    /// The new record for `member`.
    fn record(&self, member: meshlib::netmap::Member) -> MemberRecord {
        MemberRecord {
            network: self.req.network,
            member,
            credential_hash: sha256(self.credential),
            joined: unix(self.now),
            last_seen: unix(self.now),
            offline_since: None,
            previous_keys: vec![],
            token_hash: Some(self.token_hash),
            credential_used: false,
            ephemeral: self.ephemeral,
        }
    }
}

impl Registry {
    /// Takes over the slot of `old` with the joining key: same address,
    /// index, instance name and service groups; one delta removes the old
    /// key and adds the new. Cannot fail (everything was checked).
    pub(super) fn take_over(&mut self, old: PublicKey, input: JoinInputs<'_>) -> Joined {
        let (log_cap, req) = (self.log_cap, input.req);
        let net = self.networks.get_mut(&req.network).expect("checked");
        let old_rec = net.members.remove(&old).expect("checked");
        net.catalog.remove(&old_rec.member);
        let mut member = old_rec.member;
        member.public_key = req.public_key;
        member.endpoints = resolved_endpoints(&req.endpoints, input.observed);
        member.runner.clone_from(&req.runner);
        member.ports = dedup_ports(&req.ports);
        member.state = MemberState::Online;
        let rec = input.record(member.clone());
        net.instances
            .insert(member.instance.clone(), member.public_key);
        net.catalog.add(&member);
        net.members.insert(member.public_key, rec.clone());
        let mut changes = vec![MapChange::Remove(old), MapChange::Upsert(member.clone())];
        changes.extend(net.ensure_address(&member.service, &member.ports, input.now));
        let (service_changes, service_ops) =
            services::apply_takeover(net, input.plan, &member.instance, input.now);
        changes.extend(service_changes);
        let (change, net_op) = net.record(changes, Some(old), log_cap);
        let (network, generation) = (net.rec.id, net.rec.generation);
        let mut ops = vec![
            StoreOp::DeleteMember(req.network, old),
            StoreOp::PutMember(rec),
        ];
        ops.extend(self.use_token(&input.token_hash));
        ops.push(net_op);
        ops.extend(service_ops);
        Joined {
            member,
            network,
            generation,
            changes: vec![change],
            replaced: Some(old),
            rejoined: false,
            ops,
        }
    }

    /// Spends one use of a token; its write.
    fn use_token(&mut self, hash: &[u8; 32]) -> Option<StoreOp> {
        let tok = self.tokens.get_mut(hash)?;
        tok.uses_left = tok.uses_left.saturating_sub(1);
        Some(StoreOp::PutToken(tok.clone()))
    }

    /// An address for a new slot of `network` (see "No exhaustion by the
    /// dead"): allocated now, or the offline member to reclaim for it. An
    /// error changes nothing.
    fn address_for(
        &mut self,
        network: NetworkId,
        slot: (&InstanceName, &AppId, &meshlib::ids::ProcessType),
        evict: Option<PublicKey>,
        now: SystemTime,
    ) -> Result<Address, ProtoOpError> {
        let min_age = self.lifecycle.offline_after;
        let net = self.networks.get_mut(&network).expect("checked");
        if let Some(ip) = net.slot_address(slot) {
            return Ok(Address::Ready(ip));
        }
        let full = match net.alloc.allocate(now) {
            Ok(ip) => return Ok(Address::Ready(ip)),
            Err(e) => e,
        };
        if let Some(ip) = net.alloc.allocate_under_pressure(now, min_age) {
            return Ok(Address::Ready(ip));
        }
        // The evicted index holder frees an address too: prefer it.
        let old_enough = |r: &MemberRecord| {
            r.offline_since
                .is_some_and(|s| unix(now).saturating_sub(s) >= min_age.as_secs())
        };
        let victim = evict
            .filter(|k| old_enough(&net.members[k]))
            .or_else(|| net.longest_offline(unix(now), min_age.as_secs()));
        match victim {
            Some(v) => Ok(Address::Reclaim(v)),
            None if net.frees_soon(now) => Err(ProtoOpError::NetworkBusy(full)),
            None => Err(ProtoOpError::NetworkFull(full)),
        }
    }

    /// Joins into a new slot: reclaims or evicts what must go, allocates
    /// the address and adds the member.
    pub(super) fn new_slot(
        &mut self,
        index: u32,
        instance: InstanceName,
        evict: Option<PublicKey>,
        app_id: AppId,
        input: JoinInputs<'_>,
    ) -> Result<Joined, ProtoOpError> {
        let (req, now) = (input.req, input.now);
        let slot = (&instance, &app_id, &req.process_type);
        let address = self.address_for(req.network, slot, evict, now)?;
        // Nothing has changed but the allocation; from here on nothing fails.
        let (mut changes, mut ops) = (Vec::new(), Vec::new());
        let reclaim = match address {
            Address::Reclaim(v) => Some(v),
            Address::Ready(_) => None,
        };
        let ip = match address {
            Address::Ready(ip) => ip,
            // Found among the members by `address_for` just now.
            Address::Reclaim(v) => self.networks[&req.network].members[&v].member.ip,
        };
        for gone in reclaim
            .into_iter()
            .chain(evict.filter(|e| Some(*e) != reclaim))
        {
            if let Ok((c, o)) = self.remove_key(req.network, gone, now, true) {
                changes.push(c);
                ops.extend(o);
            }
        }
        let log_cap = self.log_cap;
        let net = self.networks.get_mut(&req.network).expect("checked");
        if reclaim.is_some() {
            // The reclaimed member's address, just released (so it cannot
            // be in use): offline for at least the DNS TTL, no name still
            // points at it.
            let _ = net.alloc.reserve(ip);
        }
        let member = meshlib::netmap::Member {
            public_key: req.public_key,
            ip,
            endpoints: resolved_endpoints(&req.endpoints, input.observed),
            service: req.service.clone(),
            app_id,
            process_type: req.process_type.clone(),
            index,
            instance,
            runner: req.runner.clone(),
            ports: dedup_ports(&req.ports),
            state: MemberState::Online,
        };
        let rec = input.record(member.clone());
        net.instances
            .insert(member.instance.clone(), member.public_key);
        net.catalog.add(&member);
        net.members.insert(member.public_key, rec.clone());
        let mut delta = vec![MapChange::Upsert(member.clone())];
        delta.extend(net.ensure_address(&member.service, &member.ports, now));
        let (service_changes, service_ops) =
            services::apply_join(net, input.plan, &member.instance, now);
        delta.extend(service_changes);
        let (change, net_op) = net.record(delta, None, log_cap);
        changes.push(change);
        let (network, generation) = (net.rec.id, net.rec.generation);
        ops.push(StoreOp::PutMember(rec));
        ops.push(StoreOp::DeleteQuarantine(req.network, ip));
        ops.extend(self.use_token(&input.token_hash));
        ops.push(net_op);
        ops.extend(service_ops);
        Ok(Joined {
            member,
            network,
            generation,
            changes,
            replaced: None,
            rejoined: false,
            ops,
        })
    }

    /// The current holder of an instance name (slot), if any.
    pub fn instance_holder(
        &self,
        network: NetworkId,
        instance: &InstanceName,
    ) -> Option<PublicKey> {
        self.networks
            .get(&network)
            .and_then(|n| n.instances.get(instance))
            .copied()
    }
}
