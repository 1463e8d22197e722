//! Who a request comes from, once its credentials were checked.

use std::sync::Arc;

use crate::apitoken::ApiToken;
use crate::jwt::{Claims, PrincipalKind};

#[derive(Clone, Debug)]
pub enum Identity {
    /// No credentials (or, on an open registry, credentials not checked).
    Anonymous,
    /// An htpasswd user.
    User(String),
    /// A client certificate's subject (mTLS).
    Certificate(String),
    /// An API token (robot account).
    ApiToken(Arc<ApiToken>),
    /// A peer region, by its credential.
    Peer(String),
    /// A token issued by this region's token service.
    Bearer(Arc<Claims>),
    /// A token issued by the configured external token server.
    External(Arc<Claims>),
}

impl Identity {
    /// The name the policy knows, for users and certificates; and for the
    /// users and certificates a Berth token was issued to.
    pub fn policy_user(&self) -> Option<&str> {
        match self {
            Identity::User(u) | Identity::Certificate(u) => Some(u),
            Identity::Bearer(c) => match c.berth.as_ref().map(|b| b.kind) {
                Some(PrincipalKind::User | PrincipalKind::Certificate) => Some(&c.sub),
                _ => None,
            },
            _ => None,
        }
    }

    pub fn is_anonymous(&self) -> bool {
        match self {
            Identity::Anonymous => true,
            Identity::Bearer(c) => {
                c.berth.as_ref().map(|b| b.kind) == Some(PrincipalKind::Anonymous)
            }
            _ => false,
        }
    }

    /// How the identity appears in logs and the audit trail.
    pub fn display(&self) -> String {
        match self {
            Identity::Anonymous => "anonymous".into(),
            Identity::User(u) => format!("user:{u}"),
            Identity::Certificate(s) => format!("cert:{s}"),
            Identity::ApiToken(t) => format!("token:{}", t.name()),
            Identity::Peer(p) => format!("peer:{p}"),
            Identity::Bearer(c) => match c.berth.as_ref().map(|b| b.kind) {
                Some(PrincipalKind::Token) => format!("token:{}", c.sub),
                Some(PrincipalKind::Certificate) => format!("cert:{}", c.sub),
                Some(PrincipalKind::Anonymous) | None if c.sub.is_empty() => "anonymous".into(),
                _ => format!("user:{}", c.sub),
            },
            Identity::External(c) => format!("external:{}", c.sub),
        }
    }
}
