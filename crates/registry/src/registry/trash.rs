//! The trash: manifests and tags that clients deleted, kept for
//! `trash_retention_ms` so that an operator can bring them back
//! byte-identical (`berth undelete`). While an entry is there, garbage
//! collection treats its manifest as present: its bytes stay, and so do the
//! links of everything it references. Past the retention the collector
//! empties the entry, and the content becomes garbage like any other.
//!
//! An undelete is a push of the kept manifest (and of the tags the delete
//! removed, where no tag of that name exists since): it is logged and
//! replicated like a push, so in a geo-replicated registry the trash of the
//! region where the delete happened brings the image back everywhere.

use berth_oci::{Digest, Reference, RepositoryName, Tag};
use berth_store::{KeyValue, Txn};

use super::{Registry, Result, now_ms};
use crate::RegistryError;
use crate::keys;
use crate::records::{TrashedManifest, TrashedTag, decode};

/// One entry of the trash, as `berth trash ls` shows it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct TrashEntry {
    pub repository: String,
    /// The manifest deleted, or the one the deleted tag pointed at.
    pub digest: Digest,
    /// `None` for a manifest deleted by digest (with `tags`), the tag's name
    /// for a tag deleted by tag.
    pub tag: Option<String>,
    /// The tags a manifest's delete removed with it.
    #[serde(default)]
    pub tags: Vec<String>,
    pub size: Option<u64>,
    pub deleted_ms: u64,
    /// When garbage collection may empty it.
    pub expires_ms: u64,
    pub by: Option<String>,
}

/// What an undelete brought back.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Undeleted {
    pub repository: String,
    pub digest: Digest,
    /// Tags pointed at it again.
    pub tags: Vec<String>,
    /// Tags the delete removed that exist again with another target, left
    /// alone (`berth tags restore` moves them).
    pub skipped: Vec<String>,
}

impl Registry {
    fn trash_expired(&self, deleted_ms: u64, now: u64) -> bool {
        deleted_ms.saturating_add(self.limits.trash_retention_ms) <= now
    }

    /// Every trashed manifest (of one repository, or all): its key and
    /// entry.
    pub(super) async fn trashed_manifests(
        &self,
        name: Option<&str>,
    ) -> Result<Vec<(KeyValue, TrashedManifest)>> {
        let prefix = match name {
            Some(name) => format!("{}{name}@", keys::TRASH_MANIFEST_PREFIX),
            None => keys::TRASH_MANIFEST_PREFIX.to_string(),
        };
        let mut out = Vec::new();
        for kv in self.scan_all(&prefix).await? {
            let entry: TrashedManifest = decode(&kv.key, &kv.value)?;
            out.push((kv, entry));
        }
        Ok(out)
    }

    /// Trashed manifests still within the retention, by repository, with
    /// their digests (what garbage collection must keep).
    pub(super) async fn live_trash(
        &self,
        name: Option<&str>,
    ) -> Result<Vec<(String, Digest, TrashedManifest)>> {
        let now = now_ms();
        let mut out = Vec::new();
        for (kv, entry) in self.trashed_manifests(name).await? {
            if self.trash_expired(entry.deleted_ms, now) {
                continue;
            }
            if let Some((repository, digest)) = keys::trash_manifest_parts(&kv.key) {
                out.push((repository.to_string(), digest, entry));
            }
        }
        Ok(out)
    }

    /// Removes the entries past the retention; returns how many. Each goes
    /// by a compare-and-swap, so an entry written again meanwhile (a newer
    /// delete) stays.
    pub(super) async fn empty_expired_trash(&self, dry_run: bool) -> Result<u64> {
        let now = now_ms();
        let mut expired = Vec::new();
        for (kv, entry) in self.trashed_manifests(None).await? {
            if self.trash_expired(entry.deleted_ms, now) {
                expired.push(kv);
            }
        }
        for kv in self.scan_all(keys::TRASH_TAG_PREFIX).await? {
            let entry: TrashedTag = decode(&kv.key, &kv.value)?;
            if self.trash_expired(entry.deleted_ms, now) {
                expired.push(kv);
            }
        }
        if dry_run {
            return Ok(expired.len() as u64);
        }
        let mut emptied = 0;
        for kv in expired {
            let txn = Txn::new()
                .require_version(kv.key.clone(), kv.version)
                .delete(kv.key);
            if self.meta.commit(txn).await? {
                emptied += 1;
            }
        }
        Ok(emptied)
    }

    /// The trash, newest first (of one repository, or all).
    pub async fn trash(&self, name: Option<&RepositoryName>) -> Result<Vec<TrashEntry>> {
        let repository = name.map(|n| n.to_string());
        let mut out = Vec::new();
        for (kv, entry) in self.trashed_manifests(repository.as_deref()).await? {
            let Some((repository, digest)) = keys::trash_manifest_parts(&kv.key) else {
                continue;
            };
            out.push(TrashEntry {
                repository: repository.to_string(),
                digest,
                tag: None,
                tags: entry.tags,
                size: Some(entry.record.size),
                deleted_ms: entry.deleted_ms,
                expires_ms: entry
                    .deleted_ms
                    .saturating_add(self.limits.trash_retention_ms),
                by: entry.by,
            });
        }
        let prefix = match &repository {
            Some(name) => format!("{}{name}:", keys::TRASH_TAG_PREFIX),
            None => keys::TRASH_TAG_PREFIX.to_string(),
        };
        for kv in self.scan_all(&prefix).await? {
            let Some((repository, tag)) = keys::trash_tag_parts(&kv.key) else {
                continue;
            };
            let entry: TrashedTag = decode(&kv.key, &kv.value)?;
            out.push(TrashEntry {
                repository: repository.to_string(),
                digest: entry.digest,
                tag: Some(tag.to_string()),
                tags: Vec::new(),
                size: None,
                deleted_ms: entry.deleted_ms,
                expires_ms: entry
                    .deleted_ms
                    .saturating_add(self.limits.trash_retention_ms),
                by: entry.by,
            });
        }
        out.sort_by_key(|e| std::cmp::Reverse(e.deleted_ms));
        Ok(out)
    }

    /// Brings back a deleted manifest (`REPO@DIGEST`, with the tags its
    /// delete removed) or a deleted tag (`REPO:TAG`, with its manifest if
    /// that was deleted too).
    pub async fn undelete(
        &self,
        name: &RepositoryName,
        reference: &Reference,
        by: Option<&str>,
    ) -> Result<Undeleted> {
        match reference {
            Reference::Digest(digest) => self.undelete_manifest(name, digest, by).await,
            Reference::Tag(tag) => self.undelete_tag(name, tag, by).await,
        }
    }

    async fn undelete_manifest(
        &self,
        name: &RepositoryName,
        digest: &Digest,
        by: Option<&str>,
    ) -> Result<Undeleted> {
        let key = keys::trash_manifest(name, digest);
        let Some(kv) = self.meta.get(key.as_bytes()).await? else {
            return Err(RegistryError::ManifestUnknown);
        };
        let entry: TrashedManifest = decode(&kv.key, &kv.value)?;
        if self.trash_expired(entry.deleted_ms, now_ms()) {
            // Garbage collection may be taking its content right now.
            return Err(RegistryError::ManifestUnknown);
        }
        let Some(bytes) = self.manifest_bytes(digest, entry.record.size).await? else {
            return Err(RegistryError::ManifestUnknown);
        };
        let media_type = entry.record.media_type.clone();
        self.put_manifest_by(
            name,
            &Reference::Digest(digest.clone()),
            Some(&media_type),
            bytes.clone(),
            by,
        )
        .await?;
        let mut restored = Vec::new();
        let mut skipped = Vec::new();
        for tag in &entry.tags {
            let Ok(parsed) = Tag::parse(tag) else {
                continue;
            };
            match self.find_tag(name, &parsed).await? {
                Some(current) if &current != digest => skipped.push(tag.clone()),
                Some(_) => restored.push(tag.clone()),
                None => {
                    self.put_manifest_by(
                        name,
                        &Reference::Tag(parsed),
                        Some(&media_type),
                        bytes.clone(),
                        by,
                    )
                    .await?;
                    restored.push(tag.clone());
                }
            }
        }
        // Out of the trash (unless a newer delete put it there again).
        let txn = Txn::new()
            .require_version(kv.key.clone(), kv.version)
            .delete(kv.key);
        self.meta.commit(txn).await?;
        Ok(Undeleted {
            repository: name.to_string(),
            digest: digest.clone(),
            tags: restored,
            skipped,
        })
    }

    async fn undelete_tag(
        &self,
        name: &RepositoryName,
        tag: &Tag,
        by: Option<&str>,
    ) -> Result<Undeleted> {
        if let Some(current) = self.find_tag(name, tag).await? {
            return Err(RegistryError::ManifestInvalid(format!(
                "{name}:{tag} exists (it points at {current}); `berth tags restore` moves it",
                tag = tag.as_str()
            )));
        }
        let key = keys::trash_tag(name, tag.as_str());
        let tag_entry = match self.meta.get(key.as_bytes()).await? {
            Some(kv) => {
                let entry: TrashedTag = decode(&kv.key, &kv.value)?;
                (!self.trash_expired(entry.deleted_ms, now_ms())).then_some((kv, entry))
            }
            None => None,
        };
        let Some((kv, entry)) = tag_entry else {
            // Deleted with its manifest: the manifest's entry names it.
            let repository = name.to_string();
            for (_, digest, trashed) in self.live_trash(Some(&repository)).await? {
                if trashed.tags.iter().any(|t| t == tag.as_str()) {
                    return self.undelete_manifest(name, &digest, by).await;
                }
            }
            return Err(RegistryError::ManifestUnknown);
        };
        let digest = entry.digest.clone();
        if self.find_manifest(name, &digest).await?.is_none() {
            self.undelete_manifest(name, &digest, by).await?;
        }
        self.restore_tag(name, tag, &digest, by).await?;
        let txn = Txn::new()
            .require_version(kv.key.clone(), kv.version)
            .delete(kv.key);
        self.meta.commit(txn).await?;
        Ok(Undeleted {
            repository: name.to_string(),
            digest,
            tags: vec![tag.as_str().to_string()],
            skipped: Vec::new(),
        })
    }
}
