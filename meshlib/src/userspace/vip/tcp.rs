//! TCP on a service address: accept, choose an instance, dial it (again on
//! another one when refused or unanswered), relay until either side ends
//! or the instance leaves.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

use tokio::net::{TcpListener, TcpStream};

use super::balancer::{Balancer, Choice};
use super::stats::{HeldGuard, ServiceStats};
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

/// How long a held connection waits at most before it asks the balancer
/// again (a dispatch wakes it sooner).
const HOLD_RECHECK: std::time::Duration = std::time::Duration::from_millis(500);

/// A held connection whose woken instance refused (its application still
/// starting) dials it again after this, doubling up to [`HOLD_RETRY_MAX`],
/// instead of the pool's backoff (1 s, doubling): the wake's answer comes
/// soon after the application listens. Held connections are bounded
/// ([`super::MAX_HELD_PER_SERVICE`]), and so are these dials.
const HOLD_RETRY: std::time::Duration = std::time::Duration::from_millis(50);
/// Longest wait between a held connection's dials to a starting instance.
const HOLD_RETRY_MAX: std::time::Duration = std::time::Duration::from_millis(250);

/// One client connection: dialled on instances until one accepts (at most
/// [`MAX_ATTEMPTS`] failed dials), then relayed; refused (reset) when none
/// does, when the service's hold budget is spent, or when no instance came
/// within the wake timeout.
async fn serve(shared: Arc<Shared>, balancer: Arc<Balancer>, client: TcpStream) {
    let _ = client.set_nodelay(true);
    let stats = balancer.stats.clone();
    stats.begin();
    let accepted = Instant::now();
    // One hold per connection, however many attempts: its deadline and
    // its place in the service's hold budget.
    let mut held_until: Option<tokio::time::Instant> = None;
    let mut hold: Option<HeldGuard> = None;
    let mut failures = 0;
    // A held connection's last refusal, and when to dial it again.
    let mut refused_by: Option<Backend> = None;
    let mut retry = HOLD_RETRY;
    let opened = loop {
        if failures >= MAX_ATTEMPTS {
            break None;
        }
        let backend = match balancer.choose(true, Instant::now()) {
            Choice::Go(b) => b,
            // Held for a wake, and the woken instance is online but refused
            // (its application still starting): dial it again soon, within
            // the same deadline.
            Choice::Refuse if hold.is_some() && !balancer.is_closed() => {
                let deadline = held_until.expect("set with the hold");
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    break None;
                }
                tokio::time::sleep_until(deadline.min(now + retry)).await;
                retry = (retry * 2).min(HOLD_RETRY_MAX);
                if let Some(b) = &refused_by {
                    balancer.retry(b, Instant::now());
                }
                continue;
            }
            Choice::Refuse => break None,
            Choice::Hold {
                id,
                rx,
                timeout,
                wake,
            } => {
                if hold.is_none() {
                    if !stats.try_hold() {
                        // Beyond the service's budget: refused at once.
                        let _ = balancer
                            .give_up(id, rx)
                            .map(|b| balancer.release(&b, Instant::now()));
                        break None;
                    }
                    hold = Some(HeldGuard(stats.clone()));
                }
                if wake {
                    shared.wake(&balancer.service, &balancer.stats);
                }
                let deadline =
                    *held_until.get_or_insert_with(|| tokio::time::Instant::now() + timeout);
                let until = deadline.min(tokio::time::Instant::now() + HOLD_RECHECK);
                // Woken by a dispatch, or by the balancer closing (an
                // error): either way, ask where the waiter stands.
                let mut rx = rx;
                let got = tokio::time::timeout_at(until, &mut rx).await;
                match got {
                    Ok(Ok(b)) => b,
                    _ => match balancer.give_up(id, rx) {
                        Some(b) => b,
                        None if tokio::time::Instant::now() < deadline && !balancer.is_closed() => {
                            continue
                        }
                        None => break None,
                    },
                }
            }
        };
        // A held connection's dial ends at its deadline too.
        let dialed = match held_until {
            Some(deadline) => {
                tokio::time::timeout_at(deadline, dial(&shared, &backend, balancer.port))
                    .await
                    .unwrap_or(Err(DialError::TimedOut(shared.cfg.dial_timeout)))
            }
            None => dial(&shared, &backend, balancer.port).await,
        };
        match dialed {
            Ok(conn) => break Some((backend, conn)),
            Err(e) => {
                tracing::debug!(service = %balancer.service, instance = %backend.instance, "dial: {e}; trying another instance");
                balancer.failed(&backend, Instant::now());
                if hold.is_some() {
                    // Bounded by the deadline instead.
                    refused_by = Some(backend);
                } else {
                    failures += 1;
                }
            }
        }
    };
    drop(hold);
    match opened {
        Some((backend, conn)) => {
            stats.opened(Some(accepted.elapsed()));
            relay(&balancer, backend, conn, client).await;
            stats.end(false);
        }
        None => {
            tracing::debug!(service = %balancer.service, port = balancer.port, "no instance accepted the connection; refused");
            stats.end(true);
            // A reset, as from a closed port.
            let _ = client.set_linger(Some(std::time::Duration::ZERO));
        }
    }
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
                let (sent, received) = balancer.stats.byte_counters();
                t.relay_counted(client, sent, received).await;
            }
            Dialed::Local(s) => local_relay(client, s, &balancer.stats).await,
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
/// Bytes are counted when the relay ends.
async fn local_relay(mut client: TcpStream, mut server: TcpStream, stats: &ServiceStats) {
    let _ = server.set_nodelay(true);
    let mut guard = ResetBoth {
        fds: [client.as_raw_fd(), server.as_raw_fd()],
        armed: true,
    };
    if let Ok((up, down)) = tokio::io::copy_bidirectional(&mut client, &mut server).await {
        stats.add_sent(up as usize);
        stats.add_received(down as usize);
    }
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
