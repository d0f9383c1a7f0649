//! UDP relays. A flow is (local sender, tunnel peer); it lives while
//! datagrams pass and is closed after [`super::StackConfig::udp_idle`].
//!
//! - outbound ([`forward`]): one tokio socket on a loopback address; per
//!   sender a smoltcp socket on an ephemeral port, talking to `dst`;
//! - inbound ([`bind_inbound`]): one smoltcp socket per port of the member;
//!   per tunnel peer a tokio socket connected to `<inbound_host>:<port>`.
//!
//! Lock order: a flow table, then the stack (`Inner::net`); never across an
//! await.

use std::collections::HashMap;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use parking_lot::Mutex;
use smoltcp::iface::SocketHandle;
use smoltcp::socket::udp;
use smoltcp::wire::{IpAddress, IpEndpoint};
use tokio::net::UdpSocket;

use super::{Inner, Net};

/// Largest datagram relayed.
pub(super) const MAX_DATAGRAM: usize = 65_535;
/// Datagrams each smoltcp UDP socket buffers per direction.
const SLOTS: usize = 256;
/// Payload bytes each smoltcp UDP socket buffers per direction.
const BYTES: usize = 512 * 1024;

/// A flow's last activity, in milliseconds of the stack's clock.
type LastSeen = Arc<AtomicU64>;

pub(super) fn udp_socket() -> udp::Socket<'static> {
    let buf = || udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; SLOTS], vec![0u8; BYTES]);
    udp::Socket::new(buf(), buf())
}

/// Waits for a datagram on smoltcp socket `h`; `None` for one that did not
/// fit `buf` (dropped).
pub(super) async fn recv(
    inner: &Inner,
    h: SocketHandle,
    buf: &mut [u8],
) -> Option<(usize, IpEndpoint)> {
    poll_fn(|cx| {
        let mut net = inner.net.lock();
        let s = net.sockets.get_mut::<udp::Socket>(h);
        match s.recv_slice(buf) {
            Ok((n, meta)) => Poll::Ready(Some((n, meta.endpoint))),
            Err(udp::RecvError::Exhausted) => {
                s.register_recv_waker(cx.waker());
                Poll::Pending
            }
            Err(_) => Poll::Ready(None),
        }
    })
    .await
}

/// Queues one datagram on smoltcp socket `h` (dropped when its buffer is
/// full, as UDP may).
pub(super) fn send(net: &mut Net, h: SocketHandle, data: &[u8], to: IpEndpoint) {
    let s = net.sockets.get_mut::<udp::Socket>(h);
    if let Err(e) = s.send_slice(data, to) {
        tracing::trace!("udp to {to}: {e}");
    }
}

/// True when the flow saw nothing for the idle time.
fn idle(inner: &Inner, last: &AtomicU64) -> bool {
    inner.now_ms().saturating_sub(last.load(Relaxed)) >= inner.cfg.udp_idle.as_millis() as u64
}

/// Outbound: datagrams on `socket` go to `dst` through the tunnel, one flow
/// per sender.
pub(super) async fn forward(inner: Arc<Inner>, socket: UdpSocket, dst: SocketAddr) {
    let socket = Arc::new(socket);
    let flows: Arc<Mutex<HashMap<SocketAddr, (SocketHandle, LastSeen)>>> = Arc::default();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let to = IpEndpoint::from(dst);
    loop {
        let Ok((n, client)) = socket.recv_from(&mut buf).await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let mut table = flows.lock();
        let now = inner.now_ms();
        let mut net = inner.net.lock();
        let (h, last) = match table.get(&client) {
            Some(f) => f.clone(),
            None => {
                let mut s = udp_socket();
                let port = net.ephemeral_port();
                let addr = IpAddress::from(inner.cfg.address);
                if s.bind((addr, port)).is_err() {
                    continue;
                }
                let h = net.sockets.add(s);
                let last: LastSeen = Arc::new(AtomicU64::new(now));
                table.insert(client, (h, last.clone()));
                inner.udp_flows.fetch_add(1, Relaxed);
                let task = answers(inner.clone(), flows.clone(), socket.clone(), client, h);
                inner.rt.spawn(task);
                (h, last)
            }
        };
        last.store(now, Relaxed);
        send(&mut net, h, &buf[..n], to);
        drop(net);
        drop(table);
        inner.kick();
    }
}

/// Outbound flow: answers from the tunnel go back to `client`; closes the
/// flow when idle.
async fn answers(
    inner: Arc<Inner>,
    flows: Arc<Mutex<HashMap<SocketAddr, (SocketHandle, LastSeen)>>>,
    socket: Arc<UdpSocket>,
    client: SocketAddr,
    h: SocketHandle,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        match tokio::time::timeout(inner.cfg.udp_idle, recv(&inner, h, &mut buf)).await {
            Ok(Some((n, _))) => {
                if let Some((_, last)) = flows.lock().get(&client) {
                    last.store(inner.now_ms(), Relaxed);
                }
                inner.kick();
                let _ = socket.send_to(&buf[..n], client).await;
            }
            Ok(None) => {}
            Err(_) => {
                let mut table = flows.lock();
                let quiet = table.get(&client).is_none_or(|(_, l)| idle(&inner, l));
                if quiet {
                    table.remove(&client);
                    inner.net.lock().sockets.remove(h);
                    return;
                }
            }
        }
    }
}

/// Inbound: binds a smoltcp socket on `port` of the member and starts its
/// relay task. Called by the stack thread (which holds `net`).
pub(super) fn bind_inbound(inner: &Arc<Inner>, net: &mut Net, port: u16) -> Option<SocketHandle> {
    let mut s = udp_socket();
    s.bind((IpAddress::from(inner.cfg.address), port)).ok()?;
    let h = net.sockets.add(s);
    inner.rt.spawn(serve_inbound(inner.clone(), h, port));
    Some(h)
}

/// Inbound flows of one port, by tunnel peer.
type PeerFlows = Arc<Mutex<HashMap<IpEndpoint, (Arc<UdpSocket>, LastSeen)>>>;

/// Relays datagrams arriving on `port` to the instance, one local socket per
/// tunnel peer; unbinds the port when no flow is left and it went idle.
async fn serve_inbound(inner: Arc<Inner>, h: SocketHandle, port: u16) {
    let flows: PeerFlows = Arc::default();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let target = inner.inbound_target(port);
    loop {
        let got = tokio::time::timeout(inner.cfg.udp_idle, recv(&inner, h, &mut buf)).await;
        let (n, from) = match got {
            Ok(Some(x)) => x,
            Ok(None) => continue,
            Err(_) => {
                let table = flows.lock();
                if table.is_empty() {
                    let mut net = inner.net.lock();
                    net.udp_ports.remove(&port);
                    net.sockets.remove(h);
                    return;
                }
                continue;
            }
        };
        inner.kick();
        let existing = flows.lock().get(&from).cloned();
        let (sock, last) = match existing {
            Some(f) => f,
            None => match open_local(target).await {
                Some(sock) => {
                    let last: LastSeen = Arc::new(AtomicU64::new(inner.now_ms()));
                    flows.lock().insert(from, (sock.clone(), last.clone()));
                    inner.udp_flows.fetch_add(1, Relaxed);
                    let task = replies(inner.clone(), flows.clone(), sock.clone(), from, h);
                    inner.rt.spawn(task);
                    (sock, last)
                }
                None => continue,
            },
        };
        last.store(inner.now_ms(), Relaxed);
        let _ = sock.send(&buf[..n]).await;
    }
}

/// A local socket connected to the instance's `target`.
pub(super) async fn open_local(target: SocketAddr) -> Option<Arc<UdpSocket>> {
    let any: SocketAddr = if target.is_ipv4() {
        ([127, 0, 0, 1], 0).into()
    } else {
        (std::net::Ipv6Addr::LOCALHOST, 0).into()
    };
    let sock = UdpSocket::bind(any).await.ok()?;
    sock.connect(target).await.ok()?;
    Some(Arc::new(sock))
}

/// Inbound flow: the instance's answers go back to `peer` through the
/// tunnel; ends when idle.
async fn replies(
    inner: Arc<Inner>,
    flows: PeerFlows,
    sock: Arc<UdpSocket>,
    peer: IpEndpoint,
    h: SocketHandle,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        match tokio::time::timeout(inner.cfg.udp_idle, sock.recv(&mut buf)).await {
            Ok(Ok(n)) => {
                let table = flows.lock();
                if let Some((_, last)) = table.get(&peer) {
                    last.store(inner.now_ms(), Relaxed);
                    send(&mut inner.net.lock(), h, &buf[..n], peer);
                }
                drop(table);
                inner.kick();
            }
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(_) => {
                let mut table = flows.lock();
                if table.get(&peer).is_none_or(|(_, l)| idle(&inner, l)) {
                    table.remove(&peer);
                    return;
                }
            }
        }
    }
}
