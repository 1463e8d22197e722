//! Tags: pointing one at a manifest, resolving, listing and deleting them.

use berth_oci::{Digest, RepositoryName, Tag};
use berth_store::Txn;

use super::deletion::Deleter;
use super::{Page, Registry, Result, TXN_ATTEMPTS, backoff, changes, now_ms};
use crate::RegistryError;
use crate::keys;
use crate::records::{Change, Stamp, TagRecord, TrashedTag, decode, encode};

impl Registry {
    /// Points a tag at a manifest recorded in the repository.
    pub async fn tag_manifest(
        &self,
        name: &RepositoryName,
        tag: &Tag,
        digest: &Digest,
    ) -> Result<()> {
        let key = keys::manifest(name, digest);
        let Some(seen) = self.meta.get(key.as_bytes()).await? else {
            return Err(RegistryError::ManifestUnknown);
        };
        let txn = Txn::new().require_version(key, seen.version).put(
            keys::tag(name, tag.as_str()),
            encode(&TagRecord {
                digest: digest.clone(),
                updated_ms: now_ms(),
                stamp: None,
            }),
        );
        if !self.meta.commit(txn).await? {
            return Err(RegistryError::ManifestUnknown);
        }
        Ok(())
    }

    /// Points `tag` at `digest`, a manifest still recorded in the
    /// repository (usually one it pointed to before, as tag history
    /// shows): a push
    /// of that manifest by tag, so it is logged, replicated and recorded
    /// in the history, and it obeys the immutable rules.
    pub async fn restore_tag(
        &self,
        name: &RepositoryName,
        tag: &Tag,
        digest: &Digest,
        by: Option<&str>,
    ) -> Result<()> {
        let Some(record) = self.find_manifest(name, digest).await? else {
            return Err(RegistryError::ManifestUnknown);
        };
        let Some(bytes) = self.manifest_bytes(digest, record.size).await? else {
            return Err(RegistryError::ManifestUnknown);
        };
        self.put_manifest_by(
            name,
            &berth_oci::Reference::Tag(tag.clone()),
            Some(&record.media_type),
            bytes,
            by,
        )
        .await?;
        Ok(())
    }

    /// The digest a tag points at, if the tag exists.
    pub async fn find_tag(&self, name: &RepositoryName, tag: &Tag) -> Result<Option<Digest>> {
        Ok(self
            .get_record::<TagRecord>(&keys::tag(name, tag.as_str()))
            .await?
            .map(|t| t.digest))
    }

    pub(super) async fn delete_tag(
        &self,
        name: &RepositoryName,
        tag: &Tag,
        deleter: Deleter<'_>,
    ) -> Result<()> {
        // A client's delete obeys the immutable rules and goes to the
        // trash; the cache's own does neither.
        let by_client = deleter.is_client();
        // The cache's own deletes are not changes of the registry's.
        let logged = by_client;
        let key = keys::tag(name, tag.as_str());
        let change = Change::Untag {
            repository: name.to_string(),
            tag: tag.as_str().to_string(),
        };
        for _ in 0..TXN_ATTEMPTS {
            let seen = self
                .meta
                .get(key.as_bytes())
                .await?
                .ok_or(RegistryError::ManifestUnknown)?;
            let current: TagRecord = decode(&seen.key, &seen.value)?;
            if let Deleter::Rule(Some(planned)) = deleter
                && &current.digest != planned
            {
                return Err(RegistryError::Changed(format!(
                    "{name}:{} points at {} now",
                    tag.as_str(),
                    current.digest
                )));
            }
            if by_client {
                self.check_mutable(name, tag.as_str(), &current.digest)?;
            }
            let mut txn = Txn::new()
                .require_version(key.clone(), seen.version)
                .delete(key.clone());
            if by_client && self.limits.trash_retention_ms > 0 {
                txn = txn.put(
                    keys::trash_tag(name, tag.as_str()),
                    encode(&TrashedTag {
                        digest: current.digest.clone(),
                        deleted_ms: now_ms(),
                        by: deleter.by(),
                    }),
                );
            }
            if !logged {
                if self.meta.commit(txn).await? {
                    return Ok(());
                }
                continue;
            }
            let record = current;
            let tomb_key = keys::tag_tombstone(name, tag.as_str());
            let tomb = self.meta.get(tomb_key.as_bytes()).await?;
            // Newer than everything it overwrites, here and elsewhere.
            self.observe_stamp(record.stamp.as_ref());
            self.observe_record::<Stamp>(tomb.as_ref());
            let stamp = self.local_stamp();
            let txn = txn
                .require_unchanged(tomb_key.clone(), tomb.as_ref())
                .put(tomb_key, encode(&stamp));
            if self.commit_logged(txn, &stamp, change.clone()).await? {
                self.changes_committed();
                return Ok(());
            }
            backoff().await;
        }
        Err(changes::conflict("tag delete"))
    }

    pub async fn list_tags(
        &self,
        name: &RepositoryName,
        last: Option<&str>,
        n: Option<usize>,
    ) -> Result<Page> {
        if self.meta.get(keys::repo(name).as_bytes()).await?.is_none() {
            return Err(RegistryError::NameUnknown);
        }
        self.page(&keys::tag_prefix(name), last, n).await
    }
}
