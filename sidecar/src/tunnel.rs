//! `sidecar tunnel`: from a workstation with a join token, forward a local
//! port to `<instance>.internal:<port>` or `<service>.warp:<port>` through
//! the mesh, without privileges.
//!
//! The tunnel is a short-lived [`Node`]: a key generated in memory (never
//! written), a join, a userspace stack, and one loopback listener; on exit it
//! leaves, so the keyserver removes it and every peer forgets it.

use std::net::{IpAddr, SocketAddr};

use meshlib::control::{ControlError, Setback};
use meshlib::ist::config::Overrides;
use meshlib::ist::table::IstTable;
use meshlib::names::{Lookup, NameIndex};
use meshlib::netmap::NetworkMap;
use meshlib::node::{Node, NodeConfig, NodeEnd, NodeError, NodeMode};
use meshlib::proto::{JoinToken, TokenParseError};
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
    /// The node ended on its own (the keyserver ended this membership).
    #[error("{0}")]
    Ended(NodeEnd),
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
    let node = NodeConfig {
        state_dir: None,
        token: Some(token),
        service: Some(cfg.service.clone()),
        runner: "tunnel".into(),
        mode: NodeMode::Userspace {
            service_address: IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        },
        listen_port: 0,
        ..NodeConfig::default()
    };
    let node = tokio::select! {
        node = Node::start(node) => node.map_err(node_error)?,
        () = async { let _ = shutdown.wait_for(|s| *s).await; } => return Ok(()),
    };
    let result = forward(&cfg, &node, &mut shutdown, bound).await;
    if !node.leave().await {
        tracing::warn!("the keyserver did not confirm the leave");
    }
    result
}

/// The node's failure as the tunnel's.
fn node_error(e: NodeError) -> TunnelError {
    match e {
        NodeError::Control { keyserver, error } => TunnelError::Control { keyserver, error },
        NodeError::DataPlane(e) => TunnelError::DataPlane(e),
        other => TunnelError::DataPlane(other.to_string()),
    }
}

/// Forwards the local listener to the target until shutdown (or the
/// member is revoked).
async fn forward(
    cfg: &TunnelConfig,
    node: &Node,
    shutdown: &mut watch::Receiver<bool>,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> Result<(), TunnelError> {
    let target_ip = resolve(&node.map().online(), &cfg.target_host)
        .ok_or_else(|| TunnelError::UnknownTarget(cfg.target_host.clone()))?;
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
    tracing::info!(%local, %target, ip = %node.ip(), "tunnel up");
    if let Some(tx) = bound {
        let _ = tx.send(local);
    }
    let stack = node
        .stack()
        .cloned()
        .ok_or_else(|| TunnelError::DataPlane("no userspace stack".into()))?;
    let fwd = tokio::spawn(async move { stack.forward_tcp(listener, target).await });
    let mut ended = node.watch_end();
    let result = tokio::select! {
        () = async { let _ = shutdown.wait_for(|s| *s).await; } => Ok(()),
        end = ended.wait_for(|e| e.is_some()) => Err(TunnelError::Ended(
            end.ok().and_then(|e| e.clone()).unwrap_or_else(|| {
                NodeEnd::Lost(Setback::Unreachable("the node stopped".into()))
            }),
        )),
    };
    fwd.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshlib::keys::PrivateKey;

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
