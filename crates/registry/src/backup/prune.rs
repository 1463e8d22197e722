//! A schedule's retention: keep the newest backups, remove the others and
//! the blobs no kept backup names. It runs under the backup hold, right
//! after a backup, so no backup of this registry is writing meanwhile (a
//! target belongs to one registry).

use std::collections::HashSet;

use berth_oci::Digest;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::hold::Hold;
use super::{BackupError, BackupIndex, Target, blob_record_digest};

/// What a prune removed.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PruneReport {
    pub backups: Vec<String>,
    /// Archived change-log segments no kept backup replays.
    #[serde(default)]
    pub segments: u64,
    pub blobs: u64,
    pub bytes: u64,
}

/// How old a blob in the target must be before a prune removes it (by
/// default).
const YOUNG_MS: u64 = 60 * 60 * 1000;

/// Blob deletes in flight at once.
const PARALLEL: usize = 16;

/// Keeps the newest `keep` backups (at least one, and always `newest`,
/// the one just published, even if a listing does not show it yet).
pub(super) async fn prune(
    target: &Target,
    keep: usize,
    hold: &Hold,
    newest: &BackupIndex,
    young_ms: Option<u64>,
) -> Result<PruneReport, BackupError> {
    let keep = keep.max(1);
    let mut listed = target.list_all().await?;
    if !listed.iter().any(|i| i.id == newest.id) {
        listed.push(newest.clone());
        listed.sort_by(|a, b| a.id.cmp(&b.id));
    }
    if listed.len() <= keep {
        return Ok(PruneReport::default());
    }
    let (old, kept) = listed.split_at(listed.len() - keep);
    // What the kept backups name is read in full before anything goes, so
    // a failure here removes nothing.
    let mut used: HashSet<Digest> = HashSet::new();
    for index in kept {
        for chunk in &index.chunks {
            used.insert(chunk.digest.clone());
            for (key, _) in target.chunk(chunk).await? {
                if let Some(digest) = blob_record_digest(&key) {
                    used.insert(digest);
                }
            }
        }
    }
    // The archived change log after the oldest kept backup is what a
    // point-in-time restore replays from it: kept, with what it names.
    let mut doomed_segments = Vec::new();
    for (name, epoch, _, last) in super::archive::list_segments(target).await? {
        let needed = kept.iter().any(|b| {
            b.log
                .as_ref()
                .is_some_and(|log| log.epoch == epoch && log.seq < last)
        });
        if needed {
            used.extend(super::archive::read_segment(target, &name).await?.blobs);
        } else {
            doomed_segments.push(name);
        }
    }
    // Another node may hold the registry's backups by now if this hold
    // lapsed: it must not lose what it relies on.
    hold.check().await?;
    let mut report = PruneReport::default();
    for index in old {
        target.unpublish(&index.id).await?;
        report.backups.push(index.id.clone());
    }
    for name in doomed_segments {
        target.log.delete(&name).await?;
        report.segments += 1;
    }
    // Blobs written lately may belong to a log segment being written by an
    // archiver on another node (over a leadership handover): left for the
    // next prune.
    let young = crate::now_ms().saturating_sub(young_ms.unwrap_or(YOUNG_MS));
    let unused: Vec<_> = target
        .blobs
        .list()
        .await?
        .into_iter()
        .filter(|b| !used.contains(&b.digest) && b.modified_ms < young)
        .collect();
    let mut deletes =
        futures_util::stream::iter(unused.into_iter().map(|blob| async move {
            target.blobs.delete(&blob.digest).await.map(|()| blob.size)
        }))
        .buffer_unordered(PARALLEL);
    while let Some(deleted) = deletes.next().await {
        report.bytes += deleted?;
        report.blobs += 1;
        if report.blobs.is_multiple_of(256) {
            hold.check().await?;
        }
    }
    tracing::info!(
        backups = report.backups.len(),
        blobs = report.blobs,
        bytes = report.bytes,
        "pruned old backups"
    );
    Ok(report)
}
