//! Packaging of `sidecar`: shell completions and man pages generated from
//! its clap definition cover every subcommand; the `sidecar@.service`
//! template passes `systemd-analyze verify` and keeps its hardening;
//! `sidecar wg --version` works like `wireguard-go --version`.

#[path = "../../packaging/test_support.rs"]
mod support;

use std::path::Path;

const SIDECAR: &str = env!("CARGO_BIN_EXE_sidecar");

#[test]
fn completions_and_man_pages_cover_every_subcommand() {
    let subs = support::subcommands(SIDECAR);
    let top: Vec<&str> = subs
        .iter()
        .filter(|p| p.len() == 1)
        .map(|p| p[0].as_str())
        .collect();
    for expected in ["up", "run", "status", "wg", "tunnel", "ist-names"] {
        assert!(top.contains(&expected), "{expected} missing from {top:?}");
    }
    support::check_completions(SIDECAR, "sidecar", &subs);
    let dir = tempfile::tempdir().unwrap();
    support::check_man(SIDECAR, "sidecar", &subs, dir.path());
}

#[test]
fn systemd_unit_verifies_and_is_hardened() {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/systemd/sidecar@.service");
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(&unit).unwrap();
    for line in [
        "ExecStart=/usr/bin/sidecar up --config /etc/ist-mesh/sidecar/%i.toml --state-dir /var/lib/ist-mesh/%i",
        "Restart=on-failure",
        "StateDirectory=ist-mesh/%i",
        "StateDirectoryMode=0700",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_BIND_SERVICE",
        "DeviceAllow=/dev/net/tun rw",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?}");
    }
    support::verify_unit(
        &unit,
        "sidecar",
        SIDECAR,
        "sidecar@web-1.service",
        dir.path(),
    );
}

#[test]
fn wg_version_like_wireguard_go() {
    let text = support::stdout_of(SIDECAR, &["wg", "--version"]);
    assert!(
        text.starts_with(&format!("sidecar wg v{}\n", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
}
