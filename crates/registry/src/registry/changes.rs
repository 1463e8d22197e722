//! Replication support in the registry: every local write is stamped with a
//! hybrid logical clock and appended to the change log in the same
//! transaction (an outbox), and changes from other regions are applied by
//! last-writer-wins on stamps, with tombstones so that deletes propagate and
//! older writes never resurrect what a newer one removed.
//!
//! The rules, the same in every region whatever order events arrive in:
//! - a tag is a register: the write (set or untag) with the greatest stamp
//!   wins; every value it had stays in its history;
//! - a manifest is present unless a delete's stamp is greater than every put
//!   of it (a tag set counts as a put of its manifest);
//! - a tag whose manifest was deleted by a later stamp is deleted too.

use std::sync::atomic::{AtomicU64, Ordering};

use berth_oci::{Digest, RepositoryName, Tag};
use berth_store::{KeyValue, Txn};
use bytes::Bytes;

use super::manifests::MissingLink;
use super::{Registry, Result, TXN_ATTEMPTS, now_ms};
use crate::RegistryError;
use crate::keys;
use crate::records::{
    Change, ChangeEvent, LogHead, ManifestRecord, Stamp, TagHistoryEntry, TagRecord, decode, encode,
};

/// A hybrid logical clock: milliseconds in the high bits, a counter in the
/// low 16, never going backwards and always past every stamp observed.
#[derive(Default)]
pub struct Hlc {
    last: AtomicU64,
}

impl Hlc {
    pub fn now(&self) -> u64 {
        let physical = now_ms() << 16;
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let next = physical.max(last.saturating_add(1));
            match self
                .last
                .compare_exchange(last, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }

    /// Moves the clock past a stamp seen from elsewhere.
    pub fn observe(&self, hlc: u64) {
        self.last.fetch_max(hlc, Ordering::AcqRel);
    }
}

/// The wall-clock milliseconds of a stamp.
pub fn stamp_ms(stamp: &Stamp) -> u64 {
    stamp.hlc >> 16
}

/// How far ahead of this node's clock a replicated stamp may be by default
/// (`Limits::max_clock_skew_ms`). Further means a broken clock somewhere:
/// such a change would win every conflict, so it waits (the worker
/// retries) until the clocks agree.
pub const MAX_CLOCK_SKEW_MS: u64 = 10 * 60 * 1000;

fn check_skew(stamp: &Stamp, max_skew_ms: u64) -> Result<()> {
    if stamp_ms(stamp) > now_ms().saturating_add(max_skew_ms) {
        return Err(RegistryError::Store(berth_store::StoreError::Unavailable(
            format!(
                "a change stamped by region {} is {} s ahead of this clock; waiting for clocks to agree",
                stamp.origin,
                (stamp_ms(stamp) - now_ms()) / 1000
            ),
        )));
    }
    Ok(())
}

/// How long a logged write waits for its turn before it fails (503).
const LOG_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// A record that carries the stamp of the write that made it.
pub(super) trait Stamped: serde::de::DeserializeOwned {
    fn stamp(&self) -> Option<&Stamp>;
}

impl Stamped for Stamp {
    fn stamp(&self) -> Option<&Stamp> {
        Some(self)
    }
}

impl Stamped for TagRecord {
    fn stamp(&self) -> Option<&Stamp> {
        self.stamp.as_ref()
    }
}

impl Stamped for ManifestRecord {
    fn stamp(&self) -> Option<&Stamp> {
        self.stamp.as_ref()
    }
}

/// What applying a replicated change did.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    Changed,
    /// Already applied, or superseded by a newer write here.
    Unchanged,
}

/// A page of the change log.
#[derive(Debug)]
pub struct ChangePage {
    pub events: Vec<ChangeEvent>,
    /// The newest sequence.
    pub head: u64,
    /// The log's identity.
    pub epoch: String,
    /// The highest sequence compacted away: a reader whose cursor is below
    /// it has missed changes and must resynchronize.
    pub compacted: u64,
}

/// A digest of a region's state, to compare regions.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StateSummary {
    pub digest: String,
    pub tags: usize,
    pub manifests: usize,
    pub blobs: usize,
    /// What the digest is over, one line each (on request, to compare).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub lines: Vec<String>,
}

fn newer(a: Option<&Stamp>, b: Option<&Stamp>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a > b,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

impl Registry {
    /// Moves the clock past a stamp a write is about to overwrite, so that
    /// the write's own stamp is newer (also across nodes and restarts).
    pub(super) fn observe_stamp(&self, stamp: Option<&Stamp>) {
        if let Some(stamp) = stamp
            && check_skew(stamp, self.limits.max_clock_skew_ms).is_ok()
        {
            self.hlc.observe(stamp.hlc);
        }
    }

    pub(super) fn observe_record<T: Stamped>(&self, kv: Option<&KeyValue>) {
        if let Some(kv) = kv
            && let Ok(record) = decode::<T>(&kv.key, &kv.value)
        {
            self.observe_stamp(record.stamp());
        }
    }

    /// A stamp for a write made here now.
    pub fn local_stamp(&self) -> Stamp {
        Stamp {
            hlc: self.hlc.now(),
            origin: self.region.clone().unwrap_or_default(),
        }
    }

    /// The region this registry logs its writes as, if replication is on.
    pub fn region(&self) -> Option<&str> {
        self.region.as_deref()
    }

    /// Commits a write with its change log append. Every registry logs,
    /// replicating or not: the log is what replication sends and what
    /// point-in-time restore replays. The append guards on the log head
    /// as read here, so this node's logged writes commit one at a time:
    /// two at once would fail each other's compare and retry (under a
    /// burst of concurrent pushes, until they gave up). Whether it
    /// committed; call it again on every attempt.
    pub(super) async fn commit_logged(
        &self,
        txn: Txn,
        stamp: &Stamp,
        change: Change,
    ) -> Result<bool> {
        // Bounded: behind a stalled metadata store, a queue of pushes each
        // waiting its turn to time out would outlast their clients.
        let _one = tokio::time::timeout(LOG_LOCK_WAIT, self.log_lock.lock())
            .await
            .map_err(|_| {
                RegistryError::Store(berth_store::StoreError::Unavailable(
                    "the change log is busy (the metadata store is slow); retry".into(),
                ))
            })?;
        let txn = self.log_change(txn, stamp, change).await?;
        Ok(self.meta.commit(txn).await?)
    }

    /// Adds the change log append to a write's transaction, guarded on
    /// the log head as read now.
    async fn log_change(&self, txn: Txn, stamp: &Stamp, change: Change) -> Result<Txn> {
        let head_kv = self.meta.get(keys::CHANGE_HEAD.as_bytes()).await?;
        let head: LogHead = match &head_kv {
            Some(kv) => decode(&kv.key, &kv.value)?,
            None => LogHead::default(),
        };
        let seq = head.seq + 1;
        let epoch = if head.epoch.is_empty() {
            uuid::Uuid::new_v4().to_string()
        } else {
            head.epoch.clone()
        };
        let event = ChangeEvent {
            seq,
            stamp: stamp.clone(),
            ms: now_ms(),
            change,
        };
        Ok(txn
            .require_unchanged(keys::CHANGE_HEAD, head_kv.as_ref())
            .put(keys::CHANGE_HEAD, encode(&LogHead { seq, epoch }))
            .put(keys::change(seq), encode(&event)))
    }

    /// Gives the change log its identity before its first change, so that
    /// a backup of a registry that never changed names the log a
    /// point-in-time restore replays after it.
    pub(crate) async fn ensure_log_epoch(&self) -> Result<()> {
        if self.meta.get(keys::CHANGE_HEAD.as_bytes()).await?.is_some() {
            return Ok(());
        }
        let head = LogHead {
            seq: 0,
            epoch: uuid::Uuid::new_v4().to_string(),
        };
        // Lost to a first write or another node: theirs stands.
        self.meta
            .commit(
                Txn::new()
                    .require_absent(keys::CHANGE_HEAD)
                    .put(keys::CHANGE_HEAD, encode(&head)),
            )
            .await?;
        Ok(())
    }

    /// Wakes feed readers after a logged write committed.
    pub(super) fn changes_committed(&self) {
        self.changes.notify_waiters();
    }

    /// Changes after `after`, at most `limit`, with the newest sequence,
    /// the log's epoch and how far it was compacted.
    pub async fn changes_after(&self, after: u64, limit: usize) -> Result<ChangePage> {
        let head = match self.meta.get(keys::CHANGE_HEAD.as_bytes()).await? {
            Some(kv) => decode::<LogHead>(&kv.key, &kv.value)?,
            None => LogHead::default(),
        };
        let (epoch, head) = (head.epoch, head.seq);
        let mut events = Vec::new();
        if after < head {
            let start = keys::change(after);
            let batch = self
                .meta
                .scan(
                    keys::CHANGE_PREFIX.as_bytes(),
                    Some(start.as_bytes()),
                    limit.max(1),
                )
                .await?;
            events.reserve(batch.len());
            for kv in batch {
                events.push(decode::<ChangeEvent>(&kv.key, &kv.value)?);
            }
        }
        // Read after the entries: a compaction that removed some of them
        // before the scan has moved the floor by now, so a reader never
        // takes a gap for the whole log.
        let mut compacted = self.log_floor().await?;
        if let Some(first) = events.first()
            && first.seq > after + 1
        {
            compacted = compacted.max(first.seq - 1);
        } else if events.is_empty() && after < head {
            compacted = compacted.max(head);
        }
        Ok(ChangePage {
            events,
            head,
            epoch,
            compacted,
        })
    }

    /// Wakes this node's feed readers when any node sharing the metadata
    /// logs a write: the MetaStore watches the log head (an etcd watch), so
    /// a change made on another node of a cluster region reaches the feed in
    /// milliseconds rather than at the readers' next poll. Returns at once
    /// for a store only this process writes (its writes signal directly).
    /// Runs for as long as the process; a broken watch is started again
    /// after a second, and readers still poll meanwhile.
    pub async fn follow_log_of_other_nodes(&self) {
        use futures_util::StreamExt as _;
        loop {
            match self.meta.watch_key(keys::CHANGE_HEAD.as_bytes()).await {
                Ok(None) => return,
                Ok(Some(mut watch)) => {
                    // Writes while no watch ran were not seen: readers look.
                    self.changes_committed();
                    while let Some(event) = watch.next().await {
                        match event {
                            Ok(()) => self.changes_committed(),
                            Err(e) => {
                                tracing::debug!(error = %e, "the watch of the change log broke");
                                break;
                            }
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "cannot watch the change log"),
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    }

    /// Signalled when a write is logged by this node or, while
    /// [`Self::follow_log_of_other_nodes`] runs, by any node of the region.
    /// Register interest (`Notified::enable`) before reading the log, or a
    /// write in between is missed until the next poll.
    pub fn change_signal(&self) -> &tokio::sync::Notify {
        &self.changes
    }

    /// The stamp of a tombstone record, if any.
    async fn tombstone(&self, key: &str) -> Result<Option<(KeyValue, Stamp)>> {
        match self.meta.get(key.as_bytes()).await? {
            Some(kv) => {
                let stamp: Stamp = decode(&kv.key, &kv.value)?;
                Ok(Some((kv, stamp)))
            }
            None => Ok(None),
        }
    }

    /// Whether a replicated put of `digest` with `stamp` is superseded by a
    /// delete here (then its content need not be copied).
    pub async fn manifest_deleted_after(
        &self,
        name: &RepositoryName,
        digest: &Digest,
        stamp: &Stamp,
    ) -> Result<bool> {
        Ok(self
            .tombstone(&keys::manifest_tombstone(name, digest))
            .await?
            .is_some_and(|(_, t)| &t > stamp))
    }

    /// Stores a manifest copied from another region (its blobs and children
    /// copied before), unless a newer delete removed it here.
    pub async fn store_replicated_manifest(
        &self,
        name: &RepositoryName,
        digest: &Digest,
        content_type: Option<&str>,
        bytes: Bytes,
        stamp: &Stamp,
    ) -> Result<Applied> {
        check_skew(stamp, self.limits.max_clock_skew_ms)?;
        self.hlc.observe(stamp.hlc);
        let reference = berth_oci::Reference::Digest(digest.clone());
        let (digest, manifest) = self.parse_manifest(&reference, content_type, &bytes)?;
        let size = bytes.len() as u64;
        self.put_manifest_bytes(&digest, bytes).await?;
        for _ in 0..TXN_ATTEMPTS {
            // Present iff its newest put is newer than its newest delete;
            // the tombstone stays either way.
            let tomb_key = keys::manifest_tombstone(name, &digest);
            let tomb = self.tombstone(&tomb_key).await?;
            if tomb.as_ref().is_some_and(|(_, t)| t > stamp) {
                return Ok(Applied::Unchanged);
            }
            let key = keys::manifest(name, &digest);
            let existing = self.meta.get(key.as_bytes()).await?;
            if let Some(kv) = &existing {
                let record: ManifestRecord = decode(&kv.key, &kv.value)?;
                if record.stamp.as_ref() >= Some(stamp) {
                    return Ok(Applied::Unchanged);
                }
            }
            let claims = self
                .link_claims(name, &manifest, MissingLink::Retry)
                .await?;
            let (mut txn, _) = self
                .manifest_txn(name, &digest, &manifest, None, Some(stamp), size)
                .await?;
            for claim in claims {
                txn = claim.apply(txn);
            }
            let txn = txn
                .require_unchanged(tomb_key, tomb.as_ref().map(|(kv, _)| kv))
                .require_unchanged(key, existing.as_ref());
            if self.meta.commit(txn).await? {
                return Ok(Applied::Changed);
            }
        }
        Err(conflict("replicated manifest"))
    }

    /// Applies a tag or delete change from another region. The manifests a
    /// tag change names must have been stored first.
    pub async fn apply_change(&self, stamp: &Stamp, change: &Change) -> Result<Applied> {
        check_skew(stamp, self.limits.max_clock_skew_ms)?;
        self.hlc.observe(stamp.hlc);
        let parse = |r: &str| {
            RepositoryName::parse(r).map_err(|e| RegistryError::ManifestInvalid(e.to_string()))
        };
        match change {
            Change::Manifest { .. } => Ok(Applied::Unchanged),
            Change::Tag {
                repository,
                tag,
                digest,
                by,
            } => {
                self.apply_tag(&parse(repository)?, tag, Some(digest), stamp, by.as_deref())
                    .await
            }
            Change::Untag { repository, tag } => {
                self.apply_tag(&parse(repository)?, tag, None, stamp, None)
                    .await
            }
            // The tags the delete removed at its origin are the ones pointing
            // at the manifest with older stamps, which the delete removes
            // here too (whatever arrived in between).
            Change::DeleteManifest {
                repository, digest, ..
            } => {
                self.apply_manifest_delete(&parse(repository)?, digest, stamp)
                    .await
            }
        }
    }

    /// Last writer wins on one tag: a set (`Some(digest)`) or an untag.
    async fn apply_tag(
        &self,
        name: &RepositoryName,
        tag: &str,
        digest: Option<&Digest>,
        stamp: &Stamp,
        by: Option<&str>,
    ) -> Result<Applied> {
        Tag::parse(tag).map_err(|e| RegistryError::ManifestInvalid(e.to_string()))?;
        let tag_key = keys::tag(name, tag);
        let tomb_key = keys::tag_tombstone(name, tag);
        for _ in 0..TXN_ATTEMPTS {
            let current = self.meta.get(tag_key.as_bytes()).await?;
            let record: Option<TagRecord> = match &current {
                Some(kv) => Some(decode(&kv.key, &kv.value)?),
                None => None,
            };
            let tomb = self.tombstone(&tomb_key).await?;
            let newest = std::cmp::max(
                record.as_ref().and_then(|r| r.stamp.clone()),
                tomb.as_ref().map(|(_, t)| t.clone()),
            );
            let mut txn = Txn::new()
                .require_unchanged(tag_key.clone(), current.as_ref())
                .require_unchanged(tomb_key.clone(), tomb.as_ref().map(|(kv, _)| kv));
            if let Some(d) = digest {
                txn = txn.put(
                    keys::tag_history(name, tag, stamp),
                    encode(&TagHistoryEntry {
                        digest: d.clone(),
                        stamp: stamp.clone(),
                        by: by.map(str::to_string),
                    }),
                );
            }
            let wins = newer(Some(stamp), newest.as_ref());
            let outcome = match (wins, digest) {
                (false, _) => Applied::Unchanged,
                (true, Some(d)) => {
                    let mtomb_key = keys::manifest_tombstone(name, d);
                    let mtomb = self.tombstone(&mtomb_key).await?;
                    txn = txn.require_unchanged(mtomb_key, mtomb.as_ref().map(|(kv, _)| kv));
                    if mtomb.as_ref().is_some_and(|(_, t)| t > stamp) {
                        // Its manifest was deleted after it: the set is
                        // hidden (a tombstone with its own stamp), as the
                        // delete hid it wherever it came first.
                        txn = txn
                            .delete(tag_key.clone())
                            .put(tomb_key.clone(), encode(stamp));
                    } else {
                        txn = txn.put(
                            tag_key.clone(),
                            encode(&TagRecord {
                                digest: d.clone(),
                                updated_ms: now_ms(),
                                stamp: Some(stamp.clone()),
                            }),
                        );
                        // A tag set is a put of its manifest: a local delete
                        // of the manifest racing it must see it.
                        let mkey = keys::manifest(name, d);
                        let mseen = self.meta.get(mkey.as_bytes()).await?;
                        txn = txn.require_unchanged(mkey.clone(), mseen.as_ref());
                        if let Some(kv) = &mseen {
                            // Rewritten even when its stamp stays, so that
                            // its version moves and a delete racing this
                            // set rescans the tags.
                            let mut record: ManifestRecord = decode(&kv.key, &kv.value)?;
                            if record.stamp.as_ref() < Some(stamp) {
                                record.stamp = Some(stamp.clone());
                            }
                            txn = txn.put(mkey, encode(&record));
                        }
                        txn = self.ensure_repo(name, txn).await?;
                    }
                    Applied::Changed
                }
                (true, None) => {
                    txn = txn
                        .delete(tag_key.clone())
                        .put(tomb_key.clone(), encode(stamp));
                    Applied::Changed
                }
            };
            if self.meta.commit(txn).await? {
                return Ok(outcome);
            }
        }
        Err(conflict("replicated tag"))
    }

    /// A replicated manifest delete: the manifest goes unless put again
    /// after it; tags pointing at it from before it go too.
    async fn apply_manifest_delete(
        &self,
        name: &RepositoryName,
        digest: &Digest,
        stamp: &Stamp,
    ) -> Result<Applied> {
        let tomb_key = keys::manifest_tombstone(name, digest);
        check_skew(stamp, self.limits.max_clock_skew_ms)?;
        self.hlc.observe(stamp.hlc);
        for _ in 0..TXN_ATTEMPTS {
            let tomb = self.tombstone(&tomb_key).await?;
            if tomb.as_ref().is_some_and(|(_, t)| t >= stamp) {
                return Ok(Applied::Unchanged);
            }
            let key = keys::manifest(name, digest);
            let current = self.meta.get(key.as_bytes()).await?;
            let mut txn = Txn::new()
                .require_unchanged(tomb_key.clone(), tomb.as_ref().map(|(kv, _)| kv))
                .require_unchanged(key.clone(), current.as_ref())
                .put(tomb_key.clone(), encode(stamp));
            if let Some(kv) = &current {
                let record: ManifestRecord = decode(&kv.key, &kv.value)?;
                // Put again after the delete: it stays.
                if newer(Some(stamp), record.stamp.as_ref()) {
                    txn = txn.delete(key.clone());
                    if let Some(subject) = &record.subject {
                        txn = txn.delete(keys::referrer(name, subject, digest));
                    }
                }
            }
            // Tags set on it before the delete go, present or not the
            // manifest: each hidden under its own stamp.
            let prefix = keys::tag_prefix(name);
            for kv in self.scan_all(&prefix).await? {
                let tag: TagRecord = decode(&kv.key, &kv.value)?;
                if &tag.digest == digest && newer(Some(stamp), tag.stamp.as_ref()) {
                    let tag_name = String::from_utf8_lossy(&kv.key[prefix.len()..]).into_owned();
                    txn = txn
                        .require_version(kv.key.clone(), kv.version)
                        .delete(kv.key);
                    if let Some(own) = &tag.stamp {
                        txn = txn.put(keys::tag_tombstone(name, &tag_name), encode(own));
                    }
                }
            }
            if self.meta.commit(txn).await? {
                self.hide_tags_older_than(name, digest, stamp).await?;
                return Ok(Applied::Changed);
            }
        }
        Err(conflict("replicated manifest delete"))
    }

    /// After a delete of `digest` stamped `stamp` committed: hides the tags
    /// still pointing at it with older stamps. A tag set that committed
    /// between the delete's scan and its commit (with the manifest already
    /// gone, nothing the delete guards changed) is caught here. Idempotent.
    pub(super) async fn hide_tags_older_than(
        &self,
        name: &RepositoryName,
        digest: &Digest,
        stamp: &Stamp,
    ) -> Result<()> {
        let prefix = keys::tag_prefix(name);
        for kv in self.scan_all(&prefix).await? {
            let tag: TagRecord = decode(&kv.key, &kv.value)?;
            if &tag.digest != digest || !newer(Some(stamp), tag.stamp.as_ref()) {
                continue;
            }
            let tag_name = String::from_utf8_lossy(&kv.key[prefix.len()..]).into_owned();
            let mut txn = Txn::new()
                .require_version(kv.key.clone(), kv.version)
                .delete(kv.key);
            if let Some(own) = &tag.stamp {
                txn = txn.put(keys::tag_tombstone(name, &tag_name), encode(own));
            }
            // Lost to a newer write of the tag: nothing to hide.
            self.meta.commit(txn).await?;
        }
        Ok(())
    }

    /// Every value a tag has had (here or in any region), oldest first.
    pub async fn tag_history(
        &self,
        name: &RepositoryName,
        tag: &str,
    ) -> Result<Vec<TagHistoryEntry>> {
        let mut out = Vec::new();
        for kv in self.scan_all(&keys::tag_history_prefix(name, tag)).await? {
            out.push(decode(&kv.key, &kv.value)?);
        }
        Ok(out)
    }

    /// A digest over every tag and its target, every manifest, and every
    /// blob a manifest references: equal in two regions iff they hold the
    /// same images.
    pub async fn state_summary(&self, with_lines: bool) -> Result<StateSummary> {
        use sha2::Digest as _;
        let mut lines = Vec::new();
        let mut tags = 0;
        for kv in self.scan_all(keys::TAG_PREFIX).await? {
            let tag: TagRecord = decode(&kv.key, &kv.value)?;
            lines.push(format!(
                "{} {}",
                String::from_utf8_lossy(&kv.key),
                tag.digest
            ));
            tags += 1;
        }
        let mut manifests = 0;
        let mut blobs = std::collections::BTreeSet::new();
        for kv in self.scan_all(keys::MANIFEST_PREFIX).await? {
            let record: ManifestRecord = decode(&kv.key, &kv.value)?;
            lines.push(String::from_utf8_lossy(&kv.key).into_owned());
            let repo = String::from_utf8_lossy(&kv.key[keys::MANIFEST_PREFIX.len()..]);
            let repo = repo.split_once(':').map_or("", |(r, _)| r).to_string();
            for r in record.references {
                blobs.insert(format!("blob {repo} {r}"));
            }
            manifests += 1;
        }
        let blob_count = blobs.len();
        lines.extend(blobs);
        lines.sort();
        let mut hasher = sha2::Sha256::new();
        for line in &lines {
            hasher.update(line.as_bytes());
            hasher.update(b"\n");
        }
        Ok(StateSummary {
            digest: hex::encode(hasher.finalize()),
            tags,
            manifests,
            blobs: blob_count,
            lines: if with_lines { lines } else { Vec::new() },
        })
    }
}

pub(super) fn conflict(what: &str) -> RegistryError {
    RegistryError::Store(berth_store::StoreError::Unavailable(format!(
        "{what} kept conflicting with concurrent changes; retry"
    )))
}
