//! Tag history and restore, used by `berth tags`:
//! `GET /berth/v1/tags/history?repository=NAME&tag=TAG` lists every digest
//! the tag pointed to (oldest first), when, from which region and by whom;
//! `POST /berth/v1/tags/restore?repository=NAME&tag=TAG&digest=DIGEST`
//! points the tag at a manifest it pointed to before (a push, so it is
//! logged, replicated and recorded in the history like one).

use axum::Extension;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use berth_oci::{Digest, ErrorCode, RepositoryName, Tag};

use crate::AppState;
use crate::error::ApiError;
use crate::security::Caller;

#[derive(serde::Deserialize)]
pub struct HistoryQuery {
    repository: String,
    tag: String,
}

fn invalid(code: ErrorCode, e: impl std::fmt::Display) -> Response {
    ApiError::new(code).message(e.to_string()).into_response()
}

/// Who a history entry names for this caller: none without authentication.
pub fn author(state: &AppState, caller: Option<&Caller>) -> Option<String> {
    if !state.security.auth.enabled() {
        return None;
    }
    caller.map(|c| c.identity.display())
}

pub async fn history(State(state): State<AppState>, Query(query): Query<HistoryQuery>) -> Response {
    let name = match RepositoryName::parse(&query.repository) {
        Ok(n) => n,
        Err(e) => return invalid(ErrorCode::NameInvalid, e),
    };
    let tag = match Tag::parse(&query.tag) {
        Ok(t) => t,
        Err(e) => return invalid(ErrorCode::ManifestInvalid, e),
    };
    let current = match state.registry.find_tag(&name, &tag).await {
        Ok(c) => c,
        Err(e) => return ApiError::from(e).into_response(),
    };
    match state.registry.tag_history(&name, tag.as_str()).await {
        Ok(entries) => axum::Json(serde_json::json!({
            "repository": query.repository,
            "tag": query.tag,
            "current": current,
            "history": entries
                .iter()
                .map(|e| serde_json::json!({
                    "digest": e.digest,
                    "at_ms": berth_registry::stamp_ms(&e.stamp),
                    "region": e.stamp.origin,
                    "by": e.by,
                    "stamp": e.stamp,
                }))
                .collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

#[derive(serde::Deserialize)]
pub struct RestoreQuery {
    repository: String,
    tag: String,
    digest: String,
}

pub async fn restore(
    State(state): State<AppState>,
    caller: Option<Extension<Caller>>,
    Query(query): Query<RestoreQuery>,
) -> Response {
    let name = match RepositoryName::parse(&query.repository) {
        Ok(n) => n,
        Err(e) => return invalid(ErrorCode::NameInvalid, e),
    };
    let tag = match Tag::parse(&query.tag) {
        Ok(t) => t,
        Err(e) => return invalid(ErrorCode::ManifestInvalid, e),
    };
    let digest: Digest = match query.digest.parse() {
        Ok(d) => d,
        Err(e) => return invalid(ErrorCode::DigestInvalid, e),
    };
    let previous = match state.registry.find_tag(&name, &tag).await {
        Ok(p) => p,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let by = author(&state, caller.as_deref());
    match state
        .registry
        .restore_tag(&name, &tag, &digest, by.as_deref())
        .await
    {
        Ok(()) => axum::Json(serde_json::json!({
            "repository": query.repository,
            "tag": query.tag,
            "digest": digest,
            "previous": previous,
        }))
        .into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}
