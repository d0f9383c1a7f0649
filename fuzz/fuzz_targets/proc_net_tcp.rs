//! `/proc/net/tcp` and `/proc/net/tcp6` text (port discovery in userspace
//! mode): any lines.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let ports = meshlib::userspace::ports::listening_ports(&text);
    assert!(ports.len() <= text.lines().count());
});
