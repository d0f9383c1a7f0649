//! Join tokens as users paste them (`sidecar up --token ...`): any text.
//! A token that parses must print and parse back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshlib::proto::JoinToken;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(token) = text.parse::<JoinToken>() {
        let printed = token.to_string();
        assert_eq!(printed.parse::<JoinToken>().ok(), Some(token));
    }
});
