//! Restoring chosen repositories of a backup into a live registry: the
//! "I deleted the wrong repository" case. Unlike a whole restore it writes
//! nothing raw: blobs go in through `put_blob` (verified, linked under the
//! removal protocol), manifests and tags through `put_manifest`, so each is
//! an ordinary push there (stamped, in tag history, replicated to peer
//! regions, refused by immutability rules). A tag that moved in the
//! registry after the backup was taken is left where it is, unless asked
//! to force it back.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use berth_oci::{Digest, Reference, RepositoryName, Tag};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{BackupError, Target};
use crate::records::{ManifestRecord, TagRecord, decode};
use crate::{NameMatcher, Registry, keys};

/// What a restore of chosen repositories did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SelectiveReport {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub phase: String,
    pub repositories: u64,
    pub manifests: u64,
    pub tags: u64,
    /// Tags already at the backup's digest.
    pub unchanged: u64,
    /// `REPO:TAG` moved in the registry after the backup: left alone.
    pub kept_newer: Vec<String>,
    pub blobs: u64,
    pub bytes: u64,
    /// What could not be restored, and why.
    pub failed: Vec<String>,
    pub duration_ms: u64,
}

pub type SelectiveProgress = tokio::sync::watch::Sender<SelectiveReport>;

/// What the backup holds of one repository.
#[derive(Default)]
struct Held {
    manifests: HashMap<Digest, ManifestRecord>,
    tags: Vec<(String, TagRecord)>,
}

/// The repository a record's key belongs to, for the families a selective
/// restore reads.
fn repository_of(key: &str) -> Option<(&str, &str)> {
    let (family, rest) = if let Some(rest) = key.strip_prefix(keys::TAG_PREFIX) {
        ("tag", rest)
    } else if let Some(rest) = key.strip_prefix(keys::MANIFEST_PREFIX) {
        ("manifest", rest)
    } else {
        return None;
    };
    let (repo, _) = rest.split_once(':')?;
    Some((family, repo))
}

impl Registry {
    /// Restores the repositories `chosen` matches from backup `id` (the
    /// newest when `None`). With `force`, tags that moved since the backup
    /// move back too. `by` names who asked, as tag history records it.
    pub async fn restore_repositories(
        &self,
        target: &Target,
        id: Option<&str>,
        chosen: &NameMatcher,
        force: bool,
        by: Option<&str>,
        progress: Option<&SelectiveProgress>,
    ) -> Result<SelectiveReport, BackupError> {
        let started = Instant::now();
        let index = target.pick(id).await?;
        let mut report = SelectiveReport {
            id: index.id.clone(),
            phase: "records".into(),
            ..SelectiveReport::default()
        };
        let publish = |report: &SelectiveReport| {
            if let Some(progress) = progress {
                let mut shown = report.clone();
                shown.duration_ms = started.elapsed().as_millis() as u64;
                progress.send_replace(shown);
            }
        };
        publish(&report);
        let mut held: HashMap<String, Held> = HashMap::new();
        for chunk in &index.chunks {
            for (key, value) in target.chunk(chunk).await? {
                let Ok(text) = std::str::from_utf8(&key) else {
                    continue;
                };
                let Some((family, repo)) = repository_of(text) else {
                    continue;
                };
                if !chosen(repo) {
                    continue;
                }
                let entry = held.entry(repo.to_string()).or_default();
                if family == "manifest" {
                    if let Some(digest) = keys::manifest_key_digest(&key) {
                        entry.manifests.insert(digest, decode(&key, &value)?);
                    }
                } else if let Some((_, tag)) = text
                    .strip_prefix(keys::TAG_PREFIX)
                    .and_then(|r| r.split_once(':'))
                {
                    entry.tags.push((tag.to_string(), decode(&key, &value)?));
                }
            }
        }
        report.repositories = held.len() as u64;
        report.phase = "manifests".into();
        publish(&report);
        let lacking = index.lacking();
        let mut repositories: Vec<_> = held.into_iter().collect();
        repositories.sort_by(|a, b| a.0.cmp(&b.0));
        for (repo, content) in repositories {
            let Ok(name) = RepositoryName::parse(&repo) else {
                report.failed.push(format!("{repo}: not a repository name"));
                continue;
            };
            let mut done: HashSet<Digest> = HashSet::new();
            let mut digests: Vec<&Digest> = content.manifests.keys().collect();
            digests.sort();
            for digest in digests {
                if let Err(e) = self
                    .restore_manifest(
                        target,
                        &name,
                        digest,
                        &content.manifests,
                        &lacking,
                        &mut done,
                        0,
                        &mut report,
                    )
                    .await
                {
                    report.failed.push(format!("{repo}@{digest}: {e}"));
                }
                publish(&report);
            }
            for (tag, record) in &content.tags {
                let outcome = self
                    .restore_one_tag(target, &name, tag, record, &content.manifests, force, by)
                    .await;
                match outcome {
                    Ok(TagOutcome::Moved) => report.tags += 1,
                    Ok(TagOutcome::Unchanged) => report.unchanged += 1,
                    Ok(TagOutcome::KeptNewer) => report.kept_newer.push(format!("{repo}:{tag}")),
                    Err(e) => report.failed.push(format!("{repo}:{tag}: {e}")),
                }
            }
        }
        report.phase = "done".into();
        report.duration_ms = started.elapsed().as_millis() as u64;
        publish(&report);
        Ok(report)
    }

    /// A manifest of the backup into `name`: its children, then its blobs,
    /// then itself, skipping what is there.
    #[allow(clippy::too_many_arguments)]
    fn restore_manifest<'a>(
        &'a self,
        target: &'a Target,
        name: &'a RepositoryName,
        digest: &'a Digest,
        manifests: &'a HashMap<Digest, ManifestRecord>,
        lacking: &'a HashSet<Digest>,
        done: &'a mut HashSet<Digest>,
        depth: usize,
        report: &'a mut SelectiveReport,
    ) -> futures_util::future::BoxFuture<'a, Result<(), BackupError>> {
        Box::pin(async move {
            if !done.insert(digest.clone()) {
                return Ok(());
            }
            if self.find_manifest(name, digest).await?.is_some() {
                return Ok(());
            }
            let Some(record) = manifests.get(digest) else {
                return Err(BackupError::NotFound(format!(
                    "manifest {digest} of {name}"
                )));
            };
            for reference in &record.references {
                if manifests.contains_key(reference) {
                    if depth < 8 {
                        self.restore_manifest(
                            target,
                            name,
                            reference,
                            manifests,
                            lacking,
                            done,
                            depth + 1,
                            report,
                        )
                        .await?;
                    }
                    continue;
                }
                if self.stat_blob(name, reference).await.is_ok() {
                    continue;
                }
                if lacking.contains(reference) {
                    return Err(BackupError::NotFound(format!(
                        "blob {reference} (the backup lacks it)"
                    )));
                }
                let read = target.blobs.read(reference, None).await?.ok_or_else(|| {
                    BackupError::NotFound(format!("blob {reference} in the target"))
                })?;
                let size = self.put_blob(name, reference, read.stream).await?;
                report.blobs += 1;
                report.bytes += size;
            }
            let bytes = self.backup_manifest_bytes(target, digest, record).await?;
            self.put_manifest(
                name,
                &Reference::Digest(digest.clone()),
                Some(&record.media_type),
                bytes,
            )
            .await?;
            report.manifests += 1;
            Ok(())
        })
    }

    async fn backup_manifest_bytes(
        &self,
        target: &Target,
        digest: &Digest,
        record: &ManifestRecord,
    ) -> Result<Bytes, BackupError> {
        target
            .blobs
            .read_small(digest, record.size.max(1))
            .await?
            .ok_or_else(|| BackupError::NotFound(format!("manifest {digest} in the target")))
    }

    #[allow(clippy::too_many_arguments)]
    async fn restore_one_tag(
        &self,
        target: &Target,
        name: &RepositoryName,
        tag: &str,
        record: &TagRecord,
        manifests: &HashMap<Digest, ManifestRecord>,
        force: bool,
        by: Option<&str>,
    ) -> Result<TagOutcome, BackupError> {
        let parsed =
            Tag::parse(tag).map_err(|_| BackupError::Corrupt(format!("tag {tag:?} of {name}")))?;
        let live = self.get_record::<TagRecord>(&keys::tag(name, tag)).await?;
        if let Some(live) = &live {
            if live.digest == record.digest {
                return Ok(TagOutcome::Unchanged);
            }
            // Moved here after the backup: a newer decision than the
            // backup's, kept unless forced.
            let newer = match (&live.stamp, &record.stamp) {
                (Some(l), Some(b)) => l > b,
                (Some(_), None) => true,
                (None, _) => live.updated_ms > record.updated_ms,
            };
            if newer && !force {
                return Ok(TagOutcome::KeptNewer);
            }
        }
        let media = manifests.get(&record.digest).ok_or_else(|| {
            BackupError::NotFound(format!("manifest {} of {name}", record.digest))
        })?;
        let bytes = self
            .backup_manifest_bytes(target, &record.digest, media)
            .await?;
        self.put_manifest_by(
            name,
            &Reference::Tag(parsed),
            Some(&media.media_type),
            bytes,
            by,
        )
        .await?;
        Ok(TagOutcome::Moved)
    }
}

enum TagOutcome {
    Moved,
    Unchanged,
    KeptNewer,
}
