//! The node's control task: drives the session, applies every map change to
//! the data plane, persists the membership, the key and the map, and answers
//! the node's requests.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::control::{Connection, ControlError, Event, Session};
use crate::keys::{PrivateKey, PublicKey};
use crate::member::{End, Setback};
use crate::render::text::escape;

use super::plane::{local_endpoints, Plane};
use super::state::{Membership as StoredMembership, StateDir};
use super::{Command, NodeEnd, NodeError, NodeEvent, PlaneRequest, SetbackLog, Shared};

/// How often the endpoints to announce are looked at: local addresses
/// (when not configured) and what the engine learned (STUN, relay).
const DETECT_ENDPOINTS: Duration = Duration::from_secs(1);

/// A rotation under way: the new key, and who asked.
pub(super) struct Pending {
    pub(super) key: PrivateKey,
    pub(super) reply: Option<oneshot::Sender<Result<PublicKey, NodeError>>>,
}

/// The control task's state (built by [`super::Node::start`]).
pub(super) struct Driver {
    pub(super) session: Session,
    pub(super) shared: Arc<Shared>,
    pub(super) plane: Arc<Plane>,
    pub(super) state: Option<StateDir>,
    pub(super) stored: StoredMembership,
    pub(super) key: PrivateKey,
    pub(super) rotation: Option<Pending>,
    /// Whether the local endpoints are detected (none configured).
    pub(super) detect: bool,
    /// The configured endpoints (when not detected).
    pub(super) endpoints: Vec<std::net::SocketAddr>,
    /// The endpoints last announced.
    pub(super) announced: Vec<std::net::SocketAddr>,
    pub(super) on_map: Option<super::MapHook>,
    /// Reasons for a retry already logged.
    pub(super) setbacks: SetbackLog,
    /// The pairs of the data plane's last traffic report (userspace
    /// mode's come from the sidecar), sent again with fresh peer paths.
    pub(super) reported_pairs: Vec<crate::traffic::PairTraffic>,
    /// A gateway's last load per service group, sent with every report.
    pub(super) reported_groups: Vec<crate::traffic::GroupLoad>,
}

impl Driver {
    /// Runs until the session ends or the node asks it to stop.
    pub(super) async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut requests: mpsc::Receiver<PlaneRequest>,
    ) {
        let mut detect = tokio::time::interval(DETECT_ENDPOINTS);
        detect.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        detect.tick().await;
        // Kernel mode: the engine's traffic per service, to the keyserver
        // (the member core sends it only when it changed).
        let mut report = tokio::time::interval(crate::traffic::REPORT_INTERVAL);
        report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        report.tick().await;
        let kernel = self.plane.is_kernel();
        loop {
            tokio::select! {
                ev = self.session.next_event() => {
                    if let Some(end) = self.on_event(ev) {
                        self.end(end);
                        return;
                    }
                }
                cmd = commands.recv() => match cmd {
                    None => return,
                    Some(Command::Shutdown(reply)) => {
                        let confirmed = self.session_shutdown().await;
                        tracing::info!(confirmed, "stopped: offline at the keyserver");
                        self.end(NodeEnd::Offline);
                        let _ = reply.send(());
                        return;
                    }
                    Some(Command::Leave(reply)) => {
                        let left = self.session_leave().await;
                        if left {
                            tracing::info!("left the network");
                        } else {
                            tracing::warn!("the keyserver did not confirm the leave; the member will expire there");
                        }
                        self.plane.clear();
                        if let Some(s) = &self.state {
                            s.forget_membership();
                        }
                        self.end(NodeEnd::Left);
                        let _ = reply.send(left);
                        return;
                    }
                    Some(cmd) => self.on_command(cmd).await,
                },
                Some(req) = requests.recv() => self.on_plane_request(req),
                _ = report.tick() => {
                    // Userspace mode: the sidecar's stack counts the
                    // pairs (its last report's are kept); both: the
                    // paths to peers, fresh.
                    let pairs = if kernel {
                        self.plane.engine.traffic().pairs
                    } else {
                        self.reported_pairs.clone()
                    };
                    let traffic = crate::traffic::TrafficReport { pairs, ..Default::default() };
                    self.on_plane_request(PlaneRequest::Traffic(traffic));
                }
                _ = detect.tick() => {
                    // Local addresses (unless configured) plus what the
                    // engine learned (STUN, the relay): candidates reach
                    // the map within a second of a change.
                    let local = if self.detect {
                        local_endpoints(self.plane.listen_port(), self.stored.range)
                    } else {
                        self.endpoints.clone()
                    };
                    let eps = self.plane.engine.advertise(&local);
                    if eps != self.announced {
                        self.announced = eps.clone();
                        let _ = self.session.update_endpoints(eps).await;
                    }
                }
            }
        }
    }

    async fn session_shutdown(&mut self) -> bool {
        self.session.shutdown().await
    }

    async fn session_leave(&mut self) -> bool {
        self.session.leave(Duration::from_secs(10)).await
    }

    async fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::SetPorts(ports) => {
                let _ = self.session.update_ports(ports).await;
            }
            Command::SetEndpoints(eps) => {
                let _ = self.session.update_endpoints(eps).await;
            }
            Command::Rotate(reply) => self.start_rotation(Some(reply)),
            Command::Shutdown(_) | Command::Leave(_) => {}
        }
    }

    /// A data-plane request: passed to the session, whose core sends it
    /// (deduplicated, rate-limited). Refusals are the data plane's to
    /// retry, so only logged at debug.
    fn on_plane_request(&mut self, req: PlaneRequest) {
        let result = match req {
            PlaneRequest::Wake(service) => self.session.wake(&service).map(|sent| {
                if sent {
                    tracing::info!(service = %escape(&service), "asked the keyserver to wake a service");
                }
            }),
            PlaneRequest::Groups(groups) => {
                self.reported_groups = groups;
                let report = crate::traffic::TrafficReport {
                    pairs: self.reported_pairs.clone(),
                    ..Default::default()
                };
                return self.on_plane_request(PlaneRequest::Traffic(report));
            }
            PlaneRequest::Traffic(mut report) => {
                self.reported_pairs.clone_from(&report.pairs);
                report.paths = self.plane.engine.peer_paths();
                report.groups.clone_from(&self.reported_groups);
                if report.pairs.is_empty() && report.paths.is_empty() && report.groups.is_empty() {
                    return;
                }
                self.session.report_traffic(report)
            }
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "data-plane request not sent");
        }
    }

    fn start_rotation(&mut self, reply: Option<oneshot::Sender<Result<PublicKey, NodeError>>>) {
        if self.rotation.is_some() {
            if let Some(r) = reply {
                let _ = r.send(Err(NodeError::Rotation("already under way".into())));
            }
            return;
        }
        let key = PrivateKey::generate();
        // The new key is kept, then used at once, then asked for: peers
        // learn it from the keyserver's push and handshake with a member
        // that already holds it (a handshake the other way round would wait
        // for WireGuard's 5 s retry).
        if let Some(s) = &self.state {
            if let Err(e) = s.save_next_key(&key) {
                if let Some(r) = reply {
                    let _ = r.send(Err(NodeError::Rotation(e.to_string())));
                }
                return;
            }
        }
        self.plane.engine.set_private_key(Some(key.clone()));
        match self.session.rotate_key(key.public_key()) {
            Ok(()) => self.rotation = Some(Pending { key, reply }),
            Err(e) => {
                self.revert_rotation();
                if let Some(r) = reply {
                    let _ = r.send(Err(NodeError::Rotation(e.to_string())));
                }
            }
        }
    }

    /// The rotation did not happen: back to the current key.
    fn revert_rotation(&mut self) {
        self.plane.engine.set_private_key(Some(self.key.clone()));
        if let Some(s) = &self.state {
            s.clear_next_key();
        }
    }

    /// Handles one session event; `Some` when the node ends.
    fn on_event(&mut self, ev: Result<Event, ControlError>) -> Option<NodeEnd> {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => return Some(self.terminal(e)),
        };
        match ev {
            Event::Snapshot => self.map_changed(None),
            Event::Delta(d) => self.map_changed(Some(d.changes)),
            Event::Connection(c) => self.connection(c),
            Event::CaughtUp { generation } => {
                tracing::debug!(generation, "caught up with the keyserver");
                self.shared.caught_up.send_replace(true);
                let _ = self.shared.events.send(NodeEvent::CaughtUp);
            }
            Event::RotationDue => self.start_rotation(None),
            Event::KeyRotated { new, .. } => self.rotated(new),
            Event::RotationFailed(e) => {
                tracing::warn!(error = %escape(&e.to_string()), "the keyserver refused the key rotation");
                self.revert_rotation();
                if let Some(p) = self.rotation.take() {
                    if let Some(r) = p.reply {
                        let _ = r.send(Err(NodeError::Rotation(e.to_string())));
                    }
                }
            }
            Event::Rejected(e) => {
                tracing::warn!(error = %escape(&e.to_string()), "keyserver rejected a request")
            }
            Event::Ended(end) => return Some(self.node_end(end, None)),
            Event::Relay(info) => self.plane.engine.use_relay_info(&info),
            Event::Joined(_) | Event::Welcomed(_) | Event::HeartbeatAck { .. } => {}
        }
        None
    }

    /// The session ended with an error: its typed end says how.
    fn terminal(&self, e: ControlError) -> NodeEnd {
        match self.session.end() {
            Some(end) => self.node_end(end.clone(), Some(e)),
            None => NodeEnd::Lost(Setback::Unreachable(e.to_string())),
        }
    }

    /// The node's end for the session's end (`error`: what the session
    /// reported, for a lost one-shot session's detail).
    fn node_end(&self, end: End, error: Option<ControlError>) -> NodeEnd {
        match end {
            End::Offline { .. } => NodeEnd::Offline,
            End::Left | End::LeaveUnconfirmed(_) => NodeEnd::Left,
            End::Revoked(revoked) => NodeEnd::Revoked {
                revoked,
                keyserver: self.session.keyserver(),
            },
            // A resume is never refused for good; kept as a setback.
            End::Refused(e) => NodeEnd::Lost(Setback::Refused(e)),
            End::Lost(Setback::Unreachable(why)) => {
                NodeEnd::Lost(Setback::Unreachable(error.map_or(why, |e| e.to_string())))
            }
            End::Lost(s) => NodeEnd::Lost(s),
        }
    }

    /// The control connection changed state: published, and each distinct
    /// reason for a retry logged once until a connection works again.
    fn connection(&mut self, c: Connection) {
        let keyserver = self.session.keyserver();
        self.shared.keyserver.send_replace(keyserver);
        match &c {
            Connection::Connecting {
                attempt,
                last_error: Some(e),
            } => self.setback(*attempt, e, keyserver),
            Connection::Connected => {
                self.setbacks.clear();
                let at = keyserver.map(|a| a.to_string()).unwrap_or_default();
                tracing::info!(keyserver = %at, "connected to the keyserver");
            }
            _ => {}
        }
        self.shared.connection.send_replace(c.clone());
        if c != Connection::Connected {
            self.shared.caught_up.send_replace(false);
        }
        let _ = self.shared.events.send(NodeEvent::Connection(c));
    }

    /// Logs a setback, once per distinct reason.
    fn setback(&mut self, attempt: u32, e: &Setback, keyserver: Option<std::net::SocketAddr>) {
        let at = keyserver.map_or_else(
            || super::addrs_text(&self.stored.control.addrs),
            |a| a.to_string(),
        );
        let reason = escape(&e.to_string()).into_owned();
        if !self.setbacks.is_new(e) {
            tracing::debug!(keyserver = %at, attempt, %reason, "still no keyserver session; retrying");
            return;
        }
        match e {
            Setback::Unreachable(_) => {
                tracing::warn!(keyserver = %at, attempt, %reason, "keyserver unreachable; running from the last map and retrying with backoff")
            }
            Setback::Refused(_) | Setback::Protocol(_) => {
                tracing::warn!(keyserver = %at, attempt, %reason, "the keyserver did not take this member; the membership is kept, running from the last map and retrying with backoff")
            }
        }
    }

    /// Applies the session's map to the data plane, the cache and the
    /// watchers.
    fn map_changed(&mut self, changes: Option<Vec<crate::netmap::MapChange>>) {
        let map = self.session.map().clone();
        if let Some(hook) = &self.on_map {
            (hook.0)(&map);
        }
        self.plane.apply(&map, &self.key.public_key());
        if let (Some(s), true) = (&self.state, map.generation > 0) {
            if let Err(e) = s.save_map(&map) {
                tracing::warn!(error = %e, "cannot cache the network map");
            }
        }
        let generation = map.generation;
        tracing::debug!(generation, "network map applied");
        self.shared.map.send_replace(map);
        let _ = self.shared.events.send(NodeEvent::MapChanged {
            generation,
            changes,
        });
    }

    /// The keyserver took the new key: the data plane switches to it, and
    /// the key and membership are saved.
    fn rotated(&mut self, new: PublicKey) {
        let Some(pending) = self.rotation.take() else {
            return;
        };
        if pending.key.public_key() != new {
            return;
        }
        self.key = pending.key;
        self.stored.control = self.session.membership();
        if let Some(s) = &self.state {
            let saved = s
                .save_key(&self.key)
                .and_then(|()| s.save_membership(&self.stored));
            if let Err(e) = saved {
                tracing::error!(error = %e, "rotated key not saved: the next start cannot resume");
            }
        }
        self.session.key_renewed();
        *self.shared.public_key.lock() = new;
        // The map may already hold the new key: peers are rebuilt for it.
        let map = self.session.map().clone();
        self.plane.apply(&map, &new);
        tracing::info!(public_key = %new, "key rotated");
        let _ = self.shared.events.send(NodeEvent::KeyRotated(new));
        if let Some(r) = pending.reply {
            let _ = r.send(Ok(new));
        }
    }

    fn end(&mut self, end: NodeEnd) {
        match &end {
            NodeEnd::Revoked { revoked, keyserver } => {
                let at = keyserver.map(|a| a.to_string()).unwrap_or_default();
                tracing::error!(
                    keyserver = %at,
                    reason = revoked.reason.as_str(),
                    message = %escape(&revoked.message),
                    "{}; tunnels are going down and the stored membership is forgotten",
                    revoked.reason
                );
                self.plane.clear();
                if let Some(s) = &self.state {
                    s.forget_membership();
                }
            }
            NodeEnd::Lost(s) => {
                tracing::warn!(reason = %escape(&s.to_string()), "control session ended (reconnect is off); the membership is kept");
            }
            NodeEnd::Offline | NodeEnd::Left => {}
        }
        if let Some(p) = self.rotation.take() {
            if let Some(r) = p.reply {
                let _ = r.send(Err(NodeError::Stopped));
            }
        }
        self.shared.connection.send_replace(Connection::Ended);
        self.shared.ended.send_replace(Some(end.clone()));
        let _ = self.shared.events.send(NodeEvent::Ended(end));
    }
}
