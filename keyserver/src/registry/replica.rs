//! The registry as one replica among several: applying stored records that
//! another replica committed (or putting back what a failed commit tried),
//! and the stored change log.
//!
//! A shared store (etcd) tells each replica every record another replica
//! wrote, as [`StoreOp`]s: each is the new state of one record (its value,
//! or its absence). [`Registry::apply`] makes memory match them: members
//! take or give back their address, index and instance name, networks
//! appear and go, the change log follows. The same call puts back the last
//! committed state of the records a refused commit touched, so memory never
//! holds what the store does not.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshlib::ids::NetworkId;
use meshlib::netmap::MapDelta;

use super::network::Network;
use super::{unix, Change, LogRecord, MemberRecord, Registry, StoreOp};

/// Order of application inside one batch: a batch holds the final state of
/// distinct records, so any order gives the same records, but memory's
/// invariants (an address held by one member, a member inside an existing
/// network) need networks first, releases before reservations, and a
/// network's deletion last.
fn rank(op: &StoreOp) -> u8 {
    match op {
        StoreOp::PutNetwork(_) => 0,
        StoreOp::DeleteMember(..)
        | StoreOp::DeleteToken(_)
        | StoreOp::DeleteQuarantine(..)
        | StoreOp::DeleteLog(..)
        | StoreOp::DeleteService(..) => 1,
        StoreOp::PutMember(_) | StoreOp::PutToken(_) | StoreOp::PutService(_) => 2,
        StoreOp::PutQuarantine(..) | StoreOp::PutLog(_) => 3,
        StoreOp::DeleteNetwork(_) => 4,
        // Independent of networks.
        StoreOp::PutApiToken(_)
        | StoreOp::DeleteApiToken(_)
        | StoreOp::PutAudit(_)
        | StoreOp::DeleteAudit(_) => 5,
    }
}

impl Registry {
    /// Fills each network's change log from stored entries: the contiguous
    /// run ending at the network's generation, at most `log_cap` of them.
    pub(super) fn load_log(&mut self, log: Vec<LogRecord>) {
        let mut by_net: HashMap<NetworkId, Vec<MapDelta>> = HashMap::new();
        for rec in log {
            by_net.entry(rec.network).or_default().push(rec.delta);
        }
        for (id, mut deltas) in by_net {
            let Some(net) = self.networks.get_mut(&id) else {
                continue;
            };
            deltas.sort_by_key(|d| std::cmp::Reverse(d.to));
            let mut want = net.rec.generation;
            for d in deltas {
                if d.to != want || d.from >= d.to || net.log.len() >= self.log_cap {
                    break;
                }
                want = d.from;
                net.log.push_front(d);
            }
        }
    }

    /// The change-log writes for `changes`: one entry per change, and the
    /// deletion of the entry that falls out of the log (`log_cap` kept).
    pub fn log_ops(&self, changes: &[Change]) -> Vec<StoreOp> {
        let cap = self.log_cap as u64;
        let mut ops = Vec::with_capacity(changes.len() * 2);
        for c in changes {
            ops.push(StoreOp::PutLog(LogRecord {
                network: c.network,
                delta: c.delta.clone(),
                removed: c.removed,
            }));
            if c.delta.to > cap {
                ops.push(StoreOp::DeleteLog(c.network, c.delta.to - cap));
            }
        }
        ops
    }

    /// Makes memory match stored records written elsewhere (or put back
    /// after a refused commit). Each op is the state of one record; a batch
    /// is applied in an order that keeps memory consistent (see `rank`).
    /// Records that do not fit (a member of an unknown network, an address
    /// held by another member) are skipped; the reasons are returned.
    pub fn apply(&mut self, ops: &[StoreOp]) -> Vec<String> {
        let mut sorted: Vec<&StoreOp> = ops.iter().collect();
        sorted.sort_by_key(|op| rank(op));
        let mut warnings = Vec::new();
        for op in sorted {
            if let Err(why) = self.apply_one(op) {
                warnings.push(why);
            }
        }
        warnings
    }

    fn apply_one(&mut self, op: &StoreOp) -> Result<(), String> {
        match op {
            StoreOp::PutNetwork(rec) => {
                if let Some(net) = self.networks.get_mut(&rec.id) {
                    if net.rec.name != rec.name {
                        self.names.remove(&net.rec.name);
                        self.names.insert(rec.name.clone(), rec.id);
                    }
                    net.rec = rec.clone();
                    net.sync_addresses(self.quarantine);
                } else {
                    let net = Network::new(rec.clone(), self.quarantine)
                        .map_err(|e| format!("network {}: {e}", rec.id))?;
                    self.names.insert(rec.name.clone(), rec.id);
                    self.networks.insert(rec.id, net);
                }
            }
            StoreOp::DeleteNetwork(id) => {
                if let Some(net) = self.networks.remove(id) {
                    self.names.remove(&net.rec.name);
                }
            }
            StoreOp::PutToken(t) => {
                self.tokens.insert(t.hash, t.clone());
            }
            StoreOp::DeleteToken(hash) => {
                self.tokens.remove(hash);
            }
            StoreOp::PutMember(m) => self.apply_member(m)?,
            StoreOp::DeleteMember(id, key) => {
                if let Some(net) = self.networks.get_mut(id) {
                    if let Some(rec) = net.members.remove(key) {
                        net.catalog.remove(&rec.member);
                        net.alloc.free(rec.member.ip);
                        if net.instances.get(&rec.member.instance) == Some(key) {
                            net.instances.remove(&rec.member.instance);
                        }
                    }
                }
            }
            StoreOp::PutQuarantine(id, ip, until) => {
                if let Some(net) = self.networks.get_mut(id) {
                    net.alloc
                        .quarantine_until(*ip, UNIX_EPOCH + Duration::from_secs(*until));
                }
            }
            StoreOp::DeleteQuarantine(id, ip) => {
                if let Some(net) = self.networks.get_mut(id) {
                    net.alloc.unquarantine(*ip);
                }
            }
            StoreOp::PutLog(rec) => {
                if let Some(net) = self.networks.get_mut(&rec.network) {
                    put_log(&mut net.log, rec.delta.clone(), self.log_cap);
                }
            }
            StoreOp::DeleteLog(id, to) => {
                if let Some(net) = self.networks.get_mut(id) {
                    // Entries leave from the front (eviction) or the back
                    // (a refused commit); one in the middle takes the older
                    // ones with it, so the log stays contiguous.
                    if let Some(pos) = net.log.iter().position(|d| d.to == *to) {
                        if pos + 1 == net.log.len() {
                            net.log.pop_back();
                        } else {
                            net.log.drain(..=pos);
                        }
                    }
                }
            }
            StoreOp::PutService(r) => {
                if let Some(net) = self.networks.get_mut(&r.network) {
                    net.services.insert(r.group.name.clone(), r.clone());
                }
            }
            StoreOp::DeleteService(id, name) => {
                if let Some(net) = self.networks.get_mut(id) {
                    net.services.remove(name);
                }
            }
            StoreOp::PutApiToken(_)
            | StoreOp::DeleteApiToken(_)
            | StoreOp::PutAudit(_)
            | StoreOp::DeleteAudit(_) => self.access.apply(op),
        }
        Ok(())
    }

    fn apply_member(&mut self, m: &MemberRecord) -> Result<(), String> {
        let key = m.member.public_key;
        let net = self
            .networks
            .get_mut(&m.network)
            .ok_or_else(|| format!("member {key} of unknown network {}", m.network))?;
        let old_ip = net.members.get(&key).map(|r| r.member.ip);
        if old_ip != Some(m.member.ip) {
            net.alloc
                .reserve(m.member.ip)
                .map_err(|e| format!("member {key}: {e}"))?;
            if let Some(ip) = old_ip {
                net.alloc.free(ip);
            }
        }
        if let Some(old) = net.members.get(&key) {
            net.catalog.remove(&old.member);
            if old.member.instance != m.member.instance
                && net.instances.get(&old.member.instance) == Some(&key)
            {
                net.instances.remove(&old.member.instance);
            }
        }
        net.instances.insert(m.member.instance.clone(), key);
        net.catalog.add(&m.member);
        net.members.insert(key, m.clone());
        Ok(())
    }

    /// Like [`Registry::collect_tokens`], at most `limit` tokens (a shared
    /// store bounds the writes of one transaction).
    pub fn collect_tokens_at_most(&mut self, now: SystemTime, limit: usize) -> Vec<StoreOp> {
        let now = unix(now);
        let dead: Vec<[u8; 32]> = self
            .tokens
            .values()
            .filter(|t| t.uses_left == 0 || t.expires <= now)
            .map(|t| t.hash)
            .take(limit)
            .collect();
        dead.into_iter()
            .map(|hash| {
                self.tokens.remove(&hash);
                StoreOp::DeleteToken(hash)
            })
            .collect()
    }

    /// Online and offline members of every network (by id), for metrics.
    pub fn member_states(&self) -> Vec<(String, usize, usize)> {
        let mut out: Vec<_> = self
            .networks
            .iter()
            .map(|(id, n)| {
                let online = n
                    .members
                    .values()
                    .filter(|r| r.member.state == meshlib::netmap::MemberState::Online)
                    .count();
                (id.to_string(), online, n.members.len() - online)
            })
            .collect();
        out.sort();
        out
    }

    /// Keys of a network's members (a forced deletion removes them in
    /// batches first).
    pub fn member_keys(&self, network: NetworkId) -> Vec<meshlib::keys::PublicKey> {
        self.networks
            .get(&network)
            .map(|n| n.members.keys().copied().collect())
            .unwrap_or_default()
    }
}

/// Adds a stored delta to a memory log: after the newest (the usual case),
/// before the oldest (a refused commit put back an evicted entry), in
/// place of an equal one; a delta that fits nowhere starts the log anew.
fn put_log(log: &mut std::collections::VecDeque<MapDelta>, delta: MapDelta, cap: usize) {
    if let Some(same) = log.iter_mut().find(|d| d.to == delta.to) {
        *same = delta;
        return;
    }
    match (log.front(), log.back()) {
        (_, Some(last)) if last.to == delta.from => log.push_back(delta),
        (Some(first), _) if first.from == delta.to => log.push_front(delta),
        _ => {
            log.clear();
            log.push_back(delta);
        }
    }
    while log.len() > cap {
        log.pop_front();
    }
}

/// The changes to push for a batch of stored records: one per change-log
/// entry, in generation order.
pub fn changes_of(ops: &[StoreOp]) -> Vec<Change> {
    let mut out: Vec<Change> = ops
        .iter()
        .filter_map(|op| match op {
            StoreOp::PutLog(rec) => Some(Change {
                network: rec.network,
                delta: rec.delta.clone(),
                removed: rec.removed,
            }),
            _ => None,
        })
        .collect();
    out.sort_by_key(|c| (c.network, c.delta.to));
    out
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use meshlib::keys::PrivateKey;
    use meshlib::proto::JoinRequest;

    use super::super::{Records, Registry, StoreOp};
    use super::changes_of;

    fn join_req(net: meshlib::ids::NetworkId) -> JoinRequest {
        JoinRequest {
            network: net,
            token_secret: [1; 32],
            public_key: PrivateKey::generate().public_key(),
            service: "api".into(),
            app_id: None,
            process_type: Default::default(),
            instance: None,
            runner: "r".into(),
            ports: vec![],
            endpoints: vec![],
            service_groups: vec![],
            publish: vec![],
            replace: false,
            ephemeral: false,
        }
    }

    /// Two replicas from the same records: what one commits, the other
    /// applies, and both then hold the same members, addresses, indexes and
    /// change log; putting back the old records undoes a join exactly.
    #[test]
    fn apply_follows_another_replica_and_undoes_a_join() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let q = Duration::from_secs(300);
        let (mut a, _) = Registry::load(Records::default(), 16, q, now);
        let (net, mut base) = a
            .create_network("prod", meshlib::ipam::DEFAULT_RANGE, now)
            .unwrap();
        base.extend(
            a.create_token(
                net.id,
                &[1; 32],
                10,
                Duration::from_secs(3600),
                None,
                None,
                now,
            )
            .unwrap()
            .1,
        );
        let (mut b, _) = Registry::load(Records::default(), 16, q, now);
        b.apply(&base);
        let obs = "127.0.0.1:1".parse().unwrap();
        for _ in 0..3 {
            let j = a
                .join(&join_req(net.id), obs, &[2; 32], false, now)
                .unwrap();
            let mut ops = j.ops.clone();
            let changes: Vec<_> = j.changes;
            ops.extend(a.log_ops(&changes));
            assert!(b.apply(&ops).is_empty());
            assert_eq!(changes_of(&ops).len(), 1);
        }
        assert_eq!(a.members(net.id).len(), 3);
        let ips = |r: &Registry| {
            r.members(net.id)
                .iter()
                .map(|m| (m.member.ip, m.member.index, m.member.instance.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(ips(&a), ips(&b));
        assert_eq!(
            a.catchup(net.id, 1).map(|c| format!("{c:?}")),
            b.catchup(net.id, 1).map(|c| format!("{c:?}"))
        );
        // Undo on b: a join tried, then the records it touched put back.
        let before_token = b.tokens(net.id)[0].clone();
        let before_net = b.network(net.id).unwrap().clone();
        let j = b
            .join(&join_req(net.id), obs, &[2; 32], false, now)
            .unwrap();
        let undo = vec![
            StoreOp::PutToken(before_token.clone()),
            StoreOp::DeleteMember(net.id, j.member.public_key),
            StoreOp::PutNetwork(before_net.clone()),
            StoreOp::DeleteLog(net.id, before_net.generation + 1),
        ];
        assert!(b.apply(&undo).is_empty());
        assert_eq!(ips(&b), ips(&a));
        assert_eq!(b.tokens(net.id)[0], before_token);
        // The address came back without quarantine: the next join takes it.
        let again = b
            .join(&join_req(net.id), obs, &[2; 32], false, now)
            .unwrap();
        assert_eq!(again.member.ip, j.member.ip);
        assert_eq!(again.member.index, j.member.index);
    }

    /// The catalog answers what a scan of the members would: indexes freed
    /// by removals (here or applied from another replica) are reused
    /// lowest first, a service keeps its app id while it has members.
    #[test]
    fn catalog_follows_joins_removals_and_applied_records() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let (mut r, _) = Registry::load(Records::default(), 16, Duration::from_secs(300), now);
        let (net, _) = r
            .create_network("prod", meshlib::ipam::DEFAULT_RANGE, now)
            .unwrap();
        r.create_token(
            net.id,
            &[1; 32],
            100,
            Duration::from_secs(3600),
            None,
            None,
            now,
        )
        .unwrap();
        let obs = "127.0.0.1:1".parse().unwrap();
        let mut joined = Vec::new();
        for _ in 0..6 {
            let j = r
                .join(&join_req(net.id), obs, &[2; 32], false, now)
                .unwrap();
            joined.push(j.member);
        }
        assert_eq!(
            joined.iter().map(|m| m.index).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5, 6]
        );
        let app = joined[0].app_id.clone();
        assert!(joined.iter().all(|m| m.app_id == app));
        r.remove_member(net.id, &joined[1].public_key.to_string(), now)
            .unwrap();
        // A removal applied as another replica's record frees index 4.
        r.apply(&[StoreOp::DeleteMember(net.id, joined[3].public_key)]);
        let a = r
            .join(&join_req(net.id), obs, &[2; 32], false, now)
            .unwrap();
        let b = r
            .join(&join_req(net.id), obs, &[2; 32], false, now)
            .unwrap();
        let c = r
            .join(&join_req(net.id), obs, &[2; 32], false, now)
            .unwrap();
        assert_eq!((a.member.index, b.member.index, c.member.index), (2, 4, 7));
        assert_eq!(a.member.app_id, app);
        // Every member gone: the service's next member may get another id,
        // and index 1 again.
        for m in r.members(net.id) {
            r.remove_member(net.id, &m.member.public_key.to_string(), now)
                .unwrap();
        }
        let d = r
            .join(&join_req(net.id), obs, &[2; 32], false, now)
            .unwrap();
        assert_eq!(d.member.index, 1);
    }
}
