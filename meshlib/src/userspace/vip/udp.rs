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
use super::stats::HeldGuard;
use super::{Backend, Shared};
use crate::userspace::udp::{open_local, recv, send, udp_socket, MAX_DATAGRAM};

/// Most datagrams held for one UDP flow waiting for a wake; later ones
/// are dropped until the flow goes on.
pub const MAX_HELD_DATAGRAMS: usize = 4;
/// Most bytes held for one UDP flow waiting for a wake.
pub const MAX_HELD_BYTES: usize = 8 * 1024;
/// Most UDP flows held for a wake per listener (each also takes a place in
/// the service's budget, [`super::stats::MAX_HELD_PER_SERVICE`]).
pub const MAX_HELD_UDP_FLOWS: usize = 64;

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
    /// When its first datagram arrived (for the connect time: to the
    /// first answer).
    started: Instant,
}

/// A sender's entry: pinned, or held while its service is woken.
enum Entry {
    Open(Arc<Flow>),
    /// Its first datagrams, in order, within [`MAX_HELD_DATAGRAMS`] and
    /// [`MAX_HELD_BYTES`].
    Held {
        datagrams: Vec<Vec<u8>>,
        bytes: usize,
    },
}

type Flows = Arc<Mutex<HashMap<SocketAddr, Entry>>>;

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
        let mut table = flows.lock();
        let flow = match table.get_mut(&client) {
            Some(Entry::Open(flow)) => flow,
            Some(Entry::Held { datagrams, bytes }) => {
                // Held in order, within bounds; beyond them dropped.
                if datagrams.len() < MAX_HELD_DATAGRAMS && *bytes + n <= MAX_HELD_BYTES {
                    datagrams.push(buf[..n].to_vec());
                    *bytes += n;
                }
                continue;
            }
            None => continue,
        };
        let inner = &shared.stack.inner;
        flow.last.store(inner.now_ms(), Relaxed);
        match &flow.way {
            Way::Tunnel { h, dst } => send(&mut inner.net.lock(), *h, &buf[..n], *dst),
            // A full socket drops the datagram, as UDP may.
            Way::Local(s) => drop(s.try_send(&buf[..n])),
        }
        balancer.stats.add_sent(n);
        drop(table);
        inner.kick();
    }
}

/// A new sender: pins it to an instance and starts its answer task, or,
/// when its service sleeps and is wakeable, holds it (an empty entry the
/// caller fills with the datagram) while the service is woken. False when the
/// datagram must be dropped (table full, no instance, hold budget spent).
async fn open(
    shared: &Arc<Shared>,
    balancer: &Arc<Balancer>,
    flows: &Flows,
    socket: &Arc<UdpSocket>,
    client: SocketAddr,
) -> bool {
    let stats = &balancer.stats;
    if flows.lock().len() >= shared.cfg.max_udp_flows {
        stats.refused();
        return false;
    }
    let b = match balancer.choose_datagram(Instant::now()) {
        Choice::Go(b) => b,
        Choice::Refuse => {
            stats.refused();
            return false;
        }
        Choice::Hold {
            id,
            rx,
            timeout,
            wake,
        } => {
            let held_here = || {
                flows
                    .lock()
                    .values()
                    .filter(|e| matches!(e, Entry::Held { .. }))
                    .count()
            };
            // Held only while no instance is online (never behind busy or
            // down ones), within the listener's and the service's bounds.
            if !wake || held_here() >= MAX_HELD_UDP_FLOWS || !stats.try_hold() {
                if let Some(b) = balancer.give_up(id, rx) {
                    balancer.release(&b, Instant::now());
                }
                stats.refused();
                return false;
            }
            let hold = HeldGuard(stats.clone());
            stats.begin();
            flows.lock().insert(
                client,
                Entry::Held {
                    datagrams: Vec::new(),
                    bytes: 0,
                },
            );
            shared.wake(&balancer.service, &balancer.stats);
            let ctx = HoldCtx {
                shared: shared.clone(),
                balancer: balancer.clone(),
                flows: flows.clone(),
                socket: socket.clone(),
                client,
                started: Instant::now(),
            };
            tokio::spawn(held(ctx, id, rx, timeout, hold));
            return true;
        }
    };
    stats.begin();
    let ok = pin(shared, balancer, flows, socket, client, b, Instant::now())
        .await
        .is_some();
    if ok {
        stats.opened(None);
    } else {
        stats.end(true);
    }
    ok
}

/// What a held sender's task holds.
struct HoldCtx {
    shared: Arc<Shared>,
    balancer: Arc<Balancer>,
    flows: Flows,
    socket: Arc<UdpSocket>,
    client: SocketAddr,
    started: Instant,
}

/// Waits for an instance for a held sender, at most `timeout`: then pins
/// the sender to it and sends its held datagrams on in order; or, past the
/// timeout, drops them and forgets the sender (its next datagram is a new
/// flow).
async fn held(
    ctx: HoldCtx,
    id: u64,
    mut rx: tokio::sync::oneshot::Receiver<Backend>,
    timeout: Duration,
    hold: HeldGuard,
) {
    let stats = ctx.balancer.stats.clone();
    let got = match tokio::time::timeout(timeout, &mut rx).await {
        Ok(Ok(b)) => Some(b),
        _ => ctx.balancer.give_up(id, rx),
    };
    drop(hold);
    let pinned = match got {
        Some(b) => pin(
            &ctx.shared,
            &ctx.balancer,
            &ctx.flows,
            &ctx.socket,
            ctx.client,
            b,
            ctx.started,
        )
        .await
        .is_some(),
        None => false,
    };
    if pinned {
        stats.opened(None);
    } else {
        tracing::debug!(service = %ctx.balancer.service, client = %ctx.client, "no instance within the wake timeout; held datagrams dropped");
        let mut table = ctx.flows.lock();
        if matches!(table.get(&ctx.client), Some(Entry::Held { .. })) {
            table.remove(&ctx.client);
        }
        drop(table);
        stats.end(true);
    }
}

/// Pins `client` to `b`: opens the flow's way, makes the flow the
/// sender's entry (sending any datagrams held for it first, in order) and
/// starts its answer task. `None` when the instance left meanwhile or no
/// socket could be opened (the sender's entry is then left as it was).
async fn pin(
    shared: &Arc<Shared>,
    balancer: &Arc<Balancer>,
    flows: &Flows,
    socket: &Arc<UdpSocket>,
    client: SocketAddr,
    b: Backend,
    started: Instant,
) -> Option<()> {
    let Some((id, cancelled)) = balancer.register(b.key) else {
        balancer.release(&b, Instant::now());
        return None;
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
        return None;
    };
    let flow = Arc::new(Flow {
        way,
        last: AtomicU64::new(inner.now_ms()),
        started,
    });
    let mut table = flows.lock();
    if let Some(Entry::Held { datagrams, .. }) = table.insert(client, Entry::Open(flow.clone())) {
        for d in &datagrams {
            match &flow.way {
                Way::Tunnel { h, dst } => send(&mut inner.net.lock(), *h, d, *dst),
                Way::Local(s) => drop(s.try_send(d)),
            }
            balancer.stats.add_sent(d.len());
        }
    }
    drop(table);
    inner.kick();
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
    Some(())
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
    let stats = &ctx.balancer.stats;
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut answered = false;
    loop {
        tokio::select! {
            got = answer(&ctx, &mut buf) => {
                if let Some(n) = got {
                    if !answered {
                        answered = true;
                        stats.connect(ctx.flow.started.elapsed());
                    }
                    stats.add_received(n);
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
    stats.end(false);
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
