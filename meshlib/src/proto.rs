//! The control protocol between a sidecar and the keyserver: messages, join
//! tokens and length framing. Pure data plus two small async frame helpers.
//!
//! ## The exchange (one QUIC bidirectional stream per membership)
//!
//! 1. The client opens a bidirectional stream and sends one [`Hello`]: the
//!    protocol [`VERSION`] and either a [`Request::Join`] (token secret, public
//!    key, metadata) or a [`Request::Resume`] (member credential, last known
//!    generation).
//! 2. The server answers [`ServerMsg::Welcome`] (assigned IP, index, instance
//!    name, and on join the member credential), then either
//!    [`ServerMsg::Snapshot`] or the [`ServerMsg::Delta`]s the client missed —
//!    or a single [`ServerMsg::Error`] and closes the stream.
//! 3. From then on the server pushes [`ServerMsg::Delta`]s in generation order;
//!    the client sends [`ClientMsg::Heartbeat`] (at least every
//!    [`Welcome::heartbeat_secs`], or the member goes offline at the
//!    keyserver), [`ClientMsg::UpdateEndpoints`], [`ClientMsg::UpdatePorts`]
//!    and [`ClientMsg::RotateKey`] whenever it likes. A revoked member
//!    receives [`ServerMsg::Error`] with [`ErrorCode::Revoked`].
//! 4. The client ends its membership's session with [`ClientMsg::Offline`]
//!    (graceful stop: the member stays reserved) or [`ClientMsg::Leave`]
//!    (the membership is released); the server confirms with
//!    [`ServerMsg::Goodbye`] and closes the stream.
//!
//! ## Framing
//!
//! Every message is a 4-byte big-endian length followed by that many bytes of
//! postcard. A frame longer than the configured maximum is rejected before any
//! byte of it is buffered ([`FrameError::TooLarge`]).
//!
//! ## Reconnect proof
//!
//! At join the keyserver issues a random 32-byte member credential
//! ([`Welcome::credential`]); it stores only its SHA-256. A resume must present
//! it: knowing a member's public key (which every peer does) is not enough.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::ids::{AppId, InstanceName, NetworkId, ProcessType};
use crate::keys::PublicKey;
use crate::netmap::{MapDelta, NetworkMap};

/// The protocol version this build speaks; sent in the first message.
/// Version 2 added member lifecycle (states, offline, goodbye) and key
/// rotation; version 3 added slots ([`JoinRequest::replace`],
/// [`JoinRequest::ephemeral`], [`ErrorCode::Replaced`]); version 4 added
/// service addresses to the map ([`crate::netmap::ServiceAddress`]: the
/// map's appended fields, two [`crate::netmap::MapChange`] variants, which
/// the keyserver leaves out of the deltas it sends older members) and the
/// member requests of scale to zero and traffic per service
/// ([`ClientMsg::Wake`], [`ClientMsg::Traffic`]); version 5 added a
/// service group's own names ([`crate::netmap::NetworkMap::names`], an
/// appended map field, and [`crate::netmap::MapChange::GroupNames`], left
/// out of the deltas older members are sent); version 6 added packed
/// messages ([`ServerMsg::Packed`]: large snapshots and deltas compressed,
/// sent only to members of version 6 or later).
pub const VERSION: u16 = 6;

/// The first protocol version whose members read [`ServerMsg::Packed`]
/// (a keyserver sends older members the plain message).
pub const PACKED_VERSION: u16 = 6;

/// Messages whose postcard encoding is at least this long are sent packed
/// to members that read packed messages ([`pack_frame`]): below it a
/// message fits a datagram or two and compression saves next to nothing.
pub const PACK_FROM: usize = 1024;

/// The largest message a [`Packed`] may unpack to: 16 MiB (a snapshot of
/// the largest network is a few MiB). The packed frame itself is bounded
/// by the reader's frame limit like any other.
pub const MAX_UNPACKED: usize = 16 << 20;

/// The first protocol version whose keyserver takes [`ClientMsg::Wake`]
/// and [`ClientMsg::Traffic`] (an older one cannot decode them and would
/// end the session).
pub const WAKE_VERSION: u16 = 4;

/// The oldest protocol version a keyserver of this build still accepts
/// ([`parse_hello`] reads its hello; every server message it may receive is
/// unchanged since), so members of the last release keep working through
/// a keyserver upgrade.
pub const MIN_VERSION: u16 = 2;

/// The QUIC ALPN identifier of the control protocol.
pub const ALPN: &[u8] = b"istm-control/2";

/// The ALPN identifier of the relay over TLS/TCP (the keyserver's TCP port
/// carries both: the control protocol for members whose UDP is blocked,
/// and the relay for their packets).
pub const ALPN_RELAY: &[u8] = b"istm-relay/1";

/// The TLS server name clients use; the certificate is pinned by fingerprint,
/// so the name only has to match what the keyserver's certificate carries.
pub const SERVER_NAME: &str = "keyserver.ist-mesh.internal";

/// Default maximum frame size: 1 MiB. A full 1022-member snapshot with two
/// endpoints, a 40-character service name and a 63-character instance name
/// per member is 289 KB in postcard (measured by a keyserver test), so this
/// leaves a factor of three and a half.
pub const DEFAULT_MAX_FRAME: usize = 1 << 20;

/// A 32-byte secret (token secret, member credential).
pub type Secret = [u8; 32];

/// Text prefix of a join token.
const TOKEN_PREFIX: &str = "istm1.";

/// A join token: everything `sidecar up --token T` needs to reach a keyserver
/// and join one network. Text form `istm1.<base64url(postcard)>`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    /// Where the keyserver's QUIC endpoint listens.
    pub addrs: Vec<SocketAddr>,
    /// SHA-256 of the keyserver's certificate (DER), pinned by the client.
    pub cert_sha256: [u8; 32],
    /// The network the token lets a member join.
    pub network: NetworkId,
    /// The secret; the keyserver stores only its SHA-256.
    pub secret: Secret,
    /// The service the token is bound to, if any (a hint for the sidecar's
    /// default; the keyserver enforces the binding).
    pub service: Option<String>,
    /// The process type the token is bound to, if any (same: a hint).
    pub process_type: Option<ProcessType>,
}

/// Why a join token's text is not a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenParseError {
    /// The text does not start with `istm1.` (unknown or missing version).
    #[error("join token must start with '{TOKEN_PREFIX}'")]
    BadPrefix,
    /// A gateway credential's text does not start with `istg1.`.
    #[error("gateway credential must start with '{GATEWAY_TOKEN_PREFIX}'")]
    BadGatewayPrefix,
    /// The part after the prefix is not base64url.
    #[error("join token is not valid base64url")]
    BadBase64,
    /// The decoded bytes are not a token.
    #[error("join token content is malformed")]
    BadContent,
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // postcard of a plain struct cannot fail (no maps, no unsupported types).
        let bytes = postcard::to_stdvec(self).map_err(|_| fmt::Error)?;
        write!(f, "{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("addrs", &self.addrs)
            .field("network", &self.network)
            .finish_non_exhaustive()
    }
}

impl FromStr for JoinToken {
    type Err = TokenParseError;
    fn from_str(s: &str) -> Result<Self, TokenParseError> {
        let body = s
            .trim()
            .strip_prefix(TOKEN_PREFIX)
            .ok_or(TokenParseError::BadPrefix)?;
        let bytes = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TokenParseError::BadBase64)?;
        postcard::from_bytes(&bytes).map_err(|_| TokenParseError::BadContent)
    }
}

/// The first message a client sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The client's protocol version ([`VERSION`]).
    pub version: u16,
    /// What the client asks for.
    pub request: Request,
}

/// Join a network, or come back to one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// First contact, with a join token.
    Join(JoinRequest),
    /// Reconnect of an existing member.
    Resume(ResumeRequest),
    /// A gateway's credential asks which networks it serves, with join
    /// tokens for those it names ([`GatewayRequest`]). Answered with
    /// [`ServerMsg::GatewayGrant`], then the stream closes. Appended: a
    /// keyserver that predates it refuses the hello as malformed.
    Gateway(GatewayRequest),
}

/// Most networks one [`GatewayRequest`] asks join tokens for.
pub const MAX_GATEWAY_JOINS: usize = 64;

/// What a gateway asks with its credential ([`GatewayToken`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayRequest {
    /// The credential's secret.
    pub secret: Secret,
    /// Networks (of those the last grant listed) the gateway wants to join
    /// now: each gets a one-use join token in the grant. At most
    /// [`MAX_GATEWAY_JOINS`].
    pub join: Vec<NetworkId>,
}

/// The networks a gateway serves: every network in its credential's scope
/// that has a service group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayGrant {
    /// The networks, sorted by id.
    pub networks: Vec<GatewayNetwork>,
}

/// One network of a [`GatewayGrant`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayNetwork {
    /// Its id.
    pub id: NetworkId,
    /// Its name (for logs and metrics).
    pub name: String,
    /// A join token (one use, minutes of validity, bound to service
    /// `gateway`, ephemeral) if the request asked for this network.
    pub token: Option<JoinToken>,
}

/// Text prefix of a gateway credential.
const GATEWAY_TOKEN_PREFIX: &str = "istg1.";

/// A gateway credential: where the keyserver is, its pinned certificate,
/// and the secret of an API token of role `gateway`. Text form
/// `istg1.<base64url(postcard)>`. It joins no network by itself: the
/// gateway asks with it ([`Request::Gateway`]) for the networks to serve
/// and a join token for each.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayToken {
    /// Where the keyserver's QUIC endpoint listens.
    pub addrs: Vec<SocketAddr>,
    /// SHA-256 of the keyserver's certificate (DER), pinned by the client.
    pub cert_sha256: [u8; 32],
    /// The secret; the keyserver stores only its SHA-256.
    pub secret: Secret,
}

impl fmt::Display for GatewayToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = postcard::to_stdvec(self).map_err(|_| fmt::Error)?;
        write!(f, "{GATEWAY_TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
    }
}

impl fmt::Debug for GatewayToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GatewayToken")
            .field("addrs", &self.addrs)
            .finish_non_exhaustive()
    }
}

impl FromStr for GatewayToken {
    type Err = TokenParseError;
    fn from_str(s: &str) -> Result<Self, TokenParseError> {
        let body = s
            .trim()
            .strip_prefix(GATEWAY_TOKEN_PREFIX)
            .ok_or(TokenParseError::BadGatewayPrefix)?;
        let bytes = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TokenParseError::BadBase64)?;
        postcard::from_bytes(&bytes).map_err(|_| TokenParseError::BadContent)
    }
}

/// Metadata of a joining member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The network named in the token.
    pub network: NetworkId,
    /// The token's secret.
    pub token_secret: Secret,
    /// The membership's WireGuard public key (generated on the instance).
    pub public_key: PublicKey,
    /// The service (app) name, any Unicode.
    pub service: String,
    /// The app's DNS-label id; `None` lets the keyserver reuse the id of the
    /// service's other members or assign a fresh `ap-<uuid>`.
    pub app_id: Option<AppId>,
    /// The process type (`web` by default).
    pub process_type: ProcessType,
    /// The wanted instance name; `None` lets the keyserver pick one.
    pub instance: Option<InstanceName>,
    /// Label of the runner (host).
    pub runner: String,
    /// Underlay endpoints where the member's WireGuard socket listens.
    pub endpoints: Vec<SocketAddr>,
    /// Ports the instance serves ([`crate::netmap::Member::ports`]).
    pub ports: Vec<u16>,
    /// Service groups to attach the instance to (`--service-group`); each
    /// must exist. Appended (seed 002).
    #[serde(default)]
    pub service_groups: Vec<crate::services::GroupName>,
    /// Ports to publish in a group owned by the instance (`--publish`),
    /// deleted when it leaves or expires; empty: no such group. Appended.
    #[serde(default)]
    pub publish: Vec<crate::services::PublishedPort>,
    /// Take the slot named by [`JoinRequest::instance`] even while its
    /// holder is online (`--replace`: the platform knows the old instance
    /// is dead); the old session is closed with [`ErrorCode::Replaced`].
    /// Version 3.
    #[serde(default)]
    pub replace: bool,
    /// The member is ephemeral (`--ephemeral`): once offline for the
    /// keyserver's `ephemeral-after` it is removed and its slot freed, and
    /// while offline its index counts as free for new instances. Version 3.
    #[serde(default)]
    pub ephemeral: bool,
}

/// A reconnecting member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeRequest {
    /// The member's network.
    pub network: NetworkId,
    /// The member's public key.
    pub public_key: PublicKey,
    /// The credential issued at join ([`Welcome::credential`]).
    pub credential: Secret,
    /// The last generation the client applied (0: send a snapshot).
    pub generation: u64,
    /// Current underlay endpoints (they may have changed while away).
    pub endpoints: Vec<SocketAddr>,
}

/// What the keyserver assigned to a member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The server's protocol version.
    pub version: u16,
    /// The member's network.
    pub network: NetworkId,
    /// The member's private IP.
    pub ip: Ipv4Addr,
    /// The 1-based index within (app, process type).
    pub index: u32,
    /// The member's instance name.
    pub instance: InstanceName,
    /// The member's app id.
    pub app_id: AppId,
    /// The reconnect credential: `Some` on join only (shown once).
    pub credential: Option<Secret>,
    /// The client address the keyserver sees (useful behind NAT).
    pub observed: SocketAddr,
    /// The network's generation when the welcome was sent: the client's map
    /// has caught up once it reaches it.
    pub generation: u64,
    /// How often the member must send a heartbeat (seconds, at least 1): a
    /// member silent for the keyserver's `offline-after` goes offline.
    pub heartbeat_secs: u16,
}

/// Messages from client to server after the [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientMsg {
    /// I am alive; the server answers [`ServerMsg::HeartbeatAck`].
    Heartbeat,
    /// My underlay endpoints changed.
    UpdateEndpoints(Vec<SocketAddr>),
    /// Send me the map of this network (only the member's own network is
    /// allowed; anything else is [`ErrorCode::Forbidden`]).
    GetMap(NetworkId),
    /// Remove me from the network now (a short-lived member such as
    /// `sidecar tunnel` leaving); the server ends the stream with
    /// [`ErrorCode::Revoked`]. Appended, so older encodings still hold.
    Leave,
    /// The ports my instance serves changed
    /// ([`crate::netmap::Member::ports`]).
    UpdatePorts(Vec<u16>),
    /// I am stopping gracefully: mark me offline now (peers stop naming and
    /// reaching me; my address, index and name stay reserved until I
    /// resume or expire). The server answers [`ServerMsg::Goodbye`] and
    /// ends the stream.
    Offline,
    /// Replace my WireGuard public key; my address, index and names stay.
    /// The server answers [`ServerMsg::KeyRotated`], or a non-fatal
    /// [`ServerMsg::Error`] and nothing changes.
    RotateKey(RotateKey),
    /// Send me my relay ticket and the STUN servers to use
    /// ([`ServerMsg::Relay`]); asked after every welcome and again before
    /// the ticket expires.
    GetRelay,
    /// Wake this service of my network (scale to zero, seed 001): a flow
    /// to its address waits and it has no online instance. The keyserver
    /// runs the service's wake hook once however many members ask (again
    /// only after its wake timeout); nothing is answered when it runs or
    /// already ran, a non-fatal [`ServerMsg::Error`] when the service is
    /// unknown, not wakeable ([`ErrorCode::Forbidden`]) or has an online
    /// instance ([`ErrorCode::InvalidMetadata`]). Sent only to a keyserver
    /// whose [`Welcome::version`] is 4 or more. Appended.
    Wake {
        /// The service's name ([`crate::netmap::ServiceAddress::service`]).
        service: String,
    },
    /// What my data plane counted per destination service
    /// ([`crate::traffic::TrafficReport`]), at most every
    /// [`crate::traffic::REPORT_INTERVAL`]. Never answered; a report out
    /// of bounds is dropped. Sent only to a keyserver whose
    /// [`Welcome::version`] is 4 or more. Appended.
    Traffic(crate::traffic::TrafficReport),
}

/// Where a member learns its server-reflexive addresses and which relay it
/// may use, with the ticket that admits it there
/// ([`crate::nat::relay::Ticket`]).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayInfo {
    /// STUN servers (UDP) to ask from the WireGuard socket.
    pub stun: Vec<SocketAddr>,
    /// The relay's UDP address (`None`: no relay in this deployment).
    pub relay: Option<SocketAddr>,
    /// The signed ticket (encoded), to present to the relay.
    pub ticket: Vec<u8>,
    /// Seconds the ticket stays valid; ask again before.
    pub lifetime_secs: u32,
    /// The relay over TLS on TCP (ALPN [`ALPN_RELAY`]), for members whose
    /// UDP is blocked.
    pub tcp: Option<SocketAddr>,
    /// SHA-256 of the certificate the TCP relay presents (pinned).
    pub cert_sha256: [u8; 32],
}

impl fmt::Debug for RelayInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RelayInfo")
            .field("stun", &self.stun)
            .field("relay", &self.relay)
            .field("lifetime_secs", &self.lifetime_secs)
            .finish_non_exhaustive()
    }
}

/// A key rotation request: the membership credential proves it again (a
/// session alone is not enough to change the identity peers trust).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotateKey {
    /// The new public key (its private key was generated on the instance).
    pub new_public_key: PublicKey,
    /// The membership credential ([`Welcome::credential`]).
    pub credential: Secret,
}

impl fmt::Debug for RotateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RotateKey")
            .field("new_public_key", &self.new_public_key)
            .finish_non_exhaustive()
    }
}

/// Why the server ends a session at the client's request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Goodbye {
    /// [`ClientMsg::Offline`] was recorded: the member is offline.
    Offline,
    /// [`ClientMsg::Leave`] was recorded: the membership is released.
    Left,
}

/// Messages from server to client.
///
/// Decoding unpacks a [`ServerMsg::Packed`] transparently: what a reader
/// gets is the message inside it (never a `Packed`), so readers need not
/// know whether the keyserver packed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// The derives become inherent `ServerMsg::serialize`/`deserialize`; the
// trait impls below wrap them (the `Deserialize` one unpacks).
#[serde(remote = "Self")]
pub enum ServerMsg {
    /// Answer to the [`Hello`].
    Welcome(Welcome),
    /// The whole map.
    Snapshot(NetworkMap),
    /// Changes since the last generation sent.
    Delta(MapDelta),
    /// Answer to a heartbeat, with the generation the server has delivered
    /// on this stream (a client whose map is older lost something and asks
    /// for [`ClientMsg::GetMap`]).
    HeartbeatAck {
        /// The last generation sent on this stream.
        generation: u64,
    },
    /// A request failed; fatal codes close the stream.
    Error(ProtoError),
    /// The session ends as the client asked ([`ClientMsg::Offline`] or
    /// [`ClientMsg::Leave`]); the stream closes after it.
    Goodbye(Goodbye),
    /// [`ClientMsg::RotateKey`] is done: this is the member's key from now on
    /// (peers receive the change as a delta replacing the old key).
    KeyRotated {
        /// The new public key.
        public_key: PublicKey,
    },
    /// Answer to [`ClientMsg::GetRelay`].
    Relay(RelayInfo),
    /// Answer to [`Request::Gateway`]. Appended.
    GatewayGrant(GatewayGrant),
    /// Another message, compressed (version 6, appended; sent only to
    /// members of [`PACKED_VERSION`] or later): a large snapshot or delta
    /// costs the keyserver and the network about half the datagrams.
    /// Decoding a `ServerMsg` unpacks it, so a reader never sees this
    /// variant; a `Packed` inside a `Packed` is malformed.
    Packed(Packed),
}

impl Serialize for ServerMsg {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        ServerMsg::serialize(self, s)
    }
}

impl<'de> Deserialize<'de> for ServerMsg {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match ServerMsg::deserialize(d)? {
            ServerMsg::Packed(p) => p.unpack().map_err(serde::de::Error::custom),
            msg => Ok(msg),
        }
    }
}

/// A [`ServerMsg`]'s postcard encoding compressed with LZ4 (block format).
/// A network's snapshot is mostly repeated text (app ids, service and
/// instance names) and public keys stored twice: packed, it takes 35 to
/// 55 % of its plain size.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Packed {
    /// Length of the plain encoding (at most [`MAX_UNPACKED`]).
    pub len: u32,
    /// The plain encoding, compressed.
    pub lz4: Vec<u8>,
}

impl fmt::Debug for Packed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Packed")
            .field("len", &self.len)
            .field("lz4_len", &self.lz4.len())
            .finish()
    }
}

/// Why a [`Packed`] message could not be unpacked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnpackError {
    /// The announced plain length is above [`MAX_UNPACKED`].
    #[error("packed message of {0} bytes exceeds the limit of {MAX_UNPACKED}")]
    TooLarge(u32),
    /// The compressed bytes are not valid LZ4, or not of the announced length.
    #[error("packed message is corrupt: {0}")]
    Corrupt(String),
    /// The plain bytes are not a message (or are a packed one again).
    #[error("packed message does not hold a message: {0}")]
    Malformed(String),
}

impl Packed {
    /// Compresses a message's plain postcard encoding.
    pub fn new(plain: &[u8]) -> Self {
        Self {
            len: plain.len() as u32,
            lz4: lz4_flex::block::compress(plain),
        }
    }

    /// The plain encoding back: bounded by [`MAX_UNPACKED`] before any
    /// memory is taken, and checked to be exactly [`Packed::len`] long.
    pub fn payload(&self) -> Result<Vec<u8>, UnpackError> {
        let len = self.len as usize;
        if len > MAX_UNPACKED {
            return Err(UnpackError::TooLarge(self.len));
        }
        let mut out = vec![0u8; len];
        let n = lz4_flex::block::decompress_into(&self.lz4, &mut out)
            .map_err(|e| UnpackError::Corrupt(e.to_string()))?;
        if n != len {
            return Err(UnpackError::Corrupt(format!(
                "{n} bytes where {len} were announced"
            )));
        }
        Ok(out)
    }

    /// The message inside.
    pub fn unpack(&self) -> Result<ServerMsg, UnpackError> {
        let plain = self.payload()?;
        let mut de = postcard::Deserializer::from_bytes(&plain);
        match ServerMsg::deserialize(&mut de) {
            Ok(ServerMsg::Packed(_)) => Err(UnpackError::Malformed("packed twice".into())),
            Ok(msg) => Ok(msg),
            Err(e) => Err(UnpackError::Malformed(e.to_string())),
        }
    }
}

/// The packed form of an encoded [`ServerMsg`] frame (length prefix and
/// postcard, as [`encode_frame`] makes it): `Some` when its message is at
/// least [`PACK_FROM`] bytes and packing saves at least an eighth of it;
/// `None` when the plain frame is as good (small, or incompressible).
pub fn pack_frame(frame: &[u8]) -> Option<Vec<u8>> {
    let plain = frame.get(4..)?;
    if plain.len() < PACK_FROM || plain.len() > MAX_UNPACKED {
        return None;
    }
    let packed = encode_frame(&ServerMsg::Packed(Packed::new(plain)), usize::MAX).ok()?;
    (packed.len() <= frame.len() - frame.len() / 8).then_some(packed)
}

/// An error reported to the client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtoError {
    /// What kind of failure.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub message: String,
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

/// Error kinds of the control protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The client speaks another protocol version.
    UnsupportedVersion,
    /// The token is unknown or belongs to another network.
    InvalidToken,
    /// The token has expired.
    TokenExpired,
    /// The token has no uses left.
    TokenUsedUp,
    /// The token is bound to another app or process type.
    TokenBinding,
    /// The network does not exist.
    UnknownNetwork,
    /// The network's range has no free address.
    NetworkFull,
    /// The public key is already a member (resume instead).
    KeyInUse,
    /// The instance name is taken in the network.
    InstanceTaken,
    /// Unknown member or wrong credential.
    BadCredential,
    /// The member asked about a network that is not its own.
    Forbidden,
    /// The member was removed.
    Revoked,
    /// A frame could not be decoded, or was too large.
    Malformed,
    /// Join metadata out of bounds (empty or over-long service name or
    /// runner label, too many endpoints).
    InvalidMetadata,
    /// The keyserver is at its connection limit.
    Busy,
    /// An internal failure (store write); nothing changed.
    Internal,
    /// Another key took this member's slot (a stateless restart of the
    /// same instance, or a join with `--replace`): the membership is gone
    /// for this key. Appended (version 3).
    Replaced,
}

impl ErrorCode {
    /// Whether the code says the membership itself is gone (removed, left,
    /// expired, replaced by another key, or a credential the keyserver does
    /// not know): the only answers after which a member forgets its stored
    /// membership. Every other refusal (a version mismatch, a malformed or
    /// forbidden answer, a passing failure) leaves it to retry.
    pub fn ends_membership(self) -> bool {
        matches!(self, Self::Revoked | Self::Replaced | Self::BadCredential)
    }
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream failed.
    #[error("stream error: {0}")]
    Io(#[from] std::io::Error),
    /// The stream ended cleanly before a frame started.
    #[error("stream closed")]
    Closed,
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// The announced frame length is above the limit.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// Configured limit.
        max: usize,
    },
    /// The frame's bytes are not a valid message.
    #[error("malformed frame: {0}")]
    Decode(postcard::Error),
    /// The message could not be encoded.
    #[error("cannot encode message: {0}")]
    Encode(postcard::Error),
}

/// The version-2 join request: [`JoinRequest`] without the version-3 fields
/// (postcard reads fields in order, so the old layout needs its own type).
#[derive(Deserialize)]
struct JoinRequestV2 {
    network: NetworkId,
    token_secret: Secret,
    public_key: PublicKey,
    service: String,
    app_id: Option<AppId>,
    process_type: ProcessType,
    instance: Option<InstanceName>,
    runner: String,
    endpoints: Vec<SocketAddr>,
    ports: Vec<u16>,
    service_groups: Vec<crate::services::GroupName>,
    publish: Vec<crate::services::PublishedPort>,
}

/// The version-2 request (resume is unchanged).
#[derive(Deserialize)]
enum RequestV2 {
    Join(JoinRequestV2),
    Resume(ResumeRequest),
}

/// The version-2 hello.
#[derive(Deserialize)]
struct HelloV2 {
    version: u16,
    request: RequestV2,
}

impl From<HelloV2> for Hello {
    fn from(h: HelloV2) -> Self {
        let request = match h.request {
            RequestV2::Resume(r) => Request::Resume(r),
            RequestV2::Join(j) => Request::Join(JoinRequest {
                network: j.network,
                token_secret: j.token_secret,
                public_key: j.public_key,
                service: j.service,
                app_id: j.app_id,
                process_type: j.process_type,
                instance: j.instance,
                runner: j.runner,
                endpoints: j.endpoints,
                ports: j.ports,
                service_groups: j.service_groups,
                publish: j.publish,
                replace: false,
                ephemeral: false,
            }),
        };
        Hello {
            version: h.version,
            request,
        }
    }
}

/// Why a hello was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    /// The client speaks a version this build does not (its number is
    /// readable: it is the first field of every version's hello).
    #[error("server speaks versions {MIN_VERSION} to {VERSION}, client {0}")]
    Version(u16),
    /// The bytes are not a hello of the version they announce.
    #[error("malformed hello: {0}")]
    Malformed(String),
}

/// Reads a hello's payload of any version from [`MIN_VERSION`] to
/// [`VERSION`], as the current [`Hello`] (fields a version lacks take their
/// defaults; [`Hello::version`] keeps the client's). The version is read
/// first, so an unknown one is reported as such, not as malformed.
pub fn parse_hello(payload: &[u8]) -> Result<Hello, HelloError> {
    let (version, _) = postcard::take_from_bytes::<u16>(payload)
        .map_err(|e| HelloError::Malformed(e.to_string()))?;
    let malformed = |e: postcard::Error| HelloError::Malformed(e.to_string());
    match version {
        // Versions 3 to 5 share the hello.
        3..=VERSION => postcard::from_bytes::<Hello>(payload).map_err(malformed),
        2 => postcard::from_bytes::<HelloV2>(payload)
            .map(Hello::from)
            .map_err(malformed),
        other => Err(HelloError::Version(other)),
    }
}

/// Reads one frame's payload without decoding it (for [`parse_hello`]).
/// Not cancel-safe.
pub async fn read_payload<R>(r: &mut R, max: usize) -> Result<Vec<u8>, FrameError>
where
    R: AsyncRead + Unpin,
{
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]).await? {
            0 if got == 0 => return Err(FrameError::Closed),
            0 => return Err(FrameError::Truncated),
            n => got += n,
        }
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => FrameError::Truncated,
            _ => FrameError::Io(e),
        })?;
    Ok(payload)
}

/// Encodes `msg` as one frame (length prefix + postcard).
pub fn encode_frame<T: Serialize>(msg: &T, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut buf = postcard::to_extend(msg, vec![0u8; 4]).map_err(FrameError::Encode)?;
    let len = buf.len() - 4;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    buf[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(buf)
}

/// Decodes one frame's payload (without its length prefix).
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    postcard::from_bytes(payload).map_err(FrameError::Decode)
}

/// Reads one frame and decodes it. Not cancel-safe: drive it from one task.
pub async fn read_frame<T, R>(r: &mut R, max: usize) -> Result<T, FrameError>
where
    T: DeserializeOwned,
    R: AsyncRead + Unpin,
{
    let payload = read_payload(r, max).await?;
    decode_payload(&payload)
}

/// Encodes and writes one frame.
pub async fn write_frame<T, W>(w: &mut W, msg: &T, max: usize) -> Result<(), FrameError>
where
    T: Serialize,
    W: AsyncWrite + Unpin,
{
    let frame = encode_frame(msg, max)?;
    w.write_all(&frame).await?;
    Ok(())
}

/// SHA-256 of some bytes (certificate fingerprints, secret hashes).
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).into()
}

/// A fingerprint as lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A gateway credential's text goes back to the same credential; a join
    /// token's text is not one (and the other way round), and its Debug
    /// form never shows the secret.
    #[test]
    fn gateway_credentials_round_trip_and_are_told_from_join_tokens() {
        let g = GatewayToken {
            addrs: vec!["192.0.2.1:7443".parse().unwrap()],
            cert_sha256: [3; 32],
            secret: [4; 32],
        };
        let text = g.to_string();
        assert!(text.starts_with("istg1."));
        assert_eq!(text.parse::<GatewayToken>().unwrap(), g);
        assert_eq!(
            text.parse::<JoinToken>().unwrap_err(),
            TokenParseError::BadPrefix
        );
        assert_eq!(
            "istm1.AAAA".parse::<GatewayToken>().unwrap_err(),
            TokenParseError::BadGatewayPrefix
        );
        assert_eq!(
            "istg1.!!".parse::<GatewayToken>().unwrap_err(),
            TokenParseError::BadBase64
        );
        assert_eq!(
            "istg1.AAAA".parse::<GatewayToken>().unwrap_err(),
            TokenParseError::BadContent
        );
        assert!(!format!("{g:?}").contains("secret"));
        // The hello carrying it decodes as a current hello.
        let hello = Hello {
            version: VERSION,
            request: Request::Gateway(GatewayRequest {
                secret: [4; 32],
                join: vec![NetworkId::random()],
            }),
        };
        let bytes = postcard::to_stdvec(&hello).unwrap();
        assert_eq!(parse_hello(&bytes).unwrap(), hello);
    }

    #[test]
    fn token_round_trip_and_rejects() {
        let t = JoinToken {
            addrs: vec!["127.0.0.1:7443".parse().unwrap()],
            cert_sha256: [7; 32],
            network: NetworkId::random(),
            secret: [9; 32],
            service: Some("api ✓".into()),
            process_type: Some("worker".parse().unwrap()),
        };
        let text = t.to_string();
        assert!(text.starts_with("istm1."));
        assert_eq!(text.parse::<JoinToken>().unwrap(), t);
        assert_eq!("x".parse::<JoinToken>(), Err(TokenParseError::BadPrefix));
        assert_eq!(
            "istm1.!!".parse::<JoinToken>(),
            Err(TokenParseError::BadBase64)
        );
        assert_eq!(
            "istm1.AAAA".parse::<JoinToken>(),
            Err(TokenParseError::BadContent)
        );
        assert!(!format!("{t:?}").contains("secret"));
    }

    #[tokio::test]
    async fn frames_round_trip_and_limits() {
        let msg = ClientMsg::UpdateEndpoints(vec!["192.0.2.1:51820".parse().unwrap()]);
        let frame = encode_frame(&msg, 1024).unwrap();
        let got: ClientMsg = read_frame(&mut &frame[..], 1024).await.unwrap();
        assert_eq!(got, msg);
        // Truncated inside the payload and inside the length.
        let short = &frame[..frame.len() - 1];
        let err = read_frame::<ClientMsg, _>(&mut &short[..], 1024).await;
        assert!(matches!(err, Err(FrameError::Truncated)), "{err:?}");
        let err = read_frame::<ClientMsg, _>(&mut &frame[..2], 1024).await;
        assert!(matches!(err, Err(FrameError::Truncated)), "{err:?}");
        let err = read_frame::<ClientMsg, _>(&mut &[][..], 1024).await;
        assert!(matches!(err, Err(FrameError::Closed)), "{err:?}");
        // Oversized announcement, rejected before reading the body.
        let big = (1u32 << 30).to_be_bytes();
        let err = read_frame::<ClientMsg, _>(&mut &big[..], 1024).await;
        assert!(matches!(err, Err(FrameError::TooLarge { .. })), "{err:?}");
        // Garbage payload.
        let junk = [0, 0, 0, 3, 0xff, 0xff, 0xff];
        let err = read_frame::<ClientMsg, _>(&mut &junk[..], 1024).await;
        assert!(matches!(err, Err(FrameError::Decode(_))), "{err:?}");
        assert!(matches!(
            encode_frame(&msg, 2),
            Err(FrameError::TooLarge { .. })
        ));
    }

    /// A version-2 member's hello (no slot fields) is still read, as a
    /// join that neither replaces nor is ephemeral; an unknown version is
    /// reported by number, garbage as malformed.
    #[test]
    fn hellos_of_every_supported_version_parse() {
        #[derive(Serialize)]
        struct JoinV2<'a> {
            network: NetworkId,
            token_secret: Secret,
            public_key: PublicKey,
            service: &'a str,
            app_id: Option<AppId>,
            process_type: ProcessType,
            instance: Option<InstanceName>,
            runner: &'a str,
            endpoints: Vec<SocketAddr>,
            ports: Vec<u16>,
            service_groups: Vec<crate::services::GroupName>,
            publish: Vec<crate::services::PublishedPort>,
        }
        #[derive(Serialize)]
        enum ReqV2<'a> {
            Join(JoinV2<'a>),
        }
        #[derive(Serialize)]
        struct HelloV2Out<'a> {
            version: u16,
            request: ReqV2<'a>,
        }
        let network = NetworkId::random();
        let old = HelloV2Out {
            version: 2,
            request: ReqV2::Join(JoinV2 {
                network,
                token_secret: [1; 32],
                public_key: PublicKey::from_bytes([2; 32]),
                service: "api",
                app_id: None,
                process_type: ProcessType::default(),
                instance: Some("api-web-1".parse().unwrap()),
                runner: "r1",
                endpoints: vec![],
                ports: vec![80],
                service_groups: vec![],
                publish: vec![],
            }),
        };
        let bytes = postcard::to_stdvec(&old).unwrap();
        let hello = parse_hello(&bytes).unwrap();
        assert_eq!(hello.version, 2);
        let Request::Join(j) = hello.request else {
            panic!("not a join")
        };
        assert_eq!((j.service.as_str(), j.ports.as_slice()), ("api", &[80][..]));
        assert!(!j.replace && !j.ephemeral);
        // The current version round-trips with its new fields.
        let mut now = Hello {
            version: VERSION,
            request: Request::Join(j),
        };
        if let Request::Join(j) = &mut now.request {
            j.replace = true;
            j.ephemeral = true;
        }
        let bytes = postcard::to_stdvec(&now).unwrap();
        assert_eq!(parse_hello(&bytes).unwrap(), now);
        // Every version from 3 on shares this hello: each is read.
        for v in 3..=VERSION {
            let older = Hello {
                version: v,
                ..now.clone()
            };
            let bytes = postcard::to_stdvec(&older).unwrap();
            assert_eq!(parse_hello(&bytes).unwrap(), older, "version {v}");
        }
        // A future version is named, not called malformed.
        let mut future = bytes.clone();
        future[0] = 9;
        assert_eq!(parse_hello(&future), Err(HelloError::Version(9)));
        assert!(matches!(parse_hello(&[]), Err(HelloError::Malformed(_))));
        assert!(matches!(
            parse_hello(&bytes[..bytes.len() - 3]),
            Err(HelloError::Malformed(_))
        ));
    }

    /// A snapshot of `n` members, as a keyserver sends it.
    fn big_snapshot(n: usize) -> ServerMsg {
        let mut map = crate::netmap::tests::empty_map();
        for i in 0..n {
            let service = format!("svc{}", i % 10);
            let mut m = crate::netmap::tests::member(
                &format!("{service}-web-{i}"),
                &service,
                "web",
                i as u32,
                (i % 250) as u8,
            );
            m.endpoints = vec![SocketAddr::from(([192, 0, 2, 1], 51820))];
            map.members.insert(m.public_key, m);
        }
        map.generation = n as u64;
        ServerMsg::Snapshot(map)
    }

    #[test]
    fn a_large_snapshot_packs_to_under_sixty_percent_and_decodes_to_the_same_message() {
        let msg = big_snapshot(500);
        let plain = encode_frame(&msg, usize::MAX).unwrap();
        let packed = pack_frame(&plain).expect("a 500-member snapshot packs");
        // Public keys do not compress (32 of each member's ~110 bytes).
        assert!(
            packed.len() * 5 < plain.len() * 3,
            "packed {} of plain {}",
            packed.len(),
            plain.len()
        );
        // Decoding unpacks: the reader gets the snapshot, not `Packed`.
        let got: ServerMsg = decode_payload(&packed[4..]).unwrap();
        assert_eq!(got, msg);
        // As the frame reader reads it too.
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let read: ServerMsg = rt
            .block_on(read_frame(&mut &packed[..], DEFAULT_MAX_FRAME))
            .unwrap();
        assert_eq!(read, msg);
        // The variant on the wire is the appended one (members of version 5
        // and older cannot read it and are never sent it).
        let (variant, _) = postcard::take_from_bytes::<u32>(&packed[4..]).unwrap();
        assert_eq!(variant, 9);
    }

    #[test]
    fn small_or_incompressible_messages_stay_plain() {
        let small = encode_frame(&ServerMsg::HeartbeatAck { generation: 7 }, 1024).unwrap();
        assert_eq!(pack_frame(&small), None);
        // Random bytes do not compress: the plain frame is as good.
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                // xorshift: bytes with no repeats LZ4 could use.
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let error = ServerMsg::Error(ProtoError {
            code: ErrorCode::Internal,
            message: URL_SAFE_NO_PAD.encode(&noise),
        });
        let frame = encode_frame(&error, usize::MAX).unwrap();
        assert_eq!(pack_frame(&frame), None);
        assert_eq!(pack_frame(&[]), None);
    }

    #[test]
    fn bad_packed_messages_are_refused_without_panic_or_large_allocation() {
        let decode = |p: Packed| {
            let frame = encode_frame(&ServerMsg::Packed(p), usize::MAX).unwrap();
            decode_payload::<ServerMsg>(&frame[4..])
        };
        let plain = postcard::to_allocvec(&big_snapshot(50)).unwrap();
        let good = Packed::new(&plain);
        // Announced length over the limit: refused before allocating.
        let huge = Packed {
            len: u32::MAX,
            ..good.clone()
        };
        assert_eq!(huge.payload(), Err(UnpackError::TooLarge(u32::MAX)));
        assert!(decode(huge).is_err());
        // Announced length shorter or longer than the data.
        for len in [good.len - 1, good.len + 1, 0] {
            let p = Packed {
                len,
                ..good.clone()
            };
            assert!(matches!(p.payload(), Err(UnpackError::Corrupt(_))), "{len}");
            assert!(decode(p).is_err());
        }
        // Corrupt LZ4.
        let mut corrupt = good.clone();
        corrupt.lz4.truncate(corrupt.lz4.len() / 2);
        assert!(decode(corrupt).is_err());
        // Well-formed LZ4 of something that is not a message.
        assert!(matches!(
            Packed::new(&[0xff; 2000]).unpack(),
            Err(UnpackError::Malformed(_))
        ));
        // A packed message inside a packed message.
        let twice = ServerMsg::Packed(good.clone());
        let inner = postcard::to_allocvec(&twice).unwrap();
        assert_eq!(
            Packed::new(&inner).unpack(),
            Err(UnpackError::Malformed("packed twice".into()))
        );
        // The good one still decodes.
        let want: ServerMsg = postcard::from_bytes(&plain).unwrap();
        assert_eq!(decode(good).unwrap(), want);
    }

    proptest::proptest! {
        /// Arbitrary bytes from a peer: every message type decodes to a value
        /// or an error, never a panic; the frame reader too.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = decode_payload::<Hello>(&bytes);
            let _ = parse_hello(&bytes);
            let _ = decode_payload::<ClientMsg>(&bytes);
            let _ = decode_payload::<ServerMsg>(&bytes);
            // The same bytes as a packed message's compressed data.
            let _ = Packed { len: 4096, lz4: bytes.clone() }.unpack();
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let _ = rt.block_on(read_frame::<Hello, _>(&mut &bytes[..], 256));
        }

        /// Arbitrary token text: parsed or refused, never a panic; accepted
        /// tokens round-trip.
        #[test]
        fn arbitrary_token_text_never_panics(body in "[A-Za-z0-9_\\-]{0,200}") {
            let text = format!("istm1.{body}");
            if let Ok(t) = text.parse::<JoinToken>() {
                proptest::prop_assert_eq!(t.to_string().parse::<JoinToken>().unwrap(), t);
            }
        }
    }
}
