//! Query strings of registry URLs (pagination links, token requests) and
//! `application/x-www-form-urlencoded` bodies (the OAuth2 token form).

use std::collections::HashMap;

/// Longest value accepted (`last` cursors, `from` names, scopes).
pub const MAX_VALUE: usize = 512;
/// Parameters accepted in one query string.
pub const MAX_PAIRS: usize = 128;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("malformed or oversized query parameter")]
    Malformed,
    #[error("too many query parameters")]
    TooMany,
}

/// Every `key=value` pair in order, percent- and `+`-decoded. A value may
/// be at most [`MAX_VALUE`] bytes; there may be at most [`MAX_PAIRS`].
pub fn parse_pairs(query: Option<&str>) -> Result<Vec<(String, String)>, QueryError> {
    let mut out = Vec::new();
    let Some(q) = query else { return Ok(out) };
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        if out.len() == MAX_PAIRS {
            return Err(QueryError::TooMany);
        }
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match (decode(k), decode(v)) {
            (Some(k), Some(v)) if v.len() <= MAX_VALUE && k.len() <= MAX_VALUE => out.push((k, v)),
            _ => return Err(QueryError::Malformed),
        }
    }
    Ok(out)
}

/// The pairs as a map (the last of repeated keys wins).
pub fn parse(query: Option<&str>) -> Result<HashMap<String, String>, QueryError> {
    Ok(parse_pairs(query)?.into_iter().collect())
}

/// Decodes one percent-encoded component (`+` is a space, as in forms).
pub fn decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return None;
                }
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Encodes a query value: everything but RFC 3986 unreserved characters.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_decode() {
        assert_eq!(
            parse_pairs(Some("scope=repository%3Aa%2Fb%3Apull&scope=x+y&n=")).unwrap(),
            vec![
                ("scope".into(), "repository:a/b:pull".into()),
                ("scope".into(), "x y".into()),
                ("n".into(), String::new())
            ]
        );
        assert_eq!(parse(Some("a=1&a=2")).unwrap()["a"], "2");
        assert!(parse_pairs(None).unwrap().is_empty());
        for bad in ["a=%zz", "a=%4", "a=%+1", "a=%ff"] {
            assert_eq!(parse_pairs(Some(bad)), Err(QueryError::Malformed), "{bad}");
        }
        let long = format!("a={}", "x".repeat(MAX_VALUE + 1));
        assert_eq!(parse_pairs(Some(&long)), Err(QueryError::Malformed));
        let many = vec!["a=1"; MAX_PAIRS + 1].join("&");
        assert_eq!(parse_pairs(Some(&many)), Err(QueryError::TooMany));
    }

    #[test]
    fn reserved_characters_are_escaped() {
        assert_eq!(
            super::encode("repository:a/b:pull,push"),
            "repository%3Aa%2Fb%3Apull%2Cpush"
        );
        assert_eq!(super::encode("A-z_0.9~"), "A-z_0.9~");
    }
}
