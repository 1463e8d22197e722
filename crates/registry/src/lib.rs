//! The registry's domain on top of the storage traits, with no HTTP.
//!
//! The metadata commit is the point of truth: bytes are written, synced and
//! verified in the blob store first, and only then does one metadata
//! transaction make them visible (link a blob to a repository, record a
//! manifest, move a tag). A crash before the commit leaves unreferenced bytes,
//! never a visible partial blob.

pub mod backup;
mod error;
mod keys;
mod records;
mod registry;

pub use error::RegistryError;
pub use records::{
    Change, ChangeEvent, ManifestRecord, Stamp, TagHistoryEntry, TagRecord, UploadRecord,
};
pub use registry::{
    Applied, BlobSource, ChangePage, CompactionOptions, CompactionReport, GcOptions, GcProgress,
    GcReport, Hlc, ImmutableTags, Limits, MAX_UPLOAD_PARTS, ManifestContent, MetadataUsage,
    NameMatcher, ORPHAN_GRACE_MS, Page, PlannedManifest, PlannedTag, PutManifestOutcome,
    RecordKind, Registry, Removed, RepairOutcome, Repaired, RetentionPlan, RetentionReport,
    RetentionRule, ScrubProgress, ScrubReport, StateSummary, TrashEntry, Undeleted, UploadStatus,
    Usage, now_ms, stamp_ms,
};
pub use registry::{MAX_SORTED_TAGS, RepositorySummary, SearchBatch, TagEntry, TagListing};
