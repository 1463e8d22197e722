//! Retention: rules that delete old tags and untagged manifests of the
//! repositories they name. A plan is computed first (what `berth retention
//! plan` prints), then applied by deletes that go to the trash like a
//! client's and that each re-check, inside their own transaction, that what
//! was planned is unchanged (a tag still at the planned digest, a manifest
//! still untagged), so a push racing the job is never undone.
//!
//! Never deleted by a rule: tags an immutable rule covers, tags matching a
//! rule's `keep_tags`, manifests an index of the repository references
//! (its platforms), and referrers (signatures, SBOMs) whose subject is in
//! the repository.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use berth_oci::{Digest, RepositoryName, Tag};

use super::deletion::Deleter;
use super::{Registry, Result, now_ms};
use crate::RegistryError;
use crate::keys;
use crate::records::{ManifestRecord, TagRecord, decode};

/// A pattern test on a name (repository or tag); the registry knows nothing
/// of the patterns' syntax.
pub type NameMatcher = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// One `[[retention]]` rule. A repository follows the first rule that names
/// it.
#[derive(Clone)]
pub struct RetentionRule {
    pub repositories: NameMatcher,
    /// Keep the N most recently pushed tags.
    pub keep_last: Option<usize>,
    /// Keep tags pushed within this many milliseconds.
    pub keep_newer_than_ms: Option<u64>,
    /// Tags always kept (`latest`, `v*`).
    pub keep_tags: NameMatcher,
    /// Delete manifests no tag points at once they are this old.
    pub untagged_older_than_ms: Option<u64>,
}

/// A tag a plan deletes.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PlannedTag {
    pub repository: String,
    pub tag: String,
    pub digest: Digest,
    pub pushed_ms: u64,
}

/// An untagged manifest a plan deletes.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PlannedManifest {
    pub repository: String,
    pub digest: Digest,
    pub created_ms: u64,
    pub size: u64,
}

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct RetentionPlan {
    pub repositories: u64,
    pub tags: Vec<PlannedTag>,
    pub manifests: Vec<PlannedManifest>,
    /// Tags a rule would delete but an immutable rule keeps.
    pub immutable_kept: u64,
}

/// What applying a plan did.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct RetentionReport {
    pub tags_deleted: u64,
    pub manifests_deleted: u64,
    /// Planned deletes left alone because the tag or manifest changed.
    pub changed: u64,
}

impl Registry {
    /// What the rules would delete now.
    pub async fn retention_plan(&self, rules: &[RetentionRule]) -> Result<RetentionPlan> {
        let mut plan = RetentionPlan::default();
        if rules.is_empty() {
            return Ok(plan);
        }
        let now = now_ms();
        for kv in self.scan_all(keys::REPO_PREFIX).await? {
            let repository =
                String::from_utf8_lossy(&kv.key[keys::REPO_PREFIX.len()..]).into_owned();
            let Some(rule) = rules.iter().find(|r| (r.repositories)(&repository)) else {
                continue;
            };
            let Ok(name) = RepositoryName::parse(&repository) else {
                continue;
            };
            plan.repositories += 1;
            self.plan_repository(&name, rule, now, &mut plan).await?;
        }
        Ok(plan)
    }

    async fn plan_repository(
        &self,
        name: &RepositoryName,
        rule: &RetentionRule,
        now: u64,
        plan: &mut RetentionPlan,
    ) -> Result<()> {
        let prefix = keys::tag_prefix(name);
        let mut tags: Vec<(String, TagRecord)> = Vec::new();
        for kv in self.scan_all(&prefix).await? {
            let tag = String::from_utf8_lossy(&kv.key[prefix.len()..]).into_owned();
            tags.push((tag, decode(&kv.key, &kv.value)?));
        }
        // Newest first; ties by name, so that a plan is the same every time.
        tags.sort_by(|a, b| b.1.updated_ms.cmp(&a.1.updated_ms).then(a.0.cmp(&b.0)));
        let tags_rule = rule.keep_last.is_some() || rule.keep_newer_than_ms.is_some();
        let mut tagged: HashSet<Digest> = HashSet::new();
        for (i, (tag, record)) in tags.iter().enumerate() {
            let kept = !tags_rule
                || rule.keep_last.is_some_and(|n| i < n)
                || rule
                    .keep_newer_than_ms
                    .is_some_and(|ms| now.saturating_sub(record.updated_ms) < ms)
                || (rule.keep_tags)(tag);
            let immutable = self
                .immutable
                .as_ref()
                .is_some_and(|covers| covers(name, tag));
            if kept || immutable {
                plan.immutable_kept += u64::from(!kept && immutable);
                tagged.insert(record.digest.clone());
                continue;
            }
            plan.tags.push(PlannedTag {
                repository: name.to_string(),
                tag: tag.clone(),
                digest: record.digest.clone(),
                pushed_ms: record.updated_ms,
            });
        }
        let Some(untagged_ms) = rule.untagged_older_than_ms else {
            return Ok(());
        };
        // Untagged after the planned tag deletes too; kept: children of an
        // index and referrers whose subject stays.
        let mut manifests: HashMap<Digest, ManifestRecord> = HashMap::new();
        let prefix = keys::manifest_prefix(name);
        for kv in self.scan_all(&prefix).await? {
            if let Some(digest) = keys::manifest_key_digest(&kv.key) {
                manifests.insert(digest, decode(&kv.key, &kv.value)?);
            }
        }
        let children: HashSet<&Digest> = manifests
            .values()
            .flat_map(|m| m.platforms.iter().map(|p| &p.digest).chain(&m.references))
            .filter(|d| manifests.contains_key(*d))
            .collect();
        let mut planned: Vec<PlannedManifest> = manifests
            .iter()
            .filter(|(digest, record)| {
                !tagged.contains(*digest)
                    && !children.contains(digest)
                    && !record
                        .subject
                        .as_ref()
                        .is_some_and(|s| manifests.contains_key(s))
                    && now.saturating_sub(record.created_ms) >= untagged_ms
            })
            .map(|(digest, record)| PlannedManifest {
                repository: name.to_string(),
                digest: digest.clone(),
                created_ms: record.created_ms,
                size: record.size,
            })
            .collect();
        planned.sort_by(|a, b| a.digest.cmp(&b.digest));
        plan.manifests.extend(planned);
        Ok(())
    }

    /// Applies a plan: each delete goes to the trash and happens only if
    /// what it planned is unchanged.
    pub async fn apply_retention(&self, plan: &RetentionPlan) -> Result<RetentionReport> {
        let mut report = RetentionReport::default();
        for planned in &plan.tags {
            let (Ok(name), Ok(tag)) = (
                RepositoryName::parse(&planned.repository),
                Tag::parse(&planned.tag),
            ) else {
                continue;
            };
            let deleted = self
                .delete_tag(&name, &tag, Deleter::Rule(Some(&planned.digest)))
                .await;
            if happened(deleted)? {
                report.tags_deleted += 1;
            } else {
                report.changed += 1;
            }
        }
        for planned in &plan.manifests {
            let Ok(name) = RepositoryName::parse(&planned.repository) else {
                continue;
            };
            let deleted = self
                .delete_manifest_by_digest(&name, &planned.digest, Deleter::Rule(None))
                .await;
            if happened(deleted)? {
                report.manifests_deleted += 1;
            } else {
                report.changed += 1;
            }
        }
        Ok(report)
    }
}

/// Whether a planned delete happened: `false` when what it planned changed
/// meanwhile (moved, tagged, gone, or covered by an immutable rule since).
fn happened(result: Result<()>) -> Result<bool> {
    match result {
        Ok(()) => Ok(true),
        Err(
            RegistryError::Changed(_)
            | RegistryError::ManifestUnknown
            | RegistryError::TagImmutable { .. },
        ) => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use berth_oci::Reference;
    use berth_store::blob::fs::FsOptions;
    use berth_store::{ByteStream, FsBlobStore, RedbMetaStore, Txn};
    use bytes::Bytes;

    use super::*;
    use crate::records::encode;
    use crate::registry::Limits;

    const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    const DAY: u64 = 86_400_000;

    fn registry(dir: &std::path::Path) -> Registry {
        let meta = Arc::new(RedbMetaStore::open(&dir.join("meta.redb")).unwrap());
        let blobs = Arc::new(FsBlobStore::open(dir, FsOptions { verify_reads: true }).unwrap());
        Registry::new(meta, blobs, Limits::default())
    }

    fn repo(name: &str) -> RepositoryName {
        RepositoryName::parse(name).unwrap()
    }

    /// Pushes a one-layer image (distinct by `seed`) and returns its digest.
    async fn image(registry: &Registry, name: &str, seed: u8) -> Digest {
        let mut digests = Vec::new();
        for content in [vec![b'{', b'}'], vec![seed; 10]] {
            let digest = Digest::sha256_of(&content);
            let body: ByteStream = Box::pin(futures_util::stream::iter([Ok(Bytes::from(
                content.clone(),
            ))]));
            registry.put_blob(&repo(name), &digest, body).await.unwrap();
            digests.push((digest, content.len()));
        }
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": digests[0].0.to_string(), "size": digests[0].1},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": digests[1].0.to_string(), "size": digests[1].1}],
        })
        .to_string();
        registry
            .put_manifest(
                &repo(name),
                &Reference::Digest(Digest::sha256_of(manifest.as_bytes())),
                Some(OCI_MANIFEST),
                Bytes::from(manifest),
            )
            .await
            .unwrap()
            .digest
    }

    /// Points `tag` at `digest` as if it had been pushed `age` ago.
    async fn dated_tag(registry: &Registry, name: &str, tag: &str, digest: &Digest, age: u64) {
        registry
            .tag_manifest(&repo(name), &Tag::parse(tag).unwrap(), digest)
            .await
            .unwrap();
        let record = TagRecord {
            digest: digest.clone(),
            updated_ms: now_ms() - age,
            stamp: None,
        };
        registry
            .meta
            .commit(Txn::new().put(keys::tag(&repo(name), tag), encode(&record)))
            .await
            .unwrap();
    }

    /// Makes a manifest look `age` old.
    async fn dated_manifest(registry: &Registry, name: &str, digest: &Digest, age: u64) {
        let mut record = registry
            .find_manifest(&repo(name), digest)
            .await
            .unwrap()
            .unwrap();
        record.created_ms = now_ms() - age;
        registry
            .meta
            .commit(Txn::new().put(keys::manifest(&repo(name), digest), encode(&record)))
            .await
            .unwrap();
    }

    fn rule(
        keep_last: Option<usize>,
        keep_days: Option<u64>,
        untagged_days: Option<u64>,
    ) -> RetentionRule {
        RetentionRule {
            repositories: Arc::new(|r: &str| r.starts_with("ci/")),
            keep_last,
            keep_newer_than_ms: keep_days.map(|d| d * DAY),
            keep_tags: Arc::new(|t: &str| t == "latest" || t.starts_with("release-")),
            untagged_older_than_ms: untagged_days.map(|d| d * DAY),
        }
    }

    #[tokio::test]
    async fn plans_follow_the_rules_and_keep_what_they_must() {
        let dir = tempfile::tempdir().unwrap();
        let registry = registry(dir.path())
            .with_immutable_tags(Arc::new(|_: &RepositoryName, tag: &str| tag == "pinned"));
        // Tags of ci/app, newest first: b1 (1 day), b2 (10), b3 (40),
        // latest (90), release-1 (100), pinned (120), b4 (200).
        let mut digests = Vec::new();
        for (i, (tag, age)) in [
            ("b1", 1),
            ("b2", 10),
            ("b3", 40),
            ("latest", 90),
            ("release-1", 100),
            ("pinned", 120),
            ("b4", 200),
        ]
        .into_iter()
        .enumerate()
        {
            let digest = image(&registry, "ci/app", i as u8).await;
            dated_tag(&registry, "ci/app", tag, &digest, age * DAY).await;
            dated_manifest(&registry, "ci/app", &digest, age * DAY).await;
            digests.push(digest);
        }
        // An untagged manifest 30 days old, one 2 days old.
        let old = image(&registry, "ci/app", 100).await;
        dated_manifest(&registry, "ci/app", &old, 30 * DAY).await;
        let young = image(&registry, "ci/app", 101).await;
        dated_manifest(&registry, "ci/app", &young, 2 * DAY).await;
        // Outside the rule's repositories.
        let other = image(&registry, "prod/app", 102).await;
        dated_tag(&registry, "prod/app", "b9", &other, 400 * DAY).await;

        let names = |plan: &RetentionPlan| -> Vec<String> {
            plan.tags.iter().map(|t| t.tag.clone()).collect()
        };
        // Keep the newest two: b3 and b4 go; latest, release-1 by pattern,
        // pinned as immutable.
        let plan = registry
            .retention_plan(&[rule(Some(2), None, None)])
            .await
            .unwrap();
        assert_eq!(names(&plan), vec!["b3", "b4"]);
        assert_eq!(plan.immutable_kept, 1);
        assert!(plan.manifests.is_empty());
        assert_eq!(plan.repositories, 1);
        // Keep 30 days: b3 and b4 again (b1, b2 are newer).
        let plan = registry
            .retention_plan(&[rule(None, Some(30), None)])
            .await
            .unwrap();
        assert_eq!(names(&plan), vec!["b3", "b4"]);
        // Both: a tag stays if either keeps it.
        let plan = registry
            .retention_plan(&[rule(Some(3), Some(5), None)])
            .await
            .unwrap();
        assert_eq!(names(&plan), vec!["b4"]);
        // Untagged older than 7 days: the old one, and the manifests whose
        // tags the rule deletes (b3's and b4's are older than 7 days).
        let plan = registry
            .retention_plan(&[rule(Some(2), None, Some(7))])
            .await
            .unwrap();
        let mut planned: Vec<&Digest> = plan.manifests.iter().map(|m| &m.digest).collect();
        planned.sort();
        let mut expected = vec![&old, &digests[2], &digests[6]];
        expected.sort();
        assert_eq!(planned, expected);

        // Applied: to the trash; a tag moved since the plan stays.
        dated_tag(&registry, "ci/app", "b3", &digests[0], 0).await;
        let report = registry.apply_retention(&plan).await.unwrap();
        assert_eq!(report.tags_deleted, 1, "{report:?}");
        assert!(report.changed >= 1, "{report:?}");
        let b3 = registry
            .find_tag(&repo("ci/app"), &Tag::parse("b3").unwrap())
            .await
            .unwrap();
        assert_eq!(b3, Some(digests[0].clone()));
        assert!(
            registry
                .find_tag(&repo("ci/app"), &Tag::parse("b4").unwrap())
                .await
                .unwrap()
                .is_none()
        );
        let trash = registry.trash(Some(&repo("ci/app"))).await.unwrap();
        assert!(trash.iter().any(|e| e.tag.as_deref() == Some("b4")));
        assert!(trash.iter().any(|e| e.digest == old && e.tag.is_none()));
        assert!(
            registry
                .find_manifest(&repo("ci/app"), &young)
                .await
                .unwrap()
                .is_some()
        );
        assert!(
            registry
                .find_manifest(&repo("prod/app"), &other)
                .await
                .unwrap()
                .is_some()
        );
    }
}
