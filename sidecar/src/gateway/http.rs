//! HTTP mode: HTTP/1.1 and HTTP/2 from clients (plain on port 80, after
//! TLS on 443), reverse-proxied as HTTP/1.1 to the group's instances over
//! the mesh. `Host` (or `:authority`) picks the group; every request is
//! balanced on its own (it holds a slot on its instance until its response
//! body is done); `X-Forwarded-For`, `X-Forwarded-Proto` and
//! `X-Forwarded-Host` are set; a WebSocket upgrade passes through (the
//! slot is held while the socket is open); a `redirect` port answers 308
//! to `https://`. Refused requests get 503, unknown hosts 404, an
//! unreachable instance 502. Oversized headers get 431 (HTTP/1.1) or a
//! reset stream (HTTP/2).
//!
//! HTTP/1.1's common requests are served by the gateway's own loop
//! (`gateway::front`, httparse and bytes); hyper's server takes HTTP/2 and
//! the rest of an HTTP/1.1 connection from the first request the loop
//! leaves to it (so hyper answers malformed heads, upgrades and the
//! gateway's own answers).

use std::convert::Infallible;
use std::net::{SocketAddr, SocketAddrV4};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;

use super::idle::{Check, Closed, IdleClock};
use super::member::is_local_exhaustion;
use super::metrics::Counters;
use super::routes::{normalize_host, GroupRt, RouteSettings, Routes, Slot};
use super::upstream::{Key, Upstreams};
use meshlib::services::PortMode;

/// Errors inside bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type on both sides.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// What every HTTP connection shares.
pub struct HttpCtx {
    /// The groups.
    pub routes: Arc<Routes>,
    /// Timeouts.
    pub settings: RouteSettings,
    /// Reused upstream connections.
    pub upstreams: Arc<Upstreams>,
    /// Largest request head, bytes.
    pub max_header_bytes: usize,
    /// Time allowed for a request head, and for the first request of a
    /// connection to arrive (HTTP/2 detection, preface and SETTINGS
    /// included).
    pub header_timeout: Duration,
    /// A connection with no request in flight is closed after this long.
    pub idle_timeout: Duration,
    /// The certificates of port 443 (to answer 421 to a request for a
    /// name the connection's certificate does not cover).
    pub certs: Option<Arc<super::certs::Certs>>,
}

/// Time a connection closed for idleness gets to send its HTTP/2 GOAWAY
/// (or finish what it was writing) before it is dropped.
pub(super) const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// One client connection.
pub(super) struct Conn {
    pub(super) ctx: Arc<HttpCtx>,
    pub(super) peer: SocketAddr,
    pub(super) port: u16,
    pub(super) tls: bool,
    /// Over TLS with SNI: the name, and the certificate the client was
    /// shown for it.
    shown: Option<(String, Arc<rustls::sign::CertifiedKey>)>,
    /// Over TLS, the network whose group the SNI names: the connection is
    /// that network's, and a request for another network's group on it is
    /// refused (421), however the certificate covers its name.
    sni_network: Option<meshlib::ids::NetworkId>,
}

impl Conn {
    /// The group and the instances' port a request for `host` is proxied
    /// to; `None` when [`handle`] answers it itself (421 for a name this
    /// connection is not for, 404, a redirect, a port that is not HTTP).
    pub(super) fn proxy_route(&self, host: &str) -> Option<(Arc<GroupRt>, u16)> {
        if let Some((sni, cert)) = &self.shown {
            let name = super::routes::host_part(host);
            if !name.eq_ignore_ascii_case(sni)
                && super::certs::covers(&cert.cert[0], &normalize_host(host)).is_none()
            {
                return None;
            }
        }
        let (rt, port) = self.ctx.routes.find(self.port, Some(host))?;
        if self.sni_network.is_some_and(|n| n != rt.network) {
            return None;
        }
        match port.mode {
            PortMode::Http { .. } => Some((rt, port.destination_port)),
            PortMode::Redirect | PortMode::TlsTcp | PortMode::Udp => None,
        }
    }
}

/// The HTTP version a connection speaks, when TLS's ALPN said it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// ALPN chose `h2`.
    H2,
    /// ALPN chose `http/1.1`, or the client offered none over TLS.
    Http1,
    /// Plain TCP: HTTP/1.1, or HTTP/2 with prior knowledge (detected).
    Detect,
}

/// Serves one client connection (after TLS, if any) until it ends, or
/// until it has no request in flight for longer than its deadline
/// ([`IdleClock`]: the first request's, then the idle timeout).
///
/// `sni` is the TLS server name the client sent, if any: a request for a
/// name the certificate shown for it does not cover (HTTP/2 connection
/// coalescing gone wrong, or a `Host` of another name) is answered 421
/// Misdirected Request, so the client opens a connection for that name.
pub async fn serve<S>(
    ctx: Arc<HttpCtx>,
    stream: S,
    peer: SocketAddr,
    port: u16,
    alpn: Alpn,
    sni: Option<String>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut clock = IdleClock::new(Instant::now(), ctx.header_timeout, ctx.idle_timeout);
    let sni_network = sni.as_deref().and_then(|n| ctx.routes.network_of(n));
    let shown = match (&ctx.certs, sni) {
        (Some(certs), Some(sni)) => certs.pick(Some(&sni)).map(|ck| (normalize_host(&sni), ck)),
        _ => None,
    };
    let conn = Arc::new(Conn {
        ctx: ctx.clone(),
        peer,
        port,
        tls: alpn != Alpn::Detect,
        shown,
        sni_network,
    });
    // HTTP/1.1's common requests are the gateway's own loop's; the rest
    // of the connection goes to hyper at the first request the loop does
    // not serve.
    let mut stream = stream;
    let mut read = BytesMut::new();
    if alpn != Alpn::H2 {
        match super::front::serve(&conn, &mut stream, &mut read, &mut clock).await {
            super::front::End::Closed => return,
            super::front::End::Deadline(why) => {
                count_closed(&ctx, why, peer, port);
                return;
            }
            super::front::End::Handoff => {}
        }
    }
    let stream = super::front::Rewind::new(read.freeze(), stream);
    let clock = Arc::new(Mutex::new(clock));
    let in_flight = clock.clone();
    let service = hyper::service::service_fn(move |req| {
        let conn = conn.clone();
        let guard = InFlight::start(in_flight.clone());
        async move {
            let resp = handle(conn, req).await;
            Ok::<_, Infallible>(resp.map(|body| {
                Tracked {
                    inner: body,
                    _guard: guard,
                }
                .boxed_unsync()
            }))
        }
    });
    let max_list = u32::try_from(ctx.max_header_bytes).unwrap_or(u32::MAX);
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // hyper's head timer runs from the moment a keep-alive connection
    // waits for its next request: the idle timeout, then the head's own
    // time. (The first request's deadline, and the idle timeout itself,
    // are the clock's below.)
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(ctx.idle_timeout.saturating_add(ctx.header_timeout))
        .max_buf_size(ctx.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(max_list);
    let builder = match alpn {
        Alpn::H2 => builder.http2_only(),
        Alpn::Http1 => builder.http1_only(),
        Alpn::Detect => builder,
    };
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(connection);
    // Bounded: each turn sleeps until the clock's next deadline, which
    // only moves forward; the connection's end also ends the loop.
    let closed = loop {
        let check = clock.lock().check(Instant::now());
        let when = match check {
            Check::Close(why) => break why,
            Check::At(when) => when,
        };
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
                }
                return;
            }
            () = tokio::time::sleep_until(when.into()) => {}
        }
    };
    count_closed(&ctx, closed, peer, port);
    connection.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(CLOSE_GRACE, connection).await;
}

/// Counts and logs a connection closed for its deadline.
fn count_closed(ctx: &HttpCtx, closed: Closed, peer: SocketAddr, port: u16) {
    let stats = &ctx.routes.gateway;
    match closed {
        Closed::NoRequest => stats.closed_no_request.fetch_add(1, Relaxed),
        Closed::Idle => stats.closed_idle.fetch_add(1, Relaxed),
    };
    tracing::debug!(%peer, port, why = ?closed, "HTTP connection closed: no request in time");
}

/// A request in flight on its connection's [`IdleClock`], from its head to
/// the end (or drop) of its response.
struct InFlight(Arc<Mutex<IdleClock>>);

impl InFlight {
    fn start(clock: Arc<Mutex<IdleClock>>) -> Self {
        clock.lock().request_started();
        Self(clock)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.lock().request_done(Instant::now());
    }
}

/// A response body that keeps its request in flight until it is done.
struct Tracked {
    inner: ProxyBody,
    _guard: InFlight,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A plain-text answer.
fn text(status: StatusCode, msg: String) -> Response<ProxyBody> {
    let mut resp = Response::new(full(msg));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn full(s: String) -> ProxyBody {
    Full::new(Bytes::from(s))
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// The host a request is for.
fn host_of(req: &Request<Incoming>) -> Option<String> {
    req.uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })
}

async fn handle(conn: Arc<Conn>, req: Request<Incoming>) -> Response<ProxyBody> {
    let Some(host) = host_of(&req) else {
        return text(StatusCode::BAD_REQUEST, "no Host\n".into());
    };
    if let Some((sni, cert)) = &conn.shown {
        let name = normalize_host(&host);
        if name != *sni && super::certs::covers(&cert.cert[0], &name).is_none() {
            return text(
                StatusCode::MISDIRECTED_REQUEST,
                format!("this connection's certificate is not for {name}: open one for it\n"),
            );
        }
    }
    let Some((rt, port)) = conn.ctx.routes.find(conn.port, Some(&host)) else {
        return text(
            StatusCode::NOT_FOUND,
            format!(
                "no service at {} on port {}\n",
                normalize_host(&host),
                conn.port
            ),
        );
    };
    if conn.sni_network.is_some_and(|n| n != rt.network) {
        // A connection made for one network's name (HTTP/2 coalescing
        // under a shared wildcard, or a forged Host): never another's.
        return text(
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "{} is not served on this connection: open one for it\n",
                normalize_host(&host)
            ),
        );
    }
    match port.mode {
        PortMode::Redirect => redirect(&host, req.uri()),
        PortMode::Http { .. } => {
            proxy(
                &conn,
                rt,
                port.destination_port,
                &normalize_host(&host),
                req,
            )
            .await
        }
        PortMode::TlsTcp | PortMode::Udp => {
            text(StatusCode::NOT_FOUND, "not an HTTP port\n".into())
        }
    }
}

/// 308 to the same path on `https://`.
fn redirect(host: &str, uri: &Uri) -> Response<ProxyBody> {
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let location = format!("https://{}{path}", normalize_host(host));
    let mut resp = text(StatusCode::PERMANENT_REDIRECT, format!("{location}\n"));
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// Headers that belong to one hop only (RFC 9110 7.6.1), and the HTTP/2
/// upgrade's settings (RFC 7540 3.2.1), which never reach an instance.
pub(super) const HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "http2-settings",
];

fn strip_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .filter(|n| !(upgrade && n == header::UPGRADE))
        .collect();
    for n in named {
        headers.remove(n);
    }
    for h in HOP {
        if !(upgrade && h == "connection") {
            headers.remove(h);
        }
    }
    if !upgrade {
        headers.remove(header::UPGRADE);
    }
}

/// Whether a request asks to switch protocols and may: an HTTP/1.1
/// `Upgrade` named by `Connection`, unless it asks for `h2c`. An upgrade to
/// cleartext HTTP/2 is the gateway's business, not an instance's: passed
/// through, it would open an HTTP/2 connection to an instance that bypasses
/// the gateway's routing and checks (h2c smuggling). Such a request is
/// forwarded as a plain request, its `Upgrade` and `HTTP2-Settings` removed.
fn is_upgrade<B>(req: &Request<B>) -> bool {
    let tokens = |name| {
        req.headers()
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect::<Vec<_>>()
    };
    let upgrades = tokens(header::UPGRADE);
    req.version() == Version::HTTP_11
        && !upgrades.is_empty()
        && !upgrades.iter().any(|t| {
            t.split('/')
                .next()
                .is_some_and(|p| p.eq_ignore_ascii_case("h2c"))
        })
        && tokens(header::CONNECTION)
            .iter()
            .any(|t| t.eq_ignore_ascii_case("upgrade"))
}

async fn proxy(
    conn: &Conn,
    rt: Arc<GroupRt>,
    destination_port: u16,
    host: &str,
    mut req: Request<Incoming>,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let ctx = &conn.ctx;
    let upgrade = is_upgrade(&req);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    strip_hop(&mut parts.headers, upgrade);
    forwarded_headers(&mut parts.headers, conn, host);
    parts.uri = parts
        .uri
        .path_and_query()
        .map_or_else(|| Uri::from_static("/"), |p| Uri::from(p.clone()));
    parts.version = Version::HTTP_11;
    let stats = &ctx.routes.gateway;
    let dialer = rt.dialer();
    let chosen = choose(conn, &rt, destination_port, upgrade).await;
    let group = || rt.group_name();
    let Some((slot, addr, upstream)) = chosen else {
        let resp = text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "service group {}: no instance can take this request now\n",
                group()
            ),
        );
        rt.stats.total.response(503, started.elapsed());
        let mut resp = resp;
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return resp;
    };
    let instance = slot.counters.clone();
    let totals = Totals {
        group: rt.clone(),
        instance: instance.clone(),
    };
    let body = Counted {
        inner: body.map_err(|e| Box::new(e) as BoxError).boxed_unsync(),
        counted: totals.clone(),
        inbound: true,
        _slot: None,
    }
    .boxed_unsync();
    instance.forwarded.fetch_add(1, Relaxed);
    rt.stats.total.forwarded.fetch_add(1, Relaxed);
    let result: Result<Response<ProxyBody>, String> = match upstream {
        Up::Upgrade(mut sender) => {
            let req = Request::from_parts(parts, body);
            match sender.send_request(req).await {
                Ok(mut resp) => {
                    if let (Some(client), StatusCode::SWITCHING_PROTOCOLS) =
                        (client_upgrade, resp.status())
                    {
                        let code = resp.status().as_u16();
                        instance.response(code, started.elapsed());
                        rt.stats.total.response(code, started.elapsed());
                        let server = hyper::upgrade::on(&mut resp);
                        tokio::spawn(tunnel(client, server, totals, slot));
                        let (parts, _) = resp.into_parts();
                        return Response::from_parts(
                            parts,
                            Empty::new().map_err(|never| match never {}).boxed_unsync(),
                        );
                    }
                    Ok(resp.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed_unsync()))
                }
                Err(e) => Err(e.to_string()),
            }
        }
        Up::H1(upstream) => {
            let empty = body.is_end_stream();
            let give_back = |pool: Arc<Upstreams>| -> super::h1::GiveBack {
                Box::new(move |c| pool.put(addr, c))
            };
            let first = upstream
                .conn
                .exchange(&parts, body, give_back(ctx.upstreams.clone()))
                .await;
            let result = match first {
                // A kept connection the instance closed while it was idle:
                // once more on a new one (nothing was sent on that one).
                Err(e) if upstream.reused && empty && e.retryable() => {
                    let fresh = ctx
                        .upstreams
                        .get(
                            addr,
                            dialer.as_ref(),
                            ctx.settings.connect_timeout,
                            true,
                            stats,
                        )
                        .await;
                    match fresh {
                        Ok(f) => {
                            let none = Empty::new().map_err(|never| match never {}).boxed_unsync();
                            f.conn
                                .exchange(&parts, none, give_back(ctx.upstreams.clone()))
                                .await
                        }
                        Err(_) => Err(e),
                    }
                }
                other => other,
            };
            result.map_err(|e| e.to_string())
        }
    };
    let resp = match result {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(group = %group(), error = %e, "upstream request failed");
            instance.response(502, started.elapsed());
            rt.stats.total.response(502, started.elapsed());
            return text(
                StatusCode::BAD_GATEWAY,
                format!("service group {}: the instance failed: {e}\n", group()),
            );
        }
    };
    let code = resp.status().as_u16();
    instance.response(code, started.elapsed());
    rt.stats.total.response(code, started.elapsed());
    let (mut parts, body) = resp.into_parts();
    strip_hop(&mut parts.headers, false);
    let body = Counted {
        inner: body,
        counted: totals,
        inbound: false,
        _slot: Some(slot),
    };
    Response::from_parts(parts, body.boxed_unsync())
}

/// An instance of `rt` that takes a request, and a connection to it on
/// `destination_port`: a kept or new one, or for an upgrade a new one
/// through hyper's client. A failed dial tries other instances (at most
/// four dials). `None`: no instance can take the request now.
pub(super) async fn choose(
    conn: &Conn,
    rt: &Arc<GroupRt>,
    destination_port: u16,
    upgrade: bool,
) -> Option<(Slot, Key, Up)> {
    let ctx = &conn.ctx;
    let stats = &ctx.routes.gateway;
    let dialer = rt.dialer();
    for _ in 0..4 {
        let slot = rt
            .acquire_for(conn.peer.ip().to_canonical(), true, &ctx.settings)
            .await?;
        let addr = (
            rt.network,
            SocketAddrV4::new(slot.pick().ip, destination_port),
        );
        let timeout = ctx.settings.connect_timeout;
        let got = if upgrade {
            ctx.upstreams
                .dial_upgrade(addr, dialer.as_ref(), timeout, stats)
                .await
                .map(Up::Upgrade)
        } else {
            ctx.upstreams
                .get(addr, dialer.as_ref(), timeout, false, stats)
                .await
                .map(Up::H1)
        };
        match got {
            Ok(upstream) => return Some((slot, addr, upstream)),
            // The gateway's own ports or descriptors ran out: not the
            // instance's fault, and no other instance would do better.
            Err(e) if is_local_exhaustion(&e) => {
                stats.local_error("connection to an instance", &e);
                return None;
            }
            Err(e) => {
                tracing::debug!(instance = %slot.pick().instance, error = %e, "upstream dial failed");
                slot.counters.dial_failures.fetch_add(1, Relaxed);
                rt.stats.total.dial_failures.fetch_add(1, Relaxed);
                if slot.fail(&e) {
                    tokio::time::sleep(super::routes::FRESH_RETRY).await;
                }
            }
        }
    }
    None
}

/// The connection a request goes out on.
pub(super) enum Up {
    /// A kept or new HTTP/1.1 connection ([`super::h1`]).
    H1(super::upstream::Upstream),
    /// A new connection through hyper's client, for an upgrade.
    Upgrade(SendRequest<ProxyBody>),
}

/// `X-Forwarded-For` (appended), `X-Forwarded-Proto`, `X-Forwarded-Host`,
/// and `Host` (an HTTP/2 request has only `:authority`).
fn forwarded_headers(headers: &mut HeaderMap, conn: &Conn, host: &str) {
    let ip = conn.peer.ip().to_canonical().to_string();
    let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {ip}"),
        None => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert("x-forwarded-for", v);
    }
    let proto = if conn.tls { "https" } else { "http" };
    headers.insert("x-forwarded-proto", HeaderValue::from_static(proto));
    if let Ok(v) = HeaderValue::from_str(host) {
        headers.insert("x-forwarded-host", v.clone());
        if !headers.contains_key(header::HOST) {
            headers.insert(header::HOST, v);
        }
    }
}

/// Both upgraded halves, bytes both ways; the slot is held meanwhile.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    server: hyper::upgrade::OnUpgrade,
    totals: Totals,
    slot: Slot,
) {
    let (Ok(c), Ok(s)) = tokio::join!(client, server) else {
        return;
    };
    let (mut c, mut s) = (TokioIo::new(c), TokioIo::new(s));
    if let Ok((up, down)) = tokio::io::copy_bidirectional(&mut c, &mut s).await {
        totals.add(true, up);
        totals.add(false, down);
    }
    drop(slot);
}

/// Where bytes are counted: the group's totals and the instance's.
#[derive(Clone)]
pub(super) struct Totals {
    pub(super) group: Arc<GroupRt>,
    pub(super) instance: Arc<Counters>,
}

impl Totals {
    pub(super) fn add(&self, inbound: bool, n: u64) {
        for c in [&self.group.stats.total, self.instance.as_ref()] {
            let counter: &AtomicU64 = if inbound { &c.bytes_in } else { &c.bytes_out };
            counter.fetch_add(n, Relaxed);
        }
    }
}

/// A body that counts its bytes (and holds a slot until it is done).
struct Counted {
    inner: ProxyBody,
    counted: Totals,
    inbound: bool,
    _slot: Option<Slot>,
}

impl Body for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.counted.add(self.inbound, data.len() as u64);
            }
        }
        if let Poll::Ready(None) = &polled {
            // Done: free the instance's slot now, not when hyper drops us.
            self._slot = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().uri("/").version(Version::HTTP_11);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("request")
    }

    #[test]
    fn websocket_upgrades_pass_and_h2c_upgrades_do_not() {
        let ws = request(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert!(is_upgrade(&ws));
        for h2c in ["h2c", "H2C", "websocket, h2c", "h2c/1"] {
            let r = request(&[
                ("connection", "Upgrade, HTTP2-Settings"),
                ("upgrade", h2c),
                ("http2-settings", "AAMAAABkAAQAAP__"),
            ]);
            assert!(!is_upgrade(&r), "{h2c}");
            let mut headers = r.headers().clone();
            strip_hop(&mut headers, false);
            assert!(headers.is_empty(), "{h2c}: {headers:?}");
        }
        // Without `Connection: upgrade`, or over HTTP/1.0: no upgrade.
        assert!(!is_upgrade(&request(&[("upgrade", "websocket")])));
        let mut old = request(&[("connection", "upgrade"), ("upgrade", "websocket")]);
        *old.version_mut() = Version::HTTP_10;
        assert!(!is_upgrade(&old));
    }
}
