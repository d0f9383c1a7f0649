//! Keyserver configuration: plain data, read from a TOML file; `main` maps
//! flags and environment variables on top. The library never reads argv or env.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::server::Limits;

/// Everything `keyserver serve` needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct Config {
    /// State directory: store, certificate, admin token. Default
    /// `/var/lib/ist-keyserver`.
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
    /// Largest control frame in bytes. Default 1 MiB: a full /22 snapshot is
    /// about 200 KiB.
    pub max_frame: usize,
    /// Most simultaneous QUIC connections. Default 4096.
    pub max_connections: usize,
    /// QUIC idle timeout in seconds. Default 30 (clients keep alive every 5).
    pub idle_timeout_secs: u64,
    /// Seconds from connection to a valid hello. Default 10.
    pub handshake_timeout_secs: u64,
    /// Deltas kept per network so reconnects resume without a snapshot. Default 1024.
    pub change_log: usize,
    /// Pushes buffered per connection before it catches up from the log. Default 1024.
    pub push_buffer: usize,
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
}

impl Default for Config {
    fn default() -> Self {
        let limits = Limits::default();
        Self {
            data_dir: PathBuf::from("/var/lib/ist-keyserver"),
            quic_listen: SocketAddr::from(([0, 0, 0, 0], 7443)),
            api_listen: SocketAddr::from(([127, 0, 0, 1], 7480)),
            advertise: vec![],
            log_level: "info".into(),
            max_frame: limits.max_frame,
            max_connections: limits.max_connections,
            idle_timeout_secs: limits.idle_timeout.as_secs(),
            handshake_timeout_secs: limits.handshake_timeout.as_secs(),
            change_log: limits.change_log,
            push_buffer: limits.push_buffer,
            quarantine_secs: limits.quarantine.as_secs(),
            offline_after_secs: limits.lifecycle.offline_after.as_secs(),
            expire_after_secs: limits.lifecycle.expire_after.as_secs(),
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
            idle_timeout: Duration::from_secs(self.idle_timeout_secs.max(1)),
            handshake_timeout: Duration::from_secs(self.handshake_timeout_secs.max(1)),
            push_buffer: self.push_buffer,
            change_log: self.change_log,
            quarantine: Duration::from_secs(self.quarantine_secs),
            lifecycle: crate::registry::Lifecycle {
                offline_after: Duration::from_secs(self.offline_after_secs.max(1)),
                expire_after: Duration::from_secs(self.expire_after_secs),
            },
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
        assert_eq!(c.max_connections, 4096);
        assert!(Config::from_toml("max-frames = 1").is_err());
    }
}
