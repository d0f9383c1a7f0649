//! [`EtcdStore`]: the keyserver's records in an etcd v3 cluster, shared by
//! any number of keyserver replicas (`--store etcd://host:2379,host2:2379/prefix`).
//!
//! Every commit is one etcd transaction guarded by revisions: for every key
//! it writes, the transaction compares the key's `mod_revision` with the
//! one this replica last saw (0: absent), and a network's creation also
//! checks that no network record changed since this replica's view (names
//! are unique). Every change of a network's members rewrites the network
//! record (its generation), so two replicas changing one network are
//! serialized by that key: they can never hand out the same address,
//! index, instance name or token use. When the transaction fails the
//! commit returns [`StoreError::Conflict`]: the caller puts its memory back
//! ([`Store::known`]), waits for the watch to catch up
//! ([`Store::catch_up`]), applies what the others wrote ([`Store::remote`])
//! and runs the operation again on fresh state.
//!
//! One watch of the whole prefix feeds every replica with what the others
//! wrote (including the change log, which becomes the pushes to members),
//! in revision order; what this replica wrote itself is recognised by its
//! revision and skipped. A value under the prefix that does not decode, or
//! does not match its key, is reported (a warning, and
//! [`EtcdStore::skipped`]) and skipped.
//!
//! Layout: see [`keys`]. Unreachable etcd (or no quorum): calls fail after
//! [`conn::CALL_TIMEOUT`], commits are refused ([`StoreError::Unavailable`])
//! and memory stays as the store has it; the watch reconnects by itself and
//! brings whatever happened meanwhile.

pub mod cluster;
pub mod conn;
pub mod keys;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcdv3client::pb;

pub use cluster::Cluster;
use conn::{Conn, Feed};
use keys::Decoded;

use crate::registry::{unix, Records, StoreOp};
use crate::store::{Store, StoreError};

/// Most operations etcd takes in one transaction (its `--max-txn-ops`
/// default).
pub const MAX_TXN_OPS: usize = 128;
/// Keys read per page when loading.
const PAGE: i64 = 500;
/// How long [`Store::catch_up`] waits for the watch.
const CATCH_UP: Duration = Duration::from_secs(3);
/// After a failed call, commits are refused at once for this long (not each
/// waiting for a timeout while the registry lock is held).
const COOL_DOWN: Duration = Duration::from_millis(500);

/// Where the records are: `etcd://host:port[,host:port...][/prefix]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdUrl {
    /// `host:port` of each etcd member (client URLs, plain HTTP/2).
    pub endpoints: Vec<String>,
    /// Key prefix, ending with `/` (default `/ist-mesh/`).
    pub prefix: String,
}

impl std::str::FromStr for EtcdUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let rest = s.strip_prefix("etcd://").ok_or_else(|| {
            format!("{s:?}: an etcd store is etcd://host:port[,host:port...][/prefix]")
        })?;
        let (hosts, path) = rest.split_once('/').unwrap_or((rest, ""));
        let endpoints: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(str::to_owned)
            .collect();
        if endpoints.is_empty() {
            return Err(format!("{s:?}: no etcd endpoint"));
        }
        for e in &endpoints {
            let port_ok = e
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !port_ok {
                return Err(format!("{s:?}: endpoint {e:?} is not host:port"));
            }
        }
        let path = path.trim_matches('/');
        if path.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(format!(
                "{s:?}: the prefix holds a space or control character"
            ));
        }
        let prefix = if path.is_empty() {
            "/ist-mesh/".to_owned()
        } else {
            format!("/{path}/")
        };
        Ok(Self { endpoints, prefix })
    }
}

impl std::fmt::Display for EtcdUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "etcd://{}{}",
            self.endpoints.join(","),
            self.prefix.trim_end_matches('/')
        )
    }
}

/// What this replica knows of one key: the revision that wrote what it
/// holds in memory, and the value (`None`: deleted, kept as a tombstone so
/// the watch's echo of the deletion is recognised).
#[derive(Debug, Clone)]
struct Known {
    rev: i64,
    value: Option<Vec<u8>>,
}

/// The records in etcd (see the module documentation).
pub struct EtcdStore {
    url: EtcdUrl,
    conn: Conn,
    feed: Arc<Feed>,
    cluster: Cluster,
    /// Every key under the prefix this replica's memory reflects (relative
    /// to the prefix).
    mirror: HashMap<String, Known>,
    /// Every change up to this revision is applied to memory.
    applied_rev: i64,
    /// Values skipped because they did not decode or fit their key.
    skipped: Arc<AtomicU64>,
    /// Commits are refused without trying until then (after a failure).
    cool_down: Option<Instant>,
    /// Tombstones in the mirror (dropped once the watch echoed them).
    tombstones: usize,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("url", &self.url.to_string())
            .field("applied_rev", &self.applied_rev)
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// The replica set sharing this store (presence of members, addresses
    /// of the other replicas), for the server
    /// ([`crate::server::Shared::with_cluster`]).
    pub fn cluster(&self) -> Cluster {
        self.cluster.clone()
    }

    /// Prepares the connection (nothing is read before [`Store::load`]).
    pub fn connect(url: &EtcdUrl) -> Result<Self, StoreError> {
        let conn = Conn::new(&url.endpoints).map_err(|e| StoreError::Unavailable(e.0))?;
        let cluster = Cluster::start(conn.clone(), url.prefix.clone());
        Ok(Self {
            url: url.clone(),
            conn,
            feed: Arc::new(Feed::default()),
            cluster,
            mirror: HashMap::new(),
            applied_rev: 0,
            skipped: Arc::new(AtomicU64::new(0)),
            cool_down: None,
            tombstones: 0,
        })
    }

    /// The identity every replica shares: the one stored in etcd, or, if
    /// none is yet, `local` (stored then; when another replica stores its
    /// own at the same moment, that one wins and is returned). A stored
    /// identity without a relay secret (written before replicas shared
    /// it) gets `local`'s, by a compare-and-swap: every replica ends with
    /// the same one.
    pub fn share_identity(
        &self,
        local: keys::IdentityRecord,
    ) -> Result<keys::IdentityRecord, StoreError> {
        let key = self.full(keys::IDENTITY);
        let encode = |r: &keys::IdentityRecord| {
            serde_json::to_vec(r).map_err(|e| StoreError::Db(e.to_string()))
        };
        // Stored when absent (create revision 0), else read.
        let mut compare = pb::Compare {
            result: pb::compare::CompareResult::Equal as i32,
            target: pb::compare::CompareTarget::Create as i32,
            key: key.clone(),
            range_end: vec![],
            target_union: Some(pb::compare::TargetUnion::CreateRevision(0)),
        };
        let mut value = encode(&local)?;
        // Bounded: each round either stores, or reads what another
        // replica stored in between.
        for _ in 0..8 {
            let txn = pb::TxnRequest {
                compare: vec![compare.clone()],
                success: vec![op(pb::request_op::Request::RequestPut(pb::PutRequest {
                    key: key.clone(),
                    value: value.clone(),
                    ..Default::default()
                }))],
                failure: vec![op(pb::request_op::Request::RequestRange(
                    pb::RangeRequest {
                        key: key.clone(),
                        ..Default::default()
                    },
                ))],
            };
            let resp = self
                .conn
                .txn(txn)
                .map_err(|e| StoreError::Unavailable(e.0))?;
            if resp.succeeded {
                return serde_json::from_slice(&value).map_err(|e| StoreError::Db(e.to_string()));
            }
            let stored = resp
                .responses
                .into_iter()
                .find_map(|r| match r.response {
                    Some(pb::response_op::Response::ResponseRange(r)) => r.kvs.into_iter().next(),
                    _ => None,
                })
                .ok_or_else(|| StoreError::Db("the shared identity vanished".into()))?;
            let mut record: keys::IdentityRecord =
                serde_json::from_slice(&stored.value).map_err(|e| StoreError::Decode {
                    table: "identity",
                    reason: e.to_string(),
                })?;
            if record.relay_secret.is_some() || local.relay_secret.is_none() {
                return Ok(record);
            }
            // Add the relay secret, unless the record changed meanwhile.
            record.relay_secret.clone_from(&local.relay_secret);
            value = encode(&record)?;
            compare = pb::Compare {
                result: pb::compare::CompareResult::Equal as i32,
                target: pb::compare::CompareTarget::Mod as i32,
                key: key.clone(),
                range_end: vec![],
                target_union: Some(pb::compare::TargetUnion::ModRevision(stored.mod_revision)),
            };
        }
        Err(StoreError::Db(
            "the shared identity kept changing: could not add the relay secret".into(),
        ))
    }

    /// How many values under the prefix were skipped (malformed, foreign).
    pub fn skipped(&self) -> Arc<AtomicU64> {
        self.skipped.clone()
    }

    /// The watch feed (its notification wakes the task applying remote
    /// changes).
    pub fn feed(&self) -> Arc<Feed> {
        self.feed.clone()
    }

    fn full(&self, key: &str) -> Vec<u8> {
        format!("{}{key}", self.url.prefix).into_bytes()
    }

    fn relative<'k>(&self, key: &'k [u8]) -> Option<&'k str> {
        std::str::from_utf8(key)
            .ok()?
            .strip_prefix(self.url.prefix.as_str())
    }

    fn skip(&self, key: &str, why: &str) {
        self.skipped.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(key = %format!("{}{key}", self.url.prefix), "skipped a value in etcd: {why}");
    }

    fn unavailable(&mut self, e: conn::CallError) -> StoreError {
        self.cool_down = Some(Instant::now() + COOL_DOWN);
        StoreError::Unavailable(e.0)
    }

    /// Reads every key under the prefix at one revision, page by page.
    fn read_all(&mut self) -> Result<(Vec<pb::KeyValue>, i64), StoreError> {
        let prefix = self.url.prefix.clone().into_bytes();
        let end = keys::prefix_end(&prefix);
        let mut out = Vec::new();
        let mut from = prefix.clone();
        let mut revision = 0;
        loop {
            let req = pb::RangeRequest {
                key: from.clone(),
                range_end: end.clone(),
                limit: PAGE,
                revision,
                ..Default::default()
            };
            let resp = self.conn.range(req).map_err(|e| self.unavailable(e))?;
            if revision == 0 {
                revision = resp.header.as_ref().map_or(0, |h| h.revision);
            }
            let more = resp.more;
            if let Some(last) = resp.kvs.last() {
                from = last.key.clone();
                from.push(0);
            }
            out.extend(resp.kvs);
            if !more {
                return Ok((out, revision));
            }
        }
    }

    /// The batch a commit writes: the last op per key (etcd refuses a key
    /// twice in one transaction), and for a network's deletion its log,
    /// quarantine and members as ranges.
    fn batch(&self, ops: &[StoreOp]) -> Result<Batch, StoreError> {
        let mut puts: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
        let mut ranges = Vec::new();
        let gone: Vec<_> = ops
            .iter()
            .filter_map(|op| match op {
                StoreOp::DeleteNetwork(id) => Some(*id),
                _ => None,
            })
            .collect();
        for id in &gone {
            ranges.push(keys::members_of(id));
            ranges.push(keys::log_of(id));
            ranges.push(keys::quarantine_of(id));
        }
        for op in ops {
            let (key, value) = keys::encode(op).map_err(StoreError::Db)?;
            if ranges.iter().any(|r| key.starts_with(r.as_str())) {
                continue;
            }
            puts.insert(key, value);
        }
        Ok(Batch { puts, ranges })
    }

    /// Mirror keys under `prefix`, alive.
    fn alive_under<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a String, &'a Known)> {
        self.mirror
            .iter()
            .filter(move |(k, v)| k.starts_with(prefix) && v.value.is_some())
    }

    fn rev_of(&self, key: &str) -> i64 {
        self.mirror
            .get(key)
            .filter(|k| k.value.is_some())
            .map_or(0, |k| k.rev)
    }

    /// The op that sets memory to the mirror's state of `key`.
    fn known_op(&self, key: &str) -> Option<StoreOp> {
        let value = self.mirror.get(key).and_then(|k| k.value.as_deref());
        match keys::decode(key, value) {
            Ok(Decoded::Record(op)) => Some(op),
            // A deleted key whose value was malformed: nothing in memory.
            _ => None,
        }
    }

    /// Takes a watched change into the mirror; returns what it means for
    /// memory, if anything.
    fn take_event(
        &mut self,
        key: &str,
        value: Option<Vec<u8>>,
        rev: i64,
        now: u64,
    ) -> Option<StoreOp> {
        if self.mirror.get(key).is_some_and(|k| k.rev >= rev) {
            return None; // our own commit, or already known
        }
        let decoded = keys::decode(key, value.as_deref());
        let deleted_before = self.mirror.get(key).is_none_or(|k| k.value.is_none());
        self.tombstones += usize::from(value.is_none());
        self.mirror.insert(
            key.to_owned(),
            Known {
                rev,
                value: value.clone(),
            },
        );
        match decoded {
            Ok(Decoded::Record(op)) => Some(op),
            Ok(Decoded::Side(side)) => {
                self.cluster.observe(side, value.as_deref(), now);
                None
            }
            Ok(Decoded::Ignored) => None,
            Err(_) if value.is_none() && deleted_before => None,
            Err(why) => {
                self.skip(key, &why);
                None
            }
        }
    }
}

impl EtcdStore {
    /// After a refused transaction: reads what it compared, as of the
    /// refusal's revision, into the feed, so [`Store::remote`] gives the
    /// other replica's writes even if the watch lags (etcd 3.4 can send a
    /// progress notification ahead of the events it covers, so
    /// [`Store::catch_up`] alone is not proof). The watch's own copies of
    /// these events are skipped later as known.
    ///
    /// A network's record names only its generation: the members,
    /// quarantined addresses and service groups another replica wrote with
    /// it are other keys. So for every network the batch touches, those
    /// written since the network record this replica knows are read too:
    /// learning a network's new generation without the member that came
    /// with it would let this replica hand that member's address out again
    /// (two members on one address, both stored).
    fn learn(&mut self, batch: &Batch, creates: bool, revision: i64) {
        let mut reads: Vec<(String, Vec<u8>, Vec<u8>, i64)> = batch
            .puts
            .keys()
            .map(|k| (k.clone(), self.full(k), vec![], 0))
            .collect();
        if creates {
            let all = self.full("networks/");
            let end = keys::prefix_end(&all);
            reads.push((String::new(), all, end, 0));
        }
        let networks: std::collections::BTreeSet<&str> = batch
            .puts
            .keys()
            .filter_map(|k| {
                let mut parts = k.split('/');
                match (parts.next(), parts.next()) {
                    (Some("networks" | "members" | "log" | "services" | "quarantine"), Some(u))
                        if !u.is_empty() =>
                    {
                        Some(u)
                    }
                    _ => None,
                }
            })
            .collect();
        for uuid in networks {
            // Every write that moves addresses moves the network's
            // generation too: what this replica applied of the network
            // record bounds what it has seen of the rest (the watch's
            // revision does not: a progress notification may run ahead
            // of the events it covers).
            let since = self.rev_of(&format!("networks/{uuid}")) + 1;
            for table in ["members", "quarantine", "services"] {
                let prefix = self.full(&format!("{table}/{uuid}/"));
                let end = keys::prefix_end(&prefix);
                reads.push((String::new(), prefix, end, since));
            }
        }
        let mut found = Vec::new();
        for (rel, key, range_end, min_mod_revision) in reads {
            let single = range_end.is_empty();
            let req = pb::RangeRequest {
                key: key.clone(),
                range_end,
                revision,
                min_mod_revision,
                ..Default::default()
            };
            let Ok(resp) = self.conn.range(req) else {
                return; // the watch will tell, or the next try fails again
            };
            if single && resp.kvs.is_empty() && self.rev_of(&rel) > 0 {
                found.push(conn::Event {
                    key,
                    value: None,
                    rev: revision,
                });
            }
            found.extend(resp.kvs.into_iter().map(|kv| conn::Event {
                key: kv.key,
                value: Some(kv.value),
                rev: kv.mod_revision,
            }));
        }
        let mut st = self.feed.state.lock();
        st.events.extend(found);
        st.events.make_contiguous().sort_by_key(|e| e.rev);
    }
}

/// A commit's writes.
struct Batch {
    /// Key → value (`None`: delete), one per key.
    puts: BTreeMap<String, Option<Vec<u8>>>,
    /// Prefixes deleted as ranges.
    ranges: Vec<String>,
}

fn cmp_mod(
    key: Vec<u8>,
    range_end: Vec<u8>,
    result: pb::compare::CompareResult,
    rev: i64,
) -> pb::Compare {
    pb::Compare {
        result: result as i32,
        target: pb::compare::CompareTarget::Mod as i32,
        key,
        range_end,
        target_union: Some(pb::compare::TargetUnion::ModRevision(rev)),
    }
}

fn op(request: pb::request_op::Request) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(request),
    }
}

impl Store for EtcdStore {
    fn load(&mut self) -> Result<Records, StoreError> {
        let (kvs, revision) = self.read_all()?;
        let now = unix(std::time::SystemTime::now());
        self.mirror.clear();
        let mut records = Records::default();
        for kv in kvs {
            let Some(key) = self.relative(&kv.key).map(str::to_owned) else {
                continue;
            };
            self.mirror.insert(
                key.clone(),
                Known {
                    rev: kv.mod_revision,
                    value: Some(kv.value.clone()),
                },
            );
            match keys::decode(&key, Some(&kv.value)) {
                Ok(Decoded::Record(op)) => push_record(&mut records, op),
                Ok(Decoded::Side(side)) => self.cluster.observe(side, Some(&kv.value), now),
                Ok(Decoded::Ignored) => {}
                Err(why) => self.skip(&key, &why),
            }
        }
        self.applied_rev = revision;
        {
            let mut st = self.feed.state.lock();
            st.events.clear();
            st.compacted = false;
        }
        // A reload (after compaction) replaces the watch by one from here.
        self.conn.start_watch(
            self.url.prefix.clone().into_bytes(),
            revision + 1,
            self.feed.clone(),
        );
        self.cool_down = None;
        Ok(records)
    }

    fn load_snapshot(&mut self) -> Result<Records, StoreError> {
        let (kvs, _) = self.read_all()?;
        let mut records = Records::default();
        for kv in kvs {
            let Some(key) = self.relative(&kv.key) else {
                continue;
            };
            if let Ok(Decoded::Record(op)) = keys::decode(key, Some(&kv.value)) {
                push_record(&mut records, op);
            }
        }
        Ok(records)
    }

    fn commit(&mut self, ops: &[StoreOp]) -> Result<(), StoreError> {
        if ops.is_empty() {
            return Ok(());
        }
        if self.cool_down.is_some_and(|t| Instant::now() < t) {
            return Err(StoreError::Unavailable(
                "etcd did not answer the last call; retrying shortly".into(),
            ));
        }
        let batch = self.batch(ops)?;
        let n = batch.puts.len() + batch.ranges.len();
        if n > MAX_TXN_OPS {
            return Err(StoreError::TooLarge {
                ops: n,
                max: MAX_TXN_OPS,
            });
        }
        use pb::compare::CompareResult::{Equal, Less};
        let mut compare = Vec::new();
        let mut success = Vec::new();
        for (key, value) in &batch.puts {
            compare.push(cmp_mod(self.full(key), vec![], Equal, self.rev_of(key)));
            let full = self.full(key);
            success.push(op(match value {
                Some(v) => pb::request_op::Request::RequestPut(pb::PutRequest {
                    key: full,
                    value: v.clone(),
                    ..Default::default()
                }),
                None => pb::request_op::Request::RequestDeleteRange(pb::DeleteRangeRequest {
                    key: full,
                    ..Default::default()
                }),
            }));
        }
        // A new network: no network record may have changed since this
        // replica's view (its name must be unique).
        let creates = batch
            .puts
            .iter()
            .any(|(k, v)| k.starts_with("networks/") && v.is_some() && self.rev_of(k) == 0);
        if creates {
            let all = self.full("networks/");
            let end = keys::prefix_end(&all);
            compare.push(cmp_mod(all, end, Less, self.applied_rev + 1));
        }
        for r in &batch.ranges {
            let full = self.full(r);
            success.push(op(pb::request_op::Request::RequestDeleteRange(
                pb::DeleteRangeRequest {
                    range_end: keys::prefix_end(&full),
                    key: full,
                    ..Default::default()
                },
            )));
        }
        let req = pb::TxnRequest {
            compare,
            success,
            failure: vec![],
        };
        let resp = self.conn.txn(req).map_err(|e| self.unavailable(e))?;
        let revision = resp.header.as_ref().map_or(0, |h| h.revision);
        if !resp.succeeded {
            self.learn(&batch, creates, revision);
            return Err(StoreError::Conflict { revision });
        }
        for (key, value) in batch.puts {
            self.tombstones += usize::from(value.is_none());
            self.mirror.insert(
                key,
                Known {
                    rev: revision,
                    value,
                },
            );
        }
        for r in &batch.ranges {
            for known in self
                .mirror
                .iter_mut()
                .filter(|(k, _)| k.starts_with(r.as_str()))
            {
                self.tombstones += 1;
                *known.1 = Known {
                    rev: revision,
                    value: None,
                };
            }
        }
        Ok(())
    }

    fn probe(&mut self) -> Result<(), StoreError> {
        // A linearizable read needs a quorum: the same condition as a write.
        let req = pb::RangeRequest {
            key: self.full("networks/"),
            count_only: true,
            ..Default::default()
        };
        self.conn.range(req).map_err(|e| self.unavailable(e))?;
        let alive = self.feed.state.lock().alive;
        if !alive {
            return Err(StoreError::Unavailable("the etcd watch is down".into()));
        }
        if !self.cluster.has_lease() {
            return Err(StoreError::Unavailable(
                "no etcd lease for this replica".into(),
            ));
        }
        Ok(())
    }

    fn remote(&mut self) -> Result<Vec<Vec<StoreOp>>, StoreError> {
        let (events, watch_rev, compacted) = {
            let mut st = self.feed.state.lock();
            (std::mem::take(&mut st.events), st.watch_rev, st.compacted)
        };
        if compacted {
            return Err(StoreError::Unavailable(
                "the etcd history this replica needs was compacted; reloading".into(),
            ));
        }
        let now = unix(std::time::SystemTime::now());
        let mut batches: Vec<(i64, Vec<StoreOp>)> = Vec::new();
        for ev in events {
            let Some(key) = self.relative(&ev.key).map(str::to_owned) else {
                continue;
            };
            if let Some(op) = self.take_event(&key, ev.value, ev.rev, now) {
                match batches.last_mut() {
                    Some((rev, ops)) if *rev == ev.rev => ops.push(op),
                    _ => batches.push((ev.rev, vec![op])),
                }
            }
        }
        self.applied_rev = self.applied_rev.max(watch_rev);
        // Tombstones the watch has echoed are no longer needed.
        if self.tombstones > 0 {
            let applied = self.applied_rev;
            self.mirror
                .retain(|_, k| k.value.is_some() || k.rev > applied);
            self.tombstones = self.mirror.values().filter(|k| k.value.is_none()).count();
        }
        Ok(batches.into_iter().map(|(_, ops)| ops).collect())
    }

    fn known(&self, ops: &[StoreOp]) -> Option<Vec<StoreOp>> {
        let batch = self.batch(ops).ok()?;
        let mut out: Vec<StoreOp> = batch.puts.keys().filter_map(|k| self.known_op(k)).collect();
        for r in &batch.ranges {
            out.extend(self.alive_under(r).filter_map(|(k, _)| self.known_op(k)));
        }
        Some(out)
    }

    fn catch_up(&mut self, revision: i64) -> Result<(), StoreError> {
        let deadline = Instant::now() + CATCH_UP;
        let mut st = self.feed.state.lock();
        while st.watch_rev < revision {
            if st.compacted {
                return Ok(()); // remote() reports it
            }
            self.conn.request_progress();
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(StoreError::Unavailable(format!(
                    "the etcd watch did not reach revision {revision} in {}s",
                    CATCH_UP.as_secs()
                )));
            }
            self.feed
                .changed
                .wait_for(&mut st, left.min(Duration::from_millis(100)));
        }
        Ok(())
    }

    fn max_ops(&self) -> usize {
        MAX_TXN_OPS
    }
}

/// Files a decoded record into the loaded records.
fn push_record(records: &mut Records, op: StoreOp) {
    match op {
        StoreOp::PutNetwork(n) => records.networks.push(n),
        StoreOp::PutToken(t) => records.tokens.push(t),
        StoreOp::PutMember(m) => records.members.push(m),
        StoreOp::PutQuarantine(n, ip, until) => records.quarantine.push((n, ip, until)),
        StoreOp::PutLog(rec) => records.log.push(rec),
        StoreOp::PutService(r) => records.services.push(r),
        StoreOp::PutApiToken(t) => records.api_tokens.push(t),
        StoreOp::PutAudit(e) => records.audit.push(e),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::EtcdUrl;

    #[test]
    fn urls_parse_with_and_without_prefix() {
        let u: EtcdUrl = "etcd://a:2379,b:2380/x/y".parse().unwrap();
        assert_eq!(u.endpoints, vec!["a:2379", "b:2380"]);
        assert_eq!(u.prefix, "/x/y/");
        assert_eq!(u.to_string(), "etcd://a:2379,b:2380/x/y");
        let d: EtcdUrl = "etcd://127.0.0.1:2379".parse().unwrap();
        assert_eq!(d.prefix, "/ist-mesh/");
        for bad in [
            "redb://x",
            "etcd://",
            "etcd://host",
            "etcd://h:port",
            "etcd://h:1/a b",
        ] {
            assert!(bad.parse::<EtcdUrl>().is_err(), "{bad}");
        }
    }
}
