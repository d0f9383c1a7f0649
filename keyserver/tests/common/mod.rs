//! A real keyserver on loopback ports, in-process, for the tests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper::Method;
use keyserver::admin::{AdminClient, AdminClientError};
use keyserver::config::Config;
use keyserver::Keyserver;
use meshlib::control::{self, ClientConfig, MemberMeta, Session};
use meshlib::ids::NetworkId;
use meshlib::keys::PrivateKey;
use meshlib::proto::JoinToken;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A running keyserver.
pub struct Harness {
    pub dir: PathBuf,
    pub quic: SocketAddr,
    pub api: String,
    pub admin_token: String,
    pub fingerprint: [u8; 32],
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Harness {
    /// Starts a keyserver on `dir` with `tweak` applied to its config.
    pub async fn start(dir: &Path, tweak: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config {
            data_dir: dir.to_owned(),
            quic_listen: "127.0.0.1:0".parse().unwrap(),
            api_listen: "127.0.0.1:0".parse().unwrap(),
            ..Config::default()
        };
        tweak(&mut config);
        let ks = Keyserver::open(&config).expect("open keyserver");
        let quic = ks.bind_quic(config.quic_listen).expect("bind quic");
        let quic_addr = quic.local_addr().unwrap();
        let api = tokio::net::TcpListener::bind(config.api_listen)
            .await
            .unwrap();
        let api_addr = api.local_addr().unwrap();
        let (admin_token, fingerprint) = (ks.admin_token().to_owned(), ks.fingerprint());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            ks.serve(quic, api, vec![], async {
                let _ = rx.await;
            })
            .await
            .expect("serve");
        });
        Self {
            dir: dir.to_owned(),
            quic: quic_addr,
            api: format!("http://{api_addr}"),
            admin_token,
            fingerprint,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Stops the servers and waits for them.
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), self.task.take().unwrap())
            .await
            .expect("keyserver stops in time")
            .unwrap();
    }

    pub fn admin(&self) -> AdminClient {
        AdminClient::new(&self.api, &self.admin_token)
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, AdminClientError> {
        self.admin().call(method, path, body.as_ref()).await
    }

    /// Creates a network; returns its id.
    pub async fn network(&self, name: &str, range: &str) -> NetworkId {
        let v = self
            .call(
                Method::POST,
                "/v1/networks",
                Some(json!({"name": name, "range": range})),
            )
            .await
            .unwrap();
        v["id"].as_str().unwrap().parse().unwrap()
    }

    /// Creates a token with the given body; returns it parsed.
    pub async fn token(&self, net: &str, body: Value) -> JoinToken {
        let v = self
            .call(
                Method::POST,
                &format!("/v1/networks/{net}/tokens"),
                Some(body),
            )
            .await
            .unwrap();
        v["token"].as_str().unwrap().parse().unwrap()
    }

    pub async fn members(&self, net: &str) -> Vec<Value> {
        let v = self
            .call(Method::GET, &format!("/v1/networks/{net}/members"), None)
            .await
            .unwrap();
        v.as_array().unwrap().clone()
    }

    pub async fn tokens(&self, net: &str) -> Vec<Value> {
        let v = self
            .call(Method::GET, &format!("/v1/networks/{net}/tokens"), None)
            .await
            .unwrap();
        v.as_array().unwrap().clone()
    }
}

/// Member metadata with a fresh key.
pub fn meta(service: &str) -> (PrivateKey, MemberMeta) {
    let key = PrivateKey::generate();
    let meta = MemberMeta {
        public_key: key.public_key(),
        service: service.to_owned(),
        app_id: None,
        process_type: Default::default(),
        instance: None,
        runner: "runner-1".into(),
        ports: vec![],
        endpoints: vec!["192.0.2.10:51820".parse().unwrap()],
        replace: false,
        ephemeral: false,
    };
    (key, meta)
}

pub fn client_endpoint() -> quinn::Endpoint {
    control::client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap()
}

/// One-shot sessions: a lost connection is an error, as these tests expect.
pub fn cfg() -> ClientConfig {
    ClientConfig {
        connect_timeout: Duration::from_secs(5),
        ..ClientConfig::one_shot()
    }
}

/// Joins with a fresh key.
pub async fn join(ep: &quinn::Endpoint, token: &JoinToken, service: &str) -> (PrivateKey, Session) {
    let (key, meta) = meta(service);
    let s = control::join(ep, token, meta, &cfg()).await.expect("join");
    (key, s)
}

/// The next event about the map or a request (connection-state, welcome
/// and caught-up notices skipped).
pub async fn next_relevant(s: &mut Session) -> Result<control::Event, control::ControlError> {
    loop {
        match s.next_event().await? {
            control::Event::Connection(_)
            | control::Event::CaughtUp { .. }
            | control::Event::Relay(_)
            | control::Event::Welcomed(_) => continue,
            other => return Ok(other),
        }
    }
}

/// Reads events until the map satisfies `done`, or panics after `limit`.
pub async fn until(s: &mut Session, limit: Duration, done: impl Fn(&Session) -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !done(s) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        tokio::time::timeout(left, s.next_event())
            .await
            .expect("condition not reached in time")
            .expect("session event");
    }
}
pub mod etcd;

/// Runs `promtool check metrics` on an exposition (CI installs promtool);
/// says SKIPPED where it is not installed. Panics with promtool's words.
pub fn promtool_check(text: &str) {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let Ok(mut child) = child else {
        eprintln!("SKIPPED promtool check: promtool is not installed");
        return;
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
