//! # keyserver — the IST Mesh control plane
//!
//! Networks, join tokens, address allocation and public-key distribution,
//! pushed to sidecars over QUIC. The keyserver never sees a private key.
//!
//! ## Layout
//!
//! Pure core:
//! - [`registry`] — networks, tokens, members, allocation, per-network change
//!   log, member lifecycle; every operation returns the store writes and the
//!   change to push.
//! - [`session`] — one member's control stream: hello, pushes, catch-up,
//!   revocation and client requests, without I/O.
//! - [`admission`] — the budget of connections that have not said hello
//!   (`meshlib::admission`, shared with the gateway's per-client budget).
//! - [`listing`] — seed 003's listing: every private name of a network and
//!   its answer, one member with its names (and their CLI tables).
//! - [`auth`] — scoped API tokens (roles, tenants), the [`auth::Principal`]
//!   a bearer token resolves to, and the audit trail's records.
//! - [`traffic`] — members' traffic reports in memory, and a network's
//!   service graph summed from them.
//!
//! Drivers:
//! - [`store`] — the [`store::Store`] trait and the embedded redb store.
//! - [`server`] — registry + store under one lock, per-network push channels.
//! - [`quic`] — the QUIC driver of [`session`] ([`meshlib::proto`]).
//! - [`http`] — the admin API (axum, bearer token, `/openapi.json`).
//! - [`config`] — plain-data configuration (TOML, flags map onto it).
//! - [`admin`] — the HTTP client the admin subcommands use.
//! - [`relay`] — STUN and the relay on one UDP port, tickets for members.
//! - [`hooks`] — runs service addresses' wake and idle hooks (command or
//!   URL), off the runtime's critical path.
//! - [`tcp`] — the TCP port (TLS): control and relay for members whose UDP
//!   is blocked.
//!
//! [`Keyserver::open`] prepares the data directory (store, self-signed
//! certificate, admin token, all created on first start);
//! [`Keyserver::serve`] runs both servers on listeners the caller bound until
//! a shutdown future completes, so tests run it in-process on port 0.

pub mod admin;
pub mod auth;
pub use meshlib::admission;
pub mod backup;
pub mod config;
pub mod gateway;
pub mod hooks;
pub mod http;
pub mod listing;
pub mod metrics;
pub mod quic;
pub mod registry;
pub mod relay;
pub mod server;
pub mod session;
pub mod store;
pub mod tcp;
pub mod traffic;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use meshlib::fsutil;
use rand_core::RngCore as _;

use crate::config::Config;
use crate::server::Shared;
use crate::store::{etcd, RedbStore, StoreError};

/// Why the data directory could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The directory or a secret file could not be written.
    #[error(transparent)]
    Write(#[from] fsutil::WriteError),
    /// A file could not be read.
    #[error("cannot read {path}: {cause}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        cause: std::io::Error,
    },
    /// The data directory is shared with others (world-writable and
    /// sticky, like `/tmp`): its mode cannot be tightened to 0700.
    #[error("{0} is a shared directory (sticky, world-writable); choose a directory of its own for --data-dir")]
    SharedDir(PathBuf),
    /// The data directory's mode could not be read or tightened.
    #[error("cannot make {path} private (mode 0700): {cause}")]
    Mode {
        /// The directory.
        path: PathBuf,
        /// The cause.
        cause: std::io::Error,
    },
    /// The certificate could not be generated.
    #[error("cannot generate the certificate: {0}")]
    Cert(#[from] rcgen::Error),
    /// The store could not be opened or loaded.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The `store` setting is not a store this keyserver knows.
    #[error("store: {0}")]
    BadStore(String),
}

/// Why serving stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The HTTP server failed.
    #[error("admin API: {0}")]
    Http(std::io::Error),
    /// The QUIC endpoint has no local address.
    #[error("QUIC endpoint: {0}")]
    Quic(std::io::Error),
}

/// A keyserver with its data directory opened.
#[derive(Debug)]
pub struct Keyserver {
    shared: Arc<Shared>,
    admin_token: String,
    cert_der: Vec<u8>,
    key_der: Vec<u8>,
    api_limits: http::ApiLimits,
    /// Interval of the token sweep (`None`: off).
    token_gc: Option<std::time::Duration>,
    /// The watch of a shared store: wakes the task applying what other
    /// replicas wrote.
    feed: Option<Arc<etcd::conn::Feed>>,
    /// Relay tickets' secret (`relay-secret`).
    relay_secret: [u8; 32],
    /// STUN/relay settings from the configuration.
    relay_config: RelayConfig,
    /// STUN/relay and TCP sockets bound ahead by [`Keyserver::bind_nat`].
    nat: Option<(Option<relay::RelayHandle>, Option<tokio::net::TcpListener>)>,
    /// Whether command hooks of service addresses may run
    /// (`allow-wake-commands`).
    allow_wake_commands: bool,
}

/// The STUN/relay part of the configuration, as `serve` uses it.
#[derive(Debug, Clone)]
struct RelayConfig {
    /// The TCP port (control and relay over TLS); `None`: the QUIC
    /// endpoint's address, on TCP.
    tcp_listen: Option<SocketAddr>,
    tcp_enabled: bool,
    listen: config::RelayListen,
    advertise: Option<SocketAddr>,
    stun: Vec<SocketAddr>,
    limits: relay::RelayLimits,
}

/// Reads `path`, or creates it with `make` (mode 0600) if missing.
fn read_or_create(
    path: &Path,
    make: impl FnOnce() -> Result<Vec<u8>, OpenError>,
) -> Result<Vec<u8>, OpenError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let bytes = make()?;
            fsutil::write_secret(path, &bytes)?;
            Ok(bytes)
        }
        Err(cause) => Err(OpenError::Read {
            path: path.to_owned(),
            cause,
        }),
    }
}

/// Creates the data directory (mode 0700), or tightens an existing one to
/// 0700: it holds the QUIC key, the admin token and every member's record.
/// A shared sticky directory such as `/tmp` is refused rather than changed.
fn private_dir(dir: &Path) -> Result<(), OpenError> {
    use std::os::unix::fs::PermissionsExt as _;
    // Checked before anything is created or tightened.
    if let Ok(meta) = std::fs::metadata(dir) {
        if meta.permissions().mode() & 0o1002 == 0o1002 {
            return Err(OpenError::SharedDir(dir.to_owned()));
        }
    }
    fsutil::create_private_dir(dir)?;
    let mode_err = |cause| OpenError::Mode {
        path: dir.to_owned(),
        cause,
    };
    let mode = std::fs::metadata(dir)
        .map_err(mode_err)?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(mode_err)?;
        tracing::warn!(
            "tightened {} from mode {:o} to 0700",
            dir.display(),
            mode & 0o777
        );
    }
    Ok(())
}

impl Keyserver {
    /// Opens the data directory: creates it (0700; an existing one is
    /// tightened to 0700), the certificate and key (`cert.der`, `key.der`
    /// 0600), the admin token (`admin-token`, 0600) and the store
    /// (`state.redb`, 0600) on first start; loads the state.
    pub fn open(config: &Config) -> Result<Self, OpenError> {
        let dir = &config.data_dir;
        private_dir(dir)?;
        let key_path = dir.join("key.der");
        let cert_path = dir.join("cert.der");
        if !key_path.exists() || !cert_path.exists() {
            let ck =
                rcgen::generate_simple_self_signed(vec![meshlib::proto::SERVER_NAME.to_owned()])?;
            fsutil::write_secret(&key_path, &ck.signing_key.serialize_der())?;
            fsutil::write_atomic(&cert_path, ck.cert.der(), 0o644)?;
        }
        let key_der = read_or_create(&key_path, || unreachable_missing(&key_path))?;
        // Secrets written by an older version, or copied in by hand.
        tighten(&key_path)?;
        let cert_der = read_or_create(&cert_path, || unreachable_missing(&cert_path))?;
        let token = read_or_create(&dir.join("admin-token"), || {
            let mut secret = [0u8; 32];
            rand_core::OsRng.fill_bytes(&mut secret);
            Ok(URL_SAFE_NO_PAD.encode(secret).into_bytes())
        })?;
        tighten(&dir.join("admin-token"))?;
        let mut admin_token = String::from_utf8_lossy(&token).trim().to_owned();
        let (mut cert_der, mut key_der) = (cert_der, key_der);
        let relay_path = dir.join("relay-secret");
        let mut relay_secret =
            relay::load_or_create_secret(&relay_path).map_err(|cause| OpenError::Read {
                path: relay_path,
                cause,
            })?;
        let (store, feed, cluster): (Box<dyn store::Store>, _, _) = match &config.store {
            None => (
                Box::new(RedbStore::open(&dir.join("state.redb"))?),
                None,
                None,
            ),
            Some(url) => {
                let url: etcd::EtcdUrl = url.parse().map_err(OpenError::BadStore)?;
                let store = etcd::EtcdStore::connect(&url)?;
                let shared_id = store.share_identity(etcd::keys::IdentityRecord {
                    cert: URL_SAFE_NO_PAD.encode(&cert_der),
                    key: URL_SAFE_NO_PAD.encode(&key_der),
                    admin_token: admin_token.clone(),
                    relay_secret: Some(URL_SAFE_NO_PAD.encode(relay_secret)),
                })?;
                adopt_identity(
                    dir,
                    &shared_id,
                    &mut cert_der,
                    &mut key_der,
                    &mut admin_token,
                    &mut relay_secret,
                )?;
                let (feed, cluster) = (store.feed(), store.cluster());
                (Box::new(store), Some(feed), Some(cluster))
            }
        };
        let fp = meshlib::proto::sha256(&cert_der);
        let (shared, warnings) =
            Shared::with_cluster(store, cluster, config.limits(), fp, SystemTime::now())?;
        for w in warnings {
            tracing::warn!("skipped stored record: {w}");
        }
        Ok(Self {
            shared: Arc::new(shared),
            admin_token,
            cert_der,
            key_der,
            api_limits: config.api_limits(),
            token_gc: (config.token_gc_secs > 0)
                .then(|| std::time::Duration::from_secs(config.token_gc_secs)),
            feed,
            relay_secret,
            relay_config: RelayConfig {
                tcp_listen: config.tcp_listen,
                tcp_enabled: config.tcp_enabled,
                listen: config.relay_listen,
                advertise: config.relay_advertise,
                stun: config.stun_servers.clone(),
                limits: config.relay_limits(),
            },
            nat: None,
            allow_wake_commands: config.allow_wake_commands,
        })
    }

    /// SHA-256 of the QUIC certificate: clients pin it.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.shared.cert_sha256
    }

    /// The admin API bearer token.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// The shared state (for status, tests and benchmarks).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Binds the QUIC endpoint with this keyserver's certificate.
    pub fn bind_quic(&self, addr: SocketAddr) -> Result<quinn::Endpoint, quic::QuicSetupError> {
        quic::endpoint(
            addr,
            self.cert_der.clone(),
            self.key_der.clone(),
            &self.shared.limits,
        )
    }

    /// Binds STUN and the relay (starting its thread) and the TCP port
    /// now, logging the outcome, so that a program can report its start
    /// after them; [`Keyserver::serve`] binds them itself otherwise.
    pub async fn bind_nat(&mut self, quic: &quinn::Endpoint) {
        let bound = self.bind_nat_sockets(quic).await;
        self.nat = Some(bound);
    }

    async fn bind_nat_sockets(
        &self,
        quic: &quinn::Endpoint,
    ) -> (Option<relay::RelayHandle>, Option<tokio::net::TcpListener>) {
        let mut relay_thread = None;
        // By default on the QUIC socket's host (all addresses if that is
        // unspecified).
        let quic_addr = quic
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        if let Some(listen) = self.relay_config.listen.resolve(quic_addr) {
            let limits = self.relay_config.limits.clone();
            match relay::bind(listen).and_then(|s| {
                relay::serve_udp(s, self.relay_secret, limits).map_err(|cause| {
                    relay::RelayBindError {
                        addr: listen,
                        cause,
                    }
                })
            }) {
                Ok(h) => {
                    let _ = self.shared.relay_metrics.set(h.metrics.clone());
                    tracing::info!(udp = %h.local, "STUN and relay started");
                    relay_thread = Some(h);
                }
                Err(e) => tracing::warn!("no STUN/relay: {e}"),
            }
        }
        let mut listener = None;
        if self.relay_config.tcp_enabled {
            let listen = match self.relay_config.tcp_listen {
                Some(a) => Ok(a),
                None => quic.local_addr(),
            };
            let bound = match listen {
                Ok(a) => tokio::net::TcpListener::bind(a)
                    .await
                    .map_err(|e| format!("{a}: {e}")),
                Err(e) => Err(e.to_string()),
            };
            match bound {
                Ok(l) => {
                    tracing::info!(tcp = ?l.local_addr().ok(), "control and relay over TLS/TCP started");
                    listener = Some(l);
                }
                Err(e) => tracing::warn!("no TCP port: {e}"),
            }
        }
        (relay_thread, listener)
    }

    /// Serves QUIC on `quic` and the admin API on `api` until `shutdown`
    /// completes. `advertise` goes into join tokens (empty: the QUIC
    /// endpoint's address, loopback if unspecified).
    pub async fn serve(
        mut self,
        quic: quinn::Endpoint,
        api: tokio::net::TcpListener,
        advertise: Vec<SocketAddr>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let mut advertise = advertise;
        if advertise.is_empty() {
            let mut local = quic.local_addr().map_err(ServeError::Quic)?;
            if local.ip().is_unspecified() {
                local.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            advertise.push(local);
        }
        // Announced at once (tokens name every replica), again below with
        // the relay once it is bound.
        if let Some(c) = self.shared.cluster() {
            c.register(advertise.clone(), None, None);
        }
        self.shared.set_hook_runner(Arc::new(hooks::Runner::new(
            self.allow_wake_commands,
            self.shared.metrics.hooks.clone(),
        )));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        // STUN, the relay and the TCP port (bound by `bind_nat` already,
        // or now).
        let (relay_thread, tcp_listener) = match self.nat.take() {
            Some(bound) => bound,
            None => self.bind_nat_sockets(&quic).await,
        };
        let relay_addr = self.relay_config.advertise.or_else(|| {
            let port = relay_thread.as_ref()?.local.port();
            advertise.first().map(|a| SocketAddr::new(a.ip(), port))
        });
        // Every relay answers STUN too (`keyserver relay` as well).
        let mut stun: Vec<SocketAddr> = relay_addr.into_iter().collect();
        stun.extend(self.relay_config.stun.iter().copied());
        // The TCP port: control and relay over TLS, for members whose UDP
        // is blocked; by default the QUIC address's number, on TCP.
        let mut tcp_task = None;
        let mut tcp_addr = None;
        if let Some(l) = tcp_listener {
            match tcp::acceptor(self.cert_der.clone(), self.key_der.clone()) {
                Ok(acceptor) => {
                    let port = l.local_addr().map(|a| a.port()).unwrap_or_default();
                    tcp_addr = advertise.first().map(|a| SocketAddr::new(a.ip(), port));
                    let relay = relay_thread.as_ref().map(|h| h.shared.clone());
                    tcp_task = Some(tokio::spawn(tcp::run(
                        l,
                        acceptor,
                        self.shared.clone(),
                        relay,
                        wait(stop_rx.clone()),
                    )));
                }
                Err(e) => tracing::warn!("no TCP port: {e}"),
            }
        }
        let _ = self.shared.relay.set(relay::RelaySettings {
            secret: self.relay_secret,
            relay: relay_addr,
            stun,
            tcp: relay_thread.as_ref().and(tcp_addr),
            cert_sha256: self.shared.cert_sha256,
        });
        if let Some(c) = self.shared.cluster() {
            c.register(
                advertise.clone(),
                relay_addr,
                relay_thread.as_ref().and(tcp_addr),
            );
        }
        let _ = self.shared.advertise.set(advertise);
        self.shared.check_relay();
        let router = http::router(
            self.shared.clone(),
            self.admin_token.clone(),
            self.api_limits.clone(),
        );
        let http = http::serve(api, router, self.api_limits, wait(stop_rx.clone()));
        let quic_task = tokio::spawn(quic::run(quic, self.shared.clone(), wait(stop_rx.clone())));
        let sweeper = tokio::spawn(sweep(self.shared.clone(), wait(stop_rx.clone())));
        let flusher = tokio::spawn(flush_pushes(self.shared.clone(), wait(stop_rx.clone())));
        let follow_task = self
            .feed
            .clone()
            .map(|feed| tokio::spawn(follow(self.shared.clone(), feed, wait(stop_rx.clone()))));
        // With replicas the shared relay changes as replicas come and go:
        // sessions tell their members (see `Shared::check_relay`).
        let relay_task = self.shared.cluster().is_some().then(|| {
            let (sh, stop) = (self.shared.clone(), wait(stop_rx.clone()));
            tokio::spawn(async move {
                tokio::pin!(stop);
                let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
                loop {
                    tokio::select! {
                        _ = &mut stop => break,
                        _ = tick.tick() => sh.check_relay(),
                    }
                }
            })
        });
        let gc_task = self
            .token_gc
            .map(|every| tokio::spawn(collect_tokens(self.shared.clone(), every, wait(stop_rx))));
        let result = http.await.map_err(ServeError::Http);
        if let Some(t) = tcp_task {
            let _ = t.await;
        }
        drop(relay_thread);
        let _ = quic_task.await;
        let _ = sweeper.await;
        let _ = flusher.await;
        if let Some(task) = gc_task {
            let _ = task.await;
        }
        if let Some(task) = follow_task {
            let _ = task.await;
        }
        if let Some(task) = relay_task {
            let _ = task.await;
        }
        // Blocking store operations started by dropped sessions may still
        // hold the state for a moment; wait (bounded) so the store is closed
        // when this returns and a restart on the same directory can open it.
        let shared = self.shared;
        for _ in 0..500 {
            if Arc::strong_count(&shared) == 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        result
    }
}

/// Sends held pushes (see [`Shared::flush_pushes`]) until `shutdown`:
/// wakes when a change is held, or when [`Shared::flush_pushes`] said to
/// look again (a pace or hold ending), and sleeps while nothing is held.
async fn flush_pushes(shared: Arc<Shared>, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let mut next: Option<std::time::Instant> = None;
    loop {
        let due = async {
            match next {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = shared.held_pushes() => {}
            () = due => {}
            () = &mut shutdown => return,
        }
        next = shared.flush_pushes(std::time::Instant::now());
    }
}

/// Applies the member lifecycle timers every second until `shutdown`.
async fn sweep(shared: Arc<Shared>, shutdown: impl Future<Output = ()>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = &mut shutdown => return,
        }
        let sh = shared.clone();
        match tokio::task::spawn_blocking(move || sh.sweep(SystemTime::now())).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::debug!(transitions = n, "lifecycle sweep"),
            Ok(Err(e)) => tracing::warn!("lifecycle sweep: store write failed: {e}"),
            Err(e) => tracing::error!("lifecycle sweep panicked: {e}"),
        }
    }
}

/// Applies what other replicas wrote (and pushes it to this replica's
/// members) whenever the shared store's watch brings something, until
/// `stop`; also every second, so a reload after a lost watch happens.
async fn follow(shared: Arc<Shared>, feed: Arc<etcd::conn::Feed>, stop: impl Future<Output = ()>) {
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = feed.notify.notified() => {}
            () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            () = &mut stop => return,
        }
        let sh = shared.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || sh.sync()).await {
            tracing::error!("applying remote changes panicked: {e}");
        }
    }
}

/// Takes the identity the replicas share: writes it into the data
/// directory if it differs from the local one.
fn adopt_identity(
    dir: &Path,
    id: &etcd::keys::IdentityRecord,
    cert_der: &mut Vec<u8>,
    key_der: &mut Vec<u8>,
    admin_token: &mut String,
    relay_secret: &mut [u8; 32],
) -> Result<(), OpenError> {
    let bad =
        |what: &str| OpenError::BadStore(format!("the shared identity in etcd has a bad {what}"));
    let cert = URL_SAFE_NO_PAD
        .decode(&id.cert)
        .map_err(|_| bad("certificate"))?;
    let key = URL_SAFE_NO_PAD.decode(&id.key).map_err(|_| bad("key"))?;
    if cert != *cert_der || key != *key_der {
        fsutil::write_secret(&dir.join("key.der"), &key)?;
        fsutil::write_atomic(&dir.join("cert.der"), &cert, 0o644)?;
        tracing::info!("using the certificate the keyserver replicas share");
        (*cert_der, *key_der) = (cert, key);
    }
    if id.admin_token != *admin_token {
        fsutil::write_secret(&dir.join("admin-token"), id.admin_token.as_bytes())?;
        admin_token.clone_from(&id.admin_token);
    }
    if let Some(text) = &id.relay_secret {
        let shared: [u8; 32] = URL_SAFE_NO_PAD
            .decode(text)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| bad("relay secret"))?;
        if shared != *relay_secret {
            // The file stays a copy of what tickets are signed with (for a
            // `keyserver relay` elsewhere).
            fsutil::write_secret(&dir.join("relay-secret"), &shared)?;
            tracing::info!("using the relay secret the keyserver replicas share");
            *relay_secret = shared;
        }
    }
    Ok(())
}

/// Forgets expired and used-up tokens every `every` until `stop`.
async fn collect_tokens(
    shared: Arc<Shared>,
    every: std::time::Duration,
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = &mut stop => return,
        }
        let sh = shared.clone();
        match tokio::task::spawn_blocking(move || sh.collect_tokens(SystemTime::now())).await {
            Ok(Ok(0)) | Err(_) => {}
            Ok(Ok(n)) => tracing::info!("deleted {n} expired or used-up tokens"),
            Ok(Err(e)) => tracing::warn!("token sweep: {e}"),
        }
    }
}

/// Sets a secret file's mode to 0600 if it is more open.
fn tighten(path: &Path) -> Result<(), OpenError> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode_err = |cause| OpenError::Mode {
        path: path.to_owned(),
        cause,
    };
    let mode = std::fs::metadata(path)
        .map_err(mode_err)?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(mode_err)?;
    }
    Ok(())
}

/// The certificate files were just written; missing now means a race with
/// another process.
fn unreachable_missing(path: &Path) -> Result<Vec<u8>, OpenError> {
    Err(OpenError::Read {
        path: path.to_owned(),
        cause: std::io::Error::new(std::io::ErrorKind::NotFound, "vanished after creation"),
    })
}
