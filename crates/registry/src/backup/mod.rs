//! Backups: a consistent point-in-time copy of a running registry, its
//! metadata and the blobs that metadata references, into a target (a
//! directory or a bucket prefix); listing, verifying and restoring them.
//!
//! **Consistency.** The metadata is read through one MetaStore snapshot
//! (a redb read transaction, an etcd revision), so it is the registry at one
//! moment, while pushes go on. Every blob a record of that moment names is
//! stored then (the removal protocol guarantees it), and stays stored until
//! the backup has copied it: a backup holds `backup/hold` for its whole run,
//! and blob removal re-checks that no hold exists, in a linearizable read,
//! after its reference scan and before it deletes bytes. A removal that
//! passed that check before the hold was taken found its blobs unreferenced
//! at a moment before the snapshot, and no reference to a marked blob can
//! be made after its mark, so none of its blobs is in the snapshot.
//!
//! **Atomic listing.** A backup is listed by its index document, written
//! last, after every blob and metadata chunk it names is durable in the
//! target. A backup killed at any point leaves blobs (reused by the next
//! one, which is therefore incremental) and no index.

mod archive;
mod copy;
mod create;
mod dump;
mod hold;
mod prune;
mod replay;
mod restore;
mod selective;
mod target;
mod verify;

use berth_oci::Digest;
use serde::{Deserialize, Serialize};

pub use archive::{ArchiveRound, ArchiveStatus, Archiver, LogPoint, SEGMENT_EVENTS};
pub use create::{CreateOptions, Progress as BackupProgress};
pub use prune::PruneReport;
pub use replay::{At, ReplayReport};
pub use restore::{RestoreProgress, RestoreReport};
pub use selective::{SelectiveProgress, SelectiveReport};
pub use target::Target;
pub use verify::{VerifyProgress, VerifyReport, verify};

/// The index format this version writes and reads.
pub const FORMAT: u32 = 1;

/// Key families a backup leaves out: state of this process or cluster
/// (node registrations, leases, job leadership, upload sessions whose data
/// is not backed up, replication cursors and the change log, which a
/// restored registry starts afresh) rather than of the registry's content.
pub const NOT_BACKED_UP: &[&str] = &[
    // Private keys: a target readable by more people than etcd is must not
    // let them mint tokens. A restored registry makes new ones; API tokens
    // (kept as hashes) survive.
    "auth/signing-key/",
    "backup/",
    "changelog/",
    "compaction/",
    "leader/",
    "node/",
    "region/",
    "repl/",
    "restore/",
    "upload/",
];

/// Marks a restore in progress, with the backup's id.
pub(crate) const RESTORE_STATE: &str = "restore/state";

/// This registry's identity as the owner of a backup target.
const REGISTRY_ID: &str = "backup/registry-id";

/// This registry's id, made on first use. A restored registry takes the
/// id of the one it was restored from, so that it goes on backing up into
/// the same target.
pub(crate) async fn registry_id(meta: &dyn berth_store::MetaStore) -> Result<String, BackupError> {
    if let Some(kv) = meta.get(REGISTRY_ID.as_bytes()).await? {
        return Ok(String::from_utf8_lossy(&kv.value).into_owned());
    }
    let fresh = uuid::Uuid::new_v4().to_string();
    meta.commit(
        berth_store::Txn::new()
            .require_absent(REGISTRY_ID)
            .put(REGISTRY_ID, fresh.clone()),
    )
    .await?;
    // Whoever won the race.
    Ok(meta
        .get(REGISTRY_ID.as_bytes())
        .await?
        .map_or(fresh, |kv| String::from_utf8_lossy(&kv.value).into_owned()))
}

/// The digest of a blob record's key (`blob/DIGEST`).
pub(crate) fn blob_record_digest(key: &[u8]) -> Option<Digest> {
    std::str::from_utf8(key)
        .ok()?
        .strip_prefix("blob/")?
        .parse()
        .ok()
}

/// Whether a record is part of the registry's content.
pub fn backed_up(key: &[u8]) -> bool {
    !NOT_BACKED_UP
        .iter()
        .any(|prefix| key.starts_with(prefix.as_bytes()))
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Store(#[from] berth_store::StoreError),
    #[error(transparent)]
    Registry(#[from] crate::RegistryError),
    /// Another backup (or a prune) holds this registry's backup hold.
    #[error(
        "another backup is running on this registry ({0}); try again when it has finished (the hold of one that died lapses within 15 s)"
    )]
    Busy(String),
    #[error("no backup {0} in the target")]
    NotFound(String),
    /// A restore goes into an empty registry.
    #[error("{0}")]
    NotEmpty(String),
    #[error("backup target {0}")]
    Target(String),
    /// A backup document or chunk that does not read back as written.
    #[error("backup is damaged: {0}")]
    Corrupt(String),
    /// The hold lapsed (its lease could not be kept alive): blobs may have
    /// been collected while it was gone, so the backup is not listed.
    #[error("{0}")]
    HoldLost(String),
}

/// One metadata chunk of a backup.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChunkRef {
    pub digest: Digest,
    pub size: u64,
    pub records: u64,
}

/// A backup's index: what it holds and where its metadata is.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackupIndex {
    pub format: u32,
    /// UTC time it started, `YYYYMMDDTHHMMSSmmmZ`: ids sort by age.
    pub id: String,
    pub started_ms: u64,
    pub finished_ms: u64,
    /// The MetaStore revision of its snapshot.
    pub revision: u64,
    /// When the snapshot was taken (Unix ms): it holds every change
    /// logged before, and a point-in-time restore to a later moment starts
    /// from it.
    #[serde(default)]
    pub snapshot_ms: u64,
    /// The change log's position at the snapshot: the archived changes
    /// after it are what a point-in-time restore replays (absent in
    /// backups of versions before the archive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<LogPoint>,
    /// The region it was taken in, if replication is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    pub records: u64,
    pub repositories: u64,
    pub tags: u64,
    pub manifests: u64,
    pub chunks: Vec<ChunkRef>,
    /// Blobs it holds (layers, configs, manifests) and their bytes.
    pub blobs: u64,
    pub bytes: u64,
    /// Of those, what this backup copied (the rest was in the target).
    pub copied_blobs: u64,
    pub copied_bytes: u64,
    /// Blobs the registry recorded but could not give back, left out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<Digest>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub corrupt: Vec<Digest>,
    /// Blobs removed while the backup ran, unreferenced at its snapshot
    /// (their records are not restored).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dropped: Vec<Digest>,
}

impl BackupIndex {
    /// Blobs whose records and links a restore leaves out: the backup does
    /// not hold their bytes.
    pub fn lacking(&self) -> std::collections::HashSet<Digest> {
        self.missing
            .iter()
            .chain(&self.corrupt)
            .chain(&self.dropped)
            .cloned()
            .collect()
    }
}

/// What a backup run did, reported while it runs and at the end.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BackupReport {
    #[serde(default)]
    pub id: String,
    /// `hold`, `blobs`, `records`, `index`, `done`.
    #[serde(default)]
    pub phase: String,
    pub records: u64,
    pub blobs: u64,
    pub bytes: u64,
    pub copied_blobs: u64,
    pub copied_bytes: u64,
    pub missing: Vec<Digest>,
    pub corrupt: Vec<Digest>,
    pub duration_ms: u64,
    /// Backups a schedule's retention removed after this one.
    #[serde(default)]
    pub pruned: Option<PruneReport>,
    /// Why that prune failed (the backup itself is listed and whole).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prune_error: Option<String>,
    /// The change log archived before the snapshot (the log since the
    /// previous backup, with the content it names).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archived: Option<ArchiveRound>,
    /// Why archiving the change log failed (the backup itself is whole; a
    /// point-in-time restore cannot reach moments before it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive_error: Option<String>,
}

impl BackupReport {
    pub fn clean(&self) -> bool {
        self.missing.is_empty() && self.corrupt.is_empty()
    }
}

/// A backup id for a start time: sortable, and a valid document name.
fn id_for(ms: u64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(time)
        .to_string()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect()
}

#[cfg(test)]
mod tests;
