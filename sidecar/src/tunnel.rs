//! `sidecar tunnel`: from a workstation with a join token, forward a local
//! port to `<instance>.internal:<port>` or `<service>.warp:<port>` through
//! the mesh, without privileges.
//!
//! The tunnel is a short-lived member: a key generated in memory (never
//! written), a join, a userspace stack, and one loopback listener; on exit it
//! sends `Leave`, so the keyserver removes it and every peer forgets it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use meshlib::control::{self, ClientConfig, ControlError, MemberMeta, Session};
use meshlib::ist::config::Overrides;
use meshlib::ist::table::IstTable;
use meshlib::keys::PrivateKey;
use meshlib::names::{Lookup, NameIndex};
use meshlib::netmap::NetworkMap;
use meshlib::proto::{JoinToken, TokenParseError};
use meshlib::reconcile::{desired_peers, diff, DesiredPeers};
use meshlib::userspace::{Stack, StackConfig};
use meshlib::wg::{Engine, EngineConfig};
use tokio::sync::watch;

/// What to forward where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelConfig {
    /// The join token.
    pub token: String,
    /// The service name the tunnel joins as (shows in the map and status).
    pub service: String,
    /// The local address to listen on (e.g. `127.0.0.1:8080`).
    pub listen: SocketAddr,
    /// The target name (`<instance>.internal`, `<service>.warp`, or any
    /// private DNS name) or a private IP.
    pub target_host: String,
    /// The target port.
    pub target_port: u16,
}

/// Why the tunnel failed. Messages include their cause (no `source()` is
/// exposed), so a chain printer shows each part once.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The token does not parse.
    #[error("token: {0}")]
    Token(TokenParseError),
    /// The target is not `host:port`.
    #[error("target must be <name>:<port>, got {0:?}")]
    Target(String),
    /// The keyserver refused or was unreachable.
    #[error("{error} (keyserver {keyserver})")]
    Control {
        /// The keyserver address(es).
        keyserver: String,
        /// What went wrong.
        error: ControlError,
    },
    /// The target name is not in the network.
    #[error("{0} is not a name of this network")]
    UnknownTarget(String),
    /// The data plane could not start.
    #[error("data plane: {0}")]
    DataPlane(String),
    /// The local port could not be bound.
    #[error("cannot listen on {addr}: {error}")]
    Listen {
        /// The address asked for.
        addr: SocketAddr,
        /// The system error.
        error: std::io::Error,
    },
}

/// Splits `name:port` (the port after the last colon).
pub fn parse_target(s: &str) -> Result<(String, u16), TunnelError> {
    let bad = || TunnelError::Target(s.to_owned());
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    Ok((host.to_owned(), port))
}

/// The private IP `host` names in `map` (a literal IP is taken as is).
pub fn resolve(map: &NetworkMap, host: &str) -> Option<IpAddr> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Some(ip);
    }
    let table = IstTable::build(map.services(), &Overrides::default());
    let index = NameIndex::build(map, &table);
    match index.lookup(host) {
        Lookup::Found(ips) => ips.first().map(|ip| IpAddr::V4(*ip)),
        _ => None,
    }
}

/// Joins, forwards until `shutdown` turns true, then leaves. Returns the
/// address it listened on through `bound` as soon as it is known.
pub async fn run(
    cfg: TunnelConfig,
    mut shutdown: watch::Receiver<bool>,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> Result<(), TunnelError> {
    let token: JoinToken = cfg.token.parse().map_err(TunnelError::Token)?;
    let keyserver: Vec<String> = token.addrs.iter().map(ToString::to_string).collect();
    let keyserver = keyserver.join(", ");
    let control = |error| TunnelError::Control {
        keyserver: keyserver.clone(),
        error,
    };
    let key = PrivateKey::generate();
    let bind: SocketAddr = if token.addrs.first().is_some_and(|a| a.is_ipv6()) {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    }
    .parse()
    .expect("literal");
    let endpoint = control::client_endpoint(bind).map_err(control)?;
    let meta = MemberMeta {
        public_key: key.public_key(),
        service: cfg.service.clone(),
        app_id: None,
        process_type: Default::default(),
        instance: None,
        runner: "tunnel".into(),
        endpoints: vec![],
        ports: vec![],
    };
    let mut session = control::join(&endpoint, &token, meta, &ClientConfig::default())
        .await
        .map_err(control)?;
    let result = forward(&cfg, &key, &mut session, &mut shutdown, bound)
        .await
        .map_err(|e| match e {
            TunnelError::Control { error, .. } => control(error),
            other => other,
        });
    if !session.leave(Duration::from_secs(3)).await {
        tracing::warn!("the keyserver did not confirm the leave");
    }
    endpoint.wait_idle().await;
    result
}

/// The data plane of the tunnel, kept in step with the map until shutdown.
async fn forward(
    cfg: &TunnelConfig,
    key: &PrivateKey,
    session: &mut Session,
    shutdown: &mut watch::Receiver<bool>,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> Result<(), TunnelError> {
    let w = session.welcome().clone();
    let map = session.map().clone();
    let target_ip = resolve(&map, &cfg.target_host)
        .ok_or_else(|| TunnelError::UnknownTarget(cfg.target_host.clone()))?;
    let dp = |e: String| TunnelError::DataPlane(e);
    let (stack, device) = Stack::start(StackConfig::new(IpAddr::V4(w.ip), map.range.prefix_len()))
        .map_err(|e| dp(e.to_string()))?;
    let engine = Engine::start(
        device,
        EngineConfig {
            listen_port: 0,
            private_key: Some(key.clone()),
            fwmark: 0,
        },
    )
    .map_err(|e| dp(e.to_string()))?;
    let mut peers = DesiredPeers::new();
    sync_peers(&engine, &mut peers, &map, key);
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|error| TunnelError::Listen {
            addr: cfg.listen,
            error,
        })?;
    let local = listener.local_addr().map_err(|error| TunnelError::Listen {
        addr: cfg.listen,
        error,
    })?;
    let target = SocketAddr::new(target_ip, cfg.target_port);
    tracing::info!(%local, %target, ip = %w.ip, "tunnel up");
    if let Some(tx) = bound {
        let _ = tx.send(local);
    }
    let stack = Arc::new(stack);
    let fwd = {
        let stack = stack.clone();
        tokio::spawn(async move { stack.forward_tcp(listener, target).await })
    };
    let mut beat = tokio::time::interval(Duration::from_secs(10));
    let result = loop {
        tokio::select! {
            ev = session.next_event() => match ev {
                Ok(_) => sync_peers(&engine, &mut peers, session.map(), key),
                Err(e) => break Err(TunnelError::Control { keyserver: String::new(), error: e }),
            },
            _ = beat.tick() => {
                if let Err(e) = session.heartbeat().await {
                    break Err(TunnelError::Control { keyserver: String::new(), error: e });
                }
            }
            _ = shutdown.changed() => break Ok(()),
        }
    };
    fwd.abort();
    engine.shutdown();
    result
}

/// Applies the map's peers to the engine (keepalive on: we are behind NAT).
fn sync_peers(engine: &Engine, current: &mut DesiredPeers, map: &NetworkMap, key: &PrivateKey) {
    let desired = desired_peers(map, &key.public_key(), 25, true);
    for (peer, e) in engine.apply_diff(diff(current, &desired)) {
        tracing::warn!(%peer, error = %e, "cannot configure peer");
    }
    *current = desired;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_resolve() {
        assert_eq!(
            parse_target("api-1.internal:8080").unwrap(),
            ("api-1.internal".to_owned(), 8080)
        );
        assert!(parse_target("api-1.internal").is_err());
        assert!(parse_target(":80").is_err());
        assert!(parse_target("x:0").is_err());
        assert!(parse_target("x:70000").is_err());
        let mut map = NetworkMap::new(
            meshlib::ids::NetworkId::random(),
            "prod",
            meshlib::ipam::DEFAULT_RANGE,
        );
        let m = meshlib::netmap::Member {
            public_key: PrivateKey::generate().public_key(),
            ip: "10.240.0.9".parse().unwrap(),
            endpoints: vec![],
            service: "my db".into(),
            app_id: "my-db".parse().unwrap(),
            process_type: Default::default(),
            index: 1,
            instance: "db-1".parse().unwrap(),
            runner: "r".into(),
            ports: vec![5432],
            state: Default::default(),
        };
        map.members.insert(m.public_key, m);
        let ip = Some("10.240.0.9".parse().unwrap());
        assert_eq!(resolve(&map, "db-1.internal"), ip);
        assert_eq!(resolve(&map, "my-db.warp"), ip);
        assert_eq!(resolve(&map, "10.240.0.9"), ip);
        assert_eq!(resolve(&map, "nope.internal"), None);
    }
}
