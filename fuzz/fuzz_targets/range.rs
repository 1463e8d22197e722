//! `Range` request headers against a blob size.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let size = u64::from_le_bytes(data[..8].try_into().unwrap_or([0; 8]));
    let Ok(header) = std::str::from_utf8(&data[8..]) else { return };
    if let Ok(Some(range)) = berth_oci::range::parse_range_header(header, size) {
        // A satisfiable range lies within the blob.
        assert!(range.start <= range.end && range.end < size);
    }
});
