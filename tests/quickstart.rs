//! The README's first command keeps working: runs the quickstart example
//! through cargo (so it is the current code, built if needed) and checks
//! that every request by name went through the tunnels. No root needed.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn quickstart_runs_and_every_request_succeeds() {
    let mut child = Command::new(env!("CARGO"))
        .args(["run", "--quiet", "--example", "quickstart"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the quickstart");
    // Bounded: a build if needed, then a few seconds.
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(300) {
            let _ = child.kill();
            panic!("quickstart did not finish in 300 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let replies = stdout
        .lines()
        .filter(|l| l.contains("-> hello from"))
        .count();
    assert_eq!(replies, 6, "{stdout}");
    for text in [
        "WARP_IST_my_db=",
        "my-db.warp",
        "latest handshake",
        "All 6 requests",
    ] {
        assert!(stdout.contains(text), "{text} missing:\n{stdout}");
    }
}
