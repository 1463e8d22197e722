//! The trash, used by `berth trash ls` and `berth undelete`:
//! `GET /berth/v1/trash[?repository=NAME]` lists deleted manifests and tags
//! still kept; `POST /berth/v1/undelete?repository=NAME&reference=TAG|DIGEST`
//! brings one back (a push, so it is logged and replicated like one).

use axum::Extension;
use axum::extract::{RawQuery, State};
use axum::response::{IntoResponse, Response};
use berth_oci::{ErrorCode, Reference, RepositoryName};

use crate::AppState;
use crate::error::ApiError;
use crate::security::Caller;
use crate::tags_admin::{author, bad_query, single_values};

fn invalid(code: ErrorCode, e: impl std::fmt::Display) -> Response {
    ApiError::new(code).message(e.to_string()).into_response()
}

pub async fn list(State(state): State<AppState>, RawQuery(query): RawQuery) -> Response {
    let query = match single_values(query.as_deref()) {
        Ok(q) => q,
        Err(m) => return bad_query(m),
    };
    let name = match query.get("repository").map(|r| RepositoryName::parse(r)) {
        None => None,
        Some(Ok(n)) => Some(n),
        Some(Err(e)) => return invalid(ErrorCode::NameInvalid, e),
    };
    match state.registry.trash(name.as_ref()).await {
        Ok(entries) => axum::Json(serde_json::json!({ "trash": entries })).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

pub async fn undelete(
    State(state): State<AppState>,
    caller: Option<Extension<Caller>>,
    RawQuery(query): RawQuery,
) -> Response {
    let query = match single_values(query.as_deref()) {
        Ok(q) => q,
        Err(m) => return bad_query(m),
    };
    let (Some(repository), Some(reference)) = (query.get("repository"), query.get("reference"))
    else {
        return invalid(
            ErrorCode::Unsupported,
            "repository and reference (a tag or a digest) are required",
        );
    };
    let name = match RepositoryName::parse(repository) {
        Ok(n) => n,
        Err(e) => return invalid(ErrorCode::NameInvalid, e),
    };
    let reference = match Reference::parse(reference) {
        Ok(r) => r,
        Err(e) => return invalid(ErrorCode::ManifestInvalid, e),
    };
    let by = author(&state, caller.as_deref());
    match state
        .registry
        .undelete(&name, &reference, by.as_deref())
        .await
    {
        Ok(undeleted) => axum::Json(undeleted).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}
