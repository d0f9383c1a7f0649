//! One peer's live state: its `Tunn`, endpoint, keepalive and counters.

use std::net::Ipv4Addr;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::SystemTime;

use boringtun::noise::Tunn;
use ipnet::IpNet;
use parking_lot::Mutex;

use crate::keys::PublicKey;

/// Desired configuration of one peer (the Rust API's form; the UAPI's
/// incremental form is [`super::uapi::PeerChange`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// The peer's public key (its identity).
    pub public_key: PublicKey,
    /// Optional preshared key (post-quantum hardening, as in `wg`).
    pub preshared_key: Option<[u8; 32]>,
    /// Where to send to until the peer roams; `None` waits for it to call.
    pub endpoint: Option<SocketAddr>,
    /// Inner addresses the peer may use as source and is routed to.
    pub allowed_ips: Vec<IpNet>,
    /// Persistent keepalive in seconds; 0 (the default) disables it.
    pub persistent_keepalive: u16,
}

impl From<crate::reconcile::DesiredPeer> for PeerConfig {
    fn from(p: crate::reconcile::DesiredPeer) -> Self {
        Self {
            public_key: p.public_key,
            preshared_key: None,
            endpoint: p.endpoint,
            allowed_ips: p.allowed_ips,
            persistent_keepalive: p.persistent_keepalive,
        }
    }
}

/// Why packets of one peer were dropped, counted separately.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerDrops {
    /// Inbound packets whose inner source is outside the peer's allowed IPs.
    pub spoofed_source: u64,
    /// Inbound datagrams the peer's session rejected (bad tag, replay, ...).
    pub rejected: u64,
    /// Outbound packets dropped because the peer has no endpoint yet.
    pub no_endpoint: u64,
}

/// Counters and state of one peer, as [`super::Engine::peer_stats`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStats {
    /// The peer's public key.
    pub public_key: PublicKey,
    /// Current endpoint (configured, or roamed to).
    pub endpoint: Option<SocketAddr>,
    /// Allowed IPs.
    pub allowed_ips: Vec<IpNet>,
    /// Wall-clock time of the last completed handshake.
    pub last_handshake: Option<SystemTime>,
    /// Datagram bytes received from the peer and authenticated.
    pub rx_bytes: u64,
    /// Datagram bytes sent to the peer.
    pub tx_bytes: u64,
    /// Persistent keepalive interval in seconds (0: off).
    pub persistent_keepalive: u16,
    /// Drops by reason.
    pub drops: PeerDrops,
}

/// A peer in the engine's table.
pub(crate) struct Peer {
    pub key: PublicKey,
    pub tunn: Mutex<Tunn>,
    pub preshared_key: Mutex<Option<[u8; 32]>>,
    pub endpoint: Mutex<Option<SocketAddr>>,
    pub keepalive: AtomicU16,
    /// Wall-clock time of the last completed handshake (responder: init
    /// answered; initiator: response accepted), as wireguard-go reports it.
    pub last_handshake: Mutex<Option<SystemTime>>,
    /// Milliseconds since the engine's epoch of the last datagram sent
    /// (0: never), for persistent keepalive.
    pub last_tx_ms: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub drop_spoofed: AtomicU64,
    pub drop_rejected: AtomicU64,
    pub drop_no_endpoint: AtomicU64,
    /// Path selection decides the endpoint (the transport manages the
    /// peer's path); else the endpoint roams to the last authenticated
    /// source. Read on every authenticated packet.
    pub managed: AtomicBool,
    /// Handshakes sent again on a new path while no session exists.
    pub kick: Mutex<Kick>,
    /// The path in use is the relay (the endpoint is the relay's address).
    pub via_relay: AtomicBool,
    /// The peer's private IPv4 address as a number (0: none), how the
    /// relay names it.
    pub relay_ip: AtomicU32,
    /// A thread is sending the packets that waited in the `Tunn`'s queue
    /// for a session ([`super::io::drain_queue`]); meanwhile new packets
    /// join the queue, so they leave after the waiting ones. Written only
    /// with the `Tunn` locked.
    pub draining: AtomicBool,
}

/// When a handshake is sent again on a new path ([`super::io`]).
#[derive(Debug, Default)]
pub(crate) struct Kick {
    /// Until then, while no session exists, the handshake is sent again
    /// (the peer may register with the relay, or open its NAT, a moment
    /// after our path came up).
    pub until: Option<std::time::Instant>,
    /// When the handshake was last sent so.
    pub last: Option<std::time::Instant>,
}

impl Peer {
    pub fn new(key: PublicKey, tunn: Tunn) -> Self {
        Self {
            key,
            tunn: Mutex::new(tunn),
            preshared_key: Mutex::new(None),
            endpoint: Mutex::new(None),
            keepalive: AtomicU16::new(0),
            last_handshake: Mutex::new(None),
            last_tx_ms: AtomicU64::new(0),
            rx_bytes: AtomicU64::new(0),
            tx_bytes: AtomicU64::new(0),
            drop_spoofed: AtomicU64::new(0),
            drop_rejected: AtomicU64::new(0),
            drop_no_endpoint: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            kick: Mutex::new(Kick::default()),
            managed: AtomicBool::new(false),
            via_relay: AtomicBool::new(false),
            relay_ip: AtomicU32::new(0),
        }
    }

    /// The peer's private address at the relay, if known.
    pub fn relay_ip(&self) -> Option<Ipv4Addr> {
        match self.relay_ip.load(Relaxed) {
            0 => None,
            n => Some(Ipv4Addr::from(n)),
        }
    }

    /// Whether path selection decides this peer's endpoint.
    pub fn is_managed(&self) -> bool {
        self.managed.load(Relaxed)
    }

    /// Snapshot of the counters.
    pub fn stats(&self, allowed_ips: Vec<IpNet>) -> PeerStats {
        PeerStats {
            public_key: self.key,
            endpoint: *self.endpoint.lock(),
            allowed_ips,
            last_handshake: *self.last_handshake.lock(),
            rx_bytes: self.rx_bytes.load(Relaxed),
            tx_bytes: self.tx_bytes.load(Relaxed),
            persistent_keepalive: self.keepalive.load(Relaxed),
            drops: PeerDrops {
                spoofed_source: self.drop_spoofed.load(Relaxed),
                rejected: self.drop_rejected.load(Relaxed),
                no_endpoint: self.drop_no_endpoint.load(Relaxed),
            },
        }
    }
}
