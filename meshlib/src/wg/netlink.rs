//! Routes through the TUN interface over rtnetlink: the one request the
//! service range needs (a route with a preferred source, which neither
//! `tun-rs` nor the legacy `SIOCADDRT` ioctl can set). Encoding is a pure
//! function; [`route`] sends it in the calling thread's network namespace
//! and waits for the kernel's acknowledgment.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use ipnet::Ipv4Net;

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
}
