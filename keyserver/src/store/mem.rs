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
