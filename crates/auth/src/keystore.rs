//! The signing keys of a region's token service, shared by all its nodes.
//!
//! Either read from a PEM file given to every node (the first key signs, the
//! others verify: put the new key first to rotate), or kept in the MetaStore
//! under `auth/signing-key/<kid>`: the first node to start makes one, and
//! `berth token rotate-key` adds a newer one. A node verifies tokens from
//! memory; it re-reads the keys every [`REFRESH_EVERY`], and at once (at
//! most once a second) when a token names a key it does not know. A new key
//! signs only [`ACTIVATION_DELAY`] after it was made, so that the other
//! nodes have seen it by then; an old key stays until no token it signed
//! can still be valid.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use base64::Engine;
use berth_store::{MetaStore, StoreError, Txn};
use serde::{Deserialize, Serialize};

use crate::jwt::{KeySet, LEEWAY_SECS};
use crate::keys::{KeyError, SigningKey};

pub const KEY_PREFIX: &str = "auth/signing-key/";
pub const REFRESH_EVERY: Duration = Duration::from_secs(30);
pub const ACTIVATION_DELAY: Duration = Duration::from_secs(5);
/// Keys kept in the MetaStore at most.
const MAX_KEYS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum KeyStoreError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("signing keys come from a file here; rotate by editing it")]
    FromFile,
}

#[derive(Serialize, Deserialize)]
struct StoredKey {
    kid: String,
    created_ms: u64,
    /// PKCS#8 DER, base64.
    pkcs8: String,
}

/// A key as listed by `berth token keys`.
#[derive(Clone, Debug, Serialize)]
pub struct KeyInfo {
    pub kid: String,
    pub created_ms: u64,
    pub signing: bool,
}

#[derive(Clone)]
struct Keys {
    /// Oldest first.
    keys: Vec<(u64, SigningKey)>,
    set: Arc<KeySet>,
}

impl Keys {
    fn new(mut keys: Vec<(u64, SigningKey)>) -> Keys {
        keys.sort_by_key(|(created, k)| (*created, k.kid().to_string()));
        let set = Arc::new(KeySet::new(keys.iter().map(|(_, k)| k.verifying())));
        Keys { keys, set }
    }

    /// The newest key that is past its activation delay (or the oldest, if
    /// all are new).
    fn signing(&self, now_ms: u64) -> Option<&SigningKey> {
        let active_before = now_ms.saturating_sub(ACTIVATION_DELAY.as_millis() as u64);
        self.keys
            .iter()
            .rev()
            .find(|(created, _)| *created <= active_before)
            .or(self.keys.first())
            .map(|(_, k)| k)
    }
}

enum Source {
    File,
    Meta(Arc<dyn MetaStore>),
}

pub struct KeyStore {
    source: Source,
    keys: RwLock<Keys>,
    last_refresh: Mutex<Instant>,
}

fn decode(value: &[u8]) -> Option<(u64, SigningKey)> {
    let stored: StoredKey = serde_json::from_slice(value).ok()?;
    let der = base64::engine::general_purpose::STANDARD
        .decode(stored.pkcs8)
        .ok()?;
    let key = SigningKey::from_pkcs8(&der).ok()?;
    (key.kid() == stored.kid).then_some((stored.created_ms, key))
}

impl KeyStore {
    /// Keys from a PEM file; the first signs.
    pub fn from_file(keys: Vec<SigningKey>) -> KeyStore {
        // Listed newest first in the file: give the first the latest date.
        let n = keys.len() as u64;
        let dated = keys
            .into_iter()
            .enumerate()
            .map(|(i, k)| (n - i as u64, k))
            .collect();
        KeyStore {
            source: Source::File,
            keys: RwLock::new(Keys::new(dated)),
            last_refresh: Mutex::new(Instant::now()),
        }
    }

    /// The region's keys from the MetaStore, making the first one if there
    /// is none yet.
    pub async fn open(meta: Arc<dyn MetaStore>, now_ms: u64) -> Result<KeyStore, KeyStoreError> {
        let store = KeyStore {
            source: Source::Meta(meta.clone()),
            keys: RwLock::new(Keys::new(Vec::new())),
            last_refresh: Mutex::new(Instant::now()),
        };
        store.refresh().await?;
        if store.current().keys.is_empty() {
            // Two nodes starting at once may both make one: both are kept
            // and both verify, so that race is harmless.
            store.add(SigningKey::generate()?, now_ms).await?;
            store.refresh().await?;
        }
        Ok(store)
    }

    fn current(&self) -> Keys {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn add(&self, key: SigningKey, now_ms: u64) -> Result<(), KeyStoreError> {
        let Source::Meta(meta) = &self.source else {
            return Err(KeyStoreError::FromFile);
        };
        let stored = StoredKey {
            kid: key.kid().to_string(),
            created_ms: now_ms,
            pkcs8: base64::engine::general_purpose::STANDARD.encode(key.pkcs8()),
        };
        let k = format!("{KEY_PREFIX}{}", key.kid());
        let value = serde_json::to_vec(&stored).unwrap_or_default();
        meta.commit(Txn::new().require_absent(k.clone()).put(k, value))
            .await?;
        Ok(())
    }

    /// Re-reads the keys from the MetaStore (a no-op for a file).
    pub async fn refresh(&self) -> Result<(), KeyStoreError> {
        let Source::Meta(meta) = &self.source else {
            return Ok(());
        };
        *self.last_refresh.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        let page = meta.scan(KEY_PREFIX.as_bytes(), None, MAX_KEYS * 4).await?;
        let keys: Vec<(u64, SigningKey)> = page.iter().filter_map(|kv| decode(&kv.value)).collect();
        if keys.is_empty() {
            // Never forget every key because of one bad read.
            return Ok(());
        }
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Keys::new(keys);
        Ok(())
    }

    /// A token named key `kid` that is not known here: re-read the keys,
    /// at most once a second.
    pub async fn refresh_for(&self, kid: &str) -> bool {
        if self.current().set.contains(kid) {
            return true;
        }
        {
            let mut last = self.last_refresh.lock().unwrap_or_else(|p| p.into_inner());
            if last.elapsed() < Duration::from_secs(1) {
                return false;
            }
            *last = Instant::now();
        }
        if let Err(e) = self.refresh().await {
            tracing::warn!(error = %e, "cannot re-read the token signing keys");
        }
        self.current().set.contains(kid)
    }

    pub fn signing_key(&self, now_ms: u64) -> Option<SigningKey> {
        self.current().signing(now_ms).cloned()
    }

    pub fn key_set(&self) -> Arc<KeySet> {
        self.current().set
    }

    pub fn list(&self, now_ms: u64) -> Vec<KeyInfo> {
        let keys = self.current();
        let signing = keys.signing(now_ms).map(|k| k.kid().to_string());
        keys.keys
            .iter()
            .map(|(created, k)| KeyInfo {
                kid: k.kid().to_string(),
                created_ms: *created,
                signing: signing.as_deref() == Some(k.kid()),
            })
            .collect()
    }

    /// Public keys as a JWKS document.
    pub fn jwks(&self) -> serde_json::Value {
        let keys: Vec<serde_json::Value> =
            self.current().keys.iter().map(|(_, k)| k.jwk()).collect();
        serde_json::json!({ "keys": keys })
    }

    /// Adds a new signing key and drops keys that no valid token can still
    /// name: superseded longer ago than `token_ttl` (plus the activation
    /// delay and clock skew). Returns the new key's id.
    pub async fn rotate(&self, token_ttl: Duration, now_ms: u64) -> Result<String, KeyStoreError> {
        let Source::Meta(meta) = &self.source else {
            return Err(KeyStoreError::FromFile);
        };
        let key = SigningKey::generate()?;
        let kid = key.kid().to_string();
        self.add(key, now_ms).await?;
        self.refresh().await?;
        let keys = self.current();
        let grace = (token_ttl + ACTIVATION_DELAY + Duration::from_secs(2 * LEEWAY_SECS))
            .as_millis() as u64;
        // A key stops signing once the next one is active; it may be dropped
        // `grace` after that.
        let mut drop = Vec::new();
        for pair in keys.keys.windows(2) {
            let (_, old) = &pair[0];
            let (next_created, _) = &pair[1];
            let retired_at = next_created + ACTIVATION_DELAY.as_millis() as u64;
            if now_ms > retired_at + grace {
                drop.push(old.kid().to_string());
            }
        }
        // Never keep more than MAX_KEYS, oldest first out.
        let excess = keys.keys.len().saturating_sub(MAX_KEYS);
        for (_, k) in keys.keys.iter().take(excess) {
            if !drop.iter().any(|d| d == k.kid()) {
                drop.push(k.kid().to_string());
            }
        }
        for old in &drop {
            meta.commit(Txn::new().delete(format!("{KEY_PREFIX}{old}")))
                .await?;
        }
        if !drop.is_empty() {
            self.refresh().await?;
        }
        Ok(kid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> Arc<dyn MetaStore> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        std::mem::forget(dir);
        Arc::new(berth_store::RedbMetaStore::open(&path).unwrap())
    }

    #[tokio::test]
    async fn nodes_share_keys_and_rotation_overlaps() {
        let meta = store();
        let a = KeyStore::open(meta.clone(), 1_000_000).await.unwrap();
        let b = KeyStore::open(meta.clone(), 1_000_000).await.unwrap();
        let first = a.signing_key(1_000_000).unwrap();
        assert_eq!(b.signing_key(1_000_000).unwrap().kid(), first.kid());
        // Rotation: the new key signs only after the activation delay; the
        // old one keeps verifying.
        let t = 2_000_000;
        let new = a.rotate(Duration::from_secs(300), t).await.unwrap();
        assert_eq!(a.signing_key(t).unwrap().kid(), first.kid());
        let later = t + ACTIVATION_DELAY.as_millis() as u64;
        assert_eq!(a.signing_key(later).unwrap().kid(), new);
        assert!(a.key_set().contains(first.kid()));
        // The other node learns the new key when a token names it.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(b.refresh_for(&new).await);
        // Much later, a second rotation drops the first key.
        let much_later = later + 3_600_000;
        let third = a
            .rotate(Duration::from_secs(300), much_later)
            .await
            .unwrap();
        assert!(!a.key_set().contains(first.kid()));
        assert!(a.key_set().contains(&new));
        assert!(a.key_set().contains(&third));
        assert_eq!(a.list(much_later).len(), 2);
    }

    #[tokio::test]
    async fn file_keys_sign_with_the_first() {
        let k1 = SigningKey::generate().unwrap();
        let k2 = SigningKey::generate().unwrap();
        let store = KeyStore::from_file(vec![k1.clone(), k2.clone()]);
        assert_eq!(store.signing_key(u64::MAX).unwrap().kid(), k1.kid());
        assert!(store.key_set().contains(k2.kid()));
        assert!(matches!(
            store.rotate(Duration::from_secs(1), 0).await,
            Err(KeyStoreError::FromFile)
        ));
    }
}
