use berth_oci::{Digest, ErrorCode};
use berth_store::{PutError, StoreError};

/// A failed registry operation, with what the client needs to know.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("blob unknown to registry: {0}")]
    BlobUnknown(Digest),
    #[error("blob upload unknown to registry")]
    BlobUploadUnknown,
    #[error("blob upload invalid: {0}")]
    BlobUploadInvalid(String),
    #[error("{0}")]
    DigestInvalid(String),
    #[error("manifest references unknown {0}")]
    ManifestBlobUnknown(Digest),
    #[error("manifest invalid: {0}")]
    ManifestInvalid(String),
    #[error("manifest unknown to registry")]
    ManifestUnknown,
    #[error("repository name not known to registry")]
    NameUnknown,
    #[error("{0}")]
    SizeInvalid(String),
    #[error("content larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    /// A chunk did not start where the upload ends; the client should resume
    /// from `size`.
    #[error("requested range not satisfiable for a blob of {size} bytes")]
    RangeNotSatisfiable { size: u64 },
    #[error("chunk must start at offset {size}")]
    RangeMismatch { size: u64 },
    #[error("storage failure: {0}")]
    Store(#[from] StoreError),
    #[error("corrupt metadata record: {0}")]
    CorruptRecord(String),
    /// An `[[immutable]]` rule covers the tag: once pushed, it is neither
    /// moved nor deleted.
    #[error(
        "tag {tag} of {repository} is immutable: it already points at {digest} and cannot be moved or deleted"
    )]
    TagImmutable {
        repository: String,
        tag: String,
        digest: Digest,
    },
    /// What a retention rule planned to delete changed meanwhile (it is
    /// left alone).
    #[error("changed since it was planned: {0}")]
    Changed(String),
}

impl RegistryError {
    /// The spec's error code. Storage failures have none: they are the
    /// registry's fault and become 5xx.
    pub fn code(&self) -> Option<ErrorCode> {
        Some(match self {
            RegistryError::BlobUnknown(_) => ErrorCode::BlobUnknown,
            RegistryError::BlobUploadUnknown => ErrorCode::BlobUploadUnknown,
            RegistryError::BlobUploadInvalid(_) => ErrorCode::BlobUploadInvalid,
            RegistryError::DigestInvalid(_) => ErrorCode::DigestInvalid,
            RegistryError::ManifestBlobUnknown(_) => ErrorCode::ManifestBlobUnknown,
            RegistryError::ManifestInvalid(_) => ErrorCode::ManifestInvalid,
            RegistryError::ManifestUnknown => ErrorCode::ManifestUnknown,
            RegistryError::NameUnknown => ErrorCode::NameUnknown,
            RegistryError::SizeInvalid(_) | RegistryError::TooLarge { .. } => {
                ErrorCode::SizeInvalid
            }
            RegistryError::RangeMismatch { .. } => ErrorCode::BlobUploadInvalid,
            RegistryError::RangeNotSatisfiable { .. } => ErrorCode::RangeInvalid,
            RegistryError::TagImmutable { .. } => ErrorCode::Denied,
            RegistryError::Changed(_) => ErrorCode::ManifestUnknown,
            RegistryError::Store(_) | RegistryError::CorruptRecord(_) => return None,
        })
    }

    pub(crate) fn from_put(e: PutError) -> Self {
        match e {
            PutError::DigestMismatch { expected, computed } => RegistryError::DigestInvalid(
                format!("provided digest {expected} does not match content digest {computed}"),
            ),
            PutError::TooLarge { limit } => RegistryError::TooLarge { limit },
            // A part named by the session is gone: the upload cannot complete.
            PutError::PartMissing(part) => {
                RegistryError::BlobUploadInvalid(format!("upload data {part} is missing"))
            }
            PutError::LengthMismatch { expected, received } => RegistryError::SizeInvalid(format!(
                "chunk was announced as {expected} bytes but {received} arrived"
            )),
            PutError::Body(e) => {
                RegistryError::BlobUploadInvalid(format!("request body failed: {e}"))
            }
            PutError::Store(e) => RegistryError::Store(e),
        }
    }
}
