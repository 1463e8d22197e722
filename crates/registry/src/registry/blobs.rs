//! Blobs in a repository: linking stored bytes to a repository (a push or
//! a mount), reading them, and unlinking them.

use berth_oci::{ByteRange, Digest, RepositoryName};
use berth_store::{BlobRead, ByteStream, KeyValue, Txn};

use super::removal::REMOVAL_MARK_STALE_MS;
use super::{Registry, Result, TXN_ATTEMPTS, now_ms};
use crate::RegistryError;
use crate::keys;
use crate::records::{BlobRecord, LinkRecord, decode, encode};

impl Registry {
    pub(super) async fn link(
        &self,
        name: &RepositoryName,
        digest: &Digest,
    ) -> Result<Option<LinkRecord>> {
        self.get_record(&keys::link(name, digest)).await
    }

    /// Size of a blob visible in the repository.
    pub async fn stat_blob(&self, name: &RepositoryName, digest: &Digest) -> Result<u64> {
        match self.link(name, digest).await? {
            Some(link) => Ok(link.size),
            None => Err(RegistryError::BlobUnknown(digest.clone())),
        }
    }

    /// Size of a blob visible in the repository, for a client that asks
    /// whether to upload it (`HEAD`): the answer "present" is a promise that
    /// its manifest may reference the blob, so the link is confirmed (dated
    /// now, any collector's mark cleared) when it is old or marked.
    /// Garbage collection then leaves it for a whole grace period.
    pub async fn confirm_blob(&self, name: &RepositoryName, digest: &Digest) -> Result<u64> {
        let key = keys::link(name, digest);
        for _ in 0..TXN_ATTEMPTS {
            let Some(kv) = self.meta.get(key.as_bytes()).await? else {
                return Err(RegistryError::BlobUnknown(digest.clone()));
            };
            let link: LinkRecord = decode(&kv.key, &kv.value)?;
            if !self.link_needs_refresh(&link) {
                return Ok(link.size);
            }
            let txn = Txn::new()
                .require_version(key.clone(), kv.version)
                .put(key.clone(), encode(&LinkRecord::new(link.size, now_ms())));
            match self.meta.commit(txn).await {
                Ok(true) => return Ok(link.size),
                // Changed meanwhile: confirmed by another request, or
                // removed.
                Ok(false) => {}
                // Without a writable store (an etcd without quorum) the
                // blob is still there to pull: a HEAD answers, undated.
                // Nothing is lost: a collector that removes the link meanwhile
                // makes a manifest push that relies on it fail with
                // MANIFEST_BLOB_UNKNOWN, which the client retries by
                // uploading.
                Err(e) => {
                    tracing::debug!(repository = %name, %digest, error = %e, "could not date a blob link; answering from the record");
                    return Ok(link.size);
                }
            }
        }
        Err(RegistryError::Store(berth_store::StoreError::Unavailable(
            "the blob's link kept changing; retry".into(),
        )))
    }

    /// Whether a link should be dated again before it is relied on: marked
    /// by a collector, or not confirmed for a while.
    pub(super) fn link_needs_refresh(&self, link: &LinkRecord) -> bool {
        link.removing_since_ms.is_some()
            || now_ms().saturating_sub(link.linked_ms) >= self.limits.link_refresh_ms
    }

    /// Opens a blob visible in the repository, whole or the part a `Range`
    /// header asks for (returned with the stream; `None` for the whole blob).
    pub async fn read_blob(
        &self,
        name: &RepositoryName,
        digest: &Digest,
        range_header: Option<&str>,
    ) -> Result<(BlobRead, Option<ByteRange>)> {
        let recorded = self.stat_blob(name, digest).await?;
        let range = match range_header {
            None => None,
            Some(h) => berth_oci::range::parse_range_header(h, recorded)
                .map_err(|_| RegistryError::RangeNotSatisfiable { size: recorded })?,
        };
        let read = match self.blobs.read(digest, range).await? {
            // A file of the wrong length is damaged at rest (an empty one
            // would even pass verification): never serve it as the blob.
            Some(read) if read.size != recorded => {
                tracing::error!(repository = %name, %digest, recorded, stored = read.size, "stored blob has the wrong size; refusing to serve it");
                Err(RegistryError::Store(berth_store::StoreError::Io(
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!(
                            "stored blob {digest} is {} bytes, {recorded} expected",
                            read.size
                        ),
                    ),
                )))
            }
            Some(read) => Ok(read),
            None => {
                tracing::error!(repository = %name, %digest, "blob is linked but its bytes are missing");
                Err(RegistryError::BlobUnknown(digest.clone()))
            }
        }?;
        Ok((read, range))
    }

    /// A URL where the storage serves the blob directly, when configured,
    /// for a blob visible in the repository.
    pub async fn blob_redirect(
        &self,
        name: &RepositoryName,
        digest: &Digest,
    ) -> Result<Option<String>> {
        let Some(url) = self.blobs.redirect_url(digest).await? else {
            return Ok(None);
        };
        self.stat_blob(name, digest).await?;
        Ok(Some(url))
    }

    pub async fn delete_blob(&self, name: &RepositoryName, digest: &Digest) -> Result<()> {
        let key = keys::link(name, digest);
        let Some(seen) = self.meta.get(key.as_bytes()).await? else {
            return Err(RegistryError::BlobUnknown(digest.clone()));
        };
        // The bytes stay until garbage collection: other repositories and
        // manifests may still reference them.
        self.meta
            .commit(
                Txn::new()
                    .require_version(key.clone(), seen.version)
                    .delete(key),
            )
            .await?;
        Ok(())
    }

    /// Makes a stored blob visible in `name`.
    pub(super) async fn commit_link(
        &self,
        name: &RepositoryName,
        digest: &Digest,
        size: u64,
    ) -> Result<()> {
        // An identical, recently confirmed link is left alone: rewriting it
        // would change its version and make concurrent manifest pushes that
        // guard on it retry.
        if self
            .link(name, digest)
            .await?
            .is_some_and(|l| l.size == size && !self.link_needs_refresh(&l))
        {
            return Ok(());
        }
        for _ in 0..TXN_ATTEMPTS {
            let seen = self.blob_record_for_link(digest, size).await?;
            let txn = Txn::new().put(
                keys::link(name, digest),
                encode(&LinkRecord::new(size, now_ms())),
            );
            let txn = self.guard_blob_record(txn, digest, size, seen.as_ref())?;
            let txn = self.ensure_repo(name, txn).await?;
            if self.meta.commit(txn).await? {
                return Ok(());
            }
        }
        Err(RegistryError::Store(berth_store::StoreError::Unavailable(
            "the blob kept changing while it was linked; retry".into(),
        )))
    }

    /// The registry-wide record of a blob about to be linked, after checking
    /// that its bytes are stored and not being removed. The link's commit
    /// must require this record unchanged: that is what orders it against
    /// `remove_unreferenced_blobs`, which marks the record before it looks
    /// for links and deletes bytes.
    pub(super) async fn blob_record_for_link(
        &self,
        digest: &Digest,
        size: u64,
    ) -> Result<Option<KeyValue>> {
        let seen = self.meta.get(keys::blob(digest).as_bytes()).await?;
        self.check_blob_for_link(digest, size, seen).await
    }

    /// As [`Self::blob_record_for_link`], with the record already read
    /// (`seen`, read before this call checks the bytes).
    pub(super) async fn check_blob_for_link(
        &self,
        digest: &Digest,
        size: u64,
        seen: Option<KeyValue>,
    ) -> Result<Option<KeyValue>> {
        if let Some(kv) = &seen {
            let record: BlobRecord = decode(&kv.key, &kv.value)?;
            if record
                .removing_since_ms
                .is_some_and(|since| now_ms().saturating_sub(since) < REMOVAL_MARK_STALE_MS)
            {
                return Err(RegistryError::Store(berth_store::StoreError::Unavailable(
                    format!("blob {digest} is being removed from storage; retry"),
                )));
            }
        }
        // Removed (bytes, then record) before `seen` was read: the bytes the
        // caller stored may be gone. A removal after this must mark the
        // record first, which fails the caller's commit.
        if self.blobs.stat(digest).await? != Some(size) {
            return Err(RegistryError::Store(berth_store::StoreError::Unavailable(
                format!("blob {digest} was removed from storage meanwhile; retry"),
            )));
        }
        Ok(seen)
    }

    /// Adds to a link's transaction the guard on the blob's registry-wide
    /// record: unchanged since `seen`. The record is written only when it
    /// is missing or carries a stale removal mark, so that concurrent links
    /// of one popular blob do not invalidate each other.
    pub(super) fn guard_blob_record(
        &self,
        txn: Txn,
        digest: &Digest,
        size: u64,
        seen: Option<&KeyValue>,
    ) -> Result<Txn> {
        let txn = txn.require_unchanged(keys::blob(digest), seen);
        let current = match seen {
            Some(kv) => {
                let record: BlobRecord = decode(&kv.key, &kv.value)?;
                record.size == size && record.removing_since_ms.is_none()
            }
            None => false,
        };
        Ok(if current {
            txn
        } else {
            txn.put(keys::blob(digest), encode(&BlobRecord::new(size)))
        })
    }

    /// The size of a blob stored anywhere in the registry, if it is and is
    /// not being removed.
    pub async fn stored_blob_size(&self, digest: &Digest) -> Result<Option<u64>> {
        Ok(self
            .get_record::<BlobRecord>(&keys::blob(digest))
            .await?
            .filter(|b| b.removing_since_ms.is_none())
            .map(|b| b.size))
    }

    /// Single-request upload (`POST ?digest=` or a PUT without session data).
    pub async fn put_blob(
        &self,
        name: &RepositoryName,
        digest: &Digest,
        body: ByteStream,
    ) -> Result<u64> {
        let size = self
            .blobs
            .put(digest, body, self.limits.max_blob_bytes)
            .await
            .map_err(RegistryError::from_put)?;
        self.commit_link(name, digest, size).await?;
        Ok(size)
    }

    /// Cross-repository mount. With `from`, the blob must be visible there;
    /// without it, anywhere in the registry. `None` when it cannot be mounted.
    pub async fn mount_blob(
        &self,
        name: &RepositoryName,
        digest: &Digest,
        from: Option<&RepositoryName>,
    ) -> Result<Option<u64>> {
        let known = match from {
            Some(from) => self.link(from, digest).await?.map(|l| l.size),
            None => self
                .get_record::<BlobRecord>(&keys::blob(digest))
                .await?
                .map(|b| b.size),
        };
        let Some(size) = known else { return Ok(None) };
        if self.stored_blob_size(digest).await? != Some(size) {
            // Being removed (or never recorded): not mountable; the client
            // uploads it instead.
            return Ok(None);
        }
        if self.blobs.stat(digest).await? != Some(size) {
            tracing::warn!(%digest, "mount source is recorded but its bytes are missing");
            return Ok(None);
        }
        self.commit_link(name, digest, size).await?;
        Ok(Some(size))
    }
}
