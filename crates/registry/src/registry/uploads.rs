//! Upload sessions: parts stored in the blob store, the session in the
//! MetaStore, so that a chunked upload may hop between nodes.

use berth_oci::{ByteRange, Digest, RepositoryName};
use berth_store::{ByteStream, KeyValue, PutError, Txn, UploadPart};

use super::{Registry, Result, TXN_ATTEMPTS, now_ms};
use crate::RegistryError;
use crate::keys;
use crate::records::{LinkRecord, UploadRecord, decode, encode};

pub struct UploadStatus {
    pub size: u64,
}

/// Most chunks one upload may have. Each is a part in the session record
/// (about 150 bytes) and each chunk rewrites the record, so the record must
/// stay well inside etcd's request limit and its history small.
pub const MAX_UPLOAD_PARTS: usize = 1024;

/// How long the record of a completed upload answers a retried PUT.
const COMPLETED_KEEP_MS: u64 = 10 * 60 * 1000;

/// Upload records read per scan: at most 1024 parts each, so a batch stays
/// under etcd's 4 MiB response limit.
const UPLOAD_SCAN_BATCH: usize = 16;

/// Age after which upload data without a session is removed while other
/// nodes may be creating sessions.
pub const ORPHAN_GRACE_MS: u64 = 15 * 60 * 1000;
impl Registry {
    pub async fn start_upload(&self, name: &RepositoryName) -> Result<String> {
        let id = uuid::Uuid::new_v4().to_string();
        let now = now_ms();
        let record = UploadRecord {
            repository: name.to_string(),
            created_ms: now,
            updated_ms: now,
            size: 0,
            parts: Vec::new(),
            completed: None,
        };
        let created = self
            .meta
            .commit(
                Txn::new()
                    .require_absent(keys::upload(&id))
                    .put(keys::upload(&id), encode(&record)),
            )
            .await?;
        if !created {
            return Err(RegistryError::BlobUploadInvalid(
                "upload id collision".into(),
            ));
        }
        Ok(id)
    }

    /// The session of an upload in progress.
    async fn upload_session(
        &self,
        name: &RepositoryName,
        id: &str,
    ) -> Result<(KeyValue, UploadRecord)> {
        match self.upload_record(name, id).await? {
            (_, record) if record.completed.is_some() => Err(RegistryError::BlobUploadUnknown),
            found => Ok(found),
        }
    }

    /// The session record, in progress or recently completed.
    async fn upload_record(
        &self,
        name: &RepositoryName,
        id: &str,
    ) -> Result<(KeyValue, UploadRecord)> {
        if uuid::Uuid::parse_str(id).is_err() {
            return Err(RegistryError::BlobUploadUnknown);
        }
        let kv = self
            .meta
            .get(keys::upload(id).as_bytes())
            .await?
            .ok_or(RegistryError::BlobUploadUnknown)?;
        let record: UploadRecord = decode(&kv.key, &kv.value)?;
        if record.repository != name.as_str() {
            return Err(RegistryError::BlobUploadUnknown);
        }
        Ok((kv, record))
    }

    pub async fn upload_status(&self, name: &RepositoryName, id: &str) -> Result<UploadStatus> {
        let (_, record) = self.upload_session(name, id).await?;
        Ok(UploadStatus { size: record.size })
    }

    /// Appends a chunk. `range` is the client's `Content-Range`, if sent: it
    /// must start at the current size (else `RangeMismatch`), and its length
    /// must agree with `content_length` when both are given. A chunk that is
    /// not as long as announced is discarded (`SIZE_INVALID`).
    ///
    /// The chunk is stored as a new part first, then added to the session by
    /// compare-and-swap; of two chunks racing for one offset (from clients
    /// on different nodes) exactly one is recorded and the other's part is
    /// deleted.
    pub async fn append_upload(
        &self,
        name: &RepositoryName,
        id: &str,
        range: Option<ByteRange>,
        content_length: Option<u64>,
        body: ByteStream,
    ) -> Result<UploadStatus> {
        let (kv, record) = self.upload_session(name, id).await?;
        let current = record.size;
        let expected_len = match range {
            Some(r) => {
                if r.start != current {
                    return Err(RegistryError::RangeMismatch { size: current });
                }
                if let Some(len) = content_length
                    && len != r.len()
                {
                    return Err(RegistryError::SizeInvalid(format!(
                        "Content-Range covers {} bytes but Content-Length is {len}",
                        r.len()
                    )));
                }
                Some(r.len())
            }
            None => content_length,
        };
        if record.parts.len() >= MAX_UPLOAD_PARTS {
            return Err(RegistryError::BlobUploadInvalid(format!(
                "an upload may have at most {MAX_UPLOAD_PARTS} chunks"
            )));
        }
        // Mark the session active before a possibly long transfer, so that
        // expiry never removes a session while it is receiving.
        self.touch_upload(&kv, &record).await?;
        let limit = self.limits.max_blob_bytes;
        let part = self
            .blobs
            .write_part(id, expected_len, body, limit.saturating_sub(current))
            .await
            .map_err(|e| match e {
                PutError::TooLarge { .. } => RegistryError::TooLarge { limit },
                e => RegistryError::from_put(e),
            })?;
        if part.size == 0 {
            self.blobs.delete_part(id, &part).await?;
            return Ok(UploadStatus { size: current });
        }
        match self.record_part(id, current, &part).await {
            Ok(size) => Ok(UploadStatus { size }),
            Err(e) => {
                // Rejected for sure: the part is nobody's. (After a storage
                // error the commit may have applied, so the part stays; it
                // goes with the upload.)
                if !matches!(e, RegistryError::Store(_)) {
                    self.blobs.delete_part(id, &part).await?;
                }
                Err(e)
            }
        }
    }

    /// Adds a written part to the session if the session still ends at
    /// `offset`. Returns the new size.
    async fn record_part(&self, id: &str, offset: u64, part: &UploadPart) -> Result<u64> {
        let key = keys::upload(id);
        for _ in 0..TXN_ATTEMPTS {
            let kv = self
                .meta
                .get(key.as_bytes())
                .await?
                .ok_or(RegistryError::BlobUploadUnknown)?;
            let mut record: UploadRecord = decode(&kv.key, &kv.value)?;
            if record.completed.is_some() {
                return Err(RegistryError::BlobUploadUnknown);
            }
            if record.size != offset {
                return Err(RegistryError::RangeMismatch { size: record.size });
            }
            record.size += part.size;
            record.parts.push(part.clone());
            record.updated_ms = now_ms();
            let recorded = self
                .meta
                .commit(
                    Txn::new()
                        .require_version(key.clone(), kv.version)
                        .put(key.clone(), encode(&record)),
                )
                .await?;
            if recorded {
                return Ok(record.size);
            }
        }
        Err(RegistryError::Store(berth_store::StoreError::Database(
            "upload session kept changing".into(),
        )))
    }

    /// Refreshes the session's activity time, at most every minute (each
    /// refresh is a durable write) and at least four times per TTL.
    async fn touch_upload(&self, kv: &KeyValue, record: &UploadRecord) -> Result<()> {
        let now = now_ms();
        let interval = (self.limits.upload_ttl_ms / 4).min(60_000);
        if now.saturating_sub(record.updated_ms) < interval {
            return Ok(());
        }
        let mut record = record.clone();
        record.updated_ms = now;
        let touched = self
            .meta
            .commit(
                Txn::new()
                    .require_version(kv.key.clone(), kv.version)
                    .put(kv.key.clone(), encode(&record)),
            )
            .await?;
        // Losing the race to a concurrent chunk is fine (it touched the
        // session too); losing it to expiry or a cancel ends the upload.
        if !touched && self.meta.get(&kv.key).await?.is_none() {
            return Err(RegistryError::BlobUploadUnknown);
        }
        Ok(())
    }

    /// Completes an upload: appends the final chunk (if any), verifies the
    /// digest and makes the blob visible. The session ends when the blob is
    /// committed or the content is proven wrong; after a storage failure it
    /// stays, so the client may retry.
    pub async fn complete_upload(
        &self,
        name: &RepositoryName,
        id: &str,
        digest: &Digest,
        final_chunk: Option<(Option<ByteRange>, Option<u64>, ByteStream)>,
    ) -> Result<u64> {
        if let Some((range, len, body)) = final_chunk {
            match self.append_upload(name, id, range, len, body).await {
                Err(RegistryError::BlobUploadUnknown) => {
                    return self.already_completed(name, id, digest).await;
                }
                other => {
                    other?;
                }
            }
        }
        let (kv, record) = self.upload_record(name, id).await?;
        if record.completed.is_some() {
            return self.already_completed(name, id, digest).await;
        }
        let size = match self.blobs.commit_parts(id, &record.parts, digest).await {
            Ok(size) => size,
            Err(e @ (PutError::DigestMismatch { .. } | PutError::PartMissing(_))) => {
                if let Ok(size) = self.already_completed(name, id, digest).await {
                    // A concurrent attempt of this same PUT (a client retry
                    // on another node) completed it and removed the parts.
                    return Ok(size);
                }
                // The content is proven wrong or gone: so is the session. The
                // version guard keeps a session that changed meanwhile (or
                // that a stale read showed incomplete) from being destroyed.
                let ended = self
                    .meta
                    .commit(
                        Txn::new()
                            .require_version(kv.key.clone(), kv.version)
                            .delete(kv.key.clone()),
                    )
                    .await?;
                if !ended {
                    return Err(RegistryError::Store(berth_store::StoreError::Unavailable(
                        "the upload changed while it was being completed; retry".into(),
                    )));
                }
                self.discard_upload_data(id).await;
                return Err(RegistryError::from_put(e));
            }
            Err(e) => return Err(RegistryError::from_put(e)),
        };
        let completed = UploadRecord {
            updated_ms: now_ms(),
            size,
            parts: Vec::new(),
            completed: Some(digest.clone()),
            ..record
        };
        for _ in 0..TXN_ATTEMPTS {
            let seen = self.blob_record_for_link(digest, size).await?;
            let txn = Txn::new().put(kv.key.clone(), encode(&completed)).put(
                keys::link(name, digest),
                encode(&LinkRecord::new(size, now_ms())),
            );
            let txn = self.guard_blob_record(txn, digest, size, seen.as_ref())?;
            let txn = self.ensure_repo(name, txn).await?;
            if self.meta.commit(txn).await? {
                self.discard_upload_data(id).await;
                return Ok(size);
            }
        }
        Err(RegistryError::Store(berth_store::StoreError::Unavailable(
            "the blob kept changing while the upload completed; retry".into(),
        )))
    }

    /// The answer to a completion of an upload that already completed: the
    /// same success if it completed as this digest and the blob is still in
    /// the repository, else the session is unknown.
    async fn already_completed(
        &self,
        name: &RepositoryName,
        id: &str,
        digest: &Digest,
    ) -> Result<u64> {
        let (_, record) = self.upload_record(name, id).await?;
        if record.completed.as_ref() != Some(digest) {
            return Err(RegistryError::BlobUploadUnknown);
        }
        match self.link(name, digest).await? {
            Some(link) => Ok(link.size),
            None => Err(RegistryError::BlobUploadUnknown),
        }
    }

    /// Deletes an ended upload's parts. A failure only leaves data that the
    /// expiry job removes later, so it is logged, not returned.
    async fn discard_upload_data(&self, id: &str) {
        if let Err(e) = self.blobs.delete_upload(id).await {
            tracing::warn!(upload = %id, error = %e, "could not delete the data of an ended upload");
        }
    }

    pub async fn cancel_upload(&self, name: &RepositoryName, id: &str) -> Result<()> {
        let (kv, _) = self.upload_session(name, id).await?;
        // Unguarded: a chunk recorded meanwhile is cancelled with the rest.
        self.meta.commit(Txn::new().delete(kv.key.clone())).await?;
        self.discard_upload_data(id).await;
        Ok(())
    }

    /// Expires upload sessions idle for longer than `ttl_ms`, and removes
    /// upload data that no session refers to (left by a crash) once it is
    /// older than `orphan_grace_ms`. Returns how many sessions were expired.
    ///
    /// The grace period protects a session created after the scan of
    /// sessions, whose first part is already stored; only a process that is
    /// alone with its stores (an embedded node at startup) may pass zero.
    pub async fn expire_uploads(&self, ttl_ms: u64, orphan_grace_ms: u64) -> Result<usize> {
        let now = now_ms();
        let mut expired = 0;
        let mut after: Option<Vec<u8>> = None;
        let mut live = std::collections::HashSet::new();
        loop {
            let batch = self
                .meta
                .scan(
                    keys::UPLOAD_PREFIX.as_bytes(),
                    after.as_deref(),
                    UPLOAD_SCAN_BATCH,
                )
                .await?;
            let Some(last) = batch.last() else { break };
            after = Some(last.key.clone());
            for kv in batch {
                let id = String::from_utf8_lossy(&kv.key[keys::UPLOAD_PREFIX.len()..]).into_owned();
                let (repository, updated_ms, completed) =
                    match decode::<UploadRecord>(&kv.key, &kv.value) {
                        Ok(r) => (r.repository, r.updated_ms, r.completed.is_some()),
                        Err(e) => {
                            tracing::warn!(error = %e, "dropping unreadable upload record");
                            (String::new(), 0, false)
                        }
                    };
                let keep_ms = if completed { COMPLETED_KEEP_MS } else { ttl_ms };
                if now.saturating_sub(updated_ms) > keep_ms {
                    let removed = self
                        .meta
                        .commit(
                            Txn::new()
                                .require_version(kv.key.clone(), kv.version)
                                .delete(kv.key.clone()),
                        )
                        .await?;
                    if !removed {
                        // A chunk refreshed it meanwhile: it lives.
                        live.insert(id);
                    } else if !completed {
                        self.discard_upload_data(&id).await;
                        expired += 1;
                        tracing::info!(upload = %id, %repository, "expired idle upload session");
                    }
                } else {
                    live.insert(id);
                }
            }
        }
        for upload in self.blobs.list_uploads().await? {
            if live.contains(&upload.id) || now.saturating_sub(upload.modified_ms) < orphan_grace_ms
            {
                continue;
            }
            // The scan may have been served by a lagging etcd member; a
            // compare-only transaction goes through the quorum and proves
            // the session really is gone before its data is.
            let session = keys::upload(&upload.id);
            if !self.meta.commit(Txn::new().require_absent(session)).await? {
                continue;
            }
            tracing::info!(upload = %upload.id, "removing upload data without a session");
            self.discard_upload_data(&upload.id).await;
        }
        Ok(expired)
    }

    pub async fn open_uploads(&self) -> Result<usize> {
        let mut count = 0;
        let mut after: Option<Vec<u8>> = None;
        loop {
            let batch = self
                .meta
                .scan(
                    keys::UPLOAD_PREFIX.as_bytes(),
                    after.as_deref(),
                    UPLOAD_SCAN_BATCH,
                )
                .await?;
            let Some(last) = batch.last() else {
                return Ok(count);
            };
            after = Some(last.key.clone());
            count += batch
                .iter()
                .filter(|kv| {
                    decode::<UploadRecord>(&kv.key, &kv.value).is_ok_and(|r| r.completed.is_none())
                })
                .count();
        }
    }
}
