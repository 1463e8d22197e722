//! `berth scrub`: re-read and re-hash every blob at rest in a running
//! registry now, through its HTTP API, showing progress; names every
//! corrupt or missing blob and fails when it found any.

use std::io::Write as _;

use berth_registry::ScrubReport;

use crate::admin::AdminError;
use crate::client::Api;
use crate::gc_cmd::human_bytes;

/// Runs one scrub. `Ok(false)` when it found corrupt or missing blobs.
pub async fn run(api: &Api, json: bool) -> Result<bool, AdminError> {
    if !json {
        eprintln!("scrubbing: re-reading every blob at rest...");
    }
    let report: ScrubReport =
        crate::job_stream::follow(api, "/berth/v1/scrub", "scrub", |p: &ScrubReport| {
            if !json && !p.phase.is_empty() {
                eprintln!(
                    "  {:<8} {} blobs ({}) checked, {} corrupt; {:.0} s",
                    p.phase,
                    p.blobs_checked,
                    human_bytes(p.bytes_checked),
                    p.corrupt.len(),
                    p.duration_ms as f64 / 1000.0
                );
                let _ = std::io::stderr().flush();
            }
        })
        .await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
        return Ok(report.clean());
    }
    println!(
        "checked {} blobs ({}) in {:.1} s: {} corrupt, {} missing",
        report.blobs_checked,
        human_bytes(report.bytes_checked),
        report.duration_ms as f64 / 1000.0,
        report.corrupt.len(),
        report.missing.len()
    );
    for digest in &report.corrupt {
        println!("corrupt {digest}");
    }
    for digest in &report.missing {
        println!("missing {digest}");
    }
    Ok(report.clean())
}
