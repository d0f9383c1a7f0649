//! The gateway as a mesh member: how it joins, follows the map and reaches
//! instances. Everything that depends on *how* the gateway is a member sits
//! in this one file, behind [`Dialer`], so that moving it onto
//! `meshlib::node::Node` touches nothing else.
//!
//! The gateway is a short-lived [`Node`] (key in memory, like `sidecar
//! tunnel`): it joins with a token, follows the map (online members only
//! are peers), and reaches an instance's private `ip:port` with plain
//! sockets routed through its TUN interface (kernel mode) or through the
//! userspace stack (userspace mode). On exit it leaves the network.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use meshlib::netmap::NetworkMap;
use meshlib::node::{Node, NodeConfig, NodeError, NodeMode};
use meshlib::proto::JoinToken;
use meshlib::userspace::Stack;
use meshlib::wg::{uapi_server, UapiServer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

/// A byte stream to an instance.
pub trait MeshStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> MeshStream for T {}

/// A boxed future of the dialer.
pub type DialFuture<T> = Pin<Box<dyn Future<Output = io::Result<T>> + Send>>;

/// A datagram socket connected to one instance's `ip:port`.
pub trait MeshDatagram: Send + Sync + 'static {
    /// Sends one datagram to the instance.
    fn send<'a>(
        &'a self,
        buf: &'a [u8],
    ) -> Pin<Box<dyn Future<Output = io::Result<usize>> + Send + 'a>>;
    /// Receives one datagram from the instance.
    fn recv<'a>(
        &'a self,
        buf: &'a mut [u8],
    ) -> Pin<Box<dyn Future<Output = io::Result<usize>> + Send + 'a>>;
}

/// How the gateway reaches an instance's private address.
pub trait Dialer: Send + Sync + 'static {
    /// Opens a TCP connection to `addr` (a private IP), within `timeout`.
    fn dial(&self, addr: SocketAddrV4, timeout: Duration) -> DialFuture<Box<dyn MeshStream>>;
    /// Opens a UDP flow to `addr`.
    fn udp(&self, addr: SocketAddrV4) -> DialFuture<Box<dyn MeshDatagram>>;
}

/// Whether a dial failed for the gateway's own lack of resources (local
/// ports, file descriptors, socket buffers, memory) rather than for
/// anything the instance did: such a failure must not mark the instance
/// down (the next dial to any instance would fail the same way).
pub fn is_local_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EADDRNOTAVAIL
                | libc::EADDRINUSE
                | libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
        )
    )
}

/// Kernel mode: the overlay is routed through this host's TUN interface,
/// so plain sockets reach instances.
#[derive(Debug, Clone, Copy, Default)]
pub struct KernelDialer;

impl Dialer for KernelDialer {
    fn dial(&self, addr: SocketAddrV4, timeout: Duration) -> DialFuture<Box<dyn MeshStream>> {
        Box::pin(async move {
            let s = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
            let _ = s.set_nodelay(true);
            Ok(Box::new(s) as Box<dyn MeshStream>)
        })
    }

    fn udp(&self, addr: SocketAddrV4) -> DialFuture<Box<dyn MeshDatagram>> {
        Box::pin(async move {
            let s = tokio::net::UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], 0))).await?;
            s.connect(addr).await?;
            Ok(Box::new(KernelUdp(s)) as Box<dyn MeshDatagram>)
        })
    }
}

/// Userspace mode: instances are reached through the node's stack.
pub struct StackDialer(pub Arc<Stack>);

impl Dialer for StackDialer {
    fn dial(&self, addr: SocketAddrV4, timeout: Duration) -> DialFuture<Box<dyn MeshStream>> {
        let stack = self.0.clone();
        Box::pin(async move {
            let s = tokio::time::timeout(timeout, stack.dial_tcp(addr.into()))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
            let _ = s.set_nodelay(true);
            Ok(Box::new(s) as Box<dyn MeshStream>)
        })
    }

    fn udp(&self, addr: SocketAddrV4) -> DialFuture<Box<dyn MeshDatagram>> {
        let stack = self.0.clone();
        Box::pin(async move {
            let relay = tokio::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?;
            let relay_addr = relay.local_addr()?;
            let ours = tokio::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?;
            ours.connect(relay_addr).await?;
            let task = tokio::spawn(async move { stack.forward_udp(relay, addr.into()).await });
            Ok(Box::new(StackUdp(ours, task)) as Box<dyn MeshDatagram>)
        })
    }
}

/// A UDP flow relayed through the stack; the relay ends with it.
struct StackUdp(tokio::net::UdpSocket, tokio::task::JoinHandle<()>);

impl Drop for StackUdp {
    fn drop(&mut self) {
        self.1.abort();
    }
}

impl MeshDatagram for StackUdp {
    fn send<'a>(
        &'a self,
        buf: &'a [u8],
    ) -> Pin<Box<dyn Future<Output = io::Result<usize>> + Send + 'a>> {
        Box::pin(self.0.send(buf))
    }
    fn recv<'a>(
        &'a self,
        buf: &'a mut [u8],
    ) -> Pin<Box<dyn Future<Output = io::Result<usize>> + Send + 'a>> {
        Box::pin(self.0.recv(buf))
    }
}

/// A connected UDP socket.
struct KernelUdp(tokio::net::UdpSocket);

impl MeshDatagram for KernelUdp {
    fn send<'a>(
        &'a self,
        buf: &'a [u8],
    ) -> Pin<Box<dyn Future<Output = io::Result<usize>> + Send + 'a>> {
        Box::pin(self.0.send(buf))
    }
    fn recv<'a>(
        &'a self,
        buf: &'a mut [u8],
    ) -> Pin<Box<dyn Future<Output = io::Result<usize>> + Send + 'a>> {
        Box::pin(self.0.recv(buf))
    }
}

/// The runner label every gateway membership carries: how gateways of a
/// network count each other ([`fleet_share`]).
pub const GATEWAY_RUNNER: &str = "gateway";

/// This gateway's part of a group's per-instance limits when `gateways`
/// gateways (online members with the [`GATEWAY_RUNNER`] label, this one
/// included) serve the network and this one is `rank`th among them (by
/// instance name): `hard_limit` split so that the parts add up to it
/// exactly (the remainder to the first ranks); `soft_limit` split the same
/// way but at least 1 where the hard part allows one, and never above the
/// hard part. A part of 0 (more gateways than `hard_limit`) serves nothing.
pub fn fleet_share(
    limits: meshlib::services::Limits,
    gateways: usize,
    rank: usize,
) -> meshlib::services::Limits {
    let n = gateways.max(1);
    let split = |total: u16| -> u16 {
        let total = usize::from(total);
        let part = total / n + usize::from(rank < total % n);
        u16::try_from(part).unwrap_or(u16::MAX)
    };
    let hard = split(limits.hard_limit);
    let soft = split(limits.soft_limit).max(1).min(hard);
    meshlib::services::Limits {
        soft_limit: soft,
        hard_limit: hard,
    }
}

/// What the gateway joins as.
#[derive(Debug, Clone)]
pub struct MemberSettings {
    /// The join token.
    pub token: JoinToken,
    /// Service name it joins as (default `gateway`).
    pub service: String,
    /// Wanted instance name.
    pub instance: Option<meshlib::ids::InstanceName>,
    /// TUN interface name (kernel mode; also the UAPI socket's name).
    pub interface: String,
    /// WireGuard UDP port.
    pub listen_port: u16,
    /// Underlay endpoints to advertise (default: local addresses).
    pub endpoints: Vec<SocketAddr>,
    /// Userspace mode (no TUN, no privileges for the data plane).
    pub userspace: bool,
}

/// Why the membership failed.
#[derive(Debug, thiserror::Error)]
pub enum MemberError {
    /// The node could not join or start.
    #[error(transparent)]
    Node(#[from] NodeError),
}

/// The gateway's running membership.
pub struct Membership {
    /// The current map; changes as the keyserver pushes.
    pub map: watch::Receiver<Arc<NetworkMap>>,
    /// The gateway's private IP.
    pub ip: Ipv4Addr,
    node: Node,
    forward: tokio::task::JoinHandle<()>,
    _uapi: Option<UapiServer>,
}

impl Membership {
    /// Joins, brings the data plane up and follows the map.
    pub async fn start(s: MemberSettings) -> Result<Self, MemberError> {
        let mode = if s.userspace {
            NodeMode::Userspace {
                service_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            }
        } else {
            NodeMode::Kernel {
                interface: s.interface.clone(),
            }
        };
        let node = Node::start(NodeConfig {
            token: Some(s.token),
            service: Some(s.service),
            instance: s.instance,
            runner: GATEWAY_RUNNER.into(),
            mode,
            listen_port: s.listen_port,
            endpoints: s.endpoints,
            ..NodeConfig::default()
        })
        .await?;
        let uapi = match UapiServer::start(
            node.engine().clone(),
            &uapi_server::socket_path(&s.interface),
        ) {
            Ok(u) => Some(u),
            Err(e) => {
                tracing::warn!(error = %e, "no UAPI socket for the gateway");
                None
            }
        };
        tracing::info!(ip = %node.ip(), instance = %node.instance(), "gateway joined");
        // The map as the gateway's routes want it (shared, cheap to clone).
        let mut node_map = node.watch_map();
        let first = Arc::new(node_map.borrow_and_update().clone());
        let (tx, rx) = watch::channel(first);
        let forward = tokio::spawn(async move {
            while node_map.changed().await.is_ok() {
                let map = Arc::new(node_map.borrow_and_update().clone());
                if tx.send(map).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            map: rx,
            ip: node.ip(),
            node,
            forward,
            _uapi: uapi,
        })
    }

    /// The gateway's instance name in the network.
    pub fn instance(&self) -> meshlib::ids::InstanceName {
        self.node.instance().clone()
    }

    /// How this membership reaches instances.
    pub fn dialer(&self) -> Arc<dyn Dialer> {
        match self.node.stack() {
            Some(stack) => Arc::new(StackDialer(stack.clone())),
            None => Arc::new(KernelDialer),
        }
    }

    /// The node's line to the keyserver (the gateway's load per service
    /// group goes out with its traffic report).
    pub fn control_requests(&self) -> meshlib::node::ControlRequests {
        self.node.control_requests()
    }

    /// Leaves the network (peers forget the gateway within a second) and
    /// takes the data plane down.
    pub async fn leave(self) {
        self.forward.abort();
        if !self.node.leave().await {
            tracing::warn!("the keyserver did not confirm the gateway's leave");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleet_shares_add_up_to_the_group_limits() {
        use meshlib::services::Limits;
        let l = |soft, hard| Limits {
            soft_limit: soft,
            hard_limit: hard,
        };
        for (limits, n) in [
            (l(4, 4), 2),
            (l(5, 7), 3),
            (l(1, 65535), 2),
            (l(3, 3), 5),
            (l(100, 100), 1),
            (l(65535, 65535), 7),
        ] {
            let parts: Vec<Limits> = (0..n).map(|r| fleet_share(limits, n, r)).collect();
            let hard: u32 = parts.iter().map(|p| u32::from(p.hard_limit)).sum();
            assert_eq!(hard, u32::from(limits.hard_limit), "{limits:?} over {n}");
            for p in &parts {
                assert!(p.soft_limit <= p.hard_limit, "{p:?}");
                // Each gateway with room may hold one before queueing.
                assert!(p.hard_limit == 0 || p.soft_limit >= 1, "{p:?}");
            }
            let soft: u32 = parts.iter().map(|p| u32::from(p.soft_limit)).sum();
            assert!(
                soft < u32::from(limits.soft_limit) + n as u32,
                "{limits:?} over {n}: soft parts {soft}"
            );
        }
        // Two gateways, 4/4: 2/2 each.
        assert_eq!(fleet_share(l(4, 4), 2, 0), l(2, 2));
        assert_eq!(fleet_share(l(4, 4), 2, 1), l(2, 2));
        // Five gateways, hard 3: the last two serve nothing.
        assert_eq!(fleet_share(l(3, 3), 5, 4), l(0, 0));
        // Alone: the limits as they are.
        assert_eq!(fleet_share(l(2, 9), 1, 0), l(2, 9));
    }

    #[test]
    fn local_exhaustion_is_told_from_the_instances_failures() {
        for local in [
            libc::EADDRNOTAVAIL,
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOBUFS,
        ] {
            assert!(is_local_exhaustion(&io::Error::from_raw_os_error(local)));
        }
        for remote in [libc::ECONNREFUSED, libc::EHOSTUNREACH, libc::ETIMEDOUT] {
            assert!(!is_local_exhaustion(&io::Error::from_raw_os_error(remote)));
        }
        assert!(!is_local_exhaustion(&io::Error::new(
            io::ErrorKind::TimedOut,
            "connect timed out"
        )));
    }
}
