//! Metadata compaction as a service: it works out what may go (from the
//! retention window and, with replication, how far every peer has applied
//! this region's log and this region every peer's), has the registry
//! remove it, counts it, and serves `POST /berth/v1/compact?dry_run=BOOL`
//! for `berth compact`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::response::{IntoResponse, Response};
use berth_oci::ErrorCode;
use berth_registry::{CompactionOptions, CompactionReport, Registry, now_ms};
use berth_replication::{PeerAck, ReplicationError, Replicator};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry as PromRegistry;
use serde::Serialize;

use crate::AppState;
use crate::admin_query;
use crate::error::ApiError;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Default)]
struct CompactionMetrics {
    runs: Family<OutcomeLabels, Counter>,
    log_entries: Counter,
    tombstones: Counter,
    history: Counter,
    last_success: Gauge,
}

/// A run's report with the bounds it worked out.
#[derive(Debug, Serialize)]
pub struct CompactionRun {
    pub window_secs: u64,
    /// Log entries up to this sequence were applied by every live peer
    /// (absent: no peer is live, or no replication).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acknowledged_through: Option<u64>,
    /// Tombstones stamped before this (Unix milliseconds) may go, and of
    /// this region's own deletes only those before `own_tombstones_ms`
    /// (every peer has applied them).
    pub tombstones_ms: u64,
    pub own_tombstones_ms: u64,
    /// Tag history stamped before this may go.
    pub history_ms: u64,
    /// How far each peer region has applied this region's log.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<PeerAck>,
    #[serde(flatten)]
    pub report: CompactionReport,
}

/// Compacts, one run at a time on this node.
pub struct Compactor {
    registry: Arc<Registry>,
    replication: Option<Arc<Replicator>>,
    window: Duration,
    running: tokio::sync::Mutex<()>,
    metrics: CompactionMetrics,
    archive_target: Option<String>,
}

impl Compactor {
    /// When a compaction last succeeded on this node (Unix s; 0: never).
    pub fn last_success_secs(&self) -> i64 {
        self.metrics.last_success.get()
    }

    pub fn new(
        registry: Arc<Registry>,
        replication: Option<Arc<Replicator>>,
        window: Duration,
    ) -> Self {
        Self {
            registry,
            replication,
            window,
            running: tokio::sync::Mutex::new(()),
            metrics: CompactionMetrics::default(),
            archive_target: None,
        }
    }

    /// With the change log archived into the backup target `url`: entries
    /// not archived there yet stay, whatever their age.
    pub fn keeping_unarchived(mut self, url: Option<String>) -> Self {
        self.archive_target = url;
        self
    }

    pub async fn run(
        &self,
        dry_run: bool,
        measure: bool,
    ) -> Result<CompactionRun, ReplicationError> {
        let _one = self.running.lock().await;
        let result = self.compact(dry_run, measure).await;
        let outcome = match &result {
            Ok(run) if !dry_run => {
                let m = &self.metrics;
                m.log_entries.inc_by(run.report.log_entries);
                m.tombstones.inc_by(run.report.tombstones);
                m.history.inc_by(run.report.history_entries);
                m.last_success.set((now_ms() / 1000) as i64);
                if run.report.log_entries + run.report.tombstones + run.report.history_entries > 0 {
                    tracing::info!(
                        log_entries = run.report.log_entries,
                        log_floor = run.report.log_floor,
                        tombstones = run.report.tombstones,
                        history_entries = run.report.history_entries,
                        "metadata compaction"
                    );
                }
                "ok"
            }
            Ok(_) => "dry_run",
            Err(e) => {
                tracing::warn!(error = %e, "metadata compaction failed; it will run again");
                "failed"
            }
        };
        self.metrics
            .runs
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        result
    }

    async fn compact(
        &self,
        dry_run: bool,
        measure: bool,
    ) -> Result<CompactionRun, ReplicationError> {
        let before = now_ms().saturating_sub(self.window.as_millis() as u64);
        let (peers, (tombstones_ms, own_tombstones_ms)) = match &self.replication {
            Some(replication) => (
                replication.peer_acks(self.window).await?,
                replication.tombstone_cutoffs(self.window).await?,
            ),
            None => (Vec::new(), (before, before)),
        };
        let acknowledged = Replicator::acknowledged_by_all(&peers);
        let mut log_through = acknowledged;
        if let Some(url) = &self.archive_target
            && let Some(archived) = self.registry.archived_position(url).await?
        {
            // An archiver starts from the log's head, so with no position
            // there is nothing it still needs. One stuck for longer than
            // the window no longer holds the log back: the log must not
            // grow without bound, and the gap is named.
            if archived.through_ms >= before {
                log_through = log_through.min(archived.seq);
            } else {
                tracing::error!(
                    archived_through = archived.seq,
                    target = %url,
                    "the change log has not been archived for longer than the log retention window; compacting anyway: a point-in-time restore cannot cross the gap"
                );
            }
        }
        let options = CompactionOptions {
            log_through,
            log_before_ms: before,
            tombstones_ms,
            own_tombstones_ms,
            history_ms: before,
            dry_run,
            measure,
        };
        let report = self.registry.compact_metadata(&options).await?;
        Ok(CompactionRun {
            window_secs: self.window.as_secs(),
            acknowledged_through: (acknowledged != u64::MAX).then_some(acknowledged),
            tombstones_ms,
            own_tombstones_ms,
            history_ms: before,
            peers,
            report,
        })
    }

    pub fn register_metrics(&self, registry: &mut PromRegistry) {
        let m = &self.metrics;
        registry.register(
            "compaction_runs",
            "Metadata compactions by outcome (ok, dry_run, failed)",
            m.runs.clone(),
        );
        registry.register(
            "compaction_log_entries_removed",
            "Change-log entries removed after every peer applied them and the window passed",
            m.log_entries.clone(),
        );
        registry.register(
            "compaction_tombstones_removed",
            "Tag and manifest tombstones removed after the window",
            m.tombstones.clone(),
        );
        registry.register(
            "compaction_history_removed",
            "Tag-history entries removed after the window",
            m.history.clone(),
        );
        registry.register(
            "compaction_last_success_timestamp_seconds",
            "When the last metadata compaction succeeded (Unix time)",
            m.last_success.clone(),
        );
    }
}

/// `POST /berth/v1/compact`.
pub async fn run(State(state): State<AppState>, RawQuery(query): RawQuery) -> Response {
    let pairs = match admin_query::parse(query.as_deref(), &["dry_run"]) {
        Ok(p) => p,
        Err(message) => return admin_query::invalid(message),
    };
    let dry_run = match admin_query::dry_run(&pairs) {
        Ok(d) => d,
        Err(message) => return admin_query::invalid(message),
    };
    match state.compactor.run(dry_run, true).await {
        Ok(run) => axum::Json(run).into_response(),
        Err(ReplicationError::Registry(e)) => ApiError::from(e).into_response(),
        Err(e) => ApiError::new(ErrorCode::Unavailable)
            .message(e.to_string())
            .into_response(),
    }
}
