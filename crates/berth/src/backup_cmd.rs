//! `berth backup create|ls|verify|restore`: backups of a running registry,
//! through its HTTP API (so they work on an embedded node, whose database
//! the server holds, and behind a load balancer), with progress while they
//! run. The target is one the node was started with (`--backup-to`).

use std::io::Write as _;

use berth_registry::backup::{BackupReport, RestoreReport, SelectiveReport, VerifyReport};

use crate::admin::AdminError;
use crate::client::Api;
use crate::gc_cmd::human_bytes;
use crate::tags_cmd::{rfc3339, urlencode};

/// `?name=value&...` of the parameters that are set.
fn query(pairs: &[(&str, Option<&str>)]) -> String {
    let set: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k}={}", urlencode(v))))
        .collect();
    if set.is_empty() {
        String::new()
    } else {
        format!("?{}", set.join("&"))
    }
}

/// Bytes per second of `bytes` over `ms`, for humans.
fn rate(bytes: u64, ms: u64) -> String {
    let secs = (ms as f64 / 1000.0).max(0.001);
    format!("{}/s", human_bytes((bytes as f64 / secs) as u64))
}

fn print_json<T: serde::Serialize>(value: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

/// Takes a backup. `Ok(false)` when blobs had to be left out.
pub async fn create(api: &Api, to: Option<&str>, json: bool) -> Result<bool, AdminError> {
    let path = format!("/berth/v1/backups{}", query(&[("to", to)]));
    let report: BackupReport = {
        let progress = crate::progress::Progress::start("backup", None, json);
        crate::job_stream::follow(api, &path, "backup", |p: &BackupReport| {
            if !json && !p.phase.is_empty() {
                progress.update(p.copied_bytes, || {
                    format!(
                        "  {:<8} {} blobs ({}), {} copied ({}, {}); {} records; {:.0} s",
                        p.phase,
                        p.blobs,
                        human_bytes(p.bytes),
                        p.copied_blobs,
                        human_bytes(p.copied_bytes),
                        rate(p.copied_bytes, p.duration_ms),
                        p.records,
                        p.duration_ms as f64 / 1000.0
                    )
                });
                let _ = std::io::stderr().flush();
            }
        })
        .await?
    };
    if json {
        print_json(&report);
        return Ok(report.clean());
    }
    println!(
        "backup {}: {} records, {} blobs ({}); copied {} blobs ({}) in {:.1} s ({})",
        report.id,
        report.records,
        report.blobs,
        human_bytes(report.bytes),
        report.copied_blobs,
        human_bytes(report.copied_bytes),
        report.duration_ms as f64 / 1000.0,
        rate(report.copied_bytes, report.duration_ms)
    );
    for digest in &report.missing {
        println!("left out (missing from storage) {digest}");
    }
    for digest in &report.corrupt {
        println!("left out (corrupt at rest) {digest}");
    }
    if let Some(pruned) = &report.pruned
        && !pruned.backups.is_empty()
    {
        println!(
            "pruned {} old backups and {} blobs ({})",
            pruned.backups.len(),
            pruned.blobs,
            human_bytes(pruned.bytes)
        );
    }
    Ok(report.clean())
}

pub async fn list(api: &Api, from: Option<&str>, json: bool) -> Result<bool, AdminError> {
    let path = format!("/berth/v1/backups{}", query(&[("from", from)]));
    let value = api.json(reqwest::Method::GET, &path, None, None).await?;
    if json {
        print_json(&value);
        return Ok(true);
    }
    let backups = value["backups"].as_array().cloned().unwrap_or_default();
    println!("target {}", value["target"].as_str().unwrap_or_default());
    if backups.is_empty() {
        println!("no backups");
        return Ok(true);
    }
    println!(
        "{:<20}  {:<20}  {:>7}  {:>6}  {:>9}  {:>9}  {:>9}  {:>10}",
        "ID", "TAKEN (UTC)", "REPOS", "TAGS", "BLOBS", "SIZE", "COPIED", "DURATION"
    );
    for b in backups {
        let n = |k: &str| b[k].as_u64().unwrap_or(0);
        let problems = b["missing"].as_array().map_or(0, Vec::len)
            + b["corrupt"].as_array().map_or(0, Vec::len);
        println!(
            "{:<20}  {:<20}  {:>7}  {:>6}  {:>9}  {:>9}  {:>9}  {:>9.1}s{}",
            b["id"].as_str().unwrap_or_default(),
            rfc3339(n("started_ms")),
            n("repositories"),
            n("tags"),
            n("blobs"),
            human_bytes(n("bytes")),
            human_bytes(n("copied_bytes")),
            n("finished_ms").saturating_sub(n("started_ms")) as f64 / 1000.0,
            if problems > 0 {
                format!("  ({problems} blobs left out)")
            } else {
                String::new()
            }
        );
    }
    Ok(true)
}

/// Verifies a backup. `Ok(false)` when it found damage.
pub async fn verify(
    api: &Api,
    from: Option<&str>,
    id: Option<&str>,
    json: bool,
) -> Result<bool, AdminError> {
    let path = format!(
        "/berth/v1/backups/verify{}",
        query(&[("from", from), ("id", id)])
    );
    let report: VerifyReport = {
        let progress = crate::progress::Progress::start("verification", None, json);
        crate::job_stream::follow(api, &path, "verification", |p: &VerifyReport| {
            if !json && !p.phase.is_empty() {
                progress.update(p.bytes_checked, || {
                    format!(
                    "  {:<8} {} records; {} blobs ({}) re-hashed, {} corrupt, {} missing; {:.0} s",
                    p.phase,
                    p.records,
                    p.blobs_checked,
                    human_bytes(p.bytes_checked),
                    p.corrupt.len(),
                    p.missing.len(),
                    p.duration_ms as f64 / 1000.0
                    )
                });
                let _ = std::io::stderr().flush();
            }
        })
        .await?
    };
    if json {
        print_json(&report);
        return Ok(report.clean());
    }
    println!(
        "backup {}: {} records, {} blobs ({}) re-hashed in {:.1} s ({}): {} corrupt, {} missing, {} manifests incomplete",
        report.id,
        report.records,
        report.blobs_checked,
        human_bytes(report.bytes_checked),
        report.duration_ms as f64 / 1000.0,
        rate(report.bytes_checked, report.duration_ms),
        report.corrupt.len(),
        report.missing.len(),
        report.dangling.len()
    );
    for digest in &report.corrupt {
        println!("corrupt {digest}");
    }
    for digest in &report.missing {
        println!("missing {digest}");
    }
    for manifest in &report.dangling {
        println!("incomplete {manifest}");
    }
    Ok(report.clean())
}

/// Restores a backup into the (empty) registry. `Ok(false)` when blobs
/// the backup named could not be restored.
pub async fn restore(
    api: &Api,
    source: RestoreSource<'_>,
    adopt: bool,
    json: bool,
) -> Result<bool, AdminError> {
    let adopt = adopt.then_some("true");
    let path = format!(
        "/berth/v1/backups/restore{}",
        query(&[
            ("from", source.from),
            ("id", source.id),
            ("at", source.at),
            ("adopt", adopt)
        ])
    );
    let report: RestoreReport = {
        let progress = crate::progress::Progress::start("restore", None, json);
        crate::job_stream::follow(api, &path, "restore", |p: &RestoreReport| {
            if !json && !p.phase.is_empty() {
                progress.update(p.copied_bytes, || {
                    format!(
                        "  {:<8} {} records; {} blobs ({}), {} copied ({}); {:.0} s",
                        p.phase,
                        p.records,
                        p.blobs,
                        human_bytes(p.bytes),
                        p.copied_blobs,
                        rate(p.copied_bytes, p.duration_ms),
                        p.duration_ms as f64 / 1000.0
                    )
                });
                let _ = std::io::stderr().flush();
            }
        })
        .await?
    };
    let replay_failed = report
        .replayed
        .as_ref()
        .is_some_and(|r| !r.failed.is_empty());
    if json {
        print_json(&report);
        return Ok(report.missing.is_empty() && !replay_failed);
    }
    println!(
        "restored backup {}{}: {} records ({} already there), {} blobs ({}) in {:.1} s ({})",
        report.id,
        if report.resumed { " (resumed)" } else { "" },
        report.records,
        report.existing,
        report.blobs,
        human_bytes(report.bytes),
        report.duration_ms as f64 / 1000.0,
        rate(report.copied_bytes, report.duration_ms)
    );
    if let Some(replay) = &report.replayed {
        println!(
            "replayed {} changes after it: the registry is as it was at {}",
            replay.events,
            humantime::format_rfc3339_millis(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(replay.restored_to_ms)
            )
        );
        for failure in &replay.failed {
            println!("not replayed: {failure}");
        }
    }
    for digest in &report.missing {
        println!("not restored (missing or corrupt in the backup) {digest}");
    }
    if !report.missing.is_empty() {
        println!("run berth scrub --repair to fetch them from a peer region or another backup");
    }
    Ok(report.missing.is_empty() && !replay_failed)
}

/// Which backup a whole restore takes: `id` (default the newest), or the
/// last one before the moment `at` with the change log replayed to it.
pub struct RestoreSource<'a> {
    pub from: Option<&'a str>,
    pub id: Option<&'a str>,
    pub at: Option<&'a str>,
}

/// Restores chosen repositories into the live registry. `Ok(false)` when
/// some manifest or tag could not be restored.
pub async fn restore_repositories(
    api: &Api,
    from: Option<&str>,
    id: Option<&str>,
    repositories: &[String],
    force: bool,
    json: bool,
) -> Result<bool, AdminError> {
    let globs = repositories.join(",");
    let force = force.then_some("true");
    let path = format!(
        "/berth/v1/backups/restore{}",
        query(&[
            ("from", from),
            ("id", id),
            ("repository", Some(&globs)),
            ("force", force)
        ])
    );
    let report: SelectiveReport = {
        let progress = crate::progress::Progress::start("restore", None, json);
        crate::job_stream::follow(api, &path, "restore", |p: &SelectiveReport| {
            if !json && !p.phase.is_empty() {
                progress.update(p.bytes, || {
                    format!(
                        "  {:<9} {} repositories: {} manifests, {} tags, {} blobs ({}); {:.0} s",
                        p.phase,
                        p.repositories,
                        p.manifests,
                        p.tags,
                        p.blobs,
                        human_bytes(p.bytes),
                        p.duration_ms as f64 / 1000.0
                    )
                });
                let _ = std::io::stderr().flush();
            }
        })
        .await?
    };
    if json {
        print_json(&report);
        return Ok(report.failed.is_empty());
    }
    println!(
        "restored from backup {}: {} repositories, {} manifests, {} tags moved ({} already there), {} blobs ({}) in {:.1} s",
        report.id,
        report.repositories,
        report.manifests,
        report.tags,
        report.unchanged,
        report.blobs,
        human_bytes(report.bytes),
        report.duration_ms as f64 / 1000.0
    );
    for tag in &report.kept_newer {
        println!("kept {tag}: it moved after the backup (--force moves it back)");
    }
    for failure in &report.failed {
        println!("failed {failure}");
    }
    Ok(report.failed.is_empty())
}
