//! Stored records, store writes and operation results of the registry.

use std::net::Ipv4Addr;
use std::time::{SystemTime, UNIX_EPOCH};

use ipnet::Ipv4Net;
use meshlib::ids::{NetworkId, ProcessType};
use meshlib::keys::PublicKey;
use meshlib::netmap::{MapDelta, Member, NetworkMap};
use serde::{Deserialize, Serialize};

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
    /// Seconds an offline member is kept before it expires (its address,
    /// index and name are released); `None`: the keyserver's default.
    #[serde(default)]
    pub expire_after: Option<u64>,
    /// The range service addresses come from; `None`: the default (the
    /// block of the same size after `range`,
    /// [`meshlib::netmap::default_service_range`]).
    #[serde(default)]
    pub service_range: Option<Ipv4Net>,
    /// Every service's own address, by service name: allocated at the
    /// service's first join and kept while the network exists (also at
    /// zero instances), with its scale-to-zero settings and state.
    #[serde(default)]
    pub addresses: std::collections::BTreeMap<String, AddressRecord>,
    /// The tenant the network belongs to ([`crate::auth`]): API tokens of
    /// that tenant reach it; `None`: only global tokens do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// A service address as the keyserver stores it: what members' maps carry
/// ([`meshlib::netmap::ServiceAddress`], whose `wake_timeout_secs` is set
/// while a wake hook is), plus the hooks and the wake and idle state
/// (issue 19, scale to zero on internal traffic). Stored inside its
/// network's record, so on a shared store every change of it is compared
/// like the network's (two replicas never both start a wake).
///
/// JSON: the pushed address's fields, then these; every one has a
/// default, so records written before them read as "not wakeable, never
/// idle".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressRecord {
    /// What members' maps carry.
    #[serde(flatten)]
    pub address: meshlib::netmap::ServiceAddress,
    /// The wake hook run when a member asks to wake the service; `None`:
    /// not wakeable.
    #[serde(default)]
    pub wake: Option<meshlib::services::WakeHook>,
    /// Seconds without a new flow after which the service is reported
    /// idle; `None`: never reported.
    #[serde(default)]
    pub idle_after_secs: Option<u32>,
    /// The hook run once when the service turns idle (so the platform can
    /// scale it to zero); `None`: only reported.
    #[serde(default)]
    pub idle_hook: Option<meshlib::services::WakeHook>,
    /// When the wake hook last started (Unix seconds): no other run until
    /// the wake timeout has passed.
    #[serde(default)]
    pub waking_since: Option<u64>,
    /// The last flow to the service known to the store (Unix seconds):
    /// from members' traffic reports and wake requests, written at most
    /// once per [`AddressRecord::flow_granularity`].
    #[serde(default)]
    pub last_flow: Option<u64>,
    /// When idleness started to be measured (Unix seconds): when
    /// `idle_after_secs` was set. Idle means no flow since the later of
    /// this and `last_flow`.
    #[serde(default)]
    pub watch_since: Option<u64>,
    /// When the service was found idle (Unix seconds); `None` while it is
    /// not. A new flow clears it; its idle hook runs once per idle period.
    #[serde(default)]
    pub idle_since: Option<u64>,
}

impl AddressRecord {
    /// A fresh address: not wakeable, idleness not watched.
    pub fn new(address: meshlib::netmap::ServiceAddress) -> Self {
        Self {
            address,
            wake: None,
            idle_after_secs: None,
            idle_hook: None,
            waking_since: None,
            last_flow: None,
            watch_since: None,
            idle_since: None,
        }
    }

    /// How stale the stored `last_flow` may get before a new flow is
    /// written: a quarter of `idle-after` (5 s to 60 s), or 5 minutes when
    /// idleness is not watched. It bounds the writes to one per service
    /// and period; idleness is judged at most this late (never early:
    /// the stored time counts as this much later).
    pub fn flow_granularity(&self) -> u64 {
        match self.idle_after_secs {
            Some(idle) => (u64::from(idle) / 4).clamp(5, 60),
            None => 300,
        }
    }
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
    /// If set, a member joining with it is attached to this service group
    /// (seed 002), which must exist at join time.
    #[serde(default)]
    pub service_group: Option<meshlib::services::GroupName>,
    /// Every member joining with it is ephemeral (a platform whose
    /// instances never keep their state sets it on the deployment's
    /// token), whatever the join asks.
    #[serde(default)]
    pub ephemeral: bool,
}

/// A stored service group (seed 002).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRecord {
    /// The group's network.
    pub network: NetworkId,
    /// The group, as members' maps carry it.
    pub group: meshlib::services::ServiceGroup,
    /// Creation time (Unix seconds).
    pub created: u64,
    /// The names it answers to beside its FQDN, lowercased and sorted
    /// (members' maps carry them in [`meshlib::netmap::NetworkMap::names`]).
    #[serde(default)]
    pub names: Vec<String>,
}

impl ServiceRecord {
    /// Every name the group answers to: its FQDN and its own names.
    pub fn all_names(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.group.fqdn.as_str()).chain(self.names.iter().map(String::as_str))
    }
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
    /// When the member went offline (Unix seconds); `None` while online.
    /// It expires `expire-after` later.
    #[serde(default)]
    pub offline_since: Option<u64>,
    /// Keys this membership held before its rotations (most recent last,
    /// a few at most): a rotation back to one of them is refused.
    #[serde(default)]
    pub previous_keys: Vec<PublicKey>,
    /// SHA-256 of the join token's secret this member joined with (`None`
    /// for records stored before it was kept). A join retried with the same
    /// token and key gets this membership back while `credential_used` is
    /// false: the welcome with the credential may have been lost.
    #[serde(default)]
    pub token_hash: Option<[u8; 32]>,
    /// Whether the member showed it holds its credential (a resume, or a
    /// heartbeat on its join session). From then on a retried join is
    /// refused: only the credential brings the membership back.
    #[serde(default)]
    pub credential_used: bool,
    /// An ephemeral member is removed (its slot and address freed) once
    /// offline for `ephemeral-after`, and while offline its index counts
    /// as free: a new instance of its type takes its slot over.
    #[serde(default)]
    pub ephemeral: bool,
}

/// One write for the store; a list of them is committed atomically.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// A few ops live at a time, in a list for one commit: boxing the large
// member record would buy nothing.
#[allow(clippy::large_enum_variant)]
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
    /// Delete a network record (its members, tokens and quarantine entries
    /// are deleted by their own ops in the same batch).
    DeleteNetwork(NetworkId),
    /// Keep an address in quarantine until a time (Unix seconds).
    PutQuarantine(NetworkId, Ipv4Addr, u64),
    /// Forget a quarantine entry.
    DeleteQuarantine(NetworkId, Ipv4Addr),
    /// Insert or replace a service group.
    PutService(ServiceRecord),
    /// Delete a service group.
    DeleteService(NetworkId, meshlib::services::GroupName),
    /// Keep one delta of a network's change log (resumes on any replica,
    /// or after a restart, get deltas from it).
    PutLog(LogRecord),
    /// Forget the change-log entry of a network ending at a generation.
    DeleteLog(NetworkId, u64),
    /// Insert or replace an API token ([`crate::auth`]).
    PutApiToken(crate::auth::ApiTokenRecord),
    /// Delete an API token by the hash of its secret.
    DeleteApiToken([u8; 32]),
    /// Append an entry to the audit trail.
    PutAudit(crate::auth::AuditRecord),
    /// Drop an entry of the audit trail (the oldest, past the bound).
    DeleteAudit(u64),
}

/// One stored entry of a network's change log: the delta from one
/// generation to the next, and the member it removed (whose session ends).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    /// The network.
    pub network: NetworkId,
    /// The delta.
    pub delta: MapDelta,
    /// The member this change removed, if any.
    #[serde(default)]
    pub removed: Option<PublicKey>,
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
    /// Service groups.
    pub services: Vec<ServiceRecord>,
    /// The stored change log of every network (any order).
    pub log: Vec<LogRecord>,
    /// API tokens (hashes only).
    pub api_tokens: Vec<crate::auth::ApiTokenRecord>,
    /// The audit trail (any order).
    pub audit: Vec<crate::auth::AuditRecord>,
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
    /// The member's network.
    pub network: NetworkId,
    /// The network's generation after the join (the map the joiner must
    /// start from; [`Registry::snapshot`] builds it, and the server shares
    /// one encoded snapshot per network and generation rather than build
    /// one per join).
    ///
    /// [`Registry::snapshot`]: super::Registry::snapshot
    pub generation: u64,
    /// The changes to push, in order: an offline member the join reclaimed
    /// (pushed as its expiry), then the join itself (a takeover removes the
    /// slot's old key in the same delta). Empty for a retried join that
    /// changed nothing the peers see.
    pub changes: Vec<Change>,
    /// The key whose slot this join took over, if any (its session ends
    /// with [`meshlib::proto::ErrorCode::Replaced`]).
    pub replaced: Option<PublicKey>,
    /// Whether this was a retried join that got an existing membership back.
    pub rejoined: bool,
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
    /// When the member went offline (Unix seconds), if it is.
    pub offline_since: Option<u64>,
    /// Whether the member is ephemeral (freed soon after going offline).
    #[serde(default)]
    pub ephemeral: bool,
}
