//! `sidecar`: the IST Mesh agent beside each instance.
//!
//! Subcommands:
//! - `ist-names [NAME...]` — print the IST hostname and variables of service
//!   names (seed 004), one TSV line each.
//! - `wg [-f] <ifname>` — the data plane alone: a userspace WireGuard
//!   interface configured through its UAPI socket (a `wireguard-go` drop-in).
//! - `up` — join the network and keep this instance connected.
//! - `run -- <command>` — the same, then run the command with the
//!   `WARP_IST_*` variables, forwarding signals, exiting with its code.
//! - `status` — what a running sidecar sees.
//! - `leave` — release this member (the keyserver frees its address).
//! - `rotate-key` — replace the member's WireGuard key, keeping its address.
//!
//! Logs go to stderr: coloured only when stderr is a terminal and
//! `NO_COLOR` is unset, or one JSON object per line (`--log-format json`).
//! Anything printed that came from the network is escaped.
//! - `completions <shell>`, `man [--dir DIR]` (hidden) — shell completions
//!   and man pages, for packaging.

#[path = "../../packaging/clap_gen.rs"]
mod clap_gen;
mod ist_names;
mod wg_cmd;

use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use meshlib::render::text::Escaped;
use sidecar::agent::{start_servers, Agent};
use sidecar::cli::UpArgs;
use tokio::sync::watch;

/// The IST Mesh sidecar.
#[derive(Parser)]
#[command(
    name = "sidecar",
    version,
    about = "IST Mesh sidecar: the agent beside each instance"
)]
struct Cli {
    /// Log format on stderr: text (coloured on a terminal unless NO_COLOR
    /// is set) or json (one object per line).
    #[arg(
        long,
        global = true,
        value_enum,
        env = "ISTM_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Print `name<TAB>hostname<TAB>generic-variable<TAB>shell-variable` for
    /// each service name (from the arguments, or stdin one per line).
    IstNames(ist_names::Args),
    /// Run a plain userspace WireGuard interface, configured only through
    /// its UAPI socket (`wg show` / `wg set`): a drop-in for `wireguard-go`.
    Wg(wg_cmd::WgArgs),
    /// Join the network (first start: --token) and keep this instance
    /// connected: tunnels, private DNS, /etc/hosts, env files.
    Up(UpArgs),
    /// Like `up`, then run a command with the WARP_IST_* variables set;
    /// signals are forwarded and the command's exit code is returned.
    Run {
        #[command(flatten)]
        up: UpArgs,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true)]
        command: Vec<OsString>,
    },
    /// Forward a local port to `<instance>.internal:<port>` or
    /// `<service>.warp:<port>` through the mesh, as a short-lived rootless
    /// member (removed from the network when this exits).
    Tunnel {
        /// Join token of the network (visible in `ps`: prefer --token-file
        /// or ISTM_TOKEN).
        #[arg(
            long,
            env = "ISTM_TOKEN",
            hide_env_values = true,
            required_unless_present = "token_file"
        )]
        token: Option<String>,
        /// File holding the join token.
        #[arg(long, env = "ISTM_TOKEN_FILE", conflicts_with = "token")]
        token_file: Option<PathBuf>,
        /// Service name the tunnel joins as.
        #[arg(long, default_value = "tunnel")]
        service: String,
        /// Local port (on 127.0.0.1) or ip:port to listen on.
        local: String,
        /// Target: <name>:<port> (a private DNS name or IP).
        target: String,
    },
    /// Leave the network: the keyserver releases this member (address
    /// quarantined, names gone). Asks the running sidecar, which then
    /// stops; a stopped one's membership is resumed only to leave.
    Leave {
        /// State directory (default /var/lib/ist-mesh).
        #[arg(long, env = "ISTM_STATE_DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Replace this member's WireGuard key with a new one made here; the
    /// address and names stay, peers switch to it in place.
    RotateKey {
        /// State directory of the running sidecar (default /var/lib/ist-mesh).
        #[arg(long, env = "ISTM_STATE_DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Serve the published ports of the network's service groups on this
    /// host's public addresses: TLS, HTTP reverse proxy,
    /// redirect, TCP and UDP, balanced over the groups' online instances.
    Gateway(sidecar::gateway::GatewayArgs),
    /// Show peers, endpoints, handshakes, bytes, map generation and the
    /// control connection of a running sidecar.
    Status {
        /// The status socket (default /var/lib/ist-mesh/status.sock).
        #[arg(long, env = "ISTM_STATUS_SOCKET")]
        socket: Option<PathBuf>,
        /// State directory whose status.sock to use.
        #[arg(long, env = "ISTM_STATE_DIR")]
        state_dir: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    #[command(hide = true)]
    Completions {
        /// The shell.
        shell: clap_gen::Shell,
    },
    /// Print the man page, or write every page into a directory.
    #[command(hide = true)]
    Man {
        /// Write `sidecar.1` and one page per subcommand here.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    // `--token` on the command line is readable by every user (`ps`).
    let token_in_argv = matches.subcommand().is_some_and(|(name, m)| {
        matches!(name, "up" | "run" | "tunnel" | "gateway")
            && m.value_source("token") == Some(ValueSource::CommandLine)
    });
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let logs = Logs {
        format: cli.log_format,
        token_in_argv,
    };
    match cli.command {
        Command::IstNames(args) => ist_names::run(args),
        Command::Up(up) => agent_main(logs, up, None),
        Command::Run { up, command } => agent_main(logs, up, Some(command)),
        Command::Status {
            socket,
            state_dir,
            json,
        } => status_main(logs, socket, state_dir, json),
        Command::Leave { state_dir } => control_main(logs, "leave", state_dir),
        Command::RotateKey { state_dir } => control_main(logs, "rotate-key", state_dir),
        Command::Tunnel {
            token,
            token_file,
            service,
            local,
            target,
        } => tunnel_main(logs, (token, token_file), service, &local, &target),
        Command::Gateway(args) => gateway_main(logs, args),
        Command::Completions { shell } => {
            clap_gen::completions(<Cli as clap::CommandFactory>::command(), shell);
            ExitCode::SUCCESS
        }
        Command::Man { dir } => {
            match clap_gen::man(<Cli as clap::CommandFactory>::command(), dir.as_deref()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("sidecar man: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Wg(args) => match wg_cmd::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sidecar wg: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// How to start logging.
#[derive(Debug, Clone, Copy)]
struct Logs {
    format: LogFormat,
    /// Whether the join token was given as `--token` (warned about).
    token_in_argv: bool,
}

/// Whether text logs may use colours: stderr is a terminal and `NO_COLOR`
/// is unset or empty (<https://no-color.org>).
fn colours() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

fn init_logs(logs: Logs) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ISTM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match logs.format {
        LogFormat::Text => fmt.with_ansi(colours()).init(),
        LogFormat::Json => fmt.json().with_ansi(false).init(),
    }
    if logs.token_in_argv {
        tracing::warn!("the join token was given with --token: every user of this host can read it (ps, /proc); use --token-file or ISTM_TOKEN");
    }
}

/// Reports a failure on stderr, escaped (it may quote the keyserver): a
/// plain line, or with `--log-format json` an error event like every other
/// line.
fn report(logs: Logs, prefix: &str, e: &anyhow::Error) {
    let message = Escaped(&format!("{e:#}")).to_string();
    match logs.format {
        LogFormat::Text => eprintln!("{prefix}: {message}"),
        LogFormat::Json => tracing::error!(error = %message, "{prefix} failed"),
    }
}

/// Sets `stop` on the first SIGTERM or SIGINT.
fn stop_on_signals(stop: watch::Sender<bool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        let _ = stop.send(true);
    })
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

/// `sidecar up` (no command) or `sidecar run` (a command).
fn agent_main(logs: Logs, up: UpArgs, command: Option<Vec<OsString>>) -> ExitCode {
    init_logs(logs);
    let result = runtime()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(agent_async(up, command)));
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            report(logs, "sidecar", &e);
            ExitCode::FAILURE
        }
    }
}

async fn agent_async(up: UpArgs, command: Option<Vec<OsString>>) -> anyhow::Result<i32> {
    let config = up.to_config()?;
    let catch_up = std::time::Duration::from_secs(config.catch_up_timeout);
    let (stop_tx, stop_rx) = watch::channel(false);
    // Until a child runs, SIGINT/SIGTERM stop the sidecar.
    let stopper = stop_on_signals(stop_tx.clone());
    let mut start_rx = stop_rx.clone();
    let mut agent = Agent::start(config, &mut start_rx).await?;
    let servers = start_servers(&agent, stop_rx.clone()).await?;
    tracing::info!(dns = ?servers.dns, status = %servers.status.display(), metrics = ?servers.metrics, "sidecar up");
    let Some(command) = command else {
        agent.run(stop_rx).await?;
        // A leave asked through the control socket: answer it first.
        servers.answered(ANSWER_LIMIT).await;
        return Ok(0);
    };
    // The command's variables name every service the keyserver knows:
    // wait (bounded) for the map to catch up first.
    agent.wait_caught_up(catch_up).await;
    stopper.abort();
    let signals = sidecar::supervise::os_signals()?;
    let env = agent.variables();
    let owner = agent.port_owner();
    let running = tokio::spawn(agent.run(stop_rx));
    let (program, args) = command.split_first().expect("clap requires a command");
    let started = |pid| owner.store(pid, std::sync::atomic::Ordering::Relaxed);
    let code = sidecar::supervise::run_child(program, args, &env, signals, started).await;
    // The command ended: a graceful stop (offline at the keyserver).
    let _ = stop_tx.send(true);
    if let Ok(Err(e)) = running.await {
        tracing::warn!(error = %Escaped(&e.to_string()), "sidecar stopped with an error");
    }
    servers.answered(ANSWER_LIMIT).await;
    Ok(code?)
}

/// How long an exiting sidecar waits to answer the control requests it
/// took (`sidecar leave`).
const ANSWER_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

/// `sidecar leave` / `sidecar rotate-key`: asks the running sidecar of
/// `state_dir` through its control socket; `leave` on a stopped sidecar
/// resumes the membership only to leave.
fn control_main(logs: Logs, what: &str, state_dir: Option<PathBuf>) -> ExitCode {
    init_logs(logs);
    let dir = state_dir.unwrap_or_else(|| PathBuf::from("/var/lib/ist-mesh"));
    let socket = dir.join(sidecar::agent::CONTROL_SOCKET);
    let result = runtime().map_err(anyhow::Error::from).and_then(|rt| {
        rt.block_on(async {
            match sidecar::agent::request(&socket, what).await {
                Ok(answer) => Ok(answer),
                Err(sidecar::agent::ControlRequestError::NotRunning { .. }) if what == "leave" => {
                    let left = sidecar::agent::leave_stopped(&dir).await?;
                    Ok(serde_json::json!({"ok": true, "confirmed": left}))
                }
                Err(e) => Err(anyhow::Error::from(e)),
            }
        })
    });
    match result {
        Ok(answer) => {
            match what {
                "rotate-key" => println!(
                    "new public key: {}",
                    answer["public_key"].as_str().unwrap_or_default()
                ),
                _ if answer["confirmed"] == true => println!("left the network"),
                _ => println!("left (the keyserver did not confirm; the member will expire there)"),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            report(logs, &format!("sidecar {what}"), &e);
            ExitCode::FAILURE
        }
    }
}

/// The tunnel's token: given, or read from its file.
fn tunnel_token((token, file): (Option<String>, Option<PathBuf>)) -> anyhow::Result<String> {
    if let Some(t) = token {
        return Ok(t.trim().to_owned());
    }
    let path = file.ok_or_else(|| {
        anyhow::anyhow!("a join token is needed (--token-file, ISTM_TOKEN or --token)")
    })?;
    let text = meshlib::fsutil::read_text_limited(&path, meshlib::fsutil::MAX_SMALL_FILE)
        .map_err(|e| anyhow::anyhow!("token-file: {e}"))?;
    Ok(text.trim().to_owned())
}

/// `sidecar tunnel`.
fn tunnel_main(
    logs: Logs,
    token: (Option<String>, Option<PathBuf>),
    service: String,
    local: &str,
    target: &str,
) -> ExitCode {
    init_logs(logs);
    let result = (|| -> anyhow::Result<()> {
        let token = tunnel_token(token)?;
        let listen: std::net::SocketAddr = match local.parse::<u16>() {
            Ok(port) => ([127, 0, 0, 1], port).into(),
            Err(_) => local.parse()?,
        };
        let (target_host, target_port) = sidecar::tunnel::parse_target(target)?;
        let cfg = sidecar::tunnel::TunnelConfig {
            token,
            service,
            listen,
            target_host,
            target_port,
        };
        runtime()?.block_on(async move {
            let (stop_tx, stop_rx) = watch::channel(false);
            stop_on_signals(stop_tx);
            let (tx, rx) = tokio::sync::oneshot::channel();
            tokio::spawn(async move {
                if let Ok(addr) = rx.await {
                    println!("forwarding {addr}; Ctrl-C to stop");
                }
            });
            sidecar::tunnel::run(cfg, stop_rx, Some(tx)).await?;
            Ok(())
        })
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(logs, "sidecar tunnel", &e);
            ExitCode::FAILURE
        }
    }
}

/// `sidecar gateway`.
fn gateway_main(logs: Logs, args: sidecar::gateway::GatewayArgs) -> ExitCode {
    init_logs(logs);
    let result = runtime().map_err(anyhow::Error::from).and_then(|rt| {
        rt.block_on(async move {
            let (stop_tx, stop_rx) = watch::channel(false);
            stop_on_signals(stop_tx);
            sidecar::gateway::run(args, stop_rx).await?;
            Ok(())
        })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(logs, "sidecar gateway", &e);
            ExitCode::FAILURE
        }
    }
}

/// `sidecar status`.
fn status_main(
    logs: Logs,
    socket: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    json: bool,
) -> ExitCode {
    let path = socket.unwrap_or_else(|| {
        state_dir
            .unwrap_or_else(|| PathBuf::from("/var/lib/ist-mesh"))
            .join("status.sock")
    });
    let result = runtime().map_err(anyhow::Error::from).and_then(|rt| {
        rt.block_on(sidecar::status::query_status(&path))
            .map_err(anyhow::Error::from)
    });
    match result {
        Ok(status) if json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&status).unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Ok(status) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            print!("{}", sidecar::status::render_human(&status, now));
            ExitCode::SUCCESS
        }
        Err(e) => {
            report(
                Logs {
                    format: LogFormat::Text,
                    ..logs
                },
                "sidecar status",
                &e,
            );
            ExitCode::FAILURE
        }
    }
}
