//! The pull-through cache: which requests go to an upstream, and how a
//! manifest or blob is served from the cache, fetched, revalidated, or served
//! stale when the upstream fails.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_oci::{Reference, RepositoryName, Tag};
use berth_registry::{Registry, RegistryError, now_ms};
use berth_store::{ByteStream, MetaStore};

use crate::fill::{FillFailure, Fills};
use crate::metrics::CacheMetrics;
use crate::upstream::{FailureKind, UpstreamClient, UpstreamConfig, UpstreamError};

mod admin;
mod blobs;
mod manifests;

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
    /// When the current outage began (the first failure after it was up).
    failing_since_ms: AtomicU64,
    /// The last failure: when, and what it was.
    last_error: Mutex<Option<(u64, String)>>,
}

/// How an upstream stands, for the console.
#[derive(Clone, Debug)]
pub struct UpstreamState {
    pub namespace: String,
    pub url: String,
    /// Failed as unavailable within the outage backoff.
    pub down: bool,
    /// When the current outage began: the first unavailable failure since
    /// the upstream last answered (0: none).
    pub failing_since_ms: u64,
    pub last_error: Option<(u64, String)>,
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
                        failing_since_ms: AtomicU64::new(0),
                        last_error: Mutex::new(None),
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
        let now = now_ms();
        *upstream
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some((now, e.to_string()));
        if e.is_unavailable() {
            let until = now + self.options.outage_backoff.as_millis() as u64;
            upstream.down_until_ms.store(until, Ordering::Relaxed);
            // The outage began at the first failure since the last success.
            let _ = upstream.failing_since_ms.compare_exchange(
                0,
                now,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    /// An upstream answered: an outage, if there was one, is over.
    fn note_success(&self, upstream: &Upstream) {
        upstream.down_until_ms.store(0, Ordering::Relaxed);
        upstream.failing_since_ms.store(0, Ordering::Relaxed);
    }

    /// Every upstream's state, in namespace order.
    pub fn upstream_states(&self) -> Vec<UpstreamState> {
        let now = now_ms();
        self.upstreams
            .iter()
            .map(|(namespace, u)| {
                let down = u.down_until_ms.load(Ordering::Relaxed) > now;
                UpstreamState {
                    namespace: namespace.clone(),
                    url: u.client.config().url.clone(),
                    down,
                    failing_since_ms: u.failing_since_ms.load(Ordering::Relaxed),
                    last_error: u
                        .last_error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone(),
                }
            })
            .collect()
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
    use berth_oci::Digest;

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
