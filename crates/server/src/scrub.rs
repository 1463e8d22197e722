//! Scrub as a service: one at a time on a node, its metrics, and `POST
//! /berth/v1/scrub`, which streams the run's progress as JSON lines (see
//! `progress`) for `berth scrub`.

use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::response::{IntoResponse, Response};
use berth_oci::ErrorCode;
use berth_registry::{Registry, RegistryError, ScrubProgress, ScrubReport};
use http::StatusCode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry as PromRegistry;

use crate::AppState;
use crate::error::ApiError;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Default)]
struct ScrubMetrics {
    runs: Family<OutcomeLabels, Counter>,
    blobs: Counter,
    bytes: Counter,
    corrupt: Gauge,
    missing: Gauge,
    last_success: Gauge,
}

/// Runs scrubs, one at a time on this node (a second waits).
pub struct Scrubber {
    registry: Arc<Registry>,
    running: tokio::sync::Mutex<()>,
    metrics: ScrubMetrics,
}

impl Scrubber {
    pub fn new(registry: Arc<Registry>) -> Self {
        Self {
            registry,
            running: tokio::sync::Mutex::new(()),
            metrics: ScrubMetrics::default(),
        }
    }

    pub async fn run(
        &self,
        progress: Option<&ScrubProgress>,
    ) -> Result<ScrubReport, RegistryError> {
        let _one = self.running.lock().await;
        let result = self.registry.scrub(progress).await;
        let outcome = match &result {
            Ok(report) => {
                let m = &self.metrics;
                m.blobs.inc_by(report.blobs_checked);
                m.bytes.inc_by(report.bytes_checked);
                m.corrupt.set(report.corrupt.len() as i64);
                m.missing.set(report.missing.len() as i64);
                m.last_success.set((berth_registry::now_ms() / 1000) as i64);
                if report.clean() {
                    tracing::info!(
                        blobs = report.blobs_checked,
                        bytes = report.bytes_checked,
                        duration_ms = report.duration_ms,
                        "scrub: every blob matches its digest"
                    );
                    "clean"
                } else {
                    tracing::error!(
                        blobs = report.blobs_checked,
                        corrupt = report.corrupt.len(),
                        missing = report.missing.len(),
                        "scrub: found blobs that are corrupt or missing"
                    );
                    "found"
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "scrub failed; it will run again");
                "failed"
            }
        };
        self.metrics
            .runs
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        result
    }

    pub fn register_metrics(&self, registry: &mut PromRegistry) {
        let m = &self.metrics;
        registry.register(
            "scrub_runs",
            "Scrubs by outcome (clean, found, failed)",
            m.runs.clone(),
        );
        registry.register(
            "scrub_blobs_checked",
            "Blobs re-read and re-hashed by scrubs",
            m.blobs.clone(),
        );
        registry.register(
            "scrub_bytes_checked",
            "Bytes re-read and re-hashed by scrubs",
            m.bytes.clone(),
        );
        registry.register(
            "scrub_corrupt_blobs",
            "Blobs the last scrub found not matching their digest",
            m.corrupt.clone(),
        );
        registry.register(
            "scrub_missing_blobs",
            "Blobs the last scrub found recorded but not stored",
            m.missing.clone(),
        );
        registry.register(
            "scrub_last_success_timestamp_seconds",
            "When the last scrub finished (Unix time)",
            m.last_success.clone(),
        );
    }
}

/// `POST /berth/v1/scrub`.
pub async fn run(State(state): State<AppState>, RawQuery(query): RawQuery) -> Response {
    if query.as_deref().is_some_and(|q| !q.is_empty()) {
        return ApiError::new(ErrorCode::Unsupported)
            .status(StatusCode::BAD_REQUEST)
            .message("scrub takes no parameters")
            .into_response();
    }
    let (progress, watching) = tokio::sync::watch::channel(ScrubReport::default());
    let scrubber = state.scrubber.clone();
    let task = tokio::spawn(async move { scrubber.run(Some(&progress)).await });
    crate::progress::stream(task, watching, "scrub")
}
