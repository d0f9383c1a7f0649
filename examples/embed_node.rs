//! The mesh linked as a library: `cargo run --example embed_node`.
//!
//! A small tokio program with no sidecar process at all: it starts an
//! embedded keyserver on loopback (a real deployment has one already and
//! only needs a join token), then two [`meshlib::node::Node`]s in userspace
//! mode (no privileges). `greeter` listens on port 7000 of its private
//! address; `client` dials `greeter.warp:7000` by name, through the
//! WireGuard tunnel, and prints the answer. Then `greeter` rotates its key
//! (the connection keeps working), `client` stops gracefully (its peers see
//! it offline at once) and `greeter` leaves the network.

use std::time::Duration;

use anyhow::Context;
use hyper::Method;
use meshlib::netmap::MemberState;
use meshlib::node::{Node, NodeConfig, NodeEvent};
use meshlib::proto::JoinToken;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// A node of the demo network, with nothing written to disk. Its
/// WireGuard port is a free loopback port, advertised as its endpoint (a
/// real node advertises its host's addresses: the default).
async fn node(token: &JoinToken, service: &str) -> anyhow::Result<Node> {
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let node = Node::start(NodeConfig {
        token: Some(token.clone()),
        service: Some(service.into()),
        runner: "example".into(),
        listen_port: port,
        endpoints: vec![([127, 0, 0, 1], port).into()],
        ..NodeConfig::default()
    })
    .await
    .with_context(|| format!("starting {service}"))?;
    println!(
        "{service}: joined as {} ({}), key {}",
        node.instance(),
        node.ip(),
        node.public_key()
    );
    Ok(node)
}

/// One line to `target` through the mesh, one line back (retried a few
/// times: the first packet to a peer waits for a WireGuard handshake).
async fn ask(client: &Node, target: &str, line: &str) -> anyhow::Result<String> {
    let mut last = None;
    for _ in 0..3 {
        match ask_once(client, target, line).await {
            Ok(answer) => return Ok(answer),
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("three attempts"))
}

async fn ask_once(client: &Node, target: &str, line: &str) -> anyhow::Result<String> {
    let stream = tokio::time::timeout(Duration::from_secs(5), client.dial(target)).await??;
    let (read, mut write) = stream.into_split();
    write.write_all(format!("{line}\n").as_bytes()).await?;
    let mut answer = String::new();
    tokio::time::timeout(
        Duration::from_secs(5),
        BufReader::new(read).read_line(&mut answer),
    )
    .await??;
    anyhow::ensure!(!answer.is_empty(), "connection closed without an answer");
    Ok(answer.trim_end().to_owned())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // The keyserver (a deployment's own would be elsewhere).
    let ks_config = keyserver::config::Config {
        data_dir: dir.path().join("keyserver"),
        quic_listen: "127.0.0.1:0".parse()?,
        api_listen: "127.0.0.1:0".parse()?,
        ..keyserver::config::Config::default()
    };
    let ks = keyserver::Keyserver::open(&ks_config)?;
    let quic = ks.bind_quic(ks_config.quic_listen)?;
    let api = tokio::net::TcpListener::bind(ks_config.api_listen).await?;
    let admin = keyserver::admin::AdminClient::new(
        &format!("http://{}", api.local_addr()?),
        ks.admin_token(),
    );
    tokio::spawn(ks.serve(quic, api, vec![], std::future::pending()));
    admin
        .call(
            Method::POST,
            "/v1/networks",
            Some(&serde_json::json!({"name": "embedded"})),
        )
        .await?;
    let token: JoinToken = admin
        .call(
            Method::POST,
            "/v1/networks/embedded/tokens",
            Some(&serde_json::json!({"uses": 2})),
        )
        .await?["token"]
        .as_str()
        .context("token")?
        .parse()?;

    // Two nodes in this process.
    let greeter = node(&token, "greeter").await?;
    let client = node(&token, "client").await?;
    let listener = greeter.listen(7000).await?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let _ = write
                        .write_all(format!("greetings, you said {line:?}\n").as_bytes())
                        .await;
                }
            });
        }
    });
    // Wait until each sees the other (names come from the pushed map).
    for _ in 0..100 {
        if !client.resolve("greeter.warp").is_empty() && greeter.map().members.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "client resolves greeter.warp to {:?}",
        client.resolve("greeter.warp")
    );
    let answer = ask(&client, "greeter.warp:7000", "hello").await?;
    println!("client -> greeter.warp:7000: {answer}");

    // A key rotation: same address and names, new key.
    let new = greeter.rotate_key().await?;
    println!("greeter rotated its key to {new}");
    let answer = ask(&client, "greeter.warp:7000", "still there?").await?;
    println!("client -> greeter.warp:7000 after the rotation: {answer}");

    // The client stops gracefully: the greeter sees it offline at once.
    let mut events = greeter.events();
    let client_key = client.public_key();
    client.shutdown().await;
    let seen = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(ev) = events.recv().await {
            if let NodeEvent::MapChanged { .. } = ev {
                let map = greeter.map();
                if map.members.get(&client_key).map(|m| m.state) == Some(MemberState::Offline) {
                    return true;
                }
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    println!("greeter saw the client go offline: {seen}");

    // The greeter leaves: its membership is released.
    let left = greeter.leave().await;
    println!("greeter left the network: {left}");
    anyhow::ensure!(seen && left, "the lifecycle did not go as expected");
    println!("Done.");
    Ok(())
}
