//! The access policy: `[[access]]` rules granting actions on repository
//! globs to users and groups. Everything not granted is denied.
//!
//! Two user names are special: `anonymous` stands for everyone, signed in or
//! not (public repositories), and `*` for every authenticated caller.
//! Region-wide operations (replication, API tokens, the cache's listing)
//! need `admin` granted by a rule whose repositories include `**`.

use std::collections::{HashMap, HashSet};

use serde::Deserialize;

use crate::action::{Action, Actions};
use crate::glob::Glob;

pub const ANONYMOUS: &str = "anonymous";
pub const ANY_USER: &str = "*";

/// An `[[access]]` table as written in the configuration file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessRule {
    pub repositories: Vec<String>,
    #[serde(default)]
    pub users: Vec<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    pub actions: Vec<String>,
}

#[derive(Debug)]
struct Rule {
    repositories: Vec<Glob>,
    everywhere: bool,
    users: HashSet<String>,
    groups: HashSet<String>,
    actions: Actions,
}

/// Who a policy question is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subject<'a> {
    Anonymous,
    /// An authenticated user name (htpasswd, a certificate's subject, a
    /// token's `sub`).
    User(&'a str),
}

#[derive(Debug, Default)]
pub struct Policy {
    rules: Vec<Rule>,
    /// user -> the groups it belongs to.
    member_of: HashMap<String, HashSet<String>>,
}

#[derive(Debug, thiserror::Error)]
#[error("access rule {index}: {message}")]
pub struct PolicyError {
    pub index: usize,
    pub message: String,
}

impl Policy {
    /// Validates the rules and the group table (group name -> members).
    pub fn new(
        rules: &[AccessRule],
        groups: &HashMap<String, Vec<String>>,
    ) -> Result<Policy, PolicyError> {
        let mut compiled = Vec::with_capacity(rules.len());
        for (i, rule) in rules.iter().enumerate() {
            let index = i + 1;
            let fail = |message: String| PolicyError { index, message };
            if rule.repositories.is_empty() {
                return Err(fail("names no repositories".into()));
            }
            if rule.users.is_empty() && rule.groups.is_empty() {
                return Err(fail("names no users and no groups".into()));
            }
            let repositories = rule
                .repositories
                .iter()
                .map(|p| Glob::parse(p))
                .collect::<Result<Vec<_>, _>>()
                .map_err(fail)?;
            let mut actions = Actions::NONE;
            for a in &rule.actions {
                actions = actions.with(Action::parse(a).ok_or_else(|| {
                    fail(format!(
                        "unknown action {a:?}: expected pull, push, delete or admin"
                    ))
                })?);
            }
            if actions.is_empty() {
                return Err(fail("grants no actions".into()));
            }
            for g in &rule.groups {
                if !groups.contains_key(g) {
                    return Err(fail(format!("group {g:?} is not defined under [groups]")));
                }
            }
            compiled.push(Rule {
                everywhere: repositories.iter().any(Glob::is_everything),
                repositories,
                users: rule.users.iter().cloned().collect(),
                groups: rule.groups.iter().cloned().collect(),
                actions,
            });
        }
        let mut member_of: HashMap<String, HashSet<String>> = HashMap::new();
        for (group, members) in groups {
            for m in members {
                member_of
                    .entry(m.clone())
                    .or_default()
                    .insert(group.clone());
            }
        }
        Ok(Policy {
            rules: compiled,
            member_of,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    fn applies(&self, rule: &Rule, subject: Subject<'_>) -> bool {
        if rule.users.contains(ANONYMOUS) {
            return true;
        }
        let Subject::User(user) = subject else {
            return false;
        };
        rule.users.contains(ANY_USER)
            || rule.users.contains(user)
            || self
                .member_of
                .get(user)
                .is_some_and(|groups| groups.iter().any(|g| rule.groups.contains(g)))
    }

    /// Everything `subject` may do to repository `name`.
    pub fn granted(&self, subject: Subject<'_>, name: &str) -> Actions {
        self.rules
            .iter()
            .filter(|r| self.applies(r, subject))
            .filter(|r| r.repositories.iter().any(|g| g.matches(name)))
            .fold(Actions::NONE, |acc, r| acc.union(r.actions))
    }

    /// What `subject` may do region-wide: rules over `**` only.
    pub fn granted_everywhere(&self, subject: Subject<'_>) -> Actions {
        self.rules
            .iter()
            .filter(|r| r.everywhere && self.applies(r, subject))
            .fold(Actions::NONE, |acc, r| acc.union(r.actions))
    }

    /// Whether `subject` may pull anything at all (an anonymous catalog with
    /// nothing public asks the caller to sign in instead).
    pub fn grants_anything(&self, subject: Subject<'_>) -> bool {
        self.rules.iter().any(|r| self.applies(r, subject))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(repos: &[&str], users: &[&str], groups: &[&str], actions: &[&str]) -> AccessRule {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect();
        AccessRule {
            repositories: s(repos),
            users: s(users),
            groups: s(groups),
            actions: s(actions),
        }
    }

    fn policy() -> Policy {
        let groups = HashMap::from([("ci".to_string(), vec!["robot".to_string()])]);
        Policy::new(
            &[
                rule(&["public/**"], &["anonymous"], &[], &["pull"]),
                rule(&["team/*"], &["alice"], &[], &["pull", "push"]),
                rule(&["team/**"], &[], &["ci"], &["push"]),
                rule(&["**"], &["root"], &[], &["admin"]),
                rule(&["shared/**"], &["*"], &[], &["pull"]),
            ],
            &groups,
        )
        .unwrap()
    }

    #[test]
    fn grants_follow_users_groups_and_globs() {
        let p = policy();
        let alice = Subject::User("alice");
        assert!(p.granted(alice, "team/app").allows(Action::Push));
        assert!(!p.granted(alice, "team/a/b").allows(Action::Pull));
        assert!(!p.granted(alice, "team-evil/x").allows(Action::Pull));
        assert!(!p.granted(alice, "team/app").allows(Action::Delete));
        // Public repositories are everyone's.
        assert!(p.granted(alice, "public/x").allows(Action::Pull));
        assert!(
            p.granted(Subject::Anonymous, "public/x/y")
                .allows(Action::Pull)
        );
        assert!(
            !p.granted(Subject::Anonymous, "public/x")
                .allows(Action::Push)
        );
        assert!(
            !p.granted(Subject::Anonymous, "team/app")
                .allows(Action::Pull)
        );
        // Groups.
        let robot = Subject::User("robot");
        assert!(p.granted(robot, "team/a/b").allows(Action::Push));
        assert!(!p.granted(robot, "team/a/b").allows(Action::Pull));
        // Any authenticated user, not anonymous.
        assert!(p.granted(robot, "shared/x").allows(Action::Pull));
        assert!(
            !p.granted(Subject::Anonymous, "shared/x")
                .allows(Action::Pull)
        );
        // Admin everywhere, and only for rules over **.
        let root = Subject::User("root");
        assert!(p.granted(root, "any/thing").allows(Action::Delete));
        assert!(p.granted_everywhere(root).allows(Action::Admin));
        assert!(!p.granted_everywhere(alice).allows(Action::Admin));
        assert!(
            !p.granted(Subject::User("mallory"), "team/app")
                .allows(Action::Pull)
        );
        assert!(!Policy::default().grants_anything(Subject::Anonymous));
        assert!(p.grants_anything(Subject::Anonymous));
    }

    #[test]
    fn invalid_rules_are_refused() {
        let groups = HashMap::new();
        for bad in [
            rule(&[], &["a"], &[], &["pull"]),
            rule(&["x"], &[], &[], &["pull"]),
            rule(&["x"], &["a"], &[], &[]),
            rule(&["x"], &["a"], &[], &["write"]),
            rule(&["X/*"], &["a"], &[], &["pull"]),
            rule(&["x"], &[], &["nope"], &["pull"]),
        ] {
            assert!(Policy::new(&[bad], &groups).is_err());
        }
    }
}
