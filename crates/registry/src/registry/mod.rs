//! The registry: one type whose operations live in a module per concern
//! (blobs, uploads, manifests, tags, referrers, catalog, deletion, removal,
//! gc, trash, retention, changes, compaction, scrub), on the records each owns. This module holds what they share:
//! the stores, the limits, the manifest cache and the transaction helpers.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use berth_oci::{Digest, RepositoryName};
use berth_store::{BlobStore, KeyValue, MetaStore, Txn};
use bytes::Bytes;

mod blobs;
mod browse;
mod catalog;
mod changes;
mod compaction;
mod deletion;
mod gc;
mod manifests;
mod referrers;
mod removal;
mod repair;
mod retention;
mod scrub;
mod tags;
mod trash;
mod uploads;

pub use browse::{MAX_SORTED_TAGS, RepositorySummary, SearchBatch, TagEntry, TagListing};
pub use changes::{Applied, ChangePage, Hlc, StateSummary, stamp_ms};
pub use compaction::{CompactionOptions, CompactionReport, MetadataUsage, RecordKind, Usage};
pub use gc::{GcOptions, GcReport, Progress as GcProgress};
pub use manifests::{ManifestContent, PutManifestOutcome};
pub use removal::Removed;
pub use repair::{BlobSource, RepairOutcome, Repaired};
pub use retention::{
    NameMatcher, PlannedManifest, PlannedTag, RetentionPlan, RetentionReport, RetentionRule,
};
pub use scrub::{Progress as ScrubProgress, ScrubReport};
pub use trash::{TrashEntry, Undeleted};
pub use uploads::{MAX_UPLOAD_PARTS, ORPHAN_GRACE_MS, UploadStatus};

use crate::RegistryError;
use crate::keys;
use crate::records::{RepoRecord, decode, encode};

type Result<T> = std::result::Result<T, RegistryError>;

/// Sizes a client controls, bounded.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_manifest_bytes: u64,
    pub max_blob_bytes: u64,
    /// Largest page of tags or repositories returned at once.
    pub max_page: usize,
    /// Memory for recently served manifests (0 disables the cache).
    pub manifest_cache_bytes: u64,
    /// Largest page of referrers returned at once.
    pub max_referrers_page: usize,
    /// Idle time after which upload sessions expire.
    pub upload_ttl_ms: u64,
    /// A link older than this is dated again when a client relies on it
    /// (see `Registry::confirm_blob`). Garbage collection's grace period
    /// should be well above it.
    pub link_refresh_ms: u64,
    /// How long deleted manifests and tags stay in the trash (0: no
    /// trash).
    pub trash_retention_ms: u64,
    /// How far apart regions' clocks may be: a replicated stamp further
    /// ahead waits, and tombstones outlive the moment they became
    /// prunable by this much.
    pub max_clock_skew_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_manifest_bytes: 4 * 1024 * 1024,
            max_blob_bytes: 1 << 40,
            max_page: 10_000,
            manifest_cache_bytes: 64 * 1024 * 1024,
            max_referrers_page: 1000,
            upload_ttl_ms: 24 * 3600 * 1000,
            link_refresh_ms: 10 * 60 * 1000,
            trash_retention_ms: 7 * 24 * 3600 * 1000,
            max_clock_skew_ms: changes::MAX_CLOCK_SKEW_MS,
        }
    }
}

/// A page of names and whether more follow.
#[derive(Debug)]
pub struct Page {
    pub items: Vec<String>,
    pub more: bool,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Attempts for a transaction that lost a compare-and-swap race before the
/// registry reports the conflict as a storage failure.
const TXN_ATTEMPTS: usize = 16;

/// A short random pause before retrying a transaction that lost a race, so
/// that writers contending on one key (the change log head) spread out.
async fn backoff() {
    let ms = rand::random::<u64>() % 8 + 1;
    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
}

/// Weighs cached manifests by their size.
#[derive(Clone)]
struct ByteWeighter;

impl quick_cache::Weighter<Digest, Bytes> for ByteWeighter {
    fn weight(&self, _digest: &Digest, bytes: &Bytes) -> u64 {
        bytes.len() as u64 + 64
    }
}

type ManifestCache = quick_cache::sync::Cache<Digest, Bytes, ByteWeighter>;

pub struct Registry {
    meta: Arc<dyn MetaStore>,
    blobs: Arc<dyn BlobStore>,
    limits: Limits,
    /// Manifest bytes by digest, verified when loaded. Content-addressed and
    /// immutable, so an entry can never be stale; deleting a manifest removes
    /// its metadata, which is checked before the cache on every request.
    manifests: Option<ManifestCache>,
    /// The region local writes are stamped and logged as (replication on;
    /// without it they are logged under no region's name).
    region: Option<String>,
    hlc: Hlc,
    /// Held from reading the change log's head to committing after it.
    log_lock: tokio::sync::Mutex<()>,
    /// Signalled when a logged write commits (change feed long-polls).
    changes: tokio::sync::Notify,
    /// Which tags clients may not move or delete once pushed.
    immutable: Option<ImmutableTags>,
}

/// Decides whether a tag of a repository is immutable (the `[[immutable]]`
/// rules; the registry knows nothing of their syntax).
pub type ImmutableTags = Arc<dyn Fn(&RepositoryName, &str) -> bool + Send + Sync>;
impl Registry {
    /// Turns replication on: local writes are stamped as `region`'s.
    pub fn with_region(mut self, region: String) -> Self {
        self.region = Some(region);
        self
    }

    /// Makes the tags `rule` names immutable for clients: the first push
    /// of such a tag succeeds, moving or deleting it afterwards is refused.
    /// Copies from other regions and the pull-through cache follow their
    /// source regardless (so that regions converge).
    pub fn with_immutable_tags(mut self, rule: ImmutableTags) -> Self {
        self.immutable = Some(rule);
        self
    }

    /// Refuses a client's change of a tag that points at `current` if an
    /// immutable rule covers it.
    pub(super) fn check_mutable(
        &self,
        name: &RepositoryName,
        tag: &str,
        current: &Digest,
    ) -> Result<()> {
        match &self.immutable {
            Some(rule) if rule(name, tag) => Err(RegistryError::TagImmutable {
                repository: name.to_string(),
                tag: tag.to_string(),
                digest: current.clone(),
            }),
            _ => Ok(()),
        }
    }

    pub fn new(meta: Arc<dyn MetaStore>, blobs: Arc<dyn BlobStore>, limits: Limits) -> Self {
        let manifests = (limits.manifest_cache_bytes > 0).then(|| {
            // Estimated entries: typical manifests are 0.5-2 KiB.
            let items = (limits.manifest_cache_bytes / 1024).clamp(16, 1 << 20) as usize;
            ManifestCache::with_weighter(items, limits.manifest_cache_bytes, ByteWeighter)
        });
        Self {
            meta,
            blobs,
            limits,
            manifests,
            region: None,
            log_lock: tokio::sync::Mutex::new(()),
            hlc: Hlc::default(),
            changes: tokio::sync::Notify::new(),
            immutable: None,
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The metadata store, for the server's own records (console sessions).
    pub fn meta(&self) -> &Arc<dyn MetaStore> {
        &self.meta
    }

    pub async fn check_health(&self) -> Result<()> {
        self.meta.check_health().await?;
        self.blobs.check_health().await?;
        Ok(())
    }

    pub(crate) fn meta_store(&self) -> &Arc<dyn MetaStore> {
        &self.meta
    }

    pub(crate) fn blob_store(&self) -> &Arc<dyn BlobStore> {
        &self.blobs
    }

    /// Moves this node's clock past a stamp written elsewhere (restored).
    pub(crate) fn observe_hlc(&self, hlc: u64) {
        self.hlc.observe(hlc);
    }

    pub(crate) async fn get_record<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>> {
        match self.meta.get(key.as_bytes()).await? {
            Some(kv) => Ok(Some(decode(&kv.key, &kv.value)?)),
            None => Ok(None),
        }
    }

    /// Reads `keys` (in one round trip where the store can), in order.
    pub(super) async fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<KeyValue>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<Vec<u8>> = keys.iter().map(|k| k.as_bytes().to_vec()).collect();
        let found = self.meta.get_many(&keys).await?;
        if found.len() != keys.len() {
            return Err(RegistryError::Store(berth_store::StoreError::Database(
                format!(
                    "the metadata store answered {} of {} reads",
                    found.len(),
                    keys.len()
                ),
            )));
        }
        Ok(found)
    }

    /// Adds the repository record to `txn` unless it exists. Creating it twice
    /// in a race is harmless: the record only carries a creation time.
    async fn ensure_repo(&self, name: &RepositoryName, txn: Txn) -> Result<Txn> {
        let exists = self.meta.get(keys::repo(name).as_bytes()).await?.is_some();
        Ok(with_repo(name, txn, exists))
    }

    async fn scan_all(&self, prefix: &str) -> Result<Vec<KeyValue>> {
        let mut out = Vec::new();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let batch = self
                .meta
                .scan(prefix.as_bytes(), after.as_deref(), 1000)
                .await?;
            let Some(last) = batch.last() else { break };
            after = Some(last.key.clone());
            out.extend(batch);
        }
        Ok(out)
    }
}

/// As [`Registry::ensure_repo`], with the record's presence already read.
fn with_repo(name: &RepositoryName, txn: Txn, exists: bool) -> Txn {
    if exists {
        return txn;
    }
    txn.put(
        keys::repo(name),
        encode(&RepoRecord {
            created_ms: now_ms(),
        }),
    )
}
