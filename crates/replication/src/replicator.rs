//! Tailing peers' change feeds and applying their changes; read-through.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_oci::{Digest, Manifest, Reference, RepositoryName};
use berth_proxy::{
    BlobAnswer, CacheError, CacheOptions, ClientTls, PullThroughCache, Target, UpstreamConfig,
};
use berth_registry::{Applied, Change, ChangeEvent, Registry, RegistryError, Stamp, now_ms};
use berth_store::{ByteStream, MetaStore, Txn};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::glob;
use crate::metrics::ReplicationMetrics;

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
    pub events: Vec<ChangeEvent>,
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

    /// This region's changes after `after`, waiting up to `wait` for some.
    pub async fn feed(&self, after: u64, limit: usize, wait: Duration) -> Result<FeedPage> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Interest first, then the read: a write in between wakes us.
            let signal = self.registry.change_signal().notified();
            tokio::pin!(signal);
            signal.as_mut().enable();
            let (events, head, epoch) = self
                .registry
                .changes_after(after, limit.clamp(1, 1000))
                .await?;
            let now = tokio::time::Instant::now();
            if !events.is_empty() || now >= deadline {
                return Ok(FeedPage {
                    region: self.options.region.clone(),
                    epoch,
                    head,
                    events,
                });
            }
            // Woken by a local write; polled for writes of other nodes.
            let left = (deadline - now).min(Duration::from_millis(250));
            let _ = tokio::time::timeout(left, signal).await;
        }
    }

    /// The `Authorization` header for a peer, when it takes a secret.
    fn credentials(peer: &PeerConfig) -> reqwest::header::HeaderMap {
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

    fn peer(&self, name: &str) -> Result<&PeerConfig> {
        self.options
            .peers
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| ReplicationError::Config(format!("no peer named {name}")))
    }

    async fn load<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        Ok(self
            .meta
            .get(key.as_bytes())
            .await
            .map_err(RegistryError::from)?
            .and_then(|kv| serde_json::from_slice(&kv.value).ok()))
    }

    async fn save<T: Serialize>(&self, key: &str, value: &T) -> Result<()> {
        let bytes = serde_json::to_vec(value).unwrap_or_default();
        self.meta
            .commit(Txn::new().put(key, bytes))
            .await
            .map_err(RegistryError::from)?;
        Ok(())
    }

    async fn status_of(&self, peer: &PeerConfig) -> Result<PeerStatus> {
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

    fn backoff(&self, peer: &str, failed: bool) -> Duration {
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

    /// One round of replication from `peer`: fetch the next page of its
    /// feed (waiting for changes), copy and apply each change in order,
    /// advance the durable cursor. Errors end the round after a backoff.
    pub async fn run_round(&self, peer_name: &str) {
        let Ok(peer) = self.peer(peer_name) else {
            return;
        };
        let labels = ReplicationMetrics::peer(peer_name);
        let result = self.round(peer).await;
        if let Err(e) = &result {
            tracing::warn!(peer = peer_name, error = %e, "replication round failed");
            self.metrics.errors.get_or_create(&labels).inc();
            if let Ok(mut status) = self.status_of(peer).await {
                status.last_error = Some(e.to_string());
                status.last_error_ms = now_ms();
                status.updated_ms = now_ms();
                let _ = self.save(&status_key(peer_name), &status).await;
            }
        }
        let pause = self.backoff(peer_name, result.is_err());
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }

    async fn round(&self, peer: &PeerConfig) -> Result<()> {
        let labels = ReplicationMetrics::peer(&peer.name);
        let mut status = self.status_of(peer).await?;
        if status.paused {
            tokio::time::sleep(Duration::from_secs(1)).await;
            return Ok(());
        }
        let cursor_seen = self
            .meta
            .get(cursor_key(&peer.name).as_bytes())
            .await
            .map_err(RegistryError::from)?;
        let saved = cursor_seen
            .as_ref()
            .map(|kv| Cursor::decode(&kv.value))
            .unwrap_or_default();
        let mut page = self.fetch_feed(peer, saved.seq).await?;
        let mut cursor = saved.clone();
        if (!saved.epoch.is_empty() && !page.epoch.is_empty() && saved.epoch != page.epoch)
            || page.head < saved.seq
        {
            // The peer's log was rebuilt: start over (applying is idempotent).
            tracing::warn!(peer = %peer.name, "the peer's change log is new; replicating it from the start");
            cursor = Cursor::default();
            page = self.fetch_feed(peer, 0).await?;
        }
        cursor.epoch = page.epoch.clone();
        // Paused while the feed request waited: apply nothing of it.
        if self
            .meta
            .get(paused_key(&peer.name).as_bytes())
            .await
            .map_err(RegistryError::from)?
            .is_some()
        {
            return Ok(());
        }
        status.head = page.head;
        status.oldest_pending_ms = page.events.first().map_or(0, |e| e.ms);
        let mut outcome = Ok(());
        for event in &page.events {
            if event.seq <= cursor.seq {
                continue;
            }
            match self.apply_event(peer, event).await {
                Ok(copied) => {
                    cursor.seq = event.seq;
                    status.applied += 1;
                    status.bytes_copied += copied;
                    self.metrics.events_applied.get_or_create(&labels).inc();
                    self.metrics
                        .bytes_copied
                        .get_or_create(&labels)
                        .inc_by(copied);
                }
                Err(e) => {
                    status.oldest_pending_ms = event.ms;
                    outcome = Err(e);
                    break;
                }
            }
        }
        if outcome.is_ok() {
            status.oldest_pending_ms = 0;
            status.last_error = None;
        }
        // Guarded by the cursor read at the start: if another node (a
        // former leader) moved it meanwhile, it is not moved back.
        let saved_now = self
            .meta
            .commit(
                Txn::new()
                    .require_unchanged(cursor_key(&peer.name), cursor_seen.as_ref())
                    .put(
                        cursor_key(&peer.name),
                        serde_json::to_vec(&cursor).unwrap_or_default(),
                    ),
            )
            .await
            .map_err(RegistryError::from)?;
        if !saved_now {
            return outcome;
        }
        status.cursor = cursor.seq;
        status.events_behind = status.head.saturating_sub(cursor.seq);
        status.updated_ms = now_ms();
        self.metrics
            .events_behind
            .get_or_create(&labels)
            .set(status.events_behind as i64);
        let behind_secs = if status.oldest_pending_ms == 0 {
            0
        } else {
            now_ms().saturating_sub(status.oldest_pending_ms) / 1000
        };
        self.metrics
            .seconds_behind
            .get_or_create(&labels)
            .set(behind_secs as i64);
        self.save(&status_key(&peer.name), &status).await?;
        outcome
    }

    fn peer_error(peer: &PeerConfig, message: impl Into<String>) -> ReplicationError {
        ReplicationError::Peer {
            peer: peer.name.clone(),
            message: message.into(),
        }
    }

    async fn fetch_feed(&self, peer: &PeerConfig, after: u64) -> Result<FeedPage> {
        let wait = self.options.feed_wait;
        let url = format!(
            "{}/berth/v1/replication/feed?after={after}&limit={FEED_BATCH}&wait_ms={}",
            peer.url.trim_end_matches('/'),
            wait.as_millis()
        );
        let response = self
            .http
            .get(&url)
            .headers(Self::credentials(peer))
            .timeout(wait + Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| Self::peer_error(peer, format!("feed: {e}")))?;
        if !response.status().is_success() {
            return Err(Self::peer_error(
                peer,
                format!("feed: HTTP {}", response.status()),
            ));
        }
        let bytes = response
            .bytes()
            .await
            .map_err(|e| Self::peer_error(peer, format!("feed: {e}")))?;
        let page: FeedPage = serde_json::from_slice(&bytes)
            .map_err(|e| Self::peer_error(peer, format!("feed: invalid page: {e}")))?;
        if page.region != peer.name {
            return Err(Self::peer_error(
                peer,
                format!("feed answered by region {:?}", page.region),
            ));
        }
        Ok(page)
    }

    /// Copies what a change needs and applies it. Returns the bytes copied.
    async fn apply_event(&self, peer: &PeerConfig, event: &ChangeEvent) -> Result<u64> {
        match self.apply_event_once(peer, event).await {
            // Content this region can never take (over its limits, invalid):
            // retrying would block the peer forever. Skipped, and said so.
            Err(ReplicationError::Registry(
                e @ (RegistryError::ManifestInvalid(_)
                | RegistryError::TooLarge { .. }
                | RegistryError::DigestInvalid(_)
                | RegistryError::SizeInvalid(_)),
            )) => {
                tracing::error!(peer = %peer.name, seq = event.seq, error = %e, "skipping a change this region cannot take");
                Ok(0)
            }
            result => result,
        }
    }

    async fn apply_event_once(&self, peer: &PeerConfig, event: &ChangeEvent) -> Result<u64> {
        let repository = event.change.repository();
        if !glob::selected(&peer.include, &peer.exclude, repository) {
            return Ok(0);
        }
        if event.stamp.origin != peer.name {
            // A peer serves only its own writes; anything else is not ours
            // to apply from it.
            return Ok(0);
        }
        let name = RepositoryName::parse(repository)
            .map_err(|e| RegistryError::ManifestInvalid(format!("invalid repository: {e}")))?;
        let mut copied = 0;
        match &event.change {
            Change::Manifest { digest, .. } | Change::Tag { digest, .. } => {
                let present = self
                    .ensure_manifest(peer, &name, digest, &event.stamp, 0, &mut copied)
                    .await?;
                if !present {
                    // Gone at the origin: a later change there says why.
                    tracing::info!(peer = %peer.name, repository, %digest, "skipping a change whose manifest the peer no longer has");
                }
                if present || matches!(event.change, Change::Tag { .. }) {
                    self.registry
                        .apply_change(&event.stamp, &event.change)
                        .await?;
                }
            }
            Change::Untag { .. } | Change::DeleteManifest { .. } => {
                let applied = self
                    .registry
                    .apply_change(&event.stamp, &event.change)
                    .await?;
                if applied == Applied::Changed {
                    tracing::debug!(peer = %peer.name, repository, "applied a delete");
                }
            }
        }
        Ok(copied)
    }

    /// Copies a manifest (an index's children, then blobs, then the
    /// manifest) from the peer unless it is here or deleted here later.
    /// `false` when the peer no longer has it.
    fn ensure_manifest<'a>(
        &'a self,
        peer: &'a PeerConfig,
        name: &'a RepositoryName,
        digest: &'a Digest,
        stamp: &'a Stamp,
        depth: usize,
        copied: &'a mut u64,
    ) -> futures_util::future::BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            if self
                .registry
                .manifest_deleted_after(name, digest, stamp)
                .await?
            {
                return Ok(true);
            }
            let url = format!(
                "{}/v2/{name}/manifests/{digest}",
                peer.url.trim_end_matches('/')
            );
            let limit = self.registry.limits().max_manifest_bytes;
            let response = self
                .http
                .get(&url)
                .headers(Self::credentials(peer))
                .header("accept", MANIFEST_ACCEPT)
                .header("x-berth-local-only", "1")
                .timeout(Duration::from_secs(30))
                .send()
                .await
                .map_err(|e| Self::peer_error(peer, format!("manifest {digest}: {e}")))?;
            if is_gone(response.status()) {
                return Ok(false);
            }
            if !response.status().is_success() {
                return Err(Self::peer_error(
                    peer,
                    format!("manifest {digest}: HTTP {}", response.status()),
                ));
            }
            let content_type = response
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .map(berth_oci::media_type::essence);
            if response.content_length().is_some_and(|n| n > limit) {
                return Err(RegistryError::TooLarge { limit }.into());
            }
            let mut bytes = bytes::BytesMut::new();
            let mut body = response.bytes_stream();
            while let Some(chunk) = body.next().await {
                let chunk =
                    chunk.map_err(|e| Self::peer_error(peer, format!("manifest {digest}: {e}")))?;
                if (bytes.len() + chunk.len()) as u64 > limit {
                    return Err(RegistryError::TooLarge { limit }.into());
                }
                bytes.extend_from_slice(&chunk);
            }
            let bytes = bytes.freeze();
            if Digest::of(digest.algorithm(), &bytes) != *digest {
                return Err(Self::peer_error(
                    peer,
                    format!("manifest {digest}: content does not match its digest"),
                ));
            }
            *copied += bytes.len() as u64;
            let manifest = Manifest::parse(content_type.as_deref(), &bytes)
                .map_err(|e| Self::peer_error(peer, format!("manifest {digest}: {e}")))?;
            if depth < MAX_DEPTH {
                for child in manifest.children() {
                    // A child gone at the origin (deleted there) does not
                    // hold the index back: the origin has the index
                    // without it too.
                    if berth_oci::ManifestKind::from_media_type(&child.media_type).is_some() {
                        self.ensure_manifest(peer, name, &child.digest, stamp, depth + 1, copied)
                            .await?;
                    }
                }
            }
            let blobs: Vec<Digest> = manifest
                .required_blobs()
                .map(|d| d.digest.clone())
                .collect();
            for chunk in blobs.chunks(COPY_CONCURRENCY) {
                let mut copies = Vec::with_capacity(chunk.len());
                for d in chunk {
                    copies.push(self.ensure_blob(peer, name, d));
                }
                for result in futures_util::future::join_all(copies).await {
                    match result? {
                        Some(n) => *copied += n,
                        None => return Ok(false),
                    }
                }
            }
            self.registry
                .store_replicated_manifest(name, digest, content_type.as_deref(), bytes, stamp)
                .await?;
            Ok(true)
        })
    }

    /// Copies a blob from the peer unless it is here. The bytes copied, or
    /// `None` when the peer no longer has it.
    async fn ensure_blob(
        &self,
        peer: &PeerConfig,
        name: &RepositoryName,
        digest: &Digest,
    ) -> Result<Option<u64>> {
        // Confirmed, not only looked up: the manifest committed after the
        // copies relies on the link, so a collector must not take it.
        match self.registry.confirm_blob(name, digest).await {
            Ok(_) => return Ok(Some(0)),
            Err(RegistryError::BlobUnknown(_)) => {}
            Err(e) => return Err(e.into()),
        }
        if self
            .registry
            .mount_blob(name, digest, None)
            .await?
            .is_some()
        {
            return Ok(Some(0));
        }
        let url = format!(
            "{}/v2/{name}/blobs/{digest}",
            peer.url.trim_end_matches('/')
        );
        let response = self
            .http
            .get(&url)
            .headers(Self::credentials(peer))
            .header("x-berth-local-only", "1")
            .send()
            .await
            .map_err(|e| Self::peer_error(peer, format!("blob {digest}: {e}")))?;
        // A blob the peer lacks while it has the manifest (its blob was
        // deleted there) is an error to retry, not a reason to skip.
        if !response.status().is_success() {
            return Err(Self::peer_error(
                peer,
                format!("blob {digest}: HTTP {}", response.status()),
            ));
        }
        let body: ByteStream = Box::pin(
            response
                .bytes_stream()
                .map(|r| r.map_err(std::io::Error::other)),
        );
        // Verified against the digest before it becomes visible.
        let size = self.registry.put_blob(name, digest, body).await?;
        Ok(Some(size))
    }

    fn targets(&self, name: &RepositoryName) -> Vec<Target> {
        let selected = |ns: &str| {
            self.options
                .peers
                .iter()
                .find(|p| p.name == ns)
                .is_some_and(|p| glob::selected(&p.include, &p.exclude, name.as_str()))
        };
        self.peers_cache
            .namespaces()
            .filter(|ns| !self.peers_cache.is_down(ns) && selected(ns))
            .map(|ns| Target {
                namespace: ns.to_string(),
                remote: name.to_string(),
                local: name.clone(),
                via_mirror_default: false,
            })
            .collect()
    }

    fn note_read_through(&self, peer: &str) {
        self.metrics
            .read_throughs
            .get_or_create(&ReplicationMetrics::peer(peer))
            .inc();
    }

    /// On a local miss of a manifest: fetches it from the first peer (that
    /// is up) which has it, stores it by digest, and returns the digest to
    /// serve. Tags are not set here: they arrive by replication, stamped.
    pub async fn read_through_manifest(
        &self,
        name: &RepositoryName,
        reference: &Reference,
    ) -> Option<Digest> {
        for target in self.targets(name) {
            let result = match reference {
                Reference::Digest(d) => self
                    .peers_cache
                    .ensure_manifest(&target, reference)
                    .await
                    .map(|()| d.clone()),
                Reference::Tag(t) => self.peers_cache.read_through_tag(&target, t).await,
            };
            match result {
                Ok(digest) => {
                    self.note_read_through(&target.namespace);
                    return Some(digest);
                }
                Err(e) => {
                    tracing::debug!(peer = %target.namespace, repository = %name, error = %e, "read-through miss")
                }
            }
        }
        None
    }

    /// On a local miss of a blob: the same, streaming it while it is stored.
    pub async fn read_through_blob(
        &self,
        name: &RepositoryName,
        digest: &Digest,
        head: bool,
        ranged: bool,
    ) -> Option<BlobAnswer> {
        for target in self.targets(name) {
            match self.peers_cache.blob(&target, digest, head, ranged).await {
                Ok(answer) => {
                    self.note_read_through(&target.namespace);
                    return Some(answer);
                }
                Err(e) => {
                    tracing::debug!(peer = %target.namespace, repository = %name, %digest, error = %e, "read-through miss")
                }
            }
        }
        None
    }
}
