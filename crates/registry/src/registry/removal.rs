//! Removing the bytes of blobs that nothing links, safely against the pushes
//! and mounts that race it: the removal protocol every deleter uses.

use berth_oci::Digest;
use berth_store::Txn;

use super::{Registry, Result, now_ms};
use crate::keys;
use crate::records::{BlobRecord, decode, encode};

/// A blob removal must delete the bytes within this time of marking the
/// blob's record, or give up.
pub(super) const REMOVAL_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

/// A removal mark older than this was abandoned (its remover gave up or
/// died): linking the blob may proceed if its bytes are there. Far above
/// `REMOVAL_WINDOW`, to allow for clock differences between nodes.
pub(super) const REMOVAL_MARK_STALE_MS: u64 = 5 * 60 * 1000;
impl Registry {
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
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use berth_oci::RepositoryName;
    use berth_store::ByteStream;
    use bytes::Bytes;

    use super::*;
    use crate::RegistryError;
    use crate::registry::Limits;
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
