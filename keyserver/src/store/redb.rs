//! The embedded store: one redb file (copy-on-write B-trees, fsync on
//! commit), so a batch of [`StoreOp`]s is either entirely on disk or not
//! at all, also after a `kill -9`.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::codec::{enc, Stored};
use super::{db, Store, StoreError};
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
/// API tokens by SHA-256 of the secret.
const API_TOKENS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("api_tokens");
/// The audit trail by sequence number (big-endian u64).
const AUDIT: TableDefinition<&[u8], &[u8]> = TableDefinition::new("audit");
/// Scratch row written by [`Store::probe`].
const PROBE: TableDefinition<&str, &[u8]> = TableDefinition::new("probe");
/// redb's page cache (see [`RedbStore::open`]).
const CACHE_BYTES: usize = 8 << 20;
/// Size of the probe row: large enough to need fresh pages, so a full disk
/// shows.
const PROBE_BYTES: usize = 64 * 1024;

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
                txn.open_table(API_TOKENS).map_err(db)?;
                txn.open_table(AUDIT).map_err(db)?;
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

/// Bytes an unprivileged writer may still use on the filesystem of
/// `path` (`None` when it cannot be told).
fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs(3) with a valid NUL-terminated path and a zeroed
    // struct it fills.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail.saturating_mul(st.f_frsize))
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

impl Store for RedbStore {
    fn load(&mut self) -> Result<Records, StoreError> {
        self.with_db(load)
    }

    fn commit(&mut self, ops: &[StoreOp]) -> Result<(), StoreError> {
        self.with_db(|database| commit(database, ops))
    }

    fn probe(&mut self) -> Result<(), StoreError> {
        // A write into pages the file already has free succeeds on a full
        // disk while a commit that must grow the file fails: the free
        // space of the filesystem is checked first.
        if let Some(free) = free_bytes(&self.path) {
            if free < PROBE_BYTES as u64 {
                return Err(StoreError::Db(format!(
                    "{}: no space left on its filesystem ({free} bytes free)",
                    self.path.display()
                )));
            }
        }
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
    let api_tokens = read_json(&txn, API_TOKENS, "api_tokens")?;
    let audit = read_json(&txn, AUDIT, "audit")?;
    Ok(Records {
        networks,
        tokens,
        members,
        quarantine,
        services,
        log,
        api_tokens,
        audit,
    })
}

/// Reads a whole table of JSON records (kinds that were never postcard).
fn read_json<T: serde::de::DeserializeOwned>(
    txn: &redb::ReadTransaction,
    def: TableDefinition<&[u8], &[u8]>,
    name: &'static str,
) -> Result<Vec<T>, StoreError> {
    let table = txn.open_table(def).map_err(db)?;
    let mut out = Vec::new();
    for row in table.iter().map_err(db)? {
        let (_, v) = row.map_err(db)?;
        let rec = serde_json::from_slice(v.value()).map_err(|e| StoreError::Decode {
            table: name,
            reason: e.to_string(),
        })?;
        out.push(rec);
    }
    Ok(out)
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
        let mut api_tokens = txn.open_table(API_TOKENS).map_err(db)?;
        let mut audit = txn.open_table(AUDIT).map_err(db)?;
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
                StoreOp::PutApiToken(t) => {
                    api_tokens.insert(&t.hash[..], &enc(t)?[..]).map_err(db)?;
                }
                StoreOp::DeleteApiToken(h) => {
                    api_tokens.remove(&h[..]).map_err(db)?;
                }
                StoreOp::PutAudit(e) => {
                    audit
                        .insert(&e.seq.to_be_bytes()[..], &enc(e)?[..])
                        .map_err(db)?;
                }
                StoreOp::DeleteAudit(seq) => {
                    audit.remove(&seq.to_be_bytes()[..]).map_err(db)?;
                }
            }
        }
    }
    txn.commit().map_err(db)
}
