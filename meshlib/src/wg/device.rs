//! The "instance side" of the engine: where clear-text IP packets come from
//! and go to. [`Device`] is the small abstraction (batches of packets in and
//! out); [`TunDevice`] is the Linux TUN implementation (kernel-interface
//! mode) on `tun-rs`, with `IFF_VNET_HDR` offloads: the kernel hands us TSO
//! super-packets that `tun-rs` splits, and we hand back GRO-coalesced ones.
//! A userspace (smoltcp) device can implement the same trait later.

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net};

use super::netlink::{LinkEvents, RouteOp};
use tun_rs::{DeviceBuilder, GROTable, InterruptEvent, SyncDevice};

/// Default MTU of the tunnel interface (room for the WireGuard and UDP/IPv6
/// headers inside a 1500-byte underlay).
pub const DEFAULT_MTU: u16 = 1420;

/// Largest packet the device can hand over in one read (a TSO super-packet).
pub const MAX_SUPER_PACKET: usize = 65_535 + tun_rs::VIRTIO_NET_HDR_LEN;

/// Number of packets one read or write batch holds at most.
pub const BATCH: usize = tun_rs::IDEAL_BATCH_SIZE;

/// An empty buffer for a packet that will be written to a device with
/// `headroom` bytes before each packet. With offloads on (headroom > 0)
/// the device coalesces the packets of one TCP flow into the first one's
/// buffer (GRO, up to a 64 KiB super-packet), and refuses to when that
/// buffer's capacity is short: so it gets room for a whole super-packet
/// (capacity only, the pages are touched when a write uses them).
pub(super) fn out_buffer(headroom: usize) -> Vec<u8> {
    if headroom > 0 {
        Vec::with_capacity(2 * headroom + 65_535)
    } else {
        Vec::with_capacity(2048)
    }
}

/// Free packet slots needed to read one more super-packet into a batch
/// (64 KiB split at the smallest useful MSS).
const DRAIN_ROOM: usize = 64;

/// A source and sink of clear-text IP packets, read and written in batches.
///
/// Call order: one thread calls [`Device::recv_batch`] in a loop; another
/// calls [`Device::send_batch`]; [`Device::interrupt`] from any thread makes a
/// blocked `recv_batch` return [`io::ErrorKind::Interrupted`].
pub trait Device: Send + Sync + 'static {
    /// Bytes the caller must leave free before each packet given to
    /// [`Device::send_batch`] (and that `recv_batch` leaves before each one).
    fn headroom(&self) -> usize;

    /// Number of independent receive queues; the engine reads each from its
    /// own thread (packets of one flow stay on one queue). 1 by default.
    fn queues(&self) -> usize {
        1
    }

    /// Reads at least one packet from receive queue `queue` (below
    /// [`Device::queues`]): packet `i` is `bufs[i][headroom..headroom +
    /// sizes[i]]`. `scratch` holds a super-packet before it is split (size it
    /// [`MAX_SUPER_PACKET`]). Returns the number of packets.
    fn recv_batch(
        &self,
        queue: usize,
        scratch: &mut [u8],
        bufs: &mut [Vec<u8>],
        sizes: &mut [usize],
    ) -> io::Result<usize>;

    /// Writes packets, each `bufs[i][headroom..]` (buffers may be grown and
    /// modified to coalesce packets).
    fn send_batch(&self, bufs: &mut [Vec<u8>]) -> io::Result<()>;

    /// Wakes a blocked [`Device::recv_batch`] for shutdown.
    fn interrupt(&self);

    /// Whether the link is up. While it is down the engine sends nothing
    /// (no handshakes, keepalives or answers), as wireguard-go waits for its
    /// interface to be up. Asked by the default [`Device::wait_link`] every
    /// 100 ms, and by the packet loops when a packet comes while the link
    /// was last seen down, so it must be cheap. Always up by default.
    fn is_up(&self) -> bool {
        true
    }

    /// Waits at most `timeout` for the link state to change: `Some(up)`
    /// when it did (or may have), `None` when there is no news. The
    /// engine's link thread calls it in a loop and acts on the answer at
    /// once. By default it sleeps `timeout` and answers [`Device::is_up`]:
    /// a device without link notifications is polled.
    fn wait_link(&self, timeout: Duration) -> Option<bool> {
        std::thread::sleep(timeout);
        Some(self.is_up())
    }
}

/// How to create the TUN interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunConfig {
    /// Interface name (at most 15 bytes on Linux).
    pub name: String,
    /// MTU; [`DEFAULT_MTU`] by default.
    pub mtu: u16,
    /// The member's address with the network's prefix length (e.g.
    /// `10.240.0.5/22`): the kernel derives the route for the whole range from
    /// it. `None` leaves the interface unaddressed (plain `wireguard-go`
    /// behaviour: the user runs `ip addr add`).
    pub address: Option<IpNet>,
    /// Use `IFF_VNET_HDR` offloads (TSO in, GRO out). On by default.
    pub offload: bool,
    /// TUN queues (`IFF_MULTI_QUEUE` when above 1), each read by its own
    /// encrypting thread, so several peers' traffic is encrypted on several
    /// cores. 1 by default.
    pub queues: usize,
    /// Bring the interface up at creation. On by default (the sidecar owns
    /// its interface); `sidecar wg` leaves it down for the user to bring up
    /// (`ip link set up`), as wireguard-go does.
    pub up: bool,
}

impl TunConfig {
    /// A config with the defaults: MTU 1420, no address, offloads on, one
    /// queue, brought up.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            mtu: DEFAULT_MTU,
            address: None,
            offload: true,
            queues: 1,
            up: true,
        }
    }
}

thread_local! {
    /// Each writing thread's GRO table ([`TunDevice`]'s `send_batch`):
    /// tun-rs resets it at every call, so one per thread serves every
    /// device that thread writes to.
    static GRO_TABLE: std::cell::RefCell<GROTable> = std::cell::RefCell::new(GROTable::new());
}

/// A Linux TUN interface (needs `CAP_NET_ADMIN` and `/dev/net/tun`).
pub struct TunDevice {
    /// Queue 0 (also used for writes), then the extra queues.
    dev: SyncDevice,
    extra: Vec<SyncDevice>,
    offload: bool,
    stop: InterruptEvent,
    /// Notifications of the interface's link changes (up, down, deleted).
    link: LinkEvents,
}

impl TunDevice {
    /// Creates the interface, sets its address (the kernel adds the route of
    /// its prefix, through netlink), its MTU, brings it up if
    /// [`TunConfig::up`], and subscribes to its link notifications
    /// ([`Device::wait_link`]).
    pub fn create(cfg: &TunConfig) -> io::Result<Self> {
        let mut builder = DeviceBuilder::new()
            .name(&cfg.name)
            .mtu(cfg.mtu)
            .offload(cfg.offload)
            .multi_queue(cfg.queues > 1)
            .enable(cfg.up);
        if let Some(net) = cfg.address {
            builder = match net.addr() {
                IpAddr::V4(a) => builder.ipv4(a, net.prefix_len(), None),
                IpAddr::V6(a) => builder.ipv6(a, net.prefix_len()),
            };
        }
        let dev = builder.build_sync()?;
        // Non-blocking, so a batch can drain every queued packet after the
        // first (interruptible) wait without blocking again.
        dev.set_nonblocking(true)?;
        let extra = (1..cfg.queues.max(1))
            .map(|_| {
                let q = dev.try_clone()?;
                q.set_nonblocking(true)?;
                Ok(q)
            })
            .collect::<io::Result<Vec<_>>>()?;
        let offload = cfg.offload && dev.tcp_gso();
        let link = LinkEvents::open(dev.if_index()?)?;
        Ok(Self {
            dev,
            extra,
            offload,
            stop: InterruptEvent::new()?,
            link,
        })
    }

    /// The interface name as the kernel knows it.
    pub fn name(&self) -> io::Result<String> {
        self.dev.name()
    }

    /// True when TSO/GRO offloads are active.
    pub fn offload(&self) -> bool {
        self.offload
    }

    /// Routes `net` through the interface (replacing a route to `net`),
    /// preferring `src` as the source of new connections. In the calling
    /// thread's network namespace.
    pub fn set_route(&self, net: Ipv4Net, src: Option<Ipv4Addr>) -> io::Result<()> {
        super::netlink::route(RouteOp::Replace, self.dev.if_index()?, net, src)
    }

    /// Removes the route to `net` through the interface (none is fine).
    pub fn remove_route(&self, net: Ipv4Net) -> io::Result<()> {
        super::netlink::route(RouteOp::Delete, self.dev.if_index()?, net, None)
    }

    /// Adds `addr`/32 to the interface (a service address this member
    /// answers for).
    pub fn add_host_address(&self, addr: Ipv4Addr) -> io::Result<()> {
        self.dev.add_address_v4(addr, 32u8)
    }

    /// Removes `addr` from the interface.
    pub fn remove_address(&self, addr: Ipv4Addr) -> io::Result<()> {
        self.dev.remove_address(IpAddr::V4(addr))
    }
}

impl Device for TunDevice {
    fn headroom(&self) -> usize {
        if self.offload {
            tun_rs::VIRTIO_NET_HDR_LEN
        } else {
            0
        }
    }

    fn queues(&self) -> usize {
        1 + self.extra.len()
    }

    fn recv_batch(
        &self,
        queue: usize,
        scratch: &mut [u8],
        bufs: &mut [Vec<u8>],
        sizes: &mut [usize],
    ) -> io::Result<usize> {
        let off = self.headroom();
        if self.stop.is_trigger() {
            return Err(io::ErrorKind::Interrupted.into());
        }
        let dev = match queue {
            0 => &self.dev,
            q => self.extra.get(q - 1).ok_or(io::ErrorKind::InvalidInput)?,
        };
        let mut n = dev.recv_multiple_intr(scratch, bufs, sizes, off, &self.stop)?;
        // Drain what else is queued while a whole super-packet still fits.
        while bufs.len() - n >= DRAIN_ROOM {
            match dev.recv_multiple(scratch, &mut bufs[n..], &mut sizes[n..], off) {
                Ok(more) => n += more,
                Err(_) => break,
            }
        }
        Ok(n)
    }

    /// Coalesces with the calling thread's GRO table: the threads that
    /// write to the device (the network loop, side receivers, crypto-worker
    /// batches) share no lock, and none is held across the `write(2)` calls.
    fn send_batch(&self, bufs: &mut [Vec<u8>]) -> io::Result<()> {
        GRO_TABLE.with_borrow_mut(|gro| {
            self.dev
                .send_multiple(gro, bufs, self.headroom())
                .map(|_| ())
        })
    }

    fn interrupt(&self) {
        let _ = self.stop.trigger();
    }

    /// `IFF_UP` and `IFF_RUNNING` (the kernel's link state, which
    /// wireguard-go watches), asked of the kernel in the calling thread's
    /// network namespace: the engine's threads live in the TUN's.
    fn is_up(&self) -> bool {
        self.dev.is_running().unwrap_or(false)
    }

    /// The link notifications (`RTMGRP_LINK`) about the interface, read as
    /// they come. When some were lost (`ENOBUFS`) the kernel is asked; if
    /// the socket fails otherwise, the link is polled every `timeout`.
    fn wait_link(&self, timeout: Duration) -> Option<bool> {
        match self.link.wait(timeout) {
            Ok(news) => news,
            Err(e) => {
                if e.raw_os_error() != Some(libc::ENOBUFS) {
                    tracing::debug!("link notifications: {e}");
                    std::thread::sleep(timeout);
                }
                Some(self.is_up())
            }
        }
    }
}
