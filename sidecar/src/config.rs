//! The sidecar's configuration: plain data, read from a TOML file
//! (`kebab-case` keys), with the binary mapping flags and environment
//! variables on top. Every field says its default and why.
//!
//! ```toml
//! token-file = "/run/secrets/istm-token"   # or token = "istm1....", --token-file, ISTM_TOKEN
//! service = "api"
//! process-type = "web"
//! instance = "api-1"
//! replace = false                # take the instance's slot even if online
//! ephemeral = false              # keep the slot when offline (state dir survives restarts)
//! runner = "runner-a"
//! listen-port = 51820
//! endpoints = ["192.0.2.10:51820"]
//! state-dir = "/var/lib/ist-mesh"
//! mode = "kernel"                # or "userspace"
//! interface = "istm0"
//! hosts-file = "/etc/hosts"
//! warp-config = "warp.config.js"
//!
//! ports = [8080]                 # the ports this instance serves
//! discover-ports = false         # `up`: announce every listening port instead
//! service-address = "127.0.0.1"  # userspace mode: where inbound goes
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

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use meshlib::fsutil::{check_regular, read_text_limited, ReadError, MAX_CONFIG_FILE};
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

/// What a service's names and variables (`<service>.warp`, override
/// hostnames, `WARP_IST_*`) give.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServiceAddresses {
    /// The default: the service's own address, in both modes (see
    /// [`ServiceAddresses::resolve`]).
    #[default]
    Auto,
    /// The service's own address (its VIP): every new flow goes to one
    /// online instance; stays valid through restarts and scale-to-zero.
    Service,
    /// The way back: the address of the service's first instance, as
    /// before service addresses (a platform that balances itself).
    Members,
}

impl ServiceAddresses {
    /// Whether service addresses are given, in `mode`. `Auto` gives them in
    /// both modes: each mode's data plane balances them (kernel mode in the
    /// engine's flow table, userspace mode on the loopback listeners).
    pub fn resolve(self, mode: Mode) -> bool {
        match self {
            Self::Service => true,
            Self::Members => false,
            Self::Auto => match mode {
                Mode::Kernel | Mode::Userspace => true,
            },
        }
    }
}

impl std::str::FromStr for ServiceAddresses {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "service" => Ok(Self::Service),
            "members" => Ok(Self::Members),
            other => Err(format!(
                "unknown service-addresses {other:?} (auto, service or members)"
            )),
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
    /// Prefer `token-file` or `ISTM_TOKEN`: a `--token` flag is visible to
    /// every user in `ps`.
    pub token: Option<String>,
    /// A file holding the join token (first line; surrounding whitespace
    /// ignored). Default none. Keeps the token out of `ps`, shell history
    /// and the config file.
    pub token_file: Option<PathBuf>,
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
    /// Ports this instance serves: announced to the peers (userspace-mode
    /// peers listen on them) and, in userspace mode, the only ports inbound
    /// traffic from the tunnel reaches. Default: none declared; `sidecar
    /// run` then announces the ports its command's processes listen on,
    /// and `sidecar up` none unless `discover-ports`.
    pub ports: Vec<u16>,
    /// `sidecar up` without `ports`: announce (and, in userspace mode,
    /// open to the tunnel) every TCP port found listening on this host's
    /// loopback or any address (`/proc/net/tcp{,6}`), re-checked while
    /// running. Default false: that would expose every local service of
    /// the host, not only this instance's.
    pub discover_ports: bool,
    /// Userspace mode: the address inbound connections and datagrams from
    /// the tunnel go to (`<service-address>:<port>`, served ports only).
    /// Default `127.0.0.1`, the instance on this host's loopback.
    pub service_address: IpAddr,
    /// Userspace mode: the `X` of the loopback addresses `127.X.c.d` the
    /// sidecar listens on for remote members. Default 77; give each
    /// userspace sidecar on one host its own value.
    pub loopback_octet: u8,
    /// `sidecar run`: seconds to wait, before starting the command, for the
    /// map to catch up with the keyserver (so its variables name every
    /// service that joined meanwhile). Default 5; when the keyserver cannot
    /// be reached in time, the command starts from the cached map (logged).
    pub catch_up_timeout: u64,
    /// Rotate the member's WireGuard key after this many seconds (the new
    /// key is made here; the address and names stay). Default 0: never
    /// (`sidecar rotate-key` rotates on demand).
    pub key_lifetime: u64,
    /// Threads that seal and open packets for the data plane (either mode),
    /// so one busy peer's traffic uses several cores, in order. Default 0:
    /// none (each packet loop does its own crypto, which measured faster on
    /// two cores); at most 64.
    pub crypto_workers: usize,
    /// Service groups (seed 002) to attach this instance to at its first
    /// join (`--service-group`); each must exist. Default none.
    pub service_groups: Vec<String>,
    /// Ports to publish in a service group owned by this instance, made at
    /// its first join and deleted when it leaves or expires
    /// (`--publish 443:8080/http+tls`, `[IP:]EXT[:INT][/handlers]`). Without
    /// `INT`: `deployment.port` of `warp.config.js`, else the first of
    /// `ports`. Default none: the instance stays private.
    pub publish: Vec<String>,
    /// Whether the member is ephemeral: once offline for the keyserver's
    /// `ephemeral-after` (default its `offline-after`, 30 s) it is removed
    /// and its slot freed, and while offline a new instance of its type
    /// takes its slot over (same index, address and names). Default unset:
    /// a first join is ephemeral, because an instance whose state
    /// directory holds no membership at start is, on a container platform,
    /// one that keeps no state across restarts: it will never resume this
    /// membership, so holding its slot for `expire-after` (24 h) would
    /// only leave dead members numbered before the live ones and fill the
    /// network. Set `false` when the state directory survives restarts
    /// (a volume), so a long stop keeps the slot for the resume.
    pub ephemeral: Option<bool>,
    /// At the first join, take the slot of `instance` even while its
    /// holder is online (`--replace`): the platform knows that instance is
    /// dead (its session is closed with a clear reason and its key stops
    /// being a peer). Needs `instance`. Default false: an online slot is
    /// refused.
    pub replace: bool,
    /// What `<service>.warp`, override hostnames and `WARP_IST_*` give:
    /// `service` (the service's own address, balanced per flow over its
    /// online instances), `members` (the way back: its first instance's
    /// address) or `auto` (the default: `service` in both modes).
    pub service_addresses: ServiceAddresses,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            token: None,
            token_file: None,
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
            discover_ports: false,
            service_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            loopback_octet: 77,
            catch_up_timeout: 5,
            key_lifetime: 0,
            crypto_workers: 0,
            service_groups: Vec::new(),
            publish: Vec::new(),
            ephemeral: None,
            replace: false,
            service_addresses: ServiceAddresses::Auto,
        }
    }
}

fn empty_path_is_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    let p = Option::<PathBuf>::deserialize(d)?;
    Ok(p.filter(|p| !p.as_os_str().is_empty()))
}

/// Why the configuration cannot be used. Every message names the key (or
/// the file) at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file cannot be read (missing, not a regular file, too
    /// large).
    #[error("config file {0}")]
    Read(ReadError),
    /// The file is not valid TOML or has unknown or mistyped keys.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (with line and column).
        message: String,
    },
    /// The `ist` overrides are invalid.
    #[error("ist: {0}")]
    Ist(meshlib::ist::config::ConfigError),
    /// The `warp.config.js` file cannot be read or parsed.
    #[error("warp-config: {path}: {message}")]
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
    #[error("interface: {0:?} must be 1-15 characters of [A-Za-z0-9_.-]")]
    Interface(String),
    /// Another key holds a value that cannot work.
    #[error("{key}: {message}")]
    Invalid {
        /// The config key (`hosts-file`, `ports`, `dns.listen`, ...).
        key: &'static str,
        /// What is wrong, naming the value.
        message: String,
    },
}

impl ConfigError {
    /// An [`ConfigError::Invalid`] of `key`.
    pub fn invalid(key: &'static str, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key,
            message: message.into(),
        }
    }
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

    /// Reads and parses a TOML config file (a regular file of at most
    /// [`MAX_CONFIG_FILE`] bytes).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = read_text_limited(path, MAX_CONFIG_FILE).map_err(ConfigError::Read)?;
        Self::from_toml(&text, path)
    }

    /// Checks what serde cannot, without touching the system: names,
    /// overrides, ports, addresses.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let name_ok = (1..=15).contains(&self.interface.len())
            && self
                .interface
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if !name_ok {
            return Err(ConfigError::Interface(self.interface.clone()));
        }
        Overrides::from_entries(self.ist.clone()).map_err(ConfigError::Ist)?;
        crate::publish::check(self)?;
        if self.loopback_octet == 0 {
            return Err(ConfigError::LoopbackOctet);
        }
        if self.replace && self.instance.is_none() {
            return Err(ConfigError::invalid(
                "replace",
                "names no slot: set instance (--instance) to the instance to replace",
            ));
        }
        if self.crypto_workers > meshlib::wg::MAX_CRYPTO_WORKERS {
            return Err(ConfigError::invalid(
                "crypto-workers",
                format!("at most {}", meshlib::wg::MAX_CRYPTO_WORKERS),
            ));
        }
        if self.ports.contains(&0) {
            return Err(ConfigError::invalid("ports", "0 is not a port (1-65535)"));
        }
        let max = meshlib::userspace::ports::MAX_ANNOUNCED;
        if self.ports.len() > max {
            return Err(ConfigError::invalid(
                "ports",
                format!(
                    "{} ports, more than the {max} a member may announce",
                    self.ports.len()
                ),
            ));
        }
        let a = self.service_address;
        if a.is_unspecified() || a.is_multicast() || a == IpAddr::V4(Ipv4Addr::BROADCAST) {
            return Err(ConfigError::invalid(
                "service-address",
                format!("{a} is not a unicast address to connect to"),
            ));
        }
        if self.token.is_some() && self.token_file.is_some() {
            return Err(ConfigError::invalid(
                "token-file",
                "give the token or a token file, not both",
            ));
        }
        Ok(())
    }

    /// The join token: `token`, or the contents of `token-file` (a regular
    /// file of at most 64 KiB, trimmed). `None` when neither is set.
    pub fn join_token(&self) -> Result<Option<String>, ConfigError> {
        if let Some(t) = &self.token {
            return Ok(Some(t.trim().to_owned()));
        }
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        let text = read_text_limited(path, meshlib::fsutil::MAX_SMALL_FILE)
            .map_err(|e| ConfigError::invalid("token-file", e.to_string()))?;
        let token = text.trim();
        if token.is_empty() {
            return Err(ConfigError::invalid(
                "token-file",
                format!("{} is empty", path.display()),
            ));
        }
        Ok(Some(token.to_owned()))
    }

    /// Checks the paths the sidecar will read or write: the hosts file
    /// (absent, or a regular file of at most [`MAX_CONFIG_FILE`] bytes, in
    /// an existing directory). Run before joining, so a typo costs no token
    /// use.
    pub fn check_paths(&self) -> Result<(), ConfigError> {
        if let Some(hosts) = &self.hosts_file {
            match check_regular(hosts, MAX_CONFIG_FILE) {
                Ok(_) => {}
                Err(e) if e.is_not_found() => {
                    let dir = hosts.parent().filter(|d| !d.as_os_str().is_empty());
                    if dir.is_some_and(|d| !d.is_dir()) {
                        return Err(ConfigError::invalid(
                            "hosts-file",
                            format!(
                                "{}: the directory {} does not exist",
                                hosts.display(),
                                dir.map(Path::display).expect("checked")
                            ),
                        ));
                    }
                }
                Err(e) => return Err(ConfigError::invalid("hosts-file", e.to_string())),
            }
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
        let max = meshlib::ist::config::MAX_WARP_CONFIG_BYTES as u64;
        match read_text_limited(&path, max) {
            Ok(text) => {
                overrides = meshlib::ist::config::parse_warp_config_js(&text).map_err(|e| {
                    let message = e.to_string();
                    // The path says which file already.
                    let message = message.strip_prefix("warp.config.js: ").unwrap_or(&message);
                    ConfigError::WarpConfig {
                        path: path.clone(),
                        message: message.to_owned(),
                    }
                })?;
            }
            Err(e) if !required && e.is_not_found() => {}
            Err(e) => {
                return Err(ConfigError::WarpConfig {
                    path,
                    message: e.reason(),
                });
            }
        }
        overrides.merge(Overrides::from_entries(self.ist.clone()).map_err(ConfigError::Ist)?);
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

    fn mkfifo(path: &Path) {
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo(3) with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    }

    /// `f()` in a thread, which must finish within 5 s (no hang).
    fn within_5s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(5))
            .expect("hung")
    }

    #[test]
    fn new_keys_and_their_checks_name_the_key() {
        let c = Config::from_toml(
            "token-file = \"/run/t\"\nservice-address = \"127.0.0.2\"\ndiscover-ports = true\nports = [80]\n",
            Path::new("c"),
        )
        .unwrap();
        assert_eq!(c.token_file.as_deref(), Some(Path::new("/run/t")));
        assert_eq!(c.service_address, IpAddr::from([127, 0, 0, 2]));
        assert!(c.discover_ports);
        let d = Config::default();
        assert_eq!(d.service_address, IpAddr::from([127, 0, 0, 1]));
        assert!(!d.discover_ports && d.ports.is_empty());
        assert_eq!(d.crypto_workers, 0);
        let w = Config::from_toml("crypto-workers = 4", Path::new("c")).unwrap();
        assert_eq!(w.crypto_workers, 4);
        for (text, key) in [
            ("ports = [0]", "ports:"),
            ("service-address = \"0.0.0.0\"", "service-address:"),
            ("service-address = \"224.0.0.1\"", "service-address:"),
            ("token = \"x\"\ntoken-file = \"/t\"", "token-file:"),
            ("interface = \"much-too-long-name\"", "interface:"),
            ("crypto-workers = 65", "crypto-workers:"),
            ("crypto-workers = -1", ""),
        ] {
            let err = Config::from_toml(text, Path::new("c"))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(key), "{text}: {err}");
        }
        let many = format!(
            "ports = [{}]",
            (1..=65)
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
        assert!(Config::from_toml(&many, Path::new("c")).is_err());
    }

    #[test]
    fn token_file_is_read_trimmed_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "  istm1.abc\n").unwrap();
        let mut c = Config {
            token_file: Some(file.clone()),
            ..Config::default()
        };
        assert_eq!(c.join_token().unwrap().as_deref(), Some("istm1.abc"));
        std::fs::write(&file, "\n").unwrap();
        assert!(c
            .join_token()
            .unwrap_err()
            .to_string()
            .starts_with("token-file:"));
        c.token_file = Some(dir.path().join("missing"));
        let err = c.join_token().unwrap_err().to_string();
        assert!(
            err.starts_with("token-file:") && err.contains("missing"),
            "{err}"
        );
        let fifo = dir.path().join("fifo");
        mkfifo(&fifo);
        c.token_file = Some(fifo);
        let err = within_5s(move || c.join_token().unwrap_err().to_string());
        assert!(err.contains("FIFO"), "{err}");
        assert_eq!(Config::default().join_token().unwrap(), None);
    }

    #[test]
    fn bad_paths_fail_fast_with_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("hosts");
        mkfifo(&fifo);
        let mut c = Config {
            hosts_file: Some(fifo.clone()),
            ..Config::default()
        };
        let err = c.check_paths().unwrap_err().to_string();
        assert!(
            err.starts_with("hosts-file:") && err.contains("FIFO"),
            "{err}"
        );
        c.hosts_file = Some(dir.path().join("no/such/dir/hosts"));
        let err = c.check_paths().unwrap_err().to_string();
        assert!(
            err.starts_with("hosts-file:") && err.contains("does not exist"),
            "{err}"
        );
        c.hosts_file = Some(dir.path().join("hosts-to-create"));
        c.check_paths().unwrap();
        c.hosts_file = None;
        c.check_paths().unwrap();
        // warp.config.js: a FIFO, a directory, a deep nesting.
        c.warp_config = Some(fifo);
        let err = within_5s(move || c.overrides().unwrap_err().to_string());
        assert!(
            err.starts_with("warp-config:") && err.contains("FIFO"),
            "{err}"
        );
        let js = dir.path().join("warp.config.js");
        std::fs::write(
            &js,
            format!(
                "module.exports = {{ a: {}1{} }}",
                "{b:".repeat(100_000),
                "}".repeat(100_000)
            ),
        )
        .unwrap();
        let c = Config {
            warp_config: Some(js),
            ..Config::default()
        };
        let err = c.overrides().unwrap_err().to_string();
        assert!(
            err.starts_with("warp-config:") && err.contains("deeper than 64"),
            "{err}"
        );
        // The config file itself: a FIFO is refused, not waited on.
        let fifo = dir.path().join("config.toml");
        mkfifo(&fifo);
        let err = within_5s(move || Config::load(&fifo).unwrap_err().to_string());
        assert!(err.contains("FIFO"), "{err}");
    }
}
