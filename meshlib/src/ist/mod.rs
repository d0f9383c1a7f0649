//! Inter Service Traffic names (seed 004): for every service of a deployment,
//! a hostname `<encoded>.warp` and two environment variables,
//! `WARP_IST_<encoded>` and its shell-safe twin.
//!
//! - [`encode`] computes the three names of one service, exactly as the seed
//!   describes (see DESIGN.md, "IST encodings").
//! - [`table`] computes the names of every service of a deployment, applies
//!   per-service overrides and reports conflicts naming both services.
//! - [`config`] reads overrides from TOML and from a `warp.config.js` `ist`
//!   section.
//!
//! All pure: strings in, strings out.

pub mod config;
pub mod table;

use std::fmt;

/// The prefix of every generic IST variable.
pub const VARIABLE_PREFIX: &str = "WARP_IST_";

/// The top-level domain of IST hostnames.
pub const HOSTNAME_SUFFIX: &str = ".warp";

/// Why a service name cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IstError {
    /// The service name is empty.
    #[error("service name is empty")]
    Empty,
    /// The service name holds a control character (newline, tab, NUL, ...),
    /// which cannot appear in a hosts file line or an environment variable name.
    #[error("service name {name:?} contains the control character U+{code:04X}")]
    ControlCharacter {
        /// The service name.
        name: String,
        /// The offending character's code point.
        code: u32,
    },
    /// The name is too long for Punycode (RFC 3492 overflow).
    #[error("service name {0:?} is too long to encode with Punycode")]
    PunycodeOverflow(String),
}

/// The names one service gets (before overrides).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IstNames {
    /// The service name as given.
    pub service: String,
    /// The hostname, `<label>.warp`.
    pub hostname: String,
    /// The generic variable, `WARP_IST_<E(name)>`.
    pub variable: String,
    /// The shell variable: the generic one with every character outside
    /// `[A-Za-z0-9]` replaced by `_`.
    pub shell_variable: String,
}

impl fmt::Display for IstNames {
    /// One TSV line: `name  hostname  generic-variable  shell-variable`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}\t{}\t{}\t{}",
            self.service, self.hostname, self.variable, self.shell_variable
        )
    }
}

/// Rejects names that no encoding can carry.
fn check_name(name: &str) -> Result<(), IstError> {
    if name.is_empty() {
        return Err(IstError::Empty);
    }
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Err(IstError::ControlCharacter {
            name: name.to_owned(),
            code: c as u32,
        });
    }
    Ok(())
}

/// RFC 3492 Punycode of `text` (no `xn--` prefix; ASCII keeps its case).
fn punycode(text: &str) -> Result<String, IstError> {
    idna::punycode::encode_str(text).ok_or_else(|| IstError::PunycodeOverflow(text.to_owned()))
}

/// `E(name)`, the encoded part of the generic variable:
/// 1. fold with Lucene's ASCIIFoldingFilter table;
/// 2. if a character ≥ U+0080 remains, Punycode the whole folded string;
/// 3. replace every space and `=` with `_`.
pub fn variable_suffix(name: &str) -> Result<String, IstError> {
    check_name(name)?;
    let folded = asciifolding::fold_to_ascii(name);
    let ascii = if folded.is_ascii() {
        folded
    } else {
        punycode(&folded)?
    };
    Ok(ascii.replace([' ', '='], "_"))
}

/// The hostname label (without `.warp`): lowercase (Unicode); every ASCII
/// character outside `[a-z0-9-]` becomes `-`; if a non-ASCII character
/// remains, `xn--` + Punycode of that string.
pub fn hostname_label(name: &str) -> Result<String, IstError> {
    check_name(name)?;
    let mapped: String = name
        .to_lowercase()
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '-' => c,
            c if c.is_ascii() => '-',
            c => c,
        })
        .collect();
    if mapped.is_ascii() {
        Ok(mapped)
    } else {
        Ok(format!("xn--{}", punycode(&mapped)?))
    }
}

/// The shell-safe twin of a variable name: every character outside
/// `[A-Za-z0-9]` replaced by `_`.
pub fn shell_safe(variable: &str) -> String {
    variable
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// The three names of one service.
pub fn encode(name: &str) -> Result<IstNames, IstError> {
    let variable = format!("{VARIABLE_PREFIX}{}", variable_suffix(name)?);
    Ok(IstNames {
        service: name.to_owned(),
        hostname: format!("{}{HOSTNAME_SUFFIX}", hostname_label(name)?),
        shell_variable: shell_safe(&variable),
        variable,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seed 004's table, then more names (`tests/data/ist_vectors.tsv`,
    /// shared with the `sidecar ist-names` test).
    const VECTORS: &str = include_str!("../../tests/data/ist_vectors.tsv");

    #[test]
    fn seed_table_and_more_vectors() {
        let rows: Vec<Vec<&str>> = VECTORS
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.split('\t').collect())
            .collect();
        assert_eq!(rows.len(), 18);
        for row in rows {
            let [name, host, generic, shell] = row[..] else {
                panic!("bad vector row {row:?}")
            };
            let got = encode(name).unwrap();
            assert_eq!(got.hostname, host, "hostname of {name:?}");
            assert_eq!(got.variable, generic, "variable of {name:?}");
            assert_eq!(got.shell_variable, shell, "shell variable of {name:?}");
        }
    }

    #[test]
    fn folding_uses_the_lucene_table() {
        // Ligatures and letters that fold to two characters.
        assert_eq!(variable_suffix("Æsir œuvre").unwrap(), "AEsir_oeuvre");
        assert_eq!(variable_suffix("straße").unwrap(), "strasse");
        assert_eq!(variable_suffix("ﬁle").unwrap(), "file");
        // Folding happens before Punycode: only what does not fold is encoded,
        // and ASCII keeps its case inside the Punycode string.
        assert_eq!(variable_suffix("Café ✅").unwrap(), "Cafe_-vk2c");
        assert_eq!(
            idna::punycode::decode_to_string("Cafe -vk2c").unwrap(),
            "Cafe ✅"
        );
    }

    #[test]
    fn variable_steps_in_order() {
        // Spaces and '=' are replaced after Punycode, so the Punycode string is
        // of the folded text with its spaces.
        let v = variable_suffix("données = 数据").unwrap();
        let expected = idna::punycode::encode_str("donnees = 数据")
            .unwrap()
            .replace([' ', '='], "_");
        assert_eq!(v, expected);
        assert!(!v.contains(' ') && !v.contains('='));
    }

    #[test]
    fn hostname_rules() {
        assert_eq!(hostname_label("API_Server v2").unwrap(), "api-server-v2");
        // Unicode lowercasing before Punycode; unfolded.
        assert_eq!(
            hostname_label("MES-DONNÉES").unwrap(),
            hostname_label("mes-données").unwrap()
        );
        // Emoji and mixed scripts round-trip through Punycode.
        let label = hostname_label("Δ-api 🚀").unwrap();
        let inner = label.strip_prefix("xn--").unwrap();
        assert_eq!(idna::punycode::decode_to_string(inner).unwrap(), "δ-api-🚀");
    }

    #[test]
    fn shell_variable_is_shell_safe() {
        for name in ["a-b.c:d", "x y=z", "✅", "数据", "Ünïcödé"] {
            let n = encode(name).unwrap();
            assert!(n
                .shell_variable
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_'));
            assert!(n.shell_variable.starts_with(VARIABLE_PREFIX));
        }
    }

    #[test]
    fn invalid_names() {
        assert_eq!(encode(""), Err(IstError::Empty));
        assert!(matches!(
            encode("a\nb"),
            Err(IstError::ControlCharacter { code: 0x0A, .. })
        ));
        assert!(matches!(
            encode("a\0"),
            Err(IstError::ControlCharacter { .. })
        ));
        assert_eq!(IstError::Empty.to_string(), "service name is empty");
    }
}
