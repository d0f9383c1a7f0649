//! The pure core of the keyserver: networks, join tokens, members, address
//! allocation and the per-network change log. No I/O, no clock: every method
//! that depends on time takes `now`.
//!
//! Call order: build with [`Registry::load`] from the store's records, then
//! call operations. Every mutating operation validates first (an error leaves
//! the registry unchanged), then applies the change in memory and returns the
//! [`StoreOp`]s the driver must commit and, for member changes, the
//! [`Change`] (one [`MapDelta`](meshlib::netmap::MapDelta)) to push to the network's members.

mod access;
#[cfg(test)]
mod address_tests;
mod addresses;
mod catalog;
mod lifecycle;
mod network;
mod records;
mod replica;
mod services;
#[cfg(test)]
mod slot_tests;
mod slots;
#[cfg(test)]
mod tests;
pub mod validate;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::Ipv4Net;
use meshlib::ids::{AppId, InstanceName, NetworkId, ProcessType};
use meshlib::ipam::IpamError;
use meshlib::keys::PublicKey;
use meshlib::netmap::{MapChange, Member, NetworkMap};
use meshlib::proto::{sha256, ErrorCode, JoinRequest, ResumeRequest, Secret};
use subtle::ConstantTimeEq;

pub use access::{NewApiToken, DEFAULT_AUDIT_ENTRIES};
pub use addresses::{
    AddressInfo, AddressPatch, AddressSettings, HookJob, HookKind, Wake, WakeError,
    DEFAULT_WAKE_TIMEOUT_SECS, IDLE_HOOK_TIMEOUT, MAX_IDLE_AFTER_SECS,
};
pub use lifecycle::{Lifecycle, RotateError};
pub use network::compact;
use network::Network;
pub use records::{
    unix, AddressRecord, Catchup, Change, Joined, LogRecord, MemberInfo, MemberRecord,
    NetworkRecord, Records, Resumed, ServiceRecord, StoreOp, TokenRecord,
};
pub use replica::changes_of;
pub use services::DEFAULT_SERVICE_DOMAIN;

/// Why a protocol operation (join, resume, endpoint update) failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoOpError {
    /// The network does not exist.
    #[error("unknown network {0}")]
    UnknownNetwork(NetworkId),
    /// No token with this secret for this network.
    #[error("invalid join token")]
    InvalidToken,
    /// The token has expired.
    #[error("join token expired")]
    TokenExpired,
    /// The token has no uses left.
    #[error("join token used up")]
    TokenUsedUp,
    /// The token is bound to another service or process type.
    #[error("join token is bound to {0}")]
    TokenBinding(String),
    /// The public key is already a member of the network, and this join
    /// cannot be a retry of the join that made it (the reason says why).
    #[error("public key is already a member of this network ({0}); resume with its credential")]
    KeyInUse(String),
    /// A join retried while the first one's session is still open (the
    /// keyserver has not yet noticed it is gone): answered `Busy`, so the
    /// member retries; it succeeds once that session ends.
    #[error("a session of this key is still open; retry in a few seconds")]
    SessionOpen,
    /// The instance name (slot) is held by an online member and the join
    /// did not ask to replace it.
    #[error(
        "instance {0} is online in this network; join with --replace if that instance is dead"
    )]
    InstanceTaken(InstanceName),
    /// The slot named belongs to another service or process type: a join
    /// can only take slots of the app and type it joins as.
    #[error("instance {instance} belongs to service {service:?}, process type {process_type}; a join of another service or type cannot take it")]
    SlotMismatch {
        /// The slot asked for.
        instance: InstanceName,
        /// Its service.
        service: String,
        /// Its process type.
        process_type: String,
    },
    /// No free address, and none will free up by itself.
    #[error("{0}")]
    NetworkFull(IpamError),
    /// No free address now, but an offline member's or a quarantined
    /// address becomes reusable within `offline-after`: retry.
    #[error("{0}; an address frees up within the offline period, retry")]
    NetworkBusy(IpamError),
    /// Unknown member or wrong credential (deliberately the same error).
    #[error("unknown member or wrong credential")]
    BadCredential,
    /// Metadata out of bounds: every member carries it to every peer, so
    /// its size is limited.
    #[error("invalid member metadata: {0}")]
    InvalidMetadata(String),
}

impl ProtoOpError {
    /// The wire error code.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::UnknownNetwork(_) => ErrorCode::UnknownNetwork,
            Self::InvalidToken => ErrorCode::InvalidToken,
            Self::TokenExpired => ErrorCode::TokenExpired,
            Self::TokenUsedUp => ErrorCode::TokenUsedUp,
            Self::TokenBinding(_) => ErrorCode::TokenBinding,
            Self::KeyInUse(_) => ErrorCode::KeyInUse,
            Self::SessionOpen => ErrorCode::Busy,
            Self::InstanceTaken(_) | Self::SlotMismatch { .. } => ErrorCode::InstanceTaken,
            Self::NetworkFull(_) => ErrorCode::NetworkFull,
            Self::NetworkBusy(_) => ErrorCode::Busy,
            Self::BadCredential => ErrorCode::BadCredential,
            Self::InvalidMetadata(_) => ErrorCode::InvalidMetadata,
        }
    }
}

/// Why an admin operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    /// No network with this id or name.
    #[error("unknown network {0:?}")]
    UnknownNetwork(String),
    /// A network with this name exists.
    #[error("a network named {0:?} already exists")]
    NameTaken(String),
    /// The name is unusable ([`validate::network_name`]).
    #[error("invalid network name {name:?}: {reason}")]
    BadName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The name looks like an existing network's name ([`validate::skeleton`]).
    #[error("network name {name:?} looks like the existing network {existing:?}")]
    LookAlike {
        /// The name as given.
        name: String,
        /// The existing network's name.
        existing: String,
    },
    /// The range is unusable ([`validate::range`]).
    #[error("invalid range: {0}")]
    BadRange(String),
    /// Uses must be at least 1.
    #[error("a token needs at least one use")]
    BadUses,
    /// The token lifetime is out of bounds ([`validate::token_ttl`]).
    #[error("invalid expiry: {0}")]
    BadExpiry(String),
    /// The token's service binding is not a valid service name.
    #[error("invalid service binding: {0}")]
    BadBinding(String),
    /// The network still has members and the deletion was not forced.
    #[error(
        "network {network:?} still has {members} members; remove them first or force the deletion"
    )]
    NetworkInUse {
        /// The network's name.
        network: String,
        /// How many members it has.
        members: usize,
    },
    /// No such member.
    #[error("unknown member {0:?}")]
    UnknownMember(String),
    /// No such token.
    #[error("unknown token {0:?}")]
    UnknownToken(String),
    /// A service group request breaks a rule of seed 002 (the error names
    /// the port and the rule).
    #[error("{0}")]
    Service(meshlib::services::ServiceError),
    /// No such service group.
    #[error("unknown service group {0:?}")]
    UnknownService(String),
    /// A service group with this name or FQDN exists in the network.
    #[error("{0}")]
    ServiceTaken(String),
    /// No service of this name has an address in the network.
    #[error("no service address for {0:?} in this network")]
    UnknownAddress(String),
    /// A service address's settings are unusable (the message says which
    /// and why).
    #[error("invalid service address setting: {0}")]
    BadAddress(String),
}

/// All state of one keyserver.
#[derive(Debug)]
pub struct Registry {
    networks: HashMap<NetworkId, Network>,
    names: HashMap<String, NetworkId>,
    tokens: HashMap<[u8; 32], TokenRecord>,
    /// How many deltas each network keeps for resumes.
    log_cap: usize,
    /// Quarantine of released addresses.
    quarantine: Duration,
    /// Offline and expiry timers.
    lifecycle: Lifecycle,
    /// When the registry was loaded (Unix seconds): members get a grace
    /// period of `offline-after` from here to come back after a restart.
    loaded_at: u64,
    /// The domain of service groups' generated FQDNs.
    service_domain: String,
    /// API tokens and the audit trail ([`crate::auth`]).
    access: access::Access,
}

impl Registry {
    /// Rebuilds the registry from stored records. Records that do not fit
    /// (a member of a missing network, an address clash) are skipped with a
    /// warning returned in the second value.
    pub fn load(
        records: Records,
        log_cap: usize,
        quarantine: Duration,
        now: SystemTime,
    ) -> (Self, Vec<String>) {
        let mut reg = Self {
            networks: HashMap::new(),
            names: HashMap::new(),
            tokens: HashMap::new(),
            log_cap: log_cap.max(1),
            quarantine,
            lifecycle: Lifecycle::default(),
            loaded_at: unix(now),
            service_domain: DEFAULT_SERVICE_DOMAIN.to_owned(),
            access: access::Access::load(records.api_tokens, records.audit),
        };
        let mut warnings = Vec::new();
        for rec in records.networks {
            match Network::new(rec.clone(), quarantine) {
                Ok(net) => {
                    reg.names.insert(rec.name.clone(), rec.id);
                    reg.networks.insert(rec.id, net);
                }
                Err(e) => warnings.push(format!("network {}: {e}", rec.id)),
            }
        }
        for m in records.members {
            let Some(net) = reg.networks.get_mut(&m.network) else {
                warnings.push(format!("member {} of missing network", m.member.public_key));
                continue;
            };
            if let Err(e) = net.alloc.reserve(m.member.ip) {
                warnings.push(format!("member {}: {e}", m.member.public_key));
                continue;
            }
            net.instances
                .insert(m.member.instance.clone(), m.member.public_key);
            net.catalog.add(&m.member);
            net.members.insert(m.member.public_key, m);
        }
        let now_s = unix(now);
        for (id, ip, until) in records.quarantine {
            if let (Some(net), true) = (reg.networks.get_mut(&id), until > now_s) {
                net.alloc
                    .quarantine_until(ip, UNIX_EPOCH + Duration::from_secs(until));
            }
        }
        for t in records.tokens {
            reg.tokens.insert(t.hash, t);
        }
        for r in records.services {
            match reg.networks.get_mut(&r.network) {
                Some(net) => {
                    net.services.insert(r.group.name.clone(), r);
                }
                None => warnings.push(format!("service group {} of missing network", r.group.name)),
            }
        }
        reg.load_log(records.log);
        (reg, warnings)
    }

    /// The network with this id or name.
    pub fn resolve(&self, id_or_name: &str) -> Result<NetworkId, AdminError> {
        if let Ok(id) = id_or_name.parse::<NetworkId>() {
            if self.networks.contains_key(&id) {
                return Ok(id);
            }
        }
        self.names
            .get(id_or_name)
            .copied()
            .ok_or_else(|| AdminError::UnknownNetwork(id_or_name.to_owned()))
    }

    /// All networks, by name.
    pub fn networks(&self) -> Vec<NetworkRecord> {
        let mut out: Vec<_> = self.networks.values().map(|n| n.rec.clone()).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// One network's record.
    pub fn network(&self, id: NetworkId) -> Option<&NetworkRecord> {
        self.networks.get(&id).map(|n| &n.rec)
    }

    /// Number of members of a network.
    pub fn member_count(&self, id: NetworkId) -> usize {
        self.networks.get(&id).map_or(0, |n| n.members.len())
    }

    /// Creates a network.
    pub fn create_network(
        &mut self,
        name: &str,
        range: Ipv4Net,
        now: SystemTime,
    ) -> Result<(NetworkRecord, Vec<StoreOp>), AdminError> {
        validate::network_name(name).map_err(|reason| AdminError::BadName {
            name: name.to_owned(),
            reason,
        })?;
        if self.names.contains_key(name) {
            return Err(AdminError::NameTaken(name.to_owned()));
        }
        let twin = validate::skeleton(name);
        if let Some(existing) = self.names.keys().find(|n| validate::skeleton(n) == twin) {
            return Err(AdminError::LookAlike {
                name: name.to_owned(),
                existing: existing.clone(),
            });
        }
        validate::range(range).map_err(AdminError::BadRange)?;
        let rec = NetworkRecord {
            id: NetworkId::random(),
            name: name.to_owned(),
            range,
            generation: 0,
            created: unix(now),
            expire_after: None,
            service_range: meshlib::netmap::default_service_range(range),
            addresses: Default::default(),
            tenant: None,
        };
        let net = Network::new(rec.clone(), self.quarantine)
            .map_err(|e| AdminError::BadRange(e.to_string()))?;
        self.names.insert(rec.name.clone(), rec.id);
        self.networks.insert(rec.id, net);
        Ok((rec.clone(), vec![StoreOp::PutNetwork(rec)]))
    }

    /// Creates a join token with this secret.
    #[allow(clippy::too_many_arguments)]
    pub fn create_token(
        &mut self,
        network: NetworkId,
        secret: &Secret,
        uses: u32,
        ttl: Duration,
        service: Option<String>,
        process_type: Option<ProcessType>,
        now: SystemTime,
    ) -> Result<(TokenRecord, Vec<StoreOp>), AdminError> {
        if !self.networks.contains_key(&network) {
            return Err(AdminError::UnknownNetwork(network.to_string()));
        }
        if uses == 0 {
            return Err(AdminError::BadUses);
        }
        validate::token_ttl(ttl).map_err(AdminError::BadExpiry)?;
        if let Some(s) = &service {
            validate::service(s).map_err(AdminError::BadBinding)?;
        }
        let hash = sha256(secret);
        let rec = TokenRecord {
            id: format!("tk-{}", &meshlib::proto::hex(&hash)[..12]),
            hash,
            network,
            uses_left: uses,
            expires: unix(now).saturating_add(ttl.as_secs()),
            service,
            process_type,
            created: unix(now),
            service_group: None,
            ephemeral: false,
        };
        self.tokens.insert(hash, rec.clone());
        Ok((rec.clone(), vec![StoreOp::PutToken(rec)]))
    }

    /// Tokens of a network.
    pub fn tokens(&self, network: NetworkId) -> Vec<TokenRecord> {
        let mut out: Vec<_> = self
            .tokens
            .values()
            .filter(|t| t.network == network)
            .cloned()
            .collect();
        out.sort_by_key(|t| t.created);
        out
    }

    /// Deletes a token by its public id.
    pub fn delete_token(
        &mut self,
        network: NetworkId,
        id: &str,
    ) -> Result<Vec<StoreOp>, AdminError> {
        let hash = self
            .tokens
            .values()
            .find(|t| t.network == network && t.id == id)
            .map(|t| t.hash)
            .ok_or_else(|| AdminError::UnknownToken(id.to_owned()))?;
        self.tokens.remove(&hash);
        Ok(vec![StoreOp::DeleteToken(hash)])
    }

    /// Members of a network, by IP.
    pub fn members(&self, network: NetworkId) -> Vec<MemberInfo> {
        let Some(net) = self.networks.get(&network) else {
            return vec![];
        };
        let mut out: Vec<_> = net
            .members
            .values()
            .map(|r| MemberInfo {
                member: r.member.clone(),
                joined: r.joined,
                last_seen: r.last_seen,
                offline_since: r.offline_since,
                ephemeral: r.ephemeral,
            })
            .collect();
        out.sort_by_key(|m| m.member.ip);
        out
    }

    /// The current map of a network.
    pub fn snapshot(&self, network: NetworkId) -> Option<NetworkMap> {
        self.networks.get(&network).map(Network::snapshot)
    }

    /// Checks a token against a join request without using it.
    fn check_token(&self, req: &JoinRequest, now: SystemTime) -> Result<[u8; 32], ProtoOpError> {
        let hash = sha256(&req.token_secret);
        let tok = self
            .tokens
            .get(&hash)
            .filter(|t| t.network == req.network)
            .ok_or(ProtoOpError::InvalidToken)?;
        if unix(now) >= tok.expires {
            return Err(ProtoOpError::TokenExpired);
        }
        if tok.uses_left == 0 {
            return Err(ProtoOpError::TokenUsedUp);
        }
        if let Some(s) = tok.service.as_ref().filter(|s| **s != req.service) {
            return Err(ProtoOpError::TokenBinding(format!("service {s:?}")));
        }
        if let Some(p) = tok
            .process_type
            .as_ref()
            .filter(|p| **p != req.process_type)
        {
            return Err(ProtoOpError::TokenBinding(format!("process type {p}")));
        }
        Ok(hash)
    }

    /// Most service ports a member may declare.
    pub const MAX_PORTS: usize = 64;
    /// Most endpoints a member may advertise.
    pub const MAX_ENDPOINTS: usize = 16;
    /// Longest service name and runner label, in bytes.
    pub const MAX_LABEL: usize = validate::MAX_LABEL;

    /// Checks the size limits and characters of a join's metadata.
    fn check_metadata(req: &JoinRequest) -> Result<(), ProtoOpError> {
        let bad = |what: String| Err(ProtoOpError::InvalidMetadata(what));
        validate::service(&req.service).map_err(ProtoOpError::InvalidMetadata)?;
        validate::runner(&req.runner).map_err(ProtoOpError::InvalidMetadata)?;
        if req.endpoints.len() > Self::MAX_ENDPOINTS {
            return bad(format!("at most {} endpoints", Self::MAX_ENDPOINTS));
        }
        if req.ports.len() > Self::MAX_PORTS || req.ports.contains(&0) {
            return bad(format!("at most {} ports, none of them 0", Self::MAX_PORTS));
        }
        Ok(())
    }

    /// Joins a member. `credential` is the fresh secret the driver generated;
    /// only its hash is kept. The join lands in a new slot or takes an
    /// existing one over (see the `slots` module: the numbering rule,
    /// `--instance`, `--replace`, ephemeral members, reclaiming addresses).
    ///
    /// A join with a key that is already a member is a retry when it comes
    /// with the same token and metadata, the member never used its
    /// credential and no session of it is open (`key_online`, which the
    /// driver knows): the welcome was lost, e.g. the keyserver was killed
    /// right after the commit. It gets that membership back with
    /// `credential` and uses nothing of the token, which may be used up by
    /// now.
    pub fn join(
        &mut self,
        req: &JoinRequest,
        observed: SocketAddr,
        credential: &Secret,
        key_online: bool,
        now: SystemTime,
    ) -> Result<Joined, ProtoOpError> {
        let net = self
            .networks
            .get(&req.network)
            .ok_or(ProtoOpError::UnknownNetwork(req.network))?;
        Self::check_metadata(req)?;
        if net.members.contains_key(&req.public_key) {
            return self.rejoin(req, observed, credential, key_online, now);
        }
        let token_hash = self.check_token(req, now)?;
        let token = &self.tokens[&token_hash];
        let app_id = app_id_for(net, &req.service, req.app_id.as_ref());
        let landing = net.landing(req, &app_id)?;
        let instance = landing.instance(net);
        let plan = services::plan_join(
            net,
            req,
            token.service_group.as_ref(),
            &instance,
            credential,
            &self.service_domain,
        )?;
        if let Some(g) = &plan.owned {
            self.check_other_networks(req.network, g, &[g.fqdn.as_str()])
                .map_err(|e| ProtoOpError::InvalidMetadata(format!("--publish: {e}")))?;
        }
        let input = slots::JoinInputs {
            req,
            observed,
            credential,
            token_hash,
            ephemeral: req.ephemeral || token.ephemeral,
            plan,
            now,
        };
        match landing {
            slots::Landing::Takeover { old } => Ok(self.take_over(old, input)),
            slots::Landing::New {
                index,
                instance,
                evict,
            } => self.new_slot(index, instance, evict, app_id, input),
        }
    }

    /// A join whose key is already a member: the membership back with a new
    /// credential if it is a retry of the join that made it (see
    /// [`Registry::join`]), else [`ProtoOpError::KeyInUse`] saying why not.
    /// The token record is not consulted: its secret's hash, kept on the
    /// member, is the proof, and a used-up or collected token still counts.
    fn rejoin(
        &mut self,
        req: &JoinRequest,
        observed: SocketAddr,
        credential: &Secret,
        key_online: bool,
        now: SystemTime,
    ) -> Result<Joined, ProtoOpError> {
        let log_cap = self.log_cap;
        let net = self
            .networks
            .get_mut(&req.network)
            .ok_or(ProtoOpError::UnknownNetwork(req.network))?;
        let rec = net
            .members
            .get_mut(&req.public_key)
            .ok_or_else(|| ProtoOpError::KeyInUse("vanished".into()))?;
        let in_use = |why: &str| Err(ProtoOpError::KeyInUse(why.to_owned()));
        if rec.token_hash != Some(sha256(&req.token_secret)) {
            return in_use("it joined with another token");
        }
        let m = &rec.member;
        let same_meta = m.service == req.service
            && m.process_type == req.process_type
            && req.instance.as_ref().is_none_or(|i| *i == m.instance);
        if !same_meta {
            return in_use("its service, process type or instance name differ from this join's");
        }
        if rec.credential_used {
            return in_use("its credential has been used since it joined");
        }
        if key_online {
            // A retry, but the first session is not known to be gone yet.
            return Err(ProtoOpError::SessionOpen);
        }
        rec.credential_hash = sha256(credential);
        rec.last_seen = unix(now);
        let before = rec.member.clone();
        rec.member.endpoints = resolved_endpoints(&req.endpoints, observed);
        rec.member.ports = dedup_ports(&req.ports);
        rec.member.runner.clone_from(&req.runner);
        lifecycle::set_online(rec);
        let changed = rec.member != before;
        let (member, stored) = (rec.member.clone(), StoreOp::PutMember(rec.clone()));
        let mut ops = vec![stored];
        let change = changed.then(|| {
            let mut changes = vec![MapChange::Upsert(member.clone())];
            changes.extend(net.note_address_ports(&member.service, &member.ports));
            let (change, net_op) = net.record(changes, None, log_cap);
            ops.push(net_op);
            change
        });
        Ok(Joined {
            network: net.rec.id,
            generation: net.rec.generation,
            member,
            changes: change.into_iter().collect(),
            replaced: None,
            rejoined: true,
            ops,
        })
    }

    /// Notes that a member showed it holds its credential (see
    /// [`MemberRecord::credential_used`]). Returns the write if it changed
    /// anything.
    pub fn confirm_credential(&mut self, network: NetworkId, key: &PublicKey) -> Vec<StoreOp> {
        let rec = self
            .networks
            .get_mut(&network)
            .and_then(|n| n.members.get_mut(key));
        match rec {
            Some(rec) if !rec.credential_used => {
                rec.credential_used = true;
                vec![StoreOp::PutMember(rec.clone())]
            }
            _ => vec![],
        }
    }

    /// The member with this key, if the credential matches.
    fn authenticate(
        &self,
        network: NetworkId,
        key: &PublicKey,
        credential: &Secret,
    ) -> Result<&MemberRecord, ProtoOpError> {
        let rec = self
            .networks
            .get(&network)
            .and_then(|n| n.members.get(key))
            .ok_or(ProtoOpError::BadCredential)?;
        let ok: bool = rec.credential_hash.ct_eq(&sha256(credential)).into();
        if ok {
            Ok(rec)
        } else {
            Err(ProtoOpError::BadCredential)
        }
    }

    /// Resumes a member: checks its credential, updates its endpoints, and
    /// says how to catch it up from `req.generation` (the catch-up includes
    /// the endpoint change).
    pub fn resume(
        &mut self,
        req: &ResumeRequest,
        observed: SocketAddr,
        now: SystemTime,
    ) -> Result<Resumed, ProtoOpError> {
        self.authenticate(req.network, &req.public_key, &req.credential)?;
        // One change for everything a return brings: endpoints, and online
        // again if it was offline.
        let eps = resolved_endpoints(&req.endpoints, observed);
        let (change, ops) = self.update_member(req.network, &req.public_key, now, |rec| {
            rec.member.endpoints = eps;
            lifecycle::set_online(rec);
            // It holds its credential: a retried join no longer takes it.
            rec.credential_used = true;
        });
        let net = &self.networks[&req.network];
        let catchup = net.catchup(req.generation);
        let member = net.members[&req.public_key].member.clone();
        Ok(Resumed {
            member,
            catchup,
            change,
            ops,
        })
    }

    /// Records new endpoints (plus the observed address, see
    /// [`observed_endpoint`]) of a member; a
    /// change only if they differ.
    pub fn update_endpoints(
        &mut self,
        network: NetworkId,
        key: &PublicKey,
        endpoints: &[SocketAddr],
        observed: SocketAddr,
        now: SystemTime,
    ) -> (Option<Change>, Vec<StoreOp>) {
        let eps = resolved_endpoints(endpoints, observed);
        self.update_member(network, key, now, |rec| rec.member.endpoints = eps)
    }

    /// Records the ports a member's instance serves (out-of-bounds lists are
    /// ignored: at most [`Self::MAX_PORTS`], none 0).
    pub fn update_ports(
        &mut self,
        network: NetworkId,
        key: &PublicKey,
        ports: &[u16],
    ) -> (Option<Change>, Vec<StoreOp>) {
        let log_cap = self.log_cap;
        if ports.len() > Self::MAX_PORTS || ports.contains(&0) {
            return (None, vec![]);
        }
        let Some(net) = self.networks.get_mut(&network) else {
            return (None, vec![]);
        };
        let Some(rec) = net.members.get_mut(key) else {
            return (None, vec![]);
        };
        let ports = dedup_ports(ports);
        if ports == rec.member.ports {
            return (None, vec![]);
        }
        rec.member.ports = ports;
        let member = rec.member.clone();
        let stored = StoreOp::PutMember(rec.clone());
        let mut changes = vec![MapChange::Upsert(member.clone())];
        // The service's address remembers the ports too (for members
        // started while the service has no instance).
        changes.extend(net.note_address_ports(&member.service, &member.ports));
        let (change, net_op) = net.record(changes, None, log_cap);
        (Some(change), vec![stored, net_op])
    }

    /// A member's map entry (for its relay ticket).
    pub fn member(&self, network: NetworkId, key: &PublicKey) -> Option<&Member> {
        let net = self.networks.get(&network)?;
        net.members.get(key).map(|r| &r.member)
    }

    /// Whether the member still exists.
    pub fn is_member(&self, network: NetworkId, key: &PublicKey) -> bool {
        self.networks
            .get(&network)
            .is_some_and(|n| n.members.contains_key(key))
    }

    /// The catch-up for a member at `generation`.
    pub fn catchup(&self, network: NetworkId, generation: u64) -> Option<Catchup> {
        self.networks.get(&network).map(|n| n.catchup(generation))
    }

    /// Removes (revokes) a member, found by public key or instance name.
    pub fn remove_member(
        &mut self,
        network: NetworkId,
        key_or_instance: &str,
        now: SystemTime,
    ) -> Result<(Change, Vec<StoreOp>), AdminError> {
        let net = self
            .networks
            .get(&network)
            .ok_or_else(|| AdminError::UnknownNetwork(network.to_string()))?;
        let unknown = || AdminError::UnknownMember(key_or_instance.to_owned());
        let key = match key_or_instance.parse::<PublicKey>() {
            Ok(k) => k,
            Err(_) => {
                let name: InstanceName = key_or_instance.parse().map_err(|_| unknown())?;
                *net.instances.get(&name).ok_or_else(unknown)?
            }
        };
        self.remove_key(network, key, now, false)
    }

    /// Removes a member by key: its slot is freed, its address quarantined
    /// from when it stopped being named (when it went offline, or now), its
    /// own service groups deleted and it leaves the others (seed 002).
    /// `expired`: the lifecycle freed it (expiry, an ephemeral member,
    /// reclaimed), not a revocation or a leave: the slot keeps a claim on
    /// its address ([`Network::released`]).
    pub(super) fn remove_key(
        &mut self,
        network: NetworkId,
        key: PublicKey,
        now: SystemTime,
        expired: bool,
    ) -> Result<(Change, Vec<StoreOp>), AdminError> {
        let log_cap = self.log_cap;
        let net = self
            .networks
            .get_mut(&network)
            .ok_or_else(|| AdminError::UnknownNetwork(network.to_string()))?;
        let rec = net
            .members
            .remove(&key)
            .ok_or_else(|| AdminError::UnknownMember(key.to_string()))?;
        net.catalog.remove(&rec.member);
        if net.instances.get(&rec.member.instance) == Some(&key) {
            net.instances.remove(&rec.member.instance);
        }
        let unnamed = rec
            .offline_since
            .map_or(now, |s| UNIX_EPOCH + Duration::from_secs(s))
            .min(now);
        let until = net
            .alloc
            .release_since(rec.member.ip, unnamed)
            .map_or(0, unix);
        if !expired {
            let ip = rec.member.ip;
            net.released.retain(|_, f| f.ip != ip);
        } else if net.released.len() >= net.alloc.capacity() {
            // Bounded by the range: forget slots whose address moved on.
            let alloc = &net.alloc;
            net.released.retain(|_, f| !alloc.in_use(f.ip));
        }
        if expired {
            net.released.insert(
                rec.member.instance.clone(),
                network::FreedSlot {
                    ip: rec.member.ip,
                    service: rec.member.service.clone(),
                    app_id: rec.member.app_id.clone(),
                    process_type: rec.member.process_type.clone(),
                },
            );
        }
        let (service_changes, service_ops) = services::instance_gone(net, &rec.member.instance);
        let mut changes = vec![MapChange::Remove(key)];
        changes.extend(service_changes);
        let (change, net_op) = net.record(changes, Some(key), log_cap);
        let mut ops = vec![StoreOp::DeleteMember(network, key)];
        if until > unix(now) {
            ops.push(StoreOp::PutQuarantine(network, rec.member.ip, until));
        } else {
            ops.push(StoreOp::DeleteQuarantine(network, rec.member.ip));
        }
        ops.push(net_op);
        ops.extend(service_ops);
        Ok((change, ops))
    }

    /// Makes every member joining with a token ephemeral (or not).
    pub fn set_token_ephemeral(
        &mut self,
        network: NetworkId,
        token_id: &str,
        ephemeral: bool,
    ) -> Result<(TokenRecord, Vec<StoreOp>), AdminError> {
        let tok = self
            .tokens
            .values_mut()
            .find(|t| t.network == network && t.id == token_id)
            .ok_or_else(|| AdminError::UnknownToken(token_id.to_owned()))?;
        tok.ephemeral = ephemeral;
        Ok((tok.clone(), vec![StoreOp::PutToken(tok.clone())]))
    }

    /// Deletes a network with its tokens and quarantine entries. A network
    /// with members is refused unless `force`, which removes every member
    /// first (each removal is a change, so every member's session ends as
    /// revoked).
    pub fn delete_network(
        &mut self,
        network: NetworkId,
        force: bool,
        now: SystemTime,
    ) -> Result<(Vec<Change>, Vec<StoreOp>), AdminError> {
        let net = self
            .networks
            .get(&network)
            .ok_or_else(|| AdminError::UnknownNetwork(network.to_string()))?;
        if !force && !net.members.is_empty() {
            return Err(AdminError::NetworkInUse {
                network: net.rec.name.clone(),
                members: net.members.len(),
            });
        }
        let keys: Vec<PublicKey> = net.members.keys().copied().collect();
        let mut changes = Vec::with_capacity(keys.len());
        let mut ops = Vec::new();
        for key in keys {
            let (change, mut removed) = self.remove_member(network, &key.to_string(), now)?;
            changes.push(change);
            // The quarantine and network writes of each removal are moot.
            removed
                .retain(|op| matches!(op, StoreOp::DeleteMember(..) | StoreOp::DeleteService(..)));
            ops.append(&mut removed);
        }
        let net = self.networks.remove(&network).expect("checked above");
        self.names.remove(&net.rec.name);
        ops.extend(
            net.services
                .keys()
                .map(|name| StoreOp::DeleteService(network, name.clone())),
        );
        ops.extend(
            net.alloc
                .quarantined()
                .map(|(ip, _)| StoreOp::DeleteQuarantine(network, ip)),
        );
        let tokens: Vec<[u8; 32]> = self
            .tokens
            .values()
            .filter(|t| t.network == network)
            .map(|t| t.hash)
            .collect();
        for hash in tokens {
            self.tokens.remove(&hash);
            ops.push(StoreOp::DeleteToken(hash));
        }
        ops.push(StoreOp::DeleteNetwork(network));
        Ok((changes, ops))
    }

    /// Forgets tokens that can no longer admit anyone: expired at `now` or
    /// used up. A retried join does not need them (see [`Registry::join`]).
    pub fn collect_tokens(&mut self, now: SystemTime) -> Vec<StoreOp> {
        let now = unix(now);
        let dead: Vec<[u8; 32]> = self
            .tokens
            .values()
            .filter(|t| t.uses_left == 0 || t.expires <= now)
            .map(|t| t.hash)
            .collect();
        dead.into_iter()
            .map(|hash| {
                self.tokens.remove(&hash);
                StoreOp::DeleteToken(hash)
            })
            .collect()
    }
}

/// The WireGuard endpoint the keyserver can vouch for: the address it
/// observed the member's control connection come from (the member's public
/// address behind NAT), with the port of the member's first advertised
/// endpoint. The observed port is the QUIC socket's, which says nothing about
/// the WireGuard socket, so without an advertised endpoint there is nothing to
/// add. `None` also when the advertised list already holds it.
pub fn observed_endpoint(advertised: &[SocketAddr], observed: SocketAddr) -> Option<SocketAddr> {
    let port = advertised.first()?.port();
    let seen = SocketAddr::new(observed.ip().to_canonical(), port);
    (!advertised.contains(&seen)).then_some(seen)
}

/// A member's endpoints: the advertised ones (at most
/// [`Registry::MAX_ENDPOINTS`]), then the observed one.
pub(super) fn resolved_endpoints(
    advertised: &[SocketAddr],
    observed: SocketAddr,
) -> Vec<SocketAddr> {
    let mut eps: Vec<SocketAddr> = advertised
        .iter()
        .take(Registry::MAX_ENDPOINTS)
        .copied()
        .collect();
    if let Some(seen) = observed_endpoint(&eps, observed) {
        eps.push(seen);
    }
    eps
}

/// The app id a joining member of `service` gets: the keyserver decides.
/// It is the id of the service's existing members, or of its freed slots
/// (a service whose last instance just went keeps its names); for a
/// service new to the network, the client's `hint` if it has the
/// keyserver's own `ap-<uuid>` form and no other service uses it (as app
/// id or as `.warp` label, both of which name members in DNS), else a
/// fresh `ap-<uuid>`. So a member can never place itself under another
/// service's names.
fn app_id_for(net: &Network, service: &str, hint: Option<&AppId>) -> AppId {
    if let Some(id) = net.catalog.service_app(service) {
        return id.clone();
    }
    let freed = net
        .released
        .values()
        .find(|f| f.service == service && !net.catalog.app_taken(&f.app_id));
    if let Some(f) = freed {
        return f.app_id.clone();
    }
    let usable = |hint: &&AppId| {
        let shaped = hint
            .as_str()
            .strip_prefix("ap-")
            .and_then(|u| uuid::Uuid::try_parse(u).ok())
            .is_some_and(|u| u.hyphenated().to_string() == hint.as_str()[3..]);
        shaped && !net.catalog.app_taken(hint)
    };
    hint.filter(usable).cloned().unwrap_or_else(AppId::random)
}

/// A member's declared ports, sorted, without duplicates.
pub(super) fn dedup_ports(ports: &[u16]) -> Vec<u16> {
    let mut p = ports.to_vec();
    p.sort_unstable();
    p.dedup();
    p
}
