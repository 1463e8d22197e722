//! Operator endpoints of the pull-through cache, used by `berth cache`:
//! `GET /berth/v1/cache` lists cached images; `POST
//! /berth/v1/cache/pin?image=NAME:TAG&pinned=true|false` pins or unpins one.

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use berth_oci::ErrorCode;
use http::StatusCode;

use crate::AppState;
use crate::error::{ApiError, CacheSubject, cache_error};

fn no_cache() -> Response {
    ApiError::new(ErrorCode::Unsupported)
        .status(StatusCode::NOT_FOUND)
        .message("no pull-through cache is configured (see --upstream)")
        .into_response()
}

pub async fn list(State(state): State<AppState>) -> Response {
    let Some(cache) = &state.cache else {
        return no_cache();
    };
    match cache.list().await {
        Ok(entries) => axum::Json(serde_json::json!({ "images": entries })).into_response(),
        Err(e) => cache_error(e, CacheSubject::Manifest, false).into_response(),
    }
}

#[derive(serde::Deserialize)]
pub struct PinQuery {
    image: String,
    #[serde(default = "yes")]
    pinned: bool,
}

fn yes() -> bool {
    true
}

pub async fn pin(State(state): State<AppState>, Query(query): Query<PinQuery>) -> Response {
    let Some(cache) = &state.cache else {
        return no_cache();
    };
    let invalid = |why: &str| {
        ApiError::new(ErrorCode::NameInvalid)
            .message(format!("image {:?}: {why}", query.image))
            .into_response()
    };
    let Some((name, reference)) = berth_proxy::parse_image(&query.image) else {
        return invalid("expected NAME:TAG or NAME@DIGEST");
    };
    let target = match cache.route(&name, None).await {
        Ok(Some(t)) => t,
        Ok(None) => return invalid("not in an upstream's namespace"),
        Err(e) => return cache_error(e, CacheSubject::Manifest, false).into_response(),
    };
    match cache.pin(&target.local, &reference, query.pinned).await {
        Ok(changed) => axum::Json(serde_json::json!({
            "image": query.image,
            "pinned": query.pinned,
            "changed": changed,
        }))
        .into_response(),
        Err(e) => cache_error(e, CacheSubject::Manifest, false).into_response(),
    }
}
