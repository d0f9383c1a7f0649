//! The README's first command keeps working: runs the quickstart example
//! through cargo (so it is the current code, built if needed) and checks
//! that every request by name went through the tunnels. No root needed.

mod example_support;

#[test]
fn quickstart_runs_and_every_request_succeeds() {
    let stdout = example_support::run_example("quickstart");
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
