//! API tokens for machines (robot accounts): a named secret granting
//! actions on repository globs, stored only as a hash in the MetaStore so
//! that every node of a region accepts it at once and a stolen database
//! reveals no secret.
//!
//! Records live under `auth/token/<name>`, with an index from the secret's
//! hash (`auth/token-hash/<hash>`) so a node that has not seen a new token
//! yet finds it with one read. Each node keeps all records in memory and
//! re-reads them every few seconds: a revocation takes effect everywhere
//! within that interval, also for the JWTs issued for the token.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use base64::Engine;
use berth_store::{MetaStore, StoreError, Txn};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::action::{Action, Actions};
use crate::glob::Glob;

pub const RECORD_PREFIX: &str = "auth/token/";
pub const HASH_PREFIX: &str = "auth/token-hash/";
/// Every API token secret starts with this, so that a password can be told
/// from one without a lookup (and secret scanners can find leaked ones).
pub const SECRET_PREFIX: &str = "berth_";
/// Tokens a region may hold.
pub const MAX_TOKENS: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum ApiTokenError {
    #[error(
        "token name {0:?}: use 1-64 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit"
    )]
    BadName(String),
    #[error("a token named {0:?} exists; revoke it first")]
    Exists(String),
    #[error("no token named {0:?}")]
    Unknown(String),
    #[error("{0}")]
    Invalid(String),
    #[error("this region holds the maximum of {MAX_TOKENS} API tokens")]
    TooMany,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What is stored for a token (never the secret).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiTokenRecord {
    pub name: String,
    /// Changes when a token of the same name is made again.
    pub id: String,
    /// Hex SHA-256 of the secret.
    pub hash: String,
    pub repositories: Vec<String>,
    pub actions: Vec<String>,
    pub created_ms: u64,
    #[serde(default)]
    pub expires_ms: Option<u64>,
    #[serde(default)]
    pub created_by: String,
}

/// A record with its globs compiled.
#[derive(Debug)]
pub struct ApiToken {
    pub record: ApiTokenRecord,
    globs: Vec<Glob>,
    actions: Actions,
    everywhere: bool,
}

impl ApiToken {
    fn compile(record: ApiTokenRecord) -> Result<ApiToken, ApiTokenError> {
        let globs = record
            .repositories
            .iter()
            .map(|g| Glob::parse(g))
            .collect::<Result<Vec<_>, _>>()
            .map_err(ApiTokenError::Invalid)?;
        let mut actions = Actions::NONE;
        for a in &record.actions {
            actions = actions.with(
                Action::parse(a)
                    .ok_or_else(|| ApiTokenError::Invalid(format!("unknown action {a:?}")))?,
            );
        }
        Ok(ApiToken {
            everywhere: globs.iter().any(Glob::is_everything),
            globs,
            actions,
            record,
        })
    }

    pub fn name(&self) -> &str {
        &self.record.name
    }

    pub fn granted(&self, repository: &str) -> Actions {
        if self.globs.iter().any(|g| g.matches(repository)) {
            self.actions
        } else {
            Actions::NONE
        }
    }

    /// Region-wide actions: only a token over `**` has them.
    pub fn granted_everywhere(&self) -> Actions {
        if self.everywhere {
            self.actions
        } else {
            Actions::NONE
        }
    }

    pub fn expired(&self, now_ms: u64) -> bool {
        self.record.expires_ms.is_some_and(|e| e <= now_ms)
    }
}

pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(c))
}

/// A new secret: the prefix and 256 random bits.
pub fn new_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    format!(
        "{SECRET_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// Whether a password has the shape of an API token secret.
pub fn looks_like_secret(s: &str) -> bool {
    s.len() == SECRET_PREFIX.len() + 43
        && s.starts_with(SECRET_PREFIX)
        && s[SECRET_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The secret's hash, as stored. A plain SHA-256 suffices: the secret holds
/// 256 random bits, so there is nothing to guess from its hash.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// What a token is created with.
#[derive(Clone, Debug)]
pub struct NewToken {
    pub name: String,
    pub repositories: Vec<String>,
    pub actions: Actions,
    pub expires_ms: Option<u64>,
    pub created_by: String,
}

#[derive(Default)]
struct Loaded {
    by_hash: HashMap<String, Arc<ApiToken>>,
    by_name: HashMap<String, Arc<ApiToken>>,
}

pub struct ApiTokens {
    meta: Arc<dyn MetaStore>,
    loaded: RwLock<Loaded>,
}

fn record_key(name: &str) -> String {
    format!("{RECORD_PREFIX}{name}")
}

fn hash_key(hash: &str) -> String {
    format!("{HASH_PREFIX}{hash}")
}

fn decode(value: &[u8]) -> Option<Arc<ApiToken>> {
    let record: ApiTokenRecord = serde_json::from_slice(value).ok()?;
    ApiToken::compile(record).ok().map(Arc::new)
}

impl ApiTokens {
    pub fn new(meta: Arc<dyn MetaStore>) -> ApiTokens {
        ApiTokens {
            meta,
            loaded: RwLock::new(Loaded::default()),
        }
    }

    /// Creates a token; returns its record and its secret, which is shown
    /// once and never stored.
    pub async fn create(
        &self,
        token: NewToken,
        now_ms: u64,
    ) -> Result<(ApiTokenRecord, String), ApiTokenError> {
        if !valid_name(&token.name) {
            return Err(ApiTokenError::BadName(token.name));
        }
        if token.repositories.is_empty() {
            return Err(ApiTokenError::Invalid(
                "a token needs at least one repository pattern".into(),
            ));
        }
        if token.actions.is_empty() {
            return Err(ApiTokenError::Invalid(
                "a token needs at least one action".into(),
            ));
        }
        if self.list().await?.len() >= MAX_TOKENS {
            return Err(ApiTokenError::TooMany);
        }
        let secret = new_secret();
        let record = ApiTokenRecord {
            name: token.name.clone(),
            id: hex::encode(rand::random::<[u8; 8]>()),
            hash: hash_secret(&secret),
            repositories: token.repositories,
            actions: token
                .actions
                .names()
                .into_iter()
                .map(str::to_string)
                .collect(),
            created_ms: now_ms,
            expires_ms: token.expires_ms,
            created_by: token.created_by,
        };
        let compiled = ApiToken::compile(record.clone())?;
        let value =
            serde_json::to_vec(&record).map_err(|e| ApiTokenError::Invalid(e.to_string()))?;
        let key = record_key(&record.name);
        let committed = self
            .meta
            .commit(
                Txn::new()
                    .require_absent(key.clone())
                    .put(key, value)
                    .put(hash_key(&record.hash), record.name.clone()),
            )
            .await?;
        if !committed {
            return Err(ApiTokenError::Exists(record.name));
        }
        self.remember(Arc::new(compiled));
        Ok((record, secret))
    }

    /// Stored records' values in name order, stopping once more than `cap`
    /// are read.
    async fn stored(&self, cap: usize) -> Result<Vec<Vec<u8>>, ApiTokenError> {
        let mut out = Vec::new();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = self
                .meta
                .scan(RECORD_PREFIX.as_bytes(), after.as_deref(), 1000)
                .await?;
            let done = page.len() < 1000;
            after = page.last().map(|kv| kv.key.clone());
            out.extend(page.into_iter().map(|kv| kv.value));
            if done || out.len() > cap {
                return Ok(out);
            }
        }
    }

    /// Every token, by name.
    pub async fn list(&self) -> Result<Vec<ApiTokenRecord>, ApiTokenError> {
        Ok(self
            .stored(MAX_TOKENS)
            .await?
            .iter()
            .filter_map(|v| serde_json::from_slice::<ApiTokenRecord>(v).ok())
            .collect())
    }

    /// Revokes a token at once on this node, within one refresh elsewhere.
    pub async fn revoke(&self, name: &str) -> Result<ApiTokenRecord, ApiTokenError> {
        let key = record_key(name);
        let Some(kv) = self.meta.get(key.as_bytes()).await? else {
            return Err(ApiTokenError::Unknown(name.to_string()));
        };
        let record: ApiTokenRecord = serde_json::from_slice(&kv.value)
            .map_err(|e| ApiTokenError::Invalid(format!("stored token {name}: {e}")))?;
        let committed = self
            .meta
            .commit(
                Txn::new()
                    .require_version(key.clone(), kv.version)
                    .delete(key)
                    .delete(hash_key(&record.hash)),
            )
            .await?;
        if !committed {
            return Err(ApiTokenError::Unknown(name.to_string()));
        }
        let mut loaded = self.loaded.write().unwrap_or_else(|p| p.into_inner());
        loaded.by_name.remove(name);
        loaded.by_hash.remove(&record.hash);
        Ok(record)
    }

    fn remember(&self, token: Arc<ApiToken>) {
        let mut loaded = self.loaded.write().unwrap_or_else(|p| p.into_inner());
        loaded
            .by_hash
            .insert(token.record.hash.clone(), token.clone());
        loaded.by_name.insert(token.record.name.clone(), token);
    }

    /// Re-reads every record (the periodic refresh).
    pub async fn refresh(&self) -> Result<usize, ApiTokenError> {
        let mut fresh = Loaded::default();
        // No cap: creates racing on several nodes can pass MAX_TOKENS, and
        // every acknowledged token must keep working.
        for token in self
            .stored(usize::MAX)
            .await?
            .iter()
            .filter_map(|v| decode(v))
        {
            fresh
                .by_hash
                .insert(token.record.hash.clone(), token.clone());
            fresh.by_name.insert(token.record.name.clone(), token);
        }
        let n = fresh.by_name.len();
        *self.loaded.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(n)
    }

    /// The token a secret belongs to, if any and not expired. From memory;
    /// a secret not seen yet costs one read (a token just made on another
    /// node works at once). Lookups go by the secret's SHA-256, so their
    /// timing tells nothing about the secret.
    pub async fn lookup(
        &self,
        secret: &str,
        now_ms: u64,
    ) -> Result<Option<Arc<ApiToken>>, ApiTokenError> {
        if !looks_like_secret(secret) {
            return Ok(None);
        }
        let hash = hash_secret(secret);
        let known = self
            .loaded
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_hash
            .get(&hash)
            .cloned();
        let token = match known {
            Some(t) => Some(t),
            None => match self.meta.get(hash_key(&hash).as_bytes()).await? {
                None => None,
                Some(index) => {
                    let name = String::from_utf8_lossy(&index.value).into_owned();
                    match self.meta.get(record_key(&name).as_bytes()).await? {
                        Some(kv) => decode(&kv.value).filter(|t| t.record.hash == hash),
                        None => None,
                    }
                }
            },
        };
        let Some(token) = token else {
            return Ok(None);
        };
        self.remember(token.clone());
        Ok((!token.expired(now_ms)).then_some(token))
    }

    /// The token a secret belongs to, from memory only.
    pub fn known(&self, secret: &str, now_ms: u64) -> Option<Arc<ApiToken>> {
        let hash = hash_secret(secret);
        self.loaded
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_hash
            .get(&hash)
            .filter(|t| !t.expired(now_ms))
            .cloned()
    }

    /// A token by name as this node knows it (for the JWTs issued for it).
    pub fn by_name(&self, name: &str) -> Option<Arc<ApiToken>> {
        self.loaded
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_name
            .get(name)
            .cloned()
    }

    /// Whether a JWT issued for token `name` with id `id` still stands.
    pub fn live(&self, name: &str, id: &str, now_ms: u64) -> bool {
        self.by_name(name)
            .is_some_and(|t| t.record.id == id && !t.expired(now_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> Arc<dyn MetaStore> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        // Keep the directory alive for the test's duration.
        std::mem::forget(dir);
        Arc::new(berth_store::RedbMetaStore::open(&path).unwrap())
    }

    fn new_token(name: &str, repos: &[&str], actions: &[Action]) -> NewToken {
        NewToken {
            name: name.into(),
            repositories: repos.iter().map(|r| r.to_string()).collect(),
            actions: Actions::of(actions),
            expires_ms: None,
            created_by: "admin".into(),
        }
    }

    #[tokio::test]
    async fn tokens_are_created_found_by_secret_and_revoked() {
        let meta = store();
        let tokens = ApiTokens::new(meta.clone());
        let (record, secret) = tokens
            .create(
                new_token("ci", &["team/**"], &[Action::Pull, Action::Push]),
                1000,
            )
            .await
            .unwrap();
        assert!(looks_like_secret(&secret));
        assert_ne!(record.hash, secret);
        // Another node, which has not refreshed, finds it by one read.
        let other = ApiTokens::new(meta.clone());
        let found = other.lookup(&secret, 2000).await.unwrap().unwrap();
        assert!(found.granted("team/a/b").allows(Action::Push));
        assert!(found.granted("other").is_empty());
        assert!(found.granted_everywhere().is_empty());
        assert!(other.lookup(&new_secret(), 2000).await.unwrap().is_none());
        assert!(other.lookup("berth_short", 2000).await.unwrap().is_none());
        // Names are unique.
        assert!(matches!(
            tokens
                .create(new_token("ci", &["x"], &[Action::Pull]), 1000)
                .await,
            Err(ApiTokenError::Exists(_))
        ));
        assert!(other.live("ci", &record.id, 3000));
        tokens.revoke("ci").await.unwrap();
        assert!(tokens.lookup(&secret, 3000).await.unwrap().is_none());
        // The other node still remembers it until its refresh.
        assert!(other.live("ci", &record.id, 3000));
        other.refresh().await.unwrap();
        assert!(!other.live("ci", &record.id, 3000));
        assert!(other.lookup(&secret, 3000).await.unwrap().is_none());
        assert!(matches!(
            tokens.revoke("ci").await,
            Err(ApiTokenError::Unknown(_))
        ));
        // Made again under the same name: the old id is not live.
        tokens
            .create(new_token("ci", &["x"], &[Action::Pull]), 4000)
            .await
            .unwrap();
        other.refresh().await.unwrap();
        assert!(!other.live("ci", &record.id, 5000));
    }

    #[tokio::test]
    async fn expired_and_invalid_tokens() {
        let tokens = ApiTokens::new(store());
        let mut t = new_token("short", &["**"], &[Action::Admin]);
        t.expires_ms = Some(5000);
        let (record, secret) = tokens.create(t, 1000).await.unwrap();
        let found = tokens.lookup(&secret, 4999).await.unwrap().unwrap();
        assert!(found.granted_everywhere().allows(Action::Admin));
        assert!(tokens.lookup(&secret, 5000).await.unwrap().is_none());
        assert!(!tokens.live("short", &record.id, 5000));
        for bad in [
            new_token("Bad", &["x"], &[Action::Pull]),
            new_token("ok", &[], &[Action::Pull]),
            new_token("ok", &["x"], &[]),
            new_token("ok", &["X"], &[Action::Pull]),
        ] {
            assert!(tokens.create(bad, 1000).await.is_err());
        }
        assert_eq!(tokens.list().await.unwrap().len(), 1);
    }
}
