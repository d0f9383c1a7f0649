//! The replica set around one etcd prefix: which replicas live (and their
//! QUIC addresses, for join tokens), and which replica holds each member's
//! session (so only that replica judges the member's heartbeats, and a
//! member whose replica died is noticed).
//!
//! Both live under the replica's lease: `replicas/<id>` and
//! `presence/<network>/<member>`; when a replica dies or is cut off longer
//! than the lease TTL, etcd deletes its keys and every other replica sees
//! it through the watch.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Weak};

use etcdv3client::pb;
use meshlib::ids::NetworkId;
use meshlib::keys::PublicKey;
use parking_lot::Mutex;

use super::conn::Conn;
use super::keys::{self, ReplicaInfo, Side};
use super::MAX_TXN_OPS;

/// Handle to the replica set (cheap to clone).
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("id", &self.inner.id)
            .finish_non_exhaustive()
    }
}

struct Inner {
    /// This replica's id (random per process).
    id: String,
    /// The keyserver's prefix in etcd.
    prefix: String,
    conn: Conn,
    state: Mutex<State>,
    /// Wakes the presence writer ([`presence_writer`]).
    wake: Arc<tokio::sync::Notify>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The writer holds only a weak reference: let it see the end.
        self.wake.notify_one();
    }
}

#[derive(Default)]
struct State {
    replicas: BTreeMap<String, ReplicaInfo>,
    /// Replica holding each member's session.
    presence: HashMap<(NetworkId, PublicKey), String>,
    /// When a member's presence vanished (Unix seconds), while it has none.
    orphaned: HashMap<(NetworkId, PublicKey), u64>,
    /// Members whose sessions this replica holds (put again under a new lease).
    mine: HashSet<(NetworkId, PublicKey)>,
    /// What this replica announces.
    advertise: Option<ReplicaInfo>,
    /// When this replica last put its `replicas/<id>` key.
    registered: Option<std::time::Instant>,
    /// Presence keys to write (`true`: put under the lease; `false`:
    /// delete if still this replica's), the latest wish per member. One
    /// writer takes them in transactions of [`MAX_TXN_OPS`]: a replica
    /// holding tens of thousands of sessions puts them again after a new
    /// lease without a call per member.
    pending: HashMap<(NetworkId, PublicKey), bool>,
}

impl Cluster {
    /// A replica with a fresh id on `conn`; starts keeping its lease.
    pub(super) fn start(conn: Conn, prefix: String) -> Self {
        let cluster = Self {
            inner: Arc::new(Inner {
                id: uuid::Uuid::new_v4().simple().to_string()[..12].to_owned(),
                prefix,
                conn: conn.clone(),
                state: Mutex::new(State::default()),
                wake: Arc::new(tokio::sync::Notify::new()),
            }),
        };
        let weak: Weak<Inner> = Arc::downgrade(&cluster.inner);
        conn.spawn_task(presence_writer(weak.clone(), cluster.inner.wake.clone()));
        conn.start_lease(move |lease| {
            if let Some(inner) = weak.upgrade() {
                (Cluster { inner }).on_grant(lease);
            }
        });
        cluster
    }

    /// This replica's id.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// The lease this replica's keys live under now (0: none yet).
    pub fn lease_id(&self) -> i64 {
        self.inner.conn.lease_id()
    }

    fn full(&self, key: &str) -> Vec<u8> {
        format!("{}{key}", self.inner.prefix).into_bytes()
    }

    /// A new lease: put this replica's keys under it.
    fn on_grant(&self, lease: i64) {
        let advertise = {
            let mut st = self.inner.state.lock();
            let mine: Vec<_> = st.mine.iter().copied().collect();
            for m in mine {
                st.pending.insert(m, true);
            }
            if st.advertise.is_some() {
                st.registered = Some(std::time::Instant::now());
            }
            st.advertise.clone()
        };
        if let Some(info) = advertise {
            self.put(keys::replica(&self.inner.id), &info, lease);
        }
        self.inner.wake.notify_one();
    }

    /// Puts this replica's `replicas/<id>` key again when its own watch
    /// does not show what it announces a while after the last put. The
    /// puts are calls in flight at once, so the first announcement
    /// (without the relay, at start) could land after the second (with
    /// it), and a put that failed (etcd starting) is not retried: the
    /// lease lives on, so the other replicas would never learn this one's
    /// relay, and two members on two replicas would be told two relays.
    /// Cheap; the server calls it every half second.
    pub fn ensure_registered(&self) {
        let lease = self.inner.conn.lease_id();
        let info = {
            let mut st = self.inner.state.lock();
            let due = st
                .registered
                .is_none_or(|t| t.elapsed() >= REREGISTER_AFTER);
            if lease == 0 || !due || st.replicas.get(&self.inner.id) == st.advertise.as_ref() {
                return;
            }
            let Some(info) = st.advertise.clone() else {
                return;
            };
            st.registered = Some(std::time::Instant::now());
            info
        };
        tracing::info!(replica = %self.inner.id, "announcing this replica again (etcd does not show what it announces)");
        self.put(keys::replica(&self.inner.id), &info, lease);
    }

    fn put<T: serde::Serialize>(&self, key: String, value: &T, lease: i64) {
        let Ok(value) = serde_json::to_vec(value) else {
            return;
        };
        self.put_raw(key, value, lease);
    }

    fn put_raw(&self, key: String, value: Vec<u8>, lease: i64) {
        let req = pb::PutRequest {
            key: self.full(&key),
            value,
            lease,
            ..Default::default()
        };
        self.inner.conn.spawn(move |mut c| async move {
            let _ = c.kv.put(req).await;
        });
    }

    /// Announces this replica's QUIC addresses and its relay's (under its
    /// lease).
    pub fn register(
        &self,
        advertise: Vec<SocketAddr>,
        relay: Option<SocketAddr>,
        relay_tcp: Option<SocketAddr>,
    ) {
        let info = ReplicaInfo {
            advertise,
            relay,
            relay_tcp,
        };
        let lease = {
            let mut st = self.inner.state.lock();
            st.advertise = Some(info.clone());
            let lease = self.inner.conn.lease_id();
            if lease != 0 {
                st.registered = Some(std::time::Instant::now());
            }
            lease
        };
        if lease != 0 {
            self.put(keys::replica(&self.inner.id), &info, lease);
        }
    }

    /// This replica holds a session of the member now.
    pub fn claim(&self, n: NetworkId, k: PublicKey) {
        {
            let mut st = self.inner.state.lock();
            st.mine.insert((n, k));
            st.presence.insert((n, k), self.inner.id.clone());
            st.orphaned.remove(&(n, k));
            st.pending.insert((n, k), true);
        }
        self.inner.wake.notify_one();
    }

    /// This replica's last session of the member ended: its presence key
    /// goes, unless another replica took the member over meanwhile.
    pub fn release(&self, n: NetworkId, k: PublicKey) {
        {
            let mut st = self.inner.state.lock();
            st.mine.remove(&(n, k));
            st.pending.insert((n, k), false);
        }
        self.inner.wake.notify_one();
    }

    /// Follows a replica or presence key written or deleted (by anyone).
    pub(super) fn observe(&self, side: Side, value: Option<&[u8]>, now: u64) {
        let mut st = self.inner.state.lock();
        match (side, value) {
            (Side::Replica(id), Some(v)) => match serde_json::from_slice::<ReplicaInfo>(v) {
                Ok(info) => {
                    st.replicas.insert(id, info);
                }
                Err(e) => tracing::warn!("skipped replica record {id:?}: {e}"),
            },
            (Side::Replica(id), None) => {
                st.replicas.remove(&id);
            }
            (Side::Presence(n, k), Some(v)) => {
                st.presence
                    .insert((n, k), String::from_utf8_lossy(v).into_owned());
                st.orphaned.remove(&(n, k));
            }
            (Side::Presence(n, k), None) => {
                if st.presence.remove(&(n, k)).is_some() && !st.mine.contains(&(n, k)) {
                    st.orphaned.insert((n, k), now);
                }
            }
        }
    }

    /// A member's last sign of life as far as the replica set knows, for
    /// a replica that holds no session of it: now if another replica holds
    /// one, the moment its presence vanished if it is orphaned, `None` if
    /// nothing is known (the stored last contact decides).
    pub fn heard(&self, n: NetworkId, k: &PublicKey, now: u64) -> Option<u64> {
        let st = self.inner.state.lock();
        match st.presence.get(&(n, *k)) {
            Some(r) if *r != self.inner.id => Some(now),
            _ => st.orphaned.get(&(n, *k)).copied(),
        }
    }

    /// Whether another replica holds a session of the member.
    pub fn present_elsewhere(&self, n: NetworkId, k: &PublicKey) -> bool {
        self.inner
            .state
            .lock()
            .presence
            .get(&(n, *k))
            .is_some_and(|r| *r != self.inner.id)
    }

    /// QUIC addresses of every live replica (this one's first).
    pub fn replica_addrs(&self) -> Vec<SocketAddr> {
        let st = self.inner.state.lock();
        let mut out: Vec<SocketAddr> = st
            .advertise
            .iter()
            .flat_map(|i| i.advertise.iter().copied())
            .collect();
        for (id, info) in &st.replicas {
            if *id == self.inner.id {
                continue;
            }
            for a in &info.advertise {
                if !out.contains(a) {
                    out.push(*a);
                }
            }
        }
        out
    }

    /// The relay every replica tells its members about: the one of the
    /// live replica with the smallest id among those with a relay (UDP
    /// address, TCP address), so two members connected to different
    /// replicas meet at the same relay. `None` until a replica with a relay
    /// is known (this one's registration included).
    pub fn shared_relay(&self) -> Option<(SocketAddr, Option<SocketAddr>)> {
        let st = self.inner.state.lock();
        let own = st
            .advertise
            .as_ref()
            .map(|info| (self.inner.id.as_str(), info));
        st.replicas
            .iter()
            .map(|(id, info)| (id.as_str(), info))
            .filter(|(id, _)| *id != self.inner.id)
            .chain(own)
            .filter_map(|(id, info)| Some((id, info.relay?, info.relay_tcp)))
            .min_by(|a, b| a.0.cmp(b.0))
            .map(|(_, udp, tcp)| (udp, tcp))
    }

    /// Number of live replicas known (this one included once registered).
    pub fn replicas(&self) -> usize {
        self.inner.state.lock().replicas.len()
    }

    /// Whether the lease is held (the replica's keys live).
    pub fn has_lease(&self) -> bool {
        self.inner.conn.lease_id() != 0
    }
}

/// How long a replica waits to see its own `replicas/<id>` key before it
/// puts it again ([`Cluster::ensure_registered`]).
const REREGISTER_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Most presence deletions in flight at once.
const RELEASES_AT_ONCE: usize = 32;

/// Writes presence keys: puts in transactions of up to [`MAX_TXN_OPS`]
/// under the lease in force (none: they wait for the next grant, which
/// puts every member of the replica again), deletions each compared with
/// this replica's id (another replica may hold the member now), up to
/// [`RELEASES_AT_ONCE`] at a time. One task, so a replica never floods etcd
/// with a call per member (which delayed its lease's keep-alives past the
/// TTL under load, and a lost lease made it put every key again).
async fn presence_writer(inner: Weak<Inner>, wake: Arc<tokio::sync::Notify>) {
    loop {
        let notified = wake.notified();
        let Some(cluster) = inner.upgrade().map(|inner| Cluster { inner }) else {
            return;
        };
        let (puts, releases, lease) = {
            let mut st = cluster.inner.state.lock();
            let batch: Vec<_> = st.pending.keys().take(MAX_TXN_OPS).copied().collect();
            let mut puts = Vec::new();
            let mut releases = Vec::new();
            for m in batch {
                match st.pending.remove(&m) {
                    Some(true) => puts.push(m),
                    Some(false) => releases.push(m),
                    None => {}
                }
            }
            (puts, releases, cluster.inner.conn.lease_id())
        };
        if puts.is_empty() && releases.is_empty() {
            drop(cluster);
            notified.await;
            continue;
        }
        let mut failed = false;
        if !puts.is_empty() && lease != 0 {
            let value = cluster.inner.id.clone().into_bytes();
            let txn = pb::TxnRequest {
                compare: vec![],
                success: puts
                    .iter()
                    .map(|(n, k)| pb::RequestOp {
                        request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                            key: cluster.full(&keys::presence(n, k)),
                            value: value.clone(),
                            lease,
                            ..Default::default()
                        })),
                    })
                    .collect(),
                failure: vec![],
            };
            let mut client = cluster.inner.conn.client_now();
            let done = tokio::time::timeout(super::conn::CALL_TIMEOUT, client.kv.txn(txn)).await;
            if !matches!(done, Ok(Ok(_))) {
                tracing::debug!("etcd presence puts failed: {done:?}");
                failed = true;
                // Again, unless a newer wish came meanwhile (a lost lease
                // puts them all again anyway).
                let mut st = cluster.inner.state.lock();
                for m in puts {
                    if st.mine.contains(&m) {
                        st.pending.entry(m).or_insert(true);
                    }
                }
            }
        }
        for chunk in releases.chunks(RELEASES_AT_ONCE) {
            let mut calls = tokio::task::JoinSet::new();
            for (n, k) in chunk {
                let key = cluster.full(&keys::presence(n, k));
                let mine = cluster.inner.id.clone().into_bytes();
                let txn = pb::TxnRequest {
                    compare: vec![pb::Compare {
                        result: pb::compare::CompareResult::Equal as i32,
                        target: pb::compare::CompareTarget::Value as i32,
                        key: key.clone(),
                        range_end: vec![],
                        target_union: Some(pb::compare::TargetUnion::Value(mine)),
                    }],
                    success: vec![pb::RequestOp {
                        request: Some(pb::request_op::Request::RequestDeleteRange(
                            pb::DeleteRangeRequest {
                                key,
                                ..Default::default()
                            },
                        )),
                    }],
                    failure: vec![],
                };
                let mut client = cluster.inner.conn.client_now();
                calls.spawn(async move {
                    let _ =
                        tokio::time::timeout(super::conn::CALL_TIMEOUT, client.kv.txn(txn)).await;
                });
            }
            while calls.join_next().await.is_some() {}
        }
        drop(cluster);
        if failed {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
}
