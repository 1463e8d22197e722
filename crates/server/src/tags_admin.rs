//! Tag history and restore, used by `berth tags`:
//! `GET /berth/v1/tags/history?repository=NAME&tag=TAG` lists every digest
//! the tag pointed to (oldest first), when, from which region and by whom;
//! `POST /berth/v1/tags/restore?repository=NAME&tag=TAG&digest=DIGEST`
//! points the tag at a manifest of the repository, usually one it pointed
//! to before (a push, so it is logged, replicated, audited and recorded in
//! the history like one).

use axum::Extension;
use axum::extract::{RawQuery, State};
use axum::response::{IntoResponse, Response};
use berth_oci::{Digest, ErrorCode, RepositoryName, Tag};

use crate::AppState;
use crate::error::ApiError;
use crate::security::Caller;

fn invalid(code: ErrorCode, e: impl std::fmt::Display) -> Response {
    ApiError::new(code).message(e.to_string()).into_response()
}

/// The query's pairs, parsed as the access check parsed them; a repeated
/// key is refused, so that what the check read is what the handler acts on.
/// The error is the message for a `400`.
pub fn single_values(
    query: Option<&str>,
) -> Result<std::collections::HashMap<String, String>, String> {
    let pairs = berth_oci::query::parse_pairs(query).map_err(|e| format!("invalid query: {e}"))?;
    let mut out = std::collections::HashMap::new();
    for (k, v) in pairs {
        if out.insert(k.clone(), v).is_some() {
            return Err(format!("parameter {k:?} given twice"));
        }
    }
    Ok(out)
}

/// The named parameters, all required; the error is the message for a
/// `400`.
fn required<const N: usize>(query: Option<&str>, names: [&str; N]) -> Result<[String; N], String> {
    let mut pairs = single_values(query)?;
    let mut out: [String; N] = std::array::from_fn(|_| String::new());
    for (slot, name) in out.iter_mut().zip(names) {
        *slot = pairs
            .remove(name)
            .ok_or_else(|| format!("parameter {name} is required"))?;
    }
    Ok(out)
}

/// A `400` for a bad query.
pub fn bad_query(message: String) -> Response {
    invalid(ErrorCode::Unsupported, message)
}

/// Who a history entry names for this caller: none without authentication.
pub fn author(state: &AppState, caller: Option<&Caller>) -> Option<String> {
    if !state.security.auth.enabled() {
        return None;
    }
    caller.map(|c| c.identity.display())
}

pub async fn history(State(state): State<AppState>, RawQuery(query): RawQuery) -> Response {
    let [repository, tag] = match required(query.as_deref(), ["repository", "tag"]) {
        Ok(v) => v,
        Err(m) => return bad_query(m),
    };
    let name = match RepositoryName::parse(&repository) {
        Ok(n) => n,
        Err(e) => return invalid(ErrorCode::NameInvalid, e),
    };
    let tag = match Tag::parse(&tag) {
        Ok(t) => t,
        Err(e) => return invalid(ErrorCode::ManifestInvalid, e),
    };
    let current = match state.registry.find_tag(&name, &tag).await {
        Ok(c) => c,
        Err(e) => return ApiError::from(e).into_response(),
    };
    match state.registry.tag_history(&name, tag.as_str()).await {
        Ok(entries) => axum::Json(serde_json::json!({
            "repository": repository,
            "tag": tag.as_str(),
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

pub async fn restore(
    State(state): State<AppState>,
    caller: Option<Extension<Caller>>,
    RawQuery(query): RawQuery,
) -> Response {
    let [repository, tag, digest] =
        match required(query.as_deref(), ["repository", "tag", "digest"]) {
            Ok(v) => v,
            Err(m) => return bad_query(m),
        };
    let name = match RepositoryName::parse(&repository) {
        Ok(n) => n,
        Err(e) => return invalid(ErrorCode::NameInvalid, e),
    };
    let tag = match Tag::parse(&tag) {
        Ok(t) => t,
        Err(e) => return invalid(ErrorCode::ManifestInvalid, e),
    };
    let digest: Digest = match digest.parse() {
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
            "repository": repository,
            "tag": tag.as_str(),
            "digest": digest,
            "previous": previous,
        }))
        .into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}
