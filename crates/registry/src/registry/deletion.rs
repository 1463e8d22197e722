//! Deleting manifests, with the tags and referrers that point at them.

use berth_oci::{Digest, Reference, RepositoryName};
use berth_store::Txn;

use super::{Registry, Result, TXN_ATTEMPTS, backoff, changes};
use crate::RegistryError;
use crate::keys;
use crate::records::{Change, ManifestRecord, Stamp, TagRecord, decode, encode};

impl Registry {
    /// Deletes a tag (by tag) or a manifest with every tag pointing at it
    /// (by digest).
    pub async fn delete_manifest(
        &self,
        name: &RepositoryName,
        reference: &Reference,
    ) -> Result<()> {
        match reference {
            Reference::Tag(tag) => self.delete_tag(name, tag, true).await,
            Reference::Digest(digest) => self.delete_manifest_by_digest(name, digest, true).await,
        }
    }

    /// A delete of the pull-through cache's own (an eviction, an upstream's
    /// tag gone): not a change of this region's, so neither logged for
    /// other regions nor kept as a tombstone.
    pub async fn forget_manifest(
        &self,
        name: &RepositoryName,
        reference: &Reference,
    ) -> Result<()> {
        match reference {
            Reference::Tag(tag) => self.delete_tag(name, tag, false).await,
            Reference::Digest(digest) => self.delete_manifest_by_digest(name, digest, false).await,
        }
    }

    async fn delete_manifest_by_digest(
        &self,
        name: &RepositoryName,
        digest: &Digest,
        logged: bool,
    ) -> Result<()> {
        let by_client = logged;
        let logged = logged && self.region.is_some();
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
            let stamp = logged.then(|| self.local_stamp());
            if let Some(stamp) = &stamp {
                txn = txn
                    .require_unchanged(tomb_key.clone(), tomb.as_ref())
                    .put(tomb_key, encode(stamp));
                let change = Change::DeleteManifest {
                    repository: name.to_string(),
                    digest: digest.clone(),
                    tags,
                };
                txn = self.log_change(txn, stamp, change).await?;
            }
            if self.meta.commit(txn).await? {
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
