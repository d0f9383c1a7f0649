//! The member side of the control protocol as a sans-IO state machine: one
//! [`MemberCore`] per membership. It opens no socket, spawns no task and reads
//! no clock: a driver (the QUIC client in [`crate::control`], or the
//! simulator) feeds it what happened and carries out what it asks.
//!
//! It owns everything a membership does over its life: joining with a token
//! or resuming with the stored credential, following the network map
//! (snapshot, deltas, a gap → [`ClientMsg::GetMap`]), heartbeats, reconnect
//! with backoff, re-announcing endpoints and ports, key rotation, and the
//! graceful ends (offline, leave).
//!
//! ## Call order (the model is quinn-proto's `Connection`)
//!
//! 1. Build with [`MemberCore::join`] or [`MemberCore::resume`].
//! 2. Loop:
//!    - drain [`MemberCore::poll_transmit`]: [`Transmit::Connect`] asks the
//!      driver to open a connection to the keyserver (then call
//!      [`MemberCore::handle_connected`] or
//!      [`MemberCore::handle_connect_failed`]); [`Transmit::Send`] is a frame
//!      for the open stream; [`Transmit::Close`] closes the connection;
//!    - drain [`MemberCore::poll_event`] (persist [`Event::Joined`] at once);
//!    - wait until [`MemberCore::poll_timeout`] or input: a server message
//!      ([`MemberCore::handle_message`]), a lost connection
//!      ([`MemberCore::handle_disconnected`]), the deadline
//!      ([`MemberCore::handle_timeout`]), or a user request
//!      ([`MemberCore::set_endpoints`], [`MemberCore::set_ports`],
//!      [`MemberCore::rotate_key`], [`MemberCore::shutdown`],
//!      [`MemberCore::leave`]), or a data-plane request
//!      ([`MemberCore::wake`], [`MemberCore::report_traffic`]).
//! 3. Stop after [`Event::Ended`].
//!
//! Every method that depends on time takes `now`.
//!
//! ## Ends
//!
//! Only a revocation forgets: the session ends with [`End::Revoked`] when
//! the keyserver says the membership is gone (removed, replaced by another
//! key, or a resume's credential unknown: [`Revocation`]). Every other
//! failure — no connection or a lost one, another protocol version, a
//! malformed or forbidden answer, a busy or failing keyserver, a protocol
//! violation — is a [`Setback`]: the member keeps its key and membership
//! and retries with backoff ([`Connection::Connecting`] says why). A first
//! join also ends when its token or metadata is refused ([`End::Refused`],
//! [`join_refusal_is_final`]). A one-shot session
//! ([`MemberConfig::reconnect`] off) ends at its first setback
//! ([`End::Lost`]).

mod ends;
mod requests;
#[cfg(test)]
mod tests;

pub use ends::{join_refusal_is_final, End, Revocation, Revoked, Setback};

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::ids::{AppId, InstanceName, NetworkId, ProcessType};
use crate::keys::PublicKey;
use crate::netmap::{MapDelta, NetworkMap};
use crate::proto::{
    self, ClientMsg, ErrorCode, Goodbye, Hello, JoinRequest, JoinToken, ProtoError, Request,
    ResumeRequest, RotateKey, Secret, ServerMsg, Welcome,
};

/// Timers and limits of a member (plain data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberConfig {
    /// Heartbeat interval; the keyserver's [`Welcome::heartbeat_secs`] wins
    /// when shorter. Default 10 s.
    pub heartbeat: Duration,
    /// Time from asking for a connection to the welcome. Default 5 s.
    pub connect_timeout: Duration,
    /// A heartbeat unanswered this long means the connection is dead (QUIC
    /// may not notice a silent server for its whole idle timeout). Default 20 s.
    pub reply_timeout: Duration,
    /// First reconnect delay; doubles per failed attempt. Default 500 ms.
    pub backoff_min: Duration,
    /// Longest reconnect delay. Default 15 s.
    pub backoff_max: Duration,
    /// How long a graceful end (offline, leave) waits for the keyserver's
    /// confirmation. Default 3 s.
    pub goodbye_timeout: Duration,
    /// How long [`MemberCore::leave`] keeps trying to reach the keyserver
    /// when it is not connected. Default 10 s.
    pub leave_timeout: Duration,
    /// Rotate the WireGuard key this long after it was made (the core emits
    /// [`Event::RotationDue`]); `None`: never. Default `None`.
    pub key_lifetime: Option<Duration>,
    /// Whether a lost, failed or refused connection is retried (see
    /// [`Setback`]). A one-shot session (tests, probes) sets `false` and
    /// ends with [`End::Lost`]. Default `true`.
    pub reconnect: bool,
    /// Shortest time between two traffic reports sent
    /// ([`MemberCore::report_traffic`]). Default
    /// [`crate::traffic::REPORT_INTERVAL`] (10 s).
    pub traffic_interval: Duration,
}

impl Default for MemberConfig {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            reply_timeout: Duration::from_secs(20),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(15),
            goodbye_timeout: Duration::from_secs(3),
            leave_timeout: Duration::from_secs(10),
            key_lifetime: None,
            reconnect: true,
            traffic_interval: requests::default_traffic_interval(),
        }
    }
}

/// What a member keeps (mode 0600) to come back without its token: where the
/// keyserver is, its pinned certificate, and the member's credential.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Membership {
    /// Keyserver QUIC addresses.
    pub addrs: Vec<SocketAddr>,
    /// SHA-256 of the keyserver's certificate.
    pub cert_sha256: [u8; 32],
    /// The member's network.
    pub network: NetworkId,
    /// The membership's public key.
    pub public_key: PublicKey,
    /// The reconnect credential.
    pub credential: Secret,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("addrs", &self.addrs)
            .field("network", &self.network)
            .field("public_key", &self.public_key)
            .finish_non_exhaustive()
    }
}

/// The stored membership bytes are not a membership.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("membership file is malformed: {0}")]
pub struct MembershipError(String);

impl Membership {
    /// The stored form (postcard); write it with mode 0600.
    pub fn to_bytes(&self) -> Vec<u8> {
        // A plain struct of vectors and arrays always encodes.
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Parses the stored form.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, MembershipError> {
        postcard::from_bytes(bytes).map_err(|e| MembershipError(e.to_string()))
    }
}

/// What a joining member tells the keyserver about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberMeta {
    /// The membership's public key.
    pub public_key: PublicKey,
    /// The service (app) name.
    pub service: String,
    /// The app id, if the member knows it (a hint the keyserver checks).
    pub app_id: Option<AppId>,
    /// The process type.
    pub process_type: ProcessType,
    /// The wanted instance name, if any.
    pub instance: Option<InstanceName>,
    /// The runner label.
    pub runner: String,
    /// Underlay endpoints of the member's WireGuard socket.
    pub endpoints: Vec<SocketAddr>,
    /// Ports the instance serves ([`crate::netmap::Member::ports`]).
    pub ports: Vec<u16>,
    /// Take the slot of [`MemberMeta::instance`] even while it is online
    /// ([`JoinRequest::replace`]).
    pub replace: bool,
    /// Join as an ephemeral member ([`JoinRequest::ephemeral`]).
    pub ephemeral: bool,
}

/// Something the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
// A few live at a time in a queue; boxing the join request would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Transmit {
    /// Open a connection (QUIC, pinned certificate) to one of `addrs`, then
    /// report [`MemberCore::handle_connected`] or
    /// [`MemberCore::handle_connect_failed`].
    Connect {
        /// Keyserver addresses, in order of preference.
        addrs: Vec<SocketAddr>,
        /// SHA-256 of the keyserver's certificate.
        cert_sha256: [u8; 32],
    },
    /// Send this frame on the open stream.
    Send(Frame),
    /// Close the connection (after what was sent before).
    Close,
}

/// A frame for the keyserver.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)]
pub enum Frame {
    /// The first frame of a connection.
    Hello(Hello),
    /// Any later frame.
    Msg(ClientMsg),
}

/// Where the control connection stands (for status displays).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connection {
    /// Connecting, or waiting to retry after `last_error`.
    Connecting {
        /// Failed attempts since the last working connection.
        attempt: u32,
        /// Why the last attempt or connection failed.
        last_error: Option<Setback>,
    },
    /// Welcome received; following the map.
    Connected,
    /// Finished (see [`End`]).
    Ended,
}

/// Something that happened, for the driver and the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The join succeeded: persist this membership now (it is the only way
    /// back without the token).
    Joined(Membership),
    /// A welcome arrived (join or resume): the assigned address, index,
    /// names; the map follows.
    Welcomed(Welcome),
    /// The control connection changed state.
    Connection(Connection),
    /// A snapshot replaced the map ([`MemberCore::map`]).
    Snapshot,
    /// A delta was applied to the map ([`MemberCore::map`]).
    Delta(MapDelta),
    /// The keyserver answered a heartbeat with the generation it has sent
    /// on this connection (the map has applied everything before it).
    HeartbeatAck {
        /// The keyserver's generation on this stream.
        generation: u64,
    },
    /// The map reached the keyserver's generation as of the welcome (once
    /// per connection): what `sidecar run` waits for.
    CaughtUp {
        /// The map's generation.
        generation: u64,
    },
    /// [`MemberConfig::key_lifetime`] has passed: make a new key and call
    /// [`MemberCore::rotate_key`].
    RotationDue,
    /// The keyserver took the new key: switch the data plane to it and
    /// persist it with the membership ([`MemberCore::membership`]).
    KeyRotated {
        /// The key before.
        old: PublicKey,
        /// The key from now on.
        new: PublicKey,
    },
    /// The keyserver refused the rotation; the old key stays.
    RotationFailed(ProtoError),
    /// The keyserver refused one request but keeps the session.
    Rejected(ProtoError),
    /// The STUN servers, relay and relay ticket to use now (after every
    /// welcome, and again before the ticket expires): give them to the
    /// engine ([`crate::wg::Engine::set_stun_servers`],
    /// [`crate::wg::Engine::set_relay`]).
    Relay(crate::proto::RelayInfo),
    /// The session ended for good; nothing more will happen.
    Ended(End),
}

/// Why a user request was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// A rotation is already under way.
    #[error("a key rotation is already under way")]
    RotationPending,
    /// The new key is the current key.
    #[error("the new key is the current key")]
    SameKey,
    /// The member has not joined yet (no membership to rotate or leave).
    #[error("the member has not joined yet")]
    NotJoined,
    /// The session already ended or is ending.
    #[error("the session has ended")]
    Ended,
    /// A wake request for a service without an address in the map.
    #[error("no service {0:?} in this network")]
    UnknownService(String),
    /// A wake request for a service that is not wakeable (its address has
    /// no wake timeout).
    #[error("service {0:?} is not wakeable")]
    NotWakeable(String),
    /// The keyserver speaks a protocol version without this request
    /// ([`crate::proto::WAKE_VERSION`]).
    #[error("the keyserver (protocol version {version}) does not take this request")]
    Unsupported {
        /// The keyserver's version.
        version: u16,
    },
    /// A traffic report out of bounds.
    #[error("traffic report refused: {0}")]
    BadReport(crate::traffic::ReportError),
}

/// What the user wants of the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Goal {
    Run,
    Offline,
    Leave { deadline: Instant },
}

/// Where the connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No connection; (re)connect at the instant.
    Idle { at: Instant },
    /// The driver was asked to connect.
    Connecting { since: Instant },
    /// The hello is out; waiting for the welcome.
    Hello { since: Instant },
    /// Following the map.
    Live,
    /// Offline or leave sent; waiting for the goodbye.
    Closing { deadline: Instant },
    /// Finished.
    Ended,
}

/// A key rotation under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rotation {
    new: PublicKey,
    /// The request went out on the current connection.
    sent: bool,
    /// A resume with the old key was refused: the keyserver may have taken
    /// the new key before the confirmation was lost; resume with it.
    try_new: bool,
}

/// One membership's control state machine. See the module docs for the call
/// order.
#[derive(Debug)]
pub struct MemberCore {
    cfg: MemberConfig,
    phase: Phase,
    goal: Goal,
    /// Until the first welcome of a join: the token and the metadata.
    join: Option<(JoinToken, MemberMeta)>,
    membership: Option<Membership>,
    map: NetworkMap,
    welcome: Option<Welcome>,
    /// The keyserver's generation as last reported (welcome, heartbeat ack).
    server_generation: u64,
    /// `CaughtUp` was emitted on this connection.
    caught_up: bool,
    /// A `GetMap` is out and its snapshot not yet in.
    map_requested: bool,
    endpoints: Vec<SocketAddr>,
    ports: Vec<u16>,
    /// What this connection has announced (`None`: nothing yet).
    sent_endpoints: Option<Vec<SocketAddr>>,
    sent_ports: Option<Vec<u16>>,
    attempt: u32,
    /// Lost connections so far: each reconnect starts one address further
    /// along the keyserver's list, so a dead replica is tried last, not
    /// first, while the others are up.
    addr_turn: usize,
    last_error: Option<Setback>,
    heartbeat: Duration,
    next_heartbeat: Option<Instant>,
    /// The oldest unanswered heartbeat.
    awaiting_ack: Option<Instant>,
    rotation: Option<Rotation>,
    rotate_at: Option<Instant>,
    /// When to ask for a fresh relay ticket (`None`: not yet answered).
    relay_refresh: Option<Instant>,
    /// Jitter source (xorshift), seeded from the key: deterministic per member.
    rng: u64,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    /// Service groups to join and ports to publish, sent with a join.
    join_services: crate::services::JoinServices,
    /// Wake requests and traffic reports ([`MemberCore::wake`],
    /// [`MemberCore::report_traffic`]).
    requests: requests::Requests,
}

impl MemberCore {
    /// A member that will join the token's network with `meta`; it asks to
    /// connect at once.
    pub fn join(cfg: MemberConfig, token: JoinToken, meta: MemberMeta, now: Instant) -> Self {
        let map = NetworkMap::new(token.network, "", "0.0.0.0/32".parse().expect("literal"));
        let (endpoints, ports) = (meta.endpoints.clone(), meta.ports.clone());
        let seed = seed_of(&meta.public_key);
        let mut core = Self::new(cfg, map, endpoints, ports, seed, now);
        core.join = Some((token, meta));
        core
    }

    /// Sets the service groups this member joins and the ports it
    /// publishes in a group of its own (seed 002), sent with its join
    /// request. Call before the first connection; a resume sends none (the
    /// keyserver keeps what the join asked for).
    pub fn set_join_services(&mut self, services: crate::services::JoinServices) {
        self.join_services = services;
    }

    /// A member coming back with its stored membership and its cached map
    /// (an empty map of generation 0 gets a snapshot); it asks to connect at
    /// once. `endpoints` and `ports` are the current ones.
    pub fn resume(
        cfg: MemberConfig,
        membership: Membership,
        map: NetworkMap,
        endpoints: Vec<SocketAddr>,
        ports: Vec<u16>,
        now: Instant,
    ) -> Self {
        let seed = seed_of(&membership.public_key);
        let mut core = Self::new(cfg, map, endpoints, ports, seed, now);
        core.membership = Some(membership);
        core
    }

    fn new(
        cfg: MemberConfig,
        map: NetworkMap,
        endpoints: Vec<SocketAddr>,
        ports: Vec<u16>,
        seed: u64,
        now: Instant,
    ) -> Self {
        let rotate_at = cfg.key_lifetime.map(|l| now + l);
        Self {
            heartbeat: cfg.heartbeat,
            cfg,
            phase: Phase::Idle { at: now },
            goal: Goal::Run,
            join: None,
            membership: None,
            map,
            welcome: None,
            server_generation: 0,
            caught_up: false,
            map_requested: false,
            endpoints,
            ports,
            sent_endpoints: None,
            sent_ports: None,
            attempt: 0,
            addr_turn: 0,
            last_error: None,
            next_heartbeat: None,
            awaiting_ack: None,
            rotation: None,
            rotate_at,
            relay_refresh: None,
            rng: seed | 1,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            join_services: Default::default(),
            requests: Default::default(),
        }
    }

    // ---- outputs -------------------------------------------------------

    /// The next thing the driver must do.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`MemberCore::handle_timeout`] must be called next (`None`:
    /// only input can change anything).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let phase = match self.phase {
            Phase::Idle { at } => Some(at),
            Phase::Connecting { since } | Phase::Hello { since } => {
                Some(since + self.cfg.connect_timeout)
            }
            Phase::Live => [
                self.next_heartbeat,
                self.awaiting_ack.map(|t| t + self.cfg.reply_timeout),
                self.relay_refresh,
                self.requests.traffic_due(),
            ]
            .into_iter()
            .flatten()
            .min(),
            Phase::Closing { deadline } => Some(deadline),
            Phase::Ended => return None,
        };
        let leave = match self.goal {
            Goal::Leave { deadline } => Some(deadline),
            _ => None,
        };
        [phase, leave, self.rotate_at].into_iter().flatten().min()
    }

    // ---- state ---------------------------------------------------------

    /// The current network map.
    pub fn map(&self) -> &NetworkMap {
        &self.map
    }

    /// The membership (after the join's welcome, or as resumed); its key is
    /// the current one.
    pub fn membership(&self) -> Option<&Membership> {
        self.membership.as_ref()
    }

    /// The last welcome.
    pub fn welcome(&self) -> Option<&Welcome> {
        self.welcome.as_ref()
    }

    /// The connection state.
    pub fn connection(&self) -> Connection {
        match self.phase {
            Phase::Live | Phase::Closing { .. } => Connection::Connected,
            Phase::Ended => Connection::Ended,
            _ => Connection::Connecting {
                attempt: self.attempt,
                last_error: self.last_error.clone(),
            },
        }
    }

    /// Whether the map has reached the keyserver's generation as of the
    /// last welcome or heartbeat answer on a live connection.
    pub fn is_caught_up(&self) -> bool {
        self.phase == Phase::Live && self.map.generation >= self.server_generation
    }

    /// Whether the session ended.
    pub fn is_ended(&self) -> bool {
        self.phase == Phase::Ended
    }

    /// The member's current public key (`None` before a join's welcome
    /// when joining).
    pub fn public_key(&self) -> PublicKey {
        match (&self.membership, &self.join) {
            (Some(m), _) => m.public_key,
            (None, Some((_, meta))) => meta.public_key,
            (None, None) => PublicKey::from_bytes([0; 32]),
        }
    }

    // ---- inputs from the driver -----------------------------------------

    /// The deadline of [`MemberCore::poll_timeout`] has passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Goal::Leave { deadline } = self.goal {
            if now >= deadline && self.phase != Phase::Ended {
                let why = self.last_error.clone().unwrap_or_else(|| {
                    Setback::Unreachable("no answer from the keyserver in time".into())
                });
                self.close_if_open();
                return self.end(End::LeaveUnconfirmed(why));
            }
        }
        if self.rotate_at.is_some_and(|t| now >= t) {
            self.rotate_at = None;
            self.events.push_back(Event::RotationDue);
        }
        match self.phase {
            Phase::Idle { at } if now >= at => self.connect(now),
            Phase::Connecting { since } | Phase::Hello { since }
                if now >= since + self.cfg.connect_timeout =>
            {
                self.transmits.push_back(Transmit::Close);
                self.lost(now, unreachable("no welcome from the keyserver in time"));
            }
            Phase::Live => self.live_timers(now),
            Phase::Closing { deadline } if now >= deadline => {
                self.transmits.push_back(Transmit::Close);
                self.closing_failed(now, unreachable("no goodbye from the keyserver in time"));
            }
            _ => {}
        }
    }

    /// The connection asked for by [`Transmit::Connect`] is open: the core
    /// sends its hello.
    pub fn handle_connected(&mut self, now: Instant) {
        if !matches!(self.phase, Phase::Connecting { .. }) {
            return;
        }
        let hello = self.hello();
        self.transmits
            .push_back(Transmit::Send(Frame::Hello(hello)));
        self.phase = Phase::Hello { since: now };
    }

    /// The connection asked for could not be opened.
    pub fn handle_connect_failed(&mut self, now: Instant, error: String) {
        if matches!(self.phase, Phase::Connecting { .. }) {
            self.lost(now, Setback::Unreachable(error));
        }
    }

    /// The open connection was lost (reset, timed out, closed by the server
    /// without a goodbye).
    pub fn handle_disconnected(&mut self, now: Instant, error: String) {
        let error = Setback::Unreachable(error);
        match self.phase {
            Phase::Hello { .. } | Phase::Live => self.lost(now, error),
            Phase::Closing { .. } => self.closing_failed(now, error),
            _ => {}
        }
    }

    /// A message from the keyserver arrived on the open stream.
    pub fn handle_message(&mut self, now: Instant, msg: ServerMsg) {
        // Decoding unpacks; a host that built one itself is served too.
        let msg = match msg {
            ServerMsg::Packed(p) => match p.unpack() {
                Ok(msg) => msg,
                Err(e) => {
                    self.transmits.push_back(Transmit::Close);
                    return self.lost(now, Setback::Protocol(e.to_string()));
                }
            },
            msg => msg,
        };
        match self.phase {
            Phase::Hello { .. } => self.on_first(now, msg),
            Phase::Live | Phase::Closing { .. } => self.on_live(now, msg),
            _ => {}
        }
    }

    // ---- inputs from the user -------------------------------------------

    /// The underlay endpoints changed: announced now if connected, else on
    /// the next resume.
    pub fn set_endpoints(&mut self, endpoints: Vec<SocketAddr>) {
        self.endpoints = endpoints;
        self.announce();
    }

    /// The instance's ports changed: announced now if connected, else on
    /// the next connection.
    pub fn set_ports(&mut self, ports: Vec<u16>) {
        self.ports = ports;
        self.announce();
    }

    /// Replaces the member's key by `new` (whose private key the driver made
    /// and keeps). [`Event::KeyRotated`] or [`Event::RotationFailed`]
    /// follows; a rotation interrupted by a lost connection is finished on
    /// the next connection.
    pub fn rotate_key(&mut self, now: Instant, new: PublicKey) -> Result<(), RequestError> {
        let _ = now;
        if self.goal != Goal::Run || self.phase == Phase::Ended {
            return Err(RequestError::Ended);
        }
        let current = self.membership.as_ref().ok_or(RequestError::NotJoined)?;
        if current.public_key == new {
            return Err(RequestError::SameKey);
        }
        if self.rotation.is_some() {
            return Err(RequestError::RotationPending);
        }
        self.rotation = Some(Rotation {
            new,
            sent: false,
            try_new: false,
        });
        self.send_rotation();
        Ok(())
    }

    /// A rotation to `new` was under way when the process stopped (its
    /// outcome unknown): the next connection finishes it — it resumes with
    /// the membership's key and asks again, or, if the keyserver already
    /// took the new key, resumes with that one. Call before the first
    /// connection.
    pub fn resume_rotation(&mut self, new: PublicKey) {
        if self
            .membership
            .as_ref()
            .is_some_and(|m| m.public_key != new)
        {
            self.rotation = Some(Rotation {
                new,
                sent: false,
                try_new: false,
            });
        }
    }

    /// Stops gracefully: the keyserver marks the member offline at once
    /// (if connected; otherwise it notices the silence). Ends with
    /// [`End::Offline`].
    pub fn shutdown(&mut self, now: Instant) {
        if self.phase == Phase::Ended || self.goal != Goal::Run {
            return;
        }
        self.goal = Goal::Offline;
        if self.phase == Phase::Live {
            self.send(ClientMsg::Offline);
            self.phase = Phase::Closing {
                deadline: now + self.cfg.goodbye_timeout,
            };
        } else {
            self.close_if_open();
            self.end(End::Offline { confirmed: false });
        }
    }

    /// Leaves the network: the keyserver releases the membership. Connects
    /// first if needed (up to [`MemberConfig::leave_timeout`]). Ends with
    /// [`End::Left`] or [`End::LeaveUnconfirmed`].
    pub fn leave(&mut self, now: Instant) -> Result<(), RequestError> {
        if self.phase == Phase::Ended {
            return Err(RequestError::Ended);
        }
        if self.membership.is_none() {
            return Err(RequestError::NotJoined);
        }
        self.goal = Goal::Leave {
            deadline: now + self.cfg.leave_timeout,
        };
        match self.phase {
            Phase::Live => {
                self.send(ClientMsg::Leave);
                self.phase = Phase::Closing {
                    deadline: now + self.cfg.goodbye_timeout,
                };
            }
            Phase::Idle { .. } => self.phase = Phase::Idle { at: now },
            _ => {}
        }
        Ok(())
    }

    // ---- internals -------------------------------------------------------

    fn hello(&mut self) -> Hello {
        self.sent_endpoints = Some(self.endpoints.clone());
        let request = match (&self.membership, &self.join) {
            (Some(m), _) => {
                let key = match self.rotation {
                    Some(r) if r.try_new => r.new,
                    _ => m.public_key,
                };
                Request::Resume(ResumeRequest {
                    network: m.network,
                    public_key: key,
                    credential: m.credential,
                    generation: self.map.generation,
                    endpoints: self.endpoints.clone(),
                })
            }
            (None, Some((token, meta))) => {
                self.sent_ports = Some(self.ports.clone());
                Request::Join(JoinRequest {
                    network: token.network,
                    token_secret: token.secret,
                    public_key: meta.public_key,
                    service: meta.service.clone(),
                    app_id: meta.app_id.clone(),
                    process_type: meta.process_type.clone(),
                    instance: meta.instance.clone(),
                    runner: meta.runner.clone(),
                    endpoints: self.endpoints.clone(),
                    ports: self.ports.clone(),
                    service_groups: self.join_services.groups.clone(),
                    publish: self.join_services.publish.clone(),
                    replace: meta.replace,
                    ephemeral: meta.ephemeral,
                })
            }
            // Built with a token or a membership; keep a harmless value.
            (None, None) => Request::Resume(ResumeRequest {
                network: self.map.network,
                public_key: PublicKey::from_bytes([0; 32]),
                credential: [0; 32],
                generation: 0,
                endpoints: vec![],
            }),
        };
        Hello {
            version: proto::VERSION,
            request,
        }
    }

    fn connect(&mut self, now: Instant) {
        let (mut addrs, cert_sha256) = match (&self.membership, &self.join) {
            (Some(m), _) => (m.addrs.clone(), m.cert_sha256),
            (None, Some((t, _))) => (t.addrs.clone(), t.cert_sha256),
            (None, None) => (vec![], [0; 32]),
        };
        if !addrs.is_empty() {
            let turn = self.addr_turn % addrs.len();
            addrs.rotate_left(turn);
        }
        self.transmits
            .push_back(Transmit::Connect { addrs, cert_sha256 });
        self.phase = Phase::Connecting { since: now };
    }

    /// The first message of a connection: the welcome, or a refusal.
    fn on_first(&mut self, now: Instant, msg: ServerMsg) {
        match msg {
            ServerMsg::Welcome(w) => self.on_welcome(now, w),
            ServerMsg::Error(e) => self.on_refused(now, e),
            other => {
                self.transmits.push_back(Transmit::Close);
                self.lost(
                    now,
                    Setback::Protocol(format!("{} before the welcome", kind(&other))),
                );
            }
        }
    }

    fn on_welcome(&mut self, now: Instant, w: Welcome) {
        if let Some((token, meta)) = self.join.take() {
            let m = Membership {
                addrs: token.addrs,
                cert_sha256: token.cert_sha256,
                network: w.network,
                public_key: meta.public_key,
                credential: w.credential.unwrap_or_default(),
            };
            self.events.push_back(Event::Joined(m.clone()));
            self.membership = Some(m);
        } else if let (Some(r), Some(m)) = (self.rotation, self.membership.as_mut()) {
            if r.try_new {
                // The keyserver had taken the new key before the
                // confirmation was lost.
                let old = std::mem::replace(&mut m.public_key, r.new);
                self.rotation = None;
                self.events.push_back(Event::KeyRotated { old, new: r.new });
            }
        }
        self.server_generation = w.generation;
        if w.heartbeat_secs > 0 {
            self.heartbeat = self
                .cfg
                .heartbeat
                .min(Duration::from_secs(w.heartbeat_secs.into()));
        }
        self.welcome = Some(w.clone());
        self.phase = Phase::Live;
        self.attempt = 0;
        self.last_error = None;
        self.caught_up = false;
        self.map_requested = false;
        self.awaiting_ack = None;
        self.next_heartbeat = Some(now + self.heartbeat);
        self.events.push_back(Event::Welcomed(w));
        self.events
            .push_back(Event::Connection(Connection::Connected));
        match self.goal {
            Goal::Leave { .. } => {
                self.send(ClientMsg::Leave);
                self.phase = Phase::Closing {
                    deadline: now + self.cfg.goodbye_timeout,
                };
            }
            Goal::Offline => {}
            Goal::Run => {
                self.relay_refresh = None;
                self.send(ClientMsg::GetRelay);
                self.announce();
                if let Some(r) = self.rotation.as_mut() {
                    r.sent = false;
                }
                self.send_rotation();
                self.requests_on_welcome(now);
                self.check_caught_up();
            }
        }
    }

    /// The keyserver refused the hello. A first join ends on a refusal of
    /// its token or metadata ([`join_refusal_is_final`]); a resume ends
    /// only on a revocation ([`Revocation::from_code`]). Everything else is
    /// retried with backoff, the key and membership kept.
    fn on_refused(&mut self, now: Instant, e: ProtoError) {
        self.transmits.push_back(Transmit::Close);
        if self.membership.is_none() {
            if join_refusal_is_final(e.code) {
                return self.end(End::Refused(e));
            }
            return self.lost(now, Setback::Refused(e));
        }
        let Some(reason) = Revocation::from_code(e.code) else {
            return self.lost(now, Setback::Refused(e));
        };
        match self.rotation.as_mut() {
            Some(r) if !r.try_new => {
                // Perhaps the rotation went through and the old key is
                // gone: try the new key before believing it.
                r.try_new = true;
                self.lost(now, Setback::Refused(e));
            }
            _ => self.end(End::Revoked(Revoked {
                reason,
                message: e.message,
            })),
        }
    }

    fn on_live(&mut self, now: Instant, msg: ServerMsg) {
        match msg {
            ServerMsg::Snapshot(map) => {
                if map.network != self.map.network {
                    self.transmits.push_back(Transmit::Close);
                    return self.lost(now, Setback::Protocol("snapshot of another network".into()));
                }
                self.map = map;
                self.map_requested = false;
                self.events.push_back(Event::Snapshot);
                self.check_caught_up();
            }
            ServerMsg::Delta(delta) => {
                if delta.to <= self.map.generation {
                    return; // already have it
                }
                if self.map.apply(&delta).is_err() {
                    if !self.map_requested {
                        self.map_requested = true;
                        self.send(ClientMsg::GetMap(self.map.network));
                    }
                    return;
                }
                self.events.push_back(Event::Delta(delta));
                self.check_caught_up();
            }
            ServerMsg::HeartbeatAck { generation } => {
                self.awaiting_ack = None;
                self.server_generation = self.server_generation.max(generation);
                // Everything sent before the answer has been applied; a map
                // still behind lost something.
                if self.map.generation < generation && !self.map_requested {
                    self.map_requested = true;
                    self.send(ClientMsg::GetMap(self.map.network));
                }
                self.events.push_back(Event::HeartbeatAck { generation });
                self.check_caught_up();
            }
            ServerMsg::KeyRotated { public_key } => self.on_rotated(public_key),
            ServerMsg::Relay(info) => {
                // Ask again at half the ticket's life (at least a minute on).
                let half = Duration::from_secs(u64::from(info.lifetime_secs / 2).max(60));
                self.relay_refresh = Some(now + half);
                self.events.push_back(Event::Relay(info));
            }
            ServerMsg::Goodbye(g) => {
                self.transmits.push_back(Transmit::Close);
                self.end(match g {
                    Goodbye::Offline => End::Offline { confirmed: true },
                    Goodbye::Left => End::Left,
                });
            }
            ServerMsg::Error(e) if matches!(e.code, ErrorCode::Revoked | ErrorCode::Replaced) => {
                // Removed, or another key took the slot: the stream ends.
                // (A BadCredential here answers a rotation.)
                self.transmits.push_back(Transmit::Close);
                let reason = Revocation::from_code(e.code).unwrap_or(Revocation::Removed);
                self.end(End::Revoked(Revoked {
                    reason,
                    message: e.message,
                }));
            }
            ServerMsg::Error(e) => match self.rotation {
                Some(r) if r.sent && rotation_refusal(e.code) => {
                    self.rotation = None;
                    self.events.push_back(Event::RotationFailed(e));
                }
                _ => self.events.push_back(Event::Rejected(e)),
            },
            ServerMsg::Welcome(_) => {
                self.transmits.push_back(Transmit::Close);
                self.lost(now, Setback::Protocol("second welcome".into()));
            }
            ServerMsg::GatewayGrant(_) => {
                self.transmits.push_back(Transmit::Close);
                self.lost(
                    now,
                    Setback::Protocol("a gateway grant on a member's stream".into()),
                );
            }
            ServerMsg::Packed(_) => {
                // Unpacked in `handle_message`; one inside is malformed.
                self.transmits.push_back(Transmit::Close);
                self.lost(now, Setback::Protocol("packed twice".into()));
            }
        }
    }

    fn on_rotated(&mut self, public_key: PublicKey) {
        let (Some(r), Some(m)) = (self.rotation, self.membership.as_mut()) else {
            return;
        };
        if r.new != public_key {
            return;
        }
        let old = std::mem::replace(&mut m.public_key, public_key);
        self.rotation = None;
        self.events.push_back(Event::KeyRotated {
            old,
            new: public_key,
        });
    }

    /// Sends a heartbeat now (if connected) instead of at the next interval.
    pub fn heartbeat_now(&mut self, now: Instant) {
        if self.phase == Phase::Live {
            self.next_heartbeat = Some(now);
            self.live_timers(now);
        }
    }

    /// Called by the driver after a rotation to restart the lifetime clock.
    pub fn key_renewed(&mut self, now: Instant) {
        self.rotate_at = self.cfg.key_lifetime.map(|l| now + l);
    }

    fn live_timers(&mut self, now: Instant) {
        if self
            .awaiting_ack
            .is_some_and(|t| now >= t + self.cfg.reply_timeout)
        {
            self.transmits.push_back(Transmit::Close);
            return self.lost(
                now,
                unreachable("the keyserver stopped answering heartbeats"),
            );
        }
        if self.relay_refresh.is_some_and(|t| now >= t) {
            self.relay_refresh = None;
            self.send(ClientMsg::GetRelay);
        }
        self.send_traffic(now);
        if self.next_heartbeat.is_some_and(|t| now >= t) {
            self.send(ClientMsg::Heartbeat);
            self.awaiting_ack.get_or_insert(now);
            self.next_heartbeat = Some(now + self.heartbeat);
        }
    }

    /// Sends endpoint and port updates the keyserver has not seen on this
    /// connection.
    fn announce(&mut self) {
        if self.phase != Phase::Live || self.goal != Goal::Run {
            return;
        }
        if self.sent_endpoints.as_ref() != Some(&self.endpoints) {
            self.sent_endpoints = Some(self.endpoints.clone());
            self.send(ClientMsg::UpdateEndpoints(self.endpoints.clone()));
        }
        if self.sent_ports.as_ref() != Some(&self.ports) {
            self.sent_ports = Some(self.ports.clone());
            self.send(ClientMsg::UpdatePorts(self.ports.clone()));
        }
    }

    fn send_rotation(&mut self) {
        if self.phase != Phase::Live {
            return;
        }
        let Some(m) = &self.membership else { return };
        let credential = m.credential;
        if let Some(r) = self.rotation.as_mut().filter(|r| !r.sent) {
            r.sent = true;
            let msg = ClientMsg::RotateKey(RotateKey {
                new_public_key: r.new,
                credential,
            });
            self.send(msg);
        }
    }

    fn check_caught_up(&mut self) {
        if !self.caught_up && self.is_caught_up() {
            self.caught_up = true;
            self.events.push_back(Event::CaughtUp {
                generation: self.map.generation,
            });
        }
    }

    fn send(&mut self, msg: ClientMsg) {
        self.transmits.push_back(Transmit::Send(Frame::Msg(msg)));
    }

    fn close_if_open(&mut self) {
        if !matches!(self.phase, Phase::Idle { .. } | Phase::Ended) {
            self.transmits.push_back(Transmit::Close);
        }
    }

    /// The connection (or attempt) failed or was refused without ending
    /// the membership: retry after a backoff, or (one-shot) end.
    fn lost(&mut self, now: Instant, error: Setback) {
        self.next_heartbeat = None;
        self.awaiting_ack = None;
        if let Some(r) = self.rotation.as_mut() {
            r.sent = false;
        }
        if !self.cfg.reconnect && !matches!(self.goal, Goal::Leave { .. }) {
            return self.end(End::Lost(error));
        }
        let delay = self.backoff();
        self.attempt = self.attempt.saturating_add(1);
        self.addr_turn = self.addr_turn.wrapping_add(1);
        self.last_error = Some(error.clone());
        self.phase = Phase::Idle { at: now + delay };
        self.events
            .push_back(Event::Connection(Connection::Connecting {
                attempt: self.attempt,
                last_error: Some(error),
            }));
    }

    /// The connection failed while waiting for a goodbye.
    fn closing_failed(&mut self, now: Instant, error: Setback) {
        match self.goal {
            Goal::Leave { .. } => self.lost(now, error),
            _ => self.end(End::Offline { confirmed: false }),
        }
    }

    fn end(&mut self, end: End) {
        self.phase = Phase::Ended;
        self.next_heartbeat = None;
        self.awaiting_ack = None;
        self.rotate_at = None;
        self.events.push_back(Event::Connection(Connection::Ended));
        self.events.push_back(Event::Ended(end));
    }

    /// Doubling from `backoff_min` to `backoff_max`, minus up to a quarter of
    /// jitter so that members cut off together do not return together.
    fn backoff(&mut self) -> Duration {
        let base = self
            .cfg
            .backoff_min
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.cfg.backoff_max);
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let quarter = base.as_micros() as u64 / 4;
        let jitter = if quarter == 0 { 0 } else { self.rng % quarter };
        base - Duration::from_micros(jitter)
    }
}

/// Error codes the keyserver answers a refused rotation with.
fn rotation_refusal(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::KeyInUse | ErrorCode::BadCredential | ErrorCode::InvalidMetadata
    )
}

/// A setback of the connection itself.
fn unreachable(why: &str) -> Setback {
    Setback::Unreachable(why.to_owned())
}

/// A jitter seed from a key's bytes.
fn seed_of(key: &PublicKey) -> u64 {
    let b = key.as_bytes();
    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// The name of a server message's kind, for errors.
pub fn kind_name(msg: &ServerMsg) -> &'static str {
    kind(msg)
}

fn kind(msg: &ServerMsg) -> &'static str {
    match msg {
        ServerMsg::Welcome(_) => "welcome",
        ServerMsg::Snapshot(_) => "snapshot",
        ServerMsg::Delta(_) => "delta",
        ServerMsg::HeartbeatAck { .. } => "heartbeat answer",
        ServerMsg::Error(_) => "error",
        ServerMsg::Goodbye(_) => "goodbye",
        ServerMsg::KeyRotated { .. } => "key rotation answer",
        ServerMsg::Relay(_) => "relay ticket",
        ServerMsg::GatewayGrant(_) => "gateway grant",
        ServerMsg::Packed(_) => "packed message",
    }
}
