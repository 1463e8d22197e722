//! The operator side of the cache: listing cached images, pins, and
//! eviction under the size limit.

use std::collections::{HashMap, HashSet};

use berth_oci::{Digest, Reference, RepositoryName};
use berth_registry::RegistryError;
use berth_store::Txn;

use super::{CacheEntry, EvictionReport, PullThroughCache, Result};
use crate::records::{self, CachedImage, CachedTag};

impl PullThroughCache {
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
        // Eviction unlinks first and removes bytes after: while a backup
        // holds removal off, the bytes would stay behind unlinked.
        if self.registry.blob_removal_held().await? {
            tracing::info!("a backup is running: cache eviction waits for it");
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
