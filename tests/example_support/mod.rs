//! Runs one of the workspace's examples through cargo (so it is the
//! current code, built if needed), bounded in time.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `cargo run --example <name>`; its stdout, after asserting it
/// succeeded within 300 s (a build included).
pub fn run_example(name: &str) -> String {
    let mut child = Command::new(env!("CARGO"))
        .args(["run", "--quiet", "--example", name])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the example");
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(300) {
            let _ = child.kill();
            panic!("example {name} did not finish in 300 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
