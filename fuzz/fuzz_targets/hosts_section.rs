//! `/etc/hosts` files as found: replacing the managed section keeps every
//! other line, is idempotent, and removing it gives the rest back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshlib::render::hosts::{render_section, replace_section};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let tag = "pn-fuzz";
    let section = render_section(
        tag,
        &[(
            [10, 240, 0, 1].into(),
            vec!["a.warp".into(), "a-1.internal".into()],
        )],
    );
    if let Ok(out) = replace_section(text, tag, &section) {
        assert_eq!(replace_section(&out, tag, &section).ok(), Some(out.clone()));
        let removed = replace_section(&out, tag, "").expect("our own section removes");
        assert_eq!(
            replace_section(&removed, tag, "").ok(),
            Some(removed.clone())
        );
    }
});
