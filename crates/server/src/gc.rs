//! Garbage collection as a service: one collection at a time on a node,
//! its metrics, and `POST /berth/v1/gc?dry_run=BOOL&grace_secs=N`, which
//! streams the run's progress as JSON lines (see `progress`).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::response::Response;
use berth_registry::{GcOptions, GcReport, Registry, RegistryError};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry as PromRegistry;

use crate::AppState;
use crate::admin_query::{self, invalid};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Default)]
struct GcMetrics {
    runs: Family<OutcomeLabels, Counter>,
    duration: Gauge<f64, std::sync::atomic::AtomicU64>,
    links: Counter,
    blobs: Counter,
    bytes: Counter,
    uploads: Counter,
    last_success: Gauge,
}

/// Runs collections, one at a time on this node (a second waits), and
/// counts what they removed.
pub struct GarbageCollector {
    registry: Arc<Registry>,
    grace: Duration,
    running: tokio::sync::Mutex<()>,
    metrics: GcMetrics,
}

impl GarbageCollector {
    /// When a collection last succeeded on this node (Unix s; 0: never).
    pub fn last_success_secs(&self) -> i64 {
        self.metrics.last_success.get()
    }

    pub fn new(registry: Arc<Registry>, grace: Duration) -> Self {
        Self {
            registry,
            grace,
            running: tokio::sync::Mutex::new(()),
            metrics: GcMetrics::default(),
        }
    }

    /// The grace period used when a run names none.
    pub fn grace(&self) -> Duration {
        self.grace
    }

    pub async fn run(
        &self,
        options: GcOptions,
        progress: Option<&berth_registry::GcProgress>,
    ) -> Result<GcReport, RegistryError> {
        let _one = self.running.lock().await;
        let result = self.registry.collect_garbage(options, progress).await;
        let outcome = match &result {
            Ok(report) if !report.dry_run => {
                let m = &self.metrics;
                m.links.inc_by(report.links_removed);
                m.blobs.inc_by(report.blobs_removed);
                m.bytes.inc_by(report.bytes_removed);
                m.uploads.inc_by(report.uploads_removed);
                m.duration.set(report.duration_ms as f64 / 1000.0);
                m.last_success.set((berth_registry::now_ms() / 1000) as i64);
                tracing::info!(
                    links = report.links_removed,
                    links_dated = report.links_dated,
                    blobs = report.blobs_removed,
                    bytes = report.bytes_removed,
                    uploads = report.uploads_removed,
                    duration_ms = report.duration_ms,
                    "garbage collection"
                );
                "ok"
            }
            Ok(_) => "dry_run",
            Err(e) => {
                tracing::warn!(error = %e, "garbage collection failed; it will run again");
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
            "gc_runs",
            "Garbage collections by outcome (ok, dry_run, failed)",
            m.runs.clone(),
        );
        registry.register(
            "gc_duration_seconds",
            "Duration of the last successful garbage collection",
            m.duration.clone(),
        );
        registry.register(
            "gc_links_removed",
            "Repository links removed because no manifest of the repository references them",
            m.links.clone(),
        );
        registry.register(
            "gc_blobs_removed",
            "Blobs whose bytes were removed because nothing references them",
            m.blobs.clone(),
        );
        registry.register(
            "gc_bytes_removed",
            "Bytes of the blobs removed",
            m.bytes.clone(),
        );
        registry.register(
            "gc_uploads_removed",
            "Expired upload sessions and upload data without a session removed",
            m.uploads.clone(),
        );
        registry.register(
            "gc_last_success_timestamp_seconds",
            "When the last garbage collection succeeded (Unix time)",
            m.last_success.clone(),
        );
    }
}

/// `POST /berth/v1/gc`.
pub async fn run(State(state): State<AppState>, RawQuery(query): RawQuery) -> Response {
    let pairs = match admin_query::parse(query.as_deref(), &["dry_run", "grace_secs"]) {
        Ok(p) => p,
        Err(message) => return admin_query::invalid(message),
    };
    let dry_run = match admin_query::dry_run(&pairs) {
        Ok(d) => d,
        Err(message) => return admin_query::invalid(message),
    };
    let grace = match pairs.get("grace_secs") {
        None => state.gc.grace(),
        Some(v) => match v.parse::<u64>() {
            Ok(secs) if secs <= 10 * 365 * 86_400 => Duration::from_secs(secs),
            _ => return invalid(format!("grace_secs must be a number of seconds, not {v:?}")),
        },
    };
    let options = GcOptions {
        dry_run,
        grace_ms: grace.as_millis() as u64,
    };
    let (progress, watching) = tokio::sync::watch::channel(GcReport::default());
    let gc = state.gc.clone();
    let task = tokio::spawn(async move { gc.run(options, Some(&progress)).await });
    crate::progress::stream(task, watching, "collection")
}
