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
    match readiness(&state).await {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

/// Why this node cannot serve traffic now, if it cannot (`/readyz`, the
/// `berth_node_ready` gauge and the console all ask this).
pub async fn readiness(state: &AppState) -> Result<(), String> {
    if !state.ready.load(Ordering::Acquire) {
        return Err("starting or draining".into());
    }
    if let Some(replication) = &state.replication
        && replication.serving_disabled().await.unwrap_or(false)
    {
        return Err("serving is disabled in this region (berth replication serving on)".into());
    }
    state.registry.check_health().await.map_err(|e| {
        tracing::warn!(error = %e, "readiness check failed");
        e.to_string()
    })
}
