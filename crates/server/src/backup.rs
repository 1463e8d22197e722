//! Backups as a service: the targets this node was configured with, the
//! metrics of the runs, and the operator endpoints. Long runs stream their
//! progress as JSON lines (see `progress`):
//!
//! * `POST /berth/v1/backups?to=URL`: take a backup;
//! * `GET /berth/v1/backups?from=URL`: list the backups in a target;
//! * `POST /berth/v1/backups/verify?from=URL&id=ID`: verify one;
//! * `POST /berth/v1/backups/restore?from=URL&id=ID`: restore one into this
//!   (empty) registry; with `at=RFC3339|latest` instead of `id`, to that
//!   moment (the last backup before it and the archived change log).
//!
//! `to` and `from` default to the first configured target and must name
//! one of them: a caller never chooses where the node writes.

use std::sync::Arc;

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::response::{IntoResponse, Response};
use berth_oci::ErrorCode;
use berth_registry::Registry;
use berth_registry::backup::{
    At, BackupError, BackupIndex, BackupReport, CreateOptions, RestoreReport, SelectiveReport,
    Target, VerifyReport,
};
use http::StatusCode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry as PromRegistry;

use crate::AppState;
use crate::admin_query::{self, invalid};
use crate::error::ApiError;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Default)]
struct BackupMetrics {
    runs: Family<OutcomeLabels, Counter>,
    copied_bytes: Counter,
    last_success: Gauge,
    duration: Gauge<f64, std::sync::atomic::AtomicU64>,
    size: Gauge,
    blobs: Gauge,
}

pub struct Backups {
    registry: Arc<Registry>,
    targets: Vec<String>,
    region: Option<String>,
    metrics: BackupMetrics,
}

/// Why a target cannot be used, as the caller's error.
fn refused(message: String, status: StatusCode, code: ErrorCode) -> Response {
    ApiError::new(code)
        .status(status)
        .message(message)
        .into_response()
}

impl Backups {
    /// When a backup last succeeded on this node (Unix s; 0: never).
    pub fn last_success_secs(&self) -> i64 {
        self.metrics.last_success.get()
    }

    /// The configured targets' URLs, the first is the default.
    pub fn targets(&self) -> &[String] {
        &self.targets
    }

    pub fn new(registry: Arc<Registry>, targets: Vec<String>, region: Option<String>) -> Self {
        Self {
            registry,
            targets,
            region,
            metrics: BackupMetrics::default(),
        }
    }

    /// The configured target `url` names (the first when `None`), opened.
    #[allow(clippy::result_large_err)]
    pub(crate) async fn target(&self, url: Option<&str>) -> Result<Target, Response> {
        let Some(first) = self.targets.first() else {
            return Err(invalid(
                "this node has no backup target: start it with --backup-to DIR|s3://BUCKET/PREFIX"
                    .into(),
            ));
        };
        let url = match url {
            None => first.clone(),
            Some(url) => {
                let same = |a: &str, b: &str| a.trim_end_matches('/') == b.trim_end_matches('/');
                match self.targets.iter().find(|t| same(t, url)) {
                    Some(t) => t.clone(),
                    None => {
                        return Err(refused(
                            format!(
                                "{url} is not one of this node's backup targets (configured with --backup-to)"
                            ),
                            StatusCode::FORBIDDEN,
                            ErrorCode::Denied,
                        ));
                    }
                }
            }
        };
        let opened = tokio::task::spawn_blocking(move || Target::open(&url)).await;
        match opened {
            Ok(Ok(target)) => Ok(target),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot open the backup target");
                Err(refused(
                    format!("cannot open the backup target: {e}"),
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::Unsupported,
                ))
            }
            Err(e) => Err(refused(
                format!("opening the backup target failed: {e}"),
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unsupported,
            )),
        }
    }

    /// Takes a backup, counting it. `keep` prunes afterwards.
    pub async fn create(
        &self,
        target: &Target,
        keep: Option<usize>,
        progress: Option<&berth_registry::backup::BackupProgress>,
    ) -> Result<BackupReport, BackupError> {
        let options = CreateOptions {
            region: self.region.clone(),
            keep,
            prune_grace_ms: None,
        };
        let result = self.registry.backup(target, &options, progress).await;
        let outcome = match &result {
            Ok(report) => {
                let m = &self.metrics;
                m.copied_bytes.inc_by(report.copied_bytes);
                m.duration.set(report.duration_ms as f64 / 1000.0);
                m.size.set(report.bytes as i64);
                m.blobs.set(report.blobs as i64);
                m.last_success.set((berth_registry::now_ms() / 1000) as i64);
                tracing::info!(
                    id = %report.id,
                    target = %target.url(),
                    records = report.records,
                    blobs = report.blobs,
                    bytes = report.bytes,
                    copied_bytes = report.copied_bytes,
                    duration_ms = report.duration_ms,
                    "backup taken"
                );
                if report.clean() {
                    "clean"
                } else {
                    tracing::error!(
                        missing = report.missing.len(),
                        corrupt = report.corrupt.len(),
                        "backup: blobs were left out because the registry could not give them back intact"
                    );
                    "found"
                }
            }
            Err(e) => {
                tracing::warn!(target = %target.url(), error = %e, "backup failed");
                "failed"
            }
        };
        self.metrics
            .runs
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        result
    }

    /// One scheduled backup into the first target, with its retention.
    pub async fn scheduled(&self, keep: usize) {
        match self.target(None).await {
            Ok(target) => {
                // Logged and counted by `create`.
                let _ = self.create(&target, Some(keep), None).await;
            }
            Err(_) => tracing::warn!("scheduled backup: the target cannot be opened"),
        }
    }

    pub fn register_metrics(&self, registry: &mut PromRegistry) {
        let m = &self.metrics;
        registry.register(
            "backup_runs",
            "Backups by outcome (clean, found: some blobs left out, failed)",
            m.runs.clone(),
        );
        registry.register(
            "backup_copied_bytes",
            "Bytes backups copied into their targets (what was not there yet)",
            m.copied_bytes.clone(),
        );
        registry.register(
            "backup_last_success_timestamp_seconds",
            "When the last backup this node took finished (Unix time)",
            m.last_success.clone(),
        );
        registry.register(
            "backup_last_duration_seconds",
            "How long the last backup this node took ran",
            m.duration.clone(),
        );
        registry.register(
            "backup_last_size_bytes",
            "Bytes of blobs the last backup holds",
            m.size.clone(),
        );
        registry.register(
            "backup_last_blobs",
            "Blobs the last backup holds",
            m.blobs.clone(),
        );
    }
}

fn target_param<'a>(
    pairs: &'a std::collections::HashMap<String, String>,
    name: &str,
) -> Option<&'a str> {
    pairs
        .get(name)
        .map(String::as_str)
        .filter(|s| !s.is_empty())
}

/// `POST /berth/v1/backups?to=URL`.
pub async fn create(State(state): State<AppState>, RawQuery(query): RawQuery) -> Response {
    let pairs = match admin_query::parse(query.as_deref(), &["to"]) {
        Ok(p) => p,
        Err(message) => return invalid(message),
    };
    let target = match state.backups.target(target_param(&pairs, "to")).await {
        Ok(t) => t,
        Err(response) => return response,
    };
    let (progress, watching) = tokio::sync::watch::channel(BackupReport::default());
    let backups = state.backups.clone();
    let task = tokio::spawn(async move { backups.create(&target, None, Some(&progress)).await });
    crate::progress::stream(task, watching, "backup")
}

/// A backup as listed: its index without the chunk list.
#[derive(serde::Serialize)]
struct Listed {
    #[serde(flatten)]
    index: BackupIndex,
}

/// `GET /berth/v1/backups?from=URL`.
pub async fn list(State(state): State<AppState>, RawQuery(query): RawQuery) -> Response {
    let pairs = match admin_query::parse(query.as_deref(), &["from"]) {
        Ok(p) => p,
        Err(message) => return invalid(message),
    };
    let target = match state.backups.target(target_param(&pairs, "from")).await {
        Ok(t) => t,
        Err(response) => return response,
    };
    match target.list().await {
        Ok(indexes) => {
            let backups: Vec<Listed> = indexes
                .into_iter()
                .map(|mut index| {
                    index.chunks.clear();
                    Listed { index }
                })
                .collect();
            Json(serde_json::json!({ "target": target.url(), "backups": backups })).into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "listing backups failed");
            refused(
                format!("listing backups failed: {e}"),
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unsupported,
            )
        }
    }
}

/// The target and backup id of verify and restore (`known`: the
/// parameters the endpoint takes), and the parameters.
async fn source(
    state: &AppState,
    query: Option<&str>,
    known: &[&str],
) -> Result<
    (
        Target,
        Option<String>,
        std::collections::HashMap<String, String>,
    ),
    Response,
> {
    let pairs = admin_query::parse(query, known).map_err(invalid)?;
    let target = state.backups.target(target_param(&pairs, "from")).await?;
    let id = target_param(&pairs, "id").map(str::to_string);
    if let Some(id) = &id
        && !berth_store::documents::valid_name(id)
    {
        return Err(invalid(format!("invalid backup id {id:?}")));
    }
    Ok((target, id, pairs))
}

/// `POST /berth/v1/backups/verify?from=URL&id=ID`.
pub async fn verify(State(state): State<AppState>, RawQuery(query): RawQuery) -> Response {
    let (target, id, _) = match source(&state, query.as_deref(), &["from", "id"]).await {
        Ok(s) => s,
        Err(response) => return response,
    };
    let (progress, watching) = tokio::sync::watch::channel(VerifyReport::default());
    let task = tokio::spawn(async move {
        berth_registry::backup::verify(&target, id.as_deref(), Some(&progress)).await
    });
    crate::progress::stream(task, watching, "verification")
}

/// `POST /berth/v1/backups/restore?from=URL&id=ID&adopt=BOOL`, or with
/// `repository=GLOB[,GLOB...]&force=BOOL` the chosen repositories into
/// this live registry.
pub async fn restore(
    State(state): State<AppState>,
    caller: Option<axum::Extension<crate::security::Caller>>,
    RawQuery(query): RawQuery,
) -> Response {
    const KNOWN: &[&str] = &["from", "id", "adopt", "repository", "force", "at"];
    let flag = |pairs: &std::collections::HashMap<String, String>, name: &str| match pairs
        .get(name)
        .map(String::as_str)
    {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(format!("{name} must be true or false, not {other:?}")),
    };
    // Every parameter is checked before the target is opened.
    let parsed = admin_query::parse(query.as_deref(), KNOWN).and_then(|pairs| {
        let adopt = flag(&pairs, "adopt")?;
        let force = flag(&pairs, "force")?;
        let globs = match pairs.get("repository") {
            None => None,
            Some(list) => Some(
                list.split(',')
                    .map(|g| {
                        berth_auth::Glob::parse(g.trim())
                            .map_err(|e| format!("repository {g:?}: {e}"))
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        if globs.is_none() && force {
            return Err(
                "force goes with repository (a whole restore goes into an empty registry)".into(),
            );
        }
        if globs.is_some() && adopt {
            return Err("adopt goes with a whole restore, not with repository".into());
        }
        let at = match pairs.get("at") {
            None => None,
            Some(text) => Some(At::parse(text)?),
        };
        if at.is_some() && (globs.is_some() || pairs.contains_key("id")) {
            return Err(
                "at picks the backup itself (the last one before the moment) and restores the whole registry: not with id or repository"
                    .into(),
            );
        }
        Ok((adopt, force, globs, at))
    });
    let (adopt, force, globs, at) = match parsed {
        Ok(p) => p,
        Err(message) => return invalid(message),
    };
    let (target, id, _) = match source(&state, query.as_deref(), KNOWN).await {
        Ok(s) => s,
        Err(response) => return response,
    };
    let registry = state.registry.clone();
    if let Some(globs) = globs {
        let chosen: berth_registry::NameMatcher =
            Arc::new(move |name: &str| globs.iter().any(|g| g.matches(name)));
        let by = crate::tags_admin::author(&state, caller.as_deref());
        let (progress, watching) = tokio::sync::watch::channel(SelectiveReport::default());
        let task = tokio::spawn(async move {
            let result = registry
                .restore_repositories(
                    &target,
                    id.as_deref(),
                    &chosen,
                    force,
                    by.as_deref(),
                    Some(&progress),
                )
                .await;
            match &result {
                Ok(report) => {
                    tracing::info!(id = %report.id, repositories = report.repositories, manifests = report.manifests, tags = report.tags, kept_newer = report.kept_newer.len(), failed = report.failed.len(), "repositories restored from a backup")
                }
                Err(e) => tracing::warn!(error = %e, "restore of repositories failed"),
            }
            result
        });
        return crate::progress::stream(task, watching, "restore");
    }
    let (progress, watching) = tokio::sync::watch::channel(RestoreReport::default());
    let task = tokio::spawn(async move {
        let result = registry
            .restore(&target, id.as_deref(), adopt, at, Some(&progress))
            .await;
        match &result {
            Ok(report) => {
                tracing::info!(id = %report.id, records = report.records, blobs = report.blobs, bytes = report.bytes, duration_ms = report.duration_ms, "backup restored")
            }
            Err(e) => tracing::warn!(error = %e, "restore failed"),
        }
        result
    });
    crate::progress::stream(task, watching, "restore")
}
