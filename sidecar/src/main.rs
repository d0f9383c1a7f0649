//! `sidecar`: the IST Mesh agent beside each instance.
mod wg_cmd;

fn main() -> anyhow::Result<()> {
    // `sidecar wg [-f] <ifname>`: the data plane alone (wireguard-go drop-in).
    if std::env::args().nth(1).as_deref() == Some("wg") {
        use clap::Parser;
        #[derive(clap::Parser)]
        #[command(name = "sidecar wg", bin_name = "sidecar wg")]
        struct Cli {
            #[command(flatten)]
            wg: wg_cmd::WgArgs,
        }
        let cli = Cli::parse_from(std::env::args().skip(1));
        return wg_cmd::run(&cli.wg);
    }
    Ok(())
}
