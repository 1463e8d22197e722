//! htpasswd files: parsed or refused with a line number.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match berth_auth::Htpasswd::parse(text) {
        Ok(file) => assert!(file.len() <= text.lines().count()),
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
