//! UDP on a service address: each new sender (client address and port) is
//! pinned to one instance; its datagrams go there and the answers come
//! back from the service address's listener, until the flow is idle or its
//! instance leaves.
//!
//! Lock order: the flow table, then the stack (`Inner::net`); never across
//! an await. Sending happens under the table lock (without waiting), so a
//! flow's socket is never used after its removal.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use smoltcp::iface::SocketHandle;
use smoltcp::wire::{IpAddress, IpEndpoint};
use tokio::net::UdpSocket;

use super::balancer::{Balancer, Cancelled, Choice};
use super::{Backend, Shared};
use crate::userspace::udp::{open_local, recv, send, udp_socket, MAX_DATAGRAM};

/// Where a flow's datagrams go.
enum Way {
    /// Through the tunnel, from a smoltcp socket of the flow's own.
    Tunnel { h: SocketHandle, dst: IpEndpoint },
    /// To this member's own instance, on the host.
    Local(Arc<UdpSocket>),
}

/// One pinned sender.
struct Flow {
    way: Way,
    /// Last datagram either way, in milliseconds of the stack's clock.
    last: AtomicU64,
}

type Flows = Arc<Mutex<HashMap<SocketAddr, Arc<Flow>>>>;

/// Relays datagrams arriving on `socket`. Runs until aborted (its flows
/// live on until idle or ended by the balancer).
pub(super) async fn serve(shared: Arc<Shared>, balancer: Arc<Balancer>, socket: UdpSocket) {
    let socket = Arc::new(socket);
    let flows: Flows = Arc::default();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let Ok((n, client)) = socket.recv_from(&mut buf).await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let known = flows.lock().contains_key(&client);
        if !known && !open(&shared, &balancer, &flows, &socket, client).await {
            continue;
        }
        let table = flows.lock();
        let Some(flow) = table.get(&client) else {
            continue;
        };
        let inner = &shared.stack.inner;
        flow.last.store(inner.now_ms(), Relaxed);
        match &flow.way {
            Way::Tunnel { h, dst } => send(&mut inner.net.lock(), *h, &buf[..n], *dst),
            // A full socket drops the datagram, as UDP may.
            Way::Local(s) => drop(s.try_send(&buf[..n])),
        }
        drop(table);
        inner.kick();
    }
}

/// Pins `client` to an instance and starts its answer task; false when the
/// datagram must be dropped (table full, no instance).
async fn open(
    shared: &Arc<Shared>,
    balancer: &Arc<Balancer>,
    flows: &Flows,
    socket: &Arc<UdpSocket>,
    client: SocketAddr,
) -> bool {
    if flows.lock().len() >= shared.cfg.max_udp_flows {
        return false;
    }
    // A datagram never waits (no instance: dropped).
    // TODO(scale-to-zero, issue 19 item 5): ask for a wake here too, and
    // hold the first datagrams of a flow within a bound.
    let Choice::Go(b) = balancer.choose(false, Instant::now()) else {
        return false;
    };
    let Some((id, cancelled)) = balancer.register(b.key) else {
        balancer.release(&b, Instant::now());
        return false;
    };
    let inner = &shared.stack.inner;
    let way = if b.local {
        open_local(inner.inbound_target(balancer.port))
            .await
            .map(Way::Local)
    } else {
        let mut net = inner.net.lock();
        let mut s = udp_socket();
        let port = net.ephemeral_port();
        let bound = s.bind((IpAddress::from(inner.cfg.address), port));
        bound.ok().map(|()| Way::Tunnel {
            h: net.sockets.add(s),
            dst: IpEndpoint::from(SocketAddr::new(b.ip.into(), balancer.port)),
        })
    };
    let Some(way) = way else {
        balancer.unregister(id);
        balancer.release(&b, Instant::now());
        return false;
    };
    let flow = Arc::new(Flow {
        way,
        last: AtomicU64::new(inner.now_ms()),
    });
    flows.lock().insert(client, flow.clone());
    inner.udp_flows.fetch_add(1, Relaxed);
    let ctx = FlowCtx {
        shared: shared.clone(),
        balancer: balancer.clone(),
        flows: flows.clone(),
        socket: socket.clone(),
        client,
        flow,
        backend: b,
        id,
    };
    tokio::spawn(answers(ctx, cancelled));
    true
}

/// What a flow's answer task holds.
struct FlowCtx {
    shared: Arc<Shared>,
    balancer: Arc<Balancer>,
    flows: Flows,
    socket: Arc<UdpSocket>,
    client: SocketAddr,
    flow: Arc<Flow>,
    backend: Backend,
    id: u64,
}

/// Sends the instance's answers back to the client until the flow is idle
/// or its instance leaves; then removes the flow.
async fn answers(ctx: FlowCtx, mut cancelled: Cancelled) {
    let inner = &ctx.shared.stack.inner;
    let idle = ctx.shared.cfg.udp_idle;
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        tokio::select! {
            got = answer(&ctx, &mut buf) => {
                if let Some(n) = got {
                    ctx.flow.last.store(inner.now_ms(), Relaxed);
                    inner.kick();
                    let _ = ctx.socket.send_to(&buf[..n], ctx.client).await;
                }
            }
            _ = &mut cancelled => break,
            () = tokio::time::sleep(idle) => {
                let quiet = inner.now_ms().saturating_sub(ctx.flow.last.load(Relaxed));
                if quiet >= idle.as_millis() as u64 {
                    break;
                }
            }
        }
    }
    let mut table = ctx.flows.lock();
    table.remove(&ctx.client);
    if let Way::Tunnel { h, .. } = ctx.flow.way {
        inner.net.lock().sockets.remove(h);
    }
    drop(table);
    ctx.balancer.unregister(ctx.id);
    ctx.balancer.release(&ctx.backend, Instant::now());
}

/// The next answer of the flow's instance (`None`: nothing usable).
async fn answer(ctx: &FlowCtx, buf: &mut [u8]) -> Option<usize> {
    match &ctx.flow.way {
        Way::Tunnel { h, .. } => recv(&ctx.shared.stack.inner, *h, buf).await.map(|(n, _)| n),
        Way::Local(s) => match s.recv(buf).await {
            Ok(n) => Some(n),
            Err(_) => {
                // Port unreachable and the like: not a reason to spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
                None
            }
        },
    }
}
