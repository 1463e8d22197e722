//! Liveness and readiness probes for load balancers and orchestrators.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::response::IntoResponse;
use http::StatusCode;

use crate::AppState;

/// The process is alive and answering.
pub async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, "ok\n")
}

/// The node can serve traffic: started, not draining, and its stores answer.
pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    if !state.ready.load(Ordering::Acquire) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: starting or draining\n".to_string(),
        );
    }
    if let Some(replication) = &state.replication
        && replication.serving_disabled().await.unwrap_or(false)
    {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: serving is disabled in this region (berth replication serving on)\n"
                .to_string(),
        );
    }
    match state.registry.check_health().await {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed");
            (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n"))
        }
    }
}
