//! A managed section of a hosts file.
//!
//! The section sits between two tag lines:
//!
//! ```text
//! # BEGIN ist-mesh <tag> (managed by the IST Mesh sidecar; edits are overwritten)
//! 10.240.0.2 api.warp api-1.internal
//! # END ist-mesh <tag>
//! ```
//!
//! [`replace_section`] puts a new section in place of the old one (or
//! appends it) and leaves every other line as it was, byte for byte: comments,
//! blank lines, tabs, CRLF endings. The one change outside the section: when
//! a section is appended to a file whose last line has no newline, that line
//! gets one, since the section must start on a line of its own. Replacing is
//! idempotent: the same input gives the same output, so a caller can compare
//! and skip writing.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;

use crate::ist::table::IstTable;
use crate::netmap::NetworkMap;

/// Why a hosts file's managed section cannot be found unambiguously. The file
/// is left alone: guessing could delete the user's lines.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostsError {
    /// A begin line without its end line.
    #[error("line {line}: '# BEGIN ist-mesh {tag}' has no matching '# END ist-mesh {tag}' line; fix the file by hand")]
    Unterminated {
        /// The section's tag.
        tag: String,
        /// 1-based line of the begin line.
        line: usize,
    },
    /// An end line without a begin line before it, or a second section.
    #[error("line {line}: unexpected '{text}' (sections must be single and well nested); fix the file by hand")]
    Unexpected {
        /// The line's text.
        text: String,
        /// 1-based line number.
        line: usize,
    },
    /// The tag holds whitespace or a control character.
    #[error("hosts section tag {0:?} must be non-empty without whitespace")]
    BadTag(String),
}

fn begin_line(tag: &str) -> String {
    format!("# BEGIN ist-mesh {tag} (managed by the IST Mesh sidecar; edits are overwritten)")
}

fn is_begin(line: &str, tag: &str) -> bool {
    let prefix = format!("# BEGIN ist-mesh {tag}");
    line.strip_prefix(&prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(' ') || rest.starts_with('\r'))
}

fn end_line(tag: &str) -> String {
    format!("# END ist-mesh {tag}")
}

/// Renders the section's lines: one per address, its names separated by
/// spaces, in the given order. An empty list renders the tag lines only.
pub fn render_section(tag: &str, entries: &[(IpAddr, Vec<String>)]) -> String {
    let mut out = begin_line(tag);
    out.push('\n');
    for (ip, names) in entries.iter().filter(|(_, n)| !n.is_empty()) {
        let _ = writeln!(out, "{ip}\t{}", names.join(" "));
    }
    out.push_str(&end_line(tag));
    out.push('\n');
    out
}

/// The hosts lines of a network: for every member its `<instance>.internal`,
/// and for every service its IST hostnames (from `ist`, overrides and
/// conflicts applied) on its answer ([`NetworkMap::service_answer`]: its
/// service address, else each of its primary members). One entry per address,
/// sorted by address; names in a stable order (IST names first).
pub fn map_entries(map: &NetworkMap, ist: &IstTable) -> Vec<(IpAddr, Vec<String>)> {
    let mut by_ip: BTreeMap<IpAddr, Vec<String>> = BTreeMap::new();
    for e in &ist.entries {
        for ip in map.service_answer(&e.service) {
            by_ip
                .entry(ip.into())
                .or_default()
                .extend(e.hostnames.iter().cloned());
        }
    }
    for m in map.members.values() {
        by_ip
            .entry(m.ip.into())
            .or_default()
            .push(format!("{}.internal", m.instance));
    }
    by_ip.into_iter().collect()
}

/// Where the section of `tag` is: byte range of its lines, end included.
fn find_section(text: &str, tag: &str) -> Result<Option<(usize, usize)>, HostsError> {
    let end_text = end_line(tag);
    let mut begin: Option<(usize, usize)> = None; // (byte offset, line number)
    let mut found = None;
    let mut offset = 0;
    for (i, raw) in text.split_inclusive('\n').enumerate() {
        let line = raw.trim_end_matches(['\n', '\r']);
        let unexpected = || HostsError::Unexpected {
            text: line.to_owned(),
            line: i + 1,
        };
        if is_begin(line, tag) {
            if begin.is_some() || found.is_some() {
                return Err(unexpected());
            }
            begin = Some((offset, i + 1));
        } else if line == end_text {
            let (start, _) = begin.take().ok_or_else(unexpected)?;
            if found.is_some() {
                return Err(unexpected());
            }
            found = Some((start, offset + raw.len()));
        }
        offset += raw.len();
    }
    if let Some((_, line)) = begin {
        return Err(HostsError::Unterminated {
            tag: tag.to_owned(),
            line,
        });
    }
    Ok(found)
}

/// `original` with the section of `tag` replaced by `section` (from
/// [`render_section`]), or appended if there is none. `section == ""`
/// removes the section.
pub fn replace_section(original: &str, tag: &str, section: &str) -> Result<String, HostsError> {
    if tag.is_empty() || tag.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(HostsError::BadTag(tag.to_owned()));
    }
    match find_section(original, tag)? {
        Some((start, end)) => {
            let mut out = String::with_capacity(original.len() + section.len());
            out.push_str(&original[..start]);
            out.push_str(section);
            out.push_str(&original[end..]);
            Ok(out)
        }
        None if section.is_empty() => Ok(original.to_owned()),
        None => {
            let mut out = String::with_capacity(original.len() + section.len() + 1);
            out.push_str(original);
            if !original.is_empty() && !original.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(section);
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESSY: &str = "127.0.0.1\tlocalhost\n# comment with\ttab\n\n  \t\n::1 ip6-localhost\tip6-loopback   \r\n10.0.0.1 other # trailing comment";

    fn entries(n: u8) -> Vec<(IpAddr, Vec<String>)> {
        vec![
            (
                [10, 240, 0, n].into(),
                vec!["api.warp".into(), "api-1.internal".into()],
            ),
            ([10, 240, 0, 9].into(), vec!["db.warp".into()]),
            ([10, 240, 0, 10].into(), vec![]),
        ]
    }

    #[test]
    fn preserves_everything_outside_byte_for_byte() {
        let section = render_section("pn-x", &entries(2));
        let once = replace_section(MESSY, "pn-x", &section).unwrap();
        // Outside lines: the original plus the newline the last line needed.
        assert!(once.starts_with(&format!("{MESSY}\n")));
        assert!(once.ends_with("# END ist-mesh pn-x\n"));
        assert!(once.contains("10.240.0.2\tapi.warp api-1.internal\n10.240.0.9\tdb.warp\n"));
        assert!(!once.contains("10.240.0.10"));
        // Idempotent.
        assert_eq!(replace_section(&once, "pn-x", &section).unwrap(), once);
        // A change rewrites the section only.
        let twice = replace_section(&once, "pn-x", &render_section("pn-x", &entries(3))).unwrap();
        assert!(twice.starts_with(&format!("{MESSY}\n")));
        assert!(twice.contains("10.240.0.3\tapi.warp"));
        assert!(!twice.contains("10.240.0.2\t"));
        // Removal gives back the outside lines.
        assert_eq!(
            replace_section(&twice, "pn-x", "").unwrap(),
            format!("{MESSY}\n")
        );
    }

    #[test]
    fn section_in_the_middle_stays_in_place_and_other_tags_are_untouched() {
        let other = render_section("pn-other", &entries(7));
        let text = format!("a\n{}b\r\n{other}c", render_section("pn-x", &entries(1)));
        let out = replace_section(&text, "pn-x", &render_section("pn-x", &entries(5))).unwrap();
        assert_eq!(
            out,
            format!("a\n{}b\r\n{other}c", render_section("pn-x", &entries(5)))
        );
        // A tag that is a prefix of another tag does not match it.
        let out = replace_section(&other, "pn", &render_section("pn", &[])).unwrap();
        assert!(out.starts_with(&other));
    }

    #[test]
    fn entries_of_a_map() {
        use crate::ist::config::Overrides;
        use crate::netmap::tests::{empty_map, member};
        let mut map = empty_map();
        for m in [
            member("a-1", "api", "web", 1, 2),
            member("w-1", "api", "worker", 1, 3),
        ] {
            map.members.insert(m.public_key, m);
        }
        let got = map_entries(
            &map,
            &IstTable::build(map.services(), &Overrides::default()),
        );
        assert_eq!(
            got,
            [
                (
                    [10, 240, 0, 2].into(),
                    vec!["api.warp".to_string(), "a-1.internal".to_string()]
                ),
                ([10, 240, 0, 3].into(), vec!["w-1.internal".to_string()]),
            ]
        );
    }

    #[test]
    fn empty_file_and_no_section() {
        let s = render_section("t", &[]);
        assert_eq!(replace_section("", "t", &s).unwrap(), s);
        assert_eq!(replace_section("x", "t", "").unwrap(), "x");
    }

    #[test]
    fn broken_sections_are_errors() {
        let begin = begin_line("t");
        assert!(matches!(
            replace_section(&format!("a\n{begin}\nb\n"), "t", ""),
            Err(HostsError::Unterminated { line: 2, .. })
        ));
        assert!(matches!(
            replace_section("# END ist-mesh t\n", "t", ""),
            Err(HostsError::Unexpected { line: 1, .. })
        ));
        let two = format!("{0}{0}", render_section("t", &[]));
        assert!(matches!(
            replace_section(&two, "t", ""),
            Err(HostsError::Unexpected { line: 3, .. })
        ));
        assert!(matches!(
            replace_section("", "a b", ""),
            Err(HostsError::BadTag(_))
        ));
    }
}
