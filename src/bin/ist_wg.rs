//! `ist-wg [-f|--foreground] <ifname>` (or `--version`): exactly `sidecar wg`, built in the
//! root package so that `tests/dataplane_*.rs` can run it
//! (`CARGO_BIN_EXE_ist-wg`) and `benches/dataplane.sh` can start it as
//! `IMPL <ifname>` like `wireguard-go`.

#[path = "../../sidecar/src/wg_cmd.rs"]
mod wg_cmd;

use clap::Parser;

/// Command line: the same arguments as `sidecar wg`.
#[derive(Parser)]
#[command(
    name = "ist-wg",
    about = "IST Mesh userspace WireGuard (same as `sidecar wg`)"
)]
struct Cli {
    #[command(flatten)]
    wg: wg_cmd::WgArgs,
}

fn main() -> anyhow::Result<()> {
    wg_cmd::run(&Cli::parse().wg)
}
