//! The gateway's view of the service groups of its networks (one, with a
//! join token; every network of its credential's scope, with a gateway
//! credential): which group a connection is for (port, then `Host` or TLS
//! SNI, which are unique across networks), each group's balancer
//! ([`super::balance::Pool`]) with its waiters, slots that free themselves,
//! dials with retries over the instances, and the wake hook.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddrV4};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshlib::ids::NetworkId;
use meshlib::netmap::NetworkMap;
use meshlib::services::{GroupName, PortMode, Protocol, PublishedPort, ServiceGroup, WakeHook};
use parking_lot::{Mutex, RwLock};
use tokio::sync::oneshot;

use super::balance::{Admit, Pick, Pool};
use super::member::{is_local_exhaustion, Dialer, MeshStream};
use super::metrics::{Counters, GatewayStats, GroupGauges, GroupStats};

/// Timeouts and switches the routes need (from the gateway config).
#[derive(Debug, Clone)]
pub struct RouteSettings {
    /// Longest wait in a group's queue.
    pub queue_timeout: Duration,
    /// Percent of a group's slots one client address may hold (100: no
    /// share).
    pub client_share: u8,
    /// Time allowed to open a connection to an instance.
    pub connect_timeout: Duration,
    /// Whether command wake hooks may run.
    pub allow_wake_commands: bool,
}

/// The balancer and its waiters, under one lock.
struct Inner {
    pool: Pool,
    waiters: HashMap<u64, oneshot::Sender<Pick>>,
}

/// One service group at run time.
pub struct GroupRt {
    /// Its network.
    pub network: NetworkId,
    /// Its network's name (logs, metrics).
    pub network_name: String,
    /// How its network's instances are reached.
    dialer: RwLock<Arc<dyn Dialer>>,
    group: RwLock<ServiceGroup>,
    /// Every name it answers to: its FQDN, then its own names.
    names: RwLock<Vec<String>>,
    inner: Mutex<Inner>,
    /// Its counters.
    pub stats: Arc<GroupStats>,
    /// A wake hook is running.
    waking: Mutex<bool>,
    /// Slots held per client address.
    clients: Mutex<HashMap<IpAddr, u32>>,
    /// A client's slot was freed.
    client_freed: tokio::sync::Notify,
}

/// A taken connection slot on one instance; freed on drop.
pub struct Slot {
    rt: Arc<GroupRt>,
    pick: Option<Pick>,
    /// The client address whose share this slot counts in.
    client: Option<IpAddr>,
    /// The instance's counters.
    pub counters: Arc<Counters>,
}

impl Slot {
    /// The instance.
    pub fn pick(&self) -> &Pick {
        self.pick.as_ref().expect("a live slot has its pick")
    }

    /// The dial to this instance failed (`error`): skip it for a while;
    /// unless it came online a moment ago ([`meshlib::balance::FRESH`]):
    /// then the slot is only released, and the caller pauses
    /// ([`FRESH_RETRY`]) before it tries again. Returns whether it was fresh.
    pub fn fail(mut self, error: &std::io::Error) -> bool {
        if let Some(p) = self.pick.take() {
            let mut inner = self.rt.inner.lock();
            let now = Instant::now();
            if inner.pool.is_fresh(&p.instance, now) {
                let out = inner.pool.release(&p.instance, now);
                self.rt.hand_out(&mut inner, out);
                drop(inner);
                tracing::info!(
                    group = %self.rt.group.read().name,
                    instance = %p.instance,
                    %error,
                    "a dial to an instance that just came online failed: trying again"
                );
                return true;
            }
            let out = inner.pool.failed(&p.instance, Instant::now());
            self.rt.hand_out(&mut inner, out);
            drop(inner);
            tracing::warn!(
                group = %self.rt.group.read().name,
                instance = %p.instance,
                %error,
                "instance marked down after a failed dial (retried after a backoff or a good health check)"
            );
        }
        false
    }
}

/// Pause before another dial after a fresh instance's failed one.
pub const FRESH_RETRY: Duration = Duration::from_millis(300);

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(p) = self.pick.take() {
            let mut inner = self.rt.inner.lock();
            let out = inner.pool.release(&p.instance, Instant::now());
            self.rt.hand_out(&mut inner, out);
        }
        if let Some(client) = self.client.take() {
            self.rt.leave_share(client);
        }
    }
}

impl GroupRt {
    fn new(
        network: NetworkId,
        network_name: String,
        dialer: Arc<dyn Dialer>,
        group: ServiceGroup,
    ) -> Self {
        Self {
            network,
            network_name,
            names: RwLock::new(vec![group.fqdn.clone()]),
            dialer: RwLock::new(dialer),
            inner: Mutex::new(Inner {
                pool: Pool::new(group.limits),
                waiters: HashMap::new(),
            }),
            group: RwLock::new(group),
            stats: Arc::default(),
            waking: Mutex::new(false),
            clients: Mutex::new(HashMap::new()),
            client_freed: tokio::sync::Notify::new(),
        }
    }

    /// How this group's instances are reached (its network's membership).
    pub fn dialer(&self) -> Arc<dyn Dialer> {
        self.dialer.read().clone()
    }

    /// The group's name.
    pub fn group_name(&self) -> String {
        self.group.read().name.to_string()
    }

    /// The group's definition now.
    pub fn group(&self) -> ServiceGroup {
        self.group.read().clone()
    }

    /// Whether the group answers to `host` (a bare name, any case): its
    /// FQDN or one of its own names.
    pub fn answers(&self, host: &str) -> bool {
        self.names
            .read()
            .iter()
            .any(|n| n.len() == host.len() && n.eq_ignore_ascii_case(host))
    }

    /// Gives dispatched slots to their waiters; a waiter that is gone gives
    /// its slot back (which may dispatch another).
    fn hand_out(&self, inner: &mut Inner, mut out: Vec<(u64, Pick)>) {
        while let Some((id, pick)) = out.pop() {
            let gone = match inner.waiters.remove(&id) {
                Some(tx) => tx.send(pick).err(),
                None => Some(pick),
            };
            if let Some(p) = gone {
                out.extend(inner.pool.release(&p.instance, Instant::now()));
            }
        }
    }

    /// The most slots one client address may hold now: `share` percent of
    /// `hard_limit` per online instance (at least one instance counted, so
    /// a group waking from zero is not shut to its first client), at least 1.
    fn client_limit(&self, share: u8) -> u32 {
        let inner = self.inner.lock();
        let capacity =
            u32::from(inner.pool.limits().hard_limit) * (inner.pool.online().max(1) as u32);
        (capacity * u32::from(share) / 100).max(1)
    }

    /// Counts a slot for `client` if its share has room.
    fn enter_share(&self, client: IpAddr, limit: u32) -> bool {
        let mut clients = self.clients.lock();
        let held = clients.entry(client).or_insert(0);
        if *held >= limit {
            return false;
        }
        *held += 1;
        true
    }

    fn leave_share(&self, client: IpAddr) {
        let mut clients = self.clients.lock();
        if let Some(held) = clients.get_mut(&client) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                clients.remove(&client);
            }
        }
        drop(clients);
        self.client_freed.notify_waiters();
    }

    /// Takes a slot for `client`: within the client's share of the group
    /// (waiting, as in the queue, while it holds its share), then
    /// [`Self::acquire`].
    pub async fn acquire_for(
        self: &Arc<Self>,
        client: IpAddr,
        may_wait: bool,
        s: &RouteSettings,
    ) -> Option<Slot> {
        if s.client_share >= 100 {
            return self.acquire(may_wait, s).await;
        }
        let deadline = tokio::time::Instant::now() + s.queue_timeout;
        loop {
            let freed = self.client_freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.enter_share(client, self.client_limit(s.client_share)) {
                break;
            }
            if !may_wait || tokio::time::timeout_at(deadline, freed).await.is_err() {
                self.stats.rejected.fetch_add(1, Relaxed);
                self.stats.client_share_refused.fetch_add(1, Relaxed);
                return None;
            }
        }
        match self.acquire(may_wait, s).await {
            Some(mut slot) => {
                slot.client = Some(client);
                Some(slot)
            }
            None => {
                self.leave_share(client);
                None
            }
        }
    }

    /// Takes a slot: at once, after waiting, or not at all (refused; the
    /// refusal is counted). `may_wait` is false for UDP.
    pub async fn acquire(self: &Arc<Self>, may_wait: bool, s: &RouteSettings) -> Option<Slot> {
        let (id, wake, rx) = {
            let mut inner = self.inner.lock();
            match inner.pool.admit(may_wait, Instant::now()) {
                Admit::Go(pick) => return Some(self.slot(pick)),
                Admit::Reject => {
                    self.stats.rejected.fetch_add(1, Relaxed);
                    return None;
                }
                Admit::Wait { id, wake } => {
                    let (tx, rx) = oneshot::channel();
                    inner.waiters.insert(id, tx);
                    (id, wake, rx)
                }
            }
        };
        self.stats.queued.fetch_add(1, Relaxed);
        let group = self.group();
        let limit = if wake {
            if group.wake.is_none() {
                // Nothing will bring an instance: refuse now.
                self.give_up(id);
                self.stats.rejected.fetch_add(1, Relaxed);
                return None;
            }
            self.run_wake(&group, s.allow_wake_commands);
            Duration::from_secs(u64::from(group.wake_timeout_secs))
        } else {
            s.queue_timeout
        };
        let mut rx = rx;
        match tokio::time::timeout(limit, &mut rx).await {
            Ok(Ok(pick)) => Some(self.slot(pick)),
            _ => {
                if !self.give_up(id) {
                    // Dispatched as the wait ended: take it after all.
                    if let Ok(pick) = rx.try_recv() {
                        return Some(self.slot(pick));
                    }
                }
                self.stats.rejected.fetch_add(1, Relaxed);
                None
            }
        }
    }

    /// Leaves the queue; false if the waiter was dispatched meanwhile.
    fn give_up(&self, id: u64) -> bool {
        let mut inner = self.inner.lock();
        inner.waiters.remove(&id);
        inner.pool.cancel(id)
    }

    fn slot(self: &Arc<Self>, pick: Pick) -> Slot {
        let counters = self.stats.instance(pick.instance.as_str());
        Slot {
            rt: self.clone(),
            pick: Some(pick),
            client: None,
            counters,
        }
    }

    /// Takes a slot and opens a connection to the instance's `port`,
    /// retrying other instances when a dial fails (each failure marks its
    /// instance down for a backoff; a failure for the gateway's own lack of
    /// resources marks nothing and gives up). `None`: refused or nothing
    /// reachable.
    pub async fn connect(
        self: &Arc<Self>,
        client: IpAddr,
        destination_port: u16,
        s: &RouteSettings,
        stats: &GatewayStats,
    ) -> Option<(Slot, Box<dyn MeshStream>)> {
        let dialer = self.dialer();
        for _ in 0..4 {
            let slot = self.acquire_for(client, true, s).await?;
            let addr = SocketAddrV4::new(slot.pick().ip, destination_port);
            match dialer.dial(addr, s.connect_timeout).await {
                Ok(stream) => {
                    slot.counters.forwarded.fetch_add(1, Relaxed);
                    self.stats.total.forwarded.fetch_add(1, Relaxed);
                    return Some((slot, stream));
                }
                Err(e) if is_local_exhaustion(&e) => {
                    stats.local_error("connection to an instance", &e);
                    break;
                }
                Err(e) => {
                    tracing::debug!(group = %self.group.read().name, instance = %slot.pick().instance, error = %e, "dial failed; trying another instance");
                    slot.counters.dial_failures.fetch_add(1, Relaxed);
                    self.stats.total.dial_failures.fetch_add(1, Relaxed);
                    if slot.fail(&e) {
                        tokio::time::sleep(FRESH_RETRY).await;
                    }
                }
            }
        }
        self.stats.rejected.fetch_add(1, Relaxed);
        None
    }

    /// Runs the wake hook unless a run is under way.
    fn run_wake(self: &Arc<Self>, group: &ServiceGroup, allow_commands: bool) {
        let Some(hook) = group.wake.clone() else {
            return;
        };
        {
            let mut waking = self.waking.lock();
            if *waking {
                return;
            }
            *waking = true;
        }
        self.stats.wakes.fetch_add(1, Relaxed);
        let rt = self.clone();
        let (name, fqdn) = (group.name.to_string(), group.fqdn.clone());
        let limit = Duration::from_secs(u64::from(group.wake_timeout_secs));
        tokio::spawn(async move {
            let result =
                tokio::time::timeout(limit, super::wake::run(&hook, &name, &fqdn, allow_commands))
                    .await;
            match result {
                Ok(Ok(())) => tracing::info!(group = %name, "wake hook ran"),
                Ok(Err(e)) => tracing::warn!(group = %name, error = %e, "wake hook failed"),
                Err(_) => {
                    tracing::warn!(group = %name, "wake hook did not finish within the wake timeout")
                }
            }
            *rt.waking.lock() = false;
        });
    }

    /// Health check results (changes are logged).
    pub fn health(&self, pick: &Pick, ok: bool) {
        let mut inner = self.inner.lock();
        let now = Instant::now();
        let was_down = inner.pool.is_down(&pick.instance, now);
        let marked_down = if ok {
            let out = inner.pool.healthy(&pick.instance, now);
            self.hand_out(&mut inner, out);
            false
        } else {
            inner.pool.unhealthy(&pick.instance, now)
        };
        drop(inner);
        let group = &self.group.read().name;
        if was_down && ok {
            tracing::info!(%group, instance = %pick.instance, "instance up again: its health check succeeded");
        } else if marked_down {
            tracing::warn!(%group, instance = %pick.instance, fall = meshlib::balance::HEALTH_FALL, "instance marked down: its health checks failed in a row");
        } else if !ok {
            tracing::debug!(%group, instance = %pick.instance, "a health check failed (the instance stays in until more fail in a row)");
        }
    }

    /// Online instances (for health checks).
    pub fn online_instances(&self) -> Vec<Pick> {
        self.inner.lock().pool.online_instances()
    }

    fn gauges(&self) -> GroupGauges {
        let inner = self.inner.lock();
        GroupGauges {
            network: self.network_name.clone(),
            group: self.group.read().name.to_string(),
            queued: inner.pool.queued(),
            limits: (
                inner.pool.limits().soft_limit,
                inner.pool.limits().hard_limit,
            ),
            instances: inner
                .pool
                .active()
                .into_iter()
                .map(|(n, a, d)| (n.to_string(), a, d))
                .collect(),
        }
    }
}

/// A listener the map asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Listen {
    /// A TCP port on every public address.
    Tcp(u16),
    /// A UDP port on one address.
    Udp(IpAddr, u16),
}

/// Every group of every network served, by network and name.
#[derive(Default)]
pub struct Routes {
    groups: RwLock<HashMap<(NetworkId, GroupName), Arc<GroupRt>>>,
    /// Per network: its name and the generation of its map applied.
    generations: Mutex<BTreeMap<NetworkId, (String, u64)>>,
    /// Metrics carry a `network` label (a gateway serving several networks;
    /// group names are unique only within one).
    pub multi: bool,
    /// Counters of the gateway as a whole.
    pub gateway: GatewayStats,
}

impl Routes {
    /// Routes of a gateway serving several networks (metrics labelled by
    /// network).
    pub fn multi() -> Self {
        Self {
            multi: true,
            ..Self::default()
        }
    }

    /// Follows a new map of network `name`, whose instances `dialer`
    /// reaches: its groups added, changed (limits, ports, instances and
    /// their states) or removed; waiters dispatched if there is room.
    /// Waiters of a removed group are refused. Other networks' groups are
    /// left as they are. `me`: this gateway's instance in the network: the
    /// network's online gateways split each group's limits between them
    /// ([`super::member::fleet_share`]); `None`: this gateway alone.
    pub fn apply(
        &self,
        map: &NetworkMap,
        name: &str,
        dialer: &Arc<dyn Dialer>,
        me: Option<&meshlib::ids::InstanceName>,
    ) {
        let now = Instant::now();
        let net = map.network;
        let (gateways, rank) = fleet_rank(map, me);
        let mut groups = self.groups.write();
        groups.retain(|(n, g), _| *n != net || map.services.contains_key(g));
        for (gname, g) in &map.services {
            let rt = groups
                .entry((net, gname.clone()))
                .or_insert_with(|| {
                    Arc::new(GroupRt::new(
                        net,
                        name.to_owned(),
                        dialer.clone(),
                        g.clone(),
                    ))
                })
                .clone();
            *rt.dialer.write() = dialer.clone();
            *rt.group.write() = g.clone();
            *rt.names.write() = map
                .group_names(gname)
                .into_iter()
                .map(str::to_owned)
                .collect();
            let instances = g
                .instances
                .iter()
                .filter_map(|i| {
                    let m = map.by_instance(i)?;
                    Some((i.clone(), m.ip, m.is_online()))
                })
                .collect();
            let mut inner = rt.inner.lock();
            let limits = super::member::fleet_share(g.limits, gateways, rank);
            let out = inner.pool.update(limits, instances, now);
            rt.hand_out(&mut inner, out);
        }
        self.generations
            .lock()
            .insert(net, (name.to_owned(), map.generation));
    }

    /// Forgets every group of a network (no longer served); their waiters
    /// are refused, open connections carry on.
    pub fn remove_network(&self, network: NetworkId) {
        self.groups.write().retain(|(n, _), _| *n != network);
        self.generations.lock().remove(&network);
    }

    /// The networks whose maps were applied, with their names.
    pub fn networks(&self) -> Vec<(NetworkId, String)> {
        self.generations
            .lock()
            .iter()
            .map(|(id, (name, _))| (*id, name.clone()))
            .collect()
    }

    /// The group that publishes TCP `port` for `host` (the name from `Host`
    /// or SNI: a group's FQDN or one of its own names); without a host, the
    /// only group publishing the port.
    pub fn find(&self, port: u16, host: Option<&str>) -> Option<(Arc<GroupRt>, Route)> {
        let groups = self.groups.read();
        let route = |g: &ServiceGroup| {
            g.port(port, Protocol::Tcp).map(|p| Route {
                destination_port: p.destination_port,
                mode: p.mode(),
            })
        };
        match host {
            Some(h) => {
                let h = host_part(h);
                let mut named = groups.values().filter(|rt| rt.answers(h));
                let rt = named.next()?;
                if named.next().is_some() {
                    // Two networks claim the name (the keyserver refuses
                    // that; a stale map might not): serve neither.
                    tracing::warn!(
                        host = h,
                        "several networks' groups have this name: not served"
                    );
                    return None;
                }
                let r = route(&rt.group.read())?;
                Some((rt.clone(), r))
            }
            None => {
                let mut on_port = groups
                    .values()
                    .filter_map(|rt| route(&rt.group.read()).map(|r| (rt.clone(), r)));
                let first = on_port.next()?;
                on_port.next().is_none().then_some(first)
            }
        }
    }

    /// The network whose group has the name `host` (any case, perhaps
    /// with a port or a trailing dot), if exactly one has.
    pub fn network_of(&self, host: &str) -> Option<NetworkId> {
        let h = host_part(host);
        let groups = self.groups.read();
        let mut nets = groups
            .values()
            .filter_map(|rt| rt.answers(h).then_some(rt.network));
        let first = nets.next()?;
        nets.all(|n| n == first).then_some(first)
    }

    /// Whether `host` (an FQDN, any case, perhaps with a port or a
    /// trailing dot) is a group's.
    pub fn has_name(&self, host: &str) -> bool {
        let h = host_part(host);
        self.groups.read().values().any(|rt| rt.answers(h))
    }

    /// The group and port published as UDP `port` on `ip`.
    pub fn find_udp(&self, ip: IpAddr, port: u16) -> Option<(Arc<GroupRt>, PublishedPort)> {
        let groups = self.groups.read();
        let mut found = groups.values().filter_map(|rt| {
            let g = rt.group.read();
            g.port(port, Protocol::Udp)
                .filter(|p| p.ip == Some(ip))
                .cloned()
                .map(|p| (rt.clone(), p))
        });
        let first = found.next()?;
        // Two networks on one address and port: neither (see `find`).
        found.next().is_none().then_some(first)
    }

    /// Every listener the groups need, for a gateway on `public` addresses
    /// (UDP ports on another address are not this gateway's).
    pub fn listeners(&self, public: &[IpAddr], local: &[IpAddr]) -> BTreeSet<Listen> {
        let groups = self.groups.read();
        let mut out = BTreeSet::new();
        for rt in groups.values() {
            for p in &rt.group.read().ports {
                match (p.mode(), p.ip) {
                    (PortMode::Udp, Some(ip)) => {
                        let ours = public.contains(&ip)
                            || (public.iter().any(IpAddr::is_unspecified) && local.contains(&ip));
                        if ours {
                            out.insert(Listen::Udp(ip, p.port));
                        }
                    }
                    (PortMode::Udp, None) => {}
                    _ => {
                        out.insert(Listen::Tcp(p.port));
                    }
                }
            }
        }
        out
    }

    /// Every group (for health checks).
    pub fn all(&self) -> Vec<Arc<GroupRt>> {
        self.groups.read().values().cloned().collect()
    }

    /// The load of every group now (open connections to its instances,
    /// connections waiting), by name, at most
    /// [`meshlib::traffic::MAX_GROUPS`]: what the keyserver is told.
    pub fn group_loads(&self, network: NetworkId) -> Vec<meshlib::traffic::GroupLoad> {
        let mut loads: Vec<meshlib::traffic::GroupLoad> = self
            .all()
            .iter()
            .filter(|rt| rt.network == network)
            .map(|rt| {
                let g = rt.gauges();
                let open: u64 = g
                    .instances
                    .iter()
                    .map(|(_, active, _)| u64::from(*active))
                    .sum();
                meshlib::traffic::GroupLoad {
                    group: g.group,
                    open: u32::try_from(open).unwrap_or(u32::MAX),
                    queued: u32::try_from(g.queued).unwrap_or(u32::MAX),
                }
            })
            .filter(|l| !l.group.is_empty() && l.group.len() <= meshlib::traffic::MAX_GROUP_LEN)
            .collect();
        loads.sort_by(|a, b| a.group.cmp(&b.group));
        loads.dedup_by(|a, b| a.group == b.group);
        loads.truncate(meshlib::traffic::MAX_GROUPS);
        loads
    }

    /// The Prometheus text of every group.
    pub fn metrics(&self) -> String {
        let all = self.all();
        let mut stats: Vec<(String, String, Arc<GroupStats>)> = all
            .iter()
            .map(|rt| {
                (
                    rt.network_name.clone(),
                    rt.group.read().name.to_string(),
                    rt.stats.clone(),
                )
            })
            .collect();
        stats.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        let mut gauges: Vec<GroupGauges> = all.iter().map(|rt| rt.gauges()).collect();
        gauges.sort_by(|a, b| (&a.network, &a.group).cmp(&(&b.network, &b.group)));
        let generations: Vec<(String, u64)> = self.generations.lock().values().cloned().collect();
        super::metrics::render(&self.gateway, &stats, &gauges, &generations, self.multi)
    }
}

/// How many gateways serve the network of `map` (online members labelled
/// [`super::member::GATEWAY_RUNNER`], `me` counted even before the map
/// shows it online) and `me`'s rank among them by instance name.
fn fleet_rank(map: &NetworkMap, me: Option<&meshlib::ids::InstanceName>) -> (usize, usize) {
    let Some(me) = me else {
        return (1, 0);
    };
    let mut gateways: Vec<&meshlib::ids::InstanceName> = map
        .members
        .values()
        .filter(|m| m.runner == super::member::GATEWAY_RUNNER && m.is_online())
        .map(|m| &m.instance)
        .collect();
    if !gateways.contains(&me) {
        gateways.push(me);
    }
    gateways.sort();
    gateways.dedup();
    let rank = gateways.iter().position(|g| *g == me).unwrap_or(0);
    (gateways.len(), rank)
}

/// How a published TCP port is served, for one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The instances' port.
    pub destination_port: u16,
    /// What the gateway does.
    pub mode: PortMode,
}

/// A `Host` or SNI value without its port and trailing dot (case kept).
pub(super) fn host_part(host: &str) -> &str {
    let h = if host.starts_with('[') {
        host.split_once(']')
            .map_or(host, |(h, _)| &host[..=h.len()])
    } else {
        match host.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        }
    };
    h.trim_end_matches('.')
}

/// A `Host` or SNI value as an FQDN: no port, no trailing dot, lowercase.
pub fn normalize_host(host: &str) -> String {
    host_part(host).to_ascii_lowercase()
}

/// What a wake hook is, for logs.
pub fn describe(hook: &WakeHook) -> String {
    match hook {
        WakeHook::Command(c) => {
            format!("command {:?}", c.first().map(String::as_str).unwrap_or(""))
        }
        WakeHook::Url(u) => format!("url {u}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::member::{DialFuture, MeshDatagram};
    use std::sync::atomic::AtomicUsize;

    /// Refuses its first `refuse` dials, then connects (an in-memory pipe).
    struct Flaky {
        refuse: usize,
        dials: AtomicUsize,
    }

    impl Dialer for Flaky {
        fn dial(&self, _: SocketAddrV4, _: Duration) -> DialFuture<Box<dyn MeshStream>> {
            let n = self.dials.fetch_add(1, Relaxed);
            let refuse = n < self.refuse;
            Box::pin(async move {
                if refuse {
                    Err(std::io::ErrorKind::ConnectionRefused.into())
                } else {
                    let (a, _b) = tokio::io::duplex(64);
                    Ok(Box::new(a) as Box<dyn MeshStream>)
                }
            })
        }

        fn udp(&self, _: SocketAddrV4) -> DialFuture<Box<dyn MeshDatagram>> {
            Box::pin(async { Err(std::io::ErrorKind::Unsupported.into()) })
        }
    }

    fn group(dialer: Arc<dyn Dialer>) -> Arc<GroupRt> {
        let g = ServiceGroup {
            name: "web".parse().unwrap(),
            fqdn: "web.example.test".into(),
            ports: Vec::new(),
            limits: meshlib::services::Limits::default(),
            owner: None,
            instances: vec!["web-1".parse().unwrap()],
            wake: None,
            wake_timeout_secs: 30,
        };
        let rt = Arc::new(GroupRt::new(NetworkId::random(), "prod".into(), dialer, g));
        let mut inner = rt.inner.lock();
        let out = inner.pool.update(
            meshlib::services::Limits::default(),
            vec![(
                "web-1".parse().unwrap(),
                std::net::Ipv4Addr::new(10, 240, 0, 9),
                true,
            )],
            Instant::now(),
        );
        assert!(out.is_empty());
        drop(inner);
        rt
    }

    fn settings() -> RouteSettings {
        RouteSettings {
            queue_timeout: Duration::from_secs(1),
            client_share: 100,
            connect_timeout: Duration::from_secs(1),
            allow_wake_commands: false,
        }
    }

    /// A dial to an instance that just came online fails (its path or
    /// listener lags): it is not marked down, the dial is tried again after
    /// a pause and succeeds.
    #[tokio::test]
    async fn a_fresh_instance_gets_a_second_dial() {
        let dialer = Arc::new(Flaky {
            refuse: 1,
            dials: AtomicUsize::new(0),
        });
        let rt = group(dialer.clone());
        let started = Instant::now();
        let client = std::net::Ipv4Addr::new(192, 0, 2, 1).into();
        let got = rt
            .connect(client, 80, &settings(), &GatewayStats::default())
            .await;
        assert!(got.is_some(), "connected on the second dial");
        assert_eq!(dialer.dials.load(Relaxed), 2);
        assert!(started.elapsed() >= FRESH_RETRY);
        let name: meshlib::ids::InstanceName = "web-1".parse().unwrap();
        assert!(!rt.inner.lock().pool.is_down(&name, Instant::now()));
        drop(got);
        // Past the fresh window, a failed dial marks it down (and with one
        // instance, the connection is refused).
        let rt = group(dialer.clone());
        {
            let mut inner = rt.inner.lock();
            let later = Instant::now() + meshlib::balance::FRESH;
            let pick = match inner.pool.admit(true, later) {
                meshlib::balance::Admit::Go(p) => p,
                _ => panic!("a slot"),
            };
            inner.pool.failed(&pick.instance, later);
            assert!(inner.pool.is_down(&name, later));
        }
    }

    /// A map of network `name` with one group `group` at `fqdn` publishing
    /// 443 and UDP `udp` on 192.0.2.1.
    fn map(id: NetworkId, name: &str, group: &str, fqdn: &str, udp: u16) -> NetworkMap {
        let mut m = NetworkMap::new(id, name, meshlib::ipam::DEFAULT_RANGE);
        let port = |port, protocol, ip| PublishedPort {
            port,
            destination_port: 8080,
            protocol,
            handlers: if protocol == Protocol::Tcp {
                [
                    meshlib::services::Handler::Http,
                    meshlib::services::Handler::Tls,
                ]
                .into()
            } else {
                Default::default()
            },
            ip,
        };
        let g = ServiceGroup {
            name: group.parse().unwrap(),
            fqdn: fqdn.into(),
            ports: vec![
                port(443, Protocol::Tcp, None),
                port(udp, Protocol::Udp, Some("192.0.2.1".parse().unwrap())),
            ],
            limits: meshlib::services::Limits::default(),
            owner: None,
            instances: vec![],
            wake: None,
            wake_timeout_secs: 30,
        };
        m.services.insert(g.name.clone(), g);
        m.generation = 3;
        m
    }

    /// A group's own names pick it like its FQDN (any case, with a port or
    /// a trailing dot), in its network only; a name dropped from the map
    /// is no longer served.
    #[test]
    fn own_names_pick_their_group() {
        let routes = Routes::multi();
        let (a, b) = (NetworkId::random(), NetworkId::random());
        let dialer: Arc<dyn Dialer> = Arc::new(Flaky {
            refuse: 0,
            dials: AtomicUsize::new(0),
        });
        let mut ma = map(a, "prod", "web", "web.one.test", 5353);
        let web: GroupName = "web".parse().unwrap();
        ma.names.insert(
            web.clone(),
            vec!["shop.test".into(), "www.shop.test".into()],
        );
        routes.apply(&ma, "prod", &dialer, None);
        routes.apply(
            &map(b, "acme", "api", "api.two.test", 5354),
            "acme",
            &dialer,
            None,
        );
        for host in [
            "web.one.test",
            "shop.test",
            "WWW.Shop.test.",
            "www.shop.test:443",
        ] {
            let (rt, r) = routes.find(443, Some(host)).unwrap();
            assert_eq!((rt.network, rt.group_name().as_str()), (a, "web"), "{host}");
            assert_eq!(r.destination_port, 8080);
        }
        assert_eq!(routes.network_of("www.shop.test"), Some(a));
        assert!(routes.has_name("shop.test"));
        assert!(routes.find(443, Some("other.shop.test")).is_none());
        ma.names.clear();
        ma.generation += 1;
        routes.apply(&ma, "prod", &dialer, None);
        assert!(routes.find(443, Some("shop.test")).is_none());
        assert!(!routes.has_name("www.shop.test"));
        assert!(routes.find(443, Some("web.one.test")).is_some());
    }

    /// Several networks in one gateway: each group keeps its network (and
    /// its dialer), names pick across networks, a name or UDP address two
    /// networks claim is served by neither, a network's removal leaves the
    /// others.
    #[test]
    fn groups_of_several_networks_keep_apart() {
        let routes = Routes::multi();
        let (a, b) = (NetworkId::random(), NetworkId::random());
        let da: Arc<dyn Dialer> = Arc::new(Flaky {
            refuse: 0,
            dials: AtomicUsize::new(0),
        });
        let db: Arc<dyn Dialer> = Arc::new(Flaky {
            refuse: 0,
            dials: AtomicUsize::new(0),
        });
        // The same group name in both networks.
        routes.apply(
            &map(a, "prod", "web", "web.one.test", 5353),
            "prod",
            &da,
            None,
        );
        routes.apply(
            &map(b, "acme", "web", "web.two.test", 5354),
            "acme",
            &db,
            None,
        );
        let (rt, _) = routes.find(443, Some("WEB.one.test")).unwrap();
        assert_eq!(rt.network, a);
        assert!(Arc::ptr_eq(&rt.dialer(), &da));
        let (rt, _) = routes.find(443, Some("web.two.test:443")).unwrap();
        assert_eq!(rt.network, b);
        assert!(Arc::ptr_eq(&rt.dialer(), &db));
        assert_eq!(routes.network_of("web.two.test"), Some(b));
        assert_eq!(routes.network_of("nothing.test"), None);
        assert_eq!(
            routes
                .find_udp("192.0.2.1".parse().unwrap(), 5354)
                .unwrap()
                .0
                .network,
            b
        );
        // No Host: two groups publish 443, so none is picked.
        assert!(routes.find(443, None).is_none());
        assert_eq!(routes.group_loads(a).len(), 1);
        let text = routes.metrics();
        assert!(text.contains("network=\"acme\",group=\"web\""), "{text}");
        assert_eq!(meshlib::metrics::lint(&text), Ok(()));

        // A stale map claims another network's name and UDP address:
        // neither is served.
        let c = NetworkId::random();
        routes.apply(
            &map(c, "stale", "x", "web.one.test", 5354),
            "stale",
            &db,
            None,
        );
        assert!(routes.find(443, Some("web.one.test")).is_none());
        assert!(routes.network_of("web.one.test").is_none());
        assert!(routes
            .find_udp("192.0.2.1".parse().unwrap(), 5354)
            .is_none());
        routes.remove_network(c);
        assert_eq!(routes.find(443, Some("web.one.test")).unwrap().0.network, a);

        // A network left: its groups go, the other's stay.
        routes.remove_network(a);
        assert!(routes.find(443, Some("web.one.test")).is_none());
        assert!(routes.find(443, Some("web.two.test")).is_some());
        assert_eq!(routes.networks(), vec![(b, "acme".to_owned())]);
        // A new map of one network leaves the other's groups alone.
        routes.apply(
            &map(a, "prod", "api", "api.one.test", 5355),
            "prod",
            &da,
            None,
        );
        assert!(routes.find(443, Some("web.two.test")).is_some());
        assert!(routes.find(443, Some("api.one.test")).is_some());
    }

    /// The gateways of a network are its online members labelled
    /// `gateway`; this one counts before its map shows it; rank by name.
    #[test]
    fn gateways_count_each_other_from_the_map() {
        let member = |inst: &str, runner: &str, online: bool, n: u8| meshlib::netmap::Member {
            public_key: meshlib::keys::PrivateKey::generate().public_key(),
            ip: std::net::Ipv4Addr::new(10, 240, 0, n),
            endpoints: vec![],
            service: "gateway".into(),
            app_id: "gateway".parse().unwrap(),
            process_type: "web".parse().unwrap(),
            index: u32::from(n),
            instance: inst.parse().unwrap(),
            runner: runner.into(),
            ports: vec![],
            state: if online {
                meshlib::netmap::MemberState::Online
            } else {
                meshlib::netmap::MemberState::Offline
            },
        };
        let mut m = NetworkMap::new(NetworkId::random(), "prod", meshlib::ipam::DEFAULT_RANGE);
        for (i, (inst, runner, online)) in [
            ("gateway-web-2", "gateway", true),
            ("gateway-web-1", "gateway", true),
            ("gateway-web-3", "gateway", false),
            ("api-web-1", "host-a", true),
        ]
        .into_iter()
        .enumerate()
        {
            let mem = member(inst, runner, online, i as u8 + 1);
            m.members.insert(mem.public_key, mem);
        }
        let name = |s: &str| -> meshlib::ids::InstanceName { s.parse().unwrap() };
        assert_eq!(fleet_rank(&m, None), (1, 0), "alone without a name");
        assert_eq!(fleet_rank(&m, Some(&name("gateway-web-1"))), (2, 0));
        assert_eq!(fleet_rank(&m, Some(&name("gateway-web-2"))), (2, 1));
        // Not in the map yet: counted.
        assert_eq!(fleet_rank(&m, Some(&name("gateway-web-0"))), (3, 0));
        // The offline one comes back: three.
        for mem in m.members.values_mut() {
            mem.state = meshlib::netmap::MemberState::Online;
        }
        assert_eq!(fleet_rank(&m, Some(&name("gateway-web-3"))), (3, 2));
    }

    #[test]
    fn hosts_are_normalized() {
        assert_eq!(
            normalize_host("My-Svc-ABC.Example.test:443"),
            "my-svc-abc.example.test"
        );
        assert_eq!(normalize_host("a.test."), "a.test");
        assert_eq!(normalize_host("[::1]:80"), "[::1]");
    }
}
