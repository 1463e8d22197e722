//! htpasswd files with bcrypt entries (`htpasswd -B`): `user:$2y$...`.
//! Any other hash format (MD5 `$apr1$`, `{SHA}`, crypt, plain text) is
//! refused with the line that holds it: those hashes are too fast to guess.

use std::collections::HashMap;

/// Largest htpasswd file read.
pub const MAX_FILE: usize = 16 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HtpasswdError {
    #[error("line {line}: expected USER:HASH")]
    Malformed { line: usize },
    #[error(
        "line {line}: user {user:?}: the user name must be 1-256 characters without ':' or control characters"
    )]
    BadUser { line: usize, user: String },
    #[error(
        "line {line}: user {user:?}: not a bcrypt hash ($2y$, $2a$ or $2b$); create entries with `htpasswd -B`"
    )]
    NotBcrypt { line: usize, user: String },
    #[error("line {line}: user {user:?} appears twice (first on line {first})")]
    Duplicate {
        line: usize,
        first: usize,
        user: String,
    },
    #[error("the file is larger than {MAX_FILE} bytes")]
    TooLarge,
}

/// The users of one htpasswd file.
#[derive(Default)]
pub struct Htpasswd {
    users: HashMap<String, String>,
    /// The most common bcrypt cost in the file.
    cost: u32,
    /// A hash of that cost that no password matches, made on first use: an
    /// unknown user costs as much time as a known one.
    dummy: std::sync::OnceLock<String>,
}

impl std::fmt::Debug for Htpasswd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Htpasswd({} users)", self.users.len())
    }
}

/// `$2y$NN$` + 53 characters of bcrypt's base64 alphabet.
fn is_bcrypt(hash: &str) -> bool {
    let b = hash.as_bytes();
    let prefix_ok = b.len() == 60
        && b[0] == b'$'
        && b[1] == b'2'
        && matches!(b[2], b'y' | b'a' | b'b')
        && b[3] == b'$'
        && b[6] == b'$';
    if !prefix_ok {
        return false;
    }
    let cost = std::str::from_utf8(&b[4..6])
        .ok()
        .and_then(|c| c.parse::<u32>().ok());
    matches!(cost, Some(4..=31))
        && b[7..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'.' || *c == b'/')
}

impl Htpasswd {
    pub fn parse(text: &str) -> Result<Htpasswd, HtpasswdError> {
        if text.len() > MAX_FILE {
            return Err(HtpasswdError::TooLarge);
        }
        let mut users = HashMap::new();
        let mut first_line = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let entry = raw.trim_end_matches('\r');
            if entry.trim().is_empty() || entry.trim_start().starts_with('#') {
                continue;
            }
            let (user, hash) = entry
                .split_once(':')
                .ok_or(HtpasswdError::Malformed { line })?;
            let shown: String = user.chars().take(64).collect();
            if user.is_empty() || user.len() > 256 || user.chars().any(char::is_control) {
                return Err(HtpasswdError::BadUser { line, user: shown });
            }
            // Apache's tools may append ":comment" fields; the hash is the
            // second field.
            let hash = hash.split(':').next().unwrap_or_default().trim();
            if !is_bcrypt(hash) {
                return Err(HtpasswdError::NotBcrypt { line, user: shown });
            }
            if let Some(first) = first_line.insert(user.to_string(), line) {
                return Err(HtpasswdError::Duplicate {
                    line,
                    first,
                    user: shown,
                });
            }
            users.insert(user.to_string(), hash.to_string());
        }
        // The most common cost: unknown users then take as long as most
        // known ones.
        let mut counts: HashMap<u32, usize> = HashMap::new();
        for cost in users
            .values()
            .filter_map(|h| h.get(4..6)?.parse::<u32>().ok())
        {
            *counts.entry(cost).or_default() += 1;
        }
        let cost = counts
            .into_iter()
            .max_by_key(|(cost, n)| (*n, std::cmp::Reverse(*cost)))
            .map_or(bcrypt::DEFAULT_COST, |(cost, _)| cost);
        Ok(Htpasswd {
            users,
            cost,
            dummy: std::sync::OnceLock::new(),
        })
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    pub fn contains(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    /// A digest of the user's entry: changes when the password does (a
    /// new bcrypt salt), so a session can end with the password it was
    /// opened with.
    pub fn fingerprint(&self, user: &str) -> Option<String> {
        use sha2::Digest as _;
        let hash = self.users.get(user)?;
        let mut h = sha2::Sha256::new();
        h.update(b"berth-htpasswd-entry\0");
        h.update(user.as_bytes());
        h.update(b"\0");
        h.update(hash.as_bytes());
        Some(hex::encode(&h.finalize()[..16]))
    }

    /// Checks a password. Slow on purpose (bcrypt): call it off the async
    /// runtime. An unknown user costs the same time as a known one, so
    /// timing does not tell which users exist.
    pub fn verify(&self, user: &str, password: &str) -> bool {
        match self.users.get(user) {
            Some(hash) => bcrypt::verify(password, hash).unwrap_or(false),
            None => {
                let dummy = self.dummy.get_or_init(|| {
                    bcrypt::hash(rand::random::<[u8; 16]>(), self.cost)
                        .unwrap_or_else(|_| DUMMY_HASH.to_string())
                });
                let _ = bcrypt::verify(password, dummy);
                false
            }
        }
    }
}

/// A valid bcrypt hash (cost 10) of a random string nobody knows (used if
/// a dummy of the file's cost cannot be made).
const DUMMY_HASH: &str = "$2y$10$ajQdUWhEbwhu99cqZfcFLuaH.52oLi5zHzrbqBGp.RsvfmjGhxwQi";

#[cfg(test)]
mod tests {
    use super::*;

    // `htpasswd -nbB -C 4 alice wonderland`
    const ALICE: &str = "alice:$2y$04$SzXCZYtB4okVntpyoPDqqemm6h6bp5SUY4BrMD4t6tzp0JwEbGY2y";

    #[test]
    fn bcrypt_entries_verify() {
        let file = Htpasswd::parse(&format!("# users\n\n{ALICE}\n")).unwrap();
        assert_eq!(file.len(), 1);
        assert!(file.verify("alice", "wonderland"));
        assert!(!file.verify("alice", "Wonderland"));
        assert!(!file.verify("bob", "wonderland"));
    }

    #[test]
    fn other_hashes_are_refused_naming_the_line() {
        let md5 = "bob:$apr1$x5cBs1xY$3bV3dG2Fo3gQ1rY2iQ0Zv1";
        let err = Htpasswd::parse(&format!("{ALICE}\n{md5}\n")).unwrap_err();
        assert_eq!(
            err,
            HtpasswdError::NotBcrypt {
                line: 2,
                user: "bob".into()
            }
        );
        assert!(err.to_string().contains("line 2"));
        assert!(!err.to_string().contains("apr1"));
        for bad in [
            "carol:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=",
            "dave:plaintext",
            "erin:$2x$10$abcdefghijklmnopqrstuuabcdefghijklmnopqrstuvwxyzABCDE",
            "frank",
            ":$2y$04$SzXCZYtB4okVntpyoPDqqemm6h6bp5SUY4BrMD4t6tzp0JwEbGY2y",
        ] {
            assert!(Htpasswd::parse(bad).is_err(), "{bad}");
        }
        assert!(matches!(
            Htpasswd::parse(&format!("{ALICE}\n{ALICE}")),
            Err(HtpasswdError::Duplicate {
                line: 2,
                first: 1,
                ..
            })
        ));
    }

    #[test]
    fn dummy_hash_is_bcrypt() {
        assert!(is_bcrypt(DUMMY_HASH));
    }
}
