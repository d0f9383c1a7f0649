//! Gateway credentials over the control protocol: a gateway presents its
//! credential ([`meshlib::proto::GatewayToken`], an API token of role
//! `gateway`) in a [`Request::Gateway`](meshlib::proto::Request::Gateway)
//! hello and is answered with the networks of the credential's scope that
//! have service groups, and a one-use join token for each network it asked
//! to join (bound to service `gateway`, ephemeral, valid a few minutes).
//! The gateway then joins each network as an ordinary member with that
//! token, and asks again every few seconds to pick up new networks.

use std::time::{Duration, SystemTime};

use meshlib::proto::{
    ErrorCode, GatewayGrant, GatewayNetwork, GatewayRequest, JoinToken, MAX_GATEWAY_JOINS,
};
use rand_core::RngCore as _;

use crate::auth::Role;
use crate::registry::{unix, AdminError};
use crate::server::Shared;
use crate::session::Fatal;

/// The service a gateway joins its networks as.
pub const GATEWAY_SERVICE: &str = "gateway";

/// How long a join token handed to a gateway stays valid.
pub const JOIN_TTL: Duration = Duration::from_secs(600);

/// Answers a gateway's request (blocking: it may commit join tokens).
pub fn grant(
    shared: &Shared,
    req: &GatewayRequest,
    now: SystemTime,
) -> Result<GatewayGrant, Fatal> {
    let hash = crate::auth::secret_hash(&crate::auth::new_secret(&req.secret));
    let refused = || {
        Fatal(
            ErrorCode::InvalidToken,
            "unknown or revoked gateway credential".into(),
        )
    };
    let rec = shared
        .read(|r| r.api_token(&hash).cloned())
        .ok_or_else(refused)?;
    if rec.role != Role::Gateway {
        return Err(refused());
    }
    if rec.expires.is_some_and(|e| e <= unix(now)) {
        return Err(Fatal(
            ErrorCode::TokenExpired,
            "the gateway credential has expired".into(),
        ));
    }
    if req.join.len() > MAX_GATEWAY_JOINS {
        return Err(Fatal(
            ErrorCode::Malformed,
            format!("at most {MAX_GATEWAY_JOINS} networks joined per request"),
        ));
    }
    let scope = rec.scope();
    let listed = shared.read(|r| r.gateway_networks(&scope));
    // A network not listed (another tenant's, one without groups, an
    // unknown id) gets no token, silently: the grant says what is served.
    let wanted: Vec<_> = listed
        .iter()
        .filter(|(id, _)| req.join.contains(id))
        .map(|(id, _)| {
            let mut secret = [0u8; 32];
            rand_core::OsRng.fill_bytes(&mut secret);
            (*id, secret)
        })
        .collect();
    if !wanted.is_empty() {
        shared
            .mutate(
                |reg| {
                    let mut ops = Vec::new();
                    for (id, secret) in &wanted {
                        let (tok, more) = reg.create_token(
                            *id,
                            secret,
                            1,
                            JOIN_TTL,
                            Some(GATEWAY_SERVICE.into()),
                            None,
                            now,
                        )?;
                        ops.extend(more);
                        let (_, more) = reg.set_token_ephemeral(*id, &tok.id, true)?;
                        ops.extend(more);
                    }
                    Ok::<_, AdminError>(((), ops, vec![]))
                },
                |_, _, _| (),
            )
            .map_err(|e| Fatal(ErrorCode::Busy, format!("no join tokens made: {e}; retry")))?;
        tracing::info!(credential = %rec.id, networks = wanted.len(), "join tokens handed to a gateway");
    }
    let (addrs, cert_sha256) = (shared.token_addrs(), shared.cert_sha256);
    let networks = listed
        .into_iter()
        .map(|(id, name)| GatewayNetwork {
            id,
            name,
            token: wanted
                .iter()
                .find(|(w, _)| *w == id)
                .map(|(_, secret)| JoinToken {
                    addrs: addrs.clone(),
                    cert_sha256,
                    network: id,
                    secret: *secret,
                    service: Some(GATEWAY_SERVICE.into()),
                    process_type: None,
                }),
        })
        .collect();
    Ok(GatewayGrant { networks })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use meshlib::ids::NetworkId;
    use meshlib::services::{GroupSpec, PortSpec};

    use super::*;
    use crate::auth::Principal;
    use crate::registry::NewApiToken;
    use crate::server::Limits;
    use crate::store::redb::RedbStore;

    /// A keyserver with networks `prod` (a group), `acme` (tenant acme, a
    /// group) and `empty` (no group).
    fn keyserver(dir: &std::path::Path) -> (Shared, NetworkId, NetworkId) {
        let store = RedbStore::open(&dir.join("s.redb")).unwrap();
        let now = SystemTime::now();
        let (shared, _) = Shared::new(Box::new(store), Limits::default(), [7; 32], now).unwrap();
        let ((prod, acme), ()) = shared
            .mutate(
                |r| {
                    let mut ops = Vec::new();
                    let mut ids = Vec::new();
                    for name in ["prod", "acme", "empty"] {
                        let (n, more) =
                            r.create_network(name, meshlib::ipam::DEFAULT_RANGE, now)?;
                        ops.extend(more);
                        ids.push(n.id);
                    }
                    let (_, more) = r.set_tenant(ids[1], Some("acme".into()))?;
                    ops.extend(more);
                    for (id, group) in [(ids[0], "web"), (ids[1], "shop")] {
                        let spec = GroupSpec {
                            name: group.into(),
                            ports: vec![PortSpec {
                                port: 443,
                                destination_port: Some(8080),
                                handlers: vec!["http".into(), "tls".into()],
                                ..PortSpec::default()
                            }],
                            ..GroupSpec::default()
                        };
                        let (_, more, _) = r.create_service(id, &spec, "abcdefgh", now)?;
                        ops.extend(more);
                    }
                    Ok::<_, AdminError>(((ids[0], ids[1]), ops, vec![]))
                },
                |_, _, _| (),
            )
            .unwrap();
        (shared, prod, acme)
    }

    /// An API token of `role` and `tenant`; its credential's secret.
    fn token(shared: &Shared, role: Role, tenant: Option<&str>, ttl: Option<Duration>) -> [u8; 32] {
        let random = rand_core::RngCore::next_u64(&mut rand_core::OsRng).to_le_bytes();
        let mut secret = [0u8; 32];
        secret[..8].copy_from_slice(&random);
        let hash = crate::auth::secret_hash(&crate::auth::new_secret(&secret));
        let new = NewApiToken {
            name: "edge".into(),
            role,
            tenant: tenant.map(str::to_owned),
            ttl,
        };
        shared
            .mutate(
                |r| {
                    let (_, ops) =
                        r.create_api_token(&new, hash, &Principal::root(), SystemTime::now())?;
                    Ok::<_, AdminError>(((), ops, vec![]))
                },
                |_, _, _| (),
            )
            .unwrap();
        secret
    }

    #[test]
    fn a_gateway_credential_lists_its_scope_and_gets_one_use_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let (shared, prod, acme) = keyserver(dir.path());
        let all = token(&shared, Role::Gateway, None, None);
        let now = SystemTime::now();
        let ask =
            |secret, join: Vec<NetworkId>| grant(&shared, &GatewayRequest { secret, join }, now);
        // Every network with a group, no token unless asked.
        let g = ask(all, vec![]).unwrap();
        let mut want = vec![prod, acme];
        want.sort();
        assert_eq!(g.networks.iter().map(|n| n.id).collect::<Vec<_>>(), want);
        assert!(g.networks.iter().all(|n| n.token.is_none()));
        // Asked: a one-use, ephemeral token bound to service `gateway`.
        let g = ask(all, vec![prod, NetworkId::random()]).unwrap();
        let tok = g
            .networks
            .iter()
            .find(|n| n.id == prod)
            .and_then(|n| n.token.clone())
            .expect("a token for prod");
        assert_eq!(tok.network, prod);
        assert_eq!(tok.cert_sha256, [7; 32]);
        assert_eq!(tok.service.as_deref(), Some(GATEWAY_SERVICE));
        let rec = shared
            .read(|r| r.tokens(prod))
            .into_iter()
            .find(|t| t.hash == meshlib::proto::sha256(&tok.secret))
            .expect("stored, hashed");
        assert_eq!(rec.uses_left, 1);
        assert!(rec.ephemeral);
        assert!(rec.expires <= unix(now) + JOIN_TTL.as_secs());
        assert!(g.networks.iter().filter(|n| n.token.is_some()).count() == 1);

        // A tenant's credential: its tenant's networks only, and no token
        // for another tenant's network even when asked.
        let mine = token(&shared, Role::Gateway, Some("acme"), None);
        let g = ask(mine, vec![prod, acme]).unwrap();
        assert_eq!(g.networks.len(), 1);
        assert_eq!(g.networks[0].id, acme);
        assert!(g.networks[0].token.is_some());
        assert!(shared.read(|r| r.tokens(prod)).iter().all(
            |t| t.hash != meshlib::proto::sha256(&g.networks[0].token.as_ref().unwrap().secret)
        ));

        // Refused: another role's secret, an unknown one, an expired one,
        // too many joins.
        let viewer = token(&shared, Role::Viewer, None, None);
        assert_eq!(ask(viewer, vec![]).unwrap_err().0, ErrorCode::InvalidToken);
        assert_eq!(ask([9; 32], vec![]).unwrap_err().0, ErrorCode::InvalidToken);
        let old = token(&shared, Role::Gateway, None, Some(Duration::from_secs(1)));
        let later = now + Duration::from_secs(5);
        let e = grant(
            &shared,
            &GatewayRequest {
                secret: old,
                join: vec![],
            },
            later,
        )
        .unwrap_err();
        assert_eq!(e.0, ErrorCode::TokenExpired);
        let many = vec![prod; MAX_GATEWAY_JOINS + 1];
        assert_eq!(ask(all, many).unwrap_err().0, ErrorCode::Malformed);
    }
}
