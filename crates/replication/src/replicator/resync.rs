//! Resynchronizing from a peer whose compacted log no longer holds the
//! changes this region has not applied yet: its state is copied instead.
//!
//! The peer's own tombstones, manifests and tags are applied like the
//! changes that made them, by last writer wins on their stamps, so whatever
//! this region holds that is newer stays, and applying twice (two nodes of a
//! region for a moment, a retried round) changes nothing. Nothing is
//! inferred from what the peer lacks: a peer keeps the tombstone of each of
//! its own deletes until every region has applied it (see the feed's
//! acknowledgements), so each delete this region missed is in the snapshot
//! with its own stamp. A stale snapshot (a peer restored from a backup, a
//! read from a lagging etcd member) can only offer older writes, which
//! lose. Records of other regions come from those regions. Pages are read
//! one at a time, so memory stays bounded whatever the number of tags.

use std::time::Duration;

use berth_oci::{Digest, RepositoryName};
use berth_registry::{Change, ManifestRecord, RecordKind, RegistryError, Stamp, TagRecord};

use super::{PeerConfig, ReplicationError, Replicator, Result, SnapshotPage};
use crate::glob;

/// Records asked for per snapshot page.
const PAGE: usize = 500;

/// Deletes first, so that content the peer deleted is not copied for
/// nothing.
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

impl Replicator {
    /// Copies the peer's state here, as of a log head `head` read before;
    /// this region is at `cursor` in the peer's log (`epoch`) meanwhile.
    /// Returns the bytes copied.
    pub(super) async fn resync(
        &self,
        peer: &PeerConfig,
        head: u64,
        cursor: u64,
        epoch: &str,
    ) -> Result<u64> {
        // Writes of the peer's stamped before the horizon were applied here
        // before tombstones that outranked them may have gone: replaying
        // them could bring back what they lost to.
        let horizon = self.registry.tombstone_horizon().await?;
        let mut copied = 0;
        for kind in KINDS {
            let mut after: Option<String> = None;
            loop {
                let page = self
                    .fetch_snapshot(peer, kind, after.as_deref(), cursor, epoch)
                    .await?;
                if page.head < head {
                    return Err(Self::peer_error(
                        peer,
                        format!(
                            "snapshot read at head {} behind the feed's {head} (a lagging member); retrying",
                            page.head
                        ),
                    ));
                }
                for (key, value) in &page.records {
                    match self.resync_record(peer, kind, key, value, horizon).await {
                        Ok(n) => copied += n,
                        // As for a change: what this region can never take
                        // must not hold the others back.
                        Err(ReplicationError::Registry(
                            e @ (RegistryError::ManifestInvalid(_)
                            | RegistryError::TooLarge { .. }
                            | RegistryError::DigestInvalid(_)
                            | RegistryError::SizeInvalid(_)
                            | RegistryError::CorruptRecord(_)),
                        )) => {
                            tracing::error!(peer = %peer.name, key, error = %e, "skipping a record this region cannot take");
                        }
                        Err(e) => return Err(e),
                    }
                }
                match page.next {
                    Some(next) if !page.done => after = Some(next),
                    _ => break,
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
        cursor: u64,
        epoch: &str,
    ) -> Result<SnapshotPage> {
        let mut url = reqwest::Url::parse(&format!(
            "{}/berth/v1/replication/snapshot",
            peer.url.trim_end_matches('/')
        ))
        .map_err(|e| Self::peer_error(peer, format!("snapshot: {e}")))?;
        url.query_pairs_mut()
            .append_pair("kind", kind.name())
            .append_pair("limit", &PAGE.to_string())
            .append_pair("reader", &self.options.region)
            .append_pair("epoch", epoch)
            .append_pair("cursor", &cursor.to_string());
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
        horizon: u64,
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
        // overrides what that region says itself. A region no longer among
        // the peers (gone for good) has no one else to speak for it. And
        // nothing older than the horizon.
        let own = |stamp: &Stamp| {
            let origin = stamp.origin.as_str();
            // (Writes made before replication was on carry no region:
            // they do not replicate, by resync either.)
            let speaks = origin == peer.name
                || (!origin.is_empty()
                    && origin != self.options.region
                    && !self.options.peers.iter().any(|p| p.name == origin));
            speaks && berth_registry::stamp_ms(stamp) >= horizon
        };
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
