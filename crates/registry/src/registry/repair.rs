//! Repair: replacing blobs that scrub found corrupt or missing with good
//! bytes from elsewhere (a backup target, a peer region), verified by
//! digest before they replace anything, while the registry serves.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use berth_oci::Digest;
use berth_store::{ByteStream, PutError};
use serde::{Deserialize, Serialize};

use super::{Registry, Result};
use crate::keys;
use crate::records::BlobRecord;

/// Where good bytes of a blob may be found.
#[async_trait]
pub trait BlobSource: Send + Sync {
    /// Names it in reports and logs (`backup /var/backups`, `region us`).
    fn describe(&self) -> String;

    /// The blob's bytes if this source has it; `repository` is one that
    /// links it here (a peer serves blobs by repository). Errors are the
    /// source's, and only make the repair try the next source.
    async fn fetch(
        &self,
        digest: &Digest,
        repository: Option<&str>,
    ) -> std::result::Result<Option<ByteStream>, String>;
}

/// A blob put right, and where its bytes came from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Repaired {
    pub digest: Digest,
    pub from: String,
}

/// What a repair did.
#[derive(Clone, Debug, Default)]
pub struct RepairOutcome {
    pub repaired: Vec<Repaired>,
    /// Found bad by the scrub, and since collected or being collected.
    pub not_needed: Vec<Digest>,
}

/// Records read per scan while looking for the repositories that link the
/// blobs to repair.
const PAGE: usize = 1000;

impl Registry {
    /// Replaces each of `bad` from the first source that gives bytes
    /// matching its digest. Blobs nothing records or links any more
    /// (collected since the scrub) need no repair: they are returned
    /// apart. A store failure here ends the run with what it repaired.
    pub async fn repair_blobs(
        &self,
        bad: &[Digest],
        sources: &[std::sync::Arc<dyn BlobSource>],
    ) -> Result<RepairOutcome> {
        let mut outcome = RepairOutcome::default();
        if bad.is_empty() {
            return Ok(outcome);
        }
        let owners = self.repositories_naming(bad).await?;
        for digest in bad {
            let record = self.get_record::<BlobRecord>(&keys::blob(digest)).await?;
            let repository = owners.get(digest).map(String::as_str);
            // Being removed, or neither recorded nor referenced: nothing
            // needs these bytes.
            if record
                .as_ref()
                .is_some_and(|r| r.removing_since_ms.is_some())
                || (record.is_none() && repository.is_none())
            {
                outcome.not_needed.push(digest.clone());
                continue;
            }
            // The record's size bounds the copy, whatever the current limit
            // on pushes.
            let max = record
                .as_ref()
                .map_or(self.limits.max_blob_bytes, |r| r.size);
            for source in sources {
                let from = source.describe();
                let body = match source.fetch(digest, repository).await {
                    Ok(Some(body)) => body,
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!(%digest, source = %from, error = %e, "repair: the source did not give the blob");
                        continue;
                    }
                };
                match self.blobs.put(digest, body, max).await {
                    Ok(size) => {
                        if record.as_ref().is_some_and(|r| r.size != size) {
                            tracing::error!(%digest, source = %from, size, "repair: the verified bytes have another size than the record");
                        }
                        tracing::info!(%digest, source = %from, size, "repair: replaced a bad blob with verified bytes");
                        outcome.repaired.push(Repaired {
                            digest: digest.clone(),
                            from,
                        });
                        break;
                    }
                    Err(PutError::Store(e)) => {
                        tracing::warn!(%digest, error = %e, "repair: the registry's store failed; stopping");
                        return Ok(outcome);
                    }
                    Err(e) => {
                        tracing::warn!(%digest, source = %from, error = %e, "repair: the source's bytes were refused");
                    }
                }
            }
        }
        Ok(outcome)
    }

    /// A repository linking (or recording as a manifest) each digest.
    async fn repositories_naming(&self, digests: &[Digest]) -> Result<HashMap<Digest, String>> {
        let wanted: HashSet<&Digest> = digests.iter().collect();
        let mut owners = HashMap::new();
        for (prefix, parts) in [
            (
                keys::LINK_PREFIX,
                keys::link_parts as fn(&[u8]) -> Option<(&str, Digest)>,
            ),
            (keys::MANIFEST_PREFIX, keys::manifest_key_parts),
        ] {
            let mut after: Option<Vec<u8>> = None;
            loop {
                let page = self
                    .meta
                    .scan(prefix.as_bytes(), after.as_deref(), PAGE)
                    .await?;
                let Some(last) = page.last() else { break };
                after = Some(last.key.clone());
                for kv in &page {
                    if let Some((name, digest)) = parts(&kv.key)
                        && wanted.contains(&digest)
                    {
                        owners.entry(digest).or_insert_with(|| name.to_string());
                    }
                }
            }
        }
        Ok(owners)
    }
}
