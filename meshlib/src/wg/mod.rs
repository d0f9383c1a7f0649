//! The WireGuard data plane: a multi-peer engine on `boringtun::noise::Tunn`
//! (one per peer), interoperating with stock WireGuard (`wireguard-go`, `wg`).
//!
//! ## Layout
//!
//! Pure:
//! - [`table`] — the generic longest-prefix table ([`AllowedIps`]) and the
//!   three-way peer index ([`PeerTable`]: by key, receiver index, allowed IP).
//! - [`uapi`] — the cross-platform UAPI (`get=1` / `set=1`) parser and renderer.
//! - [`flows`] — service addresses: the per-flow table that pins each flow
//!   to a service address to one healthy instance ([`flows::FlowTable`]),
//!   and the packet views and answers it needs ([`flows::wire`]).
//!
//! Drivers:
//! - [`device`] — the clear-text side: the [`Device`] trait and the Linux TUN
//!   implementation [`TunDevice`] (tun-rs, with TSO/GRO offloads).
//! - [`Engine`] — the peer table, key, UDP socket (quinn-udp: GSO/GRO and
//!   `recvmmsg`) and its threads: device → network (encrypt), network →
//!   device (decrypt, allowed-IP check, roaming), timers, and the link
//!   state (the TUN's rtnetlink notifications, `netlink`). Encryption and
//!   decryption run on different threads, so both cores work while each
//!   peer's packets stay in order.
//! - `udp` — the engine's UDP socket (quinn-udp: GSO/GRO, `recvmmsg`),
//!   depending on no other part of the engine.
//! - `transport` — the transport owner (magicsock's `Conn` in tailscale):
//!   the socket, STUN, the relay (UDP, and TLS over TCP in
//!   `transport::relay_tcp`) and each managed peer's path state. The
//!   packet loops send to endpoints through it and hand it what is not
//!   WireGuard; it gives back WireGuard datagrams and path choices, and
//!   knows nothing of peers, the table or the loops.
//! - `shared` — the state the engine's API and its packet loops (`io`)
//!   share (peer table, key, transport, counters); `vip` — service
//!   addresses in the packet loops: the flow table asked once per run of a
//!   flow's packets, refusals and resets written to the device.
//!
//! Imports go one way: `udp` ← `transport` ← `shared` ← `io` ← `batch` ←
//! `engine` (`crypt` imports none of them)
//! (`peer`, `table`, `device` below `shared`). Lock order: the peer table,
//! then the static key, then a peer's `Tunn`, `endpoint` or `kick` (one at
//! a time); in the transport, its peers' paths before its key, relay or
//! own candidates, and the relay before the TCP relay. No lock is held
//! across a send: a peer's `Tunn` is released before its datagram goes
//! out, and the transport sends what a locked section decided after it.
//! - [`uapi_server`] — `/var/run/wireguard/<if>.sock`, so `wg show` and
//!   `wg set` work on the interface.
//!
//! Threads and namespaces: the engine's sockets and threads belong to the
//! network namespace of the thread that calls [`Engine::start`] (and
//! [`Engine::set_listen_port`], which rebinds); [`TunDevice::create`] makes
//! the interface in the caller's namespace too.
//!
//! Cores: decryption runs on the network thread, encryption on one thread
//! per TUN queue ([`TunConfig::queues`], `IFF_MULTI_QUEUE`; the kernel keeps
//! each flow on one queue, so a flow's packets stay in order), and with
//! [`EngineConfig::crypto_workers`] both move to a pool of workers: the
//! loops read batches, take sessions and counters in order on their own
//! thread, and workers seal and open the batches in parallel; each loop's
//! batches leave in the order they were read, so one busy peer uses
//! several cores (`crypt`: the pool and its ordered lanes; `batch`: the
//! loops' jobs; boringtun patched to share a `Tunn`'s sessions,
//! `vendor/boringtun/PATCHED.md`). With more than one queue, two flows to
//! the same peer may interleave differently on the wire (each flow keeps
//! its order; the receiver's replay window accepts it).
//!
//! The UDP socket sets DF (quinn-udp's default), so the underlay must carry
//! MTU + 80 bytes.
//!
//! Typical use (kernel-interface mode):
//! ```no_run
//! # use std::sync::Arc;
//! use meshlib::wg::{Engine, EngineConfig, TunConfig, TunDevice, UapiServer};
//! let tun = TunDevice::create(&TunConfig::new("mesh0"))?;
//! let engine = Arc::new(Engine::start(Arc::new(tun), EngineConfig::default())?);
//! let _uapi = UapiServer::start(engine.clone(), &meshlib::wg::uapi_server::socket_path("mesh0"))?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod batch;
mod crypt;
pub mod device;
mod engine;
pub mod flows;
mod io;
mod netlink;
mod peer;
mod send;
mod shared;
pub mod table;
mod transport;
pub mod uapi;
pub mod uapi_server;
mod udp;
mod vip;
mod vips;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod vip_tests;

pub use device::{Device, TunConfig, TunDevice, DEFAULT_MTU};
pub use engine::{Engine, EngineConfig, EngineError, EngineStats, RelayTarget, MAX_CRYPTO_WORKERS};
pub use peer::{PeerConfig, PeerDrops, PeerStats};
pub use table::{AllowedIps, PeerTable};
pub use uapi_server::UapiServer;

/// Called with a service's name when the engine holds a new flow to its
/// wakeable service address and asks for a wake
/// ([`Engine::set_wake_hook`]).
pub type WakeHook = std::sync::Arc<dyn Fn(&str) + Send + Sync>;
