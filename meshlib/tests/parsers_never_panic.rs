//! Every parser of outside input, fed arbitrary text: it returns a value or an
//! error, never panics; and what it accepts round-trips.

use meshlib::dns::{handle, parse_resolv_conf, Authority, Transport};
use meshlib::ids::{InstanceName, NetworkId};
use meshlib::ist::config::{parse_toml, parse_warp_config_js};
use meshlib::ist::{encode, hostname_label, shell_safe};
use meshlib::keys::PublicKey;
use meshlib::names::{InternalName, NameIndex};
use meshlib::render::hosts::{render_section, replace_section};
use proptest::prelude::*;

/// Text biased towards the characters these parsers care about.
fn js_like() -> impl Strategy<Value = String> {
    let pieces = prop::sample::select(vec![
        "module.exports",
        "export default",
        "=",
        "{",
        "}",
        "[",
        "]",
        ",",
        ":",
        ";",
        "'",
        "\"",
        "`",
        "\\",
        "//",
        "/*",
        "*/",
        "\n",
        " ",
        "ist",
        "service",
        "variables",
        "hostnames",
        "'a'",
        "\"é\"",
        "✅",
        "use strict",
        "null",
        "1e999",
        "0x",
    ]);
    prop::collection::vec(pieces, 0..40).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn warp_config_js_never_panics(text in js_like()) {
        let _ = parse_warp_config_js(&text);
    }

    #[test]
    fn warp_config_js_arbitrary_never_panics(text in any::<String>()) {
        let _ = parse_warp_config_js(&text);
        let _ = parse_toml(&text);
    }

    #[test]
    fn encodings_total_and_well_formed(name in any::<String>()) {
        if let Ok(n) = encode(&name) {
            prop_assert!(n.variable.starts_with("WARP_IST_"));
            prop_assert!(n.variable.is_ascii() && !n.variable.contains([' ', '=']));
            prop_assert_eq!(shell_safe(&n.variable), n.shell_variable.clone());
            prop_assert!(n.hostname.ends_with(".warp") && n.hostname.is_ascii());
            prop_assert!(!n.hostname.bytes().any(|b| b.is_ascii_uppercase()));
        } else {
            prop_assert!(name.is_empty() || name.chars().any(char::is_control));
        }
        let _ = hostname_label(&name);
    }

    #[test]
    fn names_parse_or_fail_cleanly(text in "[a-z0-9.\\-]{0,80}|.{0,80}") {
        if let Ok(n) = text.parse::<InternalName>() {
            prop_assert_eq!(n.to_string().parse::<InternalName>().unwrap(), n);
        }
        if let Ok(i) = text.parse::<InstanceName>() {
            prop_assert_eq!(i.to_string(), text.clone());
        }
        let _ = text.parse::<NetworkId>();
        let _ = text.parse::<PublicKey>();
        let _ = PublicKey::from_hex(&text);
    }

    #[test]
    fn hosts_replace_keeps_outside_lines(
        text in "([ -~\t]{0,30}\r?\n){0,8}[ -~\t]{0,30}",
        n in 0u8..4,
    ) {
        let section = render_section("pn-t", &[([10, 240, 0, n].into(), vec!["a.warp".into()])]);
        if let Ok(out) = replace_section(&text, "pn-t", &section) {
            prop_assert_eq!(replace_section(&out, "pn-t", &section).unwrap(), out.clone());
            let removed = replace_section(&out, "pn-t", "").unwrap();
            if !text.contains("ist-mesh") {
                let mut expect = text.clone();
                if !expect.is_empty() && !expect.ends_with('\n') { expect.push('\n'); }
                prop_assert_eq!(removed, expect);
            }
        }
    }

    #[test]
    fn dns_queries_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let idx = NameIndex::default();
        let _ = handle(&bytes, &idx, &Authority::default(), Transport::Udp);
        let _ = handle(&bytes, &idx, &Authority::default(), Transport::Tcp);
    }

    #[test]
    fn resolv_conf_never_panics(text in any::<String>()) {
        let _ = parse_resolv_conf(&text);
    }

    #[test]
    fn hosts_arbitrary_never_panics(text in any::<String>()) {
        let _ = replace_section(&text, "pn-t", &render_section("pn-t", &[]));
    }
}
