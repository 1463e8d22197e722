//! Digests: parse, print back, and compare with a digest of the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data)
        && let Ok(digest) = s.parse::<berth_oci::Digest>()
    {
        assert_eq!(digest.to_string(), s);
        let _ = berth_oci::Digest::of(digest.algorithm(), data) == digest;
    }
});
