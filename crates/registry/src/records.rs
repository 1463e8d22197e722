//! Metadata records, stored as JSON so that an operator can read them.

use berth_oci::Digest;
use berth_store::UploadPart;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::RegistryError;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RepoRecord {
    pub created_ms: u64,
}

/// When and where a replicated write happened: a hybrid logical clock
/// reading and the region that made it. Writes to one tag or manifest are
/// ordered by stamp (last writer wins), the same way in every region.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Stamp {
    pub hlc: u64,
    pub origin: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TagRecord {
    pub digest: Digest,
    pub updated_ms: u64,
    /// Absent on records from before replication: older than any stamp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stamp: Option<Stamp>,
}

/// One value a tag had, kept after it moved (tag history).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TagHistoryEntry {
    pub digest: Digest,
    pub stamp: Stamp,
    /// Who pushed it (`user:alice`, `token:ci`), when authentication knew.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

/// A change this region made, as its change feed serves it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeEvent {
    pub seq: u64,
    pub stamp: Stamp,
    /// Wall-clock time of the write, for lag figures.
    pub ms: u64,
    #[serde(flatten)]
    pub change: Change,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    /// A manifest pushed by digest.
    Manifest {
        repository: String,
        digest: Digest,
    },
    /// A manifest pushed by tag: the manifest and the tag.
    Tag {
        repository: String,
        tag: String,
        digest: Digest,
        /// Who pushed it, for tag history in every region.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
    },
    Untag {
        repository: String,
        tag: String,
    },
    /// A manifest deleted, with the tags that pointed at it.
    DeleteManifest {
        repository: String,
        digest: Digest,
        tags: Vec<String>,
    },
}

impl Change {
    pub fn repository(&self) -> &str {
        match self {
            Change::Manifest { repository, .. }
            | Change::Tag { repository, .. }
            | Change::Untag { repository, .. }
            | Change::DeleteManifest { repository, .. } => repository,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LogHead {
    pub seq: u64,
    /// Made when the log is: a log rebuilt from scratch (a restored or new
    /// store) has another, so peers know to start over.
    #[serde(default)]
    pub epoch: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ManifestRecord {
    pub media_type: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Digest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// Children of an index with their platforms, for content negotiation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<PlatformChild>,
    /// Every digest the manifest references (blobs and child manifests).
    #[serde(default)]
    pub references: Vec<Digest>,
    pub created_ms: u64,
    /// The write that put it here, for ordering against replicated deletes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stamp: Option<Stamp>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PlatformChild {
    pub digest: Digest,
    pub os: String,
    pub architecture: String,
}

/// A manifest a client deleted, kept for the trash's retention so that
/// `berth undelete` can bring it back (with the tags the delete removed).
/// While it is there, garbage collection keeps the manifest's bytes and
/// the links of everything it references.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrashedManifest {
    pub record: ManifestRecord,
    pub tags: Vec<String>,
    pub deleted_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

/// A tag a client deleted (by tag), and the digest it pointed at.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrashedTag {
    pub digest: Digest,
    pub deleted_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

/// A blob's visibility in one repository.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LinkRecord {
    pub size: u64,
    /// When the link was made or last confirmed (a push, a mount, or a
    /// `HEAD` from a client about to reuse it). Garbage collection takes
    /// only links that no manifest references and that are older than its
    /// grace period. 0 on links from before this field: their age is
    /// unknown, and the collector dates them when it first sees them.
    #[serde(default)]
    pub linked_ms: u64,
    /// Set while the collector decides whether to remove the link: a push
    /// whose manifest references it clears it, which makes the removal
    /// fail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removing_since_ms: Option<u64>,
}

impl LinkRecord {
    pub fn new(size: u64, now_ms: u64) -> Self {
        Self {
            size,
            linked_ms: now_ms,
            removing_since_ms: None,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BlobRecord {
    pub size: u64,
    /// Set while the blob's bytes are being removed (see
    /// `Registry::remove_unreferenced_blobs`): it must not be linked then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removing_since_ms: Option<u64>,
}

impl BlobRecord {
    pub fn new(size: u64) -> Self {
        Self {
            size,
            removing_since_ms: None,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UploadRecord {
    pub repository: String,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// Bytes received so far: the sum of `parts`.
    #[serde(default)]
    pub size: u64,
    /// The chunks received, in order. A chunk becomes part of the upload
    /// only when a compare-and-swap on this record adds it, which is what
    /// decides races between chunks sent to different nodes.
    #[serde(default)]
    pub parts: Vec<UploadPart>,
    /// Set when the upload completed as this blob. The record stays a few
    /// minutes so that a retried completing PUT (whose response was lost)
    /// succeeds again; for everything else the session is gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed: Option<Digest>,
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing these plain structs cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

pub fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, RegistryError> {
    serde_json::from_slice(bytes)
        .map_err(|e| RegistryError::CorruptRecord(format!("{}: {e}", String::from_utf8_lossy(key))))
}
