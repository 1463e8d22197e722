//! What a browser sends the console besides the credentials themselves:
//! cookies, its `Origin`, and where to go after signing in. Each function
//! takes whatever a client sent, and is fuzzed (target `browser`).

/// The longest cookie value taken (session ids and CSRF tokens are 64).
pub const MAX_COOKIE_VALUE: usize = 128;

/// The value of cookie `name` in `Cookie` header values: the first one,
/// and only if it is letters and digits, at most [`MAX_COOKIE_VALUE`]
/// bytes (anything else is not a value Berth set).
pub fn cookie<'a>(headers: impl IntoIterator<Item = &'a str>, name: &str) -> Option<&'a str> {
    headers
        .into_iter()
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
        .filter(|v| {
            !v.is_empty()
                && v.len() <= MAX_COOKIE_VALUE
                && v.bytes().all(|b| b.is_ascii_alphanumeric())
        })
}

/// Whether `origin` (the `Origin` header, if a browser sent one) is one of
/// `allowed` (`scheme://host[:port]`). No `Origin`: not a cross-site form.
pub fn same_origin(origin: Option<&str>, allowed: &[&str]) -> bool {
    let Some(origin) = origin else {
        return true;
    };
    allowed
        .iter()
        .any(|o| !o.is_empty() && !o.ends_with("://") && o.eq_ignore_ascii_case(origin))
}

/// Where to go after signing in: `next` if it is a console path (never
/// another site) of visible ASCII (a `Location` header's bytes), at most
/// 512 bytes; the overview otherwise.
pub fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n)
            if n.starts_with("/ui/")
                && n.len() <= 512
                && !n.contains("//")
                && !n.contains('\\')
                && n.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            n.to_string()
        }
        _ => "/ui/".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_stays_on_the_console() {
        assert_eq!(safe_next(Some("/ui/cache")), "/ui/cache");
        assert_eq!(
            safe_next(Some("/ui/repositories?q=a%20b")),
            "/ui/repositories?q=a%20b"
        );
        for bad in [
            "https://evil.example/",
            "//evil.example/ui/",
            "/ui//evil.example",
            "/ui/\\evil",
            "/ui/é",
            "/ui/a\r\nSet-Cookie: x=1",
            "/ui/a b",
        ] {
            assert_eq!(safe_next(Some(bad)), "/ui/", "{bad:?}");
        }
        assert_eq!(safe_next(None), "/ui/");
    }

    #[test]
    fn origins_must_match_the_registry() {
        let own = ["https://reg.example:5000", "https://registry.example"];
        assert!(same_origin(None, &own), "no Origin: not a cross-site form");
        for (origin, ok) in [
            ("https://reg.example:5000", true),
            ("HTTPS://REG.example:5000", true),
            ("https://registry.example", true),
            ("http://reg.example:5000", false),
            ("https://evil.example", false),
            ("https://reg.example:5000.evil.example", false),
            ("null", false),
        ] {
            assert_eq!(same_origin(Some(origin), &own), ok, "{origin}");
        }
        assert!(!same_origin(Some("https://"), &["", "https://"]));
    }

    #[test]
    fn cookies_are_read_strictly() {
        let name = "__Host-berth_session";
        assert_eq!(
            cookie(["a=1; __Host-berth_session=abc123; b=2"], name),
            Some("abc123")
        );
        assert_eq!(
            cookie(["x=1", "__Host-berth_session=f00"], name),
            Some("f00")
        );
        assert_eq!(cookie(["__Host-berth_session=a%20b"], name), None);
        assert_eq!(cookie(["berth_session=abc"], name), None);
        let long = format!("{name}={}", "a".repeat(MAX_COOKIE_VALUE + 1));
        assert_eq!(cookie([long.as_str()], name), None);
    }
}
