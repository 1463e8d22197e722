//! `WWW-Authenticate` challenges (RFC 9110, 11.6.1), as registries send
//! them: `Bearer realm="https://auth.example/token",service="registry",
//! scope="repository:library/alpine:pull"` or `Basic realm="Registry"`.

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// The registry token flow: fetch a token from `realm`.
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
    Basic,
}

/// Parses the first challenge we can answer. Parameters may be quoted (with
/// commas inside, as scopes have) or bare tokens.
pub fn parse(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let params = parse_params(rest)?;
    let realm = params.get("realm")?.clone();
    if realm.is_empty() {
        return None;
    }
    Some(Challenge::Bearer {
        realm,
        service: params.get("service").cloned(),
        scope: params.get("scope").cloned(),
    })
}

fn parse_params(mut s: &str) -> Option<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    loop {
        s = s.trim_start_matches([' ', ',', '\t']);
        if s.is_empty() {
            return Some(out);
        }
        let (key, rest) = s.split_once('=')?;
        let key = key.trim().to_ascii_lowercase();
        let rest = rest.trim_start();
        let (value, rest) = if let Some(quoted) = rest.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => value.push(chars.next()?.1),
                    '"' => {
                        end = Some(i + 1);
                        break;
                    }
                    c => value.push(c),
                }
            }
            (value, &quoted[end?..])
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            (rest[..end].trim().to_string(), &rest[end..])
        };
        out.insert(key, value);
        s = rest;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_challenge() {
        let c = parse(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull,push""#,
        );
        assert_eq!(
            c,
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull,push".into()),
            })
        );
    }

    #[test]
    fn bare_values_escapes_and_case() {
        let c = parse(r#"bearer Realm=https://a/t , service="s\"q""#);
        assert_eq!(
            c,
            Some(Challenge::Bearer {
                realm: "https://a/t".into(),
                service: Some("s\"q".into()),
                scope: None,
            })
        );
        assert_eq!(
            parse(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
    }

    #[test]
    fn unusable_challenges() {
        for bad in [
            "",
            "Digest realm=x",
            "Bearer",
            "Bearer service=x",
            r#"Bearer realm="unterminated"#,
            r#"Bearer realm="""#,
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
