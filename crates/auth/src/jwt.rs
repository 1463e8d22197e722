//! The registry token protocol's JWTs: the claim set (`access` lists what
//! the bearer may do), signing with Berth's key, and verification against a
//! set of keys by key id.

use std::collections::HashMap;

use jsonwebtoken::{Algorithm, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::action::{Action, Actions};
use crate::keys::{SigningKey, VerifyingKey};

/// Longest token accepted.
pub const MAX_TOKEN: usize = 8 * 1024;
/// Entries accepted in a token's `access` claim.
pub const MAX_ACCESS: usize = 256;
/// Clock skew tolerated between the issuer and this node, in seconds.
pub const LEEWAY_SECS: u64 = 30;

/// One entry of the `access` claim.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    #[serde(default)]
    pub actions: Vec<String>,
}

impl Access {
    pub fn repository(name: &str, actions: Actions) -> Access {
        Access {
            kind: "repository".into(),
            name: name.to_string(),
            actions: actions.names().into_iter().map(str::to_string).collect(),
        }
    }
}

/// What kind of principal a Berth token was issued to, so that a node can
/// tell whether it still exists (a revoked API token, a removed user).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrincipalKind {
    Anonymous,
    User,
    Certificate,
    Token,
}

/// Berth's private claims.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BerthClaims {
    pub kind: PrincipalKind,
    /// The API token's id, when `kind` is `token`: a token made again under
    /// the same name does not revive the old one's JWTs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tid: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    #[serde(default)]
    pub sub: String,
    /// A string or an array of strings; checked by the verifier.
    #[serde(default)]
    pub aud: serde_json::Value,
    pub exp: u64,
    #[serde(default)]
    pub nbf: u64,
    #[serde(default)]
    pub iat: u64,
    #[serde(default)]
    pub jti: String,
    #[serde(default)]
    pub access: Vec<Access>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub berth: Option<BerthClaims>,
    /// The repository entries of `access`, parsed once when the token is
    /// verified (a token is checked on every request it carries).
    #[serde(skip)]
    pub grants: Vec<(String, Actions)>,
}

/// The actions of one `access` entry (`*` being every content action).
fn entry_actions(actions: &[String]) -> Actions {
    actions
        .iter()
        .fold(Actions::NONE, |acc, action| match action.as_str() {
            "*" => acc.union(Actions::ALL_CONTENT),
            a => match Action::parse(a) {
                Some(Action::Admin) | None => acc,
                Some(action) => acc.with(action),
            },
        })
}

impl Claims {
    /// Parses the repository entries into [`Claims::grants`].
    pub fn index_grants(&mut self) {
        let mut grants: Vec<(String, Actions)> = Vec::new();
        for a in self.access.iter().filter(|a| a.kind == "repository") {
            let actions = entry_actions(&a.actions);
            match grants.iter_mut().find(|(n, _)| *n == a.name) {
                Some((_, acc)) => *acc = acc.union(actions),
                None => grants.push((a.name.clone(), actions)),
            }
        }
        self.grants = grants;
    }

    /// What the token grants on repository `name`: exactly its `access`
    /// entries.
    pub fn granted(&self, name: &str) -> Actions {
        if !self.grants.is_empty() || self.access.is_empty() {
            return self
                .grants
                .iter()
                .find(|(n, _)| n == name)
                .map_or(Actions::NONE, |(_, a)| *a);
        }
        self.access
            .iter()
            .filter(|a| a.kind == "repository" && a.name == name)
            .fold(Actions::NONE, |acc, a| acc.union(entry_actions(&a.actions)))
    }

    /// Whether the token lists the catalog.
    pub fn grants_catalog(&self) -> bool {
        self.access
            .iter()
            .any(|a| a.kind == "registry" && a.name == "catalog")
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("malformed token")]
    Malformed,
    #[error("token too large")]
    TooLarge,
    #[error("token signed by an unknown key")]
    UnknownKey,
    #[error("invalid token signature")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet")]
    NotYetValid,
    #[error("token issued for another service or by another issuer")]
    WrongAudience,
    #[error("token was revoked, or its user removed")]
    Revoked,
    #[error("token has too many access entries")]
    TooManyAccess,
    #[error("cannot sign the token: {0}")]
    Sign(String),
}

/// Signs `claims` with `key` (ES256, with the key's id in the header).
pub fn sign(key: &SigningKey, claims: &Claims) -> Result<String, JwtError> {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(key.kid().to_string());
    header.typ = Some("JWT".into());
    jsonwebtoken::encode(&header, claims, key.encoding()).map_err(|e| JwtError::Sign(e.to_string()))
}

/// The keys one issuer signs with, by key id.
#[derive(Clone, Debug, Default)]
pub struct KeySet {
    by_kid: HashMap<String, VerifyingKey>,
    /// Keys without an id (an external issuer's PEM file): tried in turn.
    anonymous: Vec<VerifyingKey>,
}

impl KeySet {
    pub fn new(keys: impl IntoIterator<Item = VerifyingKey>) -> KeySet {
        let mut set = KeySet::default();
        for key in keys {
            match key.kid.clone() {
                Some(kid) => {
                    set.by_kid.insert(kid, key);
                }
                None => set.anonymous.push(key),
            }
        }
        set
    }

    pub fn is_empty(&self) -> bool {
        self.by_kid.is_empty() && self.anonymous.is_empty()
    }

    pub fn contains(&self, kid: &str) -> bool {
        self.by_kid.contains_key(kid)
    }

    /// The keys that may have signed a token with this header.
    fn candidates(&self, kid: Option<&str>) -> Vec<&VerifyingKey> {
        match kid.and_then(|k| self.by_kid.get(k)) {
            Some(key) => vec![key],
            // Issuers that name keys their own way (libtrust ids, x5c):
            // an anonymous key, or any key when the token names none.
            None if kid.is_none() => self.by_kid.values().chain(&self.anonymous).collect(),
            None => self.anonymous.iter().collect(),
        }
    }
}

/// The `kid` of a token's header, without verifying anything.
pub fn key_id(token: &str) -> Result<Option<String>, JwtError> {
    if token.len() > MAX_TOKEN {
        return Err(JwtError::TooLarge);
    }
    jsonwebtoken::decode_header(token)
        .map(|h| h.kid)
        .map_err(|_| JwtError::Malformed)
}

/// Verifies a token: signature by a key of `keys`, issuer, audience, and
/// the validity window (with [`LEEWAY_SECS`] of skew).
pub fn verify(
    token: &str,
    keys: &KeySet,
    issuer: &str,
    audience: &str,
) -> Result<Claims, JwtError> {
    let kid = key_id(token)?;
    let candidates = keys.candidates(kid.as_deref());
    if candidates.is_empty() {
        return Err(JwtError::UnknownKey);
    }
    let mut last = JwtError::UnknownKey;
    for key in candidates {
        let mut validation = Validation::new(key.algorithms[0]);
        validation.algorithms = key.algorithms.clone();
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_audience(&[audience]);
        validation.set_issuer(&[issuer]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        match jsonwebtoken::decode::<Claims>(token, &key.key, &validation) {
            Ok(mut data) => {
                if data.claims.access.len() > MAX_ACCESS {
                    return Err(JwtError::TooManyAccess);
                }
                data.claims.index_grants();
                return Ok(data.claims);
            }
            Err(e) => {
                use jsonwebtoken::errors::ErrorKind as K;
                last = match e.kind() {
                    K::InvalidSignature | K::InvalidAlgorithm => JwtError::BadSignature,
                    K::ExpiredSignature => return Err(JwtError::Expired),
                    K::ImmatureSignature => return Err(JwtError::NotYetValid),
                    K::InvalidIssuer | K::InvalidAudience | K::MissingRequiredClaim(_) => {
                        return Err(JwtError::WrongAudience);
                    }
                    _ => JwtError::Malformed,
                };
            }
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn claims(exp: u64) -> Claims {
        Claims {
            iss: "berth".into(),
            sub: "alice".into(),
            aud: "registry".into(),
            exp,
            nbf: now() - 1,
            iat: now(),
            jti: "1".into(),
            access: vec![Access::repository(
                "team/app",
                Actions::of(&[Action::Pull, Action::Push]),
            )],
            berth: Some(BerthClaims {
                kind: PrincipalKind::User,
                tid: None,
            }),
            grants: Vec::new(),
        }
    }

    #[test]
    fn signed_tokens_verify_and_grant_their_access() {
        let key = SigningKey::generate().unwrap();
        let set = KeySet::new([key.verifying()]);
        let token = sign(&key, &claims(now() + 300)).unwrap();
        assert_eq!(key_id(&token).unwrap().as_deref(), Some(key.kid()));
        let got = verify(&token, &set, "berth", "registry").unwrap();
        assert!(got.granted("team/app").allows(Action::Push));
        assert!(!got.granted("team/app").allows(Action::Delete));
        assert!(got.granted("team/other").is_empty());
        assert_eq!(
            verify(&token, &set, "berth", "elsewhere"),
            Err(JwtError::WrongAudience)
        );
        assert_eq!(
            verify(&token, &set, "mallory", "registry"),
            Err(JwtError::WrongAudience)
        );
    }

    #[test]
    fn expired_foreign_and_tampered_tokens_are_refused() {
        let key = SigningKey::generate().unwrap();
        let other = SigningKey::generate().unwrap();
        let set = KeySet::new([key.verifying()]);
        let expired = sign(&key, &claims(now() - LEEWAY_SECS - 10)).unwrap();
        assert_eq!(
            verify(&expired, &set, "berth", "registry"),
            Err(JwtError::Expired)
        );
        let foreign = sign(&other, &claims(now() + 300)).unwrap();
        assert_eq!(
            verify(&foreign, &set, "berth", "registry"),
            Err(JwtError::UnknownKey)
        );
        // The other key under this key's id: the signature does not match.
        let forged = {
            let mut header = Header::new(Algorithm::ES256);
            header.kid = Some(key.kid().to_string());
            jsonwebtoken::encode(&header, &claims(now() + 300), other.encoding()).unwrap()
        };
        assert_eq!(
            verify(&forged, &set, "berth", "registry"),
            Err(JwtError::BadSignature)
        );
        // An HMAC token made with the public key as its secret.
        let hs = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims(now() + 300),
            &jsonwebtoken::EncodingKey::from_secret(b"secret").unwrap(),
        )
        .unwrap();
        assert!(verify(&hs, &set, "berth", "registry").is_err());
        for junk in ["", "a.b.c", "not a token", "eyJhbGciOiJub25lIn0.e30."] {
            assert!(verify(junk, &set, "berth", "registry").is_err(), "{junk}");
        }
    }

    #[test]
    fn pem_keys_round_trip() {
        let key = SigningKey::generate().unwrap();
        let encoded = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, key.pkcs8())
        );
        let keys = SigningKey::from_pem(encoded.as_bytes()).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].kid(), key.kid());
        assert!(SigningKey::from_pem(b"nothing").is_err());
    }
}
