//! Metadata key layout. Repository names never contain `:` and tags and
//! digests never contain `/` after the separator, so `<repo>:` prefixes never
//! match another repository (`a:` is not a prefix of `a/b:`).

use berth_oci::{Digest, RepositoryName};

pub const REPO_PREFIX: &str = "repo/";
pub const UPLOAD_PREFIX: &str = "upload/";
pub const LINK_PREFIX: &str = "link/";

pub fn repo(name: &RepositoryName) -> String {
    format!("{REPO_PREFIX}{name}")
}

pub fn tag_prefix(name: &RepositoryName) -> String {
    format!("tag/{name}:")
}

pub fn tag(name: &RepositoryName, tag: &str) -> String {
    format!("tag/{name}:{tag}")
}

pub fn manifest(name: &RepositoryName, digest: &Digest) -> String {
    format!("manifest/{name}:{digest}")
}

pub fn manifest_prefix(name: &RepositoryName) -> String {
    format!("manifest/{name}:")
}

pub fn link(name: &RepositoryName, digest: &Digest) -> String {
    format!("{LINK_PREFIX}{name}:{digest}")
}

/// The digest of a link key (`link/REPO:DIGEST`).
pub fn link_digest(key: &[u8]) -> Option<Digest> {
    let rest = std::str::from_utf8(key).ok()?.strip_prefix(LINK_PREFIX)?;
    rest.split_once(':')?.1.parse().ok()
}

/// The digest of a manifest record's key (`manifest/REPO:DIGEST`).
pub fn manifest_key_digest(key: &[u8]) -> Option<Digest> {
    let rest = std::str::from_utf8(key)
        .ok()?
        .strip_prefix(MANIFEST_PREFIX)?;
    rest.split_once(':')?.1.parse().ok()
}

/// The repository and digest of a link key.
pub fn link_parts(key: &[u8]) -> Option<(&str, Digest)> {
    let rest = std::str::from_utf8(key).ok()?.strip_prefix(LINK_PREFIX)?;
    let (name, digest) = rest.split_once(':')?;
    Some((name, digest.parse().ok()?))
}

/// The repository and digest of a manifest record's key.
pub fn manifest_key_parts(key: &[u8]) -> Option<(&str, Digest)> {
    let rest = std::str::from_utf8(key)
        .ok()?
        .strip_prefix(MANIFEST_PREFIX)?;
    let (name, digest) = rest.split_once(':')?;
    Some((name, digest.parse().ok()?))
}

/// Registry-wide record that a blob's bytes are stored (for mounts without
/// `from` and for garbage collection).
pub fn blob(digest: &Digest) -> String {
    format!("blob/{digest}")
}

pub fn referrer_prefix(name: &RepositoryName, subject: &Digest) -> String {
    format!("referrer/{name}:{subject}:")
}

pub fn referrer(name: &RepositoryName, subject: &Digest, referrer: &Digest) -> String {
    format!("referrer/{name}:{subject}:{referrer}")
}

pub fn upload(id: &str) -> String {
    format!("{UPLOAD_PREFIX}{id}")
}

/// Held by a running backup: blob bytes are not removed while it exists.
pub const BACKUP_HOLD: &str = "backup/hold";

pub const CHANGE_PREFIX: &str = "changelog/e/";
pub const CHANGE_HEAD: &str = "changelog/head";

pub fn change(seq: u64) -> String {
    format!("{CHANGE_PREFIX}{seq:020}")
}

/// A deleted tag's stamp, so that older writes do not bring it back.
pub fn tag_tombstone(name: &RepositoryName, tag: &str) -> String {
    format!("{TAG_TOMBSTONE_PREFIX}{name}:{tag}")
}

pub const TAG_TOMBSTONE_PREFIX: &str = "tagtomb/";
pub const MANIFEST_TOMBSTONE_PREFIX: &str = "mtomb/";
pub const TAG_HISTORY_PREFIX: &str = "taghist/";

/// A deleted manifest's stamp.
pub fn manifest_tombstone(name: &RepositoryName, digest: &Digest) -> String {
    format!("{MANIFEST_TOMBSTONE_PREFIX}{name}@{digest}")
}

pub fn tag_history_prefix(name: &RepositoryName, tag: &str) -> String {
    format!("{TAG_HISTORY_PREFIX}{name}:{tag}/")
}

pub fn tag_history(name: &RepositoryName, tag: &str, stamp: &crate::records::Stamp) -> String {
    format!(
        "{TAG_HISTORY_PREFIX}{name}:{tag}/{:020}-{}",
        stamp.hlc, stamp.origin
    )
}

pub const TAG_PREFIX: &str = "tag/";
pub const MANIFEST_PREFIX: &str = "manifest/";

pub const TRASH_MANIFEST_PREFIX: &str = "trash/m/";
pub const TRASH_TAG_PREFIX: &str = "trash/t/";

/// A manifest in the trash.
pub fn trash_manifest(name: &RepositoryName, digest: &Digest) -> String {
    format!("{TRASH_MANIFEST_PREFIX}{name}@{digest}")
}

/// A tag in the trash.
pub fn trash_tag(name: &RepositoryName, tag: &str) -> String {
    format!("{TRASH_TAG_PREFIX}{name}:{tag}")
}

/// The repository and digest of a trashed manifest's key.
pub fn trash_manifest_parts(key: &[u8]) -> Option<(&str, Digest)> {
    let rest = std::str::from_utf8(key)
        .ok()?
        .strip_prefix(TRASH_MANIFEST_PREFIX)?;
    let (name, digest) = rest.split_once('@')?;
    Some((name, digest.parse().ok()?))
}

/// The digest of a trashed manifest's key.
pub fn trash_manifest_digest(key: &[u8]) -> Option<Digest> {
    trash_manifest_parts(key).map(|(_, d)| d)
}

/// The repository and tag of a trashed tag's key.
pub fn trash_tag_parts(key: &[u8]) -> Option<(&str, &str)> {
    std::str::from_utf8(key)
        .ok()?
        .strip_prefix(TRASH_TAG_PREFIX)?
        .split_once(':')
}
