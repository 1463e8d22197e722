//! Scrub: every blob at rest is re-read and re-hashed; exactly the corrupt
//! and the missing ones are named, counted in the metrics, and make the
//! command exit 1.

use berth_store::{BlobStore, S3BlobStore, S3Options};
use serde_json::Value;

use crate::support::*;

fn scrub(reg: &Registry) -> (i32, Value, String) {
    let out = berth_cli()
        .args(["scrub", "--json", "--registry", &reg.url()])
        .output()
        .unwrap();
    let code = out.status.code().unwrap_or(-1);
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "berth scrub printed no report ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (
        code,
        report,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn digests(report: &Value, field: &str) -> Vec<String> {
    report[field]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrub_names_exactly_the_corrupt_and_the_missing_blobs() {
    let reg = Registry::start().await;
    let seed = fresh_seed();
    let images: Vec<Image> = (0..3).map(|i| Image::oci(seed + i, 2, 20_000)).collect();
    for (i, image) in images.iter().enumerate() {
        image.push(&reg, "team/app", Some(&format!("v{i}"))).await;
    }
    // Each image's config and layers and its manifest (configs may be
    // shared).
    let stored: std::collections::BTreeSet<String> = images
        .iter()
        .flat_map(|i| {
            let mut all: Vec<String> = i.blobs().into_iter().map(sha256_digest).collect();
            all.push(i.digest.clone());
            all
        })
        .collect();
    let (code, report, stderr) = scrub(&reg);
    assert_eq!(code, 0, "{report:#} {stderr}");
    assert_eq!(report["blobs_checked"], stored.len(), "{report:#}");
    assert!(digests(&report, "corrupt").is_empty() && digests(&report, "missing").is_empty());

    let rotten = sha256_digest(&images[0].layers[0]);
    let lost = sha256_digest(&images[1].layers[1]);
    if blobs_in_s3() {
        // The bucket cannot be written around the store's check here:
        // only the loss is staged on S3.
        let mut options = S3Options::new("berth");
        options.prefix = format!("berth-it/{}", unique_name(reg.data_dir()));
        let store = S3BlobStore::from_vars(options, s3_env()).unwrap();
        store.delete(&lost.parse().unwrap()).await.unwrap();
    } else {
        let path = |d: &str| {
            let (alg, hex) = d.split_once(':').unwrap();
            reg.data_dir()
                .join("blobs")
                .join(alg)
                .join(&hex[..2])
                .join(hex)
        };
        let file = path(&rotten);
        let mut bytes = std::fs::read(&file).unwrap();
        bytes[1000] ^= 0x40;
        std::fs::write(&file, bytes).unwrap();
        std::fs::remove_file(path(&lost)).unwrap();
    }

    let (code, report, stderr) = scrub(&reg);
    assert_eq!(code, 1, "{report:#} {stderr}");
    assert_eq!(
        digests(&report, "missing"),
        vec![lost.clone()],
        "{report:#}"
    );
    let corrupt = digests(&report, "corrupt");
    if blobs_in_s3() {
        assert!(corrupt.is_empty(), "{report:#}");
    } else {
        assert_eq!(corrupt, vec![rotten.clone()], "{report:#}");
    }
    let metrics = reg.get("/metrics").await.text();
    assert!(metrics.contains("berth_scrub_missing_blobs 1"), "{metrics}");
    assert!(metrics.contains(&format!("berth_scrub_corrupt_blobs {}", corrupt.len())));
    assert!(metrics.contains("berth_scrub_runs_total{outcome=\"found\"} 1"));
    // The text report names them too.
    let out = berth_cli()
        .args(["scrub", "--registry", &reg.url()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("berth scrub printed:\n{stdout}");
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("scrubbing"));
    assert!(stdout.contains(&format!("missing {lost}")), "{stdout}");
    if !blobs_in_s3() {
        assert!(stdout.contains(&format!("corrupt {rotten}")), "{stdout}");
    }
    // Pulls of the damaged image are refused, not served corrupt.
    let r = reg.get(&format!("/v2/team/app/blobs/{lost}")).await;
    eprintln!("GET of the lost blob: {}", r.status);
    assert_ne!(r.status, 200, "{}", r.describe());
}

/// Removes a blob from the registry's storage, files or S3.
pub(crate) async fn lose_blob(reg: &Registry, digest: &str) {
    if blobs_in_s3() {
        let mut options = S3Options::new("berth");
        options.prefix = format!("berth-it/{}", unique_name(reg.data_dir()));
        let store = S3BlobStore::from_vars(options, s3_env()).unwrap();
        store.delete(&digest.parse().unwrap()).await.unwrap();
    } else {
        std::fs::remove_file(blob_path(reg, digest)).unwrap();
    }
}

fn blob_path(reg: &Registry, digest: &str) -> std::path::PathBuf {
    let (alg, hex) = digest.split_once(':').unwrap();
    reg.data_dir()
        .join("blobs")
        .join(alg)
        .join(&hex[..2])
        .join(hex)
}

fn scrub_repair(reg: &Registry) -> (i32, Value) {
    let out = berth_cli()
        .args(["scrub", "--repair", "--json", "--registry", &reg.url()])
        .output()
        .unwrap();
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "berth scrub --repair printed no report ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), report)
}

/// `(digest, from)` of each repaired blob.
pub(crate) fn repaired(report: &Value) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = report["repaired"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    (
                        r["digest"].as_str().unwrap().to_string(),
                        r["from"].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrub_repair_heals_rotten_and_lost_blobs_from_a_backup_while_serving() {
    let backups = tempfile::tempdir().unwrap();
    let target = backups.path().display().to_string();
    let reg = Registry::start_with(Options::new().flag("--backup-to", &target)).await;
    let seed = fresh_seed();
    let images: Vec<Image> = (0..2).map(|i| Image::oci(seed + i, 2, 30_000)).collect();
    for (i, image) in images.iter().enumerate() {
        image.push(&reg, "team/app", Some(&format!("v{i}"))).await;
    }
    let out = berth_cli()
        .args(["backup", "create", "--registry", &reg.url()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lost = sha256_digest(&images[1].layers[1]);
    lose_blob(&reg, &lost).await;
    let mut damaged = vec![lost.clone()];
    if !blobs_in_s3() {
        let rotten = sha256_digest(&images[0].layers[0]);
        let file = blob_path(&reg, &rotten);
        let mut bytes = std::fs::read(&file).unwrap();
        bytes[1000] ^= 0x40;
        std::fs::write(&file, bytes).unwrap();
        damaged.push(rotten);
    }
    damaged.sort();
    let (code, report) = scrub_repair(&reg);
    assert_eq!(code, 0, "{report:#}");
    let from = format!("backup {target}");
    assert_eq!(
        repaired(&report),
        damaged
            .iter()
            .map(|d| (d.clone(), from.clone()))
            .collect::<Vec<_>>(),
        "{report:#}"
    );
    // Served again, byte-identical, and the next scrub finds nothing.
    for image in &images {
        for layer in &image.layers {
            assert_eq!(
                &reg.blob_bytes("team/app", &sha256_digest(layer)).await,
                layer
            );
        }
    }
    let (code, report, stderr) = scrub(&reg);
    assert_eq!(code, 0, "{report:#} {stderr}");
    let metrics = reg.get("/metrics").await.text();
    assert!(
        metrics.contains(&format!(
            "berth_scrub_repaired_blobs_total {}",
            damaged.len()
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("berth_scrub_runs_total{outcome=\"repaired\"} 1"),
        "{metrics}"
    );
}
