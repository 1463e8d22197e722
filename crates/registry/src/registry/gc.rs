//! Online garbage collection: repository links that no manifest of their
//! repository references, then the bytes of blobs that nothing references,
//! then upload data without a session, all while the registry serves.
//!
//! A link is removed by the same mark-then-check protocol as bytes (see
//! `removal`): the collector marks it (which changes its version), scans
//! its repository's manifests again, and deletes it only if it is still
//! unreferenced and unchanged. A manifest commit that references the link
//! either ran before the mark (the second scan sees it and the link stays)
//! or read the marked link, in which case it clears the mark in its own
//! commit and the collector's delete fails; a `HEAD` that answers "present"
//! clears it too. So no acknowledged manifest ever loses a link, and no
//! client told "present" loses the blob within a grace period.

use std::collections::{HashMap, HashSet};

use berth_oci::Digest;
use berth_store::{KeyValue, Txn};

use super::{Registry, Result, now_ms};
use crate::RegistryError;
use crate::keys;
use crate::records::{LinkRecord, ManifestRecord, decode, encode};

/// Candidates handed to one removal: each removal must delete its bytes
/// within a minute of marking them.
const BLOB_BATCH: usize = 256;

/// Marks and removals in flight at once.
const PARALLEL: usize = 16;

/// Links marked or removed by one transaction: 64 operations, well inside
/// etcd's limit of 128 per transaction.
const BATCH: usize = 32;

/// `items` in batches of `BATCH`.
fn batches<T>(items: Vec<T>) -> Vec<Vec<T>> {
    let mut out = Vec::with_capacity(items.len().div_ceil(BATCH));
    let mut items = items.into_iter().peekable();
    while items.peek().is_some() {
        out.push(items.by_ref().take(BATCH).collect());
    }
    out
}

/// Keys read per scan request (etcd answers at most 4 MiB).
const SCAN_BATCH: usize = 1000;

#[derive(Clone, Copy, Debug)]
pub struct GcOptions {
    /// Report what would be removed; change nothing.
    pub dry_run: bool,
    /// Links and bytes younger than this are kept whatever references them:
    /// a push may be between its blobs and its manifest.
    pub grace_ms: u64,
}

/// What a collection removed (or, dry, would remove).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct GcReport {
    /// What the run is doing: `trash`, `manifests`, `links`, `blobs`,
    /// `uploads`, then `done`.
    pub phase: String,
    pub dry_run: bool,
    pub grace_secs: u64,
    pub manifests_scanned: u64,
    pub links_scanned: u64,
    pub blobs_scanned: u64,
    pub links_removed: u64,
    /// Links from before link dates, dated now (collectable one grace
    /// period later).
    pub links_dated: u64,
    pub blobs_removed: u64,
    pub bytes_removed: u64,
    pub uploads_removed: u64,
    /// Trash entries past their retention, emptied (their content then
    /// collected like any other).
    #[serde(default)]
    pub trash_emptied: u64,
    pub duration_ms: u64,
}

impl Candidate {
    /// The link as it was, without any collector's mark (also one a killed
    /// run left).
    fn unmarked(&self) -> LinkRecord {
        LinkRecord {
            removing_since_ms: None,
            ..self.record.clone()
        }
    }
}

/// Where a running collection reports how far it got.
pub type Progress = tokio::sync::watch::Sender<GcReport>;

/// A link the collector considers removing.
struct Candidate {
    repository: String,
    digest: Digest,
    kv: KeyValue,
    record: LinkRecord,
}

impl Registry {
    /// Collects garbage once; see the module's documentation for why it is
    /// safe to run while the registry serves. `progress` sees the report
    /// as it grows.
    pub async fn collect_garbage(
        &self,
        options: GcOptions,
        progress: Option<&Progress>,
    ) -> Result<GcReport> {
        let started = std::time::Instant::now();
        let mut report = GcReport {
            phase: "manifests".into(),
            dry_run: options.dry_run,
            grace_secs: options.grace_ms / 1000,
            ..GcReport::default()
        };
        let publish = |report: &GcReport, phase: &str| {
            if let Some(progress) = progress {
                let mut shown = report.clone();
                shown.phase = phase.to_string();
                shown.duration_ms = started.elapsed().as_millis() as u64;
                progress.send_replace(shown);
            }
        };
        let cutoff = now_ms().saturating_sub(options.grace_ms);

        publish(&report, "trash");
        report.trash_emptied = self.empty_expired_trash(options.dry_run).await?;
        publish(&report, "manifests");
        let (references, manifests) = self.manifest_references(None, &mut report).await?;
        publish(&report, "links");
        let (candidates, mut linked) = self
            .unreferenced_links(&references, cutoff, options.dry_run, &mut report)
            .await?;
        if options.dry_run {
            report.links_removed = candidates.len() as u64;
        } else {
            let kept = self.remove_links(candidates, &mut report).await?;
            linked.extend(kept);
        }

        publish(&report, "blobs");
        let stored = self.blobs.list().await?;
        report.blobs_scanned = stored.len() as u64;
        // Bytes a manifest names stay even where its link was deleted by
        // hand: deleting a layer from one repository must not break the
        // manifest beyond repair by a re-push of that layer.
        let named: HashSet<&Digest> = references.values().flatten().collect();
        let orphans: Vec<(Digest, u64)> = stored
            .into_iter()
            .filter(|b| {
                b.modified_ms < cutoff
                    && !linked.contains(&b.digest)
                    && !manifests.contains(&b.digest)
                    && !named.contains(&b.digest)
            })
            .map(|b| (b.digest, b.size))
            .collect();
        if options.dry_run {
            report.blobs_removed = orphans.len() as u64;
            report.bytes_removed = orphans.iter().map(|(_, size)| size).sum();
        } else {
            for batch in orphans.chunks(BLOB_BATCH) {
                let digests: Vec<Digest> = batch.iter().map(|(d, _)| d.clone()).collect();
                let removed = self.remove_unreferenced_blobs(&digests).await?;
                report.blobs_removed += removed.blobs as u64;
                report.bytes_removed += removed.bytes;
                publish(&report, "blobs");
            }
            publish(&report, "uploads");
            report.uploads_removed = self
                .expire_uploads(self.limits.upload_ttl_ms, super::ORPHAN_GRACE_MS)
                .await? as u64;
        }
        report.phase = "done".into();
        report.duration_ms = started.elapsed().as_millis() as u64;
        if let Some(progress) = progress {
            progress.send_replace(report.clone());
        }
        Ok(report)
    }

    /// Every manifest's references by repository (of one repository, or of
    /// all), and the digests of the manifests themselves.
    async fn manifest_references(
        &self,
        repository: Option<&str>,
        report: &mut GcReport,
    ) -> Result<(HashMap<String, HashSet<Digest>>, HashSet<Digest>)> {
        let prefix = match repository {
            Some(name) => format!("{}{name}:", keys::MANIFEST_PREFIX),
            None => keys::MANIFEST_PREFIX.to_string(),
        };
        let mut references: HashMap<String, HashSet<Digest>> = HashMap::new();
        let mut manifests = HashSet::new();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let batch = self
                .meta
                .scan(prefix.as_bytes(), after.as_deref(), SCAN_BATCH)
                .await?;
            let Some(last) = batch.last() else { break };
            after = Some(last.key.clone());
            for kv in batch {
                let Some((name, digest)) = keys::manifest_key_parts(&kv.key) else {
                    continue;
                };
                let record: ManifestRecord = decode(&kv.key, &kv.value)?;
                report.manifests_scanned += 1;
                references
                    .entry(name.to_string())
                    .or_default()
                    .extend(record.references);
                manifests.insert(digest);
            }
        }
        // Deleted manifests in the trash count as present until it is
        // emptied: undelete needs their bytes and their links.
        for (name, digest, entry) in self.live_trash(repository).await? {
            references
                .entry(name)
                .or_default()
                .extend(entry.record.references);
            manifests.insert(digest);
        }
        Ok((references, manifests))
    }

    /// Links no manifest of their repository references and older than the
    /// cutoff, and the digests of every other link. Links without a date
    /// are dated now (unless dry) and kept.
    async fn unreferenced_links(
        &self,
        references: &HashMap<String, HashSet<Digest>>,
        cutoff: u64,
        dry_run: bool,
        report: &mut GcReport,
    ) -> Result<(Vec<Candidate>, HashSet<Digest>)> {
        let mut candidates = Vec::new();
        let mut linked = HashSet::new();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let batch = self
                .meta
                .scan(keys::LINK_PREFIX.as_bytes(), after.as_deref(), SCAN_BATCH)
                .await?;
            let Some(last) = batch.last() else { break };
            after = Some(last.key.clone());
            for kv in batch {
                let Some((name, digest)) = keys::link_parts(&kv.key) else {
                    continue;
                };
                report.links_scanned += 1;
                let record: LinkRecord = decode(&kv.key, &kv.value)?;
                let referenced = references.get(name).is_some_and(|r| r.contains(&digest));
                // A link confirmed less than the refresh time ago is not
                // dated again when a client relies on it: counted from the
                // end of that time, every client told "present" has a whole
                // grace period.
                let confirmed_until = record.linked_ms.saturating_add(self.limits.link_refresh_ms);
                if referenced || (record.linked_ms != 0 && confirmed_until >= cutoff) {
                    linked.insert(digest);
                    continue;
                }
                if record.linked_ms == 0 {
                    linked.insert(digest);
                    if !dry_run {
                        let dated = LinkRecord {
                            linked_ms: now_ms(),
                            ..record
                        };
                        let txn = Txn::new()
                            .require_version(kv.key.clone(), kv.version)
                            .put(kv.key.clone(), encode(&dated));
                        if self.meta.commit(txn).await? {
                            report.links_dated += 1;
                        }
                    }
                    continue;
                }
                candidates.push(Candidate {
                    repository: name.to_string(),
                    digest,
                    kv,
                    record,
                });
            }
        }
        Ok((candidates, linked))
    }

    /// Marks the candidate links, checks their repositories' manifests
    /// again, and removes those still unreferenced and unchanged. Returns
    /// the digests of the links that stayed.
    async fn remove_links(
        &self,
        candidates: Vec<Candidate>,
        report: &mut GcReport,
    ) -> Result<HashSet<Digest>> {
        use futures_util::StreamExt as _;
        let mut kept = HashSet::new();
        let mut marked: HashMap<String, Vec<(Candidate, u64)>> = HashMap::new();
        let mut failure = None;
        // After a failure no new mark starts; those in flight finish, so
        // that every committed mark is known and can be taken off.
        let failed = std::sync::atomic::AtomicBool::new(false);
        let failed = &failed;
        let mut marks = futures_util::stream::iter(batches(candidates))
            .map(|batch| async move {
                if failed.load(std::sync::atomic::Ordering::Relaxed) {
                    return batch.into_iter().map(|c| (c, Ok(None))).collect();
                }
                let results = self.mark_links(batch).await;
                if results.iter().any(|(_, r)| r.is_err()) {
                    failed.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                results
            })
            .buffer_unordered(PARALLEL / 4)
            .flat_map(futures_util::stream::iter);
        while let Some((candidate, result)) = marks.next().await {
            match result {
                Ok(Some(version)) => marked
                    .entry(candidate.repository.clone())
                    .or_default()
                    .push((candidate, version)),
                // Confirmed, claimed back or removed meanwhile.
                Ok(None) => {
                    kept.insert(candidate.digest);
                }
                Err(e) => failure = Some(e),
            }
        }
        drop(marks);
        if let Some(e) = failure {
            self.unmark_links(marked.into_values().flatten()).await;
            return Err(e);
        }
        let repositories: Vec<String> = marked.keys().cloned().collect();
        for repository in repositories {
            let mut scratch = GcReport::default();
            let references = match self
                .manifest_references(Some(&repository), &mut scratch)
                .await
            {
                Ok((references, _)) => references,
                Err(e) => {
                    self.unmark_links(marked.into_values().flatten()).await;
                    return Err(e);
                }
            };
            let references = references.get(&repository);
            let Some(links) = marked.remove(&repository) else {
                continue;
            };
            let decided: Vec<(Candidate, u64, bool)> = links
                .into_iter()
                .map(|(candidate, version)| {
                    let referenced = references.is_some_and(|r| r.contains(&candidate.digest));
                    (candidate, version, referenced)
                })
                .collect();
            let outcomes: Vec<(Digest, Result<bool>)> =
                futures_util::stream::iter(batches(decided))
                    .map(|batch| self.finish_links(batch))
                    .buffer_unordered(PARALLEL / 4)
                    .flat_map(futures_util::stream::iter)
                    .collect()
                    .await;
            for (digest, removed) in outcomes {
                match removed {
                    Ok(true) => {
                        report.links_removed += 1;
                        tracing::debug!(repository, %digest, "removed an unreferenced link");
                    }
                    Ok(false) => {
                        kept.insert(digest);
                    }
                    Err(e) => {
                        // The repositories not reached yet keep no marks.
                        self.unmark_links(marked.into_values().flatten()).await;
                        return Err(e);
                    }
                }
            }
        }
        Ok(kept)
    }

    /// Marks a batch of candidate links in one transaction (one commit, not
    /// one per link: each is a disk sync or an etcd round); if any of them
    /// changed meanwhile, one by one. The version of each mark, or `None`
    /// for a link that changed first.
    async fn mark_links(&self, batch: Vec<Candidate>) -> Vec<(Candidate, Result<Option<u64>>)> {
        let mark = now_ms();
        let mut txn = Txn::new();
        for candidate in &batch {
            let key = &candidate.kv.key;
            let record = LinkRecord {
                removing_since_ms: Some(mark),
                ..candidate.record.clone()
            };
            txn = txn
                .require_version(key.clone(), candidate.kv.version)
                .put(key.clone(), encode(&record));
        }
        match self.meta.commit(txn).await {
            Ok(true) => {
                let mut out = Vec::with_capacity(batch.len());
                for candidate in batch {
                    let version = self.own_mark(&candidate.kv.key, mark).await;
                    out.push((candidate, version));
                }
                out
            }
            Ok(false) => {
                let mut out = Vec::with_capacity(batch.len());
                for candidate in batch {
                    let version = self.mark_link(&candidate).await;
                    out.push((candidate, version));
                }
                out
            }
            Err(e) => {
                let e: RegistryError = e.into();
                let message = e.to_string();
                batch
                    .into_iter()
                    .map(|c| {
                        let err = RegistryError::Store(berth_store::StoreError::Unavailable(
                            message.clone(),
                        ));
                        (c, Err(err))
                    })
                    .collect()
            }
        }
    }

    /// Removes (or, if referenced, unmarks) a batch of marked links in one
    /// transaction; if any changed meanwhile (claimed back), one by one.
    /// Whether each was removed.
    async fn finish_links(
        &self,
        batch: Vec<(Candidate, u64, bool)>,
    ) -> Vec<(Digest, Result<bool>)> {
        let mut txn = Txn::new();
        for (candidate, version, referenced) in &batch {
            let key = candidate.kv.key.clone();
            txn = txn.require_version(key.clone(), *version);
            txn = if *referenced {
                txn.put(key, encode(&candidate.unmarked()))
            } else {
                txn.delete(key)
            };
        }
        if let Ok(true) = self.meta.commit(txn).await {
            return batch
                .into_iter()
                .map(|(c, _, referenced)| (c.digest, Ok(!referenced)))
                .collect();
        }
        let mut out = Vec::with_capacity(batch.len());
        for (candidate, version, referenced) in batch {
            let key = candidate.kv.key.clone();
            let txn = Txn::new().require_version(key.clone(), version);
            let removed = if referenced {
                // Referenced since the first scan: unmarked.
                let txn = txn.put(key, encode(&candidate.unmarked()));
                self.meta.commit(txn).await.map(|_| false)
            } else {
                // Fails if claimed back by a push or a HEAD.
                self.meta.commit(txn.delete(key)).await
            };
            out.push((candidate.digest, removed.map_err(Into::into)));
        }
        out
    }

    /// The version of `key` if it still carries the mark made at `mark`: a
    /// HEAD or a push may claim the link back between the commit and this
    /// read, and the version read is then theirs and must stay.
    async fn own_mark(&self, key: &[u8], mark: u64) -> Result<Option<u64>> {
        Ok(self.meta.get(key).await?.and_then(|kv| {
            decode::<LinkRecord>(&kv.key, &kv.value)
                .ok()
                .filter(|r| r.removing_since_ms == Some(mark))
                .map(|_| kv.version)
        }))
    }

    /// Marks a candidate link; the version of the mark, or `None` if the
    /// link changed first.
    async fn mark_link(&self, candidate: &Candidate) -> Result<Option<u64>> {
        let mark = now_ms();
        let record = LinkRecord {
            removing_since_ms: Some(mark),
            ..candidate.record.clone()
        };
        let key = &candidate.kv.key;
        let txn = Txn::new()
            .require_version(key.clone(), candidate.kv.version)
            .put(key.clone(), encode(&record));
        if !self.meta.commit(txn).await? {
            return Ok(None);
        }
        self.own_mark(key, mark).await
    }

    /// Takes the collector's marks off links after a failure, so that
    /// pushes do not meet them. Best effort: a mark left behind only delays
    /// its link's removal, and a push that references the link clears it.
    async fn unmark_links(&self, marked: impl IntoIterator<Item = (Candidate, u64)>) {
        for (candidate, version) in marked {
            let key = candidate.kv.key.clone();
            let txn = Txn::new()
                .require_version(key.clone(), version)
                .put(key, encode(&candidate.unmarked()));
            if let Err(e) = self.meta.commit(txn).await {
                tracing::debug!(error = %e, "could not unmark a link after a failed collection");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use berth_oci::{Reference, RepositoryName, Tag};
    use berth_store::blob::fs::FsOptions;
    use berth_store::{ByteStream, FsBlobStore, RedbMetaStore};
    use bytes::Bytes;

    use super::*;
    use crate::registry::Limits;

    const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

    fn registry(dir: &std::path::Path) -> Registry {
        with_trash(dir, 0)
    }

    /// A registry keeping deleted manifests `trash_ms` milliseconds.
    fn with_trash(dir: &std::path::Path, trash_ms: u64) -> Registry {
        let meta = Arc::new(RedbMetaStore::open(&dir.join("meta.redb")).unwrap());
        let blobs = Arc::new(FsBlobStore::open(dir, FsOptions { verify_reads: true }).unwrap());
        let limits = Limits {
            // Links count as confirmed for a millisecond only, so that the
            // tests need not wait ten minutes.
            link_refresh_ms: 1,
            trash_retention_ms: trash_ms,
            ..Limits::default()
        };
        Registry::new(meta, blobs, limits)
    }

    fn body(bytes: &[u8]) -> ByteStream {
        let bytes = Bytes::copy_from_slice(bytes);
        Box::pin(futures_util::stream::iter([Ok(bytes)]))
    }

    fn repo(name: &str) -> RepositoryName {
        RepositoryName::parse(name).unwrap()
    }

    async fn blob(registry: &Registry, name: &str, content: &[u8]) -> Digest {
        let digest = Digest::sha256_of(content);
        registry
            .put_blob(&repo(name), &digest, body(content))
            .await
            .unwrap();
        digest
    }

    fn manifest(config: &Digest, layer: &Digest, size: usize) -> Bytes {
        Bytes::from(
            serde_json::json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": config.to_string(),
                    "size": 2,
                },
                "layers": [{
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer.to_string(),
                    "size": size,
                }],
            })
            .to_string(),
        )
    }

    async fn push(registry: &Registry, name: &str, tag: &str, bytes: Bytes) -> Result<Digest> {
        let reference = Reference::Tag(Tag::parse(tag).unwrap());
        Ok(registry
            .put_manifest(&repo(name), &reference, Some(OCI_MANIFEST), bytes)
            .await?
            .digest)
    }

    fn now(grace_ms: u64) -> GcOptions {
        GcOptions {
            dry_run: false,
            grace_ms,
        }
    }

    async fn link(registry: &Registry, name: &str, digest: &Digest) -> Option<LinkRecord> {
        registry.link(&repo(name), digest).await.unwrap()
    }

    /// Marks a link the way the collector does before it checks again.
    async fn mark(registry: &Registry, name: &str, digest: &Digest) {
        let key = keys::link(&repo(name), digest);
        let mut record = link(registry, name, digest).await.unwrap();
        record.removing_since_ms = Some(now_ms());
        registry
            .meta
            .commit(Txn::new().put(key, encode(&record)))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn only_what_nothing_references_goes_and_only_after_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let registry = registry(dir.path());
        let config = blob(&registry, "app", b"{}").await;
        let layer = blob(&registry, "app", b"layer").await;
        let stray = blob(&registry, "app", b"stray").await;
        let shared = blob(&registry, "app", b"shared").await;
        blob(&registry, "other", b"shared").await;
        blob(&registry, "other", b"{}").await;
        let image = push(&registry, "app", "v1", manifest(&config, &layer, 5))
            .await
            .unwrap();
        push(&registry, "other", "v1", manifest(&config, &shared, 6))
            .await
            .unwrap();
        // A push that died between its bytes and its commit.
        let orphan = Digest::sha256_of(b"orphan");
        registry
            .blobs
            .put(&orphan, body(b"orphan"), u64::MAX)
            .await
            .unwrap();

        // Everything is younger than an hour: nothing goes.
        let report = registry
            .collect_garbage(now(3_600_000), None)
            .await
            .unwrap();
        assert_eq!((report.links_removed, report.blobs_removed), (0, 0));

        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let dry = registry
            .collect_garbage(
                GcOptions {
                    dry_run: true,
                    grace_ms: 0,
                },
                None,
            )
            .await
            .unwrap();
        // stray's and shared's links in app; stray's and the orphan's bytes.
        assert_eq!((dry.links_removed, dry.blobs_removed), (2, 2));
        assert_eq!(dry.bytes_removed, 5 + 6);
        assert!(link(&registry, "app", &stray).await.is_some());

        let report = registry.collect_garbage(now(0), None).await.unwrap();
        assert_eq!((report.links_removed, report.blobs_removed), (2, 2));
        assert_eq!(report.bytes_removed, 5 + 6);
        for gone in [&stray, &orphan] {
            assert_eq!(registry.blobs.stat(gone).await.unwrap(), None);
        }
        assert!(link(&registry, "app", &shared).await.is_none());
        // Still referenced elsewhere: its bytes stay.
        assert!(link(&registry, "other", &shared).await.is_some());
        assert_eq!(registry.blobs.stat(&shared).await.unwrap(), Some(6));
        // The image pulls whole: manifest bytes, config and layer.
        let reference = Reference::Digest(image.clone());
        let got = registry
            .get_manifest(&repo("app"), &reference, &[OCI_MANIFEST.to_string()])
            .await
            .unwrap();
        assert_eq!(got.bytes, manifest(&config, &layer, 5));
        for kept in [&config, &layer] {
            assert!(registry.stat_blob(&repo("app"), kept).await.is_ok());
        }

        // A second run finds nothing left.
        let again = registry.collect_garbage(now(0), None).await.unwrap();
        assert_eq!((again.links_removed, again.blobs_removed), (0, 0));
    }

    #[tokio::test]
    async fn a_manifest_that_reads_a_marked_link_claims_it_back() {
        let dir = tempfile::tempdir().unwrap();
        let registry = registry(dir.path());
        let config = blob(&registry, "app", b"{}").await;
        let layer = blob(&registry, "app", b"layer").await;
        // The collector marked both links and is about to check again.
        mark(&registry, "app", &config).await;
        mark(&registry, "app", &layer).await;
        let marked = registry
            .meta
            .get(keys::link(&repo("app"), &layer).as_bytes())
            .await
            .unwrap()
            .unwrap();
        push(&registry, "app", "v1", manifest(&config, &layer, 5))
            .await
            .unwrap();
        // The push cleared the marks, so the collector's delete, which
        // requires the marked version, fails.
        let now = link(&registry, "app", &layer).await.unwrap();
        assert!(now.removing_since_ms.is_none());
        let delete = Txn::new()
            .require_version(marked.key.clone(), marked.version)
            .delete(marked.key.clone());
        assert!(!registry.meta.commit(delete).await.unwrap());
        // And a HEAD that says "present" claims a link back the same way.
        let stray = blob(&registry, "app", b"stray").await;
        mark(&registry, "app", &stray).await;
        registry.confirm_blob(&repo("app"), &stray).await.unwrap();
        assert!(
            link(&registry, "app", &stray)
                .await
                .unwrap()
                .removing_since_ms
                .is_none()
        );
    }

    #[tokio::test]
    async fn records_from_before_dates_and_blob_records_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let registry = registry(dir.path());
        let config = blob(&registry, "app", b"{}").await;
        let layer = blob(&registry, "app", b"layer").await;
        let old = blob(&registry, "app", b"old").await;
        let image = push(&registry, "app", "v1", manifest(&config, &layer, 5))
            .await
            .unwrap();
        // As an older version wrote them: a link without a date, and a
        // manifest whose bytes have no blob record.
        let key = keys::link(&repo("app"), &old);
        let legacy = serde_json::json!({ "size": 3 }).to_string();
        registry
            .meta
            .commit(
                Txn::new()
                    .put(key, legacy.into_bytes())
                    .delete(keys::blob(&image)),
            )
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let report = registry.collect_garbage(now(0), None).await.unwrap();
        assert_eq!(report.links_dated, 1);
        assert_eq!((report.links_removed, report.blobs_removed), (0, 0));
        assert!(registry.blobs.stat(&image).await.unwrap().is_some());
        // Dated now, the link goes one grace period later.
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let report = registry.collect_garbage(now(0), None).await.unwrap();
        assert_eq!((report.links_removed, report.blobs_removed), (1, 1));
        assert!(registry.blobs.stat(&image).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn the_trash_keeps_content_until_it_expires() {
        let dir = tempfile::tempdir().unwrap();
        let registry = with_trash(dir.path(), 300);
        let config = blob(&registry, "app", b"{}").await;
        let layer = blob(&registry, "app", b"layer").await;
        let image = push(&registry, "app", "v1", manifest(&config, &layer, 5))
            .await
            .unwrap();
        registry
            .delete_manifest(&repo("app"), &Reference::Digest(image.clone()))
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let report = registry.collect_garbage(now(0), None).await.unwrap();
        assert_eq!(report.trash_emptied, 0);
        assert_eq!((report.links_removed, report.blobs_removed), (0, 0));
        assert!(registry.blobs.stat(&image).await.unwrap().is_some());

        tokio::time::sleep(std::time::Duration::from_millis(350)).await;
        // Expired: an undelete no longer starts.
        assert!(
            registry
                .undelete(&repo("app"), &Reference::Digest(image.clone()), None)
                .await
                .is_err()
        );
        let report = registry.collect_garbage(now(0), None).await.unwrap();
        assert_eq!(report.trash_emptied, 1);
        // The config, the layer and the manifest's own bytes.
        assert_eq!((report.links_removed, report.blobs_removed), (2, 3));
        assert!(registry.trash(None).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_manifest_committed_after_the_first_scan_keeps_its_links() {
        let dir = tempfile::tempdir().unwrap();
        let registry = registry(dir.path());
        let config = blob(&registry, "app", b"{}").await;
        let layer = blob(&registry, "app", b"layer").await;
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        // The collector's first scan: nothing references the two links.
        let mut report = GcReport::default();
        let (references, _) = registry
            .manifest_references(None, &mut report)
            .await
            .unwrap();
        let (candidates, _) = registry
            .unreferenced_links(&references, now_ms(), false, &mut report)
            .await
            .unwrap();
        assert_eq!(candidates.len(), 2);
        // A push lands before the marks: its commit does not change the
        // links it requires, so only the second scan can see it.
        push(&registry, "app", "v1", manifest(&config, &layer, 5))
            .await
            .unwrap();
        let kept = registry
            .remove_links(candidates, &mut report)
            .await
            .unwrap();
        assert_eq!(report.links_removed, 0);
        assert_eq!(kept.len(), 2);
        for digest in [&config, &layer] {
            let link = link(&registry, "app", digest).await.unwrap();
            assert!(link.removing_since_ms.is_none(), "unmarked again");
        }
    }
}
