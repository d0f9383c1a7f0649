//! The embedding example keeps working: runs `examples/embed_node.rs`
//! through cargo (a keyserver and two in-process nodes on loopback, no
//! sidecar, no root) and checks every step it reports.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn two_embedded_nodes_talk_rotate_stop_and_leave() {
    let mut child = Command::new(env!("CARGO"))
        .args(["run", "--quiet", "--example", "embed_node"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the example");
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(300) {
            let _ = child.kill();
            panic!("the example did not finish in 300 s");
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
    for line in [
        "client resolves greeter.warp to [10.240.0.1]",
        "client -> greeter.warp:7000: greetings, you said \"hello\"",
        "after the rotation: greetings, you said \"still there?\"",
        "greeter saw the client go offline: true",
        "greeter left the network: true",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
}
