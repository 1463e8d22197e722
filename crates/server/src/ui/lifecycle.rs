//! `/ui/lifecycle`: the region's housekeeping. Which node leads garbage
//! collection, compaction, scrub, retention and backups, when each last
//! succeeded on this node, what scrub left unrepaired, and the backups in
//! the target (newest first) with the moment a point-in-time restore
//! reaches.

use std::time::Duration;

use axum::extract::State;
use axum::response::Response;
use maud::{Markup, html};

use super::format::{ago, bytes, time};
use super::{Nav, Viewer};
use crate::AppState;

/// Backups listed, newest first.
const SHOWN_BACKUPS: usize = 10;
/// A target that does not list within this long is reported, not waited for.
const LIST_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn page(State(state): State<AppState>, viewer: Viewer, uri: http::Uri) -> Response {
    if !viewer.may_admin() {
        return viewer.refuse(uri.path());
    }
    let latest = state.region.latest();
    let leader = |job: &str| -> String {
        latest
            .as_ref()
            .and_then(|s| s.nodes.as_ref().ok())
            .and_then(|nodes| nodes.iter().find(|n| n.leads.iter().any(|l| l == job)))
            .map_or("-".to_string(), |n| n.name.clone())
    };
    let secs = |s: i64| ago((s.max(0) as u64) * 1000);
    let (corrupt, missing) = state.scrubber.unrepaired();
    let rows: Vec<(&str, &str, String, Markup)> = vec![
        (
            "Garbage collection",
            "gc",
            secs(state.gc.last_success_secs()),
            html! { "grace " (humantime::format_duration(state.gc.grace())) },
        ),
        (
            "Metadata compaction",
            "compaction",
            secs(state.compactor.last_success_secs()),
            html! {},
        ),
        (
            "Scrub",
            "scrub",
            secs(state.scrubber.last_success_secs()),
            html! {
                @if corrupt + missing > 0 { span.bad { (corrupt) " corrupt, " (missing) " missing, unrepaired" } }
                @else { span.ok { "nothing unrepaired" } }
            },
        ),
        (
            "Retention",
            "retention",
            secs(state.retention.last_success_secs()),
            html! { (state.retention.rule_count()) " rules" },
        ),
        (
            "Backups",
            "backup",
            secs(state.backups.last_success_secs()),
            html! { (state.backups.targets().len()) " targets" },
        ),
    ];
    let body = html! {
        h1 { "Lifecycle" }
        table #jobs {
            thead { tr { th { "Job" } th { "Led by" } th { "Last success on this node" } th { "Detail" } } }
            tbody {
                @for (label, job, last, detail) in &rows {
                    tr data-job=(job) {
                        td { (label) }
                        td { (leader(job)) }
                        td { (last) }
                        td { (detail) }
                    }
                }
            }
        }
        p.note { "A job runs on the node that leads it; the other nodes show \"never\" for it. "
            "Run one now with " code { "berth gc" } ", " code { "berth compact" } ", " code { "berth scrub" } " or " code { "berth backup create" } "." }
        (backups(&state).await)
    };
    super::page(&viewer, "Lifecycle", Nav::Lifecycle, false, body)
}

async fn backups(state: &AppState) -> Markup {
    let Some(url) = state.backups.targets().first() else {
        return html! {
            h2 { "Backups" }
            p.muted { "No backup target is configured (" code { "--backup-to" } ")." }
        };
    };
    let listed = match state.backups.target(None).await {
        Ok(target) => tokio::time::timeout(LIST_TIMEOUT, target.list())
            .await
            .map_err(|_| format!("the target did not answer within {LIST_TIMEOUT:?}"))
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map(|mut list| {
                list.sort_by(|a, b| b.id.cmp(&a.id));
                list
            }),
        Err(_) => Err("the target cannot be opened".to_string()),
    };
    html! {
        h2 { "Backups in " span.mono { (url) } }
        @match listed {
            Err(e) => p.error { "Cannot list the backups: " (e) },
            Ok(list) if list.is_empty() => p.muted #no-backups { "No backup yet." },
            Ok(list) => {
                p { (list.len()) " backups; the oldest, " (list.last().map_or("-", |b| b.id.as_str())) ", bounds a point-in-time restore." }
                table #backups {
                    thead { tr { th { "Id" } th { "Snapshot" } th.num { "Repositories" } th.num { "Tags" } th.num { "Blobs" } th.num { "Size" } th.num { "Copied" } th { "State" } } }
                    tbody {
                        @for b in list.iter().take(SHOWN_BACKUPS) {
                            tr {
                                td.mono { (b.id) }
                                td { (time(b.snapshot_ms.max(b.started_ms))) }
                                td.num { (b.repositories) }
                                td.num { (b.tags) }
                                td.num { (b.blobs) }
                                td.num { (bytes(b.bytes)) }
                                td.num { (bytes(b.copied_bytes)) }
                                td { @if b.lacking().is_empty() { span.ok { "complete" } } @else { span.warn { (b.lacking().len()) " blobs left out" } } }
                            }
                        }
                    }
                }
                p.note { "Restore with " code { "berth backup restore --id ID" } " or to a moment with " code { "--at TIME" } " (docs/backup.md)." }
            }
        }
    }
}
