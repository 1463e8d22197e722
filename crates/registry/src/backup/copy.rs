//! Copying one blob between the registry's store and a target's, verified
//! on both sides: the source re-hashes what it reads, the destination
//! refuses bytes that do not hash to the digest.

use std::sync::Arc;

use berth_oci::Digest;
use berth_store::{BlobStore, PutError};
use futures_util::{Stream, StreamExt};

use super::{BackupError, blob_record_digest};
use crate::records::{BlobRecord, decode};

/// Blobs copied at once: each is a stream from one store into another,
/// mostly waiting on I/O.
const PARALLEL: usize = 8;

/// The blobs a chunk's records name, with their recorded sizes.
pub(super) fn chunk_blobs(records: &[super::dump::Record]) -> Vec<(Digest, u64)> {
    records
        .iter()
        .filter_map(|(key, value)| {
            let digest = blob_record_digest(key)?;
            let record: BlobRecord = decode(key, value).ok()?;
            Some((digest, record.size))
        })
        .collect()
}

/// Copies `wanted` from `from` into `to`, several at once: each blob's
/// digest, size and outcome, in the order they finish.
pub(super) fn copy_many(
    from: Arc<dyn BlobStore>,
    to: Arc<dyn BlobStore>,
    wanted: Vec<(Digest, u64)>,
) -> impl Stream<Item = (Digest, u64, Result<Outcome, BackupError>)> {
    futures_util::stream::iter(wanted.into_iter().map(move |(digest, size)| {
        let (from, to) = (from.clone(), to.clone());
        async move {
            let outcome = copy_blob(from.as_ref(), to.as_ref(), &digest, size).await;
            (digest, size, outcome)
        }
    }))
    .buffer_unordered(PARALLEL)
}

/// How one blob reached the destination.
pub(super) enum Outcome {
    /// It was already there (verified when it was written).
    Present,
    Written,
    /// The source does not have it.
    Missing,
    /// The source's bytes do not match the digest (or the record's size).
    Corrupt,
}

/// Copies `digest`, of `size` bytes, from `from` into `to` unless `to`
/// has it with that size. A copy of another size in `to` (damaged there)
/// is replaced.
pub(super) async fn copy_blob(
    from: &dyn BlobStore,
    to: &dyn BlobStore,
    digest: &Digest,
    size: u64,
) -> Result<Outcome, BackupError> {
    match to.stat(digest).await? {
        Some(stored) if stored == size => return Ok(Outcome::Present),
        Some(stored) => {
            // Content-addressed: a copy that hashes right is right, and it
            // is the record that is wrong; others may rely on the copy.
            if intact(to, digest).await? {
                tracing::error!(%digest, stored, recorded = size, "a blob's record names another size than its verified bytes");
                return Ok(Outcome::Corrupt);
            }
            tracing::warn!(%digest, stored, size, "the destination holds a damaged copy; replacing it");
            to.delete(digest).await?;
        }
        None => {}
    }
    let Some(read) = from.read(digest, None).await? else {
        return Ok(Outcome::Missing);
    };
    if read.size != size {
        return Ok(Outcome::Corrupt);
    }
    // The record's size bounds the copy, whatever the registry's current
    // limit on pushes.
    match to.put(digest, read.stream, size).await {
        Ok(_) => Ok(Outcome::Written),
        Err(PutError::DigestMismatch { .. } | PutError::TooLarge { .. }) => Ok(Outcome::Corrupt),
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

/// Whether `digest` in `store` reads back whole and hashes to itself.
async fn intact(store: &dyn BlobStore, digest: &Digest) -> Result<bool, BackupError> {
    Ok(matches!(
        berth_store::rehash(store, digest).await?,
        berth_store::Rehash::Good(_)
    ))
}
