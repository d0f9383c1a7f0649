//! Member lifecycle: online ↔ offline → expired, and key rotation.
//!
//! - *online* while heartbeats arrive (the driver keeps last-heartbeat times
//!   in memory and hands them to [`Registry::sweep`]);
//! - *offline* when the member says so ([`Registry::set_offline`]) or is
//!   silent for `offline-after`: peers stop naming and reaching it, but its
//!   address, index and name stay reserved; a resume or heartbeat brings it
//!   back ([`Registry::set_online`]);
//! - *expired* when offline longer than the network's `expire-after`:
//!   released like a leave, its address quarantined.
//!
//! Every transition is a map change pushed to the network like any other.

use std::time::{Duration, SystemTime};

use meshlib::ids::NetworkId;
use meshlib::keys::PublicKey;
use meshlib::netmap::{MapChange, MemberState};
use meshlib::proto::{ErrorCode, Secret};

use super::{unix, AdminError, Change, MemberRecord, Registry, StoreOp};

/// Offline and expiry timers (plain data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifecycle {
    /// A member silent this long goes offline. Default 30 s (the DNS TTL of
    /// seed 003: a stale answer never outlives the member by more).
    pub offline_after: Duration,
    /// An offline member is released this long after it went offline,
    /// unless its network says otherwise. Default 24 h.
    pub expire_after: Duration,
    /// An offline *ephemeral* member is released this long after it went
    /// offline. `None` (the default): `offline_after`, so a stateless
    /// instance that stopped frees its slot within a minute.
    pub ephemeral_after: Option<Duration>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self {
            offline_after: Duration::from_secs(30),
            expire_after: Duration::from_secs(24 * 3600),
            ephemeral_after: None,
        }
    }
}

impl Lifecycle {
    /// The heartbeat interval members are told: a third of `offline-after`
    /// (two can be lost before the member goes offline), 1–10 s.
    pub fn heartbeat_secs(&self) -> u16 {
        (self.offline_after.as_secs() / 3).clamp(1, 10) as u16
    }

    /// How long an offline ephemeral member is kept.
    pub fn ephemeral_after(&self) -> Duration {
        self.ephemeral_after.unwrap_or(self.offline_after)
    }
}

/// Why a key rotation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RotateError {
    /// Unknown member or wrong credential (deliberately the same error).
    #[error("unknown member or wrong credential")]
    BadCredential,
    /// The new key belongs to a member of the network, or this membership
    /// held it before.
    #[error("the new key is already used in this network")]
    KeyInUse,
}

impl RotateError {
    /// The wire error code.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::BadCredential => ErrorCode::BadCredential,
            Self::KeyInUse => ErrorCode::KeyInUse,
        }
    }
}

/// How many earlier keys of a membership are remembered.
const PREVIOUS_KEYS: usize = 4;

/// Marks a record online (clears `offline_since`).
pub(super) fn set_online(rec: &mut MemberRecord) {
    rec.member.state = MemberState::Online;
    rec.offline_since = None;
}

impl Registry {
    /// Sets the offline and expiry timers.
    pub fn set_lifecycle(&mut self, lifecycle: Lifecycle) {
        self.lifecycle = lifecycle;
    }

    /// The offline and expiry timers.
    pub fn lifecycle(&self) -> Lifecycle {
        self.lifecycle
    }

    /// Applies `f` to a member's record; a change (one delta) if what peers
    /// see changed, a store write if the record changed. `last_seen` is
    /// refreshed in memory either way.
    pub(super) fn update_member(
        &mut self,
        network: NetworkId,
        key: &PublicKey,
        now: SystemTime,
        f: impl FnOnce(&mut MemberRecord),
    ) -> (Option<Change>, Vec<StoreOp>) {
        let log_cap = self.log_cap;
        let Some(net) = self.networks.get_mut(&network) else {
            return (None, vec![]);
        };
        let Some(rec) = net.members.get_mut(key) else {
            return (None, vec![]);
        };
        let mut before = rec.clone();
        f(rec);
        rec.last_seen = unix(now);
        if rec.member == before.member {
            // A field only the keyserver sees (offline since, credential
            // used) is written; `last_seen` alone waits for the next write.
            before.last_seen = rec.last_seen;
            let stored = (*rec != before).then(|| StoreOp::PutMember(rec.clone()));
            return (None, stored.into_iter().collect());
        }
        let (member, stored) = (rec.member.clone(), StoreOp::PutMember(rec.clone()));
        let (change, net_op) = net.record(vec![MapChange::Upsert(member)], None, log_cap);
        (Some(change), vec![stored, net_op])
    }

    /// The member is stopping or silent: offline now (no-op if it is).
    pub fn set_offline(
        &mut self,
        network: NetworkId,
        key: &PublicKey,
        now: SystemTime,
    ) -> (Option<Change>, Vec<StoreOp>) {
        let since = unix(now);
        self.update_member(network, key, now, |rec| {
            if rec.member.state == MemberState::Online {
                rec.member.state = MemberState::Offline;
                rec.offline_since = Some(since);
            }
        })
    }

    /// The member is back (a heartbeat from an offline member): online now.
    pub fn set_online(
        &mut self,
        network: NetworkId,
        key: &PublicKey,
        now: SystemTime,
    ) -> (Option<Change>, Vec<StoreOp>) {
        self.update_member(network, key, now, set_online)
    }

    /// Whether the member exists and is offline.
    pub fn is_offline(&self, network: NetworkId, key: &PublicKey) -> bool {
        self.networks
            .get(&network)
            .and_then(|n| n.members.get(key))
            .is_some_and(|r| r.member.state == MemberState::Offline)
    }

    /// Sets a network's `expire-after` (`None`: the keyserver's default).
    pub fn set_expire_after(
        &mut self,
        network: NetworkId,
        expire_after: Option<Duration>,
    ) -> Result<Vec<StoreOp>, AdminError> {
        let net = self
            .networks
            .get_mut(&network)
            .ok_or_else(|| AdminError::UnknownNetwork(network.to_string()))?;
        net.rec.expire_after = expire_after.map(|d| d.as_secs());
        Ok(vec![StoreOp::PutNetwork(net.rec.clone())])
    }

    /// The `expire-after` in force for a network.
    pub fn expire_after(&self, network: NetworkId) -> Duration {
        self.networks
            .get(&network)
            .and_then(|n| n.rec.expire_after)
            .map_or(self.lifecycle.expire_after, Duration::from_secs)
    }

    /// Applies the timers at `now`: members silent for `offline-after` go
    /// offline, members offline past their network's `expire-after` are
    /// released. `heard` gives a member's last heartbeat (Unix seconds),
    /// kept by the driver in memory. Returns the changes to push and the
    /// writes, at most `limit` transitions (the rest wait for the next
    /// sweep, so one sweep never holds the registry long).
    pub fn sweep(
        &mut self,
        now: SystemTime,
        heard: impl Fn(NetworkId, &PublicKey) -> Option<u64>,
        limit: usize,
    ) -> (Vec<Change>, Vec<StoreOp>) {
        let now_s = unix(now);
        let offline_after = self.lifecycle.offline_after.as_secs();
        let ephemeral_after = self.lifecycle.ephemeral_after().as_secs();
        let mut silent = Vec::new();
        let mut expired = Vec::new();
        for (id, net) in &self.networks {
            let network_expire = self.expire_after(*id).as_secs();
            for (key, rec) in &net.members {
                match rec.offline_since {
                    None => {
                        let last = rec
                            .last_seen
                            .max(self.loaded_at)
                            .max(heard(*id, key).unwrap_or(0));
                        if now_s.saturating_sub(last) >= offline_after {
                            silent.push((*id, *key));
                        }
                    }
                    Some(since) => {
                        let expire = if rec.ephemeral {
                            ephemeral_after.min(network_expire)
                        } else {
                            network_expire
                        };
                        if now_s.saturating_sub(since) >= expire {
                            expired.push((*id, *key));
                        }
                    }
                }
            }
        }
        let (mut changes, mut ops) = (Vec::new(), Vec::new());
        for (id, key) in silent.into_iter().chain(expired).take(limit) {
            let (change, more) = if self.is_offline(id, &key) {
                match self.remove_key(id, key, now, true) {
                    Ok((c, o)) => (Some(c), o),
                    Err(_) => (None, vec![]),
                }
            } else {
                self.set_offline(id, &key, now)
            };
            changes.extend(change);
            ops.extend(more);
        }
        (changes, ops)
    }

    /// Replaces a member's key by `new` (after checking `credential`): the
    /// same record, address, index and names under the new key; one delta
    /// removing the old key and adding the new.
    pub fn rotate_key(
        &mut self,
        network: NetworkId,
        old: &PublicKey,
        credential: &Secret,
        new: PublicKey,
        now: SystemTime,
    ) -> Result<(Change, Vec<StoreOp>), RotateError> {
        self.authenticate(network, old, credential)
            .map_err(|_| RotateError::BadCredential)?;
        let log_cap = self.log_cap;
        let net = self
            .networks
            .get_mut(&network)
            .ok_or(RotateError::BadCredential)?;
        let reused = net.members[old].previous_keys.contains(&new);
        if net.members.contains_key(&new) || reused {
            return Err(RotateError::KeyInUse);
        }
        let mut rec = net.members.remove(old).ok_or(RotateError::BadCredential)?;
        rec.previous_keys.push(*old);
        let excess = rec.previous_keys.len().saturating_sub(PREVIOUS_KEYS);
        rec.previous_keys.drain(..excess);
        rec.member.public_key = new;
        rec.last_seen = unix(now);
        net.instances.insert(rec.member.instance.clone(), new);
        net.members.insert(new, rec.clone());
        let changes = vec![
            MapChange::Remove(*old),
            MapChange::Upsert(rec.member.clone()),
        ];
        let (change, net_op) = net.record(changes, Some(*old), log_cap);
        let ops = vec![
            StoreOp::DeleteMember(network, *old),
            StoreOp::PutMember(rec),
            net_op,
        ];
        Ok((change, ops))
    }
}
