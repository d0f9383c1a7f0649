//! Traffic per destination service (issue 19, item 6) and the service's
//! budget of held flows (scale to zero), shared by the listeners of every
//! port of one service address. No per-flow state: a handful of counters
//! per service.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::traffic::TrafficCounters;

/// Most connections and UDP flows held for a wake at once per service
/// address (all its ports together); more are refused at once.
pub const MAX_HELD_PER_SERVICE: usize = 256;

/// One service's counters, as this member saw its flows to it.
#[derive(Default)]
pub(crate) struct ServiceStats {
    /// Everything but the bytes (rare events: one lock per flow event).
    counters: Mutex<Counts>,
    /// Bytes to the service (hot path: atomics).
    sent: AtomicU64,
    /// Bytes back from the service.
    received: AtomicU64,
}

#[derive(Default)]
struct Counts {
    c: TrafficCounters,
    /// Flows held now (bounded by [`MAX_HELD_PER_SERVICE`]).
    held_now: usize,
    /// When a wake was last asked for.
    last_wake: Option<Instant>,
}

impl ServiceStats {
    /// A flow starts (accepted connection, new UDP sender): active.
    pub fn begin(&self) {
        self.counters.lock().c.active += 1;
    }

    /// A flow that [`ServiceStats::begin`] counted ends, `refused` or not.
    pub fn end(&self, refused: bool) {
        let mut g = self.counters.lock();
        g.c.active = g.c.active.saturating_sub(1);
        if refused {
            g.c.refused += 1;
        }
    }

    /// A flow refused before it was counted active (UDP datagram dropped).
    pub fn refused(&self) {
        self.counters.lock().c.refused += 1;
    }

    /// A flow reached an instance; `connect`: how long that took.
    pub fn opened(&self, connect: Option<Duration>) {
        let mut g = self.counters.lock();
        g.c.opened += 1;
        if let Some(t) = connect {
            g.c.observe_connect(t);
        }
    }

    /// A connect time measured later (a UDP flow's first answer).
    pub fn connect(&self, took: Duration) {
        self.counters.lock().c.observe_connect(took);
    }

    /// A flow asks to be held for a wake: false when the service's budget
    /// is spent (refuse it). Each success is paired with one
    /// [`ServiceStats::unhold`].
    pub fn try_hold(&self) -> bool {
        let mut g = self.counters.lock();
        if g.held_now >= MAX_HELD_PER_SERVICE {
            return false;
        }
        g.held_now += 1;
        g.c.held += 1;
        true
    }

    /// A held flow stopped being held (dispatched, or given up).
    pub fn unhold(&self) {
        let mut g = self.counters.lock();
        g.held_now = g.held_now.saturating_sub(1);
    }

    /// Whether a wake may be asked for now (none within `every`); if so,
    /// records it.
    pub fn wake_due(&self, now: Instant, every: Duration) -> bool {
        let mut g = self.counters.lock();
        match g.last_wake {
            Some(t) if now.saturating_duration_since(t) < every => false,
            _ => {
                g.last_wake = Some(now);
                true
            }
        }
    }

    /// Flows held now.
    pub fn held_now(&self) -> usize {
        self.counters.lock().held_now
    }

    /// Payload bytes to the service.
    pub fn add_sent(&self, n: usize) {
        self.sent.fetch_add(n as u64, Relaxed);
    }

    /// Payload bytes back from the service.
    pub fn add_received(&self, n: usize) {
        self.received.fetch_add(n as u64, Relaxed);
    }

    /// The byte counters, for relays that count as they go.
    pub fn byte_counters(&self) -> (&AtomicU64, &AtomicU64) {
        (&self.sent, &self.received)
    }

    /// The counters now.
    pub fn snapshot(&self) -> TrafficCounters {
        let mut c = self.counters.lock().c;
        c.bytes_sent = self.sent.load(Relaxed);
        c.bytes_received = self.received.load(Relaxed);
        c
    }
}

/// A held flow's place in its service's budget, given back when dropped.
pub(crate) struct HeldGuard(pub Arc<ServiceStats>);

impl Drop for HeldGuard {
    fn drop(&mut self) {
        self.0.unhold();
    }
}
