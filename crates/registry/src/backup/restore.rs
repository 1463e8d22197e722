//! Restoring a backup into an empty registry, whatever its engines: the
//! blobs first (verified as they are written), then the records, chunk by
//! chunk, each written only where the key is absent. A restore that is
//! killed is resumed by running it again with the same backup: the marker
//! `restore/state` names it, and what is already there is skipped.

use std::time::Instant;

use berth_oci::Digest;
use berth_store::Txn;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::create::copy_blob_to_registry;
use super::{BackupError, Target};
use crate::keys;
use crate::records::{BlobRecord, decode};
use crate::{Registry, now_ms};

/// Marks a restore in progress, with the backup's id.
const RESTORE_STATE: &str = "restore/state";

/// What a restore did, reported while it runs and at the end.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RestoreReport {
    #[serde(default)]
    pub id: String,
    /// `records`, `done`.
    #[serde(default)]
    pub phase: String,
    /// Records written (and already there, on a resumed restore).
    pub records: u64,
    pub existing: u64,
    pub blobs: u64,
    pub bytes: u64,
    /// Of those, what was copied (the rest was already stored).
    pub copied_blobs: u64,
    pub copied_bytes: u64,
    /// Blobs the backup names but does not give back intact: left out,
    /// with their records.
    pub missing: Vec<Digest>,
    pub resumed: bool,
    pub duration_ms: u64,
}

pub type RestoreProgress = tokio::sync::watch::Sender<RestoreReport>;

/// Blobs copied at once.
const PARALLEL: usize = 8;
/// Puts per transaction (with a compare each: 64 operations, inside
/// etcd's default limit of 128).
const BATCH: usize = 32;
/// Prefixes whose presence means the registry is not empty.
const CONTENT: &[&str] = &[
    keys::REPO_PREFIX,
    keys::TAG_PREFIX,
    keys::MANIFEST_PREFIX,
    keys::LINK_PREFIX,
];

impl Registry {
    /// Restores backup `id` (the newest when `None`) from `target`.
    pub async fn restore(
        &self,
        target: &Target,
        id: Option<&str>,
        progress: Option<&RestoreProgress>,
    ) -> Result<RestoreReport, BackupError> {
        let started = Instant::now();
        let index = target.pick(id).await?;
        // Blob removal waits while bytes land ahead of their records.
        let hold = super::create::Hold::acquire(
            self.meta_store().clone(),
            &format!("restore of {}", index.id),
        )
        .await?;
        let result = self.restore_held(target, &index, started, progress).await;
        let result = result.and_then(|report| hold.check().map(|()| report));
        hold.release().await;
        result
    }

    async fn restore_held(
        &self,
        target: &Target,
        index: &super::BackupIndex,
        started: Instant,
        progress: Option<&RestoreProgress>,
    ) -> Result<RestoreReport, BackupError> {
        let meta = self.meta_store().clone();
        let mut report = RestoreReport {
            id: index.id.clone(),
            phase: "records".into(),
            ..RestoreReport::default()
        };
        match meta.get(RESTORE_STATE.as_bytes()).await? {
            Some(kv) => {
                let state: serde_json::Value =
                    serde_json::from_slice(&kv.value).unwrap_or_default();
                let running = state["backup"].as_str().unwrap_or_default();
                if running != index.id {
                    return Err(BackupError::NotEmpty(format!(
                        "a restore of backup {running} into this registry did not finish; run it again to finish it first"
                    )));
                }
                report.resumed = true;
            }
            None => {
                for prefix in CONTENT {
                    if !meta.scan(prefix.as_bytes(), None, 1).await?.is_empty() {
                        return Err(BackupError::NotEmpty(
                            "the registry is not empty: a backup restores into a registry with no repositories".into(),
                        ));
                    }
                }
                let state = serde_json::json!({ "backup": index.id, "since_ms": now_ms() });
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
        let max = self.limits().max_blob_bytes;
        let mut newest_stamp = 0u64;
        for chunk in &index.chunks {
            let records = target.chunk(chunk).await?;
            // The chunk's blobs first, so that no record is written before
            // the bytes it promises.
            let wanted: Vec<(Digest, u64)> = records
                .iter()
                .filter_map(|(key, value)| {
                    let digest = std::str::from_utf8(key)
                        .ok()?
                        .strip_prefix("blob/")?
                        .parse::<Digest>()
                        .ok()?;
                    let record: BlobRecord = decode(key, value).ok()?;
                    Some((digest, record.size))
                })
                .collect();
            let mut copies =
                futures_util::stream::iter(wanted.into_iter().map(|(digest, size)| async move {
                    let copied = copy_blob_to_registry(target, self, &digest, max).await;
                    (digest, size, copied)
                }))
                .buffer_unordered(PARALLEL);
            let mut left_out = std::collections::HashSet::new();
            while let Some((digest, size, copied)) = copies.next().await {
                match copied? {
                    Some((stored, copied)) if stored == size => {
                        report.blobs += 1;
                        report.bytes += size;
                        if copied {
                            report.copied_blobs += 1;
                            report.copied_bytes += size;
                        }
                    }
                    _ => {
                        tracing::error!(%digest, "restore: the backup does not give this blob back intact; it is left out");
                        left_out.insert(keys::blob(&digest).into_bytes());
                        report.missing.push(digest);
                    }
                }
                if report.blobs.is_multiple_of(256) {
                    publish(&report);
                }
            }
            drop(copies);
            let records: Vec<super::dump::Record> = records
                .into_iter()
                .filter(|(key, _)| !left_out.contains(key) && super::backed_up(key))
                .collect();
            for (key, value) in &records {
                newest_stamp = newest_stamp.max(stamp_in(key, value));
            }
            for batch in records.chunks(BATCH) {
                let (written, existing) = write_absent(self, batch).await?;
                report.records += written;
                report.existing += existing;
            }
            publish(&report);
        }
        // Later writes here must be newer than every restored one.
        self.observe_hlc(newest_stamp);
        meta.commit(Txn::new().delete(RESTORE_STATE)).await?;
        report.missing.sort();
        report.phase = "done".into();
        report.duration_ms = started.elapsed().as_millis() as u64;
        publish(&report);
        Ok(report)
    }
}

/// The HLC of a record's stamp, if it carries one (tags, manifests).
fn stamp_in(key: &[u8], value: &[u8]) -> u64 {
    if !(key.starts_with(keys::TAG_PREFIX.as_bytes())
        || key.starts_with(keys::MANIFEST_PREFIX.as_bytes()))
    {
        return 0;
    }
    serde_json::from_slice::<serde_json::Value>(value)
        .ok()
        .and_then(|v| v["stamp"]["hlc"].as_u64())
        .unwrap_or(0)
}

/// Writes each record whose key is absent: the batch in one transaction,
/// or one by one when some are there already (a resumed restore, or a
/// write that reached the registry meanwhile, which is left alone).
async fn write_absent(
    registry: &Registry,
    batch: &[super::dump::Record],
) -> Result<(u64, u64), BackupError> {
    let meta = registry.meta_store();
    let txn = batch.iter().fold(Txn::new(), |txn, (key, value)| {
        txn.require_absent(key.clone())
            .put(key.clone(), value.clone())
    });
    if meta.commit(txn).await? {
        return Ok((batch.len() as u64, 0));
    }
    let (mut written, mut existing) = (0, 0);
    for (key, value) in batch {
        let one = Txn::new()
            .require_absent(key.clone())
            .put(key.clone(), value.clone());
        if meta.commit(one).await? {
            written += 1;
        } else {
            existing += 1;
        }
    }
    Ok((written, existing))
}
