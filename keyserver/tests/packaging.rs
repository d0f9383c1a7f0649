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
        "ExecStart=/usr/bin/keyserver serve --config /etc/ist-mesh/keyserver.toml",
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

/// The unit reads the config file the packaging installs, and that file
/// (every line commented) parses to the defaults; its documented values
/// parse too when uncommented.
#[test]
fn shipped_config_file_is_read_and_parses() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(root.join("packaging/keyserver.toml")).unwrap();
    let config = keyserver::config::Config::from_toml(&text).expect("the shipped file parses");
    assert_eq!(config, keyserver::config::Config::default());
    let uncommented: String = text
        .lines()
        .filter_map(|l| l.strip_prefix("# "))
        .filter(|l| l.contains(" = "))
        .map(|l| format!("{l}\n"))
        .collect();
    let config = keyserver::config::Config::from_toml(&uncommented)
        .unwrap_or_else(|e| panic!("uncommented values parse: {e}\n{uncommented}"));
    assert_eq!(config.quic_listen.port(), 7443);
    assert_eq!(config.relay_listen, keyserver::config::RelayListen::Default);
    let off = keyserver::config::Config::from_toml("relay-listen = \"off\"\n").expect("off parses");
    assert_eq!(off.relay_listen, keyserver::config::RelayListen::Off);
    let at = keyserver::config::Config::from_toml("relay-listen = \"127.0.0.1:3479\"\n").unwrap();
    assert_eq!(
        at.relay_listen,
        keyserver::config::RelayListen::At("127.0.0.1:3479".parse().unwrap())
    );
    assert!(keyserver::config::Config::from_toml("relay-listen = \"nowhere\"\n").is_err());
    let install = std::fs::read_to_string(root.join("packaging/install.sh")).unwrap();
    assert!(
        install.contains("packaging/keyserver.toml"),
        "install.sh installs it"
    );
}
