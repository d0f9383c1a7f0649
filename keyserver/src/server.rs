//! The shared state of a running keyserver: the writer's [`Registry`]
//! (under the writer's lock), its [`Store`] (under the commit lock), the
//! readers' registry, and one push channel per network.
//!
//! Every mutation runs as: registry operation under the writer's lock
//! (validates, changes the writer's memory, returns the records to write and
//! the changes to push), store commit under the commit lock (atomic,
//! durable; on the embedded store several operations share one commit, see
//! [`Shared::mutate`]), then — under the readers' registry's write lock,
//! held for microseconds — the same records applied to the readers'
//! registry and the changes published to the network's channel, so pushes
//! leave in generation order and a reader that subscribes misses none. Readers (admin GETs, `GetMap`, catch-up from the
//! change log, metrics) only take the readers' lock: they never wait for a
//! store commit, however slow (an etcd leader election takes seconds), and
//! never see a change the store has not taken. A failed commit puts the
//! writer's memory back (or reloads it from the store), so memory never runs
//! ahead of disk (if even the reload fails, changes are refused until one
//! succeeds). [`Shared::readiness`] probes the store for `/readyz`. The
//! frame of a change is encoded once and the same bytes go to every
//! subscriber: work per change is O(members affected).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use meshlib::ids::NetworkId;
use meshlib::keys::PublicKey;
use meshlib::netmap::{MapDelta, NetworkMap};
use meshlib::proto::{self, ServerMsg};
use parking_lot::{Mutex, RwLock};
use tokio::sync::broadcast;

use crate::registry::{Change, Lifecycle, Records, Registry, StoreOp};
use crate::store::etcd::Cluster;
use crate::store::{Store, StoreError};

/// How many times an operation refused by a shared store (another replica
/// changed the same records first) is run again on fresh state.
const CONFLICT_TRIES: usize = 16;

/// Limits and tunables of the servers (plain data; see [`crate::config::Config`]).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest control frame accepted or sent.
    pub max_frame: usize,
    /// Most simultaneous established QUIC connections (after a hello).
    pub max_connections: usize,
    /// Most connections without a hello yet, in all (see [`crate::admission`]).
    pub max_unauthenticated: usize,
    /// Most connections without a hello yet from one source address
    /// (IPv6: one /64).
    pub max_unauthenticated_per_source: usize,
    /// QUIC idle timeout.
    pub idle_timeout: Duration,
    /// Time allowed from a connection's first packet to its hello (QUIC
    /// handshake, stream, hello frame).
    pub hello_timeout: Duration,
    /// Pushes buffered per subscriber before it must catch up from the log.
    pub push_buffer: usize,
    /// Longest a change waits to be merged with the next ones into one
    /// push (see [`Shared::flush_pushes`]); zero pushes every change alone.
    pub push_hold: Duration,
    /// Deltas kept per network for resumes.
    pub change_log: usize,
    /// Quarantine of released addresses.
    pub quarantine: Duration,
    /// Offline and expiry timers of members.
    pub lifecycle: Lifecycle,
    /// Domain of service groups' generated FQDNs (`<name>-<random>.<domain>`).
    pub service_domain: String,
    /// Entries the audit trail keeps ([`crate::auth`]).
    pub audit_entries: usize,
    /// Members from which a network's last snapshot is also kept decoded,
    /// to build the next one from it and the changes since rather than
    /// copy every member ([`Shared::map_replies`]): it saves CPU in a join
    /// storm into a large network, and costs about a member's record of
    /// memory per member; below this a copy is cheap.
    pub keep_map_from: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame: proto::DEFAULT_MAX_FRAME,
            max_connections: 16384,
            max_unauthenticated: 512,
            // A site's whole fleet behind one NAT address may restart at once.
            max_unauthenticated_per_source: 64,
            idle_timeout: Duration::from_secs(30),
            hello_timeout: Duration::from_secs(3),
            push_buffer: 128,
            push_hold: DEFAULT_PUSH_HOLD,
            change_log: 1024,
            quarantine: meshlib::ipam::DEFAULT_QUARANTINE,
            lifecycle: Lifecycle::default(),
            service_domain: crate::registry::DEFAULT_SERVICE_DOMAIN.to_owned(),
            audit_entries: crate::registry::DEFAULT_AUDIT_ENTRIES,
            keep_map_from: 256,
        }
    }
}

/// The default of [`Limits::push_hold`].
pub const DEFAULT_PUSH_HOLD: Duration = Duration::from_millis(100);

/// An open session of a member, counted while this lives.
#[derive(Debug)]
pub struct OpenSession {
    map: Arc<Mutex<HashMap<(NetworkId, PublicKey), u32>>>,
    id: (NetworkId, PublicKey),
    /// The replica set told when the member's last session here ends.
    cluster: Option<Cluster>,
}

impl Drop for OpenSession {
    fn drop(&mut self) {
        let mut map = self.map.lock();
        if let Some(n) = map.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.id);
                if let Some(c) = &self.cluster {
                    c.release(self.id.0, self.id.1);
                }
            }
        }
    }
}

/// One pushed change, encoded once.
#[derive(Debug, Clone)]
pub struct Push {
    /// Generation the delta starts from.
    pub from: u64,
    /// Generation after the delta.
    pub to: u64,
    /// The encoded [`ServerMsg::Delta`] frame.
    pub frame: Arc<[u8]>,
    /// Frames for members of older protocol versions, when the delta
    /// holds changes they cannot decode ([`meshlib::netmap::MapChange::since`]):
    /// `(v, frame)` is for members of version `v` or older, ascending by
    /// `v`; a member of a version none covers gets `frame`.
    pub legacy: Vec<(u16, Arc<[u8]>)>,
    /// The members this push removed (the keys whose sessions end).
    pub removed: Vec<PublicKey>,
    /// When its first change was published (push latency).
    pub at: Instant,
}

impl Push {
    /// The frame for a member of protocol `version`: the first of
    /// [`Push::legacy`] that covers it, else [`Push::frame`].
    pub fn frame_for(&self, version: u16) -> Arc<[u8]> {
        self.legacy
            .iter()
            .find(|(upto, _)| version <= *upto)
            .map_or(&self.frame, |(_, f)| f)
            .clone()
    }
}

/// A network's push channel, and the changes held to go out together.
struct Hub {
    tx: broadcast::Sender<Push>,
    /// Changes published while subscribers were still taking the last
    /// push: merged, they go out as one ([`Shared::flush_pushes`]).
    held: Option<Held>,
    /// When the last push was sent.
    sent: Option<Instant>,
    /// The pace learned from a change storm: doubled by every push that
    /// carried merged changes (they came faster than pushes could go),
    /// back to zero by a push of one change. See [`Hub::may_send`].
    storm: Duration,
}

impl Hub {
    /// Whether a push may leave now: every subscriber took the last one,
    /// and the last one left at least the pace ago. The pace is
    /// proportional to the network's subscribers (a push to 1000 members
    /// costs the keyserver about 10 ms of CPU; pushes closer together than
    /// that are merged), or longer during a change storm ([`Hub::storm`]),
    /// and at most `hold`: in a storm (a deployment scaled up by a
    /// thousand instances) every member gets one push per `hold` with
    /// everything that changed, so a join costs the keyserver about the
    /// same in a network of 1000 as in one of 100. A lone change, or the
    /// first after a quiet spell, is never delayed.
    fn may_send(&self, now: Instant, hold: Duration) -> bool {
        self.tx.is_empty()
            && self
                .sent
                .is_none_or(|t| now.saturating_duration_since(t) >= self.pace(hold))
    }

    /// See [`Hub::may_send`].
    fn pace(&self, hold: Duration) -> Duration {
        let base = PACE_PER_SUBSCRIBER * self.tx.receiver_count() as u32;
        base.max(self.storm).min(hold)
    }

    /// Records a push leaving at `now` with `generations` changes.
    fn pushed(&mut self, now: Instant, generations: u64, hold: Duration) {
        self.sent = Some(now);
        self.storm = if generations > 1 {
            (self.storm * 2).max(STORM_PACE_MIN).min(hold)
        } else {
            Duration::ZERO
        };
    }
}

/// How often held changes are looked at while their network's
/// subscribers are still taking the last push ([`Shared::flush_pushes`]).
const FLUSH_POLL: Duration = Duration::from_millis(1);

/// See [`Hub::may_send`].
const PACE_PER_SUBSCRIBER: Duration = Duration::from_micros(10);

/// The storm pace a first push of merged changes sets ([`Hub::storm`]).
const STORM_PACE_MIN: Duration = Duration::from_millis(5);

/// Changes merged into one delta, not pushed yet.
struct Held {
    delta: MapDelta,
    removed: Vec<PublicKey>,
    /// When the first of them was published.
    at: Instant,
    /// More than one change was merged (compact before sending).
    merged: bool,
}

/// Why a mutation failed.
#[derive(Debug, thiserror::Error)]
pub enum OpError<E> {
    /// The operation itself refused (nothing changed).
    #[error(transparent)]
    Refused(E),
    /// The store could not commit (nothing changed).
    #[error("store commit failed: {0}")]
    Store(#[from] StoreError),
}

/// The writer's registry, under the writer's lock.
struct Core {
    reg: Registry,
    /// A commit failed and reloading from the store failed too: memory may
    /// hold what the store does not, so the next operation reloads first.
    stale: bool,
}

/// The store, under the commit lock. Lock order: commit lock, then the
/// writer's lock, then the readers' registry, then the push channels.
struct Committer {
    store: Box<dyn Store>,
}

/// How a queued operation's commit ended (filled by whoever committed its
/// group).
type Outcome = Arc<Mutex<Option<Result<(), StoreError>>>>;

/// Operations run on the writer's registry and not committed yet, in
/// order: the next group.
#[derive(Default)]
struct Pending {
    batches: Vec<(Vec<StoreOp>, Vec<Change>, Outcome)>,
}

/// What a write costs in a store transaction's bound: a network's deletion
/// also deletes the ranges of its members, log and quarantine.
fn weight(op: &StoreOp) -> usize {
    match op {
        StoreOp::DeleteNetwork(_) => 4,
        _ => 1,
    }
}

/// The same failure again, for another operation of a failed group.
fn again(e: &StoreError) -> StoreError {
    match e {
        StoreError::Conflict { revision } => StoreError::Conflict {
            revision: *revision,
        },
        StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
        StoreError::TooLarge { ops, max } => StoreError::TooLarge {
            ops: *ops,
            max: *max,
        },
        other => StoreError::Db(other.to_string()),
    }
}

/// How many generations a shared snapshot may lag before it is encoded
/// again: a member asking for its map gets it and one merged delta to the
/// present (see [`Shared::map_replies`]).
pub const SNAPSHOT_REUSE: u64 = 64;

/// A network's map, encoded once and shared by the members that need it.
#[derive(Debug)]
struct SharedSnapshot {
    generation: u64,
    frame: Arc<[u8]>,
    /// The same, packed for members that read packed messages
    /// ([`proto::PACKED_VERSION`]); `None` when packing does not pay
    /// ([`proto::pack_frame`]).
    packed: Option<Arc<[u8]>>,
}

impl SharedSnapshot {
    /// The frame for a member that reads packed messages (`packed`) or not.
    fn frame(&self, packed: bool) -> Arc<[u8]> {
        match &self.packed {
            Some(p) if packed => p.clone(),
            _ => self.frame.clone(),
        }
    }
}

/// How long a readiness answer is reused: `/readyz` polled by several
/// monitors must not turn into a stream of store writes.
const PROBE_REUSE: Duration = Duration::from_secs(1);

/// The state every driver task shares.
pub struct Shared {
    core: Mutex<Core>,
    /// The store (the commit lock).
    committer: Mutex<Committer>,
    /// The next commit group (see [`Shared::mutate`]).
    pending: Mutex<Pending>,
    /// The readers' registry: what the store holds, as of the last commit
    /// (see the module docs).
    view: RwLock<Registry>,
    hubs: Mutex<HashMap<NetworkId, Hub>>,
    /// Woken when a change is held (see [`Shared::flush_pushes`]).
    held_wake: tokio::sync::Notify,
    /// Last heartbeat of each member (Unix seconds), kept apart from the registry.
    seen: Mutex<HashMap<(NetworkId, PublicKey), u64>>,
    /// Members whose credential use the registry has noted (see
    /// [`Shared::heartbeat`]).
    confirmed: Mutex<HashSet<(NetworkId, PublicKey)>>,
    /// Open sessions per member (see [`Shared::online`]).
    online: Arc<Mutex<HashMap<(NetworkId, PublicKey), u32>>>,
    /// The last readiness probe: when, and its answer.
    probe: Mutex<Option<(Instant, Result<(), String>)>>,
    /// Limits.
    pub limits: Limits,
    /// SHA-256 of the QUIC certificate (goes into tokens).
    pub cert_sha256: [u8; 32],
    /// QUIC addresses written into tokens; set when serving starts.
    pub advertise: OnceLock<Vec<SocketAddr>>,
    /// The replica set, when the store is shared (etcd).
    cluster: Option<Cluster>,
    /// Most writes one commit may hold.
    max_ops: usize,
    /// Counters and histograms for `/metrics`.
    pub metrics: crate::metrics::Metrics,
    /// STUN servers, relay and ticket secret members are told about
    /// ([`crate::relay`]); set when serving starts.
    pub relay: OnceLock<crate::relay::RelaySettings>,
    /// The embedded relay's counters, when it runs.
    pub relay_metrics: OnceLock<Arc<crate::relay::RelayMetrics>>,
    /// The relay members are told now (see [`Shared::relay_settings`]):
    /// with replicas it changes as replicas come and go, and sessions
    /// send their member the new one ([`Shared::watch_relay`]).
    relay_now: tokio::sync::watch::Sender<Option<SocketAddr>>,
    /// Runs service-address hooks (wake, idle); set when serving starts
    /// ([`Shared::set_hook_runner`]). Unset, a hook is logged and counted
    /// as failed.
    hooks: OnceLock<Arc<dyn crate::hooks::HookRunner>>,
    /// Members' latest traffic reports (memory only).
    traffic: Mutex<crate::traffic::TrafficBook>,
    /// The last encoded snapshot of each network (see
    /// [`Shared::map_replies`]).
    snapshots: Mutex<HashMap<NetworkId, Arc<SharedSnapshot>>>,
    /// The map of each network's last snapshot, kept to build the next
    /// one from it and the changes since (O(changes), not a copy of every
    /// member; see [`Shared::map_replies`]). Taken while one is built:
    /// lock order after `view`.
    maps: Mutex<HashMap<NetworkId, NetworkMap>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl Shared {
    /// Loads the registry from `store`. Returns warnings about skipped records.
    pub fn new(
        store: Box<dyn Store>,
        limits: Limits,
        cert_sha256: [u8; 32],
        now: SystemTime,
    ) -> Result<(Self, Vec<String>), StoreError> {
        Self::with_cluster(store, None, limits, cert_sha256, now)
    }

    /// As [`Shared::new`], for a store shared by replicas: `cluster` is the
    /// replica set the store's connection sees
    /// ([`crate::store::etcd::EtcdStore::cluster`]).
    pub fn with_cluster(
        mut store: Box<dyn Store>,
        cluster: Option<Cluster>,
        limits: Limits,
        cert_sha256: [u8; 32],
        now: SystemTime,
    ) -> Result<(Self, Vec<String>), StoreError> {
        let records = store.load()?;
        let (view, _) = Self::build(records.clone(), &limits, now);
        let (reg, warnings) = Self::build(records, &limits, now);
        let max_ops = store.max_ops();
        let shared = Self {
            core: Mutex::new(Core { reg, stale: false }),
            committer: Mutex::new(Committer { store }),
            pending: Mutex::new(Pending::default()),
            view: RwLock::new(view),
            hubs: Mutex::new(HashMap::new()),
            held_wake: tokio::sync::Notify::new(),
            seen: Mutex::new(HashMap::new()),
            confirmed: Mutex::new(HashSet::new()),
            online: Arc::new(Mutex::new(HashMap::new())),
            probe: Mutex::new(None),
            limits,
            cert_sha256,
            advertise: OnceLock::new(),
            cluster,
            max_ops,
            metrics: crate::metrics::Metrics::default(),
            relay: OnceLock::new(),
            relay_metrics: OnceLock::new(),
            relay_now: tokio::sync::watch::channel(None).0,
            hooks: OnceLock::new(),
            traffic: Mutex::new(Default::default()),
            snapshots: Mutex::new(HashMap::new()),
            maps: Mutex::new(HashMap::new()),
        };
        shared.metrics.started.store(
            crate::registry::unix(now),
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok((shared, warnings))
    }

    fn build(records: Records, limits: &Limits, now: SystemTime) -> (Registry, Vec<String>) {
        let (mut reg, warnings) =
            Registry::load(records, limits.change_log, limits.quarantine, now);
        reg.set_lifecycle(limits.lifecycle);
        reg.set_service_domain(&limits.service_domain);
        reg.set_audit_cap(limits.audit_entries);
        (reg, warnings)
    }

    /// Reads the registry as of the last commit. Never waits for a store
    /// commit (only for the microseconds a committed change takes to be
    /// applied to it).
    pub fn read<T>(&self, f: impl FnOnce(&Registry) -> T) -> T {
        f(&self.view.read())
    }

    /// Runs one mutation: `f` changes the writer's registry and returns its
    /// result, the writes and the changes to push; the writes (with the
    /// change-log entries of the changes) are committed, then applied to the
    /// readers' registry and the changes published. `after` runs on the
    /// writer's registry right after `f`, with no push published meanwhile
    /// (to subscribe without missing one), before the commit; if the
    /// commit fails its result is dropped (and if `f` runs again, so does
    /// `after`).
    ///
    /// Commits are grouped: `f` runs under the writer's lock, its writes
    /// join the pending group, and whoever takes the commit lock next
    /// commits every pending write in one transaction (one fsync on the
    /// embedded store, one etcd transaction of at most the store's
    /// [`Store::max_ops`] writes on a shared one), publishes in order and
    /// tells each operation; meanwhile more operations run and fill the
    /// next group. A failed group puts the writer's memory back (its writes
    /// and everything run on top of them) and fails every operation in it
    /// and after it.
    ///
    /// On a shared store, changes other replicas made are applied before
    /// `f` when no group is waiting for its commit (never under computed,
    /// uncommitted writes: a write computed on older state must meet the
    /// store's check, not overwrite a newer record). If another replica
    /// changed the same records meanwhile, the store refuses the group
    /// (`Conflict`); memory is put back, the store catches up, and each
    /// operation of the group runs `f` again on fresh state (at most
    /// `CONFLICT_TRIES` times).
    pub fn mutate<T, E, R>(
        &self,
        mut f: impl FnMut(&mut Registry) -> Result<(T, Vec<StoreOp>, Vec<Change>), E>,
        mut after: impl FnMut(&Registry, &T, &Self) -> R,
    ) -> Result<(T, R), OpError<E>> {
        let mut tries = 0;
        loop {
            match self.mutate_grouped(&mut f, &mut after) {
                Err(OpError::Store(StoreError::Conflict { revision }))
                    if self.cluster.is_some() && tries + 1 < CONFLICT_TRIES =>
                {
                    tries += 1;
                    tracing::debug!(
                        revision,
                        tries,
                        "store conflict: running the operation again on fresh state"
                    );
                }
                other => return other,
            }
        }
    }

    fn mutate_grouped<T, E, R>(
        &self,
        f: &mut impl FnMut(&mut Registry) -> Result<(T, Vec<StoreOp>, Vec<Change>), E>,
        after: &mut impl FnMut(&Registry, &T, &Self) -> R,
    ) -> Result<(T, R), OpError<E>> {
        let mut core = self.core.lock();
        if core.stale {
            drop(core);
            let mut c = self.committer.lock();
            core = self.core.lock();
            if core.stale {
                self.reload(&mut core, &mut c)?;
            }
        }
        if self.cluster.is_some() && self.pending.lock().batches.is_empty() {
            // Other replicas' changes first, while nothing computed waits
            // for its commit (only a holder of the writer's lock adds to
            // the group, and we hold it). The commit lock comes before the
            // writer's: only try it; if a commit is under way, `f` runs on
            // this state and the store's check catches a conflict.
            if let Some(mut c) = self.committer.try_lock() {
                self.sync_locked(&mut core, &mut c);
            }
        }
        let (value, mut ops, changes) = f(&mut core.reg).map_err(OpError::Refused)?;
        if !changes.is_empty() {
            ops.extend(core.reg.log_ops(&changes));
        }
        // Under the writer's lock, before the commit: a session subscribes
        // (its own change comes back as a push it skips) and is counted
        // open before the next operation runs; if the commit fails, what
        // `after` returned is dropped.
        let extra = after(&core.reg, &value, self);
        if ops.is_empty() {
            return Ok((value, extra));
        }
        let outcome: Outcome = Arc::new(Mutex::new(None));
        self.pending
            .lock()
            .batches
            .push((ops, changes, outcome.clone()));
        drop(core);
        self.commit_pending(&outcome).map_err(OpError::Store)?;
        Ok((value, extra))
    }

    /// Waits for the commit lock, then commits the pending groups unless
    /// another thread already committed the one holding `outcome`.
    fn commit_pending(&self, outcome: &Outcome) -> Result<(), StoreError> {
        let mut c = self.committer.lock();
        if let Some(result) = outcome.lock().take() {
            return result;
        }
        self.commit_locked(&mut c);
        outcome
            .lock()
            .take()
            .unwrap_or_else(|| Err(StoreError::Db("the operation was not committed".into())))
    }

    /// Commits every pending operation, in groups of at most the store's
    /// [`Store::max_ops`] writes (one group when the store has no bound).
    fn commit_locked(&self, c: &mut Committer) {
        // Bounded: every pass takes at least one pending operation, and
        // only holders of the writer's lock add more (each thread at most
        // one at a time).
        for _ in 0..100_000 {
            let batches = {
                let mut pending = self.pending.lock();
                if pending.batches.is_empty() {
                    return;
                }
                let mut total = 0;
                let take = pending
                    .batches
                    .iter()
                    .take_while(|b| {
                        total += b.0.iter().map(weight).sum::<usize>();
                        total <= self.max_ops
                    })
                    .count()
                    .max(1);
                pending.batches.drain(..take).collect::<Vec<_>>()
            };
            let ops: Vec<StoreOp> = batches.iter().flat_map(|b| b.0.iter().cloned()).collect();
            let t0 = Instant::now();
            let committed = c.store.commit(&ops);
            self.metrics.store_latency.observe(t0.elapsed());
            match committed {
                Ok(()) => {
                    self.metrics.commit_group(batches.len());
                    let mut view = self.view.write();
                    for (ops, changes, done) in batches {
                        for w in view.apply(&ops) {
                            tracing::warn!("readers' registry: {w}");
                        }
                        for change in changes {
                            self.publish(change);
                        }
                        *done.lock() = Some(Ok(()));
                    }
                }
                Err(e) => {
                    self.metrics.store_error(&e);
                    if !matches!(e, StoreError::Conflict { .. }) {
                        tracing::error!(operations = batches.len(), "store commit failed: {e}");
                    }
                    // Memory back: this group's writes and every operation
                    // run on top of them since (they fail too).
                    let mut core = self.core.lock();
                    let later = std::mem::take(&mut self.pending.lock().batches);
                    let mut all = ops;
                    all.extend(later.iter().flat_map(|b| b.0.iter().cloned()));
                    self.put_back(&mut core, c, &all);
                    if let StoreError::Conflict { revision } = e {
                        // Fresh state for the operations that run again.
                        match c.store.catch_up(revision) {
                            Ok(()) => self.sync_locked(&mut core, c),
                            Err(again) => tracing::warn!("catching up after a conflict: {again}"),
                        }
                    }
                    drop(core);
                    for (_, _, done) in batches.iter().chain(later.iter()) {
                        *done.lock() = Some(Err(again(&e)));
                    }
                    *self.probe.lock() = None;
                }
            }
        }
    }

    /// After a refused commit: memory back to what the store holds — the
    /// touched records as last committed, or (a store that cannot tell) a
    /// reload of everything.
    fn put_back(&self, core: &mut Core, c: &mut Committer, ops: &[StoreOp]) {
        // Memory-only notes may have gone with the records.
        self.confirmed.lock().clear();
        match c.store.known(ops) {
            Some(back) => {
                for w in core.reg.apply(&back) {
                    tracing::warn!("putting back a refused commit: {w}");
                }
            }
            None => {
                tracing::error!("reloading the state from the store");
                if let Err(again) = self.reload(core, c) {
                    tracing::error!("{again}; changes are refused until the store can be read");
                }
            }
        }
    }

    /// Applies what other replicas committed (a shared store) and pushes
    /// their changes to this replica's members. Blocking (it may reload).
    pub fn sync(&self) {
        let mut c = self.committer.lock();
        // Never under computed, uncommitted writes: applying other
        // replicas' records (and their revisions) under them would let
        // them overwrite those records unchecked. They go first; one that
        // ran meanwhile (it does not need the commit lock to run) is
        // committed in the next turn. Bounded: a few turns, then the next
        // sync does it.
        for _ in 0..8 {
            self.commit_locked(&mut c);
            let mut core = self.core.lock();
            if self.pending.lock().batches.is_empty() {
                self.sync_locked(&mut core, &mut c);
                return;
            }
        }
    }

    fn sync_locked(&self, core: &mut Core, c: &mut Committer) {
        match c.store.remote() {
            Ok(batches) => {
                self.metrics
                    .remote_batches
                    .fetch_add(batches.len() as u64, std::sync::atomic::Ordering::Relaxed);
                for ops in batches {
                    for w in core.reg.apply(&ops) {
                        tracing::warn!("skipped a record from another replica: {w}");
                    }
                    let mut view = self.view.write();
                    // The same records as above: the same warnings.
                    let _same = view.apply(&ops);
                    for change in crate::registry::changes_of(&ops) {
                        self.publish(change);
                    }
                    drop(view);
                    for op in &ops {
                        if let StoreOp::DeleteNetwork(n) = op {
                            self.forget_network(*n);
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!("{e}");
                if let Err(again) = self.reload(core, c) {
                    tracing::error!("{again}; changes are refused until the store can be read");
                }
            }
        }
    }

    /// Deletes a network (see [`Registry::delete_network`]); returns how
    /// many members were removed. On a store that bounds its transactions
    /// (etcd), a forced deletion first removes the members in batches, each
    /// a change pushed like any removal.
    pub fn delete_network(
        &self,
        id: NetworkId,
        force: bool,
        now: SystemTime,
    ) -> Result<usize, OpError<crate::registry::AdminError>> {
        let mut removed = 0;
        if force && self.max_ops != usize::MAX {
            // About four writes per removal (member, quarantine, log, network).
            let per_batch = (self.max_ops / 4).max(1);
            loop {
                let (n, ()) = self.mutate(
                    |reg| {
                        let (mut ops, mut changes) = (Vec::new(), Vec::new());
                        for key in reg.member_keys(id).into_iter().take(per_batch) {
                            let (c, o) = reg.remove_member(id, &key.to_string(), now)?;
                            ops.extend(o);
                            changes.push(c);
                        }
                        Ok((changes.len(), ops, changes))
                    },
                    |_, _, _| (),
                )?;
                removed += n;
                if n == 0 {
                    break;
                }
            }
        }
        let (n, ()) = self.mutate(
            |reg| {
                let (changes, ops) = reg.delete_network(id, force, now)?;
                Ok((changes.len(), ops, changes))
            },
            |_, _, _| (),
        )?;
        self.forget_network(id);
        Ok(removed + n)
    }

    /// A consistent snapshot of every stored record (a read of the store
    /// under the commit lock: no commit is half in it). Blocking.
    pub fn backup(&self) -> Result<crate::backup::Backup, StoreError> {
        let records = self.committer.lock().store.load_snapshot()?;
        Ok(crate::backup::Backup::of(
            records,
            crate::registry::unix(SystemTime::now()),
        ))
    }

    /// The `/metrics` page.
    pub fn render_metrics(&self) -> String {
        let (members, idle) = self.read(|r| {
            (
                r.member_states(),
                r.idle_states(crate::metrics::MAX_SERVICE_SERIES),
            )
        });
        let connected = self.online.lock().len();
        let traffic = {
            let book = self.traffic.lock();
            crate::metrics::TrafficStats {
                taken: book.taken,
                dropped: book.dropped.clone(),
                held: book.size(),
            }
        };
        self.metrics.render(&members, connected) + &self.metrics.render_services(&idle, &traffic)
    }

    /// Sets what runs service-address hooks (once; later calls are
    /// ignored).
    pub fn set_hook_runner(&self, runner: Arc<dyn crate::hooks::HookRunner>) {
        let _ = self.hooks.set(runner);
    }

    /// Starts a hook the registry decided on (never waits for it).
    fn run_hook(&self, job: crate::registry::HookJob) {
        match self.hooks.get() {
            Some(runner) => runner.run(job),
            None => {
                self.metrics.hooks.started(job.kind);
                self.metrics.hooks.failed(job.kind);
                tracing::warn!(network = %job.network, hook = job.kind.as_str(), "no hook runner: the hook did not run");
            }
        }
    }

    /// A member of `network` asks to wake `service` (see
    /// [`Registry::request_wake`]): the hook starts if this request is the
    /// one that records the wake, on this replica or any other. Counted
    /// in the metrics whatever the outcome. Commits: call from a blocking
    /// thread.
    pub fn wake(
        &self,
        network: NetworkId,
        service: &str,
        now: SystemTime,
    ) -> Result<crate::registry::Wake, OpError<crate::registry::WakeError>> {
        let result = self.mutate(
            |reg| {
                let (wake, ops) = reg.request_wake(network, service, now)?;
                Ok((wake, ops, vec![]))
            },
            |_, _, _| (),
        );
        let label = match &result {
            Ok((crate::registry::Wake::Run(_), ())) => "started",
            Ok((crate::registry::Wake::Waking(_), ())) => "already_waking",
            Err(OpError::Refused(_)) => "refused",
            Err(OpError::Store(_)) => "failed",
        };
        self.metrics.wake_request(label);
        let (wake, ()) = result?;
        if let crate::registry::Wake::Run(job) = &wake {
            tracing::info!(%network, service = %meshlib::render::text::escape(service), "waking a service");
            self.run_hook(job.clone());
        }
        Ok(wake)
    }

    /// A member's traffic report: kept in memory (see
    /// [`crate::traffic::TrafficBook::take`]); the services it shows flows
    /// to stop being idle (a write only when their stored `last_flow` is
    /// stale). A report that does not fit is dropped and counted. May
    /// commit: call from a blocking thread.
    pub fn traffic_report(
        &self,
        network: NetworkId,
        key: PublicKey,
        report: meshlib::traffic::TrafficReport,
        now: SystemTime,
    ) -> Result<(), crate::traffic::Dropped> {
        let now_s = crate::registry::unix(now);
        let taken = self.read(|reg| {
            let service = reg.member(network, &key).map(|m| m.service.clone())?;
            let known = |s: &str| reg.has_service(network, s);
            Some(
                self.traffic
                    .lock()
                    .take((network, key), &service, report, known, now_s),
            )
        });
        let Some(taken) = taken else {
            return Ok(()); // no longer a member: its session ends anyway
        };
        let flows = taken?.flows;
        if !flows.is_empty() && self.read(|r| r.flows_need_write(network, &flows, now)) {
            let noted = self.mutate(
                |reg| {
                    let ops = reg.note_flows(network, &flows, now);
                    Ok::<_, std::convert::Infallible>(((), ops, vec![]))
                },
                |_, _, _| (),
            );
            if let Err(e) = noted {
                tracing::debug!("noting flows: {e}");
            }
        }
        Ok(())
    }

    /// A network's service graph: its services and the traffic reported
    /// to this replica (see [`crate::traffic::TrafficBook::graph`]);
    /// `None` for an unknown network.
    pub fn traffic_graph(
        &self,
        network: NetworkId,
        now: SystemTime,
    ) -> Option<crate::traffic::TrafficGraph> {
        let (map, addresses) =
            self.read(|r| Some((r.snapshot(network)?, r.addresses(network, now).ok()?)))?;
        Some(self.traffic.lock().graph(&map, &addresses))
    }

    /// The peer paths members of `network` reported to this replica
    /// ([`crate::traffic::TrafficBook::paths`]).
    pub fn member_paths(&self, network: NetworkId) -> Vec<crate::traffic::MemberPaths> {
        self.traffic.lock().paths(network)
    }

    /// The traffic reports' book, for reads (paths, summaries).
    pub fn traffic_book(&self) -> parking_lot::MutexGuard<'_, crate::traffic::TrafficBook> {
        self.traffic.lock()
    }

    /// A network's service addresses, `last_flow` including the flows
    /// reported to this replica and not yet stored.
    pub fn addresses(
        &self,
        network: NetworkId,
        now: SystemTime,
    ) -> Result<Vec<crate::registry::AddressInfo>, crate::registry::AdminError> {
        let mut list = self.read(|r| r.addresses(network, now))?;
        let book = self.traffic.lock();
        for a in &mut list {
            let seen = book.last_flow(network, &a.record.address.service);
            a.record.last_flow = a.record.last_flow.max(seen);
        }
        Ok(list)
    }

    /// Marks idle the services without a flow for their `idle-after` and
    /// starts their idle hooks (see [`Registry::idle_sweep`]); forgets
    /// the traffic reports of members that are gone. Commits: call from a
    /// blocking thread.
    fn idle_sweep(&self, now: SystemTime) -> Result<usize, StoreError> {
        self.read(|reg| self.traffic.lock().retain(|n, k| reg.is_member(n, k)));
        let limit = (self.max_ops / 2).max(1);
        let result = self.mutate(
            |reg| {
                let (jobs, ops) = reg.idle_sweep(now, limit);
                Ok::<_, std::convert::Infallible>((jobs, ops, vec![]))
            },
            |_, _, _| (),
        );
        match result {
            Ok((jobs, ())) => {
                let n = jobs.len();
                for job in jobs {
                    tracing::info!(network = %job.network, service = %meshlib::render::text::escape(&job.service), "service idle");
                    self.run_hook(job);
                }
                Ok(n)
            }
            Err(OpError::Store(e)) => Err(e),
            Err(OpError::Refused(never)) => match never {},
        }
    }

    /// What members are told about STUN and the relay (`None` before
    /// serving starts). With replicas, the relay is the one every replica
    /// names ([`Cluster::shared_relay`]), so members connected to
    /// different replicas meet there; tickets are good at any replica's
    /// relay (the secret is shared through the store).
    pub fn relay_settings(&self) -> Option<crate::relay::RelaySettings> {
        let mut settings = self.relay.get()?.clone();
        if let Some((udp, tcp)) = self.cluster.as_ref().and_then(Cluster::shared_relay) {
            settings.relay = Some(udp);
            settings.tcp = tcp;
            if !settings.stun.contains(&udp) {
                settings.stun.insert(0, udp);
            }
        }
        Some(settings)
    }

    /// Follows the relay members are told (its UDP address): a session
    /// sends its member a new ticket and relay when it changes.
    pub fn watch_relay(&self) -> tokio::sync::watch::Receiver<Option<SocketAddr>> {
        self.relay_now.subscribe()
    }

    /// Looks at the relay members should be told now and wakes the
    /// sessions if it changed (replicas: another replica's relay became
    /// the shared one). Cheap; called every half second while serving.
    pub fn check_relay(&self) {
        if let Some(cluster) = &self.cluster {
            cluster.ensure_registered();
        }
        let now = self.relay_settings().and_then(|s| s.relay);
        self.relay_now.send_if_modified(|seen| {
            let changed = *seen != now;
            if changed {
                tracing::info!(relay = ?now, "members are told a new relay");
                *seen = now;
            }
            changed
        });
    }

    /// The replica set, when the store is shared.
    pub fn cluster(&self) -> Option<&Cluster> {
        self.cluster.as_ref()
    }

    /// QUIC addresses for join tokens: this keyserver's, then every other
    /// live replica's.
    pub fn token_addrs(&self) -> Vec<SocketAddr> {
        let mut addrs = self.advertise.get().cloned().unwrap_or_default();
        if let Some(c) = &self.cluster {
            for a in c.replica_addrs() {
                if !addrs.contains(&a) {
                    addrs.push(a);
                }
            }
        }
        addrs
    }

    /// Rebuilds the registry from the store; on failure marks it stale.
    fn reload(&self, core: &mut Core, c: &mut Committer) -> Result<(), StoreError> {
        match c.store.load() {
            Ok(records) => {
                let now = SystemTime::now();
                *self.view.write() = Self::build(records.clone(), &self.limits, now).0;
                core.reg = Self::build(records, &self.limits, now).0;
                core.stale = false;
                // Sessions catch up from the new state at their next push.
                self.hubs.lock().clear();
                self.snapshots.lock().clear();
                self.maps.lock().clear();
                // Memory-only notes went with the old registry.
                self.confirmed.lock().clear();
                Ok(())
            }
            Err(e) => {
                core.stale = true;
                Err(e)
            }
        }
    }

    /// Whether the store takes writes now: a probe write (see
    /// [`Store::probe`]), reused for a second. `Err` says why not.
    /// Blocking (the probe fsyncs).
    pub fn readiness(&self) -> Result<(), String> {
        if let Some((at, answer)) = &*self.probe.lock() {
            if at.elapsed() < PROBE_REUSE {
                return answer.clone();
            }
        }
        let answer = {
            let mut c = self.committer.lock();
            let mut core = self.core.lock();
            let reloaded = if core.stale {
                self.reload(&mut core, &mut c)
            } else {
                Ok(())
            };
            drop(core);
            reloaded
                .and_then(|()| c.store.probe())
                .map_err(|e| e.to_string())
        };
        *self.probe.lock() = Some((Instant::now(), answer.clone()));
        answer
    }

    /// Drops the push channel of a deleted network (its subscribers read
    /// what is buffered, then see it closed).
    pub fn forget_network(&self, network: NetworkId) {
        if let Some(mut hub) = self.hubs.lock().remove(&network) {
            if let Some(held) = hub.held.take() {
                self.send_held(&hub.tx, held);
            }
        }
        self.snapshots.lock().remove(&network);
        self.maps.lock().remove(&network);
    }

    /// What brings a member of protocol version 4 or later from nothing to
    /// the network's current map, and the generation it ends at. The
    /// network's snapshot is encoded once and the same bytes go to every
    /// member that needs it, with one merged delta to the present when it
    /// is older: `joined` `None` (a `GetMap`) takes a shared snapshot up to
    /// [`SNAPSHOT_REUSE`] generations old, so members asking for their map
    /// during a join storm cost O(changes) each rather than O(members);
    /// `Some(g)` (a member that joined at generation `g`) takes one of
    /// generation `g` or later, so the joiner's first snapshot holds the
    /// joiner (a contract clients rely on), and joiners of one storm share
    /// it instead of each having the network copied and encoded. `None`
    /// for an unknown network. `packed`: the member reads packed messages
    /// ([`proto::PACKED_VERSION`]), so a large snapshot goes packed.
    pub fn map_replies(
        &self,
        network: NetworkId,
        joined: Option<u64>,
        packed: bool,
    ) -> Option<(u64, Vec<crate::session::Reply>)> {
        use crate::registry::Catchup;
        use crate::session::Reply;
        let view = self.view.read();
        let now = view.network(network)?.generation;
        let oldest = joined.unwrap_or_else(|| now.saturating_sub(SNAPSHOT_REUSE));
        let cached = self.snapshots.lock().get(&network).cloned();
        if let Some(c) = cached.filter(|c| c.generation <= now && c.generation >= oldest) {
            match view.catchup(network, c.generation) {
                Some(Catchup::UpToDate) => {
                    return Some((now, vec![Reply::Frame(c.frame(packed))]));
                }
                Some(Catchup::Delta(d)) => {
                    let to = d.to;
                    return Some((
                        to,
                        vec![
                            Reply::Frame(c.frame(packed)),
                            Reply::Msg(ServerMsg::Delta(d)),
                        ],
                    ));
                }
                // The log no longer reaches back to it.
                Some(Catchup::Snapshot(_)) | None => {}
            }
        }
        // The last snapshot's map brought to the present by the changes
        // since, else a copy of the registry's.
        let kept = self.maps.lock().remove(&network);
        let brought = kept.and_then(|mut map| match view.catchup(network, map.generation) {
            Some(Catchup::UpToDate) => Some(map),
            Some(Catchup::Delta(d)) => map.apply(&d).ok().map(|()| map),
            Some(Catchup::Snapshot(_)) | None => None,
        });
        let map = match brought {
            Some(map) => map,
            None => view.snapshot(network)?,
        };
        drop(view);
        let generation = map.generation;
        let msg = ServerMsg::Snapshot(map);
        let encoded = proto::encode_frame(&msg, self.limits.max_frame);
        let ServerMsg::Snapshot(map) = msg else {
            unreachable!("built above")
        };
        let Ok(frame) = encoded else {
            // Too large to send: the writer reports it.
            return Some((generation, vec![Reply::Msg(ServerMsg::Snapshot(map))]));
        };
        if map.members.len() >= self.limits.keep_map_from {
            let mut maps = self.maps.lock();
            if maps.get(&network).is_none_or(|m| m.generation < generation) {
                maps.insert(network, map);
            }
        }
        let built = Arc::new(SharedSnapshot {
            generation,
            packed: proto::pack_frame(&frame).map(Arc::from),
            frame: frame.into(),
        });
        let reply = Reply::Frame(built.frame(packed));
        let mut snapshots = self.snapshots.lock();
        match snapshots.get(&network) {
            Some(slot) if slot.generation >= generation => {}
            _ => {
                snapshots.insert(network, built);
            }
        }
        Some((generation, vec![reply]))
    }

    /// Forgets expired and used-up tokens; returns how many. Blocking.
    pub fn collect_tokens(&self, now: SystemTime) -> Result<usize, StoreError> {
        let limit = self.max_ops;
        let result = self.mutate(
            |reg| {
                let ops = reg.collect_tokens_at_most(now, limit);
                Ok::<_, std::convert::Infallible>((ops.len(), ops, vec![]))
            },
            |_, _, _| (),
        );
        match result {
            Ok((n, ())) => Ok(n),
            Err(OpError::Store(e)) => Err(e),
            Err(OpError::Refused(never)) => match never {},
        }
    }

    /// Sends a change to the subscribers of its network: at once when
    /// every subscriber has taken the last push, otherwise merged with the
    /// changes that follow into one push that leaves when they have (or
    /// after [`Limits::push_hold`]): in a change storm each member gets
    /// one push per round it can take instead of one per change, in
    /// generation order either way.
    fn publish(&self, change: Change) {
        if let Some(key) = &change.removed {
            self.seen.lock().remove(&(change.network, *key));
            self.confirmed.lock().remove(&(change.network, *key));
        }
        let mut hubs = self.hubs.lock();
        let Some(hub) = hubs.get_mut(&change.network) else {
            return;
        };
        if hub.tx.receiver_count() == 0 {
            // Nobody to tell (a subscriber that comes later starts from
            // the registry).
            hub.held = None;
            return;
        }
        let removed: Vec<PublicKey> = change.removed.into_iter().collect();
        if let Some(held) = &mut hub.held {
            if held.delta.to == change.delta.from {
                held.delta.to = change.delta.to;
                held.delta.changes.extend(change.delta.changes);
                held.removed.extend(removed);
                held.merged = true;
                return;
            }
            // Not contiguous (a reload in between): what is held goes first.
            let held = hub.held.take().expect("checked above");
            self.send_held(&hub.tx, held);
        }
        let now = Instant::now();
        let held = Held {
            delta: change.delta,
            removed,
            at: now,
            merged: false,
        };
        if self.limits.push_hold.is_zero() || hub.may_send(now, self.limits.push_hold) {
            let generations = self.send_held(&hub.tx, held);
            hub.pushed(now, generations, self.limits.push_hold);
        } else {
            hub.held = Some(held);
            self.held_wake.notify_one();
        }
    }

    /// Encodes held changes (once for every subscriber, plus once per
    /// older protocol version that needs them filtered) and sends them.
    /// Returns how many generations they span.
    fn send_held(&self, tx: &broadcast::Sender<Push>, held: Held) -> u64 {
        let Held {
            mut delta,
            removed,
            at,
            merged,
        } = held;
        if merged {
            // One change per member, group or address: a later change of
            // one replaces its earlier ones (as in a catch-up).
            delta.changes = crate::registry::compact(delta.changes.iter());
        }
        self.metrics
            .pushes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.metrics.pushed_generations.fetch_add(
            delta.to.saturating_sub(delta.from),
            std::sync::atomic::Ordering::Relaxed,
        );
        let (from, to) = (delta.from, delta.to);
        // Versions 3 and 4 cannot decode every change (see
        // `legacy_delta`); members older than `PACKED_VERSION` cannot
        // decode a packed delta.
        let mut legacy: Vec<(u16, Arc<[u8]>)> = [3, 4]
            .into_iter()
            .filter_map(|v| {
                let d = crate::session::legacy_delta(&delta, v)?;
                let frame = proto::encode_frame(&ServerMsg::Delta(d), usize::MAX).ok()?;
                Some((v, Arc::from(frame)))
            })
            .collect();
        let Ok(mut frame) = proto::encode_frame(&ServerMsg::Delta(delta), usize::MAX) else {
            return 0;
        };
        if let Some(packed) = proto::pack_frame(&frame) {
            let plain = std::mem::replace(&mut frame, packed);
            legacy.push((proto::PACKED_VERSION - 1, Arc::from(plain)));
        }
        // No receivers is fine: nobody to tell.
        let _ = tx.send(Push {
            from,
            to,
            frame: frame.into(),
            legacy,
            removed,
            at,
        });
        to.saturating_sub(from)
    }

    /// Sends the held changes of every network whose subscribers have all
    /// taken the last push (once its pace has passed), or that were held
    /// for [`Limits::push_hold`] (a subscriber that takes long must not
    /// delay the others for longer). Returns when to call again while
    /// changes are still held (`None`: nothing is): when a pace or hold
    /// ends, or in a millisecond while subscribers are still taking the
    /// last push. The server calls it while anything is held
    /// ([`Shared::held_pushes`]).
    pub fn flush_pushes(&self, now: Instant) -> Option<Instant> {
        let hold = self.limits.push_hold;
        let mut hubs = self.hubs.lock();
        let mut next: Option<Instant> = None;
        for hub in hubs.values_mut() {
            let Some(held) = &hub.held else {
                continue;
            };
            let held_until = held.at + hold;
            if hub.may_send(now, hold) || now >= held_until {
                let held = hub.held.take().expect("checked above");
                let generations = self.send_held(&hub.tx, held);
                hub.pushed(now, generations, hold);
                continue;
            }
            let paced_until = hub.sent.map_or(now, |t| t + hub.pace(hold));
            let at = if paced_until > now {
                paced_until.min(held_until)
            } else {
                // Paced out: waiting for subscribers to take the last push.
                (now + FLUSH_POLL).min(held_until)
            };
            next = Some(next.map_or(at, |n| n.min(at)));
        }
        next
    }

    /// Completes when a change was held since the last call (the server's
    /// flusher waits on it, then calls [`Shared::flush_pushes`] until
    /// nothing is held).
    pub async fn held_pushes(&self) {
        self.held_wake.notified().await;
    }

    /// Subscribes to a network's pushes. Call under the registry lock (from a
    /// [`Shared::mutate`] `after` closure or [`Shared::subscribe_at`]).
    pub fn subscribe(&self, network: NetworkId) -> broadcast::Receiver<Push> {
        self.hubs
            .lock()
            .entry(network)
            .or_insert_with(|| Hub {
                tx: broadcast::channel(self.limits.push_buffer.max(16)).0,
                held: None,
                sent: None,
                storm: Duration::ZERO,
            })
            .tx
            .subscribe()
    }

    /// Reads the registry and subscribes at the same instant (no push is
    /// published between the two).
    pub fn subscribe_at<T>(
        &self,
        network: NetworkId,
        f: impl FnOnce(&Registry) -> T,
    ) -> (T, broadcast::Receiver<Push>) {
        let view = self.view.read();
        let value = f(&view);
        (value, self.subscribe(network))
    }

    /// Counts an open session of a member until the guard is dropped. Call
    /// under the registry lock, in the same [`Shared::mutate`] as the join
    /// or resume, so no retried join slips in between.
    pub fn online(&self, network: NetworkId, key: PublicKey) -> OpenSession {
        let first = {
            let mut online = self.online.lock();
            let n = online.entry((network, key)).or_insert(0);
            *n += 1;
            *n == 1
        };
        if first {
            if let Some(c) = &self.cluster {
                c.claim(network, key);
            }
        }
        OpenSession {
            map: self.online.clone(),
            id: (network, key),
            cluster: self.cluster.clone(),
        }
    }

    /// Whether a session of the member is open here.
    pub fn is_online(&self, network: NetworkId, key: &PublicKey) -> bool {
        self.online.lock().contains_key(&(network, *key))
    }

    /// Whether another replica of a shared store says it holds a session
    /// of the member (until that replica's lease ends, if it died).
    pub fn held_elsewhere(&self, network: NetworkId, key: &PublicKey) -> bool {
        self.cluster
            .as_ref()
            .is_some_and(|c| c.present_elsewhere(network, key))
    }

    /// Notes a heartbeat. Memory only and off the registry lock (which a
    /// store commit may hold): a thousand members heartbeating must not
    /// queue behind fsyncs. The stored `last_seen` is refreshed with the
    /// member's next stored change.
    ///
    /// A member's heartbeat shows it read its welcome and holds its
    /// credential: the registry notes it (in memory, stored with the
    /// member's next write), so a retried join with its key is refused from
    /// then on. That needs the registry lock once per member; it is only
    /// tried, never waited for (a later heartbeat tries again).
    pub fn heartbeat(&self, network: NetworkId, key: &PublicKey, now: SystemTime) {
        self.seen
            .lock()
            .insert((network, *key), crate::registry::unix(now));
        if self.confirmed.lock().contains(&(network, *key)) {
            return;
        }
        if let Some(mut core) = self.core.try_lock() {
            let _memory_only = core.reg.confirm_credential(network, key);
            self.confirmed.lock().insert((network, *key));
        }
    }

    /// Applies the lifecycle timers at `now` (members silent for
    /// `offline-after` go offline, expired ones are released) and pushes the
    /// transitions, then marks idle services (`idle_sweep`).
    /// Returns how many member transitions there were. Commits to the
    /// store: call from a blocking thread.
    pub fn sweep(&self, now: SystemTime) -> Result<usize, StoreError> {
        /// Transitions per sweep; the rest wait a sweep interval.
        const BATCH: usize = 256;
        // A shared store bounds a transaction: about four writes each.
        let batch = BATCH.min(self.max_ops / 4).max(1);
        let heard = self.seen.lock().clone();
        let now_s = crate::registry::unix(now);
        // Members whose session another replica holds are that replica's
        // to judge; an orphan counts from when its presence vanished.
        let cluster = self.cluster.clone();
        let last = |n: NetworkId, k: &PublicKey| {
            heard
                .get(&(n, *k))
                .copied()
                .or_else(|| cluster.as_ref().and_then(|c| c.heard(n, k, now_s)))
        };
        let result = self.mutate(
            |reg| {
                let (changes, ops) = reg.sweep(now, last, batch);
                Ok::<_, std::convert::Infallible>((changes.len(), ops, changes))
            },
            |_, _, _| (),
        );
        let n = match result {
            Ok((n, ())) => n,
            Err(OpError::Store(e)) => return Err(e),
            Err(OpError::Refused(never)) => match never {},
        };
        // Idle services are judged with the same tick.
        self.idle_sweep(now)?;
        Ok(n)
    }

    /// A member's key changed: its heartbeat record follows it.
    pub fn rekeyed(&self, network: NetworkId, old: &PublicKey, new: &PublicKey) {
        let mut seen = self.seen.lock();
        if let Some(t) = seen.remove(&(network, *old)) {
            seen.insert((network, *new), t);
        }
    }

    /// Members of a network, `last_seen` including heartbeats.
    pub fn members(&self, network: NetworkId) -> Vec<crate::registry::MemberInfo> {
        let mut list = self.read(|r| r.members(network));
        self.add_heartbeats(network, &mut list);
        list
    }

    /// A network's current map and its members (`last_seen` including
    /// heartbeats), read together so that names computed from the map
    /// agree with the member records; `None` for an unknown network.
    pub fn map_and_members(
        &self,
        network: NetworkId,
    ) -> Option<(
        meshlib::netmap::NetworkMap,
        Vec<crate::registry::MemberInfo>,
    )> {
        let (map, mut list) = self.read(|r| Some((r.snapshot(network)?, r.members(network))))?;
        self.add_heartbeats(network, &mut list);
        Some((map, list))
    }

    /// Raises each member's `last_seen` to its last heartbeat (heartbeats
    /// are not written to the store).
    fn add_heartbeats(&self, network: NetworkId, list: &mut [crate::registry::MemberInfo]) {
        let seen = self.seen.lock();
        for m in list {
            if let Some(t) = seen.get(&(network, m.member.public_key)) {
                m.last_seen = m.last_seen.max(*t);
            }
        }
    }

    /// Number of open push subscriptions across networks (for status).
    pub fn subscribers(&self) -> usize {
        self.hubs
            .lock()
            .values()
            .map(|hub| hub.tx.receiver_count())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use meshlib::keys::PrivateKey;
    use meshlib::proto::JoinRequest;

    use super::*;
    use crate::store::RedbStore;

    /// The real store, with a switch that makes commits fail (a full disk).
    struct Flaky {
        inner: RedbStore,
        fail: Arc<AtomicBool>,
    }

    impl Store for Flaky {
        fn load(&mut self) -> Result<Records, StoreError> {
            self.inner.load()
        }
        fn commit(&mut self, ops: &[StoreOp]) -> Result<(), StoreError> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(StoreError::Db("disk full (injected)".into()));
            }
            self.inner.commit(ops)
        }
    }

    /// A member's map (`GetMap`): one encoded snapshot per network shared
    /// (the same bytes), plus a merged delta to the present; the two
    /// together are exactly the registry's map. Past [`SNAPSHOT_REUSE`]
    /// generations a new snapshot is encoded. A joiner gets only a
    /// snapshot of the present, shared at that generation.
    /// A keyserver state on the embedded store with network `prod` and a
    /// token for 500 joins.
    fn prod(limits: Limits, now: SystemTime) -> (tempfile::TempDir, Shared, NetworkId) {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("s.redb")).unwrap();
        let (shared, _) = Shared::new(Box::new(store), limits, [0; 32], now).unwrap();
        let (net, ()) = shared
            .mutate(
                |r| {
                    r.create_network("prod", meshlib::ipam::DEFAULT_RANGE, now)
                        .map(|(n, ops)| (n, ops, vec![]))
                },
                |_, _, _| (),
            )
            .unwrap();
        shared
            .mutate(
                |r| {
                    r.create_token(
                        net.id,
                        &[1; 32],
                        500,
                        Duration::from_secs(60),
                        None,
                        None,
                        now,
                    )
                    .map(|(t, ops)| (t, ops, vec![]))
                },
                |_, _, _| (),
            )
            .unwrap();
        (dir, shared, net.id)
    }

    /// A join to `net` with token `[1; 32]` and a fresh key.
    fn join_req(net: NetworkId) -> JoinRequest {
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

    /// Joins a new member to `net`: its generation and key.
    fn join_one(shared: &Shared, net: NetworkId, now: SystemTime) -> (u64, PublicKey) {
        let req = join_req(net);
        let generation = shared
            .mutate(
                |r| {
                    let j = r.join(&req, "127.0.0.1:1".parse().unwrap(), &[2; 32], false, now)?;
                    Ok::<_, crate::registry::ProtoOpError>((j.generation, j.ops, j.changes))
                },
                |_, _, _| (),
            )
            .unwrap()
            .0;
        (generation, req.public_key)
    }

    fn remove_one(shared: &Shared, net: NetworkId, key: PublicKey, now: SystemTime) {
        shared
            .mutate(
                |r| {
                    let (c, ops) = r.remove_member(net, &key.to_string(), now)?;
                    Ok::<_, crate::registry::AdminError>(((), ops, vec![c]))
                },
                |_, _, _| (),
            )
            .unwrap();
    }

    #[test]
    fn joiners_share_one_encoded_snapshot() {
        let now = SystemTime::now();
        // Every network's last map kept (the default keeps those of 256
        // members or more).
        let limits = Limits {
            keep_map_from: 0,
            ..Limits::default()
        };
        let (_dir, shared, net) = prod(limits, now);
        let join = |shared: &Shared| join_one(shared, net, now).0;
        let decode = |frame: &[u8]| -> ServerMsg { proto::decode_payload(&frame[4..]).unwrap() };
        let snapshot_in = |reply: &crate::session::Reply| match reply {
            crate::session::Reply::Frame(f) => match decode(f) {
                ServerMsg::Snapshot(m) => m,
                other => panic!("not a snapshot: {other:?}"),
            },
            other => panic!("not an encoded frame: {other:?}"),
        };
        // The map a member ends with after the replies.
        let replay = |replies: &[crate::session::Reply]| {
            let mut map = None::<meshlib::netmap::NetworkMap>;
            for r in replies {
                let msg = match r {
                    crate::session::Reply::Frame(f) => decode(f),
                    crate::session::Reply::Msg(m) => m.clone(),
                };
                match msg {
                    ServerMsg::Snapshot(m) => map = Some(m),
                    ServerMsg::Delta(d) => map.as_mut().unwrap().apply(&d).unwrap(),
                    other => panic!("unexpected {other:?}"),
                }
            }
            map.unwrap()
        };
        for _ in 0..10 {
            join(&shared);
        }
        let (g1, first) = shared.map_replies(net, None, true).unwrap();
        assert_eq!(g1, 10);
        assert_eq!(first.len(), 1, "a fresh snapshot alone");
        let shared_frame = match &first[0] {
            crate::session::Reply::Frame(f) => f.clone(),
            _ => panic!("an encoded frame"),
        };
        for i in 1..=SNAPSHOT_REUSE {
            let g = join(&shared);
            let (to, replies) = shared.map_replies(net, None, true).unwrap();
            assert_eq!((to, replies.len()), (g, 2), "join {i}: snapshot and delta");
            match &replies[0] {
                crate::session::Reply::Frame(f) => {
                    assert!(Arc::ptr_eq(f, &shared_frame), "the same bytes")
                }
                _ => panic!("an encoded frame"),
            }
            let want = shared.read(|r| r.snapshot(net)).unwrap();
            assert_eq!(replay(&replies), want);
        }
        // One generation too many: encoded again, and shared from then on.
        join(&shared);
        let (_, replies) = shared.map_replies(net, None, true).unwrap();
        assert_eq!(replies.len(), 1);
        assert_eq!(replay(&replies), shared.read(|r| r.snapshot(net)).unwrap());
        assert_eq!(replay(&replies).members.len(), 11 + SNAPSHOT_REUSE as usize);
        // A joiner: the present only, the same bytes at the same generation.
        let now_gen = join(&shared);
        let (g, a) = shared.map_replies(net, Some(now_gen), true).unwrap();
        let (_, b) = shared.map_replies(net, Some(now_gen), true).unwrap();
        assert_eq!((g, a.len(), b.len()), (now_gen, 1, 1));
        match (&a[0], &b[0]) {
            (crate::session::Reply::Frame(x), crate::session::Reply::Frame(y)) => {
                assert!(Arc::ptr_eq(x, y))
            }
            _ => panic!("encoded frames"),
        }
        // A joiner of an earlier generation (joins of one storm) shares
        // that snapshot, which holds it, and gets a delta to the present.
        let later = join(&shared);
        let (g2, c) = shared.map_replies(net, Some(now_gen), true).unwrap();
        assert_eq!((g2, c.len()), (later, 2));
        match &c[0] {
            crate::session::Reply::Frame(f) => assert!(Arc::ptr_eq(
                f,
                match &a[0] {
                    crate::session::Reply::Frame(x) => x,
                    _ => unreachable!(),
                }
            )),
            _ => panic!("the shared frame"),
        }
        assert_eq!(replay(&c), shared.read(|r| r.snapshot(net)).unwrap());
        // The later joiner is not in that snapshot: it gets a new one.
        let (g3, d) = shared.map_replies(net, Some(later), true).unwrap();
        assert_eq!(
            (g3, d.len()),
            (later, 1),
            "never a snapshot without the joiner"
        );
        let m = snapshot_in(&d[0]);
        assert_eq!(m.generation, later);
        assert_eq!(replay(&d), shared.read(|r| r.snapshot(net)).unwrap());
        // Snapshots are built from the last one's map and the changes
        // since: after removals and joins, the same as the registry's.
        let mut victims = shared
            .read(|r| r.snapshot(net))
            .unwrap()
            .members
            .into_keys();
        for key in [victims.next().unwrap(), victims.nth(3).unwrap()] {
            remove_one(&shared, net, key, now);
            let g = join(&shared);
            let (_, e) = shared.map_replies(net, Some(g), true).unwrap();
            assert_eq!(e.len(), 1);
            let m = snapshot_in(&e[0]);
            assert!(!m.members.contains_key(&key));
            assert_eq!(m, shared.read(|r| r.snapshot(net)).unwrap());
        }
    }

    /// Members of `PACKED_VERSION` or later get a large snapshot and a
    /// large push packed; older members the same messages plain (they
    /// cannot decode a packed one), including what filters their deltas.
    #[test]
    fn large_snapshots_and_pushes_go_packed_to_members_that_read_them_only() {
        let now = SystemTime::now();
        let limits = Limits {
            push_hold: Duration::from_secs(3600),
            ..Limits::default()
        };
        let (_dir, shared, net) = prod(limits, now);
        let variant = |frame: &[u8]| postcard::take_from_bytes::<u32>(&frame[4..]).unwrap().0;
        let decode = |frame: &[u8]| -> ServerMsg { proto::decode_payload(&frame[4..]).unwrap() };
        let frame_of = |r: &crate::session::Reply| match r {
            crate::session::Reply::Frame(f) => f.clone(),
            other => panic!("not an encoded frame: {other:?}"),
        };
        // Snapshots: 40 members (about 5 KB plain).
        for _ in 0..40 {
            join_one(&shared, net, now);
        }
        let (_, plain) = shared.map_replies(net, None, false).unwrap();
        let (_, packed) = shared.map_replies(net, None, true).unwrap();
        let (plain, packed) = (frame_of(&plain[0]), frame_of(&packed[0]));
        assert_eq!((variant(&plain), variant(&packed)), (1, 9));
        assert!(
            packed.len() * 2 < plain.len(),
            "{} {}",
            packed.len(),
            plain.len()
        );
        let want = ServerMsg::Snapshot(shared.read(|r| r.snapshot(net)).unwrap());
        assert_eq!((decode(&plain), decode(&packed)), (want.clone(), want));
        // Pushes: a merged push of 20 joins (about 2.5 KB plain).
        let mut rx = shared.subscribe(net);
        // A subscriber that never reads: what follows is held until
        // `push_hold`, then goes as one push.
        let _slow = shared.subscribe(net);
        join_one(&shared, net, now);
        let lone = rx.try_recv().expect("a lone change goes at once");
        for v in [3, 5, proto::PACKED_VERSION] {
            // Small: plain for everyone.
            assert_eq!(variant(&lone.frame_for(v)), 2, "version {v}");
        }
        let from = lone.to;
        for _ in 0..20 {
            join_one(&shared, net, now);
        }
        assert!(shared.flush_pushes(Instant::now()).is_some(), "held");
        let later = Instant::now() + Duration::from_secs(3600);
        assert!(shared.flush_pushes(later).is_none());
        let merged = rx.try_recv().expect("one merged push");
        assert_eq!((merged.from, merged.to), (from, from + 20));
        let (new, old) = (
            merged.frame_for(proto::PACKED_VERSION),
            merged.frame_for(proto::PACKED_VERSION - 1),
        );
        assert_eq!((variant(&new), variant(&old)), (9, 2));
        assert!(new.len() < old.len());
        assert_eq!(decode(&new), decode(&old));
        for v in [3, 4] {
            assert_eq!(variant(&merged.frame_for(v)), 2, "version {v}");
        }
        let ServerMsg::Delta(d) = decode(&new) else {
            panic!("a delta");
        };
        let mut map = shared.read(|r| r.snapshot(net)).unwrap();
        map.generation = from;
        map.apply(&d).unwrap();
        assert_eq!(map, shared.read(|r| r.snapshot(net)).unwrap());
    }

    #[test]
    fn changes_pile_up_into_one_push_while_members_take_the_last() {
        let now = SystemTime::now();
        let hold = Duration::from_secs(3600);
        let limits = Limits {
            push_hold: hold,
            ..Limits::default()
        };
        let (_dir, shared, net) = prod(limits, now);
        let mut rx = shared.subscribe(net);
        let remove = |key: PublicKey| remove_one(&shared, net, key, now);
        // Nothing pushed yet: the first change goes out at once.
        let (g1, a) = join_one(&shared, net, now);
        let first = rx.try_recv().expect("pushed at once");
        assert_eq!((first.from, first.to), (g1 - 1, g1));
        // Taken: the next goes out at once too, if the last left long
        // enough ago (one subscriber: 10 µs).
        std::thread::sleep(Duration::from_millis(2));
        let (g2, b) = join_one(&shared, net, now);
        // Not taken yet: the next changes are held, merged.
        let (_, c) = join_one(&shared, net, now);
        let held_from = g2;
        assert!(shared.flush_pushes(Instant::now()).is_some(), "still held");
        remove(a);
        remove(c);
        let (g5, _) = join_one(&shared, net, now);
        assert_eq!(rx.try_recv().expect("pushed at once").to, g2);
        assert!(
            matches!(rx.try_recv(), Err(broadcast::error::TryRecvError::Empty)),
            "held while the subscriber had not taken the last push"
        );
        // Flushed once every subscriber took the last push (here: none
        // is waiting) …
        assert!(shared.flush_pushes(Instant::now()).is_none());
        let merged = rx.try_recv().expect("one merged push");
        assert!(matches!(
            rx.try_recv(),
            Err(broadcast::error::TryRecvError::Empty)
        ));
        assert_eq!((merged.from, merged.to), (held_from, g5));
        assert_eq!(merged.removed, vec![a, c]);
        let decode = |frame: &[u8]| -> ServerMsg { proto::decode_payload(&frame[4..]).unwrap() };
        let ServerMsg::Delta(d) = decode(&merged.frame) else {
            panic!("a delta");
        };
        // Compacted: c's join is replaced by its removal.
        assert_eq!(d.changes.len(), 3, "{d:?}");
        // The merged delta takes a map at `held_from` to the present.
        let mut map = shared.read(|r| r.snapshot(net)).unwrap();
        map.generation = held_from;
        map.apply(&d).unwrap();
        assert_eq!(map, shared.read(|r| r.snapshot(net)).unwrap());
        assert!(map.members.contains_key(&b) && !map.members.contains_key(&a));
        // A subscriber that never takes its pushes delays the others by
        // at most `push_hold` (after a quiet spell: the merged push set a
        // storm pace).
        std::thread::sleep(STORM_PACE_MIN * 2);
        let _slow = shared.subscribe(net);
        let _ = join_one(&shared, net, now);
        let (g7, _) = join_one(&shared, net, now);
        assert!(shared.flush_pushes(Instant::now()).is_some());
        assert!(shared.flush_pushes(Instant::now() + hold).is_none());
        let mut last = 0;
        while let Ok(p) = rx.try_recv() {
            last = p.to;
        }
        assert_eq!(last, g7);
    }

    #[test]
    fn a_change_storm_slows_pushes_to_one_per_hold_and_a_lone_change_goes_at_once() {
        let hold = Duration::from_millis(100);
        let mut hub = Hub {
            tx: broadcast::channel(16).0,
            held: None,
            sent: None,
            storm: Duration::ZERO,
        };
        let _rx = hub.tx.subscribe();
        let mut t = Instant::now();
        assert!(hub.may_send(t, hold), "nothing sent yet");
        hub.pushed(t, 1, hold);
        // One subscriber: the pace of its size.
        assert_eq!(hub.pace(hold), PACE_PER_SUBSCRIBER);
        assert!(!hub.may_send(t, hold));
        // Pushes that carry merged changes (they come faster than pushes
        // go): the pace doubles, up to `hold`.
        let mut paces = Vec::new();
        for _ in 0..8 {
            t += hub.pace(hold);
            assert!(hub.may_send(t, hold));
            hub.pushed(t, 5, hold);
            paces.push(hub.pace(hold));
        }
        let ms = Duration::from_millis;
        assert_eq!(paces[..3], [ms(5), ms(10), ms(20)]);
        assert_eq!(paces.last(), Some(&hold));
        assert!(!hub.may_send(t + hold / 2, hold));
        assert!(hub.may_send(t + hold, hold));
        // After a quiet spell a lone change leaves at once, and ends the
        // storm: the next one is paced by the network's size again.
        t += hold * 3;
        assert!(hub.may_send(t, hold));
        hub.pushed(t, 1, hold);
        assert_eq!(hub.pace(hold), PACE_PER_SUBSCRIBER);
        // A hold of zero (or below the storm pace) caps it.
        hub.pushed(t, 5, ms(2));
        assert_eq!(hub.pace(ms(2)), ms(2));
    }

    #[test]
    fn failed_commit_leaves_memory_as_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let fail = Arc::new(AtomicBool::new(false));
        let store = Flaky {
            inner: RedbStore::open(&dir.path().join("s.redb")).unwrap(),
            fail: fail.clone(),
        };
        let now = SystemTime::now();
        let (shared, _) = Shared::new(Box::new(store), Limits::default(), [0; 32], now).unwrap();
        let (net, ()) = shared
            .mutate(
                |r| {
                    r.create_network("prod", meshlib::ipam::DEFAULT_RANGE, now)
                        .map(|(n, ops)| (n, ops, vec![]))
                },
                |_, _, _| (),
            )
            .unwrap();
        shared
            .mutate(
                |r| {
                    r.create_token(
                        net.id,
                        &[1; 32],
                        5,
                        Duration::from_secs(60),
                        None,
                        None,
                        now,
                    )
                    .map(|(t, ops)| (t, ops, vec![]))
                },
                |_, _, _| (),
            )
            .unwrap();
        let join = |shared: &Shared| {
            let req = join_req(net.id);
            shared.mutate(
                |r| {
                    let j = r.join(&req, "127.0.0.1:1".parse().unwrap(), &[2; 32], false, now)?;
                    Ok::<_, crate::registry::ProtoOpError>((j.member.ip, j.ops, j.changes))
                },
                |_, _, _| (),
            )
        };
        let (ip1, ()) = join(&shared).unwrap();
        // Heartbeats show in the member list without a store write.
        let key = shared.read(|r| r.members(net.id))[0].member.public_key;
        let later = now + Duration::from_secs(100);
        shared.heartbeat(net.id, &key, later);
        assert_eq!(
            shared.members(net.id)[0].last_seen,
            crate::registry::unix(later)
        );
        fail.store(true, Ordering::SeqCst);
        assert!(matches!(join(&shared), Err(OpError::Store(_))));
        // Memory was rebuilt from disk: one member, the token used once.
        assert_eq!(shared.read(|r| r.member_count(net.id)), 1);
        assert_eq!(shared.read(|r| r.tokens(net.id)[0].uses_left), 4);
        assert_eq!(shared.read(|r| r.network(net.id).unwrap().generation), 1);
        fail.store(false, Ordering::SeqCst);
        let (ip2, ()) = join(&shared).unwrap();
        assert_eq!(
            u32::from(ip2),
            u32::from(ip1) + 1,
            "the failed join's address was not consumed"
        );
    }
}
