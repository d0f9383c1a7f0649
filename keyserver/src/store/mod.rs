//! Persistence behind the [`Store`] trait, all in this folder: the trait
//! and its error here, the record codec ([`codec`]), the embedded store
//! ([`redb`]), the in-memory one ([`mem`]) and etcd ([`etcd`], for
//! replicas). Nothing here imports the server: a store that is shared by
//! replicas hands its cluster view to the server itself
//! ([`etcd::EtcdStore::cluster`]), not through the trait.
//!
//! The default is [`RedbStore`]: an
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

pub mod codec;
pub mod etcd;
pub mod mem;
pub mod redb;

pub use codec::legacy;
pub(crate) use codec::Stored;
pub use mem::{MemStore, SharedMemStore};
pub use redb::RedbStore;

use crate::registry::{Records, StoreOp};

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
        cause: ::redb::DatabaseError,
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

/// Turns any database error into [`StoreError::Db`].
pub(crate) fn db<E: std::fmt::Display>(e: E) -> StoreError {
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
}
