//! Query strings and form bodies (pagination, mounts, the token form).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(pairs) = berth_oci::query::parse_pairs(Some(s)) {
        assert!(pairs.len() <= berth_oci::query::MAX_PAIRS);
        for (k, v) in &pairs {
            assert!(k.len() <= berth_oci::query::MAX_VALUE && v.len() <= berth_oci::query::MAX_VALUE);
            // Encoding and decoding round-trip.
            assert_eq!(berth_oci::query::decode(&berth_oci::query::encode(v)).as_deref(), Some(v.as_str()));
        }
    }
});
