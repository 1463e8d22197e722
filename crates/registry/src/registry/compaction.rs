//! Bounded metadata: the change log, tombstones and tag history would grow
//! with every write forever. Compaction drops change-log entries that every
//! reader has passed, and tombstones and tag history older than a cutoff.
//! The caller (which knows the peers) decides both bounds; this module only
//! removes what they allow, in small guarded transactions, so that it runs
//! online beside every other write.

use berth_oci::RepositoryName;
use berth_store::{KeyValue, Txn};
use serde::Serialize;

use super::{Registry, Result};
use crate::keys;
use crate::records::{ChangeEvent, Stamp, TagHistoryEntry, TagRecord, decode, encode};

/// Records removed per transaction (etcd bounds the operations of one).
const BATCH: usize = 32;

/// Records read per scan.
const PAGE: usize = 1000;

/// The highest change-log sequence compacted away (0: none).
const LOG_FLOOR: &str = "changelog/floor";

/// The highest tombstone cutoff a compaction has used: every peer's write
/// stamped before it had been applied here then, so a resynchronization
/// skips such records (the tombstones that would have outranked them may
/// be gone).
const TOMBSTONE_HORIZON: &str = "compaction/tombstone-horizon";

/// What to compact.
#[derive(Clone, Debug)]
pub struct CompactionOptions {
    /// Change-log entries up to this sequence may go (every reader has
    /// passed them), if they were also written before `log_before_ms`.
    pub log_through: u64,
    pub log_before_ms: u64,
    /// Tombstones stamped before this (wall-clock milliseconds) may go;
    /// those of this region's own deletes only before `own_tombstones_ms`
    /// too.
    pub tombstones_ms: u64,
    pub own_tombstones_ms: u64,
    /// Tag history stamped before this may go.
    pub history_ms: u64,
    /// Count only; remove nothing.
    pub dry_run: bool,
    /// Also measure the metadata by kind, before and after.
    pub measure: bool,
}

/// One kind of record: how many and their bytes (keys and values).
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Usage {
    pub records: u64,
    pub bytes: u64,
}

impl Usage {
    fn add(&mut self, kv: &KeyValue) {
        self.records += 1;
        self.bytes += (kv.key.len() + kv.value.len()) as u64;
    }
}

/// The metadata a compaction bounds, and what it keeps for the images.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MetadataUsage {
    pub change_log: Usage,
    pub tombstones: Usage,
    pub tag_history: Usage,
    pub tags: Usage,
    pub manifests: Usage,
}

/// What a compaction did (or, dry, would do).
#[derive(Clone, Debug, Default, Serialize)]
pub struct CompactionReport {
    pub dry_run: bool,
    /// Log entries removed and the highest sequence gone after the run.
    pub log_entries: u64,
    pub log_floor: u64,
    pub tombstones: u64,
    pub history_entries: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub before: Option<MetadataUsage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<MetadataUsage>,
}

/// Which records a replication snapshot pages through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    Tags,
    TagTombstones,
    Manifests,
    ManifestTombstones,
}

impl RecordKind {
    pub fn prefix(self) -> &'static str {
        match self {
            RecordKind::Tags => keys::TAG_PREFIX,
            RecordKind::TagTombstones => keys::TAG_TOMBSTONE_PREFIX,
            RecordKind::Manifests => keys::MANIFEST_PREFIX,
            RecordKind::ManifestTombstones => keys::MANIFEST_TOMBSTONE_PREFIX,
        }
    }

    pub fn parse(name: &str) -> Option<RecordKind> {
        Some(match name {
            "tags" => RecordKind::Tags,
            "tag-tombstones" => RecordKind::TagTombstones,
            "manifests" => RecordKind::Manifests,
            "manifest-tombstones" => RecordKind::ManifestTombstones,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            RecordKind::Tags => "tags",
            RecordKind::TagTombstones => "tag-tombstones",
            RecordKind::Manifests => "manifests",
            RecordKind::ManifestTombstones => "manifest-tombstones",
        }
    }
}

/// A tag-history key's tag part (`taghist/REPO:TAG/`), which groups the
/// entries of one tag.
fn history_group(key: &[u8]) -> Option<&[u8]> {
    let rest = key.strip_prefix(keys::TAG_HISTORY_PREFIX.as_bytes())?;
    let colon = rest.iter().position(|&b| b == b':')?;
    let slash = rest[colon..].iter().position(|&b| b == b'/')? + colon;
    Some(&key[..keys::TAG_HISTORY_PREFIX.len() + slash + 1])
}

impl Registry {
    /// The highest change-log sequence compacted away (0: none).
    pub async fn log_floor(&self) -> Result<u64> {
        Ok(match self.meta.get(LOG_FLOOR.as_bytes()).await? {
            Some(kv) => decode(&kv.key, &kv.value)?,
            None => 0,
        })
    }

    /// Writes of peers stamped before this were applied here when a
    /// compaction last ran (0: none ran).
    pub async fn tombstone_horizon(&self) -> Result<u64> {
        Ok(match self.meta.get(TOMBSTONE_HORIZON.as_bytes()).await? {
            Some(kv) => decode(&kv.key, &kv.value)?,
            None => 0,
        })
    }

    async fn raise_tombstone_horizon(&self, to: u64) -> Result<()> {
        loop {
            let seen = self.meta.get(TOMBSTONE_HORIZON.as_bytes()).await?;
            let current: u64 = match &seen {
                Some(kv) => decode(&kv.key, &kv.value)?,
                None => 0,
            };
            if current >= to {
                return Ok(());
            }
            let txn = Txn::new()
                .require_unchanged(TOMBSTONE_HORIZON, seen.as_ref())
                .put(TOMBSTONE_HORIZON, encode(&to));
            if self.meta.commit(txn).await? {
                return Ok(());
            }
        }
    }

    /// One page of the records of `kind` after key `after`, in key order:
    /// what a peer that fell behind the compacted log copies.
    pub async fn records_page(
        &self,
        kind: RecordKind,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>> {
        Ok(self
            .meta
            .scan(kind.prefix().as_bytes(), after, limit.clamp(1, PAGE))
            .await?)
    }

    /// A tag's record as stored (with its stamp), if it exists.
    pub async fn tag_record(&self, name: &RepositoryName, tag: &str) -> Result<Option<TagRecord>> {
        self.get_record(&keys::tag(name, tag)).await
    }

    /// Removes what `options` allow, and reports it.
    pub async fn compact_metadata(&self, options: &CompactionOptions) -> Result<CompactionReport> {
        let mut report = CompactionReport {
            dry_run: options.dry_run,
            ..Default::default()
        };
        if options.measure {
            report.before = Some(self.metadata_usage().await?);
        }
        let (removed, floor) = self.compact_log(options).await?;
        report.log_entries = removed;
        report.log_floor = floor;
        if !options.dry_run {
            // Before any tombstone goes, so that the horizon always covers
            // what is gone.
            self.raise_tombstone_horizon(options.tombstones_ms).await?;
        }
        report.tombstones = self.prune_tombstones(options).await?;
        report.history_entries = self.prune_tag_history(options).await?;
        if options.measure {
            report.after = Some(self.metadata_usage().await?);
        }
        Ok(report)
    }

    /// Counts the records and bytes of each kind compaction bounds.
    pub async fn metadata_usage(&self) -> Result<MetadataUsage> {
        Ok(MetadataUsage {
            change_log: self.usage_of(&[keys::CHANGE_PREFIX]).await?,
            tombstones: self
                .usage_of(&[keys::TAG_TOMBSTONE_PREFIX, keys::MANIFEST_TOMBSTONE_PREFIX])
                .await?,
            tag_history: self.usage_of(&[keys::TAG_HISTORY_PREFIX]).await?,
            tags: self.usage_of(&[keys::TAG_PREFIX]).await?,
            manifests: self.usage_of(&[keys::MANIFEST_PREFIX]).await?,
        })
    }

    async fn usage_of(&self, prefixes: &[&str]) -> Result<Usage> {
        let mut total = Usage::default();
        for prefix in prefixes {
            let mut after: Option<Vec<u8>> = None;
            loop {
                let page = self
                    .meta
                    .scan(prefix.as_bytes(), after.as_deref(), PAGE)
                    .await?;
                let Some(last) = page.last() else { break };
                after = Some(last.key.clone());
                for kv in &page {
                    total.add(kv);
                }
            }
        }
        Ok(total)
    }

    /// Drops log entries up to `log_through` written before the cutoff,
    /// moving the floor with each batch (so a feed reader that asks for an
    /// entry gone sees that it must resynchronize). Returns the entries
    /// removed and the floor.
    async fn compact_log(&self, options: &CompactionOptions) -> Result<(u64, u64)> {
        if options.dry_run {
            let floor = self.log_floor().await?;
            return Ok((self.count_log(floor, options).await?, floor));
        }
        let mut removed = 0;
        loop {
            let floor_kv = self.meta.get(LOG_FLOOR.as_bytes()).await?;
            let floor: u64 = match &floor_kv {
                Some(kv) => decode(&kv.key, &kv.value)?,
                None => 0,
            };
            let page = self
                .meta
                .scan(
                    keys::CHANGE_PREFIX.as_bytes(),
                    Some(keys::change(floor).as_bytes()),
                    BATCH,
                )
                .await?;
            let mut txn = Txn::new().require_unchanged(LOG_FLOOR, floor_kv.as_ref());
            let mut last = floor;
            let mut batch = 0;
            let mut ended = page.len() < BATCH;
            for kv in &page {
                let event: ChangeEvent = decode(&kv.key, &kv.value)?;
                if event.seq > options.log_through || event.ms >= options.log_before_ms {
                    ended = true;
                    break;
                }
                txn = txn.delete(kv.key.clone());
                last = event.seq;
                batch += 1;
            }
            if batch == 0 {
                return Ok((removed, floor));
            }
            txn = txn.put(LOG_FLOOR, encode(&last));
            if self.meta.commit(txn).await? {
                removed += batch;
                if ended {
                    return Ok((removed, last));
                }
            }
            // Lost to another compactor: read the floor again.
        }
    }

    /// Entries after `after` a compaction with `options` would remove.
    async fn count_log(&self, mut after: u64, options: &CompactionOptions) -> Result<u64> {
        let mut count = 0;
        loop {
            let page = self
                .meta
                .scan(
                    keys::CHANGE_PREFIX.as_bytes(),
                    Some(keys::change(after).as_bytes()),
                    PAGE,
                )
                .await?;
            if page.is_empty() {
                return Ok(count);
            }
            for kv in &page {
                let event: ChangeEvent = decode(&kv.key, &kv.value)?;
                if event.seq > options.log_through || event.ms >= options.log_before_ms {
                    return Ok(count);
                }
                count += 1;
                after = event.seq;
            }
        }
    }

    /// Drops tag and manifest tombstones stamped before the cutoff. Each
    /// removal is guarded by the version read, so a delete that renewed a
    /// tombstone meanwhile keeps it.
    async fn prune_tombstones(&self, options: &CompactionOptions) -> Result<u64> {
        let mut removed = 0;
        for prefix in [keys::TAG_TOMBSTONE_PREFIX, keys::MANIFEST_TOMBSTONE_PREFIX] {
            let mut after: Option<Vec<u8>> = None;
            let mut doomed = Vec::new();
            loop {
                let page = self
                    .meta
                    .scan(prefix.as_bytes(), after.as_deref(), PAGE)
                    .await?;
                let Some(last) = page.last() else { break };
                after = Some(last.key.clone());
                for kv in page {
                    let stamp: Stamp = decode(&kv.key, &kv.value)?;
                    let own = self.region.as_deref() == Some(stamp.origin.as_str());
                    let cutoff = if own {
                        options.tombstones_ms.min(options.own_tombstones_ms)
                    } else {
                        options.tombstones_ms
                    };
                    if super::stamp_ms(&stamp) < cutoff {
                        doomed.push(kv);
                    }
                }
                removed += self.remove_batches(&mut doomed, options, false).await?;
            }
            removed += self.remove_batches(&mut doomed, options, true).await?;
        }
        Ok(removed)
    }

    /// Drops the tag-history entries stamped before the cutoff, except the
    /// newest of a tag that exists (what it points at now, and when it was
    /// set). A deleted tag's history goes entirely once it is old: the trash
    /// keeps what undelete needs. Keys sort by tag, then stamp, so one entry
    /// held back tells whether it is its tag's newest: memory stays flat
    /// whatever a tag's history holds.
    async fn prune_tag_history(&self, options: &CompactionOptions) -> Result<u64> {
        let mut removed = 0;
        let mut after: Option<Vec<u8>> = None;
        let mut held: Option<KeyValue> = None;
        let mut doomed = Vec::new();
        loop {
            let page = self
                .meta
                .scan(keys::TAG_HISTORY_PREFIX.as_bytes(), after.as_deref(), PAGE)
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.key.clone());
            for kv in page {
                if let Some(previous) = held.take() {
                    let newest = history_group(&previous.key) != history_group(&kv.key);
                    self.judge_history(previous, newest, options, &mut doomed)
                        .await?;
                }
                held = Some(kv);
            }
            removed += self.remove_batches(&mut doomed, options, false).await?;
        }
        if let Some(previous) = held {
            self.judge_history(previous, true, options, &mut doomed)
                .await?;
        }
        removed += self.remove_batches(&mut doomed, options, true).await?;
        Ok(removed)
    }

    /// Adds one history entry to `doomed` if it may go (`newest`: the last
    /// of its tag's).
    async fn judge_history(
        &self,
        kv: KeyValue,
        newest: bool,
        options: &CompactionOptions,
        doomed: &mut Vec<KeyValue>,
    ) -> Result<()> {
        let entry: TagHistoryEntry = decode(&kv.key, &kv.value)?;
        if super::stamp_ms(&entry.stamp) >= options.history_ms {
            return Ok(());
        }
        if newest && let Some(group) = history_group(&kv.key) {
            // `taghist/REPO:TAG/` names the tag record `tag/REPO:TAG`.
            let inner = &group[keys::TAG_HISTORY_PREFIX.len()..group.len() - 1];
            let tag_key = [keys::TAG_PREFIX.as_bytes(), inner].concat();
            if self.meta.get(&tag_key).await?.is_some() {
                return Ok(());
            }
        }
        doomed.push(kv);
        Ok(())
    }

    /// Removes `doomed` in guarded batches (all of them when `all`, else
    /// only full batches), leaving the rest in it. A batch that lost to a
    /// concurrent write is retried one record at a time, keeping whatever
    /// changed. Returns how many went.
    async fn remove_batches(
        &self,
        doomed: &mut Vec<KeyValue>,
        options: &CompactionOptions,
        all: bool,
    ) -> Result<u64> {
        if options.dry_run {
            let n = if all {
                doomed.len()
            } else {
                doomed.len() - doomed.len() % BATCH
            };
            doomed.drain(..n);
            return Ok(n as u64);
        }
        let mut removed = 0;
        while doomed.len() >= BATCH || (all && !doomed.is_empty()) {
            let n = doomed.len().min(BATCH);
            let batch: Vec<KeyValue> = doomed.drain(..n).collect();
            let mut txn = Txn::new();
            for kv in &batch {
                txn = txn
                    .require_version(kv.key.clone(), kv.version)
                    .delete(kv.key.clone());
            }
            if self.meta.commit(txn).await? {
                removed += batch.len() as u64;
                continue;
            }
            for kv in batch {
                let txn = Txn::new()
                    .require_version(kv.key.clone(), kv.version)
                    .delete(kv.key);
                if self.meta.commit(txn).await? {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// One change-log entry, if it is still there.
    pub async fn change(&self, seq: u64) -> Result<Option<ChangeEvent>> {
        self.get_record(&keys::change(seq)).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use berth_oci::{Digest, Reference, Tag};
    use berth_store::blob::fs::FsOptions;
    use berth_store::{ByteStream, FsBlobStore, RedbMetaStore};
    use bytes::Bytes;

    use super::*;
    use crate::registry::Limits;

    const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

    fn registry(dir: &std::path::Path) -> Registry {
        let meta = Arc::new(RedbMetaStore::open(&dir.join("meta.redb")).unwrap());
        let blobs = Arc::new(FsBlobStore::open(dir, FsOptions { verify_reads: true }).unwrap());
        Registry::new(meta, blobs, Limits::default()).with_region("eu".to_string())
    }

    fn repo() -> RepositoryName {
        RepositoryName::parse("team/app").unwrap()
    }

    /// Pushes a one-layer image (distinct by `seed`) as `tag`.
    async fn push(registry: &Registry, tag: &str, seed: u8) -> Digest {
        let layer = vec![seed; 10];
        let digest = Digest::sha256_of(&layer);
        let body: ByteStream = Box::pin(futures_util::stream::iter([Ok(Bytes::from(layer))]));
        registry.put_blob(&repo(), &digest, body).await.unwrap();
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": digest.to_string(), "size": 10},
            "layers": [],
        })
        .to_string();
        registry
            .put_manifest(
                &repo(),
                &Reference::Tag(Tag::parse(tag).unwrap()),
                Some(OCI_MANIFEST),
                Bytes::from(manifest),
            )
            .await
            .unwrap()
            .digest
    }

    fn options(log_through: u64, cutoff_ms: u64) -> CompactionOptions {
        CompactionOptions {
            log_through,
            log_before_ms: u64::MAX,
            tombstones_ms: cutoff_ms,
            own_tombstones_ms: cutoff_ms,
            history_ms: cutoff_ms,
            dry_run: false,
            measure: true,
        }
    }

    #[tokio::test]
    async fn the_log_goes_up_to_the_bound_and_a_reader_behind_it_sees_the_gap() {
        let dir = tempfile::tempdir().unwrap();
        let registry = registry(dir.path());
        for seed in 1..=5 {
            push(&registry, &format!("v{seed}"), seed).await;
        }
        let dry = registry
            .compact_metadata(&CompactionOptions {
                dry_run: true,
                ..options(3, 0)
            })
            .await
            .unwrap();
        assert_eq!((dry.log_entries, dry.log_floor), (3, 0));
        assert_eq!(
            registry.changes_after(0, 100).await.unwrap().events.len(),
            5
        );

        let report = registry.compact_metadata(&options(3, 0)).await.unwrap();
        assert_eq!((report.log_entries, report.log_floor), (3, 3));
        assert_eq!(report.before.unwrap().change_log.records, 5);
        assert_eq!(report.after.unwrap().change_log.records, 2);
        // A reader past the floor reads on; one behind it is told.
        let page = registry.changes_after(3, 100).await.unwrap();
        assert_eq!(
            page.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [4, 5]
        );
        assert_eq!(page.compacted, 3);
        assert_eq!(registry.changes_after(1, 100).await.unwrap().compacted, 3);
        // Entries newer than the time bound stay whatever the readers.
        let kept = registry
            .compact_metadata(&CompactionOptions {
                log_before_ms: 0,
                ..options(u64::MAX, 0)
            })
            .await
            .unwrap();
        assert_eq!(kept.log_entries, 0);
        let all = registry
            .compact_metadata(&options(u64::MAX, 0))
            .await
            .unwrap();
        assert_eq!((all.log_entries, all.log_floor), (2, 5));
        // Writes go on numbering after the floor.
        push(&registry, "v6", 6).await;
        let page = registry.changes_after(5, 100).await.unwrap();
        assert_eq!(page.events.iter().map(|e| e.seq).collect::<Vec<_>>(), [6]);
        assert_eq!(page.compacted, 5);
    }

    #[tokio::test]
    async fn history_keeps_a_tags_current_value_and_old_tombstones_go() {
        let dir = tempfile::tempdir().unwrap();
        let registry = registry(dir.path());
        push(&registry, "v1", 1).await;
        let current = push(&registry, "v1", 2).await;
        push(&registry, "old", 3).await;
        registry
            .delete_manifest(&repo(), &Reference::Tag(Tag::parse("old").unwrap()))
            .await
            .unwrap();
        assert_eq!(registry.tag_history(&repo(), "v1").await.unwrap().len(), 2);

        // Nothing is old enough yet.
        let none = registry.compact_metadata(&options(0, 0)).await.unwrap();
        assert_eq!((none.tombstones, none.history_entries), (0, 0));

        let report = registry
            .compact_metadata(&options(0, u64::MAX))
            .await
            .unwrap();
        assert_eq!(report.tombstones, 1, "{report:?}");
        // v1's first value, and the deleted tag's only one.
        assert_eq!(report.history_entries, 2, "{report:?}");
        let history = registry.tag_history(&repo(), "v1").await.unwrap();
        assert_eq!(history.len(), 1);
        assert_eq!(history[0].digest, current);
        assert!(
            registry
                .tag_history(&repo(), "old")
                .await
                .unwrap()
                .is_empty()
        );
        let after = report.after.unwrap();
        assert_eq!(after.tombstones.records, 0);
        assert_eq!(after.tag_history.records, 1);
        assert_eq!(after.tags.records, 1);
        // The log was not touched: nothing acknowledged it.
        assert_eq!(after.change_log.records, 4);
    }

    #[test]
    fn history_groups_end_at_the_tag() {
        assert_eq!(
            history_group(b"taghist/a/b:v1/00000000000000000001-eu"),
            Some(&b"taghist/a/b:v1/"[..])
        );
        assert_eq!(history_group(b"taghist/a/b"), None);
        assert_eq!(history_group(b"tag/a:b/1"), None);
    }
}
