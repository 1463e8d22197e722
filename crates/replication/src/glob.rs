//! Repository filters: `*` matches any run of characters (slashes too).

pub fn matches(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(i) => rest = &rest[i + middle.len()..],
            None => return false,
        }
    }
    true
}

/// Whether a repository passes include (empty: all) and exclude filters.
pub fn selected(include: &[String], exclude: &[String], name: &str) -> bool {
    (include.is_empty() || include.iter().any(|p| matches(p, name)))
        && !exclude.iter().any(|p| matches(p, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(matches("team/*", "team/app"));
        assert!(matches("team/*", "team/a/b"));
        assert!(!matches("team/*", "other/app"));
        assert!(matches("*-cache", "x/y-cache"));
        assert!(matches("a*b*c", "aXbYc"));
        assert!(!matches("a*b*c", "aXcYb"));
        assert!(matches("exact", "exact"));
        assert!(!matches("ab*ba", "aba"));
        assert!(selected(&[], &["tmp/*".into()], "team/app"));
        assert!(!selected(&[], &["tmp/*".into()], "tmp/x"));
        assert!(!selected(&["team/*".into()], &[], "other/x"));
    }
}
