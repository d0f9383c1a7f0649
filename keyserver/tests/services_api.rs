//! Service groups (seed 002) through a real keyserver: the admin API's
//! rules and errors (400 with JSON naming the port and the rule), persistent
//! versus instance-owned groups, attach by token binding, by
//! `--service-group` and through the API, pushes to members, the
//! seed-shaped `/services` aliases, and the store across a restart.

mod common;

use std::time::Duration;

use common::{cfg, client_endpoint, meta, until, Harness};
use hyper::Method;
use meshlib::control;
use meshlib::services::{parse_publish, JoinServices};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Sends one request with a raw HTTP/1.1 client; returns status and JSON body.
async fn raw(h: &Harness, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let addr = h.api.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
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
    let (head, rest) = text.split_once("\r\n\r\n").unwrap();
    assert!(
        status == 204
            || head
                .to_ascii_lowercase()
                .contains("content-type: application/json"),
        "{head}"
    );
    // Bodies of these answers are small: hyper sends them with a length.
    (status, serde_json::from_str(rest).unwrap_or(Value::Null))
}

fn port(p: i64, handlers: &[&str]) -> Value {
    json!({"port": p, "destination_port": 8080, "handlers": handlers})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rule_is_a_400_naming_port_and_rule() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path(), |_| {}).await;
    h.network("prod", "10.240.0.0/22").await;
    let path = "/v1/networks/prod/services";
    let cases: Vec<(Value, &str, Option<i64>)> = vec![
        (json!([port(80, &[])]), "port-80-requires-http", Some(80)),
        (
            json!([port(80, &["http", "tls"])]),
            "port-80-forbids-tls",
            Some(80),
        ),
        (
            json!([port(443, &["tls"])]),
            "port-443-requires-http",
            Some(443),
        ),
        (
            json!([port(443, &["http"])]),
            "port-443-requires-tls",
            Some(443),
        ),
        (
            json!([port(443, &["http", "tls", "redirect"])]),
            "redirect-only-on-port-80",
            Some(443),
        ),
        (
            json!([port(10000, &[])]),
            "other-ports-require-tls",
            Some(10000),
        ),
        (
            json!([port(10000, &["tls", "http"])]),
            "other-ports-forbid-http",
            Some(10000),
        ),
        (
            json!([{"port": 5353, "protocol": "udp", "handlers": ["tls"], "ip": "203.0.113.5"}]),
            "udp-takes-no-handlers",
            Some(5353),
        ),
        (
            json!([{"port": 5353, "protocol": "udp"}]),
            "udp-requires-ip",
            Some(5353),
        ),
        (json!([port(0, &["tls"])]), "port-range", Some(0)),
        (json!([port(70000, &["tls"])]), "port-range", Some(70000)),
        (
            json!([port(10000, &["tls", "gzip"])]),
            "handler-name",
            Some(10000),
        ),
        (
            json!([port(443, &["http", "tls"]), port(443, &["http", "tls"])]),
            "port-twice",
            Some(443),
        ),
        (json!([]), "no-ports", None),
    ];
    for (ports, rule, at) in cases {
        let (status, body) =
            raw(&h, "POST", path, Some(json!({"name": "s", "ports": ports}))).await;
        assert_eq!(status, 400, "{ports}: {body}");
        assert_eq!(body["rule"], rule, "{ports}: {body}");
        assert_eq!(body["port"].as_i64(), at, "{ports}: {body}");
        assert!(body["error"]
            .as_str()
            .unwrap()
            .contains(&at.map(|p| format!("port {p}")).unwrap_or_default()));
    }
    let ok = json!([port(443, &["http", "tls"])]);
    for (soft, hard, rule) in [
        (json!(5), json!(2), "soft-above-hard"),
        (json!(0), json!(2), "limit-range"),
        (json!(1), json!(65536), "limit-range"),
    ] {
        let (status, body) = raw(
            &h,
            "POST",
            path,
            Some(json!({"name": "s", "ports": ok, "soft_limit": soft, "hard_limit": hard})),
        )
        .await;
        assert_eq!((status, body["rule"].as_str()), (400, Some(rule)), "{body}");
    }
    // Nothing was created by any of them.
    assert_eq!(raw(&h, "GET", path, None).await.1, json!([]));
    // PATCH: the same rules, and the group is unchanged on error.
    let (status, created) = raw(
        &h,
        "POST",
        path,
        Some(json!({"name": "s", "ports": ok, "soft_limit": 2, "hard_limit": 4})),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let (status, body) = raw(
        &h,
        "PATCH",
        "/v1/networks/prod/services/s",
        Some(json!({"hard_limit": 1})),
    )
    .await;
    assert_eq!(
        (status, body["rule"].as_str()),
        (400, Some("soft-above-hard")),
        "{body}"
    );
    let (status, body) = raw(
        &h,
        "PATCH",
        "/v1/networks/prod/services/s",
        Some(json!({"ports": [port(80, &["http", "tls"])]})),
    )
    .await;
    assert_eq!(
        (status, body["rule"].as_str(), body["port"].as_i64()),
        (400, Some("port-80-forbids-tls"), Some(80))
    );
    let (_, now) = raw(&h, "GET", "/v1/networks/prod/services/s", None).await;
    assert_eq!(
        (now["soft_limit"].as_i64(), now["hard_limit"].as_i64()),
        (Some(2), Some(4))
    );
    assert_eq!(now["ports"], created["ports"]);
    // Unknown group, name taken, bad JSON.
    assert_eq!(
        raw(&h, "GET", "/v1/networks/prod/services/nope", None)
            .await
            .0,
        404
    );
    assert_eq!(
        raw(&h, "POST", path, Some(json!({"name": "s", "ports": ok})))
            .await
            .0,
        409
    );
    assert_eq!(
        raw(
            &h,
            "POST",
            path,
            Some(json!({"name": "s", "ports": ok, "bogus": 1}))
        )
        .await
        .0,
        422
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_example_groups_members_and_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::start(dir.path(), |c| c.service_domain = "fra.example.test".into()).await;
    h.network("prod", "10.240.0.0/22").await;
    // Seed 002's example: 443 http+tls, 80 http+redirect, 10000 tls.
    let body = json!({"name": "my-service", "ports": [
        port(443, &["http", "tls"]), port(80, &["http", "redirect"]), port(10000, &["tls"])]});
    let g = h
        .call(Method::POST, "/v1/networks/prod/services", Some(body))
        .await
        .unwrap();
    let fqdn = g["fqdn"].as_str().unwrap().to_owned();
    let label = fqdn.strip_suffix(".fra.example.test").unwrap();
    let random = label.strip_prefix("my-service-").unwrap();
    assert!(
        random.len() == 8 && random.bytes().all(|b| b.is_ascii_lowercase()),
        "{fqdn}"
    );
    assert_eq!(g["persistent"], true);
    assert_eq!(
        (g["soft_limit"].as_i64(), g["hard_limit"].as_i64()),
        (Some(1), Some(65535))
    );

    // A gateway-like member follows the map; members join three ways.
    let ep = client_endpoint();
    let gw_token = h.token("prod", json!({"uses": 1})).await;
    let (_gk, mut gw) = common::join(&ep, &gw_token, "gateway").await;
    assert_eq!(gw.map().services.len(), 1);
    let bound = h
        .token("prod", json!({"uses": 1, "service_group": "my-service"}))
        .await;
    assert_eq!(
        h.tokens("prod")
            .await
            .iter()
            .filter(|t| t["service_group"] == "my-service")
            .count(),
        1
    );
    let (_k1, mut s1) = common::join(&ep, &bound, "web").await;
    let plain = h.token("prod", json!({"uses": 3})).await;
    let (_k2, m2) = meta("web");
    let flag = JoinServices {
        groups: vec!["my-service".parse().unwrap()],
        publish: vec![],
    };
    let s2 = control::join_with_services(&ep, &plain, m2, flag, &cfg())
        .await
        .unwrap();
    let (_k3, mut m3) = meta("api");
    m3.instance = Some("api-one".parse().unwrap());
    let publish = JoinServices {
        groups: vec![],
        publish: vec![parse_publish("443:8080/http+tls").unwrap().check().unwrap()],
    };
    let mut s3 = control::join_with_services(&ep, &plain, m3, publish, &cfg())
        .await
        .unwrap();
    let (i1, i2) = (
        s1.welcome().instance.to_string(),
        s2.welcome().instance.to_string(),
    );
    // The gateway sees both groups with their instances, pushed.
    until(&mut gw, Duration::from_secs(10), |s| {
        let m = s.map();
        m.services.len() == 2
            && m.services
                .values()
                .any(|g| g.owner.as_ref().map(|o| o.as_str()) == Some("api-one"))
            && m.services.values().any(|g| g.instances.len() == 2)
    })
    .await;
    let list = h
        .call(Method::GET, "/v1/networks/prod/services", None)
        .await
        .unwrap();
    let owned = list
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["persistent"] == false)
        .unwrap()
        .clone();
    assert_eq!(owned["owner"], "api-one");
    assert!(owned["name"].as_str().unwrap().starts_with("api-one-"));
    assert_eq!(
        owned["instances"],
        json!([{"instance": "api-one", "state": "online"}])
    );
    let one = h
        .call(Method::GET, "/v1/networks/prod/services/my-service", None)
        .await
        .unwrap();
    let names: Vec<&str> = one["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["instance"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&i1.as_str()) && names.contains(&i2.as_str()),
        "{one}"
    );

    // A --service-group that does not exist is refused, costing no use.
    let (_k4, m4) = meta("web");
    let nope = JoinServices {
        groups: vec!["nope".parse().unwrap()],
        publish: vec![],
    };
    let e = control::join_with_services(&ep, &plain, m4, nope, &cfg())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");

    // Detach and attach through the API (and the seed-shaped alias).
    let detached = h
        .call(
            Method::DELETE,
            &format!("/v1/networks/prod/services/my-service/instances/{i2}"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(detached["instances"].as_array().unwrap().len(), 1);
    let back = h
        .call(
            Method::PUT,
            &format!("/services/my-service/instances/{i2}"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(back["instances"].as_array().unwrap().len(), 2);
    let alias = h
        .call(Method::GET, "/services/my-service", None)
        .await
        .unwrap();
    assert_eq!(alias["fqdn"], fqdn.as_str());
    let created = h
        .call(
            Method::POST,
            "/services",
            Some(json!({"name": "other", "services": [port(10001, &["tls"])]})),
        )
        .await
        .unwrap();
    assert_eq!(created["persistent"], true);
    h.call(Method::DELETE, "/services/other", None)
        .await
        .unwrap();

    // The owner leaves: its group is deleted (pushed), the persistent one
    // stays with the leaver detached.
    assert!(s3.leave(Duration::from_secs(5)).await);
    until(&mut gw, Duration::from_secs(10), |s| {
        s.map().services.len() == 1
    })
    .await;
    assert!(s1.leave(Duration::from_secs(5)).await);
    until(&mut gw, Duration::from_secs(10), |s| {
        s.map().services.values().all(|g| g.instances.len() == 1)
    })
    .await;
    drop(s2);
    // Persisted: a restarted keyserver has the group and its instance.
    gw.close();
    let dir_path = h.dir.clone();
    h.stop().await;
    h = Harness::start(&dir_path, |c| c.service_domain = "fra.example.test".into()).await;
    let again = h
        .call(Method::GET, "/v1/networks/prod/services/my-service", None)
        .await
        .unwrap();
    assert_eq!(again["fqdn"], fqdn.as_str());
    assert_eq!(again["instances"].as_array().unwrap().len(), 1);
    assert_eq!(
        h.call(Method::GET, "/v1/networks/prod/services", None)
            .await
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    h.call(
        Method::DELETE,
        "/v1/networks/prod/services/my-service",
        None,
    )
    .await
    .unwrap();
    assert!(h
        .call(Method::GET, "/v1/networks/prod/services/my-service", None)
        .await
        .is_err());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aliases_need_a_network_when_there_are_several() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path(), |_| {}).await;
    h.network("a", "10.240.0.0/22").await;
    h.network("b", "10.241.0.0/22").await;
    // Listing without ?network=: every network's groups (none yet).
    let (status, body) = raw(&h, "GET", "/services", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!([]));
    // Creating without it is ambiguous: 400, saying how to choose.
    let (status, body) = raw(
        &h,
        "POST",
        "/services",
        Some(json!({"name": "x", "ports": [port(443, &["http", "tls"])]})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("?network="));
    let (status, _) = raw(
        &h,
        "POST",
        "/services?network=b",
        Some(json!({"name": "x", "ports": [port(443, &["http", "tls"])]})),
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(
        raw(&h, "GET", "/services?network=a", None).await.1,
        json!([])
    );
    assert_eq!(
        raw(&h, "GET", "/v1/networks/b/services", None)
            .await
            .1
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // The document lists the service routes with their rule errors.
    let doc = h.call(Method::GET, "/openapi.json", None).await.unwrap();
    for p in [
        "/v1/networks/{net}/services",
        "/v1/networks/{net}/services/{name}",
        "/services/{name}/instances/{member}",
    ] {
        assert!(doc["paths"][p].is_object(), "{p}");
    }
    assert_eq!(
        doc["paths"]["/v1/networks/{net}/services"]["post"]["responses"]["400"]["$ref"],
        "#/components/responses/ServiceRuleError"
    );
    assert_eq!(
        doc["components"]["schemas"]["Service"]["properties"]["persistent"]["type"],
        "boolean"
    );
    // A group named once is found without ?network=; a name two networks
    // use is a 400 naming them, and every alias operation documents 400.
    let (status, body) = raw(&h, "GET", "/services/x", None).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = raw(
        &h,
        "POST",
        "/services?network=a",
        Some(json!({"name": "x", "ports": [port(443, &["http", "tls"])]})),
    )
    .await;
    assert_eq!(status, 201);
    let (status, body) = raw(&h, "GET", "/services", None).await;
    assert_eq!((status, body.as_array().unwrap().len()), (200, 2));
    for (method, path) in [
        ("GET", "/services/x"),
        ("PATCH", "/services/x"),
        ("DELETE", "/services/x"),
        ("PUT", "/services/x/instances/nobody"),
        ("DELETE", "/services/x/instances/nobody"),
    ] {
        let body = (method == "PATCH").then(|| json!({"soft_limit": 2}));
        let (status, answer) = raw(&h, method, path, body).await;
        assert_eq!(status, 400, "{method} {path}: {answer}");
        let error = answer["error"].as_str().unwrap();
        assert!(error.contains("2 networks (a, b)"), "{error}");
        let template = path.replace("/x", "/{name}").replace("nobody", "{member}");
        let documented = &doc["paths"][&template][method.to_lowercase()]["responses"]["400"];
        assert!(
            documented.is_object(),
            "{method} {template}: 400 undocumented"
        );
    }
    assert_eq!(raw(&h, "GET", "/services/nope", None).await.0, 404);
    h.stop().await;
}

/// Live connections: a gateway's report of its load per service group
/// (`TrafficReport::groups`) shows in the group's answers, summed and per
/// gateway; groups the network does not have are not shown; an offline
/// gateway's load no longer counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_reported_connections_show_per_group() {
    use meshlib::traffic::{GroupLoad, TrafficReport};
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path(), |_| {}).await;
    h.network("prod", "10.240.0.0/22").await;
    for name in ["shop", "idle"] {
        let body = json!({"name": name, "ports": [port(443, &["http", "tls"])]});
        h.call(Method::POST, "/v1/networks/prod/services", Some(body))
            .await
            .unwrap();
    }
    let shop = h
        .call(Method::GET, "/v1/networks/prod/services/shop", None)
        .await
        .unwrap();
    assert_eq!(
        (&shop["live_connections"], &shop["queued_connections"]),
        (&json!(0), &json!(0)),
        "none reported yet: {shop}"
    );
    assert_eq!(shop["gateways"], json!([]));

    let ep = client_endpoint();
    let token = h.token("prod", json!({"uses": 2})).await;
    let (_k, mut gw) = common::join(&ep, &token, "gateway").await;
    let gw_name = gw.welcome().instance.to_string();
    let load = |group: &str, open, queued| GroupLoad {
        group: group.into(),
        open,
        queued,
    };
    gw.report_traffic(TrafficReport {
        groups: vec![load("shop", 7, 2), load("not-a-group", 9, 9)],
        ..Default::default()
    })
    .unwrap();
    let start = std::time::Instant::now();
    let shop = loop {
        let shop = h
            .call(Method::GET, "/v1/networks/prod/services/shop", None)
            .await
            .unwrap();
        if shop["live_connections"] == 7 {
            break shop;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the report never showed: {shop}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(shop["queued_connections"], 2);
    assert_eq!(shop["gateways"].as_array().unwrap().len(), 1, "{shop}");
    assert_eq!(shop["gateways"][0]["instance"], gw_name.as_str());
    assert_eq!(
        (&shop["gateways"][0]["open"], &shop["gateways"][0]["queued"]),
        (&json!(7), &json!(2))
    );
    assert!(shop["gateways"][0]["reported"].as_u64().unwrap() > 0);
    let list = h
        .call(Method::GET, "/v1/networks/prod/services", None)
        .await
        .unwrap();
    let listed: Vec<(String, Value)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["name"].as_str().unwrap().to_owned(),
                g["live_connections"].clone(),
            )
        })
        .collect();
    assert_eq!(listed.len(), 2, "no group made of the unknown name: {list}");
    for (name, live) in listed {
        assert_eq!(live, json!(if name == "shop" { 7 } else { 0 }), "{name}");
    }

    // The gateway stops: its load no longer counts.
    assert!(gw.shutdown().await);
    let start = std::time::Instant::now();
    loop {
        let shop = h
            .call(Method::GET, "/v1/networks/prod/services/shop", None)
            .await
            .unwrap();
        if shop["live_connections"] == 0 && shop["gateways"] == json!([]) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "an offline gateway still counted: {shop}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.stop().await;
}
