//! How figures read on a page: sizes, ages, times, rates.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `1.5 GiB`, `12 KiB`, `512 B`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else if value < 10.0 {
        format!("{value:.1} {}", UNITS[unit])
    } else {
        format!("{value:.0} {}", UNITS[unit])
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `3 s ago`, `5 min ago`, `2 h ago`, `4 d ago`; `never` for 0.
pub fn ago(ms: u64) -> String {
    if ms == 0 {
        return "never".into();
    }
    let secs = now_ms().saturating_sub(ms) / 1000;
    match secs {
        0..60 => format!("{secs} s ago"),
        60..3600 => format!("{} min ago", secs / 60),
        3600..86_400 => format!("{} h ago", secs / 3600),
        _ => format!("{} d ago", secs / 86_400),
    }
}

/// RFC 3339 in UTC, to the second (what an operator pastes into a ticket).
pub fn time(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// `12.3/s`, `0.05/s`, `0/s`.
pub fn rate(per_sec: f64) -> String {
    if per_sec == 0.0 {
        "0/s".into()
    } else if per_sec < 1.0 {
        format!("{per_sec:.2}/s")
    } else if per_sec < 100.0 {
        format!("{per_sec:.1}/s")
    } else {
        format!("{per_sec:.0}/s")
    }
}

/// `sha256:0123456789ab` (the first 12 hex digits).
pub fn short_digest(digest: &str) -> String {
    match digest.split_once(':') {
        Some((algo, hex)) => format!("{algo}:{}", &hex[..hex.len().min(12)]),
        None => digest.to_string(),
    }
}

/// A path segment or query value, percent-encoded.
pub fn encode(s: &str) -> String {
    berth_oci::query::encode(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_read_well() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(64 << 20), "64 MiB");
        assert_eq!(rate(0.0), "0/s");
        assert_eq!(rate(0.5), "0.50/s");
        assert_eq!(rate(1234.0), "1234/s");
        assert_eq!(ago(0), "never");
        assert_eq!(time(1_700_000_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(
            short_digest("sha256:0123456789abcdef0123"),
            "sha256:0123456789ab"
        );
    }
}
