//! TCP relays: a tokio `TcpStream` on one side, a smoltcp socket on the
//! other. Each direction is one future; a direction waiting on smoltcp
//! registers the socket's waker and is woken by the stack thread's poll.

use std::future::poll_fn;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::Poll;

use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::{RecvError, State};
use smoltcp::wire::IpEndpoint;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use super::{Inner, Net};

/// Bytes moved per copy between the two sockets.
const CHUNK: usize = 64 * 1024;

/// The tunnel side of a relay failed or was reset.
#[derive(Debug)]
struct Broken;

/// Opens a smoltcp connection to `dst` and relays `stream` over it.
pub(super) fn spawn_outbound(inner: Arc<Inner>, stream: TcpStream, dst: SocketAddr) {
    let h = {
        let mut net = inner.net.lock();
        let mut s = Net::tcp_socket(inner.cfg.tcp_buffer);
        let port = net.ephemeral_port();
        let n = &mut *net;
        if let Err(e) = s.connect(n.iface.context(), IpEndpoint::from(dst), port) {
            tracing::debug!("connect to {dst}: {e}");
            return;
        }
        n.sockets.add(s)
    };
    inner.tcp_outbound.fetch_add(1, Relaxed);
    inner.kick();
    let rt = inner.rt.clone();
    rt.spawn(relay(inner, h, stream));
}

/// Connects to the instance on `port` (with the default host 127.0.0.1,
/// also `[::1]`: services listening on IPv6 loopback only) and relays the
/// accepted socket `h` to it; a refused connection resets the tunnel side.
pub(super) fn spawn_inbound(inner: Arc<Inner>, h: SocketHandle, port: u16) {
    let rt = inner.rt.clone();
    rt.spawn(async move {
        let target = inner.inbound_target(port);
        let mut conn = TcpStream::connect(target).await;
        if conn.is_err() && target.ip() == IpAddr::V4(Ipv4Addr::LOCALHOST) {
            conn = TcpStream::connect((Ipv6Addr::LOCALHOST, port)).await;
        }
        match conn {
            Ok(stream) => {
                inner.tcp_inbound.fetch_add(1, Relaxed);
                relay(inner, h, stream).await
            }
            Err(e) => {
                tracing::debug!("inbound to {target}: {e}");
                inner.tcp_refused.fetch_add(1, Relaxed);
                finish(&inner, h, false);
            }
        }
    });
}

/// Moves bytes both ways until both sides closed, or one broke.
async fn relay(inner: Arc<Inner>, h: SocketHandle, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let ok = match established(&inner, h).await {
        Ok(()) => {
            let (rd, wr) = stream.into_split();
            let up = to_tunnel(&inner, h, rd);
            let down = from_tunnel(&inner, h, wr);
            tokio::try_join!(up, down).is_ok()
        }
        Err(Broken) => false,
    };
    finish(&inner, h, ok);
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
async fn to_tunnel(inner: &Inner, h: SocketHandle, mut rd: OwnedReadHalf) -> Result<(), Broken> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = rd.read(&mut buf).await.map_err(|_| Broken)?;
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
async fn from_tunnel(inner: &Inner, h: SocketHandle, mut wr: OwnedWriteHalf) -> Result<(), Broken> {
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
    }
}
