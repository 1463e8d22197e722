//! The one authorization decision a request gets: what its route needs
//! ([`Requirement`]) against what its identity is granted, answered as
//! allow, challenge (sign in, or fetch a token with more scope) or deny.

use crate::action::{Action, Actions};
use crate::authenticator::Authenticator;
use crate::identity::Identity;
use crate::jwt::PrincipalKind;
use crate::policy::Subject;

/// What a route needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requirement {
    /// Open to everyone (health probes, the token endpoint itself).
    Nothing,
    /// Any authenticated caller (`/v2/`, so that `docker login` works).
    SignedIn,
    /// Actions on repositories (a mount needs push here and pull there).
    Repositories(Vec<(String, Action)>),
    /// The catalog: everyone sees what they may pull.
    Catalog,
    /// Region-wide administration (replication, API tokens, the cache).
    Admin,
    /// Administration of one repository.
    RepositoryAdmin(String),
    /// A peer region's change feed.
    Feed,
    /// Changing how the region serves (pause a peer, serving off). On an
    /// open registry this needs a peer credential (the replication secret).
    RegionControl,
    /// `/metrics`.
    Metrics(MetricsAccess),
}

/// Who may read `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MetricsAccess {
    /// Everyone (metrics hold no repository names and no secrets).
    Public,
    /// Any authenticated caller (a Prometheus with an API token).
    #[default]
    SignedIn,
    /// Region administrators.
    Admin,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// 401: sign in, or get a token carrying `scope`. `insufficient` when
    /// the caller holds a token that lacks the scope.
    Challenge {
        scope: Option<String>,
        insufficient: bool,
    },
    /// 403: the caller is known and not allowed.
    Deny,
}

impl Authenticator {
    /// What `identity` may do to repository `name`, public grants included.
    pub fn granted(&self, identity: &Identity, name: &str) -> Actions {
        if !self.enabled() {
            return Actions::of(&Action::ALL);
        }
        let policy = self.policy();
        let public = policy.granted(Subject::Anonymous, name);
        let own = match identity {
            Identity::Anonymous => Actions::NONE,
            Identity::User(u) | Identity::Certificate(u) => policy.granted(Subject::User(u), name),
            Identity::ApiToken(t) => t.granted(name),
            Identity::Peer(_) => Actions::of(&[Action::Pull]),
            // A token grants exactly its claims.
            Identity::Bearer(c) | Identity::External(c) => c.granted(name),
        };
        own.union(public)
    }

    /// What a fresh token for this identity's subject would carry: decides
    /// between "fetch another token" (401) and "not allowed" (403).
    fn obtainable(&self, identity: &Identity, name: &str) -> Actions {
        match identity {
            Identity::Bearer(c) => {
                let public = self.policy().granted(Subject::Anonymous, name);
                let own = match c.berth.as_ref().map(|b| b.kind) {
                    Some(PrincipalKind::User | PrincipalKind::Certificate) => {
                        self.policy().granted(Subject::User(&c.sub), name)
                    }
                    Some(PrincipalKind::Token) => self
                        .api_tokens()
                        .and_then(|t| t.by_name(&c.sub))
                        .map_or(Actions::NONE, |t| t.granted(name)),
                    _ => Actions::NONE,
                };
                own.union(public)
            }
            // Only the external server knows.
            Identity::External(_) => Actions::of(&Action::ALL),
            other => self.granted(other, name),
        }
    }

    /// Region-wide grants (rules and API tokens over `**`). A registry
    /// token never carries them: a token handed out for one pull must not
    /// administer the region, so administration needs the credentials
    /// themselves (a password, an API token, a certificate).
    pub fn granted_everywhere(&self, identity: &Identity) -> Actions {
        if !self.enabled() {
            return Actions::of(&Action::ALL);
        }
        match identity {
            Identity::ApiToken(t) => t.granted_everywhere(),
            Identity::User(u) | Identity::Certificate(u) => {
                self.policy().granted_everywhere(Subject::User(u))
            }
            Identity::Peer(_)
            | Identity::External(_)
            | Identity::Bearer(_)
            | Identity::Anonymous => Actions::NONE,
        }
    }

    /// Whether the catalog may list repository `name` for this caller. A
    /// Berth token carrying `registry:catalog:*` lists what its subject may
    /// pull (the token names no repositories for a listing).
    pub fn may_list(&self, identity: &Identity, name: &str) -> bool {
        match identity {
            Identity::Bearer(c) if c.grants_catalog() => {
                self.obtainable(identity, name).allows(Action::Pull)
            }
            _ => self.granted(identity, name).allows(Action::Pull),
        }
    }

    pub fn authorize(&self, identity: &Identity, requirement: &Requirement) -> Decision {
        let signed_in = !identity.is_anonymous();
        let sign_in = || Decision::Challenge {
            scope: None,
            insufficient: false,
        };
        let admin_or = |ok: bool| {
            if ok {
                Decision::Allow
            } else if signed_in {
                Decision::Deny
            } else {
                sign_in()
            }
        };
        match requirement {
            Requirement::Nothing => Decision::Allow,
            Requirement::SignedIn => {
                if !self.enabled() || signed_in {
                    Decision::Allow
                } else {
                    sign_in()
                }
            }
            Requirement::Metrics(access) => match access {
                _ if !self.enabled() => Decision::Allow,
                MetricsAccess::Public => Decision::Allow,
                MetricsAccess::SignedIn => admin_or(signed_in),
                MetricsAccess::Admin => {
                    admin_or(self.granted_everywhere(identity).allows(Action::Admin))
                }
            },
            Requirement::Catalog => {
                if !self.enabled() || signed_in || self.policy().grants_anything(Subject::Anonymous)
                {
                    Decision::Allow
                } else {
                    sign_in()
                }
            }
            Requirement::Admin => admin_or(self.granted_everywhere(identity).allows(Action::Admin)),
            Requirement::RepositoryAdmin(name) => {
                let granted = self
                    .granted(identity, name)
                    .union(self.granted_everywhere(identity));
                admin_or(granted.allows(Action::Admin))
            }
            Requirement::Feed => match identity {
                Identity::Peer(_) => Decision::Allow,
                _ if self.enabled() && self.granted_everywhere(identity).allows(Action::Admin) => {
                    Decision::Allow
                }
                _ if !signed_in || !self.enabled() => sign_in(),
                _ => Decision::Deny,
            },
            Requirement::RegionControl => {
                if self.enabled() {
                    admin_or(self.granted_everywhere(identity).allows(Action::Admin))
                } else if matches!(identity, Identity::Peer(_)) {
                    Decision::Allow
                } else {
                    sign_in()
                }
            }
            Requirement::Repositories(needs) => {
                let missing: Vec<&(String, Action)> = needs
                    .iter()
                    .filter(|(name, action)| !self.granted(identity, name).allows(*action))
                    .collect();
                if missing.is_empty() {
                    return Decision::Allow;
                }
                let scope = Some(challenge_scope(needs));
                match identity {
                    Identity::Anonymous => Decision::Challenge {
                        scope,
                        insufficient: false,
                    },
                    // A token short of scope: worth another token only if
                    // its subject could get one that has it.
                    Identity::Bearer(_) | Identity::External(_) => {
                        let obtainable = missing
                            .iter()
                            .all(|(name, action)| self.obtainable(identity, name).allows(*action));
                        if obtainable {
                            Decision::Challenge {
                                scope,
                                insufficient: true,
                            }
                        } else if identity.is_anonymous() {
                            Decision::Challenge {
                                scope,
                                insufficient: false,
                            }
                        } else {
                            Decision::Deny
                        }
                    }
                    _ => Decision::Deny,
                }
            }
        }
    }
}

/// `repository:a:pull,push repository:b:pull` for what a request needs,
/// one entry per repository (clients merge by resource).
pub fn challenge_scope(needs: &[(String, Action)]) -> String {
    let mut merged: Vec<(&str, Actions)> = Vec::new();
    for (name, action) in needs {
        match merged.iter_mut().find(|(n, _)| n == name) {
            Some((_, actions)) => *actions = actions.with(*action),
            None => merged.push((name, Actions::of(&[*action]))),
        }
    }
    merged
        .iter()
        .map(|(name, actions)| {
            // Pushers also pull (to check what exists).
            let actions = if actions.allows(Action::Push) {
                actions.with(Action::Pull)
            } else {
                *actions
            };
            crate::scope::repository_scope(name, actions)
        })
        .collect::<Vec<_>>()
        .join(" ")
}
