//! Text that came from the network (service names, runner labels, instance
//! names, a keyserver's messages), made safe to print.
//!
//! A peer chooses its service name; printed raw, an ESC could recolour or
//! rewrite the operator's terminal, a newline could forge a line of
//! `sidecar status` or of a log, and a bidi override could make one name
//! look like another. [`Escaped`] prints such characters as Rust escapes
//! (`\u{1b}`, `\u{202e}`); every other character, including any letter of
//! any script, is printed as is.

use std::borrow::Cow;
use std::fmt::{self, Write as _};

/// Whether `c` must not reach a terminal raw: C0 and C1 controls, DEL, and
/// the invisible formatting characters that reorder or hide text (bidi
/// embeddings, overrides and isolates, marks, zero-width characters, line
/// and paragraph separators, the byte-order mark).
pub fn is_unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}'
                | '\u{200b}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2060}'..='\u{2069}'
                | '\u{feff}'
        )
}

/// Displays a string with every [`is_unsafe_char`] written as `\u{..}`.
#[derive(Debug, Clone, Copy)]
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            if is_unsafe_char(c) {
                write!(f, "\\u{{{:x}}}", u32::from(c))?;
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

/// `s` with every [`is_unsafe_char`] escaped; borrowed when nothing needed it.
pub fn escape(s: &str) -> Cow<'_, str> {
    if s.chars().any(is_unsafe_char) {
        Cow::Owned(Escaped(s).to_string())
    } else {
        Cow::Borrowed(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_and_bidi_are_escaped_letters_are_not() {
        assert_eq!(escape("my db"), "my db");
        assert!(matches!(escape("mes-données ✅ 我的"), Cow::Borrowed(_)));
        assert_eq!(escape("a\u{1b}[31mred"), "a\\u{1b}[31mred");
        assert_eq!(escape("x\ny\r\t"), "x\\u{a}y\\u{d}\\u{9}");
        assert_eq!(escape("\u{202e}gnp.exe"), "\\u{202e}gnp.exe");
        assert_eq!(
            escape("a\u{200b}b\u{9b}c\u{7f}"),
            "a\\u{200b}b\\u{9b}c\\u{7f}"
        );
        assert_eq!(
            Escaped("\u{2066}x\u{2069}").to_string(),
            "\\u{2066}x\\u{2069}"
        );
        assert!(!escape("\u{1b}\n\u{202e}").contains(['\u{1b}', '\n', '\u{202e}']));
    }
}
