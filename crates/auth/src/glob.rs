//! Repository globs of the access policy: `*` matches within one path
//! segment (never a `/`), `**` matches across segments. So `team/*` covers
//! `team/app` but neither `team/a/b` nor `team-evil/x`, and `team/**` covers
//! everything under `team/`.
//!
//! Names are validated by the spec's grammar before they are matched, so a
//! name can never hold `..` segments or an empty one.

use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Literal(Vec<u8>),
    /// `*`: any run of bytes other than `/`.
    Star,
    /// `**`: any run of bytes.
    DoubleStar,
}

/// A compiled repository glob.
#[derive(Clone, PartialEq, Eq)]
pub struct Glob {
    source: String,
    tokens: Vec<Token>,
}

/// Longest pattern accepted (names are at most 255 bytes).
const MAX_PATTERN: usize = 512;

impl Glob {
    /// Compiles a pattern. Only the characters of repository names, `*` and
    /// `/` are allowed; `***` is refused as meaningless.
    pub fn parse(pattern: &str) -> Result<Glob, String> {
        if pattern.is_empty() {
            return Err("an empty repository pattern matches nothing".into());
        }
        if pattern.len() > MAX_PATTERN {
            return Err(format!(
                "repository pattern longer than {MAX_PATTERN} bytes"
            ));
        }
        if let Some(c) = pattern
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || "._-/*".contains(*c)))
        {
            return Err(format!(
                "repository pattern {pattern:?}: character {c:?} cannot appear in a repository name"
            ));
        }
        let bytes = pattern.as_bytes();
        let mut tokens = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'*' {
                let run = bytes[i..].iter().take_while(|b| **b == b'*').count();
                match run {
                    1 => tokens.push(Token::Star),
                    2 => tokens.push(Token::DoubleStar),
                    _ => return Err(format!("repository pattern {pattern:?}: use * or **")),
                }
                i += run;
            } else {
                let run = bytes[i..].iter().take_while(|b| **b != b'*').count();
                tokens.push(Token::Literal(bytes[i..i + run].to_vec()));
                i += run;
            }
        }
        Ok(Glob {
            source: pattern.to_string(),
            tokens,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether the glob covers every repository (`**`).
    pub fn is_everything(&self) -> bool {
        self.tokens == [Token::DoubleStar]
    }

    /// Whether `name` matches. Linear in the name for the common shapes
    /// (`exact`, `prefix/*`, `prefix/**`, `**`); otherwise a dynamic
    /// programme over pattern and name, never exponential.
    pub fn matches(&self, name: &str) -> bool {
        let name = name.as_bytes();
        match self.tokens.as_slice() {
            [Token::Literal(l)] => return l.as_slice() == name,
            [Token::DoubleStar] => return true,
            [Token::Literal(p), Token::DoubleStar] => return name.starts_with(p),
            [Token::Literal(p), Token::Star] => {
                return name.starts_with(p) && !name[p.len()..].contains(&b'/');
            }
            _ => {}
        }
        // reach[j]: the first j bytes of the name can be matched by the
        // tokens consumed so far.
        let n = name.len();
        let mut reach = vec![false; n + 1];
        reach[0] = true;
        for token in &self.tokens {
            let mut next = vec![false; n + 1];
            match token {
                Token::Literal(l) => {
                    for j in 0..=n {
                        if reach[j] && name[j..].starts_with(l) {
                            next[j + l.len()] = true;
                        }
                    }
                }
                Token::Star | Token::DoubleStar => {
                    let crosses = *token == Token::DoubleStar;
                    let mut open = false;
                    for j in 0..=n {
                        // A star extends from any reached point over bytes
                        // it may consume.
                        if reach[j] {
                            open = true;
                        }
                        next[j] = open;
                        if j < n && !crosses && name[j] == b'/' {
                            open = false;
                        }
                    }
                }
            }
            reach = next;
            if !reach.iter().any(|r| *r) {
                return false;
            }
        }
        reach[n]
    }
}

impl fmt::Debug for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Glob({:?})", self.source)
    }
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, name: &str) -> bool {
        Glob::parse(pattern).unwrap().matches(name)
    }

    #[test]
    fn single_star_stays_in_its_segment() {
        assert!(m("team/*", "team/app"));
        assert!(!m("team/*", "team/a/b"));
        assert!(!m("team/*", "team-evil/x"));
        assert!(!m("team/*", "team"));
        assert!(m("*/app", "team/app"));
        assert!(!m("*/app", "a/team/app"));
        assert!(m("team/*-cache", "team/x-cache"));
        assert!(!m("team/*-cache", "team/x/y-cache"));
        assert!(m("a*b*c", "aXbYc"));
        assert!(!m("a*b*c", "aXcYb"));
        assert!(m("*", "alpine"));
        assert!(!m("*", "library/alpine"));
    }

    #[test]
    fn double_star_crosses_segments() {
        assert!(m("team/**", "team/app"));
        assert!(m("team/**", "team/a/b"));
        assert!(!m("team/**", "team-evil/x"));
        assert!(!m("team/**", "team"));
        assert!(m("**", "anything/at/all"));
        assert!(m("**/cache", "a/b/cache"));
        assert!(!m("**/cache", "a/b/cachex"));
        assert!(m("a/**/z", "a/b/c/z"));
        assert!(m("a/**/*", "a/b/c"));
        assert!(m("team/**-ci", "team/x/y-ci"));
    }

    #[test]
    fn exact_and_invalid_patterns() {
        assert!(m("team/app", "team/app"));
        assert!(!m("team/app", "team/app2"));
        assert!(Glob::parse("").is_err());
        assert!(Glob::parse("Team/*").is_err());
        assert!(Glob::parse("a/***").is_err());
        assert!(Glob::parse("a b").is_err());
        assert!(Glob::parse("**").unwrap().is_everything());
        assert!(!Glob::parse("team/**").unwrap().is_everything());
    }

    #[test]
    fn many_stars_against_a_long_name() {
        // Backtracking would take 255^12 steps here; the test would hang.
        let pattern = Glob::parse("*a*a*a*a*a*a*a*a*a*a*a*a*b").unwrap();
        assert!(!pattern.matches(&"a".repeat(255)));
        assert!(pattern.matches(&format!("{}b", "a".repeat(254))));
    }
}
