//! Keyserver configuration: plain data, read from a TOML file; `main` maps
//! flags and environment variables on top. The library never reads argv or env.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::http::ApiLimits;
use crate::server::Limits;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// Human-readable lines (colours only on a terminal, never with `NO_COLOR`).
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Where STUN and the relay listen (`relay-listen`): an address,
/// `"off"`, or `"default"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum RelayListen {
    /// Port [`RelayListen::PORT`] on the QUIC listen address's host.
    #[default]
    Default,
    /// Neither runs here.
    Off,
    /// This address.
    At(SocketAddr),
}

impl RelayListen {
    /// The relay's port unless told otherwise.
    pub const PORT: u16 = 3478;

    /// The address to bind, given the QUIC socket's; `None` when off.
    pub fn resolve(self, quic: SocketAddr) -> Option<SocketAddr> {
        match self {
            Self::Default => Some(SocketAddr::new(quic.ip(), Self::PORT)),
            Self::Off => None,
            Self::At(a) => Some(a),
        }
    }
}

impl std::str::FromStr for RelayListen {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim() {
            "off" => Ok(Self::Off),
            "default" => Ok(Self::Default),
            t => t.parse().map(Self::At).map_err(|e| {
                format!("{t:?}: {e} (an address such as 0.0.0.0:3478, `off` or `default`)")
            }),
        }
    }
}

impl TryFrom<String> for RelayListen {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

impl From<RelayListen> for String {
    fn from(l: RelayListen) -> String {
        match l {
            RelayListen::Default => "default".into(),
            RelayListen::Off => "off".into(),
            RelayListen::At(a) => a.to_string(),
        }
    }
}

/// Everything `keyserver serve` needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct Config {
    /// State directory: store, certificate, admin token. Default
    /// `/var/lib/ist-keyserver`. Created, or tightened, to mode 0700.
    pub data_dir: PathBuf,
    /// QUIC (UDP) listen address for sidecars. Default `0.0.0.0:7443`.
    pub quic_listen: SocketAddr,
    /// HTTP admin API listen address. Default `127.0.0.1:7480` (loopback:
    /// the API is for operators).
    pub api_listen: SocketAddr,
    /// QUIC addresses written into join tokens. Default: the QUIC listen
    /// address (loopback if it is unspecified).
    pub advertise: Vec<SocketAddr>,
    /// Log filter (`info`, `debug`, `keyserver=trace`, ...). Default `info`.
    pub log_level: String,
    /// Log format: `text` or `json`. Default `text`.
    pub log_format: LogFormat,
    /// Largest control frame in bytes. Default 1 MiB: a full /22 snapshot is
    /// about 290 KB.
    pub max_frame: usize,
    /// Most simultaneous established QUIC connections (members past their
    /// hello). Default 16384 (10,000 members take about 300 MB); more are
    /// answered `Busy`.
    pub max_connections: usize,
    /// Most QUIC connections that have not sent a valid hello yet. Default
    /// 512 (about 40 KiB each); when full, the oldest such connection is
    /// closed to make room.
    pub max_unauthenticated: usize,
    /// Most connections without a hello from one source address (IPv6: one
    /// /64). Default 64 (a fleet behind one NAT address restarting at once);
    /// when full, that source's oldest is closed.
    pub max_unauthenticated_per_source: usize,
    /// QUIC idle timeout in seconds. Default 30 (clients keep alive every 3
    /// and give a silent keyserver up after 10).
    pub idle_timeout_secs: u64,
    /// Seconds from a connection's first packet to its hello. Default 3.
    #[serde(alias = "handshake-timeout-secs")]
    pub hello_timeout_secs: u64,
    /// Deltas kept per network so reconnects resume without a snapshot. Default 1024.
    pub change_log: usize,
    /// Pushes buffered per network (a slow session lagging further catches up
    /// from the change log). Default 128: the buffer holds the last pushes of
    /// every network, whatever its members read.
    pub push_buffer: usize,
    /// Most milliseconds a change waits to go out merged with the next ones
    /// while members are still taking the last push (a change storm: a join
    /// storm, a rolling restart). Default 100; 0 pushes every change alone.
    pub push_hold_ms: u64,
    /// Seconds a released address stays unused. Default 300 (well above the DNS TTL).
    pub quarantine_secs: u64,
    /// Seconds without a heartbeat after which a member goes offline
    /// (invisible to its peers' names and peer lists, its address, index and
    /// name kept). Default 30, the DNS TTL of seed 003. Members are told to
    /// heartbeat every third of it (1–10 s).
    pub offline_after_secs: u64,
    /// Seconds an offline member is kept before it expires and its address
    /// is released (a network may set its own). Default 86400 (24 h).
    pub expire_after_secs: u64,
    /// Seconds an offline *ephemeral* member is kept before it is removed
    /// and its slot freed. Default: `offline-after-secs` (a stateless
    /// instance that stopped is gone within a minute; a restart of it
    /// takes its slot over at once anyway).
    pub ephemeral_after_secs: Option<u64>,
    /// Seconds between sweeps that delete expired and used-up tokens.
    /// Default 600; 0 turns the sweep off.
    pub token_gc_secs: u64,
    /// Seconds an admin API client has to send a request's headers (against
    /// slowloris). Default 5.
    pub api_header_timeout_secs: u64,
    /// Seconds an admin API request may take, body included. Default 10.
    pub api_request_timeout_secs: u64,
    /// Largest admin API request body in bytes. Default 65536.
    pub api_max_body: usize,
    /// Most simultaneous admin API connections. Default 128; a new one
    /// closes the oldest.
    pub api_max_connections: usize,
    /// Domain of the external FQDNs of service groups (seed 002):
    /// `<name>-<random>.<service-domain>`; gateways hold a wildcard
    /// certificate for it. Default `apps.ist-mesh.internal`.
    pub service_domain: String,
    /// Where the records live: unset for the embedded store
    /// (`<data-dir>/state.redb`, one keyserver), or
    /// `etcd://host:2379[,host:2379...][/prefix]` for an etcd cluster shared
    /// by any number of keyserver replicas (prefix default `/ist-mesh`).
    pub store: Option<String>,
    /// UDP address of STUN and the relay (one port for both). Default:
    /// port 3478 on the QUIC listen address's host (so a keyserver on
    /// loopback opens nothing else to the network); `"off"` runs neither
    /// here.
    pub relay_listen: RelayListen,
    /// The relay address members are told (a `keyserver relay` elsewhere,
    /// or this one behind a forwarded port). Default: the first advertised
    /// QUIC address's host with the relay's port.
    pub relay_advertise: Option<SocketAddr>,
    /// More STUN servers members ask, after this keyserver's. Default none.
    pub stun_servers: Vec<SocketAddr>,
    /// Bytes a second one member may send through the relay. Default
    /// 12500000 (100 Mbit/s).
    pub relay_rate: u64,
    /// Burst allowance of that limit, bytes. Default 2097152.
    pub relay_burst: u64,
    /// Serve the TCP port (TLS: control and relay for members whose UDP is
    /// blocked). Default `true`.
    pub tcp_enabled: bool,
    /// Its address. Default: the QUIC listen address, on TCP.
    pub tcp_listen: Option<SocketAddr>,
    /// Let service addresses' command hooks (wake, idle) run on this
    /// host, as the keyserver's user. Default `false`: only URL hooks
    /// run (a command hook fails, logged and counted), so a holder of
    /// the admin token cannot run programs here unless the operator
    /// chose it.
    pub allow_wake_commands: bool,
    /// Entries the audit trail keeps (every mutation through the admin API
    /// or CLI: who, from where, what, when, the result); past it the oldest
    /// are dropped. Default 10000.
    pub audit_entries: usize,
}

impl Default for Config {
    fn default() -> Self {
        let limits = Limits::default();
        let api = ApiLimits::default();
        Self {
            data_dir: PathBuf::from("/var/lib/ist-keyserver"),
            quic_listen: SocketAddr::from(([0, 0, 0, 0], 7443)),
            api_listen: SocketAddr::from(([127, 0, 0, 1], 7480)),
            advertise: vec![],
            log_level: "info".into(),
            log_format: LogFormat::Text,
            max_frame: limits.max_frame,
            max_connections: limits.max_connections,
            max_unauthenticated: limits.max_unauthenticated,
            max_unauthenticated_per_source: limits.max_unauthenticated_per_source,
            idle_timeout_secs: limits.idle_timeout.as_secs(),
            hello_timeout_secs: limits.hello_timeout.as_secs(),
            change_log: limits.change_log,
            push_buffer: limits.push_buffer,
            push_hold_ms: limits.push_hold.as_millis() as u64,
            quarantine_secs: limits.quarantine.as_secs(),
            offline_after_secs: limits.lifecycle.offline_after.as_secs(),
            expire_after_secs: limits.lifecycle.expire_after.as_secs(),
            ephemeral_after_secs: None,
            token_gc_secs: 600,
            api_header_timeout_secs: api.header_timeout.as_secs(),
            api_request_timeout_secs: api.request_timeout.as_secs(),
            api_max_body: api.max_body,
            api_max_connections: api.max_connections,
            service_domain: limits.service_domain.clone(),
            store: None,
            relay_listen: RelayListen::Default,
            relay_advertise: None,
            stun_servers: vec![],
            relay_rate: crate::relay::RelayLimits::default().rate,
            relay_burst: crate::relay::RelayLimits::default().burst,
            tcp_enabled: true,
            tcp_listen: None,
            allow_wake_commands: false,
            audit_entries: limits.audit_entries,
        }
    }
}

impl Config {
    /// Parses a TOML file's text.
    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// The server limits of this configuration.
    pub fn limits(&self) -> Limits {
        Limits {
            max_frame: self.max_frame,
            max_connections: self.max_connections,
            max_unauthenticated: self.max_unauthenticated.max(1),
            max_unauthenticated_per_source: self.max_unauthenticated_per_source.max(1),
            idle_timeout: Duration::from_secs(self.idle_timeout_secs.max(1)),
            hello_timeout: Duration::from_secs(self.hello_timeout_secs.max(1)),
            push_buffer: self.push_buffer,
            push_hold: Duration::from_millis(self.push_hold_ms.min(1000)),
            change_log: self.change_log,
            quarantine: Duration::from_secs(self.quarantine_secs),
            lifecycle: crate::registry::Lifecycle {
                offline_after: Duration::from_secs(self.offline_after_secs.max(1)),
                expire_after: Duration::from_secs(self.expire_after_secs),
                ephemeral_after: self.ephemeral_after_secs.map(Duration::from_secs),
            },
            service_domain: self.service_domain.clone(),
            audit_entries: self.audit_entries.max(1),
            ..Limits::default()
        }
    }

    /// The relay's limits of this configuration.
    pub fn relay_limits(&self) -> crate::relay::RelayLimits {
        crate::relay::RelayLimits {
            rate: self.relay_rate.max(1),
            burst: self.relay_burst.max(1500),
            ..crate::relay::RelayLimits::default()
        }
    }

    /// The admin API limits of this configuration.
    pub fn api_limits(&self) -> ApiLimits {
        ApiLimits {
            header_timeout: Duration::from_secs(self.api_header_timeout_secs.max(1)),
            request_timeout: Duration::from_secs(self.api_request_timeout_secs.max(1)),
            max_body: self.api_max_body,
            max_connections: self.api_max_connections.max(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_overrides_defaults_and_rejects_unknown() {
        let c = Config::from_toml("data-dir = \"/tmp/x\"\nmax-frame = 4096\n").unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.max_frame, 4096);
        assert_eq!(c.max_connections, 16384);
        assert_eq!(c.max_unauthenticated, 512);
        assert_eq!(c.hello_timeout_secs, 3);
        assert_eq!(c.log_format, LogFormat::Text);
        assert!(Config::from_toml("max-frames = 1").is_err());
        // The old name of the hello deadline still works.
        let old = Config::from_toml("handshake-timeout-secs = 7\nlog-format = \"json\"").unwrap();
        assert_eq!(old.hello_timeout_secs, 7);
        assert_eq!(old.log_format, LogFormat::Json);
    }
}
