//! Two userspace-mode members on loopback, for `benches/userspace.sh` (and
//! to try the mode by hand, rootless).
//!
//! Member A (10.240.0.1) listens on a loopback TCP port and relays each
//! connection to member B (10.240.0.2) port `<target-port>`; B relays it to
//! `127.0.0.1:<target-port>`. With `<extra-peer-key>`, B also accepts that
//! WireGuard key as 10.240.0.3 (e.g. an `onetun` in the same run).
//!
//! Prints one line `listen=<addr> b_endpoint=<addr> b_public=<key>` and
//! runs until its standard input closes.
//!
//! Usage: `userspace_pair <target-port> [<extra-peer-key>]`

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::Context;
use meshlib::keys::{PrivateKey, PublicKey};
use meshlib::userspace::{Stack, StackConfig};
use meshlib::wg::{Engine, EngineConfig, PeerConfig};
use tokio::io::AsyncReadExt;

struct Member {
    stack: Arc<Stack>,
    engine: Engine,
    key: PublicKey,
    ip: IpAddr,
}

fn member(ip: &str) -> anyhow::Result<Member> {
    let ip: IpAddr = ip.parse()?;
    let (stack, dev) = Stack::start(StackConfig::new(ip, 22))?;
    let private = PrivateKey::generate();
    let key = private.public_key();
    let engine = Engine::start(
        dev,
        EngineConfig {
            listen_port: 0,
            private_key: Some(private),
            fwmark: 0,
            crypto_workers: 0,
        },
    )?;
    Ok(Member {
        stack: Arc::new(stack),
        engine,
        key,
        ip,
    })
}

fn peer(
    of: &Member,
    key: PublicKey,
    ip: IpAddr,
    endpoint: Option<SocketAddr>,
) -> anyhow::Result<()> {
    of.engine.set_peer(PeerConfig {
        public_key: key,
        preshared_key: None,
        endpoint,
        allowed_ips: vec![ipnet::IpNet::from(ip)],
        persistent_keepalive: 0,
    })?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let port: u16 = args
        .next()
        .context("usage: userspace_pair <target-port> [<extra-peer-key>]")?
        .parse()?;
    let extra: Option<PublicKey> = args.next().map(|k| k.parse()).transpose()?;
    let (a, b) = (member("10.240.0.1")?, member("10.240.0.2")?);
    let ep = |m: &Member| SocketAddr::from(([127, 0, 0, 1], m.engine.listen_port()));
    peer(&a, b.key, b.ip, Some(ep(&b)))?;
    peer(&b, a.key, a.ip, Some(ep(&a)))?;
    if let Some(k) = extra {
        peer(&b, k, "10.240.0.3".parse()?, None)?;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!(
        "listen={} b_endpoint={} b_public={}",
        listener.local_addr()?,
        ep(&b),
        b.key
    );
    // B's instance serves `port`: the only port reachable through B.
    b.stack.set_inbound_ports([port]);
    let stack = a.stack.clone();
    let dst = SocketAddr::new(b.ip, port);
    tokio::spawn(async move { stack.forward_tcp(listener, dst).await });
    let mut sink = Vec::new();
    tokio::io::stdin().read_to_end(&mut sink).await?;
    Ok(())
}
