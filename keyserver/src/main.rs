//! `keyserver`: the IST Mesh control plane.
//!
//! `keyserver serve` runs the servers. The admin subcommands (`network`,
//! `token`, `member`, `service`, `service-address`, `api-token`, `audit`)
//! talk to a running keyserver's HTTP API: by default the
//! address in `<data-dir>/api.url` (written by `serve`) and the bearer token
//! in `<data-dir>/admin-token`; `--api` and `--token-file` override them.
//! Names in URL paths are percent-encoded, so any network name works.
//! They print the API's JSON, except `network names`, `network traffic`,
//! `member list`, `member get`, `service-address list` and `audit`, which
//! print a table (text from the network escaped) unless `--json`, and
//! `token create --bare` / `api-token create --bare`, which print only the
//! secret.
//!
//! Logs go to stderr: coloured only on a terminal and without `NO_COLOR`,
//! or one JSON object per line with `--log-format json`.
//! Hidden, for packaging: `completions <shell>` and `man [--dir DIR]`.

#[path = "../../packaging/clap_gen.rs"]
mod clap_gen;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use hyper::Method;
use keyserver::admin::path_segment;
use keyserver::admin::AdminClient;
use keyserver::config::{Config, LogFormat, RelayListen};
use keyserver::listing::{render_member, render_members, render_names, NameListing};
use keyserver::Keyserver;
use serde_json::json;

#[derive(Parser)]
#[command(
    version,
    about = "IST Mesh keyserver: networks, join tokens, addresses, key distribution"
)]
struct Cli {
    /// State directory (store, certificate, admin token).
    #[arg(long, env = "KEYSERVER_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the QUIC endpoint and the admin API.
    Serve(ServeArgs),
    /// Manage networks.
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Manage join tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Manage members.
    #[command(subcommand)]
    Member(MemberCmd),
    /// Manage service groups: a group of instances published to the
    /// outside on public ports, served by gateways (`sidecar gateway`).
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Manage service addresses (each service's own address): scale to
    /// zero on internal traffic (a wake hook, `idle-after`, an idle hook).
    #[command(subcommand)]
    ServiceAddress(AddressCmd),
    /// Manage API tokens: scoped bearer tokens (viewer, operator, admin;
    /// one tenant's networks or all) for the admin API and these commands.
    #[command(subcommand)]
    ApiToken(ApiTokenCmd),
    /// Show the audit trail: every change made through the admin API or
    /// these commands (who, from where, what, when, the result).
    Audit {
        /// Only entries about this network (id or name).
        #[arg(long)]
        network: Option<String>,
        /// From this time: Unix seconds, RFC 3339, or an age (`1h` ago).
        #[arg(long)]
        since: Option<String>,
        /// Before this time: Unix seconds, RFC 3339, or an age (`10m` ago).
        #[arg(long)]
        until: Option<String>,
        /// At most this many entries (the latest).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Write every record into a file (a consistent snapshot, also while
    /// the keyserver serves: through its API, else from the store).
    Backup {
        /// The backup file (written mode 0600: it holds token and
        /// credential hashes).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Replace the embedded store of a stopped keyserver by a backup
    /// (refused while a keyserver holds the store).
    Restore {
        /// The backup file.
        #[arg(long)]
        from: PathBuf,
    },
    /// Run only STUN and the relay (for scale, apart from the keyserver).
    Relay(RelayArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    #[command(hide = true)]
    Completions {
        /// The shell.
        shell: clap_gen::Shell,
    },
    /// Print the man page, or write every page into a directory.
    #[command(hide = true)]
    Man {
        /// Write `keyserver.1` and one page per subcommand here.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// TOML configuration file (flags and env override it) [default: none:
    /// the defaults below].
    #[arg(long, env = "KEYSERVER_CONFIG")]
    config: Option<PathBuf>,
    /// QUIC listen address [default: 0.0.0.0:7443].
    #[arg(long, env = "KEYSERVER_QUIC_LISTEN")]
    quic_listen: Option<SocketAddr>,
    /// Admin API listen address [default: 127.0.0.1:7480].
    #[arg(long, env = "KEYSERVER_API_LISTEN")]
    api_listen: Option<SocketAddr>,
    /// QUIC address to put into join tokens (repeatable) [default: the
    /// QUIC listen address, loopback if it is unspecified].
    #[arg(long, env = "KEYSERVER_ADVERTISE", value_delimiter = ',')]
    advertise: Vec<SocketAddr>,
    /// Log filter [default: info].
    #[arg(long, env = "KEYSERVER_LOG")]
    log_level: Option<String>,
    /// Log format [default: text] [possible values: text, json].
    #[arg(long, env = "KEYSERVER_LOG_FORMAT", value_parser = parse_log_format)]
    log_format: Option<LogFormat>,
    /// A member silent this long goes offline [default: 30s].
    #[arg(long, env = "KEYSERVER_OFFLINE_AFTER", value_parser = humantime::parse_duration)]
    offline_after: Option<std::time::Duration>,
    /// An offline member expires this long after, unless its network says
    /// otherwise [default: 24h].
    #[arg(long, env = "KEYSERVER_EXPIRE_AFTER", value_parser = humantime::parse_duration)]
    expire_after: Option<std::time::Duration>,
    /// An offline *ephemeral* member is removed (its slot freed) this long
    /// after it went offline [default: --offline-after].
    #[arg(long, env = "KEYSERVER_EPHEMERAL_AFTER", value_parser = humantime::parse_duration)]
    ephemeral_after: Option<std::time::Duration>,
    /// Where the records live: `etcd://host:2379[,host:2379...][/prefix]`
    /// for an etcd cluster shared by keyserver replicas [default: the
    /// embedded store in the data directory].
    #[arg(long, env = "KEYSERVER_STORE")]
    store: Option<String>,
    /// Entries the audit trail keeps; the oldest are dropped past it
    /// [default: 10000].
    #[arg(long, env = "KEYSERVER_AUDIT_ENTRIES")]
    audit_entries: Option<usize>,
    /// UDP address of STUN and the relay, or `off` [default: port 3478 on
    /// the QUIC listen host].
    #[arg(long, env = "KEYSERVER_RELAY_LISTEN", value_parser = parse_relay_listen)]
    relay_listen: Option<Listen>,
    /// The relay address members are told [default: the first advertised
    /// QUIC address's host, with the relay's port].
    #[arg(long, env = "KEYSERVER_RELAY_ADVERTISE")]
    relay_advertise: Option<SocketAddr>,
    /// Another STUN server for members (repeatable) [default: none but
    /// this keyserver's].
    #[arg(
        long = "stun-server",
        env = "KEYSERVER_STUN_SERVERS",
        value_delimiter = ','
    )]
    stun_servers: Vec<SocketAddr>,
    /// Bytes a second one member may send through the relay [default:
    /// 12500000, 100 Mbit/s].
    #[arg(long, env = "KEYSERVER_RELAY_RATE")]
    relay_rate: Option<u64>,
    /// TCP address of control and relay over TLS (members whose UDP is
    /// blocked), or `off` [default: the QUIC address, on TCP].
    #[arg(long, env = "KEYSERVER_TCP_LISTEN", value_parser = parse_relay_listen)]
    tcp_listen: Option<Listen>,
    /// Let service addresses' command hooks (wake, idle) run on this host
    /// [default: off: only URL hooks run].
    #[arg(long, env = "KEYSERVER_ALLOW_WAKE_COMMANDS")]
    allow_wake_commands: bool,
}

/// `keyserver relay`: STUN and the relay as their own process.
#[derive(Args)]
struct RelayArgs {
    /// UDP address for STUN and the relay.
    #[arg(long, env = "KEYSERVER_RELAY_LISTEN", default_value = "0.0.0.0:3478")]
    listen: SocketAddr,
    /// The keyserver's relay secret (a copy of its `<data-dir>/relay-secret`).
    #[arg(long, env = "KEYSERVER_RELAY_SECRET_FILE")]
    secret_file: PathBuf,
    /// Prometheus `/metrics` on this TCP address (off if not given).
    #[arg(long, env = "KEYSERVER_RELAY_METRICS")]
    metrics: Option<SocketAddr>,
    /// Bytes a second one member may send through the relay.
    #[arg(long, default_value_t = 12_500_000)]
    rate: u64,
    /// Burst allowance of that limit, bytes.
    #[arg(long, default_value_t = 2 << 20)]
    burst: u64,
    /// Log filter.
    #[arg(long, env = "KEYSERVER_LOG", default_value = "info")]
    log_level: String,
}

/// A listen address, or `off` (`None`).
#[derive(Debug, Clone, Copy)]
struct Listen(Option<SocketAddr>);

/// `--relay-listen`, `--tcp-listen`: an address, or `off`.
fn parse_relay_listen(text: &str) -> Result<Listen, String> {
    match text {
        "off" => Ok(Listen(None)),
        _ => text
            .parse()
            .map(|a| Listen(Some(a)))
            .map_err(|e| format!("{text:?}: {e} (or `off`)")),
    }
}

fn parse_log_format(text: &str) -> Result<LogFormat, String> {
    match text {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err(format!("{text:?}: expected text or json")),
    }
}

#[derive(Args)]
struct ApiArgs {
    /// Admin API base URL (default: `<data-dir>/api.url`).
    #[arg(long, env = "KEYSERVER_API")]
    api: Option<String>,
    /// File holding the bearer token: the admin token or an API token
    /// (default: `<data-dir>/admin-token`).
    #[arg(long, env = "KEYSERVER_TOKEN_FILE")]
    token_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum NetworkCmd {
    /// Create a network.
    Create {
        /// Human name.
        name: String,
        /// Address range.
        #[arg(long, default_value = "10.240.0.0/22")]
        range: String,
        /// How long an offline member is kept before it expires (`24h`);
        /// default: the keyserver's `expire-after-secs`.
        #[arg(long)]
        expire_after: Option<String>,
        /// The tenant the network belongs to (API tokens of that tenant
        /// reach it); default: none (only global tokens), or the token's
        /// own tenant.
        #[arg(long)]
        tenant: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Change a network's settings.
    Set {
        /// Network id or name.
        name: String,
        /// How long an offline member is kept before it expires (`90s`,
        /// `24h`), or `default` for the keyserver's.
        #[arg(long, required_unless_present = "tenant")]
        expire_after: Option<String>,
        /// Move the network to this tenant, or `none` (global admins only).
        #[arg(long)]
        tenant: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List networks.
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List every private name of a network with its current answer:
    /// `<instance>.internal`, the
    /// `[<n>.][<type>.]<app-id>.<pn-id>.private-network.internal` names
    /// and their aliases, and each service's `.warp` name. Offline members
    /// are not named.
    Names {
        /// Network id or name.
        name: String,
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show a network's service graph: every service with its address,
    /// online instances and idle state, and the traffic per pair of
    /// services members report (to this keyserver replica).
    Traffic {
        /// Network id or name.
        name: String,
        /// Print the API's JSON instead of tables.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Delete a network and its tokens (refused while it has members,
    /// unless --force, which revokes them).
    Delete {
        /// Network id or name.
        name: String,
        /// Also remove its members.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a join token (printed once).
    Create {
        /// Network id or name.
        #[arg(long)]
        network: String,
        /// Number of joins.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Lifetime (`30m`, `1h`, `7d`).
        #[arg(long, default_value = "1h")]
        expires: String,
        /// Bind the token to one service (app).
        #[arg(long)]
        app: Option<String>,
        /// Bind the token to one process type.
        #[arg(long = "type")]
        process_type: Option<String>,
        /// Attach members joining with it to this service group.
        #[arg(long)]
        service_group: Option<String>,
        /// Every member joining with it is ephemeral (freed soon after it
        /// goes offline), whatever the sidecar says.
        #[arg(long)]
        ephemeral: bool,
        /// Print only the token (for `TOKEN=$(keyserver token create ...)`)
        /// instead of the API's JSON.
        #[arg(long)]
        bare: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List tokens (not their secrets).
    List {
        /// Network id or name.
        #[arg(long)]
        network: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Delete a token by its id (`tk-...`).
    Delete {
        /// Network id or name.
        #[arg(long)]
        network: String,
        /// The token's id.
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Subcommand)]
enum MemberCmd {
    /// List members as a table (instance, address, state, last seen,
    /// endpoint, service, runner), like `wg show` for peers.
    List {
        /// Network id or name.
        #[arg(long)]
        network: String,
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show one member (by public key or instance name): its slot, state,
    /// address, endpoints, runner, ports, times and the names that answer it.
    Get {
        /// Network id or name.
        #[arg(long)]
        network: String,
        /// Public key or instance name.
        member: String,
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Remove (revoke) a member by public key or instance name.
    Remove {
        /// Network id or name.
        #[arg(long)]
        network: String,
        /// Public key or instance name.
        member: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Subcommand)]
enum ApiTokenCmd {
    /// Create an API token (its secret is printed once).
    Create {
        /// Who or what uses it (shown in listings and the audit trail).
        #[arg(long)]
        name: String,
        /// What it may do. `gateway`: a gateway's credential (`istg1.`, for
        /// `sidecar gateway --gateway-token-file`): no admin API; it serves
        /// every network of its scope that has service groups.
        #[arg(long, value_parser = ["viewer", "operator", "admin", "gateway"])]
        role: String,
        /// The tenant whose networks it reaches; default: every network
        /// (or the creating token's tenant).
        #[arg(long)]
        tenant: Option<String>,
        /// Lifetime (`30d`); default: until revoked.
        #[arg(long)]
        expires: Option<String>,
        /// Print only the secret instead of the API's JSON.
        #[arg(long)]
        bare: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List API tokens (not their secrets).
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Revoke an API token by its id (`at-...`).
    Revoke {
        /// The token's id.
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Subcommand)]
enum ServiceCmd {
    /// Create a persistent service group, e.g.
    /// `keyserver service create my-service --network prod -p 443:8080/http+tls -p 80:8080/http+redirect`.
    Create {
        /// Group name (unique in the network).
        name: String,
        /// Network id or name.
        #[arg(long)]
        network: String,
        /// Published port `[IP:]EXT[:INT][/handlers]` (repeat), e.g.
        /// `443:8080/http+tls`, `10000:5432/tls`, `203.0.113.5:5353:53/udp`.
        #[arg(long = "publish", short = 'p', required = true)]
        publish: Vec<String>,
        /// External FQDN (default `<name>-<random>.<service-domain>`).
        #[arg(long)]
        fqdn: Option<String>,
        /// Another name the group answers to (its own domain; repeat, at
        /// most 16), e.g. `--also www.example.com`.
        #[arg(long = "also", value_name = "FQDN")]
        names: Vec<String>,
        /// Per-instance soft limit (default 1).
        #[arg(long)]
        soft_limit: Option<i64>,
        /// Per-instance hard limit (default 65535).
        #[arg(long)]
        hard_limit: Option<i64>,
        /// Instance to attach now (repeat).
        #[arg(long = "instance")]
        instances: Vec<String>,
        /// Wake hook: an `http://` URL to POST to.
        #[arg(long, conflicts_with = "wake_command")]
        wake_url: Option<String>,
        /// Wake hook: a command run on the gateway (`sh -c` form not implied).
        #[arg(long, num_args = 1.., allow_hyphen_values = true)]
        wake_command: Option<Vec<String>>,
        /// Seconds a connection waits for a woken instance (default 30).
        #[arg(long)]
        wake_timeout_secs: Option<i64>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List a network's service groups.
    List {
        /// Network id or name.
        #[arg(long)]
        network: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show one service group (with `persistent`).
    Get {
        /// Group name.
        name: String,
        /// Network id or name.
        #[arg(long)]
        network: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Change a group's limits, ports or wake hook.
    Set {
        /// Group name.
        name: String,
        /// Network id or name.
        #[arg(long)]
        network: String,
        /// Replace the published ports (repeat).
        #[arg(long = "publish", short = 'p')]
        publish: Vec<String>,
        /// Per-instance soft limit.
        #[arg(long)]
        soft_limit: Option<i64>,
        /// Per-instance hard limit.
        #[arg(long)]
        hard_limit: Option<i64>,
        /// Seconds a connection waits for a woken instance.
        #[arg(long)]
        wake_timeout_secs: Option<i64>,
        /// Replace the names beside the FQDN (repeat).
        #[arg(long = "also", value_name = "FQDN", conflicts_with = "no_names")]
        names: Vec<String>,
        /// Remove every name beside the FQDN.
        #[arg(long)]
        no_names: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Delete a service group.
    Delete {
        /// Group name.
        name: String,
        /// Network id or name.
        #[arg(long)]
        network: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Attach an instance (name or public key) to a group.
    Attach {
        /// Group name.
        name: String,
        /// Instance name or public key.
        instance: String,
        /// Network id or name.
        #[arg(long)]
        network: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Detach an instance from a group.
    Detach {
        /// Group name.
        name: String,
        /// Instance name or public key.
        instance: String,
        /// Network id or name.
        #[arg(long)]
        network: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Subcommand)]
enum AddressCmd {
    /// List a network's service addresses with their wake and idle
    /// settings and state.
    List {
        /// Network id or name.
        #[arg(long)]
        network: String,
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show one service address.
    Get {
        /// The service.
        service: String,
        /// Network id or name.
        #[arg(long)]
        network: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Change a service address's scale-to-zero settings, e.g.
    /// `keyserver service-address set api --network prod --wake-url http://10.0.0.1/wake --wake-timeout 30s --idle-after 10m`.
    Set {
        /// The service.
        service: String,
        /// Network id or name.
        #[arg(long)]
        network: String,
        /// Wake hook: a command run on the keyserver (no shell; only with
        /// `serve --allow-wake-commands`). Put it last: it takes the rest.
        #[arg(long, num_args = 1.., allow_hyphen_values = true, conflicts_with_all = ["wake_url", "no_wake"])]
        wake_command: Option<Vec<String>>,
        /// Wake hook: an `http://` URL to POST to.
        #[arg(long, conflicts_with = "no_wake")]
        wake_url: Option<String>,
        /// Make the service not wakeable.
        #[arg(long)]
        no_wake: bool,
        /// How long members hold a new flow while the service wakes
        /// (`30s`, 1 s to 1 h).
        #[arg(long, value_parser = humantime::parse_duration)]
        wake_timeout: Option<std::time::Duration>,
        /// Report the service idle after this long without a new flow
        /// (`10m`).
        #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "no_idle")]
        idle_after: Option<std::time::Duration>,
        /// Stop watching idleness (removes the idle hook too).
        #[arg(long)]
        no_idle: bool,
        /// Idle hook: a command run on the keyserver when the service turns
        /// idle (no shell). Put it last: it takes the rest.
        #[arg(long, num_args = 1.., allow_hyphen_values = true, conflicts_with_all = ["idle_url", "no_idle_hook"])]
        idle_command: Option<Vec<String>>,
        /// Idle hook: an `http://` URL to POST to.
        #[arg(long, conflicts_with = "no_idle_hook")]
        idle_url: Option<String>,
        /// Remove the idle hook.
        #[arg(long)]
        no_idle_hook: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// A hook's JSON from its flags: a command, a URL, `null` (removed), or
/// nothing (left as it is).
fn hook_json(
    command: Option<Vec<String>>,
    url: Option<String>,
    remove: bool,
) -> Option<serde_json::Value> {
    match (command, url) {
        (Some(cmd), _) => Some(json!({ "command": cmd })),
        (None, Some(url)) => Some(json!({ "url": url })),
        (None, None) => remove.then_some(serde_json::Value::Null),
    }
}

/// `keyserver service-address ...`.
async fn address_admin(data_dir: &std::path::Path, cmd: AddressCmd) -> anyhow::Result<()> {
    let base = |net: &str| format!("/v1/networks/{}/addresses", path_segment(net));
    let out = match cmd {
        AddressCmd::List { network, json, api } => {
            let out = client(data_dir, api)?
                .call(Method::GET, &base(&network), None)
                .await?;
            if !json {
                let list: Vec<keyserver::registry::AddressInfo> = serde_json::from_value(out)
                    .context("the keyserver's answer is not a list of service addresses")?;
                print!("{}", keyserver::traffic::render_addresses(&list));
                return Ok(());
            }
            out
        }
        AddressCmd::Get {
            service,
            network,
            api,
        } => {
            let path = format!("{}/{}", base(&network), path_segment(&service));
            client(data_dir, api)?
                .call(Method::GET, &path, None)
                .await?
        }
        AddressCmd::Set {
            service,
            network,
            wake_command,
            wake_url,
            no_wake,
            wake_timeout,
            idle_after,
            no_idle,
            idle_command,
            idle_url,
            no_idle_hook,
            api,
        } => {
            let mut body = json!({});
            if let Some(w) = hook_json(wake_command, wake_url, no_wake) {
                body["wake"] = w;
            }
            if let Some(t) = wake_timeout {
                body["wake_timeout_secs"] = json!(t.as_secs());
            }
            if let Some(d) = idle_after {
                body["idle_after_secs"] = json!(d.as_secs());
            }
            if no_idle {
                body["idle_after_secs"] = serde_json::Value::Null;
                body["idle_hook"] = serde_json::Value::Null;
            }
            if let Some(h) = hook_json(idle_command, idle_url, no_idle_hook) {
                body["idle_hook"] = h;
            }
            let path = format!("{}/{}", base(&network), path_segment(&service));
            client(data_dir, api)?
                .call(Method::PATCH, &path, Some(&body))
                .await?
        }
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// `--publish` values as the API's port objects.
fn publish_specs(values: &[String]) -> anyhow::Result<Vec<serde_json::Value>> {
    values
        .iter()
        .map(|v| {
            let spec = meshlib::services::parse_publish(v).map_err(anyhow::Error::msg)?;
            Ok(serde_json::to_value(spec)?)
        })
        .collect()
}

/// `keyserver service ...`.
async fn service_admin(
    data_dir: &std::path::Path,
    cmd: ServiceCmd,
) -> anyhow::Result<serde_json::Value> {
    let base = |net: &str| format!("/v1/networks/{}/services", path_segment(net));
    let one = |net: &str, name: &str| format!("{}/{}", base(net), path_segment(name));
    let instance_path = |net: &str, name: &str, instance: &str| {
        format!("{}/instances/{}", one(net, name), path_segment(instance))
    };
    Ok(match cmd {
        ServiceCmd::Create {
            name,
            network,
            publish,
            fqdn,
            names,
            soft_limit,
            hard_limit,
            instances,
            wake_url,
            wake_command,
            wake_timeout_secs,
            api,
        } => {
            let wake = match (wake_url, wake_command) {
                (Some(url), _) => json!({ "url": url }),
                (None, Some(cmd)) => json!({ "command": cmd }),
                (None, None) => serde_json::Value::Null,
            };
            let mut body = json!({
                "name": name, "ports": publish_specs(&publish)?, "instances": instances,
                "soft_limit": soft_limit, "hard_limit": hard_limit, "fqdn": fqdn,
                "names": names, "wake_timeout_secs": wake_timeout_secs,
            });
            if !wake.is_null() {
                body["wake"] = wake;
            }
            client(data_dir, api)?
                .call(Method::POST, &base(&network), Some(&body))
                .await?
        }
        ServiceCmd::List { network, api } => {
            client(data_dir, api)?
                .call(Method::GET, &base(&network), None)
                .await?
        }
        ServiceCmd::Get { name, network, api } => {
            client(data_dir, api)?
                .call(Method::GET, &one(&network, &name), None)
                .await?
        }
        ServiceCmd::Set {
            name,
            network,
            publish,
            soft_limit,
            hard_limit,
            wake_timeout_secs,
            names,
            no_names,
            api,
        } => {
            let mut body = json!({});
            if !publish.is_empty() {
                body["ports"] = json!(publish_specs(&publish)?);
            }
            if !names.is_empty() || no_names {
                body["names"] = json!(names);
            }
            for (key, value) in [
                ("soft_limit", soft_limit),
                ("hard_limit", hard_limit),
                ("wake_timeout_secs", wake_timeout_secs),
            ] {
                if let Some(v) = value {
                    body[key] = json!(v);
                }
            }
            client(data_dir, api)?
                .call(Method::PATCH, &one(&network, &name), Some(&body))
                .await?
        }
        ServiceCmd::Delete { name, network, api } => {
            client(data_dir, api)?
                .call(Method::DELETE, &one(&network, &name), None)
                .await?;
            json!({ "deleted": true, "service": name })
        }
        ServiceCmd::Attach {
            name,
            instance,
            network,
            api,
        } => {
            let path = instance_path(&network, &name, &instance);
            client(data_dir, api)?
                .call(Method::PUT, &path, None)
                .await?
        }
        ServiceCmd::Detach {
            name,
            instance,
            network,
            api,
        } => {
            let path = instance_path(&network, &name, &instance);
            client(data_dir, api)?
                .call(Method::DELETE, &path, None)
                .await?
        }
    })
}

/// Now, Unix seconds.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `--since`/`--until` of `audit`: Unix seconds, RFC 3339 (passed on), or
/// an age (`1h`: that long ago).
fn time_arg(text: &str) -> anyhow::Result<String> {
    if text.parse::<u64>().is_ok() || humantime::parse_rfc3339_weak(text).is_ok() {
        return Ok(path_segment(text));
    }
    let age = humantime::parse_duration(text).with_context(|| {
        format!("{text:?}: expected Unix seconds, an RFC 3339 time or an age such as 1h")
    })?;
    Ok(unix_now().saturating_sub(age.as_secs()).to_string())
}

/// Prints the `token` field of a creation answer alone.
fn print_secret(out: &serde_json::Value) -> anyhow::Result<()> {
    let token = out["token"]
        .as_str()
        .context("the keyserver's answer has no token")?;
    println!("{token}");
    Ok(())
}

/// `keyserver api-token ...`.
async fn api_token_admin(data_dir: &std::path::Path, cmd: ApiTokenCmd) -> anyhow::Result<()> {
    let out = match cmd {
        ApiTokenCmd::Create {
            name,
            role,
            tenant,
            expires,
            bare,
            api,
        } => {
            let body = json!({ "name": name, "role": role, "tenant": tenant, "expires": expires });
            let out = client(data_dir, api)?
                .call(Method::POST, "/v1/api-tokens", Some(&body))
                .await?;
            if bare {
                return print_secret(&out);
            }
            out
        }
        ApiTokenCmd::List { api } => {
            client(data_dir, api)?
                .call(Method::GET, "/v1/api-tokens", None)
                .await?
        }
        ApiTokenCmd::Revoke { id, api } => {
            let path = format!("/v1/api-tokens/{}", path_segment(&id));
            client(data_dir, api)?
                .call(Method::DELETE, &path, None)
                .await?;
            json!({ "revoked": true, "id": id })
        }
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {}", chain(&e));
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.cmd {
        Cmd::Completions { shell } => {
            clap_gen::completions(<Cli as clap::CommandFactory>::command(), *shell);
            return Ok(());
        }
        Cmd::Man { dir } => {
            return Ok(clap_gen::man(
                <Cli as clap::CommandFactory>::command(),
                dir.as_deref(),
            )?);
        }
        _ => {}
    }
    let rt = tokio::runtime::Runtime::new()?;
    let data_dir = cli.data_dir;
    match cli.cmd {
        Cmd::Serve(args) => rt.block_on(serve(data_dir, args)),
        Cmd::Backup { out, api } => rt.block_on(backup(
            data_dir.unwrap_or_else(|| Config::default().data_dir),
            out,
            api,
        )),
        Cmd::Restore { from } => restore(
            data_dir.unwrap_or_else(|| Config::default().data_dir),
            &from,
        ),
        Cmd::Relay(args) => rt.block_on(relay(args)),
        cmd => rt.block_on(admin(
            data_dir.unwrap_or_else(|| Config::default().data_dir),
            cmd,
        )),
    }
}

/// An error with its causes on one line, each said once: a cause whose text
/// its parent already includes is not repeated.
fn chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

/// Logs to stderr: colours only when stderr is a terminal and `NO_COLOR` is
/// unset or empty (<https://no-color.org>); JSON lines with `json`.
fn init_logs(filter: &str, format: LogFormat) -> anyhow::Result<()> {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .with_context(|| format!("invalid log filter {filter:?}"))?;
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let ansi = std::io::stderr().is_terminal() && !no_color;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(ansi).init(),
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
    Ok(())
}

async fn serve(data_dir: Option<PathBuf>, args: ServeArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Config::from_toml(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        None => Config::default(),
    };
    config.data_dir = data_dir.unwrap_or(config.data_dir);
    config.quic_listen = args.quic_listen.unwrap_or(config.quic_listen);
    config.api_listen = args.api_listen.unwrap_or(config.api_listen);
    if !args.advertise.is_empty() {
        config.advertise = args.advertise;
    }
    config.log_level = args.log_level.unwrap_or(config.log_level);
    config.log_format = args.log_format.unwrap_or(config.log_format);
    if let Some(d) = args.offline_after {
        config.offline_after_secs = d.as_secs().max(1);
    }
    if let Some(d) = args.expire_after {
        config.expire_after_secs = d.as_secs().max(1);
    }
    if let Some(d) = args.ephemeral_after {
        config.ephemeral_after_secs = Some(d.as_secs());
    }
    if args.store.is_some() {
        config.store = args.store;
    }
    if let Some(Listen(listen)) = args.relay_listen {
        config.relay_listen = listen.map_or(RelayListen::Off, RelayListen::At);
    }
    config.relay_advertise = args.relay_advertise.or(config.relay_advertise);
    if !args.stun_servers.is_empty() {
        config.stun_servers = args.stun_servers;
    }
    config.relay_rate = args.relay_rate.unwrap_or(config.relay_rate);
    match args.tcp_listen {
        Some(Listen(None)) => config.tcp_enabled = false,
        Some(Listen(Some(a))) => config.tcp_listen = Some(a),
        None => {}
    }
    config.allow_wake_commands |= args.allow_wake_commands;
    config.audit_entries = args.audit_entries.unwrap_or(config.audit_entries);
    init_logs(&config.log_level, config.log_format)?;
    tame_malloc();
    let mut ks = Keyserver::open(&config).context("opening the data directory")?;
    let quic = ks.bind_quic(config.quic_listen)?;
    ks.bind_nat(&quic).await;
    let api = tokio::net::TcpListener::bind(config.api_listen)
        .await
        .with_context(|| format!("binding the admin API on {}", config.api_listen))?;
    let api_addr = api.local_addr()?;
    meshlib::fsutil::write_atomic(
        &config.data_dir.join("api.url"),
        format!("http://{api_addr}\n").as_bytes(),
        0o644,
    )?;
    let quic_addr = quic.local_addr()?;
    println!("keyserver: QUIC on {quic_addr}, admin API on http://{api_addr}");
    tracing::info!(quic = %quic_addr, api = %api_addr, "keyserver started");
    println!(
        "certificate sha256: {}",
        meshlib::proto::hex(&ks.fingerprint())
    );
    println!(
        "admin token file: {}",
        config.data_dir.join("admin-token").display()
    );
    // SIGINT (Ctrl-C) or SIGTERM (service managers) stop both servers; the
    // store needs no shutdown step (every commit is already durable).
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
    };
    ks.serve(quic, api, config.advertise, shutdown).await?;
    Ok(())
}

/// `keyserver backup`: through the running keyserver's API (consistent
/// while it serves), or, when none answers, straight from the embedded
/// store.
async fn backup(data_dir: PathBuf, out: PathBuf, api: ApiArgs) -> anyhow::Result<()> {
    let through_api = match client(&data_dir, api) {
        Ok(c) => match c.call(Method::GET, "/v1/backup", None).await {
            Ok(v) => Some(v),
            Err(keyserver::admin::AdminClientError::Transport { .. }) => None,
            Err(e) => return Err(e.into()),
        },
        Err(_) => None,
    };
    let doc = match through_api {
        Some(v) => serde_json::from_value::<keyserver::backup::Backup>(v)?,
        None => {
            use keyserver::store::Store as _;
            let path = data_dir.join("state.redb");
            let mut store = keyserver::store::RedbStore::open(&path).with_context(|| {
                format!(
                    "no keyserver answered, and {} cannot be read",
                    path.display()
                )
            })?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            keyserver::backup::Backup::of(store.load()?, now)
        }
    };
    meshlib::fsutil::write_secret(&out, &serde_json::to_vec_pretty(&doc)?)?;
    println!(
        "{}",
        json!({"written": out, "networks": doc.networks.len(), "members": doc.members.len(), "tokens": doc.tokens.len()})
    );
    Ok(())
}

/// `keyserver restore`: the embedded store of a stopped keyserver.
fn restore(data_dir: PathBuf, from: &std::path::Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    let doc = keyserver::backup::Backup::parse(&bytes)?;
    meshlib::fsutil::create_private_dir(&data_dir)?;
    let n = keyserver::backup::restore(&data_dir.join("state.redb"), &doc)?;
    println!("{}", json!({"restored": n, "data_dir": data_dir}));
    Ok(())
}

/// glibc's allocator keeps one arena per thread that ever allocated (up to
/// 8 per core), and keeps freed memory: a join storm (each join's snapshot
/// is encoded and buffered until acknowledged, hundreds of KB in a large
/// network, on blocking threads) leaves RSS far above what is in use.
/// Two arenas, and a trim every few seconds, keep RSS close to the live
/// memory (see the README's scale figures).
fn tame_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets an allocator parameter; called once at
        // start, before the runtime's threads allocate much.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
        tokio::spawn(async {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
            loop {
                tick.tick().await;
                // SAFETY: malloc_trim returns free memory to the system; it
                // touches no live allocation.
                let _ = tokio::task::spawn_blocking(|| unsafe { libc::malloc_trim(0) }).await;
            }
        });
    }
}

/// `keyserver relay`: STUN and the relay until SIGINT or SIGTERM.
async fn relay(args: RelayArgs) -> anyhow::Result<()> {
    init_logs(&args.log_level, LogFormat::Text)?;
    let bytes = std::fs::read(&args.secret_file)
        .with_context(|| format!("reading {}", args.secret_file.display()))?;
    let secret: [u8; 32] = bytes.try_into().map_err(|_| {
        anyhow::anyhow!(
            "{}: not a relay secret (32 bytes)",
            args.secret_file.display()
        )
    })?;
    let socket = keyserver::relay::bind(args.listen)?;
    let limits = keyserver::relay::RelayLimits {
        rate: args.rate.max(1),
        burst: args.burst.max(1500),
        ..Default::default()
    };
    let mut handle = keyserver::relay::serve_udp(socket, secret, limits)?;
    println!("relay: STUN and relay on udp {}", handle.local);
    if let Some(addr) = args.metrics {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding metrics on {addr}"))?;
        let metrics = handle.metrics.clone();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            while let Ok((mut s, _)) = listener.accept().await {
                let body = meshlib::metrics::build_info_text("relay", env!("CARGO_PKG_VERSION"))
                    + &metrics.render()
                    + &meshlib::metrics::process_text();
                tokio::spawn(async move {
                    let mut req = [0u8; 1024];
                    let _ =
                        tokio::time::timeout(std::time::Duration::from_secs(2), s.read(&mut req))
                            .await;
                    let head = format!("HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len());
                    let _ = s.write_all(head.as_bytes()).await;
                    let _ = s.write_all(body.as_bytes()).await;
                });
            }
        });
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    handle.stop();
    Ok(())
}

fn client(data_dir: &std::path::Path, api: ApiArgs) -> anyhow::Result<AdminClient> {
    let base = match api.api {
        Some(url) => url,
        None => {
            let path = data_dir.join("api.url");
            std::fs::read_to_string(&path)
                .with_context(|| {
                    format!(
                        "no --api given and cannot read {} (is the keyserver running?)",
                        path.display()
                    )
                })?
                .trim()
                .to_owned()
        }
    };
    let token_path = api
        .token_file
        .unwrap_or_else(|| data_dir.join("admin-token"));
    let token = std::fs::read_to_string(&token_path)
        .with_context(|| format!("reading {}", token_path.display()))?;
    Ok(AdminClient::new(&base, &token))
}

async fn admin(data_dir: PathBuf, cmd: Cmd) -> anyhow::Result<()> {
    let out = match cmd {
        Cmd::Serve(_)
        | Cmd::Relay(_)
        | Cmd::Completions { .. }
        | Cmd::Man { .. }
        | Cmd::Backup { .. }
        | Cmd::Restore { .. } => {
            unreachable!("handled in main")
        }
        Cmd::Service(cmd) => service_admin(&data_dir, cmd).await?,
        Cmd::ServiceAddress(cmd) => return address_admin(&data_dir, cmd).await,
        Cmd::Network(NetworkCmd::Traffic { name, json, api }) => {
            let path = format!("/v1/networks/{}/traffic", path_segment(&name));
            let out = client(&data_dir, api)?
                .call(Method::GET, &path, None)
                .await?;
            if !json {
                let graph: keyserver::traffic::TrafficGraph = serde_json::from_value(out)
                    .context("the keyserver's answer is not a service graph")?;
                print!("{}", keyserver::traffic::render_traffic(&graph));
                return Ok(());
            }
            out
        }
        Cmd::Network(NetworkCmd::Create {
            name,
            range,
            expire_after,
            tenant,
            api,
        }) => {
            let body = json!({ "name": name, "range": range, "expire_after": expire_after, "tenant": tenant });
            client(&data_dir, api)?
                .call(Method::POST, "/v1/networks", Some(&body))
                .await?
        }
        Cmd::Network(NetworkCmd::Set {
            name,
            expire_after,
            tenant,
            api,
        }) => {
            let mut body = json!({});
            if let Some(e) = expire_after {
                body["expire_after"] = json!((e != "default").then_some(e));
            }
            if let Some(t) = tenant {
                body["tenant"] = json!((t != "none").then_some(t));
            }
            let path = format!("/v1/networks/{}", path_segment(&name));
            client(&data_dir, api)?
                .call(Method::PATCH, &path, Some(&body))
                .await?
        }
        Cmd::Network(NetworkCmd::List { api }) => {
            client(&data_dir, api)?
                .call(Method::GET, "/v1/networks", None)
                .await?
        }
        Cmd::Network(NetworkCmd::Names { name, json, api }) => {
            let path = format!("/v1/networks/{}/names", path_segment(&name));
            let out = client(&data_dir, api)?
                .call(Method::GET, &path, None)
                .await?;
            if !json {
                let listing: NameListing = serde_json::from_value(out)
                    .context("the keyserver's answer is not a name listing")?;
                print!("{}", render_names(&listing));
                return Ok(());
            }
            out
        }
        Cmd::Network(NetworkCmd::Delete { name, force, api }) => {
            let path = format!("/v1/networks/{}?force={force}", path_segment(&name));
            client(&data_dir, api)?
                .call(Method::DELETE, &path, None)
                .await?
        }
        Cmd::Token(TokenCmd::Create {
            network,
            uses,
            expires,
            app,
            process_type,
            service_group,
            ephemeral,
            bare,
            api,
        }) => {
            let body = json!({ "uses": uses, "expires": expires, "service": app, "process_type": process_type, "service_group": service_group, "ephemeral": ephemeral });
            let path = format!("/v1/networks/{}/tokens", path_segment(&network));
            let out = client(&data_dir, api)?
                .call(Method::POST, &path, Some(&body))
                .await?;
            if bare {
                return print_secret(&out);
            }
            out
        }
        Cmd::Token(TokenCmd::List { network, api }) => {
            let path = format!("/v1/networks/{}/tokens", path_segment(&network));
            client(&data_dir, api)?
                .call(Method::GET, &path, None)
                .await?
        }
        Cmd::Token(TokenCmd::Delete { network, id, api }) => {
            let path = format!(
                "/v1/networks/{}/tokens/{}",
                path_segment(&network),
                path_segment(&id)
            );
            client(&data_dir, api)?
                .call(Method::DELETE, &path, None)
                .await?
        }
        Cmd::Member(MemberCmd::List { network, json, api }) => {
            let path = format!("/v1/networks/{}/members", path_segment(&network));
            let out = client(&data_dir, api)?
                .call(Method::GET, &path, None)
                .await?;
            if !json {
                let members: Vec<keyserver::listing::MemberRow> = serde_json::from_value(out)
                    .context("the keyserver's answer is not a list of members")?;
                print!("{}", render_members(&members, unix_now()));
                return Ok(());
            }
            out
        }
        Cmd::ApiToken(cmd) => return api_token_admin(&data_dir, cmd).await,
        Cmd::Audit {
            network,
            since,
            until,
            limit,
            json,
            api,
        } => {
            let mut query = vec![format!("limit={limit}")];
            if let Some(n) = network {
                query.push(format!("network={}", path_segment(&n)));
            }
            for (key, value) in [("since", since), ("until", until)] {
                if let Some(v) = value {
                    query.push(format!("{key}={}", time_arg(&v)?));
                }
            }
            let path = format!("/v1/audit?{}", query.join("&"));
            let out = client(&data_dir, api)?
                .call(Method::GET, &path, None)
                .await?;
            if !json {
                let entries: Vec<keyserver::auth::AuditRecord> = serde_json::from_value(out)
                    .context("the keyserver's answer is not a list of audit entries")?;
                print!("{}", keyserver::listing::render_audit(&entries));
                return Ok(());
            }
            out
        }
        Cmd::Member(MemberCmd::Get {
            network,
            member,
            json,
            api,
        }) => {
            let path = format!(
                "/v1/networks/{}/members/{}",
                path_segment(&network),
                path_segment(&member)
            );
            let out = client(&data_dir, api)?
                .call(Method::GET, &path, None)
                .await?;
            if !json {
                print!("{}", render_member(&out));
                return Ok(());
            }
            out
        }
        Cmd::Member(MemberCmd::Remove {
            network,
            member,
            api,
        }) => {
            let path = format!(
                "/v1/networks/{}/members/{}",
                path_segment(&network),
                path_segment(&member)
            );
            client(&data_dir, api)?
                .call(Method::DELETE, &path, None)
                .await?
        }
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
