//! Service addresses in the engine's packet loops (the driver of
//! [`super::flows`]): packets from the interface to the service range are
//! routed by the flow table to the peer of the instance their flow is
//! pinned to; packets from peers with a service address as source are
//! accepted only for flows pinned to that peer; refusals and resets are
//! written back to the interface.
//!
//! Cost on the hot path: one atomic load and a mask compare per packet
//! (is the destination in the service range?). For packets of a service
//! flow, the table (a mutex, never held across a syscall) is asked once
//! per run of consecutive plain packets of one flow in a batch (TCP
//! without SYN/FIN/RST, UDP, echo); the rest of the run reuses the answer,
//! and the run's last acknowledgment and bytes are recorded at its end.
//! Nothing is allocated per packet (but a packet held while its service
//! wakes is copied, within the table's bounds).
//!
//! Scale to zero: a new flow the table holds for a wake makes the engine
//! call its wake hook ([`super::Engine::set_wake_hook`]) with the
//! service's name, outside the table's lock; held flows the table later
//! pins are sent to their instance's peer, held flows it refuses are
//! answered on the interface ([`write_held`]).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use super::flows::wire::{self, ACK, ANSWER_MAX};
use super::flows::{FlowKey, HeldOutput, Inbound, Kind, Outbound, Segment};
use super::peer::Peer;
use super::send::send_to_peer;
use super::shared::Shared;

/// A device loop's view: the run of plain packets it is sending, and a
/// buffer for answers to the interface.
pub(crate) struct OutCursor {
    run: Option<(FlowKey, Arc<Peer>)>,
    /// The last acknowledgment of the run not yet recorded in the table.
    ack: Option<u32>,
    /// Bytes of the run not yet counted by the table.
    bytes: u64,
    answer: Vec<Vec<u8>>,
    off: usize,
}

impl OutCursor {
    pub fn new(off: usize) -> Self {
        Self {
            run: None,
            ack: None,
            bytes: 0,
            answer: vec![Vec::with_capacity(off + ANSWER_MAX + 64)],
            off,
        }
    }

    /// The peer for `packet`, whose destination is in the service range;
    /// `None` when it is dropped or refused (the refusal written to the
    /// interface).
    pub fn route(&mut self, shared: &Shared, packet: &[u8]) -> Option<Arc<Peer>> {
        let vips = &shared.vips;
        let Some(seg) = Segment::outbound(packet) else {
            vips.unreadable.fetch_add(1, Relaxed);
            return None;
        };
        if seg.is_plain() {
            if let Some((key, peer)) = &self.run {
                if *key == seg.key {
                    self.bytes += u64::from(seg.len);
                    if let Kind::Tcp { flags, ack, .. } = seg.kind {
                        if flags & ACK != 0 {
                            self.ack = Some(ack);
                        }
                    }
                    return Some(peer.clone());
                }
            }
        }
        self.flush(shared);
        self.run = None;
        let (verdict, wake) = {
            let mut table = vips.table.lock();
            let verdict = table.outbound(&seg, packet, Instant::now());
            let wake = match verdict {
                Outbound::Hold { wake: true } => table.held_service(&seg.key.service),
                _ => None,
            };
            (verdict, wake)
        };
        if let Some(service) = wake {
            vips.wake(&service);
        }
        match verdict {
            Outbound::Forward(key) => {
                let peer = shared.table.read().by_key(&key).map(|(_, p)| p.clone());
                let Some(peer) = peer else {
                    shared.counters.no_route.fetch_add(1, Relaxed);
                    return None;
                };
                if seg.is_plain() {
                    self.run = Some((seg.key, peer.clone()));
                }
                Some(peer)
            }
            Outbound::Reject => {
                self.answer(shared, packet);
                None
            }
            Outbound::Drop | Outbound::Hold { .. } => None,
        }
    }

    /// Records the run's last acknowledgment and its bytes in the table.
    fn flush(&mut self, shared: &Shared) {
        let (ack, bytes) = (self.ack.take(), std::mem::take(&mut self.bytes));
        if let (true, Some((key, _))) = (ack.is_some() || bytes > 0, &self.run) {
            shared
                .vips
                .table
                .lock()
                .touch(key, ack, bytes, Instant::now());
        }
    }

    /// End of a batch: the run ends (the table may change meanwhile).
    pub fn end_batch(&mut self, shared: &Shared) {
        self.flush(shared);
        self.run = None;
    }

    /// Writes the refusal of `packet` to the interface.
    fn answer(&mut self, shared: &Shared, packet: &[u8]) {
        let off = self.off;
        let buf = &mut self.answer[0];
        buf.clear();
        buf.resize(off + ANSWER_MAX, 0);
        let Some(n) = wire::reject(packet, &mut buf[off..]) else {
            return;
        };
        buf.truncate(off + n);
        if let Err(e) = shared.device.send_batch(&mut self.answer[..1]) {
            tracing::trace!("device write (refusal): {e}");
        }
    }
}

/// A receive loop's view: the run of plain packets of one flow from one
/// peer it accepted in this batch.
#[derive(Default)]
pub(crate) struct InCursor {
    run: Option<(FlowKey, Arc<Peer>)>,
    /// Bytes of the run not yet counted by the table.
    bytes: u64,
}

impl InCursor {
    /// What to do with `packet` from `peer`, whose source is in the
    /// service range.
    pub fn check(&mut self, shared: &Shared, peer: &Arc<Peer>, packet: &[u8]) -> Inbound {
        let Some(seg) = Segment::inbound(packet) else {
            shared.vips.unreadable.fetch_add(1, Relaxed);
            return Inbound::Drop;
        };
        if seg.is_plain() {
            if let Some((key, p)) = &self.run {
                if *key == seg.key && Arc::ptr_eq(p, peer) {
                    self.bytes += u64::from(seg.len);
                    return Inbound::Accept;
                }
            }
        }
        self.flush(shared);
        let verdict = shared
            .vips
            .table
            .lock()
            .inbound(&peer.key, &seg, Instant::now());
        self.run = (verdict == Inbound::Accept && seg.is_plain()).then(|| (seg.key, peer.clone()));
        verdict
    }

    /// Counts the run's bytes in the table.
    fn flush(&mut self, shared: &Shared) {
        let bytes = std::mem::take(&mut self.bytes);
        if let (true, Some((key, _))) = (bytes > 0, &self.run) {
            shared
                .vips
                .table
                .lock()
                .touch_in(key, bytes, Instant::now());
        }
    }

    /// End of a batch.
    pub fn end_batch(&mut self, shared: &Shared) {
        self.flush(shared);
        self.run = None;
    }
}

/// Acts on what held flows became ([`FlowTable::take_held`]): released
/// packets are encrypted and sent to their instance's peer, in order;
/// refused flows are answered on the interface. Call with no lock held.
pub(crate) fn write_held(shared: &Shared, held: HeldOutput) {
    if held.is_empty() {
        return;
    }
    for (key, packets) in &held.released {
        let peer = shared.table.read().by_key(key).map(|(_, p)| p.clone());
        let Some(peer) = peer else {
            shared.counters.no_route.fetch_add(1, Relaxed);
            continue;
        };
        for p in packets {
            send_to_peer(shared, &peer, p);
        }
    }
    let off = shared.device.headroom();
    let mut bufs: Vec<Vec<u8>> = held
        .refused
        .iter()
        .filter_map(|p| {
            let mut b = vec![0u8; off + ANSWER_MAX];
            let n = wire::reject(p, &mut b[off..])?;
            b.truncate(off + n);
            Some(b)
        })
        .collect();
    for chunk in bufs.chunks_mut(super::device::BATCH) {
        if let Err(e) = shared.device.send_batch(chunk) {
            tracing::debug!("device write (held flows refused): {e}");
        }
    }
}

/// Writes a reset of each flow to the interface (flows whose instance
/// left), in batches.
pub(crate) fn write_resets(shared: &Shared, ended: &[super::flows::Ended]) {
    let off = shared.device.headroom();
    let mut bufs: Vec<Vec<u8>> = ended
        .iter()
        .map(|e| {
            let mut b = vec![0u8; off + ANSWER_MAX];
            let n = wire::reset(&e.key, e.seq, &mut b[off..]);
            b.truncate(off + n);
            b
        })
        .collect();
    for chunk in bufs.chunks_mut(super::device::BATCH) {
        if let Err(e) = shared.device.send_batch(chunk) {
            tracing::debug!("device write (resets): {e}");
        }
    }
}
