//! UAPI `set=1` bodies from local `wg set` clients: any lines.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshlib::wg::uapi::SetRequest;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Err(e) = SetRequest::parse(text.split('\n')) {
        assert!(e.errno() < 0);
    }
});
