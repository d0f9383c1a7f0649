//! Environment files, for processes the sidecar does not start itself.
//!
//! Two forms of the same variables:
//! - dotenv (`KEY=value`, the form of `docker --env-file` and most dotenv
//!   loaders): one line per variable, values double-quoted when they hold
//!   anything but `[A-Za-z0-9._:/@+-]`;
//! - shell (`export KEY='value'`, to `source` in sh/bash): single-quoted
//!   values. Names that are not shell identifiers (the generic `WARP_IST_*`
//!   names may hold `-`, `:`, ...) cannot be exported by a shell and are left
//!   out; their shell-safe twins carry the same value.
//!
//! Pairs whose name is empty or holds `=`, or whose name or value holds NUL,
//! cannot exist in an environment and are skipped in both forms.

use std::fmt::Write as _;

use crate::ist::table::IstTable;
use crate::netmap::NetworkMap;

/// The IST variables of a network: every variable of every service in `ist`
/// (overrides and conflicts applied), set to the service's answer
/// ([`NetworkMap::service_answer`]: its service address, else its first
/// primary member). Services with neither get no variables. Sorted by
/// variable name.
pub fn ist_variables(map: &NetworkMap, ist: &IstTable) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = ist
        .entries
        .iter()
        .filter_map(|e| Some((e, *map.service_answer(&e.service).first()?)))
        .flat_map(|(e, ip)| e.variables.iter().map(move |v| (v.clone(), ip.to_string())))
        .collect();
    out.sort();
    out
}

/// Whether `name` can be a shell variable: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn is_shell_identifier(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn representable(name: &str, value: &str) -> bool {
    !name.is_empty() && !name.contains(['=', '\0', '\n']) && !value.contains('\0')
}

fn dotenv_value(value: &str) -> String {
    let plain = value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._:/@+-".contains(&b));
    if plain {
        return value.to_owned();
    }
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '$' => out.push_str("\\$"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Renders `KEY=value` lines.
pub fn render_dotenv<'a>(vars: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut out = String::new();
    for (name, value) in vars.into_iter().filter(|(n, v)| representable(n, v)) {
        let _ = writeln!(out, "{name}={}", dotenv_value(value));
    }
    out
}

/// Renders `export KEY='value'` lines (shell identifiers only).
pub fn render_shell<'a>(vars: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut out = String::new();
    for (name, value) in vars
        .into_iter()
        .filter(|(n, v)| representable(n, v) && is_shell_identifier(n))
    {
        let _ = writeln!(out, "export {name}='{}'", value.replace('\'', r"'\''"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    const VARS: &[(&str, &str)] = &[
        ("WARP_IST_my-db:dev", "10.240.0.4"),
        ("WARP_IST_my_db_dev", "10.240.0.4"),
        ("QUOTE", "it's \"$HOME\" \\ x"),
        ("MULTI", "a\nb"),
        ("BAD=NAME", "x"),
        ("NUL", "a\0b"),
    ];

    #[test]
    fn dotenv_form() {
        let text = render_dotenv(VARS.iter().copied());
        assert_eq!(
            text,
            "WARP_IST_my-db:dev=10.240.0.4\nWARP_IST_my_db_dev=10.240.0.4\n\
             QUOTE=\"it's \\\"\\$HOME\\\" \\\\ x\"\nMULTI=\"a\\nb\"\n"
        );
    }

    #[test]
    fn shell_form_round_trips_through_a_real_shell() {
        let text = render_shell(VARS.iter().copied());
        assert!(
            !text.contains("my-db:dev"),
            "not a shell identifier: {text}"
        );
        let script = format!("{text}printf '%s|' \"$WARP_IST_my_db_dev\" \"$QUOTE\" \"$MULTI\"");
        let out = Command::new("sh")
            .arg("-c")
            .arg(&script)
            .env_clear()
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            "10.240.0.4|it's \"$HOME\" \\ x|a\nb|"
        );
    }

    #[test]
    fn variables_of_a_map() {
        use crate::ist::config::Overrides;
        use crate::netmap::tests::{empty_map, member};
        let mut map = empty_map();
        for m in [
            member("d-2", "my db", "web", 2, 7),
            member("d-1", "my db", "web", 1, 6),
        ] {
            map.members.insert(m.public_key, m);
        }
        // "ghost" has no member: no variable.
        let table = IstTable::build(["my db", "ghost"], &Overrides::default());
        assert_eq!(
            ist_variables(&map, &table),
            [("WARP_IST_my_db".to_string(), "10.240.0.6".to_string())]
        );
    }

    #[test]
    fn identifiers() {
        assert!(is_shell_identifier("_A1"));
        for bad in ["", "1A", "A-B", "A:B", "Ä"] {
            assert!(!is_shell_identifier(bad), "{bad}");
        }
    }
}
