//! `sidecar gateway`: a mesh member of one network (a join token) or of
//! every network of a gateway credential's scope that has service groups,
//! serving every published port of every group (seed 002) on its public
//! addresses, following the keyserver's pushes with no restart. Several
//! networks share the public ports: a connection goes to a group by port,
//! then SNI or `Host` (unique across networks), and a TLS connection made
//! for one network's name never carries a request to another's (421).
//! Several gateways can serve one network (each balances and counts on its
//! own).
//!
//! ## Layout
//! - [`certs`] — the certificates of TLS ports: per SNI, reloaded on
//!   change, self-signed ECDSA P-256 on request.
//! - [`fleet`] — a gateway credential: every network of its scope, one
//!   membership each, followed without a restart.
//! - [`member`] — joining, following the map, reaching instances
//!   ([`member::Dialer`]); the one file that knows how the gateway is a member.
//! - [`balance`] — the pure balancer of one group: limits, queue, health.
//! - [`routes`] — groups at run time: which group a connection is for,
//!   slots, dials with retries, wake hooks.
//! - [`http`] — HTTP mode (ports 80 and 443): reverse proxy, redirect,
//!   WebSocket upgrades.
//! - [`idle`] — deadlines of HTTP connections: the first request's, then
//!   the idle timeout (pure).
//! - [`upstream`] — kept-alive HTTP/1.1 connections to instances, a
//!   bounded idle pool per instance.
//! - [`tcp`] — TCP mode (other TCP ports): TLS terminated, bytes both ways.
//! - [`udp`] — UDP ports: per-client flows with an idle timeout.
//! - [`wake`] — scale to zero: the wake hook (command or URL).
//! - [`metrics`] — per group and per instance counters, Prometheus text.
//!
//! Which port does what follows from seed 002's rules: port 80 is plain
//! HTTP (proxy, or redirect per group), 443 is TLS + HTTP, every other TCP
//! port is TLS + TCP; UDP ports are served on the address they name.

pub use meshlib::balance;
pub mod certs;
pub mod fleet;
mod front;
pub mod h1;
pub mod http;
pub mod idle;
pub mod member;
pub mod metrics;
pub mod routes;
pub mod tcp;
pub mod udp;
pub mod upstream;
pub mod wake;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use meshlib::netmap::NetworkMap;
use meshlib::proto::JoinToken;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use member::{Dialer, MemberSettings, Membership};
use routes::{Listen, RouteSettings, Routes};

/// `sidecar gateway` flags (and `ISTM_GATEWAY_*` variables).
#[derive(Debug, Clone, clap::Args)]
pub struct GatewayArgs {
    /// Join token of the network to serve (visible in `ps`: prefer
    /// --token-file or ISTM_TOKEN).
    #[arg(long, env = "ISTM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the join token.
    #[arg(long, env = "ISTM_TOKEN_FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// A gateway credential (`istg1.`, `keyserver api-token create --role
    /// gateway`) instead of a join token: the gateway serves every network
    /// of the credential's scope that has service groups, joining each
    /// (userspace data plane) and picking up new ones without a restart.
    /// Visible in `ps`: prefer --gateway-token-file.
    #[arg(long, env = "ISTM_GATEWAY_TOKEN", hide_env_values = true)]
    pub gateway_token: Option<String>,
    /// File holding the gateway credential.
    #[arg(
        long,
        env = "ISTM_GATEWAY_TOKEN_FILE",
        conflicts_with = "gateway_token"
    )]
    pub gateway_token_file: Option<PathBuf>,
    /// With a gateway credential: how often the keyserver is asked which
    /// networks to serve (a new network or one that lost its last group
    /// shows within it).
    #[arg(
        long,
        env = "ISTM_GATEWAY_NETWORKS_INTERVAL",
        default_value = "5s",
        value_parser = humantime::parse_duration
    )]
    pub networks_interval: Duration,
    /// Public address to serve on (repeat; default 0.0.0.0, every address).
    #[arg(long = "listen", env = "ISTM_GATEWAY_LISTEN", value_delimiter = ',')]
    pub listen: Vec<IpAddr>,
    /// Certificate chain (PEM) for TLS ports: the platform's wildcard for
    /// the service domain, shown for every name no other certificate covers.
    #[arg(long, env = "ISTM_GATEWAY_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of the certificate.
    #[arg(long, env = "ISTM_GATEWAY_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Directory of certificates picked by SNI (groups' own, or more
    /// platform ones): each `NAME.crt` with `NAME.key`, or a `NAME.pem`
    /// holding both. A certificate serves the names it holds; one naming
    /// the SNI exactly wins over a wildcard, and over `--tls-cert`.
    #[arg(long, env = "ISTM_GATEWAY_TLS_CERT_DIR")]
    pub tls_cert_dir: Option<PathBuf>,
    /// Make a self-signed ECDSA P-256 certificate for each group FQDN no
    /// file covers (development; clients must trust it explicitly).
    #[arg(long, env = "ISTM_GATEWAY_TLS_SELF_SIGNED")]
    pub tls_self_signed: bool,
    /// How often certificate files are checked for changes (they are also
    /// read again at once on SIGHUP); new handshakes get the new ones.
    #[arg(
        long,
        env = "ISTM_GATEWAY_TLS_RELOAD_INTERVAL",
        default_value = "5s",
        value_parser = humantime::parse_duration
    )]
    pub tls_reload_interval: Duration,
    /// Service name the gateway joins as.
    #[arg(long, default_value = "gateway")]
    pub service: String,
    /// Wanted instance name (default: assigned).
    #[arg(long)]
    pub instance: Option<meshlib::ids::InstanceName>,
    /// TUN interface of the gateway's membership (kernel mode), and its
    /// UAPI socket's name.
    #[arg(long, default_value = "istmgw0")]
    pub interface: String,
    /// kernel (TUN, needs CAP_NET_ADMIN) or userspace (no privileges for
    /// the data plane; public ports below 1024 still need them).
    #[arg(long, env = "ISTM_MODE", default_value = "kernel")]
    pub mode: crate::config::Mode,
    /// WireGuard UDP port.
    #[arg(long, default_value_t = 51820)]
    pub listen_port: u16,
    /// Underlay endpoint to advertise (repeat; default: local addresses).
    #[arg(long = "endpoint", value_delimiter = ',')]
    pub endpoints: Vec<SocketAddr>,
    /// Prometheus metrics address (`GET /metrics`), or "off".
    #[arg(long, default_value = "127.0.0.1:9478")]
    pub metrics: String,
    /// Interval of active health checks (a TCP connect to each online
    /// instance's port through the mesh).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub health_interval: Duration,
    /// Time a connect to an instance may take (health checks and traffic).
    /// Longer than the kernel's first SYN retransmission (1 s), so one
    /// SYN lost (a path being set up) does not mark an instance down.
    #[arg(long, default_value = "1500ms", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
    /// Longest wait in a group's queue (all instances at their soft limit).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub queue_timeout: Duration,
    /// The share of a group's slots (`hard_limit` per online instance) one
    /// client address may hold at once, in percent: past it, the client's
    /// next connection waits (as in the queue) until one of its own ends,
    /// or is refused after the queue timeout, so one client cannot lock
    /// others out with idle connections or WebSockets. 100 (the default)
    /// is no share: the group's limits alone, as seed 002 defines them;
    /// many users behind one NAT address share one client address.
    #[arg(
        long,
        env = "ISTM_GATEWAY_CLIENT_SHARE",
        default_value_t = 100,
        value_parser = clap::value_parser!(u8).range(1..=100)
    )]
    pub client_share: u8,
    /// A UDP flow ends after this long without a datagram.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub udp_idle_timeout: Duration,
    /// Time allowed for a TLS handshake, for an HTTP request head, and for
    /// the first request of an HTTP connection to arrive (on port 80 this
    /// covers HTTP/2 detection, the preface and SETTINGS): a connection
    /// that sends nothing, or only part of that, is closed.
    #[arg(
        long,
        env = "ISTM_GATEWAY_HANDSHAKE_TIMEOUT",
        default_value = "10s",
        value_parser = humantime::parse_duration
    )]
    pub handshake_timeout: Duration,
    /// An HTTP connection (HTTP/1.1 keep-alive or HTTP/2) with no request
    /// in flight is closed after this long.
    #[arg(
        long,
        env = "ISTM_GATEWAY_IDLE_TIMEOUT",
        default_value = "60s",
        value_parser = humantime::parse_duration
    )]
    pub idle_timeout: Duration,
    /// Most connections open at once from one client address (IPv6: one
    /// /64), on every TCP port; a connection past it is closed at once
    /// (and counted), so that one client cannot hold every connection.
    #[arg(
        long,
        env = "ISTM_GATEWAY_MAX_CONNECTIONS_PER_CLIENT",
        default_value_t = 1024
    )]
    pub max_connections_per_client: usize,
    /// Idle HTTP/1.1 connections kept per instance for the next requests
    /// (past it, a finished connection is closed).
    #[arg(long, default_value_t = 256)]
    pub upstream_idle_per_instance: usize,
    /// An idle kept connection to an instance is closed after this long.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub upstream_idle_timeout: Duration,
    /// Largest HTTP request head, bytes (past it: 431 / stream reset).
    #[arg(long, default_value_t = 65_536)]
    pub max_header_bytes: usize,
    /// Most client connections open at once (more wait to be accepted).
    #[arg(long, default_value_t = 16_384)]
    pub max_connections: usize,
    /// Let groups' command wake hooks run on this host.
    #[arg(long)]
    pub allow_wake_commands: bool,
}

/// Why the gateway failed.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A flag or file is unusable.
    #[error("{0}")]
    Config(String),
    /// Joining or the data plane failed.
    #[error(transparent)]
    Member(#[from] member::MemberError),
}

/// The TLS configurations: HTTP mode (ALPN h2, http/1.1) and TCP mode,
/// over one set of certificates.
struct Tls {
    http: Arc<rustls::ServerConfig>,
    tcp: Arc<rustls::ServerConfig>,
    certs: Arc<certs::Certs>,
}

/// The certificate sources the flags name.
fn cert_sources(args: &GatewayArgs) -> Result<certs::CertSources, GatewayError> {
    let default = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some((c.clone(), k.clone())),
        (None, None) => None,
        _ => {
            return Err(GatewayError::Config(
                "give both --tls-cert and --tls-key".into(),
            ))
        }
    };
    if let Some(dir) = &args.tls_cert_dir {
        if !dir.is_dir() {
            return Err(GatewayError::Config(format!(
                "tls-cert-dir {}: not a directory",
                dir.display()
            )));
        }
    }
    Ok(certs::CertSources {
        default,
        dir: args.tls_cert_dir.clone(),
        self_signed: args.tls_self_signed,
    })
}

/// Loads the certificates (`None`: no source, no TLS port).
fn load_tls(sources: certs::CertSources) -> Result<Option<Tls>, GatewayError> {
    if !sources.any() {
        return Ok(None);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = Arc::new(
        certs::Certs::load(sources, provider.clone())
            .map_err(|e| GatewayError::Config(e.to_string()))?,
    );
    // Resumption for returning clients without a full handshake (no
    // certificate, no signature): stateless tickets under keys that rotate
    // every 6 hours (rustls' `Ticketer`), as nginx and Go's crypto/tls
    // issue them, so it holds for any number of clients; rustls' default is
    // a 256-entry in-memory cache, which a busy gateway's clients outrun.
    // One ticket per connection (rustls sends two by default): a client
    // keeps only the newest anyway.
    let ticketer = rustls::crypto::ring::Ticketer::new()
        .map_err(|e| GatewayError::Config(format!("TLS session tickets: {e}")))?;
    let build = |alpn: Vec<Vec<u8>>| -> Result<Arc<rustls::ServerConfig>, GatewayError> {
        // TLS 1.2 and 1.3, as the README says (and nginx's default); the
        // `tls12` feature of rustls must be on for the first.
        let mut c = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| GatewayError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(certs::Resolver(certs.clone())));
        c.alpn_protocols = alpn;
        c.ticketer = ticketer.clone();
        c.send_tls13_tickets = 1;
        Ok(Arc::new(c))
    };
    Ok(Some(Tls {
        http: build(vec![b"h2".to_vec(), b"http/1.1".to_vec()])?,
        tcp: build(vec![])?,
        certs,
    }))
}

/// Reads certificate files again when they change: every `interval`, and
/// at once on SIGHUP.
async fn reload_loop(certs: Arc<certs::Certs>, interval: Duration) {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Some(()) = async {
                match hup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            } => tracing::info!("SIGHUP: reading certificates again"),
        }
        let c = certs.clone();
        let _ = tokio::task::spawn_blocking(move || c.reload_if_changed()).await;
    }
}

/// The token from the flag or its file.
fn token(args: &GatewayArgs) -> Result<JoinToken, GatewayError> {
    let text = match (&args.token, &args.token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(path)) => {
            meshlib::fsutil::read_text_limited(path, meshlib::fsutil::MAX_SMALL_FILE)
                .map_err(|e| GatewayError::Config(format!("token-file: {e}")))?
        }
        (None, None) => {
            return Err(GatewayError::Config(
                "a join token is needed (--token-file, ISTM_TOKEN or --token)".into(),
            ))
        }
    };
    text.trim()
        .parse()
        .map_err(|e| GatewayError::Config(format!("token: {e}")))
}

/// Client connections per address, under a budget.
struct ClientBudget(parking_lot::Mutex<meshlib::admission::PerSource>);

/// A client connection's place in its address's budget; freed on drop.
struct ClientPlace {
    budget: Arc<ClientBudget>,
    source: IpAddr,
}

impl ClientBudget {
    /// A place for a new connection from `ip`, or `None` past the budget.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<ClientPlace> {
        let source = self.0.lock().try_add(ip)?;
        Some(ClientPlace {
            budget: self.clone(),
            source,
        })
    }
}

impl Drop for ClientPlace {
    fn drop(&mut self) {
        self.budget.0.lock().remove(self.source);
    }
}

/// Everything the listeners share.
struct Shared {
    routes: Arc<Routes>,
    http: Arc<http::HttpCtx>,
    tcp: Option<Arc<tcp::TcpCtx>>,
    tls_http: Option<Arc<rustls::ServerConfig>>,
    udp: Arc<udp::UdpCtx>,
    public: Vec<IpAddr>,
    limit: Arc<Semaphore>,
    clients: Arc<ClientBudget>,
}

/// How often the gateway looks whether its load per service group changed.
const LOAD_CHECK: Duration = Duration::from_secs(1);

/// Runs the gateway until `shutdown` turns true, then leaves the network.
pub async fn run(
    args: GatewayArgs,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), GatewayError> {
    let tls = load_tls(cert_sources(&args)?)?;
    let metrics_addr: Option<SocketAddr> = match args.metrics.as_str() {
        "off" | "" => None,
        a => Some(a.parse().map_err(|_| {
            GatewayError::Config(format!("--metrics: {a:?} is neither ip:port nor \"off\""))
        })?),
    };
    if let Some(credential) = gateway_credential(&args)? {
        return fleet::run(args, credential, tls, metrics_addr, shutdown).await;
    }
    let token = token(&args)?;
    let membership = Membership::start(MemberSettings {
        token,
        service: args.service.clone(),
        instance: args.instance.clone(),
        interface: args.interface.clone(),
        listen_port: args.listen_port,
        endpoints: args.endpoints.clone(),
        userspace: args.mode == crate::config::Mode::Userspace,
    })
    .await?;
    let served = Served::of(&membership);
    let (_keep, networks) = watch::channel(BTreeMap::from([(served.id, Arc::new(served))]));
    let result = serve(&args, tls, metrics_addr, networks, false, &mut shutdown).await;
    membership.leave().await;
    result
}

/// One network the gateway serves: its map, how its instances are
/// reached, and its line to the keyserver.
pub struct Served {
    /// The network.
    pub id: meshlib::ids::NetworkId,
    /// Its name (logs, metrics).
    pub name: String,
    /// How its instances are reached.
    pub dialer: Arc<dyn Dialer>,
    /// Its map, as the keyserver pushes it.
    pub maps: watch::Receiver<Arc<NetworkMap>>,
    /// The membership's requests to the keyserver (the gateway's load per
    /// group goes with its traffic report); `None` for embedders.
    pub control: Option<meshlib::node::ControlRequests>,
    /// The gateway's instance in the network: the network's gateways
    /// split each group's limits ([`member::fleet_share`]); `None`: this
    /// gateway counts alone.
    pub me: Option<meshlib::ids::InstanceName>,
}

impl Served {
    /// The network of a running membership.
    pub fn of(m: &Membership) -> Self {
        let map = m.map.borrow().clone();
        Self {
            id: map.network,
            name: map.name.clone(),
            dialer: m.dialer(),
            maps: m.map.clone(),
            control: Some(m.control_requests()),
            me: Some(m.instance()),
        }
    }
}

/// The gateway credential from its flag, variable or file, if given.
fn gateway_credential(
    args: &GatewayArgs,
) -> Result<Option<meshlib::proto::GatewayToken>, GatewayError> {
    let text = match (&args.gateway_token, &args.gateway_token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(path)) => {
            meshlib::fsutil::read_text_limited(path, meshlib::fsutil::MAX_SMALL_FILE)
                .map_err(|e| GatewayError::Config(format!("gateway-token-file: {e}")))?
        }
        (None, None) => return Ok(None),
    };
    if args.token.is_some() || args.token_file.is_some() {
        return Err(GatewayError::Config(
            "give a join token (one network) or a gateway credential (every network of its scope), not both".into(),
        ));
    }
    text.trim()
        .parse()
        .map(Some)
        .map_err(|e| GatewayError::Config(format!("gateway credential: {e}")))
}

/// Serves the groups of the maps arriving on `maps` until `shutdown`.
/// Public for tests and embedders that bring their own membership.
pub async fn serve_maps(
    args: &GatewayArgs,
    dialer: Arc<dyn Dialer>,
    maps: watch::Receiver<Arc<NetworkMap>>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), GatewayError> {
    let tls = load_tls(cert_sources(args)?)?;
    let map = maps.borrow().clone();
    let served = Served {
        id: map.network,
        name: map.name.clone(),
        dialer,
        maps,
        control: None,
        me: None,
    };
    let (_keep, networks) = watch::channel(BTreeMap::from([(served.id, Arc::new(served))]));
    serve(args, tls, None, networks, false, shutdown).await
}

/// A task aborted when this is dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Follows one network's map into the routes until its membership ends
/// (said on `ended`) or the task is aborted (the network is no longer
/// served); tells the listeners' loop through `dirty` after each change.
async fn follow(
    served: Arc<Served>,
    routes: Arc<Routes>,
    dirty: Arc<tokio::sync::Notify>,
    ended: tokio::sync::mpsc::UnboundedSender<meshlib::ids::NetworkId>,
) {
    // Live connections per group, for the keyserver's API and console:
    // handed to the node when they change (it sends them with its traffic
    // report, every 10 s at most).
    let _loads = served.control.clone().map(|control| {
        let (routes, network) = (routes.clone(), served.id);
        AbortOnDrop(tokio::spawn(async move {
            let mut tick = tokio::time::interval(LOAD_CHECK);
            let mut last = None;
            loop {
                tick.tick().await;
                let loads = routes.group_loads(network);
                if last.as_ref() != Some(&loads) && control.report_groups(loads.clone()) {
                    last = Some(loads);
                }
            }
        }))
    });
    let mut maps = served.maps.clone();
    loop {
        let map = maps.borrow_and_update().clone();
        routes.apply(&map, &served.name, &served.dialer, served.me.as_ref());
        tracing::info!(
            network = %served.name,
            generation = map.generation,
            groups = map.services.len(),
            "service groups applied"
        );
        dirty.notify_one();
        if maps.changed().await.is_err() {
            let _ = ended.send(served.id);
            return;
        }
    }
}

async fn serve(
    args: &GatewayArgs,
    tls: Option<Tls>,
    metrics_addr: Option<SocketAddr>,
    mut networks: watch::Receiver<BTreeMap<meshlib::ids::NetworkId, Arc<Served>>>,
    multi: bool,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), GatewayError> {
    let routes = Arc::new(if multi {
        Routes::multi()
    } else {
        Routes::default()
    });
    let certs = tls.as_ref().map(|t| t.certs.clone());
    if let Some(c) = &certs {
        let r = routes.clone();
        c.set_group_names(Box::new(move |name| r.has_name(name)));
    }
    let reload = certs
        .clone()
        .map(|c| tokio::spawn(reload_loop(c, args.tls_reload_interval)));
    let settings = RouteSettings {
        queue_timeout: args.queue_timeout,
        client_share: args.client_share,
        connect_timeout: args.connect_timeout,
        allow_wake_commands: args.allow_wake_commands,
    };
    let upstreams = Arc::new(upstream::Upstreams::new(
        args.upstream_idle_per_instance,
        args.upstream_idle_timeout,
    ));
    let shared = Arc::new(Shared {
        routes: routes.clone(),
        http: Arc::new(http::HttpCtx {
            routes: routes.clone(),
            settings: settings.clone(),
            upstreams: upstreams.clone(),
            max_header_bytes: args.max_header_bytes,
            header_timeout: args.handshake_timeout,
            idle_timeout: args.idle_timeout,
            certs: certs.clone(),
        }),
        tcp: tls.as_ref().map(|t| {
            Arc::new(tcp::TcpCtx {
                routes: routes.clone(),
                settings: settings.clone(),
                tls: t.tcp.clone(),
                handshake_timeout: args.handshake_timeout,
            })
        }),
        tls_http: tls.as_ref().map(|t| t.http.clone()),
        udp: Arc::new(udp::UdpCtx {
            routes: routes.clone(),
            settings,
            idle_timeout: args.udp_idle_timeout,
        }),
        public: if args.listen.is_empty() {
            vec![IpAddr::from([0, 0, 0, 0])]
        } else {
            args.listen.clone()
        },
        limit: Arc::new(Semaphore::new(args.max_connections.max(1))),
        clients: Arc::new(ClientBudget(parking_lot::Mutex::new(
            meshlib::admission::PerSource::new(args.max_connections_per_client),
        ))),
    });
    let sweep = tokio::spawn(async move {
        let mut tick = tokio::time::interval(upstreams.sweep_interval());
        loop {
            tick.tick().await;
            upstreams.sweep();
        }
    });
    let metrics_task = match metrics_addr {
        Some(addr) => Some(serve_metrics(addr, routes.clone(), certs.clone()).await?),
        None => None,
    };
    let health = tokio::spawn(health_loop(
        routes.clone(),
        args.health_interval,
        args.connect_timeout,
    ));
    let mut listeners: BTreeMap<Listen, Vec<JoinHandle<()>>> = BTreeMap::new();
    // One follower per network served (its task ends the network's part).
    let mut followers: BTreeMap<meshlib::ids::NetworkId, AbortOnDrop> = BTreeMap::new();
    let dirty = Arc::new(tokio::sync::Notify::new());
    let (ended_tx, mut ended) = tokio::sync::mpsc::unbounded_channel();
    let mut networks_changed = true;
    loop {
        if std::mem::take(&mut networks_changed) {
            let set = networks.borrow_and_update().clone();
            followers.retain(|id, _| {
                let keep = set.contains_key(id);
                if !keep {
                    routes.remove_network(*id);
                    tracing::info!(network = %id, "network no longer served");
                }
                keep
            });
            for (id, served) in set {
                followers.entry(id).or_insert_with(|| {
                    AbortOnDrop(tokio::spawn(follow(
                        served,
                        routes.clone(),
                        dirty.clone(),
                        ended_tx.clone(),
                    )))
                });
            }
            reconcile(&shared, &mut listeners).await;
        }
        tokio::select! {
            r = networks.changed() => match r {
                Ok(()) => networks_changed = true,
                Err(_) => break,
            },
            () = dirty.notified() => reconcile(&shared, &mut listeners).await,
            Some(id) = ended.recv() => {
                // One network (a join token): its membership ended, so
                // does the gateway. Several: the credential's manager
                // joins it again.
                if !multi {
                    tracing::warn!(network = %id, "the gateway's membership ended");
                    break;
                }
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(followers);
    for (_, tasks) in listeners {
        for t in tasks {
            t.abort();
        }
    }
    health.abort();
    sweep.abort();
    if let Some(t) = reload {
        t.abort();
    }
    if let Some(t) = metrics_task {
        t.abort();
    }
    Ok(())
}

/// Opens the listeners the groups need and closes those they no longer do
/// (connections already accepted carry on).
async fn reconcile(shared: &Arc<Shared>, listeners: &mut BTreeMap<Listen, Vec<JoinHandle<()>>>) {
    let local: Vec<IpAddr> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .map(|i| i.ip())
        .collect();
    let want: BTreeSet<Listen> = shared.routes.listeners(&shared.public, &local);
    listeners.retain(|key, tasks| {
        let keep = want.contains(key);
        if !keep {
            tracing::info!(listener = ?key, "no group publishes this port any more: closed");
            for t in tasks.iter() {
                t.abort();
            }
        }
        keep
    });
    for key in want {
        if listeners.contains_key(&key) {
            continue;
        }
        match open(shared, key).await {
            Ok(tasks) => {
                tracing::info!(listener = ?key, "serving");
                listeners.insert(key, tasks);
            }
            // Retried at the next map change.
            Err(e) => tracing::warn!(listener = ?key, error = %e, "cannot serve this port"),
        }
    }
}

/// Binds one listener (every public address for TCP) and spawns its loops.
async fn open(shared: &Arc<Shared>, key: Listen) -> std::io::Result<Vec<JoinHandle<()>>> {
    match key {
        Listen::Udp(ip, port) => {
            let sock = tokio::net::UdpSocket::bind(SocketAddr::new(ip, port)).await?;
            let ctx = shared.udp.clone();
            Ok(vec![tokio::spawn(udp::serve(ctx, sock, ip, port))])
        }
        Listen::Tcp(port) => {
            if port != 80 && shared.tcp.is_none() || port == 443 && shared.tls_http.is_none() {
                return Err(std::io::Error::other(
                    "a TLS port needs a certificate (--tls-cert and --tls-key, --tls-cert-dir or --tls-self-signed)",
                ));
            }
            let mut tasks = Vec::new();
            for ip in &shared.public {
                let l = TcpListener::bind(SocketAddr::new(*ip, port)).await?;
                tasks.push(tokio::spawn(accept_loop(shared.clone(), l, port)));
            }
            Ok(tasks)
        }
    }
}

/// Accepts connections on a TCP port and hands them to their mode.
async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, port: u16) {
    loop {
        let Ok(permit) = shared.limit.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(port, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(place) = shared.clients.admit(peer.ip()) else {
            // Past its address's budget: closed at once, counted.
            shared
                .routes
                .gateway
                .refused_per_client
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!(%peer, port, "client address at its connection budget; closed");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            match port {
                80 => {
                    http::serve(
                        shared.http.clone(),
                        stream,
                        peer,
                        port,
                        http::Alpn::Detect,
                        None,
                    )
                    .await
                }
                443 => {
                    let Some(cfg) = shared.tls_http.clone() else {
                        return;
                    };
                    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
                    match tokio::time::timeout(shared.http.header_timeout, acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(tls)) => {
                            let alpn = match tls.get_ref().1.alpn_protocol() {
                                Some(b"h2") => http::Alpn::H2,
                                _ => http::Alpn::Http1,
                            };
                            let sni = tls.get_ref().1.server_name().map(str::to_owned);
                            http::serve(shared.http.clone(), tls, peer, port, alpn, sni).await;
                        }
                        _ => tracing::debug!(%peer, "TLS handshake failed or timed out; closed"),
                    }
                }
                _ => {
                    if let Some(ctx) = shared.tcp.clone() {
                        tcp::serve(ctx, stream, peer, port).await;
                    }
                }
            }
            drop(place);
            drop(permit);
        });
    }
}

/// Active health checks: every `interval`, a TCP connect to each online
/// instance's first TCP internal port, through the mesh.
async fn health_loop(routes: Arc<Routes>, interval: Duration, timeout: Duration) {
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut checks = tokio::task::JoinSet::new();
        for rt in routes.all() {
            let g = rt.group();
            let Some(port) = g
                .ports
                .iter()
                .find(|p| p.protocol == meshlib::services::Protocol::Tcp)
                .map(|p| p.destination_port)
            else {
                continue;
            };
            for pick in rt.online_instances() {
                let (rt, dialer) = (rt.clone(), rt.dialer());
                let routes = routes.clone();
                checks.spawn(async move {
                    let addr = std::net::SocketAddrV4::new(pick.ip, port);
                    let ok = match dialer.dial(addr, timeout).await {
                        Ok(_) => true,
                        // Says nothing about the instance: no verdict.
                        Err(e) if member::is_local_exhaustion(&e) => {
                            routes.gateway.local_error("health check", &e);
                            return;
                        }
                        Err(e) => {
                            tracing::debug!(instance = %pick.instance, %addr, error = %e, "health check failed");
                            false
                        }
                    };
                    rt.health(&pick, ok);
                });
            }
        }
        while checks.join_next().await.is_some() {}
    }
}

/// `GET /metrics` on `addr`.
async fn serve_metrics(
    addr: SocketAddr,
    routes: Arc<Routes>,
    certs: Option<Arc<certs::Certs>>,
) -> Result<JoinHandle<()>, GatewayError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| GatewayError::Config(format!("--metrics {addr}: {e}")))?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let (routes, certs) = (routes.clone(), certs.clone());
            async move {
                let mut text = routes.metrics();
                if let Some(c) = certs {
                    text.push_str(&c.metrics());
                }
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    text,
                )
            }
        }),
    );
    Ok(tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The TLS configurations of one certificate and key.
    fn pair_tls(cert: &std::path::Path, key: &std::path::Path) -> Result<Tls, GatewayError> {
        load_tls(certs::CertSources {
            default: Some((cert.to_owned(), key.to_owned())),
            ..Default::default()
        })
        .map(|t| t.expect("a source"))
    }

    #[test]
    fn tls_resumes_with_stateless_tickets_one_per_connection() {
        let dir = tempfile::tempdir().unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["*.apps.example".to_owned()]).unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
        let tls = pair_tls(&cert, &key).unwrap();
        for c in [&tls.http, &tls.tcp] {
            assert!(
                c.ticketer.enabled(),
                "stateless tickets, not a bounded cache"
            );
            assert_eq!(c.send_tls13_tickets, 1);
        }
        assert_eq!(
            tls.http.alpn_protocols,
            [b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        assert!(tls.tcp.alpn_protocols.is_empty());

        // Errors name the file.
        let missing = dir.path().join("missing.pem");
        let e = pair_tls(&missing, &key).err().unwrap().to_string();
        assert!(e.contains("tls-cert") && e.contains("missing.pem"), "{e}");
    }

    #[tokio::test]
    async fn tls_1_2_and_1_3_handshakes_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["*.apps.example".to_owned()]).unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
        let tls = pair_tls(&cert, &key).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ck.cert.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
            let client = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[version])
                .unwrap()
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
            let (a, b) = tokio::io::duplex(64 * 1024);
            let server = tokio_rustls::TlsAcceptor::from(tls.http.clone());
            let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
            let name = rustls::pki_types::ServerName::try_from("web.apps.example").unwrap();
            let (s, c) = tokio::join!(server.accept(a), connector.connect(name, b));
            s.unwrap();
            let c = c.unwrap();
            assert_eq!(c.get_ref().1.protocol_version(), Some(version.version));
        }
    }
}
