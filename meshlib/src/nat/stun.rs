//! STUN binding requests and responses (RFC 8489, compatible with RFC 5389),
//! only what finding a server-reflexive address needs: the request a member
//! sends from its WireGuard socket, the answer a server gives, and telling
//! STUN apart from the other messages on that socket. Pure; no I/O.
//!
//! A STUN message starts with two zero bits, a 14-bit type, a 16-bit length
//! (a multiple of 4) and the magic cookie `0x2112A442`; WireGuard messages
//! start with a little-endian type 1–4 followed by three zero bytes, so the
//! two never collide (a binding success response starts `01 01`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The magic cookie of RFC 5389/8489.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Binding request message type.
const BINDING_REQUEST: u16 = 0x0001;
/// Binding success response message type.
const BINDING_SUCCESS: u16 = 0x0101;
/// XOR-MAPPED-ADDRESS attribute.
const ATTR_XOR_MAPPED: u16 = 0x0020;
/// MAPPED-ADDRESS attribute (RFC 3489 servers).
const ATTR_MAPPED: u16 = 0x0001;
/// Length of the fixed header.
pub const HEADER_LEN: usize = 20;

/// A 96-bit transaction id.
pub type TxId = [u8; 12];

/// Whether `msg` has the shape of a STUN message (header bits, cookie,
/// length matching the datagram).
pub fn is_stun(msg: &[u8]) -> bool {
    msg.len() >= HEADER_LEN
        && msg[0] & 0xC0 == 0
        && msg[4..8] == MAGIC_COOKIE.to_be_bytes()
        && usize::from(u16::from_be_bytes([msg[2], msg[3]])) + HEADER_LEN == msg.len()
}

/// A binding request with transaction id `tx` (no attributes).
pub fn binding_request(tx: &TxId) -> [u8; HEADER_LEN] {
    let mut out = [0u8; HEADER_LEN];
    out[..2].copy_from_slice(&BINDING_REQUEST.to_be_bytes());
    out[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    out[8..].copy_from_slice(tx);
    out
}

/// The transaction id of a binding request, if `msg` is one.
pub fn parse_request(msg: &[u8]) -> Option<TxId> {
    if !is_stun(msg) || u16::from_be_bytes([msg[0], msg[1]]) != BINDING_REQUEST {
        return None;
    }
    msg[8..20].try_into().ok()
}

/// A binding success response telling the requester `mapped`, its address
/// as the server saw it (XOR-MAPPED-ADDRESS).
pub fn binding_response(tx: &TxId, mapped: SocketAddr) -> Vec<u8> {
    let mapped = SocketAddr::new(mapped.ip().to_canonical(), mapped.port());
    let (family, ip): (u8, Vec<u8>) = match mapped.ip() {
        IpAddr::V4(v4) => (1, v4.octets().to_vec()),
        IpAddr::V6(v6) => (2, v6.octets().to_vec()),
    };
    let mut key = MAGIC_COOKIE.to_be_bytes().to_vec();
    key.extend_from_slice(tx);
    let port = mapped.port() ^ (MAGIC_COOKIE >> 16) as u16;
    let mut value = vec![0, family];
    value.extend_from_slice(&port.to_be_bytes());
    value.extend(ip.iter().zip(&key).map(|(b, k)| b ^ k));
    let mut out = Vec::with_capacity(HEADER_LEN + 4 + value.len());
    out.extend_from_slice(&BINDING_SUCCESS.to_be_bytes());
    out.extend_from_slice(&((4 + value.len()) as u16).to_be_bytes());
    out.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
    out.extend_from_slice(tx);
    out.extend_from_slice(&ATTR_XOR_MAPPED.to_be_bytes());
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(&value);
    out
}

/// The transaction id and mapped address of a binding success response
/// (XOR-MAPPED-ADDRESS preferred, MAPPED-ADDRESS accepted); `None` for
/// anything else, malformed input included.
pub fn parse_response(msg: &[u8]) -> Option<(TxId, SocketAddr)> {
    if !is_stun(msg) || u16::from_be_bytes([msg[0], msg[1]]) != BINDING_SUCCESS {
        return None;
    }
    let tx: TxId = msg[8..20].try_into().ok()?;
    let mut rest = &msg[HEADER_LEN..];
    let mut plain = None;
    while rest.len() >= 4 {
        let kind = u16::from_be_bytes([rest[0], rest[1]]);
        let len = usize::from(u16::from_be_bytes([rest[2], rest[3]]));
        let value = rest.get(4..4 + len)?;
        match kind {
            ATTR_XOR_MAPPED => return address(value, Some(&tx)).map(|a| (tx, a)),
            ATTR_MAPPED => plain = address(value, None),
            _ => {}
        }
        // Attributes are padded to a multiple of 4.
        rest = rest.get((4 + len).next_multiple_of(4)..).unwrap_or(&[]);
    }
    plain.map(|a| (tx, a))
}

/// Decodes a (XOR-)MAPPED-ADDRESS value; `tx` given means XOR'ed.
fn address(v: &[u8], tx: Option<&TxId>) -> Option<SocketAddr> {
    let mut key = MAGIC_COOKIE.to_be_bytes().to_vec();
    if let Some(tx) = tx {
        key.extend_from_slice(tx);
    } else {
        key = vec![0; 16];
    }
    let port = u16::from_be_bytes([*v.get(2)?, *v.get(3)?]) ^ u16::from_be_bytes([key[0], key[1]]);
    let ip = match v.get(1)? {
        1 => {
            let b: [u8; 4] = v.get(4..8)?.try_into().ok()?;
            let x: Vec<u8> = b.iter().zip(&key).map(|(b, k)| b ^ k).collect();
            IpAddr::V4(Ipv4Addr::new(x[0], x[1], x[2], x[3]))
        }
        2 => {
            let b: [u8; 16] = v.get(4..20)?.try_into().ok()?;
            let mut x = [0u8; 16];
            for (i, (b, k)) in b.iter().zip(&key).enumerate() {
                x[i] = b ^ k;
            }
            IpAddr::V6(Ipv6Addr::from(x))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_response_round_trip_v4_and_v6() {
        let tx = [7u8; 12];
        let req = binding_request(&tx);
        assert!(is_stun(&req));
        assert_eq!(parse_request(&req), Some(tx));
        for mapped in ["203.0.113.9:51820", "[2001:db8::5]:4000"] {
            let mapped: SocketAddr = mapped.parse().unwrap();
            let resp = binding_response(&tx, mapped);
            assert!(is_stun(&resp));
            assert_eq!(parse_response(&resp), Some((tx, mapped)));
            assert_eq!(parse_request(&resp), None);
        }
    }

    #[test]
    fn rfc5769_sample_response_parses() {
        // RFC 5769 section 2.2, IPv4 response (without the software,
        // message-integrity and fingerprint attributes' checks).
        let hex = "0101003c2112a442b7e7a701bc34d686fa87dfae\
                   8022000b7465737420766563746f7220\
                   002000080001a147e112a643\
                   000800149bd52d9a68b9bc1a8b0b7c6d63e8e2a5a31c06d4\
                   80280004c07d4c96";
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let (_, addr) = parse_response(&bytes).unwrap();
        assert_eq!(addr, "192.0.2.1:32853".parse().unwrap());
    }

    #[test]
    fn wireguard_messages_are_not_stun() {
        for t in 1u8..=4 {
            let mut m = vec![0u8; 148];
            m[0] = t;
            assert!(!is_stun(&m));
        }
        assert!(!is_stun(&[0; 19]));
        assert_eq!(parse_response(&[0xff; 64]), None);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..128)) {
            let _ = parse_response(&bytes);
            let _ = parse_request(&bytes);
            // With a valid header, the attribute walk is exercised too.
            let mut m = bytes.clone();
            if m.len() >= 20 {
                let len = (m.len() - 20) as u16;
                m[0] = 1; m[1] = 1;
                m[2..4].copy_from_slice(&len.to_be_bytes());
                m[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
                let _ = parse_response(&m);
            }
        }
    }
}
