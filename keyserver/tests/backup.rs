//! `keyserver backup` while serving and `keyserver restore` into a stopped
//! keyserver; a restore over a running store is refused.

mod common;

use std::process::Command;

use common::{client_endpoint, join, Harness};
use serde_json::json;

fn cli(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_keyserver"))
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .output()
        .expect("run keyserver")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_while_serving_then_restore_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(dir.path(), |_| {}).await;
    let net = h.network("kept", "10.240.0.0/22").await;
    let token = h.token(&net.to_string(), json!({"uses": 5})).await;
    let ep = client_endpoint();
    let (_k, s) = join(&ep, &token, "api").await;
    let out = dir.path().join("backup.json");
    let token_file = dir.path().join("admin-token");
    let d = dir.path().to_owned();
    let (api, o) = (h.api.clone(), out.clone());
    let taken = tokio::task::spawn_blocking(move || {
        cli(
            &d,
            &[
                "backup",
                "--out",
                o.to_str().unwrap(),
                "--api",
                &api,
                "--token-file",
                token_file.to_str().unwrap(),
            ],
        )
    })
    .await
    .unwrap();
    assert!(
        taken.status.success(),
        "{}",
        String::from_utf8_lossy(&taken.stderr)
    );
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Restoring over the store the running keyserver holds is refused.
    let d = dir.path().to_owned();
    let o = out.clone();
    let refused =
        tokio::task::spawn_blocking(move || cli(&d, &["restore", "--from", o.to_str().unwrap()]))
            .await
            .unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("stop the keyserver"), "{err}");
    s.close();
    h.stop().await;
    // Into a new data directory: the network, token use and member are back.
    let other = tempfile::tempdir().unwrap();
    let target = other.path().join("ks");
    let restored = cli(&target, &["restore", "--from", out.to_str().unwrap()]);
    assert!(
        restored.status.success(),
        "{}",
        String::from_utf8_lossy(&restored.stderr)
    );
    let h2 = Harness::start(&target, |_| {}).await;
    let members = h2.members(&net.to_string()).await;
    assert_eq!(members.len(), 1);
    assert_eq!(h2.tokens(&net.to_string()).await[0]["uses_left"], json!(4));
    h2.stop().await;
    // Garbage is not a backup.
    std::fs::write(&out, b"{\"format\": \"something else\"}").unwrap();
    let bad = cli(&target, &["restore", "--from", out.to_str().unwrap()]);
    assert!(!bad.status.success());
}
