//! Archiving the change log next to the backups, so that a restore can go
//! to any moment after a backup and not only to the backup itself.
//!
//! The log names what changed (a manifest pushed, a tag set or removed, a
//! manifest deleted) but not the content, which a later delete and garbage
//! collection may take from the registry. So a segment is written only
//! after the manifests its events name, and the blobs those manifests
//! reference, are durable in the target (content-addressed, shared with
//! the backups): a listed segment is always replayable.
//!
//! Segments are documents under `log/`, named by the log's epoch and the
//! sequence numbers they hold, so that two archivers racing over a
//! leadership handover write overlapping segments rather than wrong ones.
//! The position archived is kept in the MetaStore, one per target
//! (`backup/archived/HASH`), so that the next archiver (any node) goes on
//! from there and compaction keeps what is not archived yet.

use std::collections::{HashMap, HashSet};

use berth_oci::{Digest, Manifest, ManifestKind, RepositoryName};
use berth_store::Txn;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::copy::{Outcome, copy_many};
use super::{BackupError, Target};
use crate::records::{Change, ChangeEvent, ManifestRecord};
use crate::{Registry, keys, now_ms};

/// The segment format this version writes and reads.
pub const SEGMENT_FORMAT: u32 = 1;

/// Events per segment at most (and per log read).
pub const SEGMENT_EVENTS: usize = 1000;

/// Where the archived positions are kept, one per target.
const ARCHIVED_PREFIX: &str = "backup/archived/";

/// The key of the position archived into the target `url`.
fn position_key(url: &str) -> String {
    let digest = Digest::sha256_of(url.trim_end_matches('/').as_bytes());
    format!("{ARCHIVED_PREFIX}{}", &digest.encoded()[..32])
}

/// The status document: how far the archive knows the registry when no
/// change came for a while (a segment is written only for changes).
pub(super) const STATUS: &str = "archived.json";

/// A point in a registry's change log.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogPoint {
    /// The log's identity: a restored registry starts a new one.
    pub epoch: String,
    /// Every change up to this sequence is in.
    pub seq: u64,
}

/// A manifest an archived event names, as the target holds it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ArchivedManifest {
    pub digest: Digest,
    /// As it was pushed, when the registry still knew (else read from the
    /// content at replay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
}

/// One archived run of the change log.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Segment {
    pub format: u32,
    pub epoch: String,
    pub first: u64,
    pub last: u64,
    /// When the log was read (Unix ms): it held no later change then, so
    /// the archive knows the registry up to this moment.
    pub through_ms: u64,
    pub events: Vec<ChangeEvent>,
    pub manifests: Vec<ArchivedManifest>,
    /// Every digest in the target this segment relies on (manifests and
    /// the blobs they reference), for retention.
    pub blobs: Vec<Digest>,
    /// Content the registry could no longer give (removed before it was
    /// archived): the images that need it cannot be replayed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lacking: Vec<Digest>,
}

/// The status document's content, and the archived position's.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ArchiveStatus {
    pub epoch: String,
    pub seq: u64,
    pub through_ms: u64,
    /// The target the position is for (the MetaStore copy only).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub target: String,
}

/// A segment's document name.
pub(super) fn segment_name(epoch: &str, first: u64, last: u64) -> String {
    format!("{epoch}.{first:020}-{last:020}.json")
}

/// The epoch and range a segment's document name gives.
pub(super) fn parse_segment_name(name: &str) -> Option<(String, u64, u64)> {
    let stem = name.strip_suffix(".json")?;
    let (epoch, range) = stem.rsplit_once('.')?;
    let (first, last) = range.split_once('-')?;
    let (first, last) = (first.parse().ok()?, last.parse().ok()?);
    (first <= last && !epoch.is_empty()).then(|| (epoch.to_string(), first, last))
}

/// What one archiving round did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ArchiveRound {
    pub events: u64,
    pub segments: u64,
    pub copied_blobs: u64,
    pub copied_bytes: u64,
    /// Changes compacted away before they were archived (a gap a
    /// point-in-time restore cannot cross).
    pub skipped: u64,
    pub lacking: Vec<Digest>,
    /// The archive knows the registry up to here (Unix ms).
    pub through_ms: u64,
}

/// Archives one registry's change log into one target, remembering which
/// blobs the target holds between rounds.
pub struct Archiver {
    target: Target,
    /// Digests known to be in the target (bounded: cleared when full, and
    /// by `forget` after a prune may have removed some).
    known: std::sync::Mutex<HashSet<Digest>>,
    /// When the status document was written last.
    status_ms: std::sync::atomic::AtomicU64,
    /// How far what is durable in the target knows the registry.
    durable_ms: std::sync::atomic::AtomicU64,
    /// The position this archiver wrote last: another position found in
    /// the store means another archiver ran (a backup's, another leader),
    /// and a prune may have run with it.
    wrote: std::sync::Mutex<Option<(String, u64)>>,
}

/// Digests remembered as archived before the set starts again.
const KNOWN_MAX: usize = 200_000;
/// How often an idle archive refreshes its status document.
const STATUS_EVERY_MS: u64 = 5_000;

impl Archiver {
    pub fn new(target: Target) -> Self {
        Self {
            target,
            known: std::sync::Mutex::new(HashSet::new()),
            status_ms: std::sync::atomic::AtomicU64::new(0),
            durable_ms: std::sync::atomic::AtomicU64::new(0),
            wrote: std::sync::Mutex::new(None),
        }
    }

    /// Forgets which blobs the target holds: a prune may have removed
    /// some, and a segment must never name a blob on the strength of a
    /// stale memory.
    pub fn forget(&self) {
        if let Ok(mut known) = self.known.lock() {
            known.clear();
        }
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    fn known(&self, digest: &Digest) -> bool {
        self.known.lock().is_ok_and(|k| k.contains(digest))
    }

    fn remember(&self, digest: &Digest) {
        if let Ok(mut known) = self.known.lock() {
            if known.len() >= KNOWN_MAX {
                known.clear();
            }
            known.insert(digest.clone());
        }
    }

    /// Archives every change logged so far (in segments of at most
    /// [`SEGMENT_EVENTS`]).
    pub async fn catch_up(&self, registry: &Registry) -> Result<ArchiveRound, BackupError> {
        let mut total = ArchiveRound::default();
        loop {
            let round = self.round(registry).await?;
            let done = round.events < SEGMENT_EVENTS as u64;
            total.events += round.events;
            total.segments += round.segments;
            total.copied_blobs += round.copied_blobs;
            total.copied_bytes += round.copied_bytes;
            total.skipped += round.skipped;
            total.lacking.extend(round.lacking);
            total.through_ms = round.through_ms;
            if done {
                return Ok(total);
            }
        }
    }

    /// Archives the next segment's worth of changes, if any.
    pub async fn round(&self, registry: &Registry) -> Result<ArchiveRound, BackupError> {
        let meta = registry.meta_store();
        // A log with no identity yet would get one at its first write, and
        // a position recorded before it would not match it.
        registry.ensure_log_epoch().await?;
        let key = position_key(self.target.url());
        let seen = meta.get(key.as_bytes()).await?;
        let position: Option<ArchiveStatus> = match &seen {
            Some(kv) => serde_json::from_slice(&kv.value).ok(),
            None => None,
        };
        // Taken before the read: the log holds every change made before it.
        let through_ms = now_ms();
        let head = registry.changes_after(u64::MAX, 1).await?;
        let fresh =
            !matches!(&position, Some(p) if p.epoch == head.epoch && p.target == self.target.url());
        let ours = self.wrote.lock().ok().and_then(|w| w.clone());
        if ours != position.as_ref().map(|p| (p.epoch.clone(), p.seq)) {
            self.forget();
        }
        let after = match &position {
            Some(p) if !fresh => p.seq,
            // A new target, or a new log (a restored registry): from now.
            // What came before is of no use: a replay starts from a
            // backup, and every backup to come is taken after this.
            _ => head.head,
        };
        let mut round = ArchiveRound {
            through_ms: self.durable_ms.load(std::sync::atomic::Ordering::Relaxed),
            ..ArchiveRound::default()
        };
        let page = registry.changes_after(after, SEGMENT_EVENTS).await?;
        let mut after = after;
        if page.compacted > after {
            tracing::warn!(
                from = after + 1,
                to = page.compacted,
                "change-log entries were compacted before they were archived: a point-in-time restore cannot reach a moment between them"
            );
            round.skipped = page.compacted - after;
            after = page.compacted;
        }
        let events: Vec<ChangeEvent> = page.events.into_iter().filter(|e| e.seq > after).collect();
        let (Some(first), Some(last)) = (events.first(), events.last()) else {
            let status = ArchiveStatus {
                epoch: head.epoch.clone(),
                seq: after,
                through_ms,
                target: String::new(),
            };
            if self
                .idle(registry, &key, seen.as_ref(), status, fresh)
                .await?
            {
                round.through_ms = through_ms;
            }
            return Ok(round);
        };
        let (first, last_ms, last) = (first.seq, last.ms, last.seq);
        // A page cut short knows the registry only up to its last change:
        // later ones may be older by the clock and are not in it.
        let through_ms = if last >= page.head {
            through_ms
        } else {
            last_ms
        };
        let (manifests, blobs, lacking, copied) = self.content(registry, &events).await?;
        round.events = events.len() as u64;
        round.copied_blobs = copied.0;
        round.copied_bytes = copied.1;
        round.lacking = lacking.clone();
        let segment = Segment {
            format: SEGMENT_FORMAT,
            epoch: page.epoch.clone(),
            first: after + 1,
            last,
            through_ms,
            events,
            manifests,
            blobs,
            lacking,
        };
        debug_assert!(first > after);
        let bytes = serde_json::to_vec(&segment)
            .map_err(|e| BackupError::Corrupt(format!("encoding a log segment: {e}")))?;
        self.target
            .log
            .put(
                &segment_name(&segment.epoch, segment.first, segment.last),
                Bytes::from(bytes),
            )
            .await?;
        round.segments = 1;
        round.through_ms = through_ms;
        self.durable_ms
            .fetch_max(through_ms, std::sync::atomic::Ordering::Relaxed);
        let position = ArchiveStatus {
            epoch: page.epoch,
            seq: last,
            through_ms,
            target: self.target.url().to_string(),
        };
        self.advance(registry, &key, seen.as_ref(), &position)
            .await?;
        Ok(round)
    }

    /// Nothing new: now and then (and always on a fresh start) writes the
    /// status document and moves the position, to say the archive knows
    /// the registry up to now. Whether it wrote them.
    async fn idle(
        &self,
        registry: &Registry,
        key: &str,
        seen: Option<&berth_store::KeyValue>,
        mut status: ArchiveStatus,
        fresh: bool,
    ) -> Result<bool, BackupError> {
        let last = self.status_ms.load(std::sync::atomic::Ordering::Relaxed);
        // A fresh start must record where it started, or the next round
        // would start again from its own now.
        if !fresh && status.through_ms.saturating_sub(last) < STATUS_EVERY_MS {
            return Ok(false);
        }
        let doc = serde_json::to_vec(&status)
            .map_err(|e| BackupError::Corrupt(format!("encoding the archive status: {e}")))?;
        self.target.log.put(STATUS, Bytes::from(doc)).await?;
        self.status_ms
            .store(status.through_ms, std::sync::atomic::Ordering::Relaxed);
        self.durable_ms
            .fetch_max(status.through_ms, std::sync::atomic::Ordering::Relaxed);
        status.target = self.target.url().to_string();
        self.advance(registry, key, seen, &status).await?;
        Ok(true)
    }

    /// Records the position archived, unless another archiver moved it
    /// meanwhile (its segments are as good; the next round goes on from
    /// wherever it is).
    async fn advance(
        &self,
        registry: &Registry,
        key: &str,
        seen: Option<&berth_store::KeyValue>,
        position: &ArchiveStatus,
    ) -> Result<(), BackupError> {
        let value = serde_json::to_vec(position)
            .map_err(|e| BackupError::Corrupt(format!("encoding the archive position: {e}")))?;
        let moved = registry
            .meta_store()
            .commit(
                Txn::new()
                    .require_unchanged(key.to_string(), seen)
                    .put(key.to_string(), value),
            )
            .await?;
        if moved && let Ok(mut wrote) = self.wrote.lock() {
            *wrote = Some((position.epoch.clone(), position.seq));
        }
        Ok(())
    }

    /// Copies what `events` need into the target: the manifests they name
    /// and everything those reference. The manifests (with media types),
    /// every digest relied on, what could not be had, and (blobs, bytes)
    /// copied.
    #[allow(clippy::type_complexity)]
    async fn content(
        &self,
        registry: &Registry,
        events: &[ChangeEvent],
    ) -> Result<(Vec<ArchivedManifest>, Vec<Digest>, Vec<Digest>, (u64, u64)), BackupError> {
        let mut named: Vec<(RepositoryName, Digest)> = Vec::new();
        let mut seen_manifests = HashSet::new();
        for event in events {
            let (repository, digest) = match &event.change {
                Change::Manifest { repository, digest }
                | Change::Tag {
                    repository, digest, ..
                } => (repository, digest),
                Change::Untag { .. } | Change::DeleteManifest { .. } => continue,
            };
            let Ok(name) = RepositoryName::parse(repository) else {
                continue;
            };
            if seen_manifests.insert((repository.clone(), digest.clone())) {
                named.push((name, digest.clone()));
            }
        }
        let mut manifests = Vec::new();
        let mut relied: Vec<Digest> = Vec::new();
        let mut lacking = Vec::new();
        let mut wanted: HashMap<Digest, u64> = HashMap::new();
        let store = registry.blob_store();
        let limit = registry.limits().max_manifest_bytes;
        for (name, digest) in named {
            let media_type = registry
                .get_record::<ManifestRecord>(&keys::manifest(&name, &digest))
                .await?
                .map(|r| r.media_type);
            // Gone, or rotten: lacking for good. Anything else (storage
            // unreachable) fails the round, which is retried.
            let read = match store.read_small(&digest, limit).await {
                Ok(read) => read,
                Err(berth_store::StoreError::Io(e))
                    if e.kind() == std::io::ErrorKind::InvalidData =>
                {
                    None
                }
                Err(e) => return Err(e.into()),
            };
            let Some(bytes) = read else {
                tracing::warn!(%digest, repository = %name, "archiving the change log: a manifest it names is gone from storage or damaged; a point-in-time restore lacks it");
                lacking.push(digest);
                continue;
            };
            if Digest::of(digest.algorithm(), &bytes) != digest {
                lacking.push(digest);
                continue;
            }
            if !self.known(&digest) {
                wanted.insert(digest.clone(), bytes.len() as u64);
            }
            relied.push(digest.clone());
            if let Ok(manifest) = Manifest::parse(media_type.as_deref(), &bytes) {
                let blobs = manifest.required_blobs().chain(
                    manifest
                        .children()
                        .iter()
                        .filter(|c| ManifestKind::from_media_type(&c.media_type).is_none()),
                );
                for descriptor in blobs {
                    relied.push(descriptor.digest.clone());
                    if !self.known(&descriptor.digest)
                        && let Some(size) = store.stat(&descriptor.digest).await?
                    {
                        wanted.insert(descriptor.digest.clone(), size);
                    } else if !self.known(&descriptor.digest) {
                        lacking.push(descriptor.digest.clone());
                    }
                }
            }
            manifests.push(ArchivedManifest { digest, media_type });
        }
        let mut copied = (0u64, 0u64);
        let mut copies = Box::pin(copy_many(
            store.clone(),
            self.target.blobs.clone(),
            wanted.into_iter().collect(),
        ));
        while let Some((digest, size, outcome)) = copies.next().await {
            match outcome? {
                Outcome::Present => self.remember(&digest),
                Outcome::Written => {
                    copied.0 += 1;
                    copied.1 += size;
                    self.remember(&digest);
                }
                Outcome::Missing | Outcome::Corrupt => {
                    tracing::warn!(%digest, "archiving the change log: a blob is gone or damaged in storage; a point-in-time restore lacks it");
                    lacking.push(digest);
                }
            }
        }
        relied.sort();
        relied.dedup();
        lacking.sort();
        lacking.dedup();
        Ok((manifests, relied, lacking, copied))
    }
}

impl Registry {
    /// How far the change log is archived into the target `url` (the
    /// position any archiver of this registry reached there), if it is.
    pub async fn archived_position(
        &self,
        url: &str,
    ) -> Result<Option<ArchiveStatus>, crate::RegistryError> {
        Ok(
            match self.meta_store().get(position_key(url).as_bytes()).await? {
                Some(kv) => match serde_json::from_slice(&kv.value) {
                    Ok(position) => Some(position),
                    // Unreadable: as if nothing were archived, so that
                    // nothing unarchived goes.
                    Err(e) => {
                        tracing::error!(error = %e, "the archived change-log position cannot be read");
                        Some(ArchiveStatus {
                            through_ms: crate::now_ms(),
                            ..ArchiveStatus::default()
                        })
                    }
                },
                None => None,
            },
        )
    }
}

/// Reads one segment, checked against its name.
pub(super) async fn read_segment(target: &Target, name: &str) -> Result<Segment, BackupError> {
    let bytes = target
        .log
        .get(name)
        .await?
        .ok_or_else(|| BackupError::Corrupt(format!("log segment {name} is missing")))?;
    let segment: Segment = serde_json::from_slice(&bytes)
        .map_err(|e| BackupError::Corrupt(format!("log segment {name}: {e}")))?;
    if segment.format != SEGMENT_FORMAT
        || parse_segment_name(name) != Some((segment.epoch.clone(), segment.first, segment.last))
    {
        return Err(BackupError::Corrupt(format!(
            "log segment {name} does not hold what its name says"
        )));
    }
    Ok(segment)
}

/// Every segment name in the target, with its epoch and range.
pub(super) async fn list_segments(
    target: &Target,
) -> Result<Vec<(String, String, u64, u64)>, BackupError> {
    let mut out: Vec<_> = target
        .log
        .list()
        .await?
        .into_iter()
        .filter_map(|name| {
            let (epoch, first, last) = parse_segment_name(&name)?;
            Some((name, epoch, first, last))
        })
        .collect();
    out.sort_by_key(|a| (a.2, std::cmp::Reverse(a.3)));
    Ok(out)
}

/// The status document, if the archive has one.
pub(super) async fn read_status(target: &Target) -> Result<Option<ArchiveStatus>, BackupError> {
    Ok(match target.log.get(STATUS).await? {
        Some(bytes) => serde_json::from_slice(&bytes).ok(),
        None => None,
    })
}
