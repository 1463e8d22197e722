//! Repository names: any string is accepted or refused, never a panic, and
//! an accepted name holds only the grammar's characters.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(name) = berth_oci::RepositoryName::parse(s) {
        assert_eq!(name.as_str(), s);
        assert!(s.len() <= berth_oci::name::MAX_NAME_LEN);
        assert!(s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/".contains(&b)));
        assert!(!s.split('/').any(|c| c.is_empty() || c == "." || c == ".."));
    }
});
