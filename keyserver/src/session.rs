//! One member's control stream, as a state machine without I/O: what was
//! sent, catch-up after a gap or a lagging subscription, revocation, and
//! every client request. The QUIC driver ([`crate::quic`]) and the
//! simulator feed it the hello, the network's pushes and the client's
//! messages, and write out the [`Reply`]s it returns.
//!
//! Call order: [`StreamSession::open`] with the hello (it joins or resumes
//! through [`Shared`] and subscribes to the network's pushes without missing
//! one), write its replies; then, in any order, [`StreamSession::on_push`]
//! for every push received and [`StreamSession::on_client`] for every client
//! message, writing the replies. A [`Fatal`] ends the stream: write its
//! error frame ([`Fatal::frame`]) and close. [`StreamSession::on_client`]
//! and [`StreamSession::open`] may commit to the store (fsync): a driver
//! on an async runtime calls them from a blocking thread.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use meshlib::ids::NetworkId;
use meshlib::keys::PublicKey;
use meshlib::netmap::{MapDelta, Member};
use meshlib::proto::{
    self, ClientMsg, ErrorCode, Goodbye, Hello, ProtoError, Request, Secret, ServerMsg, Welcome,
};
use tokio::sync::broadcast;

use crate::registry::{Catchup, Change, ProtoOpError};
use crate::server::{OpError, OpenSession, Push, Shared};

/// A session's fatal end: the client is told why, then the stream closes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fatal(pub ErrorCode, pub String);

impl Fatal {
    /// The error message to send before closing.
    pub fn frame(&self) -> ServerMsg {
        ServerMsg::Error(ProtoError {
            code: self.0,
            message: self.1.clone(),
        })
    }
}

impl From<proto::HelloError> for Fatal {
    fn from(e: proto::HelloError) -> Self {
        match e {
            proto::HelloError::Version(_) => Fatal(ErrorCode::UnsupportedVersion, e.to_string()),
            proto::HelloError::Malformed(_) => Fatal(ErrorCode::Malformed, e.to_string()),
        }
    }
}

impl From<proto::FrameError> for Fatal {
    fn from(e: proto::FrameError) -> Self {
        Fatal(ErrorCode::Malformed, e.to_string())
    }
}

/// Something to write on the stream.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A message to encode.
    Msg(ServerMsg),
    /// A push, already encoded once for every subscriber.
    Frame(Arc<[u8]>),
}

/// Whether the stream goes on after a client message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Keep going.
    Continue,
    /// The client ended its session (offline, leave): close after the replies.
    Close,
}

/// The state of one member's stream.
#[derive(Debug)]
pub struct StreamSession {
    network: NetworkId,
    /// The member's key (it changes with a rotation).
    key: PublicKey,
    /// Last generation sent to the client.
    sent: u64,
    /// The client's protocol version (an older one gets deltas it can
    /// decode: [`legacy_delta`]).
    version: u16,
    /// The member's instance name (its slot): when its key is removed and
    /// another key holds the slot, the member was replaced.
    instance: meshlib::ids::InstanceName,
    /// The client's address as last seen on the connection.
    observed: SocketAddr,
    /// The endpoints the member advertised last.
    advertised: Vec<SocketAddr>,
    /// The session ended (offline, leave): nothing more is taken.
    closed: bool,
    /// Counts this session as open for its member while it lives (a join
    /// retried while a session is open is refused).
    _open: OpenSession,
}

/// The delta a member of protocol version `version` is sent: without the
/// changes it cannot decode ([`meshlib::netmap::MapChange::since`]: service addresses came
/// with version 4, a group's own names with version 5); `None` when there
/// are none (the delta is fine as it is).
pub fn legacy_delta(d: &MapDelta, version: u16) -> Option<MapDelta> {
    if d.changes.iter().all(|c| c.since() <= version) {
        return None;
    }
    Some(MapDelta {
        from: d.from,
        to: d.to,
        changes: d
            .changes
            .iter()
            .filter(|c| c.since() <= version)
            .cloned()
            .collect(),
    })
}

/// Maps a refused or failed operation to a fatal session error.
fn op_fatal(e: OpError<ProtoOpError>) -> Fatal {
    match e {
        OpError::Refused(e) => Fatal(e.code(), e.to_string()),
        OpError::Store(e) => store_fatal(e),
    }
}

/// A store failure as the client is told: `Busy` while the store cannot
/// be reached or is contended (nothing changed; retry), else `Internal`.
fn store_fatal(e: crate::store::StoreError) -> Fatal {
    use crate::store::StoreError;
    match e {
        StoreError::Unavailable(_) | StoreError::Conflict { .. } => Fatal(
            ErrorCode::Busy,
            format!("the keyserver cannot change its state now ({e}); retry later"),
        ),
        e => Fatal(ErrorCode::Internal, e.to_string()),
    }
}

/// A mutation that cannot be refused, only fail in the store.
fn apply(
    shared: &Shared,
    mut f: impl FnMut(&mut crate::registry::Registry) -> (Option<Change>, Vec<crate::registry::StoreOp>),
) -> Result<(), Fatal> {
    shared
        .mutate(
            |reg| {
                let (change, ops) = f(reg);
                Ok::<_, ProtoOpError>(((), ops, change.into_iter().collect()))
            },
            |_, _, _| (),
        )
        .map(|_| ())
        .map_err(op_fatal)
}

fn welcome_of(
    m: &Member,
    network: NetworkId,
    credential: Option<Secret>,
    observed: SocketAddr,
    generation: u64,
    shared: &Shared,
) -> Welcome {
    Welcome {
        version: proto::VERSION,
        network,
        ip: m.ip,
        index: m.index,
        instance: m.instance.clone(),
        app_id: m.app_id.clone(),
        credential,
        observed,
        generation,
        heartbeat_secs: shared.limits.lifecycle.heartbeat_secs(),
    }
}

impl StreamSession {
    /// Handles the hello: checks the version, joins (with `credential`, a
    /// fresh random secret the driver made) or resumes. Returns the session,
    /// what to send first (welcome, then snapshot or catch-up) and the
    /// network's push subscription, taken at the same instant as the state
    /// sent, so nothing is missed or sent twice.
    pub fn open(
        shared: &Shared,
        hello: Hello,
        observed: SocketAddr,
        credential: Secret,
        now: SystemTime,
    ) -> Result<(Self, Vec<Reply>, broadcast::Receiver<Push>), Fatal> {
        if !(proto::MIN_VERSION..=proto::VERSION).contains(&hello.version) {
            return Err(proto::HelloError::Version(hello.version).into());
        }
        match hello.request {
            Request::Join(req) => {
                // A retried join of a member another replica holds a
                // session of: that replica may have died after the join's
                // commit (its lease ends within seconds), so this is worth
                // retrying, not final.
                if shared.held_elsewhere(req.network, &req.public_key) {
                    return Err(Fatal(
                        ErrorCode::Busy,
                        "a session of this member is open on another keyserver replica; retry in a few seconds".into(),
                    ));
                }
                let advertised = req.endpoints.clone();
                let ((joined, generation), (pushes, open)) = shared
                    .mutate(
                        |reg| {
                            let open = shared.is_online(req.network, &req.public_key);
                            let j = reg.join(&req, observed, &credential, open, now)?;
                            let (ops, changes) = (j.ops.clone(), j.changes.clone());
                            let generation = j.generation;
                            Ok(((j, generation), ops, changes))
                        },
                        |_, (j, _), sh| {
                            let key = j.member.public_key;
                            (sh.subscribe(j.network), sh.online(j.network, key))
                        },
                    )
                    .map_err(op_fatal)?;
                shared
                    .metrics
                    .joins
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if joined.rejoined {
                    tracing::info!(network = %joined.network, member = %joined.member.public_key, "retried join: membership given back with a new credential");
                }
                if let Some(old) = joined.replaced {
                    tracing::info!(network = %joined.network, instance = %joined.member.instance, old = %old, new = %joined.member.public_key, "slot taken over by a new key");
                }
                let network = joined.network;
                // The network's map, at least as new as the join (encoded
                // once, shared by the joiners of a storm).
                let (sent, map) = Self::map_for(shared, network, hello.version, Some(generation))
                    .ok_or_else(Self::revoked)?;
                let welcome = welcome_of(
                    &joined.member,
                    network,
                    Some(credential),
                    observed,
                    generation,
                    shared,
                );
                let s = Self {
                    network,
                    version: hello.version,
                    key: joined.member.public_key,
                    instance: joined.member.instance.clone(),
                    sent: sent.max(generation),
                    observed,
                    advertised,
                    closed: false,
                    _open: open,
                };
                let mut replies = vec![Reply::Msg(ServerMsg::Welcome(welcome))];
                replies.extend(map);
                Ok((s, replies, pushes))
            }
            Request::Resume(req) => {
                let advertised = req.endpoints.clone();
                let (network, from) = (req.network, req.generation);
                let key = req.public_key;
                let (resumed, (pushes, generation, open)) = shared
                    .mutate(
                        |reg| {
                            let r = reg.resume(&req, observed, now)?;
                            let changes: Vec<Change> = r.change.iter().cloned().collect();
                            let ops = r.ops.clone();
                            Ok((r, ops, changes))
                        },
                        |reg, _, sh| {
                            let generation = reg.network(network).map_or(0, |n| n.generation);
                            (sh.subscribe(network), generation, sh.online(network, key))
                        },
                    )
                    .map_err(op_fatal)?;
                let welcome =
                    welcome_of(&resumed.member, network, None, observed, generation, shared);
                let mut s = Self {
                    network,
                    version: hello.version,
                    key: resumed.member.public_key,
                    instance: resumed.member.instance.clone(),
                    sent: from,
                    observed,
                    advertised,
                    closed: false,
                    _open: open,
                };
                let mut replies = vec![Reply::Msg(ServerMsg::Welcome(welcome))];
                replies.extend(s.catchup(resumed.catchup, shared.limits.max_frame));
                Ok((s, replies, pushes))
            }
            // Answered before a session opens (`quic::drive_stream`).
            Request::Gateway(_) => Err(Fatal(
                ErrorCode::Malformed,
                "a gateway request opens no member session".into(),
            )),
        }
    }

    /// The member's network.
    pub fn network(&self) -> NetworkId {
        self.network
    }

    /// The member's current key.
    pub fn key(&self) -> PublicKey {
        self.key
    }

    /// The last generation sent.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// A catch-up as replies, advancing `sent`.
    fn catchup(&mut self, c: Catchup, max_frame: usize) -> Option<Reply> {
        let msg = match c {
            Catchup::UpToDate => return None,
            Catchup::Delta(d) => {
                self.sent = d.to;
                let d = legacy_delta(&d, self.version).unwrap_or(d);
                ServerMsg::Delta(d)
            }
            Catchup::Snapshot(map) => {
                self.sent = map.generation;
                ServerMsg::Snapshot(map)
            }
        };
        Some(self.packed_if_large(msg, max_frame))
    }

    /// `msg` packed when this member reads packed messages and packing
    /// pays ([`proto::pack_frame`]), else as it is (a frame over
    /// `max_frame` stays a message, for the writer to refuse).
    fn packed_if_large(&self, msg: ServerMsg, max_frame: usize) -> Reply {
        if self.version < proto::PACKED_VERSION {
            return Reply::Msg(msg);
        }
        let Ok(plain) = proto::encode_frame(&msg, usize::MAX) else {
            return Reply::Msg(msg);
        };
        match proto::pack_frame(&plain) {
            Some(packed) if packed.len() - 4 <= max_frame => Reply::Frame(packed.into()),
            _ if plain.len() - 4 <= max_frame => Reply::Frame(plain.into()),
            _ => Reply::Msg(msg),
        }
    }

    /// The replies that give a member its network's current map, and the
    /// generation they end at: the shared snapshot (perhaps with a delta;
    /// `joined`: the generation of the member's join, which the snapshot
    /// must hold) for protocol version 4 and later
    /// ([`Shared::map_replies`]), a snapshot of its own for older members.
    fn map_for(
        shared: &Shared,
        network: NetworkId,
        version: u16,
        joined: Option<u64>,
    ) -> Option<(u64, Vec<Reply>)> {
        if version >= 4 {
            return shared.map_replies(network, joined, version >= proto::PACKED_VERSION);
        }
        let map = shared.read(|r| r.snapshot(network))?;
        Some((map.generation, vec![Reply::Msg(ServerMsg::Snapshot(map))]))
    }

    fn revoked() -> Fatal {
        Fatal(
            ErrorCode::Revoked,
            "this member was removed from its network".into(),
        )
    }

    /// Why this session's key is no longer a member: another key took its
    /// slot ([`ErrorCode::Replaced`]), or it was removed.
    fn gone(&self, shared: &Shared) -> Fatal {
        let (net, instance) = (self.network, &self.instance);
        match shared.read(|r| r.instance_holder(net, instance)) {
            Some(holder) if holder != self.key => Fatal(
                ErrorCode::Replaced,
                format!("instance {instance} was taken over by another key ({holder}): a new instance holds this slot"),
            ),
            _ => Self::revoked(),
        }
    }

    /// One push of the network (or the subscription's lag or end): forwards
    /// it in order, catches up from the log after a gap, ends a removed
    /// member's stream. Reads the registry only.
    pub fn on_push(
        &mut self,
        shared: &Shared,
        push: Result<Push, broadcast::error::RecvError>,
    ) -> Result<Vec<Reply>, Fatal> {
        match push {
            Ok(p) if p.to <= self.sent => Ok(vec![]),
            Ok(p) if p.from == self.sent => {
                self.sent = p.to;
                if p.removed.contains(&self.key) {
                    // The removal itself is not sent: the stream ends.
                    return Err(self.gone(shared));
                }
                Ok(vec![Reply::Frame(p.frame_for(self.version))])
            }
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                let (net, key, sent) = (self.network, self.key, self.sent);
                let (still, c) = shared.read(|r| (r.is_member(net, &key), r.catchup(net, sent)));
                if !still {
                    return Err(self.gone(shared));
                }
                Ok(c.and_then(|c| self.catchup(c, shared.limits.max_frame))
                    .into_iter()
                    .collect())
            }
            Err(broadcast::error::RecvError::Closed) => {
                Err(Fatal(ErrorCode::Internal, "shutting down".into()))
            }
        }
    }

    /// The relay members are told changed (replicas): the member gets a
    /// ticket for the new one, as if it had asked (`GetRelay`). Nothing
    /// for a session that ended or a member that is gone (its stream ends
    /// at the next push).
    pub fn on_relay_change(&mut self, shared: &Shared) -> Vec<Reply> {
        if self.closed {
            return vec![];
        }
        let (net, key) = (self.network, self.key);
        match (
            shared.read(|r| r.member(net, &key).cloned()),
            shared.relay_settings(),
        ) {
            (Some(m), Some(settings)) => vec![Reply::Msg(ServerMsg::Relay(
                crate::relay::info_for(&settings, net, &m),
            ))],
            _ => vec![],
        }
    }

    /// One client message. `observed` is the client's address now (QUIC
    /// follows a client whose address changes, e.g. a NAT rebinding; the
    /// observed endpoint follows it).
    pub fn on_client(
        &mut self,
        shared: &Shared,
        msg: ClientMsg,
        observed: SocketAddr,
        now: SystemTime,
    ) -> Result<(Vec<Reply>, Next), Fatal> {
        if self.closed {
            return Err(Fatal(
                ErrorCode::Malformed,
                "the session has ended; nothing more is taken on it".into(),
            ));
        }
        let roamed = observed != self.observed;
        self.observed = observed;
        let (net, key) = (self.network, self.key);
        if let ClientMsg::UpdateEndpoints(eps) = &msg {
            self.advertised.clone_from(eps);
        }
        if roamed || matches!(msg, ClientMsg::UpdateEndpoints(_)) {
            let eps = self.advertised.clone();
            apply(shared, |reg| {
                reg.update_endpoints(net, &key, &eps, observed, now)
            })?;
        }
        let reply = |m| Ok((vec![Reply::Msg(m)], Next::Continue));
        match msg {
            ClientMsg::Heartbeat => {
                shared.heartbeat(net, &key, now);
                if shared.read(|r| r.is_offline(net, &key)) {
                    // Silent for a while, alive again.
                    apply(shared, |reg| reg.set_online(net, &key, now))?;
                }
                // The generation this stream has delivered: the client
                // compares it with its map to notice anything lost.
                reply(ServerMsg::HeartbeatAck {
                    generation: self.sent,
                })
            }
            ClientMsg::UpdateEndpoints(_) => Ok((vec![], Next::Continue)),
            ClientMsg::GetMap(other) if other != net => reply(ServerMsg::Error(ProtoError {
                code: ErrorCode::Forbidden,
                message: format!("not a member of network {other}"),
            })),
            ClientMsg::GetMap(_) => match Self::map_for(shared, net, self.version, None) {
                Some((generation, replies)) => {
                    self.sent = generation;
                    Ok((replies, Next::Continue))
                }
                None => Err(Self::revoked()),
            },
            ClientMsg::UpdatePorts(ports) => {
                apply(shared, |reg| reg.update_ports(net, &key, &ports))?;
                Ok((vec![], Next::Continue))
            }
            ClientMsg::Offline => {
                apply(shared, |reg| reg.set_offline(net, &key, now))?;
                tracing::info!(network = %net, member = %key, "member went offline");
                self.closed = true;
                Ok((
                    vec![Reply::Msg(ServerMsg::Goodbye(Goodbye::Offline))],
                    Next::Close,
                ))
            }
            ClientMsg::Leave => {
                let left = shared.mutate(
                    |reg| {
                        let (change, ops) = reg.remove_member(net, &key.to_string(), now)?;
                        Ok::<_, crate::registry::AdminError>(((), ops, vec![change]))
                    },
                    |_, _, _| (),
                );
                match left {
                    Ok(_) => {
                        tracing::info!(network = %net, member = %key, "member left");
                        self.closed = true;
                        Ok((
                            vec![Reply::Msg(ServerMsg::Goodbye(Goodbye::Left))],
                            Next::Close,
                        ))
                    }
                    Err(OpError::Refused(_)) => Err(self.gone(shared)),
                    Err(OpError::Store(e)) => Err(store_fatal(e)),
                }
            }
            ClientMsg::GetRelay => {
                let member = shared.read(|r| r.member(net, &key).cloned());
                match (member, shared.relay_settings()) {
                    (Some(m), Some(settings)) => {
                        reply(ServerMsg::Relay(crate::relay::info_for(&settings, net, &m)))
                    }
                    (None, _) => Err(Self::revoked()),
                    // Not serving (yet): no STUN, no relay.
                    (Some(_), None) => reply(ServerMsg::Relay(meshlib::proto::RelayInfo {
                        stun: vec![],
                        relay: None,
                        ticket: vec![],
                        lifetime_secs: crate::relay::TICKET_LIFETIME.as_secs() as u32,
                        tcp: None,
                        cert_sha256: shared.cert_sha256,
                    })),
                }
            }
            ClientMsg::Wake { service } => {
                if service.len() > crate::registry::validate::MAX_LABEL {
                    return reply(ServerMsg::Error(ProtoError {
                        code: ErrorCode::InvalidMetadata,
                        message: "service name too long".into(),
                    }));
                }
                match shared.wake(net, &service, now) {
                    Ok(_) => Ok((vec![], Next::Continue)),
                    Err(OpError::Refused(e)) => reply(ServerMsg::Error(ProtoError {
                        code: e.code(),
                        message: e.to_string(),
                    })),
                    // Not fatal: the next held flow asks again.
                    Err(OpError::Store(e)) => reply(store_fatal(e).frame()),
                }
            }
            ClientMsg::Traffic(report) => {
                if let Err(why) = shared.traffic_report(net, key, report, now) {
                    tracing::debug!(network = %net, member = %key, %why, "traffic report dropped");
                }
                Ok((vec![], Next::Continue))
            }
            ClientMsg::RotateKey(r) => {
                let new = r.new_public_key;
                let rotated = shared.mutate(
                    |reg| {
                        let (change, ops) = reg.rotate_key(net, &key, &r.credential, new, now)?;
                        Ok::<_, crate::registry::RotateError>(((), ops, vec![change]))
                    },
                    |_, _, sh| sh.rekeyed(net, &key, &new),
                );
                match rotated {
                    Ok(_) => {
                        self.key = new;
                        self._open = shared.online(net, new);
                        tracing::info!(network = %net, old = %key, new = %new, "member rotated its key");
                        reply(ServerMsg::KeyRotated { public_key: new })
                    }
                    Err(OpError::Refused(e)) => reply(ServerMsg::Error(ProtoError {
                        code: e.code(),
                        message: e.to_string(),
                    })),
                    Err(OpError::Store(e)) => Err(store_fatal(e)),
                }
            }
        }
    }

    /// Whether handling `msg` may write to the store (so a driver on an
    /// async runtime moves it to a blocking thread).
    pub fn may_write(&self, msg: &ClientMsg, observed: SocketAddr) -> bool {
        observed != self.observed || !matches!(msg, ClientMsg::GetMap(_) | ClientMsg::GetRelay)
    }
}

#[cfg(test)]
mod tests {
    use meshlib::netmap::{MapChange, ServiceAddress};

    use super::*;

    /// Each member is sent what its protocol version decodes: version 3
    /// neither service addresses nor a group's names, version 4 no names,
    /// version 5 everything (the delta as it is).
    #[test]
    fn older_members_get_deltas_without_what_they_cannot_decode() {
        let group: meshlib::services::GroupName = "shop".parse().unwrap();
        let address = ServiceAddress {
            service: "api".into(),
            ip: std::net::Ipv4Addr::new(10, 240, 4, 1),
            wake_timeout_secs: None,
            ports: vec![],
        };
        let d = MapDelta {
            from: 4,
            to: 5,
            changes: vec![
                MapChange::ServiceRemove("old".parse().unwrap()),
                MapChange::AddressUpsert(address),
                MapChange::GroupNames(group, vec!["shop.test".into()]),
            ],
        };
        let kinds = |d: &MapDelta| d.changes.iter().map(MapChange::since).collect::<Vec<_>>();
        assert_eq!(kinds(&legacy_delta(&d, 3).unwrap()), [2]);
        assert_eq!(kinds(&legacy_delta(&d, 4).unwrap()), [2, 4]);
        assert!(legacy_delta(&d, proto::VERSION).is_none());
        let old_only = MapDelta {
            changes: vec![MapChange::ServiceRemove("old".parse().unwrap())],
            ..d
        };
        assert!(legacy_delta(&old_only, 3).is_none());
    }
}
