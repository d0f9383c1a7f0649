//! The private DNS server: UDP and TCP on one address, answers from the
//! current [`NameIndex`] (swapped in whole on every network-map change, so
//! answers change the moment a change arrives), everything else relayed to
//! the upstream resolvers the machine had.
//!
//! The answer logic is [`meshlib::dns::handle`]; this module owns sockets,
//! tasks and timeouts. [`serve`] takes bound sockets and a shutdown future, so
//! tests bind port 0 and run it in-process.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meshlib::dns::{handle, Reply, Transport, DEFAULT_TTL};
use meshlib::names::NameIndex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{watch, Semaphore};
use tokio::time::timeout;

/// Settings of the DNS server.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// TTL of our answers, seconds. Default 30 (seed 003).
    pub ttl: u32,
    /// Where names outside our zones go, tried in order. Default: the
    /// `nameserver` lines of the machine's `/etc/resolv.conf` as it was before
    /// the sidecar pointed it at itself.
    pub upstreams: Vec<SocketAddr>,
    /// How long to wait for one upstream before trying the next. Default 2 s.
    pub upstream_timeout: Duration,
    /// Most queries being forwarded at once (UDP) and TCP connections open
    /// at once; beyond that, queries are dropped (the client retries).
    /// Default 256.
    pub max_in_flight: usize,
    /// An idle TCP connection is closed after this long. Default 10 s.
    pub tcp_idle: Duration,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            ttl: DEFAULT_TTL,
            upstreams: Vec::new(),
            upstream_timeout: Duration::from_secs(2),
            max_in_flight: 256,
            tcp_idle: Duration::from_secs(10),
        }
    }
}

/// Largest DNS message over UDP we accept.
const MAX_UDP: usize = 65_535;

/// Serves DNS on `udp` and `tcp` until `shutdown` completes.
pub async fn serve(
    udp: UdpSocket,
    tcp: TcpListener,
    names: watch::Receiver<Arc<NameIndex>>,
    config: DnsConfig,
    shutdown: impl Future<Output = ()>,
) {
    let shared = Arc::new(Shared {
        names,
        permits: Arc::new(Semaphore::new(config.max_in_flight)),
        config,
    });
    let udp = Arc::new(udp);
    tokio::select! {
        () = udp_loop(udp, shared.clone()) => {}
        () = tcp_loop(tcp, shared) => {}
        () = shutdown => {}
    }
}

struct Shared {
    names: watch::Receiver<Arc<NameIndex>>,
    /// One permit per forwarded UDP query or open TCP connection.
    permits: Arc<Semaphore>,
    config: DnsConfig,
}

impl Shared {
    fn answer(&self, query: &[u8], transport: Transport) -> Reply {
        let index = self.names.borrow().clone();
        handle(query, &index, self.config.ttl, transport)
    }
}

async fn udp_loop(socket: Arc<UdpSocket>, shared: Arc<Shared>) {
    let mut buf = vec![0u8; MAX_UDP];
    loop {
        let (len, client) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                // ICMP errors from earlier sends surface here; keep serving.
                tracing::debug!(error = %e, "dns: udp receive");
                continue;
            }
        };
        let query = &buf[..len];
        match shared.answer(query, Transport::Udp) {
            Reply::Respond(bytes) => {
                let _ = socket.send_to(&bytes, client).await;
            }
            Reply::Drop => {}
            Reply::Forward => {
                let Ok(permit) = shared.permits.clone().try_acquire_owned() else {
                    tracing::warn!("dns: too many queries in flight; dropping one");
                    continue;
                };
                let (socket, shared, query) = (socket.clone(), shared.clone(), query.to_vec());
                tokio::spawn(async move {
                    let _permit = permit;
                    let reply = forward_udp(&query, &shared.config).await;
                    let _ = socket.send_to(&reply, client).await;
                });
            }
        }
    }
}

/// Relays `query` to each upstream in turn over UDP; SERVFAIL when none answers.
async fn forward_udp(query: &[u8], config: &DnsConfig) -> Vec<u8> {
    for upstream in &config.upstreams {
        match timeout(config.upstream_timeout, ask_udp(query, *upstream)).await {
            Ok(Ok(reply)) => return reply,
            Ok(Err(e)) => tracing::debug!(%upstream, error = %e, "dns: upstream failed"),
            Err(_) => tracing::debug!(%upstream, "dns: upstream timed out"),
        }
    }
    servfail(query)
}

/// One UDP exchange with `upstream`, from a fresh socket (so replies cannot be
/// confused between clients); accepts only a reply from that address with
/// the query's id.
async fn ask_udp(query: &[u8], upstream: SocketAddr) -> std::io::Result<Vec<u8>> {
    let local: SocketAddr = if upstream.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(upstream).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; MAX_UDP];
    loop {
        let n = socket.recv(&mut buf).await?;
        if n >= 2 && query.len() >= 2 && buf[..2] == query[..2] {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

/// SERVFAIL for `query` (same id and question), or nothing if it has no header.
fn servfail(query: &[u8]) -> Vec<u8> {
    use meshlib::dns::servfail_for;
    servfail_for(query).unwrap_or_default()
}

async fn tcp_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "dns: tcp accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = shared.permits.clone().try_acquire_owned() else {
            continue; // dropping the stream closes it
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tcp_connection(stream, &shared).await;
        });
    }
}

/// Serves length-prefixed queries on one TCP connection until it closes or idles.
async fn tcp_connection(mut stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    loop {
        let mut len = [0u8; 2];
        match timeout(shared.config.tcp_idle, stream.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return Ok(()),
        }
        let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
        timeout(shared.config.tcp_idle, stream.read_exact(&mut query))
            .await
            .map_err(|_| std::io::ErrorKind::TimedOut)??;
        let reply = match shared.answer(&query, Transport::Tcp) {
            Reply::Respond(bytes) => bytes,
            Reply::Drop => return Ok(()),
            Reply::Forward => forward_tcp(&query, &shared.config).await,
        };
        if reply.is_empty() {
            return Ok(());
        }
        let len = u16::try_from(reply.len()).unwrap_or(u16::MAX).to_be_bytes();
        stream.write_all(&len).await?;
        stream.write_all(&reply).await?;
    }
}

/// Relays `query` to each upstream in turn over TCP; SERVFAIL when none answers.
async fn forward_tcp(query: &[u8], config: &DnsConfig) -> Vec<u8> {
    for upstream in &config.upstreams {
        match timeout(config.upstream_timeout, ask_tcp(query, *upstream)).await {
            Ok(Ok(reply)) => return reply,
            Ok(Err(e)) => tracing::debug!(%upstream, error = %e, "dns: upstream failed (tcp)"),
            Err(_) => tracing::debug!(%upstream, "dns: upstream timed out (tcp)"),
        }
    }
    servfail(query)
}

async fn ask_tcp(query: &[u8], upstream: SocketAddr) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(upstream).await?;
    let len = u16::try_from(query.len()).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    stream.write_all(&len.to_be_bytes()).await?;
    stream.write_all(query).await?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await?;
    let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut reply).await?;
    Ok(reply)
}
