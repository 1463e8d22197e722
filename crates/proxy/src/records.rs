//! The cache's own metadata, beside the registry's records of the cached
//! manifests, tags and blobs. In the MetaStore, so that every node of a
//! cluster shares one cache and it survives restarts.

use berth_oci::{Digest, RepositoryName};
use serde::{Deserialize, Serialize};

pub const IMAGE_PREFIX: &str = "cache/image/";
pub const TAG_PREFIX: &str = "cache/tag/";

/// When a cached tag was last confirmed with the upstream.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CachedTag {
    pub digest: Digest,
    pub checked_ms: u64,
}

/// A cached manifest, the unit of eviction.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CachedImage {
    pub media_type: String,
    /// The manifest and the blobs it references directly (an index's
    /// children are images of their own).
    pub size: u64,
    pub cached_ms: u64,
    pub accessed_ms: u64,
    #[serde(default)]
    pub pinned: bool,
}

pub fn tag(local: &RepositoryName, tag: &str) -> String {
    format!("{TAG_PREFIX}{local}:{tag}")
}

pub fn image(local: &RepositoryName, digest: &Digest) -> String {
    format!("{IMAGE_PREFIX}{local}@{digest}")
}

/// Splits an image key's suffix (`REPO@DIGEST`).
pub fn parse_image_key(key: &[u8]) -> Option<(RepositoryName, Digest)> {
    let rest = std::str::from_utf8(key).ok()?.strip_prefix(IMAGE_PREFIX)?;
    let (repo, digest) = rest.rsplit_once('@')?;
    Some((RepositoryName::parse(repo).ok()?, digest.parse().ok()?))
}

/// Splits a tag key's suffix (`REPO:TAG`).
pub fn parse_tag_key(key: &[u8]) -> Option<(RepositoryName, String)> {
    let rest = std::str::from_utf8(key).ok()?.strip_prefix(TAG_PREFIX)?;
    let (repo, tag) = rest.rsplit_once(':')?;
    Some((RepositoryName::parse(repo).ok()?, tag.to_string()))
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    serde_json::from_slice(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let repo = RepositoryName::parse("docker.io/library/alpine").unwrap();
        let digest = Digest::sha256_of(b"m");
        let key = image(&repo, &digest);
        assert_eq!(
            parse_image_key(key.as_bytes()),
            Some((repo.clone(), digest))
        );
        let key = tag(&repo, "3.20");
        assert_eq!(parse_tag_key(key.as_bytes()), Some((repo, "3.20".into())));
    }
}
