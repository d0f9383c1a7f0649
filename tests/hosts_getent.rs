//! The rendered hosts section, read by the real resolver: glibc's
//! `getent hosts`, with the file bind-mounted over `/etc/hosts` inside a
//! private mount namespace (`unshare -m`), so the machine's own file is never
//! touched. Needs root; skipped with a message otherwise.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::process::Command;

use meshlib::fsutil::update_hosts_file;
use meshlib::render::hosts::render_section;

fn is_root() -> bool {
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// Runs `getent hosts NAME` for each name with `hosts` as /etc/hosts.
fn getent_with(hosts: &std::path::Path, names: &[&str]) -> Vec<String> {
    let mut script = format!("mount --bind '{}' /etc/hosts || exit 99\n", hosts.display());
    for n in names {
        script.push_str(&format!("getent hosts '{n}' || echo 'MISSING {n}'\n"));
    }
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .output()
        .expect("run unshare");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

#[test]
fn getent_reads_the_managed_section_and_the_users_lines() {
    if !is_root() {
        eprintln!("SKIPPED getent_reads_the_managed_section: needs root (mount namespace)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hosts");
    // A user's file: comments, blank lines, tabs, no trailing newline.
    let original = "127.0.0.1\tlocalhost\n# a comment\n\n192.0.2.7 \t mine.example   # tabs and spaces\n::1 ip6-localhost";
    fs::write(&path, original).unwrap();
    let section = render_section(
        "pn-test",
        &[
            (
                [10, 240, 0, 2].into(),
                vec!["api.warp".into(), "api-1.internal".into()],
            ),
            (
                [10, 240, 0, 3].into(),
                vec!["xn--mes-donnes-i7a.warp".into()],
            ),
        ],
    );
    assert!(update_hosts_file(&path, "pn-test", &section).unwrap());
    let got = getent_with(
        &path,
        &[
            "api.warp",
            "API-1.internal",
            "xn--mes-donnes-i7a.warp",
            "mine.example",
            "nope.warp",
        ],
    );
    assert_eq!(
        got,
        [
            "10.240.0.2 api.warp api-1.internal",
            "10.240.0.2 api.warp api-1.internal",
            "10.240.0.3 xn--mes-donnes-i7a.warp",
            "192.0.2.7 mine.example",
            "MISSING nope.warp",
        ]
    );
    // The user's lines are intact, byte for byte.
    assert!(fs::read_to_string(&path)
        .unwrap()
        .starts_with(&format!("{original}\n")));
}
