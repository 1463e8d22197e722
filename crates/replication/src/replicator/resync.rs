//! Resynchronizing from a peer whose compacted log no longer holds the
//! changes this region has not applied yet: its state is copied instead.
//!
//! The peer's tombstones, manifests and tags are applied like the changes
//! that made them, by last writer wins on their stamps, so whatever this
//! region holds that is newer stays. What the peer wrote and later deleted,
//! and whose tombstone it has since pruned, is found by comparing: a record
//! here whose newest write came from that peer, and which the peer no
//! longer has at all, was deleted there after that write, and goes here too.
//! The pages are compared in key order, a page at a time, so memory stays
//! bounded whatever the number of tags.

use std::collections::HashSet;
use std::time::Duration;

use berth_oci::{Digest, RepositoryName};
use berth_registry::{
    Applied, Change, ManifestRecord, RecordKind, RegistryError, Stamp, TagRecord,
};

use super::{PeerConfig, Replicator, Result, SnapshotPage};
use crate::glob;

/// Records asked for per snapshot page.
const PAGE: usize = 500;

/// Order matters only for the vanished check: a record the peer deleted
/// with its tombstone still there is removed by the tombstone first.
const KINDS: [RecordKind; 4] = [
    RecordKind::ManifestTombstones,
    RecordKind::TagTombstones,
    RecordKind::Manifests,
    RecordKind::Tags,
];

/// A snapshot key's repository and the rest (a tag, or a digest).
fn split_key(kind: RecordKind, key: &str) -> Option<(RepositoryName, &str)> {
    let rest = key.strip_prefix(kind.prefix())?;
    let separator = match kind {
        RecordKind::ManifestTombstones => '@',
        _ => ':',
    };
    let (repo, item) = rest.split_once(separator)?;
    Some((RepositoryName::parse(repo).ok()?, item))
}

/// The write that comes right after `stamp` in the same region: a delete
/// the peer made after that write, whose own stamp is gone with its
/// tombstone.
fn just_after(stamp: &Stamp, origin: &str) -> Stamp {
    Stamp {
        hlc: stamp.hlc.saturating_add(1),
        origin: origin.to_string(),
    }
}

impl Replicator {
    /// Copies the peer's state here. Returns the bytes copied.
    pub(super) async fn resync(&self, peer: &PeerConfig) -> Result<u64> {
        let mut copied = 0;
        for kind in KINDS {
            let mut after: Option<String> = None;
            loop {
                let page = self.fetch_snapshot(peer, kind, after.as_deref()).await?;
                let mut seen = HashSet::with_capacity(page.records.len());
                for (key, value) in &page.records {
                    seen.insert(key.as_str());
                    copied += self.resync_record(peer, kind, key, value).await?;
                }
                let upto = if page.done {
                    None
                } else {
                    page.records.last().map(|(key, _)| key.clone())
                };
                if matches!(kind, RecordKind::Manifests | RecordKind::Tags) {
                    self.remove_vanished(peer, kind, after.as_deref(), upto.as_deref(), &seen)
                        .await?;
                }
                match upto {
                    Some(key) => after = Some(key),
                    None => break,
                }
            }
        }
        Ok(copied)
    }

    async fn fetch_snapshot(
        &self,
        peer: &PeerConfig,
        kind: RecordKind,
        after: Option<&str>,
    ) -> Result<SnapshotPage> {
        let mut url = reqwest::Url::parse(&format!(
            "{}/berth/v1/replication/snapshot",
            peer.url.trim_end_matches('/')
        ))
        .map_err(|e| Self::peer_error(peer, format!("snapshot: {e}")))?;
        url.query_pairs_mut()
            .append_pair("kind", kind.name())
            .append_pair("limit", &PAGE.to_string());
        if let Some(after) = after {
            url.query_pairs_mut().append_pair("after", after);
        }
        let response = self
            .http
            .get(url)
            .headers(Self::credentials(peer))
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .map_err(|e| Self::peer_error(peer, format!("snapshot: {e}")))?;
        if !response.status().is_success() {
            return Err(Self::peer_error(
                peer,
                format!("snapshot: HTTP {}", response.status()),
            ));
        }
        let bytes = response
            .bytes()
            .await
            .map_err(|e| Self::peer_error(peer, format!("snapshot: {e}")))?;
        let page: SnapshotPage = serde_json::from_slice(&bytes)
            .map_err(|e| Self::peer_error(peer, format!("snapshot: invalid page: {e}")))?;
        if page.region != peer.name {
            return Err(Self::peer_error(
                peer,
                format!("snapshot answered by region {:?}", page.region),
            ));
        }
        Ok(page)
    }

    /// Applies one of the peer's records. Returns the bytes copied.
    async fn resync_record(
        &self,
        peer: &PeerConfig,
        kind: RecordKind,
        key: &str,
        value: &serde_json::Value,
    ) -> Result<u64> {
        let Some((name, item)) = split_key(kind, key) else {
            tracing::warn!(peer = %peer.name, key, "skipping a snapshot record with an invalid key");
            return Ok(0);
        };
        if !glob::selected(&peer.include, &peer.exclude, name.as_str()) {
            return Ok(0);
        }
        let invalid = |e: serde_json::Error| {
            RegistryError::CorruptRecord(format!("{key} from peer {}: {e}", peer.name))
        };
        let repository = name.to_string();
        // Only the peer's own writes, as from its log: a third region's
        // come from that region, so one region's view of another's never
        // overrides what that region says itself.
        let own = |stamp: &Stamp| stamp.origin == peer.name;
        let mut copied = 0;
        match kind {
            RecordKind::ManifestTombstones => {
                let stamp: Stamp = serde_json::from_value(value.clone()).map_err(invalid)?;
                if !own(&stamp) {
                    return Ok(0);
                }
                let digest: Digest = item
                    .parse()
                    .map_err(|_| RegistryError::DigestInvalid(item.to_string()))?;
                let change = Change::DeleteManifest {
                    repository,
                    digest,
                    tags: Vec::new(),
                };
                self.registry.apply_change(&stamp, &change).await?;
            }
            RecordKind::TagTombstones => {
                let stamp: Stamp = serde_json::from_value(value.clone()).map_err(invalid)?;
                if !own(&stamp) {
                    return Ok(0);
                }
                let change = Change::Untag {
                    repository,
                    tag: item.to_string(),
                };
                self.registry.apply_change(&stamp, &change).await?;
            }
            RecordKind::Manifests => {
                let record: ManifestRecord =
                    serde_json::from_value(value.clone()).map_err(invalid)?;
                let (Some(stamp), Ok(digest)) = (record.stamp, item.parse::<Digest>()) else {
                    // Unstamped: a pull-through cache's, never replicated.
                    return Ok(0);
                };
                if !own(&stamp) {
                    return Ok(0);
                }
                let here = self.registry.find_manifest(&name, &digest).await?;
                if here.is_some_and(|r| r.stamp.as_ref() >= Some(&stamp)) {
                    return Ok(0);
                }
                self.ensure_manifest(peer, &name, &digest, &stamp, 0, &mut copied)
                    .await?;
            }
            RecordKind::Tags => {
                let record: TagRecord = serde_json::from_value(value.clone()).map_err(invalid)?;
                let Some(stamp) = record.stamp.filter(own) else {
                    return Ok(0);
                };
                let here = self.registry.tag_record(&name, item).await?;
                if here.is_some_and(|r| r.stamp.as_ref() >= Some(&stamp)) {
                    return Ok(0);
                }
                let present = self
                    .ensure_manifest(peer, &name, &record.digest, &stamp, 0, &mut copied)
                    .await?;
                if present {
                    let change = Change::Tag {
                        repository,
                        tag: item.to_string(),
                        digest: record.digest,
                        by: None,
                    };
                    self.registry.apply_change(&stamp, &change).await?;
                }
            }
        }
        Ok(copied)
    }

    /// Removes the records of `kind` here, in `(after, upto]` (to the end
    /// when `upto` is `None`), whose newest write came from the peer and
    /// which the peer no longer has (`seen` holds what it has there).
    async fn remove_vanished(
        &self,
        peer: &PeerConfig,
        kind: RecordKind,
        after: Option<&str>,
        upto: Option<&str>,
        seen: &HashSet<&str>,
    ) -> Result<()> {
        let mut cursor: Option<Vec<u8>> = after.map(|a| a.as_bytes().to_vec());
        loop {
            let page = self
                .registry
                .records_page(kind, cursor.as_deref(), PAGE)
                .await?;
            let Some(last) = page.last() else {
                return Ok(());
            };
            cursor = Some(last.key.clone());
            for kv in &page {
                let Ok(key) = std::str::from_utf8(&kv.key) else {
                    continue;
                };
                if upto.is_some_and(|u| key > u) {
                    return Ok(());
                }
                if seen.contains(key) {
                    continue;
                }
                let Some((name, item)) = split_key(kind, key) else {
                    continue;
                };
                if !glob::selected(&peer.include, &peer.exclude, name.as_str()) {
                    continue;
                }
                let repository = name.to_string();
                let (stamp, change) = match kind {
                    RecordKind::Manifests => {
                        let Ok(record) = serde_json::from_slice::<ManifestRecord>(&kv.value) else {
                            continue;
                        };
                        let (Some(stamp), Ok(digest)) = (record.stamp, item.parse::<Digest>())
                        else {
                            continue;
                        };
                        let change = Change::DeleteManifest {
                            repository,
                            digest,
                            tags: Vec::new(),
                        };
                        (stamp, change)
                    }
                    _ => {
                        let Ok(record) = serde_json::from_slice::<TagRecord>(&kv.value) else {
                            continue;
                        };
                        let Some(stamp) = record.stamp else { continue };
                        let change = Change::Untag {
                            repository,
                            tag: item.to_string(),
                        };
                        (stamp, change)
                    }
                };
                if stamp.origin != peer.name {
                    continue;
                }
                let applied = self
                    .registry
                    .apply_change(&just_after(&stamp, &peer.name), &change)
                    .await?;
                if applied == Applied::Changed {
                    tracing::info!(peer = %peer.name, key, "removed what the peer deleted while this region was behind its log");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_keys_split_into_repository_and_item() {
        let (name, tag) = split_key(RecordKind::Tags, "tag/team/app:v1").unwrap();
        assert_eq!((name.as_str(), tag), ("team/app", "v1"));
        let (name, digest) =
            split_key(RecordKind::ManifestTombstones, "mtomb/a@sha256:00").unwrap();
        assert_eq!((name.as_str(), digest), ("a", "sha256:00"));
        assert!(split_key(RecordKind::Tags, "manifest/a:sha256:00").is_none());
        assert!(split_key(RecordKind::Tags, "tag/Bad Name:v1").is_none());
    }
}
