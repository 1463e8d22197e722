//! The token service: a token for an authenticated identity carrying, of
//! the scopes it asked for, only what the policy grants.

use crate::action::{Action, Actions};
use crate::authenticator::{Authenticator, now_ms};
use crate::identity::Identity;
use crate::jwt::{self, Access, BerthClaims, Claims, JwtError};
use crate::scope::Scope;

/// A token as the token endpoint answers it.
pub struct IssuedToken {
    pub token: String,
    pub expires_in: u64,
    pub issued_at_ms: u64,
    /// What it grants, for the audit trail and the OAuth2 `scope` field.
    pub access: Vec<Access>,
}

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("this identity cannot be given a token")]
    NotIssuable,
    #[error("the token service has no signing key")]
    NoKey,
    #[error(transparent)]
    Jwt(#[from] JwtError),
}

impl Authenticator {
    /// Issues a token for `identity` with the granted part of `scopes`.
    /// Scopes for one repository are merged (clients ask for `pull` and
    /// `pull,push` of the same repository in one request).
    pub fn issue(&self, identity: &Identity, scopes: &[Scope]) -> Result<IssuedToken, IssueError> {
        let (sub, kind, tid) = self
            .subject_claims(identity)
            .ok_or(IssueError::NotIssuable)?;
        let key = self.signing_key().ok_or(IssueError::NoKey)?;
        let mut granted: Vec<(String, Actions)> = Vec::new();
        let mut catalog = false;
        for scope in scopes {
            match scope {
                Scope::Repository { name, actions } => {
                    let allowed = self
                        .granted(identity, name.as_str())
                        .expanded()
                        .intersect(*actions);
                    match granted.iter_mut().find(|(n, _)| n == name.as_str()) {
                        Some((_, a)) => *a = a.union(allowed),
                        None => granted.push((name.to_string(), allowed)),
                    }
                }
                Scope::Catalog => catalog = true,
            }
        }
        // Admin is never carried by a token: only content actions.
        let content = Actions::of(&[Action::Pull, Action::Push, Action::Delete]);
        let mut access: Vec<Access> = granted
            .into_iter()
            .map(|(name, actions)| Access::repository(&name, actions.intersect(content)))
            .collect();
        if catalog {
            access.push(Access {
                kind: "registry".into(),
                name: "catalog".into(),
                actions: vec!["*".into()],
            });
        }
        let (issuer, service, ttl) = self.claims_template();
        let issued_at_ms = now_ms();
        let now = issued_at_ms / 1000;
        let claims = Claims {
            iss: issuer.to_string(),
            sub,
            aud: serde_json::Value::String(service.to_string()),
            exp: now + ttl.as_secs(),
            nbf: now,
            iat: now,
            jti: hex::encode(rand::random::<[u8; 16]>()),
            access: access.clone(),
            berth: Some(BerthClaims { kind, tid }),
            grants: Vec::new(),
        };
        Ok(IssuedToken {
            token: jwt::sign(&key, &claims)?,
            expires_in: ttl.as_secs(),
            issued_at_ms,
            access,
        })
    }
}
