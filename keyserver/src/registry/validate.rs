//! What the keyserver accepts as names, ranges and token lifetimes. Every
//! name here ends up on other members' terminals, in hosts files and DNS
//! answers, so characters that can rewrite what a terminal shows (controls,
//! bidi overrides) never get in; network names, which operators type and
//! read, also refuse invisible characters and look-alikes of each other.

use std::time::Duration;

use ipnet::Ipv4Net;
use unicode_normalization::UnicodeNormalization as _;

/// Longest service name, token service binding and runner label, in bytes.
pub const MAX_LABEL: usize = 128;
/// Longest network name, in bytes.
pub const MAX_NETWORK_NAME: usize = 64;
/// Shortest range prefix: a /16 holds 65534 members.
pub const MIN_PREFIX: u8 = 16;
/// Longest range prefix: a /30 holds two members; /31 and /32 hold none.
pub const MAX_PREFIX: u8 = 30;
/// Longest token lifetime.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Ranges a network may not overlap: they mean something else to every host.
const RESERVED: [(&str, [u8; 4], u8); 5] = [
    ("\"this network\" 0.0.0.0/8", [0, 0, 0, 0], 8),
    ("loopback 127.0.0.0/8", [127, 0, 0, 0], 8),
    ("link-local 169.254.0.0/16", [169, 254, 0, 0], 16),
    ("multicast 224.0.0.0/4", [224, 0, 0, 0], 4),
    (
        "reserved 240.0.0.0/4 (with broadcast 255.255.255.255)",
        [240, 0, 0, 0],
        4,
    ),
];

/// Characters that change how a terminal shows text: C0/C1 controls (ESC
/// starts colour and cursor sequences), line and paragraph separators, and
/// the bidi formatting characters that reorder what follows (Trojan Source,
/// CVE-2021-42574).
pub fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061C}'
                | '\u{200E}'
                | '\u{200F}'
                | '\u{2028}'
                | '\u{2029}'
                | '\u{202A}'..='\u{202E}'
                | '\u{2066}'..='\u{2069}'
        )
}

/// [`is_unsafe`], plus characters that show nothing (zero-width and other
/// format characters, variation selectors, fillers, tags): two names that
/// differ only by them look identical.
pub fn is_invisible(c: char) -> bool {
    is_unsafe(c)
        || matches!(
            c,
            '\u{00AD}'
                | '\u{034F}'
                | '\u{0600}'..='\u{0605}'
                | '\u{06DD}'
                | '\u{070F}'
                | '\u{08E2}'
                | '\u{115F}'
                | '\u{1160}'
                | '\u{17B4}'
                | '\u{17B5}'
                | '\u{180B}'..='\u{180F}'
                | '\u{200B}'..='\u{200F}'
                | '\u{2060}'..='\u{206F}'
                | '\u{3164}'
                | '\u{FE00}'..='\u{FE0F}'
                | '\u{FEFF}'
                | '\u{FFA0}'
                | '\u{FFF0}'..='\u{FFFB}'
                | '\u{110BD}'
                | '\u{110CD}'
                | '\u{1BCA0}'..='\u{1BCA3}'
                | '\u{1D173}'..='\u{1D17A}'
                | '\u{E0000}'..='\u{E0FFF}'
        )
}

/// The first unsafe character of `text`, described for an error message.
fn first_bad(text: &str, bad: fn(char) -> bool) -> Option<String> {
    text.char_indices()
        .find(|(_, c)| bad(*c))
        .map(|(i, c)| format!("character U+{:04X} at byte {i}", u32::from(c)))
}

/// A service name (or a token's service binding): 1–[`MAX_LABEL`] bytes,
/// not only whitespace, no [`is_unsafe`] character.
pub fn service(name: &str) -> Result<(), String> {
    if name.trim().is_empty() || name.len() > MAX_LABEL {
        return Err(format!(
            "service name must be 1-{MAX_LABEL} bytes and not only whitespace"
        ));
    }
    match first_bad(name, is_unsafe) {
        Some(what) => Err(format!("service name holds a control or bidi {what}")),
        None => Ok(()),
    }
}

/// A runner label: at most [`MAX_LABEL`] bytes, no [`is_unsafe`] character.
pub fn runner(label: &str) -> Result<(), String> {
    if label.len() > MAX_LABEL {
        return Err(format!("runner label must be at most {MAX_LABEL} bytes"));
    }
    match first_bad(label, is_unsafe) {
        Some(what) => Err(format!("runner label holds a control or bidi {what}")),
        None => Ok(()),
    }
}

/// A network name: 1–[`MAX_NETWORK_NAME`] bytes, no leading or trailing
/// whitespace, not `.` or `..`, no [`is_invisible`] character, not starting
/// with `pn-` (ids look like that). Uniqueness is [`skeleton`]'s job.
pub fn network_name(name: &str) -> Result<(), String> {
    if name.trim().is_empty() || name.len() > MAX_NETWORK_NAME {
        return Err(format!(
            "1-{MAX_NETWORK_NAME} bytes and not only whitespace"
        ));
    }
    if name.trim() != name {
        return Err("no leading or trailing whitespace".into());
    }
    if name == "." || name == ".." {
        return Err("not a path component".into());
    }
    if let Some(what) = first_bad(name, is_invisible) {
        return Err(format!("no control, bidi or invisible {what}"));
    }
    if name.to_lowercase().starts_with("pn-") {
        return Err("must not start with 'pn-' (network ids do)".into());
    }
    Ok(())
}

/// The form under which two network names count as the same: NFKC (full
/// width and compatibility forms), lowercase (case folding), then the UTS #39
/// skeleton (confusable characters mapped to one prototype: Cyrillic `о` and
/// Latin `o`, `rn` and `m`).
pub fn skeleton(name: &str) -> String {
    let folded: String = name.nfkc().collect::<String>().to_lowercase();
    unicode_security::skeleton(&folded).collect()
}

/// A network range: canonical, between /[`MIN_PREFIX`] and /[`MAX_PREFIX`],
/// overlapping no reserved block (loopback, "this network", link-local,
/// multicast, 240/4 with the broadcast address).
pub fn range(range: Ipv4Net) -> Result<(), String> {
    if range.trunc() != range {
        return Err(format!(
            "{range} has host bits set; did you mean {}?",
            range.trunc()
        ));
    }
    if range.prefix_len() < MIN_PREFIX {
        return Err(format!(
            "{range} is too large: the prefix must be /{MIN_PREFIX} or longer"
        ));
    }
    if range.prefix_len() > MAX_PREFIX {
        return Err(format!(
            "{range} is too small: it needs at least 2 host addresses (/{MAX_PREFIX} or shorter)"
        ));
    }
    for (what, addr, len) in RESERVED {
        let block = Ipv4Net::new(addr.into(), len).expect("constant prefix");
        if block.contains(&range.network()) || range.contains(&block.network()) {
            return Err(format!("{range} overlaps the {what} block"));
        }
    }
    Ok(())
}

/// A token lifetime: at least one second, at most [`MAX_TOKEN_TTL`].
pub fn token_ttl(ttl: Duration) -> Result<(), String> {
    if ttl < Duration::from_secs(1) || ttl > MAX_TOKEN_TTL {
        return Err(format!(
            "token lifetime must be between 1s and {}",
            humantime::format_duration(MAX_TOKEN_TTL)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_and_runner_refuse_controls_and_bidi() {
        for ok in [
            "api",
            "my db",
            "mes-données",
            "✅ db",
            "我的数据",
            "👨\u{200D}👩 team",
        ] {
            assert!(service(ok).is_ok(), "{ok:?}");
        }
        for bad in [
            "",
            "   ",
            "a\u{1b}[31mred",
            "a\nforged line",
            "evil\u{202E}gnp.exe",
            "x\u{2066}y",
            "x\u{200F}",
            "\u{0085}",
        ] {
            assert!(service(bad).is_err(), "{bad:?}");
        }
        assert!(service(&"x".repeat(MAX_LABEL)).is_ok());
        assert!(service(&"x".repeat(MAX_LABEL + 1)).is_err());
        assert!(runner("").is_ok());
        assert!(runner("eu-west-3").is_ok());
        assert!(runner("r\u{1b}]0;title\u{7}").is_err());
        assert!(runner(&"r".repeat(MAX_LABEL + 1)).is_err());
    }

    #[test]
    fn network_names_and_look_alikes() {
        for ok in ["prod", "my net", "a/b", "équipe", "生产"] {
            assert!(network_name(ok).is_ok(), "{ok:?}");
        }
        for bad in [
            "",
            " ",
            ".",
            "..",
            " prod",
            "pro\u{200B}d",
            "prod\u{FEFF}",
            "pr\u{202E}od",
            "pn-x",
            "PN-x",
            &"n".repeat(65),
        ] {
            assert!(network_name(bad).is_err(), "{bad:?}");
        }
        let s = skeleton("prod");
        // Cyrillic о, full-width letters, capitals.
        for twin in ["prоd", "ｐｒｏｄ", "PROD", "Prod"] {
            assert_eq!(skeleton(twin), s, "{twin:?}");
        }
        assert_ne!(skeleton("staging"), s);
    }

    #[test]
    fn ranges() {
        for ok in [
            "10.240.0.0/22",
            "10.0.0.0/16",
            "192.168.1.0/30",
            "100.64.0.0/24",
        ] {
            assert!(range(ok.parse().unwrap()).is_ok(), "{ok}");
        }
        for bad in [
            "0.0.0.0/0",
            "10.0.0.0/8",
            "127.0.0.0/24",
            "0.0.0.0/24",
            "224.0.0.0/24",
            "239.255.255.0/24",
            "240.0.0.0/24",
            "255.255.255.252/30",
            "169.254.0.0/24",
            "10.240.0.0/31",
            "10.240.0.1/32",
            "10.240.0.1/22",
        ] {
            assert!(range(bad.parse().unwrap()).is_err(), "{bad}");
        }
    }

    #[test]
    fn token_lifetimes() {
        assert!(token_ttl(Duration::ZERO).is_err());
        assert!(token_ttl(Duration::from_secs(1)).is_ok());
        assert!(token_ttl(MAX_TOKEN_TTL).is_ok());
        assert!(token_ttl(MAX_TOKEN_TTL + Duration::from_secs(1)).is_err());
    }
}
