//! Metadata key layout. Repository names never contain `:` and tags and
//! digests never contain `/` after the separator, so `<repo>:` prefixes never
//! match another repository (`a:` is not a prefix of `a/b:`).

use berth_oci::{Digest, RepositoryName};

pub const REPO_PREFIX: &str = "repo/";
pub const UPLOAD_PREFIX: &str = "upload/";

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

pub fn link(name: &RepositoryName, digest: &Digest) -> String {
    format!("link/{name}:{digest}")
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
