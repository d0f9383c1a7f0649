//! NAT traversal: how two members behind NATs find a path to each other,
//! and the relay when none exists.
//!
//! - **Candidates.** A member's candidates are the addresses its WireGuard
//!   socket can be reached at: its local addresses, the server-reflexive
//!   addresses STUN servers report for that very socket ([`stun`]; requests
//!   go out of the WireGuard socket and answers are told apart from
//!   WireGuard on receipt), and its relay's address once registered there
//!   ([`relay`]). [`candidates`] builds the list a member advertises; the
//!   keyserver adds the address it observed, and pushes the list to every
//!   peer as a map change.
//! - **Path selection.** The engine runs one [`path::PathManager`] per peer:
//!   authenticated pings on every candidate ([`disco`]), the best working
//!   direct path (direct before relay, then lowest round trip), heartbeats
//!   that keep NAT mappings open and notice a path gone quiet, periodic
//!   re-probes, and call-me-maybe through the relay so that both sides probe
//!   at the same moment. Switching a path changes only where WireGuard's
//!   datagrams go: the session, and the flows inside it, stay.
//! - **Relay.** Forwards WireGuard datagrams (still encrypted) between two
//!   members of one network, addressed by private IP inside the network a
//!   keyserver-signed ticket names ([`relay`]).
//!
//! Everything here is pure (no sockets, no clock); the engine's driver is
//! `wg::paths`, the keyserver's STUN and relay servers live in the
//! keyserver crate.

pub mod disco;
pub mod path;
pub mod relay;
pub mod stun;

pub(crate) use disco::{put_addr, take_addr};

use std::net::SocketAddr;

/// Most candidates a member advertises (the keyserver keeps 16 and adds
/// the observed one).
pub const MAX_ADVERTISED: usize = 15;

/// The candidates a member advertises: its `local` addresses (configured,
/// or detected, with the WireGuard port), then the engine's
/// server-reflexive addresses (STUN, relay-observed), then the relay's
/// address if registered; without duplicates, at most
/// [`MAX_ADVERTISED`]. Also tells the engine, which sends them in
/// call-me-maybe probes.
///
/// The sidecar calls this wherever it computes the endpoints it announces
/// (at join, at resume, and on every re-check), so that learned addresses
/// reach the map with the next announcement.
pub fn candidates(engine: &crate::wg::Engine, local: &[SocketAddr]) -> Vec<SocketAddr> {
    let relay = engine.relay_addr();
    let mut out: Vec<SocketAddr> = Vec::new();
    for a in local
        .iter()
        .copied()
        .chain(engine.reflexive_addrs())
        .chain(relay)
    {
        if !out.contains(&a) && out.len() < MAX_ADVERTISED {
            out.push(a);
        }
    }
    // The relay's address must survive the cap: peers reach us there.
    if let Some(r) = relay {
        if !out.contains(&r) {
            out.pop();
            out.push(r);
        }
    }
    engine.set_own_candidates(out.iter().filter(|a| Some(**a) != relay).copied().collect());
    out
}

/// Gives the engine what the keyserver said about STUN and the relay
/// ([`crate::proto::RelayInfo`], from [`crate::member::Event::Relay`]).
pub fn use_relay_info(engine: &crate::wg::Engine, info: &crate::proto::RelayInfo) {
    engine.set_stun_servers(info.stun.clone());
    engine.set_relay(info.relay.map(|udp| crate::wg::RelayTarget {
        udp,
        tcp: info.tcp.map(|t| (t, info.cert_sha256)),
        ticket: info.ticket.clone(),
    }));
}
