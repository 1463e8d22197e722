//! Point-in-time restore: the last backup taken before the moment, then the
//! archived change log after that backup, replayed in log order up to the
//! moment.
//!
//! The replay applies each change as replication applies a peer's (last
//! writer wins by the change's own stamp): a local write in the registry
//! that logged it was always newer than everything it overwrote, so
//! applying the log in order by stamps gives the same state, and applying
//! a change twice (a resumed restore) changes nothing.
//!
//! What "the moment" means: the restored registry holds a prefix of the
//! log, every change logged at or before the moment (by the clock of the
//! node that logged it) up to the first one logged after it. A write still
//! in flight at the moment may fall on either side, as it would for a
//! client reading then.

use std::collections::HashMap;

use berth_oci::{Digest, Manifest, ManifestKind, RepositoryName};
use serde::{Deserialize, Serialize};

use super::archive::{LogPoint, Segment, list_segments, read_segment, read_status};
use super::{BackupError, BackupIndex, Target};
use crate::records::{Change, ChangeEvent, Stamp};
use crate::{Registry, RegistryError};

/// Where a point-in-time restore goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum At {
    /// As far as the archive knows the registry.
    Latest,
    /// This moment (Unix milliseconds).
    Time(u64),
}

impl At {
    /// `latest`, or an RFC 3339 time.
    pub fn parse(text: &str) -> Result<At, String> {
        if text == "latest" {
            return Ok(At::Latest);
        }
        let time = humantime::parse_rfc3339_weak(text).map_err(|e| {
            format!("{text:?} is neither `latest` nor an RFC 3339 time (2026-12-01T10:00:00Z): {e}")
        })?;
        let ms = time
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|_| format!("{text} is before 1970"))?
            .as_millis() as u64;
        Ok(At::Time(ms))
    }
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

/// What a point-in-time restore will do: which backup, then which
/// segments, up to when.
#[derive(Debug)]
pub(super) struct Plan {
    pub base: BackupIndex,
    /// Replayed in this order, each from the event after the previous one.
    pub segments: Vec<String>,
    /// Events after this sequence are replayed.
    pub after: u64,
    /// Replay stops before the first event logged after this (Unix ms).
    pub until_ms: Option<u64>,
    /// Replay stops after this sequence (a `latest` restore: the archive's
    /// end when it started, so that a resumed one goes to the same point).
    pub until_seq: Option<u64>,
    /// How far the archive knows the registry (Unix ms).
    pub known_ms: u64,
}

/// Picks the base backup and the segments for `at`, or says why the
/// archive cannot restore to it, before anything is written.
/// `resuming` names the base an interrupted restore chose: a backup taken
/// since must not change it.
pub(super) async fn plan(
    target: &Target,
    at: At,
    resuming: Option<&str>,
) -> Result<Plan, BackupError> {
    let backups = target.list().await?;
    let with_log = |b: &&BackupIndex| b.log.is_some();
    let base = match (resuming, at) {
        (Some(id), _) => backups.iter().find(|b| b.id == id && b.log.is_some()),
        (None, At::Latest) => backups.iter().rev().find(with_log),
        (None, At::Time(ms)) => backups
            .iter()
            .rev()
            .filter(with_log)
            .find(|b| b.snapshot_ms <= ms),
    };
    let Some(base) = base.cloned() else {
        let oldest = backups
            .iter()
            .find(with_log)
            .map(|b| rfc3339(b.snapshot_ms));
        return Err(BackupError::NotFound(match (at, oldest) {
            (At::Time(ms), Some(oldest)) => format!(
                "backup taken before {} (the oldest that a point-in-time restore can start from was taken at {oldest})",
                rfc3339(ms)
            ),
            _ => "backup with a change-log position (taken by this version) in the target".into(),
        }));
    };
    if let Some(region) = &base.region {
        return Err(BackupError::NotFound(format!(
            "point-in-time restore for backups of a replicating region (backup {} of region {region}): its change log holds only the region's own writes, not those applied from its peers, so a replay would give a state that never was; restore a backup by id and let replication resynchronize from the peers",
            base.id
        )));
    }
    let LogPoint { epoch, seq } = base.log.clone().unwrap_or_default();
    let mut next = seq + 1;
    let mut known_ms = base.snapshot_ms;
    let mut segments = Vec::new();
    let mut last_name = None;
    for (name, seg_epoch, first, last) in list_segments(target).await? {
        if seg_epoch != epoch || last < next {
            continue;
        }
        if first > next {
            // A gap (compacted before it was archived): the archive knows
            // the registry only up to the change before it.
            break;
        }
        segments.push(name.clone());
        last_name = Some(name);
        next = last + 1;
    }
    if let Some(name) = &last_name {
        known_ms = known_ms.max(read_segment(target, name).await?.through_ms);
    }
    if let Some(status) = read_status(target).await?
        && status.epoch == epoch
        && status.seq + 1 == next
    {
        known_ms = known_ms.max(status.through_ms);
    }
    let (until_ms, until_seq) = match at {
        At::Latest => (None, Some(next - 1)),
        At::Time(ms) if ms <= known_ms => (Some(ms), None),
        At::Time(ms) => {
            return Err(BackupError::NotFound(format!(
                "record of this registry at {}: the archive knows its changes up to {}; restore to that moment or earlier (--at {}), or to --at latest",
                rfc3339(ms),
                rfc3339(known_ms),
                rfc3339(known_ms)
            )));
        }
    };
    Ok(Plan {
        base,
        segments,
        after: seq,
        until_ms,
        until_seq,
        known_ms,
    })
}

/// What a replay did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ReplayReport {
    /// Changes applied after the backup.
    pub events: u64,
    /// The moment the registry now stands at (Unix ms).
    pub restored_to_ms: u64,
    /// Changes that could not be applied, and why.
    pub failed: Vec<String>,
}

impl Registry {
    /// Replays the plan's segments into this registry (the base backup
    /// restored already). `on_event` is told after each change.
    pub(super) async fn replay(
        &self,
        target: &Target,
        plan: &Plan,
        mut on_event: impl FnMut(&ReplayReport),
    ) -> Result<ReplayReport, BackupError> {
        let mut report = ReplayReport {
            restored_to_ms: plan.base.snapshot_ms,
            ..ReplayReport::default()
        };
        let mut next = plan.after + 1;
        let mut stopped = false;
        'segments: for name in &plan.segments {
            let segment = read_segment(target, name).await?;
            let media: HashMap<&Digest, Option<&str>> = segment
                .manifests
                .iter()
                .map(|m| (&m.digest, m.media_type.as_deref()))
                .collect();
            for event in &segment.events {
                if event.seq < next {
                    continue;
                }
                if plan.until_ms.is_some_and(|until| event.ms > until)
                    || plan.until_seq.is_some_and(|until| event.seq > until)
                {
                    stopped = true;
                    break 'segments;
                }
                if let Err(e) = self.replay_one(target, &segment, &media, event).await {
                    match e {
                        BackupError::Registry(RegistryError::Store(_)) | BackupError::Store(_) => {
                            return Err(e);
                        }
                        other => report.failed.push(format!(
                            "change {} ({}): {other}",
                            event.seq,
                            describe(event)
                        )),
                    }
                }
                next = event.seq + 1;
                report.events += 1;
                report.restored_to_ms = report.restored_to_ms.max(event.ms);
                on_event(&report);
            }
            report.restored_to_ms = report.restored_to_ms.max(segment.through_ms);
        }
        if let Some(until) = plan.until_ms {
            report.restored_to_ms = until;
        } else if !stopped {
            report.restored_to_ms = report.restored_to_ms.max(plan.known_ms);
        }
        Ok(report)
    }

    async fn replay_one(
        &self,
        target: &Target,
        segment: &Segment,
        media: &HashMap<&Digest, Option<&str>>,
        event: &ChangeEvent,
    ) -> Result<(), BackupError> {
        let parse = |r: &str| {
            RepositoryName::parse(r)
                .map_err(|e| BackupError::Corrupt(format!("repository {r:?}: {e}")))
        };
        match &event.change {
            Change::Manifest { repository, digest }
            | Change::Tag {
                repository, digest, ..
            } => {
                if segment.lacking.contains(digest) {
                    return Err(BackupError::NotFound(format!(
                        "manifest {digest} (removed from the registry before it was archived)"
                    )));
                }
                let name = parse(repository)?;
                self.manifest_from_archive(target, &name, digest, &event.stamp, media, 0)
                    .await?;
            }
            Change::Untag { .. } | Change::DeleteManifest { .. } => {}
        }
        if !matches!(event.change, Change::Manifest { .. }) {
            self.apply_change(&event.stamp, &event.change).await?;
        }
        Ok(())
    }

    /// A manifest from the target into `name` as a replicated copy with
    /// `stamp`: its child manifests, its blobs, then itself.
    fn manifest_from_archive<'a>(
        &'a self,
        target: &'a Target,
        name: &'a RepositoryName,
        digest: &'a Digest,
        stamp: &'a Stamp,
        media: &'a HashMap<&Digest, Option<&str>>,
        depth: usize,
    ) -> futures_util::future::BoxFuture<'a, Result<(), BackupError>> {
        Box::pin(async move {
            if self.manifest_deleted_after(name, digest, stamp).await? {
                return Ok(());
            }
            let limit = self.limits().max_manifest_bytes;
            let bytes = target
                .blobs
                .read_small(digest, limit)
                .await?
                .ok_or_else(|| BackupError::NotFound(format!("manifest {digest} in the target")))?;
            let media_type = media.get(digest).copied().flatten();
            let manifest = Manifest::parse(media_type, &bytes)
                .map_err(|e| BackupError::Corrupt(format!("manifest {digest}: {e}")))?;
            for child in manifest.children() {
                if ManifestKind::from_media_type(&child.media_type).is_some() {
                    if depth < 8 && self.find_manifest(name, &child.digest).await?.is_none() {
                        self.manifest_from_archive(
                            target,
                            name,
                            &child.digest,
                            stamp,
                            media,
                            depth + 1,
                        )
                        .await?;
                    }
                    continue;
                }
                self.blob_from_archive(target, name, &child.digest).await?;
            }
            for descriptor in manifest.required_blobs() {
                self.blob_from_archive(target, name, &descriptor.digest)
                    .await?;
            }
            self.store_replicated_manifest(name, digest, media_type, bytes, stamp)
                .await?;
            Ok(())
        })
    }

    /// A blob linked into `name`: already there, stored for another
    /// repository, or copied from the target (verified as it is written).
    async fn blob_from_archive(
        &self,
        target: &Target,
        name: &RepositoryName,
        digest: &Digest,
    ) -> Result<(), BackupError> {
        match self.confirm_blob(name, digest).await {
            Ok(_) => return Ok(()),
            Err(RegistryError::BlobUnknown(_)) => {}
            Err(e) => return Err(e.into()),
        }
        if self.mount_blob(name, digest, None).await?.is_some() {
            return Ok(());
        }
        let read = target
            .blobs
            .read(digest, None)
            .await?
            .ok_or_else(|| BackupError::NotFound(format!("blob {digest} in the target")))?;
        self.put_blob(name, digest, read.stream).await?;
        Ok(())
    }
}

fn describe(event: &ChangeEvent) -> String {
    match &event.change {
        Change::Manifest { repository, digest } => format!("push of {repository}@{digest}"),
        Change::Tag {
            repository, tag, ..
        } => format!("push of {repository}:{tag}"),
        Change::Untag { repository, tag } => format!("delete of {repository}:{tag}"),
        Change::DeleteManifest {
            repository, digest, ..
        } => format!("delete of {repository}@{digest}"),
    }
}
