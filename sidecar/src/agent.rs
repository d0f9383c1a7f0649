//! `sidecar up` and `sidecar run`: join (or resume) the network, run the data
//! plane, and keep DNS, `/etc/hosts`, the env files and the engine's peers in
//! step with every network-map change.
//!
//! Tasks:
//! - **control**: one QUIC session to the keyserver; on loss, resume with
//!   backoff from the last applied generation. Every map it yields goes to
//!   the apply loop.
//! - **apply**: a map in, then outputs (DNS index, hosts, env), the engine's
//!   peers (by pure diff) and the map cache on disk.
//! - **dns**, **status**, **metrics**: servers reading shared state.
//!
//! Static stability: with a membership and a cached map in the state
//! directory, the data plane starts from the cache before the keyserver is
//! reached, and keeps running while it is away.
//!
//! Start-up checks everything it can (config, `warp.config.js`, paths,
//! ports) before the first join, so a bad value never costs a token use; a
//! first join whose outcome is unknown (connection lost or timed out after
//! sending it) or refused for a passing reason (`Busy`, `Internal`) is
//! retried with the same key (persisted before the first attempt) until it
//! succeeds or the sidecar is stopped.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ipnet::{IpNet, Ipv4Net};
use meshlib::control::{self, ClientConfig, ControlError, Event, MemberMeta, Session};
use meshlib::keys::PrivateKey;
use meshlib::names::NameIndex;
use meshlib::netmap::NetworkMap;
use meshlib::proto::{ErrorCode, JoinToken, TokenParseError};
use meshlib::reconcile::{desired_peers, diff, DesiredPeers};
use meshlib::render::text::escape;
use meshlib::wg::{uapi_server, Engine, EngineConfig, TunConfig, TunDevice, UapiServer};
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};

use crate::config::{Config, ConfigError, Mode};
use crate::outputs::{OutputConfig, Outputs};
use crate::ports::PortOwner;
use crate::state::{Membership, StateDir, StateError};
use crate::status::{ControlState, PeerStatus, Status, StatusSource};

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
    /// The keyserver refused for good (bad token, full network, ...), or
    /// the client could not be set up.
    #[error("{error} (keyserver {keyserver})")]
    Refused {
        /// The keyserver address(es) tried.
        keyserver: String,
        /// What went wrong.
        error: ControlError,
    },
    /// This member was removed from its network.
    #[error("revoked by the keyserver: {0}")]
    Revoked(String),
    /// The data plane could not start.
    #[error("data plane: {0}")]
    DataPlane(String),
    /// A local socket could not be opened.
    #[error("{what}: {error}")]
    Io {
        /// What was being opened.
        what: String,
        /// The system error.
        error: std::io::Error,
    },
    /// The membership file belongs to another key than the key file.
    #[error("the state directory's membership belongs to another key; move membership.json away to join anew")]
    KeyMismatch,
    /// The keyserver was never reached before shutdown, with nothing cached.
    #[error("stopped before the first join completed")]
    Interrupted,
}

/// How long to wait between reconnect attempts: doubling from 0.5 s to 15 s.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(500u64.saturating_mul(1 << attempt.min(5))).min(Duration::from_secs(15))
}

/// How often the session sends a heartbeat.
const HEARTBEAT: Duration = Duration::from_secs(10);
/// How often the served ports are looked for (`sidecar run`'s command may
/// start listening any time); a change is announced at once.
const PORTS_CHECK: Duration = Duration::from_secs(2);

/// The keyserver addresses, for messages.
fn addrs_text(addrs: &[SocketAddr]) -> String {
    let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    list.join(", ")
}

/// A network-derived message (an error from the keyserver), safe to log.
fn esc(e: &impl std::fmt::Display) -> String {
    escape(&e.to_string()).into_owned()
}

/// State shared between the tasks (status reads it).
struct Shared {
    control: Mutex<ControlState>,
    map: Mutex<NetworkMap>,
    conflicts: Mutex<Vec<String>>,
}

/// A running agent: the data plane and the tasks around it.
pub struct Agent {
    config: Config,
    state: StateDir,
    key: PrivateKey,
    membership: Membership,
    engine: Arc<Engine>,
    _uapi: UapiServer,
    shared: Arc<Shared>,
    outputs: Outputs,
    peers: DesiredPeers,
    names: watch::Receiver<Arc<NameIndex>>,
    /// Userspace mode's stack and loopback listeners (`None` in kernel mode).
    userspace: Option<crate::userspace::UserspacePlane>,
    /// `sidecar run`'s child, whose process tree's listeners are the
    /// served ports (when none are declared).
    port_owner: Option<PortOwner>,
}

impl Agent {
    /// Joins (or loads the membership), starts the engine from the best map
    /// available, and applies it once. Returns the agent and, when it just
    /// joined, the live session.
    pub async fn start(
        config: Config,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(Self, Option<Session>), AgentError> {
        // Everything that can be checked is, before a token is used.
        config.validate()?;
        let overrides = config.overrides()?;
        config.check_paths()?;
        preflight(&config)?;
        let state = StateDir::open(&config.state_dir)?;
        let stored = state.load_membership()?;
        // First start: the token must parse before anything is created.
        let token = match stored {
            Some(_) => None,
            None => Some(first_join_token(&config)?),
        };
        if token
            .as_ref()
            .is_some_and(|t| config.service.is_none() && t.service.is_none())
        {
            return Err(AgentError::NoService);
        }
        // The key is on disk before the first join attempt: a retried join
        // (the first one's outcome unknown) presents the same key.
        let (key, generated) = state.load_or_create_key()?;
        if generated {
            tracing::info!(public_key = %key.public_key(), "generated a new member key");
        }
        let (membership, map, session) = match (stored, token) {
            (Some(m), _) => {
                if m.control.public_key != key.public_key() {
                    return Err(AgentError::KeyMismatch);
                }
                let network = m.control.network;
                let map = state
                    .load_map()?
                    .filter(|map| map.network == network)
                    .unwrap_or_else(|| NetworkMap::new(network, "", m.range));
                (m, map, None)
            }
            (None, token) => {
                let token = token.ok_or(AgentError::NoToken)?;
                let session = first_join(&config, &token, &key, shutdown).await?;
                let (m, map) = membership_of(&session);
                state.save_membership(&m)?;
                (m, map, Some(session))
            }
        };
        let (engine, userspace) = match config.mode {
            Mode::Kernel => (start_engine(&config, &key, &membership)?, None),
            Mode::Userspace => {
                let (e, u) = crate::userspace::start(&config, &key, &membership)?;
                (e, Some(u))
            }
        };
        let uapi = match config.mode {
            Mode::Kernel => {
                UapiServer::start(engine.clone(), &uapi_server::socket_path(&config.interface))
                    .map_err(|e| AgentError::DataPlane(e.to_string()))?
            }
            Mode::Userspace => crate::userspace::start_uapi(engine.clone(), &config)?,
        };
        let (names_tx, names) = watch::channel(Arc::new(NameIndex::default()));
        let mut outputs = Outputs::new(
            OutputConfig {
                hosts_file: config.hosts_file.clone(),
                env_dir: config.env_files.then(|| config.state_dir.clone()),
                overrides,
            },
            names_tx,
        );
        if userspace.is_some() {
            outputs.set_address_map(crate::userspace::address_map(
                key.public_key(),
                config.loopback_octet,
            ));
        }
        let shared = Arc::new(Shared {
            control: Mutex::new(ControlState::Connecting {
                attempt: 0,
                last_error: None,
            }),
            map: Mutex::new(map.clone()),
            conflicts: Mutex::new(Vec::new()),
        });
        let mut agent = Agent {
            config,
            state,
            key,
            membership,
            engine,
            _uapi: uapi,
            shared,
            outputs,
            peers: DesiredPeers::new(),
            names,
            userspace,
            port_owner: None,
        };
        agent.apply(map);
        Ok((agent, session))
    }

    /// `sidecar run`: from now on the served ports (when none are
    /// declared) are those the process tree of the child stored in the
    /// returned cell listens on. Call before [`Agent::run`].
    pub fn port_owner(&mut self) -> PortOwner {
        self.port_owner
            .get_or_insert_with(PortOwner::default)
            .clone()
    }

    /// Applies one map: outputs, engine peers, cache.
    pub fn apply(&mut self, map: NetworkMap) {
        let report = self.outputs.apply(&map);
        if let Some(u) = &mut self.userspace {
            u.apply(&map);
        }
        *self.shared.conflicts.lock() = report.conflicts.iter().map(|c| c.to_string()).collect();
        let own = self.key.public_key();
        let prefer_v4 = true;
        let desired = desired_peers(&map, &own, self.config.persistent_keepalive, prefer_v4);
        for (peer, e) in self.engine.apply_diff(diff(&self.peers, &desired)) {
            tracing::warn!(%peer, error = %e, "cannot configure peer");
        }
        self.peers = desired;
        if map.generation > 0 {
            if let Err(e) = self.state.save_map(&map) {
                tracing::warn!(error = %e, "cannot cache the network map");
            }
        }
        tracing::info!(
            generation = map.generation,
            peers = self.peers.len(),
            "network map applied"
        );
        *self.shared.map.lock() = map;
    }

    /// The IST variables for `sidecar run`'s child.
    pub fn variables(&self) -> Vec<(String, String)> {
        self.outputs.variables(&self.shared.map.lock())
    }

    /// The name index the DNS server answers from.
    pub fn names(&self) -> watch::Receiver<Arc<NameIndex>> {
        self.names.clone()
    }

    /// A status snapshot source for `sidecar status` and metrics.
    pub fn status_source(&self) -> StatusSource {
        let (shared, engine) = (self.shared.clone(), self.engine.clone());
        let stack = self.userspace.as_ref().map(|u| u.stack());
        let own = self.key.public_key();
        let (interface, public_key) = (
            self.config.interface.clone(),
            self.key.public_key().to_string(),
        );
        let (instance, ip) = (self.membership.instance.to_string(), self.membership.ip);
        Arc::new(move || {
            let map = shared.map.lock().clone();
            let peers = engine
                .peers()
                .into_iter()
                .map(|p| {
                    let m = map.members.get(&p.public_key);
                    PeerStatus {
                        public_key: p.public_key.to_string(),
                        instance: m.map(|m| m.instance.to_string()).unwrap_or_default(),
                        service: m.map(|m| m.service.clone()).unwrap_or_default(),
                        ip: m.map_or(Ipv4Addr::UNSPECIFIED, |m| m.ip),
                        endpoint: p.endpoint,
                        last_handshake: p
                            .last_handshake
                            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                            .map(|d| d.as_secs()),
                        rx_bytes: p.rx_bytes,
                        tx_bytes: p.tx_bytes,
                        drops_spoofed: p.drops.spoofed_source,
                        path: engine
                            .peer_path(&p.public_key)
                            .map(|s| crate::status::PathStatus::from(&s)),
                    }
                })
                .collect();
            let ports = map
                .members
                .get(&own)
                .map(|m| m.ports.clone())
                .unwrap_or_default();
            Status {
                ports,
                inbound_refused: stack.as_ref().map(|s| s.stats().inbound_refused),
                network: map.network.to_string(),
                instance: instance.clone(),
                ip: Some(ip),
                public_key: public_key.clone(),
                interface: interface.clone(),
                listen_port: engine.listen_port(),
                generation: map.generation,
                control: Some(shared.control.lock().clone()),
                conflicts: shared.conflicts.lock().clone(),
                peers,
                dns_responses: Default::default(),
            }
        })
    }

    /// The endpoints to advertise: the configured ones, else every local
    /// non-loopback address (outside the overlay range) with our port.
    fn endpoints(&self) -> Vec<SocketAddr> {
        let local = advertised_endpoints(
            &self.config,
            self.engine.listen_port(),
            self.membership.range,
        );
        meshlib::nat::candidates(&self.engine, &local)
    }

    /// The ports the map holds for this member.
    fn own_ports(&self) -> Vec<u16> {
        let own = self.key.public_key();
        let map = self.shared.map.lock();
        map.members
            .get(&own)
            .map(|m| m.ports.clone())
            .unwrap_or_default()
    }

    /// Runs the control and apply loops until `shutdown` turns true, or the
    /// member is revoked.
    pub async fn run(
        mut self,
        session: Option<Session>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), AgentError> {
        let (maps_tx, mut maps_rx) = mpsc::channel::<NetworkMap>(16);
        let (config, port, range) = (
            self.config.clone(),
            self.engine.listen_port(),
            self.membership.range,
        );
        let nat_engine = self.engine.clone();
        let ctl = Controller {
            membership: self.membership.clone(),
            endpoints: Mutex::new(self.endpoints()),
            // NAT traversal: local addresses plus the engine's learned
            // candidates (STUN, relay) — `meshlib::nat::candidates`.
            detect: Box::new(move || {
                meshlib::nat::candidates(&nat_engine, &advertised_endpoints(&config, port, range))
            }),
            engine: self.engine.clone(),
            ports: Mutex::new(self.own_ports()),
            detect_ports: {
                let (config, owner) = (self.config.clone(), self.port_owner.clone());
                Box::new(move || crate::ports::announced_ports(&config, owner.as_ref()))
            },
            shared: self.shared.clone(),
            state: self.state.clone(),
        };
        let control = tokio::spawn(ctl.run(session, maps_tx, shutdown.clone()));
        let result = loop {
            tokio::select! {
                map = maps_rx.recv() => match map {
                    Some(map) => self.apply(map),
                    None => break control.await.unwrap_or(Ok(())),
                },
                _ = shutdown.changed() => break Ok(()),
            }
        };
        self.stop(result.is_err());
        result
    }

    /// Tears down: peers (on revocation), hosts section, resolver.
    fn stop(&mut self, revoked: bool) {
        let map = self.shared.map.lock().clone();
        self.outputs.remove_hosts_section(&map);
        if self.config.dns.set_resolver {
            let _ =
                crate::resolver::restore(std::path::Path::new(RESOLV_CONF), &self.config.state_dir);
        }
        if revoked {
            for key in self.peers.keys() {
                self.engine.remove_peer(key);
            }
            self.state.forget_membership();
        }
        if let Some(u) = &mut self.userspace {
            u.stop();
        }
        self.engine.shutdown();
    }
}

/// The machine's resolver configuration.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// The endpoints to advertise for `config` with the engine on `port`.
pub fn advertised_endpoints(config: &Config, port: u16, overlay: Ipv4Net) -> Vec<SocketAddr> {
    if !config.endpoints.is_empty() {
        return config.endpoints.clone();
    }
    let mut out: Vec<SocketAddr> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .map(|i| i.ip())
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
        .filter(|ip| match ip {
            IpAddr::V4(v4) => !overlay.contains(v4) && !v4.is_link_local(),
            IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
        })
        .map(|ip| SocketAddr::new(ip, port))
        .collect();
    out.sort_by_key(|a| (!a.is_ipv4(), *a));
    out.dedup();
    out.truncate(8);
    out
}

/// Creates the TUN interface with the member's address and starts the engine.
fn start_engine(
    config: &Config,
    key: &PrivateKey,
    m: &Membership,
) -> Result<Arc<Engine>, AgentError> {
    let mut tun_config = TunConfig::new(&config.interface);
    let addr = Ipv4Net::new(m.ip, m.range.prefix_len())
        .map_err(|e| AgentError::DataPlane(e.to_string()))?;
    tun_config.address = Some(IpNet::V4(addr));
    let tun = TunDevice::create(&tun_config).map_err(|e| {
        AgentError::DataPlane(format!("creating TUN interface {}: {e}", config.interface))
    })?;
    let engine = Engine::start(
        Arc::new(tun),
        EngineConfig {
            listen_port: config.listen_port,
            private_key: Some(key.clone()),
            fwmark: 0,
        },
    )
    .map_err(|e| AgentError::DataPlane(e.to_string()))?;
    tracing::info!(interface = %config.interface, address = %addr, port = engine.listen_port(), "data plane up");
    Ok(Arc::new(engine))
}

/// The QUIC client endpoint for the keyserver's family.
fn quic_endpoint(addrs: &[SocketAddr]) -> Result<quinn::Endpoint, ControlError> {
    let v6 = addrs.first().is_some_and(|a| a.is_ipv6());
    let bind: SocketAddr = if v6 { "[::]:0" } else { "0.0.0.0:0" }
        .parse()
        .expect("literal");
    control::client_endpoint(bind)
}

/// Whether a connection-level error is worth retrying (the keyserver may
/// come back).
fn transient(e: &ControlError) -> bool {
    matches!(
        e,
        ControlError::Connect(_)
            | ControlError::Connection(_)
            | ControlError::Timeout
            | ControlError::Frame(_)
    )
}

/// Whether a failed join may be tried again with the same token and key:
/// its outcome is unknown (no answer, connection lost or timed out after
/// the join was sent: the keyserver may have committed it, and gives the
/// membership back to the same token and key) or the refusal is passing
/// (`Busy`, `Internal`). Anything else (a bad, expired or used-up token, a
/// full network, a name taken) is final.
pub fn join_retryable(e: &ControlError) -> bool {
    match e {
        ControlError::Refused(p) => matches!(p.code, ErrorCode::Busy | ErrorCode::Internal),
        other => transient(other),
    }
}

/// The join token, parsed: from `token` or `token-file`.
fn first_join_token(config: &Config) -> Result<JoinToken, AgentError> {
    config
        .join_token()?
        .ok_or(AgentError::NoToken)?
        .parse()
        .map_err(AgentError::Token)
}

/// Checks, before joining, what only the system can say: the WireGuard and
/// DNS ports can be bound, and kernel mode has what it needs.
fn preflight(config: &Config) -> Result<(), AgentError> {
    let bad = |key, message: String| AgentError::Config(ConfigError::invalid(key, message));
    if config.listen_port != 0 {
        let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, config.listen_port));
        std::net::UdpSocket::bind(addr).map_err(|e| {
            bad(
                "listen-port",
                format!("UDP port {}: {e}", config.listen_port),
            )
        })?;
    }
    if config.dns.enabled {
        let listen = config.dns.listen;
        std::net::UdpSocket::bind(listen)
            .and_then(|_| std::net::TcpListener::bind(listen))
            .map_err(|e| bad("dns.listen", format!("{listen}: {e}")))?;
    }
    if config.mode == Mode::Kernel && !has_net_admin() {
        return Err(bad(
            "mode",
            "kernel mode needs CAP_NET_ADMIN and /dev/net/tun (run as root, or use --mode userspace)"
                .into(),
        ));
    }
    Ok(())
}

/// Whether this process may create a TUN interface: `CAP_NET_ADMIN` in its
/// effective set and `/dev/net/tun` present.
fn has_net_admin() -> bool {
    const CAP_NET_ADMIN: u32 = 12;
    let caps = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("CapEff:"))?;
            u64::from_str_radix(line.trim_start_matches("CapEff:").trim(), 16).ok()
        })
        .unwrap_or(0);
    caps & (1 << CAP_NET_ADMIN) != 0 && std::path::Path::new("/dev/net/tun").exists()
}

/// Joins with the token, retrying (with backoff, logging each attempt)
/// every failure [`join_retryable`] allows, until `shutdown`.
async fn first_join(
    config: &Config,
    token: &JoinToken,
    key: &PrivateKey,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Session, AgentError> {
    let keyserver = addrs_text(&token.addrs);
    let service = config
        .service
        .clone()
        .or_else(|| token.service.clone())
        .ok_or(AgentError::NoService)?;
    let process_type = match (&token.process_type, config.process_type.is_web()) {
        (Some(bound), true) => bound.clone(),
        _ => config.process_type.clone(),
    };
    let runner = config.runner.clone().unwrap_or_else(hostname);
    let port = if config.listen_port == 0 {
        51820
    } else {
        config.listen_port
    };
    let endpoints = advertised_endpoints(config, port, meshlib::ipam::DEFAULT_RANGE);
    let endpoint = quic_endpoint(&token.addrs).map_err(|error| AgentError::Refused {
        keyserver: keyserver.clone(),
        error,
    })?;
    let mut attempt = 0u32;
    loop {
        let meta = MemberMeta {
            public_key: key.public_key(),
            service: service.clone(),
            app_id: None,
            process_type: process_type.clone(),
            instance: config.instance.clone(),
            runner: runner.clone(),
            endpoints: endpoints.clone(),
            ports: crate::ports::announced_ports(config, None),
        };
        match control::join(&endpoint, token, meta, &ClientConfig::one_shot()).await {
            Ok(session) => {
                let w = session.welcome();
                tracing::info!(network = %w.network, ip = %w.ip, instance = %w.instance, %keyserver, "joined");
                return Ok(session);
            }
            Err(e) if join_retryable(&e) => {
                let wait = backoff(attempt);
                tracing::warn!(%keyserver, attempt = attempt + 1, retry_in = ?wait, error = %esc(&e), "join failed; retrying with the same key");
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = shutdown.changed() => return Err(AgentError::Interrupted),
                }
                attempt = attempt.saturating_add(1);
            }
            Err(error) => return Err(AgentError::Refused { keyserver, error }),
        }
    }
}

/// The membership and map a fresh join gives.
fn membership_of(session: &Session) -> (Membership, NetworkMap) {
    let w = session.welcome();
    let map = session.map().clone();
    let m = Membership {
        control: session.membership(),
        range: map.range,
        ip: w.ip,
        index: w.index,
        instance: w.instance.clone(),
    };
    (m, map)
}

/// This machine's hostname (the default runner label).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "runner".into())
}

/// The control task: one session at a time, resumed with backoff.
struct Controller {
    membership: Membership,
    /// The endpoints last advertised.
    endpoints: Mutex<Vec<SocketAddr>>,
    /// Finds the endpoints to advertise now (addresses may change).
    detect: Box<dyn Fn() -> Vec<SocketAddr> + Send + Sync>,
    /// The data plane (takes the STUN servers and relay ticket).
    engine: Arc<Engine>,
    /// The service ports last announced.
    ports: Mutex<Vec<u16>>,
    /// Finds the ports to announce now (the instance may start listening
    /// after the join).
    detect_ports: Box<dyn Fn() -> Vec<u16> + Send + Sync>,
    shared: Arc<Shared>,
    state: StateDir,
}

impl Controller {
    async fn run(
        self,
        mut session: Option<Session>,
        maps: mpsc::Sender<NetworkMap>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), AgentError> {
        let keyserver = addrs_text(&self.membership.control.addrs);
        let endpoint =
            quic_endpoint(&self.membership.control.addrs).map_err(|error| AgentError::Refused {
                keyserver: keyserver.clone(),
                error,
            })?;
        let mut attempt = 0u32;
        loop {
            let mut s = match session.take() {
                Some(s) => s,
                None => match self.resume(&endpoint).await {
                    Ok(s) => s,
                    // Busy and Internal are passing here too.
                    Err(e) if join_retryable(&e) => {
                        *self.shared.control.lock() = ControlState::Connecting {
                            attempt: attempt + 1,
                            last_error: Some(format!("keyserver {keyserver}: {e}")),
                        };
                        tracing::warn!(%keyserver, error = %esc(&e), attempt = attempt + 1, "keyserver unreachable; running from the cached map");
                        tokio::select! {
                            () = tokio::time::sleep(backoff(attempt)) => {}
                            _ = shutdown.changed() => return Ok(()),
                        }
                        attempt += 1;
                        continue;
                    }
                    Err(ControlError::Revoked(reason)) => return Err(self.revoked(reason)),
                    Err(ControlError::Refused(e))
                        if e.code == meshlib::proto::ErrorCode::Revoked
                            || e.code == meshlib::proto::ErrorCode::BadCredential =>
                    {
                        return Err(self.revoked(e.message))
                    }
                    Err(error) => return Err(AgentError::Refused { keyserver, error }),
                },
            };
            attempt = 0;
            let server = self
                .membership
                .control
                .addrs
                .first()
                .map(|a| a.to_string())
                .unwrap_or_default();
            *self.shared.control.lock() = ControlState::Connected { server };
            if maps.send(s.map().clone()).await.is_err() {
                return Ok(());
            }
            match self.follow(&mut s, &maps, &mut shutdown, &keyserver).await {
                Ok(true) => {
                    s.close();
                    return Ok(());
                }
                Ok(false) => {}
                Err(AgentError::Revoked(reason)) => return Err(self.revoked(reason)),
                Err(e) => return Err(e),
            }
            *self.shared.control.lock() = ControlState::Connecting {
                attempt: 1,
                last_error: Some("connection lost".into()),
            };
        }
    }

    /// Follows one session: forwards every new map. `Ok(true)` on shutdown,
    /// `Ok(false)` when the connection is lost.
    async fn follow(
        &self,
        s: &mut Session,
        maps: &mpsc::Sender<NetworkMap>,
        shutdown: &mut watch::Receiver<bool>,
        keyserver: &str,
    ) -> Result<bool, AgentError> {
        let mut beat = tokio::time::interval(HEARTBEAT);
        beat.tick().await;
        let mut endpoints_check = tokio::time::interval(Duration::from_secs(1));
        endpoints_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ports_check = tokio::time::interval(PORTS_CHECK);
        ports_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                ev = s.next_event() => match ev {
                    Ok(Event::Delta(_) | Event::Snapshot) => {
                        if maps.send(s.map().clone()).await.is_err() {
                            return Ok(true);
                        }
                    }
                    Ok(Event::Connection(c)) => {
                        *self.shared.control.lock() = match c {
                            control::Connection::Connected => ControlState::Connected { server: keyserver.to_owned() },
                            control::Connection::Connecting { attempt, last_error } => ControlState::Connecting { attempt, last_error },
                            control::Connection::Ended => continue,
                        };
                    }
                    Ok(Event::Ended(_)) => return Ok(true),
                    Ok(Event::Rejected(e)) => tracing::warn!(%keyserver, error = %esc(&e), "keyserver rejected a request"),
                    Ok(Event::Relay(info)) => meshlib::nat::use_relay_info(&self.engine, &info),
                    Ok(_) => {}
                    Err(ControlError::Revoked(reason)) => return Err(AgentError::Revoked(reason)),
                    Err(e) => {
                        tracing::warn!(%keyserver, error = %esc(&e), "control connection lost; data plane keeps running");
                        return Ok(false);
                    }
                },
                _ = beat.tick() => {
                    if s.heartbeat().await.is_err() {
                        return Ok(false);
                    }
                }
                _ = endpoints_check.tick() => {
                    // Candidates learned by the engine (STUN, relay) go out
                    // within a second.
                    let now = (self.detect)();
                    if now != *self.endpoints.lock() {
                        tracing::info!(endpoints = ?now, "candidates changed; telling the keyserver");
                        if s.update_endpoints(now.clone()).await.is_err() {
                            return Ok(false);
                        }
                        *self.endpoints.lock() = now;
                    }
                }
                _ = ports_check.tick() => {
                    let ports = (self.detect_ports)();
                    if ports != *self.ports.lock() {
                        tracing::info!(?ports, "service ports changed; telling the keyserver");
                        if s.update_ports(ports.clone()).await.is_err() {
                            return Ok(false);
                        }
                        *self.ports.lock() = ports;
                    }
                }
                _ = shutdown.changed() => return Ok(true),
            }
        }
    }

    async fn resume(&self, endpoint: &quinn::Endpoint) -> Result<Session, ControlError> {
        let map = self.shared.map.lock().clone();
        let cfg = ClientConfig::default();
        control::resume_membership(
            endpoint,
            &self.membership.control,
            map,
            (self.detect)(),
            &cfg,
        )
        .await
    }

    fn revoked(&self, reason: String) -> AgentError {
        tracing::error!(reason = %escape(&reason), "this member was revoked; tunnels are going down");
        *self.shared.control.lock() = ControlState::Revoked {
            reason: reason.clone(),
        };
        self.state.forget_membership();
        AgentError::Revoked(reason)
    }
}

/// Where the agent's local servers listen.
#[derive(Debug, Clone)]
pub struct LocalServers {
    /// The DNS address, if serving.
    pub dns: Option<SocketAddr>,
    /// The status socket.
    pub status: PathBuf,
    /// The metrics address, if serving.
    pub metrics: Option<SocketAddr>,
}

/// Starts DNS, the status socket and metrics for `agent`; they stop when
/// `shutdown` turns true. A port that cannot be bound is a warning (the
/// tunnels matter more), except DNS when it was asked for explicitly.
pub async fn start_servers(
    agent: &Agent,
    shutdown: watch::Receiver<bool>,
) -> Result<LocalServers, AgentError> {
    let config = &agent.config;
    let stop = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let mut dns = None;
    let dns_stats = Arc::new(crate::dns::DnsStats::default());
    if config.dns.enabled {
        let listen = config.dns.listen;
        let io = |what: &str| {
            let what = format!("{what} {listen}");
            move |error| AgentError::Io { what, error }
        };
        let udp = tokio::net::UdpSocket::bind(listen)
            .await
            .map_err(io("DNS (UDP) on"))?;
        let tcp = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(io("DNS (TCP) on"))?;
        let resolv = std::path::Path::new(RESOLV_CONF);
        let upstreams =
            crate::resolver::upstreams(&config.dns.upstreams, &config.state_dir, resolv, listen);
        if config.dns.set_resolver {
            if let Err(e) = crate::resolver::take_over(resolv, listen, &config.state_dir) {
                tracing::warn!(error = %e, "cannot point resolv.conf at the sidecar");
            }
        }
        let dns_config = crate::dns::DnsConfig {
            ttl: config.dns.ttl,
            upstreams,
            stats: dns_stats.clone(),
            ..crate::dns::DnsConfig::default()
        };
        tokio::spawn(crate::dns::serve(
            udp,
            tcp,
            agent.names(),
            dns_config,
            stop(shutdown.clone()),
        ));
        dns = Some(listen);
    }
    let status = config.status_socket_path();
    match crate::status::bind_status_socket(&status) {
        Ok(l) => {
            tokio::spawn(crate::status::serve_status(
                l,
                agent.status_source(),
                stop(shutdown.clone()),
            ));
        }
        Err(e) => tracing::warn!(path = %status.display(), error = %e, "no status socket"),
    }
    let mut metrics = None;
    if let Some(addr) = config.metrics {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => {
                metrics = l.local_addr().ok();
                tokio::spawn(crate::status::serve_metrics(
                    l,
                    crate::dns::with_stats(agent.status_source(), dns_stats.clone()),
                    stop(shutdown),
                ));
            }
            Err(e) => tracing::warn!(%addr, error = %e, "no metrics listener"),
        }
    }
    Ok(LocalServers {
        dns,
        status,
        metrics,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_are_retried_only_when_the_outcome_is_unknown_or_passing() {
        use meshlib::proto::ProtoError;
        let refused = |code| {
            ControlError::Refused(ProtoError {
                code,
                message: "x".into(),
            })
        };
        for e in [
            ControlError::Timeout,
            ControlError::Connect("no route".into()),
            ControlError::Connection("reset after the join was sent".into()),
            refused(ErrorCode::Busy),
            refused(ErrorCode::Internal),
        ] {
            assert!(join_retryable(&e), "{e}");
        }
        for code in [
            ErrorCode::InvalidToken,
            ErrorCode::TokenExpired,
            ErrorCode::TokenUsedUp,
            ErrorCode::TokenBinding,
            ErrorCode::NetworkFull,
            ErrorCode::KeyInUse,
            ErrorCode::InstanceTaken,
            ErrorCode::InvalidMetadata,
            ErrorCode::UnsupportedVersion,
        ] {
            assert!(!join_retryable(&refused(code)), "{code:?}");
        }
        assert!(!join_retryable(&ControlError::Protocol("x".into())));
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(0), Duration::from_millis(500));
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(30), Duration::from_secs(15));
    }

    #[test]
    fn advertised_endpoints_skip_loopback_and_overlay() {
        let mut c = Config::default();
        let eps = advertised_endpoints(&c, 51820, meshlib::ipam::DEFAULT_RANGE);
        assert!(eps
            .iter()
            .all(|e| !e.ip().is_loopback() && e.port() == 51820));
        c.endpoints = vec!["192.0.2.1:1".parse().unwrap()];
        assert_eq!(
            advertised_endpoints(&c, 51820, meshlib::ipam::DEFAULT_RANGE),
            c.endpoints
        );
    }
}
