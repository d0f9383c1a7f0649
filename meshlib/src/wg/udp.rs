//! The engine's UDP socket: dual-stack, large buffers, optional mark,
//! non-blocking, with quinn-udp's GSO/GRO state. Used by the packet loops
//! ([`super::io`]) and the transport ([`super::transport`]); depends on no
//! other part of the engine.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use quinn_udp::{Transmit, UdpSockRef, UdpSocketState};
use socket2::{Domain, Protocol, Socket, Type};

/// Socket buffer size asked for (as wireguard-go does).
const SOCKET_BUFFER: usize = 7 << 20;
/// How often a blocked receive wakes to look at the stop flag and the socket.
pub(crate) const POLL: Duration = Duration::from_millis(200);
/// The UDP socket with its quinn-udp state (GSO/GRO capabilities).
pub(crate) struct Udp {
    pub sock: std::net::UdpSocket,
    pub state: UdpSocketState,
    pub port: u16,
    /// An IPv6 socket also carrying IPv4 (as v4-mapped addresses).
    pub dual: bool,
}

impl Udp {
    /// A dual-stack UDP socket on `port` (IPv4-only where IPv6 is off) with
    /// large buffers, address reuse, an optional mark, non-blocking.
    pub fn bind(port: u16, fwmark: u32) -> io::Result<Self> {
        Self::bind_domain(Domain::IPV6, port, fwmark)
            .or_else(|_| Self::bind_domain(Domain::IPV4, port, fwmark))
    }

    fn bind_domain(domain: Domain, port: u16, fwmark: u32) -> io::Result<Self> {
        let dual = domain == Domain::IPV6;
        let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
        if dual {
            s.set_only_v6(false)?;
        }
        s.set_reuse_address(true)?;
        force_buffers(&s);
        if fwmark != 0 {
            s.set_mark(fwmark)?;
        }
        let any: IpAddr = if dual {
            std::net::Ipv6Addr::UNSPECIFIED.into()
        } else {
            std::net::Ipv4Addr::UNSPECIFIED.into()
        };
        s.bind(&SocketAddr::new(any, port).into())?;
        // Non-blocking: quinn-udp's recvmmsg passes no MSG_WAITFORONE, so a
        // blocking socket would wait for a full batch. We poll instead.
        s.set_nonblocking(true)?;
        let sock: std::net::UdpSocket = s.into();
        let state = UdpSocketState::new(UdpSockRef::from(&sock))?;
        let port = sock.local_addr()?.port();
        Ok(Self {
            sock,
            state,
            port,
            dual,
        })
    }

    /// Sets `SO_MARK`.
    pub fn set_mark(&self, mark: u32) -> io::Result<()> {
        socket2::SockRef::from(&self.sock).set_mark(mark)
    }

    /// Sends `contents` to `to`, as GSO segments of `segment` bytes when it
    /// holds more than one datagram. An error means nothing was sent (the
    /// caller counts and logs it; UDP does not retry).
    pub(crate) fn send(&self, to: SocketAddr, contents: &[u8], segment: usize) -> io::Result<()> {
        let destination = match to {
            SocketAddr::V4(v4) if self.dual => {
                SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
            }
            _ => to,
        };
        let t = Transmit {
            destination,
            ecn: None,
            contents,
            segment_size: (contents.len() > segment).then_some(segment),
            src_ip: None,
        };
        // A full socket buffer is back-pressure: wait for room (bounded),
        // as a blocking send would.
        for _ in 0..SEND_RETRIES {
            match self.state.try_send(UdpSockRef::from(&self.sock), &t) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait_fd(&self.sock, libc::POLLOUT, POLL);
                }
                other => return other,
            }
        }
        Err(io::ErrorKind::WouldBlock.into())
    }

    /// Waits until a datagram may be read, at most [`POLL`].
    pub(crate) fn wait_readable(&self) {
        wait_fd(&self.sock, libc::POLLIN, POLL);
    }
}

/// Most waits for socket buffer room before a send is dropped.
const SEND_RETRIES: usize = 8;

/// `poll(2)` on one descriptor for `events`, at most `timeout`.
fn wait_fd(fd: &impl std::os::fd::AsRawFd, events: libc::c_short, timeout: Duration) {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd, count 1.
    unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
}

/// Asks for [`SOCKET_BUFFER`] bytes of socket buffer, past `rmem_max` when
/// privileged (`SO_*BUFFORCE`), else as much as allowed.
fn force_buffers(s: &Socket) {
    use std::os::fd::AsRawFd;
    let size = SOCKET_BUFFER as libc::c_int;
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        for opt in [force, plain] {
            // SAFETY: valid fd, pointer to a c_int living across the call,
            // and its exact size.
            let rc = unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc == 0 {
                break;
            }
        }
    }
}
