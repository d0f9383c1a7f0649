//! The relay's wire protocol, shared by members and relays: tickets and the
//! frames on the relay's UDP socket. Pure; no I/O.
//!
//! ## Tickets
//!
//! A member gets a [`Ticket`] from the keyserver over its authenticated
//! control stream ([`crate::proto::ClientMsg::GetRelay`]): its network, key
//! and private address, an expiry, and an HMAC-SHA256 tag under the relay
//! secret that the keyserver and every relay share. A relay checks the tag
//! and the expiry, nothing else: it needs no store, so it can run as its
//! own process. The ticket decides the network a member's frames may reach.
//!
//! ## Frames (UDP; every frame starts with [`MAGIC`] and a type byte)
//!
//! ```text
//! register   F2 01 00 00 | len u16 | ticket                member -> relay
//! registered F2 02 00 00 | token [8] | keepalive u16 | observed addr
//! send       F2 03 00 00 | dst ip [4] | token [8] | packet  member -> relay
//! deliver    F2 04 00 00 | src ip [4] | packet              relay -> member
//! ```
//!
//! `send` carries 16 bytes of header and `deliver` 8, so a relayed
//! WireGuard packet of a 1420-byte MTU still fits a 1500-byte IPv4 path.
//! Members address each other by private IP; the relay resolves it inside
//! the sender's network only. The token (random per registration) ties each
//! `send` to the registration it came with. The packet is whatever the member
//! would have sent directly: an encrypted WireGuard message or a probe.

use std::net::{Ipv4Addr, SocketAddr};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::ids::NetworkId;
use crate::keys::PublicKey;

/// First byte of every relay frame (never a WireGuard type, never STUN,
/// never a probe).
pub const MAGIC: u8 = 0xF2;
/// Header of a `send` frame.
pub const SEND_HEADER: usize = 16;
/// Header of a `deliver` frame.
pub const DELIVER_HEADER: usize = 8;
/// Longest ticket accepted.
pub const MAX_TICKET: usize = 512;

const REGISTER: u8 = 1;
const REGISTERED: u8 = 2;
const SEND: u8 = 3;
const DELIVER: u8 = 4;

/// What a ticket vouches for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketBody {
    /// The member's network: the only one its frames can reach.
    pub network: NetworkId,
    /// The member's WireGuard key (for logs and metrics).
    pub public_key: PublicKey,
    /// The member's private address: how peers address it at the relay.
    pub ip: Ipv4Addr,
    /// Unix time (seconds) after which the ticket is refused.
    pub expires: u64,
}

/// A signed ticket: its body and the tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    /// What is vouched for.
    pub body: TicketBody,
    /// HMAC-SHA256 of the body's postcard bytes under the relay secret.
    pub tag: [u8; 32],
}

/// Why a ticket was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    /// The bytes are not a ticket.
    #[error("malformed ticket")]
    Malformed,
    /// The tag does not check under this relay's secret.
    #[error("ticket not signed by this deployment's keyserver")]
    BadTag,
    /// The ticket has expired.
    #[error("ticket expired")]
    Expired,
}

fn body_tag(secret: &[u8; 32], body: &TicketBody) -> [u8; 32] {
    let bytes = postcard::to_stdvec(body).unwrap_or_default();
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("any key length");
    mac.update(b"istm relay ticket v1");
    mac.update(&bytes);
    mac.finalize().into_bytes().into()
}

impl Ticket {
    /// Signs `body` with the relay secret.
    pub fn sign(secret: &[u8; 32], body: TicketBody) -> Self {
        let tag = body_tag(secret, &body);
        Self { body, tag }
    }

    /// The encoded form a member presents.
    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Decodes and checks a presented ticket at Unix time `now`.
    pub fn verify(bytes: &[u8], secret: &[u8; 32], now: u64) -> Result<Self, TicketError> {
        let t: Ticket = postcard::from_bytes(bytes).map_err(|_| TicketError::Malformed)?;
        let want = body_tag(secret, &t.body);
        if want.iter().zip(&t.tag).fold(0u8, |a, (x, y)| a | (x ^ y)) != 0 {
            return Err(TicketError::BadTag);
        }
        if t.body.expires < now {
            return Err(TicketError::Expired);
        }
        Ok(t)
    }
}

/// A frame on the relay's UDP socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A member (re)registers its current address with its ticket.
    Register(&'a [u8]),
    /// The relay took the registration.
    Registered {
        /// To put in every `send`.
        token: [u8; 8],
        /// Re-register at least this often (seconds).
        keepalive: u16,
        /// The member's address as the relay saw it.
        observed: SocketAddr,
    },
    /// A member sends `packet` to the member of its network at `dst`.
    Send {
        /// The destination's private address.
        dst: Ipv4Addr,
        /// The registration's token.
        token: [u8; 8],
        /// The packet.
        packet: &'a [u8],
    },
    /// The relay delivers `packet` from the member at `src`.
    Deliver {
        /// The sender's private address.
        src: Ipv4Addr,
        /// The packet.
        packet: &'a [u8],
    },
}

/// Whether a datagram is a relay frame (by its first bytes).
pub fn is_relay(dgram: &[u8]) -> bool {
    dgram.len() >= 4 && dgram[0] == MAGIC && dgram[2] == 0 && dgram[3] == 0
}

/// Parses a relay frame; `None` for anything else.
pub fn parse(d: &[u8]) -> Option<Frame<'_>> {
    if !is_relay(d) {
        return None;
    }
    let ip = |at: usize| -> Option<Ipv4Addr> {
        let b: [u8; 4] = d.get(at..at + 4)?.try_into().ok()?;
        Some(Ipv4Addr::from(b))
    };
    match d[1] {
        REGISTER => {
            let len = usize::from(u16::from_be_bytes([*d.get(4)?, *d.get(5)?]));
            let t = d.get(6..6 + len)?;
            (len <= MAX_TICKET && d.len() == 6 + len).then_some(Frame::Register(t))
        }
        REGISTERED => {
            let token = d.get(4..12)?.try_into().ok()?;
            let keepalive = u16::from_be_bytes([*d.get(12)?, *d.get(13)?]);
            let mut rest = d.get(14..)?;
            let observed = super::take_addr(&mut rest)?;
            Some(Frame::Registered {
                token,
                keepalive,
                observed,
            })
        }
        SEND => Some(Frame::Send {
            dst: ip(4)?,
            token: d.get(8..16)?.try_into().ok()?,
            packet: d.get(SEND_HEADER..)?,
        }),
        DELIVER => Some(Frame::Deliver {
            src: ip(4)?,
            packet: d.get(DELIVER_HEADER..)?,
        }),
        _ => None,
    }
}

/// A `register` frame.
pub fn register(ticket: &[u8]) -> Vec<u8> {
    let mut out = vec![MAGIC, REGISTER, 0, 0];
    out.extend_from_slice(&(ticket.len() as u16).to_be_bytes());
    out.extend_from_slice(ticket);
    out
}

/// A `registered` answer.
pub fn registered(token: [u8; 8], keepalive: u16, observed: SocketAddr) -> Vec<u8> {
    let mut out = vec![MAGIC, REGISTERED, 0, 0];
    out.extend_from_slice(&token);
    out.extend_from_slice(&keepalive.to_be_bytes());
    super::put_addr(&mut out, observed);
    out
}

/// Writes a `send` header for `dst` into `out[..SEND_HEADER]`.
pub fn send_header(out: &mut [u8], dst: Ipv4Addr, token: [u8; 8]) {
    out[..4].copy_from_slice(&[MAGIC, SEND, 0, 0]);
    out[4..8].copy_from_slice(&dst.octets());
    out[8..16].copy_from_slice(&token);
}

/// Writes a `deliver` header for `src` into `out[..DELIVER_HEADER]`.
pub fn deliver_header(out: &mut [u8], src: Ipv4Addr) {
    out[..4].copy_from_slice(&[MAGIC, DELIVER, 0, 0]);
    out[4..8].copy_from_slice(&src.octets());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(expires: u64) -> TicketBody {
        TicketBody {
            network: NetworkId::random(),
            public_key: crate::keys::PrivateKey::generate().public_key(),
            ip: Ipv4Addr::new(10, 240, 0, 3),
            expires,
        }
    }

    #[test]
    fn tickets_verify_only_with_the_secret_and_in_time() {
        let t = Ticket::sign(&[1; 32], body(100));
        let bytes = t.to_bytes();
        assert_eq!(Ticket::verify(&bytes, &[1; 32], 50), Ok(t.clone()));
        assert_eq!(
            Ticket::verify(&bytes, &[2; 32], 50),
            Err(TicketError::BadTag)
        );
        assert_eq!(
            Ticket::verify(&bytes, &[1; 32], 101),
            Err(TicketError::Expired)
        );
        // A member cannot move its ticket to another network or address.
        let mut moved = t;
        moved.body.ip = Ipv4Addr::new(10, 240, 0, 4);
        assert_eq!(
            Ticket::verify(&moved.to_bytes(), &[1; 32], 50),
            Err(TicketError::BadTag)
        );
        assert_eq!(
            Ticket::verify(b"junk", &[1; 32], 0),
            Err(TicketError::Malformed)
        );
    }

    #[test]
    fn frames_round_trip() {
        let reg = register(b"ticket");
        assert_eq!(parse(&reg), Some(Frame::Register(b"ticket")));
        let obs: SocketAddr = "203.0.113.4:4000".parse().unwrap();
        assert_eq!(
            parse(&registered([3; 8], 15, obs)),
            Some(Frame::Registered {
                token: [3; 8],
                keepalive: 15,
                observed: obs
            })
        );
        let mut send = vec![0u8; SEND_HEADER + 3];
        send_header(&mut send, Ipv4Addr::new(10, 240, 0, 9), [4; 8]);
        send[SEND_HEADER..].copy_from_slice(b"abc");
        assert_eq!(
            parse(&send),
            Some(Frame::Send {
                dst: Ipv4Addr::new(10, 240, 0, 9),
                token: [4; 8],
                packet: b"abc"
            })
        );
        let mut del = vec![0u8; DELIVER_HEADER + 1];
        deliver_header(&mut del, Ipv4Addr::new(10, 240, 0, 1));
        assert!(matches!(parse(&del), Some(Frame::Deliver { .. })));
        // Not relay frames: WireGuard, STUN, probes.
        assert_eq!(parse(&[1, 0, 0, 0, 5]), None);
        assert_eq!(parse(&crate::nat::stun::binding_request(&[0; 12])), None);
        assert_eq!(parse(&crate::nat::disco::MAGIC), None);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_frames_never_panic(mut bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..100), t in 1u8..6) {
            let _ = parse(&bytes);
            if bytes.len() >= 4 {
                bytes[0] = MAGIC; bytes[1] = t; bytes[2] = 0; bytes[3] = 0;
                let _ = parse(&bytes);
            }
            let _ = Ticket::verify(&bytes, &[0; 32], 0);
        }
    }
}
