//! The sidecar's TOML config file (`--config`): parse, validate, and read
//! its IST overrides.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = sidecar::config::Config::from_toml(text, "fuzz.toml".as_ref()) {
        let _ = config.overrides();
        let _ = config.status_socket_path();
    }
    let _ = meshlib::ist::config::parse_toml(text);
});
