//! The engine's packet loops (drivers): device → network (encrypt, batched
//! UDP GSO send), network → device (batched GRO receive, decrypt, allowed-IP
//! check, GRO-coalesced device write), and the timers. Buffers are allocated
//! once per loop; the hot path allocates nothing.

use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn, TunnResult};
use quinn_udp::{RecvMeta, UdpSockRef};

use super::device::{out_buffer, BATCH, MAX_SUPER_PACKET};
use super::flows::Inbound as Reply;
use super::peer::Peer;
use super::send::{send_failed, sent};
use super::shared::Shared;
use super::transport::{self, Inbound, PathUse, Sink};
use super::udp::Udp;
use super::vip::{InCursor, OutCursor};
use crate::nat::path::Path;
use crate::nat::relay;

/// Timer tick (boringtun's timers have this granularity at best).
const TICK: Duration = Duration::from_millis(100);
/// Largest UDP payload handled; bigger datagrams cannot come from a peer.
pub(super) const MAX_DATAGRAM: usize = 65_535;
/// Most bytes packed into one GSO send.
pub(super) const MAX_GSO_BYTES: usize = 64_000;
/// Room the encrypted form of one packet needs beyond its clear text
/// (header, tag, padding to 16), and boringtun's 148-byte minimum.
const OVERHEAD: usize = 32 + 16;

/// The socket to use now, re-read only when the engine replaced it.
pub(super) struct CurrentUdp {
    generation: u64,
    udp: Arc<Udp>,
}

impl CurrentUdp {
    pub(super) fn new(shared: &Shared) -> Self {
        let (udp, generation) = shared.transport.udp();
        Self { generation, udp }
    }

    pub(super) fn refresh(&mut self, shared: &Shared) -> &Arc<Udp> {
        let generation = shared.transport.generation();
        if generation != self.generation {
            *self = Self::new(shared);
        }
        &self.udp
    }
}

/// Consecutive encrypted datagrams to one destination, packed for one GSO
/// send: all `segment` bytes long except possibly the last.
struct GsoBatch {
    buf: Vec<u8>,
    start: usize,
    len: usize,
    dest: Option<SocketAddr>,
    /// The peer the pending datagrams are for (its counters move on flush).
    peer: Option<Arc<Peer>>,
    segment: usize,
    count: usize,
    max_segments: usize,
}

impl GsoBatch {
    fn new() -> Self {
        Self {
            buf: vec![0; 2 * MAX_GSO_BYTES + 2 * MAX_DATAGRAM],
            start: 0,
            len: 0,
            dest: None,
            peer: None,
            segment: 0,
            count: 0,
            max_segments: 1,
        }
    }

    /// Space to encrypt the next datagram into (at least `need` bytes).
    fn space(&mut self, shared: &Shared, udp: &Udp, need: usize) -> &mut [u8] {
        if self.start + self.len + need > self.buf.len() {
            self.flush(shared, udp);
            self.start = 0;
        }
        let at = self.start + self.len;
        &mut self.buf[at..at + need]
    }

    /// Accounts the `n` bytes just written by [`Self::space`] as a datagram
    /// of `peer` to `dest`; sends what cannot be merged with it.
    fn commit(&mut self, shared: &Shared, udp: &Udp, peer: &Arc<Peer>, dest: SocketAddr, n: usize) {
        let mergeable = self.dest == Some(dest)
            && self.peer.as_ref().is_some_and(|p| Arc::ptr_eq(p, peer))
            && n <= self.segment
            && self.count < self.max_segments
            && self.len + n <= MAX_GSO_BYTES
            && (self.len % self.segment) == 0;
        if !mergeable {
            let at = self.start + self.len;
            self.flush(shared, udp);
            self.start = at;
            self.dest = Some(dest);
            self.peer = Some(peer.clone());
            self.segment = n;
            self.max_segments = udp.state.max_gso_segments().max(1);
        }
        self.len += n;
        self.count += 1;
    }

    fn flush(&mut self, shared: &Shared, udp: &Udp) {
        if let (Some(dest), Some(peer)) = (self.dest.take(), self.peer.take()) {
            let data = &self.buf[self.start..self.start + self.len];
            let result = shared.transport.transmit(udp, dest, data, self.segment);
            sent(shared, &peer, dest, data.len(), result);
        }
        self.start += self.len;
        self.len = 0;
        self.count = 0;
        if self.start > MAX_GSO_BYTES + MAX_DATAGRAM {
            self.start = 0;
        }
    }
}

/// Reads a batch of clear-text packets, encrypts each for the peer its
/// destination routes to, and sends them in GSO batches.
pub(crate) fn device_loop(shared: Arc<Shared>, queue: usize) {
    let device = shared.device.clone();
    let off = device.headroom();
    let mut scratch = vec![0u8; MAX_SUPER_PACKET];
    let mut bufs = vec![vec![0u8; off + MAX_DATAGRAM]; BATCH];
    let mut sizes = vec![0usize; BATCH];
    let mut out = GsoBatch::new();
    let mut udp = CurrentUdp::new(&shared);
    let mut vip = OutCursor::new(off);
    let mut errors = 0u32;
    while !shared.stop.load(Relaxed) {
        let n = match device.recv_batch(queue, &mut scratch, &mut bufs, &mut sizes) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if read_failed(&shared, &mut errors, &e) => break,
            Err(_) => continue,
        };
        errors = 0;
        // A packet came from the device, so its link is up unless it just
        // went down: ask before dropping on a stale flag.
        if shared.key.read().is_none() || !link_is_up(&shared) {
            continue;
        }
        let udp = udp.refresh(&shared);
        let mut last: Option<(IpAddr, Arc<Peer>)> = None;
        for (buf, &size) in bufs.iter().zip(&sizes).take(n) {
            let packet = &buf[off..off + size];
            encrypt_one(&shared, udp, &mut out, &mut last, &mut vip, packet);
        }
        vip.end_batch(&shared);
        out.flush(&shared, udp);
    }
}

/// A packet's way out: its peer, the peer's endpoint, and the relay's
/// address and token when it goes through the relay.
pub(super) type OutRoute = (Arc<Peer>, SocketAddr, Option<(Ipv4Addr, [u8; 8])>);

/// Where `packet` goes: its peer (`last` caches the previous route; `vip`
/// routes packets to service addresses), the peer's endpoint, and the
/// relay's address and token when it goes through the relay. `None` (and
/// the reason counted) when it goes nowhere.
pub(super) fn route_out(
    shared: &Shared,
    last: &mut Option<(IpAddr, Arc<Peer>)>,
    vip: &mut OutCursor,
    packet: &[u8],
) -> Option<OutRoute> {
    let dst = Tunn::dst_address(packet)?;
    let peer = match (dst, &*last) {
        (IpAddr::V4(v4), _) if shared.vips.covers(v4) => vip.route(shared, packet)?,
        (_, Some((ip, p))) if *ip == dst => p.clone(),
        _ => match shared.table.read().by_ip(dst) {
            Some((_, p)) => {
                *last = Some((dst, p.clone()));
                p.clone()
            }
            None => {
                shared.counters.no_route.fetch_add(1, Relaxed);
                return None;
            }
        },
    };
    let Some(endpoint) = *peer.endpoint.lock() else {
        peer.drop_no_endpoint.fetch_add(1, Relaxed);
        return None;
    };
    // Through the relay: the same datagram behind a `send` header.
    let relayed = if peer.via_relay.load(Relaxed) {
        shared
            .transport
            .route()
            .filter(|(addr, _)| *addr == endpoint)
            .and_then(|(_, token)| peer.relay_ip().map(|ip| (ip, token)))
    } else {
        None
    };
    Some((peer, endpoint, relayed))
}

/// Encrypts one packet into `out`; `last` caches the previous route;
/// `vip` routes packets to service addresses.
fn encrypt_one(
    shared: &Shared,
    udp: &Udp,
    out: &mut GsoBatch,
    last: &mut Option<(IpAddr, Arc<Peer>)>,
    vip: &mut OutCursor,
    packet: &[u8],
) {
    let Some((peer, endpoint, relayed)) = route_out(shared, last, vip, packet) else {
        return;
    };
    let hdr = if relayed.is_some() {
        relay::SEND_HEADER
    } else {
        0
    };
    let need = (packet.len() + OVERHEAD).max(148) + hdr;
    if need > MAX_DATAGRAM {
        return;
    }
    let space = out.space(shared, udp, need);
    let n = {
        let mut tunn = peer.tunn.lock();
        if let Some(drain) = queue_behind(&mut tunn, &peer, packet) {
            drop(tunn);
            if drain {
                // This batch's earlier packets first, then the queue.
                out.flush(shared, udp);
                drain_queue(shared, udp, endpoint, &peer);
            }
            return;
        }
        match tunn.encapsulate(packet, &mut space[hdr..]) {
            TunnResult::WriteToNetwork(d) => d.len(),
            _ => return,
        }
    };
    if let Some((ip, token)) = relayed {
        relay::send_header(space, ip, token);
    }
    out.commit(shared, udp, &peer, endpoint, n + hdr);
}

/// Clear-text packets decrypted from one receive batch, waiting to be
/// written to the device together (so the device can coalesce them).
struct DeviceBatch {
    bufs: Vec<Vec<u8>>,
    count: usize,
    off: usize,
    /// Replies from service addresses accepted in this batch.
    vip: InCursor,
}

impl DeviceBatch {
    fn flush(&mut self, shared: &Shared) {
        self.vip.end_batch(shared);
        if self.count > 0 {
            if let Err(e) = shared.device.send_batch(&mut self.bufs[..self.count]) {
                tracing::trace!("device write: {e}");
            }
            self.count = 0;
        }
    }
}

/// Counts a failed device read; whether the loop must end (the device is
/// gone, or a hundred reads failed in a row: the engine reports failure).
pub(super) fn read_failed(shared: &Shared, errors: &mut u32, e: &io::Error) -> bool {
    *errors += 1;
    tracing::debug!("device read: {e}");
    let fatal = *errors > 100 || e.raw_os_error() == Some(libc::EBADFD);
    if fatal {
        shared.failed.store(true, Relaxed);
    }
    fatal
}

/// With the link down, the datagrams just read (`meta`) are dropped and
/// counted, and nothing is answered (wireguard-go closes its socket while
/// the interface is down): whether it is down.
pub(super) fn dropped_link_down(shared: &Shared, meta: &[RecvMeta]) -> bool {
    if link_is_up(shared) {
        return false;
    }
    let dropped: usize = meta.iter().map(|m| m.len.div_ceil(m.stride.max(1))).sum();
    shared.counters.link_down.fetch_add(dropped as u64, Relaxed);
    tracing::debug!("link down: dropped {dropped} datagrams");
    true
}

/// Receives datagram batches (GRO), decrypts them, checks inner sources
/// against the sender's allowed IPs, and writes the packets to the device.
pub(crate) fn network_loop(shared: Arc<Shared>) {
    let off = shared.device.headroom();
    let mut rx = vec![vec![0u8; MAX_DATAGRAM]; quinn_udp::BATCH_SIZE];
    let mut meta = vec![RecvMeta::default(); quinn_udp::BATCH_SIZE];
    let mut dev = DeviceBatch {
        bufs: (0..BATCH).map(|_| out_buffer(off)).collect(),
        count: 0,
        off,
        vip: InCursor::default(),
    };
    let mut reply = vec![0u8; MAX_DATAGRAM];
    let mut current = CurrentUdp::new(&shared);
    let mut uses = Vec::new();
    while !shared.stop.load(Relaxed) {
        let udp = current.refresh(&shared).clone();
        let n = {
            let mut bufs = rx.iter_mut();
            let mut iovs: [IoSliceMut; quinn_udp::BATCH_SIZE] =
                std::array::from_fn(|_| IoSliceMut::new(bufs.next().map_or(&mut [][..], |b| b)));
            match udp
                .state
                .recv(UdpSockRef::from(&udp.sock), &mut iovs, &mut meta)
            {
                Ok(n) => n,
                Err(_) => {
                    udp.wait_readable();
                    continue;
                }
            }
        };
        if dropped_link_down(&shared, &meta[..n]) {
            continue;
        }
        for (buf, m) in rx.iter().zip(&meta).take(n) {
            let stride = m.stride.max(1);
            for dgram in buf[..m.len].chunks(stride) {
                let from = SocketAddr::new(m.addr.ip().to_canonical(), m.addr.port());
                if transport::is_wireguard(dgram) {
                    decrypt_one(&shared, &udp, &mut dev, &mut reply, from, dgram);
                } else {
                    let now = Instant::now();
                    match shared
                        .transport
                        .on_datagram(&udp, from, dgram, now, &mut uses)
                    {
                        Some(Inbound::Relayed(relay, inner)) => {
                            decrypt_one(&shared, &udp, &mut dev, &mut reply, relay, inner)
                        }
                        Some(Inbound::Done) => {}
                        Some(Inbound::UnknownKey) => {
                            shared.counters.unknown_key.fetch_add(1, Relaxed);
                        }
                        None => {
                            shared.counters.malformed.fetch_add(1, Relaxed);
                        }
                    }
                    apply_paths(&shared, &udp, &uses, now);
                    uses.clear();
                }
                if dev.count == dev.bufs.len() {
                    dev.flush(&shared);
                }
            }
        }
        dev.flush(&shared);
    }
}

/// Decrypts datagrams that arrived outside the UDP socket (the relay over
/// TCP) and writes their packets to the device, batched as the network
/// loop does.
pub(super) struct SideReceiver {
    dev: DeviceBatch,
    reply: Vec<u8>,
}

impl SideReceiver {
    pub fn new(shared: &Shared) -> Self {
        let off = shared.device.headroom();
        Self {
            dev: DeviceBatch {
                bufs: (0..BATCH).map(|_| out_buffer(off)).collect(),
                count: 0,
                off,
                vip: InCursor::default(),
            },
            reply: vec![0u8; MAX_DATAGRAM],
        }
    }

    /// One WireGuard datagram, as if from `from`.
    pub fn receive(&mut self, shared: &Shared, udp: &Udp, from: SocketAddr, dgram: &[u8]) {
        decrypt_one(shared, udp, &mut self.dev, &mut self.reply, from, dgram);
        if self.dev.count == self.dev.bufs.len() {
            self.dev.flush(shared);
        }
    }

    /// Writes what is pending to the device.
    pub fn flush(&mut self, shared: &Shared) {
        self.dev.flush(shared);
    }
}

/// The engine's side of the relay over TCP: its WireGuard datagrams are
/// decrypted and written to the device as the network loop does, and the
/// path choices made on its thread are applied.
pub(crate) struct TcpSink {
    shared: Arc<Shared>,
    side: SideReceiver,
}

impl TcpSink {
    pub fn new(shared: Arc<Shared>) -> Self {
        let side = SideReceiver::new(&shared);
        Self { shared, side }
    }
}

impl Sink for TcpSink {
    fn wireguard(&mut self, from: SocketAddr, dgram: &[u8]) {
        let (udp, _) = self.shared.transport.udp();
        self.side.receive(&self.shared, &udp, from, dgram);
    }

    fn paths(&mut self, uses: &[PathUse]) {
        let (udp, _) = self.shared.transport.udp();
        apply_paths(&self.shared, &udp, uses, Instant::now());
    }

    fn flush(&mut self) {
        self.side.flush(&self.shared);
    }
}

/// The peer a datagram is for: by sender key for handshake initiations, by
/// receiver index otherwise. Counts why when there is none.
fn peer_for(shared: &Shared, udp: &Udp, from: SocketAddr, dgram: &[u8]) -> Option<Arc<Peer>> {
    let table = shared.table.read();
    let counters = &shared.counters;
    let index = match Tunn::parse_incoming_packet(dgram) {
        Ok(Packet::HandshakeInit(_)) => {
            let key = shared.key.read();
            let k = key.as_ref()?;
            let mut cookie = [0u8; 64];
            let init = match k.limiter.verify_packet(Some(from.ip()), dgram, &mut cookie) {
                Ok(Packet::HandshakeInit(init)) => init,
                Err(TunnResult::WriteToNetwork(reply)) => {
                    let n = reply.len();
                    if let Err(e) = udp.send(from, &cookie[..n], n) {
                        send_failed(shared, None, from, &e);
                    }
                    return None;
                }
                _ => {
                    counters.malformed.fetch_add(1, Relaxed);
                    return None;
                }
            };
            let half = parse_handshake_anon(&k.secret, &k.public, &init).ok();
            let peer = half.and_then(|h| {
                let key = crate::keys::PublicKey::from_bytes(h.peer_static_public);
                table.by_key(&key).map(|(_, p)| p.clone())
            });
            if peer.is_none() {
                counters.unknown_key.fetch_add(1, Relaxed);
            }
            return peer;
        }
        Ok(Packet::HandshakeResponse(p)) => p.receiver_idx,
        Ok(Packet::PacketCookieReply(p)) => p.receiver_idx,
        Ok(Packet::PacketData(p)) => p.receiver_idx,
        Err(_) => {
            counters.malformed.fetch_add(1, Relaxed);
            return None;
        }
    };
    let peer = table.by_index(index >> 8).cloned();
    if peer.is_none() {
        counters.unknown_index.fetch_add(1, Relaxed);
    }
    peer
}

/// Decrypts one datagram for its peer and queues the clear text for the
/// device, or sends the protocol answer (handshake response, queued data).
fn decrypt_one(
    shared: &Shared,
    udp: &Udp,
    dev: &mut DeviceBatch,
    reply: &mut [u8],
    from: SocketAddr,
    dgram: &[u8],
) {
    let Some(peer) = peer_for(shared, udp, from, dgram) else {
        return;
    };
    let off = dev.off;
    let buf = &mut dev.bufs[dev.count];
    buf.resize(off + dgram.len(), 0);
    let mut tunn = peer.tunn.lock();
    let (len, src) = match tunn.decapsulate(Some(from.ip()), dgram, &mut buf[off..]) {
        TunnResult::WriteToTunnelV4(p, src) => (p.len(), IpAddr::V4(src)),
        TunnResult::WriteToTunnelV6(p, src) => (p.len(), IpAddr::V6(src)),
        TunnResult::Done => {
            drop(tunn);
            if is_handshake(dgram) {
                *peer.last_handshake.lock() = Some(std::time::SystemTime::now());
            }
            authenticated(&peer, from, dgram.len());
            return;
        }
        TunnResult::WriteToNetwork(p) => {
            let n = p.len();
            drop(tunn);
            let result = shared
                .transport
                .send_to(udp, peer.relay_ip(), from, &buf[off..off + n]);
            sent(shared, &peer, from, n, result);
            flush_queued(shared, udp, from, reply, &peer);
            if is_handshake(dgram) {
                *peer.last_handshake.lock() = Some(std::time::SystemTime::now());
            }
            authenticated(&peer, from, dgram.len());
            return;
        }
        TunnResult::Err(e) => {
            if !matches!(e, WireGuardError::UnderLoad) {
                peer.drop_rejected.fetch_add(1, Relaxed);
            }
            return;
        }
    };
    drop(tunn);
    authenticated(&peer, from, dgram.len());
    if !accept_in(shared, &peer, &mut dev.vip, src, &buf[off..off + len]) {
        return;
    }
    buf.truncate(off + len);
    buf[..off].fill(0);
    dev.count += 1;
}

/// Whether a decrypted `packet` from `peer` with inner source `src` may be
/// written to the device: the source is in the peer's allowed IPs, or it
/// is a service address answering for a flow pinned to this peer. Counts
/// spoofed sources.
pub(super) fn accept_in(
    shared: &Shared,
    peer: &Arc<Peer>,
    vip: &mut InCursor,
    src: IpAddr,
    packet: &[u8],
) -> bool {
    let allowed = shared
        .table
        .read()
        .by_ip(src)
        .is_some_and(|(_, p)| Arc::ptr_eq(p, peer));
    if allowed {
        return true;
    }
    // A service address answers only for flows pinned to this peer.
    let verdict = match src {
        IpAddr::V4(v4) if shared.vips.covers(v4) => vip.check(shared, peer, packet),
        _ => Reply::Foreign,
    };
    match verdict {
        Reply::Accept => true,
        Reply::Drop => false,
        Reply::Foreign => {
            peer.drop_spoofed.fetch_add(1, Relaxed);
            false
        }
    }
}

/// The length an IP packet's header gives and its source address, as
/// boringtun checks a decrypted packet; `None` when `packet` is not an IP
/// packet or is shorter than its header says.
pub(super) fn inner_packet(packet: &[u8]) -> Option<(usize, IpAddr)> {
    let (len, src) = match packet.first()? >> 4 {
        4 if packet.len() >= 20 => {
            let len = u16::from_be_bytes([packet[2], packet[3]]) as usize;
            let src: [u8; 4] = packet[12..16].try_into().ok()?;
            (len, IpAddr::from(src))
        }
        6 if packet.len() >= 40 => {
            let len = u16::from_be_bytes([packet[4], packet[5]]) as usize + 40;
            let src: [u8; 16] = packet[8..24].try_into().ok()?;
            (len, IpAddr::from(src))
        }
        _ => return None,
    };
    (len <= packet.len()).then_some((len, src))
}

/// True for a handshake initiation or response (message types 1 and 2),
/// which, once accepted, complete a handshake on our side.
fn is_handshake(dgram: &[u8]) -> bool {
    matches!(dgram.first(), Some(1 | 2))
}

/// Records an authenticated datagram: counters and endpoint roaming (only
/// for peers without path selection, whose manager decides instead).
pub(super) fn authenticated(peer: &Peer, from: SocketAddr, len: usize) {
    peer.rx_bytes.fetch_add(len as u64, Relaxed);
    if peer.is_managed() {
        return;
    }
    let mut ep = peer.endpoint.lock();
    if *ep != Some(from) {
        *ep = Some(from);
    }
}

/// After a handshake message, sends the packets boringtun queued meanwhile
/// (the session's lock is taken for each, and not held while it is sent),
/// unless another thread is already sending them.
fn flush_queued(shared: &Shared, udp: &Udp, to: SocketAddr, buf: &mut [u8], peer: &Peer) {
    {
        let tunn = peer.tunn.lock();
        // Without a session to send with, boringtun would take each
        // packet off the front and queue it again at the back (the queue
        // turning over): leave it for when there is one.
        if peer.draining.load(Relaxed) || tunn.queued_packets() == 0 || !tunn.has_session() {
            return;
        }
        peer.draining.store(true, Relaxed);
    }
    drain_with(shared, udp, to, buf, peer);
}

/// Most packets one drain sends: the queue holds 256, and packets read
/// meanwhile join it.
const DRAIN_MAX: usize = 1024;

/// Whether `packet` must wait behind the packets queued for a session (so
/// it leaves after them, in the order read): `Some(true)` when it was
/// queued and this thread is now the one to send the queue
/// ([`drain_queue`]), `Some(false)` when it was queued and another thread
/// sends it, `None` when it may be sent now. Without a session the queue is
/// `encapsulate`'s (it keeps the order itself).
pub(super) fn queue_behind(tunn: &mut Tunn, peer: &Peer, packet: &[u8]) -> Option<bool> {
    let draining = peer.draining.load(Relaxed);
    if !draining && (tunn.queued_packets() == 0 || !tunn.has_session()) {
        return None;
    }
    tunn.queue(packet);
    if draining {
        return Some(false);
    }
    peer.draining.store(true, Relaxed);
    Some(true)
}

/// Sends `peer`'s queue to `to` after [`queue_behind`] made this thread
/// its sender.
pub(super) fn drain_queue(shared: &Shared, udp: &Udp, to: SocketAddr, peer: &Peer) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    drain_with(shared, udp, to, &mut buf, peer);
}

/// Sends the queue (this thread set `peer.draining`), then clears the flag
/// with the queue empty, under the lock, so no packet is left behind.
fn drain_with(shared: &Shared, udp: &Udp, to: SocketAddr, buf: &mut [u8], peer: &Peer) {
    for _ in 0..DRAIN_MAX {
        let mut tunn = peer.tunn.lock();
        if !tunn.has_session() {
            // The session went (key change): the queue waits for the next.
            peer.draining.store(false, Relaxed);
            return;
        }
        let n = match tunn.decapsulate(None, &[], buf) {
            TunnResult::WriteToNetwork(p) => p.len(),
            _ => {
                peer.draining.store(false, Relaxed);
                return;
            }
        };
        drop(tunn);
        let result = shared
            .transport
            .send_to(udp, peer.relay_ip(), to, &buf[..n]);
        sent(shared, peer, to, n, result);
    }
    // Still more: the next packet read finds them queued and sends them.
    let _tunn = peer.tunn.lock();
    peer.draining.store(false, Relaxed);
}

/// How often a handshake is re-sent on a new path while no session exists.
const KICK_EVERY: Duration = Duration::from_millis(500);
/// For how long after the path came up.
const KICK_FOR: Duration = Duration::from_secs(10);

/// Applies the transport's path choices: each managed peer's endpoint
/// follows its path. A handshake that went out on no path or a dead one is
/// sent again at once on a confirmed path (not after WireGuard's 5 s
/// retry), so the first packets of a new peer wait for the relay or a
/// direct path only as long as those take.
pub(crate) fn apply_paths(shared: &Shared, udp: &Udp, uses: &[PathUse], now: Instant) {
    for u in uses {
        let peer = shared.table.read().by_key(&u.key).map(|(_, p)| p.clone());
        if let Some(peer) = peer.filter(|p| p.is_managed()) {
            apply_path(shared, udp, &peer, u, now);
        }
    }
}

fn apply_path(shared: &Shared, udp: &Udp, peer: &Peer, u: &PathUse, now: Instant) {
    peer.via_relay.store(matches!(u.path, Path::Relay), Relaxed);
    let Some(t) = u.target else { return };
    let changed = {
        let mut ep = peer.endpoint.lock();
        let changed = *ep != Some(t);
        if changed {
            tracing::info!(peer = %peer.key, from = ?*ep, to = %t, path = ?u.path, "peer path changed");
            *ep = Some(t);
        }
        changed
    };
    if matches!(u.path, Path::Blind(_)) {
        return;
    }
    {
        let mut kick = peer.kick.lock();
        if changed {
            kick.until = Some(now + KICK_FOR);
        } else if kick.until.is_none_or(|until| now >= until)
            || kick
                .last
                .is_some_and(|k| now.duration_since(k) < KICK_EVERY)
        {
            return;
        }
        kick.last = Some(now);
    }
    let mut buf = [0u8; 256];
    let mut tunn = peer.tunn.lock();
    if tunn.time_since_last_handshake().is_some() {
        return;
    }
    if let TunnResult::WriteToNetwork(p) = tunn.format_handshake_initiation(&mut buf, true) {
        let n = p.len();
        drop(tunn);
        let result = shared.transport.send_to(udp, peer.relay_ip(), t, &buf[..n]);
        sent(shared, peer, t, n, result);
    }
}

/// Every [`TICK`]: boringtun's timers (handshake retries, rekeys, passive
/// keepalives) and our persistent keepalives, for every peer; every second
/// the expiry of service flows.
pub(crate) fn timer_loop(shared: Arc<Shared>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut current = CurrentUdp::new(&shared);
    let mut ticks = 0u32;
    while !shared.stop.load(Relaxed) {
        std::thread::sleep(TICK);
        ticks = ticks.wrapping_add(1);
        {
            // Service flows: idle expiry and unanswered SYNs once a second;
            // flows held for a wake every tick (refused within 100 ms of
            // their wake timeout).
            let held = {
                let mut table = shared.vips.table.lock();
                let now = std::time::Instant::now();
                if ticks % 10 == 0 {
                    table.expire(now);
                } else {
                    table.expire_held(now);
                }
                table.take_held()
            };
            super::vip::write_held(&shared, held);
        }
        match &*shared.key.read() {
            None => continue,
            Some(k) if ticks % 10 == 0 => k.limiter.reset_count(),
            Some(_) => {}
        }
        if !shared.link_up.load(Relaxed) {
            continue;
        }
        let udp = current.refresh(&shared);
        let peers: Vec<Arc<Peer>> = shared.table.read().iter().map(|(_, p)| p.clone()).collect();
        let managed: Vec<_> = peers
            .iter()
            .filter(|p| p.is_managed())
            .map(|p| p.key)
            .collect();
        let now = Instant::now();
        let uses = shared.transport.tick(udp, now, &managed);
        apply_paths(&shared, udp, &uses, now);
        let now = shared.now_ms();
        for peer in peers {
            tick_peer(&shared, &peer, udp, &mut buf, now);
        }
    }
}

/// Follows the device's link state into `shared.link_up` as the device
/// reports changes ([`super::Device::wait_link`]: at once for a TUN device,
/// which reads the kernel's link notifications, as wireguard-go does).
pub(crate) fn link_loop(shared: Arc<Shared>) {
    while !shared.stop.load(Relaxed) {
        if let Some(up) = shared.device.wait_link(TICK) {
            set_link(&shared, up);
        }
    }
}

/// Whether the link is up: the flag, and when it says down the device
/// itself, so a datagram that arrives between the link coming up and the
/// link loop hearing of it is answered, not dropped (the peer would wait
/// for its 5 s rekey timeout to try again). Only the link loop writes the
/// flag, so a late answer here never overwrites a newer state.
pub(super) fn link_is_up(shared: &Shared) -> bool {
    shared.link_up.load(Relaxed) || shared.device.is_up()
}

/// Stores the link state in `shared.link_up`, logging changes. While the
/// link is down nothing is sent: no handshakes, no keepalives, no answers
/// (wireguard-go waits for the interface to be up).
fn set_link(shared: &Shared, up: bool) {
    if shared.link_up.swap(up, Relaxed) != up {
        tracing::info!(
            "link {}",
            if up {
                "up: sending"
            } else {
                "down: not sending"
            }
        );
    }
}

fn tick_peer(shared: &Shared, peer: &Peer, udp: &Udp, buf: &mut [u8], now_ms: u64) {
    let endpoint = *peer.endpoint.lock();
    let mut tunn = peer.tunn.lock();
    let mut len = 0usize;
    if let TunnResult::WriteToNetwork(p) = tunn.update_timers(buf) {
        len = p.len();
    }
    let ka = u64::from(peer.keepalive.load(Relaxed)) * 1000;
    let last = peer.last_tx_ms.load(Relaxed);
    if len == 0 && ka > 0 && (last == 0 || now_ms.saturating_sub(last) >= ka) {
        if let TunnResult::WriteToNetwork(p) = tunn.encapsulate(&[], buf) {
            len = p.len();
        }
    }
    drop(tunn);
    if let (Some(to), true) = (endpoint, len > 0) {
        // The keepalive clock runs from the attempt, sent or not.
        peer.last_tx_ms.store(now_ms, Relaxed);
        let result = shared
            .transport
            .send_to(udp, peer.relay_ip(), to, &buf[..len]);
        sent(shared, peer, to, len, result);
    }
}
