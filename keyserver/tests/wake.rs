//! Scale to zero on internal traffic and traffic per service (issue 19,
//! control plane), over QUIC against a real keyserver on loopback: wake
//! requests of several members run the service's hook once (a real
//! command, or a small HTTP server on loopback), bad requests run nothing,
//! traffic reports become the service graph, and the admin API and CLI
//! show and change it all.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{client_endpoint, join, until, Harness};
use hyper::Method;
use meshlib::control::{Event, Session};
use meshlib::proto::{ClientMsg, ErrorCode};
use meshlib::traffic::{PairTraffic, TrafficCounters, TrafficReport};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A plain GET without a token (`/metrics`): the body.
async fn metrics(h: &Harness) -> String {
    let addr = h.api.trim_start_matches("http://").to_owned();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let req = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split_once("\r\n\r\n").unwrap().1.to_owned()
}

fn series(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

/// Lines in `path` (0 when it does not exist yet).
fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |t| t.lines().count())
}

/// Waits until `f` holds, at most `limit`.
async fn eventually(limit: Duration, f: impl Fn() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

/// Network `prod` with service `api` at zero instances (its member joined
/// and left: the address stays) and three `web` members; returns them.
async fn setup(h: &Harness) -> Vec<Session> {
    h.network("prod", "10.240.0.0/22").await;
    let token = h.token("prod", json!({"uses": 10})).await;
    let ep = client_endpoint();
    let (_k, mut api) = join(&ep, &token, "api").await;
    assert!(api.leave(Duration::from_secs(5)).await);
    let mut webs = Vec::new();
    for _ in 0..3 {
        webs.push(join(&ep, &token, "web").await.1);
    }
    let a = h
        .call(Method::GET, "/v1/networks/prod/addresses/api", None)
        .await
        .unwrap();
    assert_eq!(
        (a["online"].as_u64(), a["waking"].as_bool()),
        (Some(0), Some(false))
    );
    webs
}

/// Sets `api`'s wake hook and waits until every member's map shows it.
async fn make_wakeable(h: &Harness, webs: &mut [Session], wake: Value, timeout: u64) {
    let body = json!({"wake": wake, "wake_timeout_secs": timeout});
    let a = h
        .call(Method::PATCH, "/v1/networks/prod/addresses/api", Some(body))
        .await
        .unwrap();
    assert_eq!(a["wake_timeout_secs"], json!(timeout));
    for s in webs.iter_mut() {
        until(s, Duration::from_secs(5), |s| {
            s.map().addresses["api"].wake_timeout_secs == Some(timeout as u16)
        })
        .await;
    }
}

/// Every member asks at once.
async fn wake_all(webs: Vec<Session>) -> Vec<Session> {
    let tasks: Vec<_> = webs
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                assert_eq!(s.wake("api"), Ok(true));
                s
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// The next refusal the keyserver sends on this session.
async fn rejected(s: &mut Session) -> ErrorCode {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(5), s.next_event())
            .await
            .expect("an answer in time")
            .expect("the session goes on");
        if let Event::Rejected(e) = ev {
            return e.code;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_waking_at_once_run_the_command_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("woken");
    let h = Harness::start(&dir.path().join("ks"), |c| c.allow_wake_commands = true).await;
    let mut webs = setup(&h).await;
    let cmd = format!("echo \"$ISTM_HOOK_SERVICE\" >> {}", out.display());
    make_wakeable(&h, &mut webs, json!({"command": ["sh", "-c", cmd]}), 2).await;
    let mut webs = wake_all(webs).await;
    assert!(eventually(Duration::from_secs(5), || lines(&out) == 1).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "api\n", "ran once");
    let a = h
        .call(Method::GET, "/v1/networks/prod/addresses/api", None)
        .await
        .unwrap();
    assert_eq!(a["waking"], true);
    assert!(a["waking_since"].is_u64() && a["last_flow"].is_u64());
    let m = metrics(&h).await;
    assert_eq!(
        series(
            &m,
            "istmesh_keyserver_wake_requests_total{result=\"started\"}"
        ),
        1
    );
    assert_eq!(
        series(
            &m,
            "istmesh_keyserver_wake_requests_total{result=\"already_waking\"}"
        ),
        2
    );
    assert_eq!(
        series(&m, "istmesh_keyserver_service_hooks_total{hook=\"wake\"}"),
        1
    );
    assert_eq!(
        series(
            &m,
            "istmesh_keyserver_service_hook_failures_total{hook=\"wake\"}"
        ),
        0
    );
    // After the wake timeout, with still nothing online: once more.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    webs = wake_all(webs).await;
    assert!(eventually(Duration::from_secs(5), || lines(&out) == 2).await);
    // Bad requests run nothing: an unknown service, a service that is not
    // wakeable (web, online besides), another network's service.
    let s = &mut webs[0];
    s.send_raw(&ClientMsg::Wake {
        service: "nope".into(),
    })
    .await
    .unwrap();
    assert_eq!(rejected(s).await, ErrorCode::InvalidMetadata);
    s.send_raw(&ClientMsg::Wake {
        service: "web".into(),
    })
    .await
    .unwrap();
    assert_eq!(rejected(s).await, ErrorCode::Forbidden);
    h.network("other", "10.250.0.0/22").await;
    let token = h.token("other", json!({"uses": 1})).await;
    let (_k, mut stranger) = join(&client_endpoint(), &token, "x").await;
    stranger
        .send_raw(&ClientMsg::Wake {
            service: "api".into(),
        })
        .await
        .unwrap();
    assert_eq!(rejected(&mut stranger).await, ErrorCode::InvalidMetadata);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(lines(&out), 2);
    let m = metrics(&h).await;
    assert_eq!(
        series(
            &m,
            "istmesh_keyserver_wake_requests_total{result=\"refused\"}"
        ),
        3
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_hooks_are_posted_once_and_commands_need_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path(), |_| {}).await;
    let mut webs = setup(&h).await;
    // Commands are off on this keyserver: the hook fails, counted.
    let out = dir.path().join("never");
    let cmd = format!("touch {}", out.display());
    make_wakeable(&h, &mut webs, json!({"command": ["sh", "-c", cmd]}), 1).await;
    let mut webs = wake_all(webs).await;
    let failed = || async {
        series(
            &metrics(&h).await,
            "istmesh_keyserver_service_hook_failures_total{hook=\"wake\"}",
        )
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while failed().await == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(failed().await, 1);
    assert!(!out.exists());
    // A small HTTP server on loopback counts the POSTs.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let posts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = posts.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let count = count.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !String::from_utf8_lossy(&got).contains("\"address\"") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                if String::from_utf8_lossy(&got).starts_with("POST /wake ") {
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    .await;
            });
        }
    });
    tokio::time::sleep(Duration::from_millis(1100)).await;
    make_wakeable(
        &h,
        &mut webs,
        json!({"url": format!("http://{addr}/wake")}),
        30,
    )
    .await;
    let _webs = wake_all(webs).await;
    let seen = posts.clone();
    assert!(
        eventually(Duration::from_secs(5), move || seen
            .load(std::sync::atomic::Ordering::SeqCst)
            == 1)
        .await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        posts.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "posted once"
    );
    h.stop().await;
}

fn report(pairs: &[(&str, u64, u64)]) -> TrafficReport {
    TrafficReport {
        pairs: pairs
            .iter()
            .map(|(dest, opened, bytes)| PairTraffic {
                destination: (*dest).into(),
                counters: TrafficCounters {
                    opened: *opened,
                    bytes_sent: *bytes,
                    ..Default::default()
                },
            })
            .collect(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_reports_make_the_service_graph_and_bad_ones_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path(), |_| {}).await;
    let mut webs = setup(&h).await;
    webs[0]
        .report_traffic(report(&[("api", 3, 300), ("ghost", 1, 1)]))
        .unwrap();
    webs[1].report_traffic(report(&[("api", 2, 200)])).unwrap();
    let mut graph = Value::Null;
    for _ in 0..100 {
        graph = h
            .call(Method::GET, "/v1/networks/prod/traffic", None)
            .await
            .unwrap();
        if graph["reporters"] == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(graph["reporters"], 2, "{graph}");
    let edges = graph["edges"].as_array().unwrap();
    assert_eq!(edges.len(), 1, "the unknown service is dropped: {graph}");
    assert_eq!(edges[0]["source"], "web");
    assert_eq!(edges[0]["destination"], "api");
    assert_eq!(
        (edges[0]["opened"].as_u64(), edges[0]["bytes_sent"].as_u64()),
        (Some(5), Some(500))
    );
    let api = graph["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"] == "api")
        .unwrap();
    assert!(api["address"].is_string() && api["last_flow"].is_u64());
    assert_eq!(api["instances"], json!([]));
    // A malformed report (a destination twice), sent as is: dropped and
    // counted; the session goes on and the graph is as it was.
    let mut twice = report(&[("api", 50, 5000)]);
    twice.pairs.push(twice.pairs[0].clone());
    webs[0].send_raw(&ClientMsg::Traffic(twice)).await.unwrap();
    webs[0].heartbeat().await.unwrap();
    until(&mut webs[0], Duration::from_secs(5), |s| {
        s.core().is_caught_up()
    })
    .await;
    // `is_caught_up` may hold before the report is handled: wait for the
    // count (bounded), then check it is exactly one.
    let mut m = metrics(&h).await;
    for _ in 0..100 {
        let counted = m.lines().any(|l| {
            l.strip_prefix("istmesh_keyserver_traffic_dropped_total{reason=\"malformed\"} ")
                .is_some_and(|v| v.trim() != "0")
        });
        if counted {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        m = metrics(&h).await;
    }
    assert_eq!(
        series(
            &m,
            "istmesh_keyserver_traffic_dropped_total{reason=\"malformed\"}"
        ),
        1
    );
    assert_eq!(
        series(
            &m,
            "istmesh_keyserver_traffic_dropped_total{reason=\"unknown_service\"}"
        ),
        1
    );
    let again = h
        .call(Method::GET, "/v1/networks/prod/traffic", None)
        .await
        .unwrap();
    assert_eq!(again["edges"], graph["edges"]);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_address_api_and_cli_show_and_change_settings() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path(), |_| {}).await;
    let _webs = setup(&h).await;
    std::fs::write(dir.path().join("api.url"), format!("{}\n", h.api)).unwrap();
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_keyserver"))
            .arg("--data-dir")
            .arg(dir.path())
            .args(args)
            .output()
            .unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    };
    let list = h
        .call(Method::GET, "/v1/networks/prod/addresses", None)
        .await
        .unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["service"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["api", "web"]);
    // Errors: 404 unknown network or service, 400 bad values, 422 unknown
    // fields; nothing changes.
    let status = |r: Result<Value, keyserver::admin::AdminClientError>| match r {
        Err(keyserver::admin::AdminClientError::Status { status, .. }) => status,
        other => panic!("expected an error status, got {other:?}"),
    };
    let patch = |path: &'static str, body: Value| h.call(Method::PATCH, path, Some(body));
    let one = "/v1/networks/prod/addresses/api";
    assert_eq!(
        status(patch("/v1/networks/nope/addresses/api", json!({})).await),
        404
    );
    assert_eq!(
        status(patch("/v1/networks/prod/addresses/nope", json!({})).await),
        404
    );
    assert_eq!(
        status(
            patch(
                one,
                json!({"wake_timeout_secs": 5000, "wake": {"url": "http://127.0.0.1:1/"}})
            )
            .await
        ),
        400
    );
    assert_eq!(
        status(patch(one, json!({"wake_timeout_secs": 10})).await),
        400
    );
    assert_eq!(
        status(patch(one, json!({"idle": {"url": "http://127.0.0.1:1/"}})).await),
        400
    );
    assert_eq!(
        status(patch(one, json!({"wake": {"url": "file:///etc"}})).await),
        400
    );
    assert_eq!(status(patch(one, json!({"colour": "blue"})).await), 422);
    let a = h.call(Method::GET, one, None).await.unwrap();
    assert!(a["wake"].is_null() && a["wake_timeout_secs"].is_null());
    // The CLI sets and lists.
    let (ok, _, err) = cli(&[
        "service-address",
        "set",
        "api",
        "--network",
        "prod",
        "--wake-timeout",
        "45s",
        "--idle-after",
        "10m",
        "--idle-url",
        "http://127.0.0.1:9/idle",
        "--wake-command",
        "systemctl",
        "start",
        "api",
    ]);
    assert!(ok, "{err}");
    let a = h.call(Method::GET, one, None).await.unwrap();
    assert_eq!(a["wake"], json!({"command": ["systemctl", "start", "api"]}));
    assert_eq!(
        (
            a["wake_timeout_secs"].as_u64(),
            a["idle_after_secs"].as_u64()
        ),
        (Some(45), Some(600))
    );
    assert_eq!(a["idle_hook"], json!({"url": "http://127.0.0.1:9/idle"}));
    let (ok, table, err) = cli(&["service-address", "list", "--network", "prod"]);
    assert!(ok, "{err}");
    assert!(
        table.lines().any(|l| l.starts_with("api ")
            && l.contains("command")
            && l.contains("45s")
            && l.contains("600s")),
        "{table}"
    );
    let (ok, _, err) = cli(&[
        "service-address",
        "set",
        "api",
        "--network",
        "prod",
        "--no-wake",
        "--no-idle",
    ]);
    assert!(ok, "{err}");
    let a = h.call(Method::GET, one, None).await.unwrap();
    assert!(a["wake"].is_null() && a["idle_after_secs"].is_null() && a["idle_hook"].is_null());
    let (ok, _, err) = cli(&[
        "service-address",
        "set",
        "api",
        "--network",
        "prod",
        "--wake-timeout",
        "2h",
        "--wake-url",
        "http://127.0.0.1:9/",
    ]);
    assert!(!ok && err.contains("wake_timeout_secs"), "{err}");
    let (ok, table, err) = cli(&["network", "traffic", "prod"]);
    assert!(ok, "{err}");
    assert!(
        table.contains("SOURCE -> DESTINATION") && table.contains("api"),
        "{table}"
    );
    let (ok, json_out, _) = cli(&["network", "traffic", "prod", "--json"]);
    assert!(ok);
    let v: Value = serde_json::from_str(&json_out).unwrap();
    assert_eq!(v["name"], "prod");
    // The OpenAPI document has the routes and what they return.
    let doc = h.call(Method::GET, "/openapi.json", None).await.unwrap();
    for path in [
        "/v1/networks/{net}/addresses",
        "/v1/networks/{net}/addresses/{service}",
        "/v1/networks/{net}/traffic",
    ] {
        assert!(doc["paths"][path].is_object(), "{path}");
    }
    let schemas = &doc["components"]["schemas"];
    let graph = h
        .call(Method::GET, "/v1/networks/prod/traffic", None)
        .await
        .unwrap();
    for key in graph.as_object().unwrap().keys() {
        assert!(
            schemas["TrafficGraph"]["properties"].get(key).is_some(),
            "TrafficGraph.{key}"
        );
    }
    let detail = &schemas["ServiceAddressDetail"]["allOf"];
    let a = h.call(Method::GET, one, None).await.unwrap();
    for key in a.as_object().unwrap().keys() {
        let documented = detail[0].get("$ref").is_some()
            && (schemas["ServiceAddress"]["properties"].get(key).is_some()
                || detail[1]["properties"].get(key).is_some());
        assert!(documented, "ServiceAddressDetail.{key}");
    }
    h.stop().await;
}
