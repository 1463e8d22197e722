//! What a browser sends the console: cookies, its Origin, the page to
//! return to after signing in.
#![no_main]

use berth_auth::browser::{MAX_COOKIE_VALUE, cookie, safe_next, same_origin};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Some(v) = cookie(s.split('\n'), "__Host-berth_session") {
        assert!(!v.is_empty() && v.len() <= MAX_COOKIE_VALUE);
        assert!(v.bytes().all(|b| b.is_ascii_alphanumeric()));
    }
    // Never another site, never a byte a Location header cannot carry.
    let next = safe_next(Some(s));
    assert!(next.starts_with("/ui/") && !next.contains("//") && !next.contains('\\'));
    assert!(next.len() <= 512 && next.bytes().all(|b| b.is_ascii_graphic()));
    // Only the listed origins pass.
    let allowed = ["https://reg.example:5000"];
    if same_origin(Some(s), &allowed) {
        assert!(s.eq_ignore_ascii_case(allowed[0]));
    }
});
