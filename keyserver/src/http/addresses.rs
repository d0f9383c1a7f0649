//! The admin API of service addresses and traffic per service (issue 19):
//! `GET /v1/networks/{net}/addresses`,
//! `GET|PATCH /v1/networks/{net}/addresses/{service}` (scale to zero: the
//! wake hook and timeout, `idle-after` and the idle hook; the wake and
//! idle state), and `GET /v1/networks/{net}/traffic` (the service graph).

use std::time::SystemTime;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use meshlib::ids::NetworkId;

use super::{Api, ApiError};
use crate::registry::{AddressInfo, AddressPatch, AdminError};
use crate::traffic::TrafficGraph;

fn resolve(api: &Api, net: &str) -> Result<NetworkId, ApiError> {
    Ok(api.shared.read(|r| r.resolve(net))?)
}

/// `GET /v1/networks/{net}/addresses`.
pub(super) async fn list(
    State(api): State<Api>,
    Path(net): Path<String>,
) -> Result<Json<Vec<AddressInfo>>, ApiError> {
    let id = resolve(&api, &net)?;
    Ok(Json(api.shared.addresses(id, SystemTime::now())?))
}

/// `GET /v1/networks/{net}/addresses/{service}`.
pub(super) async fn get(
    State(api): State<Api>,
    Path((net, service)): Path<(String, String)>,
) -> Result<Json<AddressInfo>, ApiError> {
    let id = resolve(&api, &net)?;
    let list = api.shared.addresses(id, SystemTime::now())?;
    list.into_iter()
        .find(|a| a.record.address.service == service)
        .map(Json)
        .ok_or_else(|| AdminError::UnknownAddress(service).into())
}

/// `PATCH /v1/networks/{net}/addresses/{service}`: 400 for a value out of
/// bounds or settings that do not fit together, 404 for an unknown
/// network or service.
pub(super) async fn update(
    State(api): State<Api>,
    Path((net, service)): Path<(String, String)>,
    super::body::JsonBody(body): super::body::JsonBody<AddressPatch>,
) -> Result<Json<AddressInfo>, ApiError> {
    let id = resolve(&api, &net)?;
    let settings = body.settings()?;
    let shared = api.shared.clone();
    let name = service.clone();
    let run = move || {
        shared.mutate(
            |reg| reg.set_address(id, &name, &settings, SystemTime::now()),
            |_, _, _| (),
        )
    };
    tokio::task::spawn_blocking(run)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    tracing::info!(network = %id, service = %meshlib::render::text::escape(&service), "service address settings changed");
    get(State(api), Path((id.to_string(), service))).await
}

/// `GET /v1/networks/{net}/traffic`: the service graph.
pub(super) async fn traffic(
    State(api): State<Api>,
    Path(net): Path<String>,
) -> Result<Json<TrafficGraph>, ApiError> {
    let id = resolve(&api, &net)?;
    api.shared
        .traffic_graph(id, SystemTime::now())
        .map(Json)
        .ok_or_else(|| AdminError::UnknownNetwork(net).into())
}
