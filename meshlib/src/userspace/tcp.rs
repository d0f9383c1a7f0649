//! TCP relays: a tokio `TcpStream` on one side, a smoltcp socket on the
//! other. Each direction is one future; a direction waiting on smoltcp
//! registers the socket's waker and is woken by the stack thread's poll.

use std::future::poll_fn;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::Poll;

use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::{RecvError, State};
use smoltcp::wire::IpEndpoint;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{Inner, Net};

/// Bytes moved per copy between the two sockets.
const CHUNK: usize = 64 * 1024;

/// The tunnel side of a relay failed or was reset.
#[derive(Debug)]
struct Broken;

/// Why a TCP connection through the tunnel could not be opened
/// ([`super::Stack::open_tcp`]).
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The peer answered the SYN with a reset: nothing serves the port
    /// there (its instance refused the local connection, or its sidecar
    /// does not open the port to the tunnel).
    #[error("connection refused")]
    Refused,
    /// No answer within the dial timeout (the peer is gone, or its
    /// instance did not accept in time).
    #[error("no answer within {0:?}")]
    TimedOut(std::time::Duration),
    /// smoltcp cannot open a connection to that address (unaddressable).
    #[error("cannot connect: {0}")]
    Connect(smoltcp::socket::tcp::ConnectError),
}

/// A TCP connection through the tunnel, established, not yet relayed
/// ([`super::Stack::open_tcp`]). Dropped unrelayed, it is reset.
pub struct TunnelStream {
    inner: Arc<Inner>,
    h: Option<SocketHandle>,
}

impl TunnelStream {
    /// Relays `stream` over this connection until both sides closed (true)
    /// or one broke (false). Dropping the future midway resets both: the
    /// tunnel side with a RST, `stream` with a zero-linger close.
    pub async fn relay(mut self, stream: TcpStream) -> bool {
        let Some(h) = self.h.take() else {
            return false;
        };
        relay(self.inner.clone(), h, stream, None).await
    }

    /// [`TunnelStream::relay`], adding the payload bytes relayed to `sent`
    /// (from `stream` into the tunnel) and `received` (back) as they pass.
    pub async fn relay_counted(
        mut self,
        stream: TcpStream,
        sent: &AtomicU64,
        received: &AtomicU64,
    ) -> bool {
        let Some(h) = self.h.take() else {
            return false;
        };
        relay(self.inner.clone(), h, stream, Some((sent, received))).await
    }
}

impl Drop for TunnelStream {
    fn drop(&mut self) {
        if let Some(h) = self.h.take() {
            finish(&self.inner, h, false);
        }
    }
}

/// Adds a smoltcp socket connecting to `dst` from an ephemeral port.
fn connect(inner: &Inner, dst: SocketAddr) -> Result<SocketHandle, DialError> {
    let mut net = inner.net.lock();
    let mut s = Net::tcp_socket(inner.cfg.tcp_buffer);
    let port = net.ephemeral_port();
    let n = &mut *net;
    s.connect(n.iface.context(), IpEndpoint::from(dst), port)
        .map_err(DialError::Connect)?;
    Ok(n.sockets.add(s))
}

/// Opens a connection to `dst` through the tunnel and waits for the
/// handshake, at most `timeout`.
pub(super) async fn open(
    inner: &Arc<Inner>,
    dst: SocketAddr,
    timeout: std::time::Duration,
) -> Result<TunnelStream, DialError> {
    let h = connect(inner, dst)?;
    inner.tcp_outbound.fetch_add(1, Relaxed);
    inner.kick();
    // Owns the socket from here: a timeout or a dropped future resets it.
    let conn = TunnelStream {
        inner: inner.clone(),
        h: Some(h),
    };
    match tokio::time::timeout(timeout, established(inner, h)).await {
        Ok(Ok(())) => Ok(conn),
        Ok(Err(Broken)) => Err(DialError::Refused),
        Err(_) => Err(DialError::TimedOut(timeout)),
    }
}

/// Opens a smoltcp connection to `dst` and relays `stream` over it.
pub(super) fn spawn_outbound(inner: Arc<Inner>, stream: TcpStream, dst: SocketAddr) {
    let h = match connect(&inner, dst) {
        Ok(h) => h,
        Err(e) => {
            tracing::debug!("connect to {dst}: {e}");
            return;
        }
    };
    inner.tcp_outbound.fetch_add(1, Relaxed);
    inner.kick();
    let rt = inner.rt.clone();
    rt.spawn(relay(inner, h, stream, None));
}

/// Connects to the instance at `target` (with the default host
/// 127.0.0.1, also `[::1]`: services listening on IPv6 loopback only).
pub(super) async fn connect_local(target: SocketAddr) -> std::io::Result<TcpStream> {
    match TcpStream::connect(target).await {
        Err(_) if target.ip() == IpAddr::V4(Ipv4Addr::LOCALHOST) => {
            TcpStream::connect((Ipv6Addr::LOCALHOST, target.port())).await
        }
        other => other,
    }
}

/// Relays the accepted socket `h` to the instance: to `local` (the
/// connection the instance accepted before the SYN was answered) or, for
/// a socket that got its SYN some other way, to a new connection on
/// `port`; a refused connection resets the tunnel side.
pub(super) fn spawn_inbound(
    inner: Arc<Inner>,
    h: SocketHandle,
    port: u16,
    local: Option<TcpStream>,
) {
    let rt = inner.rt.clone();
    rt.spawn(async move {
        let target = inner.inbound_target(port);
        let conn = match local {
            Some(stream) => Ok(stream),
            None => connect_local(target).await,
        };
        match conn {
            Ok(stream) => {
                inner.tcp_inbound.fetch_add(1, Relaxed);
                relay(inner, h, stream, None).await;
            }
            Err(e) => {
                tracing::debug!("inbound to {target}: {e}");
                inner.tcp_refused.fetch_add(1, Relaxed);
                finish(&inner, h, false);
            }
        }
    });
}

/// Resets both sides of a relay dropped midway (its instance left): the
/// smoltcp side with a RST, the local socket with a zero-linger close.
struct Teardown<'a> {
    inner: &'a Inner,
    h: SocketHandle,
    local: RawFd,
    armed: bool,
}

impl Drop for Teardown<'_> {
    fn drop(&mut self) {
        if self.armed {
            finish(self.inner, self.h, false);
            reset_on_close(self.local);
        }
    }
}

/// Makes the close of socket `fd` a reset (zero linger).
///
/// The caller keeps the socket open across the call: `fd` belongs to a
/// stream that outlives the guard calling this (a parameter of the relay
/// function, dropped after its locals).
pub(super) fn reset_on_close(fd: RawFd) {
    // SAFETY: per the contract above, `fd` is an open socket for the
    // duration of this call.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    let _ = socket2::SockRef::from(&fd).set_linger(Some(std::time::Duration::ZERO));
}

/// Moves bytes both ways until both sides closed (true), or one broke
/// (false). Dropped midway, it resets both sides ([`Teardown`]).
async fn relay(
    inner: Arc<Inner>,
    h: SocketHandle,
    mut stream: TcpStream,
    counts: Option<(&AtomicU64, &AtomicU64)>,
) -> bool {
    let _ = stream.set_nodelay(true);
    let mut teardown = Teardown {
        inner: &inner,
        h,
        local: stream.as_raw_fd(),
        armed: true,
    };
    let ok = match established(&inner, h).await {
        Ok(()) => {
            let (rd, wr) = stream.split();
            let up = to_tunnel(&inner, h, rd, counts.map(|c| c.0));
            let down = from_tunnel(&inner, h, wr, counts.map(|c| c.1));
            tokio::try_join!(up, down).is_ok()
        }
        Err(Broken) => false,
    };
    teardown.armed = false;
    finish(&inner, h, ok);
    ok
}

/// Closes (or on failure aborts) the smoltcp side and retires the socket.
fn finish(inner: &Inner, h: SocketHandle, graceful: bool) {
    let mut net = inner.net.lock();
    let s = net.sockets.get_mut::<smoltcp::socket::tcp::Socket>(h);
    if graceful {
        s.close();
    } else {
        s.abort();
    }
    net.retire(h);
    drop(net);
    inner.kick();
}

/// Waits for the three-way handshake (either direction).
async fn established(inner: &Inner, h: SocketHandle) -> Result<(), Broken> {
    poll_fn(|cx| {
        inner.with_tcp(h, |s| match s.state() {
            State::Established | State::CloseWait => Poll::Ready(Ok(())),
            State::SynSent | State::SynReceived => {
                s.register_recv_waker(cx.waker());
                Poll::Pending
            }
            _ => Poll::Ready(Err(Broken)),
        })
    })
    .await
}

/// Local → tunnel: read the stream, queue into smoltcp's send buffer; on
/// end of stream, send FIN.
async fn to_tunnel(
    inner: &Inner,
    h: SocketHandle,
    mut rd: impl AsyncRead + Unpin,
    sent: Option<&AtomicU64>,
) -> Result<(), Broken> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = rd.read(&mut buf).await.map_err(|_| Broken)?;
        if let Some(c) = sent {
            c.fetch_add(n as u64, Relaxed);
        }
        if n == 0 {
            inner.with_tcp(h, |s| s.close());
            inner.kick();
            return Ok(());
        }
        let mut off = 0;
        while off < n {
            off += poll_fn(|cx| {
                inner.with_tcp(h, |s| {
                    if !s.may_send() {
                        return Poll::Ready(Err(Broken));
                    }
                    match s.send_slice(&buf[off..n]) {
                        Ok(0) => {
                            s.register_send_waker(cx.waker());
                            Poll::Pending
                        }
                        Ok(k) => Poll::Ready(Ok(k)),
                        Err(_) => Poll::Ready(Err(Broken)),
                    }
                })
            })
            .await?;
            inner.kick();
        }
    }
}

/// Tunnel → local: drain smoltcp's receive buffer into the stream; on FIN,
/// shut the stream's write side.
async fn from_tunnel(
    inner: &Inner,
    h: SocketHandle,
    mut wr: impl AsyncWrite + Unpin,
    received: Option<&AtomicU64>,
) -> Result<(), Broken> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = poll_fn(|cx| {
            inner.with_tcp(h, |s| match s.recv_slice(&mut buf) {
                Ok(0) => {
                    s.register_recv_waker(cx.waker());
                    Poll::Pending
                }
                Ok(k) => Poll::Ready(Ok(k)),
                Err(RecvError::Finished) => Poll::Ready(Ok(0)),
                Err(RecvError::InvalidState) => Poll::Ready(Err(Broken)),
            })
        })
        .await?;
        if n == 0 {
            let _ = wr.shutdown().await;
            return Ok(());
        }
        // The window opened: let smoltcp advertise it.
        inner.kick();
        wr.write_all(&buf[..n]).await.map_err(|_| Broken)?;
        if let Some(c) = received {
            c.fetch_add(n as u64, Relaxed);
        }
    }
}
