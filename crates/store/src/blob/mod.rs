//! The blob store: content-addressed bytes, written through a hasher and made
//! visible only when complete, durable and matching their digest.

pub mod fs;

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

#[derive(Debug, thiserror::Error)]
pub enum PutError {
    #[error("content digest {computed} does not match {expected}")]
    DigestMismatch { expected: Digest, computed: Digest },
    #[error("content exceeds the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("upload is at offset {current}, a chunk must start there (got {requested})")]
    OffsetMismatch { current: u64, requested: u64 },
    #[error("upload unknown")]
    UploadUnknown,
    #[error("chunk was announced as {expected} bytes but {received} arrived")]
    LengthMismatch { expected: u64, received: u64 },
    #[error("reading the request body failed: {0}")]
    Body(io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
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

    /// Every stored blob (for garbage collection and audits).
    async fn list(&self) -> Result<Vec<Digest>, StoreError>;

    /// Starts an empty upload area for session `id`.
    async fn create_upload(&self, id: &str) -> Result<(), StoreError>;

    /// Bytes received so far by an upload, `None` if it does not exist.
    async fn upload_size(&self, id: &str) -> Result<Option<u64>, StoreError>;

    /// Appends a chunk that must start at `offset` (the current size) and, when
    /// `expected_len` is given, be exactly that long. The chunk is durable when
    /// this returns; a failed chunk leaves no trace. Appends and the commit of
    /// one upload are serialized. Returns the new size.
    async fn append_upload(
        &self,
        id: &str,
        offset: u64,
        expected_len: Option<u64>,
        body: ByteStream,
        max_total: u64,
    ) -> Result<u64, PutError>;

    /// Verifies the upload against `expected` and moves it into the store.
    /// On a mismatch the upload's data is discarded. Returns the size.
    async fn commit_upload(&self, id: &str, expected: &Digest) -> Result<u64, PutError>;

    async fn delete_upload(&self, id: &str) -> Result<(), StoreError>;

    /// Ids of every upload area (to reconcile with upload sessions).
    async fn list_uploads(&self) -> Result<Vec<String>, StoreError>;

    async fn check_health(&self) -> Result<(), StoreError>;
}
