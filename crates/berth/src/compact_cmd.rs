//! `berth compact`: compact a running registry's metadata now (the change
//! log every peer has applied, old tombstones and tag history), through its
//! HTTP API, and show what the metadata weighs before and after.

use std::time::Duration;

use crate::admin::AdminError;
use crate::client::Api;
use crate::gc_cmd::human_bytes;

/// Runs one compaction; prints what it removed (or, dry, would remove).
pub async fn run(api: &Api, dry_run: bool, json: bool) -> Result<bool, AdminError> {
    let path = format!("/berth/v1/compact?dry_run={dry_run}");
    if !json {
        eprintln!(
            "{} metadata...",
            if dry_run { "measuring" } else { "compacting" }
        );
    }
    // It scans all metadata twice to measure it: minutes at worst.
    let value = api
        .json_within(
            reqwest::Method::POST,
            &path,
            None,
            None,
            Duration::from_secs(600),
        )
        .await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
        return Ok(true);
    }
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    let verb = if dry_run { "would remove" } else { "removed" };
    println!(
        "{verb} {} change-log entries, {} tombstones, {} tag-history entries (window {} s)",
        n(&value["log_entries"]),
        n(&value["tombstones"]),
        n(&value["history_entries"]),
        n(&value["window_secs"]),
    );
    println!(
        "{:<12} {:>10} {:>12} {:>10} {:>12}",
        "metadata", "records", "bytes", "after", "bytes after"
    );
    for kind in [
        "change_log",
        "tombstones",
        "tag_history",
        "tags",
        "manifests",
    ] {
        let before = &value["before"][kind];
        let after = &value["after"][kind];
        println!(
            "{:<12} {:>10} {:>12} {:>10} {:>12}",
            kind.replace('_', "-"),
            n(&before["records"]),
            human_bytes(n(&before["bytes"])),
            n(&after["records"]),
            human_bytes(n(&after["bytes"])),
        );
    }
    Ok(true)
}
