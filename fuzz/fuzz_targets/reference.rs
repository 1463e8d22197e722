//! Manifest references (a tag or a digest).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(reference) = berth_oci::Reference::parse(s) {
        // What parses prints back as itself.
        assert_eq!(reference.to_string(), s);
    }
});
