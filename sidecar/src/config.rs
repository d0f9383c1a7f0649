//! The sidecar's configuration: plain data, read from a TOML file
//! (`kebab-case` keys), with the binary mapping flags and environment
//! variables on top. Every field says its default and why.
//!
//! ```toml
//! token = "istm1...."            # or --token / ISTM_TOKEN
//! service = "api"
//! process-type = "web"
//! instance = "api-1"
//! runner = "runner-a"
//! listen-port = 51820
//! endpoints = ["192.0.2.10:51820"]
//! state-dir = "/var/lib/ist-mesh"
//! mode = "kernel"                # or "userspace"
//! interface = "istm0"
//! hosts-file = "/etc/hosts"
//! warp-config = "warp.config.js"
//!
//! ports = [8080]                 # announced to userspace-mode peers
//!
//! [dns]
//! listen = "127.0.0.77:53"
//! ttl = 30
//! set-resolver = false
//!
//! [[ist]]
//! service = "my db"
//! variables = ["DATABASE_HOST"]
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use meshlib::ids::{InstanceName, ProcessType};
use meshlib::ist::config::{IstOverride, Overrides};
use serde::{Deserialize, Serialize};

/// How the sidecar meets the instance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// A TUN interface with the member's private IP (needs `CAP_NET_ADMIN`
    /// and `/dev/net/tun`). Any protocol, any port.
    #[default]
    Kernel,
    /// A userspace TCP/IP stack; no privileges needed.
    Userspace,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kernel" => Ok(Mode::Kernel),
            "userspace" => Ok(Mode::Userspace),
            other => Err(format!("unknown mode {other:?} (kernel or userspace)")),
        }
    }
}

/// DNS settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct DnsSettings {
    /// Where the private DNS server listens (UDP and TCP). Default
    /// `127.0.0.77:53`: a loopback address of its own, so it never collides
    /// with a local resolver on `127.0.0.1:53` or `127.0.0.53:53`.
    pub listen: SocketAddr,
    /// TTL of answers, seconds. Default 30 (seed 003).
    pub ttl: u32,
    /// Upstream resolvers for every other name. Default: the `nameserver`
    /// lines of `/etc/resolv.conf` as the sidecar first found it.
    pub upstreams: Vec<SocketAddr>,
    /// Point the instance's resolver (`/etc/resolv.conf`) at the sidecar.
    /// Default false: `/etc/hosts` and the variables already work without it.
    pub set_resolver: bool,
    /// Whether to serve DNS at all. Default true; `enabled = false` turns it off.
    pub enabled: bool,
}

impl Default for DnsSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 77], 53)),
            ttl: meshlib::dns::DEFAULT_TTL,
            upstreams: Vec::new(),
            set_resolver: false,
            enabled: true,
        }
    }
}

/// Everything the sidecar needs to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Config {
    /// The join token (from `keyserver token create`). Needed on first start
    /// only: after joining, the state directory holds a reconnect credential.
    pub token: Option<String>,
    /// The service (app) name this instance belongs to, any Unicode. Default:
    /// the app the token is bound to; required otherwise.
    pub service: Option<String>,
    /// The process type. Default `web`.
    pub process_type: ProcessType,
    /// The wanted instance name (`<instance>.internal`). Default: the
    /// keyserver picks one (`<service>-<type>-<index>`).
    pub instance: Option<InstanceName>,
    /// Label of the runner (host). Default: the machine's hostname.
    pub runner: Option<String>,
    /// WireGuard UDP port. Default 51820; 0 picks a free one.
    pub listen_port: u16,
    /// Underlay endpoints to advertise (`ip:port`), e.g. the runner's public
    /// address. Default: none besides what the keyserver observes.
    pub endpoints: Vec<SocketAddr>,
    /// Where the key, credential and map cache live. Default
    /// `/var/lib/ist-mesh`.
    pub state_dir: PathBuf,
    /// Kernel (TUN) or userspace mode. Default kernel.
    pub mode: Mode,
    /// Name of the TUN interface and of the UAPI socket. Default `istm0`.
    pub interface: String,
    /// The hosts file to keep a managed section in. Default `/etc/hosts`;
    /// `None` (`hosts-file = ""`) leaves hosts files alone.
    #[serde(deserialize_with = "empty_path_is_none")]
    pub hosts_file: Option<PathBuf>,
    /// Write `ist.env` (dotenv) and `ist.sh` (shell) in the state directory.
    /// Default true.
    pub env_files: bool,
    /// A `warp.config.js` to read `ist` overrides from. Default
    /// `warp.config.js` in the working directory, if it exists.
    pub warp_config: Option<PathBuf>,
    /// Persistent keepalive towards peers, seconds; keeps NAT mappings open.
    /// Default 25, as `wg` recommends behind NAT; 0 turns it off.
    pub persistent_keepalive: u16,
    /// Unix socket of `sidecar status`. Default `<state-dir>/status.sock`.
    pub status_socket: Option<PathBuf>,
    /// Prometheus metrics listener. Default `127.0.0.1:9477`; `None` off.
    pub metrics: Option<SocketAddr>,
    /// Private DNS.
    pub dns: DnsSettings,
    /// Per-service IST overrides (applied over `warp.config.js`).
    pub ist: Vec<IstOverride>,
    /// Ports this instance serves, announced at join so that userspace-mode
    /// peers listen on them. Default: the TCP ports found listening on
    /// loopback or any address (`/proc/net/tcp{,6}`) when joining.
    pub ports: Vec<u16>,
    /// Userspace mode: the `X` of the loopback addresses `127.X.c.d` the
    /// sidecar listens on for remote members. Default 77; give each
    /// userspace sidecar on one host its own value.
    pub loopback_octet: u8,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            token: None,
            service: None,
            process_type: ProcessType::default(),
            instance: None,
            runner: None,
            listen_port: 51820,
            endpoints: Vec::new(),
            state_dir: PathBuf::from("/var/lib/ist-mesh"),
            mode: Mode::default(),
            interface: "istm0".into(),
            hosts_file: Some(PathBuf::from("/etc/hosts")),
            env_files: true,
            warp_config: None,
            persistent_keepalive: 25,
            status_socket: None,
            metrics: Some(SocketAddr::from(([127, 0, 0, 1], 9477))),
            dns: DnsSettings::default(),
            ist: Vec::new(),
            ports: Vec::new(),
            loopback_octet: 77,
        }
    }
}

fn empty_path_is_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    let p = Option::<PathBuf>::deserialize(d)?;
    Ok(p.filter(|p| !p.as_os_str().is_empty()))
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The system error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or mistyped keys.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (with line and column).
        message: String,
    },
    /// The `ist` overrides are invalid.
    #[error("{0}")]
    Ist(#[from] meshlib::ist::config::ConfigError),
    /// The `warp.config.js` file cannot be read or parsed.
    #[error("{path}: {message}")]
    WarpConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// `loopback-octet = 0` would put members on `127.0.0.x`, where the
    /// instance's own services listen.
    #[error("loopback-octet must be 1-255 (127.0.x.y is the instance's own loopback)")]
    LoopbackOctet,
    /// The interface name is not usable on Linux.
    #[error("interface name {0:?} must be 1-15 characters of [A-Za-z0-9_.-]")]
    Interface(String),
}

impl Config {
    /// Parses a TOML config text.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and parses a TOML config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// Checks what serde cannot: the interface name and the overrides.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let name_ok = (1..=15).contains(&self.interface.len())
            && self
                .interface
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if !name_ok {
            return Err(ConfigError::Interface(self.interface.clone()));
        }
        Overrides::from_entries(self.ist.clone())?;
        if self.loopback_octet == 0 {
            return Err(ConfigError::LoopbackOctet);
        }
        Ok(())
    }

    /// The status socket path (explicit, or in the state directory).
    pub fn status_socket_path(&self) -> PathBuf {
        self.status_socket
            .clone()
            .unwrap_or_else(|| self.state_dir.join("status.sock"))
    }

    /// The IST overrides: `warp.config.js` (if any) with the config's own
    /// `ist` entries applied over it.
    pub fn overrides(&self) -> Result<Overrides, ConfigError> {
        let mut overrides = Overrides::default();
        let (path, required) = match &self.warp_config {
            Some(p) => (p.clone(), true),
            None => (PathBuf::from("warp.config.js"), false),
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                overrides = meshlib::ist::config::parse_warp_config_js(&text).map_err(|e| {
                    ConfigError::WarpConfig {
                        path: path.clone(),
                        message: e.to_string(),
                    }
                })?;
            }
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(ConfigError::WarpConfig {
                    path,
                    message: e.to_string(),
                })
            }
        }
        overrides.merge(Overrides::from_entries(self.ist.clone())?);
        Ok(overrides)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_full_file() {
        let c = Config::from_toml("", Path::new("x.toml")).unwrap();
        assert_eq!(c, Config::default());
        let text = r#"
            token = "t"
            service = "my db"
            process-type = "worker"
            instance = "db-1"
            listen-port = 0
            endpoints = ["192.0.2.10:51820"]
            state-dir = "/tmp/s"
            mode = "userspace"
            hosts-file = ""
            persistent-keepalive = 0
            [dns]
            listen = "127.0.0.1:5353"
            ttl = 5
            [[ist]]
            service = "api"
            hostnames = ["api.local"]
        "#;
        let c = Config::from_toml(text, Path::new("x.toml")).unwrap();
        assert_eq!(c.mode, Mode::Userspace);
        assert_eq!(c.hosts_file, None);
        assert_eq!(c.dns.ttl, 5);
        assert!(c.dns.enabled);
        assert_eq!(c.process_type.as_str(), "worker");
        assert_eq!(c.status_socket_path(), PathBuf::from("/tmp/s/status.sock"));
    }

    #[test]
    fn errors_name_the_problem() {
        let err = Config::from_toml("listen-port = \"x\"\n", Path::new("c.toml")).unwrap_err();
        assert!(
            err.to_string().starts_with("c.toml:") && err.to_string().contains("line 1"),
            "{err}"
        );
        let err = Config::from_toml("lisen-port = 1\n", Path::new("c.toml")).unwrap_err();
        assert!(err.to_string().contains("lisen-port"), "{err}");
        let err = Config::from_toml("instance = \"Bad_Name\"\n", Path::new("c.toml")).unwrap_err();
        assert!(err.to_string().contains("Bad_Name"), "{err}");
        let err = Config::from_toml("interface = \"much-too-long-name\"\n", Path::new("c.toml"))
            .unwrap_err();
        assert!(matches!(err, ConfigError::Interface(_)));
        let err = Config::from_toml(
            "[[ist]]\nservice = \"a\"\nvariables = [\"A=B\"]\n",
            Path::new("c.toml"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("ist[0]"), "{err}");
        assert!(Config::from_toml("mode = \"magic\"\n", Path::new("c.toml")).is_err());
        let err = Config::from_toml("loopback-octet = 0\n", Path::new("c.toml")).unwrap_err();
        assert!(matches!(err, ConfigError::LoopbackOctet));
        assert_eq!(
            Config::from_toml("loopback-octet = 78\n", Path::new("c.toml"))
                .unwrap()
                .loopback_octet,
            78
        );
    }

    #[test]
    fn overrides_merge_warp_config_under_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let js = dir.path().join("warp.config.js");
        std::fs::write(
            &js,
            "module.exports = { ist: [ { service: 'a', variables: ['FROM_JS'] }, { service: 'b', hostnames: ['b.js'] } ] }",
        )
        .unwrap();
        let mut c = Config::from_toml(
            "[[ist]]\nservice = \"a\"\nvariables = [\"FROM_TOML\"]\n",
            Path::new("c"),
        )
        .unwrap();
        c.warp_config = Some(js.clone());
        let o = c.overrides().unwrap();
        assert_eq!(
            o.get("a").unwrap().variables.as_deref().unwrap(),
            ["FROM_TOML"]
        );
        assert_eq!(o.get("b").unwrap().hostnames.as_deref().unwrap(), ["b.js"]);
        // An explicitly named file that is missing is an error; a broken one too.
        c.warp_config = Some(dir.path().join("missing.js"));
        assert!(matches!(c.overrides(), Err(ConfigError::WarpConfig { .. })));
        std::fs::write(
            &js,
            "module.exports = { ist: [ { service: 'a', hostname: [] } ] }",
        )
        .unwrap();
        c.warp_config = Some(js);
        let err = c.overrides().unwrap_err().to_string();
        assert!(err.contains("line 1") && err.contains("hostname"), "{err}");
    }
}
