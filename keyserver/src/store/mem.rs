//! Everything in memory (simulations and tests).

use super::{Store, StoreError};
use crate::registry::{
    LogRecord, MemberRecord, NetworkRecord, Records, ServiceRecord, StoreOp, TokenRecord,
};

/// Everything in memory: the same semantics as [`super::RedbStore`] without
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
    api_tokens: std::collections::BTreeMap<[u8; 32], crate::auth::ApiTokenRecord>,
    audit: std::collections::BTreeMap<u64, crate::auth::AuditRecord>,
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
        for t in records.api_tokens {
            s.api_tokens.insert(t.hash, t);
        }
        for e in records.audit {
            s.audit.insert(e.seq, e);
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
            api_tokens: self.api_tokens.values().cloned().collect(),
            audit: self.audit.values().cloned().collect(),
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
                StoreOp::PutApiToken(t) => {
                    self.api_tokens.insert(t.hash, t.clone());
                }
                StoreOp::DeleteApiToken(h) => {
                    self.api_tokens.remove(h);
                }
                StoreOp::PutAudit(e) => {
                    self.audit.insert(e.seq, e.clone());
                }
                StoreOp::DeleteAudit(seq) => {
                    self.audit.remove(seq);
                }
            }
        }
        self.commits += 1;
        Ok(())
    }
}

/// One in-memory state shared by keyserver replicas in one process (the
/// simulator): every handle commits to the same records, and each learns
/// the others' commits, in commit order, through [`Store::remote`], as
/// replicas sharing etcd do. Commits are never refused: the caller runs
/// one replica at a time and lets it catch up ([`crate::server::Shared::sync`])
/// before each operation. Every commit is kept for the replicas still to
/// read it (a simulation's length).
#[derive(Debug)]
pub struct SharedMemStore {
    log: std::sync::Arc<parking_lot::Mutex<SharedLog>>,
    /// This handle's replica.
    id: usize,
    /// Commits of the log this handle has seen.
    seen: usize,
}

#[derive(Debug, Default)]
struct SharedLog {
    store: MemStore,
    /// Every commit: the replica that made it and its writes.
    commits: Vec<(usize, Vec<StoreOp>)>,
}

impl SharedMemStore {
    /// `n` handles on one empty state, one per replica.
    pub fn replicas(n: usize) -> Vec<Self> {
        let log = std::sync::Arc::new(parking_lot::Mutex::new(SharedLog::default()));
        (0..n)
            .map(|id| Self {
                log: log.clone(),
                id,
                seen: 0,
            })
            .collect()
    }
}

impl Store for SharedMemStore {
    fn load(&mut self) -> Result<Records, StoreError> {
        let mut log = self.log.lock();
        self.seen = log.commits.len();
        log.store.load()
    }

    fn commit(&mut self, ops: &[StoreOp]) -> Result<(), StoreError> {
        let mut log = self.log.lock();
        log.store.commit(ops)?;
        if !ops.is_empty() {
            log.commits.push((self.id, ops.to_vec()));
        }
        Ok(())
    }

    fn remote(&mut self) -> Result<Vec<Vec<StoreOp>>, StoreError> {
        let log = self.log.lock();
        let theirs = log.commits[self.seen.min(log.commits.len())..]
            .iter()
            .filter(|(id, _)| *id != self.id)
            .map(|(_, ops)| ops.clone())
            .collect();
        self.seen = log.commits.len();
        Ok(theirs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_learn_each_others_commits_once_in_order() {
        let mut r = SharedMemStore::replicas(2);
        let (mut a, mut b) = (r.remove(0), r.remove(0));
        assert!(a.load().unwrap().networks.is_empty());
        assert!(b.load().unwrap().networks.is_empty());
        let net = meshlib::ids::NetworkId::random();
        let op = |t: u8| StoreOp::DeleteQuarantine(net, std::net::Ipv4Addr::new(10, 240, 0, t));
        a.commit(&[op(1)]).unwrap();
        b.commit(&[op(2)]).unwrap();
        a.commit(&[op(3)]).unwrap();
        a.commit(&[]).unwrap();
        let seen_by_b: Vec<_> = b.remote().unwrap();
        assert_eq!(seen_by_b.len(), 2, "a's two commits, not b's own");
        assert!(
            matches!(&seen_by_b[0][..], [StoreOp::DeleteQuarantine(_, ip)] if ip.octets()[3] == 1)
        );
        assert!(
            matches!(&seen_by_b[1][..], [StoreOp::DeleteQuarantine(_, ip)] if ip.octets()[3] == 3)
        );
        assert!(b.remote().unwrap().is_empty(), "each commit once");
        assert_eq!(a.remote().unwrap().len(), 1, "b's commit");
    }
}
