//! A gateway credential: the gateway serves every network of the
//! credential's scope that has service groups.
//!
//! Every `--networks-interval` the gateway asks the keyserver which
//! networks those are ([`meshlib::control::gateway_grant`]); for each one
//! it does not serve yet it gets a one-use join token (service `gateway`,
//! ephemeral) and joins it as a member of its own: a node per network,
//! with a userspace data plane (networks' overlay ranges overlap, so they
//! cannot share one host's routes), its own WireGuard port and key. A
//! network no longer listed (its last group deleted, moved to another
//! tenant) is left; a membership that ended (removed by an operator) is
//! joined again at the next ask. A refused credential (unknown, revoked,
//! expired) stops the gateway with the reason.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;

use meshlib::control::{ClientConfig, ControlError};
use meshlib::ids::NetworkId;
use meshlib::proto::{ErrorCode, GatewayToken, MAX_GATEWAY_JOINS};
use tokio::sync::watch;

use super::member::{MemberSettings, Membership};
use super::{serve, GatewayArgs, GatewayError, Served, Tls};

/// The memberships, by network.
type Members = BTreeMap<NetworkId, Membership>;

/// The networks being served, as `serve` follows them.
type Set = BTreeMap<NetworkId, Arc<Served>>;

/// Runs a gateway with a credential until `shutdown`, then leaves every
/// network.
pub(super) async fn run(
    args: GatewayArgs,
    credential: GatewayToken,
    tls: Option<Tls>,
    metrics_addr: Option<SocketAddr>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), GatewayError> {
    let bind: SocketAddr = match credential.addrs.first() {
        Some(a) if a.is_ipv6() => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        _ => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
    };
    let endpoint = meshlib::control::client_endpoint(bind)
        .map_err(|e| GatewayError::Config(format!("gateway credential: {e}")))?;
    // Before anything is served: a credential refused now is an error.
    let first = ask(&endpoint, &credential, vec![]).await.map_err(|e| {
        GatewayError::Config(format!(
            "the keyserver did not answer the gateway credential: {e}"
        ))
    })?;
    tracing::info!(
        networks = first.networks.len(),
        "gateway credential accepted"
    );
    let (tx, rx) = watch::channel(Set::new());
    let mut members = Members::new();
    let result = tokio::select! {
        r = serve(&args, tls, metrics_addr, rx, true, &mut shutdown) => r,
        r = manage(&args, &endpoint, &credential, first, &mut members, &tx) => r,
    };
    drop(tx);
    for (_, m) in std::mem::take(&mut members) {
        m.leave().await;
    }
    endpoint.close(0u32.into(), b"bye");
    result
}

/// One question to the keyserver.
async fn ask(
    endpoint: &quinn::Endpoint,
    credential: &GatewayToken,
    join: Vec<NetworkId>,
) -> Result<meshlib::proto::GatewayGrant, ControlError> {
    meshlib::control::gateway_grant(endpoint, credential, join, &ClientConfig::one_shot()).await
}

/// Keeps the memberships in line with the keyserver's grants; returns only
/// when the credential is refused.
async fn manage(
    args: &GatewayArgs,
    endpoint: &quinn::Endpoint,
    credential: &GatewayToken,
    mut grant: meshlib::proto::GatewayGrant,
    members: &mut Members,
    tx: &watch::Sender<Set>,
) -> Result<(), GatewayError> {
    let mut next_name = 0u32;
    loop {
        let listed: BTreeSet<NetworkId> = grant.networks.iter().map(|n| n.id).collect();
        let mut changed = false;
        // Gone from the grant, or the membership ended: leave (or forget).
        let stale: Vec<NetworkId> = members
            .iter()
            .filter(|(id, m)| !listed.contains(id) || m.map.has_changed().is_err())
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            if let Some(m) = members.remove(&id) {
                tracing::info!(network = %id, "leaving a network the gateway no longer serves");
                m.leave().await;
                changed = true;
            }
        }
        for n in &grant.networks {
            let Some(token) = n.token.clone() else {
                continue;
            };
            if members.contains_key(&n.id) {
                continue;
            }
            next_name += 1;
            let settings = MemberSettings {
                token,
                service: SERVICE.into(),
                instance: None,
                interface: interface_name(&args.interface, next_name),
                listen_port: 0,
                endpoints: vec![],
                userspace: true,
            };
            match Membership::start(settings).await {
                Ok(m) => {
                    tracing::info!(network = %n.name, ip = %m.ip, "serving a network");
                    members.insert(n.id, m);
                    changed = true;
                }
                Err(e) => {
                    tracing::warn!(network = %n.name, error = %e, "could not join a network; trying again at the next ask")
                }
            }
        }
        if changed {
            let set: Set = members
                .values()
                .map(|m| {
                    let s = Served::of(m);
                    (s.id, Arc::new(s))
                })
                .collect();
            tx.send_replace(set);
        }
        // Networks listed and not joined get tokens at the next ask: at
        // once if this grant brought none (they were new to it), else (a
        // join failed) an interval away, like every other ask.
        let want: Vec<NetworkId> = listed
            .iter()
            .filter(|id| !members.contains_key(id))
            .copied()
            .take(MAX_GATEWAY_JOINS)
            .collect();
        let tokens_came = grant.networks.iter().any(|n| n.token.is_some());
        if want.is_empty() || tokens_came {
            tokio::time::sleep(args.networks_interval).await;
        }
        grant = loop {
            match ask(endpoint, credential, want.clone()).await {
                Ok(g) => break g,
                Err(ControlError::Refused(e))
                    if matches!(e.code, ErrorCode::InvalidToken | ErrorCode::TokenExpired) =>
                {
                    return Err(GatewayError::Config(format!(
                        "the keyserver refused the gateway credential: {}",
                        e.message
                    )));
                }
                Err(e) => {
                    // The keyserver is away: the networks served stay
                    // served; ask again.
                    tracing::warn!(error = %e, "asking the keyserver which networks to serve failed; retrying");
                    tokio::time::sleep(args.networks_interval).await;
                }
            }
        };
    }
}

/// The service every gateway membership joins as.
pub const SERVICE: &str = "gateway";

/// A UAPI socket name per membership (15 bytes at most, like an interface
/// name): the `--interface` prefix and a counter.
fn interface_name(prefix: &str, n: u32) -> String {
    let suffix = format!("n{n}");
    let keep = 15usize.saturating_sub(suffix.len());
    let prefix: String = prefix.chars().take(keep).collect();
    format!("{prefix}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_fit_and_differ() {
        assert_eq!(interface_name("istmgw0", 1), "istmgw0n1");
        let long = interface_name("a-very-long-interface", 12345);
        assert!(long.len() <= 15, "{long}");
        assert!(long.ends_with("n12345"));
        assert_ne!(interface_name("g", 1), interface_name("g", 2));
    }
}
