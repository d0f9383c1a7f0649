//! The bridge between the engine's threads and the smoltcp interface: two
//! bounded packet queues and a pool of recycled buffers, so no packet costs
//! an allocation once the pool has warmed up (onetun's slowness comes from a
//! channel of freshly allocated `Vec`s per packet).
//!
//! - engine → stack: [`StackDevice::send_batch`] copies decrypted packets
//!   into pooled buffers on the `inbound` queue and wakes the stack thread;
//! - stack → engine: smoltcp's transmit tokens fill pooled buffers on the
//!   `outbound` queue; [`StackDevice::recv_batch`] (the engine's device
//!   thread) copies them out and returns the buffers to the pool.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant as SmolInstant;

use crate::wg::device::Device;

/// Packets a queue holds at most; beyond, inbound packets are dropped (as a
/// NIC ring would) and smoltcp is told to retry outbound ones later.
pub(crate) const QUEUE_PACKETS: usize = 4096;

/// How long a blocked [`StackDevice::recv_batch`] sleeps before it checks
/// for shutdown again.
const RECV_WAIT: Duration = Duration::from_millis(100);

/// A wake-up flag for the stack thread.
#[derive(Default)]
pub(crate) struct Kick {
    pending: Mutex<bool>,
    cv: Condvar,
}

impl Kick {
    /// Asks the stack thread for one more poll.
    pub fn kick(&self) {
        let mut p = self.pending.lock();
        if !*p {
            *p = true;
            self.cv.notify_one();
        }
    }

    /// Waits for a kick or `timeout`, and clears the flag.
    pub fn wait(&self, timeout: Duration) {
        let mut p = self.pending.lock();
        if !*p {
            self.cv.wait_for(&mut p, timeout);
        }
        *p = false;
    }
}

/// The queues and buffer pool shared by the engine and the stack.
pub(crate) struct Queues {
    /// Decrypted packets from the engine, for smoltcp.
    inbound: Mutex<VecDeque<Vec<u8>>>,
    /// Packets from smoltcp, for the engine to encrypt.
    outbound: Mutex<VecDeque<Vec<u8>>>,
    outbound_cv: Condvar,
    /// Recycled packet buffers.
    free: Mutex<Vec<Vec<u8>>>,
    /// Wakes the stack thread.
    pub kick: Kick,
    stop: AtomicBool,
    mtu: usize,
}

impl Queues {
    pub fn new(mtu: usize) -> Self {
        Self {
            inbound: Mutex::new(VecDeque::with_capacity(QUEUE_PACKETS)),
            outbound: Mutex::new(VecDeque::with_capacity(QUEUE_PACKETS)),
            outbound_cv: Condvar::new(),
            free: Mutex::new(Vec::with_capacity(2 * QUEUE_PACKETS)),
            kick: Kick::default(),
            stop: AtomicBool::new(false),
            mtu,
        }
    }

    /// A buffer from the pool (allocated only while the pool warms up).
    fn take(&self) -> Vec<u8> {
        self.free
            .lock()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(self.mtu))
    }

    /// Returns a buffer to the pool.
    fn give(&self, mut buf: Vec<u8>) {
        buf.clear();
        let mut free = self.free.lock();
        if free.len() < 2 * QUEUE_PACKETS {
            free.push(buf);
        }
    }

    /// Queues a packet from the engine; false when the queue is full (the
    /// packet is dropped) or the packet is larger than the MTU.
    pub fn push_inbound(&self, packet: &[u8]) -> bool {
        if packet.len() > self.mtu {
            return false;
        }
        let mut buf = self.take();
        buf.extend_from_slice(packet);
        let mut q = self.inbound.lock();
        if q.len() >= QUEUE_PACKETS {
            drop(q);
            self.give(buf);
            return false;
        }
        q.push_back(buf);
        true
    }

    /// Queues a packet the stack made itself (a reset) for the engine;
    /// false when the queue is full (the packet is dropped).
    pub fn push_outbound(&self, packet: &[u8]) -> bool {
        let mut buf = self.take();
        buf.extend_from_slice(packet);
        let mut q = self.outbound.lock();
        if q.len() >= QUEUE_PACKETS {
            drop(q);
            self.give(buf);
            return false;
        }
        q.push_back(buf);
        self.outbound_cv.notify_one();
        true
    }

    /// Number of packets waiting for the stack.
    pub fn inbound_len(&self) -> usize {
        self.inbound.lock().len()
    }

    /// Calls `f` on each of the first `limit` waiting inbound packets, so the
    /// stack sees connection openings before smoltcp does; drops those for
    /// which `f` returns false. Returns how many of them are left.
    pub fn scan_inbound(&self, limit: usize, mut f: impl FnMut(&[u8]) -> bool) -> usize {
        let mut q = self.inbound.lock();
        let (mut kept, mut seen) = (0, 0);
        while seen < limit && kept < q.len() {
            seen += 1;
            if f(&q[kept]) {
                kept += 1;
            } else if let Some(p) = q.remove(kept) {
                self.give(p);
            }
        }
        kept
    }

    /// Stops: a blocked [`StackDevice::recv_batch`] returns `Interrupted`.
    pub fn stop(&self) {
        self.stop.store(true, Relaxed);
        self.outbound_cv.notify_all();
        self.kick.kick();
    }

    /// True once [`Queues::stop`] was called.
    pub fn stopped(&self) -> bool {
        self.stop.load(Relaxed)
    }
}

/// The engine's view of the stack: implements [`Device`] (headroom 0).
pub struct StackDevice {
    pub(crate) queues: Arc<Queues>,
}

impl Device for StackDevice {
    fn headroom(&self) -> usize {
        0
    }

    fn recv_batch(
        &self,
        _queue: usize,
        _scratch: &mut [u8],
        bufs: &mut [Vec<u8>],
        sizes: &mut [usize],
    ) -> io::Result<usize> {
        // One queue (the default of `Device::queues`): the stack has one thread.
        let q = &self.queues;
        let mut out = q.outbound.lock();
        while out.is_empty() {
            if q.stopped() {
                return Err(io::ErrorKind::Interrupted.into());
            }
            q.outbound_cv.wait_for(&mut out, RECV_WAIT);
        }
        let mut n = 0;
        while n < bufs.len() {
            let Some(p) = out.pop_front() else { break };
            let len = p.len().min(bufs[n].len());
            bufs[n][..len].copy_from_slice(&p[..len]);
            sizes[n] = len;
            n += 1;
            q.give(p);
        }
        drop(out);
        // Room was made in the outbound queue: smoltcp may send more.
        q.kick.kick();
        Ok(n)
    }

    fn send_batch(&self, bufs: &mut [Vec<u8>]) -> io::Result<()> {
        for b in bufs.iter() {
            self.queues.push_inbound(b);
        }
        self.queues.kick.kick();
        Ok(())
    }

    fn interrupt(&self) {
        self.queues.stop();
    }
}

/// smoltcp's view of the queues, for one `Interface::poll`.
pub(crate) struct Phy<'q> {
    pub queues: &'q Queues,
    /// Inbound packets smoltcp may still take in this poll (those the stack
    /// scanned for connection openings).
    pub rx_budget: usize,
}

impl phy::Device for Phy<'_> {
    type RxToken<'a>
        = RxToken<'a>
    where
        Self: 'a;
    type TxToken<'a>
        = TxToken<'a>
    where
        Self: 'a;

    fn receive(&mut self, _now: SmolInstant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        if self.rx_budget == 0 {
            return None;
        }
        let buf = self.queues.inbound.lock().pop_front()?;
        self.rx_budget -= 1;
        Some((
            RxToken {
                queues: self.queues,
                buf,
            },
            TxToken {
                queues: self.queues,
            },
        ))
    }

    fn transmit(&mut self, _now: SmolInstant) -> Option<TxToken<'_>> {
        if self.queues.outbound.lock().len() >= QUEUE_PACKETS {
            return None;
        }
        Some(TxToken {
            queues: self.queues,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.queues.mtu;
        caps
    }
}

/// One received packet, returned to the pool once smoltcp has read it.
pub(crate) struct RxToken<'q> {
    queues: &'q Queues,
    buf: Vec<u8>,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let r = f(&self.buf);
        self.queues.give(self.buf);
        r
    }
}

/// Room for one packet on the outbound queue.
pub(crate) struct TxToken<'q> {
    queues: &'q Queues,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let q = self.queues;
        let mut buf = q.take();
        buf.resize(len, 0);
        let r = f(&mut buf);
        q.outbound.lock().push_back(buf);
        q.outbound_cv.notify_one();
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::phy::{Device as _, RxToken as _, TxToken as _};

    #[test]
    fn packets_cross_both_ways_and_buffers_are_recycled() {
        let q = Arc::new(Queues::new(1420));
        let dev = StackDevice { queues: q.clone() };
        let mut bufs = vec![vec![7u8; 100], vec![8u8; 60]];
        dev.send_batch(&mut bufs).unwrap();
        assert_eq!(q.inbound_len(), 2);
        let mut phy = Phy {
            queues: &q,
            rx_budget: 1,
        };
        let (rx, tx) = phy.receive(SmolInstant::from_millis(0)).unwrap();
        assert_eq!(rx.consume(|p| p.to_vec()), vec![7u8; 100]);
        tx.consume(3, |b| b.copy_from_slice(&[1, 2, 3]));
        assert!(phy.receive(SmolInstant::from_millis(0)).is_none(), "budget");
        let mut out = vec![vec![0u8; 2000]; 4];
        let mut sizes = vec![0; 4];
        assert_eq!(dev.recv_batch(0, &mut [], &mut out, &mut sizes).unwrap(), 1);
        assert_eq!(&out[0][..sizes[0]], &[1, 2, 3]);
        // The transmit reused the received packet's buffer: two buffers in
        // all, one still queued, one back in the pool.
        assert_eq!(q.free.lock().len(), 1);
        assert_eq!(q.inbound_len(), 1);
    }

    #[test]
    fn oversize_and_overflow_are_dropped_and_stop_interrupts() {
        let q = Arc::new(Queues::new(100));
        assert!(!q.push_inbound(&[0u8; 101]));
        for _ in 0..QUEUE_PACKETS {
            assert!(q.push_inbound(&[1u8; 10]));
        }
        assert!(!q.push_inbound(&[1u8; 10]));
        let dev = StackDevice { queues: q.clone() };
        dev.interrupt();
        let err = dev.recv_batch(0, &mut [], &mut [vec![0; 10]], &mut [0]);
        assert_eq!(err.unwrap_err().kind(), io::ErrorKind::Interrupted);
    }
}
