//! The pull-through cache: which requests go to an upstream, and how a
//! manifest or blob is served from the cache, fetched, revalidated, or served
//! stale when the upstream fails.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_oci::{Digest, Manifest, Reference, RepositoryName, Tag};
use berth_registry::{Registry, RegistryError, now_ms};
use berth_store::{ByteStream, MetaStore, Txn};
use futures_util::StreamExt;

use crate::fill::{FillFailure, FillState, Fills, Joined};
use crate::metrics::CacheMetrics;
use crate::records::{self, CachedImage, CachedTag};
use crate::upstream::{FailureKind, UpstreamClient, UpstreamConfig, UpstreamError};

/// How often an image's last access is written back (a write per pull would
/// load the metadata store for nothing: eviction needs minutes, not ms).
const TOUCH_INTERVAL_MS: u64 = 60_000;

/// Entries of the in-memory touch map before it is cleared.
const TOUCH_MAP_LIMIT: usize = 100_000;

#[derive(Clone, Debug)]
pub struct CacheOptions {
    /// A cached tag is served without asking the upstream this long.
    pub tag_ttl: Duration,
    /// The upstream (namespace) that requests for repositories that are not
    /// local go to, as Docker's `registry-mirrors` expects.
    pub mirror_default: Option<String>,
    /// Size limit for cached images, 0 for none.
    pub max_bytes: u64,
    /// Where downloads in progress are spooled.
    pub spool_dir: PathBuf,
    /// Record cached images (for `cache ls`, pins and eviction). Off for
    /// replication read-through, whose copies are the region's own.
    pub track_images: bool,
    /// After an upstream failed as unavailable, cached tags are served
    /// without asking it for this long, so that an outage costs no
    /// timeouts.
    pub outage_backoff: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Io(String),
}

type Result<T> = std::result::Result<T, CacheError>;

/// A request that a pull-through cache serves.
#[derive(Clone, Debug)]
pub struct Target {
    /// The upstream's namespace.
    pub namespace: String,
    /// The repository's name at the upstream.
    pub remote: String,
    /// The repository's name here (`NAMESPACE/REMOTE`).
    pub local: RepositoryName,
    /// Routed by the mirror default (a name that is not local): the
    /// upstream's "not found" or "unauthorized" then means "not here".
    pub via_mirror_default: bool,
}

/// How to answer a blob request.
pub enum BlobAnswer {
    /// Cached: serve it as any local blob.
    Local,
    /// Being fetched: this stream follows the download (it fails rather than
    /// end if the content turns out wrong).
    Streaming {
        stream: ByteStream,
        size: Option<u64>,
    },
    /// A HEAD answered by the upstream (not cached yet).
    Remote { size: u64 },
}

/// One cached image, for `berth cache ls`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CacheEntry {
    pub repository: String,
    pub digest: String,
    pub tags: Vec<String>,
    pub media_type: String,
    pub size: u64,
    pub cached_ms: u64,
    pub accessed_ms: u64,
    pub pinned: bool,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct EvictionReport {
    pub images: usize,
    pub bytes: u64,
    pub blobs_removed: usize,
    pub total_before: u64,
    pub total_after: u64,
}

struct Upstream {
    client: UpstreamClient,
    /// Until when (ms) the upstream counts as down after a failure.
    down_until_ms: AtomicU64,
}

pub struct PullThroughCache {
    registry: Arc<Registry>,
    meta: Arc<dyn MetaStore>,
    upstreams: BTreeMap<String, Upstream>,
    options: CacheOptions,
    fills: Fills,
    /// One revalidation or fetch of a manifest at a time per node.
    manifest_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// When this node last wrote an image's access time.
    touched: Mutex<HashMap<String, u64>>,
    metrics: CacheMetrics,
}

/// Checks a namespace: one or more repository path components (so that
/// `NAMESPACE/NAME` is a valid repository name).
pub fn valid_namespace(namespace: &str) -> bool {
    RepositoryName::parse(&format!("{namespace}/x")).is_ok() && !namespace.contains("//")
}

impl PullThroughCache {
    pub fn new(
        registry: Arc<Registry>,
        meta: Arc<dyn MetaStore>,
        upstreams: Vec<UpstreamConfig>,
        options: CacheOptions,
    ) -> Result<Self> {
        let mut map = BTreeMap::new();
        for config in upstreams {
            if !valid_namespace(&config.namespace) {
                return Err(CacheError::Config(format!(
                    "upstream namespace {:?} is not a valid repository path (lowercase letters, digits, '.', '-', '_', '/')",
                    config.namespace
                )));
            }
            if !(config.url.starts_with("http://") || config.url.starts_with("https://")) {
                return Err(CacheError::Config(format!(
                    "upstream {} URL {:?} must start with http:// or https://",
                    config.namespace, config.url
                )));
            }
            let namespace = config.namespace.clone();
            let client = UpstreamClient::new(config)?;
            if map
                .insert(
                    namespace.clone(),
                    Upstream {
                        client,
                        down_until_ms: AtomicU64::new(0),
                    },
                )
                .is_some()
            {
                return Err(CacheError::Config(format!(
                    "upstream namespace {namespace} is configured twice"
                )));
            }
        }
        if let Some(default) = &options.mirror_default
            && !map.contains_key(default)
        {
            return Err(CacheError::Config(format!(
                "the mirror default {default:?} is not a configured upstream"
            )));
        }
        let fills = Fills::new(options.spool_dir.clone()).map_err(|e| {
            CacheError::Io(format!(
                "cannot prepare the spool directory {}: {e}",
                options.spool_dir.display()
            ))
        })?;
        Ok(Self {
            registry,
            meta,
            upstreams: map,
            options,
            fills,
            manifest_locks: Mutex::new(HashMap::new()),
            touched: Mutex::new(HashMap::new()),
            metrics: CacheMetrics::default(),
        })
    }

    pub fn metrics(&self) -> &CacheMetrics {
        &self.metrics
    }

    pub fn options(&self) -> &CacheOptions {
        &self.options
    }

    /// The namespace whose upstream owns `name` by its prefix, if any.
    /// Clients may only read there.
    pub fn owner(&self, name: &str) -> Option<&str> {
        // The longest namespace wins: `example.com/mirror` before `example.com`.
        self.upstreams
            .keys()
            .filter(|ns| {
                name.strip_prefix(ns.as_str())
                    .is_some_and(|rest| rest.starts_with('/'))
            })
            .max_by_key(|ns| ns.len())
            .map(String::as_str)
    }

    /// Decides whether a read of `name` goes through the cache: by namespace
    /// prefix (`docker.io/library/alpine`), by containerd's `?ns=docker.io`,
    /// or, for a repository that does not exist here, by the mirror default.
    pub async fn route(&self, name: &str, ns: Option<&str>) -> Result<Option<Target>> {
        if let Some(explicit) = self.route_explicit(name, ns) {
            return explicit.map(Some);
        }
        if ns.is_none()
            && let Ok(repo) = RepositoryName::parse(name)
            && !self.registry.repository_exists(&repo).await?
        {
            return self.mirror_target(name).transpose();
        }
        Ok(None)
    }

    fn target(namespace: &str, remote: &str, via_mirror_default: bool) -> Result<Target> {
        let local = RepositoryName::parse(&format!("{namespace}/{remote}"))
            .map_err(|e| RegistryError::ManifestInvalid(e.to_string()))?;
        Ok(Target {
            namespace: namespace.to_string(),
            remote: remote.to_string(),
            local,
            via_mirror_default,
        })
    }

    /// The routing a request names itself: an upstream's namespace prefix,
    /// or containerd's `?ns=` (`Some(Ok(None))`-like answers are `None`:
    /// not routed). Needs no lookup.
    pub fn route_explicit(&self, name: &str, ns: Option<&str>) -> Option<Result<Target>> {
        if let Some(namespace) = self.owner(name) {
            return Some(Self::target(namespace, &name[namespace.len() + 1..], false));
        }
        // containerd names the registry it mirrors: only that upstream may
        // answer, never another one's content under the same name.
        let ns = ns?;
        self.upstreams
            .contains_key(ns)
            .then(|| Self::target(ns, name, false))
    }

    /// The mirror default's target for `name`, when one is configured.
    pub fn mirror_target(&self, name: &str) -> Option<Result<Target>> {
        let default = self.options.mirror_default.as_deref()?;
        Some(Self::target(default, name, true))
    }

    fn upstream(&self, namespace: &str) -> Result<&Upstream> {
        self.upstreams
            .get(namespace)
            .ok_or_else(|| CacheError::Config(format!("no upstream for {namespace}")))
    }

    fn note_failure(&self, upstream: &Upstream, e: &UpstreamError) {
        self.metrics
            .upstream_error(&upstream.client.config().namespace, e.kind.label());
        if e.is_unavailable() {
            let until = now_ms() + self.options.outage_backoff.as_millis() as u64;
            upstream.down_until_ms.store(until, Ordering::Relaxed);
        }
    }

    fn manifest_lock(&self, key: String) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self
            .manifest_locks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Drop locks nobody holds or waits for.
        if locks.len() > 1024 {
            locks.retain(|_, l| Arc::strong_count(l) > 1);
        }
        locks.entry(key).or_default().clone()
    }

    /// Makes `reference` servable from the registry's own records under
    /// `target.local`: cached and fresh, fetched, revalidated, or (when the
    /// upstream fails) stale. The caller then serves it like any manifest.
    pub async fn ensure_manifest(&self, target: &Target, reference: &Reference) -> Result<()> {
        let upstream = self.upstream(&target.namespace)?;
        let ns = target.namespace.as_str();
        match reference {
            Reference::Digest(digest) => {
                if self
                    .registry
                    .find_manifest(&target.local, digest)
                    .await?
                    .is_some()
                {
                    self.metrics.served(ns, "manifest", "hit");
                    self.touch(&target.local, digest);
                    return Ok(());
                }
                let _guard = self
                    .manifest_lock(format!("{}@{digest}", target.local))
                    .lock_owned()
                    .await;
                if self
                    .registry
                    .find_manifest(&target.local, digest)
                    .await?
                    .is_some()
                {
                    self.metrics.served(ns, "manifest", "hit");
                    return Ok(());
                }
                self.metrics.served(ns, "manifest", "miss");
                self.fetch_manifest(upstream, target, &digest.to_string(), Some(digest), None)
                    .await
                    .map(|_| ())
            }
            Reference::Tag(tag) => self.ensure_tag(upstream, target, tag).await,
        }
    }

    /// Like `ensure_manifest`, for a client that accepts only `accept`
    /// (empty: anything): when a tag names an index such a client cannot
    /// take, its linux/amd64 image is cached too, so that the registry can
    /// serve that instead, as it does for pushed images.
    pub async fn ensure_manifest_for(
        &self,
        target: &Target,
        reference: &Reference,
        accept: &[String],
    ) -> Result<()> {
        self.ensure_manifest(target, reference).await?;
        let Reference::Tag(tag) = reference else {
            return Ok(());
        };
        if accept.is_empty() || accept.iter().any(|a| a == "*/*") {
            return Ok(());
        }
        let Some(digest) = self.registry.find_tag(&target.local, tag).await? else {
            return Ok(());
        };
        let Some(record) = self.registry.find_manifest(&target.local, &digest).await? else {
            return Ok(());
        };
        if accept.contains(&record.media_type) {
            return Ok(());
        }
        if let Some(child) = record
            .platforms
            .iter()
            .find(|p| p.os == "linux" && p.architecture == "amd64")
        {
            self.ensure_manifest(target, &Reference::Digest(child.digest.clone()))
                .await?;
        }
        Ok(())
    }

    /// Whether an upstream failed as unavailable within the outage backoff.
    pub fn is_down(&self, namespace: &str) -> bool {
        self.upstreams
            .get(namespace)
            .is_some_and(|u| u.down_until_ms.load(Ordering::Relaxed) > now_ms())
    }

    /// The namespaces of the upstreams, in order.
    pub fn namespaces(&self) -> impl Iterator<Item = &str> {
        self.upstreams.keys().map(String::as_str)
    }

    /// Fetches the manifest a tag points at upstream and stores it by
    /// digest, without touching the tag here. Returns the digest.
    pub async fn read_through_tag(&self, target: &Target, tag: &Tag) -> Result<Digest> {
        let upstream = self.upstream(&target.namespace)?;
        let head = match upstream
            .client
            .head_manifest(&target.remote, tag.as_str())
            .await
        {
            Ok(head) => head,
            Err(e) => {
                self.note_failure(upstream, &e);
                return Err(e.into());
            }
        };
        match head.digest {
            Some(digest) => {
                self.ensure_manifest(target, &Reference::Digest(digest.clone()))
                    .await?;
                Ok(digest)
            }
            None => {
                self.fetch_manifest(upstream, target, tag.as_str(), None, None)
                    .await
            }
        }
    }

    async fn cached_tag(&self, target: &Target, tag: &Tag) -> Result<Option<CachedTag>> {
        let Some(kv) = self
            .meta
            .get(records::tag(&target.local, tag.as_str()).as_bytes())
            .await
            .map_err(RegistryError::from)?
        else {
            return Ok(None);
        };
        let Some(cached) = records::decode::<CachedTag>(&kv.value) else {
            return Ok(None);
        };
        // The registry's tag is what gets served: both must agree.
        let current = self.registry.find_tag(&target.local, tag).await?;
        Ok((current.as_ref() == Some(&cached.digest)).then_some(cached))
    }

    async fn ensure_tag(&self, upstream: &Upstream, target: &Target, tag: &Tag) -> Result<()> {
        let ns = target.namespace.as_str();
        let ttl = self.options.tag_ttl.as_millis() as u64;
        let fresh = |c: &CachedTag| now_ms().saturating_sub(c.checked_ms) < ttl;
        if let Some(cached) = self.cached_tag(target, tag).await?
            && fresh(&cached)
        {
            self.metrics.served(ns, "manifest", "hit");
            self.touch(&target.local, &cached.digest);
            return Ok(());
        }
        let _guard = self
            .manifest_lock(format!("{}:{tag}", target.local))
            .lock_owned()
            .await;
        let cached = self.cached_tag(target, tag).await?;
        if let Some(c) = &cached
            && fresh(c)
        {
            self.metrics.served(ns, "manifest", "hit");
            return Ok(());
        }
        let stale = |e: &UpstreamError, cached: &CachedTag| {
            self.metrics.served(ns, "manifest", "stale");
            tracing::warn!(
                repository = %target.local, %tag, digest = %cached.digest, error = %e,
                "upstream unavailable; serving the cached tag"
            );
            self.touch(&target.local, &cached.digest);
        };
        if let Some(c) = &cached
            && upstream.down_until_ms.load(Ordering::Relaxed) > now_ms()
        {
            let e = upstream_down(upstream);
            stale(&e, c);
            return Ok(());
        }
        let head = match upstream
            .client
            .head_manifest(&target.remote, tag.as_str())
            .await
        {
            Ok(head) => head,
            Err(e) => {
                self.note_failure(upstream, &e);
                return match (&cached, e.kind) {
                    (Some(c), _) if e.is_unavailable() => {
                        stale(&e, c);
                        Ok(())
                    }
                    (Some(_), FailureKind::NotFound) => {
                        // The upstream says the tag is gone: so it is here.
                        self.forget_tag(target, tag).await?;
                        Err(e.into())
                    }
                    _ => Err(e.into()),
                };
            }
        };
        if let (Some(c), Some(d)) = (&cached, &head.digest)
            && &c.digest == d
        {
            self.metrics.served(ns, "manifest", "revalidated");
            self.put_tag_record(target, tag, d).await?;
            self.touch(&target.local, d);
            return Ok(());
        }
        self.metrics.served(ns, "manifest", "miss");
        // Fetch by digest when the upstream told it: what is fetched is then
        // exactly what the HEAD announced, and verified against it.
        let result = match &head.digest {
            Some(d) => {
                if self
                    .registry
                    .find_manifest(&target.local, d)
                    .await?
                    .is_some()
                {
                    self.registry.tag_manifest(&target.local, tag, d).await?;
                    Ok(d.clone())
                } else {
                    self.fetch_manifest(upstream, target, &d.to_string(), Some(d), Some(tag))
                        .await
                }
            }
            None => {
                self.fetch_manifest(upstream, target, tag.as_str(), None, Some(tag))
                    .await
            }
        };
        match result {
            Ok(digest) => self.put_tag_record(target, tag, &digest).await,
            Err(CacheError::Upstream(e)) if e.is_unavailable() && cached.is_some() => {
                if let Some(c) = &cached {
                    stale(&e, c);
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    async fn put_tag_record(&self, target: &Target, tag: &Tag, digest: &Digest) -> Result<()> {
        let record = CachedTag {
            digest: digest.clone(),
            checked_ms: now_ms(),
        };
        self.meta
            .commit(Txn::new().put(
                records::tag(&target.local, tag.as_str()),
                records::encode(&record),
            ))
            .await
            .map_err(RegistryError::from)?;
        Ok(())
    }

    async fn forget_tag(&self, target: &Target, tag: &Tag) -> Result<()> {
        match self
            .registry
            .forget_manifest(&target.local, &Reference::Tag(tag.clone()))
            .await
        {
            Ok(()) | Err(RegistryError::ManifestUnknown) => {}
            Err(e) => return Err(e.into()),
        }
        self.meta
            .commit(Txn::new().delete(records::tag(&target.local, tag.as_str())))
            .await
            .map_err(RegistryError::from)?;
        Ok(())
    }

    /// Fetches a manifest, verifies it, stores it (tagged with `tag`) and
    /// records it as a cached image. Returns its digest.
    async fn fetch_manifest(
        &self,
        upstream: &Upstream,
        target: &Target,
        reference: &str,
        expected: Option<&Digest>,
        tag: Option<&Tag>,
    ) -> Result<Digest> {
        let ns = target.namespace.as_str();
        let limit = self.registry.limits().max_manifest_bytes;
        let fetched = match upstream
            .client
            .get_manifest(&target.remote, reference, limit)
            .await
        {
            Ok(f) => f,
            Err(e) => {
                self.note_failure(upstream, &e);
                return Err(e.into());
            }
        };
        let corrupt = |message: String| -> CacheError {
            self.metrics
                .upstream_error(ns, FailureKind::Corrupt.label());
            tracing::error!(repository = %target.local, reference, "{message}");
            CacheError::Upstream(UpstreamError {
                namespace: ns.to_string(),
                url: upstream.client.config().url.clone(),
                kind: FailureKind::Corrupt,
                message,
            })
        };
        let digest = match expected.or(fetched.claimed.as_ref()) {
            Some(d) => d.clone(),
            None => Digest::sha256_of(&fetched.bytes),
        };
        let computed = Digest::of(digest.algorithm(), &fetched.bytes);
        if computed != digest {
            return Err(corrupt(format!(
                "manifest {reference} from the upstream has digest {computed}, not {digest}"
            )));
        }
        if let Some(claimed) = &fetched.claimed
            && claimed != &digest
        {
            return Err(corrupt(format!(
                "upstream announced manifest {claimed} but sent {digest}"
            )));
        }
        let size = fetched.bytes.len() as u64;
        let manifest = Manifest::parse(fetched.content_type.as_deref(), &fetched.bytes)
            .map_err(|e| RegistryError::ManifestInvalid(format!("from the upstream: {e}")))?;
        let referenced = manifest
            .required_blobs()
            .fold(0u64, |sum, d| sum.saturating_add(d.size));
        let record = self
            .registry
            .cache_manifest(
                &target.local,
                &digest,
                tag,
                fetched.content_type.as_deref(),
                fetched.bytes,
            )
            .await?;
        self.metrics.fetched(ns, size);
        if !self.options.track_images {
            return Ok(digest);
        }
        let now = now_ms();
        let key = records::image(&target.local, &digest);
        let pinned = self
            .meta
            .get(key.as_bytes())
            .await
            .map_err(RegistryError::from)?
            .and_then(|kv| records::decode::<CachedImage>(&kv.value))
            .is_some_and(|i| i.pinned);
        let image = CachedImage {
            media_type: record.media_type,
            size: size.saturating_add(referenced),
            cached_ms: now,
            accessed_ms: now,
            pinned,
        };
        self.meta
            .commit(Txn::new().put(key, records::encode(&image)))
            .await
            .map_err(RegistryError::from)?;
        tracing::info!(repository = %target.local, %digest, reference, "cached manifest from upstream");
        Ok(digest)
    }

    /// Records that an image was used, at most once a minute per node.
    fn touch(&self, local: &RepositoryName, digest: &Digest) {
        let key = records::image(local, digest);
        let now = now_ms();
        {
            let Ok(mut touched) = self.touched.lock() else {
                return;
            };
            if touched
                .get(&key)
                .is_some_and(|t| now.saturating_sub(*t) < TOUCH_INTERVAL_MS)
            {
                return;
            }
            if touched.len() >= TOUCH_MAP_LIMIT {
                touched.clear();
            }
            touched.insert(key.clone(), now);
        }
        let meta = self.meta.clone();
        tokio::spawn(async move {
            let result = async {
                let Some(kv) = meta.get(key.as_bytes()).await? else {
                    return Ok(());
                };
                let Some(mut image) = records::decode::<CachedImage>(&kv.value) else {
                    return Ok(());
                };
                image.accessed_ms = now;
                // Lost to a concurrent update (a pin): the next touch wins.
                meta.commit(
                    Txn::new()
                        .require_version(key.clone(), kv.version)
                        .put(key.clone(), records::encode(&image)),
                )
                .await
                .map(|_| ())
            }
            .await;
            if let Err(e) = result {
                tracing::debug!(error = %e, "could not record a cache access");
            }
        });
    }

    /// Makes a blob servable: cached already, linked from elsewhere in this
    /// registry, or fetched (one download per blob on this node, however
    /// many clients ask).
    pub async fn blob(
        self: &Arc<Self>,
        target: &Target,
        digest: &Digest,
        head: bool,
        ranged: bool,
    ) -> Result<BlobAnswer> {
        let ns = target.namespace.as_str();
        match self.registry.stat_blob(&target.local, digest).await {
            Ok(_) => {
                self.metrics.served(ns, "blob", "hit");
                return Ok(BlobAnswer::Local);
            }
            Err(RegistryError::BlobUnknown(_)) => {}
            Err(e) => return Err(e.into()),
        }
        // The same content may be stored under another name already. It is
        // used only when a manifest cached in this repository names it:
        // the upstream repository then has it, and a digest alone never
        // reads another repository's blob through the cache.
        if self.registry.references_blob(&target.local, digest).await? {
            if head {
                // A HEAD links nothing: pushers probe with HEADs, and a link
                // in the cache's repository must not make them skip an
                // upload.
                if let Some(size) = self.registry.stored_blob_size(digest).await? {
                    self.metrics.served(ns, "blob", "hit");
                    return Ok(BlobAnswer::Remote { size });
                }
            } else if self
                .registry
                .mount_blob(&target.local, digest, None)
                .await?
                .is_some()
            {
                self.metrics.served(ns, "blob", "hit");
                return Ok(BlobAnswer::Local);
            }
        }
        let upstream = self.upstream(ns)?;
        if head {
            self.metrics.served(ns, "blob", "miss");
            return match upstream.client.head_blob(&target.remote, digest).await {
                Ok(size) => Ok(BlobAnswer::Remote { size }),
                Err(e) => {
                    self.note_failure(upstream, &e);
                    Err(e.into())
                }
            };
        }
        self.metrics.served(ns, "blob", "miss");
        let fill = match self
            .fills
            .join(&(target.local.to_string(), digest.clone()))
            .map_err(|e| CacheError::Io(format!("cannot start a spool file: {e}")))?
        {
            Joined::Leader(fill) => {
                let cache = self.clone();
                let target = target.clone();
                let digest = digest.clone();
                let leader = fill.clone();
                // Detached: the download completes for the cache even if the
                // client that started it goes away.
                tokio::spawn(async move { cache.run_fill(leader, target, digest).await });
                fill
            }
            Joined::Follower(fill) => fill,
        };
        let progress = if ranged {
            // A part of a blob being fetched: served from the store once
            // stored.
            fill.finished().await
        } else {
            fill.started().await
        };
        match progress.state {
            FillState::Failed(f) => Err(fill_error(f)),
            FillState::Running { total } => Ok(BlobAnswer::Streaming {
                stream: fill.reader(),
                size: total,
            }),
            FillState::Done | FillState::Connecting => {
                // Fetched for this repository (fills are per repository),
                // and linked by the fill's end; linked again for a follower
                // that arrived after the end.
                self.registry
                    .mount_blob(&target.local, digest, None)
                    .await?;
                Ok(BlobAnswer::Local)
            }
        }
    }

    async fn run_fill(
        self: Arc<Self>,
        fill: Arc<crate::fill::Fill>,
        target: Target,
        digest: Digest,
    ) {
        /// Ends the fill however `run_fill` ends, a panic included, so that
        /// nobody waits on it forever.
        struct Ending<'a> {
            fills: &'a Fills,
            fill: &'a crate::fill::Fill,
            key: crate::fill::FillKey,
        }
        impl Drop for Ending<'_> {
            fn drop(&mut self) {
                if !self.fill.is_finished() {
                    self.fill.set_state(FillState::Failed(FillFailure::Store(
                        "the download stopped unexpectedly".into(),
                    )));
                }
                self.fills.finish(&self.key);
            }
        }
        let _ending = Ending {
            fills: &self.fills,
            fill: &fill,
            key: (target.local.to_string(), digest.clone()),
        };
        let ns = target.namespace.clone();
        let outcome = async {
            let upstream = self
                .upstream(&ns)
                .map_err(|e| FillFailure::Store(e.to_string()))?;
            let response = match upstream.client.get_blob(&target.remote, &digest).await {
                Ok(r) => r,
                Err(e) => {
                    self.note_failure(upstream, &e);
                    return Err(FillFailure::Upstream(e));
                }
            };
            let total = response.content_length();
            let limit = self.registry.limits().max_blob_bytes;
            if total.is_some_and(|t| t > limit) {
                return Err(FillFailure::TooLarge(limit));
            }
            fill.set_state(FillState::Running { total });
            let body: ByteStream = Box::pin(
                response
                    .bytes_stream()
                    .map(|r| r.map_err(std::io::Error::other)),
            );
            let stored = self
                .registry
                .put_blob(&target.local, &digest, fill.tee(body))
                .await;
            match stored {
                Ok(size) => {
                    self.metrics.fetched(&ns, size);
                    tracing::info!(repository = %target.local, %digest, size, "cached blob from upstream");
                    Ok(())
                }
                Err(RegistryError::DigestInvalid(message)) => {
                    self.metrics.upstream_error(&ns, FailureKind::Corrupt.label());
                    tracing::error!(repository = %target.local, %digest, "upstream sent a corrupt blob; nothing stored: {message}");
                    Err(FillFailure::Upstream(UpstreamError {
                        namespace: ns.clone(),
                        url: upstream.client.config().url.clone(),
                        kind: FailureKind::Corrupt,
                        message: format!("blob content does not match its digest: {message}"),
                    }))
                }
                Err(RegistryError::BlobUploadInvalid(message)) => {
                    // The body broke off: the upstream went away mid-transfer.
                    let e = UpstreamError {
                        namespace: ns.clone(),
                        url: upstream.client.config().url.clone(),
                        kind: FailureKind::Connect,
                        message,
                    };
                    self.note_failure(upstream, &e);
                    Err(FillFailure::Upstream(e))
                }
                Err(RegistryError::TooLarge { limit }) => Err(FillFailure::TooLarge(limit)),
                Err(RegistryError::Store(berth_store::StoreError::Unavailable(m))) => {
                    Err(FillFailure::Unavailable(m))
                }
                Err(e) => Err(FillFailure::Store(e.to_string())),
            }
        }
        .await;
        match outcome {
            Ok(()) => fill.set_state(FillState::Done),
            Err(f) => {
                tracing::warn!(repository = %target.local, %digest, failure = ?f, "blob fetch failed");
                fill.set_state(FillState::Failed(f));
            }
        }
    }

    // ---- operator views ----------------------------------------------------

    async fn scan_all(&self, prefix: &str) -> Result<Vec<berth_store::KeyValue>> {
        let mut out = Vec::new();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let batch = self
                .meta
                .scan(prefix.as_bytes(), after.as_deref(), 500)
                .await
                .map_err(RegistryError::from)?;
            let Some(last) = batch.last() else { break };
            after = Some(last.key.clone());
            out.extend(batch);
        }
        Ok(out)
    }

    /// Every cached image with its tags, most recently used first.
    pub async fn list(&self) -> Result<Vec<CacheEntry>> {
        let mut tags: HashMap<(String, String), Vec<String>> = HashMap::new();
        for kv in self.scan_all(records::TAG_PREFIX).await? {
            if let (Some((repo, tag)), Some(record)) = (
                records::parse_tag_key(&kv.key),
                records::decode::<CachedTag>(&kv.value),
            ) {
                tags.entry((repo.to_string(), record.digest.to_string()))
                    .or_default()
                    .push(tag);
            }
        }
        let mut out = Vec::new();
        for kv in self.scan_all(records::IMAGE_PREFIX).await? {
            let (Some((repo, digest)), Some(image)) = (
                records::parse_image_key(&kv.key),
                records::decode::<CachedImage>(&kv.value),
            ) else {
                continue;
            };
            let key = (repo.to_string(), digest.to_string());
            out.push(CacheEntry {
                tags: tags.remove(&key).unwrap_or_default(),
                repository: key.0,
                digest: key.1,
                media_type: image.media_type,
                size: image.size,
                cached_ms: image.cached_ms,
                accessed_ms: image.accessed_ms,
                pinned: image.pinned,
            });
        }
        out.sort_by_key(|e| std::cmp::Reverse(e.accessed_ms));
        Ok(out)
    }

    /// Pins (or unpins) a cached image and, for an index, its cached
    /// children, so that eviction never removes them. Returns how many
    /// images changed.
    pub async fn pin(
        &self,
        local: &RepositoryName,
        reference: &Reference,
        pinned: bool,
    ) -> Result<usize> {
        let digest = match reference {
            Reference::Digest(d) => d.clone(),
            Reference::Tag(t) => self
                .registry
                .find_tag(local, t)
                .await?
                .ok_or(RegistryError::ManifestUnknown)?,
        };
        let record = self
            .registry
            .find_manifest(local, &digest)
            .await?
            .ok_or(RegistryError::ManifestUnknown)?;
        let mut digests = vec![digest];
        if !record.platforms.is_empty()
            || record.media_type.contains("index")
            || record.media_type.contains("list")
        {
            digests.extend(record.references.iter().cloned());
        }
        let mut changed = 0;
        for digest in digests {
            let key = records::image(local, &digest);
            for _ in 0..16 {
                let Some(kv) = self
                    .meta
                    .get(key.as_bytes())
                    .await
                    .map_err(RegistryError::from)?
                else {
                    break;
                };
                let Some(mut image) = records::decode::<CachedImage>(&kv.value) else {
                    break;
                };
                if image.pinned == pinned {
                    break;
                }
                image.pinned = pinned;
                if self
                    .meta
                    .commit(
                        Txn::new()
                            .require_version(key.clone(), kv.version)
                            .put(key.clone(), records::encode(&image)),
                    )
                    .await
                    .map_err(RegistryError::from)?
                {
                    changed += 1;
                    break;
                }
            }
        }
        Ok(changed)
    }

    /// Keeps the cache under its size limit: evicts the least recently used
    /// unpinned images (their manifests, the tags pointing at them, and the
    /// blobs no other image of the repository uses), then removes blob bytes
    /// that nothing in the registry references any more. Runs once per
    /// region (the caller holds the job's lease).
    pub async fn evict(&self) -> Result<EvictionReport> {
        let mut report = EvictionReport::default();
        if self.options.max_bytes == 0 {
            return Ok(report);
        }
        let mut images: Vec<(RepositoryName, Digest, CachedImage, u64)> = Vec::new();
        for kv in self.scan_all(records::IMAGE_PREFIX).await? {
            if let (Some((repo, digest)), Some(image)) = (
                records::parse_image_key(&kv.key),
                records::decode::<CachedImage>(&kv.value),
            ) {
                images.push((repo, digest, image, kv.version));
            }
        }
        let total = images
            .iter()
            .fold(0u64, |sum, i| sum.saturating_add(i.2.size));
        report.total_before = total;
        report.total_after = total;
        if total <= self.options.max_bytes {
            return Ok(report);
        }
        let mut candidates: Vec<_> = images.iter().filter(|i| !i.2.pinned).collect();
        candidates.sort_by_key(|i| i.2.accessed_ms);
        let mut remaining = total;
        let mut evicted: HashSet<(String, String)> = HashSet::new();
        let mut freed_blobs: Vec<(RepositoryName, Digest)> = Vec::new();
        for (repo, digest, image, version) in candidates {
            if remaining <= self.options.max_bytes {
                break;
            }
            let key = records::image(repo, digest);
            // Gone or used since the scan: leave it to the next run.
            let removed = self
                .meta
                .commit(
                    Txn::new()
                        .require_version(key.clone(), *version)
                        .delete(key),
                )
                .await
                .map_err(RegistryError::from)?;
            if !removed {
                continue;
            }
            let references = self
                .registry
                .find_manifest(repo, digest)
                .await?
                .map(|m| m.references)
                .unwrap_or_default();
            match self
                .registry
                .forget_manifest(repo, &Reference::Digest(digest.clone()))
                .await
            {
                Ok(()) | Err(RegistryError::ManifestUnknown) => {}
                Err(e) => return Err(e.into()),
            }
            for kv in self
                .scan_all(&format!("{}{repo}:", records::TAG_PREFIX))
                .await?
            {
                if records::decode::<CachedTag>(&kv.value).is_some_and(|t| &t.digest == digest) {
                    self.meta
                        .commit(
                            Txn::new()
                                .require_version(kv.key.clone(), kv.version)
                                .delete(kv.key),
                        )
                        .await
                        .map_err(RegistryError::from)?;
                }
            }
            for blob in references {
                freed_blobs.push((repo.clone(), blob));
            }
            evicted.insert((repo.to_string(), digest.to_string()));
            remaining = remaining.saturating_sub(image.size);
            report.images += 1;
            report.bytes += image.size;
            self.metrics.evicted_images.inc();
            self.metrics.evicted_bytes.inc_by(image.size);
            tracing::info!(repository = %repo, %digest, size = image.size, "evicted cached image");
        }
        // Blob links an evicted image held, unless a remaining manifest of the
        // same repository references the blob.
        let mut kept: HashMap<String, HashSet<Digest>> = HashMap::new();
        let mut unlinked: Vec<Digest> = Vec::new();
        for (repo, blob) in freed_blobs {
            if !kept.contains_key(repo.as_str()) {
                let mut set = HashSet::new();
                for digest in self.registry.manifest_digests(&repo).await? {
                    if let Some(m) = self.registry.find_manifest(&repo, &digest).await? {
                        set.extend(m.references);
                    }
                }
                kept.insert(repo.to_string(), set);
            }
            if kept.get(repo.as_str()).is_some_and(|s| s.contains(&blob)) {
                continue;
            }
            // An index's children are manifests (images of their own), not
            // blobs to unlink.
            if self.registry.find_manifest(&repo, &blob).await?.is_some() {
                continue;
            }
            match self.registry.delete_blob(&repo, &blob).await {
                Ok(()) => unlinked.push(blob),
                Err(RegistryError::BlobUnknown(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        report.blobs_removed = self
            .registry
            .remove_unreferenced_blobs(&unlinked)
            .await?
            .blobs;
        report.total_after = remaining;
        Ok(report)
    }
}

fn upstream_down(upstream: &Upstream) -> UpstreamError {
    UpstreamError {
        namespace: upstream.client.config().namespace.clone(),
        url: upstream.client.config().url.clone(),
        kind: FailureKind::Connect,
        message: "failed recently; not asked again yet".into(),
    }
}

fn fill_error(failure: FillFailure) -> CacheError {
    match failure {
        FillFailure::Upstream(e) => CacheError::Upstream(e),
        FillFailure::TooLarge(limit) => CacheError::Registry(RegistryError::TooLarge { limit }),
        FillFailure::Unavailable(m) => CacheError::Registry(RegistryError::Store(
            berth_store::StoreError::Unavailable(m),
        )),
        FillFailure::Store(m) => CacheError::Io(m),
    }
}

/// Splits `NAME:TAG` or `NAME@DIGEST` (a tag defaults to `latest`).
pub fn parse_image(image: &str) -> Option<(String, Reference)> {
    if let Some((name, digest)) = image.split_once('@') {
        return Some((name.to_string(), Reference::Digest(digest.parse().ok()?)));
    }
    let slash = image.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match image[slash..].rfind(':') {
        Some(i) => (&image[..slash + i], &image[slash + i + 1..]),
        None => (image, "latest"),
    };
    Some((name.to_string(), Reference::Tag(Tag::parse(tag).ok()?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references_parse() {
        let (name, r) = parse_image("docker.io/library/alpine:3.20").unwrap();
        assert_eq!(name, "docker.io/library/alpine");
        assert_eq!(r, Reference::Tag(Tag::parse("3.20").unwrap()));
        let (name, r) = parse_image("ghcr.io/a/b").unwrap();
        assert_eq!(name, "ghcr.io/a/b");
        assert_eq!(r, Reference::Tag(Tag::parse("latest").unwrap()));
        let d = Digest::sha256_of(b"x");
        let (name, r) = parse_image(&format!("docker.io/x@{d}")).unwrap();
        assert_eq!(name, "docker.io/x");
        assert_eq!(r, Reference::Digest(d));
        assert!(parse_image("docker.io/x@sha256:zz").is_none());
        assert!(valid_namespace("docker.io"));
        assert!(valid_namespace("registry.example.com/mirror"));
        assert!(!valid_namespace("localhost:5000"));
        assert!(!valid_namespace("Docker.io"));
    }
}
