//! rtnetlink, the two things the engine needs of it: routes through the TUN
//! interface (a route with a preferred source, which neither `tun-rs` nor
//! the legacy `SIOCADDRT` ioctl can set), and the interface's link state as
//! it changes ([`LinkEvents`], as wireguard-go's `routineNetlinkListener`
//! follows it). Encoding and decoding are pure functions; [`route`] sends a
//! request in the calling thread's network namespace and waits for the
//! kernel's acknowledgment.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use ipnet::Ipv4Net;

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_PREFSRC: u16 = 7;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_STATIC: u8 = 4;
const RT_SCOPE_LINK: u8 = 253;
const RTN_UNICAST: u8 = 1;
const AF_INET: u8 = 2;
/// The multicast group of link notifications (`RTNLGRP_LINK`'s bit).
const RTMGRP_LINK: u32 = 1;
/// Length of `struct nlmsghdr`.
const NLMSG_HDRLEN: usize = 16;

/// Add (or replace) or delete a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RouteOp {
    /// `ip route replace`.
    Replace,
    /// `ip route del`.
    Delete,
}

fn attr(msg: &mut Vec<u8>, kind: u16, data: &[u8]) {
    let len = 4 + data.len();
    msg.extend_from_slice(&(len as u16).to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(data);
    msg.resize(msg.len().next_multiple_of(4), 0);
}

/// The request: `dst` through interface `ifindex`, link scope, main
/// table, preferring source `src` (the member's own address, so a
/// service address held on the interface is never picked as the source
/// of a new connection).
fn encode(op: RouteOp, seq: u32, ifindex: u32, dst: Ipv4Net, src: Option<Ipv4Addr>) -> Vec<u8> {
    let (kind, flags) = match op {
        RouteOp::Replace => (
            RTM_NEWROUTE,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        ),
        RouteOp::Delete => (RTM_DELROUTE, NLM_F_REQUEST | NLM_F_ACK),
    };
    let mut msg = Vec::with_capacity(64);
    msg.extend_from_slice(&0u32.to_ne_bytes()); // length, set below
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    msg.extend_from_slice(&[
        AF_INET,
        dst.prefix_len(),
        0,
        0,
        RT_TABLE_MAIN,
        RTPROT_STATIC,
        RT_SCOPE_LINK,
        RTN_UNICAST,
    ]);
    msg.extend_from_slice(&0u32.to_ne_bytes()); // rtm_flags
    attr(&mut msg, RTA_DST, &dst.network().octets());
    attr(&mut msg, RTA_OIF, &ifindex.to_ne_bytes());
    if let Some(src) = src {
        attr(&mut msg, RTA_PREFSRC, &src.octets());
    }
    let len = msg.len() as u32;
    msg[..4].copy_from_slice(&len.to_ne_bytes());
    msg
}

/// The kernel's answer to request `seq`: `Ok` for an acknowledgment,
/// the error it reports otherwise; `None` for another message.
fn decode_ack(buf: &[u8], seq: u32) -> Option<io::Result<()>> {
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(buf.get(at..at + 4)?.try_into().ok()?))
    };
    let kind = u16::from_ne_bytes(buf.get(4..6)?.try_into().ok()?);
    if kind != NLMSG_ERROR || u32_at(8)? != seq {
        return None;
    }
    let code = u32_at(16)? as i32;
    Some(if code == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(-code))
    })
}

/// A netlink route socket in the calling thread's network namespace,
/// member of the multicast `groups` (0: none).
fn open(groups: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned right after.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns; closed on drop.
    let owned = unsafe { <OwnedFd as FromRawFd>::from_raw_fd(fd) };
    if groups != 0 {
        // SAFETY: an all-zero sockaddr_nl is valid (port chosen by the kernel).
        let mut local: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        local.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        local.nl_groups = groups;
        // SAFETY: bind(2) to a sockaddr_nl of the size given.
        let rc = unsafe {
            libc::bind(
                owned.as_raw_fd(),
                (&local as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(owned)
}

/// The link state that the notifications in `buf` (one datagram of
/// `RTM_NEWLINK`/`RTM_DELLINK` messages, possibly truncated after their
/// fixed part) leave interface `ifindex` in: up when both `IFF_UP` and
/// `IFF_RUNNING` are set (what wireguard-go reads), down when deleted.
/// `None` when no message is about that interface.
fn link_state_in(buf: &[u8], ifindex: u32) -> Option<bool> {
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(buf.get(at..at + 4)?.try_into().ok()?))
    };
    let running = (libc::IFF_UP | libc::IFF_RUNNING) as u32;
    let mut state = None;
    let mut at = 0;
    while let Some(len) = u32_at(at) {
        let len = len as usize;
        if len < NLMSG_HDRLEN {
            break;
        }
        let kind = buf
            .get(at + 4..at + 6)
            .map(|k| u16::from_ne_bytes([k[0], k[1]]));
        // ifinfomsg after the header: family, pad, type (u16), index, flags.
        let (index, flags) = (u32_at(at + NLMSG_HDRLEN + 4), u32_at(at + NLMSG_HDRLEN + 8));
        match (kind, index, flags) {
            (Some(RTM_NEWLINK), Some(i), Some(f)) if i == ifindex => {
                state = Some(f & running == running)
            }
            (Some(RTM_DELLINK), Some(i), Some(_)) if i == ifindex => state = Some(false),
            _ => {}
        }
        at += len.next_multiple_of(4);
    }
    state
}

/// A netlink route socket subscribed to link notifications (`RTMGRP_LINK`)
/// in the network namespace of the thread that opened it: how
/// [`super::TunDevice`] learns at once that its interface went up or down,
/// as wireguard-go's TUN does (`routineNetlinkListener`), instead of
/// noticing at the next poll.
pub(crate) struct LinkEvents {
    fd: OwnedFd,
    ifindex: u32,
}

/// Most notification datagrams read in one [`LinkEvents::wait`].
const MAX_EVENTS: usize = 64;

impl LinkEvents {
    /// Subscribes to the notifications about interface `ifindex`; those
    /// sent from now on are queued until read.
    pub fn open(ifindex: u32) -> io::Result<Self> {
        Ok(Self {
            fd: open(RTMGRP_LINK)?,
            ifindex,
        })
    }

    /// Waits at most `timeout` for notifications, then reads all queued:
    /// `Some(up)` as the last one about the interface says, `None` when
    /// none was about it. An error `ENOBUFS` means notifications were lost
    /// (the queue overflowed): ask the kernel for the state instead.
    pub fn wait(&self, timeout: Duration) -> io::Result<Option<bool>> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: one valid pollfd, count 1.
        if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
            return Ok(None);
        }
        let mut buf = vec![0u8; 16 * 1024];
        let mut state = None;
        for _ in 0..MAX_EVENTS {
            // SAFETY: recv(2) into `buf`, at most its length; never blocks.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    break;
                }
                return Err(e);
            }
            if n == 0 {
                break;
            }
            let got = (n as usize).min(buf.len());
            state = link_state_in(&buf[..got], self.ifindex).or(state);
        }
        Ok(state)
    }
}

/// Applies `op` to the route `dst` via interface `ifindex` (see
/// [`encode`]), in the calling thread's network namespace. Deleting a
/// route that is not there is not an error.
pub(crate) fn route(
    op: RouteOp,
    ifindex: u32,
    dst: Ipv4Net,
    src: Option<Ipv4Addr>,
) -> io::Result<()> {
    let seq = 1;
    let msg = encode(op, seq, ifindex, dst, src);
    let owned = open(0)?;
    let timeout = libc::timeval {
        tv_sec: 2,
        tv_usec: 0,
    };
    // SAFETY: setsockopt(2) with a timeval of the size given.
    let rc = unsafe {
        libc::setsockopt(
            owned.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: an all-zero sockaddr_nl is valid (the kernel, no groups).
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: sendto(2) of `msg` to a sockaddr_nl of the size given.
    let sent = unsafe {
        libc::sendto(
            owned.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: recv(2) into `buf`, at most its length.
        let n = unsafe { libc::recv(owned.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        match decode_ack(&buf[..n as usize], seq) {
            Some(Err(e)) if op == RouteOp::Delete && e.raw_os_error() == Some(libc::ESRCH) => {
                return Ok(())
            }
            Some(result) => return result,
            None => continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_and_acknowledgment_encode_as_iproute2_does() {
        let dst: Ipv4Net = "10.240.4.0/22".parse().unwrap();
        let msg = encode(
            RouteOp::Replace,
            7,
            3,
            dst,
            Some(Ipv4Addr::new(10, 240, 0, 5)),
        );
        // header 16 + rtmsg 12 + three 8-byte attributes
        assert_eq!(msg.len(), 52);
        let u16_at = |at: usize| u16::from_ne_bytes(msg[at..at + 2].try_into().unwrap());
        assert_eq!(u32::from_ne_bytes(msg[..4].try_into().unwrap()), 52);
        assert_eq!((u16_at(4), u16_at(6)), (RTM_NEWROUTE, 0x505));
        assert_eq!(&msg[16..24], &[2, 22, 0, 0, 254, 4, 253, 1]);
        assert_eq!((u16_at(28), u16_at(30)), (8, RTA_DST));
        assert_eq!(&msg[32..36], &[10, 240, 4, 0]);
        assert_eq!((u16_at(36), u16_at(38)), (8, RTA_OIF));
        assert_eq!((u16_at(44), u16_at(46)), (8, RTA_PREFSRC));
        assert_eq!(&msg[48..52], &[10, 240, 0, 5]);
        let del = encode(RouteOp::Delete, 8, 3, dst, None);
        assert_eq!(del.len(), 44);
        // An acknowledgment, an error, and someone else's message.
        let mut ack = vec![0u8; 36];
        ack[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        ack[8..12].copy_from_slice(&7u32.to_ne_bytes());
        assert!(matches!(decode_ack(&ack, 7), Some(Ok(()))));
        ack[16..20].copy_from_slice(&(-libc::EPERM).to_ne_bytes());
        let e = decode_ack(&ack, 7).unwrap().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
        assert!(decode_ack(&ack, 8).is_none());
        assert!(decode_ack(&ack[..10], 7).is_none());
    }

    /// One link notification: header, ifinfomsg, then `attrs` bytes of
    /// attributes (whose content the decoder skips).
    fn link_msg(kind: u16, index: u32, flags: u32, attrs: usize) -> Vec<u8> {
        let len = (NLMSG_HDRLEN + 16 + attrs) as u32;
        let mut m = Vec::new();
        m.extend_from_slice(&len.to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0; 10]); // flags, seq, port id
        m.extend_from_slice(&[0, 0, 0xfe, 0xff]); // family, pad, type
        m.extend_from_slice(&index.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&u32::MAX.to_ne_bytes()); // change mask
        m.resize(len as usize, 0xaa);
        m
    }

    #[test]
    fn link_notifications_decode_as_wireguard_go_reads_them() {
        let (up, running) = (libc::IFF_UP as u32, libc::IFF_RUNNING as u32);
        let up_running = link_msg(RTM_NEWLINK, 7, up | running | 0x1000, 5);
        assert_eq!(link_state_in(&up_running, 7), Some(true));
        assert_eq!(link_state_in(&up_running, 8), None, "another interface");
        assert_eq!(
            link_state_in(&link_msg(RTM_NEWLINK, 7, up, 0), 7),
            Some(false),
            "up without carrier is not running"
        );
        assert_eq!(
            link_state_in(&link_msg(RTM_DELLINK, 7, up | running, 0), 7),
            Some(false),
            "deleted"
        );
        // Several in one datagram (the last one about us counts), others
        // and unrelated messages in between.
        let mut batch = link_msg(RTM_NEWLINK, 7, up | running, 3);
        batch.resize(batch.len().next_multiple_of(4), 0);
        batch.extend(link_msg(RTM_NEWLINK, 7, 0, 8));
        batch.extend(link_msg(RTM_NEWLINK, 9, up | running, 0));
        batch.extend(link_msg(RTM_NEWROUTE, 7, up | running, 0));
        assert_eq!(link_state_in(&batch, 7), Some(false));
        // Truncated after the fixed part still decodes; malformed never panics.
        assert_eq!(link_state_in(&up_running[..28], 7), Some(true));
        assert_eq!(link_state_in(&up_running[..27], 7), None);
        let mut short = up_running.clone();
        short[..4].copy_from_slice(&8u32.to_ne_bytes());
        assert_eq!(link_state_in(&short, 7), None);
        for cut in 0..up_running.len() {
            let _ = link_state_in(&up_running[..cut], 7);
        }
        assert_eq!(link_state_in(&[], 7), None);
    }

    #[test]
    fn link_events_wait_returns_when_nothing_comes() {
        // No interface has this index: nothing is about it.
        let events = LinkEvents::open(u32::MAX).expect("netlink socket");
        let started = std::time::Instant::now();
        assert_eq!(events.wait(Duration::from_millis(30)).unwrap(), None);
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
