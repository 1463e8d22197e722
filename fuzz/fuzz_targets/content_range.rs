//! `Content-Range` headers of upload chunks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(header) = std::str::from_utf8(data) else { return };
    if let Ok(range) = berth_oci::range::parse_content_range(header) {
        assert!(range.start <= range.end);
    }
});
