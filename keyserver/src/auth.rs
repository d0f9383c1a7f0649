//! Who may do what through the admin API: scoped API tokens, the
//! [`Principal`] a bearer token resolves to, and the audit trail's records.
//! Pure: no I/O, no clock (time is an argument).
//!
//! ## The model
//!
//! - A **tenant** is a name (a DNS label, `[a-z0-9-]`, 1–63 characters)
//!   attached to networks: `POST /v1/networks {"tenant": "acme"}`, or
//!   `PATCH /v1/networks/{net} {"tenant": ...}` by a global admin. A network
//!   without a tenant belongs to no tenant: only global tokens see it.
//! - An **API token** has a [`Role`] and a [`Scope`]: every network
//!   ([`Scope::All`]) or the networks of one tenant ([`Scope::Tenant`]).
//!   - `viewer`: reads (networks, members, names, tokens, service groups,
//!     addresses, traffic, the audit trail of its scope).
//!   - `operator`: a viewer that also manages what is inside its networks:
//!     members (removal), join tokens, service groups and their instances,
//!     service-address settings.
//!   - `gateway`: a gateway's credential (`istg1.`, which also carries
//!     the keyserver's address and pinned certificate). No admin API, no
//!     console; over the control protocol it lists the networks of its
//!     scope that have service groups, and gets a one-use join token (bound
//!     to service `gateway`, ephemeral) for each network it joins.
//!   - `admin`: an operator that also creates, changes and deletes networks
//!     (a tenant admin's new networks get its tenant) and manages the API
//!     tokens of its scope. A global admin (scope `all`) also reads backups
//!     and moves networks between tenants.
//! - The keyserver's own admin bearer token (`<data-dir>/admin-token`) is a
//!   global admin ([`Principal::root`]).
//! - A network outside a token's scope does not exist for it: every route
//!   answers 404 as for an unknown name, and listings leave it out. A route
//!   the role does not allow on a network it sees answers 403.
//! - Secrets: `istk1.` + 43 base64url characters (256 random bits), shown
//!   once at creation; the store keeps only their SHA-256
//!   ([`ApiTokenRecord::hash`]), as for join tokens.

use std::fmt;
use std::str::FromStr;

use meshlib::ids::NetworkId;
use serde::{Deserialize, Serialize};

use crate::registry::NetworkRecord;

/// The prefix of an API token's secret.
pub const SECRET_PREFIX: &str = "istk1.";

/// What a token may do inside its scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A gateway's credential: no admin API at all; over the control
    /// protocol it lists the networks of its scope that have service
    /// groups and gets a one-use join token for each
    /// ([`meshlib::proto::Request::Gateway`]).
    Gateway,
    /// Reads only.
    Viewer,
    /// Reads, and manages members, join tokens, service groups and service
    /// addresses of its networks.
    Operator,
    /// Everything in its scope: also networks and API tokens.
    Admin,
}

impl Role {
    /// The role's name (`gateway`, `viewer`, `operator`, `admin`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gateway => "gateway",
            Self::Viewer => "viewer",
            Self::Operator => "operator",
            Self::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = AuthError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "gateway" => Ok(Self::Gateway),
            "viewer" => Ok(Self::Viewer),
            "operator" => Ok(Self::Operator),
            "admin" => Ok(Self::Admin),
            other => Err(AuthError::BadRole(other.to_owned())),
        }
    }
}

/// The networks a token reaches.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Every network, with or without a tenant.
    All,
    /// The networks of this tenant.
    Tenant(String),
}

impl Scope {
    /// The tenant, for a tenant scope.
    pub fn tenant(&self) -> Option<&str> {
        match self {
            Self::All => None,
            Self::Tenant(t) => Some(t),
        }
    }

    /// Whether a network (or record) of `tenant` is inside the scope.
    pub fn covers(&self, tenant: Option<&str>) -> bool {
        match self {
            Self::All => true,
            Self::Tenant(t) => tenant == Some(t.as_str()),
        }
    }
}

/// Why an auth input was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Not `viewer`, `operator` or `admin`.
    #[error("unknown role {0:?}: viewer, operator, admin or gateway")]
    BadRole(String),
    /// A tenant name that is not a DNS label.
    #[error("invalid tenant {0:?}: 1 to 63 of a-z, 0-9 and '-', not starting or ending with '-'")]
    BadTenant(String),
    /// An API token's name out of bounds.
    #[error("invalid token name {0:?}: 1 to 64 characters, no control or bidi characters")]
    BadName(String),
}

/// Checks a tenant name: a lowercase DNS label.
pub fn tenant(name: &str) -> Result<String, AuthError> {
    let ok = (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(name.to_owned())
    } else {
        Err(AuthError::BadTenant(name.to_owned()))
    }
}

/// Checks an API token's human name (shown in listings and the audit trail).
pub fn token_name(name: &str) -> Result<String, AuthError> {
    let bad = |c: char| {
        c.is_control()
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if name.trim().is_empty() || name.chars().count() > 64 || name.chars().any(bad) {
        return Err(AuthError::BadName(name.to_owned()));
    }
    Ok(name.to_owned())
}

/// A stored API token (never the secret: only its SHA-256).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiTokenRecord {
    /// Public id (`at-` + 12 hex digits of the hash), for listing, revoking
    /// and the audit trail.
    pub id: String,
    /// Human name (who or what uses it).
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// Its tenant; `None`: every network.
    #[serde(default)]
    pub tenant: Option<String>,
    /// SHA-256 of the secret.
    pub hash: [u8; 32],
    /// Creation time (Unix seconds).
    pub created: u64,
    /// Expiry (Unix seconds); `None`: until revoked.
    #[serde(default)]
    pub expires: Option<u64>,
    /// The id of the token that created it (`admin` for the keyserver's
    /// own admin token).
    #[serde(default)]
    pub created_by: String,
}

impl ApiTokenRecord {
    /// Its scope.
    pub fn scope(&self) -> Scope {
        self.tenant.clone().map_or(Scope::All, Scope::Tenant)
    }
}

/// The hash an API token's secret is stored and looked up by.
pub fn secret_hash(secret: &str) -> [u8; 32] {
    meshlib::proto::sha256(secret.as_bytes())
}

/// A new secret from 32 random bytes: `istk1.<base64url>`.
pub fn new_secret(random: &[u8; 32]) -> String {
    use base64::Engine as _;
    format!(
        "{SECRET_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random)
    )
}

/// Who a request comes from, once its bearer token is checked: what the
/// handlers (and the console) ask before doing anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's id (`admin` for the keyserver's admin token).
    pub token_id: String,
    /// The token's name.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// Its scope.
    pub scope: Scope,
}

/// The id the keyserver's own admin token has in the audit trail.
pub const ROOT_ID: &str = "admin";

impl Principal {
    /// The keyserver's own admin token: a global admin.
    pub fn root() -> Self {
        Self {
            token_id: ROOT_ID.into(),
            name: "admin token".into(),
            role: Role::Admin,
            scope: Scope::All,
        }
    }

    /// The principal of a stored API token.
    pub fn of(rec: &ApiTokenRecord) -> Self {
        Self {
            token_id: rec.id.clone(),
            name: rec.name.clone(),
            role: rec.role,
            scope: rec.scope(),
        }
    }

    /// Its tenant, for a tenant-scoped token.
    pub fn tenant(&self) -> Option<&str> {
        self.scope.tenant()
    }

    /// A global admin: backups, tenants of networks, every API token.
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin && self.scope == Scope::All
    }

    /// Whether the network exists for this principal (it may read it).
    pub fn can_read(&self, network: &NetworkRecord) -> bool {
        self.sees(network.tenant.as_deref())
    }

    /// Whether it may change what is inside the network: members, join
    /// tokens, service groups, service addresses.
    pub fn can_write(&self, network: &NetworkRecord) -> bool {
        self.role >= Role::Operator && self.can_read(network)
    }

    /// Whether it may change or delete the network itself.
    pub fn can_manage(&self, network: &NetworkRecord) -> bool {
        self.role == Role::Admin && self.can_read(network)
    }

    /// Whether something of `tenant` (a network's, an audit entry's, an
    /// API token's) is in its scope. A gateway credential sees nothing
    /// through the admin API.
    pub fn sees(&self, tenant: Option<&str>) -> bool {
        self.role != Role::Gateway && self.scope.covers(tenant)
    }

    /// Whether it may use the admin API (and the console) at all: every
    /// role but `gateway`.
    pub fn uses_api(&self) -> bool {
        self.role != Role::Gateway
    }

    /// Whether it may create networks (in its tenant, for a tenant admin).
    pub fn can_create_networks(&self) -> bool {
        self.role == Role::Admin
    }

    /// Whether it may list, create and revoke API tokens of `tenant`
    /// (`None`: a global token, only for a global admin).
    pub fn can_manage_tokens(&self, tenant: Option<&str>) -> bool {
        self.role == Role::Admin && self.sees(tenant)
    }
}

/// Why a bearer token was refused (all answered 401 the same way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// No such token (or revoked).
    Unknown,
    /// Past its expiry.
    Expired,
}

/// Resolves a bearer string to a principal: the keyserver's admin token
/// (compared in constant time), or an API token looked up by the hash of
/// its secret (`lookup`), not expired at `now` (Unix seconds).
pub fn resolve(
    bearer: &str,
    admin_token: &str,
    now: u64,
    lookup: impl FnOnce(&[u8; 32]) -> Option<ApiTokenRecord>,
) -> Result<Principal, Refused> {
    use subtle::ConstantTimeEq as _;
    if !admin_token.is_empty() && bool::from(bearer.as_bytes().ct_eq(admin_token.as_bytes())) {
        return Ok(Principal::root());
    }
    if !bearer.starts_with(SECRET_PREFIX) {
        return Err(Refused::Unknown);
    }
    let rec = lookup(&secret_hash(bearer)).ok_or(Refused::Unknown)?;
    if rec.expires.is_some_and(|e| e <= now) {
        return Err(Refused::Expired);
    }
    Ok(Principal::of(&rec))
}

/// One entry of the audit trail: a mutation through the admin API (and so
/// the CLI), whatever its result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position in the trail (increasing; the store's key).
    pub seq: u64,
    /// When (Unix milliseconds).
    pub time_ms: u64,
    /// The token's id (`admin`: the keyserver's admin token).
    pub token: String,
    /// The token's name.
    pub token_name: String,
    /// The token's role.
    pub role: Role,
    /// The client's address (`ip:port`), when known.
    #[serde(default)]
    pub client: Option<String>,
    /// HTTP method.
    pub method: String,
    /// The route (`/v1/networks/{net}/members/{member}`).
    pub route: String,
    /// The path as sent (percent-encoded names).
    pub path: String,
    /// The network concerned, when there is one the token may see.
    #[serde(default)]
    pub network: Option<NetworkId>,
    /// That network's name at the time.
    #[serde(default)]
    pub network_name: Option<String>,
    /// The tenant the entry belongs to (its network's, or the token's):
    /// who may read it.
    #[serde(default)]
    pub tenant: Option<String>,
    /// What inside the network (member, token id, group, service, ...).
    #[serde(default)]
    pub target: Option<String>,
    /// The answer's HTTP status.
    pub status: u16,
}

/// A query of the audit trail.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditQuery {
    /// Only entries about this network (id or its name at the time).
    pub network: Option<String>,
    /// Entries at or after this time (Unix seconds).
    pub since: Option<u64>,
    /// Entries before this time (Unix seconds).
    pub until: Option<u64>,
    /// At most this many (the latest).
    pub limit: usize,
}

impl AuditQuery {
    /// Whether `e` answers the query (scope is checked apart).
    pub fn matches(&self, e: &AuditRecord) -> bool {
        let secs = e.time_ms / 1000;
        let net_ok = self.network.as_deref().is_none_or(|n| {
            e.network.is_some_and(|id| id.to_string() == n) || e.network_name.as_deref() == Some(n)
        });
        net_ok && self.since.is_none_or(|s| secs >= s) && self.until.is_none_or(|u| secs < u)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(tenant: Option<&str>) -> NetworkRecord {
        NetworkRecord {
            id: NetworkId::random(),
            name: "n".into(),
            range: "10.240.0.0/22".parse().unwrap(),
            generation: 0,
            created: 0,
            expire_after: None,
            service_range: None,
            addresses: Default::default(),
            tenant: tenant.map(str::to_owned),
        }
    }

    fn principal(role: Role, tenant: Option<&str>) -> Principal {
        Principal {
            token_id: "at-x".into(),
            name: "x".into(),
            role,
            scope: tenant.map_or(Scope::All, |t| Scope::Tenant(t.into())),
        }
    }

    #[test]
    fn roles_and_scopes() {
        let (a, b, none) = (net(Some("a")), net(Some("b")), net(None));
        let viewer = principal(Role::Viewer, Some("a"));
        assert!(viewer.can_read(&a) && !viewer.can_write(&a) && !viewer.can_manage(&a));
        assert!(!viewer.can_read(&b) && !viewer.can_read(&none));
        let op = principal(Role::Operator, Some("a"));
        assert!(op.can_write(&a) && !op.can_manage(&a) && !op.can_write(&b));
        let admin = principal(Role::Admin, Some("a"));
        assert!(admin.can_manage(&a) && !admin.can_manage(&b) && !admin.is_admin());
        assert!(admin.can_manage_tokens(Some("a")) && !admin.can_manage_tokens(None));
        let root = Principal::root();
        assert!(root.is_admin() && root.can_manage(&b) && root.can_read(&none));
        assert!(principal(Role::Viewer, None).can_read(&none));
        assert!(!principal(Role::Viewer, None).is_admin());
    }

    #[test]
    fn bearer_resolution() {
        let secret = new_secret(&[7; 32]);
        assert!(secret.starts_with(SECRET_PREFIX) && secret.len() == SECRET_PREFIX.len() + 43);
        let rec = ApiTokenRecord {
            id: "at-1".into(),
            name: "ci".into(),
            role: Role::Viewer,
            tenant: Some("a".into()),
            hash: secret_hash(&secret),
            created: 0,
            expires: Some(100),
            created_by: ROOT_ID.into(),
        };
        let lookup = |h: &[u8; 32]| (*h == rec.hash).then(|| rec.clone());
        assert_eq!(resolve("root", "root", 0, lookup), Ok(Principal::root()));
        let p = resolve(&secret, "root", 99, lookup).unwrap();
        assert_eq!((p.role, p.tenant()), (Role::Viewer, Some("a")));
        assert_eq!(resolve(&secret, "root", 100, lookup), Err(Refused::Expired));
        assert_eq!(
            resolve("istk1.nope", "root", 0, lookup),
            Err(Refused::Unknown)
        );
        assert_eq!(resolve("", "root", 0, lookup), Err(Refused::Unknown));
        assert_eq!(resolve("", "", 0, lookup), Err(Refused::Unknown));
    }

    #[test]
    fn names_are_checked() {
        assert!(tenant("acme-1").is_ok());
        for bad in ["", "-a", "a-", "A", "a b", &"a".repeat(64)] {
            assert!(tenant(bad).is_err(), "{bad:?}");
        }
        assert!(token_name("ci deploy").is_ok());
        assert!(token_name("a\u{202e}b").is_err() && token_name(" ").is_err());
        assert_eq!("operator".parse::<Role>(), Ok(Role::Operator));
        assert!("root".parse::<Role>().is_err());
    }
}
