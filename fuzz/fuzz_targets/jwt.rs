//! Bearer tokens: any string against a key set, never accepted unless it
//! carries a valid signature (which a fuzzer cannot forge), never a panic.
#![no_main]

use std::sync::LazyLock;

use berth_auth::{KeySet, SigningKey};
use libfuzzer_sys::fuzz_target;

static KEYS: LazyLock<KeySet> = LazyLock::new(|| {
    let key = SigningKey::generate().expect("key");
    KeySet::new([key.verifying()])
});

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else { return };
    let _ = berth_auth::jwt::key_id(token);
    assert!(berth_auth::jwt::verify(token, &KEYS, "berth", "berth").is_err());
});
