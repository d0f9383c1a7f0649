//! HTTP/1.1 from clients, served by the gateway's own request loop.
//!
//! The common request (HTTP/1.1, one `Host` of a group on an HTTP port, a
//! body of known length or none) is read with httparse and forwarded as
//! bytes: the request head goes to the instance with its hop-by-hop headers
//! removed and `X-Forwarded-For`, `-Proto` and `-Host` set, the response
//! head comes back the same way ([`super::h1::H1Conn::read_head_raw`]), and
//! the bodies are copied between the two connections, in the client
//! connection's task. No header map, request object, boxed future or
//! timer is made per request: hyper's server made all of them, and with it
//! the gateway answered 0.75x nginx's keep-alive requests on one machine.
//! Bytes that are ready go out together (a small response is one write),
//! and nothing is held back while the instance is still sending.
//!
//! Everything else stays hyper's. At a request boundary the connection is
//! handed to hyper's server with the bytes read so far ([`End::Handoff`],
//! [`Rewind`]) and stays with it: HTTP/2 with prior knowledge, HTTP/1.0,
//! upgrades (WebSocket; h2c is refused there), `Expect`,
//! `Transfer-Encoding` in a request, a `Connection` that names other
//! headers, absolute-form, `*` and CONNECT targets, heads hyper refuses
//! (malformed: 400; too large: 431) and the gateway's own answers (no
//! `Host`, 404, 421, redirects).

use std::cell::RefCell;
use std::io::{self, Write as _};
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use bytes::{Buf as _, Bytes, BytesMut};
use http_body_util::BodyExt as _;
use hyper::body::Body as _;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};

use super::h1::{read_more, ExchangeError, H1Body, H1Conn, RawHead};
use super::http::{choose, Conn, Totals, Up, HOP};
use super::idle::{Check, Closed, IdleClock};
use super::routes::{host_part, GroupRt};

/// Most headers in a request head (hyper's server takes as many).
const MAX_HEADERS: usize = 100;
/// Response bytes gathered before they are written.
const OUT_MAX: usize = 64 * 1024;

/// How the gateway's own loop left a connection.
pub(super) enum End {
    /// The client closed it, or asked to, or it failed.
    Closed,
    /// No request came in time.
    Deadline(Closed),
    /// A request the loop does not serve is next (its bytes, and any after
    /// it, are in the buffer): hyper's server takes the connection.
    Handoff,
}

/// A request head the loop forwards.
#[derive(Debug)]
struct Req {
    /// Bytes of the head in the buffer.
    head_len: usize,
    /// The body's length.
    length: u64,
    /// The client asked to close the connection after this request.
    close: bool,
    /// A HEAD request: the response has no body.
    head_method: bool,
}

/// What a look at the buffer found.
#[derive(Debug)]
enum Parse {
    /// The head is not all there.
    Partial,
    /// A request the loop forwards; its head for the instance was written.
    Forward(Req),
    /// A request for hyper.
    Handoff,
}

/// Headers the loop sets itself in requests (the client's are dropped),
/// beside the hop-by-hop ones ([`super::http::HOP`]).
const FORWARDING: [&str; 3] = ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"];

/// Reads the request head at the start of `buf`. For a request the loop
/// forwards, writes the head the instance gets into `up` and the `Host`
/// into `host`.
fn examine(buf: &[u8], tls: bool, peer_ip: &str, up: &mut Vec<u8>, host: &mut String) -> Parse {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parse::Partial,
        Err(_) => return Parse::Handoff,
    };
    let (Some(method), Some(path), Some(1)) = (req.method, req.path, req.version) else {
        return Parse::Handoff;
    };
    // Origin-form only, in the characters `http::Uri` takes (no fragment).
    if method == "CONNECT"
        || !path.starts_with('/')
        || !path.bytes().all(|b| (0x21..0x7f).contains(&b) && b != b'#')
    {
        return Parse::Handoff;
    }
    let (mut host_value, mut hosts) = (None, 0);
    let (mut length, mut close, mut xff) = (None::<u64>, false, None::<&[u8]>);
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("host") {
            hosts += 1;
            host_value = Some(h.value);
        } else if name.eq_ignore_ascii_case("content-length") {
            let digits = h.value;
            if length.is_some()
                || digits.is_empty()
                || digits.len() > 18
                || !digits.iter().all(u8::is_ascii_digit)
            {
                return Parse::Handoff;
            }
            length = Some(digits.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')));
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("upgrade")
            || name.eq_ignore_ascii_case("expect")
            || name.eq_ignore_ascii_case("http2-settings")
        {
            return Parse::Handoff;
        } else if name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if !token.is_empty() && !token.eq_ignore_ascii_case(b"keep-alive") {
                    // It names headers to drop, or asks for an upgrade.
                    return Parse::Handoff;
                }
            }
        } else if name.eq_ignore_ascii_case("x-forwarded-for")
            && xff.is_none()
            && h.value
                .iter()
                .all(|b| (0x20..0x7f).contains(b) || *b == b'\t')
        {
            xff = Some(h.value);
        }
    }
    let Some(value) = host_value.filter(|_| hosts == 1) else {
        return Parse::Handoff;
    };
    let Ok(value) = std::str::from_utf8(value) else {
        return Parse::Handoff;
    };
    host.clear();
    host.push_str(value);

    up.clear();
    up.extend_from_slice(method.as_bytes());
    up.push(b' ');
    up.extend_from_slice(path.as_bytes());
    up.extend_from_slice(b" HTTP/1.1\r\n");
    for h in req.headers.iter() {
        if HOP
            .iter()
            .chain(&FORWARDING)
            .any(|d| d.eq_ignore_ascii_case(h.name))
        {
            continue;
        }
        up.extend_from_slice(h.name.as_bytes());
        up.extend_from_slice(b": ");
        up.extend_from_slice(h.value);
        up.extend_from_slice(b"\r\n");
    }
    up.extend_from_slice(b"x-forwarded-for: ");
    if let Some(prev) = xff {
        up.extend_from_slice(prev);
        up.extend_from_slice(b", ");
    }
    up.extend_from_slice(peer_ip.as_bytes());
    up.extend_from_slice(if tls {
        b"\r\nx-forwarded-proto: https\r\nx-forwarded-host: "
    } else {
        b"\r\nx-forwarded-proto: http\r\nx-forwarded-host: "
    });
    up.extend(host_part(host).bytes().map(|b| b.to_ascii_lowercase()));
    up.extend_from_slice(b"\r\n");
    if length.is_none() && matches!(method, "POST" | "PUT" | "PATCH") {
        up.extend_from_slice(b"content-length: 0\r\n");
    }
    up.extend_from_slice(b"\r\n");
    Parse::Forward(Req {
        head_len,
        length: length.unwrap_or(0),
        close,
        head_method: method == "HEAD",
    })
}

/// Serves the connection's HTTP/1.1 requests until it ends, a deadline
/// passes, or a request is for hyper. `buf` holds bytes read and not yet
/// served; `clock` the connection's deadlines.
pub(super) async fn serve<S>(
    conn: &Conn,
    io: &mut S,
    buf: &mut BytesMut,
    clock: &mut IdleClock,
) -> End
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let peer_ip = conn.peer.ip().to_canonical().to_string();
    let max_head = conn.ctx.max_header_bytes.max(8192);
    let (mut up, mut out, mut host) = (Vec::new(), Vec::new(), String::new());
    // One timer for the connection, reset only when it fires before the
    // clock's deadline (which only moves later): none per request.
    let first = match clock.check(Instant::now()) {
        Check::Close(why) => return End::Deadline(why),
        Check::At(when) => when,
    };
    let timer = tokio::time::sleep_until(first.into());
    tokio::pin!(timer);
    // Bounded by the client: every turn serves a request or reads more of
    // one (at most `max_head` bytes of head), and time is bounded by the
    // clock's deadlines.
    loop {
        let req = if buf.is_empty() {
            Parse::Partial
        } else {
            examine(buf, conn.tls, &peer_ip, &mut up, &mut host)
        };
        let req = match req {
            Parse::Forward(req) => req,
            Parse::Handoff => return End::Handoff,
            Parse::Partial if buf.len() > max_head => return End::Handoff,
            Parse::Partial => {
                tokio::select! {
                    biased;
                    read = read_more(io, buf) => match read {
                        Ok(0) | Err(_) => return End::Closed,
                        Ok(_) => {}
                    },
                    () = timer.as_mut() => match clock.check(Instant::now()) {
                        Check::Close(why) => return End::Deadline(why),
                        Check::At(when) => timer.as_mut().reset(when.into()),
                    },
                }
                continue;
            }
        };
        let Some((rt, port)) = conn.proxy_route(&host) else {
            return End::Handoff;
        };
        buf.advance(req.head_len);
        clock.request_started();
        let keep = forward(conn, io, buf, rt, port, &req, &mut up, &mut out).await;
        clock.request_done(Instant::now());
        if !keep {
            let _ = tokio::time::timeout(super::http::CLOSE_GRACE, io.shutdown()).await;
            return End::Closed;
        }
    }
}

/// Forwards one request whose head is in `up` (its body follows in `buf`
/// and on `io`) to an instance of `rt` on `port`, and its response to the
/// client. Returns whether the connection serves another request.
#[allow(clippy::too_many_arguments)]
async fn forward<S>(
    conn: &Conn,
    io: &mut S,
    buf: &mut BytesMut,
    rt: Arc<GroupRt>,
    port: u16,
    req: &Req,
    up: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> bool
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    let ctx = &conn.ctx;
    out.clear();
    let (slot, addr, mut upstream) = match choose(conn, &rt, port, false).await {
        Some((slot, addr, Up::H1(upstream))) => (slot, addr, upstream),
        // (An upgrade connection is only chosen for upgrades.)
        Some((_, _, Up::Upgrade(_))) | None => {
            rt.stats.total.response(503, started.elapsed());
            // The body is skipped if it is all here; else the connection
            // closes after the answer.
            let skip = usize::try_from(req.length).ok().filter(|n| *n <= buf.len());
            if let Some(n) = skip {
                buf.advance(n);
            }
            let close = req.close || skip.is_none();
            let msg = format!(
                "service group {}: no instance can take this request now\n",
                rt.group_name()
            );
            push_text(out, "503 Service Unavailable", &msg, true, close);
            return write_out(io, out).await.is_ok() && !close;
        }
    };
    let totals = Totals {
        group: rt.clone(),
        instance: slot.counters.clone(),
    };
    totals.instance.forwarded.fetch_add(1, Relaxed);
    rt.stats.total.forwarded.fetch_add(1, Relaxed);
    // The body's bytes already read go with the head.
    let have = usize::try_from(req.length).map_or(buf.len(), |n| n.min(buf.len()));
    up.extend_from_slice(&buf[..have]);
    buf.advance(have);
    totals.add(true, have as u64);
    let left = req.length - have as u64;
    let mut sent = Sent::default();
    let mut result = exchange(
        &mut upstream.conn,
        up,
        io,
        buf,
        left,
        &totals,
        req,
        out,
        &mut sent,
    )
    .await;
    if let Err(e) = &result {
        // A kept connection the instance closed while it was idle: once
        // more on a new one (nothing of the request reached the instance).
        if upstream.reused && req.length == 0 && e.retryable() {
            out.clear();
            let fresh = ctx
                .upstreams
                .get(
                    addr,
                    rt.dialer().as_ref(),
                    ctx.settings.connect_timeout,
                    true,
                    &ctx.routes.gateway,
                )
                .await;
            if let Ok(f) = fresh {
                upstream = f;
                result = exchange(
                    &mut upstream.conn,
                    up,
                    io,
                    buf,
                    0,
                    &totals,
                    req,
                    out,
                    &mut sent,
                )
                .await;
            }
        }
    }
    let head = match result {
        Ok(head) => head,
        Err(e) => {
            let group = rt.group_name();
            tracing::debug!(%group, error = %e, "upstream request failed");
            totals.instance.response(502, started.elapsed());
            rt.stats.total.response(502, started.elapsed());
            out.clear();
            // What is left of the request body is not read: close.
            let close = req.close || sent.body < left;
            let msg = format!("service group {group}: the instance failed: {e}\n");
            push_text(out, "502 Bad Gateway", &msg, false, close);
            return write_out(io, out).await.is_ok() && !close;
        }
    };
    totals.instance.response(head.code, started.elapsed());
    rt.stats.total.response(head.code, started.elapsed());
    if !head.has_date {
        push_date(out);
    }
    if head.rechunk {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if req.close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    let pool = ctx.upstreams.clone();
    let body = upstream
        .conn
        .body(&head, Box::new(move |c| pool.put(addr, c)));
    let ok = copy_body(io, body, &head, &totals, out).await;
    // The instance's slot is free once the response is (its connection is
    // back in the pool, or closed).
    drop(slot);
    ok && !req.close
}

/// How much of a request reached the instance.
#[derive(Default)]
struct Sent {
    /// Body bytes sent after the ones that went with the head.
    body: u64,
}

/// Sends the request (`up`: the head and the body's first bytes; `left`
/// body bytes still to come from the client) and reads the response head
/// into `out`.
#[allow(clippy::too_many_arguments)]
async fn exchange<S>(
    upstream: &mut H1Conn,
    up: &[u8],
    io: &mut S,
    buf: &mut BytesMut,
    left: u64,
    totals: &Totals,
    req: &Req,
    out: &mut Vec<u8>,
    sent: &mut Sent,
) -> Result<RawHead, ExchangeError>
where
    S: AsyncRead + Unpin,
{
    upstream.send(up).await?;
    // Bounded by the body's length: every turn sends what was read.
    while sent.body < left {
        if buf.is_empty() {
            match read_more(io, buf).await {
                Ok(0) => {
                    return Err(ExchangeError::Body(
                        "the client closed the connection in the middle of the body".into(),
                    ))
                }
                Err(e) => return Err(ExchangeError::Body(Box::new(e))),
                Ok(_) => {}
            }
        }
        let n = usize::try_from(left - sent.body).map_or(buf.len(), |l| l.min(buf.len()));
        upstream.send(&buf[..n]).await?;
        buf.advance(n);
        sent.body += n as u64;
        totals.add(true, n as u64);
    }
    upstream.read_head_raw(req.head_method, out).await
}

/// Writes the response body after its head (in `out`); bytes that are
/// ready are written together, and everything is written before waiting
/// for more from the instance. Returns whether the response went out whole.
async fn copy_body<S>(
    io: &mut S,
    mut body: H1Body,
    head: &RawHead,
    totals: &Totals,
    out: &mut Vec<u8>,
) -> bool
where
    S: AsyncWrite + Unpin,
{
    // Bounded by the instance's body: every turn takes one frame of it.
    loop {
        let ready = {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            Pin::new(&mut body).poll_frame(&mut cx)
        };
        let next = match ready {
            Poll::Ready(next) => next,
            Poll::Pending => {
                if write_out(io, out).await.is_err() {
                    return false;
                }
                body.frame().await
            }
        };
        let frame = match next {
            None => break,
            Some(Ok(frame)) => frame,
            Some(Err(e)) => {
                // The client cannot tell a cut body from a whole one
                // unless the connection closes.
                tracing::debug!(error = %e, "the instance's response ended early");
                let _ = write_out(io, out).await;
                return false;
            }
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        totals.add(false, data.len() as u64);
        if head.rechunk {
            let _ = write!(out, "{:x}\r\n", data.len());
        }
        if out.len() + data.len() > OUT_MAX {
            if write_out(io, out).await.is_err() || io.write_all(&data).await.is_err() {
                return false;
            }
        } else {
            out.extend_from_slice(&data);
        }
        if head.rechunk {
            out.extend_from_slice(b"\r\n");
        }
    }
    if head.rechunk {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    write_out(io, out).await.is_ok()
}

/// Writes and empties `out`.
async fn write_out<S: AsyncWrite + Unpin>(io: &mut S, out: &mut Vec<u8>) -> io::Result<()> {
    if !out.is_empty() {
        io.write_all(out).await?;
        out.clear();
    }
    io.flush().await
}

/// A plain-text answer of the gateway's own.
fn push_text(out: &mut Vec<u8>, status: &str, msg: &str, retry_after: bool, close: bool) {
    let _ = write!(
        out,
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n",
        msg.len()
    );
    if retry_after {
        out.extend_from_slice(b"retry-after: 1\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    push_date(out);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(msg.as_bytes());
}

/// A `Date` header for now (RFC 9110 6.6.1: a proxy adds one to a
/// response that has none), formatted once a second per thread.
fn push_date(out: &mut Vec<u8>) {
    thread_local! {
        static DATE: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != secs {
            *d = (secs, httpdate::fmt_http_date(now));
        }
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(d.1.as_bytes());
        out.extend_from_slice(b"\r\n");
    });
}

/// A stream whose first bytes were read already: they are read again
/// first (hyper's server takes a connection the loop read from).
pub(super) struct Rewind<S> {
    pre: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    /// `inner`, whose next bytes are `pre`.
    pub(super) fn new(pre: Bytes, inner: S) -> Self {
        Self { pre, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.pre.is_empty() {
            let n = buf.remaining().min(self.pre.len());
            buf.put_slice(&self.pre[..n]);
            self.pre.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use parking_lot::Mutex;
    use tokio::io::AsyncReadExt as _;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::gateway::http::{Alpn, HttpCtx};
    use crate::gateway::member::{DialFuture, Dialer, MeshDatagram, MeshStream};
    use crate::gateway::routes::{RouteSettings, Routes};
    use crate::gateway::upstream::Upstreams;
    use meshlib::ids::NetworkId;
    use meshlib::netmap::{Member, MemberState, NetworkMap};
    use meshlib::services::{Handler, Protocol, PublishedPort, ServiceGroup};

    /// Dials the loopback "instance", whatever the overlay address.
    struct Loopback(SocketAddr);

    impl Dialer for Loopback {
        fn dial(&self, _: SocketAddrV4, _: Duration) -> DialFuture<Box<dyn MeshStream>> {
            let to = self.0;
            Box::pin(
                async move { Ok(Box::new(TcpStream::connect(to).await?) as Box<dyn MeshStream>) },
            )
        }

        fn udp(&self, _: SocketAddrV4) -> DialFuture<Box<dyn MeshDatagram>> {
            Box::pin(async { Err(io::ErrorKind::Unsupported.into()) })
        }
    }

    /// A loopback "instance": for every request it reads (on any of its
    /// connections) it records the bytes and sends the next answer, then
    /// closes the connection if the answer says so.
    struct Instance {
        addr: SocketAddr,
        seen: Arc<Mutex<Vec<u8>>>,
        accepted: Arc<AtomicUsize>,
    }

    async fn instance(answers: Vec<(&'static [u8], bool)>) -> Instance {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let answers = Arc::new(Mutex::new(VecDeque::from(answers)));
        let (log, count) = (seen.clone(), accepted.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                count.fetch_add(1, Relaxed);
                let (log, answers) = (log.clone(), answers.clone());
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    let mut b = [0u8; 4096];
                    loop {
                        while request_len(&got).is_none() {
                            match s.read(&mut b).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => got.extend_from_slice(&b[..n]),
                            }
                        }
                        let n = request_len(&got).unwrap();
                        log.lock().extend(got.drain(..n));
                        let Some((answer, close)) = answers.lock().pop_front() else {
                            return;
                        };
                        s.write_all(answer).await.unwrap();
                        if close {
                            return;
                        }
                    }
                });
            }
        });
        Instance {
            addr,
            seen,
            accepted,
        }
    }

    /// The length of the request at the start of `got`, once it is all
    /// there (a content-length or chunked body).
    fn request_len(got: &[u8]) -> Option<usize> {
        let end = got.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
        let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
        if head.contains("transfer-encoding: chunked") {
            let at = got[end..].windows(5).position(|w| w == b"0\r\n\r\n")?;
            return Some(end + at + 5);
        }
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .map_or(0, |v| v.trim().parse().unwrap());
        (got.len() >= end + len).then_some(end + len)
    }

    /// A gateway on loopback serving group `web` at `web.test` (port 80,
    /// HTTP) with one instance, online or not, reached at `instance`.
    async fn gateway(instance: SocketAddr, online: bool) -> (SocketAddr, Arc<HttpCtx>) {
        let mut map = NetworkMap::new(NetworkId::random(), "prod", meshlib::ipam::DEFAULT_RANGE);
        let member = Member {
            public_key: meshlib::keys::PrivateKey::generate().public_key(),
            ip: Ipv4Addr::new(10, 240, 0, 9),
            endpoints: vec![],
            service: "web".into(),
            app_id: "web".parse().unwrap(),
            process_type: "web".parse().unwrap(),
            index: 1,
            instance: "web-1".parse().unwrap(),
            runner: "host-a".into(),
            ports: vec![],
            state: if online {
                MemberState::Online
            } else {
                MemberState::Offline
            },
        };
        map.members.insert(member.public_key, member);
        let group = ServiceGroup {
            name: "web".parse().unwrap(),
            fqdn: "web.test".into(),
            ports: vec![PublishedPort {
                port: 80,
                destination_port: 8080,
                protocol: Protocol::Tcp,
                handlers: [Handler::Http].into(),
                ip: None,
            }],
            limits: meshlib::services::Limits::default(),
            owner: None,
            instances: vec!["web-1".parse().unwrap()],
            wake: None,
            wake_timeout_secs: 30,
        };
        map.services.insert(group.name.clone(), group);
        let routes = Routes::multi();
        let dialer: Arc<dyn Dialer> = Arc::new(Loopback(instance));
        routes.apply(&map, "prod", &dialer, None);
        let ctx = Arc::new(HttpCtx {
            routes: Arc::new(routes),
            settings: RouteSettings {
                queue_timeout: Duration::from_millis(200),
                client_share: 100,
                connect_timeout: Duration::from_secs(2),
                allow_wake_commands: false,
            },
            upstreams: Arc::new(Upstreams::new(4, Duration::from_secs(30))),
            max_header_bytes: 16 * 1024,
            header_timeout: Duration::from_millis(500),
            idle_timeout: Duration::from_secs(5),
            certs: None,
        });
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let c = ctx.clone();
        tokio::spawn(async move {
            while let Ok((s, peer)) = l.accept().await {
                tokio::spawn(super::super::http::serve(
                    c.clone(),
                    s,
                    peer,
                    80,
                    Alpn::Detect,
                    None,
                ));
            }
        });
        (addr, ctx)
    }

    /// A response as the client read it.
    #[derive(Debug)]
    struct Resp {
        code: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Resp {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    /// Reads more of a response into `buf`.
    async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) {
        let mut b = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
            .await
            .expect("an answer in time")
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(buf));
        buf.extend_from_slice(&b[..n]);
    }

    /// Reads one response (1xx ones skipped) from `s`; `buf` keeps what
    /// follows it.
    async fn response(s: &mut TcpStream, buf: &mut Vec<u8>, head_request: bool) -> Resp {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut r = httparse::Response::new(&mut headers);
            let n = match r.parse(buf).unwrap() {
                httparse::Status::Complete(n) => n,
                httparse::Status::Partial => {
                    fill(s, buf).await;
                    continue;
                }
            };
            let code = r.code.unwrap();
            let headers: Vec<(String, String)> = r
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_ascii_lowercase(),
                        String::from_utf8(h.value.to_vec()).unwrap(),
                    )
                })
                .collect();
            buf.drain(..n);
            if code < 200 {
                continue;
            }
            let mut resp = Resp {
                code,
                headers,
                body: Vec::new(),
            };
            if head_request || code == 204 || code == 304 {
                return resp;
            }
            if resp.header("transfer-encoding") == Some("chunked") {
                loop {
                    let (used, size) = loop {
                        match httparse::parse_chunk_size(buf).unwrap() {
                            httparse::Status::Complete(x) => break x,
                            httparse::Status::Partial => fill(s, buf).await,
                        }
                    };
                    let size = size as usize;
                    while buf.len() < used + size + 2 {
                        fill(s, buf).await;
                    }
                    resp.body.extend_from_slice(&buf[used..used + size]);
                    buf.drain(..used + size + 2);
                    if size == 0 {
                        return resp;
                    }
                }
            }
            let len: usize = resp.header("content-length").unwrap().parse().unwrap();
            while buf.len() < len {
                fill(s, buf).await;
            }
            resp.body = buf.drain(..len).collect();
            return resp;
        }
    }

    /// Whether the gateway closes the connection (nothing more comes).
    async fn closed(s: &mut TcpStream) -> bool {
        let mut b = [0u8; 64];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    /// The common requests on one client connection and one kept instance
    /// connection: hop-by-hop headers go neither way, the forwarding
    /// headers are set, bodies of known length arrive whole (part with the
    /// head, part later), a chunked response stays chunked, HEAD has no
    /// body, pipelined requests are answered in order, and `Connection:
    /// close` is answered and honoured.
    #[tokio::test]
    async fn common_requests_are_forwarded_as_bytes() {
        let inst = instance(vec![
            (
                &b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Drop\r\nKeep-Alive: timeout=5\r\nX-Drop: 1\r\nX-A: 1\r\nContent-Length: 5\r\n\r\nhello"[..],
                false,
            ),
            (
                b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\nDate: Tue, 01 Dec 2026 00:00:00 GMT\r\n\r\n3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n",
                false,
            ),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", false),
            (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na", false),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb", false),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nc", false),
            (b"HTTP/1.1 204 No Content\r\n\r\n", false),
        ])
        .await;
        let (gw, _) = gateway(inst.addr, true).await;
        let mut c = TcpStream::connect(gw).await.unwrap();
        let mut buf = Vec::new();

        c.write_all(b"GET /a?b=1 HTTP/1.1\r\nHost: WEB.test:80\r\nConnection: keep-alive\r\nKeep-Alive: 300\r\nTE: trailers\r\nX-Forwarded-For: 192.0.2.7\r\nX-Forwarded-Proto: gopher\r\nX-Forwarded-Host: evil.test\r\nAccept: */*\r\n\r\n").await.unwrap();
        let r = response(&mut c, &mut buf, false).await;
        assert_eq!((r.code, &r.body[..]), (200, &b"hello"[..]));
        assert_eq!(r.header("x-a"), Some("1"));
        assert_eq!(r.header("content-length"), Some("5"));
        for hop in ["connection", "keep-alive", "x-drop"] {
            assert_eq!(r.header(hop), None, "{hop}: {r:?}");
        }
        assert!(r.header("date").is_some(), "a Date is added: {r:?}");

        // A body: part with the head, the rest later.
        c.write_all(b"POST /up HTTP/1.1\r\nhost: web.test\r\ncontent-length: 10\r\n\r\n012")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        c.write_all(b"3456789").await.unwrap();
        let r = response(&mut c, &mut buf, false).await;
        assert_eq!((r.code, &r.body[..]), (201, &b"abc"[..]));
        assert_eq!(r.header("transfer-encoding"), Some("chunked"));
        assert_eq!(r.header("date"), Some("Tue, 01 Dec 2026 00:00:00 GMT"));

        c.write_all(b"HEAD /h HTTP/1.1\r\nHost: web.test\r\n\r\n")
            .await
            .unwrap();
        let r = response(&mut c, &mut buf, true).await;
        assert_eq!((r.code, r.header("content-length")), (200, Some("99")));

        // A POST without a body; then two pipelined requests.
        c.write_all(b"POST /empty HTTP/1.1\r\nHost: web.test\r\n\r\n")
            .await
            .unwrap();
        let r = response(&mut c, &mut buf, false).await;
        assert_eq!(r.body, b"a", "the 100 Continue is not passed on");
        c.write_all(
            b"GET /p1 HTTP/1.1\r\nHost: web.test\r\n\r\nGET /p2 HTTP/1.1\r\nHost: web.test\r\n\r\n",
        )
        .await
        .unwrap();
        assert_eq!(response(&mut c, &mut buf, false).await.body, b"b");
        assert_eq!(response(&mut c, &mut buf, false).await.body, b"c");

        c.write_all(b"DELETE /x HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let r = response(&mut c, &mut buf, false).await;
        assert_eq!((r.code, r.header("connection")), (204, Some("close")));
        assert!(closed(&mut c).await, "closed after Connection: close");

        assert_eq!(
            inst.accepted.load(Relaxed),
            1,
            "one kept instance connection"
        );
        let seen = String::from_utf8(inst.seen.lock().clone()).unwrap();
        let first = seen.split("\r\n\r\n").next().unwrap();
        assert_eq!(
            first,
            "GET /a?b=1 HTTP/1.1\r\nHost: WEB.test:80\r\nAccept: */*\r\nx-forwarded-for: 192.0.2.7, 127.0.0.1\r\nx-forwarded-proto: http\r\nx-forwarded-host: web.test"
        );
        assert!(
            seen.contains("POST /up HTTP/1.1\r\nhost: web.test\r\ncontent-length: 10\r\nx-forwarded-for: 127.0.0.1\r\nx-forwarded-proto: http\r\nx-forwarded-host: web.test\r\n\r\n0123456789"),
            "{seen}"
        );
        assert!(seen.contains("HEAD /h HTTP/1.1\r\n"), "{seen}");
        assert!(
            seen.contains("POST /empty HTTP/1.1\r\nHost: web.test\r\nx-forwarded-for: 127.0.0.1\r\nx-forwarded-proto: http\r\nx-forwarded-host: web.test\r\ncontent-length: 0\r\n\r\n"),
            "{seen}"
        );
        let p1 = seen.find("GET /p1 ").unwrap();
        assert!(seen.find("GET /p2 ").unwrap() > p1, "in order: {seen}");
        assert!(
            seen.contains("DELETE /x HTTP/1.1\r\nHost: web.test\r\nx-forwarded-for"),
            "Connection: close is not forwarded: {seen}"
        );
    }

    /// A response that ends when the instance closes goes to the client
    /// chunked, the client's connection stays open, and the instance's is
    /// not used again.
    #[tokio::test]
    async fn a_body_until_close_is_chunked_for_the_client() {
        let inst = instance(vec![
            (&b"HTTP/1.1 200 OK\r\n\r\nuntil the end"[..], true),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false),
        ])
        .await;
        let (gw, _) = gateway(inst.addr, true).await;
        let mut c = TcpStream::connect(gw).await.unwrap();
        let mut buf = Vec::new();
        for want in [&b"until the end"[..], b"ok"] {
            c.write_all(b"GET / HTTP/1.1\r\nHost: web.test\r\n\r\n")
                .await
                .unwrap();
            let r = response(&mut c, &mut buf, false).await;
            assert_eq!(r.body, want);
        }
        assert_eq!(inst.accepted.load(Relaxed), 2);
    }

    /// Requests the loop does not serve go to hyper's server with the
    /// bytes already read, on the same connection: an unknown host (404),
    /// a chunked request body, an `Expect: 100-continue`; hyper then serves
    /// what follows. HTTP/2 with prior knowledge works on the same port.
    #[tokio::test]
    async fn other_requests_go_to_hyper_on_the_same_connection() {
        let inst = instance(vec![
            (&b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1"[..], false),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n2", false),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n3", false),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n4", false),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nh2", false),
        ])
        .await;
        let (gw, _) = gateway(inst.addr, true).await;
        let mut c = TcpStream::connect(gw).await.unwrap();
        let mut buf = Vec::new();
        // The loop's, then hyper's in the same write.
        c.write_all(b"GET /1 HTTP/1.1\r\nHost: web.test\r\n\r\nGET /x HTTP/1.1\r\nHost: nothing.test\r\n\r\n").await.unwrap();
        assert_eq!(response(&mut c, &mut buf, false).await.body, b"1");
        let r = response(&mut c, &mut buf, false).await;
        assert_eq!(r.code, 404);
        assert!(String::from_utf8_lossy(&r.body).contains("nothing.test"));
        c.write_all(b"PUT /2 HTTP/1.1\r\nHost: web.test\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nbody\r\n0\r\n\r\n").await.unwrap();
        assert_eq!(response(&mut c, &mut buf, false).await.body, b"2");
        c.write_all(b"PUT /3 HTTP/1.1\r\nHost: web.test\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n").await.unwrap();
        // hyper asks for the body once it reads it.
        let mut got = Vec::new();
        let mut b = [0u8; 256];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = c.read(&mut b).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&b[..n]);
        }
        assert!(got.starts_with(b"HTTP/1.1 100 Continue\r\n"), "{got:?}");
        c.write_all(b"abc").await.unwrap();
        assert_eq!(response(&mut c, &mut buf, false).await.body, b"3");
        c.write_all(b"GET /4 HTTP/1.1\r\nHost: web.test\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(response(&mut c, &mut buf, false).await.body, b"4");
        let seen = String::from_utf8(inst.seen.lock().clone()).unwrap();
        assert!(seen.contains("\r\n\r\n4\r\nbody\r\n0\r\n\r\n"), "{seen}");
        assert!(seen.contains("\r\n\r\nabc"), "{seen}");

        // HTTP/2 with prior knowledge.
        let s = TcpStream::connect(gw).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(s),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::get("http://web.test/h2")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"h2");
    }

    /// With no instance to take a request: 503 with `Retry-After`, and the
    /// connection serves on. A connection that sends nothing, or half a
    /// head, is closed at the first request's deadline and counted.
    #[tokio::test]
    async fn refusals_and_deadlines() {
        let inst = instance(vec![]).await;
        let (gw, ctx) = gateway(inst.addr, false).await;
        let mut c = TcpStream::connect(gw).await.unwrap();
        let mut buf = Vec::new();
        for _ in 0..2 {
            c.write_all(b"POST / HTTP/1.1\r\nHost: web.test\r\nContent-Length: 2\r\n\r\nhi")
                .await
                .unwrap();
            let r = response(&mut c, &mut buf, false).await;
            assert_eq!((r.code, r.header("retry-after")), (503, Some("1")));
            assert!(String::from_utf8_lossy(&r.body).contains("service group web"));
        }
        for half in [&b""[..], b"GET / HTTP/1.1\r\nHost: web"] {
            let mut c = TcpStream::connect(gw).await.unwrap();
            c.write_all(half).await.unwrap();
            let started = Instant::now();
            assert!(closed(&mut c).await);
            let took = started.elapsed();
            assert!(took < Duration::from_secs(3), "{took:?}");
        }
        let stats = &ctx.routes.gateway;
        assert_eq!(stats.closed_no_request.load(Relaxed), 2);
    }

    /// Large bodies both ways go through whole: a 3 MiB request body that
    /// arrives over many reads, and a 3 MiB response (written past the
    /// gathering buffer) and a chunked one of many chunks.
    #[tokio::test]
    async fn large_bodies_go_through_whole() {
        const N: usize = 3 << 20;
        let pattern = |i: usize| (i.wrapping_mul(31) % 251) as u8;
        let big: Vec<u8> = (0..N).map(pattern).collect();
        let mut answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {N}\r\n\r\n").into_bytes();
        answer.extend_from_slice(&big);
        let mut chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for part in big.chunks(10_000) {
            chunked.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
            chunked.extend_from_slice(part);
            chunked.extend_from_slice(b"\r\n");
        }
        chunked.extend_from_slice(b"0\r\n\r\n");
        let inst = instance(vec![
            (Box::leak(answer.into_boxed_slice()), false),
            (Box::leak(chunked.into_boxed_slice()), false),
        ])
        .await;
        let (gw, _) = gateway(inst.addr, true).await;
        let mut c = TcpStream::connect(gw).await.unwrap();
        let mut buf = Vec::new();
        let head = format!("PUT /big HTTP/1.1\r\nHost: web.test\r\nContent-Length: {N}\r\n\r\n");
        c.write_all(head.as_bytes()).await.unwrap();
        for part in big.chunks(64 * 1024) {
            c.write_all(part).await.unwrap();
        }
        let r = response(&mut c, &mut buf, false).await;
        assert_eq!(r.code, 200);
        assert!(r.body == big, "the response body arrived whole");
        c.write_all(b"GET /chunks HTTP/1.1\r\nHost: web.test\r\n\r\n")
            .await
            .unwrap();
        let r = response(&mut c, &mut buf, false).await;
        assert_eq!(r.header("transfer-encoding"), Some("chunked"));
        assert!(r.body == big, "the chunked body arrived whole");
        let seen = inst.seen.lock().clone();
        let at = seen.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert!(
            seen[at..at + N] == big[..],
            "the request body arrived whole"
        );
    }

    /// Heads the loop forwards, and those it leaves to hyper.
    #[test]
    fn what_the_loop_takes() {
        let take = |head: &str| {
            let (mut up, mut host) = (Vec::new(), String::new());
            matches!(
                examine(head.as_bytes(), false, "192.0.2.1", &mut up, &mut host),
                Parse::Forward(_)
            )
        };
        assert!(take("GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"));
        assert!(take(
            "POST /x?y HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3\r\nConnection: Keep-Alive, close\r\n\r\n"
        ));
        for head in [
            "GET / HTTP/1.0\r\nHost: a.test\r\n\r\n",
            "GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\nHost: a.test\r\n\r\n",
            "CONNECT a.test:443 HTTP/1.1\r\nHost: a.test\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: +3\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a.test\r\nUpgrade: h2c\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a.test\r\nConnection: X-Secret\r\n\r\n",
            "PUT / HTTP/1.1\r\nHost: a.test\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            "GET /a#b HTTP/1.1\r\nHost: a.test\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a.test\r\nBad Header: x\r\n\r\n",
        ] {
            assert!(!take(head), "{head:?}");
        }
        assert!(matches!(
            examine(
                b"GET / HTTP/1.1\r\nHost: a",
                false,
                "",
                &mut Vec::new(),
                &mut String::new()
            ),
            Parse::Partial
        ));
    }
}
