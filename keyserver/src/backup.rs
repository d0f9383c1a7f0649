//! Backups of the keyserver's records: a consistent snapshot as one JSON
//! document (`keyserver backup`, also while serving, through
//! `GET /v1/backup`), and its restore into a stopped keyserver's embedded
//! store (`keyserver restore`, refused while a keyserver holds the store).

use std::net::Ipv4Addr;
use std::path::Path;

use meshlib::ids::NetworkId;
use serde::{Deserialize, Serialize};

use crate::auth::{ApiTokenRecord, AuditRecord};
use crate::registry::{
    LogRecord, MemberRecord, NetworkRecord, Records, ServiceRecord, StoreOp, TokenRecord,
};
use crate::store::{RedbStore, Store, StoreError};

/// The format tag of a backup document.
pub const FORMAT: &str = "ist-keyserver-backup/1";

/// A quarantined address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantined {
    /// The network.
    pub network: NetworkId,
    /// The address.
    pub ip: Ipv4Addr,
    /// Unix seconds until it is free.
    pub until: u64,
}

/// Every record, as one document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backup {
    /// [`FORMAT`].
    pub format: String,
    /// When it was taken (Unix seconds).
    pub created: u64,
    /// Networks.
    pub networks: Vec<NetworkRecord>,
    /// Tokens (hashes only).
    pub tokens: Vec<TokenRecord>,
    /// Members (credential hashes only).
    pub members: Vec<MemberRecord>,
    /// Quarantined addresses.
    pub quarantine: Vec<Quarantined>,
    /// Change logs.
    #[serde(default)]
    pub log: Vec<LogRecord>,
    /// Service groups.
    #[serde(default)]
    pub services: Vec<ServiceRecord>,
    /// API tokens (hashes only).
    #[serde(default)]
    pub api_tokens: Vec<ApiTokenRecord>,
    /// The audit trail, oldest first.
    #[serde(default)]
    pub audit: Vec<AuditRecord>,
}

/// Why a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The document is not a backup of this format.
    #[error("not a keyserver backup ({0})")]
    Format(String),
    /// A keyserver holds the store (or it cannot be opened).
    #[error("{0}; stop the keyserver using this data directory before restoring")]
    InUse(StoreError),
    /// Writing the new store failed.
    #[error("writing the restored store: {0}")]
    Write(String),
}

impl Backup {
    /// A backup of `records`, taken at `created`.
    pub fn of(records: Records, created: u64) -> Self {
        Self {
            format: FORMAT.into(),
            created,
            networks: records.networks,
            tokens: records.tokens,
            members: records.members,
            quarantine: records
                .quarantine
                .into_iter()
                .map(|(network, ip, until)| Quarantined { network, ip, until })
                .collect(),
            log: records.log,
            services: records.services,
            api_tokens: records.api_tokens,
            audit: {
                let mut audit = records.audit;
                audit.sort_by_key(|e| e.seq);
                audit
            },
        }
    }

    /// The writes that recreate every record.
    pub fn ops(&self) -> Vec<StoreOp> {
        let mut ops = Vec::new();
        ops.extend(self.networks.iter().cloned().map(StoreOp::PutNetwork));
        ops.extend(self.tokens.iter().cloned().map(StoreOp::PutToken));
        ops.extend(self.members.iter().cloned().map(StoreOp::PutMember));
        ops.extend(
            self.quarantine
                .iter()
                .map(|q| StoreOp::PutQuarantine(q.network, q.ip, q.until)),
        );
        ops.extend(self.log.iter().cloned().map(StoreOp::PutLog));
        ops.extend(self.services.iter().cloned().map(StoreOp::PutService));
        ops.extend(self.api_tokens.iter().cloned().map(StoreOp::PutApiToken));
        ops.extend(self.audit.iter().cloned().map(StoreOp::PutAudit));
        ops
    }

    /// Parses a backup document.
    pub fn parse(bytes: &[u8]) -> Result<Self, RestoreError> {
        let b: Backup =
            serde_json::from_slice(bytes).map_err(|e| RestoreError::Format(e.to_string()))?;
        if b.format != FORMAT {
            return Err(RestoreError::Format(format!(
                "format {:?}, expected {FORMAT:?}",
                b.format
            )));
        }
        Ok(b)
    }
}

/// Replaces the embedded store at `db` by the backup's records: written
/// to a new file next to it, then renamed over it (a crash leaves the old
/// store or the new one, never a mix). Refused while a keyserver holds
/// the store. Returns the number of records.
pub fn restore(db: &Path, backup: &Backup) -> Result<usize, RestoreError> {
    if db.exists() {
        // Opening takes redb's lock: a running keyserver holds it.
        drop(RedbStore::open(db).map_err(RestoreError::InUse)?);
    }
    let fresh = db.with_extension("redb.restoring");
    let _ = std::fs::remove_file(&fresh);
    let ops = backup.ops();
    {
        let mut store = RedbStore::open(&fresh).map_err(|e| RestoreError::Write(e.to_string()))?;
        store
            .commit(&ops)
            .map_err(|e| RestoreError::Write(e.to_string()))?;
    }
    std::fs::rename(&fresh, db).map_err(|e| RestoreError::Write(e.to_string()))?;
    Ok(ops.len())
}
