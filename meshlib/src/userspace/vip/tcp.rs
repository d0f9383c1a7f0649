//! TCP on a service address: accept, choose an instance, dial it (again on
//! another one when refused or unanswered), relay until either side ends
//! or the instance leaves.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

use tokio::net::{TcpListener, TcpStream};

use super::balancer::{Balancer, Choice};
use super::{Backend, Shared, MAX_ATTEMPTS};
use crate::userspace::tcp::{connect_local, reset_on_close};
use crate::userspace::{DialError, TunnelStream};

/// A connection to the chosen instance.
enum Dialed {
    /// Through the tunnel.
    Tunnel(TunnelStream),
    /// This member's own instance, on the host.
    Local(TcpStream),
}

/// Accepts connections on `listener`, each served on its own task. Runs
/// until aborted.
pub(super) async fn accept(shared: Arc<Shared>, balancer: Arc<Balancer>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((client, _)) => {
                tokio::spawn(serve(shared.clone(), balancer.clone(), client));
            }
            Err(e) => {
                tracing::debug!(service = %balancer.service, "accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// One client connection: dialled on instances until one accepts (at most
/// [`MAX_ATTEMPTS`]), then relayed; refused (reset) when none does.
async fn serve(shared: Arc<Shared>, balancer: Arc<Balancer>, client: TcpStream) {
    let _ = client.set_nodelay(true);
    // One hold per connection, however many attempts.
    let mut held_until: Option<tokio::time::Instant> = None;
    for _ in 0..MAX_ATTEMPTS {
        let backend = match balancer.choose(true, Instant::now()) {
            Choice::Go(b) => b,
            Choice::Refuse => break,
            Choice::Hold {
                id,
                rx,
                timeout,
                wake,
            } => {
                if wake {
                    shared.wake(&balancer.service);
                }
                let deadline =
                    *held_until.get_or_insert_with(|| tokio::time::Instant::now() + timeout);
                // Woken by a dispatch, or by the balancer closing (an
                // error): either way, ask where the waiter stands.
                let mut rx = rx;
                let got = tokio::time::timeout_at(deadline, &mut rx).await;
                match got {
                    Ok(Ok(b)) => b,
                    _ => match balancer.give_up(id, rx) {
                        Some(b) => b,
                        None => break,
                    },
                }
            }
        };
        match dial(&shared, &backend, balancer.port).await {
            Ok(conn) => return relay(&balancer, backend, conn, client).await,
            Err(e) => {
                tracing::debug!(service = %balancer.service, instance = %backend.instance, "dial: {e}; trying another instance");
                balancer.failed(&backend, Instant::now());
            }
        }
    }
    tracing::debug!(service = %balancer.service, port = balancer.port, "no instance accepted the connection; refused");
    // A reset, as from a closed port.
    let _ = client.set_linger(Some(std::time::Duration::ZERO));
}

/// Dials `b` on `port`, within the dial timeout.
async fn dial(shared: &Shared, b: &Backend, port: u16) -> Result<Dialed, DialError> {
    let timeout = shared.cfg.dial_timeout;
    if b.local {
        let target = shared.stack.inner.inbound_target(port);
        return match tokio::time::timeout(timeout, connect_local(target)).await {
            Ok(Ok(s)) => Ok(Dialed::Local(s)),
            Ok(Err(_)) => Err(DialError::Refused),
            Err(_) => Err(DialError::TimedOut(timeout)),
        };
    }
    let dst = std::net::SocketAddr::new(b.ip.into(), port);
    shared
        .stack
        .open_tcp(dst, timeout)
        .await
        .map(Dialed::Tunnel)
}

/// Relays `client` over `conn` until both ends closed, one broke, or the
/// instance left (then both are reset); then frees the instance's slot.
async fn relay(balancer: &Balancer, b: Backend, conn: Dialed, client: TcpStream) {
    let Some((id, cancelled)) = balancer.register(b.key) else {
        // The instance left while it was dialled: reset (drops).
        balancer.release(&b, Instant::now());
        return;
    };
    let relay = async move {
        match conn {
            Dialed::Tunnel(t) => {
                t.relay(client).await;
            }
            Dialed::Local(s) => local_relay(client, s).await,
        }
    };
    tokio::select! {
        () = relay => {}
        _ = cancelled => {
            tracing::debug!(instance = %b.instance, "instance left; connection reset");
        }
    }
    balancer.unregister(id);
    balancer.release(&b, Instant::now());
}

/// Relays two host sockets until both ends closed or one broke; dropped
/// midway (the instance left), it resets both.
async fn local_relay(mut client: TcpStream, mut server: TcpStream) {
    let _ = server.set_nodelay(true);
    let mut guard = ResetBoth {
        fds: [client.as_raw_fd(), server.as_raw_fd()],
        armed: true,
    };
    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
    guard.armed = false;
}

/// Resets two sockets that outlive it ([`reset_on_close`]'s contract).
struct ResetBoth {
    fds: [RawFd; 2],
    armed: bool,
}

impl Drop for ResetBoth {
    fn drop(&mut self) {
        if self.armed {
            self.fds.iter().copied().for_each(reset_on_close);
        }
    }
}
