//! Sending for the engine's loops: one packet to a peer outside the
//! device loop, and the accounting of every send (the peer's counters, and
//! failures counted and logged at a bounded rate).

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;

use boringtun::noise::{Tunn, TunnResult};

use super::peer::Peer;
use super::shared::Shared;

/// Room the encrypted form of one packet needs beyond its clear text
/// (header, tag, padding to 16), and boringtun's 148-byte minimum.
const OVERHEAD: usize = 32 + 16;

/// Encrypts and sends one clear-text packet to `peer` outside the device
/// loop (a held packet of a flow whose service woke). Without a session
/// the packet waits in the peer's queue for the handshake this starts.
pub(crate) fn send_to_peer(shared: &Shared, peer: &Peer, packet: &[u8]) {
    let Some(endpoint) = *peer.endpoint.lock() else {
        peer.drop_no_endpoint.fetch_add(1, Relaxed);
        return;
    };
    let Some(dgram) = encapsulate_alone(&mut peer.tunn.lock(), packet) else {
        return;
    };
    send_alone(shared, peer, endpoint, &dgram);
}

/// `tunn.encapsulate` into a buffer of its own: the datagram to send, if
/// any (sealed with the current session; without one, boringtun queues
/// the packet and returns a handshake initiation when one is due).
pub(crate) fn encapsulate_alone(tunn: &mut Tunn, packet: &[u8]) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; (packet.len() + OVERHEAD).max(148)];
    let n = match tunn.encapsulate(packet, &mut buf) {
        TunnResult::WriteToNetwork(d) => d.len(),
        _ => return None,
    };
    buf.truncate(n);
    Some(buf)
}

/// Sends one datagram from [`encapsulate_alone`] to `peer` at `endpoint`.
pub(crate) fn send_alone(shared: &Shared, peer: &Peer, endpoint: SocketAddr, dgram: &[u8]) {
    let (udp, _) = shared.transport.udp();
    let result = shared
        .transport
        .send_to(&udp, peer.relay_ip(), endpoint, dgram);
    sent(shared, peer, endpoint, dgram.len(), result);
}

/// Accounts one send of `bytes` to `peer` at `to`: on success its transfer
/// counter (as `wg show`'s "sent": bytes that left, as wireguard-go counts
/// them) and last-send time; on failure, the failure.
pub(crate) fn sent(
    shared: &Shared,
    peer: &Peer,
    to: SocketAddr,
    bytes: usize,
    result: io::Result<()>,
) {
    match result {
        Ok(()) => {
            peer.tx_bytes.fetch_add(bytes as u64, Relaxed);
            peer.last_tx_ms.store(shared.now_ms(), Relaxed);
        }
        Err(e) => send_failed(shared, Some(peer), to, &e),
    }
}

/// Least time between two logged send failures; those in between are
/// counted and summed up in the next line.
const SEND_LOG_INTERVAL_MS: u64 = 5_000;

/// Counts a failed send and logs it, at most once per
/// [`SEND_LOG_INTERVAL_MS`] per engine.
pub(crate) fn send_failed(shared: &Shared, peer: Option<&Peer>, to: SocketAddr, e: &io::Error) {
    let c = &shared.counters;
    c.send_failed.fetch_add(1, Relaxed);
    let now = shared.now_ms();
    let last = c.send_logged_ms.load(Relaxed);
    if last != 0 && now.saturating_sub(last) < SEND_LOG_INTERVAL_MS {
        c.send_unlogged.fetch_add(1, Relaxed);
        return;
    }
    if c.send_logged_ms
        .compare_exchange(last, now, Relaxed, Relaxed)
        .is_err()
    {
        c.send_unlogged.fetch_add(1, Relaxed);
        return;
    }
    let more = c.send_unlogged.swap(0, Relaxed);
    match peer {
        Some(p) => tracing::warn!(
            peer = %p.key,
            endpoint = %to,
            suppressed = more,
            "failed to send to peer: {e}"
        ),
        None => tracing::warn!(endpoint = %to, suppressed = more, "failed to send: {e}"),
    }
}
