//! The admin API's handlers and the JSON shapes they take and give.

use std::time::{Duration, SystemTime};

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use ipnet::Ipv4Net;
use meshlib::ids::{NetworkId, ProcessType};
use meshlib::proto::JoinToken;
use rand_core::RngCore as _;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::access::AuditNote;
use super::body::JsonBody;
use super::{Api, ApiError};
use crate::auth::Principal;
use crate::listing::{find_member, MemberRow, MemberView, NameListing};
use crate::registry::{AdminError, NetworkRecord, TokenRecord};

/// Runs a blocking mutation (the store fsyncs).
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

fn bad_request(message: String) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, message)
}

/// `GET /healthz`: the process answers.
pub(super) async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// `GET /readyz`: the store takes writes (503 with the reason when not).
pub(super) async fn readyz(State(api): State<Api>) -> Response {
    let shared = api.shared.clone();
    match tokio::task::spawn_blocking(move || shared.readiness()).await {
        Ok(Ok(())) => Json(json!({ "status": "ready" })).into_response(),
        Ok(Err(why)) => ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: the store does not take writes: {why}"),
        )
        .into_response(),
        Err(e) => ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

/// `GET /metrics`: Prometheus text exposition, no token (see
/// [`crate::metrics`]).
pub(super) async fn metrics(State(api): State<Api>) -> Response {
    let shared = api.shared.clone();
    let rendered = tokio::task::spawn_blocking(move || {
        // The embedded relay's counters follow the keyserver's own, then
        // the process's.
        let relay = shared.relay_metrics.get().map(|m| m.render());
        shared.render_metrics() + relay.as_deref().unwrap_or("") + &meshlib::metrics::process_text()
    });
    match rendered.await {
        Ok(text) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// `GET /v1/backup`: every record, one consistent snapshot.
pub(super) async fn backup(
    State(api): State<Api>,
) -> Result<Json<crate::backup::Backup>, ApiError> {
    let shared = api.shared.clone();
    let b = blocking(move || {
        shared
            .backup()
            .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))
    })
    .await?;
    Ok(Json(b))
}

/// `GET /openapi.json`.
pub(super) async fn openapi() -> Json<serde_json::Value> {
    Json(super::openapi_doc())
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

/// `GET /v1/networks`: the networks the token sees.
pub(super) async fn list_networks(
    State(api): State<Api>,
    Extension(p): Extension<Principal>,
) -> Json<Vec<NetworkView>> {
    Json(api.shared.read(|r| {
        r.networks()
            .into_iter()
            .filter(|n| p.can_read(n))
            .map(|n| NetworkView {
                members: r.member_count(n.id),
                network: n,
            })
            .collect()
    }))
}

/// Body of `POST /v1/networks`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreateNetwork {
    /// Human name.
    pub name: String,
    /// Range (`10.240.0.0/22` form); default `10.240.0.0/22`.
    pub range: Option<String>,
    /// How long an offline member is kept (`24h`); absent, `null` or
    /// empty: the keyserver's `expire-after-secs`.
    #[serde(default)]
    pub expire_after: Option<String>,
    /// The tenant the network belongs to ([`crate::auth`]); a tenant
    /// admin's networks always get its tenant.
    #[serde(default)]
    pub tenant: Option<String>,
}

/// Body of `PATCH /v1/networks/{net}`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateNetwork {
    /// `"1h"` sets the network's expire-after; `null` or `""` goes back to
    /// the keyserver's default; absent leaves it.
    #[serde(default, deserialize_with = "present")]
    pub expire_after: Option<Option<String>>,
    /// A tenant moves the network to it, `null` makes it tenantless
    /// (global admins only); absent leaves it.
    #[serde(default, deserialize_with = "present")]
    pub tenant: Option<Option<String>>,
}

/// A field that is present (even `null`) becomes `Some`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

/// Longest `expire-after`: ten years.
const MAX_EXPIRE_AFTER: std::time::Duration = std::time::Duration::from_secs(3650 * 86400);

/// Parses an `expire_after` text: 1 s to ten years.
fn expire_after(text: &str) -> Result<std::time::Duration, ApiError> {
    let d = humantime::parse_duration(text)
        .map_err(|e| bad_request(format!("invalid expire_after {text:?}: {e}")))?;
    if d < std::time::Duration::from_secs(1) || d > MAX_EXPIRE_AFTER {
        return Err(bad_request(format!(
            "expire_after {text:?} out of range: 1s to 3650d"
        )));
    }
    Ok(d)
}

pub(super) async fn update_network(
    State(api): State<Api>,
    Extension(p): Extension<Principal>,
    Path(net): Path<String>,
    JsonBody(body): JsonBody<UpdateNetwork>,
) -> Result<Json<NetworkView>, ApiError> {
    let id = resolve(&api, &net)?;
    let expire = match body
        .expire_after
        .as_ref()
        .map(|t| t.as_deref().map(str::trim))
    {
        Some(Some(text)) if !text.is_empty() => Some(Some(expire_after(text)?)),
        Some(_) => Some(None),
        None => None,
    };
    if body.tenant.is_some() && !p.is_admin() {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            format!(
                "token {} ({} role) may not move networks between tenants: only a global admin may",
                p.token_id, p.role
            ),
        ));
    }
    let tenant = match body.tenant.clone() {
        Some(Some(t)) => Some(Some(
            crate::auth::tenant(&t).map_err(|e| bad_request(e.to_string()))?,
        )),
        other => other,
    };
    let shared = api.shared.clone();
    blocking(move || {
        shared.mutate(
            |reg| {
                let mut ops = match expire {
                    Some(e) => reg.set_expire_after(id, e)?,
                    None => vec![],
                };
                if let Some(t) = &tenant {
                    ops.extend(reg.set_tenant(id, t.clone())?.1);
                }
                Ok::<_, AdminError>(((), ops, vec![]))
            },
            |_, _, _| (),
        )?;
        Ok(())
    })
    .await?;
    get_network(State(api), Path(id.to_string())).await
}

pub(super) async fn create_network(
    State(api): State<Api>,
    Extension(p): Extension<Principal>,
    JsonBody(body): JsonBody<CreateNetwork>,
) -> Result<(StatusCode, Extension<AuditNote>, Json<NetworkRecord>), ApiError> {
    let tenant = match (p.tenant(), body.tenant.clone()) {
        (None, t) => t,
        (Some(mine), Some(t)) if t != mine => {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                format!(
                    "token {} may only create networks of its tenant {mine:?}",
                    p.token_id
                ),
            ))
        }
        (Some(mine), _) => Some(mine.to_owned()),
    };
    let tenant = tenant
        .as_deref()
        .map(crate::auth::tenant)
        .transpose()
        .map_err(|e| bad_request(e.to_string()))?;
    let range = match &body.range {
        None => meshlib::ipam::DEFAULT_RANGE,
        Some(text) => text
            .parse::<Ipv4Net>()
            .map_err(|e| bad_request(format!("invalid range {text:?}: {e}")))?,
    };
    let expire = body
        .expire_after
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(expire_after)
        .transpose()?;
    let rec = blocking(move || {
        let (rec, ()) = api.shared.mutate(
            |reg| {
                let (mut rec, mut ops) =
                    reg.create_network(&body.name, range, SystemTime::now())?;
                if expire.is_some() {
                    ops = reg.set_expire_after(rec.id, expire)?;
                    rec.expire_after = expire.map(|d| d.as_secs());
                }
                if tenant.is_some() {
                    // Checked above: cannot fail.
                    let (with, more) = reg.set_tenant(rec.id, tenant.clone())?;
                    rec = with;
                    ops.extend(more);
                }
                Ok::<_, AdminError>((rec, ops, vec![]))
            },
            |_, _, _| (),
        )?;
        Ok(rec)
    })
    .await?;
    let note = AuditNote {
        network: Some(rec.id),
        target: Some(rec.name.clone()),
    };
    Ok((StatusCode::CREATED, Extension(note), Json(rec)))
}

fn resolve(api: &Api, net: &str) -> Result<NetworkId, ApiError> {
    Ok(api.shared.read(|r| r.resolve(net))?)
}

pub(super) async fn get_network(
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

/// Query of `DELETE /v1/networks/{net}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DeleteNetwork {
    /// Remove the network's members too (each is revoked).
    #[serde(default)]
    force: bool,
}

pub(super) async fn delete_network(
    State(api): State<Api>,
    Path(net): Path<String>,
    Query(query): Query<DeleteNetwork>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id = resolve(&api, &net)?;
    let removed = blocking(move || {
        let removed = api
            .shared
            .delete_network(id, query.force, SystemTime::now())?;
        tracing::info!(network = %id, members = removed, "network deleted");
        Ok(removed)
    })
    .await?;
    Ok(Json(
        json!({ "deleted": true, "network": id, "members_removed": removed }),
    ))
}

/// `GET /v1/networks/{net}/members`: every member with the names that
/// answer it and the summary of the paths it reported ([`MemberRow`]).
pub(super) async fn list_members(
    State(api): State<Api>,
    Path(net): Path<String>,
) -> Result<Json<Vec<MemberRow>>, ApiError> {
    let id = resolve(&api, &net)?;
    let (map, members) = api
        .shared
        .map_and_members(id)
        .ok_or(AdminError::UnknownNetwork(net))?;
    let paths = api.shared.traffic_book().path_summaries(id);
    Ok(Json(MemberRow::list(&map, members, paths)))
}

/// `GET /v1/networks/{net}/members/{member}`: one member (by public key or
/// instance name, only among this network's members) with the names that
/// answer it now.
pub(super) async fn get_member(
    State(api): State<Api>,
    Path((net, member)): Path<(String, String)>,
) -> Result<Json<MemberView>, ApiError> {
    let id = resolve(&api, &net)?;
    let (map, members) = api
        .shared
        .map_and_members(id)
        .ok_or(AdminError::UnknownNetwork(net))?;
    let info = find_member(members, &member).ok_or(AdminError::UnknownMember(member))?;
    let paths = api
        .shared
        .traffic_book()
        .paths_of(id, &info.member.public_key);
    Ok(Json(MemberView::of(&map, info, paths.as_ref())))
}

/// `GET /v1/networks/{net}/names`: every private name of the network with
/// its current answer (seed 003's listing).
pub(super) async fn list_names(
    State(api): State<Api>,
    Path(net): Path<String>,
) -> Result<Json<NameListing>, ApiError> {
    let id = resolve(&api, &net)?;
    let map = api
        .shared
        .read(|r| r.snapshot(id))
        .ok_or(AdminError::UnknownNetwork(net))?;
    Ok(Json(NameListing::of(&map)))
}

pub(super) async fn remove_member(
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
    /// The service group a member joining with it is attached to.
    #[serde(default)]
    pub service_group: Option<String>,
    /// Every member joining with it is ephemeral.
    #[serde(default)]
    pub ephemeral: bool,
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
            service_group: t.service_group.map(|g| g.to_string()),
            ephemeral: t.ephemeral,
        }
    }
}

pub(super) async fn list_tokens(
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
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// Number of joins; default 1.
    pub uses: Option<u32>,
    /// Lifetime (`30m`, `1h`, `7d`); default `1h`, at most a year.
    pub expires: Option<String>,
    /// Only members of this service may join.
    pub service: Option<String>,
    /// Only members of this process type may join.
    pub process_type: Option<String>,
    /// Members joining with it are attached to this (existing) service group.
    #[serde(default)]
    pub service_group: Option<String>,
    /// Every member joining with it is ephemeral (freed soon after it goes
    /// offline), whatever the join asks. Default false.
    #[serde(default)]
    pub ephemeral: bool,
}

pub(super) async fn create_token(
    State(api): State<Api>,
    Path(net): Path<String>,
    JsonBody(body): JsonBody<CreateToken>,
) -> Result<(StatusCode, Extension<AuditNote>, Json<TokenView>), ApiError> {
    let id = resolve(&api, &net)?;
    let ttl = match body.expires.as_deref().map(str::trim) {
        None | Some("") => Duration::from_secs(3600),
        Some(text) => humantime::parse_duration(text)
            .map_err(|e| bad_request(format!("expires {text:?}: {e}")))?,
    };
    let process_type = body
        .process_type
        .as_deref()
        .map(str::parse::<ProcessType>)
        .transpose()
        .map_err(|e| bad_request(format!("invalid process type binding: {e}")))?;
    let mut secret = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut secret);
    let addrs = api.shared.token_addrs();
    let token = JoinToken {
        addrs,
        cert_sha256: api.shared.cert_sha256,
        network: id,
        secret,
        service: body.service.clone(),
        process_type: process_type.clone(),
    };
    let rec = blocking(move || {
        let (rec, ()) = api.shared.mutate(
            |reg| {
                // The group must exist before anything changes.
                if let Some(group) = &body.service_group {
                    reg.service(id, group)?;
                }
                let (rec, mut ops) = reg.create_token(
                    id,
                    &secret,
                    body.uses.unwrap_or(1),
                    ttl,
                    body.service.clone(),
                    process_type.clone(),
                    SystemTime::now(),
                )?;
                let rec = match &body.service_group {
                    Some(group) => {
                        let (rec, more) = reg.set_token_service_group(id, &rec.id, group)?;
                        ops.extend(more);
                        rec
                    }
                    None => rec,
                };
                let rec = if body.ephemeral {
                    let (rec, more) = reg.set_token_ephemeral(id, &rec.id, true)?;
                    ops.extend(more);
                    rec
                } else {
                    rec
                };
                Ok::<_, AdminError>((rec, ops, vec![]))
            },
            |_, _, _| (),
        )?;
        Ok(rec)
    })
    .await?;
    let note = AuditNote {
        network: Some(id),
        target: Some(rec.id.clone()),
    };
    Ok((
        StatusCode::CREATED,
        Extension(note),
        Json(TokenView::of(rec, Some(token.to_string()))),
    ))
}

pub(super) async fn delete_token(
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
