use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use berth_oci::{
    ByteRange, Descriptor, Digest, Manifest, ManifestKind, Reference, RepositoryName, Tag,
};
use berth_store::{
    BlobRead, BlobStore, ByteStream, KeyValue, MetaStore, PutError, Txn, UploadPart,
};
use bytes::Bytes;

mod changes;

pub use changes::{Applied, Hlc, StateSummary, stamp_ms};

use crate::RegistryError;
use crate::keys;
use crate::records::{
    BlobRecord, Change, LinkRecord, ManifestRecord, PlatformChild, RepoRecord, Stamp, TagRecord,
    UploadRecord, decode, encode,
};

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
        }
    }
}

/// A page of names and whether more follow.
#[derive(Debug)]
pub struct Page {
    pub items: Vec<String>,
    pub more: bool,
}

pub struct ManifestContent {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
}

pub struct PutManifestOutcome {
    pub digest: Digest,
    pub subject: Option<Digest>,
}

pub struct UploadStatus {
    pub size: u64,
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

/// A blob removal must delete the bytes within this time of marking the
/// blob's record, or give up.
const REMOVAL_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

/// A removal mark older than this was abandoned (its remover gave up or
/// died): linking the blob may proceed if its bytes are there. Far above
/// `REMOVAL_WINDOW`, to allow for clock differences between nodes.
const REMOVAL_MARK_STALE_MS: u64 = 5 * 60 * 1000;

/// Most chunks one upload may have. Each is a part in the session record
/// (about 150 bytes) and each chunk rewrites the record, so the record must
/// stay well inside etcd's request limit and its history small.
pub const MAX_UPLOAD_PARTS: usize = 1024;

/// How long the record of a completed upload answers a retried PUT.
const COMPLETED_KEEP_MS: u64 = 10 * 60 * 1000;

/// Upload records read per scan: at most 1024 parts each, so a batch stays
/// under etcd's 4 MiB response limit.
const UPLOAD_SCAN_BATCH: usize = 16;

/// Age after which upload data without a session is removed while other
/// nodes may be creating sessions.
pub const ORPHAN_GRACE_MS: u64 = 15 * 60 * 1000;

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
    /// The region whose change log local writes go to (replication on).
    region: Option<String>,
    hlc: Hlc,
    /// Signalled when a logged write commits (change feed long-polls).
    changes: tokio::sync::Notify,
}

impl Registry {
    /// Turns replication on: local writes are logged as `region`'s.
    pub fn with_region(mut self, region: String) -> Self {
        self.region = Some(region);
        self
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
            hlc: Hlc::default(),
            changes: tokio::sync::Notify::new(),
        }
    }

    async fn manifest_bytes(&self, digest: &Digest, size: u64) -> Result<Option<Bytes>> {
        if let Some(bytes) = self.manifests.as_ref().and_then(|c| c.get(digest)) {
            return Ok(Some(bytes));
        }
        let bytes = self
            .blobs
            .read_small(digest, self.limits.max_manifest_bytes.max(size))
            .await?;
        if let (Some(cache), Some(b)) = (&self.manifests, &bytes) {
            cache.insert(digest.clone(), b.clone());
        }
        Ok(bytes)
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub async fn check_health(&self) -> Result<()> {
        self.meta.check_health().await?;
        self.blobs.check_health().await?;
        Ok(())
    }

    async fn get_record<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        match self.meta.get(key.as_bytes()).await? {
            Some(kv) => Ok(Some(decode(&kv.key, &kv.value)?)),
            None => Ok(None),
        }
    }

    /// Adds the repository record to `txn` unless it exists. Creating it twice
    /// in a race is harmless: the record only carries a creation time.
    async fn ensure_repo(&self, name: &RepositoryName, txn: Txn) -> Result<Txn> {
        let key = keys::repo(name);
        if self.meta.get(key.as_bytes()).await?.is_some() {
            return Ok(txn);
        }
        Ok(txn.put(
            key,
            encode(&RepoRecord {
                created_ms: now_ms(),
            }),
        ))
    }

    // ---- blobs -------------------------------------------------------------

    async fn link(&self, name: &RepositoryName, digest: &Digest) -> Result<Option<LinkRecord>> {
        self.get_record(&keys::link(name, digest)).await
    }

    /// Size of a blob visible in the repository.
    pub async fn stat_blob(&self, name: &RepositoryName, digest: &Digest) -> Result<u64> {
        match self.link(name, digest).await? {
            Some(link) => Ok(link.size),
            None => Err(RegistryError::BlobUnknown(digest.clone())),
        }
    }

    /// Opens a blob visible in the repository, whole or the part a `Range`
    /// header asks for (returned with the stream; `None` for the whole blob).
    pub async fn read_blob(
        &self,
        name: &RepositoryName,
        digest: &Digest,
        range_header: Option<&str>,
    ) -> Result<(BlobRead, Option<ByteRange>)> {
        let recorded = self.stat_blob(name, digest).await?;
        let range = match range_header {
            None => None,
            Some(h) => berth_oci::range::parse_range_header(h, recorded)
                .map_err(|_| RegistryError::RangeNotSatisfiable { size: recorded })?,
        };
        let read = match self.blobs.read(digest, range).await? {
            // A file of the wrong length is damaged at rest (an empty one
            // would even pass verification): never serve it as the blob.
            Some(read) if read.size != recorded => {
                tracing::error!(repository = %name, %digest, recorded, stored = read.size, "stored blob has the wrong size; refusing to serve it");
                Err(RegistryError::Store(berth_store::StoreError::Io(
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!(
                            "stored blob {digest} is {} bytes, {recorded} expected",
                            read.size
                        ),
                    ),
                )))
            }
            Some(read) => Ok(read),
            None => {
                tracing::error!(repository = %name, %digest, "blob is linked but its bytes are missing");
                Err(RegistryError::BlobUnknown(digest.clone()))
            }
        }?;
        Ok((read, range))
    }

    /// A URL where the storage serves the blob directly, when configured,
    /// for a blob visible in the repository.
    pub async fn blob_redirect(
        &self,
        name: &RepositoryName,
        digest: &Digest,
    ) -> Result<Option<String>> {
        let Some(url) = self.blobs.redirect_url(digest).await? else {
            return Ok(None);
        };
        self.stat_blob(name, digest).await?;
        Ok(Some(url))
    }

    pub async fn delete_blob(&self, name: &RepositoryName, digest: &Digest) -> Result<()> {
        let key = keys::link(name, digest);
        let Some(seen) = self.meta.get(key.as_bytes()).await? else {
            return Err(RegistryError::BlobUnknown(digest.clone()));
        };
        // The bytes stay until garbage collection: other repositories and
        // manifests may still reference them.
        self.meta
            .commit(
                Txn::new()
                    .require_version(key.clone(), seen.version)
                    .delete(key),
            )
            .await?;
        Ok(())
    }

    /// Makes a stored blob visible in `name`.
    async fn commit_link(&self, name: &RepositoryName, digest: &Digest, size: u64) -> Result<()> {
        // An identical link is left alone: rewriting it would change its
        // version and make concurrent manifest pushes that guard on it retry.
        if self
            .link(name, digest)
            .await?
            .is_some_and(|l| l.size == size)
        {
            return Ok(());
        }
        for _ in 0..TXN_ATTEMPTS {
            let seen = self.blob_record_for_link(digest, size).await?;
            let txn = Txn::new().put(keys::link(name, digest), encode(&LinkRecord { size }));
            let txn = self.guard_blob_record(txn, digest, size, seen.as_ref())?;
            let txn = self.ensure_repo(name, txn).await?;
            if self.meta.commit(txn).await? {
                return Ok(());
            }
        }
        Err(RegistryError::Store(berth_store::StoreError::Unavailable(
            "the blob kept changing while it was linked; retry".into(),
        )))
    }

    /// The registry-wide record of a blob about to be linked, after checking
    /// that its bytes are stored and not being removed. The link's commit
    /// must require this record unchanged: that is what orders it against
    /// `remove_unreferenced_blobs`, which marks the record before it looks
    /// for links and deletes bytes.
    async fn blob_record_for_link(&self, digest: &Digest, size: u64) -> Result<Option<KeyValue>> {
        let seen = self.meta.get(keys::blob(digest).as_bytes()).await?;
        if let Some(kv) = &seen {
            let record: BlobRecord = decode(&kv.key, &kv.value)?;
            if record
                .removing_since_ms
                .is_some_and(|since| now_ms().saturating_sub(since) < REMOVAL_MARK_STALE_MS)
            {
                return Err(RegistryError::Store(berth_store::StoreError::Unavailable(
                    format!("blob {digest} is being removed from storage; retry"),
                )));
            }
        }
        // Removed (bytes, then record) before `seen` was read: the bytes the
        // caller stored may be gone. A removal after this must mark the
        // record first, which fails the caller's commit.
        if self.blobs.stat(digest).await? != Some(size) {
            return Err(RegistryError::Store(berth_store::StoreError::Unavailable(
                format!("blob {digest} was removed from storage meanwhile; retry"),
            )));
        }
        Ok(seen)
    }

    /// Adds to a link's transaction the guard on the blob's registry-wide
    /// record: unchanged since `seen`. The record is written only when it
    /// is missing or carries a stale removal mark, so that concurrent links
    /// of one popular blob do not invalidate each other.
    fn guard_blob_record(
        &self,
        txn: Txn,
        digest: &Digest,
        size: u64,
        seen: Option<&KeyValue>,
    ) -> Result<Txn> {
        let txn = txn.require_unchanged(keys::blob(digest), seen);
        let current = match seen {
            Some(kv) => {
                let record: BlobRecord = decode(&kv.key, &kv.value)?;
                record.size == size && record.removing_since_ms.is_none()
            }
            None => false,
        };
        Ok(if current {
            txn
        } else {
            txn.put(keys::blob(digest), encode(&BlobRecord::new(size)))
        })
    }

    /// The size of a blob stored anywhere in the registry, if it is and is
    /// not being removed.
    pub async fn stored_blob_size(&self, digest: &Digest) -> Result<Option<u64>> {
        Ok(self
            .get_record::<BlobRecord>(&keys::blob(digest))
            .await?
            .filter(|b| b.removing_since_ms.is_none())
            .map(|b| b.size))
    }

    /// Removes the bytes of blobs that no repository links any more (cache
    /// eviction calls it for the blobs it unlinked). Returns how many were
    /// removed.
    ///
    /// Safe against concurrent pushes and mounts of the same content. Each
    /// candidate's registry-wide record is first marked "being removed"; a
    /// link commit requires that record unchanged (and its bytes present), so
    /// from the mark on no new link can be made, and every link made before
    /// it is seen by the scan of links that follows. Blobs found linked are
    /// unmarked; the others lose their bytes, within a bounded time of the
    /// mark, and then their record.
    pub async fn remove_unreferenced_blobs(&self, candidates: &[Digest]) -> Result<usize> {
        let mut marked = std::collections::HashMap::new();
        let started = std::time::Instant::now();
        for digest in candidates {
            let key = keys::blob(digest);
            let Some(kv) = self.meta.get(key.as_bytes()).await? else {
                continue;
            };
            let mut record: BlobRecord = decode(&kv.key, &kv.value)?;
            record.removing_since_ms = Some(now_ms());
            let txn = Txn::new()
                .require_version(key.clone(), kv.version)
                .put(key.clone(), encode(&record));
            if self.meta.commit(txn).await?
                && let Some(kv) = self.meta.get(key.as_bytes()).await?
            {
                marked.insert(digest.clone(), (kv, record.size));
            }
        }
        if marked.is_empty() {
            return Ok(0);
        }
        let mut linked = std::collections::HashSet::new();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let batch = self
                .meta
                .scan(keys::LINK_PREFIX.as_bytes(), after.as_deref(), 1000)
                .await?;
            let Some(last) = batch.last() else { break };
            after = Some(last.key.clone());
            for kv in batch {
                if let Some(digest) = keys::link_digest(&kv.key)
                    && marked.contains_key(&digest)
                {
                    linked.insert(digest);
                }
            }
        }
        let mut removed = 0;
        for (digest, (kv, size)) in marked {
            let key = keys::blob(&digest);
            // The bytes go within the window or not at all: past it, a pusher
            // may consider the mark abandoned.
            let left = REMOVAL_WINDOW.saturating_sub(started.elapsed());
            let deleted = !linked.contains(&digest)
                && !left.is_zero()
                && match tokio::time::timeout(left, self.blobs.delete(&digest)).await {
                    Ok(Ok(())) => true,
                    Ok(Err(e)) => {
                        tracing::warn!(%digest, error = %e, "could not remove an unreferenced blob");
                        false
                    }
                    Err(_) => {
                        tracing::warn!(%digest, "removing an unreferenced blob timed out");
                        false
                    }
                };
            let end = if deleted {
                Txn::new()
                    .require_version(key.clone(), kv.version)
                    .delete(key)
            } else {
                // Still linked, or the bytes were not deleted: unmark, so
                // that the blob can be linked at once again.
                Txn::new()
                    .require_version(key.clone(), kv.version)
                    .put(key, encode(&BlobRecord::new(size)))
            };
            if self.meta.commit(end).await? && deleted {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Points a tag at a manifest recorded in the repository.
    pub async fn tag_manifest(
        &self,
        name: &RepositoryName,
        tag: &Tag,
        digest: &Digest,
    ) -> Result<()> {
        let key = keys::manifest(name, digest);
        let Some(seen) = self.meta.get(key.as_bytes()).await? else {
            return Err(RegistryError::ManifestUnknown);
        };
        let txn = Txn::new().require_version(key, seen.version).put(
            keys::tag(name, tag.as_str()),
            encode(&TagRecord {
                digest: digest.clone(),
                updated_ms: now_ms(),
                stamp: None,
            }),
        );
        if !self.meta.commit(txn).await? {
            return Err(RegistryError::ManifestUnknown);
        }
        Ok(())
    }

    /// Digests of every manifest recorded in the repository.
    pub async fn manifest_digests(&self, name: &RepositoryName) -> Result<Vec<Digest>> {
        let prefix = keys::manifest_prefix(name);
        Ok(self
            .scan_all(&prefix)
            .await?
            .into_iter()
            .filter_map(|kv| {
                std::str::from_utf8(&kv.key[prefix.len()..])
                    .ok()?
                    .parse()
                    .ok()
            })
            .collect())
    }

    /// Whether a manifest recorded in `name` references `digest`: the
    /// repository then has the right to its content (a cache may link a
    /// blob it holds elsewhere instead of fetching it again).
    pub async fn references_blob(&self, name: &RepositoryName, digest: &Digest) -> Result<bool> {
        for manifest in self.manifest_digests(name).await? {
            if let Some(record) = self.find_manifest(name, &manifest).await?
                && record.references.contains(digest)
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Single-request upload (`POST ?digest=` or a PUT without session data).
    pub async fn put_blob(
        &self,
        name: &RepositoryName,
        digest: &Digest,
        body: ByteStream,
    ) -> Result<u64> {
        let size = self
            .blobs
            .put(digest, body, self.limits.max_blob_bytes)
            .await
            .map_err(RegistryError::from_put)?;
        self.commit_link(name, digest, size).await?;
        Ok(size)
    }

    /// Cross-repository mount. With `from`, the blob must be visible there;
    /// without it, anywhere in the registry. `None` when it cannot be mounted.
    pub async fn mount_blob(
        &self,
        name: &RepositoryName,
        digest: &Digest,
        from: Option<&RepositoryName>,
    ) -> Result<Option<u64>> {
        let known = match from {
            Some(from) => self.link(from, digest).await?.map(|l| l.size),
            None => self
                .get_record::<BlobRecord>(&keys::blob(digest))
                .await?
                .map(|b| b.size),
        };
        let Some(size) = known else { return Ok(None) };
        if self.stored_blob_size(digest).await? != Some(size) {
            // Being removed (or never recorded): not mountable; the client
            // uploads it instead.
            return Ok(None);
        }
        if self.blobs.stat(digest).await? != Some(size) {
            tracing::warn!(%digest, "mount source is recorded but its bytes are missing");
            return Ok(None);
        }
        self.commit_link(name, digest, size).await?;
        Ok(Some(size))
    }

    // ---- uploads -----------------------------------------------------------

    pub async fn start_upload(&self, name: &RepositoryName) -> Result<String> {
        let id = uuid::Uuid::new_v4().to_string();
        let now = now_ms();
        let record = UploadRecord {
            repository: name.to_string(),
            created_ms: now,
            updated_ms: now,
            size: 0,
            parts: Vec::new(),
            completed: None,
        };
        let created = self
            .meta
            .commit(
                Txn::new()
                    .require_absent(keys::upload(&id))
                    .put(keys::upload(&id), encode(&record)),
            )
            .await?;
        if !created {
            return Err(RegistryError::BlobUploadInvalid(
                "upload id collision".into(),
            ));
        }
        Ok(id)
    }

    /// The session of an upload in progress.
    async fn upload_session(
        &self,
        name: &RepositoryName,
        id: &str,
    ) -> Result<(KeyValue, UploadRecord)> {
        match self.upload_record(name, id).await? {
            (_, record) if record.completed.is_some() => Err(RegistryError::BlobUploadUnknown),
            found => Ok(found),
        }
    }

    /// The session record, in progress or recently completed.
    async fn upload_record(
        &self,
        name: &RepositoryName,
        id: &str,
    ) -> Result<(KeyValue, UploadRecord)> {
        if uuid::Uuid::parse_str(id).is_err() {
            return Err(RegistryError::BlobUploadUnknown);
        }
        let kv = self
            .meta
            .get(keys::upload(id).as_bytes())
            .await?
            .ok_or(RegistryError::BlobUploadUnknown)?;
        let record: UploadRecord = decode(&kv.key, &kv.value)?;
        if record.repository != name.as_str() {
            return Err(RegistryError::BlobUploadUnknown);
        }
        Ok((kv, record))
    }

    pub async fn upload_status(&self, name: &RepositoryName, id: &str) -> Result<UploadStatus> {
        let (_, record) = self.upload_session(name, id).await?;
        Ok(UploadStatus { size: record.size })
    }

    /// Appends a chunk. `range` is the client's `Content-Range`, if sent: it
    /// must start at the current size (else `RangeMismatch`), and its length
    /// must agree with `content_length` when both are given. A chunk that is
    /// not as long as announced is discarded (`SIZE_INVALID`).
    ///
    /// The chunk is stored as a new part first, then added to the session by
    /// compare-and-swap; of two chunks racing for one offset (from clients
    /// on different nodes) exactly one is recorded and the other's part is
    /// deleted.
    pub async fn append_upload(
        &self,
        name: &RepositoryName,
        id: &str,
        range: Option<ByteRange>,
        content_length: Option<u64>,
        body: ByteStream,
    ) -> Result<UploadStatus> {
        let (kv, record) = self.upload_session(name, id).await?;
        let current = record.size;
        let expected_len = match range {
            Some(r) => {
                if r.start != current {
                    return Err(RegistryError::RangeMismatch { size: current });
                }
                if let Some(len) = content_length
                    && len != r.len()
                {
                    return Err(RegistryError::SizeInvalid(format!(
                        "Content-Range covers {} bytes but Content-Length is {len}",
                        r.len()
                    )));
                }
                Some(r.len())
            }
            None => content_length,
        };
        if record.parts.len() >= MAX_UPLOAD_PARTS {
            return Err(RegistryError::BlobUploadInvalid(format!(
                "an upload may have at most {MAX_UPLOAD_PARTS} chunks"
            )));
        }
        // Mark the session active before a possibly long transfer, so that
        // expiry never removes a session while it is receiving.
        self.touch_upload(&kv, &record).await?;
        let limit = self.limits.max_blob_bytes;
        let part = self
            .blobs
            .write_part(id, expected_len, body, limit.saturating_sub(current))
            .await
            .map_err(|e| match e {
                PutError::TooLarge { .. } => RegistryError::TooLarge { limit },
                e => RegistryError::from_put(e),
            })?;
        if part.size == 0 {
            self.blobs.delete_part(id, &part).await?;
            return Ok(UploadStatus { size: current });
        }
        match self.record_part(id, current, &part).await {
            Ok(size) => Ok(UploadStatus { size }),
            Err(e) => {
                // Rejected for sure: the part is nobody's. (After a storage
                // error the commit may have applied, so the part stays; it
                // goes with the upload.)
                if !matches!(e, RegistryError::Store(_)) {
                    self.blobs.delete_part(id, &part).await?;
                }
                Err(e)
            }
        }
    }

    /// Adds a written part to the session if the session still ends at
    /// `offset`. Returns the new size.
    async fn record_part(&self, id: &str, offset: u64, part: &UploadPart) -> Result<u64> {
        let key = keys::upload(id);
        for _ in 0..TXN_ATTEMPTS {
            let kv = self
                .meta
                .get(key.as_bytes())
                .await?
                .ok_or(RegistryError::BlobUploadUnknown)?;
            let mut record: UploadRecord = decode(&kv.key, &kv.value)?;
            if record.completed.is_some() {
                return Err(RegistryError::BlobUploadUnknown);
            }
            if record.size != offset {
                return Err(RegistryError::RangeMismatch { size: record.size });
            }
            record.size += part.size;
            record.parts.push(part.clone());
            record.updated_ms = now_ms();
            let recorded = self
                .meta
                .commit(
                    Txn::new()
                        .require_version(key.clone(), kv.version)
                        .put(key.clone(), encode(&record)),
                )
                .await?;
            if recorded {
                return Ok(record.size);
            }
        }
        Err(RegistryError::Store(berth_store::StoreError::Database(
            "upload session kept changing".into(),
        )))
    }

    /// Refreshes the session's activity time, at most every minute (each
    /// refresh is a durable write) and at least four times per TTL.
    async fn touch_upload(&self, kv: &KeyValue, record: &UploadRecord) -> Result<()> {
        let now = now_ms();
        let interval = (self.limits.upload_ttl_ms / 4).min(60_000);
        if now.saturating_sub(record.updated_ms) < interval {
            return Ok(());
        }
        let mut record = record.clone();
        record.updated_ms = now;
        let touched = self
            .meta
            .commit(
                Txn::new()
                    .require_version(kv.key.clone(), kv.version)
                    .put(kv.key.clone(), encode(&record)),
            )
            .await?;
        // Losing the race to a concurrent chunk is fine (it touched the
        // session too); losing it to expiry or a cancel ends the upload.
        if !touched && self.meta.get(&kv.key).await?.is_none() {
            return Err(RegistryError::BlobUploadUnknown);
        }
        Ok(())
    }

    /// Completes an upload: appends the final chunk (if any), verifies the
    /// digest and makes the blob visible. The session ends when the blob is
    /// committed or the content is proven wrong; after a storage failure it
    /// stays, so the client may retry.
    pub async fn complete_upload(
        &self,
        name: &RepositoryName,
        id: &str,
        digest: &Digest,
        final_chunk: Option<(Option<ByteRange>, Option<u64>, ByteStream)>,
    ) -> Result<u64> {
        if let Some((range, len, body)) = final_chunk {
            match self.append_upload(name, id, range, len, body).await {
                Err(RegistryError::BlobUploadUnknown) => {
                    return self.already_completed(name, id, digest).await;
                }
                other => {
                    other?;
                }
            }
        }
        let (kv, record) = self.upload_record(name, id).await?;
        if record.completed.is_some() {
            return self.already_completed(name, id, digest).await;
        }
        let size = match self.blobs.commit_parts(id, &record.parts, digest).await {
            Ok(size) => size,
            Err(e @ (PutError::DigestMismatch { .. } | PutError::PartMissing(_))) => {
                if let Ok(size) = self.already_completed(name, id, digest).await {
                    // A concurrent attempt of this same PUT (a client retry
                    // on another node) completed it and removed the parts.
                    return Ok(size);
                }
                // The content is proven wrong or gone: so is the session. The
                // version guard keeps a session that changed meanwhile (or
                // that a stale read showed incomplete) from being destroyed.
                let ended = self
                    .meta
                    .commit(
                        Txn::new()
                            .require_version(kv.key.clone(), kv.version)
                            .delete(kv.key.clone()),
                    )
                    .await?;
                if !ended {
                    return Err(RegistryError::Store(berth_store::StoreError::Unavailable(
                        "the upload changed while it was being completed; retry".into(),
                    )));
                }
                self.discard_upload_data(id).await;
                return Err(RegistryError::from_put(e));
            }
            Err(e) => return Err(RegistryError::from_put(e)),
        };
        let completed = UploadRecord {
            updated_ms: now_ms(),
            size,
            parts: Vec::new(),
            completed: Some(digest.clone()),
            ..record
        };
        for _ in 0..TXN_ATTEMPTS {
            let seen = self.blob_record_for_link(digest, size).await?;
            let txn = Txn::new()
                .put(kv.key.clone(), encode(&completed))
                .put(keys::link(name, digest), encode(&LinkRecord { size }));
            let txn = self.guard_blob_record(txn, digest, size, seen.as_ref())?;
            let txn = self.ensure_repo(name, txn).await?;
            if self.meta.commit(txn).await? {
                self.discard_upload_data(id).await;
                return Ok(size);
            }
        }
        Err(RegistryError::Store(berth_store::StoreError::Unavailable(
            "the blob kept changing while the upload completed; retry".into(),
        )))
    }

    /// The answer to a completion of an upload that already completed: the
    /// same success if it completed as this digest and the blob is still in
    /// the repository, else the session is unknown.
    async fn already_completed(
        &self,
        name: &RepositoryName,
        id: &str,
        digest: &Digest,
    ) -> Result<u64> {
        let (_, record) = self.upload_record(name, id).await?;
        if record.completed.as_ref() != Some(digest) {
            return Err(RegistryError::BlobUploadUnknown);
        }
        match self.link(name, digest).await? {
            Some(link) => Ok(link.size),
            None => Err(RegistryError::BlobUploadUnknown),
        }
    }

    /// Deletes an ended upload's parts. A failure only leaves data that the
    /// expiry job removes later, so it is logged, not returned.
    async fn discard_upload_data(&self, id: &str) {
        if let Err(e) = self.blobs.delete_upload(id).await {
            tracing::warn!(upload = %id, error = %e, "could not delete the data of an ended upload");
        }
    }

    pub async fn cancel_upload(&self, name: &RepositoryName, id: &str) -> Result<()> {
        let (kv, _) = self.upload_session(name, id).await?;
        // Unguarded: a chunk recorded meanwhile is cancelled with the rest.
        self.meta.commit(Txn::new().delete(kv.key.clone())).await?;
        self.discard_upload_data(id).await;
        Ok(())
    }

    /// Expires upload sessions idle for longer than `ttl_ms`, and removes
    /// upload data that no session refers to (left by a crash) once it is
    /// older than `orphan_grace_ms`. Returns how many sessions were expired.
    ///
    /// The grace period protects a session created after the scan of
    /// sessions, whose first part is already stored; only a process that is
    /// alone with its stores (an embedded node at startup) may pass zero.
    pub async fn expire_uploads(&self, ttl_ms: u64, orphan_grace_ms: u64) -> Result<usize> {
        let now = now_ms();
        let mut expired = 0;
        let mut after: Option<Vec<u8>> = None;
        let mut live = std::collections::HashSet::new();
        loop {
            let batch = self
                .meta
                .scan(
                    keys::UPLOAD_PREFIX.as_bytes(),
                    after.as_deref(),
                    UPLOAD_SCAN_BATCH,
                )
                .await?;
            let Some(last) = batch.last() else { break };
            after = Some(last.key.clone());
            for kv in batch {
                let id = String::from_utf8_lossy(&kv.key[keys::UPLOAD_PREFIX.len()..]).into_owned();
                let (repository, updated_ms, completed) =
                    match decode::<UploadRecord>(&kv.key, &kv.value) {
                        Ok(r) => (r.repository, r.updated_ms, r.completed.is_some()),
                        Err(e) => {
                            tracing::warn!(error = %e, "dropping unreadable upload record");
                            (String::new(), 0, false)
                        }
                    };
                let keep_ms = if completed { COMPLETED_KEEP_MS } else { ttl_ms };
                if now.saturating_sub(updated_ms) > keep_ms {
                    let removed = self
                        .meta
                        .commit(
                            Txn::new()
                                .require_version(kv.key.clone(), kv.version)
                                .delete(kv.key.clone()),
                        )
                        .await?;
                    if !removed {
                        // A chunk refreshed it meanwhile: it lives.
                        live.insert(id);
                    } else if !completed {
                        self.discard_upload_data(&id).await;
                        expired += 1;
                        tracing::info!(upload = %id, %repository, "expired idle upload session");
                    }
                } else {
                    live.insert(id);
                }
            }
        }
        for upload in self.blobs.list_uploads().await? {
            if live.contains(&upload.id) || now.saturating_sub(upload.modified_ms) < orphan_grace_ms
            {
                continue;
            }
            // The scan may have been served by a lagging etcd member; a
            // compare-only transaction goes through the quorum and proves
            // the session really is gone before its data is.
            let session = keys::upload(&upload.id);
            if !self.meta.commit(Txn::new().require_absent(session)).await? {
                continue;
            }
            tracing::info!(upload = %upload.id, "removing upload data without a session");
            self.discard_upload_data(&upload.id).await;
        }
        Ok(expired)
    }

    pub async fn open_uploads(&self) -> Result<usize> {
        let mut count = 0;
        let mut after: Option<Vec<u8>> = None;
        loop {
            let batch = self
                .meta
                .scan(
                    keys::UPLOAD_PREFIX.as_bytes(),
                    after.as_deref(),
                    UPLOAD_SCAN_BATCH,
                )
                .await?;
            let Some(last) = batch.last() else {
                return Ok(count);
            };
            after = Some(last.key.clone());
            count += batch
                .iter()
                .filter(|kv| {
                    decode::<UploadRecord>(&kv.key, &kv.value).is_ok_and(|r| r.completed.is_none())
                })
                .count();
        }
    }

    // ---- manifests ---------------------------------------------------------

    async fn resolve(&self, name: &RepositoryName, reference: &Reference) -> Result<Digest> {
        match reference {
            Reference::Digest(d) => Ok(d.clone()),
            Reference::Tag(tag) => {
                let record: TagRecord = self
                    .get_record(&keys::tag(name, tag.as_str()))
                    .await?
                    .ok_or(RegistryError::ManifestUnknown)?;
                Ok(record.digest)
            }
        }
    }

    async fn manifest_record(
        &self,
        name: &RepositoryName,
        digest: &Digest,
    ) -> Result<ManifestRecord> {
        self.get_record(&keys::manifest(name, digest))
            .await?
            .ok_or(RegistryError::ManifestUnknown)
    }

    /// Resolves a reference to the manifest to serve, honouring `accept`
    /// (the client's Accept header media types, empty when absent).
    ///
    /// A client that asks by tag and cannot accept an index or manifest list
    /// gets the index's linux/amd64 image, as CNCF Distribution does for old
    /// clients. A digest always names exact content and is never substituted.
    pub async fn manifest_head(
        &self,
        name: &RepositoryName,
        reference: &Reference,
        accept: &[String],
    ) -> Result<(Digest, ManifestRecord)> {
        let digest = self.resolve(name, reference).await?;
        let record = self.manifest_record(name, &digest).await?;
        if matches!(reference, Reference::Tag(_))
            && !accept.is_empty()
            && !accepts(accept, &record.media_type)
            && let Some(child) = record
                .platforms
                .iter()
                .find(|p| p.os == "linux" && p.architecture == "amd64")
            && let Ok(child_record) = self.manifest_record(name, &child.digest).await
            && accepts(accept, &child_record.media_type)
        {
            return Ok((child.digest.clone(), child_record));
        }
        Ok((digest, record))
    }

    pub async fn get_manifest(
        &self,
        name: &RepositoryName,
        reference: &Reference,
        accept: &[String],
    ) -> Result<ManifestContent> {
        let (digest, record) = self.manifest_head(name, reference, accept).await?;
        let bytes = self
            .manifest_bytes(&digest, record.size)
            .await?
            .ok_or_else(|| {
                tracing::error!(repository = %name, %digest, "manifest is recorded but its bytes are missing");
                RegistryError::ManifestUnknown
            })?;
        Ok(ManifestContent {
            digest,
            media_type: record.media_type,
            bytes,
        })
    }

    pub async fn put_manifest(
        &self,
        name: &RepositoryName,
        reference: &Reference,
        content_type: Option<&str>,
        bytes: Bytes,
    ) -> Result<PutManifestOutcome> {
        let (digest, manifest) = self.parse_manifest(reference, content_type, &bytes)?;
        // Everything the manifest references must exist before anything is
        // written, and must still exist when it is committed: each reference
        // is guarded by the version seen here, so a concurrent delete of a
        // layer or child makes the commit retry (and then fail with
        // MANIFEST_BLOB_UNKNOWN) instead of leaving a manifest that points at
        // nothing.
        let mut guards = self.reference_guards(name, &manifest).await?;
        let tag = match reference {
            Reference::Tag(tag) => Some(tag),
            Reference::Digest(_) => None,
        };
        // Bytes first, durable and verified; then the metadata commit.
        let size = bytes.len() as u64;
        self.put_manifest_bytes(&digest, bytes).await?;
        let change = match tag {
            Some(tag) => Change::Tag {
                repository: name.to_string(),
                tag: tag.as_str().to_string(),
                digest: digest.clone(),
            },
            None => Change::Manifest {
                repository: name.to_string(),
                digest: digest.clone(),
            },
        };
        for _ in 0..TXN_ATTEMPTS {
            // The tag as it is now, guarded: a replicated write of it that
            // lands meanwhile makes this attempt retry with a newer stamp,
            // so the push stays the last writer here as everywhere.
            let (tag_seen, tag_tomb_seen) = match tag {
                Some(tag) => (
                    self.meta
                        .get(keys::tag(name, tag.as_str()).as_bytes())
                        .await?,
                    self.meta
                        .get(keys::tag_tombstone(name, tag.as_str()).as_bytes())
                        .await?,
                ),
                None => (None, None),
            };
            let tombstone = keys::manifest_tombstone(name, &digest);
            let tombstone_seen = self.meta.get(tombstone.as_bytes()).await?;
            let manifest_seen = self
                .meta
                .get(keys::manifest(name, &digest).as_bytes())
                .await?;
            // Newer than everything it overwrites, here and elsewhere.
            self.observe_record::<TagRecord>(tag_seen.as_ref());
            self.observe_record::<Stamp>(tag_tomb_seen.as_ref());
            self.observe_record::<Stamp>(tombstone_seen.as_ref());
            self.observe_record::<ManifestRecord>(manifest_seen.as_ref());
            let stamp = self.local_stamp();
            let (mut txn, subject) = self
                .manifest_txn(name, &digest, &manifest, tag, Some(&stamp), size)
                .await?;
            // A delete's tombstone stays: the manifest is present because
            // this put is newer than it.
            let replicated = self.region.is_some();
            txn = txn.require_unchanged(tombstone, tombstone_seen.as_ref());
            if replicated {
                txn = txn.require_unchanged(keys::manifest(name, &digest), manifest_seen.as_ref());
            }
            if let Some(tag) = tag {
                txn = txn
                    .require_unchanged(keys::tag(name, tag.as_str()), tag_seen.as_ref())
                    .require_unchanged(
                        keys::tag_tombstone(name, tag.as_str()),
                        tag_tomb_seen.as_ref(),
                    );
            }
            // An index's push is a put of its children too (in every region
            // alike), so a concurrent delete of a child cannot orphan it.
            for child in manifest.children() {
                if !replicated || ManifestKind::from_media_type(&child.media_type).is_none() {
                    continue;
                }
                let key = keys::manifest(name, &child.digest);
                if let Some(kv) = self.meta.get(key.as_bytes()).await? {
                    let mut record: ManifestRecord = decode(&kv.key, &kv.value)?;
                    if record.stamp.as_ref() < Some(&stamp) {
                        record.stamp = Some(stamp.clone());
                        txn = txn.put(key, encode(&record));
                    }
                }
            }
            for (key, version) in guards {
                txn = txn.require_version(key, version);
            }
            let txn = self.log_change(txn, &stamp, change.clone()).await?;
            if self.meta.commit(txn).await? {
                self.changes_committed();
                return Ok(PutManifestOutcome { digest, subject });
            }
            backoff().await;
            guards = self.reference_guards(name, &manifest).await?;
        }
        Err(changes::conflict("manifest push"))
    }

    /// Stores a manifest fetched from an upstream registry (and tags it, with
    /// `tag`). Unlike a push, its layers and children need not be here yet:
    /// a pull-through cache fetches them when a client asks. The content is
    /// verified against `digest`.
    pub async fn cache_manifest(
        &self,
        name: &RepositoryName,
        digest: &Digest,
        tag: Option<&Tag>,
        content_type: Option<&str>,
        bytes: Bytes,
    ) -> Result<ManifestRecord> {
        let reference = Reference::Digest(digest.clone());
        let (digest, manifest) = self.parse_manifest(&reference, content_type, &bytes)?;
        // Deleted here (a tombstone): a copy from elsewhere must not bring it
        // back. Already here (maybe stamped by replication): left as it is.
        let tomb_key = keys::manifest_tombstone(name, &digest);
        if self.meta.get(tomb_key.as_bytes()).await?.is_some() {
            return Err(RegistryError::ManifestUnknown);
        }
        let key = keys::manifest(name, &digest);
        let existing = self.meta.get(key.as_bytes()).await?;
        if existing.is_some() && tag.is_none() {
            return self.manifest_record(name, &digest).await;
        }
        let (txn, _) = self
            .store_manifest(name, &digest, &manifest, tag, None, bytes)
            .await?;
        let txn = txn.require_absent(tomb_key);
        if !self.meta.commit(txn).await? {
            return Err(changes::conflict("cached manifest"));
        }
        self.manifest_record(name, &digest).await
    }

    /// The manifest recorded in `name` under `digest`, if any.
    pub async fn find_manifest(
        &self,
        name: &RepositoryName,
        digest: &Digest,
    ) -> Result<Option<ManifestRecord>> {
        self.get_record(&keys::manifest(name, digest)).await
    }

    /// The digest a tag points at, if the tag exists.
    pub async fn find_tag(&self, name: &RepositoryName, tag: &Tag) -> Result<Option<Digest>> {
        Ok(self
            .get_record::<TagRecord>(&keys::tag(name, tag.as_str()))
            .await?
            .map(|t| t.digest))
    }

    /// Whether a repository exists here (anything was ever pushed or cached).
    pub async fn repository_exists(&self, name: &RepositoryName) -> Result<bool> {
        Ok(self.meta.get(keys::repo(name).as_bytes()).await?.is_some())
    }

    /// Checks a manifest's size, syntax and digest (which must match a
    /// digest reference). Writes nothing.
    fn parse_manifest(
        &self,
        reference: &Reference,
        content_type: Option<&str>,
        bytes: &Bytes,
    ) -> Result<(Digest, Manifest)> {
        if bytes.len() as u64 > self.limits.max_manifest_bytes {
            return Err(RegistryError::TooLarge {
                limit: self.limits.max_manifest_bytes,
            });
        }
        let manifest = Manifest::parse(content_type, bytes)
            .map_err(|e| RegistryError::ManifestInvalid(e.to_string()))?;
        let digest = match reference {
            Reference::Digest(expected) => {
                let computed = Digest::of(expected.algorithm(), bytes);
                if &computed != expected {
                    return Err(RegistryError::DigestInvalid(format!(
                        "manifest digest {computed} does not match {expected}"
                    )));
                }
                computed
            }
            Reference::Tag(_) => Digest::sha256_of(bytes),
        };
        Ok((digest, manifest))
    }

    /// Stores a parsed manifest's bytes, durable and verified, and returns the
    /// metadata transaction that makes it visible (with its subject).
    async fn store_manifest(
        &self,
        name: &RepositoryName,
        digest: &Digest,
        manifest: &Manifest,
        tag: Option<&Tag>,
        stamp: Option<&Stamp>,
        bytes: Bytes,
    ) -> Result<(Txn, Option<Digest>)> {
        let size = bytes.len() as u64;
        self.put_manifest_bytes(digest, bytes).await?;
        self.manifest_txn(name, digest, manifest, tag, stamp, size)
            .await
    }

    /// Stores manifest bytes, durable and verified.
    async fn put_manifest_bytes(&self, digest: &Digest, bytes: Bytes) -> Result<()> {
        let body: ByteStream = Box::pin(futures_util::stream::iter([Ok(bytes)]));
        self.blobs
            .put(digest, body, self.limits.max_manifest_bytes)
            .await
            .map_err(RegistryError::from_put)?;
        Ok(())
    }

    /// The metadata writes that make a stored manifest visible (tagged with
    /// `tag`), and its subject.
    async fn manifest_txn(
        &self,
        name: &RepositoryName,
        digest: &Digest,
        manifest: &Manifest,
        tag: Option<&Tag>,
        stamp: Option<&Stamp>,
        size: u64,
    ) -> Result<(Txn, Option<Digest>)> {
        let mut platforms = Vec::new();
        for child in manifest.children() {
            if let Some(p) = child.platform.as_ref()
                && let (Some(os), Some(arch)) = (
                    p.get("os").and_then(|v| v.as_str()),
                    p.get("architecture").and_then(|v| v.as_str()),
                )
            {
                platforms.push(PlatformChild {
                    digest: child.digest.clone(),
                    os: os.to_string(),
                    architecture: arch.to_string(),
                });
            }
        }

        let media_type = manifest.kind.media_type().to_string();
        let subject = manifest.subject.as_ref().map(|s| s.digest.clone());
        let record = ManifestRecord {
            media_type: media_type.clone(),
            size,
            subject: subject.clone(),
            artifact_type: manifest.referrer_artifact_type(),
            platforms,
            references: manifest
                .required_blobs()
                .chain(manifest.children())
                .map(|d| d.digest.clone())
                .collect(),
            created_ms: now_ms(),
            stamp: stamp.cloned(),
        };
        let mut txn = Txn::new().put(keys::manifest(name, digest), encode(&record));
        if let Some(tag) = tag {
            txn = txn.put(
                keys::tag(name, tag.as_str()),
                encode(&TagRecord {
                    digest: digest.clone(),
                    updated_ms: now_ms(),
                    stamp: stamp.cloned(),
                }),
            );
            if let Some(stamp) = stamp {
                txn = txn.put(
                    keys::tag_history(name, tag.as_str(), stamp),
                    encode(&crate::records::TagHistoryEntry {
                        digest: digest.clone(),
                        stamp: stamp.clone(),
                    }),
                );
            }
        }
        if let Some(subject) = &subject {
            let descriptor = Descriptor {
                media_type,
                digest: digest.clone(),
                size,
                artifact_type: record.artifact_type.clone(),
                annotations: referrer_annotations(manifest, digest),
                urls: None,
                platform: None,
            };
            txn = txn.put(
                keys::referrer(name, subject, digest),
                serde_json::to_vec(&descriptor).unwrap_or_default(),
            );
        }
        let txn = self.ensure_repo(name, txn).await?;
        Ok((txn, subject))
    }

    /// The metadata keys a manifest's references live under, with their
    /// current versions. Fails with `MANIFEST_BLOB_UNKNOWN` on the first
    /// missing one: layers and config must be blobs of the repository, index
    /// entries manifests of it (or blobs, for non-manifest entries).
    async fn reference_guards(
        &self,
        name: &RepositoryName,
        manifest: &Manifest,
    ) -> Result<Vec<(String, u64)>> {
        let mut guards = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        let blobs = manifest
            .required_blobs()
            .map(|d| (keys::link(name, &d.digest), d));
        let children = manifest.children().iter().map(|d| {
            let key = if ManifestKind::from_media_type(&d.media_type).is_some() {
                keys::manifest(name, &d.digest)
            } else {
                keys::link(name, &d.digest)
            };
            (key, d)
        });
        for (key, descriptor) in blobs.chain(children) {
            if !seen.insert(key.clone()) {
                continue;
            }
            match self.meta.get(key.as_bytes()).await? {
                Some(kv) => guards.push((key, kv.version)),
                None => {
                    return Err(RegistryError::ManifestBlobUnknown(
                        descriptor.digest.clone(),
                    ));
                }
            }
        }
        Ok(guards)
    }

    /// Deletes a tag (by tag) or a manifest with every tag pointing at it
    /// (by digest).
    pub async fn delete_manifest(
        &self,
        name: &RepositoryName,
        reference: &Reference,
    ) -> Result<()> {
        match reference {
            Reference::Tag(tag) => self.delete_tag(name, tag, true).await,
            Reference::Digest(digest) => self.delete_manifest_by_digest(name, digest, true).await,
        }
    }

    /// A delete of the pull-through cache's own (an eviction, an upstream's
    /// tag gone): not a change of this region's, so neither logged for
    /// other regions nor kept as a tombstone.
    pub async fn forget_manifest(
        &self,
        name: &RepositoryName,
        reference: &Reference,
    ) -> Result<()> {
        match reference {
            Reference::Tag(tag) => self.delete_tag(name, tag, false).await,
            Reference::Digest(digest) => self.delete_manifest_by_digest(name, digest, false).await,
        }
    }

    async fn delete_tag(&self, name: &RepositoryName, tag: &Tag, logged: bool) -> Result<()> {
        // Tombstones and the log matter only to replication.
        let logged = logged && self.region.is_some();
        let key = keys::tag(name, tag.as_str());
        let change = Change::Untag {
            repository: name.to_string(),
            tag: tag.as_str().to_string(),
        };
        for _ in 0..TXN_ATTEMPTS {
            let seen = self
                .meta
                .get(key.as_bytes())
                .await?
                .ok_or(RegistryError::ManifestUnknown)?;
            let txn = Txn::new()
                .require_version(key.clone(), seen.version)
                .delete(key.clone());
            if !logged {
                if self.meta.commit(txn).await? {
                    return Ok(());
                }
                continue;
            }
            let record: TagRecord = decode(&seen.key, &seen.value)?;
            let tomb_key = keys::tag_tombstone(name, tag.as_str());
            let tomb = self.meta.get(tomb_key.as_bytes()).await?;
            // Newer than everything it overwrites, here and elsewhere.
            self.observe_stamp(record.stamp.as_ref());
            self.observe_record::<Stamp>(tomb.as_ref());
            let stamp = self.local_stamp();
            let txn = txn
                .require_unchanged(tomb_key.clone(), tomb.as_ref())
                .put(tomb_key, encode(&stamp));
            let txn = self.log_change(txn, &stamp, change.clone()).await?;
            if self.meta.commit(txn).await? {
                self.changes_committed();
                return Ok(());
            }
            backoff().await;
        }
        Err(changes::conflict("tag delete"))
    }

    async fn delete_manifest_by_digest(
        &self,
        name: &RepositoryName,
        digest: &Digest,
        logged: bool,
    ) -> Result<()> {
        let logged = logged && self.region.is_some();
        for _ in 0..TXN_ATTEMPTS {
            let key = keys::manifest(name, digest);
            let seen = self
                .meta
                .get(key.as_bytes())
                .await?
                .ok_or(RegistryError::ManifestUnknown)?;
            let record: ManifestRecord = decode(&seen.key, &seen.value)?;
            let tomb_key = keys::manifest_tombstone(name, digest);
            let tomb = self.meta.get(tomb_key.as_bytes()).await?;
            let mut txn = Txn::new()
                .require_version(key.clone(), seen.version)
                .delete(key);
            self.observe_stamp(record.stamp.as_ref());
            self.observe_record::<Stamp>(tomb.as_ref());
            let prefix = keys::tag_prefix(name);
            let mut tags = Vec::new();
            for kv in self.scan_all(&prefix).await? {
                let tag: TagRecord = decode(&kv.key, &kv.value)?;
                if &tag.digest == digest {
                    let tag_name = String::from_utf8_lossy(&kv.key[prefix.len()..]).into_owned();
                    txn = txn
                        .require_version(kv.key.clone(), kv.version)
                        .delete(kv.key);
                    self.observe_stamp(tag.stamp.as_ref());
                    if logged && let Some(own) = &tag.stamp {
                        // The set is hidden, not overwritten: a later write
                        // of the tag elsewhere still wins.
                        txn = txn.put(keys::tag_tombstone(name, &tag_name), encode(own));
                    }
                    tags.push(tag_name);
                }
            }
            if let Some(subject) = &record.subject {
                txn = txn.delete(keys::referrer(name, subject, digest));
            }
            let stamp = logged.then(|| self.local_stamp());
            if let Some(stamp) = &stamp {
                txn = txn
                    .require_unchanged(tomb_key.clone(), tomb.as_ref())
                    .put(tomb_key, encode(stamp));
                let change = Change::DeleteManifest {
                    repository: name.to_string(),
                    digest: digest.clone(),
                    tags,
                };
                txn = self.log_change(txn, stamp, change).await?;
            }
            if self.meta.commit(txn).await? {
                if logged {
                    self.changes_committed();
                    if let Some(stamp) = &stamp {
                        self.hide_tags_older_than(name, digest, stamp).await?;
                    }
                }
                return Ok(());
            }
            backoff().await;
        }
        Err(changes::conflict("manifest delete"))
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

    // ---- referrers, tags, catalog -------------------------------------------

    /// Descriptors of the manifests in `name` whose subject is `subject`,
    /// optionally only those of `artifact_type`, a page at a time (in digest
    /// order, after `last`). `more` tells whether another page follows.
    pub async fn referrers(
        &self,
        name: &RepositoryName,
        subject: &Digest,
        artifact_type: Option<&str>,
        last: Option<&Digest>,
    ) -> Result<(Vec<Descriptor>, bool)> {
        let prefix = keys::referrer_prefix(name, subject);
        let page = self.limits.max_referrers_page;
        let mut out = Vec::new();
        let mut after = last.map(|d| keys::referrer(name, subject, d).into_bytes());
        loop {
            // Small batches: a referrer record may carry 16 KiB of annotations
            // and etcd answers at most 4 MiB per response.
            let batch = self
                .meta
                .scan(prefix.as_bytes(), after.as_deref(), 64)
                .await?;
            let Some(last_kv) = batch.last() else {
                return Ok((out, false));
            };
            after = Some(last_kv.key.clone());
            for kv in batch {
                let d: Descriptor = decode(&kv.key, &kv.value)?;
                if artifact_type.is_none_or(|t| d.artifact_type.as_deref() == Some(t)) {
                    if out.len() == page {
                        return Ok((out, true));
                    }
                    out.push(d);
                }
            }
        }
    }

    async fn page(&self, prefix: &str, last: Option<&str>, n: Option<usize>) -> Result<Page> {
        let n = n.unwrap_or(self.limits.max_page).min(self.limits.max_page);
        if n == 0 {
            return Ok(Page {
                items: Vec::new(),
                more: false,
            });
        }
        let after = last.map(|l| format!("{prefix}{l}"));
        let batch = self
            .meta
            .scan(
                prefix.as_bytes(),
                after.as_deref().map(str::as_bytes),
                n + 1,
            )
            .await?;
        let more = batch.len() > n;
        let items = batch
            .into_iter()
            .take(n)
            .map(|kv| String::from_utf8_lossy(&kv.key[prefix.len()..]).into_owned())
            .collect();
        Ok(Page { items, more })
    }

    pub async fn list_tags(
        &self,
        name: &RepositoryName,
        last: Option<&str>,
        n: Option<usize>,
    ) -> Result<Page> {
        if self.meta.get(keys::repo(name).as_bytes()).await?.is_none() {
            return Err(RegistryError::NameUnknown);
        }
        self.page(&keys::tag_prefix(name), last, n).await
    }

    pub async fn catalog(&self, last: Option<&str>, n: Option<usize>) -> Result<Page> {
        self.page(keys::REPO_PREFIX, last, n).await
    }
}

/// Annotations copied into a referrers descriptor, unless they are so large
/// that every referrers response would carry them (they stay in the manifest).
fn referrer_annotations(
    manifest: &Manifest,
    digest: &Digest,
) -> Option<std::collections::BTreeMap<String, String>> {
    const MAX_REFERRER_ANNOTATION_BYTES: usize = 16 * 1024;
    let annotations = manifest.annotations.as_ref()?;
    let size: usize = annotations.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > MAX_REFERRER_ANNOTATION_BYTES {
        tracing::info!(%digest, size, "annotations too large for the referrers index; omitted there");
        return None;
    }
    Some(annotations.clone())
}

fn accepts(accept: &[String], media_type: &str) -> bool {
    accept
        .iter()
        .any(|a| a == media_type || a == "*/*" || a == "application/*")
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_store::blob::fs::FsOptions;
    use berth_store::{FsBlobStore, RedbMetaStore};

    fn registry(dir: &std::path::Path) -> Registry {
        let meta = Arc::new(RedbMetaStore::open(&dir.join("meta.redb")).unwrap());
        let blobs = Arc::new(FsBlobStore::open(dir, FsOptions { verify_reads: true }).unwrap());
        Registry::new(meta, blobs, Limits::default())
    }

    fn body(bytes: &'static [u8]) -> ByteStream {
        Box::pin(futures_util::stream::iter([Ok(Bytes::from_static(bytes))]))
    }

    fn repo(name: &str) -> RepositoryName {
        RepositoryName::parse(name).unwrap()
    }

    async fn mark(registry: &Registry, digest: &Digest, since_ms: u64) {
        let record = BlobRecord {
            size: 5,
            removing_since_ms: Some(since_ms),
        };
        registry
            .meta
            .commit(Txn::new().put(keys::blob(digest), encode(&record)))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn only_blobs_that_nothing_links_lose_their_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let registry = registry(dir.path());
        let digest = Digest::sha256_of(b"layer");
        for name in ["a", "b"] {
            registry
                .put_blob(&repo(name), &digest, body(b"layer"))
                .await
                .unwrap();
        }
        registry.delete_blob(&repo("a"), &digest).await.unwrap();
        assert_eq!(
            registry
                .remove_unreferenced_blobs(std::slice::from_ref(&digest))
                .await
                .unwrap(),
            0
        );
        assert_eq!(registry.blobs.stat(&digest).await.unwrap(), Some(5));
        // Unmarked again: linkable at once.
        registry
            .put_blob(&repo("c"), &digest, body(b"layer"))
            .await
            .unwrap();
        for name in ["b", "c"] {
            registry.delete_blob(&repo(name), &digest).await.unwrap();
        }
        assert_eq!(
            registry
                .remove_unreferenced_blobs(std::slice::from_ref(&digest))
                .await
                .unwrap(),
            1
        );
        assert_eq!(registry.blobs.stat(&digest).await.unwrap(), None);
        assert_eq!(registry.stored_blob_size(&digest).await.unwrap(), None);
        assert!(
            registry
                .mount_blob(&repo("d"), &digest, None)
                .await
                .unwrap()
                .is_none()
        );
        // Pushed again: stored and served again.
        registry
            .put_blob(&repo("d"), &digest, body(b"layer"))
            .await
            .unwrap();
        let (read, _) = registry.read_blob(&repo("d"), &digest, None).await.unwrap();
        assert_eq!(read.size, 5);
    }

    #[tokio::test]
    async fn a_blob_being_removed_is_neither_linked_nor_mounted() {
        let dir = tempfile::tempdir().unwrap();
        let registry = registry(dir.path());
        let digest = Digest::sha256_of(b"layer");
        registry
            .put_blob(&repo("a"), &digest, body(b"layer"))
            .await
            .unwrap();
        mark(&registry, &digest, now_ms()).await;
        let pushed = registry.put_blob(&repo("b"), &digest, body(b"layer")).await;
        assert!(
            matches!(
                pushed,
                Err(RegistryError::Store(berth_store::StoreError::Unavailable(
                    _
                )))
            ),
            "{pushed:?}"
        );
        assert!(registry.link(&repo("b"), &digest).await.unwrap().is_none());
        assert!(
            registry
                .mount_blob(&repo("b"), &digest, None)
                .await
                .unwrap()
                .is_none()
        );
        // A mark abandoned long ago does not block the blob forever.
        mark(&registry, &digest, now_ms() - REMOVAL_MARK_STALE_MS - 1000).await;
        registry
            .put_blob(&repo("b"), &digest, body(b"layer"))
            .await
            .unwrap();
        assert_eq!(registry.stored_blob_size(&digest).await.unwrap(), Some(5));
    }

    #[tokio::test]
    async fn a_link_whose_bytes_were_removed_meanwhile_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let registry = registry(dir.path());
        let digest = Digest::sha256_of(b"layer");
        registry
            .put_blob(&repo("a"), &digest, body(b"layer"))
            .await
            .unwrap();
        // As if a removal finished between this push's write and its link.
        registry.blobs.delete(&digest).await.unwrap();
        let linked = registry.commit_link(&repo("b"), &digest, 5).await;
        assert!(matches!(linked, Err(RegistryError::Store(_))), "{linked:?}");
    }
}
