//! Persistence behind the [`Store`] trait. The default is [`RedbStore`]: an
//! embedded ACID store (redb, copy-on-write B-trees, fsync on commit), so a
//! batch of [`StoreOp`]s is either entirely on disk or not at all, also after
//! a `kill -9`. A distributed backend (etcd) implements the same trait.

use std::path::Path;

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

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened (missing directory, locked by another
    /// keyserver, corrupt file).
    #[error("cannot open store {path}: {source}")]
    Open {
        /// The database file.
        path: String,
        /// The cause.
        source: redb::DatabaseError,
    },
    /// A read or write failed.
    #[error("store error: {0}")]
    Db(String),
    /// A stored record could not be decoded.
    #[error("corrupt record in table {table}: {source}")]
    Decode {
        /// The table.
        table: &'static str,
        /// The cause.
        source: postcard::Error,
    },
}

/// Turns any redb error into [`StoreError::Db`].
fn db<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Db(e.to_string())
}

/// Where the keyserver's state lives.
pub trait Store: Send + 'static {
    /// Everything stored.
    fn load(&self) -> Result<Records, StoreError>;
    /// Applies `ops` atomically and durably.
    fn commit(&mut self, ops: &[StoreOp]) -> Result<(), StoreError>;
}

/// The embedded store: one redb file.
#[derive(Debug)]
pub struct RedbStore {
    /// The open database.
    db: Database,
}

impl RedbStore {
    /// Opens (or creates) the database file.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let database = Database::create(path).map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let txn = database.begin_write().map_err(db_err)?;
        {
            txn.open_table(NETWORKS).map_err(db)?;
            txn.open_table(TOKENS).map_err(db)?;
            txn.open_table(MEMBERS).map_err(db)?;
            txn.open_table(QUARANTINE).map_err(db)?;
        }
        txn.commit().map_err(db)?;
        Ok(Self { db: database })
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
        let rec = postcard::from_bytes(v.value()).map_err(|source| StoreError::Decode {
            table: name,
            source,
        })?;
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
                    source: first,
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
    fn load(&self) -> Result<Records, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
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

    fn commit(&mut self, ops: &[StoreOp]) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
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
}
