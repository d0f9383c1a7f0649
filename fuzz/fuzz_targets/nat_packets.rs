//! Datagrams on a member's WireGuard socket that are not WireGuard, and on
//! the relay's socket: STUN answers and requests, path probes, relay frames
//! and relay tickets, from anyone. None may panic; a probe that opens under
//! a key must encode back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshlib::nat::{disco, relay, stun};

fuzz_target!(|data: &[u8]| {
    let _ = stun::parse_response(data);
    let _ = stun::parse_request(data);
    let _ = relay::parse(data);
    let _ = relay::Ticket::verify(data, &[7; 32], 0);
    let key = disco::PairKey::derive(
        &meshlib::keys::PrivateKey::from_bytes([1; 32]),
        &meshlib::keys::PrivateKey::from_bytes([2; 32]).public_key(),
    );
    if let (Some(sender), Some(msg)) = (disco::sender(data), disco::open(data, &key)) {
        assert_eq!(disco::encode(&msg, &sender, &key), data);
    }
});
