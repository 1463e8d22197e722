//! Admin endpoints behind `berth token`: API tokens (create, list, revoke)
//! and the token service's signing keys (list, rotate).

use axum::Extension;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use berth_auth::{Actions, ApiTokenError, NewToken, now_ms};
use berth_oci::ErrorCode;
use http::StatusCode;

use crate::AppState;
use crate::error::ApiError;
use crate::security::{AuditNote, Caller};

fn not_configured() -> Response {
    ApiError::new(ErrorCode::Unsupported)
        .status(StatusCode::NOT_FOUND)
        .message("authentication is not configured on this registry, so it has no API tokens")
        .into_response()
}

fn failed(e: ApiTokenError) -> Response {
    let (status, code) = match &e {
        ApiTokenError::BadName(_) | ApiTokenError::Invalid(_) => {
            (StatusCode::BAD_REQUEST, ErrorCode::Unsupported)
        }
        ApiTokenError::Exists(_) => (StatusCode::CONFLICT, ErrorCode::Denied),
        ApiTokenError::Unknown(_) => (StatusCode::NOT_FOUND, ErrorCode::NameUnknown),
        ApiTokenError::TooMany => (StatusCode::CONFLICT, ErrorCode::Denied),
        ApiTokenError::Store(store) => {
            tracing::error!(error = %store, "API token store failed");
            return ApiError::new(ErrorCode::Unavailable)
                .message("the metadata store is unavailable; retry")
                .into_response();
        }
    };
    ApiError::new(code)
        .status(status)
        .message(e.to_string())
        .into_response()
}

fn with_note(mut response: Response, event: &'static str, detail: String) -> Response {
    response.extensions_mut().insert(AuditNote {
        event: Some(event),
        detail,
    });
    response
}

pub async fn list(State(state): State<AppState>) -> Response {
    let Some(tokens) = state.security.auth.api_tokens() else {
        return not_configured();
    };
    match tokens.list().await {
        Ok(records) => {
            let now = now_ms();
            let listed: Vec<serde_json::Value> = records
                .iter()
                .map(|r| {
                    serde_json::json!({
                        "name": r.name,
                        "repositories": r.repositories,
                        "actions": r.actions,
                        "created_ms": r.created_ms,
                        "expires_ms": r.expires_ms,
                        "expired": r.expires_ms.is_some_and(|e| e <= now),
                        "created_by": r.created_by,
                    })
                })
                .collect();
            axum::Json(serde_json::json!({ "tokens": listed })).into_response()
        }
        Err(e) => failed(e),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    name: String,
    repositories: Vec<String>,
    actions: Vec<String>,
    /// Lifetime in seconds; none: until revoked.
    #[serde(default)]
    expires_secs: Option<u64>,
}

pub async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: axum::body::Bytes,
) -> Response {
    let Some(tokens) = state.security.auth.api_tokens() else {
        return not_configured();
    };
    if body.len() > 64 * 1024 {
        return failed(ApiTokenError::Invalid("request too large".into()));
    }
    let request: CreateRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return failed(ApiTokenError::Invalid(format!("invalid request: {e}"))),
    };
    if request.repositories.len() > 64 {
        return failed(ApiTokenError::Invalid(
            "at most 64 repository patterns".into(),
        ));
    }
    let actions = match Actions::parse_list(&request.actions.join(",")) {
        Ok(a) => a,
        Err(e) => return failed(ApiTokenError::Invalid(e)),
    };
    let now = now_ms();
    let expires_ms = match request.expires_secs {
        Some(0) => {
            return failed(ApiTokenError::Invalid(
                "expires_secs must be positive".into(),
            ));
        }
        Some(s) => Some(now.saturating_add(s.saturating_mul(1000))),
        None => None,
    };
    let created = tokens
        .create(
            NewToken {
                name: request.name.clone(),
                repositories: request.repositories,
                actions,
                expires_ms,
                created_by: caller.identity.display(),
            },
            now,
        )
        .await;
    match created {
        Ok((record, secret)) => {
            let detail = format!(
                "token {} for {} actions {}",
                record.name,
                record.repositories.join(","),
                record.actions.join(",")
            );
            let body = serde_json::json!({
                "name": record.name,
                "secret": secret,
                "repositories": record.repositories,
                "actions": record.actions,
                "created_ms": record.created_ms,
                "expires_ms": record.expires_ms,
            });
            let mut response = (StatusCode::CREATED, axum::Json(body)).into_response();
            response.headers_mut().insert(
                http::header::CACHE_CONTROL,
                http::HeaderValue::from_static("no-store"),
            );
            with_note(response, "token_created", detail)
        }
        Err(e) => failed(e),
    }
}

pub async fn revoke(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    let Some(tokens) = state.security.auth.api_tokens() else {
        return not_configured();
    };
    match tokens.revoke(&name).await {
        Ok(record) => with_note(
            axum::Json(serde_json::json!({ "revoked": record.name })).into_response(),
            "token_revoked",
            format!("token {}", record.name),
        ),
        Err(e) => failed(e),
    }
}

pub async fn keys(State(state): State<AppState>) -> Response {
    match state.security.auth.keys() {
        Some(keys) if state.security.auth.enabled() => {
            axum::Json(serde_json::json!({ "keys": keys.list(now_ms()) })).into_response()
        }
        _ => not_configured(),
    }
}

pub async fn rotate(State(state): State<AppState>) -> Response {
    let auth = &state.security.auth;
    let Some(keys) = auth.keys().filter(|_| auth.enabled()) else {
        return not_configured();
    };
    match keys.rotate(auth.settings().token_ttl, now_ms()).await {
        Ok(kid) => with_note(
            axum::Json(serde_json::json!({
                "kid": kid,
                "signs_after_ms": berth_auth::keystore::ACTIVATION_DELAY.as_millis() as u64,
                "keys": keys.list(now_ms()),
            }))
            .into_response(),
            "key_rotated",
            format!("new signing key {kid}"),
        ),
        Err(berth_auth::KeyStoreError::FromFile) => ApiError::new(ErrorCode::Unsupported)
            .status(StatusCode::CONFLICT)
            .message("signing keys come from --token-key-file here: rotate by putting a new key first in that file")
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "signing key rotation failed");
            ApiError::new(ErrorCode::Unavailable)
                .message(format!("rotation failed: {e}"))
                .into_response()
        }
    }
}
