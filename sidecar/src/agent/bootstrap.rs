//! Start-up: everything that can be checked is, before a token is used
//! (config, `warp.config.js`, paths, ports, privileges), then the sidecar's
//! configuration becomes the node's.

use std::net::{Ipv4Addr, SocketAddr};

use meshlib::ist::config::Overrides;
use meshlib::node::state::StateDir;
use meshlib::node::{NodeConfig, NodeMode};
use meshlib::proto::JoinToken;

use super::AgentError;
use crate::config::{Config, ConfigError, Mode};

/// What start-up needs once every check passed.
pub(super) struct Prepared {
    /// The node's configuration.
    pub node: NodeConfig,
    /// The IST overrides (config and `warp.config.js`).
    pub overrides: Overrides,
}

/// Checks `config` and turns it into the node's configuration. On first
/// start (no stored membership) the token must parse and a service name
/// must be known; nothing is joined yet.
pub(super) fn prepare(config: &Config) -> Result<Prepared, AgentError> {
    config.validate()?;
    let overrides = config.overrides()?;
    // The state directory first (0700, missing parents as `mkdir -p`):
    // other paths may live in it (`--hosts-file ~/.ist-mesh/hosts`).
    let state = StateDir::open(&config.state_dir)?;
    config.check_paths()?;
    preflight(config)?;
    let token = match state.load_membership()? {
        Some(_) => None,
        None => Some(first_join_token(config)?),
    };
    // Seed 002: groups to join, ports to publish (see `crate::publish`).
    let services = crate::publish::join_services(config)?;
    if token
        .as_ref()
        .is_some_and(|t| config.service.is_none() && t.service.is_none())
    {
        return Err(AgentError::NoService);
    }
    let mode = match config.mode {
        Mode::Kernel => NodeMode::Kernel {
            interface: config.interface.clone(),
        },
        Mode::Userspace => NodeMode::Userspace {
            service_address: config.service_address,
        },
    };
    let node = NodeConfig {
        state_dir: Some(config.state_dir.clone()),
        token,
        service: config.service.clone(),
        process_type: config.process_type.clone(),
        instance: config.instance.clone(),
        runner: config.runner.clone().unwrap_or_else(hostname),
        mode,
        listen_port: config.listen_port,
        endpoints: config.endpoints.clone(),
        ports: crate::ports::announced_ports(config, None),
        persistent_keepalive: config.persistent_keepalive,
        crypto_workers: config.crypto_workers,
        client: client_config(config),
        on_map: None,
        services,
        ephemeral: config.ephemeral,
        replace: config.replace,
    };
    Ok(Prepared { node, overrides })
}

/// The control client's settings: the defaults, with the key lifetime.
fn client_config(config: &Config) -> meshlib::control::ClientConfig {
    let mut c = meshlib::control::ClientConfig::default();
    c.member.key_lifetime =
        (config.key_lifetime > 0).then(|| std::time::Duration::from_secs(config.key_lifetime));
    c
}

/// The join token, parsed: from `token` or `token-file`.
fn first_join_token(config: &Config) -> Result<JoinToken, AgentError> {
    config
        .join_token()?
        .ok_or(AgentError::NoToken)?
        .parse()
        .map_err(AgentError::Token)
}

/// This machine's hostname (the default runner label).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "runner".into())
}

/// Checks, before joining, what only the system can say: the WireGuard and
/// DNS ports can be bound, the interface name is not taken (by another
/// sidecar, or any WireGuard interface: `wg show` would lose one of them),
/// and kernel mode has what it needs. Every clash is reported at once, so
/// a second sidecar on a host learns in one go which settings it must give
/// its own values (see [`DISTINCT`]).
fn preflight(config: &Config) -> Result<(), AgentError> {
    let mut clashes: Vec<(&'static str, String)> = vec![];
    if config.listen_port != 0 {
        let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, config.listen_port));
        if let Err(e) = std::net::UdpSocket::bind(addr) {
            clashes.push((
                "listen-port",
                format!("UDP port {}: {e}", config.listen_port),
            ));
        }
    }
    if config.dns.enabled {
        let listen = config.dns.listen;
        if let Err(e) =
            std::net::UdpSocket::bind(listen).and_then(|_| std::net::TcpListener::bind(listen))
        {
            clashes.push(("dns.listen", format!("{listen}: {e}")));
        }
    }
    if let Some(taken) = interface_taken(config) {
        clashes.push(("interface", taken));
    }
    if let Some((key, first)) = clashes.first() {
        let mut message = first.clone();
        for (key, m) in &clashes[1..] {
            message.push_str(&format!("; {key}: {m}"));
        }
        message.push_str(&format!(
            " (each sidecar on a host needs its own {DISTINCT})"
        ));
        return Err(AgentError::Config(ConfigError::invalid(key, message)));
    }
    if config.mode == Mode::Kernel && !has_net_admin() {
        return Err(AgentError::Config(ConfigError::invalid(
            "mode",
            "kernel mode needs CAP_NET_ADMIN and /dev/net/tun (run as root, or use --mode userspace)",
        )));
    }
    Ok(())
}

/// The settings two sidecars on one host must not share.
pub const DISTINCT: &str = "state-dir, interface, listen-port (or 0), dns.listen, metrics (or off) and, in userspace mode, loopback-octet";

/// Why the interface name is taken, if it is: its UAPI socket answers (a
/// running sidecar or WireGuard implementation), or, in kernel mode, a
/// network interface of that name exists.
fn interface_taken(config: &Config) -> Option<String> {
    let name = &config.interface;
    let mut sockets = vec![meshlib::wg::uapi_server::socket_path(name)];
    if config.mode == Mode::Userspace {
        sockets.push(config.state_dir.join(format!("{name}.sock")));
    }
    for path in sockets {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            return Some(format!(
                "{name:?} is in use on this host (its WireGuard socket {} answers)",
                path.display()
            ));
        }
    }
    let sys = std::path::Path::new("/sys/class/net").join(name);
    (config.mode == Mode::Kernel && sys.exists())
        .then(|| format!("a network interface named {name:?} exists on this host"))
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
