//! Keyserver replicas on a real 3-node etcd cluster (loopback, own ports
//! and data directories, removed afterwards): the store's guards, bad
//! values under the prefix, concurrent joins over three replicas, pushes
//! across replicas, resumes on another replica, and etcd nodes dying.

mod common;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use common::etcd::EtcdCluster;
use common::{cfg, client_endpoint, meta, Harness};
use hyper::Method;
use keyserver::registry::{Records, Registry, StoreOp};
use keyserver::store::etcd::{EtcdStore, EtcdUrl};
use keyserver::store::{Store, StoreError};
use meshlib::control::{self, ClientConfig, Session};
use serde_json::json;

const Q: Duration = Duration::from_secs(300);

/// Two stores on one prefix: a write based on a stale view is refused and
/// nothing is written; the refused side gets the winner's records through
/// the watch and its memory back from `known`; malformed and foreign
/// values under the prefix are reported and skipped, at load and live.
#[test]
fn etcd_store_guards_writes_and_skips_bad_values() {
    let Some(etcd) = EtcdCluster::start(3) else {
        return;
    };
    let url: EtcdUrl = etcd.url("guards").parse().unwrap();
    let now = SystemTime::now();
    let mut a = EtcdStore::connect(&url).unwrap();
    let mut b = EtcdStore::connect(&url).unwrap();
    let (mut ra, _) = Registry::load(a.load().unwrap(), 64, Q, now);
    let (mut rb, _) = Registry::load(b.load().unwrap(), 64, Q, now);
    let range = meshlib::ipam::DEFAULT_RANGE;
    let (net, ops) = ra.create_network("prod", range, now).unwrap();
    a.commit(&ops).unwrap();
    // b has not seen it: its own "prod" must be refused (names are unique).
    let (other, ops_b) = rb.create_network("prod", range, now).unwrap();
    let revision = match b.commit(&ops_b) {
        Err(StoreError::Conflict { revision }) => revision,
        other => panic!("expected a conflict, got {other:?}"),
    };
    assert_eq!(
        b.known(&ops_b).unwrap(),
        vec![StoreOp::DeleteNetwork(other.id)],
        "memory goes back to: no such network"
    );
    b.catch_up(revision).unwrap();
    let remote: Vec<StoreOp> = b.remote().unwrap().into_iter().flatten().collect();
    assert_eq!(remote, vec![StoreOp::PutNetwork(net.clone())]);
    // A write on a stale revision of an existing record is refused too.
    let ops_a2 = ra
        .set_expire_after(net.id, Some(Duration::from_secs(60)))
        .unwrap();
    a.commit(&ops_a2).unwrap();
    let stale = vec![StoreOp::PutNetwork(net.clone())];
    assert!(matches!(b.commit(&stale), Err(StoreError::Conflict { .. })));
    // Bad values under the prefix: a member that is not JSON, a member
    // filed under another member's key, a key outside the layout.
    let good_key = "ab".repeat(32);
    etcd.put_raw(
        &format!("/guards/members/{}/{good_key}", net.id.uuid()),
        b"{not json",
    );
    etcd.put_raw(
        &format!("/guards/tokens/{}", "cd".repeat(32)),
        br#"{"id":"x"}"#,
    );
    etcd.put_raw("/guards/somebody-else/key", b"\x00\x01binary");
    let skipped = b.skipped();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while skipped.load(Ordering::Relaxed) < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "bad values not reported"
        );
        let _ = b.remote().unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    // A fresh replica loads around them.
    let mut c = EtcdStore::connect(&url).unwrap();
    let records: Records = c.load().unwrap();
    assert_eq!(records.networks.len(), 1);
    assert!(records.members.is_empty() && records.tokens.is_empty());
    assert_eq!(c.skipped().load(Ordering::Relaxed), 3);
}

/// Three in-process replicas on one etcd prefix.
async fn replicas(
    etcd: &EtcdCluster,
    prefix: &str,
    n: usize,
) -> (Vec<tempfile::TempDir>, Vec<Harness>) {
    let url = etcd.url(prefix);
    let mut dirs = Vec::new();
    let mut hs = Vec::new();
    for _ in 0..n {
        let dir = tempfile::tempdir().unwrap();
        let u = url.clone();
        let path = dir.path().to_owned();
        let h = Harness::start(&path, move |c| c.store = Some(u)).await;
        dirs.push(dir);
        hs.push(h);
    }
    (dirs, hs)
}

/// `GET /metrics` of a replica's admin API.
async fn metrics_text(api: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let addr = api.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split_once("\r\n\r\n").unwrap().1.to_owned()
}

/// A sample's value.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

fn sessions_cfg() -> ClientConfig {
    ClientConfig {
        connect_timeout: Duration::from_secs(2),
        ..ClientConfig::default()
    }
}

/// Reads a session's events until its map has `n` online members.
async fn until_members(s: &mut Session, n: usize, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    while s.map().online().members.len() != n {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, s.next_event()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("session ended: {e}"),
            Err(_) => panic!(
                "map has {} members, not {n}, after {limit:?}",
                s.map().online().members.len()
            ),
        }
    }
}

/// 300 joins at once, spread over three replicas: every address, index
/// and instance name is handed out once, every replica lists all 300, and
/// every member ends up seeing every other.
/// A replica keeps one lease while etcd answers (the keep-alive stream gets
/// its first refresh before it waits for etcd's answer), and writes its
/// members' presence keys in batches: 1000 sessions claimed cost a few
/// etcd revisions, not 1000; all 1000 keys are there, and go again when
/// released.
#[test]
fn a_replica_keeps_its_lease_and_batches_presence_keys() {
    use keyserver::store::etcd::conn::Conn;
    use keyserver::store::etcd::keys::prefix_end;
    let Some(etcd) = EtcdCluster::start(3) else {
        return;
    };
    let url: EtcdUrl = etcd.url("lease").parse().unwrap();
    let store = EtcdStore::connect(&url).unwrap();
    let cluster = store.cluster();
    let probe = Conn::new(&etcd.endpoints()).unwrap();
    let presence = |count_only: bool| {
        let key = b"/lease/presence/".to_vec();
        probe
            .range(etcdv3client::pb::RangeRequest {
                range_end: prefix_end(&key),
                key,
                count_only,
                ..Default::default()
            })
            .unwrap()
    };
    let until = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "{what}: not in 15 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    until("a lease", &|| cluster.lease_id() != 0);
    let lease = cluster.lease_id();
    let granted = std::time::Instant::now();
    let rev0 = presence(true).header.unwrap().revision;
    let members: Vec<_> = (0..1000)
        .map(|_| {
            (
                meshlib::ids::NetworkId::random(),
                meshlib::keys::PrivateKey::generate().public_key(),
            )
        })
        .collect();
    for (n, k) in &members {
        cluster.claim(*n, *k);
    }
    until("1000 presence keys", &|| presence(true).count == 1000);
    let rev1 = presence(true).header.unwrap().revision;
    assert!(
        rev1 - rev0 <= 40,
        "1000 presence keys took {} revisions",
        rev1 - rev0
    );
    let kvs = presence(false).kvs;
    assert!(kvs
        .iter()
        .all(|kv| kv.lease == lease && kv.value == cluster.id().as_bytes()));
    // Past two keep-alive call deadlines (3 s each): still the first lease.
    std::thread::sleep(Duration::from_secs(8).saturating_sub(granted.elapsed()));
    assert_eq!(cluster.lease_id(), lease, "the lease was granted again");
    for (n, k) in &members {
        cluster.release(*n, *k);
    }
    until("presence keys released", &|| presence(true).count == 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_joins_over_three_replicas_never_collide() {
    let Some(etcd) = tokio::task::spawn_blocking(|| EtcdCluster::start(3))
        .await
        .unwrap()
    else {
        return;
    };
    let (_dirs, hs) = replicas(&etcd, "joins", 3).await;
    let net = hs[0].network("storm", "10.240.0.0/22").await;
    const N: usize = 300;
    let mut tokens = Vec::new();
    for h in &hs {
        let t = h
            .token(&net.to_string(), json!({"uses": N / 3, "expires": "1h"}))
            .await;
        assert_eq!(t.addrs.len(), 3, "a token carries every replica");
        // Each replica's token starts with that replica.
        tokens.push(t);
    }
    let mut tasks = Vec::new();
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(60));
    for i in 0..N {
        let mut token = tokens[i % 3].clone();
        let first = token.addrs[0];
        token.addrs.retain(|a| *a == first);
        let sem = sem.clone();
        tasks.push(tokio::spawn(async move {
            let ep = client_endpoint();
            let (_k, m) = meta(["api", "db", "web"][i % 3]);
            let s = {
                let _permit = sem.acquire().await.unwrap();
                control::join(&ep, &token, m, &sessions_cfg()).await
            };
            (ep, s.expect("join"))
        }));
    }
    let mut sessions = Vec::new();
    for t in tasks {
        sessions.push(t.await.unwrap());
    }
    for h in &hs {
        let members = h.members(&net.to_string()).await;
        assert_eq!(members.len(), N);
        let ips: HashSet<_> = members.iter().map(|m| m["ip"].clone()).collect();
        let names: HashSet<_> = members.iter().map(|m| m["instance"].clone()).collect();
        let idx: HashSet<_> = members
            .iter()
            .map(|m| (m["app_id"].clone(), m["index"].clone()))
            .collect();
        assert_eq!((ips.len(), names.len(), idx.len()), (N, N, N), "duplicates");
    }
    // Commits are grouped on etcd too: concurrent joins on one replica
    // share etcd transactions (fewer commits than operations committed).
    let (mut commits, mut operations) = (0.0, 0.0);
    for h in &hs {
        let text = metrics_text(&h.api).await;
        commits += metric(&text, "istmesh_keyserver_store_commits_total");
        operations += metric(&text, "istmesh_keyserver_store_committed_operations_total");
    }
    eprintln!("{operations} operations in {commits} etcd transactions");
    assert!(
        operations >= N as f64 && commits < operations,
        "{operations} operations in {commits} commits: no group"
    );
    let mut waits = Vec::new();
    for (ep, mut s) in sessions {
        waits.push(tokio::spawn(async move {
            until_members(&mut s, N, Duration::from_secs(45)).await;
            (ep, s)
        }));
    }
    for w in waits {
        let (_ep, s) = w.await.unwrap();
        s.close();
    }
    // A forced deletion of 300 members (more than one etcd transaction
    // takes) through replica 2; replica 3 forgets the network.
    let v = hs[1]
        .call(
            Method::DELETE,
            &format!("/v1/networks/{net}?force=true"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(v["members_removed"], json!(N));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let list = hs[2].call(Method::GET, "/v1/networks", None).await.unwrap();
        if list.as_array().unwrap().is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "replica 3 still lists it"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for h in hs {
        h.stop().await;
    }
}

/// A removal through replica 1 reaches members connected to replicas 2
/// and 3 within a second; a member resuming on another replica gets only
/// the deltas it missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn removal_crosses_replicas_and_resume_elsewhere_gets_deltas() {
    let Some(etcd) = tokio::task::spawn_blocking(|| EtcdCluster::start(3))
        .await
        .unwrap()
    else {
        return;
    };
    let (_dirs, hs) = replicas(&etcd, "cross", 3).await;
    let net = hs[0].network("cross", "10.240.0.0/22").await;
    let ep = client_endpoint();
    let mut sessions = Vec::new();
    for h in &hs {
        let mut t = h.token(&net.to_string(), json!({"uses": 5})).await;
        t.addrs.truncate(1);
        for _ in 0..2 {
            let (_k, m) = meta("api");
            sessions.push(control::join(&ep, &t, m, &cfg()).await.unwrap());
        }
    }
    for s in &mut sessions {
        until_members(s, 6, Duration::from_secs(20)).await;
    }
    // A member of replica 3 goes away (its map kept), then member 0 (of
    // replica 1) is removed through replica 1's API.
    let gone = sessions.remove(5);
    let membership = gone.membership();
    let old_map = gone.map().clone();
    gone.close();
    let victim = sessions[0].membership().public_key;
    let t0 = std::time::Instant::now();
    hs[0]
        .call(
            Method::DELETE,
            &format!(
                "/v1/networks/{net}/members/{}",
                percent(&victim.to_string())
            ),
            None,
        )
        .await
        .unwrap();
    for s in sessions.iter_mut().skip(1) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while s.map().members.contains_key(&victim) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            tokio::time::timeout(left, s.next_event())
                .await
                .expect("removal reached every replica's members within 1 s")
                .unwrap();
        }
    }
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(1), "{took:?}");
    // The member that went away comes back on replica 1 (it joined on
    // replica 3): it gets the delta it missed, not a snapshot.
    let mut m = membership.clone();
    m.addrs = vec![hs[0].quic];
    let mut resumed = control::resume_membership(&ep, &m, old_map.clone(), vec![], &cfg())
        .await
        .unwrap();
    let delta = loop {
        match common::next_relevant(&mut resumed).await.unwrap() {
            control::Event::Delta(d) => break d,
            control::Event::Snapshot => panic!("a snapshot where a delta was due"),
            _ => {}
        }
    };
    assert_eq!(delta.from, old_map.generation);
    assert!(delta
        .changes
        .contains(&meshlib::netmap::MapChange::Remove(victim)));
    assert!(
        delta.changes.len() <= 2,
        "only what it missed (the removal, its own return): {:?}",
        delta.changes
    );
    assert!(!resumed.map().members.contains_key(&victim));
    resumed.close();
    for s in sessions {
        s.close();
    }
    for h in hs {
        h.stop().await;
    }
}

fn percent(s: &str) -> String {
    keyserver::admin::path_segment(s)
}

/// etcd losing one node of three changes nothing; losing two (no quorum)
/// makes replicas refuse changes cleanly (`Busy`, `/readyz` 503) while
/// established sessions stay up; when etcd is back, so is everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_losing_nodes_refuses_cleanly_and_recovers() {
    let Some(mut etcd) = tokio::task::spawn_blocking(|| EtcdCluster::start(3))
        .await
        .unwrap()
    else {
        return;
    };
    let (_dirs, hs) = replicas(&etcd, "quorum", 2).await;
    let net = hs[0].network("quorum", "10.240.0.0/22").await;
    let token = hs[0].token(&net.to_string(), json!({"uses": 20})).await;
    let ep = client_endpoint();
    let (_k, m) = meta("api");
    let mut first = control::join(&ep, &token, m, &cfg()).await.unwrap();
    let join = |t: meshlib::proto::JoinToken| {
        let ep = ep.clone();
        async move {
            let (_k, m) = meta("api");
            control::join(&ep, &t, m, &cfg()).await
        }
    };
    // One node down: joins go on (the client moves to a live node).
    tokio::task::block_in_place(|| etcd.kill(0));
    let s = tokio::time::timeout(Duration::from_secs(20), join(token.clone()))
        .await
        .expect("a join with one etcd node down")
        .expect("join");
    s.close();
    until_members(&mut first, 2, Duration::from_secs(10)).await;
    // Two down: no quorum. Changes are refused with Busy, readiness says
    // why, and the established session keeps its map.
    tokio::task::block_in_place(|| etcd.kill(1));
    let t0 = std::time::Instant::now();
    let refused = join(token.clone()).await;
    match refused {
        Err(control::ControlError::Refused(e)) => {
            assert_eq!(e.code, meshlib::proto::ErrorCode::Busy, "{e:?}");
            assert!(e.message.contains("store"), "{}", e.message);
        }
        other => panic!("expected Busy, got {:?}", other.map(|_| ())),
    }
    assert!(t0.elapsed() < Duration::from_secs(15));
    let ready = reqwest_status(&hs[1].api, "/readyz").await;
    assert_eq!(ready, 503);
    assert_eq!(first.map().online().members.len(), 2);
    first.heartbeat().await.unwrap();
    // etcd comes back: joins work again by themselves.
    tokio::task::block_in_place(|| {
        etcd.restart(0);
        etcd.restart(1);
        etcd.wait_ready(Duration::from_secs(30));
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let s = loop {
        match join(token.clone()).await {
            Ok(s) => break s,
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "no recovery: {e}");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    until_members(&mut first, 3, Duration::from_secs(10)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while reqwest_status(&hs[1].api, "/readyz").await != 200 {
        assert!(std::time::Instant::now() < deadline, "not ready again");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    s.close();
    first.close();
    for h in hs {
        h.stop().await;
    }
}

/// The status code of an unauthenticated GET (0: no connection).
async fn reqwest_status(api: &str, path: &str) -> u16 {
    let client = keyserver::admin::AdminClient::new(api, "none");
    match client.call(Method::GET, path, None).await {
        Ok(_) => 200,
        Err(keyserver::admin::AdminClientError::Status { status, .. }) => status,
        Err(_) => 0,
    }
}

/// A `keyserver serve` child process, killed on drop.
struct Replica {
    child: Option<std::process::Child>,
    api: String,
    _dir: tempfile::TempDir,
    dir: std::path::PathBuf,
}

impl Replica {
    fn spawn(url: &str) -> Self {
        let ports = common::etcd::free_ports(2);
        let dir = tempfile::tempdir().unwrap();
        let quic: std::net::SocketAddr = format!("127.0.0.1:{}", ports[0]).parse().unwrap();
        let api = format!("127.0.0.1:{}", ports[1]);
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_keyserver"))
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args([
                "serve",
                "--quic-listen",
                &quic.to_string(),
                "--api-listen",
                &api,
            ])
            .args(["--store", url, "--log-level", "warn"])
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start keyserver");
        let path = dir.path().join("data");
        Self {
            child: Some(child),
            api: format!("http://{api}"),
            _dir: dir,
            dir: path,
        }
    }

    /// Waits until its API answers; returns an admin client.
    async fn ready(&self) -> keyserver::admin::AdminClient {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if reqwest_status(&self.api, "/readyz").await == 200 {
                let token = std::fs::read_to_string(self.dir.join("admin-token")).unwrap();
                return keyserver::admin::AdminClient::new(&self.api, token.trim());
            }
            assert!(std::time::Instant::now() < deadline, "replica not ready");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `kill -9`.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Three replicas as processes; one is killed with `kill -9` in the middle
/// of a join storm: the joins in flight on it are retried on the others,
/// its members fail over within seconds, nothing is lost and nothing is
/// handed out twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replica_killed_during_a_join_storm_fails_over() {
    let Some(etcd) = tokio::task::spawn_blocking(|| EtcdCluster::start(3))
        .await
        .unwrap()
    else {
        return;
    };
    let url = etcd.url("failover");
    let mut reps: Vec<Replica> = (0..3).map(|_| Replica::spawn(&url)).collect();
    let mut admins = Vec::new();
    for r in &reps {
        admins.push(r.ready().await);
    }
    let net = admins[0]
        .call(Method::POST, "/v1/networks", Some(&json!({"name": "fo"})))
        .await
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Wait until replica 0 knows all three (its tokens carry them).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let token: meshlib::proto::JoinToken = loop {
        let v = admins[0]
            .call(
                Method::POST,
                &format!("/v1/networks/{net}/tokens"),
                Some(&json!({"uses": 200})),
            )
            .await
            .unwrap();
        let t: meshlib::proto::JoinToken = v["token"].as_str().unwrap().parse().unwrap();
        if t.addrs.len() == 3 {
            break t;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "replicas not discovered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    const N: usize = 90;
    let cfg = ClientConfig {
        connect_timeout: Duration::from_secs(2),
        ..ClientConfig::default()
    };
    let mut tasks = Vec::new();
    for i in 0..N {
        let mut t = token.clone();
        t.addrs.rotate_left(i % 3);
        let cfg = cfg.clone();
        tasks.push(tokio::spawn(async move {
            // Staggered: the storm lasts a while.
            tokio::time::sleep(Duration::from_millis(20 * i as u64)).await;
            let ep = client_endpoint();
            let (_k, m) = meta(["api", "db", "web"][i % 3]);
            let s = tokio::time::timeout(Duration::from_secs(40), control::join(&ep, &t, m, &cfg))
                .await
                .expect("join in time")
                .expect("join");
            (ep, s)
        }));
    }
    // Mid-storm: replica 1 dies.
    tokio::time::sleep(Duration::from_millis(20 * N as u64 / 2)).await;
    reps[1].kill();
    let mut sessions = Vec::new();
    for t in tasks {
        sessions.push(t.await.unwrap());
    }
    let members = admins[0]
        .call(Method::GET, &format!("/v1/networks/{net}/members"), None)
        .await
        .unwrap();
    let members = members.as_array().unwrap();
    assert_eq!(members.len(), N, "nothing lost, nothing twice");
    let ips: HashSet<_> = members.iter().map(|m| m["ip"].clone()).collect();
    let names: HashSet<_> = members.iter().map(|m| m["instance"].clone()).collect();
    assert_eq!((ips.len(), names.len()), (N, N));
    // Every member, those of the dead replica included, is connected to a
    // live replica and sees everyone within seconds.
    let t0 = std::time::Instant::now();
    let mut waits = Vec::new();
    for (ep, mut s) in sessions {
        waits.push(tokio::spawn(async move {
            until_members(&mut s, N, Duration::from_secs(30)).await;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            while s.core().connection() != meshlib::member::Connection::Connected {
                tokio::time::timeout_at(deadline, s.next_event())
                    .await
                    .expect("reconnected to a live replica")
                    .unwrap();
            }
            (ep, s)
        }));
    }
    for w in waits {
        let (_ep, s) = w.await.unwrap();
        s.close();
    }
    assert!(t0.elapsed() < Duration::from_secs(30));
    drop(reps);
}

/// Only the replica holding a member's session judges its heartbeats:
/// the other replicas' sweeps leave a live member online; a member whose
/// session ended with nobody taking it over goes offline once, though
/// every replica sweeps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_the_session_holder_sweeps_a_live_member() {
    let Some(etcd) = tokio::task::spawn_blocking(|| EtcdCluster::start(3))
        .await
        .unwrap()
    else {
        return;
    };
    let url = etcd.url("sweep");
    let mut dirs = Vec::new();
    let mut hs = Vec::new();
    for _ in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let u = url.clone();
        hs.push(
            Harness::start(dir.path(), move |c| {
                c.store = Some(u);
                c.offline_after_secs = 3;
            })
            .await,
        );
        dirs.push(dir);
    }
    let net = hs[0].network("sweep", "10.240.0.0/22").await;
    let ep = client_endpoint();
    let mut t0 = hs[0].token(&net.to_string(), json!({"uses": 2})).await;
    t0.addrs.truncate(1);
    let (_k, m) = meta("live");
    let mut live = control::join(&ep, &t0, m, &sessions_cfg()).await.unwrap();
    let live_key = live.membership().public_key;
    let mut t1 = hs[1].token(&net.to_string(), json!({"uses": 2})).await;
    t1.addrs.truncate(1);
    let (_k, m) = meta("gone");
    let gone = control::join(&ep, &t1, m, &cfg()).await.unwrap();
    let gone_key = gone.membership().public_key;
    gone.close();
    // The live member heartbeats (every second) to replica 0 only.
    // It must never be seen offline (another replica sweeping it would
    // make it flap: offline, then online at its next heartbeat).
    let keep = tokio::spawn(async move {
        let until = tokio::time::Instant::now() + Duration::from_secs(9);
        let mut flapped = false;
        while tokio::time::Instant::now() < until {
            if let Ok(Ok(control::Event::Delta(d))) =
                tokio::time::timeout_at(until, live.next_event()).await
            {
                flapped |= d.changes.iter().any(|c| {
                    matches!(c, meshlib::netmap::MapChange::Upsert(m)
                        if m.public_key == live_key
                            && m.state == meshlib::netmap::MemberState::Offline)
                });
            }
        }
        (live, flapped)
    });
    tokio::time::sleep(Duration::from_secs(8)).await;
    for h in &hs {
        let members = h.members(&net.to_string()).await;
        let state = |k: &meshlib::keys::PublicKey| {
            members
                .iter()
                .find(|m| m["public_key"] == json!(k.to_string()))
                .map(|m| m["state"].clone())
        };
        assert_eq!(state(&live_key), Some(json!("online")), "{members:?}");
        assert_eq!(state(&gone_key), Some(json!("offline")), "{members:?}");
    }
    let (live, flapped) = keep.await.unwrap();
    assert!(
        !flapped,
        "a replica without its session swept the live member"
    );
    live.close();
    for h in hs {
        h.stop().await;
    }
}

/// Waits for the relay ticket the member core asks for after its welcome.
async fn relay_info(s: &mut Session, limit: Duration) -> meshlib::proto::RelayInfo {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, s.next_event()).await {
            Ok(Ok(control::Event::Relay(info))) => return info,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("session ended: {e}"),
            Err(_) => panic!("no relay ticket after {limit:?}"),
        }
    }
}

/// Registers `ticket` at the relay `at` from `sock`; the registration token.
async fn register(
    sock: &tokio::net::UdpSocket,
    at: std::net::SocketAddr,
    ticket: &[u8],
) -> [u8; 8] {
    use meshlib::nat::relay::{self, Frame};
    let mut buf = vec![0u8; 2048];
    for _ in 0..20 {
        sock.send_to(&relay::register(ticket), at).await.unwrap();
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(250), sock.recv_from(&mut buf)).await
        {
            if let Some(Frame::Registered { token, .. }) = relay::parse(&buf[..n]) {
                return token;
            }
        }
    }
    panic!("the relay at {at} refused the ticket");
}

/// Two replicas, two members, each connected to a different replica: both
/// are told the same relay (and the same relay secret signs their
/// tickets), and a datagram one sends through that relay reaches the
/// other. Before, each replica made its own secret and named its own
/// relay, so the two never met.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn members_on_different_replicas_meet_at_one_relay() {
    let Some(etcd) = tokio::task::spawn_blocking(|| EtcdCluster::start(3))
        .await
        .unwrap()
    else {
        return;
    };
    let url = etcd.url("relay");
    let mut dirs = Vec::new();
    let mut hs = Vec::new();
    for _ in 0..2 {
        let dir = tempfile::tempdir().unwrap();
        let u = url.clone();
        let h = Harness::start(dir.path(), move |c| {
            c.store = Some(u);
            c.relay_listen = keyserver::config::RelayListen::At("127.0.0.1:0".parse().unwrap());
        })
        .await;
        dirs.push(dir);
        hs.push(h);
    }
    let secrets: Vec<Vec<u8>> = dirs
        .iter()
        .map(|d| std::fs::read(d.path().join("relay-secret")).unwrap())
        .collect();
    assert_eq!(
        secrets[0], secrets[1],
        "the replicas share one relay secret"
    );
    let net = hs[0].network("relayed", "10.240.0.0/22").await;
    let mut sessions = Vec::new();
    for (i, h) in hs.iter().enumerate() {
        let mut token = h
            .token(&net.to_string(), json!({"uses": 1, "expires": "1h"}))
            .await;
        let first = token.addrs[0];
        assert_eq!(first, h.quic, "a replica's token starts with itself");
        token.addrs.retain(|a| *a == first);
        let ep = client_endpoint();
        let (_k, m) = meta(["a", "b"][i]);
        let s = control::join(&ep, &token, m, &sessions_cfg())
            .await
            .expect("join");
        sessions.push((ep, s));
    }
    // Both replicas must know each other's registration first: a member
    // may be told either relay until then, but both end on the same
    // without asking again.
    let mut infos = Vec::new();
    for (_, s) in &mut sessions {
        infos.push(relay_info(s, Duration::from_secs(10)).await);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while infos[0].relay != infos[1].relay {
        assert!(
            std::time::Instant::now() < deadline,
            "members on two replicas are told two relays: {:?} / {:?}",
            infos[0].relay,
            infos[1].relay
        );
        // The replica whose member was told another relay sends it the
        // shared one by itself (no asking again).
        for (i, (_, s)) in sessions.iter_mut().enumerate() {
            let next = tokio::time::timeout(
                Duration::from_millis(300),
                relay_info(s, Duration::from_secs(10)),
            );
            if let Ok(info) = next.await {
                infos[i] = info;
            }
        }
    }
    let relay = infos[0].relay.expect("a relay is named");
    assert!(
        hs.iter().any(|h| h.quic.ip() == relay.ip()),
        "one of the replicas' relays: {relay}"
    );
    // Through it: a registers, b registers, a sends to b's address.
    let ips: Vec<std::net::Ipv4Addr> = sessions.iter().map(|(_, s)| s.welcome().ip).collect();
    let (sa, sb) = (
        tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap(),
    );
    let ta = register(&sa, relay, &infos[0].ticket).await;
    let _tb = register(&sb, relay, &infos[1].ticket).await;
    let payload = b"through the shared relay";
    let mut frame = vec![0u8; meshlib::nat::relay::SEND_HEADER + payload.len()];
    meshlib::nat::relay::send_header(&mut frame, ips[1], ta);
    frame[meshlib::nat::relay::SEND_HEADER..].copy_from_slice(payload);
    let mut buf = vec![0u8; 2048];
    let mut got = None;
    for _ in 0..20 {
        sa.send_to(&frame, relay).await.unwrap();
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(250), sb.recv_from(&mut buf)).await
        {
            if let Some(meshlib::nat::relay::Frame::Deliver { src, packet }) =
                meshlib::nat::relay::parse(&buf[..n])
            {
                got = Some((src, packet.to_vec()));
                break;
            }
        }
    }
    assert_eq!(
        got,
        Some((ips[0], payload.to_vec())),
        "delivered from a to b"
    );
    for (_ep, s) in sessions {
        s.close();
    }
    for h in hs {
        h.stop().await;
    }
}
