//! The admin API: JSON over HTTP, a bearer token on every route but the
//! health checks (compared in constant time), and `GET /openapi.json`.
//!
//! Every error answer, whatever produced it (a handler, a rejected JSON
//! body, an unknown route, a wrong method, a limit), is
//! `{"error": "..."}` with `content-type: application/json`.
//!
//! Routes (`{net}` is a network id or name; `{member}` a public key or an
//! instance name; names in paths are percent-encoded):
//! - `GET /healthz` (process alive), `GET /readyz` (store writable),
//!   `GET /metrics` (Prometheus), no token
//! - `GET /v1/networks`, `POST /v1/networks` `{name, range?}`
//! - `GET /v1/networks/{net}`, `DELETE /v1/networks/{net}[?force=true]`
//! - `GET /v1/networks/{net}/members` (each with its names and the summary
//!   of the paths it reported, [`crate::listing::MemberRow`]),
//!   `GET|DELETE /v1/networks/{net}/members/{member}` (GET: the member with
//!   the names that answer it and its path to each peer, [`crate::listing`])
//! - `GET /v1/networks/{net}/names`: every private name and its answer (seed 003)
//! - `GET /v1/networks/{net}/addresses`, `GET|PATCH /v1/networks/{net}/addresses/{service}`:
//!   service addresses, their wake and idle settings and state (scale to
//!   zero, `addresses.rs`); `GET /v1/networks/{net}/traffic`: the service
//!   graph from members' traffic reports
//! - `GET /v1/networks/{net}/tokens`, `POST /v1/networks/{net}/tokens`
//!   `{uses?, expires?, service?, process_type?, service_group?}`, `DELETE /v1/networks/{net}/tokens/{id}`
//! - service groups (seed 002): `GET|POST /v1/networks/{net}/services`,
//!   `GET|PATCH|DELETE /v1/networks/{net}/services/{name}`,
//!   `PUT|DELETE /v1/networks/{net}/services/{name}/instances/{member}`, and
//!   the same under `/services` with `?network=` (see `services.rs`)
//! - `/ui`: the web console, no bearer token (a session cookie; see [`ui`])
//!
//! Slow clients cannot hold the API: request headers must arrive within
//! [`ApiLimits::header_timeout`], a request body within
//! [`ApiLimits::request_timeout`] and [`ApiLimits::max_body`] bytes, and at
//! most [`ApiLimits::max_connections`] connections are open at a time: a new
//! one closes the oldest ([`crate::admission::Admission`]), so connections
//! that trickle cannot keep an operator waiting.

mod access;
mod addresses;
mod body;
mod openapi;
mod routes;
mod services;
pub mod ui;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use parking_lot::Mutex;
use serde_json::json;
use tokio::sync::oneshot;

pub use access::{ApiTokenView, ClientAddr, CreateApiToken};
pub use body::JsonBody;
pub use openapi::openapi_doc;
pub use routes::{CreateNetwork, CreateToken, NetworkView, TokenView};
pub use services::{AttachedView, ServiceView};

use crate::admission::Admission;
pub use crate::auth::Principal;
use crate::registry::AdminError;
use crate::server::{OpError, Shared};

/// Limits of the admin API server (plain data; see [`crate::config::Config`]).
#[derive(Debug, Clone)]
pub struct ApiLimits {
    /// Time a client has to send a request's headers.
    pub header_timeout: Duration,
    /// Time a request's body may take to arrive.
    pub request_timeout: Duration,
    /// Largest request body, in bytes.
    pub max_body: usize,
    /// Most connections open at a time; a new one closes the oldest.
    pub max_connections: usize,
}

impl Default for ApiLimits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            max_body: 64 * 1024,
            max_connections: 128,
        }
    }
}

/// State of the admin routes.
#[derive(Clone)]
struct Api {
    shared: Arc<Shared>,
    token: Arc<str>,
    limits: ApiLimits,
}

/// The admin router. Every route but `/healthz`, `/readyz` and `/metrics` requires
/// `Authorization: Bearer <token>` (unknown routes too: they answer 401
/// without it, 404 with it).
pub fn router(shared: Arc<Shared>, token: String, limits: ApiLimits) -> Router {
    let api = Api {
        shared,
        token: token.into(),
        limits,
    };
    let protected = Router::new()
        .route("/openapi.json", get(routes::openapi))
        .route(
            "/v1/networks",
            get(routes::list_networks).post(routes::create_network),
        )
        .route(
            "/v1/networks/{net}",
            get(routes::get_network)
                .patch(routes::update_network)
                .delete(routes::delete_network),
        )
        .route("/v1/networks/{net}/members", get(routes::list_members))
        .route("/v1/backup", get(routes::backup))
        .route(
            "/v1/networks/{net}/members/{member}",
            get(routes::get_member).delete(routes::remove_member),
        )
        .route("/v1/networks/{net}/names", get(routes::list_names))
        .route("/v1/networks/{net}/addresses", get(addresses::list))
        .route(
            "/v1/networks/{net}/addresses/{service}",
            get(addresses::get).patch(addresses::update),
        )
        .route("/v1/networks/{net}/traffic", get(addresses::traffic))
        .route(
            "/v1/networks/{net}/tokens",
            get(routes::list_tokens).post(routes::create_token),
        )
        .route(
            "/v1/networks/{net}/tokens/{id}",
            delete(routes::delete_token),
        )
        // Service groups (seed 002), and the seed-shaped `/services` aliases.
        .route(
            "/v1/networks/{net}/services",
            get(services::list).post(services::create),
        )
        .route(
            "/v1/networks/{net}/services/{name}",
            get(services::get)
                .patch(services::update)
                .delete(services::delete),
        )
        .route(
            "/v1/networks/{net}/services/{name}/instances/{member}",
            axum::routing::put(services::attach).delete(services::detach),
        )
        .route(
            "/services",
            get(services::alias_list).post(services::alias_create),
        )
        .route(
            "/services/{name}",
            get(services::alias_get)
                .patch(services::alias_update)
                .delete(services::alias_delete),
        )
        .route(
            "/services/{name}/instances/{member}",
            axum::routing::put(services::alias_attach).delete(services::alias_detach),
        )
        .route(
            "/v1/api-tokens",
            get(access::list_tokens).post(access::create_token),
        )
        .route("/v1/api-tokens/{id}", delete(access::revoke_token))
        .route("/v1/audit", get(access::audit))
        .route_layer(middleware::from_fn_with_state(api.clone(), access::guard))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(api.clone(), read_body))
        .layer(middleware::from_fn_with_state(api.clone(), auth));
    // The web console calls the API's own routes (token check included).
    let console = ui::router(api.clone(), protected.clone().with_state(api.clone()));
    Router::new()
        .nest_service("/ui", console)
        .route("/healthz", get(routes::healthz))
        .route("/readyz", get(routes::readyz))
        .route("/metrics", get(routes::metrics))
        .merge(protected)
        .layer(middleware::from_fn(json_errors))
        .with_state(api)
}

/// An API error: status and message, as `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<AdminError> for ApiError {
    fn from(e: AdminError) -> Self {
        let status = match e {
            AdminError::UnknownNetwork(_)
            | AdminError::UnknownMember(_)
            | AdminError::UnknownToken(_) => StatusCode::NOT_FOUND,
            AdminError::NameTaken(_)
            | AdminError::LookAlike { .. }
            | AdminError::NetworkInUse { .. } => StatusCode::CONFLICT,
            AdminError::UnknownService(_) | AdminError::UnknownAddress(_) => StatusCode::NOT_FOUND,
            AdminError::BadAddress(_) => StatusCode::BAD_REQUEST,
            AdminError::ServiceTaken(_) => StatusCode::CONFLICT,
            AdminError::Service(_) => StatusCode::BAD_REQUEST,
            AdminError::BadName { .. }
            | AdminError::BadRange(_)
            | AdminError::BadUses
            | AdminError::BadExpiry(_)
            | AdminError::BadBinding(_) => StatusCode::BAD_REQUEST,
        };
        Self(status, e.to_string())
    }
}

impl From<OpError<AdminError>> for ApiError {
    fn from(e: OpError<AdminError>) -> Self {
        match e {
            OpError::Refused(e) => e.into(),
            OpError::Store(
                e @ (crate::store::StoreError::Unavailable(_)
                | crate::store::StoreError::Conflict { .. }),
            ) => Self(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("nothing changed: {e}; retry later"),
            ),
            OpError::Store(e) => Self(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }
}

async fn not_found(req: Request) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        format!("no route {} {}", req.method(), req.uri().path()),
    )
}

/// Resolves the bearer token to a [`Principal`] (401 when it is missing,
/// unknown, revoked or expired) and puts it into the request's extensions
/// for [`access::guard`] and the handlers.
async fn auth(State(api): State<Api>, mut req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    match bearer_principal(&api, given) {
        Some(principal) if !principal.uses_api() => ApiError(
            StatusCode::FORBIDDEN,
            "a gateway credential has no access to the admin API".into(),
        )
        .into_response(),
        Some(principal) => {
            req.extensions_mut().insert(principal);
            next.run(req).await
        }
        None => ApiError(
            StatusCode::UNAUTHORIZED,
            "missing, wrong, revoked or expired bearer token".into(),
        )
        .into_response(),
    }
}

/// Who `given` (a bearer token) is: the keyserver's admin token or a
/// live API token ([`crate::auth::resolve`]); `None` for anything else.
/// The web console signs in and authorizes every request with it too
/// ([`ui`]).
fn bearer_principal(api: &Api, given: &str) -> Option<crate::auth::Principal> {
    let now = crate::registry::unix(std::time::SystemTime::now());
    let lookup = |hash: &[u8; 32]| api.shared.read(|r| r.api_token(hash).cloned());
    // A gateway credential's text (`istg1.`) stands for its API token: it
    // resolves, so that it is told it may not use the API (403).
    let given = match given.trim().parse::<meshlib::proto::GatewayToken>() {
        Ok(g) => crate::auth::new_secret(&g.secret),
        Err(_) => given.trim().to_owned(),
    };
    crate::auth::resolve(&given, &api.token, now, lookup).ok()
}

/// Reads the body of a request that has one (POST, PUT, PATCH) within the
/// time and size limits, before the handler sees it: 408 for a body that
/// trickles, 413 for one too large. Other methods' bodies are never read.
async fn read_body(State(api): State<Api>, req: Request, next: Next) -> Response {
    if !matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH) {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let limits = &api.limits;
    let read = axum::body::to_bytes(body, limits.max_body);
    let bytes = match tokio::time::timeout(limits.request_timeout, read).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(_)) => {
            return ApiError(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body larger than {} bytes", limits.max_body),
            )
            .into_response()
        }
        Err(_) => {
            return ApiError(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "request body not received within {} s",
                    limits.request_timeout.as_secs()
                ),
            )
            .into_response()
        }
    };
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

/// Turns every error answer that is not JSON yet (axum's rejections of a
/// JSON body, 405 for a wrong method, ...) into `{"error": "<its text>"}`,
/// keeping its status and headers (`Allow` of a 405).
async fn json_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 16 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_lowercase()
    } else {
        text
    };
    let body = serde_json::to_vec(&json!({ "error": message })).unwrap_or_default();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, axum::body::Body::from(body))
}

/// Serves `router` on `listener` until `shutdown` completes, with the
/// header-read timeout and connection limit of `limits`; connections still
/// open at shutdown finish their request (bounded by the same timeouts).
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: ApiLimits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let gate = Arc::new(Mutex::new((
        Admission::new(limits.max_connections, limits.max_connections),
        HashMap::<u64, oneshot::Sender<()>>::new(),
    )));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(64 * 1024);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!("admin API: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            () = &mut shutdown => break,
        };
        let (id, mut evicted) = {
            let (tx, rx) = oneshot::channel();
            let mut state = gate.lock();
            let admitted = state.0.admit(peer.ip());
            for old in &admitted.evict {
                if let Some(end) = state.1.remove(old) {
                    let _ = end.send(());
                }
            }
            state.1.insert(admitted.id, tx);
            (admitted.id, rx)
        };
        // Handlers and the audit trail see the client's address.
        let with_peer = router.clone().layer(axum::Extension(ClientAddr(peer)));
        let service = hyper_util::service::TowerToHyperService::new(with_peer);
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let mut stop = stop_rx.clone();
        let grace = limits.request_timeout;
        let gate = gate.clone();
        tasks.spawn(async move {
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = &mut evicted => {
                    tracing::debug!(%peer, "admin API: closed the oldest connection (from {peer}) to make room");
                    Ok(())
                }
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    tokio::time::timeout(grace, conn.as_mut()).await.unwrap_or(Ok(()))
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, "admin API connection from {peer} ended: {e}");
            }
            let mut state = gate.lock();
            state.0.leave(id);
            state.1.remove(&id);
        });
    }
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    Ok(())
}
