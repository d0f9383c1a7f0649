//! What the admin API accepts, as its OpenAPI document says: integers
//! written as `554.0`, empty durations, `null` for optional fields; and how
//! it refuses the rest, in its own words (no framework wording, a port
//! named once).

mod common;

use std::time::Duration;

use common::Harness;
use hyper::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// One request with the admin token and `content_type`; returns status and
/// JSON body.
async fn send(
    h: &Harness,
    method: &str,
    path: &str,
    content_type: &str,
    body: &str,
) -> (u16, Value) {
    let addr = h.api.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        h.admin_token,
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status: u16 = text[9..12].parse().unwrap();
    let (_, rest) = text.split_once("\r\n\r\n").unwrap();
    (status, serde_json::from_str(rest).unwrap_or(Value::Null))
}

async fn json_call(h: &Harness, method: &str, path: &str, body: &str) -> (u16, Value) {
    send(h, method, path, "application/json", body).await
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_valid_requests_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path(), |_| {}).await;
    // Empty and null durations are the defaults.
    let (s, net) = json_call(
        &h,
        "POST",
        "/v1/networks",
        r#"{"name": "prod", "range": null, "expire_after": ""}"#,
    )
    .await;
    assert_eq!(s, 201, "{net}");
    assert_eq!(net["range"], "10.240.0.0/22");
    assert!(net["expire_after"].is_null());
    let (s, net) = json_call(
        &h,
        "PATCH",
        "/v1/networks/prod",
        r#"{"expire_after": "2h"}"#,
    )
    .await;
    assert_eq!(
        (s, net["expire_after"].as_u64()),
        (200, Some(7200)),
        "{net}"
    );
    let (s, net) = json_call(&h, "PATCH", "/v1/networks/prod", r#"{"expire_after": ""}"#).await;
    assert_eq!(s, 200, "{net}");
    assert!(net["expire_after"].is_null(), "{net}");
    // Integers written with a fractional part of zero; every optional field null.
    let body = r#"{"uses": 2.0, "expires": "", "service": null, "process_type": null, "service_group": null}"#;
    let (s, t) = json_call(&h, "POST", "/v1/networks/prod/tokens", body).await;
    assert_eq!(s, 201, "{t}");
    assert_eq!(t["uses_left"], 2);
    let expires = t["expires"].as_u64().unwrap();
    assert!(
        expires.abs_diff(now() + 3600) < 60,
        "the default hour: {expires}"
    );
    let body = r#"{"name": "rtsp", "ports": [{"port": 554.0, "destination_port": 8554e0, "handlers": ["tls"]}], "soft_limit": 2.0, "hard_limit": 10.00}"#;
    let (s, g) = json_call(&h, "POST", "/v1/networks/prod/services", body).await;
    assert_eq!(s, 201, "{g}");
    assert_eq!(
        (g["ports"][0]["port"].as_u64(), g["soft_limit"].as_u64()),
        (Some(554), Some(2))
    );
    let (s, g) = json_call(
        &h,
        "PATCH",
        "/v1/networks/prod/services/rtsp",
        r#"{"hard_limit": 20.0}"#,
    )
    .await;
    assert_eq!((s, g["hard_limit"].as_u64()), (200, Some(20)), "{g}");
    // The document says so: every optional field of a token's body takes null.
    let doc = h.call(Method::GET, "/openapi.json", None).await.unwrap();
    let props = &doc["paths"]["/v1/networks/{net}/tokens"]["post"]["requestBody"]["content"]
        ["application/json"]["schema"]["properties"];
    for field in [
        "uses",
        "expires",
        "service",
        "process_type",
        "service_group",
    ] {
        let types = props[field]["type"]
            .as_array()
            .unwrap_or_else(|| panic!("{field}: {}", props[field]));
        assert!(types.contains(&json!("null")), "{field}");
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_in_our_own_words() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path(), |_| {}).await;
    h.network("prod", "10.240.0.0/22").await;
    let cases = [
        (
            r#"{"uses": 1.5}"#,
            "invalid uses: expected a whole number from 0 to 4294967295, got the number 1.5",
        ),
        (
            r#"{"uses": "two"}"#,
            "invalid uses: expected a whole number from 0 to 4294967295, got string \"two\"",
        ),
        (
            r#"{"uses": -1}"#,
            "invalid uses: expected a whole number from 0 to 4294967295, got the number -1",
        ),
        (
            r#"{"ephemeral": "yes"}"#,
            "invalid ephemeral: expected true or false, got string \"yes\"",
        ),
    ];
    for (body, want) in cases {
        let (s, answer) = json_call(&h, "POST", "/v1/networks/prod/tokens", body).await;
        assert_eq!(s, 422, "{body}: {answer}");
        assert_eq!(answer["error"], want, "{body}");
    }
    let (s, answer) = json_call(&h, "POST", "/v1/networks/prod/tokens", r#"{"usses": 1}"#).await;
    assert_eq!(s, 422);
    let error = answer["error"].as_str().unwrap();
    assert!(error.contains("unknown field `usses`"), "{error}");
    let ports = r#"{"name": "s", "ports": [{"port": 443, "handlers": "tls"}]}"#;
    let (s, answer) = json_call(&h, "POST", "/v1/networks/prod/services", ports).await;
    assert_eq!(s, 422, "{answer}");
    assert_eq!(
        answer["error"],
        "invalid ports[0].handlers: expected an array, got string \"tls\""
    );
    let (s, answer) = json_call(&h, "POST", "/v1/networks/prod/tokens", "{").await;
    assert_eq!(s, 400);
    assert!(answer["error"]
        .as_str()
        .unwrap()
        .starts_with("the body is not valid JSON"));
    let (s, answer) = send(&h, "POST", "/v1/networks/prod/tokens", "text/plain", "{}").await;
    assert_eq!(s, 415);
    assert!(answer["error"]
        .as_str()
        .unwrap()
        .contains("content-type: application/json"));
    // No framework wording: the messages of every shape error above.
    for body in [
        r#"{"uses": []}"#,
        r#"[]"#,
        r#"{"expires": 5}"#,
        r#"{"service": {}}"#,
    ] {
        let (s, answer) = json_call(&h, "POST", "/v1/networks/prod/tokens", body).await;
        let text = answer["error"].as_str().unwrap();
        assert_eq!(s, 422, "{body}: {text}");
        assert!(
            !text.contains("Failed to") && !text.contains("deserialize"),
            "{text}"
        );
        assert!(text.starts_with("invalid "), "{text}");
    }
    // A handler rule names the port once.
    let body = r#"{"name": "web", "ports": [{"port": 443, "handlers": ["http"]}]}"#;
    let (s, answer) = json_call(&h, "POST", "/v1/networks/prod/services", body).await;
    assert_eq!(s, 400);
    assert_eq!(answer["error"], "port 443 must have the tls handler");
    assert_eq!(
        (answer["rule"].as_str(), answer["port"].as_u64()),
        (Some("port-443-requires-tls"), Some(443))
    );
    h.stop().await;
}
