//! The gateway as a mesh member: how it joins, follows the map and reaches
//! instances. Everything that depends on *how* the gateway is a member sits
//! in this one file, behind [`Dialer`], so that moving it onto
//! `meshlib::node::Node` touches nothing else.
//!
//! Today: a short-lived member (key in memory, like `sidecar tunnel`) that
//! joins with a token through [`meshlib::control::Session`], runs the
//! kernel-mode data plane (a TUN interface with its private IP and the
//! WireGuard engine), and reaches an instance's private `ip:port` with plain
//! sockets routed through that interface. On exit it leaves the network.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net};
use meshlib::control::{self, ClientConfig, ControlError, MemberMeta, Session};
use meshlib::keys::PrivateKey;
use meshlib::netmap::NetworkMap;
use meshlib::proto::JoinToken;
use meshlib::reconcile::{desired_peers, diff, DesiredPeers};
use meshlib::wg::{uapi_server, Engine, EngineConfig, TunConfig, TunDevice, UapiServer};
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

/// What the gateway joins as.
#[derive(Debug, Clone)]
pub struct MemberSettings {
    /// The join token.
    pub token: JoinToken,
    /// Service name it joins as (default `gateway`).
    pub service: String,
    /// Wanted instance name.
    pub instance: Option<meshlib::ids::InstanceName>,
    /// TUN interface name.
    pub interface: String,
    /// WireGuard UDP port.
    pub listen_port: u16,
    /// Underlay endpoints to advertise (default: local addresses).
    pub endpoints: Vec<SocketAddr>,
}

/// Why the membership failed.
#[derive(Debug, thiserror::Error)]
pub enum MemberError {
    /// The keyserver refused or could not be reached.
    #[error("keyserver: {0}")]
    Control(#[from] ControlError),
    /// The data plane could not start.
    #[error("data plane: {0}")]
    DataPlane(String),
}

/// The gateway's running membership.
pub struct Membership {
    /// The current map; changes as the keyserver pushes.
    pub map: watch::Receiver<Arc<NetworkMap>>,
    /// The gateway's private IP.
    pub ip: Ipv4Addr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Membership {
    /// Joins, brings the data plane up and follows the map in a task.
    pub async fn start(s: MemberSettings) -> Result<Self, MemberError> {
        let key = PrivateKey::generate();
        let bind: SocketAddr = if s.token.addrs.first().is_some_and(|a| a.is_ipv6()) {
            SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
        } else {
            SocketAddr::from(([0, 0, 0, 0], 0))
        };
        let endpoint = control::client_endpoint(bind)?;
        let endpoints = if s.endpoints.is_empty() {
            local_endpoints(s.listen_port)
        } else {
            s.endpoints.clone()
        };
        let meta = MemberMeta {
            public_key: key.public_key(),
            service: s.service.clone(),
            app_id: None,
            process_type: Default::default(),
            instance: s.instance.clone(),
            runner: "gateway".into(),
            endpoints,
            ports: vec![],
        };
        let session = control::join(&endpoint, &s.token, meta, &ClientConfig::default()).await?;
        let w = session.welcome().clone();
        let map = session.map().clone();
        let addr = Ipv4Net::new(w.ip, map.range.prefix_len())
            .map_err(|e| MemberError::DataPlane(e.to_string()))?;
        let mut tun = TunConfig::new(&s.interface);
        tun.address = Some(IpNet::V4(addr));
        let dev = TunDevice::create(&tun)
            .map_err(|e| MemberError::DataPlane(format!("TUN {}: {e}", s.interface)))?;
        let engine = Engine::start(
            Arc::new(dev),
            EngineConfig {
                listen_port: s.listen_port,
                private_key: Some(key.clone()),
                fwmark: 0,
            },
        )
        .map(Arc::new)
        .map_err(|e| MemberError::DataPlane(e.to_string()))?;
        let uapi = UapiServer::start(engine.clone(), &uapi_server::socket_path(&s.interface))
            .map_err(|e| MemberError::DataPlane(e.to_string()))?;
        tracing::info!(ip = %w.ip, instance = %w.instance, network = %w.network, "gateway joined");
        let (tx, rx) = watch::channel(Arc::new(map));
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(follow(session, engine, key, tx, stop_rx, uapi, endpoint));
        Ok(Self {
            map: rx,
            ip: w.ip,
            stop,
            task,
        })
    }

    /// Leaves the network (peers forget the gateway within a second) and
    /// takes the data plane down.
    pub async fn leave(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

/// Follows the map: peers to the engine, map to the watchers; leaves on stop.
async fn follow(
    mut session: Session,
    engine: Arc<Engine>,
    key: PrivateKey,
    maps: watch::Sender<Arc<NetworkMap>>,
    mut stop: watch::Receiver<bool>,
    _uapi: UapiServer,
    endpoint: quinn::Endpoint,
) {
    let mut peers = DesiredPeers::new();
    sync(&engine, &mut peers, session.map(), &key);
    loop {
        tokio::select! {
            ev = session.next_event() => match ev {
                Ok(_) => {
                    let map = session.map();
                    if map.generation != maps.borrow().generation {
                        sync(&engine, &mut peers, map, &key);
                        let _ = maps.send(Arc::new(map.clone()));
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "gateway membership ended");
                    break;
                }
            },
            _ = stop.changed() => {
                if !session.leave(Duration::from_secs(3)).await {
                    tracing::warn!("the keyserver did not confirm the gateway's leave");
                }
                endpoint.wait_idle().await;
                break;
            }
        }
    }
    engine.shutdown();
}

/// Applies the map's peers to the engine.
fn sync(engine: &Engine, current: &mut DesiredPeers, map: &NetworkMap, key: &PrivateKey) {
    let desired = desired_peers(map, &key.public_key(), 25, true);
    for (peer, e) in engine.apply_diff(diff(current, &desired)) {
        tracing::warn!(%peer, error = %e, "cannot configure peer");
    }
    *current = desired;
}

/// The host's non-loopback addresses with the WireGuard port.
fn local_endpoints(port: u16) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .map(|i| i.ip())
        .filter(|ip| match ip {
            IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local() && !v4.is_unspecified(),
            IpAddr::V6(_) => false,
        })
        .map(|ip| SocketAddr::new(ip, port))
        .collect();
    out.sort();
    out.dedup();
    out.truncate(8);
    out
}
