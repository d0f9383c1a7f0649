//! Flags and environment variables of `sidecar up` / `sidecar run`, mapped
//! onto [`Config`]: flags win over the environment (`ISTM_*`), which wins
//! over the config file, which wins over the defaults.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use meshlib::ids::{InstanceName, ProcessType};

use clap::builder::TypedValueParser as _;

use crate::config::{Config, ConfigError, Mode};

/// Options shared by `sidecar up` and `sidecar run`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct UpArgs {
    /// TOML config file.
    #[arg(long, short = 'c', env = "ISTM_CONFIG")]
    pub config: Option<PathBuf>,
    /// Join token (first start only). Visible to every user in `ps`:
    /// prefer --token-file or ISTM_TOKEN.
    #[arg(long, env = "ISTM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the join token (first start only).
    #[arg(long, env = "ISTM_TOKEN_FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// Service (app) name of this instance.
    #[arg(long, env = "ISTM_SERVICE")]
    pub service: Option<String>,
    /// Process type (default web).
    #[arg(long, env = "ISTM_PROCESS_TYPE")]
    pub process_type: Option<ProcessType>,
    /// Wanted instance name (default: assigned by the keyserver). An
    /// offline instance's slot (address, index, names) is taken over.
    #[arg(long, env = "ISTM_INSTANCE")]
    pub instance: Option<InstanceName>,
    /// Take the slot of --instance even while it is online (its old
    /// session is closed): the platform knows that instance is dead.
    #[arg(long, env = "ISTM_REPLACE", value_parser = clap::builder::BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true")]
    pub replace: Option<bool>,
    /// Join as an ephemeral member (freed soon after it goes offline):
    /// `--ephemeral`, `--ephemeral=false`. Default: a first join is
    /// ephemeral (a new state directory means no state kept across
    /// restarts); say false when the state directory survives restarts.
    #[arg(long, env = "ISTM_EPHEMERAL", value_parser = clap::builder::BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true")]
    pub ephemeral: Option<bool>,
    /// What service names and variables give: auto, service (the
    /// service's own address) or members (its first instance's).
    #[arg(long, env = "ISTM_SERVICE_ADDRESSES")]
    pub service_addresses: Option<crate::config::ServiceAddresses>,
    /// Runner (host) label (default: the hostname).
    #[arg(long, env = "ISTM_RUNNER")]
    pub runner: Option<String>,
    /// WireGuard UDP port (default 51820; 0 picks one).
    #[arg(long, env = "ISTM_LISTEN_PORT")]
    pub listen_port: Option<u16>,
    /// Endpoint to advertise (ip:port); repeat or comma-separate.
    #[arg(long = "endpoint", env = "ISTM_ENDPOINTS", value_delimiter = ',')]
    pub endpoints: Vec<SocketAddr>,
    /// State directory (default /var/lib/ist-mesh).
    #[arg(long, env = "ISTM_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// How the sidecar meets the instance: `kernel` (a TUN interface; needs
    /// CAP_NET_ADMIN and /dev/net/tun) or `userspace` (a userspace TCP/IP
    /// stack on loopback addresses; no privileges) [default: kernel].
    #[arg(
        long,
        env = "ISTM_MODE",
        value_parser = clap::builder::PossibleValuesParser::new(["kernel", "userspace"])
            .try_map(|s| s.parse::<Mode>())
    )]
    pub mode: Option<Mode>,
    /// TUN interface name (default istm0).
    #[arg(long, env = "ISTM_INTERFACE")]
    pub interface: Option<String>,
    /// Hosts file to manage (default /etc/hosts; "" for none).
    #[arg(long, env = "ISTM_HOSTS_FILE")]
    // A string, not a path: clap's path parser refuses the empty value.
    pub hosts_file: Option<String>,
    /// DNS listen address (default 127.0.0.77:53).
    #[arg(long, env = "ISTM_DNS_LISTEN")]
    pub dns_listen: Option<SocketAddr>,
    /// Upstream resolver; repeat or comma-separate (default: resolv.conf's).
    #[arg(
        long = "dns-upstream",
        env = "ISTM_DNS_UPSTREAMS",
        value_delimiter = ','
    )]
    pub dns_upstreams: Vec<SocketAddr>,
    /// Serve no DNS.
    #[arg(long)]
    pub no_dns: bool,
    /// Point /etc/resolv.conf at the sidecar's DNS (needs port 53).
    #[arg(long)]
    pub set_resolver: bool,
    /// Metrics listen address, or "off" (default 127.0.0.1:9477).
    #[arg(long, env = "ISTM_METRICS")]
    pub metrics: Option<String>,
    /// warp.config.js to read `ist` overrides from.
    #[arg(long, env = "ISTM_WARP_CONFIG")]
    pub warp_config: Option<PathBuf>,
    /// Status socket path (default: status.sock in the state directory).
    #[arg(long, env = "ISTM_STATUS_SOCKET")]
    pub status_socket: Option<PathBuf>,
    /// Port this instance serves (announced to peers; in userspace mode the
    /// only ports reachable from the tunnel); repeat or comma-separate
    /// (default: `run`: those its command listens on; `up`: none).
    #[arg(long = "port", env = "ISTM_PORTS", value_delimiter = ',')]
    pub ports: Vec<u16>,
    /// `up` without --port: announce every TCP port listening on this
    /// host's loopback or any address (exposes all of them to the mesh).
    #[arg(long)]
    pub discover_ports: bool,
    /// Userspace mode: the address inbound connections go to (default
    /// 127.0.0.1).
    #[arg(long, env = "ISTM_SERVICE_ADDRESS")]
    pub service_address: Option<IpAddr>,
    /// Userspace mode: the X of the loopback addresses 127.X.c.d (default 77).
    #[arg(long, env = "ISTM_LOOPBACK_OCTET")]
    pub loopback_octet: Option<u8>,
    /// `run`: seconds to wait for the map to catch up with the keyserver
    /// before starting the command (default 5).
    #[arg(long, env = "ISTM_CATCH_UP_TIMEOUT")]
    pub catch_up_timeout: Option<u64>,
    /// Rotate the WireGuard key every this many seconds (default 0: never).
    #[arg(long, env = "ISTM_KEY_LIFETIME")]
    pub key_lifetime: Option<u64>,
    /// Threads that seal and open packets, so one busy peer uses several
    /// cores (default 0: none; at most 64).
    #[arg(long, env = "ISTM_CRYPTO_WORKERS")]
    pub crypto_workers: Option<usize>,
    /// Attach this instance to an existing service group (published ports
    /// served by gateways) at its first join; repeat or comma-separate.
    #[arg(
        long = "service-group",
        env = "ISTM_SERVICE_GROUPS",
        value_delimiter = ','
    )]
    pub service_groups: Vec<String>,
    /// Publish a port in a service group owned by this instance (deleted
    /// when it leaves): `[IP:]EXT[:INT][/handlers]`, e.g. `443:8080/http+tls`,
    /// `80:8080/http+redirect`, `10000:5432/tls`; repeat.
    #[arg(
        long = "publish",
        short = 'p',
        env = "ISTM_PUBLISH",
        value_delimiter = ','
    )]
    pub publish: Vec<String>,
}

/// Why the flags do not make a config.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The config file is bad.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `--metrics` is neither an address nor "off".
    #[error("--metrics: {0:?} is neither ip:port nor \"off\"")]
    Metrics(String),
}

impl UpArgs {
    /// The effective configuration.
    pub fn to_config(&self) -> Result<Config, CliError> {
        let mut c = match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        macro_rules! set {
            ($($field:ident => $target:expr),*) => {$(
                if let Some(v) = &self.$field { $target = v.clone().into(); }
            )*};
        }
        if self.token.is_some() || self.token_file.is_some() {
            // A flag or variable replaces whatever the file said.
            c.token = None;
            c.token_file = None;
        }
        set!(token => c.token, token_file => c.token_file, service => c.service, instance => c.instance, runner => c.runner,
             state_dir => c.state_dir, warp_config => c.warp_config, status_socket => c.status_socket);
        set!(process_type => c.process_type, listen_port => c.listen_port, mode => c.mode,
             interface => c.interface, dns_listen => c.dns.listen,
             service_address => c.service_address);
        if let Some(h) = &self.hosts_file {
            c.hosts_file = (!h.is_empty()).then(|| PathBuf::from(h));
        }
        if !self.endpoints.is_empty() {
            c.endpoints = self.endpoints.clone();
        }
        if let Some(o) = self.loopback_octet {
            c.loopback_octet = o;
        }
        if let Some(t) = self.catch_up_timeout {
            c.catch_up_timeout = t;
        }
        if let Some(t) = self.key_lifetime {
            c.key_lifetime = t;
        }
        if let Some(n) = self.crypto_workers {
            c.crypto_workers = n;
        }
        if !self.ports.is_empty() {
            c.ports = self.ports.clone();
        }
        if !self.dns_upstreams.is_empty() {
            c.dns.upstreams = self.dns_upstreams.clone();
        }
        if !self.service_groups.is_empty() {
            c.service_groups = self.service_groups.clone();
        }
        if !self.publish.is_empty() {
            c.publish = self.publish.clone();
        }
        if let Some(r) = self.replace {
            c.replace = r;
        }
        if self.ephemeral.is_some() {
            c.ephemeral = self.ephemeral;
        }
        if let Some(s) = self.service_addresses {
            c.service_addresses = s;
        }
        c.discover_ports |= self.discover_ports;
        c.dns.enabled &= !self.no_dns;
        c.dns.set_resolver |= self.set_resolver;
        if let Some(m) = &self.metrics {
            c.metrics = match m.as_str() {
                "off" | "" => None,
                a => Some(a.parse().map_err(|_| CliError::Metrics(a.to_owned()))?),
            };
        }
        c.validate()?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_over_file_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "service = \"from-file\"\nlisten-port = 1000\ninterface = \"filex\"\n",
        )
        .unwrap();
        let args = UpArgs {
            config: Some(file),
            service: Some("from-flag".into()),
            hosts_file: Some(String::new()),
            metrics: Some("off".into()),
            no_dns: true,
            ..UpArgs::default()
        };
        let c = args.to_config().unwrap();
        assert_eq!(c.service.as_deref(), Some("from-flag"));
        assert_eq!(c.listen_port, 1000);
        assert_eq!(c.interface, "filex");
        assert_eq!(c.hosts_file, None);
        assert_eq!(c.metrics, None);
        assert!(!c.dns.enabled);
        let bad = UpArgs {
            metrics: Some("nope".into()),
            ..UpArgs::default()
        };
        assert!(matches!(bad.to_config(), Err(CliError::Metrics(_))));
        // Through clap too: `--hosts-file ""` means none.
        use clap::Parser;
        #[derive(clap::Parser)]
        struct T {
            #[command(flatten)]
            up: UpArgs,
        }
        let t = T::try_parse_from(["t", "--hosts-file", ""]).unwrap();
        assert_eq!(t.up.to_config().unwrap().hosts_file, None);
    }

    /// `--ephemeral`, `--ephemeral=false` and unset (the state decides);
    /// `--replace` needs an instance name.
    #[test]
    fn ephemeral_and_replace_flags() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct T {
            #[command(flatten)]
            up: UpArgs,
        }
        let cfg = |args: &[&str]| {
            let mut all = vec!["t", "--metrics", "off"];
            all.extend_from_slice(args);
            T::try_parse_from(all).unwrap().up.to_config()
        };
        assert_eq!(cfg(&[]).unwrap().ephemeral, None);
        assert_eq!(cfg(&["--ephemeral"]).unwrap().ephemeral, Some(true));
        assert_eq!(cfg(&["--ephemeral=false"]).unwrap().ephemeral, Some(false));
        assert_eq!(cfg(&["--ephemeral=no"]).unwrap().ephemeral, Some(false));
        assert!(!cfg(&[]).unwrap().replace);
        let c = cfg(&["--instance", "api-web-1", "--replace"]).unwrap();
        assert!(c.replace);
        let err = cfg(&["--replace"]).unwrap_err().to_string();
        assert!(err.starts_with("replace: "), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "ephemeral = false\n").unwrap();
        let from_file = cfg(&["-c", file.to_str().unwrap()]).unwrap();
        assert_eq!(from_file.ephemeral, Some(false));
        let over = cfg(&["-c", file.to_str().unwrap(), "--ephemeral"]).unwrap();
        assert_eq!(over.ephemeral, Some(true));
    }
}
