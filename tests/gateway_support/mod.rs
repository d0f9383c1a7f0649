//! What the gateway's end-to-end tests share: the test CA and wildcard
//! certificate, the python3 backend and client scripts, and shell helpers.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::dataplane_support::{must, run};

/// The service domain of the tests' groups.
pub const DOMAIN: &str = "apps.ist-mesh.internal";

/// Why a gateway test cannot run here, if it cannot: the namespace
/// prerequisites, or one of `tools` missing.
pub fn skip_reason(tools: &[&str]) -> Option<String> {
    if let Some(why) = crate::dataplane_support::skip_reason() {
        return Some(why.to_owned());
    }
    for tool in tools {
        let ok = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            return Some(format!("needs {tool}"));
        }
    }
    None
}

/// Waits (bounded by `limit`, polling every 200 ms) until `cond` holds;
/// fails naming `what` with `logs()` (the gateways' logs) if not.
pub fn wait_until(
    what: &str,
    limit: std::time::Duration,
    logs: impl Fn() -> String,
    mut cond: impl FnMut() -> bool,
) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "{what}: not within {limit:?}; gateway log:\n{}",
            logs()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// A script of this folder.
pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/gateway_support")
        .join(name)
}

/// `sh -c script` inside `ns`.
pub fn sh(ns: &str, script: &str) -> Output {
    run("ip", &["netns", "exec", ns, "sh", "-c", script])
}

/// Standard output as text.
pub fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A certificate for `names` (DNS names) signed by a CA of its own made
/// with `openssl` (P-256) and named `ca`: writes `<stem>.crt` and
/// `<stem>.key` into `into` (each under a temporary name, then renamed, as
/// a renewal tool would), and returns the path of the CA (`<ca>.pem`, in
/// `work`).
pub fn issue_cert(work: &Path, into: &Path, stem: &str, ca: &str, names: &[&str]) -> PathBuf {
    let sans: Vec<String> = names.iter().map(|n| format!("DNS:{n}")).collect();
    let ext = work.join(format!("{stem}.cnf"));
    std::fs::write(
        &ext,
        format!(
            "subjectAltName={}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
            sans.join(",")
        ),
    )
    .unwrap();
    let (w, i) = (work.display(), into.display());
    let script = format!(
        "set -e; cd {w}; \
         openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout {ca}.key -out {ca}.pem -days 2 -subj /CN={ca}-test-ca 2>/dev/null; \
         openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout {stem}.tmpkey -out {stem}.csr -subj '/CN={first}' 2>/dev/null; \
         openssl x509 -req -in {stem}.csr -CA {ca}.pem -CAkey {ca}.key -CAcreateserial -out {stem}.tmpcrt -days 2 -extfile {stem}.cnf 2>/dev/null; \
         mv {stem}.tmpkey {i}/{stem}.key; mv {stem}.tmpcrt {i}/{stem}.crt",
        first = names[0]
    );
    must("sh", &["-c", &script]);
    work.join(format!("{ca}.pem"))
}

/// A test CA and a wildcard certificate for the service domain: the CA,
/// the certificate and its key, in `dir`.
pub fn make_certs(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let d = dir.display();
    std::fs::write(
        dir.join("ext.cnf"),
        format!("subjectAltName=DNS:*.{DOMAIN}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"),
    )
    .unwrap();
    let script = format!(
        "set -e; cd {d}; \
         openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=ist-test-ca 2>/dev/null; \
         openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout gw.key -out gw.csr -subj '/CN=*.{DOMAIN}' 2>/dev/null; \
         openssl x509 -req -in gw.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out gw.pem -days 2 -extfile ext.cnf 2>/dev/null"
    );
    must("sh", &["-c", &script]);
    (dir.join("ca.pem"), dir.join("gw.pem"), dir.join("gw.key"))
}

/// A counter's value in Prometheus text (0 if absent).
pub fn counter(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).map(|v| v.trim().parse().unwrap_or(0)))
        .unwrap_or(0)
}

/// Runs `promtool check metrics` on an exposition (CI installs promtool);
/// says SKIPPED where it is not installed. Panics with promtool's words.
pub fn promtool_check(text: &str) {
    use std::io::Write as _;
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let Ok(mut child) = child else {
        eprintln!("SKIPPED promtool check: promtool is not installed");
        return;
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
