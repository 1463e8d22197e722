//! Token scopes (`repository:NAME:ACTIONS`), as the token endpoint gets them.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let values: Vec<&str> = s.split('\n').collect();
    if let Ok(scopes) = berth_auth::parse_scopes(values) {
        assert!(scopes.len() <= berth_auth::scope::MAX_SCOPES);
    }
});
