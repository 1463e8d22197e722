//! Who is calling and what they may do.
//!
//! Everything a client sends to prove who it is passes through this crate:
//! `Authorization` headers, htpasswd entries, the registry token protocol's
//! scopes and JWTs, API token secrets. The parsers are pure code with fuzz
//! targets, like `berth-oci`. The access policy decides what an identity
//! may do; the server asks it once per request, in front of every route.

pub mod action;
#[cfg(feature = "service")]
pub mod apitoken;
#[cfg(feature = "service")]
pub mod authenticator;
#[cfg(feature = "service")]
pub mod authorize;
pub mod browser;
pub mod glob;
pub mod header;
pub mod htpasswd;
#[cfg(feature = "service")]
pub mod identity;
#[cfg(feature = "service")]
pub mod issue;
pub mod jwt;
pub mod keys;
#[cfg(feature = "service")]
pub mod keystore;
pub mod policy;
pub mod scope;
pub mod throttle;
#[cfg(feature = "service")]
pub mod turns;

pub use action::{Action, Actions};
#[cfg(feature = "service")]
pub use apitoken::{ApiToken, ApiTokenError, ApiTokenRecord, ApiTokens, NewToken};
#[cfg(feature = "service")]
pub use authenticator::{
    AuthFailure, AuthRequest, AuthSettings, Authenticator, ExternalIssuer, PeerCredential, now_ms,
};
#[cfg(feature = "service")]
pub use authorize::{Decision, MetricsAccess, Requirement, challenge_scope};
pub use glob::Glob;
pub use header::{Credentials, HeaderError, parse_authorization};
pub use htpasswd::{Htpasswd, HtpasswdError};
#[cfg(feature = "service")]
pub use identity::Identity;
#[cfg(feature = "service")]
pub use issue::{IssueError, IssuedToken};
pub use jwt::{Access, Claims, JwtError, KeySet, PrincipalKind};
pub use keys::{KeyError, SigningKey, VerifyingKey};
#[cfg(feature = "service")]
pub use keystore::{KeyInfo, KeyStore, KeyStoreError};
pub use policy::{AccessRule, Policy, PolicyError, Subject};
pub use scope::{Scope, ScopeError, parse_scope, parse_scopes};

#[cfg(all(test, feature = "service"))]
mod tests;
