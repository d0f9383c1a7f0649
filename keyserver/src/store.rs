//! Persistence behind the [`Store`] trait. The default is [`RedbStore`]: an
//! embedded ACID store (redb, copy-on-write B-trees, fsync on commit), so a
//! batch of [`StoreOp`]s is either entirely on disk or not at all, also after
//! a `kill -9`. [`MemStore`] keeps everything in memory (simulations, tests).
//!
//! Records are stored as JSON, so a field added later reads from older
//! records with its default; records written by the first releases
//! (postcard, before member lifecycle) are still read ([`legacy`]).
//!
//! After a failed write redb refuses every later one ("Previous I/O error
//! occurred") until the database is closed and opened again; [`RedbStore`]
//! does that before its next operation, so once the cause (a full disk) is
//! gone, writes work again without a restart.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::registry::{
    LogRecord, MemberRecord, NetworkRecord, Records, ServiceRecord, StoreOp, TokenRecord,
};

/// Networks by UUID bytes.
const NETWORKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("networks");
/// Tokens by SHA-256 of the secret.
const TOKENS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("tokens");
/// Members by network UUID bytes + public key bytes.
const MEMBERS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("members");
/// Quarantined addresses by network UUID bytes + IPv4 bytes; value: Unix seconds.
const QUARANTINE: TableDefinition<&[u8], u64> = TableDefinition::new("quarantine");
/// Service groups by network UUID bytes + group name.
const SERVICES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("services");
/// Change-log entries by network UUID bytes + generation (big-endian u64).
const LOG: TableDefinition<&[u8], &[u8]> = TableDefinition::new("log");
/// Scratch row written by [`Store::probe`].
const PROBE: TableDefinition<&str, &[u8]> = TableDefinition::new("probe");
/// redb's page cache (see [`RedbStore::open`]).
const CACHE_BYTES: usize = 8 << 20;
/// Size of the probe row: large enough to need fresh pages, so a full disk
/// shows.
const PROBE_BYTES: usize = 64 * 1024;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened (missing directory, locked by another
    /// keyserver, corrupt file).
    #[error("cannot open store {path}: {cause}")]
    Open {
        /// The database file.
        path: String,
        /// The cause.
        cause: redb::DatabaseError,
    },
    /// A read or write failed.
    #[error("store: {0}")]
    Db(String),
    /// A stored record could not be decoded.
    #[error("corrupt record in table {table}: {reason}")]
    Decode {
        /// The table.
        table: &'static str,
        /// The cause.
        reason: String,
    },
    /// Another replica changed a record this commit depends on since this
    /// replica last saw it: nothing was written. The caller catches up
    /// ([`Store::catch_up`]) and runs the operation again on fresh state.
    #[error(
        "another keyserver replica changed the same records first (store revision {revision})"
    )]
    Conflict {
        /// The store's revision when the commit was refused.
        revision: i64,
    },
    /// The store cannot be reached (or has no quorum): nothing is known to
    /// be written. Changes are refused until it is back.
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    /// A commit holds more writes than the store takes in one transaction.
    #[error("{ops} writes in one commit; the store takes at most {max}")]
    TooLarge {
        /// Writes in the commit.
        ops: usize,
        /// The store's limit.
        max: usize,
    },
}

/// Turns any redb error into [`StoreError::Db`].
fn db<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Db(e.to_string())
}

/// Where the keyserver's state lives.
pub trait Store: Send + 'static {
    /// Everything stored.
    fn load(&mut self) -> Result<Records, StoreError>;
    /// Applies `ops` atomically and durably.
    fn commit(&mut self, ops: &[StoreOp]) -> Result<(), StoreError>;
    /// Checks that a write would succeed now (readiness). The default
    /// commits an empty batch.
    fn probe(&mut self) -> Result<(), StoreError> {
        self.commit(&[])
    }

    /// Everything stored, read for a backup (no side effects on a shared
    /// store's view). The default is [`Store::load`].
    fn load_snapshot(&mut self) -> Result<Records, StoreError> {
        self.load()
    }

    /// Records other writers (keyserver replicas sharing the store)
    /// committed since the last call: one batch per transaction, oldest
    /// first, without this store's own commits. Embedded stores have none.
    fn remote(&mut self) -> Result<Vec<Vec<StoreOp>>, StoreError> {
        Ok(vec![])
    }

    /// The last committed state of every record `ops` touch (a put of its
    /// value, or a delete), to put memory back after a refused commit.
    /// `None`: the store cannot tell, the caller reloads everything.
    fn known(&self, _ops: &[StoreOp]) -> Option<Vec<StoreOp>> {
        None
    }

    /// After a [`StoreError::Conflict`] at `revision`: waits (bounded) until
    /// [`Store::remote`] can return everything committed up to it.
    fn catch_up(&mut self, _revision: i64) -> Result<(), StoreError> {
        Ok(())
    }

    /// Most writes one commit may hold (a shared store bounds its
    /// transactions).
    fn max_ops(&self) -> usize {
        usize::MAX
    }

    /// The replica set sharing this store (presence of members, addresses
    /// of the other replicas); `None` for an embedded store.
    fn cluster(&self) -> Option<crate::etcd::Cluster> {
        None
    }
}

/// The embedded store: one redb file.
#[derive(Debug)]
pub struct RedbStore {
    /// The database file.
    path: PathBuf,
    /// The open database; `None` after a failure until it is reopened.
    db: Option<Database>,
}

impl RedbStore {
    /// Opens (or creates) the database file (mode 0600: it holds every
    /// member's metadata).
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut store = Self {
            path: path.to_owned(),
            db: None,
        };
        store.database()?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| StoreError::Db(format!("{}: {e}", path.display())))?;
        Ok(store)
    }

    /// The open database, (re)opening it if a failure closed it.
    fn database(&mut self) -> Result<&Database, StoreError> {
        if self.db.is_none() {
            // The whole state is read once at start and then only written:
            // redb's default 1 GiB page cache would keep every page written
            // in memory (2 KiB per member at 10,000). 8 MiB is plenty for
            // writes.
            let database = redb::Builder::new()
                .set_cache_size(CACHE_BYTES)
                .create(&self.path)
                .map_err(|cause| StoreError::Open {
                    path: self.path.display().to_string(),
                    cause,
                })?;
            let txn = database.begin_write().map_err(db_err)?;
            {
                txn.open_table(NETWORKS).map_err(db)?;
                txn.open_table(TOKENS).map_err(db)?;
                txn.open_table(MEMBERS).map_err(db)?;
                txn.open_table(QUARANTINE).map_err(db)?;
                txn.open_table(SERVICES).map_err(db)?;
                txn.open_table(LOG).map_err(db)?;
                txn.open_table(PROBE).map_err(db)?;
            }
            txn.commit().map_err(db)?;
            self.db = Some(database);
        }
        Ok(self.db.as_ref().expect("just opened"))
    }

    /// Runs `f` on the database; on failure closes it, so the next
    /// operation reopens it (redb refuses every write after an I/O error
    /// until then).
    fn with_db<T>(
        &mut self,
        f: impl FnOnce(&Database) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let result = self.database().and_then(f);
        if result.is_err() {
            if let Some(database) = self.db.take() {
                drop(database);
                tracing::warn!(path = %self.path.display(), "store closed after a failure; reopening it before the next operation");
            }
        }
        result
    }
}

/// redb's transaction error, boxed into [`StoreError::Db`].
fn db_err(e: redb::TransactionError) -> StoreError {
    StoreError::Db(e.to_string())
}

/// Key of a member row.
fn member_key(network: &meshlib::ids::NetworkId, key: &meshlib::keys::PublicKey) -> Vec<u8> {
    let mut k = network.uuid().as_bytes().to_vec();
    k.extend_from_slice(key.as_bytes());
    k
}

/// Key of a service group row.
fn service_key(network: &meshlib::ids::NetworkId, name: &meshlib::services::GroupName) -> Vec<u8> {
    let mut k = network.uuid().as_bytes().to_vec();
    k.extend_from_slice(name.as_str().as_bytes());
    k
}

/// Key of a quarantine row.
fn quarantine_key(network: &meshlib::ids::NetworkId, ip: std::net::Ipv4Addr) -> Vec<u8> {
    let mut k = network.uuid().as_bytes().to_vec();
    k.extend_from_slice(&ip.octets());
    k
}

/// Key of a change-log row.
fn log_key(network: &meshlib::ids::NetworkId, to: u64) -> Vec<u8> {
    let mut k = network.uuid().as_bytes().to_vec();
    k.extend_from_slice(&to.to_be_bytes());
    k
}

/// Decodes a stored record: JSON, or the first releases' postcard layout.
pub(crate) trait Stored: serde::de::DeserializeOwned {
    /// Decodes the postcard layout of the first releases.
    fn legacy(bytes: &[u8]) -> Result<Self, postcard::Error>;

    /// Decodes either form.
    fn decode(bytes: &[u8]) -> Result<Self, String> {
        if bytes.first() == Some(&b'{') {
            serde_json::from_slice(bytes).map_err(|e| e.to_string())
        } else {
            Self::legacy(bytes).map_err(|e| e.to_string())
        }
    }
}

/// Reads a whole table of stored records.
fn read_all<T: Stored>(
    txn: &redb::ReadTransaction,
    def: TableDefinition<&[u8], &[u8]>,
    name: &'static str,
) -> Result<Vec<T>, StoreError> {
    let table = txn.open_table(def).map_err(db)?;
    let mut out = Vec::new();
    for row in table.iter().map_err(db)? {
        let (_, v) = row.map_err(db)?;
        let rec = T::decode(v.value()).map_err(|reason| StoreError::Decode {
            table: name,
            reason,
        })?;
        out.push(rec);
    }
    Ok(out)
}

/// The stored (JSON) form of a record.
fn enc<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(db)
}

impl Store for RedbStore {
    fn load(&mut self) -> Result<Records, StoreError> {
        self.with_db(load)
    }

    fn commit(&mut self, ops: &[StoreOp]) -> Result<(), StoreError> {
        self.with_db(|database| commit(database, ops))
    }

    fn probe(&mut self) -> Result<(), StoreError> {
        self.with_db(|database| {
            let txn = database.begin_write().map_err(db_err)?;
            {
                let mut table = txn.open_table(PROBE).map_err(db)?;
                table.insert("probe", &[0u8; PROBE_BYTES][..]).map_err(db)?;
            }
            txn.commit().map_err(db)?;
            let txn = database.begin_write().map_err(db_err)?;
            txn.open_table(PROBE)
                .map_err(db)?
                .remove("probe")
                .map_err(db)?;
            txn.commit().map_err(db)
        })
    }
}

/// Everything stored.
fn load(database: &Database) -> Result<Records, StoreError> {
    let txn = database.begin_read().map_err(db_err)?;
    let networks: Vec<NetworkRecord> = read_all(&txn, NETWORKS, "networks")?;
    let tokens: Vec<TokenRecord> = read_all(&txn, TOKENS, "tokens")?;
    let members: Vec<MemberRecord> = read_all(&txn, MEMBERS, "members")?;
    let services: Vec<ServiceRecord> = read_all(&txn, SERVICES, "services")?;
    let table = txn.open_table(QUARANTINE).map_err(db)?;
    let mut quarantine = Vec::new();
    for row in table.iter().map_err(db)? {
        let (k, v) = row.map_err(db)?;
        let k = k.value();
        let (Ok(uuid), Ok(ip)) = (
            uuid::Uuid::from_slice(&k[..16.min(k.len())]),
            <[u8; 4]>::try_from(&k[16.min(k.len())..]),
        ) else {
            continue;
        };
        let id: meshlib::ids::NetworkId = format!("pn-{uuid}").parse().map_err(db)?;
        quarantine.push((id, ip.into(), v.value()));
    }
    let mut log = Vec::new();
    for row in txn.open_table(LOG).map_err(db)?.iter().map_err(db)? {
        let (_, v) = row.map_err(db)?;
        // The log is a convenience: a bad entry costs a snapshot, not a start.
        match serde_json::from_slice::<LogRecord>(v.value()) {
            Ok(rec) => log.push(rec),
            Err(e) => tracing::warn!("skipped a change-log entry: {e}"),
        }
    }
    Ok(Records {
        networks,
        tokens,
        members,
        quarantine,
        services,
        log,
    })
}

/// Applies `ops` in one transaction.
fn commit(database: &Database, ops: &[StoreOp]) -> Result<(), StoreError> {
    let txn = database.begin_write().map_err(db_err)?;
    {
        let mut networks = txn.open_table(NETWORKS).map_err(db)?;
        let mut tokens = txn.open_table(TOKENS).map_err(db)?;
        let mut members = txn.open_table(MEMBERS).map_err(db)?;
        let mut quarantine = txn.open_table(QUARANTINE).map_err(db)?;
        let mut services = txn.open_table(SERVICES).map_err(db)?;
        let mut log = txn.open_table(LOG).map_err(db)?;
        for op in ops {
            match op {
                StoreOp::PutNetwork(n) => {
                    networks
                        .insert(&n.id.uuid().as_bytes()[..], &enc(n)?[..])
                        .map_err(db)?;
                }
                StoreOp::PutToken(t) => {
                    tokens.insert(&t.hash[..], &enc(t)?[..]).map_err(db)?;
                }
                StoreOp::DeleteToken(h) => {
                    tokens.remove(&h[..]).map_err(db)?;
                }
                StoreOp::PutMember(m) => {
                    let k = member_key(&m.network, &m.member.public_key);
                    members.insert(&k[..], &enc(m)?[..]).map_err(db)?;
                }
                StoreOp::DeleteNetwork(n) => {
                    networks.remove(&n.uuid().as_bytes()[..]).map_err(db)?;
                    let (from, to) = (log_key(n, 0), log_key(n, u64::MAX));
                    log.retain_in(&from[..]..=&to[..], |_, _| false)
                        .map_err(db)?;
                }
                StoreOp::DeleteMember(n, key) => {
                    members.remove(&member_key(n, key)[..]).map_err(db)?;
                }
                StoreOp::PutQuarantine(n, ip, until) => {
                    quarantine
                        .insert(&quarantine_key(n, *ip)[..], until)
                        .map_err(db)?;
                }
                StoreOp::DeleteQuarantine(n, ip) => {
                    quarantine.remove(&quarantine_key(n, *ip)[..]).map_err(db)?;
                }
                StoreOp::PutService(r) => {
                    let k = service_key(&r.network, &r.group.name);
                    services.insert(&k[..], &enc(r)?[..]).map_err(db)?;
                }
                StoreOp::DeleteService(n, name) => {
                    services.remove(&service_key(n, name)[..]).map_err(db)?;
                }
                StoreOp::PutLog(rec) => {
                    let k = log_key(&rec.network, rec.delta.to);
                    log.insert(&k[..], &enc(rec)?[..]).map_err(db)?;
                }
                StoreOp::DeleteLog(n, to) => {
                    log.remove(&log_key(n, *to)[..]).map_err(db)?;
                }
            }
        }
    }
    txn.commit().map_err(db)
}

/// Everything in memory: the same semantics as [`RedbStore`] without
/// durability (simulations and tests).
#[derive(Debug, Default, Clone)]
pub struct MemStore {
    networks: std::collections::BTreeMap<meshlib::ids::NetworkId, NetworkRecord>,
    tokens: std::collections::BTreeMap<[u8; 32], TokenRecord>,
    members: std::collections::BTreeMap<
        (meshlib::ids::NetworkId, meshlib::keys::PublicKey),
        MemberRecord,
    >,
    quarantine: std::collections::BTreeMap<(meshlib::ids::NetworkId, std::net::Ipv4Addr), u64>,
    services: std::collections::BTreeMap<
        (meshlib::ids::NetworkId, meshlib::services::GroupName),
        ServiceRecord,
    >,
    log: std::collections::BTreeMap<(meshlib::ids::NetworkId, u64), LogRecord>,
    /// Commits so far.
    commits: u64,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// A store holding `records`.
    pub fn with(records: Records) -> Self {
        let mut s = Self::default();
        for n in records.networks {
            s.networks.insert(n.id, n);
        }
        for t in records.tokens {
            s.tokens.insert(t.hash, t);
        }
        for m in records.members {
            s.members.insert((m.network, m.member.public_key), m);
        }
        for (n, ip, until) in records.quarantine {
            s.quarantine.insert((n, ip), until);
        }
        for r in records.services {
            s.services.insert((r.network, r.group.name.clone()), r);
        }
        for rec in records.log {
            s.log.insert((rec.network, rec.delta.to), rec);
        }
        s
    }

    /// How many commits were made.
    pub fn commits(&self) -> u64 {
        self.commits
    }
}

impl Store for MemStore {
    fn load(&mut self) -> Result<Records, StoreError> {
        Ok(Records {
            networks: self.networks.values().cloned().collect(),
            tokens: self.tokens.values().cloned().collect(),
            members: self.members.values().cloned().collect(),
            quarantine: self
                .quarantine
                .iter()
                .map(|((n, ip), until)| (*n, *ip, *until))
                .collect(),
            services: self.services.values().cloned().collect(),
            log: self.log.values().cloned().collect(),
        })
    }

    fn commit(&mut self, ops: &[StoreOp]) -> Result<(), StoreError> {
        for op in ops {
            match op {
                StoreOp::PutNetwork(n) => {
                    self.networks.insert(n.id, n.clone());
                }
                StoreOp::DeleteNetwork(n) => {
                    self.networks.remove(n);
                    self.log.retain(|(id, _), _| id != n);
                }
                StoreOp::PutToken(t) => {
                    self.tokens.insert(t.hash, t.clone());
                }
                StoreOp::DeleteToken(h) => {
                    self.tokens.remove(h);
                }
                StoreOp::PutMember(m) => {
                    self.members
                        .insert((m.network, m.member.public_key), m.clone());
                }
                StoreOp::DeleteMember(n, k) => {
                    self.members.remove(&(*n, *k));
                }
                StoreOp::PutQuarantine(n, ip, until) => {
                    self.quarantine.insert((*n, *ip), *until);
                }
                StoreOp::DeleteQuarantine(n, ip) => {
                    self.quarantine.remove(&(*n, *ip));
                }
                StoreOp::PutService(r) => {
                    self.services
                        .insert((r.network, r.group.name.clone()), r.clone());
                }
                StoreOp::DeleteService(n, name) => {
                    self.services.remove(&(*n, name.clone()));
                }
                StoreOp::PutLog(rec) => {
                    self.log.insert((rec.network, rec.delta.to), rec.clone());
                }
                StoreOp::DeleteLog(n, to) => {
                    self.log.remove(&(*n, *to));
                }
            }
        }
        self.commits += 1;
        Ok(())
    }
}

/// The records of the first releases (postcard, before member lifecycle),
/// read once and rewritten as JSON with their next change.
pub mod legacy {
    use ipnet::Ipv4Net;
    use meshlib::ids::{AppId, InstanceName, NetworkId, ProcessType};
    use meshlib::keys::PublicKey;
    use meshlib::netmap::{Member, MemberState};
    use serde::Deserialize;

    use super::Stored;
    use crate::registry::{MemberRecord, NetworkRecord, TokenRecord};

    #[derive(Deserialize)]
    struct NetworkV1 {
        id: NetworkId,
        name: String,
        range: Ipv4Net,
        generation: u64,
        created: u64,
    }

    #[derive(Deserialize)]
    struct MemberV1 {
        public_key: PublicKey,
        ip: std::net::Ipv4Addr,
        endpoints: Vec<std::net::SocketAddr>,
        service: String,
        app_id: AppId,
        process_type: ProcessType,
        index: u32,
        instance: InstanceName,
        runner: String,
        ports: Vec<u16>,
    }

    #[derive(Deserialize)]
    struct MemberRecordV1 {
        network: NetworkId,
        member: MemberV1,
        credential_hash: [u8; 32],
        joined: u64,
        last_seen: u64,
    }

    impl Stored for NetworkRecord {
        fn legacy(bytes: &[u8]) -> Result<Self, postcard::Error> {
            let v: NetworkV1 = postcard::from_bytes(bytes)?;
            Ok(NetworkRecord {
                id: v.id,
                name: v.name,
                range: v.range,
                generation: v.generation,
                created: v.created,
                expire_after: None,
                service_range: None,
                addresses: Default::default(),
            })
        }
    }

    impl Stored for MemberRecord {
        fn legacy(bytes: &[u8]) -> Result<Self, postcard::Error> {
            let v: MemberRecordV1 = postcard::from_bytes(bytes)?;
            let m = v.member;
            Ok(MemberRecord {
                network: v.network,
                member: Member {
                    public_key: m.public_key,
                    ip: m.ip,
                    endpoints: m.endpoints,
                    service: m.service,
                    app_id: m.app_id,
                    process_type: m.process_type,
                    index: m.index,
                    instance: m.instance,
                    runner: m.runner,
                    ports: m.ports,
                    state: MemberState::Online,
                },
                credential_hash: v.credential_hash,
                joined: v.joined,
                last_seen: v.last_seen,
                offline_since: None,
                previous_keys: vec![],
                token_hash: None,
                // Whatever happened before, only the credential resumes it.
                credential_used: true,
                ephemeral: false,
            })
        }
    }

    #[derive(Deserialize)]
    struct TokenV1 {
        id: String,
        hash: [u8; 32],
        network: NetworkId,
        uses_left: u32,
        expires: u64,
        service: Option<String>,
        process_type: Option<ProcessType>,
        created: u64,
    }

    impl Stored for TokenRecord {
        fn legacy(bytes: &[u8]) -> Result<Self, postcard::Error> {
            let v: TokenV1 = postcard::from_bytes(bytes)?;
            Ok(TokenRecord {
                id: v.id,
                hash: v.hash,
                network: v.network,
                uses_left: v.uses_left,
                expires: v.expires,
                service: v.service,
                process_type: v.process_type,
                created: v.created,
                service_group: None,
                ephemeral: false,
            })
        }
    }

    impl Stored for super::ServiceRecord {
        // Service groups were never stored as postcard.
        fn legacy(bytes: &[u8]) -> Result<Self, postcard::Error> {
            postcard::from_bytes(bytes)
        }
    }
}
