//! The mesh as a library: a [`Node`] is one member of one network, with its
//! data plane, in any tokio program — no sidecar process (as Tailscale's
//! `tsnet` is for Go). `sidecar up`, `run` and `tunnel` are users of it.
//!
//! ```text
//! let node = Node::start(NodeConfig {
//!     state_dir: Some("/var/lib/app-mesh".into()),   // key, membership, map cache
//!     token: Some(token),                            // first start only
//!     service: Some("api".into()),
//!     mode: NodeMode::Userspace { service_address: "127.0.0.1".parse()? },
//!     ..NodeConfig::default()
//! }).await?;
//! let mut db = node.dial("my-db.warp:5432").await?;     // a tokio TcpStream
//! let listener = node.listen(8080).await?;              // peers reach us on :8080
//! node.shutdown().await;                                // offline; or node.leave()
//! ```
//!
//! ## Layout
//! - this module — [`Node`], its configuration and events, `dial` /
//!   `listen` / `resolve`, and [`ControlRequests`], the data plane's line
//!   to the control plane (wake a service scaled to zero, report traffic
//!   per service).
//! - [`state`] — the state directory: key (0600), membership (0600), map
//!   cache.
//! - `plane` — the data plane: the engine on a TUN interface (kernel mode)
//!   or on the userspace stack, and applying a map to it.
//! - `driver` — the task that drives the control session
//!   ([`crate::control::Session`], itself a driver of
//!   [`crate::member::MemberCore`]): applies every map change, persists,
//!   switches keys on rotation, answers the node's requests.
//!
//! Static stability: with a membership and a cached map in the state
//! directory, [`Node::start`] brings the data plane up from the cache before
//! the keyserver is reached, and the node keeps running while it is away.
//!
//! Only a revocation forgets: the node ends with [`NodeEnd::Revoked`] (tunnels
//! down, stored membership deleted) only when the keyserver says the
//! membership is gone ([`crate::member::Revocation`]). Anything else — an
//! unreachable keyserver, another protocol version, a malformed or
//! forbidden answer, a busy or failing keyserver — is retried with backoff
//! from the cached map, the state directory untouched; each distinct reason
//! is logged once (with the keyserver's address) until a connection works
//! again, and [`Node::watch_connection`] shows the latest.

pub mod state;

mod driver;
mod plane;

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::control::{self, ClientConfig, Connection, ControlError, Event, MemberMeta};
use crate::ids::{InstanceName, ProcessType};
use crate::ist::config::Overrides;
use crate::ist::table::IstTable;
use crate::keys::{PrivateKey, PublicKey};
use crate::member::{Revoked, Setback};
use crate::names::{Lookup, NameIndex};
use crate::netmap::{MapChange, NetworkMap};
use crate::proto::JoinToken;
use crate::userspace::Stack;
use crate::wg::Engine;

pub use plane::local_endpoints;
use state::{Membership as StoredMembership, StateDir, StateError};

/// How the node meets the programs beside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeMode {
    /// A TUN interface with the member's address (needs `CAP_NET_ADMIN`):
    /// any protocol, any port; `dial` and `listen` are plain sockets on it.
    Kernel {
        /// The interface's name.
        interface: String,
    },
    /// A userspace TCP/IP stack (no privileges): inbound connections to a
    /// served port go to `service_address:<port>` (or to a [`Node::listen`]
    /// listener); `dial` relays through the stack.
    Userspace {
        /// Where inbound traffic goes (`127.0.0.1`).
        service_address: IpAddr,
    },
}

/// Called with every map the node applies, before the data plane gets it
/// (an embedder's names and outputs are then never behind the peers).
/// Keep it quick: it runs on the node's control task.
#[derive(Clone)]
pub struct MapHook(pub Arc<dyn Fn(&NetworkMap) + Send + Sync>);

impl std::fmt::Debug for MapHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MapHook")
    }
}

/// Everything [`Node::start`] needs (plain data, plus an optional hook).
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Where the key, the membership and the map cache live. `None`: nothing
    /// is written (an ephemeral member, such as `sidecar tunnel`: its key
    /// lives in memory; end it with [`Node::leave`]).
    pub state_dir: Option<PathBuf>,
    /// The join token, needed on first start only.
    pub token: Option<JoinToken>,
    /// The service (app) name; default: the token's binding.
    pub service: Option<String>,
    /// The process type; default `web` (or the token's binding).
    pub process_type: ProcessType,
    /// The instance name; default: the keyserver's choice.
    pub instance: Option<InstanceName>,
    /// The runner label.
    pub runner: String,
    /// Kernel or userspace mode.
    pub mode: NodeMode,
    /// The WireGuard UDP port (0: any).
    pub listen_port: u16,
    /// Underlay endpoints to advertise; empty: the local addresses,
    /// re-detected every 10 s.
    pub endpoints: Vec<SocketAddr>,
    /// Ports the instance serves (announced to peers); [`Node::listen`]
    /// adds to them.
    pub ports: Vec<u16>,
    /// Persistent keepalive of every peer, seconds (0: off).
    pub persistent_keepalive: u16,
    /// The engine's crypto workers
    /// ([`crate::wg::EngineConfig::crypto_workers`]); 0 (the default): none.
    pub crypto_workers: usize,
    /// The control client's settings (timers, reconnect).
    pub client: ClientConfig,
    /// Called with every map before the data plane applies it.
    pub on_map: Option<MapHook>,
    /// Service groups (seed 002) to attach to, and ports to publish in a
    /// group owned by this member, at the first join.
    pub services: crate::services::JoinServices,
    /// Whether the first join is ephemeral: the keyserver frees the slot
    /// soon after the member goes offline. `None` (the default) decides by
    /// the state: a first join is ephemeral, because a member that joins
    /// finds no membership in its state directory, and on the platforms
    /// this mesh serves that means a container without persistent state,
    /// which will never resume this membership (keeping its slot would hold
    /// an index and an address for `expire-after`). A member whose state
    /// directory survives restarts sets `Some(false)`.
    pub ephemeral: Option<bool>,
    /// Take the slot of [`NodeConfig::instance`] at the first join even if
    /// it is online (the platform knows that instance is dead).
    pub replace: bool,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            state_dir: None,
            token: None,
            service: None,
            process_type: ProcessType::default(),
            instance: None,
            runner: "node".into(),
            mode: NodeMode::Userspace {
                service_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            },
            listen_port: 0,
            endpoints: vec![],
            ports: vec![],
            persistent_keepalive: 25,
            crypto_workers: 0,
            client: ClientConfig::default(),
            on_map: None,
            services: Default::default(),
            ephemeral: None,
            replace: false,
        }
    }
}

/// Why a node could not start or do what was asked. Messages include their
/// cause.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The state directory is unusable.
    #[error(transparent)]
    State(#[from] StateError),
    /// First start without a token.
    #[error("this member has not joined yet: a join token is needed")]
    NoToken,
    /// No service name to join as.
    #[error("no service name: set one, or use a token bound to a service")]
    NoService,
    /// The stored membership belongs to another key than the key file.
    #[error("the state directory's membership belongs to another key; move membership.json away to join anew")]
    KeyMismatch,
    /// The keyserver refused for good, or the client could not be set up.
    #[error("{error} (keyserver {keyserver})")]
    Control {
        /// The keyserver address(es).
        keyserver: String,
        /// What went wrong.
        error: ControlError,
    },
    /// The keyserver ended this membership.
    #[error("revoked by the keyserver: {0}")]
    Revoked(Revoked),
    /// The data plane could not start.
    #[error("data plane: {0}")]
    DataPlane(String),
    /// The node has stopped.
    #[error("the node has stopped")]
    Stopped,
    /// A key rotation was refused or is already under way.
    #[error("key rotation: {0}")]
    Rotation(String),
}

/// Something that happened to the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeEvent {
    /// The map changed: a delta's changes, or `None` for a whole snapshot.
    MapChanged {
        /// The map's generation now.
        generation: u64,
        /// What changed (`None`: replaced whole).
        changes: Option<Vec<MapChange>>,
    },
    /// The control connection changed state.
    Connection(Connection),
    /// The map caught up with the keyserver (once per connection).
    CaughtUp,
    /// The member's key was rotated.
    KeyRotated(PublicKey),
    /// The node stopped for good.
    Ended(NodeEnd),
}

/// Why a node stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeEnd {
    /// [`Node::shutdown`]: offline (confirmed by the keyserver or not).
    Offline,
    /// [`Node::leave`]: the membership is released.
    Left,
    /// The keyserver ended the membership (removed, replaced by another
    /// key, or its credential unknown): the tunnels are down and the stored
    /// membership is forgotten. The only end that forgets.
    Revoked {
        /// Why, in the keyserver's words.
        revoked: Revoked,
        /// The keyserver that said so.
        keyserver: Option<SocketAddr>,
    },
    /// The control session ended without a revocation, which happens only
    /// when [`crate::member::MemberConfig::reconnect`] is off (otherwise
    /// every setback is retried). The stored membership is kept: the next
    /// start resumes it.
    Lost(Setback),
}

impl std::fmt::Display for NodeEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Offline => f.write_str("stopped: offline at the keyserver"),
            Self::Left => f.write_str("left the network"),
            Self::Revoked {
                revoked,
                keyserver: Some(k),
            } => write!(f, "keyserver {k} ended this membership: {revoked}"),
            Self::Revoked {
                revoked,
                keyserver: None,
            } => write!(f, "the keyserver ended this membership: {revoked}"),
            Self::Lost(s) => write!(f, "control session ended: {s}"),
        }
    }
}

/// Logs each distinct reason a connection failed or was refused once, not
/// at every backoff attempt, until a connection works again.
#[derive(Debug, Default)]
struct SetbackLog {
    /// Reasons logged since the last working connection (a refusal by
    /// its code; at most [`SetbackLog::MAX`]).
    seen: Vec<Setback>,
}

impl SetbackLog {
    /// Reasons remembered: a keyserver that words its answers differently
    /// every time is logged every time, but never grows this.
    const MAX: usize = 32;

    /// Whether `s` is a reason not logged yet (and remembers it).
    fn is_new(&mut self, s: &Setback) -> bool {
        let same = |seen: &Setback| match (seen, s) {
            (Setback::Refused(a), Setback::Refused(b)) => a.code == b.code,
            (a, b) => a == b,
        };
        if self.seen.iter().any(same) {
            return false;
        }
        if self.seen.len() == Self::MAX {
            self.seen.remove(0);
        }
        self.seen.push(s.clone());
        true
    }

    /// A connection works: every reason is news again.
    fn clear(&mut self) {
        self.seen.clear();
    }
}

/// Requests from the [`Node`] handle to its driver.
#[derive(Debug)]
enum Command {
    SetPorts(Vec<u16>),
    SetEndpoints(Vec<SocketAddr>),
    Rotate(oneshot::Sender<Result<PublicKey, NodeError>>),
    Shutdown(oneshot::Sender<()>),
    Leave(oneshot::Sender<bool>),
}

/// A request from the data plane to the control task
/// ([`ControlRequests`]).
#[derive(Debug)]
enum PlaneRequest {
    Wake(String),
    Traffic(crate::traffic::TrafficReport),
    Groups(Vec<crate::traffic::GroupLoad>),
}

/// Requests a queued data-plane handle may have waiting: more are dropped
/// (a wake is asked again by the next held flow, a report is replaced by
/// the next one).
const PLANE_REQUESTS: usize = 256;

/// The data plane's line to the control plane (issue 19): wake a service
/// scaled to zero, report traffic per service. Cheap to clone and to call
/// from any thread, never blocks, never fails loudly: each call queues the
/// request for the node's control task ([`crate::member::MemberCore::wake`],
/// [`crate::member::MemberCore::report_traffic`] say what is then sent) and
/// says whether it was queued (false: the node has stopped, or the queue
/// of 256 requests is full). Get it with [`Node::control_requests`].
#[derive(Debug, Clone)]
pub struct ControlRequests {
    tx: mpsc::Sender<PlaneRequest>,
}

impl ControlRequests {
    /// A new flow to `service`'s address is held and the map shows no
    /// online instance: ask the keyserver to wake the service. Call it for
    /// every such flow; one request goes out per service and wake timeout,
    /// and the keyserver runs the hook once however many members ask. The
    /// held flow goes on when an instance comes online in the map, and is
    /// refused after the address's `wake_timeout_secs`.
    pub fn wake(&self, service: &str) -> bool {
        self.tx
            .try_send(PlaneRequest::Wake(service.to_owned()))
            .is_ok()
    }

    /// The data plane's counters per destination service, cumulative since
    /// it started ([`crate::traffic::TrafficReport`]; the source is this
    /// member's service). Call it as often as convenient (every second,
    /// say): the latest replaces the earlier, and the keyserver is sent one
    /// every [`crate::traffic::REPORT_INTERVAL`] at most, only when it
    /// changed. A report out of bounds is dropped (logged at debug).
    pub fn report_traffic(&self, report: crate::traffic::TrafficReport) -> bool {
        self.tx.try_send(PlaneRequest::Traffic(report)).is_ok()
    }

    /// A gateway's load per service group now
    /// ([`crate::traffic::TrafficReport::groups`]): kept, and sent with
    /// every traffic report from now on (the latest replaces the earlier;
    /// the same pace as [`ControlRequests::report_traffic`]).
    pub fn report_groups(&self, groups: Vec<crate::traffic::GroupLoad>) -> bool {
        self.tx.try_send(PlaneRequest::Groups(groups)).is_ok()
    }
}

/// What the handle and the driver share.
struct Shared {
    map: watch::Sender<NetworkMap>,
    connection: watch::Sender<Connection>,
    caught_up: watch::Sender<bool>,
    ended: watch::Sender<Option<NodeEnd>>,
    /// The keyserver of the current or last control connection.
    keyserver: watch::Sender<Option<SocketAddr>>,
    events: broadcast::Sender<NodeEvent>,
    public_key: Mutex<PublicKey>,
    /// Ports announced: the configured ones plus `listen`'s.
    ports: Mutex<Vec<u16>>,
}

/// One member of one network, with its data plane. See the module docs.
pub struct Node {
    shared: Arc<Shared>,
    plane: Arc<plane::Plane>,
    commands: mpsc::Sender<Command>,
    driver: Option<tokio::task::JoinHandle<()>>,
    /// Relay tasks of `dial_udp` (userspace mode), ended with the node.
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    instance: InstanceName,
    index: u32,
    /// The data plane's requests to the control task.
    requests: ControlRequests,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("ip", &self.plane.ip)
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

/// The keyserver addresses, for messages.
fn addrs_text(addrs: &[SocketAddr]) -> String {
    let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    list.join(", ")
}

/// The QUIC client endpoint for the keyserver's family.
fn quic_endpoint(addrs: &[SocketAddr]) -> Result<quinn::Endpoint, ControlError> {
    let v6 = addrs.first().is_some_and(|a| a.is_ipv6());
    let bind: SocketAddr = if v6 { "[::]:0" } else { "0.0.0.0:0" }
        .parse()
        .expect("literal");
    control::client_endpoint(bind)
}

impl Node {
    /// Joins (first start, with the token) or resumes (from the state
    /// directory), brings the data plane up and starts following the map.
    /// A first join retries an unreachable, busy or incompatible keyserver
    /// (another protocol version, a malformed or forbidden answer) until it
    /// succeeds, and fails on a refusal of its token or metadata
    /// ([`crate::member::join_refusal_is_final`]): bound it with a timeout
    /// or drop the future to give up.
    /// A resume returns at once, running from the cached map; the
    /// connection comes up in the background ([`Node::wait_caught_up`]).
    pub async fn start(cfg: NodeConfig) -> Result<Node, NodeError> {
        let state = cfg.state_dir.as_deref().map(StateDir::open).transpose()?;
        let stored = match &state {
            Some(s) => s.load_membership()?,
            None => None,
        };
        let (key, generated) = match &state {
            Some(s) => s.load_or_create_key()?,
            None => (PrivateKey::generate(), true),
        };
        if generated {
            tracing::info!(public_key = %key.public_key(), "generated a new member key");
        }
        let (stored, map, session) = match stored {
            Some(m) => {
                if m.control.public_key != key.public_key() {
                    return Err(NodeError::KeyMismatch);
                }
                let network = m.control.network;
                let map = match &state {
                    Some(s) => s.load_map()?.filter(|map| map.network == network),
                    None => None,
                }
                .unwrap_or_else(|| NetworkMap::new(network, "", m.range));
                let keyserver = addrs_text(&m.control.addrs);
                let ctl = |error| NodeError::Control {
                    keyserver: keyserver.clone(),
                    error,
                };
                let endpoint = quic_endpoint(&m.control.addrs).map_err(ctl)?;
                let endpoints = initial_endpoints(&cfg, m.range);
                let session = control::start_resume(
                    &endpoint,
                    &m.control,
                    map.clone(),
                    endpoints,
                    cfg.ports.clone(),
                    &cfg.client,
                )
                .map_err(ctl)?;
                (m, map, session)
            }
            None => {
                let token = cfg.token.as_ref().ok_or(NodeError::NoToken)?;
                let (stored, session) = first_join(&cfg, token, &key).await?;
                let map = session.map().clone();
                if let Some(s) = &state {
                    s.save_membership(&stored)?;
                    if let Err(e) = s.save_map(&map) {
                        tracing::warn!(error = %e, "cannot cache the network map");
                    }
                }
                (stored, map, session)
            }
        };
        // A rotation a previous run left unconfirmed: finished on the next
        // connection; its key is the likelier one meanwhile.
        let next = state
            .as_ref()
            .and_then(StateDir::load_next_key)
            .filter(|k| k.public_key() != key.public_key());
        let mut session = session;
        if let Some(next) = &next {
            session.resume_rotation(next.public_key());
        }
        // Made before the data plane, so that it can be handed the
        // requests' line ([`ControlRequests`]) when it starts.
        let (requests_tx, requests_rx) = mpsc::channel(PLANE_REQUESTS);
        let requests = ControlRequests { tx: requests_tx };
        let plane = plane::Plane::start(
            &cfg,
            next.as_ref().unwrap_or(&key),
            stored.ip,
            stored.range,
            &requests,
        )?;
        if let Some(hook) = &cfg.on_map {
            (hook.0)(&map);
        }
        plane.apply(&map, &key.public_key());
        if cfg.endpoints.is_empty() && cfg.listen_port == 0 {
            // The engine picked its port only now: announce the real one
            // (before a resume's hello; right after a join's).
            let eps = local_endpoints(plane.listen_port(), stored.range);
            let _ = session.update_endpoints(eps).await;
        }
        let plane = Arc::new(plane);
        let shared = Arc::new(Shared {
            map: watch::channel(map).0,
            connection: watch::channel(session.core().connection()).0,
            caught_up: watch::channel(session.core().is_caught_up()).0,
            ended: watch::channel(None).0,
            keyserver: watch::channel(session.keyserver()).0,
            events: broadcast::channel(1024).0,
            public_key: Mutex::new(key.public_key()),
            ports: Mutex::new(cfg.ports.clone()),
        });
        let (commands, rx) = mpsc::channel(16);
        let (instance, index) = (stored.instance.clone(), stored.index);
        let driver = driver::Driver {
            session,
            shared: shared.clone(),
            plane: plane.clone(),
            state,
            stored,
            key,
            rotation: next.map(|key| driver::Pending { key, reply: None }),
            detect: cfg.endpoints.is_empty(),
            endpoints: cfg.endpoints.clone(),
            announced: Vec::new(),
            on_map: cfg.on_map.clone(),
            setbacks: SetbackLog::default(),
            reported_pairs: Vec::new(),
            reported_groups: Vec::new(),
        };
        let driver = tokio::spawn(driver.run(rx, requests_rx));
        Ok(Node {
            shared,
            plane,
            commands,
            driver: Some(driver),
            tasks: Mutex::new(Vec::new()),
            instance,
            index,
            requests,
        })
    }

    // ---- what the node is --------------------------------------------------

    /// The member's private IP.
    pub fn ip(&self) -> Ipv4Addr {
        self.plane.ip
    }

    /// The member's instance name (`<instance>.internal`).
    pub fn instance(&self) -> &InstanceName {
        &self.instance
    }

    /// The member's index within (app, process type).
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The member's current public key.
    pub fn public_key(&self) -> PublicKey {
        *self.shared.public_key.lock()
    }

    /// The current map (every member, online or not).
    pub fn map(&self) -> NetworkMap {
        self.shared.map.borrow().clone()
    }

    /// The map, watched: changes as they are applied.
    pub fn watch_map(&self) -> watch::Receiver<NetworkMap> {
        self.shared.map.subscribe()
    }

    /// The control connection's state, watched.
    pub fn watch_connection(&self) -> watch::Receiver<Connection> {
        self.shared.connection.subscribe()
    }

    /// The keyserver of the current control connection, or of the last one
    /// (the one whose refusal or loss [`Node::watch_connection`] reports);
    /// `None` before any connection and after an attempt that reached no
    /// keyserver (its error names the addresses tried).
    pub fn keyserver(&self) -> Option<SocketAddr> {
        *self.shared.keyserver.borrow()
    }

    /// [`Node::keyserver`], watched (it changes with each connection).
    pub fn watch_keyserver(&self) -> watch::Receiver<Option<SocketAddr>> {
        self.shared.keyserver.subscribe()
    }

    /// Events from now on.
    pub fn events(&self) -> broadcast::Receiver<NodeEvent> {
        self.shared.events.subscribe()
    }

    /// Why the node ended, once it has (watched).
    pub fn watch_end(&self) -> watch::Receiver<Option<NodeEnd>> {
        self.shared.ended.subscribe()
    }

    /// The WireGuard engine (for `wg`'s UAPI and statistics).
    pub fn engine(&self) -> &Arc<Engine> {
        &self.plane.engine
    }

    /// The userspace stack (userspace mode only).
    pub fn stack(&self) -> Option<&Arc<Stack>> {
        self.plane.stack.as_ref()
    }

    /// The engine's UDP port.
    pub fn listen_port(&self) -> u16 {
        self.plane.listen_port()
    }

    /// Waits until the map has caught up with the keyserver (true), or
    /// `limit` passed (false: the keyserver is unreachable or slow; the
    /// cached map is what there is).
    pub async fn wait_caught_up(&self, limit: Duration) -> bool {
        let mut rx = self.shared.caught_up.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|c| *c))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    // ---- names and connections ----------------------------------------------

    /// The addresses a private name has now: `<instance>.internal`,
    /// `<service>.warp` and the seed-003 `….private-network.internal`
    /// names, online members only. Empty: no such name. A `.warp` name
    /// gives the service's members here, not its service address: a
    /// [`Node::dial`] by name goes straight to one of them.
    pub fn resolve(&self, name: &str) -> Vec<Ipv4Addr> {
        let mut online = self.shared.map.borrow().online();
        online.addresses.clear();
        let ist = IstTable::build(online.services(), &Overrides::default());
        match NameIndex::build(&online, &ist).lookup(name) {
            Lookup::Found(ips) => ips.to_vec(),
            _ => vec![],
        }
    }

    /// Where `target` (`name:port` or `ip:port`) points.
    fn targets(&self, target: &str) -> io::Result<Vec<SocketAddr>> {
        if let Ok(addr) = target.parse::<SocketAddr>() {
            return Ok(vec![addr]);
        }
        let bad = || {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("not name:port: {target:?}"),
            )
        };
        let (host, port) = target.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let ips = self.resolve(host);
        if ips.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{host} is not a name of this network"),
            ));
        }
        Ok(ips
            .into_iter()
            .map(|ip| SocketAddr::new(IpAddr::V4(ip), port))
            .collect())
    }

    /// Opens a TCP connection through the mesh to `target`
    /// (`api.warp:8080`, `db-1.internal:5432`, `10.240.0.7:80`). Every
    /// address of the name is tried in turn. In userspace mode the stream is
    /// a loopback relay into the stack: a peer that refuses shows as a
    /// closed stream.
    pub async fn dial(&self, target: &str) -> io::Result<TcpStream> {
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
        for addr in self.targets(target)? {
            match self.connect_tcp(addr).await {
                Ok(s) => return Ok(s),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn connect_tcp(&self, dst: SocketAddr) -> io::Result<TcpStream> {
        match &self.plane.stack {
            None => {
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.bind(SocketAddr::new(IpAddr::V4(self.plane.ip), 0))?;
                socket.connect(dst).await
            }
            Some(stack) => stack.dial_tcp(dst).await,
        }
    }

    /// A UDP socket connected through the mesh to `target` (as
    /// [`Node::dial`]).
    pub async fn dial_udp(&self, target: &str) -> io::Result<UdpSocket> {
        let dst = *self
            .targets(target)?
            .first()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"))?;
        match &self.plane.stack {
            None => {
                let socket = UdpSocket::bind(SocketAddr::new(IpAddr::V4(self.plane.ip), 0)).await?;
                socket.connect(dst).await?;
                Ok(socket)
            }
            Some(stack) => {
                let relay = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?;
                let relay_addr = relay.local_addr()?;
                let ours = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?;
                ours.connect(relay_addr).await?;
                let stack = stack.clone();
                let task = tokio::spawn(async move { stack.forward_udp(relay, dst).await });
                self.tasks.lock().push(task.abort_handle());
                Ok(ours)
            }
        }
    }

    /// Accepts TCP connections from peers on `port` of the member's
    /// private address; the port is announced to peers as served. In
    /// userspace mode the listener is on an ephemeral loopback port the
    /// stack relays `port` to.
    pub async fn listen(&self, port: u16) -> io::Result<TcpListener> {
        let listener = match &self.plane.stack {
            None => TcpListener::bind(SocketAddr::new(IpAddr::V4(self.plane.ip), port)).await?,
            Some(stack) => {
                let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
                stack.set_inbound_target(port, Some(l.local_addr()?));
                l
            }
        };
        let ports = {
            let mut ports = self.shared.ports.lock();
            if !ports.contains(&port) {
                ports.push(port);
                ports.sort_unstable();
            }
            ports.clone()
        };
        self.set_ports(ports).await;
        Ok(listener)
    }

    // ---- requests --------------------------------------------------------

    /// The data plane's line to the control plane: wake requests and
    /// traffic reports ([`ControlRequests`]); clone it into the data plane.
    pub fn control_requests(&self) -> ControlRequests {
        self.requests.clone()
    }

    /// This member's traffic per destination service, as the data plane
    /// counts it now ([`crate::traffic::TrafficReport`]: cumulative since
    /// the node started, `active` a gauge; the source is this member's own
    /// service): what the node reports to the keyserver every
    /// [`crate::traffic::REPORT_INTERVAL`] (when it changed). Kernel mode
    /// only, where the engine balances service addresses; `None` in
    /// userspace mode. Cheap enough for `/metrics` and status (one pass
    /// over the flow table under its lock).
    pub fn traffic(&self) -> Option<crate::traffic::TrafficReport> {
        self.plane.is_kernel().then(|| self.plane.engine.traffic())
    }

    /// Asks the keyserver to wake `service` (scale to zero); see
    /// [`ControlRequests::wake`]. False when the request could not be
    /// queued.
    pub fn wake(&self, service: &str) -> bool {
        self.requests.wake(service)
    }

    /// Hands the control plane the data plane's traffic counters; see
    /// [`ControlRequests::report_traffic`].
    pub fn report_traffic(&self, report: crate::traffic::TrafficReport) -> bool {
        self.requests.report_traffic(report)
    }

    /// Hands the control plane a gateway's load per service group; see
    /// [`ControlRequests::report_groups`].
    pub fn report_groups(&self, groups: Vec<crate::traffic::GroupLoad>) -> bool {
        self.requests.report_groups(groups)
    }

    /// Announces the ports the instance serves (replacing the list).
    pub async fn set_ports(&self, ports: Vec<u16>) {
        *self.shared.ports.lock() = ports.clone();
        let _ = self.commands.send(Command::SetPorts(ports)).await;
    }

    /// Announces new underlay endpoints (when they are not detected).
    pub async fn set_endpoints(&self, endpoints: Vec<SocketAddr>) {
        let _ = self.commands.send(Command::SetEndpoints(endpoints)).await;
    }

    /// Rotates the member's WireGuard key: a new key is made here, the
    /// keyserver takes it (checking the membership credential) and pushes
    /// it to the peers, which replace the peer in place; the address and
    /// names stay. Returns the new public key once the data plane uses it.
    pub async fn rotate_key(&self) -> Result<PublicKey, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Rotate(tx))
            .await
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)?
    }

    /// Stops gracefully: the keyserver marks the member offline at once
    /// (peers stop naming and reaching it; its address and names stay
    /// reserved for its return), then the data plane stops.
    pub async fn shutdown(mut self) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Shutdown(tx)).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(5), rx).await;
        }
        self.stop().await;
    }

    /// Leaves the network: the keyserver releases the membership (address
    /// quarantined, names gone) and the stored membership is forgotten.
    /// True when the keyserver confirmed.
    pub async fn leave(mut self) -> bool {
        let (tx, rx) = oneshot::channel();
        let mut left = false;
        if self.commands.send(Command::Leave(tx)).await.is_ok() {
            left = tokio::time::timeout(Duration::from_secs(15), rx)
                .await
                .is_ok_and(|r| r.unwrap_or(false));
        }
        self.stop().await;
        left
    }

    async fn stop(&mut self) {
        if let Some(driver) = self.driver.take() {
            driver.abort();
            let _ = driver.await;
        }
        for t in self.tasks.lock().drain(..) {
            t.abort();
        }
        self.plane.stop();
    }
}

impl Drop for Node {
    /// Dropped without [`Node::shutdown`]: stops at once, saying nothing
    /// (the keyserver notices the silence after `offline-after`).
    fn drop(&mut self) {
        if let Some(driver) = self.driver.take() {
            driver.abort();
        }
        for t in self.tasks.lock().drain(..) {
            t.abort();
        }
        self.plane.stop();
    }
}

/// The endpoints to announce at start.
fn initial_endpoints(cfg: &NodeConfig, range: ipnet::Ipv4Net) -> Vec<SocketAddr> {
    if !cfg.endpoints.is_empty() {
        return cfg.endpoints.clone();
    }
    let port = if cfg.listen_port == 0 {
        51820
    } else {
        cfg.listen_port
    };
    local_endpoints(port, range)
}

/// Joins with the token, logging every failed attempt (the member core
/// retries with backoff); returns the membership to store and the session.
async fn first_join(
    cfg: &NodeConfig,
    token: &JoinToken,
    key: &PrivateKey,
) -> Result<(StoredMembership, control::Session), NodeError> {
    let keyserver = addrs_text(&token.addrs);
    let ctl = |error| NodeError::Control {
        keyserver: keyserver.clone(),
        error,
    };
    let service = cfg
        .service
        .clone()
        .or_else(|| token.service.clone())
        .ok_or(NodeError::NoService)?;
    let process_type = match (&token.process_type, cfg.process_type.is_web()) {
        (Some(bound), true) => bound.clone(),
        _ => cfg.process_type.clone(),
    };
    let meta = MemberMeta {
        public_key: key.public_key(),
        service,
        app_id: None,
        process_type,
        instance: cfg.instance.clone(),
        runner: cfg.runner.clone(),
        endpoints: initial_endpoints(cfg, crate::ipam::DEFAULT_RANGE),
        ports: cfg.ports.clone(),
        replace: cfg.replace,
        ephemeral: cfg.ephemeral.unwrap_or(true),
    };
    let endpoint = quic_endpoint(&token.addrs).map_err(ctl)?;
    let mut session = control::start_join_with_services(
        &endpoint,
        token,
        meta,
        cfg.services.clone(),
        &cfg.client,
    )
    .map_err(ctl)?;
    let mut setbacks = SetbackLog::default();
    loop {
        match session.next_event().await {
            Ok(Event::Connection(Connection::Connecting {
                attempt,
                last_error: Some(error),
            })) => {
                let at = session
                    .keyserver()
                    .map_or_else(|| keyserver.clone(), |a| a.to_string());
                let reason = crate::render::text::escape(&error.to_string()).into_owned();
                if setbacks.is_new(&error) {
                    tracing::warn!(keyserver = %at, attempt, %reason, "join failed; retrying with the same key and backoff");
                } else {
                    tracing::debug!(keyserver = %at, attempt, %reason, "join failed again");
                }
            }
            Ok(Event::Snapshot) => break,
            Ok(_) => {}
            Err(error) => return Err(ctl(error)),
        }
    }
    let w = session.welcome().clone();
    tracing::info!(network = %w.network, ip = %w.ip, instance = %w.instance, %keyserver, "joined");
    let stored = StoredMembership {
        control: session.membership(),
        range: session.map().range,
        ip: w.ip,
        index: w.index,
        instance: w.instance,
    };
    Ok((stored, session))
}
