//! The pure core of the keyserver: networks, join tokens, members, address
//! allocation and the per-network change log. No I/O, no clock: every method
//! that depends on time takes `now`.
//!
//! Call order: build with [`Registry::load`] from the store's records, then
//! call operations. Every mutating operation validates first (an error leaves
//! the registry unchanged), then applies the change in memory and returns the
//! [`StoreOp`]s the driver must commit and, for member changes, the
//! [`Change`] (one [`MapDelta`]) to push to the network's members.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::Ipv4Net;
use meshlib::ids::{AppId, InstanceName, NetworkId, ProcessType};
use meshlib::ipam::{Allocator, IpamError};
use meshlib::keys::PublicKey;
use meshlib::netmap::{MapChange, MapDelta, Member, NetworkMap};
use meshlib::proto::{sha256, ErrorCode, JoinRequest, ResumeRequest, Secret};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

/// Seconds since the Unix epoch (the stored form of times).
pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A stored network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    /// `pn-<uuid>`.
    pub id: NetworkId,
    /// Human name, unique on this keyserver.
    pub name: String,
    /// Address range.
    pub range: Ipv4Net,
    /// Current generation of the network map; stored with every change so a
    /// restart continues the sequence and resumes stay correct.
    pub generation: u64,
    /// Creation time (Unix seconds).
    pub created: u64,
}

/// A stored join token (never the secret: only its SHA-256).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Short public id (`tk-` + 12 hex digits of the hash), for listing and deletion.
    pub id: String,
    /// SHA-256 of the secret (not shown by the admin API).
    pub hash: [u8; 32],
    /// The network it lets members join.
    pub network: NetworkId,
    /// Joins left.
    pub uses_left: u32,
    /// Expiry (Unix seconds).
    pub expires: u64,
    /// If set, only members of this service may join with it.
    pub service: Option<String>,
    /// If set, only members of this process type may join with it.
    pub process_type: Option<ProcessType>,
    /// Creation time (Unix seconds).
    pub created: u64,
}

/// A stored member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// The member's network.
    pub network: NetworkId,
    /// What every peer sees.
    pub member: Member,
    /// SHA-256 of the reconnect credential.
    pub credential_hash: [u8; 32],
    /// Join time (Unix seconds).
    pub joined: u64,
    /// Last contact (Unix seconds): join, resume, heartbeat, endpoint update.
    pub last_seen: u64,
}

/// One write for the store; a list of them is committed atomically.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoreOp {
    /// Insert or replace a network.
    PutNetwork(NetworkRecord),
    /// Insert or replace a token.
    PutToken(TokenRecord),
    /// Delete a token by hash.
    DeleteToken([u8; 32]),
    /// Insert or replace a member.
    PutMember(MemberRecord),
    /// Delete a member.
    DeleteMember(NetworkId, PublicKey),
    /// Keep an address in quarantine until a time (Unix seconds).
    PutQuarantine(NetworkId, Ipv4Addr, u64),
    /// Forget a quarantine entry.
    DeleteQuarantine(NetworkId, Ipv4Addr),
}

/// Everything the store holds, as loaded at start.
#[derive(Debug, Clone, Default)]
pub struct Records {
    /// All networks.
    pub networks: Vec<NetworkRecord>,
    /// All tokens.
    pub tokens: Vec<TokenRecord>,
    /// All members.
    pub members: Vec<MemberRecord>,
    /// Quarantined addresses.
    pub quarantine: Vec<(NetworkId, Ipv4Addr, u64)>,
}

/// A change to push: one delta of one network.
#[derive(Debug, Clone)]
pub struct Change {
    /// The network.
    pub network: NetworkId,
    /// The delta (from the previous generation to the new one).
    pub delta: MapDelta,
    /// The member removed by this change, if any (its own session ends).
    pub removed: Option<PublicKey>,
}

/// How to bring a member up to date.
#[derive(Debug, Clone)]
pub enum Catchup {
    /// Nothing missed.
    UpToDate,
    /// The missed changes, merged into one delta.
    Delta(MapDelta),
    /// Too old (or from the future): the whole map.
    Snapshot(NetworkMap),
}

/// Result of a join.
#[derive(Debug, Clone)]
pub struct Joined {
    /// The new member.
    pub member: Member,
    /// The map including the new member.
    pub map: NetworkMap,
    /// The change to push to the others.
    pub change: Change,
    /// Writes to commit.
    pub ops: Vec<StoreOp>,
}

/// Result of a resume.
#[derive(Debug, Clone)]
pub struct Resumed {
    /// The member as stored.
    pub member: Member,
    /// What to send first.
    pub catchup: Catchup,
    /// An endpoint change to push, if the endpoints changed.
    pub change: Option<Change>,
    /// Writes to commit.
    pub ops: Vec<StoreOp>,
}

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
    /// The public key is already a member of the network.
    #[error("public key is already a member; resume with its credential")]
    KeyInUse,
    /// The instance name is taken.
    #[error("instance name {0} is taken in this network")]
    InstanceTaken(InstanceName),
    /// No free address.
    #[error("{0}")]
    NetworkFull(IpamError),
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
            Self::KeyInUse => ErrorCode::KeyInUse,
            Self::InstanceTaken(_) => ErrorCode::InstanceTaken,
            Self::NetworkFull(_) => ErrorCode::NetworkFull,
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
    /// The name is empty, too long, or looks like a network id.
    #[error("invalid network name {0:?}: 1-64 printable characters, not starting with 'pn-'")]
    BadName(String),
    /// The range is unusable.
    #[error("invalid range: {0}")]
    BadRange(IpamError),
    /// Uses must be at least 1.
    #[error("a token needs at least one use")]
    BadUses,
    /// No such member.
    #[error("unknown member {0:?}")]
    UnknownMember(String),
    /// No such token.
    #[error("unknown token {0:?}")]
    UnknownToken(String),
}

/// A member as the admin API lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberInfo {
    /// The member.
    #[serde(flatten)]
    pub member: Member,
    /// Join time (Unix seconds).
    pub joined: u64,
    /// Last contact (Unix seconds).
    pub last_seen: u64,
}

/// One network in memory.
#[derive(Debug)]
struct Network {
    rec: NetworkRecord,
    alloc: Allocator,
    members: BTreeMap<PublicKey, MemberRecord>,
    instances: HashMap<InstanceName, PublicKey>,
    /// Recent deltas, oldest first, contiguous, ending at `rec.generation`.
    log: VecDeque<MapDelta>,
}

impl Network {
    fn new(rec: NetworkRecord, quarantine: Duration) -> Result<Self, IpamError> {
        Ok(Self {
            alloc: Allocator::new(rec.range, quarantine)?,
            rec,
            members: BTreeMap::new(),
            instances: HashMap::new(),
            log: VecDeque::new(),
        })
    }

    fn snapshot(&self) -> NetworkMap {
        let mut map = NetworkMap::new(self.rec.id, self.rec.name.clone(), self.rec.range);
        map.generation = self.rec.generation;
        map.members = self
            .members
            .iter()
            .map(|(k, r)| (*k, r.member.clone()))
            .collect();
        map
    }

    /// Bumps the generation with one change; returns the change and the
    /// network record write.
    fn record(
        &mut self,
        change: MapChange,
        removed: Option<PublicKey>,
        cap: usize,
    ) -> (Change, StoreOp) {
        let from = self.rec.generation;
        self.rec.generation += 1;
        let delta = MapDelta {
            from,
            to: self.rec.generation,
            changes: vec![change],
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

    fn catchup(&self, generation: u64) -> Catchup {
        let now = self.rec.generation;
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

    fn lowest_free_index(&self, app: &AppId, ptype: &ProcessType) -> u32 {
        let mut taken: Vec<u32> = self
            .members
            .values()
            .filter(|r| &r.member.app_id == app && &r.member.process_type == ptype)
            .map(|r| r.member.index)
            .collect();
        taken.sort_unstable();
        let mut next = 1;
        for i in taken {
            if i == next {
                next += 1;
            } else if i > next {
                break;
            }
        }
        next
    }
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
        let bad_name = name.is_empty()
            || name.len() > 64
            || name.starts_with("pn-")
            || name.chars().any(|c| c.is_control() || c == '/');
        if bad_name {
            return Err(AdminError::BadName(name.to_owned()));
        }
        if self.names.contains_key(name) {
            return Err(AdminError::NameTaken(name.to_owned()));
        }
        let rec = NetworkRecord {
            id: NetworkId::random(),
            name: name.to_owned(),
            range,
            generation: 0,
            created: unix(now),
        };
        let net = Network::new(rec.clone(), self.quarantine).map_err(AdminError::BadRange)?;
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

    /// Most endpoints a member may advertise.
    pub const MAX_ENDPOINTS: usize = 16;
    /// Longest service name and runner label, in bytes.
    pub const MAX_LABEL: usize = 128;

    /// Checks the size limits of a join's metadata.
    fn check_metadata(req: &JoinRequest) -> Result<(), ProtoOpError> {
        let bad = |what: String| Err(ProtoOpError::InvalidMetadata(what));
        if req.service.is_empty() || req.service.len() > Self::MAX_LABEL {
            return bad(format!("service name must be 1-{} bytes", Self::MAX_LABEL));
        }
        if req.runner.len() > Self::MAX_LABEL {
            return bad(format!(
                "runner label must be at most {} bytes",
                Self::MAX_LABEL
            ));
        }
        if req.endpoints.len() > Self::MAX_ENDPOINTS {
            return bad(format!("at most {} endpoints", Self::MAX_ENDPOINTS));
        }
        Ok(())
    }

    /// Joins a member. `credential` is the fresh secret the driver generated;
    /// only its hash is kept.
    pub fn join(
        &mut self,
        req: &JoinRequest,
        observed: SocketAddr,
        credential: &Secret,
        now: SystemTime,
    ) -> Result<Joined, ProtoOpError> {
        let net = self
            .networks
            .get(&req.network)
            .ok_or(ProtoOpError::UnknownNetwork(req.network))?;
        Self::check_metadata(req)?;
        let token_hash = self.check_token(req, now)?;
        if net.members.contains_key(&req.public_key) {
            return Err(ProtoOpError::KeyInUse);
        }
        if let Some(name) = req
            .instance
            .as_ref()
            .filter(|n| net.instances.contains_key(n))
        {
            return Err(ProtoOpError::InstanceTaken(name.clone()));
        }
        let app_id = req.app_id.clone().unwrap_or_else(|| {
            net.members
                .values()
                .find(|r| r.member.service == req.service)
                .map_or_else(AppId::random, |r| r.member.app_id.clone())
        });
        let index = net.lowest_free_index(&app_id, &req.process_type);
        let instance = match &req.instance {
            Some(name) => name.clone(),
            None => default_instance(net, &app_id, &req.process_type, index),
        };
        let log_cap = self.log_cap;
        let net = self.networks.get_mut(&req.network).expect("checked above");
        // Last fallible step: the allocation. Nothing has changed before it.
        let ip = net.alloc.allocate(now).map_err(ProtoOpError::NetworkFull)?;
        let mut endpoints = req.endpoints.clone();
        if !endpoints.contains(&observed) {
            endpoints.push(observed);
        }
        let member = Member {
            public_key: req.public_key,
            ip,
            endpoints,
            service: req.service.clone(),
            app_id,
            process_type: req.process_type.clone(),
            index,
            instance,
            runner: req.runner.clone(),
        };
        let rec = MemberRecord {
            network: req.network,
            member: member.clone(),
            credential_hash: sha256(credential),
            joined: unix(now),
            last_seen: unix(now),
        };
        net.instances
            .insert(member.instance.clone(), member.public_key);
        net.members.insert(member.public_key, rec.clone());
        let (change, net_op) = net.record(MapChange::Upsert(member.clone()), None, log_cap);
        let map = net.snapshot();
        let tok = self.tokens.get_mut(&token_hash).expect("checked above");
        tok.uses_left -= 1;
        let ops = vec![
            StoreOp::PutToken(tok.clone()),
            StoreOp::PutMember(rec),
            StoreOp::DeleteQuarantine(req.network, ip),
            net_op,
        ];
        Ok(Joined {
            member,
            map,
            change,
            ops,
        })
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
        let (change, ops) =
            self.update_endpoints(req.network, &req.public_key, &req.endpoints, observed, now);
        let catchup = self.networks[&req.network].catchup(req.generation);
        let member = self.networks[&req.network].members[&req.public_key]
            .member
            .clone();
        Ok(Resumed {
            member,
            catchup,
            change,
            ops,
        })
    }

    /// Records new endpoints (plus the observed address) of a member; a
    /// change only if they differ.
    pub fn update_endpoints(
        &mut self,
        network: NetworkId,
        key: &PublicKey,
        endpoints: &[SocketAddr],
        observed: SocketAddr,
        now: SystemTime,
    ) -> (Option<Change>, Vec<StoreOp>) {
        let log_cap = self.log_cap;
        let Some(net) = self.networks.get_mut(&network) else {
            return (None, vec![]);
        };
        let Some(rec) = net.members.get_mut(key) else {
            return (None, vec![]);
        };
        rec.last_seen = unix(now);
        let mut eps: Vec<SocketAddr> = endpoints
            .iter()
            .take(Self::MAX_ENDPOINTS)
            .copied()
            .collect();
        if !eps.contains(&observed) {
            eps.push(observed);
        }
        if eps == rec.member.endpoints {
            return (None, vec![]);
        }
        rec.member.endpoints = eps;
        let member = rec.member.clone();
        let stored = StoreOp::PutMember(rec.clone());
        let (change, net_op) = net.record(MapChange::Upsert(member), None, log_cap);
        (Some(change), vec![stored, net_op])
    }

    /// Notes a heartbeat (memory only; persisted with the next member write)
    /// and returns the network's generation.
    pub fn heartbeat(&mut self, network: NetworkId, key: &PublicKey, now: SystemTime) -> u64 {
        let Some(net) = self.networks.get_mut(&network) else {
            return 0;
        };
        if let Some(rec) = net.members.get_mut(key) {
            rec.last_seen = unix(now);
        }
        net.rec.generation
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
        let log_cap = self.log_cap;
        let net = self
            .networks
            .get_mut(&network)
            .ok_or_else(|| AdminError::UnknownNetwork(network.to_string()))?;
        let unknown = || AdminError::UnknownMember(key_or_instance.to_owned());
        let key = match key_or_instance.parse::<PublicKey>() {
            Ok(k) => k,
            Err(_) => {
                let name: InstanceName = key_or_instance.parse().map_err(|_| unknown())?;
                *net.instances.get(&name).ok_or_else(unknown)?
            }
        };
        let rec = net.members.remove(&key).ok_or_else(unknown)?;
        net.instances.remove(&rec.member.instance);
        net.alloc.release(rec.member.ip, now);
        let until = unix(now) + self.quarantine.as_secs();
        let (change, net_op) = net.record(MapChange::Remove(key), Some(key), log_cap);
        let ops = vec![
            StoreOp::DeleteMember(network, key),
            StoreOp::PutQuarantine(network, rec.member.ip, until),
            net_op,
        ];
        Ok((change, ops))
    }
}

/// Keeps only the last change of each member: changes to different members
/// commute, and a later change of one member supersedes its earlier ones, so
/// the result takes a map to the same state with at most one change per member.
fn compact<'a>(changes: impl Iterator<Item = &'a MapChange>) -> Vec<MapChange> {
    let key = |c: &MapChange| match c {
        MapChange::Upsert(m) => m.public_key,
        MapChange::Remove(k) => *k,
    };
    let all: Vec<&MapChange> = changes.collect();
    let last: HashMap<PublicKey, usize> =
        all.iter().enumerate().map(|(i, c)| (key(c), i)).collect();
    all.iter()
        .enumerate()
        .filter(|(i, c)| last[&key(c)] == *i)
        .map(|(_, c)| (*c).clone())
        .collect()
}

/// `<app>-<type>-<index>`, made unique with a numeric suffix if an explicit
/// name took it.
fn default_instance(net: &Network, app: &AppId, ptype: &ProcessType, index: u32) -> InstanceName {
    let base: String = format!("{app}-{ptype}-{index}");
    let mut n = 1u32;
    loop {
        let text = if n == 1 {
            base.clone()
        } else {
            format!("{base}-{n}")
        };
        let cut = text.len().min(63);
        let trimmed = text[..cut].trim_end_matches('-');
        if let Ok(name) = trimmed.parse::<InstanceName>() {
            if !net.instances.contains_key(&name) {
                return name;
            }
        }
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshlib::keys::PrivateKey;

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn req(net: NetworkId, secret: Secret, service: &str) -> JoinRequest {
        JoinRequest {
            network: net,
            token_secret: secret,
            public_key: PrivateKey::generate().public_key(),
            service: service.into(),
            app_id: None,
            process_type: ProcessType::default(),
            instance: None,
            runner: "r1".into(),
            endpoints: vec![],
        }
    }

    fn setup(range: &str, uses: u32) -> (Registry, NetworkId, Secret) {
        let (mut reg, _) = Registry::load(Records::default(), 4, Duration::from_secs(60), now());
        let (net, _) = reg
            .create_network("prod", range.parse().unwrap(), now())
            .unwrap();
        let secret = [1; 32];
        reg.create_token(
            net.id,
            &secret,
            uses,
            Duration::from_secs(3600),
            None,
            None,
            now(),
        )
        .unwrap();
        (reg, net.id, secret)
    }

    const OBS: &str = "127.0.0.1:5000";

    #[test]
    fn join_assigns_ip_index_name_and_logs() {
        let (mut reg, net, secret) = setup("10.240.0.0/22", 10);
        let a = reg
            .join(
                &req(net, secret, "api"),
                OBS.parse().unwrap(),
                &[2; 32],
                now(),
            )
            .unwrap();
        let b = reg
            .join(
                &req(net, secret, "api"),
                OBS.parse().unwrap(),
                &[3; 32],
                now(),
            )
            .unwrap();
        assert_eq!(a.member.ip, Ipv4Addr::new(10, 240, 0, 1));
        assert_eq!(b.member.ip, Ipv4Addr::new(10, 240, 0, 2));
        assert_eq!((a.member.index, b.member.index), (1, 2));
        assert_eq!(a.member.app_id, b.member.app_id);
        assert_ne!(a.member.instance, b.member.instance);
        assert_eq!(b.map.members.len(), 2);
        assert_eq!(b.change.delta.from, 1);
        assert_eq!(b.change.delta.to, 2);
        assert_eq!(reg.tokens(net)[0].uses_left, 8);
        // Catch-up by deltas, then by snapshot once the log (cap 4) is exceeded.
        match reg.catchup(net, 1).unwrap() {
            Catchup::Delta(d) => assert_eq!((d.from, d.to, d.changes.len()), (1, 2, 1)),
            other => panic!("{other:?}"),
        }
        for i in 0..4 {
            reg.join(
                &req(net, secret, "db"),
                OBS.parse().unwrap(),
                &[i; 32],
                now(),
            )
            .unwrap();
        }
        assert!(matches!(reg.catchup(net, 1), Some(Catchup::Snapshot(_))));
        assert!(matches!(reg.catchup(net, 6), Some(Catchup::UpToDate)));
        assert!(matches!(reg.catchup(net, 99), Some(Catchup::Snapshot(_))));
    }

    #[test]
    fn token_rules_leave_state_unchanged() {
        let (mut reg, net, secret) = setup("10.240.0.0/30", 1);
        let obs = OBS.parse().unwrap();
        assert_eq!(
            reg.join(&req(net, [9; 32], "api"), obs, &[2; 32], now())
                .unwrap_err(),
            ProtoOpError::InvalidToken
        );
        let later = now() + Duration::from_secs(7200);
        assert_eq!(
            reg.join(&req(net, secret, "api"), obs, &[2; 32], later)
                .unwrap_err(),
            ProtoOpError::TokenExpired
        );
        assert_eq!(reg.member_count(net), 0);
        assert_eq!(reg.tokens(net)[0].uses_left, 1);
        reg.join(&req(net, secret, "api"), obs, &[2; 32], now())
            .unwrap();
        assert_eq!(
            reg.join(&req(net, secret, "api"), obs, &[2; 32], now())
                .unwrap_err(),
            ProtoOpError::TokenUsedUp
        );
        // /30 has two hosts: a second token fills it, the third join is refused.
        let (t2, _) = reg
            .create_token(net, &[5; 32], 5, Duration::from_secs(60), None, None, now())
            .unwrap();
        reg.join(&req(net, [5; 32], "api"), obs, &[2; 32], now())
            .unwrap();
        let gen = reg.network(net).unwrap().generation;
        let err = reg
            .join(&req(net, [5; 32], "api"), obs, &[2; 32], now())
            .unwrap_err();
        assert!(matches!(err, ProtoOpError::NetworkFull(_)), "{err:?}");
        let left = reg
            .tokens(net)
            .into_iter()
            .find(|t| t.id == t2.id)
            .unwrap()
            .uses_left;
        assert_eq!(left, 4);
        assert_eq!(reg.network(net).unwrap().generation, gen);
    }

    #[test]
    fn resume_needs_the_credential_and_remove_releases() {
        let (mut reg, net, secret) = setup("10.240.0.0/22", 5);
        let obs: SocketAddr = OBS.parse().unwrap();
        let j = reg
            .join(&req(net, secret, "api"), obs, &[7; 32], now())
            .unwrap();
        let key = j.member.public_key;
        let mut r = ResumeRequest {
            network: net,
            public_key: key,
            credential: [8; 32],
            generation: 1,
            endpoints: vec![],
        };
        assert_eq!(
            reg.resume(&r, obs, now()).unwrap_err(),
            ProtoOpError::BadCredential
        );
        r.credential = [7; 32];
        let res = reg.resume(&r, obs, now()).unwrap();
        assert!(matches!(res.catchup, Catchup::UpToDate));
        assert!(res.change.is_none());
        let (change, _) = reg
            .remove_member(net, j.member.instance.as_str(), now())
            .unwrap();
        assert_eq!(change.removed, Some(key));
        assert_eq!(
            reg.resume(&r, obs, now()).unwrap_err(),
            ProtoOpError::BadCredential
        );
        // The released address is quarantined: the next member gets .2.
        let k = reg
            .join(&req(net, secret, "api"), obs, &[1; 32], now())
            .unwrap();
        assert_eq!(k.member.ip, Ipv4Addr::new(10, 240, 0, 2));
        assert_eq!(k.member.index, 1);
    }

    #[test]
    fn full_default_range_holds_1022_and_its_snapshot_fits_a_frame() {
        let (mut reg, net, secret) = setup("10.240.0.0/22", 2000);
        let obs: SocketAddr = "[2001:db8::1]:51820".parse().unwrap();
        for i in 0..1022u32 {
            let mut r = req(
                net,
                secret,
                &format!("a-rather-long-service-name-number-{:04}", i % 50),
            );
            r.endpoints = vec![
                "203.0.113.200:51820".parse().unwrap(),
                "[2001:db8::2]:51820".parse().unwrap(),
            ];
            r.runner = "runner-with-a-long-label-eu-west-3".into();
            reg.join(&r, obs, &[0; 32], now()).unwrap();
        }
        let err = reg
            .join(&req(net, secret, "x"), obs, &[0; 32], now())
            .unwrap_err();
        assert!(matches!(err, ProtoOpError::NetworkFull(_)), "{err:?}");
        let map = reg.snapshot(net).unwrap();
        assert_eq!(map.members.len(), 1022);
        let frame = meshlib::proto::encode_frame(
            &meshlib::proto::ServerMsg::Snapshot(map),
            meshlib::proto::DEFAULT_MAX_FRAME,
        )
        .expect("a full /22 snapshot fits the default frame limit");
        eprintln!("full /22 snapshot frame: {} bytes", frame.len());
        assert!(
            frame.len() < meshlib::proto::DEFAULT_MAX_FRAME / 2,
            "{} bytes",
            frame.len()
        );
    }
}
