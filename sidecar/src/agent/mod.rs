//! `sidecar up` and `sidecar run`: a [`Node`] (join or resume, data plane,
//! control session) plus what makes the mesh usable by an unmodified
//! instance: private DNS, the `/etc/hosts` section, env files and
//! `WARP_IST_*` variables, userspace loopback listeners, status, metrics.
//!
//! Split by job:
//! - `bootstrap` — checks everything before a token is used; the sidecar's
//!   configuration becomes the node's.
//! - this module — [`Agent`]: starts the node, applies every map to the
//!   outputs and the userspace listeners, announces served ports, answers
//!   control requests, stops gracefully (offline) or leaves.
//! - `servers` — DNS, the status socket, metrics and the control socket.
//!
//! Static stability: with a membership and a cached map in the state
//! directory, the data plane starts from the cache before the keyserver is
//! reached, and keeps running while it is away.
//!
//! Lifecycle: a graceful stop (SIGTERM/SIGINT of `up`, the end of `run`'s
//! command) tells the keyserver the member is offline at once; `sidecar
//! leave` releases the membership; `sidecar rotate-key` replaces the key.

mod bootstrap;
mod servers;

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshlib::control::{self, ClientConfig, Connection, Setback};
use meshlib::names::NameIndex;
use meshlib::netmap::NetworkMap;
use meshlib::node::state::{StateDir, StateError};
use meshlib::node::{MapHook, Node, NodeEnd, NodeError};
use meshlib::proto::TokenParseError;
use meshlib::render::text::escape;
use meshlib::wg::{uapi_server, UapiServer};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{Config, ConfigError, Mode};
use crate::outputs::{OutputConfig, Outputs};
use crate::ports::PortOwner;
use crate::status::{ControlState, PeerStatus, Status, StatusSource};

pub use servers::{request, start_servers, ControlRequestError, LocalServers, CONTROL_SOCKET};

/// Why the agent stopped or could not start. Messages include their cause
/// (no `source()` is exposed), so a chain printer shows each part once.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The state directory is unusable.
    #[error(transparent)]
    State(#[from] StateError),
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// First start without a token.
    #[error("this member has not joined yet: a join token is needed (--token-file, ISTM_TOKEN or --token)")]
    NoToken,
    /// The token does not parse.
    #[error("token: {0}")]
    Token(TokenParseError),
    /// No service name to join as.
    #[error("no service name: set --service (or `service` in the config)")]
    NoService,
    /// The node could not start or stopped (refused, revoked, data plane).
    #[error(transparent)]
    Node(#[from] NodeError),
    /// The node ended on its own: the keyserver ended the membership
    /// ([`NodeEnd::Revoked`]: removed, replaced by another key, or its
    /// credential unknown; the stored membership is forgotten), or, with
    /// reconnect off only, the control session failed ([`NodeEnd::Lost`]).
    #[error("{0}")]
    Ended(NodeEnd),
    /// A local socket could not be opened.
    #[error("{what}: {error}")]
    Io {
        /// What was being opened.
        what: String,
        /// The system error.
        error: std::io::Error,
    },
    /// The sidecar was stopped before the first join completed.
    #[error("stopped before the first join completed")]
    Interrupted,
}

/// How often the served ports are looked for (`sidecar run`'s command may
/// start listening any time); a change is announced at once.
const PORTS_CHECK: Duration = Duration::from_secs(2);

/// A request from the control socket.
#[derive(Debug)]
pub enum Request {
    /// Rotate the member's key; the answer holds the new public key.
    RotateKey(oneshot::Sender<Result<serde_json::Value, String>>),
    /// Leave the network and stop.
    Leave(oneshot::Sender<Result<serde_json::Value, String>>),
}

/// What a map is turned into beside the data plane: outputs (DNS index,
/// hosts, env) and userspace listeners. The node calls it with every map
/// before its engine gets it, so names are never behind the peers.
struct Applier {
    outputs: Outputs,
    /// Userspace mode's loopback listeners (`None` in kernel mode).
    userspace: Option<crate::userspace::UserspacePlane>,
    conflicts: Vec<String>,
    /// This member's private IP (it never changes, a rotation included).
    own_ip: Option<Ipv4Addr>,
    /// Set once the agent has wired everything; maps before are kept.
    ready: bool,
    latest: Option<NetworkMap>,
}

impl Applier {
    /// A map from the node.
    fn on_map(&mut self, map: &NetworkMap) {
        self.latest = Some(map.clone());
        if self.ready {
            self.apply(map);
        }
    }

    /// Applies one map: outputs and userspace listeners, from its online
    /// members.
    fn apply(&mut self, map: &NetworkMap) {
        let online = map.online();
        let report = self.outputs.apply(&online);
        if let (Some(u), Some(ip)) = (&mut self.userspace, self.own_ip) {
            u.apply(map, ip);
        }
        self.conflicts = report.conflicts.iter().map(|c| c.to_string()).collect();
        tracing::info!(
            generation = map.generation,
            online = online.members.len(),
            members = map.members.len(),
            "network map applied"
        );
    }
}

/// A running agent: the node and what is built on its map.
pub struct Agent {
    config: Config,
    node: Node,
    _uapi: Option<UapiServer>,
    applier: Arc<Mutex<Applier>>,
    names: watch::Receiver<Arc<NameIndex>>,
    /// `sidecar run`'s child, whose process tree's listeners are the
    /// served ports (when none are declared).
    port_owner: Option<PortOwner>,
    requests: mpsc::Sender<Request>,
    requests_rx: Option<mpsc::Receiver<Request>>,
}

impl Agent {
    /// Checks the configuration, then joins (first start) or resumes, brings
    /// the data plane up and applies the best map available. A first join
    /// retries an unreachable, busy or incompatible keyserver until `shutdown`
    /// turns true.
    pub async fn start(
        config: Config,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Self, AgentError> {
        let mut prepared = bootstrap::prepare(&config)?;
        let (names_tx, names) = watch::channel(Arc::new(NameIndex::default()));
        let applier = Arc::new(Mutex::new(Applier {
            outputs: Outputs::new(
                OutputConfig {
                    hosts_file: config.hosts_file.clone(),
                    env_dir: config.env_files.then(|| config.state_dir.clone()),
                    overrides: prepared.overrides,
                },
                names_tx,
            ),
            userspace: None,
            conflicts: Vec::new(),
            own_ip: None,
            ready: false,
            latest: None,
        }));
        let hook = applier.clone();
        prepared.node.on_map = Some(MapHook(Arc::new(move |map| hook.lock().on_map(map))));
        let node = tokio::select! {
            node = Node::start(prepared.node) => node?,
            () = async { let _ = shutdown.wait_for(|s| *s).await; } => return Err(AgentError::Interrupted),
        };
        let uapi = match config.mode {
            Mode::Kernel => UapiServer::start(
                node.engine().clone(),
                &uapi_server::socket_path(&config.interface),
            ),
            Mode::Userspace => crate::userspace::start_uapi(node.engine().clone(), &config),
        };
        let uapi = match uapi {
            Ok(u) => Some(u),
            // Another sidecar took the name since the check before the
            // join: `wg show` would show only one of them.
            Err(e @ meshlib::wg::uapi_server::UapiServerError::InUse(_)) => {
                return Err(AgentError::Config(ConfigError::invalid(
                    "interface",
                    format!(
                        "{e} (each sidecar on a host needs its own {})",
                        bootstrap::DISTINCT
                    ),
                )));
            }
            Err(e) => {
                tracing::warn!(error = %e, "no UAPI socket: `wg show` will not see this interface");
                None
            }
        };
        {
            let mut a = applier.lock();
            a.own_ip = Some(node.ip());
            if config.service_addresses.resolve(config.mode) {
                let octet = config.loopback_octet;
                a.outputs.set_service_view(match config.mode {
                    Mode::Kernel => crate::outputs::ServiceView::Direct,
                    Mode::Userspace => crate::outputs::ServiceView::Mapped(Arc::new(move |ip| {
                        meshlib::userspace::ports::loopback_in(octet, std::net::IpAddr::V4(ip))
                    })),
                });
            }
            if let Some(stack) = node.stack() {
                a.outputs.set_address_map(crate::userspace::address_map(
                    node.ip(),
                    config.loopback_octet,
                ));
                a.userspace = Some(
                    crate::userspace::UserspacePlane::new(stack.clone(), config.loopback_octet)
                        .with_control(node.control_requests()),
                );
            }
            a.ready = true;
            let map = a.latest.take().unwrap_or_else(|| node.map());
            a.apply(&map);
            a.latest = Some(map);
        }
        let (requests, requests_rx) = mpsc::channel(4);
        Ok(Agent {
            config,
            node,
            _uapi: uapi,
            applier,
            names,
            port_owner: None,
            requests,
            requests_rx: Some(requests_rx),
        })
    }

    /// `sidecar run`: from now on the served ports (when none are
    /// declared) are those the process tree of the child stored in the
    /// returned cell listens on. Call before [`Agent::run`].
    pub fn port_owner(&mut self) -> PortOwner {
        self.port_owner
            .get_or_insert_with(PortOwner::default)
            .clone()
    }

    /// Waits (at most `limit`) until the map has caught up with the
    /// keyserver; false when it has not (unreachable: the cached map is
    /// used, and this is logged).
    pub async fn wait_caught_up(&mut self, limit: Duration) -> bool {
        let caught = self.node.wait_caught_up(limit).await;
        if !caught {
            tracing::warn!(
                waited = ?limit,
                generation = self.node.map().generation,
                "the keyserver did not bring the map up to date in time; starting from the cached map"
            );
        }
        caught
    }

    /// The variables for `sidecar run`'s child: the IST variables of the
    /// current map and this member's own `ISTM_*` (network id, app id,
    /// instance, private IP; seed 003).
    pub fn variables(&self) -> Vec<(String, String)> {
        let map = self.node.map();
        let mut vars = self.applier.lock().outputs.variables(&map.online());
        let app = map
            .members
            .get(&self.node.public_key())
            .map(|m| m.app_id.to_string())
            .unwrap_or_default();
        vars.extend([
            ("ISTM_NETWORK_ID".to_owned(), map.network.to_string()),
            ("ISTM_APP_ID".to_owned(), app),
            ("ISTM_INSTANCE".to_owned(), self.node.instance().to_string()),
            ("ISTM_PRIVATE_IP".to_owned(), self.node.ip().to_string()),
        ]);
        vars
    }

    /// The name index the DNS server answers from.
    pub fn names(&self) -> watch::Receiver<Arc<NameIndex>> {
        self.names.clone()
    }

    /// The node (its map, engine, events).
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// A status snapshot source for `sidecar status` and metrics.
    pub fn status_source(&self) -> StatusSource {
        let engine = self.node.engine().clone();
        let stack = self.node.stack().cloned();
        let map_rx = self.node.watch_map();
        let connection = self.node.watch_connection();
        let ended = self.node.watch_end();
        let node_keyserver = self.node.watch_keyserver();
        let applier = self.applier.clone();
        let keyserver = self.keyserver();
        let interface = self.config.interface.clone();
        let (instance, ip) = (self.node.instance().to_string(), self.node.ip());
        Arc::new(move || {
            let map = map_rx.borrow().clone();
            let own = map.members.values().find(|m| m.ip == ip);
            let public_key = engine
                .public_key()
                .map(|k| k.to_string())
                .unwrap_or_default();
            // A peer is listed once both the engine and the published map
            // know it: the engine is configured just before the map is
            // published, so for a moment it has a peer the map does not.
            let mut peers: Vec<PeerStatus> = engine
                .peers()
                .into_iter()
                .filter_map(|p| {
                    let m = map.members.get(&p.public_key)?;
                    Some(PeerStatus {
                        public_key: p.public_key.to_string(),
                        instance: m.instance.to_string(),
                        service: m.service.clone(),
                        ip: m.ip,
                        endpoint: p.endpoint,
                        last_handshake: p
                            .last_handshake
                            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                            .map(|d| d.as_secs()),
                        rx_bytes: p.rx_bytes,
                        tx_bytes: p.tx_bytes,
                        drops_spoofed: p.drops.spoofed_source,
                        state: m.state.as_str().to_owned(),
                        path: engine
                            .peer_path(&p.public_key)
                            .map(|s| crate::status::PathStatus::from(&s)),
                    })
                })
                .collect();
            // Offline members are no engine peers, but are listed.
            peers.extend(
                map.members
                    .values()
                    .filter(|m| !m.is_online() && m.ip != ip)
                    .map(|m| PeerStatus {
                        public_key: m.public_key.to_string(),
                        instance: m.instance.to_string(),
                        service: m.service.clone(),
                        ip: m.ip,
                        endpoint: None,
                        last_handshake: None,
                        rx_bytes: 0,
                        tx_bytes: 0,
                        drops_spoofed: 0,
                        state: m.state.as_str().to_owned(),
                        path: None,
                    }),
            );
            let control = control_state(
                ended.borrow().as_ref(),
                &connection.borrow(),
                *node_keyserver.borrow(),
                &keyserver,
            );
            // Kernel mode: the engine's flow table; userspace mode: the
            // loopback listeners of the service addresses. (Before the
            // struct below: it locks the applier too.)
            let report = match &stack {
                None => Some(engine.traffic()),
                Some(_) => applier
                    .lock()
                    .userspace
                    .as_ref()
                    .map(|u| u.services().traffic()),
            };
            let traffic = report.map(|r| crate::status::TrafficStatus {
                source: own.map(|m| m.service.clone()).unwrap_or_default(),
                pairs: r.pairs,
            });
            let conflicts = applier.lock().conflicts.clone();
            Status {
                ports: own.map(|m| m.ports.clone()).unwrap_or_default(),
                inbound_refused: stack.as_ref().map(|s| s.stats().inbound_refused),
                service_flows: stack.is_none().then(|| engine.flow_stats().into()),
                network: map.network.to_string(),
                instance: instance.clone(),
                ip: Some(ip),
                public_key,
                interface: interface.clone(),
                listen_port: engine.listen_port(),
                generation: map.generation,
                control: Some(control),
                conflicts,
                traffic,
                peers,
                dns_responses: Default::default(),
            }
        })
    }

    /// The keyserver addresses of the membership, for messages.
    fn keyserver(&self) -> String {
        StateDir::open(&self.config.state_dir)
            .ok()
            .and_then(|s| s.load_membership().ok().flatten())
            .map(|m| {
                let list: Vec<String> = m.control.addrs.iter().map(ToString::to_string).collect();
                list.join(", ")
            })
            .unwrap_or_default()
    }

    /// Follows the node until `shutdown` turns true (then stops gracefully:
    /// offline at the keyserver), the member leaves (control socket), or the
    /// keyserver ends the membership (an error). Every other trouble with
    /// the keyserver is retried by the node, the membership kept.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), AgentError> {
        let mut ended = self.node.watch_end();
        let mut requests = self.requests_rx.take().expect("run once");
        let mut ports_check = tokio::time::interval(PORTS_CHECK);
        ports_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut announced = crate::ports::announced_ports(&self.config, self.port_owner.as_ref());
        // Userspace mode reports its traffic per service from here (kernel
        // mode's node reports its engine's itself).
        let mut traffic_tick = tokio::time::interval(meshlib::traffic::REPORT_INTERVAL);
        traffic_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = loop {
            tokio::select! {
                _ = ended.changed() => {
                    let end = ended.borrow().clone();
                    match end {
                        Some(end @ (NodeEnd::Revoked { .. } | NodeEnd::Lost(_))) => {
                            break Err(AgentError::Ended(end))
                        }
                        Some(NodeEnd::Offline | NodeEnd::Left) => break Ok(()),
                        None => {}
                    }
                }
                _ = ports_check.tick() => {
                    let ports = crate::ports::announced_ports(&self.config, self.port_owner.as_ref());
                    if ports != announced {
                        tracing::info!(?ports, "served ports changed; telling the keyserver");
                        self.node.set_ports(ports.clone()).await;
                        announced = ports;
                    }
                }
                _ = traffic_tick.tick() => {
                    let report = self
                        .applier
                        .lock()
                        .userspace
                        .as_ref()
                        .map(|u| u.services().traffic());
                    if let Some(report) = report.filter(|r| !r.pairs.is_empty()) {
                        // The member core sends it only when it changed.
                        self.node.control_requests().report_traffic(report);
                    }
                }
                req = requests.recv() => match req {
                    Some(Request::RotateKey(reply)) => {
                        let answer = self.node.rotate_key().await
                            .map(|k| serde_json::json!({"ok": true, "public_key": k.to_string()}))
                            .map_err(|e| e.to_string());
                        let _ = reply.send(answer);
                    }
                    Some(Request::Leave(reply)) => {
                        self.teardown();
                        let left = self.node.leave().await;
                        let _ = reply.send(Ok(serde_json::json!({"ok": true, "confirmed": left})));
                        return Ok(());
                    }
                    None => {}
                },
                () = async { let _ = shutdown.wait_for(|s| *s).await; } => {
                    self.teardown();
                    self.node.shutdown().await;
                    return Ok(());
                }
            }
        };
        self.teardown();
        result
    }

    /// Takes down what the agent wrote: the hosts section, the resolver,
    /// the loopback listeners.
    fn teardown(&mut self) {
        let map = self.node.map();
        let mut a = self.applier.lock();
        a.ready = false;
        a.outputs.remove_hosts_section(&map);
        if self.config.dns.set_resolver {
            let _ = crate::resolver::restore(Path::new(RESOLV_CONF), &self.config.state_dir);
        }
        if let Some(u) = &mut a.userspace {
            u.stop();
        }
    }
}

/// The control connection as `sidecar status` shows it. `keyserver`: the
/// node's current or last keyserver; `addrs`: the membership's addresses
/// (when no keyserver was reached).
fn control_state(
    ended: Option<&NodeEnd>,
    connection: &Connection,
    keyserver: Option<std::net::SocketAddr>,
    addrs: &str,
) -> ControlState {
    let at = keyserver.map_or_else(|| addrs.to_owned(), |a| a.to_string());
    match (ended, connection) {
        (
            Some(NodeEnd::Revoked {
                revoked,
                keyserver: by,
            }),
            _,
        ) => ControlState::Revoked {
            reason: revoked.to_string(),
            revocation: revoked.reason.as_str().to_owned(),
            keyserver: by.map_or(at, |a| a.to_string()),
        },
        (Some(NodeEnd::Lost(s)), _) => ControlState::Connecting {
            attempt: 0,
            last_error: Some(format!("stopped: keyserver {at}: {s}")),
        },
        (_, Connection::Connected) => ControlState::Connected { server: at },
        (
            _,
            Connection::Connecting {
                attempt,
                last_error: Some(e @ (Setback::Refused(_) | Setback::Protocol(_))),
            },
        ) => ControlState::Retrying {
            attempt: *attempt,
            keyserver: at,
            reason: e.to_string(),
        },
        (
            _,
            Connection::Connecting {
                attempt,
                last_error,
            },
        ) => ControlState::Connecting {
            attempt: *attempt,
            last_error: last_error.as_ref().map(|e| format!("keyserver {at}: {e}")),
        },
        (_, Connection::Ended) => ControlState::Connecting {
            attempt: 0,
            last_error: Some("stopped".into()),
        },
    }
}

/// The machine's resolver configuration.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// `sidecar leave` on a stopped sidecar: resumes the stored membership only
/// to leave (no data plane), then forgets it. True when the keyserver
/// confirmed; an unknown membership counts as gone.
pub async fn leave_stopped(state_dir: &Path) -> Result<bool, AgentError> {
    let state = StateDir::open(state_dir)?;
    let Some(m) = state.load_membership()? else {
        return Err(AgentError::NoToken);
    };
    let bind = if m.control.addrs.first().is_some_and(|a| a.is_ipv6()) {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    };
    let endpoint = control::client_endpoint(bind.parse().expect("literal")).map_err(|e| {
        AgentError::Node(NodeError::Control {
            keyserver: String::new(),
            error: e,
        })
    })?;
    let map = NetworkMap::new(m.control.network, "", m.range);
    let mut session = control::start_resume(
        &endpoint,
        &m.control,
        map,
        vec![],
        vec![],
        &ClientConfig::default(),
    )
    .map_err(|e| {
        AgentError::Node(NodeError::Control {
            keyserver: String::new(),
            error: e,
        })
    })?;
    let left = session.leave(Duration::from_secs(15)).await;
    if left {
        state.forget_membership();
        tracing::info!("left the network");
    }
    Ok(left)
}

/// A network-derived message, safe to log.
pub fn esc(e: &impl std::fmt::Display) -> String {
    escape(&e.to_string()).into_owned()
}
