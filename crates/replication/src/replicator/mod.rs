//! Tailing peers' change feeds and applying their changes; read-through.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_proxy::{CacheError, CacheOptions, ClientTls, PullThroughCache, UpstreamConfig};
use berth_registry::{ChangeEvent, Registry, RegistryError, now_ms};
use berth_store::{MetaStore, Txn};
use serde::{Deserialize, Serialize};

use crate::metrics::ReplicationMetrics;

mod copy;
mod feed;
mod read_through;
mod repair;
mod resync;
mod round;

pub use feed::{FeedReader, PeerAck};

/// Changes fetched per feed request.
const FEED_BATCH: usize = 256;

/// Blobs copied at once for one manifest.
const COPY_CONCURRENCY: usize = 4;

/// Deepest index nesting copied.
const MAX_DEPTH: usize = 4;

const MANIFEST_ACCEPT: &str = berth_proxy::MANIFEST_ACCEPT;

#[derive(Clone)]
pub struct PeerConfig {
    pub name: String,
    pub url: String,
    /// The bearer secret this region presents to the peer (none when it
    /// proves itself with a client certificate).
    pub secret: Option<String>,
    /// Repository globs to replicate from this peer (empty: all).
    pub include: Vec<String>,
    /// Repository globs never replicated from this peer.
    pub exclude: Vec<String>,
}

impl std::fmt::Debug for PeerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerConfig")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("secret", &self.secret.as_ref().map(|_| "<secret>"))
            .field("include", &self.include)
            .field("exclude", &self.exclude)
            .finish()
    }
}

#[derive(Clone, Debug)]
pub struct ReplicationOptions {
    pub region: String,
    pub peers: Vec<PeerConfig>,
    /// Bound on a read-through request to a peer (and each read of a blob).
    pub read_through_timeout: Duration,
    /// How long a feed request waits for new changes.
    pub feed_wait: Duration,
    /// How far apart regions' clocks may be: tombstones outlive the moment
    /// they became safe to prune by this much.
    pub clock_margin: Duration,
    /// How often a reader's acknowledgement of the feed is renewed while
    /// it waits (it must stay well inside the compaction window for the
    /// reader to count as live).
    pub ack_refresh: Duration,
    pub spool_dir: PathBuf,
    /// How peers' certificates are verified, and this region's client
    /// certificate for them.
    pub tls: ClientTls,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("peer {peer}: {message}")]
    Peer { peer: String, message: String },
    #[error("{0}")]
    Config(String),
}

type Result<T> = std::result::Result<T, ReplicationError>;

/// A page of a region's change feed.
#[derive(Debug, Serialize, Deserialize)]
pub struct FeedPage {
    pub region: String,
    /// The log's identity: another one means the log was rebuilt and a
    /// reader starts over.
    #[serde(default)]
    pub epoch: String,
    pub head: u64,
    /// The highest sequence compacted away: a reader whose cursor is below
    /// it resynchronizes from a snapshot.
    #[serde(default)]
    pub compacted: u64,
    pub events: Vec<ChangeEvent>,
}

/// A page of a region's records, for a peer resynchronizing: the keys as
/// stored, with their records.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotPage {
    pub region: String,
    /// The log head the serving node had read before the page.
    #[serde(default)]
    pub head: u64,
    pub records: Vec<(String, serde_json::Value)>,
    /// No records after these.
    pub done: bool,
    /// Where the next page starts (the last key read, even when its
    /// record could not be sent).
    #[serde(default)]
    pub next: Option<String>,
}

/// Where replication from one peer stands.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PeerStatus {
    pub peer: String,
    pub url: String,
    /// Last change of the peer applied here.
    pub cursor: u64,
    /// The peer's newest change, as last seen.
    pub head: u64,
    pub events_behind: u64,
    pub seconds_behind: f64,
    /// Wall-clock time of the oldest change not applied yet (0: none).
    pub oldest_pending_ms: u64,
    pub applied: u64,
    pub bytes_copied: u64,
    pub last_error: Option<String>,
    pub last_error_ms: u64,
    pub paused: bool,
    pub updated_ms: u64,
    /// When a round last ended with every change of the peer's, as of the
    /// start of its feed request, applied here.
    #[serde(default)]
    pub caught_up_ms: u64,
    /// Times this region fell behind the peer's compacted log and copied
    /// its state instead.
    #[serde(default)]
    pub resyncs: u64,
}

/// How far replication from a peer got: the last change applied, in which
/// of the peer's logs.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Cursor {
    seq: u64,
    #[serde(default)]
    epoch: String,
}

impl Cursor {
    fn decode(bytes: &[u8]) -> Cursor {
        serde_json::from_slice(bytes).unwrap_or_default()
    }
}

fn cursor_key(peer: &str) -> String {
    format!("repl/cursor/{peer}")
}

fn status_key(peer: &str) -> String {
    format!("repl/status/{peer}")
}

fn paused_key(peer: &str) -> String {
    format!("repl/paused/{peer}")
}

const SERVING_DISABLED_KEY: &str = "region/serving-disabled";

pub struct Replicator {
    registry: Arc<Registry>,
    meta: Arc<dyn MetaStore>,
    options: ReplicationOptions,
    http: reqwest::Client,
    peers_cache: Arc<PullThroughCache>,
    metrics: ReplicationMetrics,
    /// Consecutive failed rounds per peer, for backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// The last acknowledgement written per reader, to throttle them.
    acks: Mutex<HashMap<String, (u64, std::time::Instant)>>,
}

/// An error talking to a peer that says "not there" (superseded at the
/// origin): the change is skipped.
fn is_gone(status: reqwest::StatusCode) -> bool {
    status == reqwest::StatusCode::NOT_FOUND
}

impl Replicator {
    pub fn new(
        registry: Arc<Registry>,
        meta: Arc<dyn MetaStore>,
        options: ReplicationOptions,
    ) -> Result<Self> {
        for peer in &options.peers {
            if peer.name == options.region {
                return Err(ReplicationError::Config(format!(
                    "peer {} has this region's own name",
                    peer.name
                )));
            }
        }
        let upstreams = options
            .peers
            .iter()
            .map(|p| UpstreamConfig {
                namespace: p.name.clone(),
                url: p.url.clone(),
                credentials: None,
                bearer: p.secret.clone(),
                // The peer answers from its own storage: no read-through
                // back and forth between regions.
                headers: vec![("x-berth-local-only".to_string(), "1".to_string())],
                timeout: options.read_through_timeout,
                tls: options.tls.clone(),
            })
            .collect();
        let peers_cache = PullThroughCache::new(
            registry.clone(),
            meta.clone(),
            upstreams,
            CacheOptions {
                tag_ttl: Duration::ZERO,
                mirror_default: None,
                max_bytes: 0,
                spool_dir: options.spool_dir.clone(),
                track_images: false,
                outage_backoff: Duration::from_secs(5),
            },
        )?;
        let builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .read_timeout(Duration::from_secs(30));
        let http = options
            .tls
            .apply(builder)
            .map_err(|e| ReplicationError::Config(format!("peer TLS: {e}")))?
            .build()
            .map_err(|e| ReplicationError::Config(format!("HTTP client: {e}")))?;
        Ok(Self {
            registry,
            meta,
            options,
            http,
            peers_cache: Arc::new(peers_cache),
            metrics: ReplicationMetrics::default(),
            failures: Mutex::new(HashMap::new()),
            acks: Mutex::new(HashMap::new()),
        })
    }

    pub fn metrics(&self) -> &ReplicationMetrics {
        &self.metrics
    }

    pub fn region(&self) -> &str {
        &self.options.region
    }

    pub fn peers(&self) -> impl Iterator<Item = &str> {
        self.options.peers.iter().map(|p| p.name.as_str())
    }

    /// The `Authorization` header for a peer, when it takes a secret.
    pub(super) fn credentials(peer: &PeerConfig) -> reqwest::header::HeaderMap {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(secret) = &peer.secret
            && let Ok(mut value) =
                reqwest::header::HeaderValue::from_str(&format!("Bearer {secret}"))
        {
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        headers
    }

    pub(super) fn peer(&self, name: &str) -> Result<&PeerConfig> {
        self.options
            .peers
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| ReplicationError::Config(format!("no peer named {name}")))
    }

    pub(super) async fn load<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>> {
        Ok(self
            .meta
            .get(key.as_bytes())
            .await
            .map_err(RegistryError::from)?
            .and_then(|kv| serde_json::from_slice(&kv.value).ok()))
    }

    pub(super) async fn save<T: Serialize>(&self, key: &str, value: &T) -> Result<()> {
        let bytes = serde_json::to_vec(value).unwrap_or_default();
        self.meta
            .commit(Txn::new().put(key, bytes))
            .await
            .map_err(RegistryError::from)?;
        Ok(())
    }

    pub(super) async fn status_of(&self, peer: &PeerConfig) -> Result<PeerStatus> {
        let mut status: PeerStatus = self
            .load(&status_key(&peer.name))
            .await?
            .unwrap_or_default();
        status.peer = peer.name.clone();
        status.url = peer.url.clone();
        status.cursor = self
            .load::<Cursor>(&cursor_key(&peer.name))
            .await?
            .unwrap_or_default()
            .seq;
        status.paused = self
            .meta
            .get(paused_key(&peer.name).as_bytes())
            .await
            .map_err(RegistryError::from)?
            .is_some();
        status.events_behind = status.head.saturating_sub(status.cursor);
        status.seconds_behind = if status.events_behind == 0 || status.oldest_pending_ms == 0 {
            0.0
        } else {
            now_ms().saturating_sub(status.oldest_pending_ms) as f64 / 1000.0
        };
        Ok(status)
    }

    /// Every peer's replication status.
    pub async fn status(&self) -> Result<Vec<PeerStatus>> {
        let mut out = Vec::new();
        for peer in &self.options.peers {
            out.push(self.status_of(peer).await?);
        }
        Ok(out)
    }

    /// Pauses (or resumes) replication from a peer, region-wide.
    pub async fn set_paused(&self, peer: &str, paused: bool) -> Result<()> {
        self.peer(peer)?;
        let txn = if paused {
            Txn::new().put(paused_key(peer), b"true".to_vec())
        } else {
            Txn::new().delete(paused_key(peer))
        };
        self.meta.commit(txn).await.map_err(RegistryError::from)?;
        Ok(())
    }

    /// Turns serving in this region off (its `/readyz` fails, so load
    /// balancers and DNS fail over) or on again.
    pub async fn set_serving(&self, enabled: bool) -> Result<()> {
        let txn = if enabled {
            Txn::new().delete(SERVING_DISABLED_KEY)
        } else {
            Txn::new().put(SERVING_DISABLED_KEY, b"true".to_vec())
        };
        self.meta.commit(txn).await.map_err(RegistryError::from)?;
        Ok(())
    }

    pub async fn serving_disabled(&self) -> Result<bool> {
        Ok(self
            .meta
            .get(SERVING_DISABLED_KEY.as_bytes())
            .await
            .map_err(RegistryError::from)?
            .is_some())
    }

    pub(super) fn backoff(&self, peer: &str, failed: bool) -> Duration {
        let mut failures = self
            .failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let n = failures.entry(peer.to_string()).or_default();
        if !failed {
            *n = 0;
            return Duration::ZERO;
        }
        *n = n.saturating_add(1);
        let base = 100u64.saturating_mul(1 << (*n).min(7)).min(10_000);
        let jitter: f64 = 0.5 + rand::random::<f64>();
        Duration::from_millis((base as f64 * jitter) as u64)
    }
}
