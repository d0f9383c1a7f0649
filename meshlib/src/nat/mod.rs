//! NAT traversal: how two members behind NATs find a path to each other,
//! and the relay when none exists.
//!
//! - **Candidates.** A member's candidates are the addresses its WireGuard
//!   socket can be reached at: its local addresses, the server-reflexive
//!   addresses STUN servers report for that very socket ([`stun`]; requests
//!   go out of the WireGuard socket and answers are told apart from
//!   WireGuard on receipt), and its relay's address once registered there
//!   ([`relay`]). `wg::Engine::advertise` builds the list a member advertises; the
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
//! `wg::transport`, the keyserver's STUN and relay servers live in the
//! keyserver crate.

pub mod disco;
pub mod path;
pub mod relay;
pub mod stun;

pub(crate) use disco::{put_addr, take_addr};

/// Most candidates a member advertises (the keyserver keeps 16 and adds
/// the observed one).
pub const MAX_ADVERTISED: usize = 15;
