//! Scoped API tokens and the audit trail through a real keyserver: every
//! route of the OpenAPI document × every role × its own and another
//! tenant's network (a table of expected statuses; 404 for another
//! tenant's names), the audit trail recording every mutating operation of
//! the document, secrets never stored, backups carrying tokens and the
//! trail, and the CLI's tables.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{client_endpoint, join, Harness};
use hyper::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const KEYSERVER: &str = env!("CARGO_BIN_EXE_keyserver");

/// One request with `bearer`; returns status and JSON body.
async fn call(
    h: &Harness,
    bearer: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let addr = h.api.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = body.map(Value::to_string).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {bearer}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
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
    let rest = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(rest)
    } else {
        rest.to_owned()
    };
    (status, serde_json::from_str(&rest).unwrap_or(Value::Null))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
    out
}

/// Who calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    /// The keyserver's admin token.
    Root,
    /// A global viewer.
    GlobalViewer,
    /// Tenant `a`'s admin, operator and viewer.
    Admin,
    Operator,
    Viewer,
}

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Reads a network.
    Read,
    /// Changes what is inside a network (operator).
    Write,
    /// Changes or deletes a network (admin).
    Manage,
    /// No network: any valid token.
    Any,
    /// Creates a network (admin; "other": in tenant b).
    Create,
    /// API tokens (admin; "other": tenant b's tokens).
    Tokens,
    /// Backups (global admin).
    Backup,
}

/// The expected status of `class` for `who`, on its own tenant's network
/// (`own`) or the other one's; `ok` is the route's success status.
fn expected(class: Class, method: &str, who: Who, own: bool, ok: u16) -> u16 {
    use Who::*;
    let global = matches!(who, Root | GlobalViewer);
    match class {
        Class::Any => ok,
        Class::Read if own || global => ok,
        Class::Read | Class::Write | Class::Manage if !own && !global => 404,
        Class::Write => match who {
            Root | Admin | Operator => ok,
            _ => 403,
        },
        Class::Manage => match who {
            Root | Admin => ok,
            _ => 403,
        },
        Class::Create | Class::Tokens => match (who, own) {
            (Root, _) | (Admin, true) => ok,
            // Another tenant's tokens are not listed, nor found.
            (Admin, false) if class == Class::Tokens && method == "GET" => ok,
            (Admin, false) if class == Class::Tokens && method == "DELETE" => 404,
            _ => 403,
        },
        Class::Backup => {
            if who == Root {
                ok
            } else {
                403
            }
        }
        Class::Read => unreachable!(),
    }
}

/// The world the table runs in: networks `alpha` (tenant a) and `beta`
/// (tenant b), each with a member of service `api` and a group `g0`, and
/// tokens of every role.
struct World {
    h: Harness,
    bearers: Vec<(Who, String)>,
    counter: std::sync::atomic::AtomicU32,
    /// Members' sessions, open until the end.
    sessions: std::sync::Mutex<Vec<meshlib::control::Session>>,
}

impl World {
    async fn new(dir: &std::path::Path) -> Self {
        let h = Harness::start(dir, |_| {}).await;
        let root = h.admin_token.clone();
        let mut sessions = vec![];
        for (name, range, tenant) in [
            ("alpha", "10.240.0.0/22", "a"),
            ("beta", "10.241.0.0/22", "b"),
        ] {
            let (s, _) = call(
                &h,
                &root,
                "POST",
                "/v1/networks",
                Some(&json!({"name": name, "range": range, "tenant": tenant})),
            )
            .await;
            assert_eq!(s, 201);
            let token = h.token(name, json!({"uses": 50})).await;
            let (_k, session) = join(&client_endpoint(), &token, "api").await;
            sessions.push(session);
            let g = json!({"name": "g0", "ports": [{"port": 10443, "destination_port": 8080, "handlers": ["tls"]}]});
            let (s, b) = call(
                &h,
                &root,
                "POST",
                &format!("/v1/networks/{name}/services"),
                Some(&g),
            )
            .await;
            assert_eq!(s, 201, "{b}");
        }
        let mut bearers = vec![(Who::Root, root.clone())];
        for (who, role, tenant) in [
            (Who::GlobalViewer, "viewer", None),
            (Who::Admin, "admin", Some("a")),
            (Who::Operator, "operator", Some("a")),
            (Who::Viewer, "viewer", Some("a")),
        ] {
            let body = json!({"name": format!("{who:?}"), "role": role, "tenant": tenant});
            let (s, b) = call(&h, &root, "POST", "/v1/api-tokens", Some(&body)).await;
            assert_eq!(s, 201, "{b}");
            assert_eq!(b["tenant"], json!(tenant));
            bearers.push((who, b["token"].as_str().unwrap().to_owned()));
        }
        Self {
            h,
            bearers,
            counter: Default::default(),
            sessions: std::sync::Mutex::new(sessions),
        }
    }

    fn root(&self) -> &str {
        &self.h.admin_token
    }

    fn next(&self) -> u32 {
        self.counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// The instance name of a member of `net` (its first).
    async fn member(&self, net: &str) -> String {
        let (_, list) = call(
            &self.h,
            self.root(),
            "GET",
            &format!("/v1/networks/{net}/members"),
            None,
        )
        .await;
        list[0]["instance"].as_str().unwrap().to_owned()
    }

    /// A fresh member of `net`; returns its instance name.
    async fn fresh_member(&self, net: &str) -> String {
        let token = self.h.token(net, json!({})).await;
        let (_k, s) = join(&client_endpoint(), &token, "worker").await;
        let name = s.welcome().instance.to_string();
        self.sessions.lock().unwrap().push(s);
        name
    }

    /// A fresh persistent group of `net`; returns its name.
    async fn fresh_group(&self, net: &str) -> String {
        let name = format!("g{}", self.next() + 1);
        let g = json!({"name": name, "ports": [{"port": 10443, "destination_port": 8080, "handlers": ["tls"]}]});
        let (s, b) = call(
            &self.h,
            self.root(),
            "POST",
            &format!("/v1/networks/{net}/services"),
            Some(&g),
        )
        .await;
        assert_eq!(s, 201, "{b}");
        name
    }

    /// A concrete request for `method route` on network `net` (tenant
    /// `tenant`): fresh targets for destructive operations.
    async fn request(
        &self,
        method: &str,
        route: &str,
        net: &str,
        tenant: &str,
    ) -> (String, Option<Value>) {
        let alias = route.starts_with("/services");
        let query = if alias {
            format!("?network={net}")
        } else {
            String::new()
        };
        let base = route.replace("{net}", net);
        let n = self.next();
        let (path, body) = match (method, route.trim_start_matches("/v1/networks/{net}")) {
            ("POST", "/v1/networks") => (
                base,
                Some(json!({"name": format!("new-{n}"), "tenant": tenant})),
            ),
            ("DELETE", "") => {
                let name = format!("tmp-{n}");
                let body = json!({"name": name, "tenant": tenant});
                let (s, b) = call(&self.h, self.root(), "POST", "/v1/networks", Some(&body)).await;
                assert_eq!(s, 201, "{b}");
                (format!("/v1/networks/{name}"), None)
            }
            ("PATCH", "") => (base, Some(json!({"expire_after": "2h"}))),
            ("DELETE", "/members/{member}") => {
                let m = self.fresh_member(net).await;
                (base.replace("{member}", &m), None)
            }
            (_, "/members/{member}") => (base.replace("{member}", &self.member(net).await), None),
            ("POST", "/tokens") => (base, Some(json!({}))),
            ("DELETE", "/tokens/{id}") => {
                let (_, t) = call(
                    &self.h,
                    self.root(),
                    "POST",
                    &format!("/v1/networks/{net}/tokens"),
                    Some(&json!({})),
                )
                .await;
                (base.replace("{id}", t["id"].as_str().unwrap()), None)
            }
            ("PATCH", "/addresses/{service}") => (
                base.replace("{service}", "api"),
                Some(json!({"idle_after_secs": 600})),
            ),
            (_, "/addresses/{service}") => (base.replace("{service}", "api"), None),
            ("POST", "/services") => (
                format!("{base}{query}"),
                Some(
                    json!({"name": format!("n{n}"), "ports": [{"port": 10443, "handlers": ["tls"]}]}),
                ),
            ),
            ("GET", "/services/{name}") => {
                (format!("{}{query}", base.replace("{name}", "g0")), None)
            }
            ("PATCH", "/services/{name}") => {
                let g = self.fresh_group(net).await;
                (
                    format!("{}{query}", base.replace("{name}", &g)),
                    Some(json!({"soft_limit": 2})),
                )
            }
            ("DELETE", "/services/{name}") => {
                let g = self.fresh_group(net).await;
                (format!("{}{query}", base.replace("{name}", &g)), None)
            }
            (m, "/services/{name}/instances/{member}") => {
                let g = self.fresh_group(net).await;
                let member = self.member(net).await;
                if m == "DELETE" {
                    let attach = format!("/v1/networks/{net}/services/{g}/instances/{member}");
                    assert_eq!(
                        call(&self.h, self.root(), "PUT", &attach, None).await.0,
                        200
                    );
                }
                (
                    format!(
                        "{}{query}",
                        base.replace("{name}", &g).replace("{member}", &member)
                    ),
                    None,
                )
            }
            ("POST", "/v1/api-tokens") => (
                base,
                Some(json!({"name": format!("t{n}"), "role": "viewer", "tenant": tenant})),
            ),
            ("DELETE", "/v1/api-tokens/{id}") => {
                let body = json!({"name": format!("t{n}"), "role": "viewer", "tenant": tenant});
                let (_, t) =
                    call(&self.h, self.root(), "POST", "/v1/api-tokens", Some(&body)).await;
                (base.replace("{id}", t["id"].as_str().unwrap()), None)
            }
            (_, _) => (format!("{base}{query}"), None),
        };
        (path, body)
    }
}

/// The class and success status of every operation of the document that
/// needs a token.
fn table(doc: &Value) -> Vec<(String, String, Class, u16)> {
    let mut out = vec![];
    for (route, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            if op.get("security") == Some(&json!([])) {
                continue;
            }
            let ok: u16 = op["responses"]
                .as_object()
                .unwrap()
                .keys()
                .find(|s| s.starts_with('2'))
                .unwrap()
                .parse()
                .unwrap();
            let read = method == "get";
            let class = match (route.as_str(), read) {
                ("/openapi.json" | "/v1/audit", _) | ("/v1/networks", true) => Class::Any,
                ("/v1/networks", false) => Class::Create,
                ("/v1/backup", _) => Class::Backup,
                (r, _) if r.starts_with("/v1/api-tokens") => Class::Tokens,
                ("/v1/networks/{net}", false) => Class::Manage,
                (_, true) => Class::Read,
                (_, false) => Class::Write,
            };
            out.push((method.to_uppercase(), route.clone(), class, ok));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_every_role_own_and_other_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let w = World::new(dir.path()).await;
    let doc = w.h.call(Method::GET, "/openapi.json", None).await.unwrap();
    let rows = table(&doc);
    assert!(rows.len() >= 30, "{} operations", rows.len());
    let mut failures = vec![];
    let mut cells = 0;
    for (method, route, class, ok) in &rows {
        for (who, bearer) in &w.bearers {
            for own in [true, false] {
                let (net, tenant) = if own { ("alpha", "a") } else { ("beta", "b") };
                let (path, body) = w.request(method, route, net, tenant).await;
                let want = expected(*class, method, *who, own, *ok);
                let (got, answer) = call(&w.h, bearer, method, &path, body.as_ref()).await;
                cells += 1;
                if got != want {
                    failures.push(format!(
                        "{method} {path} as {who:?} (own {own}): {got}, expected {want}: {answer}"
                    ));
                }
                if !own && got == 404 {
                    // Nothing in the answer tells the other tenant's network exists.
                    assert!(!answer.to_string().contains("pn-"), "{answer}");
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {cells} cells:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // Listings leave out what the token does not see.
    let (viewer, operator) = (&w.bearers[4].1, &w.bearers[3].1);
    let (_, nets) = call(&w.h, viewer, "GET", "/v1/networks", None).await;
    let names: BTreeSet<&str> = nets
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["name"].as_str())
        .collect();
    assert!(
        names.contains("alpha") && !names.contains("beta"),
        "{names:?}"
    );
    assert!(nets.as_array().unwrap().iter().all(|n| n["tenant"] == "a"));
    let (_, groups) = call(&w.h, viewer, "GET", "/services", None).await;
    let (_, alpha) = call(&w.h, w.root(), "GET", "/v1/networks/alpha", None).await;
    assert!(
        groups
            .as_array()
            .unwrap()
            .iter()
            .all(|g| g["network"] == alpha["id"]),
        "{groups}"
    );
    // By id too, and for a member name of the other tenant: 404.
    let (_, beta) = call(&w.h, w.root(), "GET", "/v1/networks/beta", None).await;
    let beta_id = beta["id"].as_str().unwrap();
    assert_eq!(
        call(
            &w.h,
            operator,
            "GET",
            &format!("/v1/networks/{beta_id}/members"),
            None
        )
        .await
        .0,
        404
    );
    let (s, b) = call(&w.h, operator, "GET", "/services/g0", None).await;
    assert_eq!(s, 200, "the only g0 the operator sees: {b}");
    assert_eq!(b["network"], alpha["id"]);
    let (_, tokens) = call(&w.h, &w.bearers[2].1, "GET", "/v1/api-tokens", None).await;
    assert!(
        tokens
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["tenant"] == "a"),
        "{tokens}"
    );
    assert!(tokens
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t.get("token").is_none()));

    // A revoked token is refused at once.
    let body = json!({"name": "short-lived", "role": "viewer"});
    let (_, t) = call(&w.h, w.root(), "POST", "/v1/api-tokens", Some(&body)).await;
    let secret = t["token"].as_str().unwrap();
    assert_eq!(call(&w.h, secret, "GET", "/v1/networks", None).await.0, 200);
    let id = t["id"].as_str().unwrap();
    assert_eq!(
        call(
            &w.h,
            w.root(),
            "DELETE",
            &format!("/v1/api-tokens/{id}"),
            None
        )
        .await
        .0,
        204
    );
    assert_eq!(call(&w.h, secret, "GET", "/v1/networks", None).await.0, 401);

    // The audit trail recorded every mutating operation of the document.
    let (s, trail) = call(&w.h, w.root(), "GET", "/v1/audit?limit=100000", None).await;
    assert_eq!(s, 200);
    let trail = trail.as_array().unwrap();
    let mutating: Vec<_> = rows.iter().filter(|(m, ..)| m != "GET").collect();
    assert!(mutating.len() >= 15);
    for (method, route, _, ok) in &mutating {
        let by_root = trail.iter().any(|e| {
            e["method"] == method.as_str()
                && e["route"] == route.as_str()
                && e["status"] == *ok
                && e["token"] == "admin"
        });
        assert!(by_root, "no audit entry for {method} {route} ({ok})");
        let refused = trail.iter().any(|e| {
            e["method"] == method.as_str()
                && e["route"] == route.as_str()
                && (e["status"] == 403 || e["status"] == 404)
        });
        assert!(refused, "no audit entry of a refused {method} {route}");
    }
    for e in trail {
        assert!(
            e["client"].as_str().unwrap().starts_with("127.0.0.1:"),
            "{e}"
        );
        assert!(e["time_ms"].as_u64().unwrap() > 1_700_000_000_000);
        assert!(e["role"].is_string() && e["token_name"].is_string());
    }
    // Reads are not recorded.
    assert!(trail.iter().all(|e| e["method"] != "GET"));
    // Who did what: the operator's removal of a member of its network.
    let op_id = trail
        .iter()
        .find(|e| e["token_name"] == "Operator")
        .unwrap()["token"]
        .clone();
    assert!(trail.iter().any(|e| e["token"] == op_id
        && e["method"] == "DELETE"
        && e["route"] == "/v1/networks/{net}/members/{member}"
        && e["network_name"] == "alpha"
        && e["target"].is_string()
        && e["status"] == 200));

    // A tenant token sees its tenant's entries only, by network and time.
    let (_, mine) = call(&w.h, viewer, "GET", "/v1/audit?limit=100000", None).await;
    let mine = mine.as_array().unwrap();
    assert!(!mine.is_empty() && mine.len() < trail.len());
    assert!(mine.iter().all(|e| e["tenant"] == "a"), "a tenant's trail");
    // What mentions the other tenant's network is the tenant's own refused
    // attempts (the name it typed): answered 404, with no network.
    let beta_id = beta_id.to_owned();
    for e in mine {
        if e.to_string().contains("beta") || e.to_string().contains(&beta_id) {
            assert_eq!(e["status"], 404, "{e}");
            assert!(e["network"].is_null() && e["network_name"].is_null(), "{e}");
            assert_ne!(e["token"], "admin", "{e}");
        }
    }
    let (_, beta_entries) = call(&w.h, viewer, "GET", "/v1/audit?network=beta", None).await;
    assert_eq!(beta_entries, json!([]));
    let (_, alpha_entries) = call(
        &w.h,
        w.root(),
        "GET",
        "/v1/audit?network=alpha&limit=5",
        None,
    )
    .await;
    let alpha_entries = alpha_entries.as_array().unwrap();
    assert_eq!(alpha_entries.len(), 5);
    assert!(alpha_entries.iter().all(|e| e["network"] == alpha["id"]));
    let (_, future) = call(&w.h, w.root(), "GET", "/v1/audit?since=4102444800", None).await;
    assert_eq!(future, json!([]));
    let (_, past) = call(
        &w.h,
        w.root(),
        "GET",
        "/v1/audit?until=2020-01-01T00:00:00Z",
        None,
    )
    .await;
    assert_eq!(past, json!([]));
    assert_eq!(
        call(&w.h, w.root(), "GET", "/v1/audit?since=yesterday", None)
            .await
            .0,
        400
    );
    drop(std::mem::take(&mut *w.sessions.lock().unwrap()));
    w.h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_never_stored_and_backups_carry_tokens_and_the_trail() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path(), |c| c.audit_entries = 3).await;
    let root = h.admin_token.clone();
    let (s, t) = call(
        &h,
        &root,
        "POST",
        "/v1/api-tokens",
        Some(&json!({"name": "ci", "role": "operator", "tenant": "a", "expires": "30d"})),
    )
    .await;
    assert_eq!(s, 201, "{t}");
    let secret = t["token"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("istk1."));
    assert!(t["expires"].as_u64().unwrap() > t["created"].as_u64().unwrap() + 29 * 86400);
    for name in ["one", "two", "three"] {
        let (s, _) = call(
            &h,
            &secret,
            "POST",
            "/v1/networks",
            Some(&json!({"name": name})),
        )
        .await;
        assert_eq!(s, 403, "an operator creates no network");
        let (s, b) = call(
            &h,
            &root,
            "POST",
            "/v1/networks",
            Some(&json!({"name": name, "tenant": "a"})),
        )
        .await;
        assert_eq!(s, 201, "{b}");
    }
    let (_, backup) = call(&h, &root, "GET", "/v1/backup", None).await;
    let text = backup.to_string();
    assert!(!text.contains(&secret) && !text.contains(secret.trim_start_matches("istk1.")));
    assert_eq!(backup["api_tokens"].as_array().unwrap().len(), 1);
    assert_eq!(
        backup["api_tokens"][0]["hash"].as_array().unwrap().len(),
        32
    );
    // Bounded: the last three entries.
    let audit = backup["audit"].as_array().unwrap();
    assert_eq!(audit.len(), 3, "{audit:?}");
    assert!(audit
        .windows(2)
        .all(|w| w[0]["seq"].as_u64() < w[1]["seq"].as_u64()));
    assert_eq!(audit[2]["target"], "three");
    assert_eq!(call(&h, &secret, "GET", "/v1/backup", None).await.0, 403);
    h.stop().await;
    // Not in the store file either.
    let raw = std::fs::read(dir.path().join("state.redb")).unwrap();
    let needle = secret.as_bytes();
    assert!(
        !raw.windows(needle.len()).any(|w| w == needle),
        "the secret is in the store"
    );
    // Restored elsewhere, the token works and the trail is there.
    let doc = keyserver::backup::Backup::parse(text.as_bytes()).unwrap();
    let other = tempfile::tempdir().unwrap();
    keyserver::backup::restore(&other.path().join("state.redb"), &doc).unwrap();
    let h = Harness::start(other.path(), |_| {}).await;
    let (s, nets) = call(&h, &secret, "GET", "/v1/networks", None).await;
    assert_eq!(s, 200);
    assert_eq!(nets.as_array().unwrap().len(), 3);
    let (_, trail) = call(&h, &h.admin_token.clone(), "GET", "/v1/audit", None).await;
    assert_eq!(trail.as_array().unwrap().len(), 3);
    h.stop().await;
}

/// Runs the CLI against `h` with the bearer in `token_file`.
fn cli(h: &Harness, token_file: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(KEYSERVER)
        .args(args)
        .args([
            "--api",
            &h.api,
            "--token-file",
            token_file.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_prints_tables_and_bare_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path(), |_| {}).await;
    let admin = dir.path().join("admin-token");
    let (ok, out, err) = cli(
        &h,
        &admin,
        &["network", "create", "prod", "--tenant", "acme"],
    );
    assert!(ok, "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["tenant"],
        "acme"
    );
    // `token create --bare` prints the token alone, as the README shows.
    let (ok, out, err) = cli(
        &h,
        &admin,
        &[
            "token",
            "create",
            "--network",
            "prod",
            "--uses",
            "3",
            "--bare",
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 1);
    let token: meshlib::proto::JoinToken = out.trim().parse().expect("a bare join token");
    let (_k, s) = join(&client_endpoint(), &token, "api").await;
    let instance = s.welcome().instance.to_string();
    // `member list`: a table by default, JSON with --json.
    let (ok, out, err) = cli(&h, &admin, &["member", "list", "--network", "prod"]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    for col in ["INSTANCE", "ADDRESS", "STATE", "LAST SEEN", "ENDPOINT"] {
        assert!(lines[0].contains(col), "{out}");
    }
    for cell in [
        instance.as_str(),
        "10.240.0.1",
        "online",
        "s ago",
        "192.0.2.10:51820",
        "runner-1",
    ] {
        assert!(lines[1].contains(cell), "{cell}: {out}");
    }
    let (ok, out, _) = cli(
        &h,
        &admin,
        &["member", "list", "--network", "prod", "--json"],
    );
    assert!(ok);
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list[0]["instance"], instance.as_str());
    // API tokens: created bare, used by the CLI, listed, revoked.
    let (ok, out, err) = cli(
        &h,
        &admin,
        &[
            "api-token",
            "create",
            "--name",
            "deploy",
            "--role",
            "viewer",
            "--tenant",
            "acme",
            "--bare",
        ],
    );
    assert!(ok, "{err}");
    let secret = out.trim().to_owned();
    assert!(secret.starts_with("istk1.") && out.lines().count() == 1);
    let viewer = dir.path().join("viewer-token");
    std::fs::write(&viewer, &secret).unwrap();
    let (ok, out, _) = cli(&h, &viewer, &["member", "list", "--network", "prod"]);
    assert!(ok && out.contains(&instance));
    let (ok, _, err) = cli(
        &h,
        &viewer,
        &["member", "remove", "--network", "prod", &instance],
    );
    assert!(!ok && err.contains("403"), "{err}");
    let (ok, out, _) = cli(&h, &admin, &["api-token", "list"]);
    assert!(ok);
    let list: Value = serde_json::from_str(&out).unwrap();
    let id = list[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(list[0]["role"], "viewer");
    assert!(!out.contains(&secret));
    // The audit trail as a table: who removed what, refused or not.
    let (ok, out, err) = cli(&h, &admin, &["audit", "--network", "prod", "--since", "1h"]);
    assert!(ok, "{err}");
    assert!(out.lines().next().unwrap().starts_with("TIME"));
    let refused = out
        .lines()
        .find(|l| l.contains("deploy") && l.contains("DELETE"))
        .expect(&out);
    assert!(
        refused.contains("403") && refused.contains("viewer") && refused.contains("127.0.0.1:"),
        "{refused}"
    );
    assert!(
        out.contains("POST /v1/networks/prod/tokens") && out.contains("201"),
        "{out}"
    );
    let (ok, out, _) = cli(&h, &admin, &["audit", "--json", "--limit", "1"]);
    assert!(ok);
    assert_eq!(
        serde_json::from_str::<Value>(&out)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let (ok, _, err) = cli(&h, &admin, &["api-token", "revoke", &id]);
    assert!(ok, "{err}");
    let (ok, _, err) = cli(&h, &viewer, &["member", "list", "--network", "prod"]);
    assert!(!ok && err.contains("401"), "{err}");
    drop(s);
    h.stop().await;
}

#[test]
fn serve_help_shows_defaults() {
    let out = std::process::Command::new(KEYSERVER)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for default in [
        "[default: 0.0.0.0:7443]",
        "[default: 127.0.0.1:7480]",
        "[default: info]",
        "[default: 30s]",
        "[default: 24h]",
        "[default: 10000]",
        "[possible values: text, json]",
    ] {
        assert!(text.contains(default), "{default} missing from:\n{text}");
    }
    let top = std::process::Command::new(KEYSERVER)
        .arg("--help")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&top.stdout);
    assert!(!text.to_lowercase().contains("seed 00"), "{text}");
    assert!(text.contains("api-token") && text.contains("audit"));
}

/// The README's "Running it" shows what the commands print: the token
/// create line asks for the bare token, and the settings two sidecars on
/// one host must not share are all named.
#[test]
fn the_readme_running_it_matches_the_commands() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let running = readme
        .split("## Running it")
        .nth(1)
        .unwrap()
        .split("\n## ")
        .next()
        .unwrap();
    let create = running
        .lines()
        .find(|l| l.starts_with("keyserver token create"))
        .unwrap();
    assert!(create.contains("--bare"), "{create}");
    for setting in [
        "`state-dir`",
        "`interface`",
        "`listen-port`",
        "`dns.listen`",
        "`metrics`",
        "`loopback-octet`",
    ] {
        assert!(running.contains(setting), "{setting} not in Running it");
    }
}
