//! The web console at `/ui`: plain HTML, CSS and JavaScript embedded in
//! the binary (`keyserver/ui/`, no build step, no third-party request).
//!
//! The browser never holds an API token. Signing in (`POST /ui/session`
//! with a token) makes a session in memory ([`SESSION_IDLE`],
//! [`SESSION_LIFETIME`]) whose random id travels in an `HttpOnly`,
//! `SameSite=Strict` cookie (`Secure` when the page is served over
//! HTTPS); the session keeps the token server-side. Every other console
//! route reads that session:
//! - `GET|POST|PUT|PATCH|DELETE /ui/api/v1/...`: the admin API's own
//!   router, called in-process with the session's token — the console
//!   shows and changes exactly what that token may through the API
//!   (the same handlers, checks and audit trail: an action's entry names
//!   the session's token and the browser's address);
//! - `GET /ui/events?network=`: Server-Sent Events fed by the pushes
//!   members get ([`crate::server::Shared::subscribe`]), plus a `tick`
//!   every few seconds for heartbeats (last seen);
//!
//! Members' paths and round trips come with the API's member listing
//! (`GET /v1/networks/{net}/members`, [`crate::listing::MemberRow`]), as
//! for `keyserver member list`.
//!
//! Actions (every method but GET) need the session's CSRF token in an
//! `X-CSRF-Token` header and an `Origin` naming this host.
//!
//! **All** of the console's authentication and authorization is in
//! `authorize`: it calls the admin API's token check
//! (`bearer_principal`), so the console follows scoped tokens
//! (role → [`Principal`], tenant → the API's own filtering of what the
//! forwarded calls return).
//!
//! Every answer carries a strict Content-Security-Policy (no inline
//! script or style, nothing but this origin), `X-Content-Type-Options`,
//! `frame-ancestors 'none'` and `Referrer-Policy: no-referrer`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Json, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use meshlib::ids::NetworkId;
use parking_lot::Mutex;
use rand_core::RngCore as _;
use serde::{Deserialize, Serialize};
use serde_json::json;
use subtle::ConstantTimeEq;
use tower::ServiceExt as _;

use super::{Api, ApiError};

/// A session ends after this long without a request.
pub const SESSION_IDLE: Duration = Duration::from_secs(30 * 60);
/// A session ends this long after sign-in, used or not.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Most sessions held; signing in past it ends the least recently used.
pub const MAX_SESSIONS: usize = 1024;
/// How often an event stream sends a `tick` (heartbeats are not pushes;
/// the page refreshes last-seen times on it).
const TICK: Duration = Duration::from_secs(5);
/// An event stream ends after this long; the browser reconnects.
const STREAM_LIFETIME: Duration = Duration::from_secs(600);
/// Largest request body the console takes (the API's own limit applies
/// to forwarded calls too).
const MAX_BODY: usize = 64 * 1024;

const COOKIE: &str = "ist_console";
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; \
    connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; \
    form-action 'self'; frame-ancestors 'none'";

/// The embedded files: path under `/ui`, content type, bytes.
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "/",
        "text/html; charset=utf-8",
        include_bytes!("../../ui/index.html"),
    ),
    (
        "/app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../ui/app.js"),
    ),
    (
        "/app.css",
        "text/css; charset=utf-8",
        include_bytes!("../../ui/app.css"),
    ),
    (
        "/icon.svg",
        "image/svg+xml",
        include_bytes!("../../ui/icon.svg"),
    ),
];

/// What a signed-in console user may do; the page shows action buttons
/// only when `can_act`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Principal {
    /// The token's role (`viewer`, `operator`, `admin`).
    pub role: &'static str,
    /// May change things (remove, revoke, create); a viewer may not.
    pub can_act: bool,
}

#[derive(Debug)]
struct Session {
    token: String,
    csrf: String,
    created: Instant,
    used: Instant,
}

/// State of the console routes.
#[derive(Clone)]
struct Ui {
    api: Api,
    /// The admin API's router (with its token check), called in-process.
    admin: Router,
    sessions: Arc<Mutex<HashMap<String, Session>>>,
}

/// What a request needs from [`authorize`].
enum Need<'a> {
    /// Signing in with this token.
    SignIn(&'a str),
    /// Reading, with a session.
    Read,
    /// Changing something, with a session, its CSRF token and this origin.
    Act,
}

/// What [`authorize`] grants: the session and what it may do.
struct Grant {
    /// The session id (`None` when signing in).
    id: Option<String>,
    token: String,
    csrf: String,
    principal: Principal,
}

/// The console's routes, to nest under `/ui`; `admin` is the admin API's
/// router (token check included), which the console calls for its data
/// and actions.
pub(super) fn router(api: Api, admin: Router) -> Router {
    let ui = Ui {
        api,
        admin,
        sessions: Arc::default(),
    };
    Router::new()
        .route("/session", get(session_info).post(sign_in).delete(sign_out))
        .route("/api/{*path}", any(forward))
        .route("/events", get(events))
        .fallback(asset)
        .layer(middleware::from_fn(security_headers))
        .with_state(ui)
}

/// The one place the console decides who may do what. Signing in, and
/// every request of a session, runs the admin API's own token check
/// ([`super::bearer_principal`]): a token revoked or narrowed takes effect
/// on the console's next request. Actions also need the session's CSRF
/// token (`X-CSRF-Token`) and an `Origin` naming this host, and a
/// principal that may act.
///
/// Scoped tokens: a viewer gets `can_act: false`; a token's tenant needs
/// nothing here, as every piece of data the console shows comes through
/// the API with the session's token (the network check of [`visible`]
/// included).
fn authorize(ui: &Ui, headers: &HeaderMap, need: Need) -> Result<Grant, ApiError> {
    let unauthorized = || ApiError(StatusCode::UNAUTHORIZED, "not signed in".into());
    if matches!(need, Need::SignIn(_) | Need::Act) {
        same_origin(headers)?;
    }
    let now = Instant::now();
    let (id, token, csrf) = match need {
        Need::SignIn(token) => (None, token.to_owned(), String::new()),
        Need::Read | Need::Act => {
            let id = session_cookie(headers).ok_or_else(unauthorized)?;
            let mut sessions = ui.sessions.lock();
            let s = sessions.get_mut(id).ok_or_else(unauthorized)?;
            if now.duration_since(s.used) > SESSION_IDLE
                || now.duration_since(s.created) > SESSION_LIFETIME
            {
                sessions.remove(id);
                return Err(unauthorized());
            }
            s.used = now;
            (Some(id.to_owned()), s.token.clone(), s.csrf.clone())
        }
    };
    let Some(who) = super::bearer_principal(&ui.api, &token).filter(|p| p.uses_api()) else {
        if let Some(id) = &id {
            ui.sessions.lock().remove(id);
        }
        return Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "the token is not (or no longer) valid".into(),
        ));
    };
    // A viewer gets no action; an operator's or admin's actions are
    // checked again per network by the API it calls.
    let principal = Principal {
        role: who.role.as_str(),
        can_act: who.role >= crate::auth::Role::Operator,
    };
    if matches!(need, Need::Act) {
        let given = headers
            .get("x-csrf-token")
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if csrf.is_empty() || !bool::from(given.ct_eq(csrf.as_bytes())) {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                "missing or wrong CSRF token".into(),
            ));
        }
        if !principal.can_act {
            return Err(ApiError(StatusCode::FORBIDDEN, "read-only token".into()));
        }
    }
    Ok(Grant {
        id,
        token,
        csrf,
        principal,
    })
}

/// Refuses a request whose `Origin` is absent or another site's (and a
/// browser's `Sec-Fetch-Site` other than same-origin).
fn same_origin(headers: &HeaderMap) -> Result<(), ApiError> {
    let refuse = |why: &str| ApiError(StatusCode::FORBIDDEN, why.to_owned());
    let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let host = text(header::HOST).ok_or_else(|| refuse("no Host header"))?;
    let origin = text(header::ORIGIN).ok_or_else(|| refuse("no Origin header"))?;
    let authority = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    if authority != Some(host) {
        return Err(refuse("cross-origin request refused"));
    }
    if let Some(site) = headers.get("sec-fetch-site") {
        if site != "same-origin" {
            return Err(refuse("cross-site request refused"));
        }
    }
    Ok(())
}

/// The session id of the request's cookie, if any.
fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

fn random_id() -> String {
    let mut bytes = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Body of `POST /ui/session`.
#[derive(Deserialize)]
struct SignIn {
    token: String,
}

/// `POST /ui/session`: checks the token, makes a session, sets its cookie.
async fn sign_in(State(ui): State<Ui>, headers: HeaderMap, body: Bytes) -> Response {
    let Ok(SignIn { token }) = serde_json::from_slice::<SignIn>(&body) else {
        return ApiError(
            StatusCode::BAD_REQUEST,
            "expected {\"token\": \"...\"}".into(),
        )
        .into_response();
    };
    let grant = match authorize(&ui, &headers, Need::SignIn(token.trim())) {
        Ok(g) => g,
        Err(e) => return e.into_response(),
    };
    let (id, csrf, now) = (random_id(), random_id(), Instant::now());
    {
        let mut sessions = ui.sessions.lock();
        sessions.retain(|_, s| {
            now.duration_since(s.used) <= SESSION_IDLE
                && now.duration_since(s.created) <= SESSION_LIFETIME
        });
        if sessions.len() >= MAX_SESSIONS {
            let oldest = sessions
                .iter()
                .min_by_key(|(_, s)| s.used)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                sessions.remove(&k);
            }
        }
        sessions.insert(
            id.clone(),
            Session {
                token: grant.token,
                csrf: csrf.clone(),
                created: now,
                used: now,
            },
        );
    }
    let secure = headers
        .get(header::ORIGIN)
        .is_some_and(|o| o.as_bytes().starts_with(b"https://"));
    let cookie = format!(
        "{COOKIE}={id}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={}{}",
        SESSION_LIFETIME.as_secs(),
        if secure { "; Secure" } else { "" }
    );
    let mut resp = Json(json!({
        "role": grant.principal.role,
        "can_act": grant.principal.can_act,
        "csrf": csrf,
    }))
    .into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

/// `GET /ui/session`: the signed-in session's role and CSRF token.
async fn session_info(State(ui): State<Ui>, headers: HeaderMap) -> Result<Response, ApiError> {
    let g = authorize(&ui, &headers, Need::Read)?;
    Ok(Json(json!({
        "role": g.principal.role,
        "can_act": g.principal.can_act,
        "csrf": g.csrf,
    }))
    .into_response())
}

/// `DELETE /ui/session`: signs out (the session is forgotten).
async fn sign_out(State(ui): State<Ui>, headers: HeaderMap) -> Result<Response, ApiError> {
    let g = authorize(&ui, &headers, Need::Act)?;
    if let Some(id) = g.id {
        ui.sessions.lock().remove(&id);
    }
    let mut resp = Json(json!({ "signed_out": true })).into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("ist_console=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    Ok(resp)
}

/// `/ui/api/v1/...`: the admin API's route of the same path, called with
/// the session's token (reads need a session; every other method is an
/// action: CSRF token and origin checked first).
async fn forward(State(ui): State<Ui>, req: Request) -> Response {
    let need = if matches!(*req.method(), Method::GET | Method::HEAD) {
        Need::Read
    } else {
        Need::Act
    };
    let grant = match authorize(&ui, req.headers(), need) {
        Ok(g) => g,
        Err(e) => return e.into_response(),
    };
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path().strip_prefix("/api").unwrap_or_default();
    if !path.starts_with("/v1/") {
        return ApiError(
            StatusCode::NOT_FOUND,
            "the console forwards /v1/ only".into(),
        )
        .into_response();
    }
    let target = match parts.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    let Ok(uri) = target.parse() else {
        return ApiError(StatusCode::BAD_REQUEST, "bad path".into()).into_response();
    };
    parts.uri = uri;
    // Not this router's path parameters (the API's `Path` would see
    // them); the browser's address ([`super::ClientAddr`], set per
    // connection by [`super::serve`]), for the audit trail's "from where".
    let peer = parts.extensions.get::<super::ClientAddr>().copied();
    parts.extensions = Default::default();
    if let Some(peer) = peer {
        parts.extensions.insert(peer);
    }
    // Only what the API reads; the browser's cookies stay here.
    let content_type = parts.headers.get(header::CONTENT_TYPE).cloned();
    parts.headers.clear();
    if let Some(ct) = content_type {
        parts.headers.insert(header::CONTENT_TYPE, ct);
    }
    call_api(&ui, &grant, parts, body).await
}

/// Calls the admin API's router in-process with the grant's token.
async fn call_api(
    ui: &Ui,
    grant: &Grant,
    mut parts: axum::http::request::Parts,
    body: Body,
) -> Response {
    match HeaderValue::from_str(&format!("Bearer {}", grant.token)) {
        Ok(v) => parts.headers.insert(header::AUTHORIZATION, v),
        Err(_) => return ApiError(StatusCode::UNAUTHORIZED, "bad token".into()).into_response(),
    };
    let req = Request::from_parts(parts, body);
    match ui.admin.clone().oneshot(req).await {
        Ok(resp) => resp,
        Err(never) => match never {},
    }
}

/// Query of the per-network console routes.
#[derive(Deserialize)]
struct NetQuery {
    network: String,
}

/// The network `net` (id or name) if the grant's token may see it: asks
/// the API (`GET /v1/networks/{net}`), so a scoped token's tenant applies.
async fn visible(ui: &Ui, grant: &Grant, net: &str) -> Result<NetworkId, ApiError> {
    let unknown = || ApiError(StatusCode::NOT_FOUND, format!("no network {net:?}"));
    let path = format!("/v1/networks/{}", percent_encode(net));
    let req = Request::get(path)
        .body(Body::empty())
        .map_err(|_| unknown())?;
    let (parts, body) = req.into_parts();
    let resp = call_api(ui, grant, parts, body).await;
    if resp.status() != StatusCode::OK {
        return Err(unknown());
    }
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .map_err(|_| unknown())?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| unknown())?;
    v["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(unknown)
}

/// Percent-encodes everything but unreserved characters (a path segment).
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `GET /ui/events?network=`: a Server-Sent Events stream: `change` for
/// every push of the network (what members get), `tick` every [`TICK`];
/// it ends when the session does, or after [`STREAM_LIFETIME`].
async fn events(
    State(ui): State<Ui>,
    headers: HeaderMap,
    Query(q): Query<NetQuery>,
) -> Result<Response, ApiError> {
    let grant = authorize(&ui, &headers, Need::Read)?;
    let id = visible(&ui, &grant, &q.network).await?;
    let ((), mut pushes) = ui.api.shared.subscribe_at(id, |_| ());
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(16);
    tokio::spawn(async move {
        let end = tokio::time::sleep(STREAM_LIFETIME);
        tokio::pin!(end);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next = "retry: 1000\nevent: hello\ndata: {}\n\n".to_owned();
        loop {
            if tx.send(Ok(Bytes::from(next))).await.is_err() {
                return;
            }
            next = tokio::select! {
                pushed = pushes.recv() => match pushed {
                    Ok(p) => format!(
                        "event: change\ndata: {}\n\n",
                        json!({
                            "generation": p.to,
                            "removed": p.removed.iter().map(|k| k.to_string()).collect::<Vec<_>>(),
                        })
                    ),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        "event: change\ndata: {}\n\n".to_owned()
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
                _ = tick.tick() => {
                    if authorize(&ui, &headers, Need::Read).is_err() {
                        return;
                    }
                    "event: tick\ndata: {}\n\n".to_owned()
                }
                () = tx.closed() => return,
                () = &mut end => return,
            };
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response())
}

/// The embedded files (GET only); anything else is 404.
async fn asset(method: Method, uri: axum::http::Uri) -> Response {
    let path = match uri.path() {
        "" | "/index.html" => "/",
        p => p,
    };
    let found = ASSETS.iter().find(|(p, _, _)| *p == path);
    match (method, found) {
        (Method::GET | Method::HEAD, Some((_, mime, body))) => (
            [
                (header::CONTENT_TYPE, *mime),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            *body,
        )
            .into_response(),
        _ => ApiError(StatusCode::NOT_FOUND, format!("no page {path}")).into_response(),
    }
}

/// Adds the security headers to every console answer (API errors too).
async fn security_headers(req: Request, next: Next) -> Response {
    let big = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .is_some_and(|n| n > MAX_BODY);
    let mut resp = if big {
        ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body larger than {MAX_BODY} bytes"),
        )
        .into_response()
    } else {
        next.run(req).await
    };
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn origin_must_name_this_host() {
        let ok = headers(&[
            ("host", "127.0.0.1:7480"),
            ("origin", "http://127.0.0.1:7480"),
        ]);
        assert!(same_origin(&ok).is_ok());
        for bad in [
            headers(&[("host", "127.0.0.1:7480")]),
            headers(&[
                ("host", "127.0.0.1:7480"),
                ("origin", "http://evil.example"),
            ]),
            headers(&[("host", "127.0.0.1:7480"), ("origin", "null")]),
            headers(&[
                ("host", "127.0.0.1:7480"),
                ("origin", "http://127.0.0.1:7480"),
                ("sec-fetch-site", "cross-site"),
            ]),
            headers(&[("origin", "http://127.0.0.1:7480")]),
        ] {
            assert!(same_origin(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cookie_is_found_among_others() {
        let h = headers(&[("cookie", "a=1; ist_console=abc; b=2")]);
        assert_eq!(session_cookie(&h), Some("abc"));
        let h = headers(&[("cookie", "ist_consolex=abc"), ("cookie", "x=1")]);
        assert_eq!(session_cookie(&h), None);
    }

    #[test]
    fn percent_encoding_keeps_unreserved_only() {
        assert_eq!(percent_encode("pn-1_a.b~"), "pn-1_a.b~");
        assert_eq!(percent_encode("a b/é?"), "a%20b%2F%C3%A9%3F");
    }
}
