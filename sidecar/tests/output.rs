//! What the real `sidecar` binary prints: `sidecar status` escapes names
//! that came from other members; logs carry colours only on a terminal
//! without `NO_COLOR`, or are JSON lines; error messages say each cause
//! once. No keyserver needed: a front that answers every join `Busy` makes
//! the sidecar log join retries at once.

mod support;

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshlib::proto::ErrorCode;
use sidecar::status::{serve_status, ControlState, PeerStatus, Status, StatusSource};
use support::front::{Front, FrontCert, Step};
use support::{bin, rootless_args, Sidecar};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_prints_hostile_names_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("status.sock");
    let status = Status {
        network: "pn-x".into(),
        instance: "me-1".into(),
        ip: Some(Ipv4Addr::new(10, 240, 0, 1)),
        control: Some(ControlState::Connected {
            server: "127.0.0.1:7000".into(),
        }),
        peers: vec![PeerStatus {
            public_key: "K".into(),
            instance: "evil-1".into(),
            // ESC sequences (clear screen, red), a forged line, a bidi override.
            service: "evil\u{1b}[2J\u{1b}[31m\nnetwork: pn-forged\u{202e}".into(),
            ip: Ipv4Addr::new(10, 240, 0, 2),
            endpoint: None,
            last_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
            drops_spoofed: 0,
            state: "online".into(),
            path: None,
        }],
        ..Status::default()
    };
    let source: StatusSource = Arc::new(move || status.clone());
    let listener = sidecar::status::bind_status_socket(&path).unwrap();
    tokio::spawn(serve_status(listener, source, std::future::pending()));
    let out = tokio::task::spawn_blocking(move || {
        Command::new(bin())
            .args(["status", "--socket"])
            .arg(&path)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.contains('\u{1b}'), "raw ESC printed: {text:?}");
    assert!(!text.contains('\u{202e}'), "raw bidi override: {text:?}");
    assert_eq!(
        text.lines().filter(|l| l.starts_with("network:")).count(),
        1,
        "a forged line: {text}"
    );
    assert!(
        text.contains(
            "(evil-1 / evil\\u{1b}[2J\\u{1b}[31m\\u{a}network: pn-forged\\u{202e}, 10.240.0.2)"
        ),
        "{text}"
    );
}

/// A front answering every join `Busy` (in the current runtime), and a
/// token pointing at it.
fn busy_front() -> (Front, String) {
    let cert = FrontCert::new();
    let nowhere = "127.0.0.1:9".parse().unwrap();
    let front = Front::start(
        "127.0.0.1:0".parse().unwrap(),
        &cert,
        nowhere,
        [0; 32],
        vec![Step::Refuse(ErrorCode::Busy); 1000],
    );
    let token = meshlib::proto::JoinToken {
        addrs: vec![front.addr],
        cert_sha256: cert.fingerprint,
        network: meshlib::ids::NetworkId::random(),
        secret: [9; 32],
        service: None,
        process_type: None,
    }
    .to_string();
    (front, token)
}

/// `sidecar up` of a member that keeps retrying its join (refused `Busy`
/// by the front of `token`), with `env`, run under `script` (a terminal)
/// when `tty`; its output once it logged retries.
fn logs_of(token: &str, extra: &[&str], env: &[(&str, &str)], tty: bool) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let mut args: Vec<String> = vec!["up".into(), "--service".into(), "api".into()];
    args.extend(rootless_args(dir.path(), &support::interface()));
    args.extend(["--token".into(), token.to_owned()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    if !tty {
        let mut sc = Sidecar::spawn(dir.path(), &args, env);
        let start = Instant::now();
        while !sc.log_text().contains("retrying") && start.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(50));
        }
        sc.stop();
        return std::fs::read(&sc.log).unwrap();
    }
    // script(1) gives the sidecar a pseudo-terminal and copies it to stdout.
    let quoted: Vec<String> = std::iter::once(bin().to_string())
        .chain(args)
        .map(|a| format!("'{a}'"))
        .collect();
    let cmd = format!("timeout -s INT 5 {}", quoted.join(" "));
    let out = Command::new("script")
        .args(["-qefc", &cmd, "/dev/null"])
        .env("ISTM_LOG", "info")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    out.stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_have_colours_only_on_a_terminal_without_no_color() {
    let (_front, token) = busy_front();
    tokio::task::spawn_blocking(move || colours(&token))
        .await
        .unwrap();
}

fn colours(token: &str) {
    let piped = logs_of(token, &[], &[], false);
    let text = String::from_utf8_lossy(&piped);
    assert!(text.contains("join failed; retrying"), "{text}");
    assert!(!piped.contains(&0x1b), "ESC in piped logs: {text:?}");
    // The log names the address the failed connection tried.
    assert!(text.contains("keyserver=127.0.0.1:"), "{text}");

    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("SKIPPED (terminal half): no script(1)");
        return;
    }
    let tty = logs_of(token, &[], &[("NO_COLOR", "")], true);
    assert!(
        tty.contains(&0x1b),
        "colours on a terminal: {:?}",
        String::from_utf8_lossy(&tty)
    );
    let no_color = logs_of(token, &[], &[("NO_COLOR", "1")], true);
    let text = String::from_utf8_lossy(&no_color);
    assert!(text.contains("retrying"), "{text}");
    assert!(!no_color.contains(&0x1b), "NO_COLOR honoured: {text:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line() {
    let (_front, token) = busy_front();
    let out =
        tokio::task::spawn_blocking(move || logs_of(&token, &["--log-format", "json"], &[], false))
            .await
            .unwrap();
    let text = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    assert!(!lines.is_empty());
    let mut retry = false;
    for line in lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
        retry |= v["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("retrying"))
            && v["fields"]["keyserver"].is_string();
    }
    assert!(retry, "{text}");
}

/// Fails when a message repeats itself: a part of `a: b: c` equal to, or
/// the start of, the part after it (a cause printed twice).
fn assert_says_each_thing_once(e: &anyhow::Error) {
    let text = format!("{e:#}");
    let parts: Vec<&str> = text.split(": ").collect();
    for w in parts.windows(2) {
        assert!(!w[1].starts_with(w[0]), "repeated {:?} in {text:?}", w[0]);
    }
    for (i, p) in parts.iter().enumerate() {
        assert!(
            p.len() < 8 || !parts[i + 1..].contains(p),
            "repeated {p:?} in {text:?}"
        );
    }
}

#[test]
fn error_messages_say_each_cause_once() {
    use sidecar::config::Config;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut errors: Vec<anyhow::Error> = vec![
        Config::load(&d.join("missing.toml")).unwrap_err().into(),
        Config {
            warp_config: Some(d.join("missing.js")),
            ..Config::default()
        }
        .overrides()
        .unwrap_err()
        .into(),
        Config {
            token: Some("istm1.%%%".into()),
            ..Config::default()
        }
        .join_token()
        .map(|t| t.unwrap().parse::<meshlib::proto::JoinToken>())
        .unwrap()
        .map_err(sidecar::agent::AgentError::Token)
        .unwrap_err()
        .into(),
    ];
    std::fs::write(d.join("file"), "x").unwrap();
    errors.push(
        meshlib::node::state::StateDir::open(&d.join("file/sub"))
            .unwrap_err()
            .into(),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    errors.push(
        rt.block_on(sidecar::status::query_status(&d.join("none.sock")))
            .unwrap_err()
            .into(),
    );
    let refused = meshlib::control::ControlError::Refused(meshlib::proto::ProtoError {
        code: meshlib::proto::ErrorCode::TokenUsedUp,
        message: "no uses left".into(),
    });
    errors.push(
        sidecar::agent::AgentError::Node(meshlib::node::NodeError::Control {
            keyserver: "127.0.0.1:7000".into(),
            error: refused,
        })
        .into(),
    );
    errors.push(
        meshlib::fsutil::write_atomic(&d.join("no/dir/f"), b"x", 0o600)
            .unwrap_err()
            .into(),
    );
    for e in &errors {
        assert_says_each_thing_once(e);
    }
}
