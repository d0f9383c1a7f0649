//! The packet loops with the crypto pool ([`super::crypt`]): a batch read
//! from the device or the socket becomes a job, staged on the loop's thread
//! (routes, sessions, counters, the layout of its GSO sends), sealed or
//! opened on a worker, and sent or written in order by whoever finishes it.
//! With no pool the loops in [`super::io`] do all of it on their own
//! thread.

use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use boringtun::noise::Session;
use quinn_udp::{RecvMeta, UdpSockRef};

use super::crypt::{Job, Lane, Pool};
use super::device::{out_buffer, BATCH, MAX_SUPER_PACKET};
use super::io::{
    accept_in, apply_paths, authenticated, drain_queue, dropped_link_down, inner_packet,
    link_is_up, queue_behind, read_failed, route_out, CurrentUdp, SideReceiver, MAX_DATAGRAM,
    MAX_GSO_BYTES,
};
use super::peer::Peer;
use super::send::{encapsulate_alone, send_alone, sent};
use super::shared::Shared;
use super::transport::{self, Inbound};
use super::udp::Udp;
use super::vip::{InCursor, OutCursor};
use crate::nat::relay;

/// A batch of at most this many packets, read while nothing is in flight,
/// is handled on the loop's own thread: a ping or a request waits for no
/// other thread.
const INLINE_MAX: usize = 4;

/// Socket buffers (each up to 64 KiB of GRO-coalesced datagrams) one
/// receive job reads at most.
const RX_BUFS: usize = 8;

/// Bytes a data packet adds to its clear text: type, receiver index and
/// counter (16), and the tag (16). boringtun does not pad.
const DATA_OVERHEAD: usize = 32;

/// Consecutive datagrams of one job to one destination, sent as one GSO
/// send: all `segment` bytes long except possibly the last.
struct Group {
    start: usize,
    len: usize,
    count: usize,
    segment: usize,
    max: usize,
    dest: SocketAddr,
    peer: Arc<Peer>,
}

/// One packet to seal: its clear text, session, counter and place.
struct SealItem {
    packet: usize,
    session: usize,
    counter: u64,
    /// Where its WireGuard datagram starts in `out`.
    at: usize,
}

/// Packets read from the device, to seal and send.
pub(crate) struct SealJob {
    off: usize,
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    items: Vec<SealItem>,
    sessions: Vec<Arc<Session>>,
    out: Vec<u8>,
    used: usize,
    groups: Vec<Group>,
    udp: Option<Arc<Udp>>,
}

/// What finishing a [`SealJob`] needs.
pub(crate) struct SealFinish {
    shared: Arc<Shared>,
}

impl SealJob {
    fn new(off: usize) -> Self {
        Self {
            off,
            bufs: vec![vec![0u8; off + MAX_DATAGRAM]; BATCH],
            sizes: vec![0; BATCH],
            items: Vec::with_capacity(BATCH),
            sessions: Vec::new(),
            out: Vec::new(),
            used: 0,
            groups: Vec::new(),
            udp: None,
        }
    }

    /// Routes the first `n` packets read and takes, for each, its peer's
    /// session and a counter (in this order, which is the order they are
    /// sent in), and its place in the GSO sends.
    fn stage(
        &mut self,
        shared: &Shared,
        udp: &Arc<Udp>,
        n: usize,
        vip: &mut OutCursor,
        last: &mut Option<(IpAddr, Arc<Peer>)>,
    ) {
        self.udp = Some(udp.clone());
        let max_segments = udp.state.max_gso_segments().max(1);
        let mut current: Option<(Arc<Peer>, usize)> = None;
        for i in 0..n {
            let size = self.sizes[i];
            let packet = &self.bufs[i][self.off..self.off + size];
            let Some((peer, endpoint, relayed)) = route_out(shared, last, vip, packet) else {
                continue;
            };
            let hdr = if relayed.is_some() {
                relay::SEND_HEADER
            } else {
                0
            };
            let len = size + DATA_OVERHEAD + hdr;
            if len > MAX_DATAGRAM {
                continue;
            }
            let session = match &current {
                Some((p, s)) if Arc::ptr_eq(p, &peer) => *s,
                _ => {
                    let got = {
                        let mut tunn = peer.tunn.lock();
                        match queue_behind(&mut tunn, &peer, packet) {
                            Some(drain) => Got::Queued { drain },
                            None => match tunn.sending_session(size, size > 0) {
                                Some(session) => Got::Session(session),
                                // No session: boringtun queues the packet
                                // and starts a handshake, as without the
                                // pool. Under the same lock: a session
                                // coming up in between would seal this
                                // packet ahead of the queue being sent.
                                None => Got::Alone(encapsulate_alone(&mut tunn, packet)),
                            },
                        }
                    };
                    let session = match got {
                        Got::Session(session) => session,
                        Got::Queued { drain } => {
                            // Queued behind packets that waited for the
                            // session: they and it leave now, in order
                            // (this job's earlier packets went to other
                            // peers, or wait in the queue too).
                            current = None;
                            if drain {
                                drain_queue(shared, udp, endpoint, &peer);
                            }
                            continue;
                        }
                        Got::Alone(dgram) => {
                            current = None;
                            if let Some(dgram) = dgram {
                                send_alone(shared, &peer, endpoint, &dgram);
                            }
                            continue;
                        }
                    };
                    self.sessions.push(session);
                    current = Some((peer.clone(), self.sessions.len() - 1));
                    self.sessions.len() - 1
                }
            };
            let counter = self.sessions[session].reserve_counters(1);
            let at = self.place(max_segments, &peer, endpoint, len);
            if let Some((ip, token)) = relayed {
                relay::send_header(&mut self.out[at..], ip, token);
            }
            self.items.push(SealItem {
                packet: i,
                session,
                counter,
                at: at + hdr,
            });
        }
    }

    /// Where a datagram of `len` bytes to `dest` goes in `out`: appended to
    /// the last GSO send when it can be, else starting a new one.
    fn place(&mut self, max: usize, peer: &Arc<Peer>, dest: SocketAddr, len: usize) -> usize {
        let at = self.used;
        match self.groups.last_mut() {
            Some(g)
                if g.dest == dest
                    && Arc::ptr_eq(&g.peer, peer)
                    && len <= g.segment
                    && g.count < g.max
                    && g.len + len <= MAX_GSO_BYTES
                    && g.len % g.segment == 0 =>
            {
                g.len += len;
                g.count += 1;
            }
            _ => self.groups.push(Group {
                start: at,
                len,
                count: 1,
                segment: len,
                max,
                dest,
                peer: peer.clone(),
            }),
        }
        self.used += len;
        if self.out.len() < self.used {
            self.out.resize(self.used, 0);
        }
        at
    }
}

/// What staging found for a packet under its peer's tunnel lock.
enum Got {
    /// The session to seal it with.
    Session(Arc<Session>),
    /// Queued behind packets waiting for the session (`drain`: this
    /// thread sends the queue).
    Queued { drain: bool },
    /// No session: queued by boringtun, with the handshake initiation to
    /// send if one was due.
    Alone(Option<Vec<u8>>),
}

impl Job for SealJob {
    type Finish = SealFinish;

    fn work(&mut self) {
        for item in &self.items {
            let size = self.sizes[item.packet];
            let packet = &self.bufs[item.packet][self.off..self.off + size];
            let dst = &mut self.out[item.at..item.at + size + DATA_OVERHEAD];
            self.sessions[item.session].seal(item.counter, packet, dst);
        }
    }

    fn finish(&mut self, state: &mut SealFinish) {
        let Some(udp) = self.udp.as_ref() else { return };
        let shared = &*state.shared;
        for g in &self.groups {
            let data = &self.out[g.start..g.start + g.len];
            let result = shared.transport.transmit(udp, g.dest, data, g.segment);
            sent(shared, &g.peer, g.dest, g.len, result);
        }
    }

    fn reset(&mut self) {
        self.items.clear();
        self.sessions.clear();
        self.groups.clear();
        self.used = 0;
        self.udp = None;
    }
}

/// [`super::io::device_loop`] with the crypto pool.
pub(crate) fn device_loop(shared: Arc<Shared>, queue: usize, pool: Arc<Pool>) {
    let device = shared.device.clone();
    let off = device.headroom();
    let mut scratch = vec![0u8; MAX_SUPER_PACKET];
    let finish = SealFinish {
        shared: shared.clone(),
    };
    let lane = Lane::new(pool, finish, move || SealJob::new(off));
    let mut udp = CurrentUdp::new(&shared);
    let mut vip = OutCursor::new(off);
    let mut errors = 0u32;
    while !shared.stop.load(Relaxed) {
        let Some(mut job) = lane.take() else { break };
        let n = match device.recv_batch(queue, &mut scratch, &mut job.bufs, &mut job.sizes) {
            Ok(n) => n,
            Err(e) => {
                lane.give_back(job);
                if e.kind() != io::ErrorKind::Interrupted && read_failed(&shared, &mut errors, &e) {
                    break;
                }
                continue;
            }
        };
        errors = 0;
        if shared.key.read().is_none() || !link_is_up(&shared) {
            lane.give_back(job);
            continue;
        }
        let udp = udp.refresh(&shared);
        let mut last = None;
        job.stage(&shared, udp, n, &mut vip, &mut last);
        vip.end_batch(&shared);
        let items = job.items.len();
        dispatch(&lane, job, items);
    }
}

/// Hands a staged job of `items` packets on: back to the free list when
/// it holds none, run on this thread when small and nothing is in flight
/// (a ping takes no hop), else to the pool.
fn dispatch<J: Job>(lane: &Arc<Lane<J>>, job: J, items: usize) {
    if items == 0 {
        lane.give_back(job);
    } else if items <= INLINE_MAX && lane.idle() {
        lane.run_here(job);
    } else {
        lane.submit(job);
    }
}

/// One data datagram to open: where it is, who sent it, its session.
struct OpenItem {
    buf: usize,
    start: usize,
    len: usize,
    from: SocketAddr,
    session: usize,
    /// Length of the clear text once opened; `None`: rejected.
    opened: Option<usize>,
}

/// Datagrams read from the socket, to open and write to the device.
pub(crate) struct OpenJob {
    off: usize,
    rx: Vec<Vec<u8>>,
    meta: Vec<RecvMeta>,
    items: Vec<OpenItem>,
    /// The sessions of this job's datagrams, with their peer and index.
    sessions: Vec<(Arc<Peer>, Arc<Session>, u32)>,
    /// Clear text, one buffer per item (with the device's headroom).
    out: Vec<Vec<u8>>,
}

/// What finishing an [`OpenJob`] needs: the engine, and the flow cursor of
/// service addresses across jobs.
pub(crate) struct OpenFinish {
    shared: Arc<Shared>,
    vip: InCursor,
}

impl OpenJob {
    fn new(off: usize) -> Self {
        Self {
            off,
            rx: vec![vec![0u8; MAX_DATAGRAM]; RX_BUFS],
            meta: vec![RecvMeta::default(); RX_BUFS],
            items: Vec::new(),
            sessions: Vec::new(),
            out: Vec::new(),
        }
    }

    /// Reads one batch from the socket: the number of buffers filled.
    fn recv(&mut self, udp: &Udp) -> io::Result<usize> {
        let mut bufs = self.rx.iter_mut();
        let mut iovs: [IoSliceMut; RX_BUFS] =
            std::array::from_fn(|_| IoSliceMut::new(bufs.next().map_or(&mut [][..], |b| b)));
        udp.state
            .recv(UdpSockRef::from(&udp.sock), &mut iovs, &mut self.meta)
    }

    /// Sorts the `n` buffers read: data datagrams of a known session
    /// become items (in the order read); everything else (handshakes,
    /// STUN, relay control, data without a session) is handled here as
    /// without the pool, through `side`.
    fn stage(
        &mut self,
        shared: &Shared,
        udp: &Udp,
        n: usize,
        side: &mut SideReceiver,
        uses: &mut Vec<transport::PathUse>,
    ) {
        let Self {
            rx,
            meta,
            items,
            sessions,
            ..
        } = self;
        for (b, (buf, m)) in rx.iter().zip(meta.iter()).enumerate().take(n) {
            let stride = m.stride.max(1);
            for (k, dgram) in buf[..m.len].chunks(stride).enumerate() {
                let from = SocketAddr::new(m.addr.ip().to_canonical(), m.addr.port());
                let (from, start, dgram) = if transport::is_wireguard(dgram) {
                    (from, k * stride, dgram)
                } else {
                    let now = Instant::now();
                    let inbound = shared.transport.on_datagram(udp, from, dgram, now, uses);
                    let relayed = match inbound {
                        Some(Inbound::Relayed(relay, inner)) => {
                            let start = inner.as_ptr() as usize - buf.as_ptr() as usize;
                            Some((relay, start, inner))
                        }
                        Some(Inbound::Done) => None,
                        Some(Inbound::UnknownKey) => {
                            shared.counters.unknown_key.fetch_add(1, Relaxed);
                            None
                        }
                        None => {
                            shared.counters.malformed.fetch_add(1, Relaxed);
                            None
                        }
                    };
                    apply_paths(shared, udp, uses, now);
                    uses.clear();
                    match relayed {
                        Some(r) => r,
                        None => continue,
                    }
                };
                match data_session(shared, sessions, dgram) {
                    Some(session) => items.push(OpenItem {
                        buf: b,
                        start,
                        len: dgram.len(),
                        from,
                        session,
                        opened: None,
                    }),
                    None => side.receive(shared, udp, from, dgram),
                }
            }
        }
    }
}

/// For a data datagram whose session is known, that session's place in
/// `sessions` (added if new). `None` for anything else.
fn data_session(
    shared: &Shared,
    sessions: &mut Vec<(Arc<Peer>, Arc<Session>, u32)>,
    dgram: &[u8],
) -> Option<usize> {
    if dgram.len() < DATA_OVERHEAD || dgram[0] != 4 {
        return None;
    }
    let index = u32::from_le_bytes([dgram[4], dgram[5], dgram[6], dgram[7]]);
    if let Some(i) = sessions.iter().rposition(|(_, _, idx)| *idx == index) {
        return Some(i);
    }
    let peer = shared.table.read().by_index(index >> 8)?.clone();
    let session = peer.tunn.lock().receiving_session(index)?;
    sessions.push((peer, session, index));
    Some(sessions.len() - 1)
}

impl Job for OpenJob {
    type Finish = OpenFinish;

    fn work(&mut self) {
        let off = self.off;
        for (k, item) in self.items.iter_mut().enumerate() {
            if self.out.len() <= k {
                self.out.push(out_buffer(off));
            }
            let dgram = &self.rx[item.buf][item.start..item.start + item.len];
            let out = &mut self.out[k];
            out.resize(off + item.len - 16, 0);
            item.opened = self.sessions[item.session]
                .1
                .open(dgram, &mut out[off..])
                .ok();
        }
    }

    fn finish(&mut self, state: &mut OpenFinish) {
        let shared = &*state.shared;
        let off = self.off;
        let mut count = 0;
        // What the sessions' tunnels record, one lock per run of a session.
        let mut run: Option<(usize, usize, bool)> = None;
        let record = |run: Option<(usize, usize, bool)>| {
            if let Some((s, bytes, data)) = run {
                let (peer, _, index) = &self.sessions[s];
                peer.tunn.lock().received_data(*index, bytes, data);
            }
        };
        for k in 0..self.items.len() {
            let item = &self.items[k];
            let peer = &self.sessions[item.session].0;
            let Some(n) = item.opened else {
                peer.drop_rejected.fetch_add(1, Relaxed);
                continue;
            };
            let (len, src) = if n == 0 {
                (0, None)
            } else {
                match inner_packet(&self.out[k][off..off + n]) {
                    Some((len, src)) => (len, Some(src)),
                    None => {
                        peer.drop_rejected.fetch_add(1, Relaxed);
                        continue;
                    }
                }
            };
            match &mut run {
                Some((s, bytes, data)) if *s == item.session => {
                    *bytes += len;
                    *data |= len > 0;
                }
                _ => {
                    record(run.take());
                    run = Some((item.session, len, len > 0));
                }
            }
            authenticated(peer, item.from, item.len);
            let Some(src) = src else { continue };
            let out = &mut self.out[k];
            if !accept_in(shared, peer, &mut state.vip, src, &out[off..off + len]) {
                continue;
            }
            out.truncate(off + len);
            out[..off].fill(0);
            self.out.swap(k, count);
            count += 1;
        }
        record(run);
        for chunk in self.out[..count].chunks_mut(BATCH) {
            if let Err(e) = shared.device.send_batch(chunk) {
                tracing::trace!("device write: {e}");
            }
        }
        state.vip.end_batch(shared);
    }

    fn reset(&mut self) {
        self.items.clear();
        self.sessions.clear();
    }
}

/// [`super::io::network_loop`] with the crypto pool.
pub(crate) fn network_loop(shared: Arc<Shared>, pool: Arc<Pool>) {
    let off = shared.device.headroom();
    let finish = OpenFinish {
        shared: shared.clone(),
        vip: InCursor::default(),
    };
    let lane = Lane::new(pool, finish, move || OpenJob::new(off));
    let mut side = SideReceiver::new(&shared);
    let mut current = CurrentUdp::new(&shared);
    let mut uses = Vec::new();
    while !shared.stop.load(Relaxed) {
        let Some(mut job) = lane.take() else { break };
        let udp = current.refresh(&shared).clone();
        let n = match job.recv(&udp) {
            Ok(n) => n,
            Err(_) => {
                lane.give_back(job);
                udp.wait_readable();
                continue;
            }
        };
        if dropped_link_down(&shared, &job.meta[..n]) {
            lane.give_back(job);
            continue;
        }
        job.stage(&shared, &udp, n, &mut side, &mut uses);
        side.flush(&shared);
        let items = job.items.len();
        dispatch(&lane, job, items);
    }
}
