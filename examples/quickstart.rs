//! The IST Mesh quickstart: `cargo run --release --example quickstart`.
//!
//! Starts an embedded keyserver, creates a network, and starts three sidecars
//! in userspace mode on loopback (no root needed) for a demo deployment:
//! `web`, `api` and `my db` (a name that shows the encoding). Each service is
//! a tiny TCP server on 127.0.0.1. Then it shows the names and variables each
//! sidecar got, sends real requests between the services by name through the
//! encrypted WireGuard tunnels, shows `wg show`-style peer stats, and exits.
//!
//! Fixed loopback ports: WireGuard 51900-51902, DNS 15353-15355.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use hyper::Method;
use sidecar::agent::{start_servers, Agent};
use sidecar::config::{Config, Mode};
use sidecar::status::{render_human, StatusSource};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;

/// One demo service and its sidecar.
struct Demo {
    service: &'static str,
    port: u16,
    dns: SocketAddr,
    state_dir: PathBuf,
    status: StatusSource,
    task: tokio::task::JoinHandle<Result<(), sidecar::agent::AgentError>>,
}

/// A demo service: answers each line with a greeting.
async fn serve(service: &'static str, listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let reply = format!("hello from {service}, you said {line:?}\n");
                if write.write_all(reply.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// Resolves `name` (A record) with the DNS server at `dns`.
async fn resolve(dns: SocketAddr, name: &str) -> anyhow::Result<Ipv4Addr> {
    let mut query = Message::new();
    query.set_id(7).set_recursion_desired(true);
    query.add_query(Query::query(Name::from_ascii(name)?, RecordType::A));
    let sock = UdpSocket::bind("127.0.0.1:0").await?;
    sock.send_to(&query.to_vec()?, dns).await?;
    let mut buf = vec![0u8; 1500];
    let n = tokio::time::timeout(Duration::from_secs(2), sock.recv(&mut buf)).await??;
    let answer = Message::from_vec(&buf[..n])?;
    for record in answer.answers() {
        if let RData::A(a) = record.data() {
            return Ok(a.0);
        }
    }
    bail!("{name}: no address ({})", answer.response_code())
}

/// Sends one line to `addr` and reads the reply line.
async fn request(addr: SocketAddr, line: &str) -> anyhow::Result<String> {
    let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await??;
    let (read, mut write) = stream.into_split();
    write.write_all(format!("{line}\n").as_bytes()).await?;
    let mut reply = String::new();
    tokio::time::timeout(
        Duration::from_secs(5),
        BufReader::new(read).read_line(&mut reply),
    )
    .await??;
    Ok(reply.trim().to_owned())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let tag = std::process::id() % 10_000;
    println!(
        "== IST Mesh quickstart: a keyserver and three sidecars in userspace mode, on loopback\n"
    );

    // The keyserver, embedded, on loopback ports.
    let ks_config = keyserver::config::Config {
        data_dir: dir.path().join("keyserver"),
        quic_listen: "127.0.0.1:0".parse()?,
        api_listen: "127.0.0.1:0".parse()?,
        ..keyserver::config::Config::default()
    };
    let ks = keyserver::Keyserver::open(&ks_config)?;
    let quic = ks.bind_quic(ks_config.quic_listen)?;
    let quic_addr = quic.local_addr()?;
    let api = TcpListener::bind(ks_config.api_listen).await?;
    let admin = keyserver::admin::AdminClient::new(
        &format!("http://{}", api.local_addr()?),
        ks.admin_token(),
    );
    let (ks_stop, ks_stopped) = tokio::sync::oneshot::channel::<()>();
    let ks_task = tokio::spawn(ks.serve(quic, api, vec![], async {
        let _ = ks_stopped.await;
    }));
    let net = admin
        .call(
            Method::POST,
            "/v1/networks",
            Some(&serde_json::json!({"name": "demo"})),
        )
        .await?;
    let token = admin
        .call(
            Method::POST,
            "/v1/networks/demo/tokens",
            Some(&serde_json::json!({"uses": 3})),
        )
        .await?["token"]
        .as_str()
        .context("token")?
        .to_owned();
    println!(
        "keyserver: QUIC on {quic_addr}, network {} ({})",
        net["id"].as_str().unwrap_or("?"),
        net["name"].as_str().unwrap_or("?")
    );
    println!("join token: {}...\n", &token[..token.len().min(32)]);

    // Three services, each with its sidecar.
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut demos = Vec::new();
    for (i, service) in ["web", "api", "my db"].into_iter().enumerate() {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        tokio::spawn(serve(service, listener));
        let i = i as u16;
        let state_dir = dir.path().join(format!("sidecar-{i}"));
        let mut config = Config {
            token: Some(token.clone()),
            service: Some(service.into()),
            mode: Mode::Userspace,
            state_dir: state_dir.clone(),
            interface: format!("qs{tag}x{i}"),
            listen_port: 51900 + i,
            endpoints: vec![SocketAddr::from(([127, 0, 0, 1], 51900 + i))],
            hosts_file: None,
            metrics: None,
            ports: vec![port],
            loopback_octet: 77 + i as u8,
            persistent_keepalive: 0,
            ..Config::default()
        };
        config.dns.listen = SocketAddr::from(([127, 0, 0, 1], 15353 + i));
        let mut start_rx = stop_rx.clone();
        let agent = Agent::start(config, &mut start_rx)
            .await
            .with_context(|| format!("starting the sidecar of {service}"))?;
        let servers = start_servers(&agent, stop_rx.clone()).await?;
        let status = agent.status_source();
        let task = tokio::spawn(agent.run(stop_rx.clone()));
        demos.push(Demo {
            service,
            port,
            dns: servers.dns.context("dns")?,
            state_dir,
            status,
            task,
        });
    }

    // Wait until everyone sees everyone (bounded).
    for _ in 0..200 {
        if demos.iter().all(|d| (d.status)().peers.len() == 2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    println!(
        "== What each instance got (names and variables point at its sidecar's loopback listeners)"
    );
    for d in &demos {
        let s = (d.status)();
        println!(
            "\n-- {} : instance {}.internal, private IP {}",
            d.service,
            s.instance,
            s.ip.map_or("?".into(), |ip| ip.to_string())
        );
        let env = std::fs::read_to_string(d.state_dir.join("ist.env")).unwrap_or_default();
        for line in env.lines() {
            println!("   {line}");
        }
    }

    println!("\n== Requests by name, through the encrypted tunnels");
    let mut failures = 0;
    for from in &demos {
        for to in demos.iter().filter(|t| t.service != from.service) {
            let name = format!("{}.warp", meshlib::ist::hostname_label(to.service)?);
            let result = async {
                let ip = resolve(from.dns, &name).await?;
                let addr = SocketAddr::from((ip, to.port));
                let reply = request(addr, &format!("ping from {}", from.service)).await?;
                anyhow::Ok(format!("{addr} -> {reply}"))
            }
            .await;
            match result {
                Ok(line) => println!("{:6} -> {name:14} {line}", from.service),
                Err(e) => {
                    failures += 1;
                    println!("{:6} -> {name:14} FAILED: {e:#}", from.service);
                }
            }
        }
    }

    println!("\n== Peer stats (like `wg show`), from `sidecar status`");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    for d in &demos {
        println!("\n-- sidecar of {}", d.service);
        for line in render_human(&(d.status)(), now).lines() {
            println!("   {line}");
        }
    }

    // Clean exit: sidecars, then the keyserver.
    let _ = stop_tx.send(true);
    for d in demos {
        let _ = tokio::time::timeout(Duration::from_secs(5), d.task).await;
    }
    let _ = ks_stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), ks_task).await;
    if failures > 0 {
        bail!("{failures} requests failed");
    }
    println!("\nAll 6 requests went through WireGuard tunnels between userspace sidecars. Done.");
    Ok(())
}
