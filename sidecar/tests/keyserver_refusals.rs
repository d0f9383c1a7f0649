//! Only a revocation forgets (issue 18): a keyserver that speaks another
//! protocol version, or answers `Malformed` or `Forbidden`, leaves a
//! member's state directory byte for byte as it was; the real `sidecar`
//! binary keeps running from its cached map and retrying, shows why in
//! `sidecar status`, logs each reason once, and resumes (same address) when
//! the real keyserver returns on the same address. Userspace mode, loopback
//! only, no privileges.

mod support;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshlib::proto::{self, ErrorCode, ProtoError, Request, ServerMsg};
use parking_lot::Mutex;
use serde_json::Value;
use support::{rootless_args, Keyserver, Sidecar};

const LIMIT: Duration = Duration::from_secs(60);

/// The protocol version the other keyserver speaks.
const OTHER_VERSION: u16 = proto::VERSION + 1;

/// The files a member keeps.
const STATE_FILES: [&str; 3] = ["private.key", "membership.json", "map.json"];

/// One hello the other keyserver saw: the client's version, whether it
/// was a resume, and the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    version: Option<u16>,
    resume: bool,
    answer: ErrorCode,
}

/// A keyserver of another protocol version on the real keyserver's
/// address, with its certificate (what members pin): it answers every
/// hello with the current refusal code and ends the connection.
struct OtherKeyserver {
    answer: Arc<Mutex<ErrorCode>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    endpoint: quinn::Endpoint,
    task: tokio::task::JoinHandle<()>,
}

impl OtherKeyserver {
    /// Binds `addr` (retrying while the real keyserver's socket goes away)
    /// with the certificate in the keyserver's data directory `dir`.
    async fn start(addr: SocketAddr, dir: &Path, answer: ErrorCode) -> Self {
        let cert = std::fs::read(dir.join("cert.der")).unwrap();
        let key = std::fs::read(dir.join("key.der")).unwrap();
        let limits = keyserver::server::Limits::default();
        let start = Instant::now();
        let endpoint = loop {
            match keyserver::quic::endpoint(addr, cert.clone(), key.clone(), &limits) {
                Ok(e) => break e,
                Err(e) if start.elapsed() < Duration::from_secs(10) => {
                    eprintln!("rebinding {addr}: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("cannot bind {addr}: {e}"),
            }
        };
        let answer = Arc::new(Mutex::new(answer));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (ep, a, s) = (endpoint.clone(), answer.clone(), seen.clone());
        let task = tokio::spawn(async move {
            while let Some(incoming) = ep.accept().await {
                let (a, s) = (a.clone(), s.clone());
                tokio::spawn(async move {
                    let _ = refuse(incoming, &a, &s).await;
                });
            }
        });
        Self {
            answer,
            seen,
            endpoint,
            task,
        }
    }

    /// Answers from now on with `code`.
    fn answer(&self, code: ErrorCode) {
        *self.answer.lock() = code;
    }

    /// Waits until `n` hellos were answered with `code`.
    async fn wait_answered(&self, code: ErrorCode, n: usize, sc: &Sidecar) {
        let start = Instant::now();
        while self.seen.lock().iter().filter(|s| s.answer == code).count() < n {
            assert!(
                start.elapsed() < LIMIT,
                "no {n} hellos answered {code:?}: {:?}\nlog:\n{}",
                self.seen.lock(),
                sc.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops listening and frees the address.
    async fn stop(self) {
        self.task.abort();
        self.endpoint.close(0u32.into(), b"bye");
        let _ = tokio::time::timeout(Duration::from_secs(5), self.endpoint.wait_idle()).await;
    }
}

type Failure = Box<dyn std::error::Error + Send + Sync>;

/// One connection: reads the hello (of any version), answers the current
/// refusal, closes.
async fn refuse(
    incoming: quinn::Incoming,
    answer: &Mutex<ErrorCode>,
    seen: &Mutex<Vec<Seen>>,
) -> Result<(), Failure> {
    let conn = incoming.await?;
    let (mut send, mut recv) = conn.accept_bi().await?;
    let payload = proto::read_payload(&mut recv, proto::DEFAULT_MAX_FRAME).await?;
    let hello = proto::parse_hello(&payload).ok();
    let code = *answer.lock();
    seen.lock().push(Seen {
        version: hello.as_ref().map(|h| h.version),
        resume: hello
            .as_ref()
            .is_some_and(|h| matches!(h.request, Request::Resume(_))),
        answer: code,
    });
    let client = hello.map_or("unknown".to_owned(), |h| h.version.to_string());
    let message = match code {
        ErrorCode::UnsupportedVersion => {
            format!("server speaks version {OTHER_VERSION} only, client {client}")
        }
        other => format!("a version-{OTHER_VERSION} keyserver says {other:?}"),
    };
    let msg = ServerMsg::Error(ProtoError { code, message });
    proto::write_frame(&mut send, &msg, proto::DEFAULT_MAX_FRAME).await?;
    send.finish()?;
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
    Ok(())
}

fn args(dir: &Path, interface: &str, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec!["up".into(), "--service".into(), "api".into()];
    a.extend(rootless_args(dir, interface));
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn secret_file(dir: &Path, text: &str) -> String {
    let p = dir.join("token");
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p.to_str().unwrap().to_owned()
}

/// The member's files, byte for byte.
fn state_files(state: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    STATE_FILES
        .iter()
        .map(|f| {
            let p = state.join(f);
            let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, bytes)
        })
        .collect()
}

fn assert_untouched(sc: &Sidecar, before: &[(PathBuf, Vec<u8>)], when: &str) {
    assert_eq!(state_files(&sc.state), before, "{when}: state changed");
    assert!(
        !sc.state.join("private.key.next").exists(),
        "{when}: no rotation"
    );
}

/// Waits until the status shows the keyserver at `addr` refusing with a
/// reason containing `reason`.
async fn wait_retrying(sc: &mut Sidecar, addr: SocketAddr, reason: &str) -> Value {
    let addr = addr.to_string();
    sc.wait_status(LIMIT, |s| {
        let c = &s["control"];
        c["state"] == "retrying"
            && c["keyserver"] == addr.as_str()
            && c["reason"].as_str().is_some_and(|r| r.contains(reason))
    })
    .await
}

/// The log lines saying the keyserver did not take the member.
fn refusal_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("did not take this member"))
        .collect()
}

/// `sidecar status` as a human reads it.
fn human_status(sc: &Sidecar) -> String {
    let out = std::process::Command::new(support::bin())
        .args(["status", "--state-dir"])
        .arg(&sc.state)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyserver_of_another_version_leaves_the_membership_and_the_member_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let ks_dir = dir.path().join("ks");
    let ks = Keyserver::start(&ks_dir, "127.0.0.1:0".parse().unwrap()).await;
    let addr = ks.quic;
    ks.network("prod").await;
    let token = ks.token("prod", 1).await;
    let sc_dir = dir.path().join("sc");
    std::fs::create_dir(&sc_dir).unwrap();
    let file = secret_file(&sc_dir, &token);
    let interface = support::interface();
    let mut sc = Sidecar::spawn(
        &sc_dir,
        &args(&sc_dir, &interface, &["--token-file", &file]),
        &[],
    );
    let joined = sc
        .wait_status(LIMIT, |s| s["control"]["state"] == "connected")
        .await;
    let ip = joined["ip"].as_str().unwrap().to_owned();
    let before = state_files(&sc.state);

    // 1. The keyserver is replaced, on its address and with its
    //    certificate, by one of another protocol version, while the
    //    sidecar runs.
    ks.stop().await;
    let other = OtherKeyserver::start(addr, &ks_dir, ErrorCode::UnsupportedVersion).await;
    other
        .wait_answered(ErrorCode::UnsupportedVersion, 1, &sc)
        .await;
    let s = wait_retrying(&mut sc, addr, "another protocol version").await;
    assert_eq!(s["ip"].as_str(), Some(ip.as_str()), "{s}");
    let human = human_status(&sc);
    assert!(
        human.contains(&format!("control: retrying: keyserver {addr} speaks another protocol version (this member speaks {}): server speaks version {OTHER_VERSION} only, client {}", proto::VERSION, proto::VERSION)),
        "{human}"
    );
    for (code, says) in [
        (ErrorCode::Malformed, "refused (Malformed)"),
        (ErrorCode::Forbidden, "refused (Forbidden)"),
        (ErrorCode::UnsupportedVersion, "another protocol version"),
    ] {
        other.answer(code);
        let n = other
            .seen
            .lock()
            .iter()
            .filter(|s| s.answer == code)
            .count();
        other.wait_answered(code, n + 1, &sc).await;
        wait_retrying(&mut sc, addr, says).await;
        assert_untouched(&sc, &before, &format!("running, {code:?}"));
        assert!(sc.child.try_wait().unwrap().is_none(), "still running");
    }
    let seen = other.seen.lock().clone();
    assert!(
        seen.iter()
            .all(|s| s.resume && s.version == Some(proto::VERSION)),
        "every hello is a resume of this version: {seen:?}"
    );
    let log = sc.log_text();
    assert!(
        !log.contains("revoked") && !log.contains("forgotten"),
        "{log}"
    );
    // Each reason once, with the keyserver's address, though
    // UnsupportedVersion was answered twice.
    let lines = refusal_lines(&log);
    for says in [
        "another protocol version",
        "refused (Malformed)",
        "refused (Forbidden)",
    ] {
        let with: Vec<_> = lines.iter().filter(|l| l.contains(says)).collect();
        assert_eq!(with.len(), 1, "{says} logged once:\n{log}");
        assert!(
            with[0].contains(&format!("keyserver={addr}")),
            "{}",
            with[0]
        );
    }

    // 2. The repro: a sidecar started from the saved state against
    //    that keyserver keeps running and keeps the state.
    sc.stop();
    assert_untouched(&sc, &before, "stopped");
    let mut sc = Sidecar::spawn(&sc_dir, &args(&sc_dir, &interface, &[]), &[]);
    let resumes = other.seen.lock().len();
    for (code, says) in [
        (ErrorCode::UnsupportedVersion, "another protocol version"),
        (ErrorCode::Malformed, "refused (Malformed)"),
        (ErrorCode::Forbidden, "refused (Forbidden)"),
    ] {
        other.answer(code);
        let n = other
            .seen
            .lock()
            .iter()
            .filter(|s| s.answer == code)
            .count();
        other.wait_answered(code, n + 1, &sc).await;
        let s = wait_retrying(&mut sc, addr, says).await;
        assert_eq!(s["ip"].as_str(), Some(ip.as_str()), "runs from the cache");
        assert_untouched(&sc, &before, &format!("restarted, {code:?}"));
    }
    assert!(other.seen.lock().len() >= resumes + 3);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(sc.child.try_wait().unwrap().is_none(), "still running");
    assert_untouched(&sc, &before, "restarted");
    let log = sc.log_text();
    assert!(
        !log.contains("revoked") && !log.contains("forgotten"),
        "{log}"
    );

    // 3. The real keyserver returns on the same address: the member resumes
    //    with its address, no token needed.
    other.stop().await;
    let ks = Keyserver::start(&ks_dir, addr).await;
    assert_eq!(ks.quic, addr);
    let s = sc
        .wait_status(LIMIT, |s| s["control"]["state"] == "connected")
        .await;
    assert_eq!(s["ip"].as_str(), Some(ip.as_str()), "{s}");
    assert_eq!(s["control"]["server"], addr.to_string().as_str(), "{s}");
    let members = ks.members("prod").await;
    assert_eq!(members.len(), 1, "{members:?}");
    assert_eq!(members[0]["ip"].as_str(), Some(ip.as_str()));
    assert!(sc.log_text().contains("connected to the keyserver"));
    sc.stop();
    ks.stop().await;
}
