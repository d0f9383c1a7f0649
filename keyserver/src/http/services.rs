//! The admin API of service groups (seed 002):
//! `POST/GET /v1/networks/{net}/services`,
//! `GET/PATCH/DELETE /v1/networks/{net}/services/{name}`,
//! `PUT/DELETE /v1/networks/{net}/services/{name}/instances/{member}`,
//! and the seed-shaped aliases `/services[/{name}[/instances/{member}]]`
//! whose network is `?network=`; without it, the network the token sees
//! that has the group named (400 when several do), or the only network it
//! sees (400 when it sees several); `GET /services` lists the groups of
//! every network the token sees.
//!
//! A request that breaks a rule answers 400 with
//! `{"error": "...", "rule": "<id>", "port": <n>}` (`port` when the rule is
//! about one): `soft_limit > hard_limit` is `soft-above-hard`, a handler
//! rule is e.g. `port-443-requires-tls`.

use std::time::SystemTime;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use meshlib::ids::NetworkId;
use meshlib::netmap::MemberState;
use meshlib::services::{GroupPatch, GroupSpec, PublishedPort, ServiceError, WakeHook};
use rand_core::RngCore as _;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::access::{AliasNetwork, AuditNote};
use super::body::JsonBody;
use super::{Api, ApiError};
use crate::auth::Principal;
use crate::registry::{AdminError, Change, Registry, ServiceRecord, StoreOp};
use crate::server::OpError;

/// An error of a service route: a broken rule (400 naming port and rule) or
/// any other API error.
#[derive(Debug)]
pub(super) enum ServiceApiError {
    /// A seed-002 rule.
    Rule(ServiceError),
    /// Anything else.
    Api(ApiError),
}

impl IntoResponse for ServiceApiError {
    fn into_response(self) -> Response {
        match self {
            Self::Rule(e) => {
                let mut body = json!({ "error": e.to_string(), "rule": e.rule() });
                if let Some(port) = e.port() {
                    body["port"] = json!(port);
                }
                (StatusCode::BAD_REQUEST, Json(body)).into_response()
            }
            Self::Api(e) => e.into_response(),
        }
    }
}

impl From<AdminError> for ServiceApiError {
    fn from(e: AdminError) -> Self {
        match e {
            AdminError::Service(e) => Self::Rule(e),
            other => Self::Api(other.into()),
        }
    }
}

impl From<OpError<AdminError>> for ServiceApiError {
    fn from(e: OpError<AdminError>) -> Self {
        match e {
            OpError::Refused(e) => e.into(),
            other => Self::Api(other.into()),
        }
    }
}

impl From<ApiError> for ServiceApiError {
    fn from(e: ApiError) -> Self {
        Self::Api(e)
    }
}

type Answer<T> = Result<T, ServiceApiError>;

/// One attached instance as the API shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct AttachedView {
    /// Instance name.
    pub instance: String,
    /// `online` or `offline` (offline instances get no connections).
    pub state: MemberState,
}

/// One gateway's load of a service group, as it last reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayLoadView {
    /// The gateway's instance name.
    pub instance: String,
    /// Connections it holds open to the group's instances.
    pub open: u32,
    /// Connections waiting at it for an instance.
    pub queued: u32,
    /// When its report arrived (Unix seconds).
    pub reported: u64,
}

/// A service group as the API shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct ServiceView {
    /// Its network.
    pub network: NetworkId,
    /// Name, unique in the network.
    pub name: String,
    /// External FQDN.
    pub fqdn: String,
    /// Names it answers to beside the FQDN (its own domains), sorted.
    #[serde(default)]
    pub names: Vec<String>,
    /// Published ports.
    pub ports: Vec<PublishedPort>,
    /// Per-instance soft limit (new connections queue from here).
    pub soft_limit: u16,
    /// Per-instance hard limit (new connections are rejected from here).
    pub hard_limit: u16,
    /// True when made through the API or CLI (survives its instances);
    /// false when owned by an instance (made by its `--publish`).
    pub persistent: bool,
    /// The owning instance, for a non-persistent group.
    pub owner: Option<String>,
    /// Attached instances with their states.
    pub instances: Vec<AttachedView>,
    /// Wake hook.
    pub wake: Option<WakeHook>,
    /// Seconds a connection waits for a woken instance.
    pub wake_timeout_secs: u32,
    /// Creation time (Unix seconds).
    pub created: u64,
    /// Live connections: the open connections the online gateways last
    /// reported for this group, summed (0 when none reported).
    #[serde(default)]
    pub live_connections: u64,
    /// Connections waiting at the online gateways, summed.
    #[serde(default)]
    pub queued_connections: u64,
    /// Each online gateway's last report for this group, by instance name.
    #[serde(default)]
    pub gateways: Vec<GatewayLoadView>,
}

fn view(api: &Api, rec: ServiceRecord) -> ServiceView {
    let members = api.shared.read(|r| r.members(rec.network));
    let states: std::collections::HashMap<_, _> = members
        .iter()
        .map(|m| (m.member.instance.clone(), m.member.state))
        .collect();
    let online: std::collections::HashMap<_, _> = members
        .iter()
        .filter(|m| m.member.state == MemberState::Online)
        .map(|m| (m.member.public_key, m.member.instance.to_string()))
        .collect();
    let loads = api
        .shared
        .traffic_book()
        .group_loads(rec.network)
        .remove(rec.group.name.as_str())
        .unwrap_or_default();
    let mut gateways: Vec<GatewayLoadView> = loads
        .into_iter()
        .filter_map(|(key, load, at)| {
            Some(GatewayLoadView {
                instance: online.get(&key)?.clone(),
                open: load.open,
                queued: load.queued,
                reported: at,
            })
        })
        .collect();
    gateways.sort_by(|a, b| a.instance.cmp(&b.instance));
    let g = rec.group;
    ServiceView {
        names: rec.names,
        live_connections: gateways.iter().map(|l| u64::from(l.open)).sum(),
        queued_connections: gateways.iter().map(|l| u64::from(l.queued)).sum(),
        gateways,
        network: rec.network,
        persistent: g.persistent(),
        name: g.name.to_string(),
        fqdn: g.fqdn,
        ports: g.ports,
        soft_limit: g.limits.soft_limit,
        hard_limit: g.limits.hard_limit,
        owner: g.owner.map(|o| o.to_string()),
        instances: g
            .instances
            .iter()
            .map(|i| AttachedView {
                instance: i.to_string(),
                state: states.get(i).copied().unwrap_or(MemberState::Offline),
            })
            .collect(),
        wake: g.wake,
        wake_timeout_secs: g.wake_timeout_secs,
        created: rec.created,
    }
}

/// Applies one registry mutation off the async runtime (the store fsyncs):
/// `f` returns its result, the store operations and the changes to push (it
/// may run more than once when a replica's store refuses a stale write).
async fn mutate<T, F>(api: &Api, f: F) -> Answer<T>
where
    T: Send + 'static,
    F: FnMut(&mut Registry) -> Result<(T, Vec<StoreOp>, Vec<Change>), AdminError> + Send + 'static,
{
    let shared = api.shared.clone();
    let run = move || -> Answer<T> { Ok(shared.mutate(f, |_, _, _| ())?.0) };
    tokio::task::spawn_blocking(run).await.map_err(|e| {
        ServiceApiError::Api(ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
    })?
}

fn resolve(api: &Api, net: &str) -> Answer<NetworkId> {
    Ok(api.shared.read(|r| r.resolve(net))?)
}

/// Eight random lowercase letters for a default FQDN.
fn random_letters() -> String {
    let mut bytes = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut bytes);
    bytes[..meshlib::services::FQDN_RANDOM_LEN]
        .iter()
        .map(|b| char::from(b'a' + b % 26))
        .collect()
}

pub(super) async fn list(
    State(api): State<Api>,
    Path(net): Path<String>,
) -> Answer<Json<Vec<ServiceView>>> {
    let id = resolve(&api, &net)?;
    let recs = api.shared.read(|r| r.services(id));
    Ok(Json(recs.into_iter().map(|r| view(&api, r)).collect()))
}

pub(super) async fn get(
    State(api): State<Api>,
    Path((net, name)): Path<(String, String)>,
) -> Answer<Json<ServiceView>> {
    let id = resolve(&api, &net)?;
    let rec = api.shared.read(|r| r.service(id, &name))?;
    Ok(Json(view(&api, rec)))
}

pub(super) async fn create(
    State(api): State<Api>,
    Path(net): Path<String>,
    JsonBody(spec): JsonBody<GroupSpec>,
) -> Answer<Response> {
    let id = resolve(&api, &net)?;
    let random = random_letters();
    let rec = mutate(&api, move |reg| {
        let (rec, ops, change) = reg.create_service(id, &spec, &random, SystemTime::now())?;
        tracing::info!(network = %id, service = %rec.group.name, fqdn = %rec.group.fqdn, "service group created");
        Ok((rec, ops, vec![change]))
    })
    .await?;
    let note = AuditNote {
        network: Some(id),
        target: Some(rec.group.name.to_string()),
    };
    Ok((StatusCode::CREATED, Extension(note), Json(view(&api, rec))).into_response())
}

pub(super) async fn update(
    State(api): State<Api>,
    Path((net, name)): Path<(String, String)>,
    JsonBody(patch): JsonBody<GroupPatch>,
) -> Answer<Json<ServiceView>> {
    let id = resolve(&api, &net)?;
    let rec = mutate(&api, move |reg| {
        let (rec, ops, change) = reg.update_service(id, &name, &patch)?;
        Ok((rec, ops, change.into_iter().collect()))
    })
    .await?;
    Ok(Json(view(&api, rec)))
}

pub(super) async fn delete(
    State(api): State<Api>,
    Path((net, name)): Path<(String, String)>,
) -> Answer<StatusCode> {
    let id = resolve(&api, &net)?;
    mutate(&api, move |reg| {
        let (ops, change) = reg.delete_service(id, &name)?;
        tracing::info!(network = %id, service = %name, "service group deleted");
        Ok(((), ops, vec![change]))
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Attach (`true`) or detach an instance.
async fn membership(
    api: Api,
    net: String,
    name: String,
    member: String,
    attach: bool,
) -> Answer<Json<ServiceView>> {
    let id = resolve(&api, &net)?;
    let rec = mutate(&api, move |reg| {
        let (rec, ops, change) = if attach {
            reg.attach_instance(id, &name, &member)?
        } else {
            reg.detach_instance(id, &name, &member)?
        };
        Ok((rec, ops, change.into_iter().collect()))
    })
    .await?;
    Ok(Json(view(&api, rec)))
}

pub(super) async fn attach(
    State(api): State<Api>,
    Path((net, name, member)): Path<(String, String, String)>,
) -> Answer<Json<ServiceView>> {
    membership(api, net, name, member, true).await
}

pub(super) async fn detach(
    State(api): State<Api>,
    Path((net, name, member)): Path<(String, String, String)>,
) -> Answer<Json<ServiceView>> {
    membership(api, net, name, member, false).await
}

/// `?network=` of the seed-shaped `/services` aliases.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NetworkQuery {
    /// Network id or name; default: see [`super::access`] (the network the
    /// token sees that has the group named, or its only network; for a
    /// listing, every network it sees). Read by the guard, which puts the
    /// network found into [`AliasNetwork`].
    #[serde(default)]
    #[allow(dead_code)]
    network: Option<String>,
}

/// The network of an alias request, as the guard found it.
fn alias_network(net: AliasNetwork) -> Answer<String> {
    net.0.map(|id| id.to_string()).ok_or_else(|| {
        ServiceApiError::Api(ApiError(
            StatusCode::BAD_REQUEST,
            "say which network with ?network=<id or name>".into(),
        ))
    })
}

/// `GET /services`: the groups of `?network=`, or of every network the
/// token sees.
pub(super) async fn alias_list(
    State(api): State<Api>,
    Extension(p): Extension<Principal>,
    Extension(net): Extension<AliasNetwork>,
    Query(_): Query<NetworkQuery>,
) -> Answer<Json<Vec<ServiceView>>> {
    if let Some(id) = net.0 {
        return list(State(api), Path(id.to_string())).await;
    }
    let recs: Vec<ServiceRecord> = api.shared.read(|r| {
        r.networks()
            .into_iter()
            .filter(|n| p.can_read(n))
            .flat_map(|n| r.services(n.id))
            .collect()
    });
    Ok(Json(recs.into_iter().map(|r| view(&api, r)).collect()))
}

pub(super) async fn alias_create(
    State(api): State<Api>,
    Extension(net): Extension<AliasNetwork>,
    Query(_): Query<NetworkQuery>,
    body: JsonBody<GroupSpec>,
) -> Answer<Response> {
    let net = alias_network(net)?;
    create(State(api), Path(net), body).await
}

pub(super) async fn alias_get(
    State(api): State<Api>,
    Path(name): Path<String>,
    Extension(net): Extension<AliasNetwork>,
    Query(_): Query<NetworkQuery>,
) -> Answer<Json<ServiceView>> {
    let net = alias_network(net)?;
    get(State(api), Path((net, name))).await
}

pub(super) async fn alias_update(
    State(api): State<Api>,
    Path(name): Path<String>,
    Extension(net): Extension<AliasNetwork>,
    Query(_): Query<NetworkQuery>,
    body: JsonBody<GroupPatch>,
) -> Answer<Json<ServiceView>> {
    let net = alias_network(net)?;
    update(State(api), Path((net, name)), body).await
}

pub(super) async fn alias_delete(
    State(api): State<Api>,
    Path(name): Path<String>,
    Extension(net): Extension<AliasNetwork>,
    Query(_): Query<NetworkQuery>,
) -> Answer<StatusCode> {
    let net = alias_network(net)?;
    delete(State(api), Path((net, name))).await
}

pub(super) async fn alias_attach(
    State(api): State<Api>,
    Path((name, member)): Path<(String, String)>,
    Extension(net): Extension<AliasNetwork>,
    Query(_): Query<NetworkQuery>,
) -> Answer<Json<ServiceView>> {
    let net = alias_network(net)?;
    membership(api, net, name, member, true).await
}

pub(super) async fn alias_detach(
    State(api): State<Api>,
    Path((name, member)): Path<(String, String)>,
    Extension(net): Extension<AliasNetwork>,
    Query(_): Query<NetworkQuery>,
) -> Answer<Json<ServiceView>> {
    let net = alias_network(net)?;
    membership(api, net, name, member, false).await
}
