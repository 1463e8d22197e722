//! Taking a backup: hold off blob removal, snapshot the metadata, copy the
//! blobs its records name (those not yet in the target), write the records
//! in chunks, and publish the index last.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use berth_oci::Digest;
use berth_store::{BlobStore, ByteStream, MetaStore, PutError, Snapshot, Txn};
use bytes::Bytes;
use futures_util::StreamExt;

use super::dump::{ChunkWriter, MAX_CHUNK};
use super::{BackupError, BackupIndex, BackupReport, ChunkRef, FORMAT, Target, backed_up, id_for};
use crate::keys;
use crate::records::{BlobRecord, decode, encode};
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
}

/// Blobs copied at once: each is a stream from the registry's store into
/// the target's, mostly waiting on I/O.
const PARALLEL: usize = 8;
/// Records read per snapshot scan.
const PAGE: usize = 1000;
/// The hold's lease: kept alive every third of it.
const HOLD_TTL: Duration = Duration::from_secs(15);

/// The registry's backup hold: while it exists no blob bytes are removed.
/// Held under a lease, so a backup that dies releases it within the TTL.
pub(super) struct Hold {
    meta: Arc<dyn MetaStore>,
    lease: berth_store::LeaseId,
    lost: Arc<AtomicBool>,
    keeper: tokio::task::JoinHandle<()>,
}

impl Hold {
    pub(super) async fn acquire(meta: Arc<dyn MetaStore>, id: &str) -> Result<Self, BackupError> {
        let lease = meta.grant_lease(HOLD_TTL).await?;
        let value = serde_json::json!({ "backup": id, "since_ms": now_ms() }).to_string();
        let taken = meta
            .commit(Txn::new().require_absent(keys::BACKUP_HOLD).put_leased(
                keys::BACKUP_HOLD,
                value,
                lease,
            ))
            .await;
        match taken {
            Ok(true) => {}
            Ok(false) | Err(_) => {
                let _ = meta.revoke_lease(lease).await;
                taken?;
                let holder = match meta.get(keys::BACKUP_HOLD.as_bytes()).await {
                    Ok(Some(kv)) => String::from_utf8_lossy(&kv.value).into_owned(),
                    _ => "it has just finished".into(),
                };
                return Err(BackupError::Busy(holder));
            }
        }
        let lost = Arc::new(AtomicBool::new(false));
        let keeper = {
            let meta = meta.clone();
            let lost = lost.clone();
            tokio::spawn(async move {
                let mut last_kept = Instant::now();
                loop {
                    tokio::time::sleep(HOLD_TTL / 3).await;
                    match meta.keep_lease_alive(lease).await {
                        Ok(true) => last_kept = Instant::now(),
                        Ok(false) => break,
                        Err(e) => {
                            tracing::warn!(error = %e, "could not renew the backup hold; retrying");
                            if last_kept.elapsed() < HOLD_TTL {
                                continue;
                            }
                            break;
                        }
                    }
                }
                lost.store(true, Ordering::SeqCst);
            })
        };
        Ok(Self {
            meta,
            lease,
            lost,
            keeper,
        })
    }

    /// Fails if the hold lapsed at any point so far.
    pub(super) fn check(&self) -> Result<(), BackupError> {
        if self.lost.load(Ordering::SeqCst) {
            return Err(BackupError::HoldLost(
                "the backup's hold on blob removal lapsed (the metadata store was unreachable for longer than its lease); blobs may have been removed meanwhile, so this backup is not listed: run it again".into(),
            ));
        }
        Ok(())
    }

    pub(super) async fn release(self) {
        self.keeper.abort();
        if let Err(e) = self.meta.revoke_lease(self.lease).await {
            tracing::warn!(error = %e, "could not release the backup hold; it lapses with its lease");
        }
    }
}

/// How one blob reached the target.
enum Outcome {
    /// It was already there (verified when it was written).
    Present(u64),
    Written(u64),
    Missing,
    Corrupt,
}

/// A compact key for the set of blobs a backup holds: 128 bits of the
/// digest (collisions are out of reach).
fn short(digest: &Digest) -> u128 {
    let hex = digest.encoded();
    u128::from_str_radix(hex.get(..32).unwrap_or(hex), 16).unwrap_or_default()
}

fn single(bytes: Bytes) -> ByteStream {
    Box::pin(futures_util::stream::iter([Ok(bytes)]))
}

/// Copies `digest` from the registry's store into the target's, verified
/// on both sides (the source re-hashes as it reads, the target refuses
/// bytes that do not hash to the digest).
async fn copy_blob(
    from: &dyn BlobStore,
    to: &dyn BlobStore,
    digest: &Digest,
    max: u64,
) -> Result<Outcome, BackupError> {
    if let Some(size) = to.stat(digest).await? {
        return Ok(Outcome::Present(size));
    }
    let Some(read) = from.read(digest, None).await? else {
        return Ok(Outcome::Missing);
    };
    match to.put(digest, read.stream, max).await {
        Ok(size) => Ok(Outcome::Written(size)),
        Err(PutError::DigestMismatch { .. }) => Ok(Outcome::Corrupt),
        Err(PutError::Body(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
            Ok(Outcome::Corrupt)
        }
        Err(PutError::Body(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(Outcome::Missing),
        Err(PutError::Body(e)) => Err(BackupError::Store(berth_store::StoreError::Io(e))),
        Err(PutError::Store(e)) => Err(e.into()),
        Err(e) => Err(BackupError::Store(berth_store::StoreError::Unavailable(
            format!("copying {digest}: {e}"),
        ))),
    }
}

/// Copies `digest` from the target into the registry's blob store,
/// verified: its stored size and whether it was copied, or `None` when the
/// target does not give it back intact.
pub(super) async fn copy_blob_to_registry(
    target: &Target,
    registry: &Registry,
    digest: &Digest,
    max: u64,
) -> Result<Option<(u64, bool)>, BackupError> {
    let into = registry.blob_store();
    if let Some(size) = into.stat(digest).await? {
        return Ok(Some((size, false)));
    }
    Ok(
        match copy_blob(target.blobs.as_ref(), into.as_ref(), digest, max).await? {
            Outcome::Present(size) => Some((size, false)),
            Outcome::Written(size) => Some((size, true)),
            Outcome::Missing | Outcome::Corrupt => None,
        },
    )
}

struct Run<'a> {
    registry: &'a Registry,
    target: &'a Target,
    snapshot: Box<dyn Snapshot>,
    writer: ChunkWriter,
    chunks: Vec<ChunkRef>,
    held: HashSet<u128>,
    missing: HashSet<Digest>,
    report: BackupReport,
    started: Instant,
    progress: Option<&'a Progress>,
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
        let started = Instant::now();
        let started_ms = now_ms();
        let id = id_for(started_ms);
        let hold = Hold::acquire(self.meta_store().clone(), &id).await?;
        let result = async {
            // Taken after the hold: see the module's comment.
            let snapshot = self.meta_store().snapshot().await?;
            let revision = snapshot.revision();
            let mut run = Run {
                registry: self,
                target,
                snapshot,
                writer: ChunkWriter::new(),
                chunks: Vec::new(),
                held: HashSet::new(),
                missing: HashSet::new(),
                report: BackupReport {
                    id: id.clone(),
                    phase: "blobs".into(),
                    ..BackupReport::default()
                },
                started,
                progress,
                counts: (0, 0, 0),
            };
            run.publish();
            run.blobs().await?;
            run.report.phase = "records".into();
            run.publish();
            run.records().await?;
            run.flush().await?;
            hold.check()?;
            run.report.phase = "index".into();
            run.publish();
            let mut missing: Vec<Digest> = run.missing.iter().cloned().collect();
            missing.sort();
            run.report.missing = missing.clone();
            run.report.corrupt.sort();
            let (repositories, tags, manifests) = run.counts;
            let index = BackupIndex {
                format: FORMAT,
                id: id.clone(),
                started_ms,
                finished_ms: now_ms(),
                revision,
                region: options.region.clone(),
                records: run.report.records,
                repositories,
                tags,
                manifests,
                chunks: std::mem::take(&mut run.chunks),
                blobs: run.report.blobs,
                bytes: run.report.bytes,
                copied_blobs: run.report.copied_blobs,
                copied_bytes: run.report.copied_bytes,
                missing,
                corrupt: run.report.corrupt.clone(),
            };
            target.publish(&index).await?;
            let mut report = run.report;
            if let Some(keep) = options.keep {
                report.phase = "prune".into();
                report.pruned = Some(super::prune::prune(target, keep).await?);
            }
            report.phase = "done".into();
            report.duration_ms = started.elapsed().as_millis() as u64;
            if let Some(progress) = progress {
                progress.send_replace(report.clone());
            }
            Ok(report)
        }
        .await;
        hold.release().await;
        result
    }
}

impl Run<'_> {
    fn publish(&self) {
        if let Some(progress) = self.progress {
            let mut shown = self.report.clone();
            shown.duration_ms = self.started.elapsed().as_millis() as u64;
            progress.send_replace(shown);
        }
    }

    fn max_blob(&self) -> u64 {
        self.registry.limits().max_blob_bytes
    }

    /// Every blob record of the snapshot: its bytes into the target, its
    /// record (without a removal mark) into the metadata.
    async fn blobs(&mut self) -> Result<(), BackupError> {
        let from = self.registry.blob_store().clone();
        let to = self.target.blobs.clone();
        let max = self.max_blob();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = self.snapshot.scan(b"blob/", after.as_deref(), PAGE).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.key.clone());
            let mut entries = Vec::with_capacity(page.len());
            for kv in page {
                let digest = std::str::from_utf8(&kv.key)
                    .ok()
                    .and_then(|k| k.strip_prefix("blob/"))
                    .and_then(|d| d.parse::<Digest>().ok());
                let Some(digest) = digest else {
                    tracing::warn!(key = %String::from_utf8_lossy(&kv.key), "backup: skipping a blob record with an unreadable key");
                    continue;
                };
                let record: BlobRecord = decode(&kv.key, &kv.value)?;
                entries.push((digest, record));
            }
            let mut copies =
                futures_util::stream::iter(entries.into_iter().map(|(digest, record)| {
                    let from = from.clone();
                    let to = to.clone();
                    async move {
                        let copied = copy_blob(from.as_ref(), to.as_ref(), &digest, max).await;
                        (digest, record, copied)
                    }
                }))
                .buffered(PARALLEL);
            while let Some((digest, record, copied)) = copies.next().await {
                match copied? {
                    Outcome::Present(size) | Outcome::Written(size) if size != record.size => {
                        tracing::error!(%digest, recorded = record.size, stored = size, "backup: a blob's size differs from its record");
                        self.report.corrupt.push(digest);
                    }
                    Outcome::Present(size) => self.hold_blob(&digest, size, false),
                    Outcome::Written(size) => self.hold_blob(&digest, size, true),
                    // Being removed: unreferenced at the snapshot (see the
                    // module's comment), so not part of it.
                    Outcome::Missing if record.removing_since_ms.is_some() => continue,
                    Outcome::Missing => {
                        tracing::error!(%digest, "backup: a recorded blob is missing from storage; it is left out");
                        self.missing.insert(digest);
                        continue;
                    }
                    Outcome::Corrupt => {
                        tracing::error!(%digest, "backup: a stored blob does not match its digest; it is left out");
                        self.report.corrupt.push(digest);
                        continue;
                    }
                }
                if self.writer.is_full() {
                    self.flush().await?;
                }
                if self.report.blobs.is_multiple_of(256) {
                    self.publish();
                }
            }
            drop(copies);
            self.publish();
        }
        Ok(())
    }

    /// Counts a blob the target now holds and writes its record.
    fn hold_blob(&mut self, digest: &Digest, size: u64, copied: bool) {
        self.held.insert(short(digest));
        self.report.blobs += 1;
        self.report.bytes += size;
        if copied {
            self.report.copied_blobs += 1;
            self.report.copied_bytes += size;
        }
        self.writer.push(
            keys::blob(digest).as_bytes(),
            &encode(&BlobRecord::new(size)),
        );
        self.report.records += 1;
    }

    /// Every other record of the snapshot that is the registry's content.
    async fn records(&mut self) -> Result<(), BackupError> {
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = self.snapshot.scan(b"", after.as_deref(), PAGE).await?;
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
                self.referenced_bytes(&kv.key).await?;
                let key = &kv.key;
                if key.starts_with(keys::REPO_PREFIX.as_bytes()) {
                    self.counts.0 += 1;
                } else if key.starts_with(keys::TAG_PREFIX.as_bytes()) {
                    self.counts.1 += 1;
                } else if key.starts_with(keys::MANIFEST_PREFIX.as_bytes()) {
                    self.counts.2 += 1;
                }
                self.writer.push(&kv.key, &kv.value);
                self.report.records += 1;
                if self.writer.is_full() {
                    self.flush().await?;
                    self.publish();
                }
            }
        }
        Ok(())
    }

    /// A link, manifest or trashed manifest names bytes: if no blob record
    /// did (content stored before blob records existed), they are copied
    /// and recorded here.
    async fn referenced_bytes(&mut self, key: &[u8]) -> Result<(), BackupError> {
        let digest = if key.starts_with(keys::LINK_PREFIX.as_bytes()) {
            keys::link_digest(key)
        } else if key.starts_with(keys::MANIFEST_PREFIX.as_bytes()) {
            keys::manifest_key_digest(key)
        } else {
            keys::trash_manifest_digest(key)
        };
        let Some(digest) = digest else { return Ok(()) };
        if self.held.contains(&short(&digest)) || self.missing.contains(&digest) {
            return Ok(());
        }
        let from = self.registry.blob_store().clone();
        match copy_blob(
            from.as_ref(),
            self.target.blobs.as_ref(),
            &digest,
            self.max_blob(),
        )
        .await?
        {
            Outcome::Present(size) => self.hold_blob(&digest, size, false),
            Outcome::Written(size) => self.hold_blob(&digest, size, true),
            Outcome::Missing => {
                tracing::error!(%digest, record = %String::from_utf8_lossy(key), "backup: a referenced blob is missing from storage");
                self.missing.insert(digest);
            }
            Outcome::Corrupt => {
                if !self.report.corrupt.contains(&digest) {
                    self.report.corrupt.push(digest);
                }
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
        if blobs.stat(&digest).await?.is_none() {
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

/// The family a key belongs to if it is one a backup leaves out.
fn skipped_family(key: &[u8]) -> Option<&'static str> {
    std::iter::once("blob/")
        .chain(super::NOT_BACKED_UP.iter().copied())
        .find(|family| key.starts_with(family.as_bytes()))
}
