//! Who is calling and what they may do.
//!
//! Everything a client sends to prove who it is passes through this crate:
//! `Authorization` headers, htpasswd entries, the registry token protocol's
//! scopes and JWTs, API token secrets. The parsers are pure code with fuzz
//! targets, like `berth-oci`. The access policy decides what an identity
//! may do; the server asks it once per request, in front of every route.

pub mod action;
pub mod apitoken;
pub mod authenticator;
pub mod authorize;
pub mod glob;
pub mod header;
pub mod htpasswd;
pub mod identity;
pub mod issue;
pub mod jwt;
pub mod keys;
pub mod keystore;
pub mod policy;
pub mod scope;
pub mod throttle;

pub use action::{Action, Actions};
pub use apitoken::{ApiToken, ApiTokenError, ApiTokenRecord, ApiTokens, NewToken};
pub use authenticator::{
    AuthFailure, AuthRequest, AuthSettings, Authenticator, ExternalIssuer, PeerCredential, now_ms,
};
pub use authorize::{Decision, MetricsAccess, Requirement, challenge_scope};
pub use glob::Glob;
pub use header::{Credentials, HeaderError, parse_authorization};
pub use htpasswd::{Htpasswd, HtpasswdError};
pub use identity::Identity;
pub use issue::{IssueError, IssuedToken};
pub use jwt::{Access, Claims, JwtError, KeySet, PrincipalKind};
pub use keys::{KeyError, SigningKey, VerifyingKey};
pub use keystore::{KeyInfo, KeyStore, KeyStoreError};
pub use policy::{AccessRule, Policy, PolicyError, Subject};
pub use scope::{Scope, ScopeError, parse_scope, parse_scopes};

#[cfg(test)]
mod tests;
