//! What a caller may do to a repository: `pull`, `push`, `delete`, `admin`.
//! `admin` includes the other three (it is the repository owner's role).

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Pull,
    Push,
    Delete,
    Admin,
}

impl Action {
    pub const ALL: [Action; 4] = [Action::Pull, Action::Push, Action::Delete, Action::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Pull => "pull",
            Action::Push => "push",
            Action::Delete => "delete",
            Action::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Action> {
        match s {
            "pull" => Some(Action::Pull),
            "push" => Some(Action::Push),
            "delete" => Some(Action::Delete),
            "admin" => Some(Action::Admin),
            _ => None,
        }
    }

    fn bit(self) -> u8 {
        match self {
            Action::Pull => 1,
            Action::Push => 2,
            Action::Delete => 4,
            Action::Admin => 8,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of actions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Actions(u8);

impl Actions {
    pub const NONE: Actions = Actions(0);
    /// What the registry token protocol's `*` grants on a repository.
    pub const ALL_CONTENT: Actions = Actions(1 | 2 | 4);

    pub fn of(actions: &[Action]) -> Actions {
        actions.iter().fold(Actions::NONE, |acc, a| acc.with(*a))
    }

    pub fn with(self, action: Action) -> Actions {
        Actions(self.0 | action.bit())
    }

    pub fn union(self, other: Actions) -> Actions {
        Actions(self.0 | other.0)
    }

    pub fn intersect(self, other: Actions) -> Actions {
        Actions(self.0 & other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Whether `action` is in the set, `admin` counting for the others.
    pub fn allows(self, action: Action) -> bool {
        self.0 & action.bit() != 0 || (self.0 & Action::Admin.bit() != 0)
    }

    /// The set with `admin` expanded into what it includes.
    pub fn expanded(self) -> Actions {
        if self.0 & Action::Admin.bit() != 0 {
            Actions(1 | 2 | 4 | 8)
        } else {
            self
        }
    }

    pub fn iter(self) -> impl Iterator<Item = Action> {
        Action::ALL
            .into_iter()
            .filter(move |a| self.0 & a.bit() != 0)
    }

    /// Parses `pull,push` (spaces allowed; empty items ignored). Unknown
    /// actions are an error naming them.
    pub fn parse_list(s: &str) -> Result<Actions, String> {
        let mut out = Actions::NONE;
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            out = out.with(Action::parse(item).ok_or_else(|| {
                format!("unknown action {item:?}: expected pull, push, delete or admin")
            })?);
        }
        Ok(out)
    }

    pub fn names(self) -> Vec<&'static str> {
        self.iter().map(Action::as_str).collect()
    }
}

impl fmt::Display for Actions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.names().join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_includes_the_others() {
        let admin = Actions::of(&[Action::Admin]);
        for a in Action::ALL {
            assert!(admin.allows(a));
        }
        let pull = Actions::of(&[Action::Pull]);
        assert!(pull.allows(Action::Pull));
        assert!(!pull.allows(Action::Push));
        assert!(!pull.allows(Action::Admin));
        assert_eq!(
            admin.expanded().names(),
            ["pull", "push", "delete", "admin"]
        );
    }

    #[test]
    fn lists_parse() {
        assert_eq!(
            Actions::parse_list("pull, push").unwrap(),
            Actions::of(&[Action::Pull, Action::Push])
        );
        assert_eq!(Actions::parse_list("").unwrap(), Actions::NONE);
        assert!(Actions::parse_list("pull,write").is_err());
        assert_eq!(
            Actions::of(&[Action::Push, Action::Pull]).to_string(),
            "pull,push"
        );
    }
}
