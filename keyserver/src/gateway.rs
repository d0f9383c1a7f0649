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
