//! The admin API: JSON over HTTP, a bearer token on every route (compared in
//! constant time), clear 4xx errors, and `GET /openapi.json`.
//!
//! Routes (`{net}` is a network id or name; `{member}` a public key or an
//! instance name):
//! - `GET /v1/networks`, `POST /v1/networks` `{name, range?}`
//! - `GET /v1/networks/{net}`
//! - `GET /v1/networks/{net}/members`, `DELETE /v1/networks/{net}/members/{member}`
//! - `GET /v1/networks/{net}/tokens`, `POST /v1/networks/{net}/tokens`
//!   `{uses?, expires?, service?, process_type?}`, `DELETE /v1/networks/{net}/tokens/{id}`

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use ipnet::Ipv4Net;
use meshlib::ids::{NetworkId, ProcessType};
use meshlib::proto::JoinToken;
use rand_core::RngCore as _;
use serde::{Deserialize, Serialize};
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::registry::{AdminError, MemberInfo, NetworkRecord, TokenRecord};
use crate::server::{OpError, Shared};

/// State of the admin routes.
#[derive(Clone)]
struct Api {
    shared: Arc<Shared>,
    token: Arc<str>,
}

/// The admin router; every route requires `Authorization: Bearer <token>`.
pub fn router(shared: Arc<Shared>, token: String) -> Router {
    let api = Api {
        shared,
        token: token.into(),
    };
    Router::new()
        .route("/openapi.json", get(openapi))
        .route("/v1/networks", get(list_networks).post(create_network))
        .route("/v1/networks/{net}", get(get_network))
        .route("/v1/networks/{net}/members", get(list_members))
        .route("/v1/networks/{net}/members/{member}", delete(remove_member))
        .route(
            "/v1/networks/{net}/tokens",
            get(list_tokens).post(create_token),
        )
        .route("/v1/networks/{net}/tokens/{id}", delete(delete_token))
        .layer(axum::middleware::from_fn_with_state(api.clone(), auth))
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
            OpError::Store(e) => Self(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }
}

async fn auth(State(api): State<Api>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let ok: bool = given.as_bytes().ct_eq(api.token.as_bytes()).into();
    if !ok {
        return ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token".into(),
        )
        .into_response();
    }
    next.run(req).await
}

/// Runs a blocking mutation (the store fsyncs).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

/// A network as the API shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct NetworkView {
    /// The record.
    #[serde(flatten)]
    pub network: NetworkRecord,
    /// Member count.
    pub members: usize,
}

async fn list_networks(State(api): State<Api>) -> Json<Vec<NetworkView>> {
    Json(api.shared.read(|r| {
        r.networks()
            .into_iter()
            .map(|n| NetworkView {
                members: r.member_count(n.id),
                network: n,
            })
            .collect()
    }))
}

/// Body of `POST /v1/networks`.
#[derive(Debug, Deserialize, Serialize)]
pub struct CreateNetwork {
    /// Human name.
    pub name: String,
    /// Range; default `10.240.0.0/22`.
    pub range: Option<Ipv4Net>,
}

async fn create_network(
    State(api): State<Api>,
    Json(body): Json<CreateNetwork>,
) -> Result<(StatusCode, Json<NetworkRecord>), ApiError> {
    let range = body.range.unwrap_or(meshlib::ipam::DEFAULT_RANGE);
    let rec = blocking(move || {
        let (rec, ()) = api.shared.mutate(
            |reg| {
                reg.create_network(&body.name, range, SystemTime::now())
                    .map(|(r, ops)| (r, ops, vec![]))
            },
            |_, _, _| (),
        )?;
        Ok(rec)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(rec)))
}

fn resolve(api: &Api, net: &str) -> Result<NetworkId, ApiError> {
    Ok(api.shared.read(|r| r.resolve(net))?)
}

async fn get_network(
    State(api): State<Api>,
    Path(net): Path<String>,
) -> Result<Json<NetworkView>, ApiError> {
    let id = resolve(&api, &net)?;
    let view = api.shared.read(|r| {
        r.network(id).map(|n| NetworkView {
            network: n.clone(),
            members: r.member_count(id),
        })
    });
    view.map(Json)
        .ok_or_else(|| AdminError::UnknownNetwork(net).into())
}

async fn list_members(
    State(api): State<Api>,
    Path(net): Path<String>,
) -> Result<Json<Vec<MemberInfo>>, ApiError> {
    let id = resolve(&api, &net)?;
    Ok(Json(api.shared.members(id)))
}

async fn remove_member(
    State(api): State<Api>,
    Path((net, member)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id = resolve(&api, &net)?;
    let gen = blocking(move || {
        let (gen, ()) = api.shared.mutate(
            |reg| {
                let (change, ops) = reg.remove_member(id, &member, SystemTime::now())?;
                tracing::info!(network = %id, %member, generation = change.delta.to, "member removed");
                Ok((change.delta.to, ops, vec![change]))
            },
            |_, _, _| (),
        )?;
        Ok(gen)
    })
    .await?;
    Ok(Json(json!({ "removed": true, "generation": gen })))
}

/// A token as listed (no secret, no hash).
#[derive(Debug, Serialize, Deserialize)]
pub struct TokenView {
    /// Public id.
    pub id: String,
    /// Network.
    pub network: NetworkId,
    /// Joins left.
    pub uses_left: u32,
    /// Expiry, Unix seconds.
    pub expires: u64,
    /// Service binding.
    pub service: Option<String>,
    /// Process-type binding.
    pub process_type: Option<ProcessType>,
    /// The token text: present only in the answer to its creation.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub token: Option<String>,
}

impl TokenView {
    fn of(t: TokenRecord, token: Option<String>) -> Self {
        Self {
            id: t.id,
            network: t.network,
            uses_left: t.uses_left,
            expires: t.expires,
            service: t.service,
            process_type: t.process_type,
            token,
        }
    }
}

async fn list_tokens(
    State(api): State<Api>,
    Path(net): Path<String>,
) -> Result<Json<Vec<TokenView>>, ApiError> {
    let id = resolve(&api, &net)?;
    let list = api.shared.read(|r| r.tokens(id));
    Ok(Json(
        list.into_iter().map(|t| TokenView::of(t, None)).collect(),
    ))
}

/// Body of `POST /v1/networks/{net}/tokens`.
#[derive(Debug, Default, Deserialize, Serialize)]
pub struct CreateToken {
    /// Number of joins; default 1.
    pub uses: Option<u32>,
    /// Lifetime (`30m`, `1h`, `7d`); default `1h`.
    pub expires: Option<String>,
    /// Only members of this service may join.
    pub service: Option<String>,
    /// Only members of this process type may join.
    pub process_type: Option<ProcessType>,
}

async fn create_token(
    State(api): State<Api>,
    Path(net): Path<String>,
    Json(body): Json<CreateToken>,
) -> Result<(StatusCode, Json<TokenView>), ApiError> {
    let id = resolve(&api, &net)?;
    let ttl = match &body.expires {
        None => Duration::from_secs(3600),
        Some(text) => humantime::parse_duration(text)
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("expires {text:?}: {e}")))?,
    };
    let mut secret = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut secret);
    let addrs = api.shared.advertise.get().cloned().unwrap_or_default();
    let token = JoinToken {
        addrs,
        cert_sha256: api.shared.cert_sha256,
        network: id,
        secret,
        service: body.service.clone(),
        process_type: body.process_type.clone(),
    };
    let rec = blocking(move || {
        let (rec, ()) = api.shared.mutate(
            |reg| {
                reg.create_token(
                    id,
                    &secret,
                    body.uses.unwrap_or(1),
                    ttl,
                    body.service,
                    body.process_type,
                    SystemTime::now(),
                )
                .map(|(r, ops)| (r, ops, vec![]))
            },
            |_, _, _| (),
        )?;
        Ok(rec)
    })
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(TokenView::of(rec, Some(token.to_string()))),
    ))
}

async fn delete_token(
    State(api): State<Api>,
    Path((net, tid)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let id = resolve(&api, &net)?;
    blocking(move || {
        api.shared.mutate(
            |reg| reg.delete_token(id, &tid).map(|ops| ((), ops, vec![])),
            |_, _, _| (),
        )?;
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The OpenAPI 3.1 description of this API.
async fn openapi() -> Json<serde_json::Value> {
    Json(openapi_doc())
}

/// The OpenAPI document (hand-written; kept next to the routes it describes).
pub fn openapi_doc() -> serde_json::Value {
    let err = json!({"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
    let net_param = json!({"name": "net", "in": "path", "required": true, "description": "network id (pn-<uuid>) or name", "schema": {"type": "string"}});
    let ok = |schema: serde_json::Value| json!({"description": "ok", "content": {"application/json": {"schema": schema}}});
    json!({
        "openapi": "3.1.0",
        "info": {"title": "IST Mesh keyserver admin API", "version": "1"},
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]},
                "Network": {"type": "object", "properties": {
                    "id": {"type": "string"}, "name": {"type": "string"}, "range": {"type": "string"},
                    "generation": {"type": "integer"}, "created": {"type": "integer"}, "members": {"type": "integer"}}},
                "Member": {"type": "object", "properties": {
                    "public_key": {"type": "string"}, "ip": {"type": "string"}, "endpoints": {"type": "array", "items": {"type": "string"}},
                    "service": {"type": "string"}, "app_id": {"type": "string"}, "process_type": {"type": "string"},
                    "index": {"type": "integer"}, "instance": {"type": "string"}, "runner": {"type": "string"},
                    "joined": {"type": "integer"}, "last_seen": {"type": "integer"}}},
                "Token": {"type": "object", "properties": {
                    "id": {"type": "string"}, "network": {"type": "string"}, "uses_left": {"type": "integer"},
                    "expires": {"type": "integer"}, "service": {"type": ["string", "null"]},
                    "process_type": {"type": ["string", "null"]},
                    "token": {"type": "string", "description": "the join token, only in the creation answer"}}}
            }
        },
        "paths": {
            "/v1/networks": {
                "get": {"summary": "list networks", "responses": {"200": ok(json!({"type": "array", "items": {"$ref": "#/components/schemas/Network"}})), "401": err}},
                "post": {"summary": "create a network",
                    "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object",
                        "properties": {"name": {"type": "string"}, "range": {"type": "string", "default": "10.240.0.0/22"}}, "required": ["name"]}}}},
                    "responses": {"201": ok(json!({"$ref": "#/components/schemas/Network"})), "400": err, "401": err, "409": err}}
            },
            "/v1/networks/{net}": {"get": {"summary": "one network", "parameters": [net_param],
                "responses": {"200": ok(json!({"$ref": "#/components/schemas/Network"})), "401": err, "404": err}}},
            "/v1/networks/{net}/members": {"get": {"summary": "members with IP, key, app, type, index, instance, endpoints, last seen",
                "parameters": [net_param], "responses": {"200": ok(json!({"type": "array", "items": {"$ref": "#/components/schemas/Member"}})), "401": err, "404": err}}},
            "/v1/networks/{net}/members/{member}": {"delete": {"summary": "remove (revoke) a member; pushed to every other member",
                "parameters": [net_param, {"name": "member", "in": "path", "required": true, "description": "public key or instance name", "schema": {"type": "string"}}],
                "responses": {"200": ok(json!({"type": "object"})), "401": err, "404": err}}},
            "/v1/networks/{net}/tokens": {
                "get": {"summary": "list tokens (never their secrets)", "parameters": [net_param],
                    "responses": {"200": ok(json!({"type": "array", "items": {"$ref": "#/components/schemas/Token"}})), "401": err, "404": err}},
                "post": {"summary": "create a join token (shown once)", "parameters": [net_param],
                    "requestBody": {"content": {"application/json": {"schema": {"type": "object", "properties": {
                        "uses": {"type": "integer", "default": 1}, "expires": {"type": "string", "default": "1h"},
                        "service": {"type": "string"}, "process_type": {"type": "string"}}}}}},
                    "responses": {"201": ok(json!({"$ref": "#/components/schemas/Token"})), "400": err, "401": err, "404": err}}
            },
            "/v1/networks/{net}/tokens/{id}": {"delete": {"summary": "delete a token", "parameters": [net_param,
                {"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}],
                "responses": {"204": {"description": "deleted"}, "401": err, "404": err}}},
            "/openapi.json": {"get": {"summary": "this document", "responses": {"200": {"description": "OpenAPI document"}}}}
        }
    })
}
