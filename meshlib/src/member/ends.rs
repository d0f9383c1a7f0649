//! How a membership's session ends, and why it retries: only a
//! [`Revocation`] ends a membership; every other failure is a [`Setback`]
//! (see the parent module's "Ends").

use crate::proto::{self, ErrorCode, ProtoError};

/// Why a membership's session ended for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// [`super::MemberCore::shutdown`]: the keyserver marked the member offline
    /// (`confirmed`), or was not reachable and will notice the silence.
    Offline {
        /// The keyserver confirmed.
        confirmed: bool,
    },
    /// [`super::MemberCore::leave`] confirmed: the membership is released.
    Left,
    /// [`super::MemberCore::leave`] could not reach the keyserver in time: the
    /// member will expire there instead. Why the last try failed.
    LeaveUnconfirmed(Setback),
    /// The keyserver ended the membership (removed, replaced by another
    /// key, or its credential unknown): forget it. The only end after
    /// which a stored membership is forgotten.
    Revoked(Revoked),
    /// A first join was refused for good: the token or the metadata is the
    /// problem and asking again would get the same answer (see
    /// [`join_refusal_is_final`]). No membership was made.
    Refused(ProtoError),
    /// [`super::MemberConfig::reconnect`] is off (a one-shot session) and the
    /// connection failed, or the keyserver refused for a reason that does
    /// not end a membership. A membership, if any, is kept.
    Lost(Setback),
}

/// Why the keyserver ended a membership: the answers
/// [`ErrorCode::ends_membership`] names, and the only reasons a member
/// forgets its stored membership.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Revocation {
    /// Removed at the keyserver (`keyserver member remove`, its network
    /// deleted, or expired or left while this session was open):
    /// [`ErrorCode::Revoked`].
    Removed,
    /// Another key took this member's slot (a stateless restart of the
    /// same instance, or a join with `--replace`): [`ErrorCode::Replaced`].
    Replaced,
    /// A resume's credential is unknown to the keyserver: the member
    /// expired, left or was removed while it was away
    /// ([`ErrorCode::BadCredential`]).
    UnknownCredential,
}

impl Revocation {
    /// The revocation a refusal means, if its code ends a membership.
    pub fn from_code(code: ErrorCode) -> Option<Self> {
        match code {
            ErrorCode::Revoked => Some(Self::Removed),
            ErrorCode::Replaced => Some(Self::Replaced),
            ErrorCode::BadCredential => Some(Self::UnknownCredential),
            _ => None,
        }
    }

    /// The wire code of this revocation.
    pub fn code(self) -> ErrorCode {
        match self {
            Self::Removed => ErrorCode::Revoked,
            Self::Replaced => ErrorCode::Replaced,
            Self::UnknownCredential => ErrorCode::BadCredential,
        }
    }

    /// A short stable name (`removed`, `replaced`, `unknown-credential`),
    /// for logs and status.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Removed => "removed",
            Self::Replaced => "replaced",
            Self::UnknownCredential => "unknown-credential",
        }
    }
}

impl std::fmt::Display for Revocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Removed => "removed from the network",
            Self::Replaced => "replaced by another key that took this member's slot",
            Self::UnknownCredential => {
                "the keyserver does not know this membership (expired, left or removed while away)"
            }
        })
    }
}

/// A membership the keyserver ended: why, and in its words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// Why.
    pub reason: Revocation,
    /// The keyserver's message (from the network: escape it to display).
    pub message: String,
}

impl Revoked {
    /// The refusal this revocation came as.
    pub fn to_proto_error(&self) -> ProtoError {
        ProtoError {
            code: self.reason.code(),
            message: self.message.clone(),
        }
    }
}

impl std::fmt::Display for Revoked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (the keyserver said: {})", self.reason, self.message)
    }
}

/// Why a connection failed or was refused without ending the membership:
/// the member keeps its membership and retries with backoff (a one-shot
/// session ends with [`End::Lost`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Setback {
    /// No connection could be opened, or the open one was lost, closed or
    /// went silent.
    Unreachable(String),
    /// The keyserver refused with a code that does not end a membership:
    /// another protocol version, a malformed or forbidden answer, busy, an
    /// internal failure, or (on a resume) anything but a revocation.
    Refused(ProtoError),
    /// The keyserver broke the protocol (a message out of order, a
    /// snapshot of another network).
    Protocol(String),
}

impl std::fmt::Display for Setback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unreachable(why) => f.write_str(why),
            Self::Refused(e) if e.code == ErrorCode::UnsupportedVersion => write!(
                f,
                "speaks another protocol version (this member speaks {}): {}",
                proto::VERSION,
                e.message
            ),
            Self::Refused(e) => write!(f, "refused ({:?}): {}", e.code, e.message),
            Self::Protocol(why) => write!(f, "protocol violation: {why}"),
        }
    }
}

/// Whether the keyserver's refusal of a first join (no membership yet) is
/// final: the token or the metadata is the problem, and asking again would
/// get the same answer. Another protocol version, a malformed or forbidden
/// answer, and a busy or failing keyserver are retried with the same key.
pub fn join_refusal_is_final(code: ErrorCode) -> bool {
    match code {
        ErrorCode::InvalidToken
        | ErrorCode::TokenExpired
        | ErrorCode::TokenUsedUp
        | ErrorCode::TokenBinding
        | ErrorCode::UnknownNetwork
        | ErrorCode::NetworkFull
        | ErrorCode::InstanceTaken
        | ErrorCode::KeyInUse
        | ErrorCode::InvalidMetadata => true,
        // Answers about a membership, which a join does not have yet: the
        // keyserver is confused, asking again would not help.
        ErrorCode::BadCredential | ErrorCode::Revoked | ErrorCode::Replaced => true,
        ErrorCode::UnsupportedVersion
        | ErrorCode::Malformed
        | ErrorCode::Forbidden
        | ErrorCode::Busy
        | ErrorCode::Internal => false,
    }
}
