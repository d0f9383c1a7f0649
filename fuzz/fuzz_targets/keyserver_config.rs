//! The keyserver's TOML config file (`serve --config`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = keyserver::config::Config::from_toml(text) {
        let _ = config.limits();
    }
});
