//! Traffic per service (issue 19, item 6): what one member's data plane
//! counted for the flows it opened, per destination service, as it reports
//! it to the keyserver ([`crate::proto::ClientMsg::Traffic`]). Pure data and
//! checks, no I/O.
//!
//! A flow is counted once, by the member that opened it (the source side):
//! the pair is (the reporting member's own service → the service the flow
//! went to, by its service address or one of its members' addresses).
//! Every counter is cumulative since the member's data plane started,
//! except [`TrafficCounters::active`], a gauge; a restarted member starts
//! again from zero. So a report can be sent again, or lost, without
//! harm: the keyserver keeps the latest report of each member and sums
//! them per pair ([`TrafficCounters::add`]).
//!
//! Bounds: at most [`MAX_PAIRS`] destinations per report, each destination
//! a service name of at most [`MAX_SERVICE_LEN`] bytes; a member sends at
//! most one report per [`REPORT_INTERVAL`], and only when it changed
//! ([`crate::member::MemberCore::report_traffic`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Most destination services in one report: the data plane keeps its
/// busiest pairs (a member talks to a handful of services; a network
/// holds at most a few hundred).
pub const MAX_PAIRS: usize = 256;

/// Longest service name in a report, in bytes (the keyserver's limit on
/// service names).
pub const MAX_SERVICE_LEN: usize = 128;

/// How often a member sends its report at most (and then only if it
/// changed): the service graph and idle detection are this fresh.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// Upper bounds of the connect-time buckets, milliseconds; the last
/// bucket of [`TrafficCounters::connect_buckets`] takes everything slower.
pub const CONNECT_BUCKETS_MS: [u64; 5] = [1, 10, 100, 1_000, 10_000];

/// What one member counted for its flows to one destination service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficCounters {
    /// Flows opened that reached an instance (a TCP connection answered,
    /// a first UDP datagram or ICMP echo sent on).
    pub opened: u64,
    /// Flows open now, held ones included (a gauge, not cumulative).
    pub active: u64,
    /// Flows refused: no instance (connection refused or reset by every
    /// candidate), or held for a wake that did not come within the wake
    /// timeout.
    pub refused: u64,
    /// Flows whose first packets were held while the service was woken
    /// (scale to zero); each also ends in `opened` or `refused`.
    pub held: u64,
    /// Bytes from the source to the destination (payload as the data
    /// plane saw it).
    pub bytes_sent: u64,
    /// Bytes from the destination back to the source.
    pub bytes_received: u64,
    /// Flows whose connect time was measured (the first packet to the
    /// first answer; a held flow's time includes the wake).
    pub connect_count: u64,
    /// Sum of those connect times, microseconds.
    pub connect_micros: u64,
    /// Connect times by bucket ([`CONNECT_BUCKETS_MS`], then everything
    /// slower), each counted in exactly one bucket.
    pub connect_buckets: [u64; 6],
}

impl TrafficCounters {
    /// Records one connect time.
    pub fn observe_connect(&mut self, took: Duration) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.connect_count = self.connect_count.saturating_add(1);
        self.connect_micros = self.connect_micros.saturating_add(micros);
        let ms = micros / 1000;
        let bucket = CONNECT_BUCKETS_MS
            .iter()
            .position(|le| ms < *le)
            .unwrap_or(CONNECT_BUCKETS_MS.len());
        self.connect_buckets[bucket] = self.connect_buckets[bucket].saturating_add(1);
    }

    /// Adds another member's counters (the keyserver's sum over members);
    /// saturating, so no input can overflow.
    pub fn add(&mut self, other: &TrafficCounters) {
        let sum = |a: &mut u64, b: u64| *a = a.saturating_add(b);
        sum(&mut self.opened, other.opened);
        sum(&mut self.active, other.active);
        sum(&mut self.refused, other.refused);
        sum(&mut self.held, other.held);
        sum(&mut self.bytes_sent, other.bytes_sent);
        sum(&mut self.bytes_received, other.bytes_received);
        sum(&mut self.connect_count, other.connect_count);
        sum(&mut self.connect_micros, other.connect_micros);
        for (a, b) in self.connect_buckets.iter_mut().zip(other.connect_buckets) {
            sum(a, b);
        }
    }

    /// Whether these counters show a flow since `before` (the same
    /// member's previous report; `None`: none known): a flow opened, held
    /// or refused since, or one open now. Counters below `before`'s mean
    /// the member restarted: any flow counts.
    pub fn shows_flow_since(&self, before: Option<&TrafficCounters>) -> bool {
        if self.active > 0 {
            return true;
        }
        let started = |now: u64, then: u64| now > then || (now < then && now > 0);
        match before {
            None => self.opened > 0 || self.held > 0 || self.refused > 0,
            Some(b) => {
                started(self.opened, b.opened)
                    || started(self.held, b.held)
                    || started(self.refused, b.refused)
            }
        }
    }
}

/// One destination service's counters in a report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairTraffic {
    /// The destination service's name ([`crate::netmap::Member::service`]).
    pub destination: String,
    /// What was counted.
    pub counters: TrafficCounters,
}

/// Most peer paths in one report ([`TrafficReport::paths`]).
pub const MAX_PATHS: usize = 256;

/// How the reporting member reaches one peer now, for operators (the
/// keyserver's web console): the path its data plane chose and its round
/// trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerPath {
    /// The peer's WireGuard public key.
    pub peer: crate::keys::PublicKey,
    /// Through the relay (`false`: a direct path, or none chosen yet).
    pub relay: bool,
    /// Whether a path (direct or relay) answered probes; `false`: no
    /// path is known to work (nothing sent yet, or blind).
    pub working: bool,
    /// The path's last measured round trip, microseconds.
    pub rtt_micros: Option<u32>,
}

/// Most service groups in one report ([`TrafficReport::groups`]).
pub const MAX_GROUPS: usize = 256;

/// Longest service-group name in a report, bytes.
pub const MAX_GROUP_LEN: usize = 128;

/// A gateway's load of one service group now, for operators (the
/// keyserver's API and web console): the connections it holds open to the
/// group's instances and those waiting for a place (past the soft limit,
/// or for a woken instance).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupLoad {
    /// The service group's name.
    pub group: String,
    /// Connections open to the group's instances.
    pub open: u32,
    /// Connections waiting for an instance.
    pub queued: u32,
}

/// One member's report: its flows per destination service; the source is
/// the member's own service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TrafficReport {
    /// At most [`MAX_PAIRS`], each destination once.
    pub pairs: Vec<PairTraffic>,
    /// The path to each managed peer (at most [`MAX_PATHS`]). Appended:
    /// a keyserver that predates it ignores the trailing bytes, and the
    /// report of a member that predates it (its frame ends after
    /// `pairs`) decodes with none (see the `Deserialize` impl).
    pub paths: Vec<PeerPath>,
    /// A gateway's load per service group (at most [`MAX_GROUPS`], each
    /// group once; empty for other members). Appended after `paths`, with
    /// the same rules: a keyserver that predates it ignores it, a report
    /// that ends before it decodes with none.
    pub groups: Vec<GroupLoad>,
}

/// By hand for the appended [`TrafficReport::paths`] and
/// [`TrafficReport::groups`]: postcard has no "missing field", so a frame
/// that ends after `pairs` (a member that predates paths) fails on
/// `paths`, one that ends after `paths` fails on `groups`; that failure
/// means "none". Nothing
/// follows a report in a frame ([`crate::proto::ClientMsg::Traffic`] is
/// the whole message), so nothing is misread after it.
impl<'de> Deserialize<'de> for TrafficReport {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{Error, IgnoredAny, MapAccess, SeqAccess, Visitor};
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TrafficReport;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a traffic report")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let pairs = seq
                    .next_element()?
                    .ok_or_else(|| A::Error::invalid_length(0, &self))?;
                let paths = seq.next_element().ok().flatten().unwrap_or_default();
                let groups = seq.next_element().ok().flatten().unwrap_or_default();
                Ok(TrafficReport {
                    pairs,
                    paths,
                    groups,
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut report = TrafficReport::default();
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "pairs" => report.pairs = map.next_value()?,
                        "paths" => report.paths = map.next_value()?,
                        "groups" => report.groups = map.next_value()?,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(report)
            }
        }
        d.deserialize_struct("TrafficReport", &["pairs", "paths", "groups"], V)
    }
}

/// Why a report is refused as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    /// More destinations than [`MAX_PAIRS`].
    #[error("{0} destinations in one report; at most {MAX_PAIRS}")]
    TooManyPairs(usize),
    /// A destination named twice.
    #[error("destination {0:?} appears twice")]
    Duplicate(String),
    /// A destination name that no service can have: empty, longer than
    /// [`MAX_SERVICE_LEN`], or with a control character.
    #[error("destination is not a service name: {0:?}")]
    BadName(String),
    /// More peer paths than [`MAX_PATHS`].
    #[error("{0} peer paths in one report; at most {MAX_PATHS}")]
    TooManyPaths(usize),
    /// More service groups than [`MAX_GROUPS`].
    #[error("{0} service groups in one report; at most {MAX_GROUPS}")]
    TooManyGroups(usize),
    /// A service group named twice, or a name no group can have (empty,
    /// longer than [`MAX_GROUP_LEN`], or with a control character).
    #[error("service group {0:?} is named twice or is not a group name")]
    BadGroup(String),
}

impl TrafficReport {
    /// Checks the bounds and shape of a report (not which services exist:
    /// the keyserver knows those). The first problem found is returned.
    pub fn check(&self) -> Result<(), ReportError> {
        if self.pairs.len() > MAX_PAIRS {
            return Err(ReportError::TooManyPairs(self.pairs.len()));
        }
        if self.paths.len() > MAX_PATHS {
            return Err(ReportError::TooManyPaths(self.paths.len()));
        }
        if self.groups.len() > MAX_GROUPS {
            return Err(ReportError::TooManyGroups(self.groups.len()));
        }
        let mut groups = std::collections::HashSet::with_capacity(self.groups.len());
        for g in &self.groups {
            let name = &g.group;
            if name.is_empty()
                || name.len() > MAX_GROUP_LEN
                || name.chars().any(char::is_control)
                || !groups.insert(name.as_str())
            {
                let shown: String = name.chars().take(MAX_GROUP_LEN).collect();
                return Err(ReportError::BadGroup(shown));
            }
        }
        let mut seen = std::collections::HashSet::with_capacity(self.pairs.len());
        for p in &self.pairs {
            let name = &p.destination;
            if name.is_empty() || name.len() > MAX_SERVICE_LEN || name.chars().any(char::is_control)
            {
                let shown: String = name.chars().take(MAX_SERVICE_LEN).collect();
                return Err(ReportError::BadName(shown));
            }
            if !seen.insert(name.as_str()) {
                return Err(ReportError::Duplicate(name.clone()));
            }
        }
        Ok(())
    }

    /// The counters of one destination, if reported.
    pub fn get(&self, destination: &str) -> Option<&TrafficCounters> {
        self.pairs
            .iter()
            .find(|p| p.destination == destination)
            .map(|p| &p.counters)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(dest: &str, opened: u64, active: u64) -> PairTraffic {
        PairTraffic {
            destination: dest.into(),
            counters: TrafficCounters {
                opened,
                active,
                ..Default::default()
            },
        }
    }

    #[test]
    fn checks_bounds_and_names() {
        let ok = TrafficReport {
            pairs: vec![pair("api", 3, 1), pair("db ✓", 0, 0)],
            ..Default::default()
        };
        assert_eq!(ok.check(), Ok(()));
        let many = TrafficReport {
            pairs: (0..=MAX_PAIRS)
                .map(|i| pair(&format!("s{i}"), 0, 0))
                .collect(),
            ..Default::default()
        };
        assert_eq!(many.check(), Err(ReportError::TooManyPairs(MAX_PAIRS + 1)));
        let twice = TrafficReport {
            pairs: vec![pair("api", 1, 0), pair("api", 2, 0)],
            ..Default::default()
        };
        assert!(matches!(twice.check(), Err(ReportError::Duplicate(_))));
        for bad in ["", "a\nb", &"x".repeat(MAX_SERVICE_LEN + 1)] {
            let r = TrafficReport {
                pairs: vec![pair(bad, 0, 0)],
                ..Default::default()
            };
            assert!(matches!(r.check(), Err(ReportError::BadName(_))), "{bad:?}");
        }
    }

    #[test]
    fn sums_saturate_and_buckets_count_once() {
        let mut a = TrafficCounters::default();
        a.observe_connect(Duration::from_micros(500));
        a.observe_connect(Duration::from_millis(50));
        a.observe_connect(Duration::from_secs(60));
        assert_eq!(a.connect_buckets, [1, 0, 1, 0, 0, 1]);
        assert_eq!(a.connect_count, 3);
        let big = TrafficCounters {
            bytes_sent: u64::MAX,
            ..Default::default()
        };
        a.add(&big);
        a.add(&big);
        assert_eq!(a.bytes_sent, u64::MAX);
        assert_eq!(a.connect_count, 3);
    }

    #[test]
    fn new_flows_are_seen_against_the_previous_report() {
        let c = |opened, active| TrafficCounters {
            opened,
            active,
            ..Default::default()
        };
        assert!(!c(0, 0).shows_flow_since(None));
        assert!(c(2, 0).shows_flow_since(None));
        assert!(!c(2, 0).shows_flow_since(Some(&c(2, 0))));
        assert!(c(3, 0).shows_flow_since(Some(&c(2, 0))));
        assert!(c(2, 1).shows_flow_since(Some(&c(2, 1))), "an open flow");
        assert!(c(1, 0).shows_flow_since(Some(&c(5, 0))), "restarted");
        assert!(!c(0, 0).shows_flow_since(Some(&c(5, 0))));
    }

    /// Reports of members that predate paths decode with none; a
    /// keyserver that predates them reads new reports' pairs.
    #[test]
    fn paths_are_appended_compatibly() {
        #[derive(Serialize, Deserialize, Debug, PartialEq)]
        struct Old {
            pairs: Vec<PairTraffic>,
        }
        let old = Old {
            pairs: vec![pair("api", 3, 1)],
        };
        let bytes = postcard::to_stdvec(&old).unwrap();
        let got: TrafficReport = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(got.pairs, old.pairs);
        assert!(got.paths.is_empty());
        let new = TrafficReport {
            pairs: old.pairs.clone(),
            paths: vec![PeerPath {
                peer: crate::keys::PublicKey::from_bytes([7; 32]),
                relay: true,
                working: true,
                rtt_micros: Some(1500),
            }],
            groups: vec![],
        };
        let bytes = postcard::to_stdvec(&new).unwrap();
        assert_eq!(postcard::from_bytes::<Old>(&bytes).unwrap(), old);
        assert_eq!(postcard::from_bytes::<TrafficReport>(&bytes).unwrap(), new);
        // The whole message, as members send it.
        let msg = crate::proto::ClientMsg::Traffic(new.clone());
        let bytes = postcard::to_stdvec(&msg).unwrap();
        assert_eq!(
            postcard::from_bytes::<crate::proto::ClientMsg>(&bytes).unwrap(),
            msg
        );
        let json = serde_json::to_string(&new).unwrap();
        assert_eq!(serde_json::from_str::<TrafficReport>(&json).unwrap(), new);
        let too_many = TrafficReport {
            paths: vec![new.paths[0]; MAX_PATHS + 1],
            ..Default::default()
        };
        assert_eq!(
            too_many.check(),
            Err(ReportError::TooManyPaths(MAX_PATHS + 1))
        );
    }

    /// Reports of members that predate groups (pairs and paths only)
    /// decode with none; a keyserver that predates them (reading pairs
    /// and paths) reads new reports as before; bounds hold.
    #[test]
    fn groups_are_appended_compatibly() {
        #[derive(Serialize, Deserialize, Debug, PartialEq)]
        struct Paths {
            pairs: Vec<PairTraffic>,
            paths: Vec<PeerPath>,
        }
        let path = PeerPath {
            peer: crate::keys::PublicKey::from_bytes([7; 32]),
            relay: false,
            working: true,
            rtt_micros: Some(900),
        };
        let old = Paths {
            pairs: vec![pair("api", 3, 1)],
            paths: vec![path],
        };
        let bytes = postcard::to_stdvec(&old).unwrap();
        let got: TrafficReport = postcard::from_bytes(&bytes).unwrap();
        assert_eq!((&got.pairs, &got.paths), (&old.pairs, &old.paths));
        assert!(got.groups.is_empty());
        let new = TrafficReport {
            pairs: old.pairs.clone(),
            paths: old.paths.clone(),
            groups: vec![
                GroupLoad {
                    group: "shop".into(),
                    open: 7,
                    queued: 2,
                },
                GroupLoad {
                    group: "api".into(),
                    open: 0,
                    queued: 0,
                },
            ],
        };
        let bytes = postcard::to_stdvec(&new).unwrap();
        assert_eq!(postcard::from_bytes::<Paths>(&bytes).unwrap(), old);
        assert_eq!(postcard::from_bytes::<TrafficReport>(&bytes).unwrap(), new);
        let msg = crate::proto::ClientMsg::Traffic(new.clone());
        let bytes = postcard::to_stdvec(&msg).unwrap();
        assert_eq!(
            postcard::from_bytes::<crate::proto::ClientMsg>(&bytes).unwrap(),
            msg
        );
        let json = serde_json::to_string(&new).unwrap();
        assert_eq!(serde_json::from_str::<TrafficReport>(&json).unwrap(), new);
        // Truncated frames never panic.
        let bytes = postcard::to_stdvec(&new).unwrap();
        for cut in 0..bytes.len() {
            let _ = postcard::from_bytes::<TrafficReport>(&bytes[..cut]);
        }
        assert_eq!(new.check(), Ok(()));
        let g = |name: &str| GroupLoad {
            group: name.into(),
            open: 1,
            queued: 0,
        };
        let too_many = TrafficReport {
            groups: (0..=MAX_GROUPS).map(|i| g(&format!("g{i}"))).collect(),
            ..Default::default()
        };
        assert_eq!(
            too_many.check(),
            Err(ReportError::TooManyGroups(MAX_GROUPS + 1))
        );
        for bad in [
            vec![g("")],
            vec![g("a\nb")],
            vec![g(&"x".repeat(MAX_GROUP_LEN + 1))],
            vec![g("shop"), g("shop")],
        ] {
            let r = TrafficReport {
                groups: bad,
                ..Default::default()
            };
            assert!(matches!(r.check(), Err(ReportError::BadGroup(_))), "{r:?}");
        }
    }
}
