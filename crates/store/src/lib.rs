//! Storage engines for Berth, behind two traits.
//!
//! * [`BlobStore`]: content-addressed bytes. Writes stream through a hasher
//!   and become visible only when the digest matches and the bytes are durable.
//! * [`MetaStore`]: a small ordered key-value store with atomic multi-key
//!   transactions guarded by compare-and-swap, the shape of etcd's `Txn`.
//!
//! Each engine is one module; [`testsuite`] holds the behaviour every engine
//! must pass, so a new backend is correct the day it passes the suite.

pub mod blob;
pub mod documents;
pub mod meta;
pub mod testsuite;

pub use blob::{
    BlobRead, BlobStore, ByteStream, PutError, Rehash, StoredBlob, StoredUpload, UploadPart,
    fs::FsBlobStore,
    rehash,
    s3::{S3BlobStore, S3Options},
};
pub use documents::{DirDocuments, Documents, S3Documents};
pub use meta::{
    Compare, KeyValue, KeyWatch, LeaseId, MetaStore, Op, Snapshot, Txn, etcd::EtcdMetaStore,
    etcd::MemberStatus, redb::RedbMetaStore,
};

/// A failure of the storage engine itself (disk, database), as opposed to a
/// problem with what the client sent.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("metadata database error: {0}")]
    Database(String),
    /// The store cannot be reached or has no quorum; retrying later may work.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("storage task failed: {0}")]
    Task(String),
}

impl From<tokio::task::JoinError> for StoreError {
    fn from(e: tokio::task::JoinError) -> Self {
        StoreError::Task(e.to_string())
    }
}
