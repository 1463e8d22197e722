//! Manifests and tags through the cache: fetching, revalidating after the
//! tag TTL, and serving stale when the upstream fails.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use berth_oci::{Digest, Manifest, Reference, Tag};
use berth_registry::{RegistryError, now_ms};
use berth_store::Txn;

use super::{CacheError, PullThroughCache, Result, Target, Upstream, upstream_down};
use crate::records::{self, CachedImage, CachedTag};
use crate::upstream::{FailureKind, UpstreamError};

impl PullThroughCache {
    pub(super) fn manifest_lock(&self, key: String) -> Arc<tokio::sync::Mutex<()>> {
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

    /// Fetches the manifest a tag points at upstream and stores it by
    /// digest, without touching the tag here. Returns the digest.
    pub async fn read_through_tag(&self, target: &Target, tag: &Tag) -> Result<Digest> {
        let upstream = self.upstream(&target.namespace)?;
        let head = match upstream
            .client
            .head_manifest(&target.remote, tag.as_str())
            .await
        {
            Ok(head) => {
                self.note_success(upstream);
                head
            }
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

    pub(super) async fn cached_tag(&self, target: &Target, tag: &Tag) -> Result<Option<CachedTag>> {
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

    pub(super) async fn ensure_tag(
        &self,
        upstream: &Upstream,
        target: &Target,
        tag: &Tag,
    ) -> Result<()> {
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
            Ok(head) => {
                self.note_success(upstream);
                head
            }
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

    pub(super) async fn put_tag_record(
        &self,
        target: &Target,
        tag: &Tag,
        digest: &Digest,
    ) -> Result<()> {
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

    pub(super) async fn forget_tag(&self, target: &Target, tag: &Tag) -> Result<()> {
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
    pub(super) async fn fetch_manifest(
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
            Ok(f) => {
                self.note_success(upstream);
                f
            }
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
}
