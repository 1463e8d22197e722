//! The `Authorization` request header: `Basic` credentials and `Bearer`
//! tokens, with a bound on every part a client sends.

use base64::Engine;

/// Longest `Authorization` value read.
pub const MAX_HEADER: usize = 16 * 1024;
pub const MAX_USERNAME: usize = 256;
pub const MAX_PASSWORD: usize = 1024;

#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    Basic { username: String, password: String },
    Bearer(String),
}

// Never print secrets, not even in a debug log.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Basic { username, .. } => {
                write!(f, "Basic({username:?}, <password>)")
            }
            Credentials::Bearer(_) => f.write_str("Bearer(<token>)"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("the Authorization header is too long")]
    TooLong,
    #[error("the Authorization header is not ASCII")]
    NotAscii,
    #[error("unsupported authorization scheme (use Basic or Bearer)")]
    Scheme,
    #[error("malformed Basic credentials")]
    MalformedBasic,
    #[error("user name or password too long")]
    BasicTooLong,
    #[error("malformed Bearer token")]
    MalformedBearer,
}

/// Parses an `Authorization` header value (RFC 9110: the scheme is
/// case-insensitive, followed by one or more spaces).
pub fn parse_authorization(value: &[u8]) -> Result<Credentials, HeaderError> {
    if value.len() > MAX_HEADER {
        return Err(HeaderError::TooLong);
    }
    let value = std::str::from_utf8(value)
        .ok()
        .filter(|v| v.is_ascii())
        .ok_or(HeaderError::NotAscii)?;
    let value = value.trim();
    let (scheme, rest) = value.split_once(' ').ok_or(HeaderError::Scheme)?;
    let rest = rest.trim_start_matches(' ');
    if scheme.eq_ignore_ascii_case("basic") {
        parse_basic(rest)
    } else if scheme.eq_ignore_ascii_case("bearer") {
        parse_bearer(rest)
    } else {
        Err(HeaderError::Scheme)
    }
}

fn parse_basic(encoded: &str) -> Result<Credentials, HeaderError> {
    // Some clients drop the padding.
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(encoded))
        .map_err(|_| HeaderError::MalformedBasic)?;
    let decoded = String::from_utf8(decoded).map_err(|_| HeaderError::MalformedBasic)?;
    let (username, password) = decoded.split_once(':').ok_or(HeaderError::MalformedBasic)?;
    if username.is_empty() || username.chars().any(char::is_control) {
        return Err(HeaderError::MalformedBasic);
    }
    if username.len() > MAX_USERNAME || password.len() > MAX_PASSWORD {
        return Err(HeaderError::BasicTooLong);
    }
    Ok(Credentials::Basic {
        username: username.to_string(),
        password: password.to_string(),
    })
}

/// `token68` (RFC 9110, 11.2).
fn parse_bearer(token: &str) -> Result<Credentials, HeaderError> {
    let body = token.trim_end_matches('=');
    let valid = !body.is_empty()
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b));
    if !valid {
        return Err(HeaderError::MalformedBearer);
    }
    Ok(Credentials::Bearer(token.to_string()))
}

/// `Basic` credentials as a header value (for the clients in this project).
pub fn basic_header(username: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_and_bearer() {
        assert_eq!(
            parse_authorization(basic_header("alice", "s3cr:et").as_bytes()).unwrap(),
            Credentials::Basic {
                username: "alice".into(),
                password: "s3cr:et".into()
            }
        );
        assert_eq!(
            parse_authorization(b"bearer   abc.def-_~+/==").unwrap(),
            Credentials::Bearer("abc.def-_~+/==".into())
        );
        // Unpadded base64 ("a:b").
        assert!(matches!(
            parse_authorization(b"Basic YTpi"),
            Ok(Credentials::Basic { .. })
        ));
        assert!(matches!(
            parse_authorization(b"BASIC YTpiYw"),
            Ok(Credentials::Basic { .. })
        ));
    }

    #[test]
    fn malformed_headers_are_refused() {
        for bad in [
            &b"Basic"[..],
            b"Basic !!!",
            b"Basic YWxpY2U=", // no colon
            b"Basic OnBhc3M=", // empty user
            b"Digest abc",
            b"Bearer",
            b"Bearer a b",
            b"Bearer ===",
            b"Bearer \xff",
        ] {
            assert!(parse_authorization(bad).is_err(), "{bad:?}");
        }
        let long = format!("Bearer {}", "a".repeat(MAX_HEADER));
        assert_eq!(
            parse_authorization(long.as_bytes()),
            Err(HeaderError::TooLong)
        );
        let long_user = basic_header(&"u".repeat(MAX_USERNAME + 1), "p");
        assert_eq!(
            parse_authorization(long_user.as_bytes()),
            Err(HeaderError::BasicTooLong)
        );
    }

    #[test]
    fn debug_hides_secrets() {
        let c = parse_authorization(basic_header("alice", "hunter2").as_bytes()).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
        let t = Credentials::Bearer("secret-token".into());
        assert!(!format!("{t:?}").contains("secret"));
    }
}
