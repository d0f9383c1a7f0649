//! UDP ports: datagrams from one client address (a flow) go to one instance
//! of the group through a flow socket; the instance's answers go back from
//! the published address. A flow ends after `udp-idle-timeout` without a
//! datagram either way. A new flow takes a slot like a connection, but
//! cannot wait: past the soft limit it goes to the least-loaded instance
//! below its hard limit, and at the hard limit its datagram is dropped.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::member::MeshDatagram;
use super::routes::{RouteSettings, Routes};

/// Largest datagram relayed.
const MAX_DATAGRAM: usize = 65_535;
/// Datagrams buffered per flow towards its instance.
const FLOW_QUEUE: usize = 256;
/// Most flows per published UDP port.
const MAX_FLOWS: usize = 16_384;

/// What every UDP port shares.
pub struct UdpCtx {
    /// The groups.
    pub routes: Arc<Routes>,
    /// Timeouts.
    pub settings: RouteSettings,
    /// A flow ends after this long without a datagram.
    pub idle_timeout: Duration,
}

/// Serves a UDP port on `ip` until the task is aborted.
pub async fn serve(ctx: Arc<UdpCtx>, socket: UdpSocket, ip: IpAddr, port: u16) {
    let socket = Arc::new(socket);
    let flows: Arc<Mutex<HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>>> = Arc::default();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, client) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(%ip, port, error = %e, "UDP receive failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let datagram = buf[..n].to_vec();
        let existing = flows.lock().get(&client).cloned();
        let tx = match existing {
            Some(tx) if !tx.is_closed() => tx,
            _ => {
                if flows.lock().len() >= MAX_FLOWS {
                    continue;
                }
                let (tx, rx) = mpsc::channel(FLOW_QUEUE);
                flows.lock().insert(client, tx.clone());
                tokio::spawn(flow(
                    ctx.clone(),
                    socket.clone(),
                    flows.clone(),
                    client,
                    rx,
                    ip,
                    port,
                ));
                tx
            }
        };
        // A full flow queue drops the datagram, as a full link would.
        let _ = tx.try_send(datagram);
    }
}

/// One client's flow: a slot on an instance, relays both ways until idle.
async fn flow(
    ctx: Arc<UdpCtx>,
    socket: Arc<UdpSocket>,
    flows: Arc<Mutex<HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>>>,
    client: SocketAddr,
    mut rx: mpsc::Receiver<Vec<u8>>,
    ip: IpAddr,
    port: u16,
) {
    let forget = || {
        flows.lock().remove(&client);
    };
    let Some((rt, published)) = ctx.routes.find_udp(ip, port) else {
        forget();
        return;
    };
    let Some(slot) = rt
        .acquire_for(client.ip().to_canonical(), false, &ctx.settings)
        .await
    else {
        forget();
        return;
    };
    let addr = SocketAddrV4::new(slot.pick().ip, published.destination_port);
    let upstream: Box<dyn MeshDatagram> = match rt.dialer().udp(addr).await {
        Ok(u) => u,
        Err(e) if super::member::is_local_exhaustion(&e) => {
            ctx.routes
                .gateway
                .local_error("UDP flow to an instance", &e);
            forget();
            return;
        }
        Err(e) => {
            tracing::debug!(%client, error = %e, "UDP flow to the instance failed");
            slot.fail(&e);
            forget();
            return;
        }
    };
    slot.counters.forwarded.fetch_add(1, Relaxed);
    rt.stats.total.forwarded.fetch_add(1, Relaxed);
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        tokio::select! {
            d = rx.recv() => match d {
                Some(d) => {
                    if upstream.send(&d).await.is_ok() {
                        rt.stats.total.bytes_in.fetch_add(d.len() as u64, Relaxed);
                        slot.counters.bytes_in.fetch_add(d.len() as u64, Relaxed);
                    }
                }
                None => break,
            },
            r = upstream.recv(&mut buf) => match r {
                Ok(n) => {
                    if socket.send_to(&buf[..n], client).await.is_ok() {
                        rt.stats.total.bytes_out.fetch_add(n as u64, Relaxed);
                        slot.counters.bytes_out.fetch_add(n as u64, Relaxed);
                    }
                }
                // An ICMP error from the instance: the flow goes on.
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            },
            () = tokio::time::sleep(ctx.idle_timeout) => break,
        }
    }
    forget();
    drop(slot);
}
