//! Scrub: re-reads every blob at rest and checks it against its digest, so
//! that rot is found before a client pulls it; and checks that every blob a
//! repository links and every manifest recorded is there at all. It reads
//! and reports; it changes nothing.

use std::collections::HashSet;

use berth_oci::Digest;
use futures_util::StreamExt;
use serde::Serialize;

use super::{Registry, Result};
use crate::keys;

/// Blobs re-hashed at once (each a stream from the store).
const PARALLEL: usize = 4;

/// Records read per scan.
const PAGE: usize = 1000;

/// What a scrub found.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct ScrubReport {
    /// Where it is (`blobs`, `records`, `done`), for progress.
    #[serde(default)]
    pub phase: String,
    pub blobs_checked: u64,
    pub bytes_checked: u64,
    /// Blobs whose bytes do not hash to their digest (or that the store
    /// refuses as not matching what was written).
    pub corrupt: Vec<Digest>,
    /// Blobs a link or a manifest record names that the store lacks.
    pub missing: Vec<Digest>,
    /// Of those, the blobs a repair replaced with verified bytes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repaired: Vec<super::Repaired>,
    pub duration_ms: u64,
}

impl ScrubReport {
    pub fn clean(&self) -> bool {
        self.corrupt.is_empty() && self.missing.is_empty()
    }

    /// Every blob found corrupt or missing was repaired (or none was).
    pub fn healed(&self) -> bool {
        self.corrupt
            .iter()
            .chain(&self.missing)
            .all(|d| self.repaired.iter().any(|r| &r.digest == d))
    }

    /// What was found and not repaired.
    pub fn unrepaired(&self) -> Vec<Digest> {
        self.corrupt
            .iter()
            .chain(&self.missing)
            .filter(|d| !self.repaired.iter().any(|r| &r.digest == *d))
            .cloned()
            .collect()
    }
}

/// Where a running scrub reports how far it got.
pub type Progress = tokio::sync::watch::Sender<ScrubReport>;

/// How one stored blob read back.
enum Check {
    Good(u64),
    Corrupt(u64),
    /// Deleted while the scrub ran (garbage collection): not a finding.
    Gone,
}

impl Registry {
    /// Re-reads and re-hashes every stored blob, then checks the records
    /// that promise blobs against what is stored.
    pub async fn scrub(&self, progress: Option<&Progress>) -> Result<ScrubReport> {
        let started = std::time::Instant::now();
        let mut report = ScrubReport {
            phase: "blobs".into(),
            ..ScrubReport::default()
        };
        let publish = |report: &ScrubReport| {
            if let Some(progress) = progress {
                let mut shown = report.clone();
                shown.duration_ms = started.elapsed().as_millis() as u64;
                progress.send_replace(shown);
            }
        };
        publish(&report);
        let stored = self.blobs.list().await?;
        let mut present: HashSet<Digest> = HashSet::with_capacity(stored.len());
        let mut checks = futures_util::stream::iter(stored.into_iter().map(|blob| async move {
            let check = self.check_blob(&blob.digest).await;
            (blob.digest, check)
        }))
        .buffer_unordered(PARALLEL);
        while let Some((digest, check)) = checks.next().await {
            match check? {
                Check::Good(bytes) => {
                    report.blobs_checked += 1;
                    report.bytes_checked += bytes;
                }
                Check::Corrupt(bytes) => {
                    tracing::error!(%digest, "scrub: a stored blob does not match its digest");
                    report.blobs_checked += 1;
                    report.bytes_checked += bytes;
                    report.corrupt.push(digest.clone());
                }
                Check::Gone => continue,
            }
            present.insert(digest);
            if report.blobs_checked.is_multiple_of(256) {
                publish(&report);
            }
        }
        report.phase = "records".into();
        publish(&report);
        for prefix in [keys::LINK_PREFIX, keys::MANIFEST_PREFIX] {
            let mut after: Option<Vec<u8>> = None;
            loop {
                let page = self
                    .meta
                    .scan(prefix.as_bytes(), after.as_deref(), PAGE)
                    .await?;
                let Some(last) = page.last() else { break };
                after = Some(last.key.clone());
                for kv in page {
                    let digest = if prefix == keys::LINK_PREFIX {
                        keys::link_digest(&kv.key)
                    } else {
                        keys::manifest_key_digest(&kv.key)
                    };
                    let Some(digest) = digest else { continue };
                    if present.contains(&digest) || report.missing.contains(&digest) {
                        continue;
                    }
                    // Stored after the listing (a push meanwhile)?
                    if self.blobs.stat(&digest).await?.is_some() {
                        present.insert(digest);
                        continue;
                    }
                    // Its record gone meanwhile (a delete, a collection)?
                    if self.meta.get(&kv.key).await?.is_none() {
                        continue;
                    }
                    tracing::error!(%digest, record = %String::from_utf8_lossy(&kv.key), "scrub: a recorded blob is missing from storage");
                    report.missing.push(digest);
                }
            }
        }
        report.corrupt.sort();
        report.missing.sort();
        report.phase = "done".into();
        report.duration_ms = started.elapsed().as_millis() as u64;
        publish(&report);
        Ok(report)
    }

    /// Reads one blob whole and hashes it with its digest's algorithm.
    async fn check_blob(&self, digest: &Digest) -> Result<Check> {
        Ok(
            match berth_store::rehash(self.blobs.as_ref(), digest).await? {
                berth_store::Rehash::Good(bytes) => Check::Good(bytes),
                berth_store::Rehash::Corrupt(bytes) => Check::Corrupt(bytes),
                berth_store::Rehash::Gone => Check::Gone,
            },
        )
    }
}
