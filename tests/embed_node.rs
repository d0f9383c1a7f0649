//! The embedding example keeps working: runs `examples/embed_node.rs`
//! through cargo (a keyserver and two in-process nodes on loopback, no
//! sidecar, no root) and checks every step it reports.

mod example_support;

#[test]
fn two_embedded_nodes_talk_rotate_stop_and_leave() {
    let stdout = example_support::run_example("embed_node");
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
