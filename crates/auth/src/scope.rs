//! Scopes of the registry token protocol: `repository:NAME:pull,push`,
//! `repository(plugin):NAME:*`, `registry:catalog:*`. A token request names
//! what it wants; the token carries what the policy grants of it.

use berth_oci::RepositoryName;

use crate::action::{Action, Actions};

/// Scopes accepted in one token request.
pub const MAX_SCOPES: usize = 64;
/// Longest scope accepted.
pub const MAX_SCOPE_LEN: usize = 512;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    Repository {
        name: RepositoryName,
        actions: Actions,
    },
    /// `registry:catalog:*`: listing repositories.
    Catalog,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error("more than {MAX_SCOPES} scopes requested")]
    TooMany,
    #[error("scope too long")]
    TooLong,
    #[error("malformed scope {0:?}: expected TYPE:NAME:ACTIONS")]
    Malformed(String),
    #[error("scope {scope:?}: {why}")]
    InvalidName { scope: String, why: String },
}

/// Parses one scope. Unknown resource types give `None` (a token server
/// grants nothing for them); unknown actions are dropped, as the protocol
/// lets servers grant a subset.
pub fn parse_scope(s: &str) -> Result<Option<Scope>, ScopeError> {
    if s.len() > MAX_SCOPE_LEN {
        return Err(ScopeError::TooLong);
    }
    let shown = || s.chars().take(80).collect::<String>();
    let (kind, rest) = s
        .split_once(':')
        .ok_or_else(|| ScopeError::Malformed(shown()))?;
    let (name, actions) = rest
        .rsplit_once(':')
        .ok_or_else(|| ScopeError::Malformed(shown()))?;
    // `repository(plugin)`: a resource class, ignored.
    let kind = kind.split_once('(').map_or(kind, |(k, _)| k);
    match kind {
        "repository" => {
            let name = RepositoryName::parse(name).map_err(|e| ScopeError::InvalidName {
                scope: shown(),
                why: e.to_string(),
            })?;
            let mut granted = Actions::NONE;
            for a in actions.split(',') {
                granted = match a {
                    "*" => granted.union(Actions::ALL_CONTENT),
                    a => match Action::parse(a) {
                        // `admin` is not a token-protocol action.
                        Some(Action::Admin) | None => granted,
                        Some(action) => granted.with(action),
                    },
                };
            }
            Ok(Some(Scope::Repository {
                name,
                actions: granted,
            }))
        }
        "registry" if name == "catalog" => Ok(Some(Scope::Catalog)),
        _ => Ok(None),
    }
}

/// Parses the scopes of a token request: repeated `scope` parameters, each
/// possibly holding several separated by spaces (the OAuth2 form).
pub fn parse_scopes<'a>(
    values: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<Scope>, ScopeError> {
    let mut out = Vec::new();
    let mut seen = 0usize;
    for value in values {
        for item in value.split(' ').filter(|i| !i.is_empty()) {
            seen += 1;
            if seen > MAX_SCOPES {
                return Err(ScopeError::TooMany);
            }
            if let Some(scope) = parse_scope(item)? {
                out.push(scope);
            }
        }
    }
    Ok(out)
}

/// The challenge's scope string for a repository and actions.
pub fn repository_scope(name: &str, actions: Actions) -> String {
    format!("repository:{name}:{actions}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(name: &str, actions: &[Action]) -> Scope {
        Scope::Repository {
            name: RepositoryName::parse(name).unwrap(),
            actions: Actions::of(actions),
        }
    }

    #[test]
    fn scopes_parse() {
        assert_eq!(
            parse_scope("repository:team/app:pull,push").unwrap(),
            Some(repo("team/app", &[Action::Pull, Action::Push]))
        );
        assert_eq!(
            parse_scope("repository(plugin):a:*").unwrap(),
            Some(repo("a", &[Action::Pull, Action::Push, Action::Delete]))
        );
        assert_eq!(
            parse_scope("repository:a:pull,fly,admin").unwrap(),
            Some(repo("a", &[Action::Pull]))
        );
        assert_eq!(
            parse_scope("registry:catalog:*").unwrap(),
            Some(Scope::Catalog)
        );
        assert_eq!(parse_scope("other:x:y").unwrap(), None);
        assert_eq!(
            parse_scopes(["repository:a:pull repository:b:push", "registry:catalog:*"]).unwrap(),
            vec![
                repo("a", &[Action::Pull]),
                repo("b", &[Action::Push]),
                Scope::Catalog
            ]
        );
    }

    #[test]
    fn bad_scopes_are_refused() {
        for bad in [
            "repository",
            "repository:a",
            "repository:A/B:pull",
            "repository::pull",
        ] {
            assert!(parse_scope(bad).is_err(), "{bad:?}");
        }
        // A name with a host and port is not a repository name.
        assert!(parse_scope("repository:localhost:5000/a:pull").is_err());
        let many = vec!["repository:a:pull"; MAX_SCOPES + 1];
        assert_eq!(parse_scopes(many), Err(ScopeError::TooMany));
        assert_eq!(
            parse_scope(&"x".repeat(MAX_SCOPE_LEN + 1)),
            Err(ScopeError::TooLong)
        );
    }
}
