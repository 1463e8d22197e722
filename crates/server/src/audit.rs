//! The audit trail: one structured event for every push, tag move, delete,
//! token issued or revoked, failed authentication, refusal and admin
//! action, with who, from where, what and the outcome.
//!
//! Events go to the `berth::audit` tracing target (so they land in the log
//! with everything else, filterable), and, when configured, to a JSON-lines
//! file of their own, written by a thread so that no request waits on the
//! disk, and synced every second.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::SystemTime;

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

/// Events queued for the file at most; past it they are counted as dropped.
const QUEUE: usize = 16_384;

#[derive(Clone, Debug, Default, Serialize)]
pub struct AuditEvent {
    /// `push`, `delete`, `upload`, `mount`, `token_issued`, `token_created`,
    /// `token_revoked`, `key_rotated`, `auth_failed`, `denied`, `admin`.
    pub event: &'static str,
    pub identity: String,
    pub client: String,
    /// The policy action at stake (`pull`, `push`, `delete`, `admin`).
    #[serde(skip_serializing_if = "str::is_empty")]
    pub action: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// `ok`, `denied`, `failed` (bad credentials), `error`.
    pub outcome: &'static str,
    pub status: u16,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub method: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub path: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub request_id: String,
    /// Extra facts (a token's name, the scopes granted); never a secret.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    #[serde(flatten)]
    event: &'a AuditEvent,
}

pub struct Audit {
    file: Option<mpsc::SyncSender<String>>,
    path: Option<PathBuf>,
    pub events: Counter,
    pub dropped: Counter,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot open the audit log {path}: {source}")]
pub struct AuditError {
    path: String,
    source: std::io::Error,
}

impl Audit {
    /// Audit events in the log only.
    pub fn log_only() -> Audit {
        Audit {
            file: None,
            path: None,
            events: Counter::default(),
            dropped: Counter::default(),
        }
    }

    /// Audit events also appended to `path` as JSON lines.
    pub fn with_file(path: &Path) -> Result<Audit, AuditError> {
        let open = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
        };
        let mut file = open().map_err(|source| AuditError {
            path: path.display().to_string(),
            source,
        })?;
        let (tx, rx) = mpsc::sync_channel::<String>(QUEUE);
        let shown = path.display().to_string();
        std::thread::Builder::new()
            .name("berth-audit".into())
            .spawn(move || {
                let write = |file: &mut std::fs::File, line: &str| {
                    if let Err(e) = file.write_all(line.as_bytes()) {
                        tracing::error!(path = %shown, error = %e, "cannot write the audit log");
                    }
                };
                // One sync per batch of what is waiting, not one per event.
                while let Ok(line) = rx.recv() {
                    write(&mut file, &line);
                    for more in rx.try_iter().take(4096) {
                        write(&mut file, &more);
                    }
                    if let Err(e) = file.sync_data() {
                        tracing::error!(path = %shown, error = %e, "cannot sync the audit log");
                    }
                }
            })
            .map_err(|source| AuditError {
                path: path.display().to_string(),
                source,
            })?;
        Ok(Audit {
            file: Some(tx),
            path: Some(path.to_path_buf()),
            events: Counter::default(),
            dropped: Counter::default(),
        })
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn record(&self, event: AuditEvent) {
        self.events.inc();
        tracing::info!(
            target: "berth::audit",
            event = event.event,
            identity = %event.identity,
            client = %event.client,
            action = event.action,
            repository = event.repository.as_deref().unwrap_or(""),
            reference = event.reference.as_deref().unwrap_or(""),
            digest = event.digest.as_deref().unwrap_or(""),
            outcome = event.outcome,
            status = event.status,
            detail = %event.detail,
            "audit"
        );
        let Some(file) = &self.file else { return };
        let line = Line {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            event: &event,
        };
        let Ok(mut text) = serde_json::to_string(&line) else {
            return;
        };
        text.push('\n');
        if file.try_send(text).is_err() {
            self.dropped.inc();
            tracing::error!(
                "audit log queue full or writer gone: an event was not written to the file"
            );
        }
    }

    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register("audit_events", "Audit events recorded", self.events.clone());
        registry.register(
            "audit_dropped",
            "Audit events that could not be queued for the audit file",
            self.dropped.clone(),
        );
    }
}
