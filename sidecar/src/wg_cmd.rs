//! `sidecar wg [-f|--foreground] <ifname>`: the data-plane engine alone, as a
//! plain userspace WireGuard interface configured only through its UAPI
//! socket — a drop-in for `wireguard-go <ifname>` (same argument, same
//! socket, same foreground flag).
//!
//! Without `-f` it re-executes itself with `-f`, detached (new session,
//! standard streams on `/dev/null`), and returns once the UAPI socket exists.
//!
//! Like wireguard-go, it leaves the interface down: the user brings it up
//! (`ip link set <ifname> up`), and nothing is sent while it is down.
//! `wg show`'s "sent" counts the bytes that left (a failed send is logged,
//! at most once per 5 s, not counted), and allowed IPs are listed in the
//! order they were set. `--version` prints the version.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use meshlib::wg::{uapi_server, Engine, EngineConfig, TunConfig, TunDevice, UapiServer};

/// Arguments of `sidecar wg`.
#[derive(Debug, Clone, clap::Args)]
pub struct WgArgs {
    /// Stay in the foreground (do not daemonize); also set by
    /// `WG_PROCESS_FOREGROUND=1`, as for wireguard-go.
    #[arg(
        short = 'f',
        long = "foreground",
        env = "WG_PROCESS_FOREGROUND",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::FalseyValueParser::new()
    )]
    pub foreground: bool,
    /// TUN queues, each read and encrypted by its own thread.
    #[arg(long, env = "IST_WG_QUEUES", default_value_t = 1)]
    pub queues: usize,
    /// Threads that seal and open packets for the packet loops, so one
    /// busy peer's traffic uses several cores (in order); 0 (the default)
    /// keeps the crypto on the loops' own threads, which measured faster
    /// on two cores (benches/RESULTS.md).
    #[arg(long, env = "IST_WG_CRYPTO_WORKERS", default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=64))]
    pub crypto_workers: u16,
    /// Print the version and exit (as `wireguard-go --version`).
    #[arg(long, short = 'V')]
    pub version: bool,
    /// Name of the TUN interface to create (also names the UAPI socket).
    #[arg(required_unless_present = "version")]
    pub ifname: Option<String>,
}

/// Set in the daemon's environment by the parent that detached it.
const DAEMON_ENV: &str = "IST_WG_DAEMON";

/// How long the parent waits for the daemon's UAPI socket.
const DAEMON_START: Duration = Duration::from_secs(10);

/// Set by SIGINT/SIGTERM.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Runs the subcommand.
pub fn run(args: &WgArgs) -> anyhow::Result<()> {
    if args.version {
        print!("{}", version_text());
        return Ok(());
    }
    let ifname = args.ifname.as_deref().unwrap_or_default();
    if ifname.is_empty() || ifname.len() > 15 || ifname.contains('/') {
        bail!("invalid interface name {ifname:?}");
    }
    init_logs();
    if args.foreground {
        run_foreground(ifname, args.queues, args.crypto_workers.into())
    } else {
        daemonize(ifname)
    }
}

/// What `--version` prints, in wireguard-go's shape: the program as it was
/// called (`ist-wg`, or `sidecar wg`), the version, what it is.
pub fn version_text() -> String {
    let program = std::env::args()
        .next()
        .as_deref()
        .map(std::path::Path::new)
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "ist-wg".into());
    let program = if program == "sidecar" {
        "sidecar wg".to_string()
    } else {
        program
    };
    format!(
        "{program} v{}\n\nUserspace WireGuard daemon (IST Mesh) for {}-{}.\n",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::OS,
        std::env::consts::ARCH
    )
}

/// Logs to stderr (`ISTM_LOG` filter, default `info` with boringtun's
/// per-handshake warnings off): send failures and link changes. In the
/// daemon, stderr is `/dev/null` once it runs.
fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ISTM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,boringtun=error"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

/// Re-executes this program with `-f` inserted before the interface name
/// (the last argument), detached, and waits for its UAPI socket.
fn daemonize(ifname: &str) -> anyhow::Result<()> {
    let sock = uapi_server::socket_path(ifname);
    if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
        bail!("{ifname} is already served at {}", sock.display());
    }
    let exe = std::env::current_exe().context("locating own executable")?;
    let mut argv: Vec<String> = std::env::args().skip(1).collect();
    argv.pop();
    argv.push("-f".into());
    argv.push(ifname.into());
    let mut cmd = Command::new(exe);
    // stderr stays a pipe until the daemon is up, so that a start-up error
    // (no TUN, no root) reaches the user through this parent.
    cmd.args(&argv)
        .env(DAEMON_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: setsid is async-signal-safe and touches no Rust state.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the daemon")?;
    let started = Instant::now();
    while started.elapsed() < DAEMON_START {
        if let Some(status) = child.try_wait()? {
            let mut why = String::new();
            if let Some(mut err) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut err, &mut why);
            }
            bail!("daemon exited early ({status}): {}", why.trim());
        }
        if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("daemon did not open {} in time", sock.display())
}

/// Creates the TUN interface in the current network namespace (down, as
/// wireguard-go leaves it), starts the engine and its UAPI socket, and runs
/// until SIGINT/SIGTERM or until the interface disappears.
fn run_foreground(ifname: &str, queues: usize, crypto_workers: usize) -> anyhow::Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe {
            libc::signal(
                sig,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            )
        };
    }
    let mut config = TunConfig::new(ifname);
    config.queues = queues.clamp(1, 16);
    config.up = false;
    let tun =
        TunDevice::create(&config).with_context(|| format!("creating TUN interface {ifname}"))?;
    eprintln!(
        "sidecar wg: interface {ifname} created (offloads {}); bring it up with `ip link set {ifname} up`",
        if tun.offload() { "on" } else { "off" }
    );
    let engine_config = EngineConfig {
        crypto_workers,
        ..EngineConfig::default()
    };
    let engine = Arc::new(Engine::start(Arc::new(tun), engine_config)?);
    let path = uapi_server::socket_path(ifname);
    let server = UapiServer::start(engine.clone(), &path)?;
    if std::env::var_os(DAEMON_ENV).is_some() {
        detach_stderr();
    }
    while !STOP.load(Ordering::SeqCst) && !engine.has_failed() && interface_exists(ifname) {
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(server);
    engine.shutdown();
    Ok(())
}

/// Points stderr at `/dev/null` once the daemon runs (its parent, reading
/// the start-up pipe, is gone).
fn detach_stderr() {
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        use std::os::fd::AsRawFd;
        // SAFETY: both descriptors are valid; dup2 replaces fd 2 atomically.
        unsafe { libc::dup2(null.as_raw_fd(), 2) };
    }
}

/// Whether the interface still exists in this network namespace (asked of
/// the kernel, not of `/sys`, which may belong to another namespace).
fn interface_exists(ifname: &str) -> bool {
    let Ok(name) = std::ffi::CString::new(ifname) else {
        return false;
    };
    // SAFETY: a valid NUL-terminated string that outlives the call.
    unsafe { libc::if_nametoindex(name.as_ptr()) != 0 }
}
