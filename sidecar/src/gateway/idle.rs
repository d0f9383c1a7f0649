//! Deadlines of client connections in HTTP mode, so that connections that
//! ask for nothing cannot pile up: the first request's head must arrive
//! within `first` of the connection's start (after TLS on 443; it covers
//! HTTP/2 detection, the preface and SETTINGS on port 80), and a
//! connection with no request in flight is closed after `idle` (HTTP/1.1
//! keep-alive and HTTP/2 alike). A request is in flight from its head to
//! the end of its response body (a long download or stream is never
//! idle).
//!
//! [`IdleClock`] is the pure policy (time is an argument);
//! [`super::http::serve`] drives it around each connection. Call order: [`IdleClock::request_started`] when
//! a request head arrives, [`IdleClock::request_done`] when its response
//! ends (or it is dropped), [`IdleClock::check`] when the last answer's
//! time comes.

use std::time::{Duration, Instant};

/// Why a connection is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// No request head arrived within the first deadline.
    NoRequest,
    /// No request in flight for the idle timeout.
    Idle,
}

/// What [`IdleClock::check`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Close the connection now.
    Close(Closed),
    /// Nothing to do; check again at this time.
    At(Instant),
}

/// The deadlines of one connection.
#[derive(Debug, Clone)]
pub struct IdleClock {
    first: Duration,
    idle: Duration,
    in_flight: usize,
    seen_request: bool,
    /// The connection's start, or the end of its last request.
    since: Instant,
}

impl IdleClock {
    /// A connection that starts at `now`.
    pub fn new(now: Instant, first: Duration, idle: Duration) -> Self {
        Self {
            first,
            idle,
            in_flight: 0,
            seen_request: false,
            since: now,
        }
    }

    /// A request head arrived.
    pub fn request_started(&mut self) {
        self.in_flight += 1;
        self.seen_request = true;
    }

    /// A request's response ended (or the request was dropped) at `now`.
    pub fn request_done(&mut self, now: Instant) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if self.in_flight == 0 {
            self.since = now;
        }
    }

    /// Whether to close the connection at `now`, or when to ask again.
    pub fn check(&self, now: Instant) -> Check {
        if self.in_flight > 0 {
            return Check::At(now + self.idle);
        }
        let (limit, why) = if self.seen_request {
            (self.idle, Closed::Idle)
        } else {
            (self.first, Closed::NoRequest)
        };
        let deadline = self.since + limit;
        if now >= deadline {
            Check::Close(why)
        } else {
            Check::At(deadline)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn first_request_deadline_then_idle_timeout() {
        let t0 = Instant::now();
        let mut c = IdleClock::new(t0, 10 * S, 60 * S);
        assert_eq!(c.check(t0), Check::At(t0 + 10 * S));
        assert_eq!(c.check(t0 + 10 * S), Check::Close(Closed::NoRequest));
        c.request_started();
        // In flight: never closed, however long.
        assert_eq!(c.check(t0 + 100 * S), Check::At(t0 + 160 * S));
        c.request_done(t0 + 100 * S);
        assert_eq!(c.check(t0 + 101 * S), Check::At(t0 + 160 * S));
        assert_eq!(c.check(t0 + 160 * S), Check::Close(Closed::Idle));
    }

    #[test]
    fn idle_counts_from_the_last_of_concurrent_requests() {
        let t0 = Instant::now();
        let mut c = IdleClock::new(t0, S, 5 * S);
        c.request_started();
        c.request_started();
        c.request_done(t0 + S);
        assert!(matches!(c.check(t0 + 20 * S), Check::At(_)), "one left");
        c.request_done(t0 + 3 * S);
        assert_eq!(c.check(t0 + 4 * S), Check::At(t0 + 8 * S));
        assert_eq!(c.check(t0 + 8 * S), Check::Close(Closed::Idle));
        // More ends than starts are harmless.
        c.request_done(t0 + 9 * S);
        assert_eq!(c.check(t0 + 9 * S), Check::At(t0 + 14 * S));
    }
}
