//! Manifests: parsing and validating a push, recording it with the links
//! and referrers it needs in one transaction, and serving it.

use berth_oci::{Descriptor, Digest, Manifest, ManifestKind, Reference, RepositoryName, Tag};
use berth_store::{ByteStream, Txn};
use bytes::Bytes;

use super::referrers::referrer_annotations;
use super::{Registry, Result, TXN_ATTEMPTS, backoff, changes, now_ms};
use crate::RegistryError;
use crate::keys;
use crate::records::{
    Change, LinkRecord, ManifestRecord, PlatformChild, Stamp, TagRecord, decode, encode,
};

pub struct ManifestContent {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
}

pub struct PutManifestOutcome {
    pub digest: Digest,
    pub subject: Option<Digest>,
}
impl Registry {
    pub(super) async fn manifest_bytes(&self, digest: &Digest, size: u64) -> Result<Option<Bytes>> {
        if let Some(bytes) = self.manifests.as_ref().and_then(|c| c.get(digest)) {
            return Ok(Some(bytes));
        }
        let bytes = self
            .blobs
            .read_small(digest, self.limits.max_manifest_bytes.max(size))
            .await?;
        if let (Some(cache), Some(b)) = (&self.manifests, &bytes) {
            cache.insert(digest.clone(), b.clone());
        }
        Ok(bytes)
    }

    /// Digests of every manifest recorded in the repository.
    pub async fn manifest_digests(&self, name: &RepositoryName) -> Result<Vec<Digest>> {
        let prefix = keys::manifest_prefix(name);
        Ok(self
            .scan_all(&prefix)
            .await?
            .into_iter()
            .filter_map(|kv| {
                std::str::from_utf8(&kv.key[prefix.len()..])
                    .ok()?
                    .parse()
                    .ok()
            })
            .collect())
    }

    /// Whether a manifest recorded in `name` references `digest`: the
    /// repository then has the right to its content (a cache may link a
    /// blob it holds elsewhere instead of fetching it again).
    pub async fn references_blob(&self, name: &RepositoryName, digest: &Digest) -> Result<bool> {
        for manifest in self.manifest_digests(name).await? {
            if let Some(record) = self.find_manifest(name, &manifest).await?
                && record.references.contains(digest)
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn resolve(&self, name: &RepositoryName, reference: &Reference) -> Result<Digest> {
        match reference {
            Reference::Digest(d) => Ok(d.clone()),
            Reference::Tag(tag) => {
                let record: TagRecord = self
                    .get_record(&keys::tag(name, tag.as_str()))
                    .await?
                    .ok_or(RegistryError::ManifestUnknown)?;
                Ok(record.digest)
            }
        }
    }

    async fn manifest_record(
        &self,
        name: &RepositoryName,
        digest: &Digest,
    ) -> Result<ManifestRecord> {
        self.get_record(&keys::manifest(name, digest))
            .await?
            .ok_or(RegistryError::ManifestUnknown)
    }

    /// Resolves a reference to the manifest to serve, honouring `accept`
    /// (the client's Accept header media types, empty when absent).
    ///
    /// A client that asks by tag and cannot accept an index or manifest list
    /// gets the index's linux/amd64 image, as CNCF Distribution does for old
    /// clients. A digest always names exact content and is never substituted.
    pub async fn manifest_head(
        &self,
        name: &RepositoryName,
        reference: &Reference,
        accept: &[String],
    ) -> Result<(Digest, ManifestRecord)> {
        let digest = self.resolve(name, reference).await?;
        let record = self.manifest_record(name, &digest).await?;
        if matches!(reference, Reference::Tag(_))
            && !accept.is_empty()
            && !accepts(accept, &record.media_type)
            && let Some(child) = record
                .platforms
                .iter()
                .find(|p| p.os == "linux" && p.architecture == "amd64")
            && let Ok(child_record) = self.manifest_record(name, &child.digest).await
            && accepts(accept, &child_record.media_type)
        {
            return Ok((child.digest.clone(), child_record));
        }
        Ok((digest, record))
    }

    pub async fn get_manifest(
        &self,
        name: &RepositoryName,
        reference: &Reference,
        accept: &[String],
    ) -> Result<ManifestContent> {
        let (digest, record) = self.manifest_head(name, reference, accept).await?;
        let bytes = self
            .manifest_bytes(&digest, record.size)
            .await?
            .ok_or_else(|| {
                tracing::error!(repository = %name, %digest, "manifest is recorded but its bytes are missing");
                RegistryError::ManifestUnknown
            })?;
        Ok(ManifestContent {
            digest,
            media_type: record.media_type,
            bytes,
        })
    }

    pub async fn put_manifest(
        &self,
        name: &RepositoryName,
        reference: &Reference,
        content_type: Option<&str>,
        bytes: Bytes,
    ) -> Result<PutManifestOutcome> {
        self.put_manifest_by(name, reference, content_type, bytes, None)
            .await
    }

    /// A push by `by` (`user:alice`), as tag history records it.
    pub async fn put_manifest_by(
        &self,
        name: &RepositoryName,
        reference: &Reference,
        content_type: Option<&str>,
        bytes: Bytes,
        by: Option<&str>,
    ) -> Result<PutManifestOutcome> {
        let (digest, manifest) = self.parse_manifest(reference, content_type, &bytes)?;
        // Everything the manifest references must exist before anything is
        // written, and must still exist when it is committed: each reference
        // is guarded by the version seen here, so a concurrent delete of a
        // layer or child makes the commit retry (and then fail with
        // MANIFEST_BLOB_UNKNOWN) instead of leaving a manifest that points at
        // nothing.
        let mut guards = self.reference_guards(name, &manifest).await?;
        let tag = match reference {
            Reference::Tag(tag) => Some(tag),
            Reference::Digest(_) => None,
        };
        // Bytes first, durable and verified; then the metadata commit.
        let size = bytes.len() as u64;
        self.put_manifest_bytes(&digest, bytes).await?;
        let change = match tag {
            Some(tag) => Change::Tag {
                repository: name.to_string(),
                tag: tag.as_str().to_string(),
                digest: digest.clone(),
                by: by.map(str::to_string),
            },
            None => Change::Manifest {
                repository: name.to_string(),
                digest: digest.clone(),
            },
        };
        for _ in 0..TXN_ATTEMPTS {
            // The tag as it is now, guarded: a replicated write of it that
            // lands meanwhile makes this attempt retry with a newer stamp,
            // so the push stays the last writer here as everywhere.
            // Read at once with the records the commit links: the
            // manifest's own blob record (still read before its bytes are
            // checked, below) and the repository's.
            let tombstone = keys::manifest_tombstone(name, &digest);
            let manifest_key = keys::manifest(name, &digest);
            let (blob_key, repo_key) = (keys::blob(&digest), keys::repo(name));
            let tag_keys = tag.map(|t| {
                (
                    keys::tag(name, t.as_str()),
                    keys::tag_tombstone(name, t.as_str()),
                )
            });
            let mut wanted = vec![
                tombstone.as_str(),
                manifest_key.as_str(),
                blob_key.as_str(),
                repo_key.as_str(),
            ];
            if let Some((tag_key, tomb_key)) = &tag_keys {
                wanted.extend([tag_key.as_str(), tomb_key.as_str()]);
            }
            let mut found = self.get_many(&wanted).await?.into_iter();
            let tombstone_seen = found.next().flatten();
            let manifest_seen = found.next().flatten();
            let blob_seen = found.next().flatten();
            let repo_seen = found.next().flatten();
            let tag_seen = found.next().flatten();
            let tag_tomb_seen = found.next().flatten();
            if let (Some(tag), Some(kv)) = (tag, &tag_seen) {
                let current: TagRecord = decode(&kv.key, &kv.value)?;
                if current.digest != digest {
                    self.check_mutable(name, tag.as_str(), &current.digest)?;
                }
            }
            // Newer than everything it overwrites, here and elsewhere.
            self.observe_record::<TagRecord>(tag_seen.as_ref());
            self.observe_record::<Stamp>(tag_tomb_seen.as_ref());
            self.observe_record::<Stamp>(tombstone_seen.as_ref());
            self.observe_record::<ManifestRecord>(manifest_seen.as_ref());
            let stamp = self.local_stamp();
            let (txn, subject) = self.manifest_writes(
                name,
                &digest,
                &manifest,
                tag.map(|t| (t, by)),
                Some(&stamp),
                size,
            );
            // As `manifest_txn` does, with the records read above.
            let blob_seen = self.check_blob_for_link(&digest, size, blob_seen).await?;
            let txn = self.guard_blob_record(txn, &digest, size, blob_seen.as_ref())?;
            let mut txn = super::with_repo(name, txn, repo_seen.is_some());
            // A delete's tombstone stays: the manifest is present because
            // this put is newer than it.
            // With replication, also the manifest as seen: a copy of it
            // from another region landing meanwhile (a newer stamp) makes
            // this attempt retry, newer still. Without, concurrent pushes
            // of one manifest under several tags must not fail each other.
            let replicated = self.region.is_some();
            txn = txn.require_unchanged(tombstone, tombstone_seen.as_ref());
            if replicated {
                txn = txn.require_unchanged(keys::manifest(name, &digest), manifest_seen.as_ref());
            }
            if let Some(tag) = tag {
                txn = txn
                    .require_unchanged(keys::tag(name, tag.as_str()), tag_seen.as_ref())
                    .require_unchanged(
                        keys::tag_tombstone(name, tag.as_str()),
                        tag_tomb_seen.as_ref(),
                    );
            }
            // An index's push is a put of its children too (in every region
            // alike), so a concurrent delete of a child cannot orphan it.
            let children: Vec<String> = manifest
                .children()
                .iter()
                .filter(|c| replicated && ManifestKind::from_media_type(&c.media_type).is_some())
                .map(|c| keys::manifest(name, &c.digest))
                .collect();
            let wanted: Vec<&str> = children.iter().map(String::as_str).collect();
            let found = self.get_many(&wanted).await?;
            for (key, kv) in children.into_iter().zip(found) {
                if let Some(kv) = kv {
                    let mut record: ManifestRecord = decode(&kv.key, &kv.value)?;
                    if record.stamp.as_ref() < Some(&stamp) {
                        record.stamp = Some(stamp.clone());
                        txn = txn.put(key, encode(&record));
                    }
                }
            }
            for guard in guards {
                txn = guard.apply(txn);
            }
            if self.commit_logged(txn, &stamp, change.clone()).await? {
                self.changes_committed();
                return Ok(PutManifestOutcome { digest, subject });
            }
            backoff().await;
            guards = self.reference_guards(name, &manifest).await?;
        }
        Err(changes::conflict("manifest push"))
    }

    /// Stores a manifest fetched from an upstream registry (and tags it, with
    /// `tag`). Unlike a push, its layers and children need not be here yet:
    /// a pull-through cache fetches them when a client asks. The content is
    /// verified against `digest`.
    pub async fn cache_manifest(
        &self,
        name: &RepositoryName,
        digest: &Digest,
        tag: Option<&Tag>,
        content_type: Option<&str>,
        bytes: Bytes,
    ) -> Result<ManifestRecord> {
        let reference = Reference::Digest(digest.clone());
        let (digest, manifest) = self.parse_manifest(&reference, content_type, &bytes)?;
        // Deleted here (a tombstone) in a replicating region: a copy from
        // elsewhere must not bring it back. Without replication a
        // tombstone only orders the change log, and a client that deleted
        // a cached image to have it fetched again gets it again.
        let tomb_key = keys::manifest_tombstone(name, &digest);
        let replicating = self.region.is_some();
        if replicating && self.meta.get(tomb_key.as_bytes()).await?.is_some() {
            return Err(RegistryError::ManifestUnknown);
        }
        let key = keys::manifest(name, &digest);
        let existing = self.meta.get(key.as_bytes()).await?;
        if existing.is_some() && tag.is_none() {
            return self.manifest_record(name, &digest).await;
        }
        let claims = self
            .link_claims(name, &manifest, MissingLink::Allowed)
            .await?;
        let (mut txn, _) = self
            .store_manifest(name, &digest, &manifest, tag, None, bytes)
            .await?;
        for claim in claims {
            txn = claim.apply(txn);
        }
        if replicating {
            txn = txn.require_absent(tomb_key);
        }
        if !self.meta.commit(txn).await? {
            return Err(changes::conflict("cached manifest"));
        }
        self.manifest_record(name, &digest).await
    }

    /// The manifest recorded in `name` under `digest`, if any.
    pub async fn find_manifest(
        &self,
        name: &RepositoryName,
        digest: &Digest,
    ) -> Result<Option<ManifestRecord>> {
        self.get_record(&keys::manifest(name, digest)).await
    }

    /// Checks a manifest's size, syntax and digest (which must match a
    /// digest reference). Writes nothing.
    pub(super) fn parse_manifest(
        &self,
        reference: &Reference,
        content_type: Option<&str>,
        bytes: &Bytes,
    ) -> Result<(Digest, Manifest)> {
        if bytes.len() as u64 > self.limits.max_manifest_bytes {
            return Err(RegistryError::TooLarge {
                limit: self.limits.max_manifest_bytes,
            });
        }
        let manifest = Manifest::parse(content_type, bytes)
            .map_err(|e| RegistryError::ManifestInvalid(e.to_string()))?;
        let digest = match reference {
            Reference::Digest(expected) => {
                let computed = Digest::of(expected.algorithm(), bytes);
                if &computed != expected {
                    return Err(RegistryError::DigestInvalid(format!(
                        "manifest digest {computed} does not match {expected}"
                    )));
                }
                computed
            }
            Reference::Tag(_) => Digest::sha256_of(bytes),
        };
        Ok((digest, manifest))
    }

    /// Stores a parsed manifest's bytes, durable and verified, and returns the
    /// metadata transaction that makes it visible (with its subject).
    async fn store_manifest(
        &self,
        name: &RepositoryName,
        digest: &Digest,
        manifest: &Manifest,
        tag: Option<&Tag>,
        stamp: Option<&Stamp>,
        bytes: Bytes,
    ) -> Result<(Txn, Option<Digest>)> {
        let size = bytes.len() as u64;
        self.put_manifest_bytes(digest, bytes).await?;
        self.manifest_txn(name, digest, manifest, tag.map(|t| (t, None)), stamp, size)
            .await
    }

    /// Stores manifest bytes, durable and verified.
    pub(super) async fn put_manifest_bytes(&self, digest: &Digest, bytes: Bytes) -> Result<()> {
        let body: ByteStream = Box::pin(futures_util::stream::iter([Ok(bytes)]));
        self.blobs
            .put(digest, body, self.limits.max_manifest_bytes)
            .await
            .map_err(RegistryError::from_put)?;
        Ok(())
    }

    /// The metadata writes that make a stored manifest visible (tagged with
    /// `tag`, pushed by whom its history names), and its subject.
    pub(super) async fn manifest_txn(
        &self,
        name: &RepositoryName,
        digest: &Digest,
        manifest: &Manifest,
        tag: Option<(&Tag, Option<&str>)>,
        stamp: Option<&Stamp>,
        size: u64,
    ) -> Result<(Txn, Option<Digest>)> {
        let (txn, subject) = self.manifest_writes(name, digest, manifest, tag, stamp, size);
        // The manifest's own bytes are a blob like any other: the commit
        // is ordered against their removal the way a link's is.
        let seen = self.blob_record_for_link(digest, size).await?;
        let txn = self.guard_blob_record(txn, digest, size, seen.as_ref())?;
        let txn = self.ensure_repo(name, txn).await?;
        Ok((txn, subject))
    }

    /// The writes of [`Self::manifest_txn`], before its guards on the
    /// manifest's blob record and its repository's.
    fn manifest_writes(
        &self,
        name: &RepositoryName,
        digest: &Digest,
        manifest: &Manifest,
        tag: Option<(&Tag, Option<&str>)>,
        stamp: Option<&Stamp>,
        size: u64,
    ) -> (Txn, Option<Digest>) {
        let mut platforms = Vec::new();
        for child in manifest.children() {
            if let Some(p) = child.platform.as_ref()
                && let (Some(os), Some(arch)) = (
                    p.get("os").and_then(|v| v.as_str()),
                    p.get("architecture").and_then(|v| v.as_str()),
                )
            {
                platforms.push(PlatformChild {
                    digest: child.digest.clone(),
                    os: os.to_string(),
                    architecture: arch.to_string(),
                });
            }
        }

        let media_type = manifest.kind.media_type().to_string();
        let subject = manifest.subject.as_ref().map(|s| s.digest.clone());
        let record = ManifestRecord {
            media_type: media_type.clone(),
            size,
            subject: subject.clone(),
            artifact_type: manifest.referrer_artifact_type(),
            platforms,
            references: manifest
                .required_blobs()
                .chain(manifest.children())
                .map(|d| d.digest.clone())
                .collect(),
            created_ms: now_ms(),
            stamp: stamp.cloned(),
        };
        let mut txn = Txn::new().put(keys::manifest(name, digest), encode(&record));
        if let Some((tag, by)) = tag {
            txn = txn.put(
                keys::tag(name, tag.as_str()),
                encode(&TagRecord {
                    digest: digest.clone(),
                    updated_ms: now_ms(),
                    stamp: stamp.cloned(),
                }),
            );
            if let Some(stamp) = stamp {
                txn = txn.put(
                    keys::tag_history(name, tag.as_str(), stamp),
                    encode(&crate::records::TagHistoryEntry {
                        digest: digest.clone(),
                        stamp: stamp.clone(),
                        by: by.map(str::to_string),
                    }),
                );
            }
        }
        if let Some(subject) = &subject {
            let descriptor = Descriptor {
                media_type,
                digest: digest.clone(),
                size,
                artifact_type: record.artifact_type.clone(),
                annotations: referrer_annotations(manifest, digest),
                urls: None,
                platform: None,
            };
            txn = txn.put(
                keys::referrer(name, subject, digest),
                serde_json::to_vec(&descriptor).unwrap_or_default(),
            );
        }
        (txn, subject)
    }

    /// The metadata keys a manifest's references live under, with their
    /// current versions. Fails with `MANIFEST_BLOB_UNKNOWN` on the first
    /// missing one: layers and config must be blobs of the repository, index
    /// entries manifests of it (or blobs, for non-manifest entries).
    async fn reference_guards(
        &self,
        name: &RepositoryName,
        manifest: &Manifest,
    ) -> Result<Vec<Guard>> {
        let mut guards = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        let blobs = manifest
            .required_blobs()
            .map(|d| (keys::link(name, &d.digest), true, d));
        let children = manifest.children().iter().map(|d| {
            if ManifestKind::from_media_type(&d.media_type).is_some() {
                (keys::manifest(name, &d.digest), false, d)
            } else {
                (keys::link(name, &d.digest), true, d)
            }
        });
        let wanted: Vec<_> = blobs
            .chain(children)
            .filter(|(key, _, _)| seen.insert(key.clone()))
            .collect();
        let lookup: Vec<&str> = wanted.iter().map(|(key, _, _)| key.as_str()).collect();
        let found = self.get_many(&lookup).await?;
        // Checked in the manifest's order: the first missing one is named.
        for ((key, is_link, descriptor), kv) in wanted.into_iter().zip(found) {
            let Some(kv) = kv else {
                return Err(RegistryError::ManifestBlobUnknown(
                    descriptor.digest.clone(),
                ));
            };
            // A link the collector has marked is claimed back: the commit
            // clears the mark, which makes the collector's removal fail.
            let rewrite = if is_link {
                let link: LinkRecord = decode(&kv.key, &kv.value)?;
                link.removing_since_ms
                    .is_some()
                    .then(|| encode(&LinkRecord::new(link.size, now_ms())))
            } else {
                None
            };
            guards.push(Guard {
                key,
                version: kv.version,
                rewrite,
            });
        }
        Ok(guards)
    }
}

/// A key a manifest's commit requires at a version, and what it writes
/// there (a link claimed back from the collector).
pub(super) struct Guard {
    key: String,
    version: u64,
    rewrite: Option<Vec<u8>>,
}

impl Guard {
    /// Adds the guard (and its rewrite) to a commit.
    pub(super) fn apply(self, txn: Txn) -> Txn {
        let txn = txn.require_version(self.key.clone(), self.version);
        match self.rewrite {
            Some(rewrite) => txn.put(self.key, rewrite),
            None => txn,
        }
    }
}

/// What a manifest's commit does about a layer or config link that is not
/// there.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum MissingLink {
    /// A copy from another region copied its blobs first: a link gone since
    /// was collected meanwhile, and the copy retries (and copies it again).
    Retry,
    /// A pull-through cache fetches blobs when a client asks for them.
    Allowed,
}

impl Registry {
    /// Guards on the links of a manifest's layers and config that a commit
    /// of a copied manifest (replicated or cached) needs: each required at
    /// the version seen, and claimed back from the collector if it marked
    /// it, so that a collector cannot remove a link the commit relies on.
    pub(super) async fn link_claims(
        &self,
        name: &RepositoryName,
        manifest: &Manifest,
        missing: MissingLink,
    ) -> Result<Vec<Guard>> {
        let mut guards = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for descriptor in manifest.required_blobs() {
            let key = keys::link(name, &descriptor.digest);
            if !seen.insert(key.clone()) {
                continue;
            }
            let Some(kv) = self.meta.get(key.as_bytes()).await? else {
                if missing == MissingLink::Retry {
                    return Err(RegistryError::Store(berth_store::StoreError::Unavailable(
                        format!(
                            "blob {} was removed while the manifest was copied; retry",
                            descriptor.digest
                        ),
                    )));
                }
                continue;
            };
            let link: LinkRecord = decode(&kv.key, &kv.value)?;
            let rewrite = link
                .removing_since_ms
                .is_some()
                .then(|| encode(&LinkRecord::new(link.size, now_ms())));
            guards.push(Guard {
                key,
                version: kv.version,
                rewrite,
            });
        }
        Ok(guards)
    }
}

pub(super) fn accepts(accept: &[String], media_type: &str) -> bool {
    accept
        .iter()
        .any(|a| a == media_type || a == "*/*" || a == "application/*")
}
