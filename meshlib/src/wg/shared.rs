//! The engine's state shared between its API ([`super::Engine`]) and its
//! packet loops ([`super::io`]): the peer table, the static key, the
//! transport (the socket and paths), counters and flags.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
use std::sync::Arc;
use std::time::Instant;

use boringtun::noise::rate_limiter::RateLimiter;
use parking_lot::RwLock;

use super::device::Device;
use super::peer::Peer;
use super::table::PeerTable;
use super::transport::Transport;

/// Counters shared by the loops.
#[derive(Default)]
pub(crate) struct Counters {
    pub unknown_key: AtomicU64,
    pub unknown_index: AtomicU64,
    pub malformed: AtomicU64,
    pub no_route: AtomicU64,
    pub send_failed: AtomicU64,
    /// Datagrams read while the link was down, dropped unanswered.
    pub link_down: AtomicU64,
    /// When a send failure was last logged (ms since the epoch; 0: never).
    pub send_logged_ms: AtomicU64,
    /// Send failures since the last logged one.
    pub send_unlogged: AtomicU64,
}

/// The interface's static key pair, as boringtun takes it.
#[derive(Clone)]
pub(crate) struct StaticKey {
    pub secret: x25519_dalek::StaticSecret,
    pub public: x25519_dalek::PublicKey,
    /// Checks `mac1` of handshake initiations before any Diffie-Hellman work
    /// and answers with cookies when more than [`HANDSHAKE_RATE_LIMIT`] a
    /// second arrive (the loops reset it every second).
    pub limiter: Arc<RateLimiter>,
}

/// Handshake initiations a second, over all peers, before cookies are asked
/// for (boringtun's device uses the same figure).
pub(crate) const HANDSHAKE_RATE_LIMIT: u64 = 100;

/// State shared between the API and the packet loops.
pub(crate) struct Shared {
    pub table: RwLock<PeerTable<Peer>>,
    pub key: RwLock<Option<StaticKey>>,
    /// The socket, STUN, the relay and managed peers' paths.
    pub transport: Arc<Transport>,
    pub fwmark: AtomicU32,
    pub device: Arc<dyn Device>,
    pub stop: AtomicBool,
    /// Set when a loop ended on its own (e.g. the interface was deleted).
    pub failed: AtomicBool,
    /// The device's link is up: written by the link loop only, as the
    /// device reports changes ([`Device::wait_link`]); the packet loops ask
    /// [`Device::is_up`] before dropping a packet while it says down.
    /// Nothing is sent while the link is down.
    pub link_up: AtomicBool,
    pub counters: Counters,
    pub epoch: Instant,
    /// Service addresses: the flow table and the range it covers
    /// ([`super::vip`]).
    pub vips: super::vips::Vips,
    /// The crypto pool ([`super::crypt`]): `None` with no workers (each
    /// packet loop seals or opens on its own thread).
    pub crypt: Option<Arc<super::crypt::Pool>>,
}

impl Shared {
    /// Milliseconds since the engine started (never 0).
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }
}
