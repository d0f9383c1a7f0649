//! The registry's part of [`crate::auth`]: API tokens (by the hash of their
//! secret), the bounded audit trail, and networks' tenants.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use meshlib::ids::NetworkId;

use super::{unix, AdminError, NetworkRecord, Registry, StoreOp};
use crate::auth::{ApiTokenRecord, AuditQuery, AuditRecord, Principal, Role, Scope};

/// Audit entries kept by default (the oldest are dropped past it).
pub const DEFAULT_AUDIT_ENTRIES: usize = 10_000;

/// Longest lifetime of an API token: ten years.
const MAX_API_TOKEN_TTL: Duration = Duration::from_secs(3650 * 86400);

/// API tokens and the audit trail.
#[derive(Debug)]
pub(super) struct Access {
    tokens: HashMap<[u8; 32], ApiTokenRecord>,
    audit: BTreeMap<u64, AuditRecord>,
    audit_cap: usize,
}

impl Access {
    pub(super) fn load(tokens: Vec<ApiTokenRecord>, audit: Vec<AuditRecord>) -> Self {
        Self {
            tokens: tokens.into_iter().map(|t| (t.hash, t)).collect(),
            audit: audit.into_iter().map(|e| (e.seq, e)).collect(),
            audit_cap: DEFAULT_AUDIT_ENTRIES,
        }
    }

    /// Applies a stored access record.
    pub(super) fn apply(&mut self, op: &StoreOp) {
        match op {
            StoreOp::PutApiToken(t) => {
                self.tokens.insert(t.hash, t.clone());
            }
            StoreOp::DeleteApiToken(h) => {
                self.tokens.remove(h);
            }
            StoreOp::PutAudit(e) => {
                self.audit.insert(e.seq, e.clone());
            }
            StoreOp::DeleteAudit(seq) => {
                self.audit.remove(seq);
            }
            _ => {}
        }
    }
}

/// What a new API token is.
#[derive(Debug, Clone)]
pub struct NewApiToken {
    /// Its name.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// Its tenant (`None`: every network).
    pub tenant: Option<String>,
    /// Its lifetime (`None`: until revoked).
    pub ttl: Option<Duration>,
}

impl Registry {
    /// Sets how many audit entries are kept (at least 1).
    pub fn set_audit_cap(&mut self, cap: usize) {
        self.access.audit_cap = cap.max(1);
    }

    /// The API token whose secret hashes to `hash`.
    pub fn api_token(&self, hash: &[u8; 32]) -> Option<&ApiTokenRecord> {
        self.access.tokens.get(hash)
    }

    /// The API tokens `scope` covers, oldest first.
    pub fn api_tokens(&self, scope: &Scope) -> Vec<ApiTokenRecord> {
        let mut out: Vec<_> = self
            .access
            .tokens
            .values()
            .filter(|t| scope.covers(t.tenant.as_deref()))
            .cloned()
            .collect();
        out.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
        out
    }

    /// Creates an API token for the secret hashing to `hash`, made by `by`
    /// (who must be allowed to: checked by the caller).
    pub fn create_api_token(
        &mut self,
        new: &NewApiToken,
        hash: [u8; 32],
        by: &Principal,
        now: SystemTime,
    ) -> Result<(ApiTokenRecord, Vec<StoreOp>), AdminError> {
        let name = crate::auth::token_name(&new.name)
            .map_err(|e| AdminError::BadBinding(e.to_string()))?;
        let tenant = new
            .tenant
            .as_deref()
            .map(crate::auth::tenant)
            .transpose()
            .map_err(|e| AdminError::BadBinding(e.to_string()))?;
        if let Some(ttl) = new.ttl {
            if ttl < Duration::from_secs(1) || ttl > MAX_API_TOKEN_TTL {
                return Err(AdminError::BadExpiry("1s to 3650d".into()));
            }
        }
        let rec = ApiTokenRecord {
            id: format!("at-{}", &meshlib::proto::hex(&hash)[..12]),
            name,
            role: new.role,
            tenant,
            hash,
            created: unix(now),
            expires: new.ttl.map(|t| unix(now).saturating_add(t.as_secs())),
            created_by: by.token_id.clone(),
        };
        self.access.tokens.insert(hash, rec.clone());
        Ok((rec.clone(), vec![StoreOp::PutApiToken(rec)]))
    }

    /// Revokes the API token `id` if `scope` covers it (else it is unknown).
    pub fn delete_api_token(
        &mut self,
        id: &str,
        scope: &Scope,
    ) -> Result<(ApiTokenRecord, Vec<StoreOp>), AdminError> {
        let rec = self
            .access
            .tokens
            .values()
            .find(|t| t.id == id && scope.covers(t.tenant.as_deref()))
            .cloned()
            .ok_or_else(|| AdminError::UnknownToken(id.to_owned()))?;
        self.access.tokens.remove(&rec.hash);
        Ok((rec.clone(), vec![StoreOp::DeleteApiToken(rec.hash)]))
    }

    /// Appends `entry` to the audit trail (its `seq` is set here), dropping
    /// the oldest entries past the bound.
    pub fn record_audit(&mut self, mut entry: AuditRecord) -> Vec<StoreOp> {
        let a = &mut self.access;
        entry.seq = a.audit.keys().next_back().map_or(1, |s| s + 1);
        let mut ops = vec![StoreOp::PutAudit(entry.clone())];
        a.audit.insert(entry.seq, entry);
        while a.audit.len() > a.audit_cap {
            if let Some((seq, _)) = a.audit.pop_first() {
                ops.push(StoreOp::DeleteAudit(seq));
            }
        }
        ops
    }

    /// The latest `query.limit` entries answering `query` that `scope`
    /// covers, oldest first.
    pub fn audit(&self, query: &AuditQuery, scope: &Scope) -> Vec<AuditRecord> {
        let mut out: Vec<AuditRecord> = self
            .access
            .audit
            .values()
            .rev()
            .filter(|e| scope.covers(e.tenant.as_deref()) && query.matches(e))
            .take(query.limit)
            .cloned()
            .collect();
        out.reverse();
        out
    }

    /// Sets (or clears) a network's tenant.
    pub fn set_tenant(
        &mut self,
        network: NetworkId,
        tenant: Option<String>,
    ) -> Result<(NetworkRecord, Vec<StoreOp>), AdminError> {
        let tenant = tenant
            .as_deref()
            .map(crate::auth::tenant)
            .transpose()
            .map_err(|e| AdminError::BadBinding(e.to_string()))?;
        let net = self
            .networks
            .get_mut(&network)
            .ok_or_else(|| AdminError::UnknownNetwork(network.to_string()))?;
        net.rec.tenant = tenant;
        Ok((net.rec.clone(), vec![StoreOp::PutNetwork(net.rec.clone())]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Records;

    fn entry(tenant: Option<&str>, time_ms: u64) -> AuditRecord {
        AuditRecord {
            seq: 0,
            time_ms,
            token: "admin".into(),
            token_name: "admin".into(),
            role: Role::Admin,
            client: None,
            method: "POST".into(),
            route: "/v1/networks".into(),
            path: "/v1/networks".into(),
            network: None,
            network_name: None,
            tenant: tenant.map(str::to_owned),
            target: None,
            status: 201,
        }
    }

    #[test]
    fn the_audit_trail_is_bounded_and_scoped() {
        let (mut reg, _) = Registry::load(
            Records::default(),
            16,
            Duration::ZERO,
            SystemTime::UNIX_EPOCH,
        );
        reg.set_audit_cap(3);
        let mut dropped = vec![];
        for i in 0..5u64 {
            let t = if i % 2 == 0 { Some("a") } else { None };
            for op in reg.record_audit(entry(t, i * 1000)) {
                if let StoreOp::DeleteAudit(seq) = op {
                    dropped.push(seq);
                }
            }
        }
        assert_eq!(dropped, vec![1, 2]);
        let all = AuditQuery {
            limit: 100,
            ..Default::default()
        };
        let seqs = |v: Vec<AuditRecord>| v.iter().map(|e| e.seq).collect::<Vec<_>>();
        assert_eq!(seqs(reg.audit(&all, &Scope::All)), vec![3, 4, 5]);
        assert_eq!(
            seqs(reg.audit(&all, &Scope::Tenant("a".into()))),
            vec![3, 5]
        );
        let window = AuditQuery {
            since: Some(3),
            until: Some(4),
            limit: 100,
            ..Default::default()
        };
        assert_eq!(seqs(reg.audit(&window, &Scope::All)), vec![4]);
        let last = AuditQuery {
            limit: 1,
            ..Default::default()
        };
        assert_eq!(seqs(reg.audit(&last, &Scope::All)), vec![5]);
    }

    #[test]
    fn api_tokens_are_kept_by_hash_and_revoked_in_scope() {
        let (mut reg, _) = Registry::load(
            Records::default(),
            16,
            Duration::ZERO,
            SystemTime::UNIX_EPOCH,
        );
        let new = NewApiToken {
            name: "ci".into(),
            role: Role::Operator,
            tenant: Some("a".into()),
            ttl: None,
        };
        let (rec, ops) = reg
            .create_api_token(&new, [5; 32], &Principal::root(), SystemTime::UNIX_EPOCH)
            .unwrap();
        assert!(matches!(&ops[..], [StoreOp::PutApiToken(r)] if r.hash == [5; 32]));
        assert_eq!(reg.api_token(&[5; 32]).map(|t| &t.id), Some(&rec.id));
        assert!(reg.api_tokens(&Scope::Tenant("b".into())).is_empty());
        assert!(reg
            .delete_api_token(&rec.id, &Scope::Tenant("b".into()))
            .is_err());
        reg.delete_api_token(&rec.id, &Scope::Tenant("a".into()))
            .unwrap();
        assert!(reg.api_token(&[5; 32]).is_none());
        let bad = NewApiToken {
            tenant: Some("Not A Label".into()),
            ..new
        };
        assert!(reg
            .create_api_token(&bad, [6; 32], &Principal::root(), SystemTime::UNIX_EPOCH)
            .is_err());
    }
}
