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
//! - `completions <shell>`, `man [--dir DIR]` (hidden) — shell completions
//!   and man pages, for packaging.

#[path = "../../packaging/clap_gen.rs"]
mod clap_gen;
mod ist_names;
mod wg_cmd;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
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
    #[command(subcommand)]
    command: Command,
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
        /// Join token of the network.
        #[arg(long, env = "ISTM_TOKEN", hide_env_values = true)]
        token: String,
        /// Service name the tunnel joins as.
        #[arg(long, default_value = "tunnel")]
        service: String,
        /// Local port (on 127.0.0.1) or ip:port to listen on.
        local: String,
        /// Target: <name>:<port> (a private DNS name or IP).
        target: String,
    },
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
    let cli = Cli::parse();
    match cli.command {
        Command::IstNames(args) => ist_names::run(args),
        Command::Up(up) => agent_main(up, None),
        Command::Run { up, command } => agent_main(up, Some(command)),
        Command::Status {
            socket,
            state_dir,
            json,
        } => status_main(socket, state_dir, json),
        Command::Tunnel {
            token,
            service,
            local,
            target,
        } => tunnel_main(token, service, &local, &target),
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

fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ISTM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
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
fn agent_main(up: UpArgs, command: Option<Vec<OsString>>) -> ExitCode {
    init_logs();
    let result = runtime()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(agent_async(up, command)));
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("sidecar: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn agent_async(up: UpArgs, command: Option<Vec<OsString>>) -> anyhow::Result<i32> {
    let config = up.to_config()?;
    let (stop_tx, stop_rx) = watch::channel(false);
    // Until a child runs, SIGINT/SIGTERM stop the sidecar.
    let stopper = stop_on_signals(stop_tx.clone());
    let mut start_rx = stop_rx.clone();
    let (agent, session) = Agent::start(config, &mut start_rx).await?;
    let servers = start_servers(&agent, stop_rx.clone()).await?;
    tracing::info!(dns = ?servers.dns, status = %servers.status.display(), metrics = ?servers.metrics, "sidecar up");
    let Some(command) = command else {
        agent.run(session, stop_rx).await?;
        return Ok(0);
    };
    stopper.abort();
    let signals = sidecar::supervise::os_signals()?;
    let env = agent.variables();
    let running = tokio::spawn(agent.run(session, stop_rx));
    let (program, args) = command.split_first().expect("clap requires a command");
    let code = sidecar::supervise::run_child(program, args, &env, signals).await;
    let _ = stop_tx.send(true);
    if let Ok(Err(e)) = running.await {
        tracing::warn!(error = %e, "sidecar stopped with an error");
    }
    Ok(code?)
}

/// `sidecar status`.
fn tunnel_main(token: String, service: String, local: &str, target: &str) -> ExitCode {
    init_logs();
    let result = (|| -> anyhow::Result<()> {
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
            eprintln!("sidecar tunnel: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn status_main(socket: Option<PathBuf>, state_dir: Option<PathBuf>, json: bool) -> ExitCode {
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
            eprintln!("sidecar status: {e:#}");
            ExitCode::FAILURE
        }
    }
}
