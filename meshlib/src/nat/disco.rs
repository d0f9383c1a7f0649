//! Path probes between two members ("disco", after Tailscale's): pings,
//! pongs and call-me-maybe messages carried on the WireGuard socket, next to
//! WireGuard and STUN, directly or through the relay. Pure; no I/O.
//!
//! Every message names its sender's WireGuard public key and ends with a
//! 16-byte HMAC-SHA256 tag under a key only the two members can compute:
//! SHA-256 over a label and the X25519 shared secret of their static keys.
//! A receiver answers only a sender that is one of its peers and whose tag
//! checks, so a key that is not a peer (another network's member included)
//! gets no answer at all.
//!
//! ```text
//! magic  [4]  F1 'I' 'S' 'D'   (never a WireGuard type 1-4, never STUN)
//! sender [32] WireGuard public key
//! type   [1]  1 ping, 2 pong, 3 call-me-maybe
//! tx     [12] transaction id (a pong repeats its ping's)
//! body        pong: the ping's source address; call-me-maybe: candidates
//! tag    [16] HMAC-SHA256(key, everything before), truncated
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::keys::{PrivateKey, PublicKey};

/// First bytes of every probe message.
pub const MAGIC: [u8; 4] = [0xF1, b'I', b'S', b'D'];
/// Tag length.
const TAG: usize = 16;
/// Header: magic, sender, type, transaction id.
const HEADER: usize = 4 + 32 + 1 + 12;
/// Most candidates one call-me-maybe carries.
pub const MAX_CANDIDATES: usize = 16;

/// A transaction id.
pub type TxId = [u8; 12];

/// The key two members share for their probes.
#[derive(Clone, PartialEq, Eq)]
pub struct PairKey([u8; 32]);

impl std::fmt::Debug for PairKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PairKey(..)")
    }
}

impl PairKey {
    /// The key between `own` and `peer` (the same on both sides).
    pub fn derive(own: &PrivateKey, peer: &PublicKey) -> Self {
        Self::from_dalek(&own.to_dalek(), peer)
    }

    /// The same from the `x25519-dalek` secret the engine holds.
    pub fn from_dalek(own: &x25519_dalek::StaticSecret, peer: &PublicKey) -> Self {
        let shared = own.diffie_hellman(&peer.to_dalek());
        let mut h = Sha256::new();
        h.update(b"istm disco v1");
        h.update(shared.as_bytes());
        Self(h.finalize().into())
    }

    fn tag(&self, bytes: &[u8]) -> [u8; TAG] {
        // HMAC accepts keys of any length.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("any key length");
        mac.update(bytes);
        let full = mac.finalize().into_bytes();
        let mut out = [0u8; TAG];
        out.copy_from_slice(&full[..TAG]);
        out
    }
}

/// A probe message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Are you there on this path? Answer with a pong to where it came from.
    Ping(TxId),
    /// Answer to the ping `tx`, which arrived from `seen` (the sender's
    /// address as the answerer saw it: a peer-reflexive candidate).
    Pong {
        /// The ping's transaction id.
        tx: TxId,
        /// The ping's source address.
        seen: SocketAddr,
    },
    /// I am probing you now on these candidates: probe me back, so that
    /// both NATs open at about the same time.
    CallMeMaybe {
        /// Message id (for logs; never answered).
        tx: TxId,
        /// The sender's candidates.
        candidates: Vec<SocketAddr>,
    },
}

/// Whether a datagram is a probe message (by its magic).
pub fn is_disco(dgram: &[u8]) -> bool {
    dgram.len() >= HEADER + TAG && dgram[..4] == MAGIC
}

/// The claimed sender of a probe message (not yet authenticated).
pub fn sender(dgram: &[u8]) -> Option<PublicKey> {
    if !is_disco(dgram) {
        return None;
    }
    let b: [u8; 32] = dgram[4..36].try_into().ok()?;
    Some(PublicKey::from_bytes(b))
}

/// Encodes `msg` from `from` under `key`.
pub fn encode(msg: &Message, from: &PublicKey, key: &PairKey) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + 64 + TAG);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(from.as_bytes());
    match msg {
        Message::Ping(tx) => {
            out.push(1);
            out.extend_from_slice(tx);
        }
        Message::Pong { tx, seen } => {
            out.push(2);
            out.extend_from_slice(tx);
            put_addr(&mut out, *seen);
        }
        Message::CallMeMaybe { tx, candidates } => {
            out.push(3);
            out.extend_from_slice(tx);
            let list = &candidates[..candidates.len().min(MAX_CANDIDATES)];
            out.push(list.len() as u8);
            for c in list {
                put_addr(&mut out, *c);
            }
        }
    }
    let tag = key.tag(&out);
    out.extend_from_slice(&tag);
    out
}

/// Checks the tag under `key` and decodes; `None` for anything forged,
/// truncated or unknown.
pub fn open(dgram: &[u8], key: &PairKey) -> Option<Message> {
    if !is_disco(dgram) {
        return None;
    }
    let (body, tag) = dgram.split_at(dgram.len() - TAG);
    let want = key.tag(body);
    // Constant time: the tag is a secret until it matches.
    if want.iter().zip(tag).fold(0u8, |acc, (a, b)| acc | (a ^ b)) != 0 {
        return None;
    }
    let tx: TxId = body[37..49].try_into().ok()?;
    let mut rest = &body[HEADER..];
    match body[36] {
        1 if rest.is_empty() => Some(Message::Ping(tx)),
        2 => {
            let seen = take_addr(&mut rest)?;
            rest.is_empty().then_some(Message::Pong { tx, seen })
        }
        3 => {
            let (&n, tail) = rest.split_first()?;
            rest = tail;
            let n = usize::from(n).min(MAX_CANDIDATES);
            let candidates = (0..n)
                .map(|_| take_addr(&mut rest))
                .collect::<Option<Vec<_>>>()?;
            rest.is_empty()
                .then_some(Message::CallMeMaybe { tx, candidates })
        }
        _ => None,
    }
}

/// Appends an address: family (4 or 6), address bytes, port (big-endian).
pub(crate) fn put_addr(out: &mut Vec<u8>, a: SocketAddr) {
    match a.ip().to_canonical() {
        IpAddr::V4(v4) => {
            out.push(4);
            out.extend_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            out.push(6);
            out.extend_from_slice(&v6.octets());
        }
    }
    out.extend_from_slice(&a.port().to_be_bytes());
}

/// Takes an address written by [`put_addr`] off the front of `rest`.
pub(crate) fn take_addr(rest: &mut &[u8]) -> Option<SocketAddr> {
    let (&family, tail) = rest.split_first()?;
    let len = match family {
        4 => 4,
        6 => 16,
        _ => return None,
    };
    let ip_bytes = tail.get(..len)?;
    let port = tail.get(len..len + 2)?;
    let ip = if len == 4 {
        IpAddr::V4(Ipv4Addr::new(
            ip_bytes[0],
            ip_bytes[1],
            ip_bytes[2],
            ip_bytes[3],
        ))
    } else {
        let b: [u8; 16] = ip_bytes.try_into().ok()?;
        IpAddr::V6(Ipv6Addr::from(b))
    };
    *rest = &tail[len + 2..];
    Some(SocketAddr::new(ip, u16::from_be_bytes([port[0], port[1]])))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (PrivateKey, PrivateKey, PairKey) {
        let (a, b) = (PrivateKey::generate(), PrivateKey::generate());
        let k = PairKey::derive(&a, &b.public_key());
        assert_eq!(k, PairKey::derive(&b, &a.public_key()), "symmetric");
        (a, b, k)
    }

    #[test]
    fn messages_round_trip_and_name_the_sender() {
        let (a, _, k) = pair();
        let msgs = [
            Message::Ping([1; 12]),
            Message::Pong {
                tx: [2; 12],
                seen: "198.51.100.7:40000".parse().unwrap(),
            },
            Message::CallMeMaybe {
                tx: [3; 12],
                candidates: vec![
                    "192.0.2.1:51820".parse().unwrap(),
                    "[2001:db8::1]:5".parse().unwrap(),
                ],
            },
        ];
        for m in msgs {
            let bytes = encode(&m, &a.public_key(), &k);
            assert!(is_disco(&bytes));
            assert!(!crate::nat::stun::is_stun(&bytes));
            assert_eq!(sender(&bytes), Some(a.public_key()));
            assert_eq!(open(&bytes, &k), Some(m));
        }
    }

    #[test]
    fn a_third_key_can_neither_forge_nor_read_as_valid() {
        let (a, b, k) = pair();
        let mallory = PrivateKey::generate();
        // Mallory claims to be `a` but only has her own pair key with `b`.
        let forged_key = PairKey::derive(&mallory, &b.public_key());
        let forged = encode(&Message::Ping([9; 12]), &a.public_key(), &forged_key);
        assert_eq!(open(&forged, &k), None);
        // Any flipped bit breaks the tag.
        let good = encode(&Message::Ping([9; 12]), &a.public_key(), &k);
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 1;
            assert_eq!(open(&bad, &k), None, "byte {i}");
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(mut bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let k = PairKey([5; 32]);
            let _ = open(&bytes, &k);
            if bytes.len() >= HEADER + TAG {
                bytes[..4].copy_from_slice(&MAGIC);
                let n = bytes.len() - TAG;
                let tag = k.tag(&bytes[..n]);
                bytes[n..].copy_from_slice(&tag);
                let _ = open(&bytes, &k);
            }
        }
    }
}
