//! The node's data plane: the engine on a TUN interface (kernel mode) or on
//! the userspace stack, and how a map is applied to it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net};
use parking_lot::Mutex;

use crate::keys::{PrivateKey, PublicKey};
use crate::netmap::NetworkMap;
use crate::reconcile::{desired_peers, diff, DesiredPeers};
use crate::userspace::{Stack, StackConfig};
use crate::wg::flows::{own_address, Services};
use crate::wg::{Engine, EngineConfig, TunConfig, TunDevice};

use super::{ControlRequests, NodeError, NodeMode};

/// The engine, the stack in userspace mode, and the peers applied so far.
pub(super) struct Plane {
    pub(super) engine: Arc<Engine>,
    pub(super) stack: Option<Arc<Stack>>,
    pub(super) ip: Ipv4Addr,
    keepalive: u16,
    peers: Mutex<DesiredPeers>,
    /// Kernel mode: the interface and the service routing applied to it.
    kernel: Option<Kernel>,
}

/// The TUN interface of kernel mode and what service addresses need of
/// it: the service range routed through it, and the address of this
/// member's own service while it is a backend of it.
struct Kernel {
    tun: Arc<TunDevice>,
    applied: Mutex<Applied>,
}

/// Service routing as applied to the interface.
#[derive(Default)]
struct Applied {
    range: Option<Ipv4Net>,
    own: Option<Ipv4Addr>,
}

impl Plane {
    /// Starts the data plane for a member at `ip` in `range`, as `cfg`
    /// says (mode, port, keepalive, crypto workers). In kernel mode the
    /// engine's held flows ask for wakes through `requests`.
    pub(super) fn start(
        cfg: &super::NodeConfig,
        key: &PrivateKey,
        ip: Ipv4Addr,
        range: Ipv4Net,
        requests: &ControlRequests,
    ) -> Result<Self, NodeError> {
        let dp =
            |what: &str, e: &dyn std::fmt::Display| NodeError::DataPlane(format!("{what}: {e}"));
        let engine_config = EngineConfig {
            listen_port: cfg.listen_port,
            private_key: Some(key.clone()),
            fwmark: 0,
            crypto_workers: cfg.crypto_workers,
        };
        let keepalive = cfg.persistent_keepalive;
        let (engine, stack, kernel) = match &cfg.mode {
            NodeMode::Kernel { interface } => {
                let mut tun_config = TunConfig::new(interface);
                let addr = Ipv4Net::new(ip, range.prefix_len())
                    .map_err(|e| dp("interface address", &e))?;
                tun_config.address = Some(IpNet::V4(addr));
                let tun = TunDevice::create(&tun_config)
                    .map_err(|e| dp(&format!("creating TUN interface {interface}"), &e))?;
                let tun = Arc::new(tun);
                let engine =
                    Engine::start(tun.clone(), engine_config).map_err(|e| dp("engine", &e))?;
                tracing::info!(%interface, address = %addr, port = engine.listen_port(), "data plane up");
                // Scale to zero: a held flow asks the keyserver to wake its
                // service (the member core sends one request per service
                // and wake timeout).
                let requests = requests.clone();
                engine.set_wake_hook(Some(Arc::new(move |service: &str| {
                    if !requests.wake(service) {
                        tracing::debug!(service = %crate::render::text::escape(service), "wake request not queued");
                    }
                })));
                let kernel = Kernel {
                    tun,
                    applied: Mutex::new(Applied::default()),
                };
                (engine, None, Some(kernel))
            }
            NodeMode::Userspace { service_address } => {
                let mut cfg = StackConfig::new(IpAddr::V4(ip), range.prefix_len());
                cfg.inbound_host = *service_address;
                let (stack, device) = Stack::start(cfg).map_err(|e| dp("userspace stack", &e))?;
                let engine = Engine::start(device, engine_config).map_err(|e| dp("engine", &e))?;
                tracing::info!(address = %ip, port = engine.listen_port(), "userspace data plane up");
                (engine, Some(Arc::new(stack)), None)
            }
        };
        Ok(Self {
            engine: Arc::new(engine),
            stack,
            ip,
            keepalive,
            peers: Mutex::new(DesiredPeers::new()),
            kernel,
        })
    }

    /// Makes the engine's peers those of `map`'s online members, and opens
    /// to the tunnel (userspace mode) exactly the ports `map` says `own`
    /// serves.
    pub(super) fn apply(&self, map: &NetworkMap, own: &PublicKey) {
        let mut online = map.online();
        // This member by its address too: during a rotation the map may
        // hold it under either key.
        online.members.retain(|_, m| m.ip != self.ip);
        let desired = desired_peers(&online, own, self.keepalive, true);
        let mut peers = self.peers.lock();
        for (peer, e) in self.engine.apply_diff(diff(&peers, &desired)) {
            tracing::warn!(%peer, error = %e, "cannot configure peer");
        }
        *peers = desired;
        drop(peers);
        if let Some(k) = &self.kernel {
            // After the peers: a flow is never pinned to a peer not added yet.
            self.apply_services(k, map, own);
        }
        if let Some(stack) = &self.stack {
            let served = map
                .members
                .values()
                .find(|m| m.ip == self.ip)
                .map(|m| m.ports.clone());
            stack.set_inbound_ports(served.unwrap_or_default());
        }
    }

    /// Kernel mode: the engine's flow table, the route of the service
    /// range, and this member's own service address on the interface.
    fn apply_services(&self, k: &Kernel, map: &NetworkMap, own: &PublicKey) {
        let reset = self.engine.set_services(&Services::from_map(map, own));
        if reset > 0 {
            tracing::info!(flows = reset, "reset flows to instances that left");
        }
        let mut applied = k.applied.lock();
        if map.service_range != applied.range {
            if let Some(old) = applied.range.take() {
                if let Err(e) = k.tun.remove_route(old) {
                    tracing::warn!(range = %old, error = %e, "cannot remove the service range's route");
                }
            }
            if let Some(new) = map.service_range {
                match k.tun.set_route(new, Some(self.ip)) {
                    Ok(()) => {
                        tracing::info!(range = %new, "service range routed");
                        applied.range = Some(new);
                    }
                    Err(e) => {
                        tracing::warn!(range = %new, error = %e, "cannot route the service range")
                    }
                }
            }
        }
        let want = own_address(map, self.ip);
        if want != applied.own {
            if let Some(old) = applied.own.take() {
                if let Err(e) = k.tun.remove_address(old) {
                    tracing::warn!(address = %old, error = %e, "cannot remove the service address");
                }
            }
            if let Some(new) = want {
                match k.tun.add_host_address(new) {
                    Ok(()) => {
                        tracing::info!(address = %new, "answering for the service address");
                        applied.own = Some(new);
                    }
                    Err(e) => {
                        tracing::warn!(address = %new, error = %e, "cannot hold the service address")
                    }
                }
            }
        }
    }

    /// Whether the engine balances service addresses itself (kernel mode):
    /// then it also counts traffic per service.
    pub(super) fn is_kernel(&self) -> bool {
        self.kernel.is_some()
    }

    /// Drops every peer (revoked, left).
    pub(super) fn clear(&self) {
        let mut peers = self.peers.lock();
        for key in peers.keys() {
            self.engine.remove_peer(key);
        }
        peers.clear();
    }

    /// The engine's UDP port.
    pub(super) fn listen_port(&self) -> u16 {
        self.engine.listen_port()
    }

    /// Stops the engine and the stack.
    pub(super) fn stop(&self) {
        self.engine.shutdown();
    }
}

/// The local addresses a member advertises as its endpoints: every
/// non-loopback, non-link-local address outside the overlay range and its
/// service range (a service address a backend holds on its interface is
/// no underlay address), with the engine's port; IPv4 first; at most 8.
pub fn local_endpoints(port: u16, overlay: Ipv4Net) -> Vec<SocketAddr> {
    let services = crate::netmap::default_service_range(overlay);
    let mut out: Vec<SocketAddr> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .map(|i| i.ip())
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
        .filter(|ip| match ip {
            IpAddr::V4(v4) => {
                !overlay.contains(v4)
                    && !services.is_some_and(|s| s.contains(v4))
                    && !v4.is_link_local()
            }
            IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
        })
        .map(|ip| SocketAddr::new(ip, port))
        .collect();
    out.sort_by_key(|a| (!a.is_ipv4(), *a));
    out.dedup();
    out.truncate(8);
    out
}
