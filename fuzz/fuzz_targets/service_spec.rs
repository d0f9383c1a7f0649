//! Service-group requests of the admin API (`POST`/`PATCH` JSON bodies)
//! and `--publish` values: checked against seed 002's rules, refused with
//! an error or accepted, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshlib::services::{check_group, parse_publish, patch_group, GroupPatch, GroupSpec};

fuzz_target!(|data: &[u8]| {
    if let Ok(spec) = serde_json::from_slice::<GroupSpec>(data) {
        if let Ok(g) = check_group(&spec, None, "abcdefgh", "apps.test") {
            let _ = g.ports.iter().map(|p| p.mode()).count();
        }
    }
    if let Ok(patch) = serde_json::from_slice::<GroupPatch>(data) {
        let spec = GroupSpec {
            name: "g".into(),
            ports: vec![meshlib::services::PortSpec {
                port: 443,
                handlers: vec!["http".into(), "tls".into()],
                ..Default::default()
            }],
            ..Default::default()
        };
        if let Ok(g) = check_group(&spec, None, "abcdefgh", "apps.test") {
            let _ = patch_group(&g, &patch);
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(spec) = parse_publish(text) {
            let _ = spec.check();
        }
    }
});
