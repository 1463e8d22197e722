//! Console sessions: their records in the MetaStore (so every node of a
//! region knows them and signing out ends them everywhere), and what each
//! node keeps of them in memory: the sessions it checked lately (for an
//! etcd outage), a throttle on sign-ins, and a cursor for sweeping out
//! expired records.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use berth_auth::{Authenticator, Identity};
use berth_store::{MetaStore, StoreError, Txn};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

pub const SESSION_PREFIX: &str = "ui/session/";
/// A session ends this long after sign-in, used or not.
pub const SESSION_TTL_MS: u64 = 8 * 3600 * 1000;
/// Session records a sign-in looks at for expired ones.
const SWEEP_LIMIT: usize = 200;
/// A session read that takes longer falls back to the ones checked lately.
pub const SESSION_READ_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a session this node read from the store stands without it.
const RECENT_FOR: Duration = Duration::from_secs(15 * 60);
/// Sessions remembered per node, at most.
const RECENT_MAX: usize = 4096;
/// Sign-ins per principal per node: a burst, then one per interval (each
/// writes a record; a script signing in at line rate must not fill etcd).
const SIGN_IN_BURST: f64 = 10.0;
const SIGN_IN_REFILL: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Principal {
    User,
    Token,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SessionRecord {
    pub principal: Principal,
    pub name: String,
    /// What the credential was when the session opened: a digest of the
    /// user's htpasswd entry (a new password ends the session), or the API
    /// token's id (a token made again under the same name does not inherit
    /// the old one's sessions).
    #[serde(default)]
    pub credential: String,
    pub csrf: String,
    pub created_ms: u64,
    pub expires_ms: u64,
}

impl SessionRecord {
    /// A session for `identity`, if it is one that may sign in.
    pub fn open(auth: &Authenticator, identity: &Identity, now_ms: u64) -> Option<SessionRecord> {
        let (principal, name, credential) = match identity {
            Identity::User(u) => (Principal::User, u.clone(), auth.user_fingerprint(u)?),
            Identity::ApiToken(t) => (Principal::Token, t.name().to_string(), t.record.id.clone()),
            _ => return None,
        };
        Some(SessionRecord {
            principal,
            name,
            credential,
            csrf: random_token(),
            created_ms: now_ms,
            expires_ms: now_ms + SESSION_TTL_MS,
        })
    }

    /// The identity the session stands for now, if it still stands: not
    /// expired, the user or token still there with the same credential.
    pub fn identity(&self, auth: &Authenticator, now_ms: u64) -> Option<Identity> {
        if self.expires_ms <= now_ms || self.credential.is_empty() {
            return None;
        }
        match self.principal {
            Principal::User => (auth.user_fingerprint(&self.name).as_deref()
                == Some(self.credential.as_str()))
            .then(|| Identity::User(self.name.clone())),
            Principal::Token => auth
                .api_tokens()?
                .by_name(&self.name)
                .filter(|t| !t.expired(now_ms) && t.record.id == self.credential)
                .map(Identity::ApiToken),
        }
    }

    fn principal_key(&self) -> String {
        format!("{:?}:{}", self.principal, self.name)
    }
}

pub fn random_token() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// Where a session id's record is: under the id's SHA-256, so that the
/// store (and its backups) never hold a usable id.
pub fn session_key(id: &str) -> String {
    format!(
        "{SESSION_PREFIX}{}",
        hex::encode(Sha256::digest(id.as_bytes()))
    )
}

/// What this node keeps of console sessions.
pub struct NodeSessions {
    /// Sessions read from the store lately, by key. Used only while the
    /// store does not answer, so that an operator signed in before an etcd
    /// outage keeps the console through it. While the store answers,
    /// revocation is immediate; during an outage a session signed out on
    /// another node stands here until [`RECENT_FOR`] after this node last
    /// read it from the store, and a removed user, a new password or a
    /// revoked token is still refused (the identity is rebuilt each time).
    recent: Mutex<HashMap<String, (SessionRecord, Instant)>>,
    sign_ins: berth_auth::throttle::Throttle,
    /// Where the next sweep for expired records starts.
    sweep_after: Mutex<Option<Vec<u8>>>,
}

impl Default for NodeSessions {
    fn default() -> Self {
        NodeSessions {
            recent: Mutex::new(HashMap::new()),
            sign_ins: berth_auth::throttle::Throttle::new(SIGN_IN_BURST, SIGN_IN_REFILL),
            sweep_after: Mutex::new(None),
        }
    }
}

impl NodeSessions {
    /// Remembers a record just read from the store.
    pub fn remember(&self, key: &str, record: SessionRecord) {
        let mut map = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= RECENT_MAX && !map.contains_key(key) {
            map.retain(|_, (_, at)| at.elapsed() < RECENT_FOR);
            // Still full: the oldest tenth goes.
            if map.len() >= RECENT_MAX {
                let mut ages: Vec<Instant> = map.values().map(|(_, at)| *at).collect();
                ages.sort();
                let cut = ages[RECENT_MAX / 10];
                map.retain(|_, (_, at)| *at > cut);
            }
        }
        map.insert(key.to_string(), (record, Instant::now()));
    }

    /// A record read from the store within [`RECENT_FOR`].
    pub fn recall(&self, key: &str) -> Option<SessionRecord> {
        let map = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        map.get(key)
            .filter(|(_, at)| at.elapsed() < RECENT_FOR)
            .map(|(r, _)| r.clone())
    }

    pub fn forget(&self, key: &str) {
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// Stores a new session (throttled per principal and node); returns
    /// its id. `previous` (the browser's current session) ends with it.
    pub async fn create(
        &self,
        meta: &dyn MetaStore,
        record: &SessionRecord,
        previous: Option<&str>,
    ) -> Result<String, CreateError> {
        let principal = record.principal_key();
        self.sign_ins
            .take(&principal)
            .map_err(CreateError::Throttled)?;
        self.sweep(meta).await;
        let id = random_token();
        let mut txn = Txn::new().put(
            session_key(&id),
            serde_json::to_vec(record).unwrap_or_default(),
        );
        if let Some(previous) = previous {
            txn = txn.delete(previous.to_string());
        }
        if let Err(e) = meta.commit(txn).await {
            // Nothing was written: the attempt does not count, and the
            // browser's current session stands (an outage is when it must).
            self.sign_ins.give_back(&principal);
            return Err(CreateError::Store(e));
        }
        if let Some(previous) = previous {
            self.forget(previous);
        }
        Ok(id)
    }

    /// Removes the expired records among the next [`SWEEP_LIMIT`], going
    /// round the whole prefix over successive sign-ins.
    async fn sweep(&self, meta: &dyn MetaStore) {
        let after = self
            .sweep_after
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Ok(kvs) = meta
            .scan(SESSION_PREFIX.as_bytes(), after.as_deref(), SWEEP_LIMIT)
            .await
        else {
            return;
        };
        *self.sweep_after.lock().unwrap_or_else(|p| p.into_inner()) = kvs
            .last()
            .filter(|_| kvs.len() == SWEEP_LIMIT)
            .map(|kv| kv.key.clone());
        let now = berth_registry::now_ms();
        let mut txn = Txn::new();
        for kv in kvs {
            let expired = serde_json::from_slice::<SessionRecord>(&kv.value)
                .map_or(true, |r| r.expires_ms <= now);
            if expired {
                txn = txn.delete(kv.key);
            }
        }
        if !txn.is_empty()
            && let Err(e) = meta.commit(txn).await
        {
            tracing::debug!(error = %e, "could not remove expired console sessions");
        }
    }
}

#[derive(Debug)]
pub enum CreateError {
    Throttled(Duration),
    Store(StoreError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str) -> SessionRecord {
        SessionRecord {
            principal: Principal::User,
            name: name.into(),
            credential: "c".into(),
            csrf: "t".into(),
            created_ms: 0,
            expires_ms: u64::MAX,
        }
    }

    #[test]
    fn the_memory_stays_bounded_and_keeps_the_newest() {
        let sessions = NodeSessions::default();
        for i in 0..RECENT_MAX + 10 {
            sessions.remember(&format!("k{i}"), record("a"));
        }
        let map = sessions.recent.lock().unwrap();
        assert!(map.len() <= RECENT_MAX, "{}", map.len());
        // The oldest go, not everything: the newest and most of the rest stay.
        assert!(map.len() >= RECENT_MAX * 85 / 100, "{}", map.len());
        assert!(map.contains_key(&format!("k{}", RECENT_MAX + 9)));
        assert!(map.contains_key(&format!("k{}", RECENT_MAX - 1)));
        assert!(!map.contains_key("k0"));
        drop(map);
        sessions.forget(&format!("k{}", RECENT_MAX + 9));
        assert!(sessions.recall(&format!("k{}", RECENT_MAX + 9)).is_none());
    }

    #[test]
    fn keys_hide_the_id() {
        let key = session_key("abc");
        assert!(key.starts_with(SESSION_PREFIX) && !key.contains("abc"));
        assert_eq!(key.len(), SESSION_PREFIX.len() + 64);
    }
}
