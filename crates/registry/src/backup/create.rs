//! Taking a backup: take the hold on blob removal, dump the records of one
//! snapshot into chunks (quickly, so that the snapshot is short-lived: etcd
//! may compact old revisions, redb keeps old pages while it is open), then
//! copy the blobs those records name (those not in the target yet), and
//! publish the index last.

use std::collections::HashSet;
use std::time::Instant;

use berth_oci::Digest;
use berth_store::{ByteStream, Snapshot};
use bytes::Bytes;
use futures_util::StreamExt;

use super::copy::{Outcome, chunk_blobs, copy_many};
use super::dump::{ChunkWriter, MAX_CHUNK};
use super::hold::Hold;
use super::{
    BackupError, BackupIndex, BackupReport, ChunkRef, FORMAT, RESTORE_STATE, Target, backed_up,
    blob_record_digest, id_for,
};
use crate::keys;
use crate::records::{BlobRecord, LogHead, decode, encode};
use crate::{Registry, now_ms};

/// Where a running backup reports how far it got.
pub type Progress = tokio::sync::watch::Sender<BackupReport>;

#[derive(Clone, Debug, Default)]
pub struct CreateOptions {
    /// The region the registry serves, recorded in the index.
    pub region: Option<String>,
    /// After the backup, keep only this many newest backups in the target
    /// and remove the blobs no kept one names.
    pub keep: Option<usize>,
    /// How old an unused blob in the target must be before a prune
    /// removes it (default an hour: it may be an archiver's, whose log
    /// segment is not written yet).
    pub prune_grace_ms: Option<u64>,
}

/// Records read per snapshot scan.
const PAGE: usize = 1000;

/// A compact key for the set of blobs the dump recorded: 128 bits of the
/// digest (collisions are out of reach).
fn short(digest: &Digest) -> u128 {
    let hex = digest.encoded();
    u128::from_str_radix(hex.get(..32).unwrap_or(hex), 16).unwrap_or_default()
}

fn single(bytes: Bytes) -> ByteStream {
    Box::pin(futures_util::stream::iter([Ok(bytes)]))
}

/// The records of one snapshot, into chunks in the target.
struct Dump<'a> {
    registry: &'a Registry,
    target: &'a Target,
    writer: ChunkWriter,
    chunks: Vec<ChunkRef>,
    /// Blobs with a record in the dump.
    recorded: HashSet<u128>,
    /// Of those, the ones a removal had marked: unreferenced at the
    /// snapshot, so if their bytes vanish before the copy they are dropped,
    /// not missing.
    marked: HashSet<Digest>,
    /// Referenced by a link or manifest, with neither a record nor bytes.
    missing: HashSet<Digest>,
    records: u64,
    counts: (u64, u64, u64),
}

impl Registry {
    /// Takes a backup into `target` while the registry keeps serving.
    pub async fn backup(
        &self,
        target: &Target,
        options: &CreateOptions,
        progress: Option<&Progress>,
    ) -> Result<BackupReport, BackupError> {
        let id = id_for(now_ms());
        let hold = Hold::acquire(self.meta_store().clone(), &format!("backup {id}")).await?;
        let result = self.backup_held(&hold, id, target, options, progress).await;
        hold.release().await;
        result
    }

    async fn backup_held(
        &self,
        hold: &Hold,
        id: String,
        target: &Target,
        options: &CreateOptions,
        progress: Option<&Progress>,
    ) -> Result<BackupReport, BackupError> {
        let started = Instant::now();
        let started_ms = now_ms();
        let meta = self.meta_store();
        // A half-restored registry is not a state to keep.
        if meta.get(RESTORE_STATE.as_bytes()).await?.is_some() {
            return Err(BackupError::NotEmpty(
                "a restore into this registry has not finished: finish it (run it again) before taking backups".into(),
            ));
        }
        target
            .claim(&super::registry_id(meta.as_ref()).await?)
            .await?;
        let mut report = BackupReport {
            id: id.clone(),
            phase: "records".into(),
            ..BackupReport::default()
        };
        let publish = |report: &BackupReport| {
            if let Some(progress) = progress {
                let mut shown = report.clone();
                shown.duration_ms = started.elapsed().as_millis() as u64;
                progress.send_replace(shown);
            }
        };
        publish(&report);
        // The log since the previous backup, with its content, so that a
        // restore can reach any moment between the two.
        match super::archive::Archiver::new(target.clone())
            .catch_up(self)
            .await
        {
            Ok(round) => report.archived = Some(round),
            Err(e) => {
                tracing::warn!(error = %e, "backup: archiving the change log failed; the backup goes on");
                report.archive_error = Some(e.to_string());
            }
        }
        self.ensure_log_epoch().await?;
        // Taken after the hold: see the module's comment.
        let snapshot = meta.snapshot().await?;
        let snapshot_ms = now_ms();
        let revision = snapshot.revision();
        let log = log_point(snapshot.as_ref()).await?;
        let mut dump = Dump {
            registry: self,
            target,
            writer: ChunkWriter::new(),
            chunks: Vec::new(),
            recorded: HashSet::new(),
            marked: HashSet::new(),
            missing: HashSet::new(),
            records: 0,
            counts: (0, 0, 0),
        };
        dump.blob_records(snapshot.as_ref()).await?;
        dump.other_records(snapshot.as_ref()).await?;
        dump.flush().await?;
        drop(snapshot);
        report.records = dump.records;
        report.phase = "blobs".into();
        publish(&report);

        let mut dropped = Vec::new();
        let mut done = 0u64;
        let mut missing: Vec<Digest> = dump.missing.iter().cloned().collect();
        for chunk in &dump.chunks {
            let wanted: Vec<(Digest, u64)> = chunk_blobs(&target.chunk(chunk).await?);
            let mut copies = Box::pin(copy_many(
                self.blob_store().clone(),
                target.blobs.clone(),
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
                    // Removed since the snapshot by a removal that found
                    // it unreferenced before the hold: not part of it.
                    Outcome::Missing if dump.marked.contains(&digest) => dropped.push(digest),
                    Outcome::Missing => {
                        tracing::error!(%digest, "backup: a recorded blob is missing from storage; it is left out");
                        missing.push(digest);
                    }
                    Outcome::Corrupt => {
                        tracing::error!(%digest, "backup: a stored blob does not match its digest; it is left out");
                        report.corrupt.push(digest);
                    }
                }
                done += 1;
                if done.is_multiple_of(64) {
                    publish(&report);
                }
            }
            publish(&report);
        }
        missing.sort();
        report.missing = missing;
        report.corrupt.sort();
        dropped.sort();
        // Every byte is in the target: the hold must have lasted until now.
        hold.check().await?;
        report.phase = "index".into();
        publish(&report);
        let (repositories, tags, manifests) = dump.counts;
        let index = BackupIndex {
            format: FORMAT,
            id,
            started_ms,
            finished_ms: now_ms(),
            revision,
            snapshot_ms,
            log,
            region: options.region.clone(),
            records: report.records,
            repositories,
            tags,
            manifests,
            chunks: std::mem::take(&mut dump.chunks),
            blobs: report.blobs,
            bytes: report.bytes,
            copied_blobs: report.copied_blobs,
            copied_bytes: report.copied_bytes,
            missing: report.missing.clone(),
            corrupt: report.corrupt.clone(),
            dropped,
        };
        target.publish(&index).await?;
        if let Some(keep) = options.keep {
            report.phase = "prune".into();
            publish(&report);
            // The backup is listed and whole: a failed prune is the next
            // one's to finish, not this backup's failure.
            match super::prune::prune(target, keep, hold, &index, options.prune_grace_ms).await {
                Ok(pruned) => report.pruned = Some(pruned),
                Err(e) => {
                    tracing::warn!(error = %e, "pruning old backups failed; the next scheduled backup tries again");
                    report.prune_error = Some(e.to_string());
                }
            }
        }
        report.phase = "done".into();
        report.duration_ms = started.elapsed().as_millis() as u64;
        publish(&report);
        Ok(report)
    }
}

impl Dump<'_> {
    fn push(&mut self, key: &[u8], value: &[u8]) {
        self.writer.push(key, value);
        self.records += 1;
    }

    /// Every blob record of the snapshot, without removal marks (a
    /// restored registry starts with none). A marked record whose bytes are
    /// already gone is left out: its blob is being removed, unreferenced.
    async fn blob_records(&mut self, snapshot: &dyn Snapshot) -> Result<(), BackupError> {
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = snapshot.scan(b"blob/", after.as_deref(), PAGE).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.key.clone());
            for kv in page {
                let Some(digest) = blob_record_digest(&kv.key) else {
                    tracing::warn!(key = %String::from_utf8_lossy(&kv.key), "backup: skipping a blob record with an unreadable key");
                    continue;
                };
                let record: BlobRecord = decode(&kv.key, &kv.value)?;
                if record.removing_since_ms.is_some() {
                    if self.registry.blob_store().stat(&digest).await?.is_none() {
                        continue;
                    }
                    self.marked.insert(digest.clone());
                }
                self.recorded.insert(short(&digest));
                self.push(&kv.key, &encode(&BlobRecord::new(record.size)));
                if self.writer.is_full() {
                    self.flush().await?;
                }
            }
        }
        Ok(())
    }

    /// Every other record of the snapshot that is the registry's content.
    async fn other_records(&mut self, snapshot: &dyn Snapshot) -> Result<(), BackupError> {
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = snapshot.scan(b"", after.as_deref(), PAGE).await?;
            let Some(last) = page.last() else { break };
            // Past a family that is not backed up in one step: the change
            // log alone may hold many pages.
            let last = last.key.clone();
            after = Some(match skipped_family(&last) {
                Some(family) => {
                    let mut end = family.as_bytes().to_vec();
                    end.push(0xff);
                    end
                }
                None => last,
            });
            for kv in page {
                if kv.key.starts_with(b"blob/") || !backed_up(&kv.key) {
                    continue;
                }
                self.unrecorded_bytes(&kv.key).await?;
                let key = &kv.key;
                if key.starts_with(keys::REPO_PREFIX.as_bytes()) {
                    self.counts.0 += 1;
                } else if key.starts_with(keys::TAG_PREFIX.as_bytes()) {
                    self.counts.1 += 1;
                } else if key.starts_with(keys::MANIFEST_PREFIX.as_bytes()) {
                    self.counts.2 += 1;
                }
                self.push(&kv.key, &kv.value);
                if self.writer.is_full() {
                    self.flush().await?;
                }
            }
        }
        Ok(())
    }

    /// A link, manifest or trashed manifest naming bytes that no blob
    /// record names (content stored before blob records existed): a record
    /// is written for them here, so that they are copied too.
    async fn unrecorded_bytes(&mut self, key: &[u8]) -> Result<(), BackupError> {
        let digest = if key.starts_with(keys::LINK_PREFIX.as_bytes()) {
            keys::link_digest(key)
        } else if key.starts_with(keys::MANIFEST_PREFIX.as_bytes()) {
            keys::manifest_key_digest(key)
        } else {
            keys::trash_manifest_digest(key)
        };
        let Some(digest) = digest else { return Ok(()) };
        if self.recorded.contains(&short(&digest)) || self.missing.contains(&digest) {
            return Ok(());
        }
        match self.registry.blob_store().stat(&digest).await? {
            Some(size) => {
                self.recorded.insert(short(&digest));
                self.push(
                    keys::blob(&digest).as_bytes(),
                    &encode(&BlobRecord::new(size)),
                );
            }
            None => {
                tracing::error!(%digest, record = %String::from_utf8_lossy(key), "backup: a referenced blob is missing from storage");
                self.missing.insert(digest);
            }
        }
        Ok(())
    }

    /// Stores the current chunk in the target (content-addressed).
    async fn flush(&mut self) -> Result<(), BackupError> {
        if self.writer.is_empty() {
            return Ok(());
        }
        let (bytes, records) = self.writer.take();
        let digest = Digest::sha256_of(&bytes);
        let size = bytes.len() as u64;
        let blobs = &self.target.blobs;
        if blobs.stat(&digest).await? != Some(size) {
            blobs
                .put(&digest, single(bytes), MAX_CHUNK)
                .await
                .map_err(|e| {
                    BackupError::Store(berth_store::StoreError::Unavailable(format!(
                        "writing a metadata chunk: {e}"
                    )))
                })?;
        }
        self.chunks.push(ChunkRef {
            digest,
            size,
            records,
        });
        Ok(())
    }
}

/// The change log's head as the snapshot sees it.
async fn log_point(snapshot: &dyn Snapshot) -> Result<Option<super::LogPoint>, BackupError> {
    let head = snapshot
        .scan(keys::CHANGE_HEAD.as_bytes(), None, 1)
        .await?
        .into_iter()
        .find(|kv| kv.key == keys::CHANGE_HEAD.as_bytes());
    let head: LogHead = match head {
        Some(kv) => decode(&kv.key, &kv.value)?,
        None => LogHead::default(),
    };
    Ok(Some(super::LogPoint {
        epoch: head.epoch,
        seq: head.seq,
    }))
}

/// The family a key belongs to if it is one a backup leaves out.
fn skipped_family(key: &[u8]) -> Option<&'static str> {
    std::iter::once("blob/")
        .chain(super::NOT_BACKED_UP.iter().copied())
        .find(|family| key.starts_with(family.as_bytes()))
}
