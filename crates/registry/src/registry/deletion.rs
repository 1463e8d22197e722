//! Deleting manifests, with the tags and referrers that point at them.

use berth_oci::{Digest, Reference, RepositoryName};
use berth_store::Txn;

use super::{Registry, Result, TXN_ATTEMPTS, backoff, changes, now_ms};
use crate::RegistryError;
use crate::keys;
use crate::records::{Change, ManifestRecord, Stamp, TagRecord, TrashedManifest, decode, encode};

/// Who deletes: what the delete obeys and leaves behind.
#[derive(Clone, Copy)]
pub(super) enum Deleter<'a> {
    /// A client (named, when authentication knows it): the delete is logged
    /// for other regions, obeys the immutable rules, and goes to the trash.
    Client(Option<&'a str>),
    /// A retention rule, like a client, but only while what it planned to
    /// delete is unchanged: a tag still at `Some(digest)`, a manifest still
    /// without tags (`None`).
    Rule(Option<&'a Digest>),
    /// The pull-through cache's own (an eviction, an upstream's tag gone).
    Cache,
}

impl Deleter<'_> {
    pub(super) fn is_client(&self) -> bool {
        !matches!(self, Deleter::Cache)
    }

    pub(super) fn by(&self) -> Option<String> {
        match self {
            Deleter::Client(by) => by.map(str::to_string),
            Deleter::Rule(_) => Some("retention".into()),
            Deleter::Cache => None,
        }
    }
}

impl Registry {
    /// Deletes a tag (by tag) or a manifest with every tag pointing at it
    /// (by digest).
    pub async fn delete_manifest(
        &self,
        name: &RepositoryName,
        reference: &Reference,
    ) -> Result<()> {
        self.delete_manifest_by(name, reference, None).await
    }

    /// A client's delete by `by` (`user:alice`), as the trash records it.
    pub async fn delete_manifest_by(
        &self,
        name: &RepositoryName,
        reference: &Reference,
        by: Option<&str>,
    ) -> Result<()> {
        let deleter = Deleter::Client(by);
        match reference {
            Reference::Tag(tag) => self.delete_tag(name, tag, deleter).await,
            Reference::Digest(digest) => {
                self.delete_manifest_by_digest(name, digest, deleter).await
            }
        }
    }

    /// A delete of the pull-through cache's own (an eviction, an upstream's
    /// tag gone): not a change of this region's, so neither logged for
    /// other regions nor kept as a tombstone or in the trash.
    pub async fn forget_manifest(
        &self,
        name: &RepositoryName,
        reference: &Reference,
    ) -> Result<()> {
        match reference {
            Reference::Tag(tag) => self.delete_tag(name, tag, Deleter::Cache).await,
            Reference::Digest(digest) => {
                self.delete_manifest_by_digest(name, digest, Deleter::Cache)
                    .await
            }
        }
    }

    pub(super) async fn delete_manifest_by_digest(
        &self,
        name: &RepositoryName,
        digest: &Digest,
        deleter: Deleter<'_>,
    ) -> Result<()> {
        let by_client = deleter.is_client();
        let logged = by_client;
        for _ in 0..TXN_ATTEMPTS {
            let key = keys::manifest(name, digest);
            let seen = self
                .meta
                .get(key.as_bytes())
                .await?
                .ok_or(RegistryError::ManifestUnknown)?;
            let record: ManifestRecord = decode(&seen.key, &seen.value)?;
            let tomb_key = keys::manifest_tombstone(name, digest);
            let tomb = self.meta.get(tomb_key.as_bytes()).await?;
            let mut txn = Txn::new()
                .require_version(key.clone(), seen.version)
                .delete(key);
            self.observe_stamp(record.stamp.as_ref());
            self.observe_record::<Stamp>(tomb.as_ref());
            let prefix = keys::tag_prefix(name);
            let mut tags = Vec::new();
            for kv in self.scan_all(&prefix).await? {
                let tag: TagRecord = decode(&kv.key, &kv.value)?;
                if &tag.digest == digest {
                    let tag_name = String::from_utf8_lossy(&kv.key[prefix.len()..]).into_owned();
                    if matches!(deleter, Deleter::Rule(_)) {
                        return Err(RegistryError::Changed(format!(
                            "{name}@{digest} is tagged {tag_name} now"
                        )));
                    }
                    if by_client {
                        self.check_mutable(name, &tag_name, digest)?;
                    }
                    txn = txn
                        .require_version(kv.key.clone(), kv.version)
                        .delete(kv.key);
                    self.observe_stamp(tag.stamp.as_ref());
                    if logged && let Some(own) = &tag.stamp {
                        // The set is hidden, not overwritten: a later write
                        // of the tag elsewhere still wins.
                        txn = txn.put(keys::tag_tombstone(name, &tag_name), encode(own));
                    }
                    tags.push(tag_name);
                }
            }
            if let Some(subject) = &record.subject {
                txn = txn.delete(keys::referrer(name, subject, digest));
            }
            if by_client && self.limits.trash_retention_ms > 0 {
                txn = txn.put(
                    keys::trash_manifest(name, digest),
                    encode(&TrashedManifest {
                        record: record.clone(),
                        tags: tags.clone(),
                        deleted_ms: now_ms(),
                        by: deleter.by(),
                    }),
                );
            }
            let stamp = logged.then(|| self.local_stamp());
            let change = if let Some(stamp) = &stamp {
                txn = txn
                    .require_unchanged(tomb_key.clone(), tomb.as_ref())
                    .put(tomb_key, encode(stamp));
                let change = Change::DeleteManifest {
                    repository: name.to_string(),
                    digest: digest.clone(),
                    tags,
                };
                Some(change)
            } else {
                None
            };
            let committed = match (&stamp, change) {
                (Some(stamp), Some(change)) => self.commit_logged(txn, stamp, change).await?,
                _ => self.meta.commit(txn).await?,
            };
            if committed {
                if logged {
                    self.changes_committed();
                    if let Some(stamp) = &stamp {
                        self.hide_tags_older_than(name, digest, stamp).await?;
                    }
                }
                return Ok(());
            }
            backoff().await;
        }
        Err(changes::conflict("manifest delete"))
    }
}
