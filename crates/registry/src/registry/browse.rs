//! Reads for people rather than clients (the operator's console): a
//! repository's size and last push, its tags newest first, a search over
//! names, and a manifest's record and bytes by digest. Every read is
//! bounded (a search by its caller, batch by batch).

use berth_oci::{Digest, RepositoryName};
use bytes::Bytes;

use super::{Registry, Result};
use crate::keys;
use crate::records::{LinkRecord, ManifestRecord, TagRecord, decode};

/// At most this many tags of one repository are read to sort them by
/// time; past it the page says so.
pub const MAX_SORTED_TAGS: usize = 20_000;
/// At most this many blob links are summed for a repository's size.
pub const MAX_SUMMED_LINKS: usize = 10_000;

/// What the repository list shows of one repository.
#[derive(Clone, Debug, Default)]
pub struct RepositorySummary {
    pub name: String,
    pub tags: usize,
    /// The newest tag push, in ms (0: no tags).
    pub last_push_ms: u64,
    /// Bytes of the blobs linked to it (layers, configs, manifests).
    pub size: u64,
    /// True when a count stopped at its bound (the figure is a minimum).
    pub truncated: bool,
}

/// See [`Registry::search_batch`].
#[derive(Clone, Debug, Default)]
pub struct SearchBatch {
    pub matches: Vec<String>,
    /// The last name looked at (where the next batch starts).
    pub last: Option<String>,
    /// No names follow.
    pub ended: bool,
}

/// One tag with its record.
#[derive(Clone, Debug)]
pub struct TagEntry {
    pub tag: String,
    pub record: TagRecord,
}

/// A repository's tags, newest first.
#[derive(Clone, Debug, Default)]
pub struct TagListing {
    pub tags: Vec<TagEntry>,
    /// More tags exist than were read and sorted.
    pub truncated: bool,
}

impl Registry {
    /// One batch of a search: of the (at most `limit`) repository names
    /// after `after`, those containing `needle`; the last name looked at;
    /// and whether the names ended. The caller bounds how many batches a
    /// request reads.
    pub async fn search_batch(
        &self,
        needle: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<SearchBatch> {
        let prefix = keys::REPO_PREFIX;
        let start = after.map(|l| format!("{prefix}{l}").into_bytes());
        // One more than asked: whether names follow is known without
        // another read.
        let batch = self
            .meta
            .scan(prefix.as_bytes(), start.as_deref(), limit + 1)
            .await?;
        let ended = batch.len() <= limit;
        let names: Vec<String> = batch
            .iter()
            .take(limit)
            .map(|kv| String::from_utf8_lossy(&kv.key[prefix.len()..]).into_owned())
            .collect();
        Ok(SearchBatch {
            ended,
            last: names.last().cloned(),
            matches: names.into_iter().filter(|n| n.contains(needle)).collect(),
        })
    }

    /// Tag count, newest push and size of one repository.
    pub async fn repository_summary(&self, name: &RepositoryName) -> Result<RepositorySummary> {
        let listing = self.tags_newest_first(name).await?;
        let prefix = link_prefix(name);
        let kvs = self
            .meta
            .scan(prefix.as_bytes(), None, MAX_SUMMED_LINKS + 1)
            .await?;
        let truncated = listing.truncated || kvs.len() > MAX_SUMMED_LINKS;
        let size = kvs
            .iter()
            .take(MAX_SUMMED_LINKS)
            .filter_map(|kv| decode::<LinkRecord>(&kv.key, &kv.value).ok())
            .map(|l| l.size)
            .sum();
        Ok(RepositorySummary {
            name: name.to_string(),
            tags: listing.tags.len(),
            last_push_ms: listing.tags.first().map_or(0, |t| t.record.updated_ms),
            size,
            truncated,
        })
    }

    /// The repository's tags with their records, newest push first (ties
    /// by name), up to [`MAX_SORTED_TAGS`].
    pub async fn tags_newest_first(&self, name: &RepositoryName) -> Result<TagListing> {
        let prefix = keys::tag_prefix(name);
        let mut tags = Vec::new();
        let mut after: Option<Vec<u8>> = None;
        let mut truncated = false;
        loop {
            let batch = self
                .meta
                .scan(prefix.as_bytes(), after.as_deref(), 1000)
                .await?;
            let Some(tail) = batch.last() else { break };
            after = Some(tail.key.clone());
            for kv in &batch {
                if tags.len() == MAX_SORTED_TAGS {
                    truncated = true;
                    break;
                }
                let tag = String::from_utf8_lossy(&kv.key[prefix.len()..]).into_owned();
                let record: TagRecord = decode(&kv.key, &kv.value)?;
                tags.push(TagEntry { tag, record });
            }
            if truncated {
                break;
            }
        }
        tags.sort_by(|a, b| {
            b.record
                .updated_ms
                .cmp(&a.record.updated_ms)
                .then_with(|| a.tag.cmp(&b.tag))
        });
        Ok(TagListing { tags, truncated })
    }

    /// A manifest's record and bytes by digest, if the repository has it.
    pub async fn manifest_by_digest(
        &self,
        name: &RepositoryName,
        digest: &Digest,
    ) -> Result<Option<(ManifestRecord, Bytes)>> {
        let Some(kv) = self
            .meta
            .get(keys::manifest(name, digest).as_bytes())
            .await?
        else {
            return Ok(None);
        };
        let record: ManifestRecord = decode(&kv.key, &kv.value)?;
        Ok(self
            .manifest_bytes(digest, record.size)
            .await?
            .map(|bytes| (record, bytes)))
    }
}

/// `link/REPO:`: every blob link of one repository.
fn link_prefix(name: &RepositoryName) -> String {
    format!("{}{name}:", keys::LINK_PREFIX)
}
