//! `GET /metrics`: Prometheus text, no token, counters that move with what
//! happens.

mod common;

use std::time::Duration;

use common::{cfg, client_endpoint, join, meta, Harness};
use hyper::Method;
use meshlib::control;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A plain GET without a token: status line and body.
async fn get(api: &str, path: &str) -> (String, String) {
    let addr = api.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    (head.to_owned(), body.to_owned())
}

fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

#[tokio::test]
async fn metrics_count_members_joins_refusals_pushes_and_store_commits() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path(), |_| {}).await;
    let net = h.network("m", "10.240.0.0/22").await;
    let token = h.token(&net.to_string(), json!({"uses": 3})).await;
    let ep = client_endpoint();
    let (_k, mut a) = join(&ep, &token, "api").await;
    let (_k, b) = join(&ep, &token, "api").await;
    // A refusal: a token with a wrong secret.
    let mut bad = token.clone();
    bad.secret = [0; 32];
    let (_k, m) = meta("api");
    assert!(control::join(&ep, &bad, m, &cfg()).await.is_err());
    // A push: b leaves the picture through the admin API; a hears it.
    let key = b.membership().public_key;
    h.call(
        Method::DELETE,
        &format!(
            "/v1/networks/{net}/members/{}",
            keyserver::admin::path_segment(&key.to_string())
        ),
        None,
    )
    .await
    .unwrap();
    common::until(&mut a, Duration::from_secs(5), |s| {
        !s.map().members.contains_key(&key)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (head, text) = get(&h.api, "/metrics").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert!(text.contains(&format!(
        "istmesh_keyserver_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    )));
    assert_eq!(
        value(
            &text,
            &format!("istmesh_keyserver_members{{network=\"{net}\",state=\"online\"}}")
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            &format!("istmesh_keyserver_members{{network=\"{net}\",state=\"offline\"}}")
        ),
        0.0
    );
    assert_eq!(value(&text, "istmesh_keyserver_joins_total"), 2.0);
    assert_eq!(
        value(
            &text,
            "istmesh_keyserver_refusals_total{reason=\"invalidtoken\"}"
        ),
        1.0
    );
    assert_eq!(value(&text, "istmesh_keyserver_connected_members"), 1.0);
    assert!(value(&text, "istmesh_keyserver_push_latency_seconds_count") >= 1.0);
    assert!(value(&text, "istmesh_keyserver_store_commit_seconds_count") >= 4.0);
    assert_eq!(
        value(
            &text,
            "istmesh_keyserver_store_errors_total{kind=\"other\"}"
        ),
        0.0
    );
    assert!(value(&text, "istmesh_keyserver_start_timestamp_seconds") > 1.7e9);
    assert!(
        !text.contains("instance="),
        "no instance label: Prometheus adds it"
    );
    for line in text
        .lines()
        .filter(|l| l.starts_with("# TYPE") && l.ends_with("counter"))
    {
        assert!(
            line.split(' ').nth(2).unwrap().ends_with("_total"),
            "{line}"
        );
    }
    // One naming scheme, the process families, and the exposition rules
    // promtool checks (HELP and TYPE for every family, samples together).
    assert!(value(&text, "process_resident_memory_bytes") > 0.0);
    assert!(value(&text, "process_open_fds") > 0.0);
    assert!(value(&text, "process_start_time_seconds") > 1.7e9);
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        assert!(
            line.starts_with("istmesh_keyserver_")
                || line.starts_with("istmesh_relay_")
                || line.starts_with("process_"),
            "{line}"
        );
    }
    assert_eq!(meshlib::metrics::lint(&text), Ok(()));
    common::promtool_check(&text);
    a.close();
    b.close();
    h.stop().await;
}
