//! `berth gc`: collect garbage in a running registry now, through its HTTP
//! API (so it works on an embedded node, whose database the server holds,
//! and behind a load balancer), showing progress while it runs.

use std::io::Write as _;

use berth_registry::GcReport;
use futures_util::StreamExt;

use crate::admin::AdminError;
use crate::client::{Api, error_message};

fn failed(what: &str, e: impl std::fmt::Display) -> AdminError {
    AdminError::Failed(format!("{what}: {e}"))
}

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
    let what = format!("POST {}", api.url("/berth/v1/gc"));
    let response = api
        .request(reqwest::Method::POST, &path)
        .send()
        .await
        .map_err(|e| failed(&what, e))?;
    let status = response.status();
    if !status.is_success() {
        let bytes = response.bytes().await.unwrap_or_default();
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        return Err(AdminError::Failed(format!(
            "HTTP {status}: {}",
            error_message(&value, &bytes)
        )));
    }
    let interactive = !json;
    if interactive {
        eprintln!(
            "{} garbage{}...",
            if dry_run { "looking for" } else { "collecting" },
            grace_secs.map_or(String::new(), |g| format!(" older than {g} s"))
        );
    }
    // JSON lines: progress while it runs, then the report or an error.
    let mut body = response.bytes_stream();
    let mut pending = Vec::new();
    let mut report = None;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| failed(&what, e))?;
        pending.extend_from_slice(&chunk);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let value: serde_json::Value =
                serde_json::from_slice(&line).map_err(|e| failed("the registry's answer", e))?;
            if let Some(error) = value.get("error") {
                return Err(AdminError::Failed(format!(
                    "garbage collection failed: {}",
                    error.as_str().unwrap_or_default()
                )));
            }
            if let Some(done) = value.get("report") {
                report = Some(
                    serde_json::from_value::<GcReport>(done.clone())
                        .map_err(|e| failed("the registry's report", e))?,
                );
            } else if let Some(p) = value.get("progress")
                && interactive
                && let Ok(p) = serde_json::from_value::<GcReport>(p.clone())
                && !p.phase.is_empty()
            {
                eprintln!("{}", progress_line(&p));
                let _ = std::io::stderr().flush();
            }
        }
    }
    let Some(report) = report else {
        return Err(AdminError::Failed(
            "the registry closed the connection before the collection finished (it goes on there; run again to see the result)".into(),
        ));
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
