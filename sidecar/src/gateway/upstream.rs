//! HTTP/1.1 connections to instances, kept alive and reused: a bounded
//! pool of idle connections per instance address ([`super::h1`] speaks on
//! them).
//!
//! A request takes the most recently used idle connection of its instance
//! that is still open, or dials a new one; once its response body is done
//! the connection goes back at once. At most `max_idle` idle connections
//! are kept per instance (past that a finished connection is closed), and
//! an idle connection is closed after `idle_timeout` (a sweep every few
//! seconds). So the gateway holds about as many connections to an
//! instance as requests were in flight to it at the peak, and opens new
//! ones only when the load grows, not one per request: churn would leave a
//! TIME-WAIT socket per request and run the gateway out of ports.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddrV4;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;

use meshlib::ids::NetworkId;

use super::h1::H1Conn;
use super::http::ProxyBody;
use super::member::Dialer;
use super::metrics::GatewayStats;

/// An instance's address in its network: overlay addresses of different
/// networks overlap, so a pooled connection is never handed to a request
/// for another network's instance at the same address.
pub type Key = (NetworkId, SocketAddrV4);

/// An idle connection and since when.
struct Idle {
    conn: H1Conn,
    since: Instant,
}

/// The idle connections to instances.
pub struct Upstreams {
    idle: Mutex<HashMap<Key, Vec<Idle>>>,
    max_idle: usize,
    idle_timeout: Duration,
}

/// A connection for one request.
pub struct Upstream {
    /// The connection.
    pub conn: H1Conn,
    /// It served requests before (a failure to send on it is retried once
    /// on a new connection: the instance may have closed it meanwhile).
    pub reused: bool,
}

impl Upstreams {
    /// At most `max_idle` idle connections per instance, each closed after
    /// `idle_timeout` unused.
    pub fn new(max_idle: usize, idle_timeout: Duration) -> Self {
        Self {
            idle: Mutex::default(),
            max_idle,
            idle_timeout,
        }
    }

    /// A connection to instance `key`: an idle one, unless `fresh`, or a
    /// new one (dialed through `dialer`, its network's, within `timeout`).
    pub async fn get(
        &self,
        key: Key,
        dialer: &dyn Dialer,
        timeout: Duration,
        fresh: bool,
        stats: &GatewayStats,
    ) -> io::Result<Upstream> {
        if !fresh {
            if let Some(conn) = self.take_idle(key) {
                stats.upstream_reused.fetch_add(1, Relaxed);
                return Ok(Upstream { conn, reused: true });
            }
        }
        let stream = dialer.dial(key.1, timeout).await?;
        stats.upstream_opened.fetch_add(1, Relaxed);
        Ok(Upstream {
            conn: H1Conn::new(stream),
            reused: false,
        })
    }

    /// A new connection to instance `key` for an upgrade (a WebSocket),
    /// through hyper's client; never pooled.
    pub async fn dial_upgrade(
        &self,
        key: Key,
        dialer: &dyn Dialer,
        timeout: Duration,
        stats: &GatewayStats,
    ) -> io::Result<SendRequest<ProxyBody>> {
        let stream = dialer.dial(key.1, timeout).await?;
        stats.upstream_opened.fetch_add(1, Relaxed);
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(io::Error::other)?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok(sender)
    }

    /// The most recently used idle connection to `key` that is still open
    /// (the others are closed on the way).
    fn take_idle(&self, key: Key) -> Option<H1Conn> {
        // Bounded: every turn removes one idle connection.
        loop {
            let idle = self.idle.lock().get_mut(&key).and_then(Vec::pop)?;
            let mut conn = idle.conn;
            if idle.since.elapsed() >= self.idle_timeout || conn.is_closed() {
                continue;
            }
            return Some(conn);
        }
    }

    /// Keeps `conn` (its response is done) for the next request to `key`,
    /// unless the instance's idle connections are at the bound.
    pub fn put(&self, key: Key, conn: H1Conn) {
        let mut idle = self.idle.lock();
        let list = idle.entry(key).or_default();
        if list.len() < self.max_idle {
            list.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    /// Closes the connections idle for `idle_timeout` or closed by their
    /// instance; returns how many idle connections are left.
    pub fn sweep(&self) -> usize {
        // The checks read from sockets: not under the lock. Connections
        // put back meanwhile stay; the survivors join them, most recent
        // last as before.
        let taken = std::mem::take(&mut *self.idle.lock());
        let mut kept: HashMap<Key, Vec<Idle>> = HashMap::new();
        for (key, list) in taken {
            let list: Vec<Idle> = list
                .into_iter()
                .filter_map(|mut i| {
                    (i.since.elapsed() < self.idle_timeout && !i.conn.is_closed()).then_some(i)
                })
                .collect();
            if !list.is_empty() {
                kept.insert(key, list);
            }
        }
        let mut idle = self.idle.lock();
        for (key, mut list) in kept {
            let now = idle.entry(key).or_default();
            list.append(now);
            // Over the bound: the oldest go.
            let extra = list.len().saturating_sub(self.max_idle);
            list.drain(..extra);
            *now = list;
        }
        idle.values().map(Vec::len).sum()
    }

    /// How often [`Upstreams::sweep`] should run.
    pub fn sweep_interval(&self) -> Duration {
        (self.idle_timeout / 2).clamp(Duration::from_millis(100), Duration::from_secs(5))
    }
}
