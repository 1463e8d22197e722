//! Geo-replication endpoints: the change feed other regions tail, and the
//! operator endpoints behind `berth replication`. Who may call them (a
//! peer's credential for the feed, an administrator for the rest) is
//! decided by the security guard in front of them.

use std::time::Duration;

use axum::Extension;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use berth_auth::Identity;
use berth_oci::ErrorCode;
use berth_registry::RecordKind;
use berth_replication::FeedReader;
use http::StatusCode;

use crate::AppState;
use crate::error::ApiError;
use crate::security::Caller;

/// Longest a feed request may wait for changes.
const MAX_FEED_WAIT: Duration = Duration::from_secs(30);

fn not_configured() -> Response {
    ApiError::new(ErrorCode::Unsupported)
        .status(StatusCode::NOT_FOUND)
        .message("replication is not configured (see --region and --peer)")
        .into_response()
}

fn failed(e: berth_replication::ReplicationError) -> Response {
    match e {
        berth_replication::ReplicationError::Registry(e) => ApiError::from(e).into_response(),
        e @ berth_replication::ReplicationError::Config(_) => ApiError::new(ErrorCode::NameUnknown)
            .message(e.to_string())
            .into_response(),
        e => ApiError::new(ErrorCode::Unavailable)
            .message(e.to_string())
            .into_response(),
    }
}

#[derive(serde::Deserialize)]
pub struct FeedQuery {
    #[serde(default)]
    after: u64,
    #[serde(default = "default_limit")]
    limit: usize,
    #[serde(default)]
    wait_ms: u64,
    /// The reading region, and the epoch of this region's log its cursor
    /// is in (for compaction).
    reader: Option<String>,
    #[serde(default)]
    epoch: String,
}

fn default_limit() -> usize {
    256
}

/// Which peer region a feed or snapshot request reads as.
fn reader_region(
    state: &AppState,
    caller: Option<&Extension<Caller>>,
    named: Option<&String>,
) -> Option<String> {
    match caller.map(|c| &c.identity) {
        // A secret several peers share names the first of them: the name
        // the reader gives counts if that secret is also its own.
        Some(Identity::Peer(name)) => match named {
            Some(reader) if state.security.auth.peer_credential_shared(name, reader) => {
                Some(reader.clone())
            }
            _ => Some(name.clone()),
        },
        // On an open registry (credentials not checked) the name it gives
        // counts. An early acknowledgement only makes that peer resync.
        _ if !state.security.auth.enabled() => named.cloned(),
        _ => None,
    }
}

pub async fn feed(
    State(state): State<AppState>,
    caller: Option<Extension<Caller>>,
    Query(query): Query<FeedQuery>,
) -> Response {
    let Some(replication) = &state.replication else {
        return not_configured();
    };
    let wait = Duration::from_millis(query.wait_ms).min(MAX_FEED_WAIT);
    let region = reader_region(&state, caller.as_ref(), query.reader.as_ref());
    // A reader that does not say who it is predates compaction: it would
    // not notice a gap, so it is told instead of served one.
    let resynchronizes = query.reader.is_some();
    let reader = region.map(|region| FeedReader {
        region,
        epoch: query.epoch.clone(),
    });
    match replication
        .feed(query.after, query.limit, wait, reader)
        .await
    {
        Ok(page) if page.compacted > query.after && !resynchronizes => {
            ApiError::new(ErrorCode::Unsupported)
                .status(StatusCode::GONE)
                .message(format!(
                    "changes after {} were compacted away; a region that resynchronizes (a newer berth) is needed",
                    query.after
                ))
                .into_response()
        }
        Ok(page) => axum::Json(page).into_response(),
        Err(e) => failed(e),
    }
}

#[derive(serde::Deserialize)]
pub struct SnapshotQuery {
    kind: String,
    after: Option<String>,
    #[serde(default = "default_limit")]
    limit: usize,
    /// The reading region, the epoch of this region's log its cursor is
    /// in, and that cursor (it stays live while it resynchronizes).
    reader: Option<String>,
    #[serde(default)]
    epoch: String,
    cursor: Option<u64>,
}

/// A page of this region's records, for a peer that fell behind its
/// compacted log.
pub async fn snapshot(
    State(state): State<AppState>,
    caller: Option<Extension<Caller>>,
    Query(query): Query<SnapshotQuery>,
) -> Response {
    let Some(replication) = &state.replication else {
        return not_configured();
    };
    let Some(kind) = RecordKind::parse(&query.kind) else {
        return ApiError::new(ErrorCode::Unsupported)
            .status(StatusCode::BAD_REQUEST)
            .message("kind must be tags, tag-tombstones, manifests or manifest-tombstones")
            .into_response();
    };
    let reader = reader_region(&state, caller.as_ref(), query.reader.as_ref())
        .zip(query.cursor)
        .map(|(region, cursor)| {
            (
                FeedReader {
                    region,
                    epoch: query.epoch.clone(),
                },
                cursor,
            )
        });
    match replication
        .snapshot(kind, query.after.as_deref(), query.limit, reader)
        .await
    {
        Ok(page) => axum::Json(page).into_response(),
        Err(e) => failed(e),
    }
}

pub async fn status(State(state): State<AppState>) -> Response {
    let Some(replication) = &state.replication else {
        return not_configured();
    };
    let serving = match replication.serving_disabled().await {
        Ok(disabled) => !disabled,
        Err(e) => return failed(e),
    };
    match replication.status().await {
        Ok(peers) => axum::Json(serde_json::json!({
            "region": replication.region(),
            "serving": serving,
            "peers": peers,
        }))
        .into_response(),
        Err(e) => failed(e),
    }
}

#[derive(serde::Deserialize)]
pub struct StateQuery {
    #[serde(default)]
    lines: bool,
}

pub async fn state(State(state): State<AppState>, Query(query): Query<StateQuery>) -> Response {
    match state.registry.state_summary(query.lines).await {
        Ok(summary) => axum::Json(summary).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

pub async fn pause(
    State(state): State<AppState>,
    Path((peer, action)): Path<(String, String)>,
) -> Response {
    let Some(replication) = &state.replication else {
        return not_configured();
    };
    let paused = match action.as_str() {
        "pause" => true,
        "resume" => false,
        _ => {
            return ApiError::new(ErrorCode::Unsupported)
                .status(StatusCode::NOT_FOUND)
                .message("expected pause or resume")
                .into_response();
        }
    };
    match replication.set_paused(&peer, paused).await {
        Ok(()) => axum::Json(serde_json::json!({ "peer": peer, "paused": paused })).into_response(),
        Err(e) => failed(e),
    }
}

#[derive(serde::Deserialize)]
pub struct ServingQuery {
    enabled: bool,
}

pub async fn serving(State(state): State<AppState>, Query(query): Query<ServingQuery>) -> Response {
    let Some(replication) = &state.replication else {
        return not_configured();
    };
    match replication.set_serving(query.enabled).await {
        Ok(()) => axum::Json(serde_json::json!({ "serving": query.enabled })).into_response(),
        Err(e) => failed(e),
    }
}
