//! # meshlib — the reusable core of IST Mesh
//!
//! IST Mesh gives every instance of a deployment a private, encrypted network
//! (WireGuard) to every other instance of the same deployment. This crate holds
//! everything the `sidecar` and the `keyserver` share, and everything an
//! embedder needs.
//!
//! ## Layout
//!
//! Pure modules (no sockets, no tasks, no clock; time is an argument):
//! - [`ids`] — parsed identifiers: [`ids::NetworkId`], [`ids::InstanceName`],
//!   [`ids::AppId`], [`ids::ProcessType`].
//! - [`keys`] — WireGuard key pairs in `wg`'s text form.
//! - [`netmap`] — the versioned network map, its members and deltas.
//! - [`ist`] — Inter Service Traffic names (seed 004): `.warp` hostnames,
//!   `WARP_IST_*` variables, conflicts, overrides, `warp.config.js`.
//! - [`names`] — private DNS names (`<instance>.internal`, the seed-003
//!   `private-network.internal.` names) and their resolution against a map.
//! - [`ipam`] — address allocation in a network range, with quarantine.
//! - [`reconcile`] — the peers a map asks for, and the diff between two such sets.
//! - [`dns`] — private DNS answers on the wire (hickory-proto), from a name index.
//! - [`render`] — `/etc/hosts` managed sections and env files, rendered to
//!   strings; network text escaped for terminals and logs.
//! - [`proto`] — the control protocol (sidecar ↔ keyserver): messages, join
//!   tokens, length framing and version.
//! - [`services`] — service groups (seed 002): published ports, handler
//!   rules, connection limits, wake hooks, persistent or instance-owned.
//! - [`balance`] — the one balancing policy (least active, in turn; soft
//!   and hard limits; held while nothing is online; backoff after a failed
//!   dial), for service groups and service addresses alike.
//! - [`admission`] — connection budgets per source address (IPv4, IPv6
//!   /64): the keyserver's connections without a hello, the gateway's
//!   clients.
//! - [`traffic`] — traffic per service: what a member counted per
//!   destination service, as it reports it to the keyserver.
//! - [`nat`] — NAT traversal: STUN messages, authenticated path probes,
//!   the relay's tickets and frames, and per-peer path selection.
//! - [`member`] — the member side of the control protocol as a sans-IO state
//!   machine (join/resume, map following, heartbeats, reconnect backoff,
//!   rotation, offline and leave), with time as an argument.
//!
//! Driver modules (files):
//! - [`fsutil`] — bounded reads (no FIFOs, devices or huge files), atomic
//!   file replacement keeping permissions, secret files, private directories.
//! - [`control`] — the key-distribution client: the QUIC driver of
//!   [`member::MemberCore`], with a pinned certificate.
//!
//! The embedding API:
//! - [`node`] — [`node::Node`]: one member with its data plane in any tokio
//!   program (join or resume, kernel or userspace mode, `dial`, `listen`,
//!   `resolve`, the map and its events, `shutdown`, `leave`, key rotation);
//!   the sidecar is its main user.
//!
//! Data plane (pure tables and UAPI codec, plus socket/TUN/thread drivers):
//! - [`wg`] — the multi-peer WireGuard engine (boringtun `Tunn` per peer),
//!   TUN device, and the `wg`-compatible UAPI socket.
//! - [`userspace`] — rootless mode: a smoltcp TCP/IP stack as the engine's
//!   device, with TCP and UDP relays between loopback sockets and the tunnel.

#![warn(missing_docs)]

pub mod admission;
pub mod balance;
pub mod control;
pub mod dns;
pub mod fsutil;
pub mod ids;
pub mod ipam;
pub mod ist;
pub mod keys;
pub mod member;
pub mod metrics;
pub mod names;
pub mod nat;
pub mod netmap;
pub mod node;
pub mod pinned;
pub mod proto;
pub mod reconcile;
pub mod render;
pub mod services;
pub mod traffic;
pub mod userspace;
pub mod wg;
