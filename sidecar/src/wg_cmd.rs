//! `sidecar wg [-f|--foreground] <ifname>`: the data-plane engine alone, as a
//! plain userspace WireGuard interface configured only through its UAPI
//! socket — a drop-in for `wireguard-go <ifname>` (same argument, same
//! socket, same foreground flag).
//!
//! Without `-f` it re-executes itself with `-f`, detached (new session,
//! standard streams on `/dev/null`), and returns once the UAPI socket exists.

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
    /// Name of the TUN interface to create (also names the UAPI socket).
    pub ifname: String,
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
    if args.ifname.is_empty() || args.ifname.len() > 15 || args.ifname.contains('/') {
        bail!("invalid interface name {:?}", args.ifname);
    }
    if args.foreground {
        run_foreground(&args.ifname, args.queues)
    } else {
        daemonize(&args.ifname)
    }
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

/// Creates the TUN interface in the current network namespace, starts the
/// engine and its UAPI socket, and runs until SIGINT/SIGTERM or until the
/// interface disappears.
fn run_foreground(ifname: &str, queues: usize) -> anyhow::Result<()> {
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
    let tun =
        TunDevice::create(&config).with_context(|| format!("creating TUN interface {ifname}"))?;
    eprintln!(
        "sidecar wg: interface {ifname} up (offloads {})",
        if tun.offload() { "on" } else { "off" }
    );
    let engine = Arc::new(Engine::start(Arc::new(tun), EngineConfig::default())?);
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
