//! A node's place in its region: registration under a lease, leadership of
//! the jobs that must run once per region, and drain requests.
//!
//! Everything hangs on one lease per node. The node keeps it alive every
//! `KEEPALIVE_EVERY`; if the process dies, the lease lapses after
//! `LEASE_TTL` and its registration and leaderships vanish with it, so
//! another node takes over a job within seconds and without any manual step.
//! The same code runs on the embedded engine, where the node is alone and
//! always leads.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use berth_store::{LeaseId, MetaStore, StoreError, Txn};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub const NODE_PREFIX: &str = "node/";
pub const LEADER_PREFIX: &str = "leader/";
/// A dead node's registration and leaderships vanish this long after its
/// last keep-alive.
pub const LEASE_TTL: Duration = Duration::from_secs(5);
const KEEPALIVE_EVERY: Duration = Duration::from_millis(1500);
/// How often a node tries to take a job whose leader is gone.
const CAMPAIGN_EVERY: Duration = Duration::from_secs(1);

/// A node's registration, under `node/<name>`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub zone: String,
    pub version: String,
    /// Where operators and other nodes reach it.
    pub address: String,
    pub started_ms: u64,
    pub lease: LeaseId,
    /// Set by `berth node drain`: the node stops taking traffic and exits.
    #[serde(default)]
    pub drain_requested: bool,
}

/// Who holds a job, under `leader/<job>`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LeaderRecord {
    pub node: String,
    pub lease: LeaseId,
    pub since_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("node name {0:?} is held by a running node; give this node another --node-name")]
    NameTaken(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub fn node_key(name: &str) -> String {
    format!("{NODE_PREFIX}{name}")
}

fn leader_key(job: &str) -> String {
    format!("{LEADER_PREFIX}{job}")
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

pub struct Node {
    meta: Arc<dyn MetaStore>,
    record: NodeRecord,
    lease: AtomicI64,
    /// When the lease surely still holds: the last successful keep-alive
    /// plus the TTL, minus a margin for clock and network. Past it, this
    /// node must act as if its lease were gone.
    lease_valid_until: std::sync::Mutex<tokio::time::Instant>,
    drain_tx: watch::Sender<bool>,
}

/// A keep-alive must finish well inside the TTL to count.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);
const LEASE_MARGIN: Duration = Duration::from_secs(1);

impl Node {
    /// Registers this node. A name still held by a live lease is refused
    /// (after waiting out one TTL, which covers a restart after a crash).
    pub async fn join(
        meta: Arc<dyn MetaStore>,
        mut record: NodeRecord,
    ) -> Result<Arc<Node>, ClusterError> {
        let key = node_key(&record.name);
        let deadline = tokio::time::Instant::now() + LEASE_TTL + Duration::from_secs(2);
        loop {
            let lease = meta.grant_lease(LEASE_TTL).await?;
            record.lease = lease;
            let registered = meta
                .commit(Txn::new().require_absent(key.clone()).put_leased(
                    key.clone(),
                    encode(&record),
                    lease,
                ))
                .await?;
            if registered {
                tracing::info!(node = %record.name, zone = %record.zone, "joined the cluster");
                let (drain_tx, _) = watch::channel(false);
                return Ok(Arc::new(Node {
                    meta,
                    record,
                    lease: AtomicI64::new(lease),
                    lease_valid_until: std::sync::Mutex::new(
                        tokio::time::Instant::now() + LEASE_TTL - LEASE_MARGIN,
                    ),
                    drain_tx,
                }));
            }
            let _ = meta.revoke_lease(lease).await;
            if tokio::time::Instant::now() >= deadline {
                return Err(ClusterError::NameTaken(record.name));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    pub fn name(&self) -> &str {
        &self.record.name
    }

    fn lease(&self) -> LeaseId {
        self.lease.load(Ordering::Acquire)
    }

    fn lease_surely_held(&self) -> bool {
        tokio::time::Instant::now()
            < *self
                .lease_valid_until
                .lock()
                .unwrap_or_else(|p| p.into_inner())
    }

    fn lease_renewed(&self, at: tokio::time::Instant) {
        *self
            .lease_valid_until
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = at + LEASE_TTL - LEASE_MARGIN;
    }

    /// Resolves when a drain of this node was requested.
    pub async fn drain_requested(&self) {
        let mut rx = self.drain_tx.subscribe();
        let _ = rx.wait_for(|requested| *requested).await;
    }

    /// Keeps the lease alive and watches for a drain request, forever. A
    /// lease that lapsed (etcd unreachable for longer than the TTL) is
    /// replaced and the node registers again.
    pub async fn maintain(self: Arc<Self>) {
        let key = node_key(&self.record.name);
        let mut ticker = tokio::time::interval(KEEPALIVE_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let sent = tokio::time::Instant::now();
            let renewed =
                tokio::time::timeout(KEEPALIVE_TIMEOUT, self.meta.keep_lease_alive(self.lease()))
                    .await;
            match renewed {
                Ok(Ok(true)) => self.lease_renewed(sent),
                Ok(Ok(false)) => {
                    tracing::warn!("cluster lease lapsed; registering again");
                    if let Err(e) = self.rejoin().await {
                        tracing::warn!(error = %e, "cannot register again yet");
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot renew the cluster lease");
                    continue;
                }
                Err(_) => {
                    tracing::warn!("renewing the cluster lease timed out");
                    continue;
                }
            }
            if let Ok(Some(kv)) = self.meta.get(key.as_bytes()).await
                && let Ok(current) = serde_json::from_slice::<NodeRecord>(&kv.value)
                && current.drain_requested
                && !*self.drain_tx.borrow()
            {
                tracing::info!("drain requested through the cluster");
                let _ = self.drain_tx.send(true);
            }
        }
    }

    async fn rejoin(&self) -> Result<(), StoreError> {
        let granted = tokio::time::Instant::now();
        let lease = self.meta.grant_lease(LEASE_TTL).await?;
        let mut record = self.record.clone();
        record.lease = lease;
        // A drain asked for before the lease lapsed still stands.
        record.drain_requested = *self.drain_tx.borrow();
        let key = node_key(&record.name);
        // The old registration lapsed with its lease; take the name back,
        // unless another node took it meanwhile.
        let registered = self
            .meta
            .commit(
                Txn::new()
                    .require_absent(key.clone())
                    .put_leased(key, encode(&record), lease),
            )
            .await?;
        if !registered {
            let _ = self.meta.revoke_lease(lease).await;
            return Err(StoreError::Database(format!(
                "node name {} was taken by another node",
                record.name
            )));
        }
        self.lease.store(lease, Ordering::Release);
        self.lease_renewed(granted);
        Ok(())
    }

    /// Takes or confirms leadership of `job`. True while this node holds it.
    async fn campaign(&self, job: &str) -> Result<bool, StoreError> {
        // A node that cannot prove its lease is alive must not act on it,
        // even if a lagging etcd member still shows it as the leader.
        if !self.lease_surely_held() {
            return Ok(false);
        }
        let key = leader_key(job);
        let lease = self.lease();
        match self.meta.get(key.as_bytes()).await? {
            Some(kv) => {
                let mine = serde_json::from_slice::<LeaderRecord>(&kv.value)
                    .is_ok_and(|r| r.node == self.record.name && r.lease == lease);
                // The read may be served by a lagging member: confirm
                // through the quorum with a compare-only transaction.
                Ok(mine
                    && self
                        .meta
                        .commit(Txn::new().require_version(key, kv.version))
                        .await?)
            }
            None => {
                let record = LeaderRecord {
                    node: self.record.name.clone(),
                    lease,
                    since_ms: berth_registry::now_ms(),
                };
                self.meta
                    .commit(Txn::new().require_absent(key.clone()).put_leased(
                        key,
                        encode(&record),
                        lease,
                    ))
                    .await
            }
        }
    }

    /// Runs `work` every `interval` while this node leads `job`. Leadership
    /// is re-checked every second, so a successor starts within about
    /// `LEASE_TTL` of its leader's death.
    pub async fn run_as_leader<F, Fut>(
        self: Arc<Self>,
        job: &'static str,
        interval: Duration,
        work: F,
    ) where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let mut leading = false;
        let mut next_run = tokio::time::Instant::now() + interval;
        loop {
            let now_leading = match self.campaign(job).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::debug!(job, error = %e, "leadership check failed");
                    false
                }
            };
            if now_leading != leading {
                if now_leading {
                    tracing::info!(job, node = %self.record.name, "became leader");
                } else {
                    tracing::info!(job, node = %self.record.name, "no longer leader");
                }
                leading = now_leading;
            }
            if leading && tokio::time::Instant::now() >= next_run {
                work().await;
                next_run = tokio::time::Instant::now() + interval;
            }
            tokio::time::sleep(CAMPAIGN_EVERY).await;
        }
    }

    /// Runs `work` again and again while this node leads `job` (for work
    /// that waits by itself, such as a long-poll), checking leadership
    /// between rounds.
    pub async fn run_while_leader<F, Fut>(self: Arc<Self>, job: String, work: F)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let mut leading = false;
        loop {
            let now_leading = self.campaign(&job).await.unwrap_or(false);
            if now_leading != leading {
                tracing::info!(job, node = %self.record.name, leading = now_leading, "leadership changed");
                leading = now_leading;
            }
            if leading {
                work().await;
            } else {
                tokio::time::sleep(CAMPAIGN_EVERY).await;
            }
        }
    }

    /// Leaves the cluster at once: registration and leaderships go now
    /// rather than when the lease would lapse.
    pub async fn leave(&self) {
        if let Err(e) = self.meta.revoke_lease(self.lease()).await {
            tracing::warn!(error = %e, "could not leave the cluster; the lease will lapse");
        }
    }
}

/// Every registered node, by name.
pub async fn nodes(meta: &dyn MetaStore) -> Result<Vec<NodeRecord>, StoreError> {
    let kvs = meta.scan(NODE_PREFIX.as_bytes(), None, 10_000).await?;
    Ok(kvs
        .iter()
        .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
        .collect())
}

/// Every job with a leader: (job, leader).
pub async fn leaders(meta: &dyn MetaStore) -> Result<Vec<(String, LeaderRecord)>, StoreError> {
    let kvs = meta.scan(LEADER_PREFIX.as_bytes(), None, 10_000).await?;
    Ok(kvs
        .iter()
        .filter_map(|kv| {
            let job = String::from_utf8_lossy(&kv.key[LEADER_PREFIX.len()..]).into_owned();
            Some((job, serde_json::from_slice(&kv.value).ok()?))
        })
        .collect())
}

/// Asks node `name` to drain. Returns false if no such node is registered.
pub async fn request_drain(meta: &dyn MetaStore, name: &str) -> Result<bool, StoreError> {
    let key = node_key(name);
    for _ in 0..16 {
        let Some(kv) = meta.get(key.as_bytes()).await? else {
            return Ok(false);
        };
        let Ok(mut record) = serde_json::from_slice::<NodeRecord>(&kv.value) else {
            return Ok(false);
        };
        record.drain_requested = true;
        let lease = record.lease;
        if meta
            .commit(
                Txn::new()
                    .require_version(key.clone(), kv.version)
                    .put_leased(key.clone(), encode(&record), lease),
            )
            .await?
        {
            return Ok(true);
        }
    }
    Err(StoreError::Database("node record kept changing".into()))
}
