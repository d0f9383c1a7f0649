//! Seed 003's listing through the admin API and the CLI, with real members
//! joined over QUIC: every listed answer is a member's real address, the
//! listing equals what a member's own DNS index answers, offline members
//! are not named, and a member is found only through its own network.

mod common;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use common::*;
use hyper::Method;
use keyserver::admin::AdminClientError;
use meshlib::control::{self, MemberMeta, Session};
use meshlib::ist::config::Overrides;
use meshlib::ist::table::IstTable;
use meshlib::keys::PrivateKey;
use meshlib::names::NameIndex;
use meshlib::netmap::MemberState;
use serde_json::{json, Value};

/// Joins `service` as `ptype` with a fresh key.
async fn join_as(
    ep: &quinn::Endpoint,
    token: &meshlib::proto::JoinToken,
    service: &str,
    ptype: &str,
) -> Session {
    let key = PrivateKey::generate();
    let meta = MemberMeta {
        public_key: key.public_key(),
        service: service.to_owned(),
        app_id: None,
        process_type: ptype.parse().unwrap(),
        instance: None,
        runner: "runner-1".into(),
        ports: vec![8080],
        endpoints: vec!["192.0.2.10:51820".parse().unwrap()],
        replace: false,
        ephemeral: false,
    };
    control::join(ep, token, meta, &cfg()).await.expect("join")
}

/// `names` of a listing as name → addresses.
fn answers(listing: &Value) -> BTreeMap<String, Vec<Ipv4Addr>> {
    listing["names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let ips = e["answers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a["ip"].as_str().unwrap().parse().unwrap())
                .collect();
            (e["name"].as_str().unwrap().to_owned(), ips)
        })
        .collect()
}

fn status(r: Result<Value, AdminClientError>) -> (u16, String) {
    match r {
        Err(AdminClientError::Status { status, message }) => (status, message),
        other => panic!("expected an error status, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_and_members_answer_what_members_resolve() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path(), |_| {}).await;
    let pn = h.network("prod", "10.240.0.0/22").await;
    h.network("other", "10.240.0.0/22").await;
    let token = h.token("prod", json!({"uses": 10})).await;
    let other_token = h.token("other", json!({"uses": 1})).await;
    let ep = client_endpoint();
    let mut web1 = join_as(&ep, &token, "api", "web").await;
    let web2 = join_as(&ep, &token, "api", "web").await;
    let mut web3 = join_as(&ep, &token, "api", "web").await;
    let worker = join_as(&ep, &token, "api", "worker").await;
    let db = join_as(&ep, &token, "my db", "web").await;
    let stranger = join_as(&ep, &other_token, "api", "web").await;
    let app = web1.welcome().app_id.to_string();
    let ip = |s: &Session| s.welcome().ip;
    // web3 stops gracefully: offline, its address kept but not named.
    let gone = web3.welcome().clone();
    assert!(web3.shutdown().await);
    let gone_key = web3.membership().public_key;
    until(&mut web1, Duration::from_secs(5), |s| {
        s.map().members.get(&gone_key).map(|m| m.state) == Some(MemberState::Offline)
    })
    .await;

    let listing = h
        .call(Method::GET, "/v1/networks/prod/names", None)
        .await
        .unwrap();
    let net = h
        .call(Method::GET, "/v1/networks/prod", None)
        .await
        .unwrap();
    assert_eq!(listing["network"], pn.to_string());
    assert_eq!(listing["generation"], net["generation"]);
    let got = answers(&listing);
    // The seed-003 names, by id, against the members' real addresses.
    let seed = |prefix: &str| format!("{prefix}{app}.{pn}.private-network.internal.");
    let webs = {
        let mut v = vec![ip(&web1), ip(&web2)];
        v.sort();
        v
    };
    assert_eq!(got[&seed("")], webs);
    assert_eq!(got[&seed("web.")], webs);
    assert_eq!(got[&seed("worker.")], [ip(&worker)]);
    assert_eq!(got[&seed("1.worker.")], [ip(&worker)]);
    for s in [&web1, &web2, &worker, &db] {
        let w = s.welcome();
        assert_eq!(
            got[&format!("{}.internal.", w.instance)],
            [w.ip],
            "{}",
            w.instance
        );
    }
    // A service's `.warp` name answers its own address (its VIP), listed
    // as the service's; the members' map carries the same address.
    let vip = |service: &str| {
        net["addresses"][service]["ip"]
            .as_str()
            .unwrap()
            .parse::<Ipv4Addr>()
            .unwrap()
    };
    assert_eq!(got["api.warp."], [vip("api")]);
    assert_eq!(got["my-db.warp."], [vip("my db")]);
    assert_eq!(web1.map().addresses["api"].ip, vip("api"));
    let warp = listing["names"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "api.warp.")
        .unwrap();
    assert_eq!(warp["answers"][0]["service_address"], "api");
    assert!(warp["answers"][0].get("instance").is_none());
    assert!(!webs.contains(&vip("api")));
    // Aliases (the service's label, the network's name) are listed, marked.
    let alias = listing["names"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "worker.api.prod.private-network.internal.")
        .expect("alias listed");
    assert_eq!(alias["alias"], true);
    assert_eq!(
        alias["answers"][0]["instance"],
        worker.welcome().instance.to_string()
    );
    // The offline member and the other network's member are named nowhere.
    assert!(!got
        .keys()
        .any(|n| n.starts_with(&format!("{}.", gone.instance))));
    for ips in got.values() {
        assert!(!ips.contains(&gone.ip), "{got:?}");
    }
    assert!(!got
        .keys()
        .any(|n| n.contains(&stranger.network().to_string())));
    // Exactly what a member's own DNS index answers, from the map it was
    // pushed (the sidecar builds its index the same way from its map).
    until(&mut web1, Duration::from_secs(5), |s| {
        s.map().generation == listing["generation"].as_u64().unwrap()
    })
    .await;
    let online = web1.map().online();
    let index = NameIndex::build(
        &online,
        &IstTable::build(online.services(), &Overrides::default()),
    );
    let member_view: BTreeMap<String, Vec<Ipv4Addr>> = index
        .entries()
        .into_iter()
        .map(|(n, ips)| (n.to_owned(), ips.to_vec()))
        .collect();
    assert_eq!(got, member_view);

    // One member, by instance name and by key: slot, state, names.
    let w = worker.welcome();
    let by_name = h
        .call(
            Method::GET,
            &format!("/v1/networks/prod/members/{}", w.instance),
            None,
        )
        .await
        .unwrap();
    let key = worker.membership().public_key.to_string();
    let by_key = h
        .call(
            Method::GET,
            &format!(
                "/v1/networks/{pn}/members/{}",
                keyserver::admin::path_segment(&key)
            ),
            None,
        )
        .await
        .unwrap();
    assert_eq!(by_name, by_key);
    assert_eq!(by_name["public_key"], key);
    assert_eq!(by_name["ip"], w.ip.to_string());
    assert_eq!(by_name["process_type"], "worker");
    assert_eq!(by_name["index"], w.index);
    assert_eq!(by_name["app_id"], app);
    assert_eq!(by_name["state"], "online");
    assert_eq!(by_name["ports"], json!([8080]));
    assert!(by_name["joined"].is_u64() && by_name["last_seen"].is_u64());
    let names: Vec<&str> = by_name["names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    let want: Vec<&str> = got
        .iter()
        .filter(|(_, ips)| ips.contains(&w.ip))
        .map(|(n, _)| n.as_str())
        .collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, want);
    assert!(names.contains(&format!("{}.internal.", w.instance).as_str()));
    // Every field `member list` shows is in `member get`.
    let listed = h.members("prod").await;
    let row = listed.iter().find(|m| m["public_key"] == key).unwrap();
    for (k, v) in row.as_object().unwrap() {
        if k != "last_seen" {
            assert_eq!(&by_name[k], v, "{k}");
        }
    }
    // The offline member: shown, offline, unnamed.
    let off = h
        .call(
            Method::GET,
            &format!("/v1/networks/prod/members/{}", gone.instance),
            None,
        )
        .await
        .unwrap();
    assert_eq!(off["state"], "offline");
    assert!(off["offline_since"].is_u64());
    assert_eq!(off["ip"], gone.ip.to_string());
    assert_eq!(off["names"], json!([]));

    // Never through another network's path, by key or by name; unknown
    // members and networks are 404s with a clear error.
    let s = stranger.welcome();
    let skey = keyserver::admin::path_segment(&stranger.membership().public_key.to_string());
    let wkey = keyserver::admin::path_segment(&key);
    for (path, what) in [
        (format!("/v1/networks/prod/members/{skey}"), "member"),
        (format!("/v1/networks/other/members/{wkey}"), "member"),
        (
            format!("/v1/networks/other/members/{}", w.instance),
            "member",
        ),
        ("/v1/networks/prod/members/nobody".to_owned(), "member"),
        ("/v1/networks/prod/members/%1B%5B2J".to_owned(), "member"),
        ("/v1/networks/ghost/members/x".to_owned(), "network"),
        ("/v1/networks/ghost/names".to_owned(), "network"),
    ] {
        let (code, message) = status(h.call(Method::GET, &path, None).await);
        assert_eq!(code, 404, "{path}");
        assert!(
            message.starts_with(&format!("unknown {what}")),
            "{path}: {message}"
        );
    }
    // The stranger's own instance name exists in both networks (same
    // service and type, index 1), and each path finds its own.
    let theirs = h
        .call(
            Method::GET,
            &format!("/v1/networks/other/members/{}", s.instance),
            None,
        )
        .await
        .unwrap();
    assert_eq!(theirs["ip"], s.ip.to_string());
    assert_eq!(theirs["network"], stranger.network().to_string());
    let ours = h
        .call(
            Method::GET,
            &format!("/v1/networks/prod/members/{}", s.instance),
            None,
        )
        .await
        .unwrap();
    assert_ne!(ours["public_key"], theirs["public_key"]);

    // The answers have only documented fields.
    let doc = h.call(Method::GET, "/openapi.json", None).await.unwrap();
    let schemas = &doc["components"]["schemas"];
    let documented = |schema: &Value, value: &Value, what: &str| {
        let props = schema["properties"].as_object().unwrap();
        for k in value.as_object().unwrap().keys() {
            assert!(props.contains_key(k), "{what}.{k} undocumented");
        }
        for k in schema["required"].as_array().unwrap() {
            assert!(
                value.get(k.as_str().unwrap()).is_some(),
                "{what}.{k} missing"
            );
        }
    };
    documented(&schemas["NameListing"], &listing, "NameListing");
    for e in listing["names"].as_array().unwrap() {
        documented(&schemas["NameEntry"], e, "NameEntry");
    }
    let extra = &schemas["MemberDetail"]["allOf"][1];
    let mut merged = schemas["Member"]["properties"].as_object().unwrap().clone();
    merged.extend(extra["properties"].as_object().unwrap().clone());
    let detail = json!({"properties": merged, "required": extra["required"]});
    documented(&detail, &by_name, "MemberDetail");
    assert!(doc["paths"]["/v1/networks/{net}/names"]["get"].is_object());
    assert!(doc["paths"]["/v1/networks/{net}/members/{member}"]["get"].is_object());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_prints_names_and_members() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path(), |_| {}).await;
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
    // A network name with characters a URL path and a table must carry.
    let net = "my net/é";
    h.call(Method::POST, "/v1/networks", Some(json!({"name": net})))
        .await
        .unwrap();
    let token = h
        .token(&keyserver::admin::path_segment(net), json!({"uses": 3}))
        .await;
    let ep = client_endpoint();
    let a = join_as(&ep, &token, "api", "web").await;
    let b = join_as(&ep, &token, "api", "web").await;
    let (wa, wb) = (a.welcome().clone(), b.welcome().clone());

    let (ok, table, err) = cli(&["network", "names", net]);
    assert!(ok, "{err}");
    eprintln!("{table}");
    assert!(table.starts_with(&format!("network {net} (pn-")), "{table}");
    let line_of = |name: &str| {
        table
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} not in\n{table}"))
            .to_owned()
    };
    let first = line_of(&format!("{}.internal.", wa.instance));
    assert!(first.contains(&wa.ip.to_string()), "{first}");
    // A name with two answers: the name once, then a continuation line.
    let pn = a.network();
    let both = format!("web.{}.{pn}.private-network.internal.", wa.app_id);
    let mut lines = table
        .lines()
        .skip_while(|l| !l.starts_with(&format!("{both} ")));
    let (l1, l2) = (lines.next().unwrap(), lines.next().unwrap());
    let mut ips = [wa.ip, wb.ip];
    ips.sort();
    assert!(l1.contains(&ips[0].to_string()) && l2.contains(&ips[1].to_string()));
    assert!(l2.starts_with(' '), "{l2}");
    assert!(line_of("api.warp.").contains("(service api)"));
    assert!(line_of("api.warp.").contains("(service address)"));

    let (ok, json_out, err) = cli(&["network", "names", net, "--json"]);
    assert!(ok, "{err}");
    let listing: Value = serde_json::from_str(&json_out).unwrap();
    assert_eq!(listing["network"], pn.to_string());
    assert_eq!(
        answers(&listing)[&format!("{}.internal.", wb.instance)],
        [wb.ip]
    );

    let (ok, shown, err) = cli(&["member", "get", "--network", net, wb.instance.as_str()]);
    assert!(ok, "{err}");
    eprintln!("{shown}");
    let rows: Vec<String> = shown
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    for want in [
        format!("instance {}", wb.instance),
        format!("ip {}", wb.ip),
        "state online".to_owned(),
        "ports 8080".to_owned(),
        format!("names {}.internal.", wb.instance),
    ] {
        assert!(rows.contains(&want), "{want:?} not in\n{shown}");
    }
    assert!(shown.contains("(and 1 other member)"), "{shown}");
    let (ok, json_out, _) = cli(&[
        "member",
        "get",
        "--network",
        net,
        &b.membership().public_key.to_string(),
        "--json",
    ]);
    assert!(ok);
    let one: Value = serde_json::from_str(&json_out).unwrap();
    assert_eq!(one["instance"], wb.instance.to_string());

    let (ok, _, err) = cli(&["member", "get", "--network", net, "nobody"]);
    assert!(!ok);
    assert!(
        err.contains("404") && err.contains("unknown member"),
        "{err}"
    );
    let (ok, _, err) = cli(&["network", "names", "ghost"]);
    assert!(!ok);
    assert!(
        err.contains("404") && err.contains("unknown network"),
        "{err}"
    );
    h.stop().await;
}
