//! Verifying a backup where it lies: every metadata chunk against its
//! digest, every blob re-read and re-hashed, and every manifest's
//! references present in the backup.

use std::collections::HashMap;
use std::time::Instant;

use berth_oci::Digest;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::{BackupError, Target};
use crate::keys;
use crate::records::{BlobRecord, ManifestRecord, decode};

/// What a verification found.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VerifyReport {
    #[serde(default)]
    pub id: String,
    /// `records`, `blobs`, `done`.
    #[serde(default)]
    pub phase: String,
    pub records: u64,
    pub blobs_checked: u64,
    pub bytes_checked: u64,
    pub corrupt: Vec<Digest>,
    pub missing: Vec<Digest>,
    /// Manifests (`REPO@DIGEST`) naming a blob or child the backup lacks.
    pub dangling: Vec<String>,
    pub duration_ms: u64,
}

impl VerifyReport {
    pub fn clean(&self) -> bool {
        self.corrupt.is_empty() && self.missing.is_empty() && self.dangling.is_empty()
    }
}

pub type VerifyProgress = tokio::sync::watch::Sender<VerifyReport>;

/// Blobs re-hashed at once.
const PARALLEL: usize = 4;

enum Check {
    Good(u64),
    Corrupt(u64),
    Missing,
}

/// Reads one blob of the target whole, hashing it.
async fn check(target: &Target, digest: &Digest, size: u64) -> Result<Check, BackupError> {
    Ok(
        match berth_store::rehash(target.blobs.as_ref(), digest).await? {
            berth_store::Rehash::Good(bytes) if bytes == size => Check::Good(bytes),
            berth_store::Rehash::Good(bytes) | berth_store::Rehash::Corrupt(bytes) => {
                Check::Corrupt(bytes)
            }
            berth_store::Rehash::Gone => Check::Missing,
        },
    )
}

/// Verifies backup `id` (the newest when `None`).
pub async fn verify(
    target: &Target,
    id: Option<&str>,
    progress: Option<&VerifyProgress>,
) -> Result<VerifyReport, BackupError> {
    let started = Instant::now();
    let index = target.pick(id).await?;
    let mut report = VerifyReport {
        id: index.id.clone(),
        phase: "records".into(),
        ..VerifyReport::default()
    };
    let publish = |report: &VerifyReport| {
        if let Some(progress) = progress {
            let mut shown = report.clone();
            shown.duration_ms = started.elapsed().as_millis() as u64;
            progress.send_replace(shown);
        }
    };
    publish(&report);
    let mut blobs: HashMap<Digest, u64> = HashMap::new();
    let mut manifests: Vec<(String, Vec<Digest>)> = Vec::new();
    for chunk in &index.chunks {
        for (key, value) in target.chunk(chunk).await? {
            report.records += 1;
            let text = String::from_utf8_lossy(&key);
            if let Some(digest) = text
                .strip_prefix("blob/")
                .and_then(|d| d.parse::<Digest>().ok())
            {
                let record: BlobRecord = decode(&key, &value)?;
                blobs.insert(digest, record.size);
            } else if let Some((name, digest)) = keys::manifest_key_parts(&key) {
                let record: ManifestRecord = decode(&key, &value)?;
                let mut needs = record.references;
                needs.push(digest.clone());
                manifests.push((format!("{name}@{digest}"), needs));
            }
        }
    }
    if report.records != index.records {
        return Err(BackupError::Corrupt(format!(
            "the index promises {} records and the chunks hold {}",
            index.records, report.records
        )));
    }
    report.phase = "blobs".into();
    publish(&report);
    let listed: std::collections::HashSet<Digest> = blobs.keys().cloned().collect();
    let mut checks =
        futures_util::stream::iter(blobs.into_iter().map(|(digest, size)| async move {
            let result = check(target, &digest, size).await;
            (digest, result)
        }))
        .buffer_unordered(PARALLEL);
    while let Some((digest, result)) = checks.next().await {
        match result? {
            Check::Good(bytes) => {
                report.blobs_checked += 1;
                report.bytes_checked += bytes;
            }
            Check::Corrupt(bytes) => {
                tracing::error!(%digest, "backup verify: a blob does not match its digest");
                report.blobs_checked += 1;
                report.bytes_checked += bytes;
                report.corrupt.push(digest);
            }
            Check::Missing => {
                tracing::error!(%digest, "backup verify: a blob of the backup is missing");
                report.missing.push(digest);
            }
        }
        if report.blobs_checked.is_multiple_of(256) {
            publish(&report);
        }
    }
    // A manifest is restorable only if everything it names is in the
    // backup and intact.
    let bad: std::collections::HashSet<&Digest> =
        report.corrupt.iter().chain(&report.missing).collect();
    for (manifest, needs) in &manifests {
        if let Some(absent) = needs
            .iter()
            .find(|d| !listed.contains(*d) || bad.contains(d))
        {
            tracing::error!(%manifest, %absent, "backup verify: a manifest names what the backup lacks");
            report.dangling.push(format!("{manifest} needs {absent}"));
        }
    }
    report.corrupt.sort();
    report.missing.sort();
    report.dangling.sort();
    report.phase = "done".into();
    report.duration_ms = started.elapsed().as_millis() as u64;
    publish(&report);
    Ok(report)
}
