//! The region's backup job: on the node that leads it, the change log is
//! archived into the first backup target as it is written (so that a
//! point-in-time restore can reach a moment a second or so old), and the
//! scheduled backups are taken between rounds.
//!
//! One task does both, so that a backup's retention (which removes what
//! no kept backup or log segment names) never runs while this node is
//! between copying a segment's content and writing the segment.

use std::sync::Arc;
use std::time::Duration;

use berth_registry::Registry;
use berth_registry::backup::{ArchiveRound, Archiver};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry as PromRegistry;

use crate::backup::Backups;

/// How long an idle round waits for a change before looking again (a
/// write on another node of a cluster does not wake this one).
const POLL: Duration = Duration::from_secs(1);
/// At most one segment per this, so that steady pushes make segments of
/// many changes rather than one each.
const SPACING: Duration = Duration::from_secs(1);
/// After a failed round.
const RETRY: Duration = Duration::from_secs(5);

#[derive(Default)]
struct ArchiveMetrics {
    events: Counter,
    segments: Counter,
    failures: Counter,
    copied_bytes: Counter,
    through: Gauge<f64, std::sync::atomic::AtomicU64>,
}

pub struct BackupJob {
    registry: Arc<Registry>,
    backups: Arc<Backups>,
    every: Duration,
    keep: usize,
    archiver: tokio::sync::Mutex<Option<Arc<Archiver>>>,
    next_backup: std::sync::Mutex<tokio::time::Instant>,
    metrics: ArchiveMetrics,
}

impl BackupJob {
    pub fn new(
        registry: Arc<Registry>,
        backups: Arc<Backups>,
        every: Duration,
        keep: usize,
    ) -> Self {
        Self {
            registry,
            backups,
            every,
            keep,
            archiver: tokio::sync::Mutex::new(None),
            next_backup: std::sync::Mutex::new(tokio::time::Instant::now() + every),
            metrics: ArchiveMetrics::default(),
        }
    }

    /// The archiver for the first target, opened on first use.
    async fn archiver(&self) -> Option<Arc<Archiver>> {
        let mut slot = self.archiver.lock().await;
        if slot.is_none() {
            match self.backups.target(None).await {
                Ok(target) => *slot = Some(Arc::new(Archiver::new(target))),
                Err(_) => tracing::warn!(
                    "archiving the change log: the backup target cannot be opened; retrying"
                ),
            }
        }
        slot.clone()
    }

    /// One turn of the job, run again and again while this node leads it:
    /// an archiving round, a wait for the next change, and the scheduled
    /// backup when it is due.
    pub async fn turn(&self) {
        let signal = self.registry.change_signal();
        let notified = signal.notified();
        tokio::pin!(notified);
        // Before reading the log: a change logged meanwhile wakes the wait.
        notified.as_mut().enable();
        let pause = match self.archiver().await {
            None => RETRY,
            Some(archiver) => match archiver.round(&self.registry).await {
                Ok(round) => {
                    self.count(&round);
                    if round.events as usize >= berth_registry::backup::SEGMENT_EVENTS {
                        Duration::ZERO
                    } else if round.events > 0 {
                        SPACING
                    } else {
                        let _ = tokio::time::timeout(POLL, notified).await;
                        // Changes come in bursts (an image is several).
                        SPACING.min(Duration::from_millis(200))
                    }
                }
                Err(e) => {
                    self.metrics.failures.inc();
                    tracing::warn!(error = %e, "archiving the change log failed; retrying");
                    RETRY
                }
            },
        };
        let due = self
            .next_backup
            .lock()
            .is_ok_and(|next| tokio::time::Instant::now() >= *next);
        if due {
            self.backups.scheduled(self.keep).await;
            // Its retention may have removed blobs the archiver remembers.
            if let Some(archiver) = self.archiver.lock().await.as_ref() {
                archiver.forget();
            }
            if let Ok(mut next) = self.next_backup.lock() {
                *next = tokio::time::Instant::now() + self.every;
            }
        }
        tokio::time::sleep(pause).await;
    }

    fn count(&self, round: &ArchiveRound) {
        let m = &self.metrics;
        m.events.inc_by(round.events);
        m.segments.inc_by(round.segments);
        m.copied_bytes.inc_by(round.copied_bytes);
        if round.through_ms > 0 {
            m.through.set(round.through_ms as f64 / 1000.0);
        }
        if round.segments > 0 {
            tracing::debug!(
                events = round.events,
                copied_bytes = round.copied_bytes,
                "archived the change log"
            );
        }
        if !round.lacking.is_empty() {
            tracing::error!(
                lacking = round.lacking.len(),
                "archiving the change log: content it names was already gone from storage"
            );
        }
    }

    pub fn register_metrics(&self, registry: &mut PromRegistry) {
        let m = &self.metrics;
        registry.register(
            "backup_archived_events",
            "Change-log entries this node archived next to the backups",
            m.events.clone(),
        );
        registry.register(
            "backup_archived_segments",
            "Change-log segments this node wrote into the backup target",
            m.segments.clone(),
        );
        registry.register(
            "backup_archive_copied_bytes",
            "Bytes of manifests and blobs archiving the change log copied into the target",
            m.copied_bytes.clone(),
        );
        registry.register(
            "backup_archive_failures",
            "Archiving rounds that failed (retried)",
            m.failures.clone(),
        );
        registry.register(
            "backup_archived_through_timestamp_seconds",
            "The archive knows the registry up to this moment (Unix time): a point-in-time restore reaches it",
            m.through.clone(),
        );
    }
}
