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

/// The seed-004 table, then names beyond it. The expected values beyond the
/// seed were computed independently (Python's RFC 3492 codec and the Lucene
/// folding of each accented letter), not by this code.
const CASES: &[(&str, &str, &str, &str)] = &[
    ("my-db", "my-db.warp", "WARP_IST_my-db", "WARP_IST_my_db"),
    ("my db", "my-db.warp", "WARP_IST_my_db", "WARP_IST_my_db"),
    ("my=db", "my-db.warp", "WARP_IST_my_db", "WARP_IST_my_db"),
    (
        "my-db:dev",
        "my-db-dev.warp",
        "WARP_IST_my-db:dev",
        "WARP_IST_my_db_dev",
    ),
    (
        "My-DB-",
        "my-db-.warp",
        "WARP_IST_My-DB-",
        "WARP_IST_My_DB_",
    ),
    (
        "mes-données",
        "xn--mes-donnes-i7a.warp",
        "WARP_IST_mes-donnees",
        "WARP_IST_mes_donnees",
    ),
    (
        "✅ db",
        "xn---db-8g6a.warp",
        "WARP_IST__db-8g6a",
        "WARP_IST__db_8g6a",
    ),
    (
        "我的数据",
        "xn--wnu53ab8bw85a.warp",
        "WARP_IST_wnu53ab8bw85a",
        "WARP_IST_wnu53ab8bw85a",
    ),
    (
        "Crème Brûlée",
        "xn--crme-brle-13ar8s.warp",
        "WARP_IST_Creme_Brulee",
        "WARP_IST_Creme_Brulee",
    ),
    (
        "Æther=Œuvre",
        "xn--ther-uvre-f3a81j.warp",
        "WARP_IST_AEther_OEuvre",
        "WARP_IST_AEther_OEuvre",
    ),
    (
        "ﬁnance",
        "xn--nance-td82a.warp",
        "WARP_IST_finance",
        "WARP_IST_finance",
    ),
    (
        "数据库 API",
        "xn---api-pk2hr2w1vd.warp",
        "WARP_IST__API-pk2hr2w1vd",
        "WARP_IST__API_pk2hr2w1vd",
    ),
    (
        "🚀 Launch Pad",
        "xn---launch-pad-j527j.warp",
        "WARP_IST__Launch_Pad-j527j",
        "WARP_IST__Launch_Pad_j527j",
    ),
    (
        "Ελληνικά-db",
        "xn---db-2wc8bmoigax.warp",
        "WARP_IST_-db-guc9itcoigax",
        "WARP_IST__db_guc9itcoigax",
    ),
    (
        "Straße=Ø",
        "xn--strae--eta6r.warp",
        "WARP_IST_Strasse_O",
        "WARP_IST_Strasse_O",
    ),
    (
        "MY SERVICE",
        "my-service.warp",
        "WARP_IST_MY_SERVICE",
        "WARP_IST_MY_SERVICE",
    ),
    (
        "naïve café=ok",
        "xn--nave-caf-ok-ibb5e.warp",
        "WARP_IST_naive_cafe_ok",
        "WARP_IST_naive_cafe_ok",
    ),
    ("a.b_c", "a-b-c.warp", "WARP_IST_a.b_c", "WARP_IST_a_b_c"),
];

fn expected_tsv() -> String {
    CASES
        .iter()
        .map(|(n, h, v, s)| format!("{n}\t{h}\t{v}\t{s}\n"))
        .collect()
}

#[test]
fn names_as_arguments() {
    let names: Vec<&str> = CASES.iter().map(|c| c.0).collect();
    let out = sidecar(&names, None);
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
    let input: String = CASES.iter().map(|c| format!("{}\r\n", c.0)).collect();
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
