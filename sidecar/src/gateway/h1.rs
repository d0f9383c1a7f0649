//! HTTP/1.1 to instances, in the client connection's own task: the request
//! head and body are written to a kept connection and the response is read
//! from it by the response body itself, with no connection task and no
//! channel between them (hyper's client runs each connection as a task of
//! its own and hands every request and response across: two task wake-ups
//! per request more than the socket needs). httparse (hyper's own parser)
//! reads the response head; the body is framed as RFC 9112 section 6.3 says:
//! none for HEAD, 1xx, 204 and 304; `chunked` as the last transfer coding;
//! else `Content-Length` (several must agree); else until the instance
//! closes. Upgrades (WebSocket) still go through hyper's client.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf as _, BytesMut};
use http_body_util::BodyExt as _;
use hyper::body::{Body, Bytes, Frame, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Response, StatusCode, Version};
use tokio::io::{AsyncRead, AsyncWriteExt as _, ReadBuf};

use super::http::{BoxError, ProxyBody};
use super::member::MeshStream;

/// Largest response head taken from an instance.
const MAX_HEAD: usize = 64 * 1024;
/// Most response header lines.
const MAX_HEADERS: usize = 128;
/// Largest chunk-size line or trailer section.
const MAX_LINE: usize = 16 * 1024;
/// Bytes read from an instance at a time.
const READ_CHUNK: usize = 16 * 1024;

/// A connection to an instance, idle or serving one request.
pub struct H1Conn {
    io: Box<dyn MeshStream>,
    buf: BytesMut,
    head: Vec<u8>,
}

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// The request could not be written (nothing of the response came).
    #[error("sending the request: {0}")]
    Send(io::Error),
    /// The request body failed (the client's side).
    #[error("the request body: {0}")]
    Body(BoxError),
    /// The response head did not come or is not HTTP/1.x.
    #[error("the response: {0}")]
    Response(String),
}

impl ExchangeError {
    /// Nothing reached the instance or came back: a request without a body
    /// may go again on a new connection (a kept one the instance closed
    /// while it was idle).
    pub fn retryable(&self) -> bool {
        match self {
            Self::Send(_) => true,
            Self::Response(m) => m == CLOSED_BEFORE_HEAD,
            Self::Body(_) => false,
        }
    }
}

const CLOSED_BEFORE_HEAD: &str = "the instance closed the connection before answering";

/// What to do with a connection once its response is read to the end.
pub type GiveBack = Box<dyn FnOnce(H1Conn) + Send>;

impl H1Conn {
    /// A new connection.
    pub fn new(io: Box<dyn MeshStream>) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
            head: Vec::new(),
        }
    }

    /// Whether a kept connection is unusable: the instance closed it, or
    /// sent something nobody asked for. Never waits.
    pub fn is_closed(&mut self) -> bool {
        if !self.buf.is_empty() {
            return true;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut byte = [0u8; 1];
        let mut rb = ReadBuf::new(&mut byte);
        // Ready: the end of the stream, an error, or bytes nobody asked for.
        Pin::new(&mut self.io)
            .poll_read(&mut cx, &mut rb)
            .is_ready()
    }

    /// Sends a request (its `Host` and forwarding headers already set, its
    /// hop-by-hop headers removed) and reads the response head. The body
    /// of the response reads the rest; once it is done it hands the
    /// connection to `give_back` if the connection can serve another
    /// request.
    pub async fn exchange(
        mut self,
        parts: &hyper::http::request::Parts,
        mut body: ProxyBody,
        give_back: GiveBack,
    ) -> Result<Response<ProxyBody>, ExchangeError> {
        let empty = body.is_end_stream();
        let hint = body.size_hint().exact();
        let has_length = parts.headers.contains_key(header::CONTENT_LENGTH);
        let chunked = !empty && !has_length && hint.is_none();
        self.head.clear();
        let head = &mut self.head;
        head.extend_from_slice(parts.method.as_str().as_bytes());
        head.push(b' ');
        head.extend_from_slice(
            parts
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .as_bytes(),
        );
        head.extend_from_slice(b" HTTP/1.1\r\n");
        for (name, value) in &parts.headers {
            if name == header::EXPECT {
                // The body follows at once.
                continue;
            }
            head.extend_from_slice(name.as_str().as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        if !has_length {
            match (empty, hint) {
                (true, _) if method_has_body(&parts.method) => {
                    head.extend_from_slice(b"content-length: 0\r\n");
                }
                (true, _) => {}
                (false, Some(n)) => {
                    head.extend_from_slice(format!("content-length: {n}\r\n").as_bytes());
                }
                (false, None) => head.extend_from_slice(b"transfer-encoding: chunked\r\n"),
            }
        }
        head.extend_from_slice(b"\r\n");
        self.io
            .write_all(&self.head)
            .await
            .map_err(ExchangeError::Send)?;
        if !empty {
            // Bounded by the body: each turn takes one frame of it.
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(ExchangeError::Body)?;
                let Ok(data) = frame.into_data() else {
                    continue; // trailers are not forwarded
                };
                if data.is_empty() {
                    continue;
                }
                if chunked {
                    let size = format!("{:x}\r\n", data.len());
                    self.io
                        .write_all(size.as_bytes())
                        .await
                        .map_err(ExchangeError::Send)?;
                }
                self.io
                    .write_all(&data)
                    .await
                    .map_err(ExchangeError::Send)?;
                if chunked {
                    self.io
                        .write_all(b"\r\n")
                        .await
                        .map_err(ExchangeError::Send)?;
                }
            }
            if chunked {
                self.io
                    .write_all(b"0\r\n\r\n")
                    .await
                    .map_err(ExchangeError::Send)?;
            }
        }
        self.io.flush().await.map_err(ExchangeError::Send)?;
        let head_request = parts.method == Method::HEAD;
        let (mut resp, framing, reusable) = self.read_final_head(head_request, build).await?;
        let body = H1Body {
            conn: Some(self),
            framing,
            reusable,
            give_back: Some(give_back),
            done: false,
        };
        *resp.body_mut() = body.boxed_unsync();
        Ok(resp)
    }

    /// Reads the final response head (1xx heads are skipped) and gives it
    /// to `take` with its framing.
    async fn read_final_head<T>(
        &mut self,
        head_request: bool,
        mut take: impl FnMut(&httparse::Response<'_, '_>, HeadInfo) -> Result<T, String>,
    ) -> Result<T, ExchangeError> {
        let bad = |m: String| ExchangeError::Response(m);
        // Bounded: every turn reads more of the head or skips a 1xx head;
        // the head is at most MAX_HEAD bytes.
        loop {
            if !self.buf.is_empty() {
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut parsed = httparse::Response::new(&mut headers);
                match parsed.parse(&self.buf) {
                    Ok(httparse::Status::Complete(n)) => {
                        let info = head_info(&parsed, head_request).map_err(bad)?;
                        let Some(info) = info else {
                            self.buf.advance(n);
                            continue; // a 1xx answer: the final one follows
                        };
                        let out = take(&parsed, info).map_err(bad)?;
                        self.buf.advance(n);
                        return Ok(out);
                    }
                    Ok(httparse::Status::Partial) => {}
                    Err(e) => return Err(bad(format!("malformed head: {e}"))),
                }
                if self.buf.len() > MAX_HEAD {
                    return Err(bad(format!("head longer than {MAX_HEAD} bytes")));
                }
            }
            let was_empty = self.buf.is_empty();
            let n = read_more(&mut self.io, &mut self.buf)
                .await
                .map_err(|e| bad(e.to_string()))?;
            if n == 0 {
                return Err(bad(if was_empty {
                    CLOSED_BEFORE_HEAD.into()
                } else {
                    "the instance closed the connection in the middle of the head".into()
                }));
            }
        }
    }
}

impl H1Conn {
    /// Writes bytes of a request (its head, or body bytes after it).
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), ExchangeError> {
        self.io.write_all(bytes).await.map_err(ExchangeError::Send)
    }

    /// Reads the final response head (1xx heads are skipped) and writes it
    /// for an HTTP/1.1 client into `out`: the status line and the headers
    /// the instance sent, without hop-by-hop headers and without the blank
    /// line that ends the head. The body is read with [`H1Conn::body`].
    pub async fn read_head_raw(
        &mut self,
        head_request: bool,
        out: &mut Vec<u8>,
    ) -> Result<RawHead, ExchangeError> {
        self.read_final_head(head_request, |parsed, info| {
            let has_date = write_head(parsed, &info, out);
            Ok(RawHead {
                code: info.status.as_u16(),
                framing: info.framing,
                reusable: info.reusable,
                rechunk: matches!(info.framing, Framing::Chunk(_) | Framing::Close),
                has_date,
            })
        })
        .await
    }

    /// The body of the response whose head [`H1Conn::read_head_raw`] read;
    /// once it is done, the connection goes to `give_back` if it can serve
    /// another request.
    pub fn body(self, head: &RawHead, give_back: GiveBack) -> H1Body {
        H1Body {
            conn: Some(self),
            framing: head.framing,
            reusable: head.reusable,
            give_back: Some(give_back),
            done: false,
        }
    }
}

fn method_has_body(m: &Method) -> bool {
    matches!(*m, Method::POST | Method::PUT | Method::PATCH)
}

/// Reads what is there into `buf`; 0 at the end of the stream.
pub async fn read_more<R: AsyncRead + Unpin + ?Sized>(
    io: &mut R,
    buf: &mut BytesMut,
) -> io::Result<usize> {
    std::future::poll_fn(|cx| poll_read_more(io, buf, cx)).await
}

/// [`read_more`] as a poll.
pub fn poll_read_more<R: AsyncRead + Unpin + ?Sized>(
    io: &mut R,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    buf.reserve(READ_CHUNK);
    let spare = buf.spare_capacity_mut();
    let mut rb = ReadBuf::uninit(spare);
    match Pin::new(io).poll_read(cx, &mut rb) {
        Poll::Ready(Ok(())) => {
            let n = rb.filled().len();
            // SAFETY: `poll_read` initialised the first `n` bytes of the
            // spare capacity (what `ReadBuf::filled` covers).
            unsafe { buf.set_len(buf.len() + n) };
            Poll::Ready(Ok(n))
        }
        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        Poll::Pending => Poll::Pending,
    }
}

/// What a response head says about its body and its connection.
struct HeadInfo {
    status: StatusCode,
    framing: Framing,
    /// The connection can serve another request after this response.
    reusable: bool,
    /// Both a transfer coding and a length: the length is not forwarded.
    drop_length: bool,
}

/// Reads the framing of a final response head (RFC 9112 section 6.3);
/// `None` for a 1xx head.
fn head_info(
    parsed: &httparse::Response<'_, '_>,
    head_request: bool,
) -> Result<Option<HeadInfo>, String> {
    let code = parsed.code.ok_or("no status")?;
    let status = StatusCode::from_u16(code).map_err(|_| format!("bad status {code}"))?;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err("101 to a request that asked for no upgrade".into());
    }
    if status.is_informational() {
        return Ok(None);
    }
    let http10 = parsed.version == Some(0);
    let (mut length, mut chunked, mut te, mut close, mut keep_alive) =
        (None::<u64>, false, false, http10, false);
    for h in parsed.headers.iter() {
        let value = || std::str::from_utf8(h.value).ok();
        if h.name.eq_ignore_ascii_case("content-length") {
            let text = value().ok_or("bad content-length")?;
            for part in text.split(',') {
                let n: u64 = part
                    .trim()
                    .parse()
                    .map_err(|_| format!("bad content-length {text:?}"))?;
                if length.is_some_and(|l| l != n) {
                    return Err("content-lengths disagree".into());
                }
                length = Some(n);
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            te = true;
            chunked = value()
                .and_then(|v| v.rsplit(',').next())
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        } else if h.name.eq_ignore_ascii_case("connection") {
            for t in value().unwrap_or("").split(',') {
                let t = t.trim();
                if t.eq_ignore_ascii_case("close") {
                    close = true;
                } else if t.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            }
        }
    }
    if http10 && keep_alive {
        close = false;
    }
    let mut drop_length = false;
    let framing =
        if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            Framing::Length(0)
        } else if te {
            if length.is_some() {
                // Both: the transfer coding wins, and the connection is not
                // trusted with another request (RFC 9112 6.3).
                drop_length = true;
                close = true;
            }
            if chunked {
                Framing::Chunk(Chunk::Size)
            } else {
                Framing::Close
            }
        } else {
            match length {
                Some(n) => Framing::Length(n),
                None => Framing::Close,
            }
        };
    let reusable = !close && !matches!(framing, Framing::Close);
    Ok(Some(HeadInfo {
        status,
        framing,
        reusable,
        drop_length,
    }))
}

/// The response of a final head, its body's framing, and whether the
/// connection can serve another request after it.
fn build(
    parsed: &httparse::Response<'_, '_>,
    info: HeadInfo,
) -> Result<(Response<ProxyBody>, Framing, bool), String> {
    let mut headers = HeaderMap::with_capacity(parsed.headers.len());
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| format!("bad header name {:?}", h.name))?;
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|_| format!("bad value of header {}", h.name))?;
        if info.drop_length && name == header::CONTENT_LENGTH {
            continue;
        }
        headers.append(name, value);
    }
    let mut resp = Response::new(
        http_body_util::Empty::new()
            .map_err(|n| match n {})
            .boxed_unsync(),
    );
    *resp.status_mut() = info.status;
    *resp.version_mut() = Version::HTTP_11;
    *resp.headers_mut() = headers;
    Ok((resp, info.framing, info.reusable))
}

/// A response head as the gateway forwards it to an HTTP/1.1 client
/// ([`H1Conn::read_head_raw`]).
pub struct RawHead {
    /// The status code.
    pub code: u16,
    /// How the body ends on the instance's connection.
    pub framing: Framing,
    /// Whether the instance's connection can serve another request.
    pub reusable: bool,
    /// The body goes to the client chunked (it is chunked, or ends when
    /// the instance closes): `transfer-encoding: chunked` is still to be
    /// added to the head.
    pub rechunk: bool,
    /// The instance sent a `Date`.
    pub has_date: bool,
}

/// Whether `name` is named by one of the `Connection` headers' values.
fn named_by_connection(headers: &[httparse::Header<'_>], name: &str) -> bool {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .flat_map(|h| h.value.split(|&b| b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(name.as_bytes()))
}

/// Writes the head of a final response for the client: the status line and
/// the headers, without the hop-by-hop ones and without the blank line
/// that ends the head (the caller adds its own headers first).
fn write_head(parsed: &httparse::Response<'_, '_>, info: &HeadInfo, out: &mut Vec<u8>) -> bool {
    use std::io::Write as _;
    let _ = write!(out, "HTTP/1.1 {} ", info.status.as_u16());
    match parsed.reason {
        Some(r) if !r.is_empty() => out.extend_from_slice(r.as_bytes()),
        _ => out.extend_from_slice(
            info.status
                .canonical_reason()
                .unwrap_or("Unknown")
                .as_bytes(),
        ),
    }
    out.extend_from_slice(b"\r\n");
    let mut has_date = false;
    for h in parsed.headers.iter() {
        let name = h.name;
        if super::http::HOP
            .iter()
            .any(|n| n.eq_ignore_ascii_case(name))
            || name.eq_ignore_ascii_case("upgrade")
            || (info.drop_length && name.eq_ignore_ascii_case("content-length"))
            || named_by_connection(parsed.headers, name)
        {
            continue;
        }
        has_date |= name.eq_ignore_ascii_case("date");
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    has_date
}

/// How a response body ends.
#[derive(Debug, Clone, Copy)]
pub enum Framing {
    /// This many bytes are left.
    Length(u64),
    /// Chunked, at this point.
    Chunk(Chunk),
    /// Until the instance closes.
    Close,
}

/// Where a chunked body is.
#[derive(Debug, Clone, Copy)]
pub enum Chunk {
    /// Before a chunk-size line.
    Size,
    /// Inside a chunk: this many bytes left.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
}

/// A response body read straight from the instance's connection.
pub struct H1Body {
    conn: Option<H1Conn>,
    framing: Framing,
    reusable: bool,
    give_back: Option<GiveBack>,
    done: bool,
}

impl H1Body {
    fn finish(&mut self) {
        self.done = true;
        if let (Some(conn), Some(give_back)) = (self.conn.take(), self.give_back.take()) {
            if self.reusable && conn.buf.is_empty() {
                give_back(conn);
            }
        }
    }

    fn malformed(&mut self, what: &str) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.conn = None;
        self.done = true;
        Poll::Ready(Some(Err(
            format!("the instance's response body: {what}").into()
        )))
    }
}

impl Drop for H1Body {
    fn drop(&mut self) {
        // A body that was complete without a read (HEAD, 204, 304, an
        // empty one, or its last bytes taken): hyper stops polling once it
        // says it ended, so the connection goes back here.
        if !self.done && matches!(self.framing, Framing::Length(0)) {
            self.finish();
        }
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        // Bounded: every turn consumes buffered bytes, reads more, or ends.
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            let Some(conn) = this.conn.as_mut() else {
                this.done = true;
                return Poll::Ready(None);
            };
            match this.framing {
                Framing::Length(0) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Framing::Length(left) => {
                    if !conn.buf.is_empty() {
                        let n = usize::try_from(left)
                            .unwrap_or(usize::MAX)
                            .min(conn.buf.len());
                        let data = conn.buf.split_to(n).freeze();
                        this.framing = Framing::Length(left - n as u64);
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Framing::Close => {
                    if !conn.buf.is_empty() {
                        let data = conn.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Framing::Chunk(Chunk::Size) => match httparse::parse_chunk_size(&conn.buf) {
                    Ok(httparse::Status::Complete((used, 0))) => {
                        conn.buf.advance(used);
                        this.framing = Framing::Chunk(Chunk::Trailers);
                        continue;
                    }
                    Ok(httparse::Status::Complete((used, size))) => {
                        conn.buf.advance(used);
                        this.framing = Framing::Chunk(Chunk::Data(size));
                        continue;
                    }
                    Ok(httparse::Status::Partial) if conn.buf.len() <= MAX_LINE => {}
                    Ok(httparse::Status::Partial) => {
                        return this.malformed("chunk size line too long")
                    }
                    Err(_) => return this.malformed("bad chunk size"),
                },
                Framing::Chunk(Chunk::Data(0)) => {
                    this.framing = Framing::Chunk(Chunk::DataEnd);
                    continue;
                }
                Framing::Chunk(Chunk::Data(left)) => {
                    if !conn.buf.is_empty() {
                        let n = usize::try_from(left)
                            .unwrap_or(usize::MAX)
                            .min(conn.buf.len());
                        let data = conn.buf.split_to(n).freeze();
                        this.framing = Framing::Chunk(Chunk::Data(left - n as u64));
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Framing::Chunk(Chunk::DataEnd) => {
                    if conn.buf.len() >= 2 {
                        if &conn.buf[..2] != b"\r\n" {
                            return this.malformed("no CRLF after a chunk");
                        }
                        conn.buf.advance(2);
                        this.framing = Framing::Chunk(Chunk::Size);
                        continue;
                    }
                }
                Framing::Chunk(Chunk::Trailers) => {
                    if let Some(end) = conn.buf.windows(2).position(|w| w == b"\r\n") {
                        conn.buf.advance(end + 2);
                        if end == 0 {
                            this.finish();
                            return Poll::Ready(None);
                        }
                        continue;
                    }
                    if conn.buf.len() > MAX_LINE {
                        return this.malformed("trailers too long");
                    }
                }
            }
            // More bytes are needed.
            match poll_read_more(&mut conn.io, &mut conn.buf, cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => {
                    this.conn = None;
                    this.done = true;
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
                Poll::Ready(Ok(0)) => {
                    if matches!(this.framing, Framing::Close) {
                        this.reusable = false;
                        this.finish();
                        return Poll::Ready(None);
                    }
                    return this.malformed("the instance closed the connection before its end");
                }
                Poll::Ready(Ok(_)) => {}
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || matches!(self.framing, Framing::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use parking_lot::Mutex;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// A loopback "instance": for each request it reads, it records the
    /// bytes of the request and answers the next canned response.
    async fn instance(answers: Vec<&'static [u8]>) -> (std::net::SocketAddr, Arc<Mutex<Vec<u8>>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            for a in answers {
                // Read one request: its head, and a body if it says so.
                let mut got = Vec::new();
                let mut b = [0u8; 4096];
                while !complete(&got) {
                    let n = s.read(&mut b).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&b[..n]);
                }
                log.lock().extend_from_slice(&got);
                s.write_all(a).await.unwrap();
            }
            // Close after the last answer.
        });
        (addr, seen)
    }

    /// A request read to its end: the head, then a chunked body's last
    /// chunk or a content-length's bytes.
    fn complete(got: &[u8]) -> bool {
        let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
            return false;
        };
        let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
        let body = &got[end + 4..];
        if head.contains("transfer-encoding: chunked") {
            return body.ends_with(b"0\r\n\r\n");
        }
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .map_or(0, |v| v.trim().parse().unwrap());
        body.len() >= len
    }

    fn parts(method: Method, headers: &[(&str, &str)]) -> hyper::http::request::Parts {
        let mut b = hyper::Request::builder().method(method).uri("/path?q=1");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn empty() -> ProxyBody {
        http_body_util::Empty::new()
            .map_err(|n| match n {})
            .boxed_unsync()
    }

    /// Collects a response body; the connection comes back in `kept` if
    /// it is reusable.
    async fn body_of(resp: Response<ProxyBody>) -> Result<Vec<u8>, BoxError> {
        Ok(resp.into_body().collect().await?.to_bytes().to_vec())
    }

    type Kept = Arc<Mutex<Option<H1Conn>>>;

    fn keep(kept: &Kept) -> GiveBack {
        let k = kept.clone();
        Box::new(move |c| *k.lock() = Some(c))
    }

    async fn conn(addr: std::net::SocketAddr) -> H1Conn {
        H1Conn::new(Box::new(TcpStream::connect(addr).await.unwrap()))
    }

    /// Content-Length, chunked (with an extension and trailers), HEAD,
    /// 204 and a 100 Continue before the answer, all on one kept
    /// connection; the request heads carry the method, path and headers.
    #[tokio::test]
    async fn framings_on_one_kept_connection() {
        let (addr, seen) = instance(vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-T: 1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok",
        ])
        .await;
        let kept: Kept = Arc::default();
        let mut c = conn(addr).await;
        let cases: [(Method, u16, &[u8]); 5] = [
            (Method::GET, 200, b"hello"),
            (Method::GET, 200, b"abcde"),
            (Method::HEAD, 200, b""),
            (Method::DELETE, 204, b""),
            (Method::POST, 201, b"ok"),
        ];
        for (i, (method, code, want)) in cases.into_iter().enumerate() {
            let p = parts(method.clone(), &[("host", "web.test")]);
            let resp = c.exchange(&p, empty(), keep(&kept)).await.unwrap();
            assert_eq!(resp.status().as_u16(), code, "case {i}");
            if i == 0 {
                assert_eq!(resp.headers()["x-a"], "1");
                assert_eq!(resp.headers()["content-length"], "5");
            }
            assert_eq!(body_of(resp).await.unwrap(), want, "case {i}");
            c = kept
                .lock()
                .take()
                .unwrap_or_else(|| panic!("case {i}: not kept"));
            // (The instance closes after its last answer.)
            assert!(i == 4 || !c.is_closed(), "case {i}");
        }
        let seen = String::from_utf8(seen.lock().clone()).unwrap();
        assert!(
            seen.starts_with("GET /path?q=1 HTTP/1.1\r\nhost: web.test\r\n\r\n"),
            "{seen}"
        );
        assert!(seen.contains("HEAD /path?q=1 HTTP/1.1\r\n"), "{seen}");
        // A POST without a body says so.
        assert!(
            seen.contains("POST /path?q=1 HTTP/1.1\r\nhost: web.test\r\ncontent-length: 0\r\n\r\n"),
            "{seen}"
        );
        // After the last answer the instance closed: seen as closed.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(c.is_closed());
    }

    /// A body until the instance closes is read to the end and the
    /// connection not kept; so is an answer that says `Connection: close`,
    /// or carries both a transfer coding and a length (the length is
    /// dropped).
    #[tokio::test]
    async fn connections_that_cannot_serve_again_are_not_kept() {
        for (answer, want) in [
            (&b"HTTP/1.1 200 OK\r\n\r\nuntil the end"[..], &b"until the end"[..]),
            (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi", b"hi"),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
                b"hi",
            ),
            (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nhi", b"hi"),
        ] {
            let (addr, _) = instance(vec![answer]).await;
            let kept: Kept = Arc::default();
            let resp = conn(addr)
                .await
                .exchange(&parts(Method::GET, &[]), empty(), keep(&kept))
                .await
                .unwrap();
            assert!(!resp.headers().contains_key("content-length") || want.len() == 2);
            assert_eq!(body_of(resp).await.unwrap(), want);
            assert!(kept.lock().is_none(), "{}", String::from_utf8_lossy(answer));
        }
    }

    /// A request body of known length goes with its length; one of unknown
    /// length goes chunked; `Expect` is not forwarded.
    #[tokio::test]
    async fn request_bodies_are_framed() {
        let (addr, seen) = instance(vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        ])
        .await;
        let kept: Kept = Arc::default();
        let full = http_body_util::Full::new(Bytes::from_static(b"12345"))
            .map_err(|n| match n {})
            .boxed_unsync();
        let p = parts(Method::PUT, &[("expect", "100-continue")]);
        let resp = conn(addr)
            .await
            .exchange(&p, full, keep(&kept))
            .await
            .unwrap();
        body_of(resp).await.unwrap();
        let c = kept.lock().take().expect("kept");
        let stream = Frames(vec![
            Bytes::from_static(b"defgh"),
            Bytes::from_static(b"abc"),
        ])
        .boxed_unsync();
        let resp = c
            .exchange(&parts(Method::POST, &[]), stream, keep(&kept))
            .await
            .unwrap();
        body_of(resp).await.unwrap();
        let seen = String::from_utf8(seen.lock().clone()).unwrap();
        assert!(
            seen.starts_with("PUT /path?q=1 HTTP/1.1\r\ncontent-length: 5\r\n\r\n12345"),
            "{seen}"
        );
        assert!(!seen.contains("expect"), "{seen}");
        assert!(
            seen.ends_with("POST /path?q=1 HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n5\r\ndefgh\r\n0\r\n\r\n"),
            "{seen}"
        );
    }

    /// A body of these frames (popped from the end), of unknown length.
    struct Frames(Vec<Bytes>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.0.pop().map(|b| Ok(Frame::data(b))))
        }
    }
}
