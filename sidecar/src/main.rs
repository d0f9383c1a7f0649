//! `sidecar`: the IST Mesh agent beside each instance.
//!
//! Subcommands:
//! - `ist-names [NAME...]` — print the IST hostname and variables of service
//!   names (seed 004), one TSV line each.
//! - `wg [-f|--foreground] <ifname>` — the data plane alone, as a plain
//!   userspace WireGuard interface configured through its UAPI socket (a
//!   drop-in for `wireguard-go <ifname>`).

mod ist_names;
mod wg_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    /// Run the WireGuard data plane alone on a new TUN interface, configured
    /// with `wg set` through `/var/run/wireguard/<ifname>.sock`.
    Wg(wg_cmd::WgArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::IstNames(args) => ist_names::run(args),
        Command::Wg(args) => match wg_cmd::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sidecar wg: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}
