//! The admin API as an operator, a careless script and a slow client see it:
//! every error is JSON and documented in the OpenAPI document, input is
//! validated, slow clients cannot hold the API, networks can be deleted.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// One HTTP exchange as seen on the wire.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: BTreeMap<String, String>,
    body: Value,
}

fn host(h: &Harness) -> String {
    h.api.trim_start_matches("http://").to_owned()
}

/// Sends `request` (a complete HTTP/1.1 request) on a fresh connection and
/// reads the answer until the server closes it.
async fn raw(h: &Harness, request: &[u8]) -> Answer {
    let mut stream = TcpStream::connect(host(h)).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut bytes = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut bytes))
        .await
        .expect("answer in time")
        .unwrap();
    parse(&bytes)
}

fn parse(bytes: &[u8]) -> Answer {
    let text = String::from_utf8_lossy(bytes);
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete answer");
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_owned()))
        .collect();
    let body = if headers.get("transfer-encoding").map(String::as_str) == Some("chunked") {
        dechunk(body)
    } else {
        body.to_owned()
    };
    let body = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&body).unwrap_or(Value::String(body))
    };
    Answer {
        status,
        headers,
        body,
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A request with the admin token (or `auth`), `Connection: close`.
fn request(
    h: &Harness,
    method: &str,
    path: &str,
    auth: bool,
    body: Option<(&str, &[u8])>,
) -> Vec<u8> {
    let mut out = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
        host(h)
    );
    if auth {
        out.push_str(&format!("Authorization: Bearer {}\r\n", h.admin_token));
    }
    let mut bytes = match body {
        Some((ctype, data)) => {
            if !ctype.is_empty() {
                out.push_str(&format!("Content-Type: {ctype}\r\n"));
            }
            out.push_str(&format!("Content-Length: {}\r\n\r\n", data.len()));
            let mut b = out.into_bytes();
            b.extend_from_slice(data);
            b
        }
        None => {
            out.push_str("\r\n");
            out.into_bytes()
        }
    };
    bytes.shrink_to_fit();
    bytes
}

/// The OpenAPI path template matching a concrete path.
fn template<'a>(doc: &'a Value, path: &str) -> Option<&'a str> {
    let path = path.split('?').next().unwrap();
    let parts: Vec<&str> = path.split('/').collect();
    doc["paths"]
        .as_object()?
        .keys()
        .map(String::as_str)
        .find(|t| {
            let tparts: Vec<&str> = t.split('/').collect();
            tparts.len() == parts.len()
                && tparts
                    .iter()
                    .zip(&parts)
                    .all(|(t, p)| t.starts_with('{') || t == p)
        })
}

/// The statuses documented for one path and method.
fn documented(doc: &Value, template: &str, method: &str) -> Vec<u16> {
    doc["paths"][template][method.to_lowercase()]["responses"]
        .as_object()
        .map(|r| r.keys().filter_map(|k| k.parse().ok()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_is_json_and_every_status_is_documented() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path(), |c| {
        c.api_request_timeout_secs = 2;
        c.api_max_body = 16 * 1024;
    })
    .await;
    let doc = h
        .call(hyper::Method::GET, "/openapi.json", None)
        .await
        .unwrap();
    h.network("prod", "10.240.0.0/22").await;
    let token = h.token("prod", json!({"uses": 3})).await;
    let ep = client_endpoint();
    let (_k, _member) = join(&ep, &token, "api").await;

    let big = format!("{{\"name\": \"{}\"}}", "x".repeat(100 * 1024));
    let huge_binding = format!("{{\"service\": \"{}\"}}", "s".repeat(20 * 1024));
    let long_binding = format!("{{\"service\": \"{}\"}}", "s".repeat(200));
    let j = "application/json";
    // (method, path, auth, body, expected status)
    #[allow(clippy::type_complexity)]
    let cases: Vec<(&str, &str, bool, Option<(&str, &[u8])>, u16)> = vec![
        ("GET", "/v1/networks", false, None, 401),
        ("GET", "/nope", false, None, 401),
        ("GET", "/nope", true, None, 404),
        ("GET", "/v1/networks/prod/nope", true, None, 404),
        ("PUT", "/v1/networks", true, Some((j, b"{}")), 405),
        ("PUT", "/v1/networks/prod", true, Some((j, b"{}")), 405),
        ("POST", "/healthz", false, None, 405),
        ("POST", "/v1/networks", true, Some((j, b"{")), 400),
        (
            "POST",
            "/v1/networks",
            true,
            Some(("", b"{\"name\":\"x\"}")),
            415,
        ),
        (
            "POST",
            "/v1/networks",
            true,
            Some(("text/plain", b"{\"name\":\"x\"}")),
            415,
        ),
        (
            "POST",
            "/v1/networks",
            true,
            Some((j, b"{\"name\": 5}")),
            422,
        ),
        (
            "POST",
            "/v1/networks",
            true,
            Some((j, b"{\"name\":\"x\",\"extra\":1}")),
            422,
        ),
        ("POST", "/v1/networks", true, Some((j, big.as_bytes())), 413),
        (
            "POST",
            "/v1/networks",
            true,
            Some((j, b"{\"name\":\".\"}")),
            400,
        ),
        (
            "POST",
            "/v1/networks",
            true,
            Some((j, b"{\"name\":\"..\"}")),
            400,
        ),
        (
            "POST",
            "/v1/networks",
            true,
            Some((j, b"{\"name\":\" \"}")),
            400,
        ),
        (
            "POST",
            "/v1/networks",
            true,
            Some((j, "{\"name\":\"pro\u{200B}d\"}".as_bytes())),
            400,
        ),
        (
            "POST",
            "/v1/networks",
            true,
            Some((j, "{\"name\":\"a\u{202E}b\"}".as_bytes())),
            400,
        ),
        (
            "POST",
            "/v1/networks",
            true,
            Some((j, b"{\"name\":\"prod\"}")),
            409,
        ),
        (
            "POST",
            "/v1/networks",
            true,
            Some((j, b"{\"name\":\"PROD\"}")),
            409,
        ),
        (
            "POST",
            "/v1/networks",
            true,
            Some((j, "{\"name\":\"prоd\"}".as_bytes())),
            409,
        ),
        (
            "POST",
            "/v1/networks",
            true,
            Some((j, b"{\"name\":\"x\",\"range\":\"0.0.0.0/0\"}")),
            400,
        ),
        (
            "POST",
            "/v1/networks",
            true,
            Some((j, b"{\"name\":\"x\",\"range\":\"127.0.0.0/24\"}")),
            400,
        ),
        (
            "POST",
            "/v1/networks",
            true,
            Some((j, b"{\"name\":\"x\",\"range\":\"224.1.0.0/24\"}")),
            400,
        ),
        (
            "POST",
            "/v1/networks",
            true,
            Some((j, b"{\"name\":\"x\",\"range\":\"169.254.0.0/16\"}")),
            400,
        ),
        (
            "POST",
            "/v1/networks",
            true,
            Some((j, b"{\"name\":\"x\",\"range\":\"10.0.0.1/32\"}")),
            400,
        ),
        (
            "POST",
            "/v1/networks",
            true,
            Some((j, b"{\"name\":\"x\",\"range\":\"10.0.0.0/8\"}")),
            400,
        ),
        (
            "POST",
            "/v1/networks",
            true,
            Some((j, b"{\"name\":\"x\",\"range\":\"soon\"}")),
            400,
        ),
        ("GET", "/v1/networks/ghost", true, None, 404),
        ("DELETE", "/v1/networks/ghost", true, None, 404),
        ("DELETE", "/v1/networks/prod", true, None, 409),
        ("DELETE", "/v1/networks/prod?force=maybe", true, None, 400),
        ("GET", "/v1/networks/ghost/members", true, None, 404),
        ("DELETE", "/v1/networks/prod/members/ghost", true, None, 404),
        ("GET", "/v1/networks/ghost/tokens", true, None, 404),
        (
            "POST",
            "/v1/networks/ghost/tokens",
            true,
            Some((j, b"{}")),
            404,
        ),
        (
            "POST",
            "/v1/networks/prod/tokens",
            true,
            Some((j, b"{\"expires\":\"0s\"}")),
            400,
        ),
        (
            "POST",
            "/v1/networks/prod/tokens",
            true,
            Some((j, b"{\"expires\":\"400d\"}")),
            400,
        ),
        (
            "POST",
            "/v1/networks/prod/tokens",
            true,
            Some((j, b"{\"expires\":\"soon\"}")),
            400,
        ),
        (
            "POST",
            "/v1/networks/prod/tokens",
            true,
            Some((j, b"{\"uses\":0}")),
            400,
        ),
        (
            "POST",
            "/v1/networks/prod/tokens",
            true,
            Some((j, b"{\"uses\":-1}")),
            422,
        ),
        (
            "POST",
            "/v1/networks/prod/tokens",
            true,
            Some((j, b"{\"service\":\"a\\u001b[31mb\"}")),
            400,
        ),
        (
            "POST",
            "/v1/networks/prod/tokens",
            true,
            Some((j, long_binding.as_bytes())),
            400,
        ),
        (
            "POST",
            "/v1/networks/prod/tokens",
            true,
            Some((j, huge_binding.as_bytes())),
            413,
        ),
        (
            "POST",
            "/v1/networks/prod/tokens",
            true,
            Some((j, b"{\"process_type\":\"Bad Type\"}")),
            400,
        ),
        (
            "DELETE",
            "/v1/networks/prod/tokens/tk-000000000000",
            true,
            None,
            404,
        ),
        ("GET", "/healthz", false, None, 200),
        ("GET", "/readyz", false, None, 200),
    ];
    let mut checked = 0;
    for (method, path, auth, body, want) in &cases {
        let answer = raw(&h, &request(&h, method, path, *auth, *body)).await;
        let what = format!("{method} {path}");
        assert_eq!(answer.status, *want, "{what}: {answer:?}");
        let ctype = answer
            .headers
            .get("content-type")
            .cloned()
            .unwrap_or_default();
        assert!(
            ctype.starts_with("application/json"),
            "{what}: content-type {ctype:?}"
        );
        if *want >= 400 {
            let message = answer.body["error"].as_str().unwrap_or_default();
            assert!(!message.is_empty(), "{what}: {:?}", answer.body);
            assert_eq!(
                answer.body.as_object().unwrap().len(),
                1,
                "{what}: only `error`"
            );
        }
        if *want == 405 {
            assert!(answer.headers.contains_key("allow"), "{what}: Allow header");
        }
        // Documented: the status is listed for this operation (a wrong
        // method: listed on the path's operations).
        if let Some(t) = template(&doc, path) {
            let methods: Vec<String> = if *want == 405 {
                doc["paths"][t]
                    .as_object()
                    .unwrap()
                    .keys()
                    .cloned()
                    .collect()
            } else {
                vec![method.to_lowercase()]
            };
            for m in methods {
                let listed = documented(&doc, t, &m);
                assert!(
                    listed.contains(want),
                    "{what}: {want} not documented for {m} {t}: {listed:?}"
                );
                checked += 1;
            }
        }
    }
    eprintln!(
        "{} requests, {checked} documented statuses checked",
        cases.len()
    );

    // A body that trickles: 408, and documented.
    let mut stream = TcpStream::connect(host(&h)).await.unwrap();
    let head = format!(
        "POST /v1/networks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{{\"name\"",
        h.admin_token
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let t = Instant::now();
    let mut bytes = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut bytes))
        .await
        .expect("the server answers a trickling body")
        .unwrap();
    let answer = parse(&bytes);
    assert_eq!(answer.status, 408, "{answer:?}");
    assert!(answer.body["error"].is_string());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(documented(&doc, "/v1/networks", "post").contains(&408));

    // Every error status of the document is an `Error` body.
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            for (status, resp) in op["responses"].as_object().unwrap() {
                if status.starts_with('4') || status.starts_with('5') {
                    let r = resp["$ref"].as_str().unwrap_or_default();
                    let name = r.rsplit('/').next().unwrap();
                    let schema = &doc["components"]["responses"][name]["content"]
                        ["application/json"]["schema"]["$ref"];
                    assert_eq!(
                        schema, "#/components/schemas/Error",
                        "{method} {path} {status}"
                    );
                }
            }
        }
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_describes_what_the_api_returns() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path(), |_| {}).await;
    let doc = h
        .call(hyper::Method::GET, "/openapi.json", None)
        .await
        .unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["servers"][0]["url"].is_string(), "a servers entry");
    let schemas = &doc["components"]["schemas"];
    assert_eq!(schemas["Error"]["required"], json!(["error"]));
    assert_eq!(schemas["Member"]["properties"]["ports"]["type"], "array");
    assert_eq!(schemas["Member"]["properties"]["ip"]["format"], "ipv4");
    assert_eq!(schemas["Network"]["properties"]["range"]["format"], "cidr");
    assert_eq!(schemas["Token"]["properties"]["expires"]["format"], "int64");
    // Every field of every schema has a type or a reference, and every
    // integer and string-with-format is explicit about it.
    for (name, schema) in schemas.as_object().unwrap() {
        for (field, prop) in schema["properties"].as_object().into_iter().flatten() {
            assert!(
                prop.get("type").is_some() || prop.get("$ref").is_some(),
                "{name}.{field}"
            );
            if prop["type"] == "integer" {
                assert!(prop["format"].is_string(), "{name}.{field}: integer format");
            }
        }
    }
    let statuses: Vec<String> = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|ops| ops.as_object().unwrap().values())
        .flat_map(|op| op["responses"].as_object().unwrap().keys().cloned())
        .collect();
    for s in [
        "400", "401", "404", "405", "408", "409", "413", "415", "422", "500", "503",
    ] {
        assert!(statuses.iter().any(|x| x == s), "{s} documented somewhere");
    }
    // What the API returns has only documented fields.
    h.network("prod", "10.240.0.0/22").await;
    let token = h.token("prod", json!({"uses": 2, "service": "api"})).await;
    let (_k, _s) = join(&client_endpoint(), &token, "api").await;
    // A schema's parts: itself, or each of its `allOf` (inline or `$ref`).
    let parts = |schema: &str| -> Vec<Value> {
        match schemas[schema]["allOf"].as_array() {
            None => vec![schemas[schema].clone()],
            Some(all) => all
                .iter()
                .map(|p| match p["$ref"].as_str() {
                    Some(r) => schemas[r.trim_start_matches("#/components/schemas/")].clone(),
                    None => p.clone(),
                })
                .collect(),
        }
    };
    let check = |schema: &str, value: &Value| {
        let parts = parts(schema);
        for key in value.as_object().unwrap().keys() {
            assert!(
                parts.iter().any(|p| p["properties"].get(key).is_some()),
                "{schema}.{key} undocumented"
            );
        }
        for key in parts
            .iter()
            .flat_map(|p| p["required"].as_array().cloned().unwrap_or_default())
        {
            assert!(
                value.get(key.as_str().unwrap()).is_some(),
                "{schema}.{key} missing"
            );
        }
    };
    let nets = h
        .call(hyper::Method::GET, "/v1/networks", None)
        .await
        .unwrap();
    check("Network", &nets[0]);
    let member = &h.members("prod").await[0];
    check("MemberListed", member);
    check("Member", &{
        let mut bare = member.clone();
        for extra in ["dns_names", "path"] {
            bare.as_object_mut().unwrap().remove(extra);
        }
        bare
    });
    let one = h
        .call(
            hyper::Method::GET,
            &format!(
                "/v1/networks/prod/members/{}",
                member["instance"].as_str().unwrap()
            ),
            None,
        )
        .await
        .unwrap();
    check("MemberDetail", &one);
    check("Token", &h.tokens("prod").await[0]);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_cannot_hold_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path(), |c| {
        c.api_header_timeout_secs = 2;
        c.api_max_connections = 32;
    })
    .await;
    // 100 clients that trickle their headers (one byte every 300 ms), and
    // 20 that connect and say nothing: more than the connection limit.
    let mut slow = Vec::new();
    for i in 0..120 {
        let mut s = TcpStream::connect(host(&h)).await.unwrap();
        if i < 100 {
            s.write_all(b"GET /v1/networks HTTP/1.1\r\nHo")
                .await
                .unwrap();
        }
        slow.push(s);
    }
    let trickle = tokio::spawn(async move {
        let t = Instant::now();
        let mut closed = vec![None; slow.len()];
        for _ in 0..40 {
            for (i, s) in slow.iter_mut().enumerate() {
                if closed[i].is_some() {
                    continue;
                }
                let mut buf = [0u8; 256];
                // Closed by the server: a read gives EOF (or a reset).
                match tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => closed[i] = Some(t.elapsed()),
                    _ => {
                        if i < 100 && s.write_all(b"s").await.is_err() {
                            closed[i] = Some(t.elapsed());
                        }
                    }
                }
            }
            if closed.iter().all(Option::is_some) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        closed
    });
    // Meanwhile an operator's requests are answered.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        let t = Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            h.call(hyper::Method::GET, "/v1/networks", None),
        )
        .await
        .expect("the API answers while slow clients are connected");
        r.unwrap();
        worst = worst.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let closed = trickle.await.unwrap();
    let latest = closed
        .iter()
        .map(|c| c.expect("every slow client is cut off"))
        .max()
        .unwrap();
    eprintln!(
        "120 slow clients (limit 32 connections, header timeout 2 s): operator requests answered in at most {worst:?}; all slow clients closed after at most {latest:?}"
    );
    assert!(worst < Duration::from_secs(2), "operator waited {worst:?}");
    assert!(latest < Duration::from_secs(9), "{latest:?}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn networks_are_deleted_and_names_with_any_characters_work_in_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path(), |_| {}).await;
    std::fs::write(dir.path().join("api.url"), format!("{}\n", h.api)).unwrap();
    let cli = |args: &[&str]| -> Result<Value, String> {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_keyserver"))
            .arg("--data-dir")
            .arg(dir.path())
            .args(args)
            .output()
            .unwrap();
        if out.status.success() {
            Ok(serde_json::from_slice(&out.stdout).unwrap())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    };
    for name in ["a/b", "my net", "x?y#z", "q%20r", "é+="] {
        let created = cli(&["network", "create", name]).unwrap();
        assert_eq!(created["name"], name);
        let tok = cli(&["token", "create", "--network", name, "--uses", "2"]).unwrap();
        assert!(
            tok["token"].as_str().unwrap().starts_with("istm1."),
            "{name}"
        );
        let list = cli(&["token", "list", "--network", name]).unwrap();
        assert_eq!(list.as_array().unwrap().len(), 1, "{name}");
        let id = tok["id"].as_str().unwrap();
        cli(&["token", "delete", "--network", name, id]).unwrap();
        assert_eq!(
            cli(&["member", "list", "--network", name, "--json"]).unwrap(),
            json!([])
        );
        cli(&["network", "delete", name]).unwrap();
    }
    // A network with a member: refused, then forced; its member is revoked.
    h.network("prod", "10.240.0.0/22").await;
    let token = h.token("prod", json!({"uses": 2})).await;
    let (_k, mut s) = join(&client_endpoint(), &token, "api").await;
    // Service groups through the CLI: attach and detach the member by name.
    let member = h.members("prod").await[0]["instance"]
        .as_str()
        .unwrap()
        .to_owned();
    cli(&[
        "service",
        "create",
        "web",
        "--network",
        "prod",
        "-p",
        "443:8080/http+tls",
    ])
    .unwrap();
    let attached = cli(&["service", "attach", "web", &member, "--network", "prod"]).unwrap();
    assert_eq!(
        attached["instances"][0]["instance"],
        member.as_str(),
        "{attached}"
    );
    let err = cli(&["service", "attach", "web", "nobody", "--network", "prod"]).unwrap_err();
    assert!(err.contains("404"), "{err}");
    let detached = cli(&["service", "detach", "web", &member, "--network", "prod"]).unwrap();
    assert_eq!(detached["instances"], json!([]), "{detached}");
    let err = cli(&["network", "delete", "prod"]).unwrap_err();
    assert!(
        err.contains("409") && err.contains("still has 1 members"),
        "{err}"
    );
    let out = cli(&["network", "delete", "prod", "--force"]).unwrap();
    assert_eq!(out["members_removed"], 1);
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.next_event().await {
                Err(e) => break e,
                Ok(_) => continue,
            }
        }
    })
    .await
    .expect("the member's session ends");
    assert!(
        matches!(ended, meshlib::control::ControlError::Revoked(_)),
        "{ended:?}"
    );
    assert!(h
        .call(hyper::Method::GET, "/v1/networks", None)
        .await
        .unwrap()
        .as_array()
        .unwrap()
        .is_empty());
    // Its token is gone with it: no join.
    let refused = meshlib::control::join(&client_endpoint(), &token, meta("api").1, &cfg()).await;
    assert!(refused.is_err());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_used_up_tokens_are_collected() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path(), |c| c.token_gc_secs = 1).await;
    h.network("prod", "10.240.0.0/22").await;
    h.token("prod", json!({"uses": 1, "expires": "1s"})).await;
    let once = h.token("prod", json!({"uses": 1})).await;
    let kept = h.token("prod", json!({"uses": 5, "expires": "1h"})).await;
    let (_k, _s) = join(&client_endpoint(), &once, "api").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = h.tokens("prod").await;
        if left.len() == 1 {
            assert_eq!(left[0]["uses_left"], 5);
            break;
        }
        assert!(Instant::now() < deadline, "tokens left: {left:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The collected ones admit nobody; the kept one still works.
    let refused = meshlib::control::join(&client_endpoint(), &once, meta("api").1, &cfg()).await;
    assert!(refused.is_err());
    join(&client_endpoint(), &kept, "api").await;
    h.stop().await;
}
