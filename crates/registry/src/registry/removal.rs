//! Removing the bytes of blobs that nothing links, safely against the pushes
//! and mounts that race it: the removal protocol every deleter uses.

use std::collections::{HashMap, HashSet};

use berth_oci::Digest;
use berth_store::{KeyValue, Txn};

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

/// Deletes in flight at once: each is a file removal or an object-store
/// request of a few milliseconds, mostly waiting.
const REMOVAL_PARALLEL: usize = 16;

/// Records marked or ended by one transaction: 64 operations, well inside
/// etcd's limit of 128 per transaction.
const BATCH: usize = 32;

/// What a marked blob's record needs once its bytes were dealt with.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// The bytes are gone: the record goes.
    Forget,
    /// Still referenced, or out of time: the mark comes off.
    Unmark,
    /// The delete failed or timed out and may still happen: the mark stays
    /// until it is stale.
    KeepMark,
}

struct End {
    digest: Digest,
    kv: KeyValue,
    size: u64,
    end: Ending,
}

/// The same failure for every blob of a batch.
fn one_error<T>(batch: Vec<Digest>, e: crate::RegistryError) -> Vec<(Digest, Result<T>)> {
    let message = e.to_string();
    batch
        .into_iter()
        .map(|d| {
            let err =
                crate::RegistryError::Store(berth_store::StoreError::Unavailable(message.clone()));
            (d, Err(err))
        })
        .collect()
}
/// What a removal took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    pub blobs: usize,
    pub bytes: u64,
}

impl Registry {
    /// Whether a backup or restore holds blob removal off now: callers
    /// that unlink before they remove (cache eviction) wait for it to end
    /// instead of leaving unlinked bytes behind.
    pub async fn blob_removal_held(&self) -> Result<bool> {
        Ok(!self
            .meta
            .commit(Txn::new().require_absent(keys::BACKUP_HOLD))
            .await?)
    }

    /// Removes the bytes of blobs that no repository links and no manifest
    /// record names (cache eviction calls it for the blobs it unlinked,
    /// garbage collection for the blobs it found unreferenced).
    ///
    /// Safe against concurrent pushes, mounts, cache fills and replication
    /// copies of the same content. Each candidate's registry-wide record is
    /// first marked "being removed" (created marked, for bytes that have no
    /// record); a link or manifest commit requires that record unchanged (and
    /// its bytes present), so from the mark on nothing new can reference the
    /// bytes, and every reference made before it is seen by the scan of
    /// links and manifests that follows. Blobs found referenced are
    /// unmarked; the others lose their bytes, within a bounded time of the
    /// mark, and then their record.
    pub async fn remove_unreferenced_blobs(&self, candidates: &[Digest]) -> Result<Removed> {
        use futures_util::StreamExt as _;
        let started = std::time::Instant::now();
        let mut marked = HashMap::new();
        let mut failure = None;
        // After a failure no new mark starts; those in flight finish, so
        // that every committed mark is known and can be taken off.
        let failed = std::sync::atomic::AtomicBool::new(false);
        let failed = &failed;
        let batches: Vec<Vec<Digest>> = candidates.chunks(BATCH).map(<[Digest]>::to_vec).collect();
        let mut marks = futures_util::stream::iter(batches)
            .map(|batch: Vec<Digest>| async move {
                if failed.load(std::sync::atomic::Ordering::Relaxed) {
                    return batch.into_iter().map(|d| (d, Ok(None))).collect();
                }
                let results = self.mark_blobs(batch).await;
                if results.iter().any(|(_, r)| r.is_err()) {
                    failed.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                results
            })
            .buffer_unordered(REMOVAL_PARALLEL / 4)
            .flat_map(futures_util::stream::iter);
        while let Some((digest, result)) = marks.next().await {
            match result {
                Ok(Some(seen)) => {
                    marked.insert(digest, seen);
                }
                Ok(None) => {}
                Err(e) => failure = Some(e),
            }
        }
        drop(marks);
        if let Some(e) = failure {
            self.unmark_blobs(&marked).await;
            return Err(e);
        }
        if marked.is_empty() {
            return Ok(Removed::default());
        }
        let referenced = match self.referenced_among(&marked).await {
            Ok(r) => r,
            Err(e) => {
                self.unmark_blobs(&marked).await;
                return Err(e);
            }
        };
        // A backup (or restore) holds removal off: checked through the
        // store's own ordering (a compare, linearizable on etcd) after the
        // scan, so a backup whose snapshot follows this check sees none of
        // these blobs referenced (see `backup`'s module comment).
        match self
            .meta
            .commit(Txn::new().require_absent(keys::BACKUP_HOLD))
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(
                    blobs = marked.len(),
                    "a backup is running: blob removal waits for it"
                );
                self.unmark_blobs(&marked).await;
                return Ok(Removed::default());
            }
            Err(e) => {
                self.unmark_blobs(&marked).await;
                return Err(e.into());
            }
        }
        // The bytes first, 16 at a time; then the records, a batch per
        // transaction.
        let ends: Vec<End> = futures_util::stream::iter(marked)
            .map(|(digest, (kv, size))| {
                let still_referenced = referenced.contains(&digest);
                async move {
                    let end = self.delete_bytes(&digest, still_referenced, started).await;
                    End {
                        digest,
                        kv,
                        size,
                        end,
                    }
                }
            })
            .buffer_unordered(REMOVAL_PARALLEL)
            .collect()
            .await;
        let recorded: Vec<End> = ends
            .into_iter()
            .filter(|e| e.end != Ending::KeepMark)
            .collect();
        let mut removed = Removed::default();
        for batch in recorded.chunks(BATCH) {
            self.end_removals(batch).await?;
            for end in batch {
                if end.end == Ending::Forget {
                    removed.blobs += 1;
                    removed.bytes += end.size;
                }
            }
        }
        Ok(removed)
    }

    /// Deletes a marked blob's bytes unless it is still referenced or the
    /// window has passed: what its record then needs.
    async fn delete_bytes(
        &self,
        digest: &Digest,
        still_referenced: bool,
        started: std::time::Instant,
    ) -> Ending {
        // The bytes go within the window or not at all: past it, a pusher
        // may consider the mark abandoned.
        let left = REMOVAL_WINDOW.saturating_sub(started.elapsed());
        if still_referenced || left.is_zero() {
            return Ending::Unmark;
        }
        match tokio::time::timeout(left, self.blobs.delete(digest)).await {
            Ok(Ok(())) => Ending::Forget,
            // The delete may still happen (a blocking file removal, a
            // request already sent): the mark stays, so that nothing links
            // the blob until it is stale, and a link after that checks that
            // the bytes are there.
            Ok(Err(e)) => {
                tracing::warn!(%digest, error = %e, "could not remove an unreferenced blob; its mark stays until it is stale");
                Ending::KeepMark
            }
            Err(_) => {
                tracing::warn!(%digest, "removing an unreferenced blob timed out; its mark stays until it is stale");
                Ending::KeepMark
            }
        }
    }

    /// Forgets removed blobs' records and unmarks kept ones, in one
    /// transaction; one by one if any record changed meanwhile.
    async fn end_removals(&self, batch: &[End]) -> Result<()> {
        let txn_for = |end: &End, txn: Txn| {
            let key = keys::blob(&end.digest);
            let txn = txn.require_version(key.clone(), end.kv.version);
            match end.end {
                Ending::Forget => txn.delete(key),
                _ => txn.put(key, encode(&BlobRecord::new(end.size))),
            }
        };
        let all = batch.iter().fold(Txn::new(), |txn, end| txn_for(end, txn));
        if self.meta.commit(all).await? {
            return Ok(());
        }
        for end in batch {
            self.meta.commit(txn_for(end, Txn::new())).await?;
        }
        Ok(())
    }

    /// Marks a batch of blobs' records in one transaction (one commit, not
    /// one per blob); if any changed meanwhile, one by one.
    async fn mark_blobs(
        &self,
        batch: Vec<Digest>,
    ) -> Vec<(Digest, Result<Option<(KeyValue, u64)>>)> {
        let mark = now_ms();
        let mut txn = Txn::new();
        let mut planned = Vec::with_capacity(batch.len());
        for digest in &batch {
            match self.mark_txn(digest, mark, txn).await {
                Ok((next, any)) => {
                    txn = next;
                    planned.push(any);
                }
                Err(e) => return one_error(batch, e),
            }
        }
        if !planned.iter().any(|p| *p) {
            return batch.into_iter().map(|d| (d, Ok(None))).collect();
        }
        match self.meta.commit(txn).await {
            Ok(true) => {
                let mut out = Vec::with_capacity(batch.len());
                for (digest, any) in batch.into_iter().zip(planned) {
                    let result = if any {
                        self.own_blob_mark(&digest, mark).await
                    } else {
                        Ok(None)
                    };
                    out.push((digest, result));
                }
                out
            }
            Ok(false) => {
                let mut out = Vec::with_capacity(batch.len());
                for digest in batch {
                    let result = self.mark_blob(&digest).await;
                    out.push((digest, result));
                }
                out
            }
            Err(e) => one_error(batch, e.into()),
        }
    }

    /// Adds the mark of `digest`'s record to `txn`; false if there is
    /// nothing to mark (no record and no bytes).
    async fn mark_txn(&self, digest: &Digest, mark: u64, txn: Txn) -> Result<(Txn, bool)> {
        let key = keys::blob(digest);
        Ok(match self.meta.get(key.as_bytes()).await? {
            Some(kv) => {
                let mut record: BlobRecord = decode(&kv.key, &kv.value)?;
                record.removing_since_ms = Some(mark);
                (
                    txn.require_version(key.clone(), kv.version)
                        .put(key, encode(&record)),
                    true,
                )
            }
            // Bytes no commit has recorded (a push that died before its
            // commit, or content from before blob records): marked by
            // creating the record, which fails a commit racing for it.
            None => match self.blobs.stat(digest).await? {
                None => (txn, false),
                Some(size) => {
                    let record = BlobRecord {
                        size,
                        removing_since_ms: Some(mark),
                    };
                    (
                        txn.require_absent(key.clone()).put(key, encode(&record)),
                        true,
                    )
                }
            },
        })
    }

    /// The record of `digest` and its size if it carries the mark made at
    /// `mark` (only this mark's version may be removed).
    async fn own_blob_mark(&self, digest: &Digest, mark: u64) -> Result<Option<(KeyValue, u64)>> {
        let Some(kv) = self.meta.get(keys::blob(digest).as_bytes()).await? else {
            return Ok(None);
        };
        let record: BlobRecord = decode(&kv.key, &kv.value)?;
        let size = record.size;
        Ok((record.removing_since_ms == Some(mark)).then_some((kv, size)))
    }

    /// Marks a blob's record (creating it marked, for bytes that have
    /// none): the record as marked and the blob's size, or `None` when
    /// there is nothing to remove or the record changed first.
    async fn mark_blob(&self, digest: &Digest) -> Result<Option<(KeyValue, u64)>> {
        let mark = now_ms();
        let (txn, any) = self.mark_txn(digest, mark, Txn::new()).await?;
        if !any || !self.meta.commit(txn).await? {
            return Ok(None);
        }
        self.own_blob_mark(digest, mark).await
    }

    /// Which of the marked blobs a link, a manifest record or a trashed
    /// manifest names.
    async fn referenced_among(
        &self,
        marked: &HashMap<Digest, (KeyValue, u64)>,
    ) -> Result<HashSet<Digest>> {
        let mut referenced = HashSet::new();
        for (prefix, digest_of) in [
            (
                keys::LINK_PREFIX,
                keys::link_digest as fn(&[u8]) -> Option<Digest>,
            ),
            (keys::MANIFEST_PREFIX, keys::manifest_key_digest),
            // A manifest in the trash keeps its bytes for undelete.
            (keys::TRASH_MANIFEST_PREFIX, keys::trash_manifest_digest),
        ] {
            let mut after: Option<Vec<u8>> = None;
            loop {
                let batch = self
                    .meta
                    .scan(prefix.as_bytes(), after.as_deref(), 1000)
                    .await?;
                let Some(last) = batch.last() else { break };
                after = Some(last.key.clone());
                for kv in batch {
                    if let Some(digest) = digest_of(&kv.key)
                        && marked.contains_key(&digest)
                    {
                        referenced.insert(digest);
                    }
                }
            }
        }
        Ok(referenced)
    }

    /// Takes this removal's marks off after a failure, so that pushes of
    /// these blobs do not wait for the marks to go stale. Best effort.
    async fn unmark_blobs(&self, marked: &HashMap<Digest, (KeyValue, u64)>) {
        for (digest, (kv, size)) in marked {
            let key = keys::blob(digest);
            let txn = Txn::new()
                .require_version(key.clone(), kv.version)
                .put(key, encode(&BlobRecord::new(*size)));
            if let Err(e) = self.meta.commit(txn).await {
                tracing::debug!(%digest, error = %e, "could not unmark a blob after a failed removal");
            }
        }
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
            Removed::default()
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
            Removed { blobs: 1, bytes: 5 }
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
