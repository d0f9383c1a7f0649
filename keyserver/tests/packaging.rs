//! Packaging of `keyserver`: shell completions and man pages generated from
//! its clap definition cover every subcommand; `keyserver.service` passes
//! `systemd-analyze verify` and keeps its hardening.

#[path = "../../packaging/test_support.rs"]
mod support;

use std::path::Path;

const KEYSERVER: &str = env!("CARGO_BIN_EXE_keyserver");

#[test]
fn completions_and_man_pages_cover_every_subcommand() {
    let subs = support::subcommands(KEYSERVER);
    for expected in [
        vec!["serve"],
        vec!["network", "create"],
        vec!["token", "create"],
    ] {
        assert!(
            subs.iter().any(|p| p == &expected),
            "{expected:?} missing from {subs:?}"
        );
    }
    support::check_completions(KEYSERVER, "keyserver", &subs);
    let dir = tempfile::tempdir().unwrap();
    support::check_man(KEYSERVER, "keyserver", &subs, dir.path());
}

#[test]
fn systemd_unit_verifies_and_is_hardened() {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/systemd/keyserver.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    for line in [
        "ExecStart=/usr/bin/keyserver serve",
        "Restart=on-failure",
        "DynamicUser=yes",
        "StateDirectory=ist-keyserver",
        "StateDirectoryMode=0700",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?}");
    }
    let dir = tempfile::tempdir().unwrap();
    support::verify_unit(
        &unit,
        "keyserver",
        KEYSERVER,
        "keyserver.service",
        dir.path(),
    );
}
