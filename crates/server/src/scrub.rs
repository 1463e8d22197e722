//! Scrub as a service: one at a time on a node, its metrics, and `POST
//! /berth/v1/scrub`, which streams the run's progress as JSON lines (see
//! `progress`) for `berth scrub`.

use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::response::Response;
use berth_registry::backup::Target;
use berth_registry::{BlobSource, Registry, RegistryError, ScrubProgress, ScrubReport};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry as PromRegistry;

use crate::AppState;

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
    repaired: Counter,
    last_success: Gauge,
}

/// Runs scrubs, one at a time on this node (a second waits), and repairs
/// what they find from the backup targets and the peer regions.
pub struct Scrubber {
    registry: Arc<Registry>,
    /// Backup targets (their URLs), tried first, in order.
    targets: Vec<String>,
    /// Peer regions, tried after the backups.
    peers: Vec<Arc<dyn BlobSource>>,
    running: tokio::sync::Mutex<()>,
    metrics: ScrubMetrics,
}

impl Scrubber {
    /// When a scrub last succeeded on this node (Unix s; 0: never).
    pub fn last_success_secs(&self) -> i64 {
        self.metrics.last_success.get()
    }

    /// Corrupt and missing blobs the last scrub here left unrepaired.
    pub fn unrepaired(&self) -> (i64, i64) {
        (self.metrics.corrupt.get(), self.metrics.missing.get())
    }

    pub fn new(
        registry: Arc<Registry>,
        targets: Vec<String>,
        peers: Vec<Arc<dyn BlobSource>>,
    ) -> Self {
        Self {
            registry,
            targets,
            peers,
            running: tokio::sync::Mutex::new(()),
            metrics: ScrubMetrics::default(),
        }
    }

    /// Where repairs look for good bytes: the backup targets that open,
    /// then the peers.
    async fn sources(&self) -> Vec<Arc<dyn BlobSource>> {
        let mut sources: Vec<Arc<dyn BlobSource>> = Vec::new();
        for url in &self.targets {
            let opening = url.clone();
            match tokio::task::spawn_blocking(move || Target::open(&opening)).await {
                Ok(Ok(target)) => sources.push(Arc::new(target)),
                Ok(Err(e)) => {
                    tracing::warn!(target = %url, error = %e, "repair: cannot open the backup target")
                }
                Err(e) => {
                    tracing::warn!(target = %url, error = %e, "repair: cannot open the backup target")
                }
            }
        }
        sources.extend(self.peers.iter().cloned());
        sources
    }

    /// Scrubs, and with `repair` replaces what it found from the sources.
    pub async fn run(
        &self,
        progress: Option<&ScrubProgress>,
        repair: bool,
    ) -> Result<ScrubReport, RegistryError> {
        let _one = self.running.lock().await;
        let mut result = self.registry.scrub(progress).await;
        if repair
            && let Ok(report) = &mut result
            && !report.clean()
        {
            report.phase = "repair".into();
            if let Some(progress) = progress {
                progress.send_replace(report.clone());
            }
            let bad: Vec<_> = report
                .corrupt
                .iter()
                .chain(&report.missing)
                .cloned()
                .collect();
            let sources = self.sources().await;
            if sources.is_empty() {
                tracing::warn!("scrub: nothing to repair from (no backup target, no peer region)");
            }
            match self.registry.repair_blobs(&bad, &sources).await {
                Ok(outcome) => {
                    self.metrics.repaired.inc_by(outcome.repaired.len() as u64);
                    report.repaired = outcome.repaired;
                    // Collected since the scrub: no longer a finding.
                    report.corrupt.retain(|d| !outcome.not_needed.contains(d));
                    report.missing.retain(|d| !outcome.not_needed.contains(d));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "scrub: the repair failed");
                }
            }
            report.phase = "done".into();
        }
        let outcome = match &result {
            Ok(report) => {
                let m = &self.metrics;
                m.blobs.inc_by(report.blobs_checked);
                m.bytes.inc_by(report.bytes_checked);
                let unrepaired = report.unrepaired();
                let still = |list: &[berth_oci::Digest]| {
                    list.iter().filter(|d| unrepaired.contains(d)).count() as i64
                };
                m.corrupt.set(still(&report.corrupt));
                m.missing.set(still(&report.missing));
                m.last_success.set((berth_registry::now_ms() / 1000) as i64);
                if report.clean() {
                    tracing::info!(
                        blobs = report.blobs_checked,
                        bytes = report.bytes_checked,
                        duration_ms = report.duration_ms,
                        "scrub: every blob matches its digest"
                    );
                    "clean"
                } else if report.healed() {
                    tracing::warn!(
                        blobs = report.blobs_checked,
                        repaired = report.repaired.len(),
                        "scrub: found blobs that were corrupt or missing and repaired them all"
                    );
                    "repaired"
                } else {
                    tracing::error!(
                        blobs = report.blobs_checked,
                        corrupt = report.corrupt.len(),
                        missing = report.missing.len(),
                        repaired = report.repaired.len(),
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
            "Scrubs by outcome (clean, repaired: found and repaired all, found, failed)",
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
            "scrub_repaired_blobs",
            "Blobs repairs replaced with verified bytes from a backup or a peer region",
            m.repaired.clone(),
        );
        registry.register(
            "scrub_corrupt_blobs",
            "Blobs the last scrub found not matching their digest (and did not repair)",
            m.corrupt.clone(),
        );
        registry.register(
            "scrub_missing_blobs",
            "Blobs the last scrub found recorded but not stored (and did not repair)",
            m.missing.clone(),
        );
        registry.register(
            "scrub_last_success_timestamp_seconds",
            "When the last scrub finished (Unix time)",
            m.last_success.clone(),
        );
    }
}

/// `POST /berth/v1/scrub?repair=BOOL`.
pub async fn run(State(state): State<AppState>, RawQuery(query): RawQuery) -> Response {
    let repair =
        match crate::admin_query::parse(query.as_deref(), &["repair"]).and_then(|p| {
            match p.get("repair").map(String::as_str) {
                None | Some("false") => Ok(false),
                Some("true") => Ok(true),
                Some(other) => Err(format!("repair must be true or false, not {other:?}")),
            }
        }) {
            Ok(repair) => repair,
            Err(message) => return crate::admin_query::invalid(message),
        };
    let (progress, watching) = tokio::sync::watch::channel(ScrubReport::default());
    let scrubber = state.scrubber.clone();
    let task = tokio::spawn(async move { scrubber.run(Some(&progress), repair).await });
    crate::progress::stream(task, watching, "scrub")
}
