//! `sidecar`: the IST Mesh agent beside each instance.
//!
//! Subcommands:
//! - `ist-names [NAME...]` — print the IST hostname and variables of service
//!   names (seed 004), one TSV line each.

mod ist_names;

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::IstNames(args) => ist_names::run(args),
    }
}
