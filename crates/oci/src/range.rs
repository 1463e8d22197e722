//! HTTP byte ranges: `Range` on blob GETs and `Content-Range` on upload PATCHes.

/// An inclusive byte range `start..=end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

impl ByteRange {
    pub fn len(&self) -> u64 {
        self.end - self.start + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("malformed range")]
    Malformed,
    #[error("range not satisfiable")]
    Unsatisfiable,
}

/// Parses a `Range` request header against a blob of `size` bytes.
///
/// Returns `Ok(None)` when the header does not apply and the whole blob should
/// be sent (RFC 9110 says to ignore unknown units and malformed syntax), and
/// `Err(Unsatisfiable)` when no byte of the range exists (416). Only one range
/// is served: multipart/byteranges buys clients nothing for blobs.
pub fn parse_range_header(header: &str, size: u64) -> Result<Option<ByteRange>, RangeError> {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let (first, last) = (first.trim(), last.trim());
    let parse = |s: &str| -> Option<u64> {
        if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
            None
        } else {
            s.parse().ok()
        }
    };
    if first.is_empty() {
        // Suffix range: the last N bytes.
        let Some(n) = parse(last) else {
            return Ok(None);
        };
        if n == 0 || size == 0 {
            return Err(RangeError::Unsatisfiable);
        }
        let n = n.min(size);
        return Ok(Some(ByteRange {
            start: size - n,
            end: size - 1,
        }));
    }
    let Some(start) = parse(first) else {
        return Ok(None);
    };
    let end = if last.is_empty() {
        None
    } else {
        match parse(last) {
            Some(e) if e >= start => Some(e),
            _ => return Ok(None),
        }
    };
    if start >= size {
        return Err(RangeError::Unsatisfiable);
    }
    let end = end.map_or(size - 1, |e| e.min(size - 1));
    Ok(Some(ByteRange { start, end }))
}

/// Parses an upload `Content-Range` (`start-end`, as the distribution spec
/// writes it; `bytes start-end/total` is accepted too).
pub fn parse_content_range(header: &str) -> Result<ByteRange, RangeError> {
    let s = header.trim();
    let s = s.strip_prefix("bytes").map(str::trim_start).unwrap_or(s);
    let s = s.strip_prefix('=').unwrap_or(s).trim();
    let s = s.split('/').next().unwrap_or_default();
    let (a, b) = s.split_once('-').ok_or(RangeError::Malformed)?;
    let num = |x: &str| -> Result<u64, RangeError> {
        let x = x.trim();
        if x.is_empty() || x.len() > 20 || !x.bytes().all(|c| c.is_ascii_digit()) {
            return Err(RangeError::Malformed);
        }
        x.parse().map_err(|_| RangeError::Malformed)
    };
    let (start, end) = (num(a)?, num(b)?);
    // `end == u64::MAX` would make the length overflow; no blob is that big.
    if end < start || end == u64::MAX {
        return Err(RangeError::Malformed);
    }
    Ok(ByteRange { start, end })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u64, end: u64) -> Option<ByteRange> {
        Some(ByteRange { start, end })
    }

    #[test]
    fn range_header_forms() {
        assert_eq!(parse_range_header("bytes=0-9", 100), Ok(r(0, 9)));
        assert_eq!(parse_range_header("bytes=90-", 100), Ok(r(90, 99)));
        assert_eq!(parse_range_header("bytes=-10", 100), Ok(r(90, 99)));
        assert_eq!(parse_range_header("bytes=-1000", 100), Ok(r(0, 99)));
        assert_eq!(parse_range_header("bytes=50-1000", 100), Ok(r(50, 99)));
    }

    #[test]
    fn unsatisfiable_and_ignored() {
        assert_eq!(
            parse_range_header("bytes=100-", 100),
            Err(RangeError::Unsatisfiable)
        );
        assert_eq!(
            parse_range_header("bytes=-0", 100),
            Err(RangeError::Unsatisfiable)
        );
        assert_eq!(
            parse_range_header("bytes=0-", 0),
            Err(RangeError::Unsatisfiable)
        );
        assert_eq!(parse_range_header("items=0-1", 100), Ok(None));
        assert_eq!(parse_range_header("bytes=5-1", 100), Ok(None));
        assert_eq!(parse_range_header("bytes=a-b", 100), Ok(None));
        assert_eq!(parse_range_header("bytes=0-1,3-4", 100), Ok(None));
        assert_eq!(
            parse_range_header("bytes=0-99999999999999999999999999", 100),
            Ok(None)
        );
    }

    #[test]
    fn content_range_forms() {
        assert_eq!(
            parse_content_range("0-99"),
            Ok(ByteRange { start: 0, end: 99 })
        );
        assert_eq!(
            parse_content_range("bytes 100-199/*"),
            Ok(ByteRange {
                start: 100,
                end: 199
            })
        );
        assert!(parse_content_range("5-1").is_err());
        assert!(parse_content_range("x").is_err());
        assert!(parse_content_range("-5").is_err());
        assert!(parse_content_range("0-18446744073709551615").is_err());
    }
}
