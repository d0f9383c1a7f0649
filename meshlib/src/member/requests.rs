//! What a member's data plane asks of the keyserver through the member core
//! (issue 19): wake a service scaled to zero ([`MemberCore::wake`]) and
//! report the traffic it counted per service
//! ([`MemberCore::report_traffic`]). Both are cheap to call often: the
//! core sends a wake request once per service and wake timeout, and a
//! report at most every [`crate::member::MemberConfig::traffic_interval`], only when it
//! changed.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::{Goal, MemberCore, Phase, RequestError};
use crate::proto::{ClientMsg, WAKE_VERSION};
use crate::traffic::TrafficReport;

/// Services whose wake requests are remembered (sent, or waiting for a
/// connection); past it the oldest is forgotten (at worst it is asked for
/// again, which the keyserver deduplicates).
const MAX_WAKES: usize = 64;

/// The member core's state of these requests.
#[derive(Debug, Default)]
pub(super) struct Requests {
    /// Wake requests sent, most recent last: the service, and when its
    /// wake timeout (as it was then) ends.
    wakes_sent: VecDeque<(String, Instant)>,
    /// Wake requests made while not connected, the same way; sent after
    /// the next welcome if still within their wake timeout.
    wakes_pending: VecDeque<(String, Instant)>,
    /// The data plane's latest report.
    traffic: Option<TrafficReport>,
    /// The report last sent on this connection.
    traffic_sent: Option<TrafficReport>,
    /// When a changed report may be sent next.
    next_traffic: Option<Instant>,
}

/// Keeps at most [`MAX_WAKES`] entries, the newest.
fn bound(list: &mut VecDeque<(String, Instant)>) {
    while list.len() > MAX_WAKES {
        list.pop_front();
    }
}

impl Requests {
    /// When a report is due (`None`: nothing new to send).
    pub(super) fn traffic_due(&self) -> Option<Instant> {
        match (&self.traffic, &self.traffic_sent) {
            (Some(now), sent) if sent.as_ref() != Some(now) => self.next_traffic,
            _ => None,
        }
    }
}

impl MemberCore {
    /// Asks the keyserver to wake `service` (scale to zero, seed 001): the
    /// data plane holds a new flow to the service's address and the map
    /// shows no online instance. Call it for every such flow; the core
    /// sends one [`ClientMsg::Wake`] per service and wake timeout (the
    /// address's [`crate::netmap::ServiceAddress::wake_timeout_secs`]),
    /// and keeps a request made while disconnected for the next connection.
    /// The keyserver runs the hook once however many members ask.
    ///
    /// `Ok(true)`: a request went out (or waits for the connection);
    /// `Ok(false)`: one already went out within the wake timeout.
    /// Errors: the service has no address in the map
    /// ([`RequestError::UnknownService`]), is not wakeable
    /// ([`RequestError::NotWakeable`]), the keyserver is too old
    /// ([`RequestError::Unsupported`]), or the session ended.
    pub fn wake(&mut self, now: Instant, service: &str) -> Result<bool, RequestError> {
        if self.goal != Goal::Run || self.phase == Phase::Ended {
            return Err(RequestError::Ended);
        }
        let until = now + self.wake_timeout(service)?;
        let r = &mut self.requests;
        let recent = |list: &VecDeque<(String, Instant)>| {
            list.iter().any(|(s, end)| s == service && now < *end)
        };
        if recent(&r.wakes_sent) || recent(&r.wakes_pending) {
            return Ok(false);
        }
        if self.phase != Phase::Live {
            r.wakes_pending.push_back((service.to_owned(), until));
            bound(&mut r.wakes_pending);
            return Ok(true);
        }
        self.check_version()?;
        self.send_wake(service.to_owned(), until);
        Ok(true)
    }

    /// Replaces the traffic report (what the data plane counted per
    /// destination service, cumulative since it started). The core sends
    /// it at most every [`crate::member::MemberConfig::traffic_interval`], only when it
    /// differs from the last one sent, and again on every new connection.
    /// A report out of bounds is refused ([`RequestError::BadReport`]);
    /// a keyserver older than [`WAKE_VERSION`] is sent none.
    pub fn report_traffic(
        &mut self,
        now: Instant,
        report: TrafficReport,
    ) -> Result<(), RequestError> {
        if self.phase == Phase::Ended {
            return Err(RequestError::Ended);
        }
        report.check().map_err(RequestError::BadReport)?;
        self.requests.traffic = Some(report);
        if self.phase == Phase::Live {
            self.send_traffic(now);
        }
        Ok(())
    }

    /// The wake timeout of a wakeable service of the map.
    fn wake_timeout(&self, service: &str) -> Result<Duration, RequestError> {
        let addr = self
            .map
            .addresses
            .get(service)
            .ok_or_else(|| RequestError::UnknownService(service.to_owned()))?;
        let secs = addr
            .wake_timeout_secs
            .ok_or_else(|| RequestError::NotWakeable(service.to_owned()))?;
        Ok(Duration::from_secs(secs.max(1).into()))
    }

    /// Whether the keyserver of this connection takes these requests.
    fn check_version(&self) -> Result<(), RequestError> {
        match self.welcome.as_ref().map(|w| w.version) {
            Some(v) if v < WAKE_VERSION => Err(RequestError::Unsupported { version: v }),
            _ => Ok(()),
        }
    }

    fn send_wake(&mut self, service: String, until: Instant) {
        self.send(ClientMsg::Wake {
            service: service.clone(),
        });
        let r = &mut self.requests;
        r.wakes_sent.retain(|(s, _)| *s != service);
        r.wakes_sent.push_back((service, until));
        bound(&mut r.wakes_sent);
    }

    /// Sends the report if it changed and its interval has passed.
    pub(super) fn send_traffic(&mut self, now: Instant) {
        if self.check_version().is_err() || self.goal != Goal::Run {
            // Never due on this connection (no busy timer).
            self.requests.next_traffic = None;
            return;
        }
        let Some(due) = self.requests.traffic_due() else {
            return;
        };
        if now < due {
            return;
        }
        if let Some(report) = self.requests.traffic.clone() {
            self.requests.traffic_sent = Some(report.clone());
            self.requests.next_traffic = Some(now + self.cfg.traffic_interval);
            self.send(ClientMsg::Traffic(report));
        }
    }

    /// A new connection: wake requests made meanwhile go out (those still
    /// within their service's wake timeout), and the report is sent again.
    pub(super) fn requests_on_welcome(&mut self, now: Instant) {
        self.requests.traffic_sent = None;
        self.requests.next_traffic = Some(now);
        if self.check_version().is_err() {
            self.requests.wakes_pending.clear();
            self.requests.next_traffic = None;
            return;
        }
        let pending = std::mem::take(&mut self.requests.wakes_pending);
        for (service, until) in pending {
            if now < until && self.wake_timeout(&service).is_ok() {
                self.send_wake(service, until);
            }
        }
        self.send_traffic(now);
    }
}

/// The default of [`crate::member::MemberConfig::traffic_interval`].
pub(super) fn default_traffic_interval() -> Duration {
    crate::traffic::REPORT_INTERVAL
}
