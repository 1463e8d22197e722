//! The OCI Distribution and Image specs as types, with no I/O.
//!
//! Everything a client controls (repository names, references, digests,
//! manifests, ranges) is parsed here, so that the layers above only ever see
//! validated values and so that this crate is the one place to fuzz.

pub mod digest;
pub mod error;
pub mod manifest;
pub mod media_type;
pub mod name;
pub mod query;
pub mod range;
pub mod reference;

pub use digest::{Algorithm, Digest, DigestError, Hasher};
pub use error::ErrorCode;
pub use manifest::{Descriptor, Manifest, ManifestError, ManifestKind};
pub use name::{NameError, RepositoryName};
pub use range::{ByteRange, RangeError};
pub use reference::{Reference, Tag, TagError};
