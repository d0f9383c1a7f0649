//! Per-service IST overrides, from TOML (the sidecar's config) or from the
//! `ist` section of a `warp.config.js` file (seed 004):
//!
//! ```js
//! module.exports = {
//!   container: "my-container-service",
//!   ist: [ { service: 'my-sql', variables: ['MY_SQL_SERVICE'], hostnames: ['mysql.local'] } ],
//! };
//! ```
//!
//! The `warp.config.js` file is read as a JavaScript object literal (JSON5:
//! comments, unquoted keys, single quotes and trailing commas allowed) after
//! `module.exports =` or `export default`; code that is not a literal is a
//! clear error, never evaluated. `variables` and `hostnames` are optional: an
//! omitted list keeps the computed names, a given one replaces them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One `ist` entry as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IstOverride {
    /// The service these names point at.
    pub service: String,
    /// Variables to set instead of the computed `WARP_IST_*` pair.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variables: Option<Vec<String>>,
    /// Hostnames to set instead of the computed `<encoded>.warp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostnames: Option<Vec<String>>,
}

/// Validated overrides, one per service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    by_service: BTreeMap<String, IstOverride>,
}

/// What is wrong with one entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryProblem {
    /// `service` is empty.
    #[error("`service` is empty")]
    EmptyService,
    /// A variable name is empty, or holds `=`, whitespace or a control character.
    #[error("variable {0:?} is not a usable environment variable name (empty, or contains '=', whitespace or a control character)")]
    BadVariable(String),
    /// A hostname is not dot-separated labels of `[A-Za-z0-9-]` (1–63 each, 253 in all).
    #[error("hostname {0:?} is not a valid hostname (labels of letters, digits and '-', 1-63 characters each)")]
    BadHostname(String),
    /// The service already has an entry (`ist` holds one entry per service).
    #[error("service {service:?} already has an entry at ist[{first}]; merge them")]
    Duplicate {
        /// The service.
        service: String,
        /// Index of the first entry.
        first: usize,
    },
}

/// Largest `warp.config.js` text accepted (1 MiB): the file is a small
/// literal; anything bigger is a mistake or an attack.
pub const MAX_WARP_CONFIG_BYTES: usize = 1 << 20;
/// Deepest nesting of objects and arrays accepted in `warp.config.js`. The
/// JSON5 parser recurses once per level; the limit is checked first, so a
/// file nested 100,000 deep is an error, not a stack overflow.
pub const MAX_WARP_CONFIG_DEPTH: usize = 64;

/// Why overrides could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The TOML text does not parse or does not have the expected shape.
    #[error("TOML: {0}")]
    Toml(String),
    /// The `warp.config.js` text is not `module.exports = { ... }` /
    /// `export default { ... }` with an object literal.
    #[error("warp.config.js: {0}")]
    NotALiteral(String),
    /// The text is longer than [`MAX_WARP_CONFIG_BYTES`].
    #[error("warp.config.js: {len} bytes, over the limit of {max}")]
    TooLarge {
        /// The text's length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Objects and arrays nest deeper than [`MAX_WARP_CONFIG_DEPTH`].
    #[error("warp.config.js: line {line}, column {column}: objects and arrays nest deeper than {max} levels")]
    TooDeep {
        /// 1-based line of the bracket past the limit.
        line: usize,
        /// 1-based column of that bracket.
        column: usize,
        /// The limit.
        max: usize,
    },
    /// The object literal does not parse or has the wrong shape.
    #[error("warp.config.js: line {line}, column {column}: {message}")]
    Js {
        /// 1-based line in the file.
        line: usize,
        /// 1-based column in the file.
        column: usize,
        /// What the parser said.
        message: String,
    },
    /// One entry is invalid.
    #[error("ist[{index}] (service {service:?}): {problem}")]
    Entry {
        /// 0-based index of the entry in the `ist` array.
        index: usize,
        /// The entry's service name.
        service: String,
        /// What is wrong.
        problem: EntryProblem,
    },
}

fn valid_variable(v: &str) -> bool {
    !v.is_empty()
        && !v
            .chars()
            .any(|c| c == '=' || c.is_whitespace() || c.is_control())
}

fn valid_hostname(h: &str) -> bool {
    let h = h.strip_suffix('.').unwrap_or(h);
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
        })
}

impl Overrides {
    /// Validates entries (in file order) into overrides. Hostnames are kept
    /// lowercase and without a trailing dot.
    pub fn from_entries(entries: Vec<IstOverride>) -> Result<Self, ConfigError> {
        let mut by_service = BTreeMap::new();
        let mut index_of = BTreeMap::new();
        for (index, mut entry) in entries.into_iter().enumerate() {
            let fail = |problem| ConfigError::Entry {
                index,
                service: entry.service.clone(),
                problem,
            };
            if entry.service.is_empty() {
                return Err(fail(EntryProblem::EmptyService));
            }
            if let Some(&first) = index_of.get(&entry.service) {
                let service = entry.service.clone();
                return Err(fail(EntryProblem::Duplicate { service, first }));
            }
            for v in entry.variables.iter().flatten() {
                if !valid_variable(v) {
                    return Err(fail(EntryProblem::BadVariable(v.clone())));
                }
            }
            for h in entry.hostnames.iter().flatten() {
                if !valid_hostname(h) {
                    return Err(fail(EntryProblem::BadHostname(h.clone())));
                }
            }
            if let Some(hosts) = entry.hostnames.as_mut() {
                for h in hosts.iter_mut() {
                    *h = h.trim_end_matches('.').to_ascii_lowercase();
                }
            }
            index_of.insert(entry.service.clone(), index);
            by_service.insert(entry.service.clone(), entry);
        }
        Ok(Self { by_service })
    }

    /// The override of one service.
    pub fn get(&self, service: &str) -> Option<&IstOverride> {
        self.by_service.get(service)
    }

    /// Number of services with an override.
    pub fn len(&self) -> usize {
        self.by_service.len()
    }

    /// Whether there is no override.
    pub fn is_empty(&self) -> bool {
        self.by_service.is_empty()
    }

    /// Merges `other` into `self`; on the same service, `other` wins (the
    /// sidecar config is applied over `warp.config.js`).
    pub fn merge(&mut self, other: Overrides) {
        self.by_service.extend(other.by_service);
    }
}

/// The part of a document we read: its `ist` array; other keys are ignored.
#[derive(Deserialize)]
struct Document {
    #[serde(default)]
    ist: Vec<IstOverride>,
}

/// Reads the `ist` array of a TOML document (`[[ist]]` tables); other keys
/// are ignored.
pub fn parse_toml(text: &str) -> Result<Overrides, ConfigError> {
    let doc: Document = toml::from_str(text).map_err(|e| ConfigError::Toml(e.to_string()))?;
    Overrides::from_entries(doc.ist)
}

/// Reads the `ist` section of a `warp.config.js` file. A file without an `ist`
/// key gives no overrides.
pub fn parse_warp_config_js(text: &str) -> Result<Overrides, ConfigError> {
    if text.len() > MAX_WARP_CONFIG_BYTES {
        return Err(ConfigError::TooLarge {
            len: text.len(),
            max: MAX_WARP_CONFIG_BYTES,
        });
    }
    let (start, end) = literal_span(text)?;
    let literal = &text[start..end];
    let doc: Document = json5::from_str(literal).map_err(|e| {
        let (line, column) = match e.position() {
            Some(p) => file_position(text, start, p.line, p.column),
            None => file_position(text, start, 0, 0),
        };
        ConfigError::Js {
            line,
            column,
            message: e
                .to_string()
                .split(" at line ")
                .next()
                .unwrap_or("")
                .to_owned(),
        }
    })?;
    Overrides::from_entries(doc.ist)
}

/// `deployment.port` of a `warp.config.js` (seed 004's service
/// visibility): the internal port the instance's own service group
/// publishes. `None` when the file does not set it.
pub fn parse_warp_deployment_port(text: &str) -> Result<Option<u16>, ConfigError> {
    #[derive(Deserialize, Default)]
    struct Deployment {
        #[serde(default)]
        port: Option<u16>,
    }
    #[derive(Deserialize)]
    struct Doc {
        #[serde(default)]
        deployment: Option<Deployment>,
    }
    if text.len() > MAX_WARP_CONFIG_BYTES {
        return Err(ConfigError::TooLarge {
            len: text.len(),
            max: MAX_WARP_CONFIG_BYTES,
        });
    }
    let (start, end) = literal_span(text)?;
    let doc: Doc = json5::from_str(&text[start..end]).map_err(|e| ConfigError::Js {
        line: 0,
        column: 0,
        message: format!("deployment.port: {e}"),
    })?;
    Ok(doc.deployment.and_then(|d| d.port).filter(|p| *p != 0))
}

/// Converts a 0-based (line, column) inside the literal starting at byte
/// `start` into a 1-based position in the whole file.
fn file_position(text: &str, start: usize, line: usize, column: usize) -> (usize, usize) {
    let before = &text[..start];
    let start_line = before.matches('\n').count();
    let start_col = before.chars().rev().take_while(|c| *c != '\n').count();
    if line == 0 {
        (start_line + 1, start_col + column + 1)
    } else {
        (start_line + line + 1, column + 1)
    }
}

/// Finds the object literal exported by the file: the byte range from its
/// `{` to its matching `}`. Only comments, whitespace, a `"use strict"`
/// directive and `;` may surround it.
fn literal_span(text: &str) -> Result<(usize, usize), ConfigError> {
    let bad = |what: &str| ConfigError::NotALiteral(what.to_owned());
    let mut pos = skip_trivia(text, 0);
    for directive in ["'use strict'", "\"use strict\""] {
        if text[pos..].starts_with(directive) {
            pos = skip_trivia(text, pos + directive.len());
            if text[pos..].starts_with(';') {
                pos = skip_trivia(text, pos + 1);
            }
        }
    }
    if let Some(rest) = text[pos..].strip_prefix("module.exports") {
        pos = skip_trivia(text, text.len() - rest.len());
        pos = text[pos..]
            .strip_prefix('=')
            .map(|r| text.len() - r.len())
            .ok_or_else(|| bad("expected '=' after module.exports"))?;
    } else if let Some(rest) = text[pos..].strip_prefix("export default") {
        pos = text.len() - rest.len();
    } else {
        return Err(bad(
            "expected `module.exports = { ... }` or `export default { ... }`",
        ));
    }
    let start = skip_trivia(text, pos);
    if !text[start..].starts_with('{') {
        return Err(bad(
            "the exported value must be an object literal `{ ... }`",
        ));
    }
    let end = matching_brace(text, start)?
        .ok_or_else(|| bad("unbalanced braces: the object literal is not closed"))?;
    let mut after = skip_trivia(text, end);
    if text[after..].starts_with(';') {
        after = skip_trivia(text, after + 1);
    }
    if after != text.len() {
        return Err(bad("unexpected code after the exported object literal"));
    }
    Ok((start, end))
}

/// Skips whitespace and `//` / `/* */` comments from `pos`.
fn skip_trivia(text: &str, mut pos: usize) -> usize {
    loop {
        let rest = &text[pos..];
        let trimmed = rest.trim_start();
        pos += rest.len() - trimmed.len();
        if trimmed.starts_with("//") {
            pos += trimmed.find('\n').unwrap_or(trimmed.len());
        } else if let Some(body) = trimmed.strip_prefix("/*") {
            pos += body.find("*/").map_or(trimmed.len(), |i| i + 4);
        } else {
            return pos;
        }
    }
}

/// The byte just after the `}` matching the `{` at `open`, skipping strings
/// and comments; `None` when unbalanced. Nesting deeper than
/// [`MAX_WARP_CONFIG_DEPTH`] is an error (found here, before the recursive
/// parser sees it).
fn matching_brace(text: &str, open: usize) -> Result<Option<usize>, ConfigError> {
    let bytes = text.as_bytes();
    let mut depth = 0usize;
    let mut i = open;
    while i < bytes.len() {
        match bytes[i] {
            b'{' | b'[' => {
                depth += 1;
                if depth > MAX_WARP_CONFIG_DEPTH {
                    let (line, column) = file_position(text, i, 0, 0);
                    return Err(ConfigError::TooDeep {
                        line,
                        column,
                        max: MAX_WARP_CONFIG_DEPTH,
                    });
                }
            }
            b'}' | b']' => {
                let Some(d) = depth.checked_sub(1) else {
                    return Ok(None);
                };
                depth = d;
                if depth == 0 {
                    return Ok((bytes[i] == b'}').then_some(i + 1));
                }
            }
            q @ (b'"' | b'\'' | b'`') => {
                i += 1;
                while i < bytes.len() && bytes[i] != q {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'/' if bytes.get(i + 1) == Some(&b'/') || bytes.get(i + 1) == Some(&b'*') => {
                i = skip_trivia(text, i) - 1;
            }
            _ => {}
        }
        i += 1;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED_EXAMPLE: &str = r#"module.exports = {
container: "my-container-service",
ist: [
{
service: 'my-sql',
variables: [ 'MY_SQL_SERVICE', 'ANOTHER_VAR' ],
hostnames: [ 'mysql.local' ],
},
],
};
"#;

    #[test]
    fn seed_example_parses() {
        let o = parse_warp_config_js(SEED_EXAMPLE).unwrap();
        let e = o.get("my-sql").unwrap();
        assert_eq!(
            e.variables.as_deref().unwrap(),
            ["MY_SQL_SERVICE", "ANOTHER_VAR"]
        );
        assert_eq!(e.hostnames.as_deref().unwrap(), ["mysql.local"]);
    }

    #[test]
    fn comments_directives_and_export_default() {
        let text = "// config\n'use strict';\n/* block { */ export default {\n  // the } in a comment\n  deployment: { port: 65500 },\n  ist: [{ service: \"a}b\", hostnames: ['A.Local.'] }],\n} // end\n";
        let o = parse_warp_config_js(text).unwrap();
        assert_eq!(
            o.get("a}b").unwrap().hostnames.as_deref().unwrap(),
            ["a.local"]
        );
        assert!(o.get("a}b").unwrap().variables.is_none());
        // No ist section: no overrides.
        assert_eq!(parse_warp_deployment_port(text).unwrap(), Some(65500));
        assert_eq!(
            parse_warp_deployment_port("module.exports = { container: 'x' }").unwrap(),
            None
        );
        assert!(parse_warp_config_js("module.exports = { container: 'x' }")
            .unwrap()
            .is_empty());
    }

    #[test]
    fn errors_point_at_the_entry() {
        let text = "module.exports = {\n  ist: [\n    { service: 'ok' },\n    { service: 'db', variables: ['A=B'] },\n  ],\n};\n";
        let err = parse_warp_config_js(text).unwrap_err();
        assert_eq!(
            err,
            ConfigError::Entry {
                index: 1,
                service: "db".into(),
                problem: EntryProblem::BadVariable("A=B".into())
            }
        );
        assert!(err
            .to_string()
            .starts_with("ist[1] (service \"db\"): variable \"A=B\""));

        let dup = "module.exports = { ist: [ { service: 'x' }, { service: 'x' } ] }";
        assert!(parse_warp_config_js(dup)
            .unwrap_err()
            .to_string()
            .contains("ist[0]"));

        let host = "[[ist]]\nservice = \"x\"\nhostnames = [\"bad_name\"]\n";
        assert!(matches!(
            parse_toml(host),
            Err(ConfigError::Entry {
                index: 0,
                problem: EntryProblem::BadHostname(_),
                ..
            })
        ));
    }

    #[test]
    fn syntax_errors_carry_file_positions() {
        // Line 3 has a typo'd key (unknown field) and line 4 a syntax error.
        let unknown =
            "module.exports = {\n  ist: [\n    { service: 'x', hostname: ['a'] },\n  ],\n};";
        match parse_warp_config_js(unknown).unwrap_err() {
            ConfigError::Js { line, message, .. } => {
                assert_eq!(line, 3, "{message}");
                assert!(message.contains("hostname"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        let syntax =
            "module.exports = {\n  ist: [\n    { service: 'x' }\n    { service: 'y' },\n  ],\n};";
        match parse_warp_config_js(syntax).unwrap_err() {
            ConfigError::Js { line, .. } => assert_eq!(line, 4),
            other => panic!("{other:?}"),
        }
        let wrong_type = "module.exports = { ist: { service: 'x' } }";
        assert!(matches!(
            parse_warp_config_js(wrong_type),
            Err(ConfigError::Js { line: 1, .. })
        ));
    }

    #[test]
    fn not_a_literal() {
        for text in [
            "",
            "const c = {}; module.exports = c;",
            "module.exports = require('./other')",
            "module.exports = { ist: [] ",
            "module.exports = { ist: [] }; console.log(1)",
            "module.exports { }",
        ] {
            assert!(
                matches!(parse_warp_config_js(text), Err(ConfigError::NotALiteral(_))),
                "{text:?} -> {:?}",
                parse_warp_config_js(text)
            );
        }
    }

    #[test]
    fn toml_ignores_other_keys_and_reports_lines() {
        let text = "state-dir = \"/x\"\n[[ist]]\nservice = \"a\"\nvariables = [\"A\"]\n";
        assert_eq!(parse_toml(text).unwrap().len(), 1);
        let err = parse_toml("[[ist]]\nservice = 3\n").unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
        assert!(parse_toml("[[ist]]\nservice = \"a\"\nextra = 1\n").is_err());
    }

    #[test]
    fn deep_nesting_and_huge_files_are_errors_not_crashes() {
        // 100,000 nested objects overflowed the stack (abort) before the limit.
        let n = 100_000;
        let deep = format!(
            "module.exports = {{\n a: {}1{} }}",
            "{ b: ".repeat(n),
            " }".repeat(n)
        );
        let err = parse_warp_config_js(&deep).unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::TooDeep {
                    line: 2,
                    max: 64,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("nest deeper than 64"), "{err}");
        let arrays = format!(
            "module.exports = {{ a: {}{} }}",
            "[".repeat(n),
            "]".repeat(n)
        );
        assert!(matches!(
            parse_warp_config_js(&arrays),
            Err(ConfigError::TooDeep { .. })
        ));
        // Brackets inside strings and comments do not count.
        let quoted = format!(
            "module.exports = {{ a: '{}', /* {} */ ist: [] }}",
            "[".repeat(1000),
            "{".repeat(1000)
        );
        assert!(parse_warp_config_js(&quoted).unwrap().is_empty());
        // Nesting up to the limit parses.
        let ok = format!(
            "module.exports = {{ a: {}1{} }}",
            "[".repeat(MAX_WARP_CONFIG_DEPTH - 1),
            "]".repeat(MAX_WARP_CONFIG_DEPTH - 1)
        );
        assert!(parse_warp_config_js(&ok).is_ok());
        let huge = format!(
            "module.exports = {{ a: '{}' }}",
            "x".repeat(MAX_WARP_CONFIG_BYTES)
        );
        assert!(matches!(
            parse_warp_config_js(&huge),
            Err(ConfigError::TooLarge { .. })
        ));
        // TOML has its own nesting limit.
        let toml = format!("a = {}1{}\n", "[".repeat(n), "]".repeat(n));
        assert!(parse_toml(&toml).is_err());
        let tables = format!("a = {}1{}\n", "{b=".repeat(n), "}".repeat(n));
        assert!(parse_toml(&tables).is_err());
    }

    #[test]
    fn merge_prefers_later() {
        let mut a = parse_toml("[[ist]]\nservice = \"s\"\nvariables = [\"A\"]\n").unwrap();
        let b = parse_toml("[[ist]]\nservice = \"s\"\nvariables = [\"B\"]\n").unwrap();
        a.merge(b);
        assert_eq!(a.get("s").unwrap().variables.as_deref().unwrap(), ["B"]);
    }
}
