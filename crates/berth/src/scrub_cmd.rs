//! `berth scrub`: re-read and re-hash every blob at rest in a running
//! registry now, through its HTTP API, showing progress; names every
//! corrupt or missing blob and fails when it found any.

use std::io::Write as _;

use berth_registry::ScrubReport;

use crate::admin::AdminError;
use crate::client::Api;
use crate::gc_cmd::human_bytes;

/// Runs one scrub. `Ok(false)` when it found corrupt or missing blobs (and,
/// with `repair`, did not repair them all).
pub async fn run(api: &Api, repair: bool, json: bool) -> Result<bool, AdminError> {
    if !json {
        eprintln!("scrubbing: re-reading every blob at rest...");
    }
    let path = if repair {
        "/berth/v1/scrub?repair=true"
    } else {
        "/berth/v1/scrub"
    };
    let progress = crate::progress::Progress::start("scrub", None, json);
    let report: ScrubReport = crate::job_stream::follow(api, path, "scrub", |p: &ScrubReport| {
        if !json && !p.phase.is_empty() {
            progress.update(p.bytes_checked, || {
                format!(
                    "  {:<8} {} blobs ({}) checked, {} corrupt; {:.0} s",
                    p.phase,
                    p.blobs_checked,
                    human_bytes(p.bytes_checked),
                    p.corrupt.len(),
                    p.duration_ms as f64 / 1000.0
                )
            });
            let _ = std::io::stderr().flush();
        }
    })
    .await?;
    progress.finish();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
        return Ok(if repair {
            report.healed()
        } else {
            report.clean()
        });
    }
    println!(
        "checked {} blobs ({}) in {:.1} s: {} corrupt, {} missing",
        report.blobs_checked,
        human_bytes(report.bytes_checked),
        report.duration_ms as f64 / 1000.0,
        report.corrupt.len(),
        report.missing.len()
    );
    let fixed = |digest: &berth_oci::Digest| {
        report
            .repaired
            .iter()
            .find(|r| &r.digest == digest)
            .map(|r| format!(" (repaired from {})", r.from))
            .unwrap_or_default()
    };
    for digest in &report.corrupt {
        println!("corrupt {digest}{}", fixed(digest));
    }
    for digest in &report.missing {
        println!("missing {digest}{}", fixed(digest));
    }
    if repair {
        println!(
            "repaired {} of {}",
            report.repaired.len(),
            report.corrupt.len() + report.missing.len()
        );
        return Ok(report.healed());
    }
    Ok(report.clean())
}
