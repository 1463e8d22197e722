//! `Authorization` headers: Basic and Bearer, every size bounded.
#![no_main]

use berth_auth::Credentials;
use berth_auth::header::{MAX_PASSWORD, MAX_USERNAME, parse_authorization};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match parse_authorization(data) {
        Ok(Credentials::Basic { username, password }) => {
            assert!(!username.is_empty() && username.len() <= MAX_USERNAME);
            assert!(password.len() <= MAX_PASSWORD);
            // Debug output never shows the password.
            let shown = format!("{:?}", Credentials::Basic { username: username.clone(), password });
            assert_eq!(shown, format!("Basic({username:?}, <password>)"));
        }
        Ok(Credentials::Bearer(token)) => assert!(!token.is_empty()),
        Err(_) => {}
    }
});
