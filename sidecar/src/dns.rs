//! The private DNS server: UDP and TCP on one address, answers from the
//! current [`NameIndex`] (swapped in whole on every network-map change, so
//! answers change the moment a change arrives), everything else relayed to
//! the upstream resolvers the machine had.
//!
//! The answer logic is [`meshlib::dns::handle`]; this module owns sockets,
//! tasks, limits and timeouts. [`serve`] takes bound sockets and a shutdown
//! future, so tests bind port 0 and run it in-process.
//!
//! Limits, so that no client can starve the others (all in [`DnsConfig`]):
//! - TCP: at most `max_tcp` connections, `max_tcp_per_source` from one
//!   address. When a limit is reached, the oldest *idle* connection (one
//!   waiting for its next query) is closed to make room (RFC 7766 §6.2.3
//!   lets a server close idle connections under pressure); a connection
//!   that is idle longer than `tcp_idle`, or takes longer than `tcp_read` to
//!   send a started query or read its answer, is closed.
//! - Forwarding: at most `max_forwards` lookups in flight (UDP and TCP
//!   together; beyond that the client gets SERVFAIL at once) and at most
//!   `max_per_upstream` at one upstream: a slow upstream whose share is
//!   used up is skipped (after at most 250 ms), so the next one still
//!   answers. Each upstream gets `upstream_timeout`.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use meshlib::dns::{
    handle, rcode_label, rcode_of, servfail_for, Authority, Reply, Transport, DEFAULT_TTL,
    RCODE_LABELS,
};
use meshlib::names::NameIndex;
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::time::timeout;

use crate::status::StatusSource;

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
    /// Most forwarded lookups in flight at once (UDP and TCP); beyond that
    /// the client gets SERVFAIL at once. Default 256.
    pub max_forwards: usize,
    /// Most forwarded lookups in flight at one upstream; a busy (slow)
    /// upstream is skipped for the next. Default 64.
    pub max_per_upstream: usize,
    /// Most TCP connections open at once. Default 128.
    pub max_tcp: usize,
    /// Most TCP connections open from one client address. Default 32.
    pub max_tcp_per_source: usize,
    /// A TCP connection waiting for its next query is closed after this
    /// long. Default 5 s.
    pub tcp_idle: Duration,
    /// Time to receive the rest of a started query, and to write an answer,
    /// on TCP. Default 3 s.
    pub tcp_read: Duration,
    /// Responses by RCODE (shared with the metrics).
    pub stats: Arc<DnsStats>,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            ttl: DEFAULT_TTL,
            upstreams: Vec::new(),
            upstream_timeout: Duration::from_secs(2),
            max_forwards: 256,
            max_per_upstream: 64,
            max_tcp: 128,
            max_tcp_per_source: 32,
            tcp_idle: Duration::from_secs(5),
            tcp_read: Duration::from_secs(3),
            stats: Arc::default(),
        }
    }
}

/// Responses sent, counted by RCODE label ([`meshlib::dns::rcode_label`]).
#[derive(Debug, Default)]
pub struct DnsStats {
    responses: [AtomicU64; RCODE_LABELS.len()],
}

impl DnsStats {
    /// Counts one response with this RCODE.
    pub fn record(&self, rcode: u16) {
        let label = rcode_label(rcode);
        if let Some(i) = RCODE_LABELS.iter().position(|l| *l == label) {
            self.responses[i].fetch_add(1, Relaxed);
        }
    }

    /// Responses so far, by RCODE label (every label, zeros included).
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        RCODE_LABELS
            .iter()
            .zip(&self.responses)
            .map(|(l, n)| (l.to_string(), n.load(Relaxed)))
            .collect()
    }
}

/// `source` with the DNS response counters of `stats` filled in.
pub fn with_stats(source: StatusSource, stats: Arc<DnsStats>) -> StatusSource {
    Arc::new(move || {
        let mut status = source();
        status.dns_responses = stats.snapshot();
        status
    })
}

/// Largest DNS message over UDP we accept.
const MAX_UDP: usize = 65_535;

/// Longest wait for a free place at one upstream before trying the next.
const MAX_QUEUE_WAIT: Duration = Duration::from_millis(250);

/// Serves DNS on `udp` and `tcp` until `shutdown` completes.
pub async fn serve(
    udp: UdpSocket,
    tcp: TcpListener,
    names: watch::Receiver<Arc<NameIndex>>,
    config: DnsConfig,
    shutdown: impl Future<Output = ()>,
) {
    // The address we answer for our own name: the one we listen on, unless
    // it is a wildcard.
    let address = udp
        .local_addr()
        .ok()
        .map(|a| a.ip())
        .filter(|ip| !ip.is_unspecified());
    let upstreams = config
        .upstreams
        .iter()
        .map(|addr| Upstream {
            addr: *addr,
            permits: Arc::new(Semaphore::new(config.max_per_upstream.max(1))),
        })
        .collect();
    let shared = Arc::new(Shared {
        names,
        authority: Authority {
            ttl: config.ttl,
            address,
        },
        forwards: Arc::new(Semaphore::new(config.max_forwards.max(1))),
        upstreams,
        tcp: Mutex::new(TcpTable::default()),
        config,
    });
    let udp = Arc::new(udp);
    tokio::select! {
        () = udp_loop(udp, shared.clone()) => {}
        () = tcp_loop(tcp, shared) => {}
        () = shutdown => {}
    }
}

/// One upstream resolver and its share of the forwarding budget.
struct Upstream {
    addr: SocketAddr,
    permits: Arc<Semaphore>,
}

struct Shared {
    names: watch::Receiver<Arc<NameIndex>>,
    authority: Authority,
    /// One permit per forwarded lookup in flight.
    forwards: Arc<Semaphore>,
    upstreams: Vec<Upstream>,
    tcp: Mutex<TcpTable>,
    config: DnsConfig,
}

impl Shared {
    fn answer(&self, query: &[u8], transport: Transport) -> Reply {
        let index = self.names.borrow().clone();
        handle(query, &index, &self.authority, transport)
    }

    /// Counts a response about to be sent (ours or an upstream's).
    fn count(&self, bytes: &[u8]) {
        if let Some(rcode) = rcode_of(bytes) {
            self.config.stats.record(rcode);
        }
    }

    /// Relays `query` upstream (UDP or TCP like the client), within the
    /// forwarding budget; SERVFAIL when the budget is used up or no upstream
    /// answers.
    async fn forward(&self, query: &[u8], transport: Transport) -> Vec<u8> {
        let Ok(_permit) = self.forwards.clone().try_acquire_owned() else {
            tracing::debug!("dns: too many lookups in flight; SERVFAIL");
            return servfail(query);
        };
        for upstream in &self.upstreams {
            // A slow upstream holding its whole share is skipped after a
            // short wait; a fast one frees its share within that wait.
            let wait = (self.config.upstream_timeout / 4).min(MAX_QUEUE_WAIT);
            let Ok(Ok(_share)) = timeout(wait, upstream.permits.clone().acquire_owned()).await
            else {
                tracing::debug!(upstream = %upstream.addr, "dns: upstream busy, trying the next");
                continue;
            };
            let ask = async {
                match transport {
                    Transport::Udp => ask_udp(query, upstream.addr).await,
                    Transport::Tcp => ask_tcp(query, upstream.addr).await,
                }
            };
            match timeout(self.config.upstream_timeout, ask).await {
                Ok(Ok(reply)) => return reply,
                Ok(Err(e)) => {
                    tracing::debug!(upstream = %upstream.addr, error = %e, "dns: upstream failed")
                }
                Err(_) => tracing::debug!(upstream = %upstream.addr, "dns: upstream timed out"),
            }
        }
        servfail(query)
    }
}

/// SERVFAIL for `query` (same id and question), or nothing if it has no header.
fn servfail(query: &[u8]) -> Vec<u8> {
    servfail_for(query).unwrap_or_default()
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
            Reply::Respond(r) => {
                shared.config.stats.record(r.rcode);
                let _ = socket.send_to(&r.bytes, client).await;
            }
            Reply::Drop => {}
            Reply::Forward => {
                let (socket, shared, query) = (socket.clone(), shared.clone(), query.to_vec());
                tokio::spawn(async move {
                    let reply = shared.forward(&query, Transport::Udp).await;
                    if !reply.is_empty() {
                        shared.count(&reply);
                        let _ = socket.send_to(&reply, client).await;
                    }
                });
            }
        }
    }
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

/// The open TCP connections, oldest first, for the limits and for closing
/// idle ones under pressure.
#[derive(Default)]
struct TcpTable {
    next_id: u64,
    /// By id: ids grow, so iteration is oldest first.
    conns: BTreeMap<u64, TcpEntry>,
    per_source: HashMap<IpAddr, usize>,
}

struct TcpEntry {
    source: IpAddr,
    /// Waiting for the next query (may be closed to make room).
    idle: bool,
    /// Notified to ask the connection to close.
    close: Arc<Notify>,
}

impl TcpTable {
    /// Registers a connection from `source`, first closing the oldest idle
    /// one (from that source if its share is full) when a limit is reached.
    /// `None`: every connection is busy, refuse this one.
    fn admit(
        &mut self,
        source: IpAddr,
        max: usize,
        per_source: usize,
    ) -> Option<(u64, Arc<Notify>)> {
        if self.per_source.get(&source).copied().unwrap_or(0) >= per_source.max(1)
            && !self.evict_idle(Some(source))
        {
            return None;
        }
        if self.conns.len() >= max.max(1) && !self.evict_idle(None) {
            return None;
        }
        let id = self.next_id;
        self.next_id += 1;
        let close = Arc::new(Notify::new());
        self.conns.insert(
            id,
            TcpEntry {
                source,
                idle: true,
                close: close.clone(),
            },
        );
        *self.per_source.entry(source).or_default() += 1;
        Some((id, close))
    }

    /// Closes (forgets and notifies) the oldest idle connection, from
    /// `source` if given. Returns whether there was one.
    fn evict_idle(&mut self, source: Option<IpAddr>) -> bool {
        let victim = self
            .conns
            .iter()
            .find(|(_, c)| c.idle && source.is_none_or(|s| s == c.source))
            .map(|(id, _)| *id);
        let Some(entry) = victim.and_then(|id| self.remove(id)) else {
            return false;
        };
        entry.close.notify_one();
        true
    }

    fn remove(&mut self, id: u64) -> Option<TcpEntry> {
        let entry = self.conns.remove(&id)?;
        if let Some(n) = self.per_source.get_mut(&entry.source) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&entry.source);
            }
        }
        Some(entry)
    }

    fn set_idle(&mut self, id: u64, idle: bool) {
        if let Some(c) = self.conns.get_mut(&id) {
            c.idle = idle;
        }
    }
}

/// A connection's place in the [`TcpTable`]; leaving it frees the place.
struct TcpSlot {
    shared: Arc<Shared>,
    id: u64,
    close: Arc<Notify>,
}

impl Drop for TcpSlot {
    fn drop(&mut self) {
        self.shared.tcp.lock().remove(self.id);
    }
}

async fn tcp_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (stream, client) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // e.g. EMFILE: back off instead of spinning.
                tracing::warn!(error = %e, "dns: tcp accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let c = &shared.config;
        let admitted = shared
            .tcp
            .lock()
            .admit(client.ip(), c.max_tcp, c.max_tcp_per_source);
        let Some((id, close)) = admitted else {
            tracing::debug!(%client, "dns: every TCP connection busy; refusing one");
            continue; // dropping the stream closes it
        };
        let slot = TcpSlot {
            shared: shared.clone(),
            id,
            close,
        };
        tokio::spawn(async move {
            let _ = tcp_connection(stream, &slot).await;
        });
    }
}

/// Serves length-prefixed queries on one TCP connection until it closes,
/// idles, is too slow, or is asked to make room.
async fn tcp_connection(mut stream: TcpStream, slot: &TcpSlot) -> std::io::Result<()> {
    let shared = &slot.shared;
    let (idle, read) = (shared.config.tcp_idle, shared.config.tcp_read);
    loop {
        shared.tcp.lock().set_idle(slot.id, true);
        let mut len = [0u8; 2];
        tokio::select! {
            r = timeout(idle, stream.read_exact(&mut len)) => match r {
                Ok(Ok(_)) => {}
                _ => return Ok(()),
            },
            () = slot.close.notified() => return Ok(()),
        }
        shared.tcp.lock().set_idle(slot.id, false);
        let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
        timeout(read, stream.read_exact(&mut query))
            .await
            .map_err(|_| std::io::ErrorKind::TimedOut)??;
        let reply = match shared.answer(&query, Transport::Tcp) {
            Reply::Respond(r) => {
                shared.config.stats.record(r.rcode);
                r.bytes
            }
            Reply::Drop => return Ok(()),
            Reply::Forward => {
                let reply = shared.forward(&query, Transport::Tcp).await;
                shared.count(&reply);
                reply
            }
        };
        if reply.is_empty() {
            return Ok(());
        }
        let len = u16::try_from(reply.len()).unwrap_or(u16::MAX).to_be_bytes();
        let write = async {
            stream.write_all(&len).await?;
            stream.write_all(&reply).await
        };
        timeout(read, write)
            .await
            .map_err(|_| std::io::ErrorKind::TimedOut)??;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_table_makes_room_by_closing_the_oldest_idle() {
        let (a, b): (IpAddr, IpAddr) = ("127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap());
        let mut t = TcpTable::default();
        let (first, first_close) = t.admit(a, 3, 2).unwrap();
        let (second, _) = t.admit(a, 3, 2).unwrap();
        t.set_idle(second, false);
        // a's share (2) is full: its oldest idle one (first) makes room.
        let (third, _) = t.admit(a, 3, 2).unwrap();
        assert!(!t.conns.contains_key(&first));
        assert!(
            first_close.notified().now_or_never().is_some(),
            "the evicted connection was told to close"
        );
        // b's first fills the total (3); b's second makes room by closing
        // the oldest idle one of any source: a's third (second is busy).
        let (b1, _) = t.admit(b, 3, 2).unwrap();
        assert_eq!(t.conns.len(), 3);
        let (_b2, _) = t.admit(b, 3, 2).unwrap();
        assert_eq!(t.conns.len(), 3);
        assert!(!t.conns.contains_key(&third));
        assert!(t.conns.contains_key(&second) && t.conns.contains_key(&b1));
        // Everything busy: refused.
        for c in t.conns.values_mut() {
            c.idle = false;
        }
        assert!(t.admit(b, 3, 2).is_none());
        assert_eq!(t.per_source.values().sum::<usize>(), t.conns.len());
    }

    #[test]
    fn stats_count_by_label() {
        let s = DnsStats::default();
        for code in [0, 0, 3, 16, 2, 99] {
            s.record(code);
        }
        let snap = s.snapshot();
        assert_eq!(snap["NOERROR"], 2);
        assert_eq!(snap["NXDOMAIN"], 1);
        assert_eq!(snap["BADVERS"], 1);
        assert_eq!(snap["SERVFAIL"], 1);
        assert_eq!(snap["OTHER"], 1);
        assert_eq!(snap["REFUSED"], 0);
    }

    trait NowOrNever: Future + Sized {
        fn now_or_never(self) -> Option<Self::Output> {
            let waker = std::task::Waker::noop();
            let mut cx = std::task::Context::from_waker(waker);
            let mut fut = std::pin::pin!(self);
            match fut.as_mut().poll(&mut cx) {
                std::task::Poll::Ready(v) => Some(v),
                std::task::Poll::Pending => None,
            }
        }
    }
    impl<F: Future> NowOrNever for F {}
}
