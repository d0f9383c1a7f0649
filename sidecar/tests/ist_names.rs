//! `sidecar ist-names` end to end: the binary, its arguments, stdin and exit codes.

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn sidecar(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sidecar"))
        .arg("ist-names")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run sidecar");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or_default()).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

/// Seed 004's table, then names beyond it (shared with meshlib's unit test).
const VECTORS: &str = include_str!("../../meshlib/tests/data/ist_vectors.tsv");

fn rows() -> Vec<&'static str> {
    VECTORS.lines().filter(|l| !l.starts_with('#')).collect()
}

fn names() -> Vec<&'static str> {
    rows()
        .iter()
        .map(|r| r.split('\t').next().unwrap())
        .collect()
}

fn expected_tsv() -> String {
    rows().iter().map(|r| format!("{r}\n")).collect()
}

#[test]
fn names_as_arguments() {
    let out = sidecar(&names(), None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8(out.stdout).unwrap(), expected_tsv());
    assert!(out.stderr.is_empty());
}

#[test]
fn names_from_stdin_with_crlf() {
    let input: String = names().iter().map(|n| format!("{n}\r\n")).collect();
    let out = sidecar(&[], Some(input.as_bytes()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8(out.stdout).unwrap(), expected_tsv());
}

#[test]
fn invalid_names_exit_1_after_printing_the_valid_ones() {
    let out = sidecar(&[], Some(b"api\n\nbad\ttab\n\xff\xfe\nmy db"));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "api\tapi.warp\tWARP_IST_api\tWARP_IST_api\nmy db\tmy-db.warp\tWARP_IST_my_db\tWARP_IST_my_db\n"
    );
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("service name is empty"), "{err}");
    assert!(err.contains("control character U+0009"), "{err}");
    assert!(err.contains("stdin line 4 is not UTF-8"), "{err}");

    let out = sidecar(&["ok", ""], None);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "ok\tok.warp\tWARP_IST_ok\tWARP_IST_ok\n"
    );
}

#[test]
fn empty_stdin_prints_nothing() {
    let out = sidecar(&[], Some(b""));
    assert!(out.status.success());
    assert!(out.stdout.is_empty());
}
