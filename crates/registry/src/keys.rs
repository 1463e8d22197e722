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
