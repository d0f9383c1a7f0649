//! Service addresses in userspace mode: for every service address of the
//! map ([`crate::netmap::ServiceAddress`]), loopback listeners (TCP and
//! UDP) on `127.<octet>.<c>.<d>` ([`loopback_in`] of the address) that
//! send each new connection, or each new UDP sender, to one instance of
//! the service through the [`Stack`], and keep it there.
//!
//! ## Policy (issue 19, items 3 and 4)
//!
//! - **Listeners**: one per port that any instance of the service in the
//!   map announces (offline ones included, so that a service scaled to zero
//!   keeps its listeners for the wake), or announced since this plane
//!   started (instances that left the map: ephemeral ones are removed soon
//!   after they stop), or that the address itself remembers
//!   ([`crate::netmap::ServiceAddress::ports`]: every port an instance
//!   announced while the address existed, so that a sidecar started while
//!   the service has no member in the map listens too), at most
//!   [`MAX_PORTS`] per address, while the address is in the map.
//! - **Backends** of a port: the service's online members
//!   ([`NetworkMap::backends`]: its `web` members, or all when none is
//!   `web`) that serve the port: they announce it, or announce no port at
//!   all (then any port). This member itself may be one: it is dialled on
//!   the host (`<inbound_host>:<port>`), not through the tunnel.
//! - **Choice**: [`crate::balance::Pool`], one per (address, port), with no
//!   limits: the instance with the fewest active connections, in turn among
//!   equals.
//! - **Health**: a dial refused (the instance's stack answers the SYN with
//!   a reset when nothing listens: [`Stack::open_tcp`]) or unanswered
//!   within [`VipConfig::dial_timeout`] (3 s) marks the instance down for
//!   the pool's backoff (1 s, doubling to 30 s) and the *same* client
//!   connection is dialled again on another instance, up to
//!   [`MAX_ATTEMPTS`] times: the client sees nothing while one instance is
//!   healthy. The client's first bytes wait in its socket meanwhile; none
//!   is sent before an instance accepted.
//! - **No instance**: the connection is closed at once (a reset), unless
//!   the address is wakeable (`wake_timeout_secs`): then it is held up to
//!   that time for an instance to come online, and a wake is asked for
//!   ([`ServicePlane::set_wake_hook`]; the sidecar's hook is
//!   `ControlRequests::wake`, which sends one request per service and wake
//!   timeout; this plane asks at most once a second per service). The held
//!   connection goes to the first instance online; one that refuses while
//!   its application starts is dialled again after 50 ms, doubling to
//!   250 ms, within the same deadline (dials included); past the deadline
//!   the connection is reset.
//!   At most [`MAX_HELD_PER_SERVICE`] connections and UDP flows are held
//!   per service address (all ports); beyond, refused at once. A held
//!   connection costs its socket and one task; its bytes wait in the
//!   client's socket, not here.
//! - **Leaving**: an instance that leaves the service's backends (offline,
//!   gone, its key replaced) gets no new connection from the next map on;
//!   its relayed connections are reset both ways (client and instance),
//!   never left hanging.
//! - **UDP**: a new sender (client address and port) is pinned to one
//!   instance (the same pool; a datagram never waits behind instances that
//!   are online: with none healthy it is dropped); the flow lives while
//!   datagrams pass either way and ends after [`VipConfig::udp_idle`]
//!   (60 s), or when its instance leaves. At most
//!   [`VipConfig::max_udp_flows`] per listener; datagrams of further
//!   senders are dropped. A new sender to a wakeable address with no
//!   online instance is held: its first [`MAX_HELD_DATAGRAMS`] datagrams
//!   (at most [`MAX_HELD_BYTES`] together; later ones dropped) wait, a wake
//!   is asked for, and they go on in order to the first instance online;
//!   after the wake timeout they are dropped and the sender forgotten (its
//!   next datagram starts again). At most [`MAX_HELD_UDP_FLOWS`] held
//!   senders per listener, within the service's budget.
//! - **Traffic** ([`ServicePlane::traffic`]): counters per destination
//!   service, no per-flow state.
//!
//! ## Layout
//! - this module — the pure plan ([`plan`]) from a map, and
//!   [`ServicePlane`], which starts and stops listeners to follow it;
//! - `balancer` — per port: the pool, held connections, relayed
//!   connections by instance;
//! - `tcp` / `udp` — the listeners and the per-connection / per-flow relays.

mod balancer;
mod stats;
mod tcp;
mod udp;

pub use stats::MAX_HELD_PER_SERVICE;
pub use udp::{MAX_HELD_BYTES, MAX_HELD_DATAGRAMS, MAX_HELD_UDP_FLOWS};

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use super::ports::loopback_in;
use super::Stack;
use crate::ids::InstanceName;
use crate::keys::PublicKey;
use crate::netmap::NetworkMap;
use crate::traffic::{PairTraffic, TrafficReport, MAX_PAIRS};
use balancer::Balancer;
use stats::ServiceStats;

/// Most ports one service address listens on.
pub const MAX_PORTS: usize = 256;
/// Most dials for one client connection (each failed instance is marked
/// down, so every attempt goes to another one).
pub const MAX_ATTEMPTS: usize = 8;

/// How the service-address listeners behave. Plain data;
/// [`VipConfig::new`] gives the defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipConfig {
    /// Second octet of the loopback addresses (`127.<octet>.c.d`), the
    /// same as the member listeners' so every output agrees.
    pub octet: u8,
    /// How long a dial to an instance may take before the instance is
    /// marked down and the connection goes to another one; 3 s by default:
    /// room for one SYN retransmission (smoltcp waits 1 s) and a WireGuard
    /// handshake, short enough that a client waiting behind a vanished
    /// instance is served elsewhere before common connect timeouts.
    pub dial_timeout: Duration,
    /// A UDP flow without traffic either way for this long is closed; 60 s
    /// by default (the common NAT UDP timeout).
    pub udp_idle: Duration,
    /// UDP flows per listener at most; 4096 by default (each is one small
    /// socket and one task).
    pub max_udp_flows: usize,
}

impl VipConfig {
    /// The defaults, with loopback addresses in `127.<octet>.0.0/16`.
    pub fn new(octet: u8) -> Self {
        Self {
            octet,
            dial_timeout: Duration::from_secs(3),
            udp_idle: Duration::from_secs(60),
            max_udp_flows: 4096,
        }
    }
}

/// One instance a service address's port balances over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// Its instance name (the pool's identity for it: health survives a
    /// key change in the same slot).
    pub instance: InstanceName,
    /// Its private IP.
    pub ip: Ipv4Addr,
    /// Its key: a relayed connection belongs to one key.
    pub key: PublicKey,
    /// This member itself: dialled on the host, not through the tunnel.
    pub local: bool,
}

/// What one listener of a service address needs (pure; [`plan`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortPlan {
    /// The service.
    pub service: String,
    /// The service address.
    pub address: Ipv4Addr,
    /// The port (the same on the address and on the instances).
    pub port: u16,
    /// The instances serving the port, by index.
    pub backends: Vec<Backend>,
    /// The keys of all the service's online instances: relayed
    /// connections of any other key end.
    pub members: BTreeSet<PublicKey>,
    /// How long a connection is held while no instance is online
    /// (`None`: refused at once).
    pub wake_timeout: Option<Duration>,
}

/// The listeners `map` asks for, by loopback listen address, seen by the
/// member at `own` (pure; the policy is in the module docs).
pub fn plan(map: &NetworkMap, own: Ipv4Addr, octet: u8) -> BTreeMap<SocketAddr, PortPlan> {
    plan_remembering(map, own, octet, &mut HashMap::new())
}

/// [`plan`], also listening on the ports `seen` remembers for each
/// service (and remembering the map's): a service whose instances all left
/// the map (ephemeral instances scaled to zero are removed soon after they
/// stop) keeps its listeners while its address is in the map, so a
/// connection can still be held for a wake. At most [`MAX_PORTS`] per
/// service; services without an address are forgotten.
pub fn plan_remembering(
    map: &NetworkMap,
    own: Ipv4Addr,
    octet: u8,
    seen: &mut HashMap<String, BTreeSet<u16>>,
) -> BTreeMap<SocketAddr, PortPlan> {
    let mut out = BTreeMap::new();
    seen.retain(|service, _| map.addresses.contains_key(service));
    for a in map.addresses.values() {
        let remembered = seen.entry(a.service.clone()).or_default();
        // The ports the address remembers (the keyserver's, kept while
        // the address exists), then those of the members in the map.
        let from_map = a
            .ports
            .iter()
            .copied()
            .chain(
                map.service_members(&a.service)
                    .iter()
                    .flat_map(|m| m.ports.iter().copied()),
            )
            .take(MAX_PORTS * 64)
            .collect::<BTreeSet<u16>>();
        for p in from_map {
            if remembered.len() >= MAX_PORTS {
                break;
            }
            remembered.insert(p);
        }
        let ports = remembered.clone();
        let online = map.backends(&a.service);
        let members: BTreeSet<PublicKey> = online.iter().map(|m| m.public_key).collect();
        let listen = IpAddr::V4(loopback_in(octet, IpAddr::V4(a.ip)));
        for port in ports.into_iter().take(MAX_PORTS) {
            let backends = online
                .iter()
                .filter(|m| m.ports.is_empty() || m.ports.contains(&port))
                .map(|m| Backend {
                    instance: m.instance.clone(),
                    ip: m.ip,
                    key: m.public_key,
                    local: m.ip == own,
                })
                .collect();
            let plan = PortPlan {
                service: a.service.clone(),
                address: a.ip,
                port,
                backends,
                members: members.clone(),
                wake_timeout: a
                    .wake_timeout_secs
                    .map(|s| Duration::from_secs(u64::from(s))),
            };
            out.insert(SocketAddr::new(listen, port), plan);
        }
    }
    out
}

/// Called with a service's name when a connection to its address finds no
/// online instance and waits (scale to zero).
pub type WakeHook = Arc<dyn Fn(&str) + Send + Sync>;

/// What every listener task shares.
pub(crate) struct Shared {
    stack: Arc<Stack>,
    cfg: VipConfig,
    wake: parking_lot::Mutex<Option<WakeHook>>,
}

/// How often one service's wake is asked for at most by this plane (the
/// node sends one request per wake timeout; this keeps a flood of held
/// connections from filling its request line).
const WAKE_EVERY: Duration = Duration::from_secs(1);

impl Shared {
    /// Asks for `service` to be woken, at most once per [`WAKE_EVERY`] for
    /// the same service (`stats` tells when it was last asked).
    fn wake(&self, service: &str, stats: &ServiceStats) {
        if !stats.wake_due(Instant::now(), WAKE_EVERY) {
            return;
        }
        let hook = self.wake.lock().clone();
        match hook {
            Some(hook) => hook(service),
            None => tracing::debug!(service, "no online instance; no wake hook set"),
        }
    }
}

/// One running listener: its balancer and its accept tasks.
struct Running {
    balancer: Arc<Balancer>,
    tasks: Vec<JoinHandle<()>>,
}

/// The service-address listeners of one userspace member. Follows the map
/// live ([`ServicePlane::apply`]): listeners come and go without
/// disturbing the others. Dropping it stops the listeners and ends every
/// relayed connection.
pub struct ServicePlane {
    shared: Arc<Shared>,
    running: HashMap<SocketAddr, Running>,
    /// Traffic counters and hold budget per destination service, shared
    /// by the listeners of its address's ports; kept while the service is
    /// in the map (counters cumulative), so at most the map's services.
    stats: HashMap<String, Arc<ServiceStats>>,
    /// Ports each service's instances announced, remembered while its
    /// address is in the map ([`plan_remembering`]).
    ports: HashMap<String, BTreeSet<u16>>,
}

impl ServicePlane {
    /// Listeners relaying into `stack`. Call [`ServicePlane::apply`] inside
    /// a tokio runtime.
    pub fn new(stack: Arc<Stack>, cfg: VipConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                stack,
                cfg,
                wake: parking_lot::Mutex::new(None),
            }),
            running: HashMap::new(),
            stats: HashMap::new(),
            ports: HashMap::new(),
        }
    }

    /// Sets the hook called when a held connection asks for a wake.
    pub fn set_wake_hook(&self, hook: WakeHook) {
        *self.shared.wake.lock() = Some(hook);
    }

    /// Starts, updates and stops listeners to match `map` (seen by the
    /// member at `own`).
    pub fn apply(&mut self, map: &NetworkMap, own: Ipv4Addr) {
        let mut plans = plan_remembering(map, own, self.shared.cfg.octet, &mut self.ports);
        let now = Instant::now();
        self.running.retain(|listen, r| match plans.get(listen) {
            Some(p) if p.service == r.balancer.service => true,
            _ => {
                r.stop();
                false
            }
        });
        // Counters of services gone from the map go (no flow of theirs is
        // relayed any more: their listeners just stopped).
        self.stats
            .retain(|service, _| map.addresses.contains_key(service));
        for (listen, p) in std::mem::take(&mut plans) {
            if let Some(r) = self.running.get(&listen) {
                r.balancer.update(&p, now);
                continue;
            }
            let stats = self.stats.entry(p.service.clone()).or_default().clone();
            let balancer = Arc::new(Balancer::new(&p, stats));
            balancer.update(&p, now);
            let tasks = self.listen(listen, &balancer);
            self.running.insert(listen, Running { balancer, tasks });
        }
    }

    /// Binds `listen` (TCP and UDP) and spawns its accept tasks; a port
    /// that cannot be bound (below 1024 without privileges, taken) is
    /// logged and skipped.
    fn listen(&self, listen: SocketAddr, balancer: &Arc<Balancer>) -> Vec<JoinHandle<()>> {
        let mut tasks = Vec::new();
        match std::net::TcpListener::bind(listen)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(tokio::net::TcpListener::from_std)
        {
            Ok(l) => tasks.push(tokio::spawn(tcp::accept(
                self.shared.clone(),
                balancer.clone(),
                l,
            ))),
            Err(e) => {
                tracing::warn!(%listen, error = %e, "cannot listen for a service address (tcp)")
            }
        }
        match std::net::UdpSocket::bind(listen)
            .and_then(|s| s.set_nonblocking(true).map(|()| s))
            .and_then(tokio::net::UdpSocket::from_std)
        {
            Ok(s) => tasks.push(tokio::spawn(udp::serve(
                self.shared.clone(),
                balancer.clone(),
                s,
            ))),
            Err(e) => {
                tracing::warn!(%listen, error = %e, "cannot listen for a service address (udp)")
            }
        }
        tasks
    }

    /// The loopback addresses listened on now, sorted.
    pub fn listening(&self) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = self.running.keys().copied().collect();
        out.sort();
        out
    }

    /// Connections and flows relayed now through `listen`.
    pub fn relayed(&self, listen: SocketAddr) -> usize {
        self.running
            .get(&listen)
            .map_or(0, |r| r.balancer.relayed())
    }

    /// This member's traffic per destination service through its service
    /// addresses (issue 19, item 6): flows opened, open now (held ones
    /// included), refused, held for a wake, payload bytes each way, and
    /// connect times (TCP: accept to the instance's dial succeeding, a
    /// wake included; UDP: first datagram to first answer). Cumulative
    /// since this plane started (`active` is a gauge); services with
    /// nothing counted are left out; at most [`MAX_PAIRS`] destinations,
    /// the busiest (most flows) first. Cheap: a lock per service.
    pub fn traffic(&self) -> TrafficReport {
        let mut pairs: Vec<PairTraffic> = self
            .stats
            .iter()
            .map(|(service, s)| PairTraffic {
                destination: service.clone(),
                counters: s.snapshot(),
            })
            .filter(|p| p.counters != crate::traffic::TrafficCounters::default())
            .collect();
        let flows = |p: &PairTraffic| {
            let c = &p.counters;
            c.opened
                .saturating_add(c.refused)
                .saturating_add(c.held)
                .saturating_add(c.active)
        };
        pairs.sort_by(|a, b| {
            flows(b)
                .cmp(&flows(a))
                .then_with(|| a.destination.cmp(&b.destination))
        });
        pairs.truncate(MAX_PAIRS);
        TrafficReport {
            pairs,
            paths: vec![],
            groups: vec![],
        }
    }

    /// Connections and UDP flows of `service` held for a wake now.
    pub fn held(&self, service: &str) -> usize {
        self.stats.get(service).map_or(0, |s| s.held_now())
    }

    /// Stops every listener and ends every relayed connection.
    pub fn stop(&mut self) {
        for (_, r) in self.running.drain() {
            r.stop();
        }
    }
}

impl Running {
    fn stop(&self) {
        self.tasks.iter().for_each(JoinHandle::abort);
        self.balancer.close();
    }
}

impl Drop for ServicePlane {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests;
