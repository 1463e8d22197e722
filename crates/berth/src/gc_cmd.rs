//! `berth gc`: collect garbage in a running registry now, through its HTTP
//! API (so it works on an embedded node, whose database the server holds,
//! and behind a load balancer), showing progress while it runs.

use std::io::Write as _;

use berth_registry::GcReport;

use crate::admin::AdminError;
use crate::client::Api;

/// Bytes for people: 1.5 GiB.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn progress_line(p: &GcReport) -> String {
    format!(
        "  {:<9} {} manifests, {} links, {} blobs scanned; {} links, {} blobs ({}) removed; {:.0} s",
        p.phase,
        p.manifests_scanned,
        p.links_scanned,
        p.blobs_scanned,
        p.links_removed,
        p.blobs_removed,
        human_bytes(p.bytes_removed),
        p.duration_ms as f64 / 1000.0
    )
}

/// Runs one collection; prints what it removed (or, dry, would remove).
pub async fn run(
    api: &Api,
    dry_run: bool,
    grace_secs: Option<u64>,
    json: bool,
) -> Result<bool, AdminError> {
    let mut path = format!("/berth/v1/gc?dry_run={dry_run}");
    if let Some(grace) = grace_secs {
        path.push_str(&format!("&grace_secs={grace}"));
    }
    let interactive = !json;
    if interactive {
        eprintln!(
            "{} garbage{}...",
            if dry_run { "looking for" } else { "collecting" },
            grace_secs.map_or(String::new(), |g| format!(" older than {g} s"))
        );
    }
    let report: GcReport = {
        let progress = crate::progress::Progress::start("garbage collection", None, json);
        crate::job_stream::follow(api, &path, "garbage collection", |p: &GcReport| {
            if interactive && !p.phase.is_empty() {
                progress.update(p.bytes_removed, || progress_line(p));
                let _ = std::io::stderr().flush();
            }
        })
        .await?
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
        return Ok(true);
    }
    let verb = if report.dry_run {
        "would remove"
    } else {
        "removed"
    };
    println!(
        "{verb} {} links, {} blobs ({}), {} uploads",
        report.links_removed,
        report.blobs_removed,
        human_bytes(report.bytes_removed),
        report.uploads_removed
    );
    println!(
        "scanned {} manifests, {} links, {} blobs in {:.1} s (grace {} s)",
        report.manifests_scanned,
        report.links_scanned,
        report.blobs_scanned,
        report.duration_ms as f64 / 1000.0,
        report.grace_secs
    );
    if report.links_dated > 0 {
        println!(
            "dated {} links from an older version; they can be collected after the grace period",
            report.links_dated
        );
    }
    Ok(true)
}
