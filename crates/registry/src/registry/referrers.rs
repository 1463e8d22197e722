//! The referrers index: manifests by their subject.

use berth_oci::{Descriptor, Digest, Manifest, RepositoryName};

use super::{Registry, Result};
use crate::keys;
use crate::records::decode;

impl Registry {
    /// Descriptors of the manifests in `name` whose subject is `subject`,
    /// optionally only those of `artifact_type`, a page at a time (in digest
    /// order, after `last`). `more` tells whether another page follows.
    pub async fn referrers(
        &self,
        name: &RepositoryName,
        subject: &Digest,
        artifact_type: Option<&str>,
        last: Option<&Digest>,
    ) -> Result<(Vec<Descriptor>, bool)> {
        let prefix = keys::referrer_prefix(name, subject);
        let page = self.limits.max_referrers_page;
        let mut out = Vec::new();
        let mut after = last.map(|d| keys::referrer(name, subject, d).into_bytes());
        loop {
            // Small batches: a referrer record may carry 16 KiB of annotations
            // and etcd answers at most 4 MiB per response.
            let batch = self
                .meta
                .scan(prefix.as_bytes(), after.as_deref(), 64)
                .await?;
            let Some(last_kv) = batch.last() else {
                return Ok((out, false));
            };
            after = Some(last_kv.key.clone());
            for kv in batch {
                let d: Descriptor = decode(&kv.key, &kv.value)?;
                if artifact_type.is_none_or(|t| d.artifact_type.as_deref() == Some(t)) {
                    if out.len() == page {
                        return Ok((out, true));
                    }
                    out.push(d);
                }
            }
        }
    }
}

/// Annotations copied into a referrers descriptor, unless they are so large
/// that every referrers response would carry them (they stay in the manifest).
pub(super) fn referrer_annotations(
    manifest: &Manifest,
    digest: &Digest,
) -> Option<std::collections::BTreeMap<String, String>> {
    const MAX_REFERRER_ANNOTATION_BYTES: usize = 16 * 1024;
    let annotations = manifest.annotations.as_ref()?;
    let size: usize = annotations.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > MAX_REFERRER_ANNOTATION_BYTES {
        tracing::info!(%digest, size, "annotations too large for the referrers index; omitted there");
        return None;
    }
    Some(annotations.clone())
}
