//! Scope checks and the audit trail of the admin API ([`crate::auth`]):
//! [`guard`] runs on every matched route after the bearer token became a
//! [`Principal`], and the routes of API tokens (`/v1/api-tokens`) and of
//! the audit trail (`/v1/audit`).
//!
//! [`guard`] decides from the route and method what a request needs
//! ([`Need`]); for a route about one network (`{net}` in the path, or
//! `?network=` of the `/services` aliases) it resolves the network and
//! answers 404 — as for an unknown name — when the token's scope does not
//! cover it, 403 when the role does not allow the change. Then, for every
//! mutation (POST, PUT, PATCH, DELETE), whatever its answer, it appends an
//! entry to the audit trail before the answer leaves — except when the
//! store itself failed the request (500, 503: nothing changed), when the
//! entry is logged instead of written to the failing store.

use std::time::{Duration, SystemTime};

use axum::extract::{MatchedPath, Path, Query, RawPathParams, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json, RequestExt as _};
use meshlib::ids::NetworkId;
use rand_core::RngCore as _;
use serde::{Deserialize, Serialize};

use super::body::JsonBody;
use super::{Api, ApiError};
use crate::auth::{ApiTokenRecord, AuditQuery, AuditRecord, Principal, Role};
use crate::registry::{AdminError, NewApiToken};

/// The client's address, put into each request by [`super::serve`].
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub std::net::SocketAddr);

/// What a handler adds to its request's audit entry (a response
/// extension): the network it created, the name of what it created.
#[derive(Debug, Clone, Default)]
pub(super) struct AuditNote {
    /// The network concerned.
    pub network: Option<NetworkId>,
    /// What inside it.
    pub target: Option<String>,
}

/// The network a `/services` alias request is about, found by [`guard`].
#[derive(Debug, Clone, Copy)]
pub(super) struct AliasNetwork(pub Option<NetworkId>);

/// What a route needs from the principal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    /// Any valid token (the OpenAPI document, the audit trail, listings
    /// that filter).
    Any,
    /// Read a network.
    Read,
    /// Change what is inside a network (operator).
    Write,
    /// Change or delete a network (admin).
    Manage,
    /// Create a network (admin).
    Create,
    /// API tokens (admin; the handlers filter by scope).
    Tokens,
    /// Backups (global admin).
    Backup,
}

fn need(route: &str, method: &Method) -> Need {
    let read = matches!(*method, Method::GET | Method::HEAD);
    match route {
        "/openapi.json" | "/v1/audit" => Need::Any,
        "/v1/backup" => Need::Backup,
        "/v1/networks" if read => Need::Any,
        "/v1/networks" => Need::Create,
        "/v1/networks/{net}" if !read => Need::Manage,
        r if r.starts_with("/v1/api-tokens") => Need::Tokens,
        _ if read => Need::Read,
        _ => Need::Write,
    }
}

fn forbidden(p: &Principal, what: &str) -> ApiError {
    ApiError(
        StatusCode::FORBIDDEN,
        format!(
            "token {} ({} role) may not {what}",
            p.token_id,
            p.role.as_str()
        ),
    )
}

/// The network a request is about and its tenant, as the principal may
/// see it.
#[derive(Debug, Clone, Default)]
struct Subject {
    network: Option<(NetworkId, String, Option<String>)>,
}

/// Scope checks, then the audit entry of a mutation (see the module docs).
pub(super) async fn guard(State(api): State<Api>, mut req: Request, next: Next) -> Response {
    let Some(principal) = req.extensions().get::<Principal>().cloned() else {
        return ApiError(StatusCode::UNAUTHORIZED, "missing bearer token".into()).into_response();
    };
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| req.uri().path().to_owned(), |m| m.as_str().to_owned());
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let client = req
        .extensions()
        .get::<ClientAddr>()
        .map(|c| c.0.to_string());
    let params: Vec<(String, String)> = match req.extract_parts::<RawPathParams>().await {
        Ok(p) => p
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        Err(e) => return ApiError(StatusCode::BAD_REQUEST, e.body_text()).into_response(),
    };
    let mutation = !matches!(method, Method::GET | Method::HEAD | Method::OPTIONS);
    let mut subject = Subject::default();
    let checked = check(
        &api,
        &principal,
        &route,
        &method,
        &params,
        &mut req,
        &mut subject,
    );
    let resp = match checked {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    };
    if !mutation {
        return resp;
    }
    let note = resp
        .extensions()
        .get::<AuditNote>()
        .cloned()
        .unwrap_or_default();
    if let (None, Some(id)) = (&subject.network, note.network) {
        subject.network = api.shared.read(|r| {
            r.network(id)
                .map(|n| (id, n.name.clone(), n.tenant.clone()))
        });
    }
    let target = note.target.or_else(|| {
        let rest: Vec<&str> = params
            .iter()
            .filter(|(k, _)| k != "net")
            .map(|(_, v)| v.as_str())
            .collect();
        (!rest.is_empty()).then(|| rest.join("/"))
    });
    let (network, network_name, tenant) = match subject.network {
        Some((id, name, tenant)) => (Some(id), Some(name), tenant),
        None => (None, None, principal.tenant().map(str::to_owned)),
    };
    let entry = AuditRecord {
        seq: 0,
        time_ms: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        token: principal.token_id.clone(),
        token_name: principal.name.clone(),
        role: principal.role,
        client,
        method: method.to_string(),
        route,
        path,
        network,
        network_name,
        tenant,
        target,
        status: resp.status().as_u16(),
    };
    if matches!(entry.status, 500 | 503) {
        // The store just failed this request (nothing changed): writing to
        // it again now would only fail too, or take the space or time a
        // recovery needs. The entry goes to the log instead.
        let text = serde_json::to_string(&entry).unwrap_or_default();
        tracing::warn!(entry = %text, "audit entry logged, not stored: the store failed this request");
        return resp;
    }
    record(&api, entry).await;
    resp
}

/// Commits one audit entry (logged, not answered, when the store refuses).
async fn record(api: &Api, entry: AuditRecord) {
    let shared = api.shared.clone();
    let run = move || {
        shared.mutate(
            |reg| Ok::<_, AdminError>(((), reg.record_audit(entry.clone()), vec![])),
            |_, _, _| (),
        )
    };
    match tokio::task::spawn_blocking(run).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::error!("audit trail: entry not stored: {e:?}"),
        Err(e) => tracing::error!("audit trail: entry not stored: {e}"),
    }
}

/// The checks of [`guard`]; fills `subject` with the network concerned.
fn check(
    api: &Api,
    p: &Principal,
    route: &str,
    method: &Method,
    params: &[(String, String)],
    req: &mut Request,
    subject: &mut Subject,
) -> Result<(), ApiError> {
    let need = need(route, method);
    let net_text = params
        .iter()
        .find(|(k, _)| k == "net")
        .map(|(_, v)| v.clone());
    let net_id = match net_text {
        Some(text) => Some(visible(api, p, &text)?),
        None if route.starts_with("/services") => {
            let id = alias_network(api, p, route, method, params, req)?;
            req.extensions_mut().insert(AliasNetwork(id));
            id
        }
        None => None,
    };
    if let Some(id) = net_id {
        let rec = api.shared.read(|r| r.network(id).cloned());
        let rec = rec.ok_or_else(|| ApiError::from(AdminError::UnknownNetwork(id.to_string())))?;
        subject.network = Some((id, rec.name.clone(), rec.tenant.clone()));
        match need {
            Need::Write if !p.can_write(&rec) => {
                return Err(forbidden(p, &format!("change network {:?}", rec.name)))
            }
            Need::Manage if !p.can_manage(&rec) => {
                return Err(forbidden(
                    p,
                    &format!("change or delete network {:?}", rec.name),
                ))
            }
            _ => {}
        }
    }
    match need {
        Need::Create if !p.can_create_networks() => Err(forbidden(p, "create networks")),
        Need::Tokens if p.role != Role::Admin => Err(forbidden(p, "manage API tokens")),
        Need::Backup if !p.is_admin() => Err(forbidden(
            p,
            "read backups (they hold every tenant's records)",
        )),
        _ => Ok(()),
    }
}

/// The network `text` names, if the principal sees it (else 404, as for an
/// unknown name).
fn visible(api: &Api, p: &Principal, text: &str) -> Result<NetworkId, ApiError> {
    api.shared.read(|r| {
        r.resolve(text)
            .ok()
            .filter(|id| r.network(*id).is_some_and(|n| p.can_read(n)))
            .ok_or_else(|| AdminError::UnknownNetwork(text.to_owned()).into())
    })
}

/// The network of a `/services` alias request: `?network=`; else, for a
/// route naming a group, the one network the principal sees that has a
/// group of that name; else the one network the principal sees. `None`
/// only for `GET /services` without `?network=` (every network's groups).
fn alias_network(
    api: &Api,
    p: &Principal,
    route: &str,
    method: &Method,
    params: &[(String, String)],
    req: &Request,
) -> Result<Option<NetworkId>, ApiError> {
    let query = req.uri().query().unwrap_or("");
    let network = Query::<std::collections::HashMap<String, String>>::try_from_uri(req.uri())
        .map_err(|_| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("invalid query string {query:?}"),
            )
        })?
        .0
        .get("network")
        .cloned();
    if let Some(text) = network {
        return visible(api, p, &text).map(Some);
    }
    if route == "/services" && *method == Method::GET {
        return Ok(None);
    }
    let seen: Vec<(NetworkId, String, bool)> = api.shared.read(|r| {
        let group = params.iter().find(|(k, _)| k == "name").map(|(_, v)| v);
        r.networks()
            .into_iter()
            .filter(|n| p.can_read(n))
            .map(|n| {
                let has = group.is_some_and(|g| r.service(n.id, g).is_ok());
                (n.id, n.name, has)
            })
            .collect()
    });
    if let Some((_, name)) = params.iter().find(|(k, _)| k == "name") {
        let with: Vec<_> = seen.iter().filter(|(_, _, has)| *has).collect();
        return match with.as_slice() {
            [(id, _, _)] => Ok(Some(*id)),
            [] => Err(AdminError::UnknownService(name.clone()).into()),
            several => Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!(
                    "service group {name:?} exists in {} networks ({}): say which with ?network=<id or name>",
                    several.len(),
                    several.iter().map(|(_, n, _)| n.as_str()).collect::<Vec<_>>().join(", ")
                ),
            )),
        };
    }
    match seen.as_slice() {
        [(id, _, _)] => Ok(Some(*id)),
        _ => Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "{} networks to choose from: say which with ?network=<id or name>",
                seen.len()
            ),
        )),
    }
}

/// An API token as listed (no secret, no hash).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiTokenView {
    /// Public id (`at-…`).
    pub id: String,
    /// Name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Tenant; `null`: every network.
    pub tenant: Option<String>,
    /// Creation time (Unix seconds).
    pub created: u64,
    /// Expiry (Unix seconds); `null`: until revoked.
    pub expires: Option<u64>,
    /// Id of the token that created it.
    pub created_by: String,
    /// The secret: only in the answer to its creation. For role
    /// `gateway`, the gateway credential (`istg1.`: the keyserver's
    /// address, its pinned certificate and the secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl ApiTokenView {
    fn of(t: ApiTokenRecord, token: Option<String>) -> Self {
        Self {
            id: t.id,
            name: t.name,
            role: t.role,
            tenant: t.tenant,
            created: t.created,
            expires: t.expires,
            created_by: t.created_by,
            token,
        }
    }
}

/// Body of `POST /v1/api-tokens`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreateApiToken {
    /// Who or what uses it.
    pub name: String,
    /// `viewer`, `operator` or `admin`.
    pub role: Role,
    /// Tenant; absent or `null`: every network (global admins only); a
    /// tenant admin's tokens always get its tenant.
    #[serde(default)]
    pub tenant: Option<String>,
    /// Lifetime (`30d`); absent, `null` or empty: until revoked.
    #[serde(default)]
    pub expires: Option<String>,
}

/// `GET /v1/api-tokens`: the API tokens of the principal's scope.
pub(super) async fn list_tokens(
    State(api): State<Api>,
    Extension(p): Extension<Principal>,
) -> Json<Vec<ApiTokenView>> {
    let list = api.shared.read(|r| r.api_tokens(&p.scope));
    Json(
        list.into_iter()
            .map(|t| ApiTokenView::of(t, None))
            .collect(),
    )
}

/// `POST /v1/api-tokens`: a new API token; its secret is in this answer
/// only.
pub(super) async fn create_token(
    State(api): State<Api>,
    Extension(p): Extension<Principal>,
    JsonBody(body): JsonBody<CreateApiToken>,
) -> Result<Response, ApiError> {
    let tenant = match (p.tenant(), body.tenant) {
        (None, t) => t,
        (Some(mine), None) => Some(mine.to_owned()),
        (Some(mine), Some(t)) if t == mine => Some(t),
        (Some(_), Some(_)) => return Err(forbidden(&p, "create tokens of another tenant")),
    };
    if !p.can_manage_tokens(tenant.as_deref()) {
        return Err(forbidden(&p, "create global tokens"));
    }
    let ttl = match body.expires.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(text) => Some(humantime::parse_duration(text).map_err(|e| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("invalid expires {text:?}: {e}"),
            )
        })?),
    };
    let new = NewApiToken {
        name: body.name,
        role: body.role,
        tenant,
        ttl: ttl.map(|d: Duration| d.max(Duration::ZERO)),
    };
    let mut random = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut random);
    let secret = crate::auth::new_secret(&random);
    let hash = crate::auth::secret_hash(&secret);
    // A gateway's credential carries where to find the keyserver, like a
    // join token; its secret hashes to the same record.
    let secret = match new.role {
        Role::Gateway => meshlib::proto::GatewayToken {
            addrs: api.shared.token_addrs(),
            cert_sha256: api.shared.cert_sha256,
            secret: random,
        }
        .to_string(),
        _ => secret,
    };
    let shared = api.shared.clone();
    let by = p.clone();
    let rec = super::routes::blocking(move || {
        let (rec, ()) = shared.mutate(
            |reg| {
                let (rec, ops) = reg.create_api_token(&new, hash, &by, SystemTime::now())?;
                Ok::<_, AdminError>((rec, ops, vec![]))
            },
            |_, _, _| (),
        )?;
        Ok(rec)
    })
    .await?;
    tracing::info!(id = %rec.id, role = %rec.role, tenant = ?rec.tenant, by = %p.token_id, "API token created");
    let note = AuditNote {
        network: None,
        target: Some(rec.id.clone()),
    };
    Ok((
        StatusCode::CREATED,
        Extension(note),
        Json(ApiTokenView::of(rec, Some(secret))),
    )
        .into_response())
}

/// `DELETE /v1/api-tokens/{id}`: revokes a token of the principal's scope
/// (404 for any other).
pub(super) async fn revoke_token(
    State(api): State<Api>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let shared = api.shared.clone();
    let scope = p.scope.clone();
    super::routes::blocking(move || {
        shared.mutate(
            |reg| {
                let (_, ops) = reg.delete_api_token(&id, &scope)?;
                Ok::<_, AdminError>(((), ops, vec![]))
            },
            |_, _, _| (),
        )?;
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Query of `GET /v1/audit`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AuditParams {
    /// Network id or name (as it was named then).
    network: Option<String>,
    /// From this time: Unix seconds or RFC 3339.
    since: Option<String>,
    /// Before this time: Unix seconds or RFC 3339.
    until: Option<String>,
    /// At most this many (the latest); default 100.
    limit: Option<usize>,
}

/// Default number of audit entries answered.
const AUDIT_PAGE: usize = 100;

/// A time parameter: Unix seconds, or an RFC 3339 date (`2025-01-31T12:00:00Z`).
fn time_param(name: &str, text: &str) -> Result<u64, ApiError> {
    if let Ok(secs) = text.trim().parse::<u64>() {
        return Ok(secs);
    }
    humantime::parse_rfc3339_weak(text.trim())
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .ok_or_else(|| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("invalid {name} {text:?}: Unix seconds or an RFC 3339 time"),
            )
        })
}

/// `GET /v1/audit?network=&since=&until=&limit=`: the latest entries of the
/// principal's scope, oldest first.
pub(super) async fn audit(
    State(api): State<Api>,
    Extension(p): Extension<Principal>,
    Query(q): Query<AuditParams>,
) -> Result<Json<Vec<AuditRecord>>, ApiError> {
    let query = AuditQuery {
        network: q.network.filter(|n| !n.is_empty()),
        since: q
            .since
            .as_deref()
            .map(|t| time_param("since", t))
            .transpose()?,
        until: q
            .until
            .as_deref()
            .map(|t| time_param("until", t))
            .transpose()?,
        limit: q.limit.unwrap_or(AUDIT_PAGE).max(1),
    };
    // A name a network has now also finds its entries under its id.
    let query = match &query.network {
        Some(n) => match visible(&api, &p, n) {
            Ok(id) => AuditQuery {
                network: Some(id.to_string()),
                ..query
            },
            Err(_) => query,
        },
        None => query,
    };
    Ok(Json(api.shared.read(|r| r.audit(&query, &p.scope))))
}
