//! # meshsim — the control plane on a virtual clock
//!
//! N members × M networks, each a real [`MemberCore`] with a recording data
//! plane, against the real keyserver ([`Shared`] with its registry, an
//! in-memory store, and one [`StreamSession`] per connection), linked by
//! simulated connections with seeded latency, jitter, loss and partitions.
//! Nothing sleeps: [`Sim::step`] jumps to the next thing that happens (a
//! frame's delivery, a member's `poll_timeout`, the keyserver's lifecycle
//! sweep, a server-side idle timeout). The same seed gives the same trace.
//!
//! ## Layout
//!
//! - [`Sim`] — the world: clock, RNG, keyserver, members, connections, queue.
//! - [`SimMember`] — one member: its core, its recording plane, its state.
//! - [`Plane`] — what a data plane would hold: the peers the map asks for.
//! - [`HookLog`] — the keyserver's hook runner here: it records the wake
//!   and idle hooks it is asked to run.
//!
//! ## Model
//!
//! A connection is an ordered, reliable stream (QUIC): a lost frame is
//! resent after `rto`, so loss shows as delay, never as a gap. A partitioned
//! member's frames vanish and its connection attempts time out; the keyserver
//! drops a connection silent for `idle_timeout`, the member notices through
//! its heartbeat reply timeout. A killed member stops without a word.
//!
//! With [`SimConfig::replicas`] above one, that many keyservers share one
//! store ([`SharedMemStore`]): each catches up with the others' commits
//! before it handles a frame and pushes them to its own members, as
//! replicas following etcd do; presence (heartbeats) is shared, and the
//! first running replica sweeps. [`Sim::kill_replica`] stops one without a
//! word: its members' connections give it up after
//! [`SimConfig::client_idle_timeout`] and they resume on the next replica
//! of their list.

pub mod paths;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use keyserver::hooks::HookRunner;
use keyserver::registry::{AddressInfo, AddressSettings, AdminError, HookJob, HookKind, Lifecycle};
use keyserver::server::{Limits, Push, Shared};
use keyserver::session::{Next, Reply, StreamSession};
use keyserver::store::{MemStore, SharedMemStore};
use meshlib::ids::{NetworkId, ProcessType};
use meshlib::ist::config::Overrides;
use meshlib::ist::table::IstTable;
use meshlib::keys::{PrivateKey, PublicKey};
use meshlib::member::{End, Event, Frame, MemberConfig, MemberCore, MemberMeta, Transmit};
use meshlib::names::{Lookup, NameIndex};
use meshlib::netmap::{MapChange, NetworkMap};
use meshlib::proto::{self, ClientMsg, JoinToken, ServerMsg};
use meshlib::reconcile::{desired_peer, DesiredPeers};
use tokio::sync::broadcast;

/// A member's handle in the simulation.
pub type MemberId = usize;

/// Settings of a simulation (plain data).
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Seed of every random choice (latency jitter, loss, keys, credentials).
    pub seed: u64,
    /// One-way latency of every link (a member's own can be set apart).
    pub latency: Duration,
    /// Up to this much is added to each frame's latency.
    pub jitter: Duration,
    /// Probability that a frame is lost once and resent after `rto`.
    pub loss: f64,
    /// Retransmission delay of a lost frame.
    pub rto: Duration,
    /// The keyserver drops a connection silent this long (QUIC idle timeout).
    pub idle_timeout: Duration,
    /// The keyserver's lifecycle timers.
    pub lifecycle: Lifecycle,
    /// How often the keyserver sweeps (as `keyserver serve` does, 1 s).
    pub sweep_interval: Duration,
    /// The members' timers.
    pub member: MemberConfig,
    /// Deltas kept per network for resumes.
    pub change_log: usize,
    /// Pushes buffered per connection before it must catch up from the log.
    pub push_buffer: usize,
    /// How long a member's QUIC connection waits on a silent keyserver
    /// before giving it up (`ClientConfig::idle_timeout`, 10 s).
    pub client_idle_timeout: Duration,
    /// Keyserver replicas sharing one store (at least 1): members' tokens
    /// name every replica, a member connects to the first one its core
    /// picks, and [`Sim::kill_replica`] takes one away.
    pub replicas: usize,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            seed: 1,
            latency: Duration::from_millis(5),
            jitter: Duration::from_millis(2),
            loss: 0.0,
            rto: Duration::from_millis(200),
            idle_timeout: Duration::from_secs(30),
            lifecycle: Lifecycle::default(),
            sweep_interval: Duration::from_secs(1),
            member: MemberConfig::default(),
            change_log: 1024,
            push_buffer: 1024,
            client_idle_timeout: Duration::from_secs(10),
            replicas: 1,
        }
    }
}

/// What a data plane would hold, kept from the map's changes as the sidecar
/// applies them: the peers of every online member but itself.
#[derive(Debug, Clone, Default)]
pub struct Plane {
    /// The peers, by key.
    pub peers: DesiredPeers,
    /// How many peer changes were applied.
    pub applied: u64,
}

impl Plane {
    /// Rebuilds from a whole map.
    fn reset(&mut self, map: &NetworkMap, own: &PublicKey) {
        self.peers = map
            .members
            .values()
            .filter(|m| m.is_online() && &m.public_key != own)
            .map(|m| (m.public_key, desired_peer(m, 25, true)))
            .collect();
        self.applied += 1;
    }

    /// Applies one delta's changes.
    fn apply(&mut self, changes: &[MapChange], own: &PublicKey) {
        for c in changes {
            self.applied += 1;
            match c {
                MapChange::Upsert(m) if m.is_online() && &m.public_key != own => {
                    self.peers.insert(m.public_key, desired_peer(m, 25, true));
                }
                MapChange::Upsert(m) => {
                    self.peers.remove(&m.public_key);
                }
                MapChange::Remove(k) => {
                    self.peers.remove(k);
                }
                // Service groups, their names and addresses change no peer.
                MapChange::ServiceUpsert(_)
                | MapChange::ServiceRemove(_)
                | MapChange::GroupNames(..)
                | MapChange::AddressUpsert(_)
                | MapChange::AddressRemove(_) => {}
            }
        }
    }
}

/// How a simulated member joins ([`Sim::join_with`]).
#[derive(Debug, Clone)]
pub struct JoinSpec {
    /// The service name.
    pub service: String,
    /// The process type. Default `web`.
    pub process_type: String,
    /// The slot asked for (`--instance`). Default none.
    pub instance: Option<meshlib::ids::InstanceName>,
    /// Take the slot even while online (`--replace`). Default false.
    pub replace: bool,
    /// Join as an ephemeral member. Default false.
    pub ephemeral: bool,
}

impl Default for JoinSpec {
    fn default() -> Self {
        Self {
            service: "app".into(),
            process_type: "web".into(),
            instance: None,
            replace: false,
            ephemeral: false,
        }
    }
}

/// One simulated member.
#[derive(Debug)]
pub struct SimMember {
    /// Its name in traces (`m<id>`).
    pub name: String,
    /// The member core.
    pub core: MemberCore,
    /// The recording data plane.
    pub plane: Plane,
    /// Its private key (the current one).
    pub key: PrivateKey,
    /// Its public key (kept: deriving it is a scalar multiplication).
    public: PublicKey,
    /// A key made for a rotation under way.
    pub next_key: Option<PrivateKey>,
    /// Killed: not driven any more.
    pub dead: bool,
    /// Cut from the keyserver.
    pub partitioned: bool,
    /// Why its session ended, if it did.
    pub ended: Option<End>,
    /// Its current connection.
    conn: Option<u64>,
    /// Its one-way latency and loss (defaults from the config).
    latency: Duration,
    loss: f64,
    /// The underlay address the keyserver observes.
    observed: SocketAddr,
}

impl SimMember {
    /// The member's public key.
    pub fn public_key(&self) -> PublicKey {
        self.public
    }

    /// The member's current map.
    pub fn map(&self) -> &NetworkMap {
        self.core.map()
    }

    /// What a name resolves to for this member (its private DNS and hosts
    /// file answer from the online members only), as a sidecar whose
    /// `.warp` names give members (`service-addresses = members`, today's
    /// default); [`SimMember::resolve_service`] gives service addresses.
    pub fn resolve(&self, name: &str) -> Vec<Ipv4Addr> {
        let mut online = self.map().online();
        online.addresses.clear();
        let ist = IstTable::build(online.services(), &Overrides::default());
        match NameIndex::build(&online, &ist).lookup(name) {
            Lookup::Found(ips) => ips.to_vec(),
            _ => vec![],
        }
    }

    /// What a name resolves to for this member when `.warp` names give
    /// service addresses (`service-addresses = service`).
    pub fn resolve_service(&self, name: &str) -> Vec<Ipv4Addr> {
        let online = self.map().online();
        let ist = IstTable::build(online.services(), &Overrides::default());
        match NameIndex::build(&online, &ist).lookup(name) {
            Lookup::Found(ips) => ips.to_vec(),
            _ => vec![],
        }
    }
}

/// The keyserver's hook runner in the simulation: it runs nothing and
/// records every job it is given, in order (the real runner is tested in
/// the keyserver's own tests).
#[derive(Debug, Default)]
pub struct HookLog {
    jobs: std::sync::Mutex<Vec<HookJob>>,
}

impl HookLog {
    fn list(&self) -> std::sync::MutexGuard<'_, Vec<HookJob>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every job so far.
    pub fn jobs(&self) -> Vec<HookJob> {
        self.list().clone()
    }

    /// How many jobs of `kind` for `service` so far.
    pub fn count(&self, kind: HookKind, service: &str) -> usize {
        self.list()
            .iter()
            .filter(|j| j.kind == kind && j.service == service)
            .count()
    }
}

impl HookRunner for HookLog {
    fn run(&self, job: HookJob) {
        self.list().push(job);
    }
}

/// The keyserver side of a connection.
struct ServerSide {
    session: StreamSession,
    pushes: broadcast::Receiver<Push>,
}

/// One connection between a member and the keyserver.
struct Conn {
    member: MemberId,
    /// The keyserver replica it reached.
    replica: usize,
    server: Option<ServerSide>,
    /// The member side is open.
    member_open: bool,
    /// Last frame from the member (for the idle timeout).
    last_heard: Duration,
    /// Last delivery time scheduled in each direction (streams are ordered).
    last_up: Duration,
    last_down: Duration,
}

/// Something in flight.
#[derive(Debug)]
enum Delivery {
    /// The result of a connection attempt reaches the member.
    Connected { conn: u64, ok: bool },
    /// A frame reaches the keyserver.
    ToServer { conn: u64, frame: Frame },
    /// A message reaches the member.
    ToMember { conn: u64, msg: ServerMsg },
    /// The keyserver closed the connection; the member learns it.
    ServerClosed { conn: u64 },
    /// The member's QUIC connection gave a silent keyserver up (its idle
    /// timeout).
    Silent { conn: u64 },
}

/// A seeded RNG (splitmix64): small, deterministic, good enough for jitter.
#[derive(Debug, Clone)]
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub(crate) fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn bytes(&mut self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for chunk in out.chunks_mut(8) {
            chunk.copy_from_slice(&self.next().to_le_bytes());
        }
        out
    }

    fn below(&mut self, d: Duration) -> Duration {
        let n = d.as_micros() as u64;
        if n == 0 {
            Duration::ZERO
        } else {
            Duration::from_micros(self.next() % n)
        }
    }
}

/// The simulated world.
pub struct Sim {
    cfg: SimConfig,
    clock: Duration,
    base: Instant,
    rng: Rng,
    /// The keyserver's shared state (registry, store, push hubs): the
    /// first replica's.
    pub shared: Arc<Shared>,
    /// Every replica, and whether it runs.
    replicas: Vec<Arc<Shared>>,
    replica_up: Vec<bool>,
    members: Vec<SimMember>,
    conns: BTreeMap<u64, Conn>,
    next_conn: u64,
    queue: BinaryHeap<Reverse<(Duration, u64)>>,
    in_flight: HashMap<u64, Delivery>,
    seq: u64,
    next_sweep: Duration,
    trace: Vec<String>,
    /// Whether to record every event in the trace.
    pub tracing: bool,
    /// Pushes decoded once per pump (the same bytes go to every member).
    decoded: HashMap<usize, ServerMsg>,
    /// Members' next timeouts, ordered (kept in step with their cores).
    timers: BTreeSet<(Duration, MemberId)>,
    timer_of: Vec<Option<Duration>>,
    /// Members that got input since they were last drained.
    dirty: BTreeSet<MemberId>,
    /// The keyserver changed something since pushes were last drained.
    pushes_pending: bool,
    /// The hooks the keyserver ran.
    hooks: Arc<HookLog>,
}

impl Sim {
    /// A world with an empty keyserver.
    pub fn new(cfg: SimConfig) -> Self {
        let limits = Limits {
            change_log: cfg.change_log,
            push_buffer: cfg.push_buffer,
            // Every change is pushed alone (held pushes leave on the
            // keyserver's real-time flusher, which the virtual clock does
            // not drive).
            push_hold: Duration::ZERO,
            lifecycle: cfg.lifecycle,
            ..Limits::default()
        };
        let base_system = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let hooks = Arc::new(HookLog::default());
        let stores: Vec<Box<dyn keyserver::store::Store>> = match cfg.replicas {
            0 | 1 => vec![Box::new(MemStore::new())],
            n => SharedMemStore::replicas(n)
                .into_iter()
                .map(|s| Box::new(s) as Box<dyn keyserver::store::Store>)
                .collect(),
        };
        let replicas: Vec<Arc<Shared>> = stores
            .into_iter()
            .map(|store| {
                let (shared, _) = Shared::new(store, limits.clone(), [7; 32], base_system)
                    .expect("an empty memory store loads");
                shared.set_hook_runner(hooks.clone());
                Arc::new(shared)
            })
            .collect();
        Self {
            shared: replicas[0].clone(),
            replica_up: vec![true; replicas.len()],
            replicas,
            hooks,
            rng: Rng(cfg.seed),
            next_sweep: cfg.sweep_interval,
            cfg,
            clock: Duration::ZERO,
            base: Instant::now(),
            members: Vec::new(),
            conns: BTreeMap::new(),
            next_conn: 1,
            queue: BinaryHeap::new(),
            in_flight: HashMap::new(),
            seq: 0,
            trace: Vec::new(),
            tracing: true,
            decoded: HashMap::new(),
            timers: BTreeSet::new(),
            timer_of: Vec::new(),
            dirty: BTreeSet::new(),
            pushes_pending: false,
        }
    }

    /// Virtual time since the start.
    pub fn elapsed(&self) -> Duration {
        self.clock
    }

    fn instant(&self) -> Instant {
        self.base + self.clock
    }

    /// The keyserver's wall clock.
    pub fn system_now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000) + self.clock
    }

    /// Every event so far, as `<ms> <member> <event>` lines.
    pub fn trace(&self) -> &[String] {
        &self.trace
    }

    /// A member.
    pub fn member(&self, id: MemberId) -> &SimMember {
        &self.members[id]
    }

    /// How many members were added.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether no member was added.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    fn log(&mut self, who: &str, what: String) {
        if self.tracing {
            self.trace.push(format!(
                "{:>9.3} {who} {what}",
                self.clock.as_secs_f64() * 1e3
            ));
        }
    }

    // ---- the keyserver's admin side ------------------------------------

    /// Creates a network.
    pub fn create_network(&mut self, name: &str) -> NetworkId {
        let now = self.system_now();
        let (rec, ()) = self
            .admin()
            .mutate(
                |r| {
                    r.create_network(name, meshlib::ipam::DEFAULT_RANGE, now)
                        .map(|(n, ops)| (n, ops, vec![]))
                },
                |_, _, _| (),
            )
            .expect("network created");
        rec.id
    }

    /// A join token for `network` with `uses` uses, valid a day.
    pub fn token(&mut self, network: NetworkId, uses: u32) -> JoinToken {
        let secret = self.rng.bytes();
        let now = self.system_now();
        self.admin()
            .mutate(
                |r| {
                    r.create_token(
                        network,
                        &secret,
                        uses,
                        Duration::from_secs(86400),
                        None,
                        None,
                        now,
                    )
                    .map(|(t, ops)| (t, ops, vec![]))
                },
                |_, _, _| (),
            )
            .expect("token created");
        JoinToken {
            addrs: (0..self.replicas.len()).map(replica_addr).collect(),
            cert_sha256: [7; 32],
            network,
            secret,
            service: None,
            process_type: None,
        }
    }

    /// The replica admin calls and the lifecycle sweep go to: the first
    /// one running, caught up with the shared store.
    fn admin(&self) -> Arc<Shared> {
        let i = self.replica_up.iter().position(|up| *up).unwrap_or(0);
        let r = self.replicas[i].clone();
        if self.replicas.len() > 1 {
            r.sync();
        }
        r
    }

    /// Keyserver replica `i` (see [`SimConfig::replicas`]).
    pub fn replica(&self, i: usize) -> &Arc<Shared> {
        &self.replicas[i]
    }

    /// The replica member `id` is connected to and has a session on, if any.
    pub fn replica_of(&self, id: MemberId) -> Option<usize> {
        let conn = self.members[id].conn?;
        let c = self.conns.get(&conn)?;
        c.server.as_ref().map(|_| c.replica)
    }

    /// Replica `i` dies without a word (a crash, a lost host): its sessions
    /// end, nothing reaches its members, connection attempts to it time
    /// out. Its members notice through their heartbeats and connect to
    /// another replica of their list; what they committed is in the shared
    /// store.
    pub fn kill_replica(&mut self, i: usize) {
        self.replica_up[i] = false;
        let mut silent = Vec::new();
        for (id, c) in self.conns.iter_mut() {
            if c.replica == i {
                c.server = None;
                if c.member_open {
                    silent.push(*id);
                }
            }
        }
        let at = self.clock + self.cfg.client_idle_timeout;
        for conn in silent {
            self.schedule(at, Delivery::Silent { conn });
        }
        self.log("keyserver", format!("replica {i} killed"));
    }

    /// A join token like [`Sim::token`] whose address list starts at
    /// replica `first` (members using it connect there first).
    pub fn token_at(&mut self, network: NetworkId, uses: u32, first: usize) -> JoinToken {
        let mut token = self.token(network, uses);
        let turn = first % token.addrs.len().max(1);
        token.addrs.rotate_left(turn);
        token
    }

    /// Removes a member at the keyserver (revocation).
    pub fn remove_member(&mut self, id: MemberId) {
        let (net, key) = (
            self.members[id].map().network,
            self.members[id].public_key(),
        );
        let now = self.system_now();
        let _ = self.admin().mutate(
            |r| {
                r.remove_member(net, &key.to_string(), now)
                    .map(|(c, ops)| ((), ops, vec![c]))
            },
            |_, _, _| (),
        );
        self.pushes_pending = true;
        self.pump();
    }

    /// Sets a network's `expire-after`.
    pub fn set_expire_after(&mut self, network: NetworkId, d: Duration) {
        let _ = self.admin().mutate(
            |r| {
                r.set_expire_after(network, Some(d))
                    .map(|ops| ((), ops, vec![]))
            },
            |_, _, _| (),
        );
    }

    /// Changes a service address's scale-to-zero settings (as
    /// `PATCH …/addresses/{service}`); a pushed change reaches members.
    pub fn set_address(
        &mut self,
        network: NetworkId,
        service: &str,
        settings: &AddressSettings,
    ) -> Result<AddressInfo, AdminError> {
        let now = self.system_now();
        let result = self.admin().mutate(
            |r| r.set_address(network, service, settings, now),
            |_, _, _| (),
        );
        self.pushes_pending = true;
        self.pump();
        match result {
            Ok((info, ())) => Ok(info),
            Err(keyserver::server::OpError::Refused(e)) => Err(e),
            Err(keyserver::server::OpError::Store(e)) => panic!("memory store: {e}"),
        }
    }

    /// A service address as the admin API shows it now.
    pub fn address(&self, network: NetworkId, service: &str) -> Option<AddressInfo> {
        let now = self.system_now();
        self.admin()
            .addresses(network, now)
            .ok()?
            .into_iter()
            .find(|a| a.record.address.service == service)
    }

    /// The hooks the keyserver ran so far (its runner only records them).
    pub fn hooks(&self) -> &HookLog {
        &self.hooks
    }

    // ---- the data plane's requests -----------------------------------------

    /// A member's data plane holds a flow to `service` and asks to wake it
    /// ([`MemberCore::wake`]).
    pub fn wake(
        &mut self,
        id: MemberId,
        service: &str,
    ) -> Result<bool, meshlib::member::RequestError> {
        let now = self.instant();
        let r = self.members[id].core.wake(now, service);
        self.log(&format!("m{id}"), format!("wake {service} -> {r:?}"));
        self.dirty.insert(id);
        self.pump();
        r
    }

    /// A member's data plane hands over its traffic counters
    /// ([`MemberCore::report_traffic`]).
    pub fn report_traffic(
        &mut self,
        id: MemberId,
        report: meshlib::traffic::TrafficReport,
    ) -> Result<(), meshlib::member::RequestError> {
        let now = self.instant();
        let r = self.members[id].core.report_traffic(now, report);
        self.dirty.insert(id);
        self.pump();
        r
    }

    // ---- members ---------------------------------------------------------

    /// Fills `network` with `count` members that joined before the
    /// simulation started (as after a keyserver restart): the registry holds
    /// them, each has its membership and the current map cached, and starts
    /// by resuming. Member `i` offers `service(i)` (type `web`). Call before
    /// anything connects; builds in O(count) instead of the O(count²)
    /// deliveries of one-by-one joins.
    pub fn populate(
        &mut self,
        network: NetworkId,
        count: usize,
        service: impl Fn(usize) -> String,
    ) -> Vec<MemberId> {
        use keyserver::registry::{MemberRecord, Records};
        use meshlib::netmap::{Member, MemberState};
        assert!(self.conns.is_empty(), "populate before anything connects");
        let mut records = Records {
            networks: self.admin().read(|r| r.networks()),
            ..Records::default()
        };
        let net = records
            .networks
            .iter_mut()
            .find(|n| n.id == network)
            .expect("a network of this sim");
        let range = net.range;
        let mut index: HashMap<String, u32> = HashMap::new();
        let mut keys = Vec::with_capacity(count);
        for i in 0..count {
            let key = PrivateKey::from_bytes(self.rng.bytes());
            let public = key.public_key();
            let credential = self.rng.bytes();
            let svc = service(i);
            let label = meshlib::ist::hostname_label(&svc).expect("a plain service name");
            let n = index.entry(svc.clone()).or_insert(0);
            *n += 1;
            let ip = Ipv4Addr::from(u32::from(range.network()) + 1 + i as u32);
            records.members.push(MemberRecord {
                network,
                member: Member {
                    public_key: public,
                    ip,
                    endpoints: vec![endpoint_of(self.members.len() + i)],
                    service: svc,
                    app_id: label.parse().expect("a label"),
                    process_type: ProcessType::default(),
                    index: *n,
                    instance: format!("{label}-web-{n}").parse().expect("a label"),
                    runner: format!("runner-{}", i % 7),
                    ports: vec![],
                    state: MemberState::Online,
                },
                credential_hash: proto::sha256(&credential),
                joined: 1_800_000_000,
                last_seen: 1_800_000_000,
                offline_since: None,
                previous_keys: vec![],
                token_hash: None,
                credential_used: true,
                ephemeral: false,
            });
            keys.push((key, public, credential));
        }
        net.generation += count as u64;
        assert_eq!(self.replicas.len(), 1, "populate runs with one replica");
        let limits = self.shared.limits.clone();
        let (shared, warnings) = Shared::new(
            Box::new(MemStore::with(records)),
            limits,
            [7; 32],
            self.system_now(),
        )
        .expect("memory store loads");
        assert!(warnings.is_empty(), "{warnings:?}");
        shared.set_hook_runner(self.hooks.clone());
        self.shared = Arc::new(shared);
        self.replicas = vec![self.shared.clone()];
        let map = self
            .shared
            .read(|r| r.snapshot(network))
            .expect("the network");
        let mut ids = Vec::with_capacity(count);
        for (key, public, credential) in keys {
            let id = self.members.len();
            let membership = meshlib::member::Membership {
                addrs: vec!["192.0.2.1:7443".parse().expect("literal")],
                cert_sha256: [7; 32],
                network,
                public_key: public,
                credential,
            };
            let core = MemberCore::resume(
                self.cfg.member.clone(),
                membership,
                map.clone(),
                vec![endpoint_of(id)],
                vec![],
                self.instant(),
            );
            let mut plane = Plane::default();
            plane.reset(&map, &public);
            self.add(core, plane, key);
            ids.push(id);
        }
        self.pump();
        ids
    }

    /// Adds a member that joins with `token` as `service` / `ptype`.
    pub fn join(&mut self, token: &JoinToken, service: &str, ptype: &str) -> MemberId {
        self.join_with(
            token,
            &JoinSpec {
                service: service.into(),
                process_type: ptype.into(),
                ..JoinSpec::default()
            },
        )
    }

    /// Adds a member that joins with `token` as `spec` says (a fresh key:
    /// a stateless start).
    pub fn join_with(&mut self, token: &JoinToken, spec: &JoinSpec) -> MemberId {
        let id = self.members.len();
        let key = PrivateKey::from_bytes(self.rng.bytes());
        let public = key.public_key();
        let meta = MemberMeta {
            public_key: public,
            service: spec.service.clone(),
            app_id: None,
            process_type: spec
                .process_type
                .parse::<ProcessType>()
                .expect("a valid process type"),
            instance: spec.instance.clone(),
            runner: format!("runner-{}", id % 7),
            endpoints: vec![endpoint_of(id)],
            ports: vec![],
            replace: spec.replace,
            ephemeral: spec.ephemeral,
        };
        let core = MemberCore::join(self.cfg.member.clone(), token.clone(), meta, self.instant());
        self.add(core, Plane::default(), key);
        self.pump();
        id
    }

    /// Adds a member with its core, plane and key; it is driven from the
    /// next pump.
    fn add(&mut self, core: MemberCore, plane: Plane, key: PrivateKey) -> MemberId {
        let id = self.members.len();
        self.members.push(SimMember {
            name: format!("m{id}"),
            core,
            plane,
            public: key.public_key(),
            key,
            next_key: None,
            dead: false,
            partitioned: false,
            ended: None,
            conn: None,
            latency: self.cfg.latency,
            loss: self.cfg.loss,
            observed: SocketAddr::new(endpoint_of(id).ip(), 40000),
        });
        self.dirty.insert(id);
        id
    }

    /// Kills a member (`kill -9`): it stops without a word.
    pub fn kill(&mut self, id: MemberId) {
        let m = &mut self.members[id];
        m.dead = true;
        if let Some(c) = m.conn.take() {
            if let Some(conn) = self.conns.get_mut(&c) {
                conn.member_open = false;
            }
        }
        self.retime(id);
        self.log(&format!("m{id}"), "killed".into());
    }

    /// Restarts a killed member from what it kept on disk: its key, its
    /// membership and its last map.
    pub fn restart(&mut self, id: MemberId) {
        let m = &self.members[id];
        let membership = m.core.membership().cloned().expect("it had joined");
        let map = m.map().clone();
        let core = MemberCore::resume(
            self.cfg.member.clone(),
            membership,
            map,
            vec![endpoint_of(id)],
            vec![],
            self.instant(),
        );
        let m = &mut self.members[id];
        m.core = core;
        m.dead = false;
        m.ended = None;
        self.log(&format!("m{id}"), "restarted".into());
        self.dirty.insert(id);
        self.pump();
    }

    /// Stops a member gracefully (`sidecar up` on SIGTERM).
    pub fn stop(&mut self, id: MemberId) {
        let now = self.instant();
        self.members[id].core.shutdown(now);
        self.dirty.insert(id);
        self.pump();
    }

    /// `sidecar leave`.
    pub fn leave(&mut self, id: MemberId) {
        let now = self.instant();
        let _ = self.members[id].core.leave(now);
        self.dirty.insert(id);
        self.pump();
    }

    /// Starts a key rotation with a fresh key; returns the new public key.
    pub fn rotate(&mut self, id: MemberId) -> PublicKey {
        let key = PrivateKey::from_bytes(self.rng.bytes());
        let public = key.public_key();
        let now = self.instant();
        let m = &mut self.members[id];
        m.core.rotate_key(now, public).expect("rotation accepted");
        m.next_key = Some(key);
        self.dirty.insert(id);
        self.pump();
        public
    }

    /// Cuts a member from the keyserver, or heals the cut.
    pub fn partition(&mut self, id: MemberId, cut: bool) {
        self.members[id].partitioned = cut;
        self.log(&format!("m{id}"), format!("partition {cut}"));
    }

    /// Sets one member's link latency and loss.
    pub fn set_link(&mut self, id: MemberId, latency: Duration, loss: f64) {
        self.members[id].latency = latency;
        self.members[id].loss = loss;
    }

    // ---- time --------------------------------------------------------------

    /// The next instant something happens, if anything will.
    fn next_time(&self) -> Option<Duration> {
        let queued = self.queue.peek().map(|Reverse((t, _))| *t);
        let timer = self.timers.first().map(|(t, _)| *t);
        [queued, timer, Some(self.next_sweep)]
            .into_iter()
            .flatten()
            .min()
    }

    /// Re-reads a member's timeout after its core changed.
    fn retime(&mut self, id: MemberId) {
        if self.timer_of.len() <= id {
            self.timer_of.resize(id + 1, None);
        }
        if let Some(old) = self.timer_of[id].take() {
            self.timers.remove(&(old, id));
        }
        let m = &self.members[id];
        if m.dead {
            return;
        }
        if let Some(t) = m.core.poll_timeout() {
            let t = t.saturating_duration_since(self.base);
            self.timers.insert((t, id));
            self.timer_of[id] = Some(t);
        }
    }

    /// Jumps to the next thing that happens and handles everything due
    /// then. False when nothing will ever happen again.
    pub fn step(&mut self) -> bool {
        let Some(t) = self.next_time() else {
            return false;
        };
        self.clock = self.clock.max(t);
        while let Some(Reverse((at, seq))) = self.queue.peek().copied() {
            if at > self.clock {
                break;
            }
            self.queue.pop();
            if let Some(d) = self.in_flight.remove(&seq) {
                self.deliver(d);
            }
        }
        let now = self.instant();
        while let Some(&(t, id)) = self.timers.first() {
            if t > self.clock {
                break;
            }
            self.timers.remove(&(t, id));
            self.timer_of[id] = None;
            let m = &mut self.members[id];
            if !m.dead {
                m.core.handle_timeout(now);
                self.dirty.insert(id);
            }
        }
        if self.clock >= self.next_sweep {
            self.next_sweep = self.clock + self.cfg.sweep_interval;
            // One replica sweeps (the replicas' presence is shared, as
            // through etcd): the first one running.
            if self.admin().sweep(self.system_now()).unwrap_or(0) > 0 {
                self.pushes_pending = true;
            }
            // QUIC idle timeouts, to the sweep's precision.
            self.expire_idle();
        }
        self.pump();
        true
    }

    /// Runs for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        let end = self.clock + d;
        while self.next_time().is_some_and(|t| t <= end) {
            self.step();
        }
        self.clock = self.clock.max(end);
    }

    /// Runs until `done` holds (checked after every step), at most `limit`
    /// of virtual time. The time it took, or `None`.
    pub fn run_until(&mut self, limit: Duration, done: impl Fn(&Sim) -> bool) -> Option<Duration> {
        let start = self.clock;
        let end = start + limit;
        loop {
            if done(self) {
                return Some(self.clock - start);
            }
            match self.next_time() {
                Some(t) if t <= end => {
                    self.step();
                }
                _ => return None,
            }
        }
    }

    // ---- the machinery -----------------------------------------------------

    fn schedule(&mut self, at: Duration, d: Delivery) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq)));
        self.in_flight.insert(self.seq, d);
    }

    /// The one-way delay of a frame on `member`'s link.
    fn delay(&mut self, member: MemberId) -> Duration {
        let (latency, loss) = (self.members[member].latency, self.members[member].loss);
        let mut d = latency + self.rng.below(self.cfg.jitter);
        while loss > 0.0 && self.rng.unit() < loss {
            d += self.cfg.rto;
        }
        d
    }

    /// Schedules `d` on `conn` after the link's delay, in order with what
    /// went the same way before (`up`: towards the keyserver). Nothing
    /// crosses a partition.
    fn send_on(&mut self, conn: u64, up: bool, d: Delivery) {
        let Some(member) = self.conns.get(&conn).map(|c| c.member) else {
            return;
        };
        if self.members[member].partitioned {
            return;
        }
        let at = self.clock + self.delay(member);
        let c = self.conns.get_mut(&conn).expect("checked");
        let last = if up { &mut c.last_up } else { &mut c.last_down };
        let at = at.max(*last);
        *last = at;
        self.schedule(at, d);
    }

    fn up(&mut self, conn: u64, frame: Frame) {
        self.send_on(conn, true, Delivery::ToServer { conn, frame });
    }

    fn down(&mut self, conn: u64, d: Delivery) {
        self.send_on(conn, false, d);
    }

    fn deliver(&mut self, d: Delivery) {
        let now = self.instant();
        match d {
            Delivery::Connected { conn, ok } => {
                let Some(c) = self.conns.get(&conn) else {
                    return;
                };
                self.dirty.insert(c.member);
                let m = &mut self.members[c.member];
                if m.dead || m.conn != Some(conn) {
                    return;
                }
                if ok {
                    m.core.handle_connected(now);
                } else {
                    m.conn = None;
                    m.core
                        .handle_connect_failed(now, "connection timed out".into());
                }
            }
            Delivery::ToServer { conn, frame } => self.at_server(conn, frame),
            Delivery::ToMember { conn, msg } => {
                let Some(c) = self.conns.get(&conn) else {
                    return;
                };
                self.dirty.insert(c.member);
                let m = &mut self.members[c.member];
                if !m.dead && c.member_open && m.conn == Some(conn) {
                    m.core.handle_message(now, msg);
                }
            }
            Delivery::Silent { conn } => {
                let Some(c) = self.conns.remove(&conn) else {
                    return;
                };
                self.dirty.insert(c.member);
                let m = &mut self.members[c.member];
                if !m.dead && m.conn == Some(conn) {
                    m.conn = None;
                    m.core.handle_disconnected(
                        now,
                        "the keyserver went silent (QUIC idle timeout)".into(),
                    );
                }
            }
            Delivery::ServerClosed { conn } => {
                let Some(c) = self.conns.remove(&conn) else {
                    return;
                };
                self.dirty.insert(c.member);
                let m = &mut self.members[c.member];
                if !m.dead && m.conn == Some(conn) {
                    m.conn = None;
                    m.core
                        .handle_disconnected(now, "the keyserver closed the connection".into());
                }
            }
        }
    }

    /// A frame at the keyserver: the hello opens a session, anything else
    /// goes to it.
    fn at_server(&mut self, conn: u64, frame: Frame) {
        let now = self.system_now();
        let clock = self.clock;
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if !self.replica_up[c.replica] {
            // A replica that died hears nothing.
            return;
        }
        c.last_heard = clock;
        self.pushes_pending = true;
        let shared = self.replicas[c.replica].clone();
        // What the other replicas wrote first, as a replica following the
        // shared store does.
        shared.sync();
        let observed = self.members[c.member].observed;
        if let (Frame::Msg(ClientMsg::Heartbeat), Some(side)) = (&frame, c.server.as_ref()) {
            // Presence is shared by the replicas (leases in etcd).
            let (net, key) = (side.session.network(), side.session.key());
            for (r, up) in self.replicas.iter().zip(&self.replica_up) {
                if *up && !Arc::ptr_eq(r, &shared) {
                    r.heartbeat(net, &key, now);
                }
            }
        }
        let result = match (frame, c.server.as_mut()) {
            (Frame::Hello(hello), None) => {
                let credential = self.rng.bytes();
                match StreamSession::open(&shared, hello, observed, credential, now) {
                    Ok((session, replies, pushes)) => {
                        let c = self.conns.get_mut(&conn).expect("present");
                        c.server = Some(ServerSide { session, pushes });
                        Ok((replies, Next::Continue))
                    }
                    Err(f) => Err(f),
                }
            }
            (Frame::Msg(msg), Some(side)) => side.session.on_client(&shared, msg, observed, now),
            // A frame out of order (no session yet, or a second hello).
            _ => Err(keyserver::session::Fatal(
                proto::ErrorCode::Malformed,
                "unexpected frame".into(),
            )),
        };
        match result {
            Ok((replies, next)) => {
                self.send_replies(conn, replies);
                if next == Next::Close {
                    self.server_close(conn);
                }
            }
            Err(fatal) => {
                self.down(
                    conn,
                    Delivery::ToMember {
                        conn,
                        msg: fatal.frame(),
                    },
                );
                self.server_close(conn);
            }
        }
    }

    fn send_replies(&mut self, conn: u64, replies: Vec<Reply>) {
        for r in replies {
            let msg = match r {
                Reply::Msg(m) => m,
                Reply::Frame(f) => {
                    let key = Arc::as_ptr(&f) as *const u8 as usize;
                    if let Some(m) = self.decoded.get(&key) {
                        m.clone()
                    } else {
                        let Ok(m) = proto::decode_payload::<ServerMsg>(&f[4..]) else {
                            continue;
                        };
                        self.decoded.insert(key, m.clone());
                        m
                    }
                }
            };
            self.down(conn, Delivery::ToMember { conn, msg });
        }
    }

    fn server_close(&mut self, conn: u64) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.server = None;
        }
        self.down(conn, Delivery::ServerClosed { conn });
    }

    /// The keyserver drops connections silent for the idle timeout.
    fn expire_idle(&mut self) {
        let idle = self.cfg.idle_timeout;
        let clock = self.clock;
        let stale: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.server.is_some() && clock >= c.last_heard + idle)
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            if let Some(c) = self.conns.get_mut(&id) {
                c.server = None;
                if !c.member_open {
                    self.conns.remove(&id);
                }
            }
        }
    }

    /// Moves everything until nothing is left to move at this instant:
    /// members' transmits and events, the keyserver's pushes.
    fn pump(&mut self) {
        self.decoded.clear();
        for _ in 0..100_000 {
            let mut moved = false;
            while let Some(id) = self.dirty.pop_first() {
                moved |= self.drain_member(id);
                self.retime(id);
            }
            if std::mem::take(&mut self.pushes_pending) {
                moved |= self.drain_pushes();
            }
            if !moved && self.dirty.is_empty() && !self.pushes_pending {
                return;
            }
        }
    }

    fn drain_member(&mut self, id: MemberId) -> bool {
        if self.members[id].dead {
            return false;
        }
        let mut moved = false;
        while let Some(t) = self.members[id].core.poll_transmit() {
            moved = true;
            self.transmit(id, t);
        }
        while let Some(ev) = self.members[id].core.poll_event() {
            moved = true;
            self.on_event(id, ev);
        }
        moved
    }

    fn transmit(&mut self, id: MemberId, t: Transmit) {
        match t {
            Transmit::Connect { addrs, .. } => {
                // The replica at the first address (a connection is made
                // to one address at a time; the core rotates its list
                // after a failure).
                let replica = addrs
                    .first()
                    .and_then(|a| (0..self.replicas.len()).find(|i| replica_addr(*i) == *a))
                    .unwrap_or(0);
                let conn = self.next_conn;
                self.next_conn += 1;
                if let Some(old) = self.members[id].conn.replace(conn) {
                    if let Some(c) = self.conns.get_mut(&old) {
                        c.member_open = false;
                    }
                }
                self.conns.insert(
                    conn,
                    Conn {
                        member: id,
                        replica,
                        server: None,
                        member_open: true,
                        last_heard: self.clock,
                        last_up: self.clock,
                        last_down: self.clock,
                    },
                );
                if self.members[id].partitioned || !self.replica_up[replica] {
                    let at = self.clock + self.cfg.member.connect_timeout;
                    self.schedule(at, Delivery::Connected { conn, ok: false });
                } else {
                    let rtt = self.delay(id) + self.delay(id);
                    self.schedule(self.clock + rtt, Delivery::Connected { conn, ok: true });
                }
            }
            Transmit::Send(frame) => {
                if let Some(conn) = self.members[id].conn {
                    self.up(conn, frame);
                }
            }
            Transmit::Close => {
                if let Some(conn) = self.members[id].conn.take() {
                    // The keyserver's side ends too (a QUIC close arrives).
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.member_open = false;
                        if !self.members[id].partitioned {
                            c.server = None;
                        }
                    }
                }
            }
        }
    }

    fn on_event(&mut self, id: MemberId, ev: Event) {
        let who = self.members[id].name.clone();
        let m = &mut self.members[id];
        let own = m.public;
        let what = match &ev {
            Event::Snapshot => {
                m.plane.reset(m.core.map(), &own);
                format!(
                    "snapshot g{} peers={}",
                    m.core.map().generation,
                    m.plane.peers.len()
                )
            }
            Event::Delta(d) => {
                m.plane.apply(&d.changes, &own);
                format!("delta g{}..g{} peers={}", d.from, d.to, m.plane.peers.len())
            }
            Event::KeyRotated { .. } => {
                if let Some(k) = m.next_key.take() {
                    m.public = k.public_key();
                    m.key = k;
                }
                m.core.key_renewed(self.base + self.clock);
                let own = m.public;
                m.plane.reset(m.core.map(), &own);
                "key rotated".to_owned()
            }
            Event::RotationFailed(e) => {
                m.next_key = None;
                format!("rotation failed {:?}", e.code)
            }
            Event::Ended(end) => {
                m.ended = Some(end.clone());
                format!("ended {end:?}")
            }
            Event::Welcomed(w) => format!("welcome {} idx {} g{}", w.ip, w.index, w.generation),
            Event::Joined(_) => "joined".to_owned(),
            Event::Connection(c) => format!("connection {c:?}"),
            Event::CaughtUp { generation } => format!("caught up g{generation}"),
            Event::HeartbeatAck { generation } => format!("ack g{generation}"),
            Event::RotationDue => {
                // As the sidecar does: a fresh key, then the rotation.
                let key = PrivateKey::from_bytes(self.rng.bytes());
                let now = self.instant();
                let m = &mut self.members[id];
                if m.core.rotate_key(now, key.public_key()).is_ok() {
                    m.next_key = Some(key);
                }
                "rotation due".to_owned()
            }
            Event::Rejected(e) => format!("rejected {:?}", e.code),
            Event::Relay(info) => format!("relay {:?}", info.relay),
        };
        self.log(&who, what);
    }

    fn drain_pushes(&mut self) -> bool {
        let mut moved = false;
        if self.replicas.len() > 1 {
            // Each running replica pushes what the others committed.
            for (r, up) in self.replicas.iter().zip(&self.replica_up) {
                if *up {
                    r.sync();
                }
            }
        }
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for conn in ids {
            let Some(shared) = self
                .conns
                .get(&conn)
                .map(|c| self.replicas[c.replica].clone())
            else {
                continue;
            };
            while let Some(side) = self.conns.get_mut(&conn).and_then(|c| c.server.as_mut()) {
                let push = match side.pushes.try_recv() {
                    Ok(p) => Ok(p),
                    Err(broadcast::error::TryRecvError::Empty) => break,
                    Err(broadcast::error::TryRecvError::Lagged(n)) => {
                        Err(broadcast::error::RecvError::Lagged(n))
                    }
                    Err(broadcast::error::TryRecvError::Closed) => {
                        Err(broadcast::error::RecvError::Closed)
                    }
                };
                moved = true;
                match side.session.on_push(&shared, push) {
                    Ok(replies) => self.send_replies(conn, replies),
                    Err(fatal) => {
                        self.down(
                            conn,
                            Delivery::ToMember {
                                conn,
                                msg: fatal.frame(),
                            },
                        );
                        self.server_close(conn);
                        break;
                    }
                }
            }
        }
        moved
    }
}

/// The address of keyserver replica `i` in members' tokens (a label: the
/// simulation has no sockets).
pub fn replica_addr(i: usize) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, 1], 7443 + i as u16))
}

/// The underlay endpoint of member `id`: a documentation address (nothing
/// is ever sent to it; the simulation has no sockets).
fn endpoint_of(id: MemberId) -> SocketAddr {
    let ip = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, id as u16 + 1);
    SocketAddr::new(ip.into(), 51820)
}
