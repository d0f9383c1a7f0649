//! `warp.config.js` files from the instance's repository: any text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = meshlib::ist::config::parse_warp_config_js(text);
    }
});
