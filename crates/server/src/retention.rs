//! Retention as a service: the configured rules, one application at a
//! time on a node, its metrics, and the endpoints behind `berth retention`:
//! `GET /berth/v1/retention/plan` (what the rules would delete now) and
//! `POST /berth/v1/retention/apply` (delete it; the deletes go to the
//! trash).

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use berth_registry::{Registry, RegistryError, RetentionReport, RetentionRule};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry as PromRegistry;

use crate::AppState;
use crate::error::ApiError;

#[derive(Default)]
struct RetentionMetrics {
    runs: Counter,
    failures: Counter,
    tags: Counter,
    manifests: Counter,
    last_success: Gauge,
}

pub struct Retention {
    registry: Arc<Registry>,
    rules: Vec<RetentionRule>,
    running: tokio::sync::Mutex<()>,
    metrics: RetentionMetrics,
}

impl Retention {
    /// When retention last succeeded on this node (Unix s; 0: never).
    pub fn last_success_secs(&self) -> i64 {
        self.metrics.last_success.get()
    }

    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    pub fn new(registry: Arc<Registry>, rules: Vec<RetentionRule>) -> Self {
        Self {
            registry,
            rules,
            running: tokio::sync::Mutex::new(()),
            metrics: RetentionMetrics::default(),
        }
    }

    pub fn has_rules(&self) -> bool {
        !self.rules.is_empty()
    }

    /// Plans and applies the rules once.
    pub async fn apply(&self) -> Result<RetentionReport, RegistryError> {
        let _one = self.running.lock().await;
        self.metrics.runs.inc();
        let result = async {
            let plan = self.registry.retention_plan(&self.rules).await?;
            self.registry.apply_retention(&plan).await
        }
        .await;
        match &result {
            Ok(report) => {
                self.metrics.tags.inc_by(report.tags_deleted);
                self.metrics.manifests.inc_by(report.manifests_deleted);
                self.metrics
                    .last_success
                    .set((berth_registry::now_ms() / 1000) as i64);
                if report.tags_deleted + report.manifests_deleted > 0 {
                    tracing::info!(
                        tags = report.tags_deleted,
                        manifests = report.manifests_deleted,
                        changed = report.changed,
                        "retention"
                    );
                }
            }
            Err(e) => {
                self.metrics.failures.inc();
                tracing::warn!(error = %e, "retention failed; it will run again");
            }
        }
        result
    }

    pub fn register_metrics(&self, registry: &mut PromRegistry) {
        let m = &self.metrics;
        registry.register("retention_runs", "Retention runs", m.runs.clone());
        registry.register(
            "retention_failures",
            "Retention runs that failed",
            m.failures.clone(),
        );
        registry.register(
            "retention_tags_deleted",
            "Tags deleted by retention rules (to the trash)",
            m.tags.clone(),
        );
        registry.register(
            "retention_manifests_deleted",
            "Untagged manifests deleted by retention rules (to the trash)",
            m.manifests.clone(),
        );
        registry.register(
            "retention_last_success_timestamp_seconds",
            "When retention last succeeded (Unix time)",
            m.last_success.clone(),
        );
    }
}

/// `GET /berth/v1/retention/plan`.
pub async fn plan(State(state): State<AppState>) -> Response {
    match state.registry.retention_plan(&state.retention.rules).await {
        Ok(plan) => axum::Json(plan).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// `POST /berth/v1/retention/apply`.
pub async fn apply(State(state): State<AppState>) -> Response {
    match state.retention.apply().await {
        Ok(report) => axum::Json(report).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}
