//! Checks shared by `sidecar/tests/packaging.rs` and
//! `keyserver/tests/packaging.rs` (included with `#[path]`): completions and
//! man pages generated from the program itself mention every subcommand its
//! `--help` lists, and the systemd unit passes `systemd-analyze verify`.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// Runs `program args`, which must succeed; returns stdout.
pub fn stdout_of(program: &str, args: &[&str]) -> String {
    let out: Output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// Every subcommand path under `program` as its `--help` pages list them
/// (`["up"]`, `["network", "create"]`, ...), without `help`.
pub fn subcommands(program: &str) -> Vec<Vec<String>> {
    fn walk(program: &str, prefix: &[String], out: &mut Vec<Vec<String>>) {
        let mut args: Vec<&str> = prefix.iter().map(String::as_str).collect();
        args.push("--help");
        let help = stdout_of(program, &args);
        let Some(list) = help.split("Commands:\n").nth(1) else {
            return;
        };
        for line in list.lines().take_while(|l| l.starts_with("  ")) {
            let Some(name) = line.split_whitespace().next() else {
                continue;
            };
            if name == "help" {
                continue;
            }
            let mut path = prefix.to_vec();
            path.push(name.to_owned());
            walk(program, &path, out);
            out.push(path);
        }
    }
    let mut out = Vec::new();
    walk(program, &[], &mut out);
    out.sort();
    out
}

/// The completion scripts for bash, zsh and fish exist and name every
/// subcommand (each word of its path).
pub fn check_completions(program: &str, name: &str, subcommands: &[Vec<String>]) {
    for shell in ["bash", "zsh", "fish"] {
        let script = stdout_of(program, &["completions", shell]);
        assert!(script.len() > 200, "{shell}: {script}");
        assert!(script.contains(name), "{shell} script does not name {name}");
        // The hidden packaging subcommands are not offered.
        for hidden in ["completions", "Print the man page"] {
            assert!(
                !script.contains(hidden),
                "{shell} completion offers the hidden {hidden:?}"
            );
        }
        for path in subcommands {
            for word in path {
                assert!(
                    script.contains(word.as_str()),
                    "{shell} completion lacks {word:?} (of {path:?})"
                );
            }
        }
    }
}

/// `man` prints the program's page (listing the top-level subcommands) and
/// `man --dir` writes one page per subcommand path.
pub fn check_man(program: &str, name: &str, subcommands: &[Vec<String>], dir: &Path) {
    // roff writes hyphens as `\-`.
    let page = stdout_of(program, &["man"]).replace("\\-", "-");
    assert!(page.contains(&format!(".TH {name} 1")), "{page}");
    for path in subcommands.iter().filter(|p| p.len() == 1) {
        assert!(page.contains(&path[0]), "man page lacks {:?}", path[0]);
    }
    stdout_of(program, &["man", "--dir", dir.to_str().unwrap()]);
    let mut expected = vec![format!("{name}.1")];
    expected.extend(
        subcommands
            .iter()
            .map(|p| format!("{name}-{}.1", p.join("-"))),
    );
    expected.sort();
    let mut got: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    got.sort();
    assert_eq!(got, expected);
    for file in &got {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        assert!(text.contains(".SH NAME"), "{file}");
    }
}

/// Runs `systemd-analyze verify` on `unit` (a file of `packaging/systemd`)
/// with its `/usr/bin/<name>` replaced by `program`, as `instance` (the
/// unit's file name, or `name@x.service` for a template). `false` (after a
/// visible SKIPPED line) when systemd-analyze is not installed.
pub fn verify_unit(unit: &Path, name: &str, program: &str, instance: &str, dir: &Path) -> bool {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: systemd-analyze not installed (apt-get install systemd)");
        return false;
    }
    let text = std::fs::read_to_string(unit).expect("unit file");
    let copy = dir.join(unit.file_name().unwrap());
    std::fs::write(&copy, text.replace(&format!("/usr/bin/{name}"), program)).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no", &format!("./{instance}")])
        .current_dir(dir)
        .output()
        .expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify {instance}: {stderr}"
    );
    true
}
