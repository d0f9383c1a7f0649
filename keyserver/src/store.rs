//! Persistence behind the [`Store`] trait. The default is [`RedbStore`]: an
//! embedded ACID store (redb, copy-on-write B-trees, fsync on commit), so a
//! batch of [`StoreOp`]s is either entirely on disk or not at all, also after
//! a `kill -9`. A distributed backend (etcd) implements the same trait.
//!
//! After a failed write redb refuses every later one ("Previous I/O error
//! occurred") until the database is closed and opened again; [`RedbStore`]
//! does that before its next operation, so once the cause (a full disk) is
//! gone, writes work again without a restart.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::registry::{MemberRecord, MemberRecordV1, NetworkRecord, Records, StoreOp, TokenRecord};

/// Networks by UUID bytes.
const NETWORKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("networks");
/// Tokens by SHA-256 of the secret.
const TOKENS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("tokens");
/// Members by network UUID bytes + public key bytes.
const MEMBERS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("members");
/// Quarantined addresses by network UUID bytes + IPv4 bytes; value: Unix seconds.
const QUARANTINE: TableDefinition<&[u8], u64> = TableDefinition::new("quarantine");
/// Scratch row written by [`Store::probe`].
const PROBE: TableDefinition<&str, &[u8]> = TableDefinition::new("probe");
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
    #[error("corrupt record in table {table}: {cause}")]
    Decode {
        /// The table.
        table: &'static str,
        /// The cause.
        cause: postcard::Error,
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
            let database = Database::create(&self.path).map_err(|cause| StoreError::Open {
                path: self.path.display().to_string(),
                cause,
            })?;
            let txn = database.begin_write().map_err(db_err)?;
            {
                txn.open_table(NETWORKS).map_err(db)?;
                txn.open_table(TOKENS).map_err(db)?;
                txn.open_table(MEMBERS).map_err(db)?;
                txn.open_table(QUARANTINE).map_err(db)?;
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

/// Key of a quarantine row.
fn quarantine_key(network: &meshlib::ids::NetworkId, ip: std::net::Ipv4Addr) -> Vec<u8> {
    let mut k = network.uuid().as_bytes().to_vec();
    k.extend_from_slice(&ip.octets());
    k
}

/// Reads a whole table of postcard values.
fn read_all<T: serde::de::DeserializeOwned>(
    txn: &redb::ReadTransaction,
    def: TableDefinition<&[u8], &[u8]>,
    name: &'static str,
) -> Result<Vec<T>, StoreError> {
    let table = txn.open_table(def).map_err(db)?;
    let mut out = Vec::new();
    for row in table.iter().map_err(db)? {
        let (_, v) = row.map_err(db)?;
        let rec = postcard::from_bytes(v.value())
            .map_err(|cause| StoreError::Decode { table: name, cause })?;
        out.push(rec);
    }
    Ok(out)
}

/// Reads the members table; records stored before `token_hash` existed
/// ([`MemberRecordV1`]) are read as such.
fn read_members(txn: &redb::ReadTransaction) -> Result<Vec<MemberRecord>, StoreError> {
    let table = txn.open_table(MEMBERS).map_err(db)?;
    let mut out = Vec::new();
    for row in table.iter().map_err(db)? {
        let (_, v) = row.map_err(db)?;
        let rec = match postcard::from_bytes::<MemberRecord>(v.value()) {
            Ok(rec) => rec,
            Err(first) => postcard::from_bytes::<MemberRecordV1>(v.value())
                .map(MemberRecord::from)
                .map_err(|_| StoreError::Decode {
                    table: "members",
                    cause: first,
                })?,
        };
        out.push(rec);
    }
    Ok(out)
}

/// Postcard encoding of a record (cannot fail for these plain types).
fn enc<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_stdvec(v).map_err(db)
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
    let members = read_members(&txn)?;
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
    Ok(Records {
        networks,
        tokens,
        members,
        quarantine,
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
            }
        }
    }
    txn.commit().map_err(db)
}
