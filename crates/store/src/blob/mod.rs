//! The blob store: content-addressed bytes, written through a hasher and made
//! visible only when complete, durable and matching their digest.

pub mod fs;
pub mod pace;
pub mod s3;

use std::io;
use std::pin::Pin;

use async_trait::async_trait;
use berth_oci::{ByteRange, Digest};
use bytes::Bytes;
use futures_util::Stream;

use crate::StoreError;

/// A stream of body bytes, from a client or to one.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, io::Error>> + Send>>;

/// An open blob: its total size and the requested bytes as a stream.
pub struct BlobRead {
    pub size: u64,
    pub stream: ByteStream,
}

/// One stored chunk of an upload. Recorded in the upload session, which is
/// the truth about which parts form the upload.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UploadPart {
    /// Engine-chosen, unique within the upload.
    pub name: String,
    pub size: u64,
    /// SHA-256 of this part alone: a blob uploaded in one part is verified
    /// by it without being read again.
    pub sha256: Digest,
}

/// A blob found in the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredBlob {
    pub digest: Digest,
    pub size: u64,
    /// Milliseconds since the epoch of its last write: garbage collection
    /// leaves bytes younger than its grace period alone (their push may
    /// not have committed yet).
    pub modified_ms: u64,
}

/// Upload data found in the store.
#[derive(Clone, Debug)]
pub struct StoredUpload {
    pub id: String,
    /// Milliseconds since the epoch of the newest part.
    pub modified_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum PutError {
    #[error("content digest {computed} does not match {expected}")]
    DigestMismatch { expected: Digest, computed: Digest },
    #[error("content exceeds the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("upload part {0} is missing")]
    PartMissing(String),
    #[error("chunk was announced as {expected} bytes but {received} arrived")]
    LengthMismatch { expected: u64, received: u64 },
    #[error("reading the request body failed: {0}")]
    Body(io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Maps a failure of reading back an upload's parts during a commit: a
/// missing part is named as such (the upload cannot complete), any other
/// read failure is the store's.
pub(crate) fn part_read_failure(
    e: PutError,
    store_error: impl FnOnce(io::Error) -> StoreError,
) -> PutError {
    match e {
        PutError::Body(e) if e.kind() == io::ErrorKind::NotFound => {
            PutError::PartMissing(e.to_string())
        }
        PutError::Body(e) => PutError::Store(store_error(e)),
        other => other,
    }
}

/// What re-reading a stored blob whole and hashing it found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rehash {
    /// It hashes to its digest; this many bytes.
    Good(u64),
    /// It does not (or the store refused it as not matching), after this
    /// many bytes.
    Corrupt(u64),
    /// Not stored (or removed while it was read).
    Gone,
}

/// Reads `digest` whole from `store` and hashes it with its digest's own
/// algorithm (scrub, backup verification). A read failure other than the
/// store's own refusal says nothing about the bytes (a network error to
/// S3): it is returned as an error rather than called corruption.
pub async fn rehash(store: &dyn BlobStore, digest: &Digest) -> Result<Rehash, StoreError> {
    use futures_util::StreamExt as _;
    let Some(read) = store.read(digest, None).await? else {
        return Ok(Rehash::Gone);
    };
    let mut hasher = digest.algorithm().hasher();
    let mut stream = read.stream;
    let mut bytes = 0u64;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) => {
                bytes += chunk.len() as u64;
                hasher.update(&chunk);
            }
            Err(e) => {
                if store.stat(digest).await?.is_none() {
                    return Ok(Rehash::Gone);
                }
                if e.kind() == io::ErrorKind::InvalidData {
                    store.distrust(digest);
                    return Ok(Rehash::Corrupt(bytes));
                }
                return Err(StoreError::Unavailable(format!("reading {digest}: {e}")));
            }
        }
    }
    Ok(if hasher.finish() == *digest && bytes == read.size {
        Rehash::Good(bytes)
    } else {
        store.distrust(digest);
        Rehash::Corrupt(bytes)
    })
}

#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// Size of the stored blob, if present.
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, StoreError>;

    /// Opens a blob for reading, whole or a range. A whole read is verified
    /// against the digest while it streams (when the engine is configured to):
    /// the last chunk is withheld and the stream fails if the bytes do not
    /// match, so a client never receives a complete corrupt blob.
    async fn read(
        &self,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<Option<BlobRead>, StoreError>;

    /// Reads a small blob (a manifest) into memory, verified. `None` if absent;
    /// an error if it is larger than `max` or does not match its digest.
    async fn read_small(&self, digest: &Digest, max: u64) -> Result<Option<Bytes>, StoreError>;

    /// Streams `body` into the store, committing it under `expected` only if
    /// the bytes hash to it. Returns the size.
    async fn put(&self, expected: &Digest, body: ByteStream, max: u64) -> Result<u64, PutError>;

    async fn delete(&self, digest: &Digest) -> Result<(), StoreError>;

    /// Every stored blob, in digest order (for garbage collection and
    /// audits).
    async fn list(&self) -> Result<Vec<StoredBlob>, StoreError>;

    /// Stores one chunk of upload `upload` as a new part, hashing it on the
    /// way. The part is durable when this returns, under a name no other
    /// call will choose; a failed chunk leaves nothing visible. It must be
    /// exactly `expected_len` bytes when that is given, and at most `max`.
    ///
    /// Parts are not ordered or counted here: which parts make up an upload,
    /// and in what order, is decided by the caller (the upload session in the
    /// MetaStore, updated by compare-and-swap). So chunks of one upload may be
    /// written by different nodes, and a part that lost a race is deleted.
    async fn write_part(
        &self,
        upload: &str,
        expected_len: Option<u64>,
        body: ByteStream,
        max: u64,
    ) -> Result<UploadPart, PutError>;

    /// Verifies the concatenation of `parts` against `expected` and installs
    /// it as that blob. Returns the size. A single part whose own digest is
    /// `expected` is installed without reading it again. The parts stay until
    /// `delete_upload`.
    async fn commit_parts(
        &self,
        upload: &str,
        parts: &[UploadPart],
        expected: &Digest,
    ) -> Result<u64, PutError>;

    /// Deletes one part (one that lost a race to be recorded).
    async fn delete_part(&self, upload: &str, part: &UploadPart) -> Result<(), StoreError>;

    /// Deletes every part of an upload.
    async fn delete_upload(&self, upload: &str) -> Result<(), StoreError>;

    /// Every upload with stored parts, and when it was last written (for
    /// removing data whose session is gone).
    async fn list_uploads(&self) -> Result<Vec<StoredUpload>, StoreError>;

    /// Forgets that `digest` was verified by an earlier whole read, so the
    /// next read checks it again (a scrub found it corrupt: from now on it
    /// must be refused, not served as proven).
    fn distrust(&self, _digest: &Digest) {}

    /// Where a client may fetch the blob directly (a pre-signed URL), when
    /// the engine is configured to redirect reads.
    async fn redirect_url(&self, _digest: &Digest) -> Result<Option<String>, StoreError> {
        Ok(None)
    }

    async fn check_health(&self) -> Result<(), StoreError>;
}
