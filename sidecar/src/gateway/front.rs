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
use super::http::{choose, Conn, Totals, Up};
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

/// Headers the loop drops from requests: hop-by-hop ones and the
/// forwarding headers it sets itself.
const DROPPED: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
];

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
            && h.value.iter().all(|b| (0x20..0x7f).contains(b) || *b == b'\t')
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
        if DROPPED.iter().any(|d| d.eq_ignore_ascii_case(h.name)) {
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
            let skip = usize::try_from(req.length)
                .ok()
                .filter(|n| *n <= buf.len());
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
    let mut result = exchange(&mut upstream.conn, up, io, buf, left, &totals, req, out, &mut sent).await;
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
                result =
                    exchange(&mut upstream.conn, up, io, buf, 0, &totals, req, out, &mut sent).await;
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
