//! Service groups (seed 002): how a group of private instances is published
//! to the outside through gateways. Pure data and validation, shared by the
//! keyserver (admin API, registry), the sidecar (`--publish`) and the
//! gateway (`sidecar gateway`); no I/O.
//!
//! A [`ServiceGroup`] has a name (unique in its network), an external FQDN
//! (`<name>-<random>.<domain>` unless given), [`PublishedPort`]s and
//! connection limits, and lists the instances attached to it. It is
//! *persistent* (made through the admin API or CLI: it survives its
//! instances) or *owned* by one instance (made by `sidecar --publish`: it
//! is deleted when that instance leaves or expires).
//!
//! Every published port maps an external port to an internal port common to
//! the group's instances, with a protocol ([`Protocol::Tcp`] by default, or
//! [`Protocol::Udp`]) and handlers. The handler rules are exactly seed
//! 002's ([`check_handlers`]):
//!
//! | port | rule |
//! |---|---|
//! | 80 | must have `http`, must not have `tls` |
//! | 443 | must have `http` and `tls` |
//! | any | `redirect` only on port 80 (it redirects to 443) |
//! | every other TCP port | must have `tls`, must not have `http` |
//!
//! UDP ports take no handlers (nothing to terminate or parse) and name the
//! gateway address they are served on (`ip`, seed 002's "set both protocol
//! and ip").
//!
//! Limits ([`Limits`]) are counted per instance: `soft_limit` (default 1)
//! and `hard_limit` (default 65535), each 1–65535, `soft_limit <=
//! hard_limit`.
//!
//! Requests arrive loosely typed ([`PortSpec`], [`GroupSpec`]) so that a
//! wrong value is a [`ServiceError`] naming the port and the rule broken,
//! not a decoding failure.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ids::InstanceName;

/// Default `soft_limit`: one active connection per instance before new ones
/// queue (seed 002).
pub const DEFAULT_SOFT_LIMIT: u16 = 1;
/// Default `hard_limit`: 65535 active connections per instance (seed 002).
pub const DEFAULT_HARD_LIMIT: u16 = 65535;
/// Default time a connection to a group without an online instance is held
/// while its wake hook runs.
pub const DEFAULT_WAKE_TIMEOUT_SECS: u32 = 30;
/// Longest wake timeout: an hour.
pub const MAX_WAKE_TIMEOUT_SECS: u32 = 3600;
/// Most published ports in one group.
pub const MAX_PORTS: usize = 32;
/// Most instances attached to one group.
pub const MAX_INSTANCES: usize = 1024;
/// Most names a group may have beside its FQDN ([`check_names`]).
pub const MAX_GROUP_NAMES: usize = 16;
/// Longest group name: the FQDN label `<name>-<8 random letters>` must fit
/// one DNS label (63 bytes).
pub const MAX_NAME: usize = 54;
/// Length of the random part of a generated FQDN (`my-service-rrtckyyi`).
pub const FQDN_RANDOM_LEN: usize = 8;

/// A group's name: 1–54 characters of `[a-z0-9-]`, not starting or ending
/// with `-`, unique in its network.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupName(String);

impl GroupName {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for GroupName {
    type Err = ServiceError;
    fn from_str(s: &str) -> Result<Self, ServiceError> {
        let bad = |reason: &str| ServiceError::BadName {
            name: s.to_owned(),
            reason: reason.to_owned(),
        };
        if s.is_empty() {
            return Err(bad("must not be empty"));
        }
        if s.len() > MAX_NAME {
            return Err(bad("longer than 54 characters"));
        }
        if !is_label(s) {
            return Err(bad("must be lowercase letters, digits and inner '-' only"));
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for GroupName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for GroupName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for GroupName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// One DNS label in our strict form: `[a-z0-9-]`, 1–63, no `-` at either end.
fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Checks an external FQDN: lowercase labels (`is_label`), at least two,
/// 253 bytes at most.
pub fn check_fqdn(fqdn: &str) -> Result<(), ServiceError> {
    let bad = |reason: &str| ServiceError::BadFqdn {
        fqdn: fqdn.to_owned(),
        reason: reason.to_owned(),
    };
    if fqdn.len() > 253 {
        return Err(bad("longer than 253 characters"));
    }
    let labels: Vec<&str> = fqdn.split('.').collect();
    if labels.len() < 2 {
        return Err(bad("needs at least two labels"));
    }
    if !labels.iter().all(|l| is_label(l)) {
        return Err(bad(
            "every label must be 1-63 lowercase letters, digits and inner '-'",
        ));
    }
    Ok(())
}

/// Checks the names a group answers to beside its FQDN `fqdn` (its own
/// domains): each an FQDN ([`check_fqdn`], any case, a trailing dot
/// dropped), none twice nor the FQDN itself, at most [`MAX_GROUP_NAMES`].
/// Returns them lowercased and sorted.
pub fn check_names(names: &[String], fqdn: &str) -> Result<Vec<String>, ServiceError> {
    if names.len() > MAX_GROUP_NAMES {
        return Err(ServiceError::TooManyNames {
            count: names.len(),
            max: MAX_GROUP_NAMES,
        });
    }
    let mut out: Vec<String> = Vec::with_capacity(names.len());
    for n in names {
        let n = n.strip_suffix('.').unwrap_or(n).to_ascii_lowercase();
        check_fqdn(&n)?;
        if n == fqdn || out.contains(&n) {
            return Err(ServiceError::DuplicateName { name: n });
        }
        out.push(n);
    }
    out.sort();
    Ok(out)
}

/// The external FQDN of a group: `<name>-<random>.<domain>` (seed 002's
/// `my-service-rrtckyyi.fra.unikraft.app`). `random` is the caller's
/// ([`FQDN_RANDOM_LEN`] lowercase letters).
pub fn external_fqdn(name: &GroupName, random: &str, domain: &str) -> String {
    format!("{name}-{random}.{}", domain.trim_matches('.'))
}

/// The generated name of the group an instance's `--publish` creates:
/// the instance name (cut to leave room) and a random suffix.
pub fn owned_group_name(instance: &InstanceName, random: &str) -> GroupName {
    let room = MAX_NAME.saturating_sub(random.len() + 1);
    let mut base: &str = instance.as_str();
    if base.len() > room {
        base = &base[..room];
    }
    let base = base.trim_end_matches('-');
    let text = if base.is_empty() {
        format!("pub-{random}")
    } else {
        format!("{base}-{random}")
    };
    text.parse()
        .unwrap_or_else(|_| GroupName(format!("pub-{}", &random[..random.len().min(8)])))
}

/// The transport of a published port.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP (the default).
    #[default]
    Tcp,
    /// UDP: datagrams per client flow to one instance.
    Udp,
}

impl Protocol {
    /// `tcp` or `udp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the gateway handles a TCP port's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Handler {
    /// Terminate TLS with the gateway's (wildcard) certificate.
    Tls,
    /// HTTP mode: requests are proxied (balanced per connection, `Host`
    /// picks the group, `X-Forwarded-*` added).
    Http,
    /// Answer every request with a 308 to `https://` (port 80 only).
    Redirect,
}

impl Handler {
    /// `tls`, `http` or `redirect`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tls => "tls",
            Self::Http => "http",
            Self::Redirect => "redirect",
        }
    }
}

impl FromStr for Handler {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "tls" => Ok(Self::Tls),
            "http" => Ok(Self::Http),
            "redirect" => Ok(Self::Redirect),
            _ => Err(()),
        }
    }
}

/// One seed-002 handler rule ([`check_handlers`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandlerRule {
    /// Port 80 must have `http`.
    Port80NeedsHttp,
    /// Port 80 must not have `tls`.
    Port80NoTls,
    /// Port 443 must have `http`.
    Port443NeedsHttp,
    /// Port 443 must have `tls`.
    Port443NeedsTls,
    /// `redirect` is only allowed on port 80.
    RedirectOnlyOn80,
    /// Ports other than 80 and 443 must have `tls`.
    OtherNeedsTls,
    /// Ports other than 80 and 443 must not have `http`.
    OtherNoHttp,
    /// UDP ports take no handlers.
    UdpNoHandlers,
}

impl HandlerRule {
    /// A stable identifier for the API's `rule` field.
    pub fn id(self) -> &'static str {
        match self {
            Self::Port80NeedsHttp => "port-80-requires-http",
            Self::Port80NoTls => "port-80-forbids-tls",
            Self::Port443NeedsHttp => "port-443-requires-http",
            Self::Port443NeedsTls => "port-443-requires-tls",
            Self::RedirectOnlyOn80 => "redirect-only-on-port-80",
            Self::OtherNeedsTls => "other-ports-require-tls",
            Self::OtherNoHttp => "other-ports-forbid-http",
            Self::UdpNoHandlers => "udp-takes-no-handlers",
        }
    }

    /// The rule in words.
    pub fn text(self) -> &'static str {
        match self {
            Self::Port80NeedsHttp => "port 80 must have the http handler",
            Self::Port80NoTls => "port 80 must not have the tls handler",
            Self::Port443NeedsHttp => "port 443 must have the http handler",
            Self::Port443NeedsTls => "port 443 must have the tls handler",
            Self::RedirectOnlyOn80 => {
                "the redirect handler is only allowed on port 80 (it redirects to 443)"
            }
            Self::OtherNeedsTls => "ports other than 80 and 443 must have the tls handler",
            Self::OtherNoHttp => "ports other than 80 and 443 must not have the http handler",
            Self::UdpNoHandlers => "udp ports take no handlers",
        }
    }
}

/// A broken handler rule in words, naming the port once: `port 443 must
/// have the tls handler`, `port 8443: ports other than 80 and 443 must have
/// the tls handler`.
fn handler_text(port: u16, rule: HandlerRule) -> String {
    let text = rule.text();
    if text.starts_with(&format!("port {port} ")) {
        text.to_owned()
    } else {
        format!("port {port}: {text}")
    }
}

/// Checks seed 002's handler rules for one port. The first rule broken is
/// returned; the order is: `udp` takes none, `redirect` only on 80, then
/// the port's own rules (`http` before `tls`).
pub fn check_handlers(
    port: u16,
    protocol: Protocol,
    handlers: &BTreeSet<Handler>,
) -> Result<(), HandlerRule> {
    if protocol == Protocol::Udp {
        return if handlers.is_empty() {
            Ok(())
        } else {
            Err(HandlerRule::UdpNoHandlers)
        };
    }
    let (http, tls) = (
        handlers.contains(&Handler::Http),
        handlers.contains(&Handler::Tls),
    );
    if handlers.contains(&Handler::Redirect) && port != 80 {
        return Err(HandlerRule::RedirectOnlyOn80);
    }
    match port {
        80 if !http => Err(HandlerRule::Port80NeedsHttp),
        80 if tls => Err(HandlerRule::Port80NoTls),
        443 if !http => Err(HandlerRule::Port443NeedsHttp),
        443 if !tls => Err(HandlerRule::Port443NeedsTls),
        80 | 443 => Ok(()),
        _ if !tls => Err(HandlerRule::OtherNeedsTls),
        _ if http => Err(HandlerRule::OtherNoHttp),
        _ => Ok(()),
    }
}

/// What the gateway does with a published port (derived from its handlers,
/// which [`check_handlers`] accepted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortMode {
    /// Port 80 with `redirect`: every request gets a 308 to `https://`.
    Redirect,
    /// HTTP mode: plain (port 80) or after TLS termination (443).
    Http {
        /// Whether TLS is terminated first.
        tls: bool,
    },
    /// TCP mode: TLS terminated, then bytes both ways.
    TlsTcp,
    /// UDP datagrams, per client flow.
    Udp,
}

/// One published port of a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedPort {
    /// The external port, on the gateways' public addresses.
    pub port: u16,
    /// The internal port, common to the group's instances.
    pub destination_port: u16,
    /// `tcp` or `udp`.
    #[serde(default)]
    pub protocol: Protocol,
    /// The handlers (empty for UDP).
    #[serde(default)]
    pub handlers: BTreeSet<Handler>,
    /// The gateway address a UDP port is served on (required for UDP); a
    /// TCP port with an `ip` is served only on that address.
    #[serde(default)]
    pub ip: Option<IpAddr>,
}

impl PublishedPort {
    /// What the gateway does with it.
    pub fn mode(&self) -> PortMode {
        if self.protocol == Protocol::Udp {
            return PortMode::Udp;
        }
        if self.handlers.contains(&Handler::Redirect) {
            PortMode::Redirect
        } else if self.handlers.contains(&Handler::Http) {
            PortMode::Http {
                tls: self.handlers.contains(&Handler::Tls),
            }
        } else {
            PortMode::TlsTcp
        }
    }

    /// The handlers as `http+tls` (seed-style), or `-` for none.
    pub fn handlers_text(&self) -> String {
        if self.handlers.is_empty() {
            return "-".into();
        }
        let all: Vec<&str> = self.handlers.iter().map(|h| h.as_str()).collect();
        all.join("+")
    }
}

/// Per-instance connection limits of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// New connections queue once every instance has this many active.
    pub soft_limit: u16,
    /// New connections are rejected once every instance has this many.
    pub hard_limit: u16,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            soft_limit: DEFAULT_SOFT_LIMIT,
            hard_limit: DEFAULT_HARD_LIMIT,
        }
    }
}

/// A hook that wakes a group's instances when a connection arrives and
/// none is online (scale to zero).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WakeHook {
    /// Run this program with these arguments on the gateway (only gateways
    /// started with `--allow-wake-commands` run it).
    Command(Vec<String>),
    /// `POST` to this `http://` URL.
    Url(String),
}

/// A service group, as the keyserver stores it and every member's map
/// carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceGroup {
    /// Unique in the network.
    pub name: GroupName,
    /// The external FQDN (`Host` and TLS SNI pick the group by it).
    pub fqdn: String,
    /// Published ports (at least one).
    pub ports: Vec<PublishedPort>,
    /// Per-instance connection limits.
    pub limits: Limits,
    /// The instance that owns the group (made by its `--publish`; deleted
    /// when it leaves or expires); `None` for a persistent group.
    #[serde(default)]
    pub owner: Option<InstanceName>,
    /// The instances attached, sorted.
    #[serde(default)]
    pub instances: Vec<InstanceName>,
    /// The wake hook, if any.
    #[serde(default)]
    pub wake: Option<WakeHook>,
    /// How long a connection waits for an instance to come online while
    /// the wake hook runs (seconds, 1–3600; default 30).
    #[serde(default = "default_wake_timeout")]
    pub wake_timeout_secs: u32,
}

fn default_wake_timeout() -> u32 {
    DEFAULT_WAKE_TIMEOUT_SECS
}

impl ServiceGroup {
    /// Whether the group survives its instances (made through the API or
    /// CLI) rather than belonging to one.
    pub fn persistent(&self) -> bool {
        self.owner.is_none()
    }

    /// The published TCP or UDP port `port`, if any.
    pub fn port(&self, port: u16, protocol: Protocol) -> Option<&PublishedPort> {
        self.ports
            .iter()
            .find(|p| p.port == port && p.protocol == protocol)
    }

    /// Whether `instance` is attached.
    pub fn has_instance(&self, instance: &InstanceName) -> bool {
        self.instances.binary_search(instance).is_ok()
    }

    /// Attaches an instance (kept sorted); false if it already was.
    pub fn attach(&mut self, instance: InstanceName) -> bool {
        match self.instances.binary_search(&instance) {
            Ok(_) => false,
            Err(at) => {
                self.instances.insert(at, instance);
                true
            }
        }
    }

    /// Detaches an instance; false if it was not attached.
    pub fn detach(&mut self, instance: &InstanceName) -> bool {
        match self.instances.binary_search(instance) {
            Ok(at) => {
                self.instances.remove(at);
                true
            }
            Err(_) => false,
        }
    }
}

/// A published port as a request gives it: loosely typed, checked by
/// [`PortSpec::check`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    /// External port.
    pub port: i64,
    /// Internal port; default: the external one.
    #[serde(default)]
    pub destination_port: Option<i64>,
    /// `tcp` (default) or `udp`.
    #[serde(default)]
    pub protocol: Option<String>,
    /// `tls`, `http`, `redirect`.
    #[serde(default)]
    pub handlers: Vec<String>,
    /// Gateway address (required for UDP).
    #[serde(default)]
    pub ip: Option<String>,
}

/// A port number in 1–65535, or the error naming it.
fn port_number(value: i64, port: i64, field: &'static str) -> Result<u16, ServiceError> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or(ServiceError::PortRange { port, field, value })
}

impl PortSpec {
    /// Checks the spec: port numbers, protocol, handler names, seed 002's
    /// handler rules, UDP's address.
    pub fn check(&self) -> Result<PublishedPort, ServiceError> {
        let port = port_number(self.port, self.port, "port")?;
        let destination_port = port_number(
            self.destination_port.unwrap_or(self.port),
            self.port,
            "destination_port",
        )?;
        let protocol = match self.protocol.as_deref() {
            None | Some("tcp") => Protocol::Tcp,
            Some("udp") => Protocol::Udp,
            Some(other) => {
                return Err(ServiceError::UnknownProtocol {
                    port,
                    protocol: other.to_owned(),
                })
            }
        };
        let mut handlers = BTreeSet::new();
        for h in &self.handlers {
            let handler = h.parse().map_err(|()| ServiceError::UnknownHandler {
                port,
                handler: h.clone(),
            })?;
            if !handlers.insert(handler) {
                return Err(ServiceError::DuplicateHandler {
                    port,
                    handler: h.clone(),
                });
            }
        }
        check_handlers(port, protocol, &handlers)
            .map_err(|rule| ServiceError::Handler { port, rule })?;
        let ip = match &self.ip {
            None => None,
            Some(text) => Some(text.parse::<IpAddr>().map_err(|_| ServiceError::BadIp {
                port,
                ip: text.clone(),
            })?),
        };
        if protocol == Protocol::Udp && ip.is_none() {
            return Err(ServiceError::UdpNeedsIp { port });
        }
        Ok(PublishedPort {
            port,
            destination_port,
            protocol,
            handlers,
            ip,
        })
    }
}

/// Checks a list of ports: each ([`PortSpec::check`]), at least one, at
/// most [`MAX_PORTS`], no external port published twice per protocol.
pub fn check_ports(specs: &[PortSpec]) -> Result<Vec<PublishedPort>, ServiceError> {
    if specs.is_empty() {
        return Err(ServiceError::NoPorts);
    }
    if specs.len() > MAX_PORTS {
        return Err(ServiceError::TooManyPorts { count: specs.len() });
    }
    let mut out: Vec<PublishedPort> = Vec::with_capacity(specs.len());
    for spec in specs {
        let p = spec.check()?;
        if out
            .iter()
            .any(|q| q.port == p.port && q.protocol == p.protocol)
        {
            return Err(ServiceError::DuplicatePort {
                port: p.port,
                protocol: p.protocol,
            });
        }
        out.push(p);
    }
    out.sort_by_key(|p| (p.port, p.protocol));
    Ok(out)
}

/// Checks limits given as numbers: each 1–65535 (`None` keeps `current`'s),
/// and `soft_limit <= hard_limit`.
pub fn check_limits(
    soft: Option<i64>,
    hard: Option<i64>,
    current: Limits,
) -> Result<Limits, ServiceError> {
    let one = |value: Option<i64>, field: &'static str, now: u16| match value {
        None => Ok(now),
        Some(v) => u16::try_from(v)
            .ok()
            .filter(|v| *v >= 1)
            .ok_or(ServiceError::LimitRange { field, value: v }),
    };
    let soft_limit = one(soft, "soft_limit", current.soft_limit)?;
    let hard_limit = one(hard, "hard_limit", current.hard_limit)?;
    if soft_limit > hard_limit {
        return Err(ServiceError::SoftAboveHard {
            soft: soft_limit,
            hard: hard_limit,
        });
    }
    Ok(Limits {
        soft_limit,
        hard_limit,
    })
}

/// A wake hook as a request gives it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WakeSpec {
    /// A program and its arguments.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// An `http://` URL to `POST` to.
    #[serde(default)]
    pub url: Option<String>,
}

/// Checks a wake hook: exactly one of `command` (1–64 non-empty arguments
/// of at most 4096 bytes, no NUL) and `url` (`http://host[:port]/...`, at
/// most 2048 bytes).
pub fn check_wake(spec: &WakeSpec) -> Result<WakeHook, ServiceError> {
    let bad = |reason: &str| ServiceError::BadWake(reason.to_owned());
    match (&spec.command, &spec.url) {
        (Some(cmd), None) => {
            if cmd.is_empty() || cmd.len() > 64 {
                return Err(bad("command must have 1 to 64 arguments"));
            }
            if cmd[0].is_empty() || cmd.iter().any(|a| a.len() > 4096 || a.contains('\0')) {
                return Err(bad(
                    "command arguments must be at most 4096 bytes without NUL, the program non-empty",
                ));
            }
            Ok(WakeHook::Command(cmd.clone()))
        }
        (None, Some(url)) => {
            let rest = url
                .strip_prefix("http://")
                .ok_or_else(|| bad("url must start with http://"))?;
            let host = rest.split('/').next().unwrap_or("");
            if host.is_empty() || url.len() > 2048 || url.chars().any(char::is_control) {
                return Err(bad(
                    "url must be http://host[:port]/path, at most 2048 bytes",
                ));
            }
            Ok(WakeHook::Url(url.clone()))
        }
        _ => Err(bad("give exactly one of command and url")),
    }
}

/// Checks a wake timeout in seconds: 1–3600.
pub fn check_wake_timeout(secs: i64) -> Result<u32, ServiceError> {
    u32::try_from(secs)
        .ok()
        .filter(|s| (1..=MAX_WAKE_TIMEOUT_SECS).contains(s))
        .ok_or(ServiceError::WakeTimeout { value: secs })
}

/// Why a service group request is refused. Every variant about a port
/// names it; [`ServiceError::rule`] gives a stable identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    /// The group name is unusable.
    #[error("invalid service group name {name:?}: {reason}")]
    BadName {
        /// The name as given.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The FQDN is unusable.
    #[error("invalid fqdn {fqdn:?}: {reason}")]
    BadFqdn {
        /// The FQDN as given.
        fqdn: String,
        /// What is wrong.
        reason: String,
    },
    /// A port number is outside 1–65535.
    #[error("port {port}: {field} {value} is outside 1-65535")]
    PortRange {
        /// The external port as given.
        port: i64,
        /// `port` or `destination_port`.
        field: &'static str,
        /// The value.
        value: i64,
    },
    /// The protocol is neither `tcp` nor `udp`.
    #[error("port {port}: unknown protocol {protocol:?} (tcp or udp)")]
    UnknownProtocol {
        /// The port.
        port: u16,
        /// The protocol as given.
        protocol: String,
    },
    /// A handler is not `tls`, `http` or `redirect`.
    #[error("port {port}: unknown handler {handler:?} (tls, http or redirect)")]
    UnknownHandler {
        /// The port.
        port: u16,
        /// The handler as given.
        handler: String,
    },
    /// A handler is listed twice.
    #[error("port {port}: handler {handler:?} is listed twice")]
    DuplicateHandler {
        /// The port.
        port: u16,
        /// The handler.
        handler: String,
    },
    /// A seed-002 handler rule is broken.
    #[error("{}", handler_text(*port, *rule))]
    Handler {
        /// The port.
        port: u16,
        /// The rule.
        rule: HandlerRule,
    },
    /// A UDP port without the gateway address it is served on.
    #[error("port {port}: a udp port needs ip (the gateway address it is served on)")]
    UdpNeedsIp {
        /// The port.
        port: u16,
    },
    /// `ip` is not an IP address.
    #[error("port {port}: ip {ip:?} is not an IP address")]
    BadIp {
        /// The port.
        port: u16,
        /// The text as given.
        ip: String,
    },
    /// The same external port twice with one protocol.
    #[error("port {port}/{protocol} is published twice")]
    DuplicatePort {
        /// The port.
        port: u16,
        /// Its protocol.
        protocol: Protocol,
    },
    /// A UDP port already served on that address by another group (no SNI
    /// or Host tells datagrams apart).
    #[error("port {port}/udp on {ip} is already published by service group {other:?}")]
    UdpPortTaken {
        /// The port.
        port: u16,
        /// The address.
        ip: IpAddr,
        /// The other group.
        other: String,
    },
    /// No port at all.
    #[error("a service group publishes at least one port")]
    NoPorts,
    /// Too many ports.
    #[error("{count} ports: a service group publishes at most 32")]
    TooManyPorts {
        /// How many were given.
        count: usize,
    },
    /// A limit outside 1–65535.
    #[error("{field} {value} is outside 1-65535")]
    LimitRange {
        /// `soft_limit` or `hard_limit`.
        field: &'static str,
        /// The value.
        value: i64,
    },
    /// `soft_limit > hard_limit`.
    #[error("soft_limit {soft} is greater than hard_limit {hard}")]
    SoftAboveHard {
        /// The soft limit.
        soft: u16,
        /// The hard limit.
        hard: u16,
    },
    /// The wake hook is unusable.
    #[error("invalid wake hook: {0}")]
    BadWake(String),
    /// The wake timeout is outside 1–3600 s.
    #[error("wake_timeout_secs {value} is outside 1-3600")]
    WakeTimeout {
        /// The value.
        value: i64,
    },
    /// More names than [`MAX_GROUP_NAMES`].
    #[error("at most {max} names beside the fqdn ({count} given)")]
    TooManyNames {
        /// How many were given.
        count: usize,
        /// The most allowed.
        max: usize,
    },
    /// A name is given twice, or is the group's FQDN.
    #[error("name {name:?} is given twice (or is the group's fqdn)")]
    DuplicateName {
        /// The name.
        name: String,
    },
}

impl ServiceError {
    /// A stable identifier of the rule broken (the API's `rule` field).
    pub fn rule(&self) -> &'static str {
        match self {
            Self::BadName { .. } => "name",
            Self::BadFqdn { .. } => "fqdn",
            Self::PortRange { .. } => "port-range",
            Self::UnknownProtocol { .. } => "protocol",
            Self::UnknownHandler { .. } => "handler-name",
            Self::DuplicateHandler { .. } => "handler-twice",
            Self::Handler { rule, .. } => rule.id(),
            Self::UdpNeedsIp { .. } => "udp-requires-ip",
            Self::BadIp { .. } => "ip",
            Self::DuplicatePort { .. } => "port-twice",
            Self::UdpPortTaken { .. } => "udp-port-taken",
            Self::NoPorts => "no-ports",
            Self::TooManyPorts { .. } => "too-many-ports",
            Self::LimitRange { .. } => "limit-range",
            Self::SoftAboveHard { .. } => "soft-above-hard",
            Self::BadWake(_) => "wake",
            Self::WakeTimeout { .. } => "wake-timeout",
            Self::TooManyNames { .. } => "too-many-names",
            Self::DuplicateName { .. } => "name-twice",
        }
    }

    /// The port the error is about, if any.
    pub fn port(&self) -> Option<i64> {
        match self {
            Self::PortRange { port, .. } => Some(*port),
            Self::UnknownProtocol { port, .. }
            | Self::UnknownHandler { port, .. }
            | Self::DuplicateHandler { port, .. }
            | Self::Handler { port, .. }
            | Self::UdpNeedsIp { port }
            | Self::BadIp { port, .. }
            | Self::DuplicatePort { port, .. }
            | Self::UdpPortTaken { port, .. } => Some(i64::from(*port)),
            _ => None,
        }
    }
}

/// A `--publish` value: `[IP:]EXT[:INT][/ITEMS]`, where `ITEMS` is
/// `+`-separated among `http`, `tls`, `redirect`, `tcp`, `udp`
/// (`443:8080/http+tls`, `80:8080/http+redirect`, `10000:5432/tls`,
/// `203.0.113.5:5353:53/udp`). Without `INT` the internal port is the
/// instance's (`deployment.port` of `warp.config.js`, or its first port).
pub fn parse_publish(text: &str) -> Result<PortSpec, String> {
    let bad = |why: &str| format!("--publish {text:?}: {why}");
    let (addr, items) = match text.split_once('/') {
        Some((a, i)) => (a, i),
        None => (text, ""),
    };
    let parts: Vec<&str> = addr.split(':').collect();
    let (ip, ext, int) = match parts.as_slice() {
        [ext] => (None, *ext, None),
        [ext, int] => (None, *ext, Some(*int)),
        [ip, ext, int] => (Some(*ip), *ext, Some(*int)),
        _ => return Err(bad("expected [IP:]EXT[:INT][/handlers]")),
    };
    let number = |s: &str| -> Result<i64, String> {
        s.parse::<u16>()
            .map(i64::from)
            .map_err(|_| bad(&format!("{s:?} is not a port number")))
    };
    let mut spec = PortSpec {
        port: number(ext)?,
        destination_port: int.map(number).transpose()?,
        ip: ip.map(str::to_owned),
        ..PortSpec::default()
    };
    for item in items.split('+').filter(|i| !i.is_empty()) {
        match item {
            "tcp" | "udp" => spec.protocol = Some(item.to_owned()),
            h => spec.handlers.push(h.to_owned()),
        }
    }
    Ok(spec)
}

/// What a joining member asks for (seed 002): the groups it joins
/// (`--service-group`, in addition to its token's binding) and the ports
/// it publishes in a group of its own (`--publish`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JoinServices {
    /// Existing groups to attach the instance to.
    pub groups: Vec<GroupName>,
    /// Ports of the instance-owned group; empty: none.
    pub publish: Vec<PublishedPort>,
}

impl PublishedPort {
    /// The loose form of this port, to check it again (a port that arrived
    /// over the wire is typed but unchecked).
    pub fn to_spec(&self) -> PortSpec {
        PortSpec {
            port: i64::from(self.port),
            destination_port: Some(i64::from(self.destination_port)),
            protocol: Some(self.protocol.as_str().to_owned()),
            handlers: self
                .handlers
                .iter()
                .map(|h| h.as_str().to_owned())
                .collect(),
            ip: self.ip.map(|ip| ip.to_string()),
        }
    }
}

/// A service group as a create request gives it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    /// The name.
    pub name: String,
    /// The FQDN; default `<name>-<random>.<domain>`.
    #[serde(default)]
    pub fqdn: Option<String>,
    /// Names the group answers to beside its FQDN (its own domains; at
    /// most [`MAX_GROUP_NAMES`]).
    #[serde(default)]
    pub names: Vec<String>,
    /// Published ports (seed 002 calls them `services`; both are taken).
    #[serde(default, alias = "services")]
    pub ports: Vec<PortSpec>,
    /// Default 1.
    #[serde(default)]
    pub soft_limit: Option<i64>,
    /// Default 65535.
    #[serde(default)]
    pub hard_limit: Option<i64>,
    /// Instances to attach now.
    #[serde(default)]
    pub instances: Vec<String>,
    /// Wake hook.
    #[serde(default)]
    pub wake: Option<WakeSpec>,
    /// Default 30.
    #[serde(default)]
    pub wake_timeout_secs: Option<i64>,
}

/// Checks a create request into a group (instances are checked by the
/// caller, who knows the network). `random` is used for the default FQDN.
pub fn check_group(
    spec: &GroupSpec,
    owner: Option<InstanceName>,
    random: &str,
    domain: &str,
) -> Result<ServiceGroup, ServiceError> {
    let name: GroupName = spec.name.parse()?;
    let fqdn = match &spec.fqdn {
        Some(f) => f.to_ascii_lowercase(),
        None => external_fqdn(&name, random, domain),
    };
    check_fqdn(&fqdn)?;
    let ports = check_ports(&spec.ports)?;
    let limits = check_limits(spec.soft_limit, spec.hard_limit, Limits::default())?;
    let wake = spec.wake.as_ref().map(check_wake).transpose()?;
    let wake_timeout_secs = spec
        .wake_timeout_secs
        .map(check_wake_timeout)
        .transpose()?
        .unwrap_or(DEFAULT_WAKE_TIMEOUT_SECS);
    Ok(ServiceGroup {
        name,
        fqdn,
        ports,
        limits,
        owner,
        instances: vec![],
        wake,
        wake_timeout_secs,
    })
}

/// A change to a group (`PATCH`): absent fields are kept.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupPatch {
    /// New ports (replace all).
    #[serde(default, alias = "services")]
    pub ports: Option<Vec<PortSpec>>,
    /// New soft limit.
    #[serde(default)]
    pub soft_limit: Option<i64>,
    /// New hard limit.
    #[serde(default)]
    pub hard_limit: Option<i64>,
    /// New wake hook; `null` removes it.
    #[serde(default, deserialize_with = "present_wake")]
    pub wake: Option<Option<WakeSpec>>,
    /// New wake timeout.
    #[serde(default)]
    pub wake_timeout_secs: Option<i64>,
    /// New names beside the FQDN (replace all; `[]` removes them).
    #[serde(default)]
    pub names: Option<Vec<String>>,
}

/// A field that is present (even `null`) becomes `Some`.
fn present_wake<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<WakeSpec>>, D::Error> {
    Option::<WakeSpec>::deserialize(d).map(Some)
}

/// Applies a patch to a copy of `group`; the group is unchanged on error.
pub fn patch_group(group: &ServiceGroup, patch: &GroupPatch) -> Result<ServiceGroup, ServiceError> {
    let mut g = group.clone();
    if let Some(ports) = &patch.ports {
        g.ports = check_ports(ports)?;
    }
    g.limits = check_limits(patch.soft_limit, patch.hard_limit, g.limits)?;
    match &patch.wake {
        Some(Some(w)) => g.wake = Some(check_wake(w)?),
        Some(None) => g.wake = None,
        None => {}
    }
    if let Some(t) = patch.wake_timeout_secs {
        g.wake_timeout_secs = check_wake_timeout(t)?;
    }
    Ok(g)
}

#[cfg(test)]
mod tests {
    #[test]
    fn handler_errors_name_the_port_once() {
        let e = ServiceError::Handler {
            port: 443,
            rule: HandlerRule::Port443NeedsTls,
        };
        assert_eq!(e.to_string(), "port 443 must have the tls handler");
        let e = ServiceError::Handler {
            port: 8443,
            rule: HandlerRule::OtherNeedsTls,
        };
        assert_eq!(
            e.to_string(),
            "port 8443: ports other than 80 and 443 must have the tls handler"
        );
    }

    use super::*;

    fn spec(port: i64, handlers: &[&str]) -> PortSpec {
        PortSpec {
            port,
            destination_port: Some(8080),
            handlers: handlers.iter().map(|h| (*h).to_owned()).collect(),
            ..PortSpec::default()
        }
    }

    fn rule_of(port: i64, handlers: &[&str]) -> Option<&'static str> {
        spec(port, handlers).check().err().map(|e| e.rule())
    }

    #[test]
    fn seed_examples_are_accepted_with_their_modes() {
        // Seed 002: 443 with http+tls, 80 with http+redirect, 10000 tls.
        let ports = check_ports(&[
            spec(443, &["http", "tls"]),
            spec(80, &["http", "redirect"]),
            spec(10000, &["tls"]),
        ])
        .unwrap();
        let modes: Vec<(u16, PortMode)> = ports.iter().map(|p| (p.port, p.mode())).collect();
        assert_eq!(
            modes,
            [
                (80, PortMode::Redirect),
                (443, PortMode::Http { tls: true }),
                (10000, PortMode::TlsTcp)
            ]
        );
        assert_eq!(ports[1].handlers_text(), "tls+http");
        // Plain HTTP mode on 80.
        assert_eq!(
            spec(80, &["http"]).check().unwrap().mode(),
            PortMode::Http { tls: false }
        );
    }

    #[test]
    fn every_handler_rule_names_its_port() {
        assert_eq!(rule_of(80, &[]), Some("port-80-requires-http"));
        assert_eq!(rule_of(80, &["tls"]), Some("port-80-requires-http"));
        assert_eq!(rule_of(80, &["http", "tls"]), Some("port-80-forbids-tls"));
        assert_eq!(rule_of(443, &["tls"]), Some("port-443-requires-http"));
        assert_eq!(rule_of(443, &["http"]), Some("port-443-requires-tls"));
        assert_eq!(
            rule_of(443, &["http", "tls", "redirect"]),
            Some("redirect-only-on-port-80")
        );
        assert_eq!(
            rule_of(8443, &["tls", "redirect"]),
            Some("redirect-only-on-port-80")
        );
        assert_eq!(rule_of(10000, &[]), Some("other-ports-require-tls"));
        assert_eq!(rule_of(10000, &["http"]), Some("other-ports-require-tls"));
        assert_eq!(
            rule_of(10000, &["http", "tls"]),
            Some("other-ports-forbid-http")
        );
        let e = spec(10000, &["http", "tls"]).check().unwrap_err();
        assert_eq!(e.port(), Some(10000));
        assert!(e.to_string().contains("port 10000"), "{e}");
        // UDP: no handlers, an ip.
        let mut u = spec(5353, &["tls"]);
        u.protocol = Some("udp".into());
        u.ip = Some("203.0.113.5".into());
        assert_eq!(u.check().unwrap_err().rule(), "udp-takes-no-handlers");
        u.handlers.clear();
        assert_eq!(u.check().unwrap().mode(), PortMode::Udp);
        u.ip = None;
        assert_eq!(u.check().unwrap_err().rule(), "udp-requires-ip");
        u.ip = Some("nope".into());
        assert_eq!(u.check().unwrap_err().rule(), "ip");
    }

    #[test]
    fn port_numbers_protocols_and_handler_names() {
        assert_eq!(rule_of(0, &["tls"]), Some("port-range"));
        assert_eq!(rule_of(65536, &["tls"]), Some("port-range"));
        assert_eq!(rule_of(-1, &["tls"]), Some("port-range"));
        let mut s = spec(10000, &["tls"]);
        s.destination_port = Some(0);
        let e = s.check().unwrap_err();
        assert_eq!((e.rule(), e.port()), ("port-range", Some(10000)));
        s.destination_port = None;
        assert_eq!(s.check().unwrap().destination_port, 10000);
        assert_eq!(rule_of(10000, &["tls", "gzip"]), Some("handler-name"));
        assert_eq!(rule_of(10000, &["tls", "tls"]), Some("handler-twice"));
        s.protocol = Some("sctp".into());
        assert_eq!(s.check().unwrap_err().rule(), "protocol");
        assert_eq!(check_ports(&[]).unwrap_err().rule(), "no-ports");
        let twice = check_ports(&[spec(443, &["http", "tls"]), spec(443, &["tls", "http"])]);
        assert_eq!(twice.unwrap_err().rule(), "port-twice");
        let many: Vec<PortSpec> = (1000..1040).map(|p| spec(p, &["tls"])).collect();
        assert_eq!(check_ports(&many).unwrap_err().rule(), "too-many-ports");
    }

    #[test]
    fn limits_defaults_ranges_and_order() {
        let d = check_limits(None, None, Limits::default()).unwrap();
        assert_eq!((d.soft_limit, d.hard_limit), (1, 65535));
        assert_eq!(
            check_limits(Some(65535), Some(65535), d)
                .unwrap()
                .soft_limit,
            65535
        );
        for (soft, hard, field) in [
            (Some(0), None, "soft_limit"),
            (Some(65536), None, "soft_limit"),
            (None, Some(0), "hard_limit"),
            (None, Some(70000), "hard_limit"),
        ] {
            match check_limits(soft, hard, d) {
                Err(ServiceError::LimitRange { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{soft:?}/{hard:?}: {other:?}"),
            }
        }
        let e = check_limits(Some(10), Some(5), d).unwrap_err();
        assert_eq!(e.rule(), "soft-above-hard");
        // Lowering hard below the current soft is refused too.
        let cur = check_limits(Some(10), Some(20), d).unwrap();
        assert_eq!(
            check_limits(None, Some(5), cur).unwrap_err().rule(),
            "soft-above-hard"
        );
    }

    #[test]
    fn names_fqdns_and_generated_names() {
        let name: GroupName = "my-service".parse().unwrap();
        assert_eq!(
            external_fqdn(&name, "rrtckyyi", "fra.example.app"),
            "my-service-rrtckyyi.fra.example.app"
        );
        for bad in ["", "My", "-a", "a-", "a_b", &"a".repeat(55)] {
            assert_eq!(
                bad.parse::<GroupName>().unwrap_err().rule(),
                "name",
                "{bad}"
            );
        }
        check_fqdn("a-b.example.test").unwrap();
        assert!(check_fqdn("nodot").is_err());
        assert!(check_fqdn("UPPER.test").is_err());
        let long: InstanceName = "x".repeat(63).parse().unwrap();
        let g = owned_group_name(&long, "abcdef");
        assert!(g.as_str().len() <= MAX_NAME && g.as_str().ends_with("-abcdef"));
        let fq = external_fqdn(&g, "abcdefgh", "d.test");
        check_fqdn(&fq).unwrap();
    }

    #[test]
    fn publish_flags_parse() {
        let s = parse_publish("443:8080/http+tls").unwrap();
        let p = s.check().unwrap();
        assert_eq!((p.port, p.destination_port), (443, 8080));
        assert_eq!(p.mode(), PortMode::Http { tls: true });
        let p = parse_publish("80:8080/http+redirect")
            .unwrap()
            .check()
            .unwrap();
        assert_eq!(p.mode(), PortMode::Redirect);
        let p = parse_publish("10000/tls").unwrap();
        assert_eq!(p.destination_port, None);
        let p = parse_publish("203.0.113.5:5353:53/udp")
            .unwrap()
            .check()
            .unwrap();
        assert_eq!(
            (p.protocol, p.ip, p.destination_port),
            (Protocol::Udp, Some("203.0.113.5".parse().unwrap()), 53)
        );
        assert!(parse_publish("x:80").is_err());
        assert!(parse_publish("1:2:3:4").is_err());
        // Parsed, then refused by the seed's rules, naming the port.
        let e = parse_publish("8080:80/http").unwrap().check().unwrap_err();
        assert_eq!(
            (e.rule(), e.port()),
            ("other-ports-require-tls", Some(8080))
        );
    }

    #[test]
    fn groups_check_patch_and_attach() {
        let spec = GroupSpec {
            name: "my-service".into(),
            ports: vec![spec(443, &["http", "tls"])],
            ..GroupSpec::default()
        };
        let mut g = check_group(&spec, None, "rrtckyyi", "example.test").unwrap();
        assert!(g.persistent());
        assert_eq!(g.fqdn, "my-service-rrtckyyi.example.test");
        assert_eq!(g.limits, Limits::default());
        assert_eq!(g.wake_timeout_secs, 30);
        let i: InstanceName = "web-1".parse().unwrap();
        assert!(g.attach(i.clone()) && !g.attach(i.clone()));
        assert!(g.has_instance(&i));
        let patch = GroupPatch {
            soft_limit: Some(5),
            hard_limit: Some(3),
            ..GroupPatch::default()
        };
        assert_eq!(
            patch_group(&g, &patch).unwrap_err().rule(),
            "soft-above-hard"
        );
        let patch: GroupPatch = serde_json::from_str(
            r#"{"soft_limit": 2, "hard_limit": 4, "wake": {"url": "http://10.0.0.1:9/wake"}, "wake_timeout_secs": 5}"#,
        )
        .unwrap();
        let g2 = patch_group(&g, &patch).unwrap();
        assert_eq!((g2.limits.soft_limit, g2.limits.hard_limit), (2, 4));
        assert_eq!(
            g2.wake,
            Some(WakeHook::Url("http://10.0.0.1:9/wake".into()))
        );
        let clear: GroupPatch = serde_json::from_str(r#"{"wake": null}"#).unwrap();
        assert_eq!(patch_group(&g2, &clear).unwrap().wake, None);
        assert!(g.detach(&i) && !g.detach(&i));
        // Seed 002's field name for the ports is taken too.
        let seedish: GroupSpec = serde_json::from_str(
            r#"{"name": "s", "services": [{"port": 443, "destination_port": 8080, "handlers": ["http", "tls"]}]}"#,
        )
        .unwrap();
        assert_eq!(seedish.ports.len(), 1);
        let owned = check_group(&spec, Some(i.clone()), "abcdefgh", "d.test").unwrap();
        assert!(!owned.persistent());
    }

    #[test]
    fn wake_hooks_and_timeouts() {
        let cmd = WakeSpec {
            command: Some(vec!["/bin/true".into()]),
            url: None,
        };
        assert_eq!(
            check_wake(&cmd).unwrap(),
            WakeHook::Command(vec!["/bin/true".into()])
        );
        for bad in [
            WakeSpec::default(),
            WakeSpec {
                command: Some(vec![]),
                url: None,
            },
            WakeSpec {
                command: None,
                url: Some("https://x/".into()),
            },
            WakeSpec {
                command: Some(vec!["a".into()]),
                url: Some("http://x/".into()),
            },
        ] {
            assert_eq!(check_wake(&bad).unwrap_err().rule(), "wake", "{bad:?}");
        }
        assert_eq!(check_wake_timeout(30).unwrap(), 30);
        assert!(check_wake_timeout(0).is_err() && check_wake_timeout(3601).is_err());
    }
}
