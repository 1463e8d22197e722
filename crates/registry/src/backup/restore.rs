//! Restoring a backup into an empty registry, whatever its engines: the
//! blobs first (verified as they are written), then the records, chunk by
//! chunk, each written only where the key is absent. A restore that is
//! killed is resumed by running it again: the marker `restore/state` names
//! the backup, and what is already there is skipped.

use std::collections::HashSet;
use std::time::Instant;

use berth_oci::Digest;
use berth_store::Txn;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::copy::{Outcome, chunk_blobs, copy_many};
use super::hold::Hold;
use super::replay::{At, Plan, ReplayReport};
use super::{BackupError, BackupIndex, RESTORE_STATE, Target, blob_record_digest};
use crate::keys;
use crate::{Registry, now_ms};

/// What a restore did, reported while it runs and at the end.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RestoreReport {
    #[serde(default)]
    pub id: String,
    /// `records`, `replay`, `done`.
    #[serde(default)]
    pub phase: String,
    /// Records written, and already there (on a resumed restore).
    pub records: u64,
    pub existing: u64,
    pub blobs: u64,
    pub bytes: u64,
    /// Of those, what was copied (the rest was already stored).
    pub copied_blobs: u64,
    pub copied_bytes: u64,
    /// Blobs the backup names but cannot give back intact: left out with
    /// their records and links (a client pushing the image again uploads
    /// them).
    pub missing: Vec<Digest>,
    pub resumed: bool,
    /// The change log replayed after the backup (a point-in-time restore).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replayed: Option<ReplayReport>,
    pub duration_ms: u64,
}

pub type RestoreProgress = tokio::sync::watch::Sender<RestoreReport>;

/// Puts per transaction (with a compare each: 64 operations, inside
/// etcd's default limit of 128).
const BATCH: usize = 32;
/// Prefixes whose presence means the registry is not empty.
const CONTENT: &[&str] = &[
    keys::REPO_PREFIX,
    keys::TAG_PREFIX,
    keys::MANIFEST_PREFIX,
    keys::LINK_PREFIX,
    keys::TRASH_MANIFEST_PREFIX,
    keys::TRASH_TAG_PREFIX,
    keys::TAG_HISTORY_PREFIX,
];

impl Registry {
    /// Restores backup `id` from `target`: the newest when `None`, or the
    /// one an interrupted restore was restoring.
    /// With `adopt`, this registry takes over the target's ownership
    /// (only once the registry it was restored from is retired: two
    /// registries backing up into one target prune each other's backups).
    ///
    /// With `at`, it is a point-in-time restore: the last backup taken
    /// before that moment, then the archived change log up to it (see
    /// `replay`); `id` must then be `None`.
    pub async fn restore(
        &self,
        target: &Target,
        id: Option<&str>,
        adopt: bool,
        at: Option<At>,
        progress: Option<&RestoreProgress>,
    ) -> Result<RestoreReport, BackupError> {
        let meta = self.meta_store().clone();
        let unfinished = match meta.get(RESTORE_STATE.as_bytes()).await? {
            Some(kv) => {
                let state: serde_json::Value =
                    serde_json::from_slice(&kv.value).unwrap_or_default();
                Some(Unfinished {
                    backup: state["backup"].as_str().unwrap_or_default().to_string(),
                    at_ms: state["at_ms"].as_u64(),
                    at_seq: state["at_seq"].as_u64(),
                    replaying: state["replaying"].as_bool().unwrap_or(false),
                })
            }
            None => None,
        };
        if let Some(running) = &unfinished
            && let Some(at) = at
        {
            let same = match (running.at_ms, running.at_seq) {
                (Some(ms), _) => at == At::Time(ms),
                (None, Some(_)) => at == At::Latest,
                (None, None) => false,
            };
            if !same {
                return Err(BackupError::NotEmpty(format!(
                    "a restore of backup {} (to another moment, or of the backup itself) did not finish; run it again without --at to finish it first",
                    running.backup
                )));
            }
        }
        // A resumed restore goes where the interrupted one was going.
        let at = match &unfinished {
            Some(Unfinished {
                at_ms: Some(ms), ..
            }) => Some(At::Time(*ms)),
            Some(Unfinished {
                at_seq: Some(_), ..
            }) => Some(At::Latest),
            _ => at,
        };
        let (index, plan) = match at {
            Some(at) => {
                let resuming = unfinished.as_ref().map(|u| u.backup.as_str());
                let mut plan = super::replay::plan(target, at, resuming).await?;
                if let Some(Unfinished {
                    at_seq: Some(seq), ..
                }) = &unfinished
                {
                    plan.until_seq = Some(*seq);
                }
                (plan.base.clone(), Some(plan))
            }
            None => {
                let wanted = id.or(unfinished.as_ref().map(|u| u.backup.as_str()));
                (target.pick(wanted).await?, None)
            }
        };
        // Blob removal waits while bytes land ahead of their records.
        let hold = Hold::acquire(meta, &format!("restore of {}", index.id)).await?;
        let result = self
            .restore_held(
                &hold,
                target,
                &index,
                plan.as_ref(),
                unfinished,
                adopt,
                progress,
            )
            .await;
        hold.release().await;
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn restore_held(
        &self,
        hold: &Hold,
        target: &Target,
        index: &BackupIndex,
        plan: Option<&Plan>,
        unfinished: Option<Unfinished>,
        adopt: bool,
        progress: Option<&RestoreProgress>,
    ) -> Result<RestoreReport, BackupError> {
        let started = Instant::now();
        let meta = self.meta_store().clone();
        let mut report = RestoreReport {
            id: index.id.clone(),
            phase: "records".into(),
            ..RestoreReport::default()
        };
        let mut replaying = false;
        match unfinished {
            Some(running) if running.backup != index.id => {
                return Err(BackupError::NotEmpty(format!(
                    "a restore of backup {} into this registry did not finish; run it again (without an id) to finish it first",
                    running.backup
                )));
            }
            Some(running) => {
                report.resumed = true;
                replaying = running.replaying;
            }
            None => {
                for prefix in CONTENT {
                    if !meta.scan(prefix.as_bytes(), None, 1).await?.is_empty() {
                        return Err(BackupError::NotEmpty(
                            "the registry is not empty: a backup restores into a registry with no repositories, tags or trash".into(),
                        ));
                    }
                }
                let mut state = serde_json::json!({ "backup": index.id, "since_ms": now_ms() });
                if let Some(until) = plan.and_then(|p| p.until_ms) {
                    state["at_ms"] = until.into();
                }
                if let Some(until) = plan.and_then(|p| p.until_seq) {
                    state["at_seq"] = until.into();
                }
                if !meta
                    .commit(
                        Txn::new()
                            .require_absent(RESTORE_STATE)
                            .put(RESTORE_STATE, state.to_string()),
                    )
                    .await?
                {
                    return Err(BackupError::NotEmpty(
                        "another restore into this registry started meanwhile".into(),
                    ));
                }
            }
        }
        let publish = |report: &RestoreReport| {
            if let Some(progress) = progress {
                let mut shown = report.clone();
                shown.duration_ms = started.elapsed().as_millis() as u64;
                progress.send_replace(shown);
            }
        };
        publish(&report);
        // Blobs the backup lacks, and those it cannot give back, get no
        // blob record here (nothing claims bytes that are not stored). The
        // links and manifests that name them are restored as they were, so
        // that `berth scrub` names the gap and `--repair` fills it from a
        // peer region or another backup; the restore reports them and
        // exits 1.
        let mut lacking: HashSet<Digest> = index.lacking();
        let mut lacking_listed: Vec<Digest> = index
            .missing
            .iter()
            .chain(&index.corrupt)
            .cloned()
            .collect();
        report.missing.append(&mut lacking_listed);
        let mut newest_stamp = 0u64;
        let mut done = 0u64;
        // Once the replay has begun the records are in, and some were
        // removed by it since (deletes after the backup): written again,
        // they would come back, as the replayed deletes are done already.
        // The blobs are still checked, so that what is missing is named.
        for chunk in &index.chunks {
            let records = target.chunk(chunk).await?;
            let wanted: Vec<(Digest, u64)> = chunk_blobs(&records)
                .into_iter()
                .filter(|(digest, _)| !lacking.contains(digest))
                .collect();
            let mut copies = Box::pin(copy_many(
                target.blobs.clone(),
                self.blob_store().clone(),
                wanted,
            ));
            while let Some((digest, size, outcome)) = copies.next().await {
                match outcome? {
                    Outcome::Present => {
                        report.blobs += 1;
                        report.bytes += size;
                    }
                    Outcome::Written => {
                        report.blobs += 1;
                        report.bytes += size;
                        report.copied_blobs += 1;
                        report.copied_bytes += size;
                    }
                    Outcome::Missing | Outcome::Corrupt => {
                        tracing::error!(%digest, "restore: the backup does not give this blob back intact; run berth scrub --repair");
                        lacking.insert(digest.clone());
                        report.missing.push(digest);
                    }
                }
                done += 1;
                if done.is_multiple_of(64) {
                    publish(&report);
                }
            }
            drop(copies);
            let records: Vec<super::dump::Record> = records
                .into_iter()
                .filter(|(key, _)| {
                    super::backed_up(key)
                        && !blob_record_digest(key).is_some_and(|d| lacking.contains(&d))
                })
                .collect();
            for (_, value) in &records {
                newest_stamp = newest_stamp.max(stamp_in(value));
            }
            if replaying {
                publish(&report);
                continue;
            }
            // The bytes this chunk's records promise are in: still held?
            hold.check().await?;
            for batch in records.chunks(BATCH) {
                let (written, existing) = write_absent(self, hold, batch).await?;
                report.records += written;
                report.existing += existing;
            }
            publish(&report);
        }
        // Later writes here must be newer than every restored one.
        self.observe_hlc(newest_stamp);
        if adopt && let Some(owner) = target.owner().await? {
            meta.commit(Txn::new().put(super::REGISTRY_ID, owner))
                .await?;
        }
        if let Some(plan) = plan {
            report.phase = "replay".into();
            publish(&report);
            if !replaying {
                mark_replaying(&meta, hold, plan).await?;
            }
            let mut shown = report.clone();
            let replayed = self
                .replay(target, plan, |replay| {
                    if replay.events.is_multiple_of(64) {
                        shown.replayed = Some(replay.clone());
                        publish(&shown);
                    }
                })
                .await?;
            report.replayed = Some(replayed);
        }
        hold.check().await?;
        meta.commit(Txn::new().delete(RESTORE_STATE)).await?;
        report.missing.sort();
        report.phase = "done".into();
        report.duration_ms = started.elapsed().as_millis() as u64;
        publish(&report);
        Ok(report)
    }
}

/// A restore that did not finish, as its marker records it.
struct Unfinished {
    backup: String,
    at_ms: Option<u64>,
    at_seq: Option<u64>,
    /// Its records were all in and the replay had begun.
    replaying: bool,
}

/// Records in the marker that the replay begins (the records are all in).
async fn mark_replaying(
    meta: &std::sync::Arc<dyn berth_store::MetaStore>,
    hold: &Hold,
    plan: &Plan,
) -> Result<(), BackupError> {
    let Some(kv) = meta.get(RESTORE_STATE.as_bytes()).await? else {
        return Err(BackupError::NotEmpty(
            "the restore marker vanished while the restore ran".into(),
        ));
    };
    let mut state: serde_json::Value = serde_json::from_slice(&kv.value).unwrap_or_default();
    state["replaying"] = true.into();
    // Where it goes, so that a resumed run (without --at) goes there too.
    if let Some(until) = plan.until_ms {
        state["at_ms"] = until.into();
    }
    if let Some(until) = plan.until_seq {
        state["at_seq"] = until.into();
    }
    let txn = hold
        .guard(Txn::new())
        .require_version(RESTORE_STATE, kv.version)
        .put(RESTORE_STATE, state.to_string());
    if !meta.commit(txn).await? {
        hold.check().await?;
        return Err(BackupError::NotEmpty(
            "the restore marker changed while the restore ran (another restore?)".into(),
        ));
    }
    Ok(())
}

/// The HLC of a record's stamp, if it carries one (tags, manifests,
/// tombstones, history).
fn stamp_in(value: &[u8]) -> u64 {
    if value.first() != Some(&b'{') {
        return 0;
    }
    serde_json::from_slice::<serde_json::Value>(value)
        .ok()
        .and_then(|v| v["stamp"]["hlc"].as_u64())
        .unwrap_or(0)
}

/// Writes each record whose key is absent: the batch in one transaction,
/// or one by one when some are there already (a resumed restore, or a
/// write that reached the registry meanwhile, which is left alone). Every
/// transaction also requires the hold unchanged, so that no record lands
/// after a lapse let blob removal take the bytes it promises.
async fn write_absent(
    registry: &Registry,
    hold: &Hold,
    batch: &[super::dump::Record],
) -> Result<(u64, u64), BackupError> {
    let meta = registry.meta_store();
    let txn = batch
        .iter()
        .fold(hold.guard(Txn::new()), |txn, (key, value)| {
            txn.require_absent(key.clone())
                .put(key.clone(), value.clone())
        });
    if meta.commit(txn).await? {
        return Ok((batch.len() as u64, 0));
    }
    hold.check().await?;
    let (mut written, mut existing) = (0, 0);
    for (key, value) in batch {
        let one = hold
            .guard(Txn::new())
            .require_absent(key.clone())
            .put(key.clone(), value.clone());
        if meta.commit(one).await? {
            written += 1;
        } else {
            existing += 1;
        }
    }
    // A failure above may have been the hold's.
    hold.check().await?;
    Ok((written, existing))
}
