//! The query string of an operator endpoint: only the parameters it knows,
//! and `dry_run=true|false`, with a `400` naming what is wrong.

use std::collections::HashMap;

use axum::response::{IntoResponse, Response};
use berth_oci::ErrorCode;
use http::StatusCode;

use crate::error::ApiError;

/// A `400 UNSUPPORTED` with `message`.
pub fn invalid(message: String) -> Response {
    ApiError::new(ErrorCode::Unsupported)
        .status(StatusCode::BAD_REQUEST)
        .message(message)
        .into_response()
}

/// The parameters of `query`, refusing any not in `known` (the error is
/// the message for [`invalid`]).
pub fn parse(query: Option<&str>, known: &[&str]) -> Result<HashMap<String, String>, String> {
    let pairs = berth_oci::query::parse(query).map_err(|e| format!("invalid query: {e}"))?;
    if let Some(unknown) = pairs.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(format!("unknown parameter {unknown:?}"));
    }
    Ok(pairs)
}

/// `dry_run`, false when absent.
pub fn dry_run(pairs: &HashMap<String, String>) -> Result<bool, String> {
    match pairs.get("dry_run").map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(format!("dry_run must be true or false, not {other:?}")),
    }
}
