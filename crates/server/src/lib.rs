//! Berth's HTTP layer: the OCI Distribution API on `/v2/`, the token
//! service, health probes and Prometheus metrics, over HTTP or TLS. Every
//! request passes the security guard (authentication, the policy, audit)
//! before its handler. Maps domain errors to the spec's JSON errors; knows
//! nothing about how content is stored.

mod access;
mod admin_query;
mod api;
mod archive;
pub mod audit;
mod backup;
mod body;
mod cache_admin;
mod compaction;
mod error;
mod gc;
mod headers;
mod health;
mod metrics;
mod middleware;
mod progress;
pub mod region;
mod reload;
mod replication_admin;
mod retention;
mod route;
mod scrub;
pub mod security;
mod serve;
mod tags_admin;
pub mod tls;
mod token;
mod token_admin;
mod trash_admin;
mod ui;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use berth_proxy::PullThroughCache;
use berth_registry::Registry;
use berth_replication::Replicator;

pub use archive::BackupJob;
pub use backup::Backups;
pub use compaction::{CompactionRun, Compactor};
pub use gc::GarbageCollector;
pub use metrics::Metrics;
pub use reload::{FileWatch, fingerprint as reload_fingerprint, watch as watch_files};
pub use retention::Retention;
pub use scrub::Scrubber;
pub use security::{Cidr, Security};
pub use serve::{ConnInfo, ServeOptions, serve};
pub use ui::NodeSessions;

/// What every handler shares: one reference-counted value, so that the
/// clone each middleware and handler takes of it is one atomic increment.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> AppState {
        AppState(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

pub struct Shared {
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    /// False while starting and while draining; `/readyz` reports it.
    pub ready: Arc<AtomicBool>,
    pub limits: Arc<RequestLimits>,
    /// The pull-through cache, when upstreams are configured.
    pub cache: Option<Arc<PullThroughCache>>,
    /// Geo-replication, when this region has peers or serves a feed.
    pub replication: Option<Arc<Replicator>>,
    /// Authentication, the access policy and the audit trail.
    pub security: Arc<Security>,
    /// Garbage collection, for the admin endpoint and the job.
    pub gc: Arc<GarbageCollector>,
    /// Retention rules, for the admin endpoints and the job.
    pub retention: Arc<Retention>,
    /// Metadata compaction, for the admin endpoint and the job.
    pub compactor: Arc<Compactor>,
    /// Scrub of the blobs at rest, for the admin endpoint and the job.
    pub scrubber: Arc<Scrubber>,
    /// Backups: the configured targets and the runs' metrics.
    pub backups: Arc<Backups>,
    /// The latest look at the region (nodes, etcd, readiness), for the
    /// console and the availability gauges.
    pub region: Arc<region::RegionWatch>,
    /// Where that look comes from (the binary's cluster registration).
    pub region_source: Option<Arc<dyn region::ClusterSource>>,
    /// What this node keeps of console sessions (see `ui::session`).
    pub sessions: Arc<NodeSessions>,
}

/// Protection against slow or too many clients.
pub struct RequestLimits {
    /// A request body that sends nothing for this long is abandoned.
    pub body_idle_timeout: std::time::Duration,
    /// Requests streaming blob content in at once; more get 429.
    pub upload_slots: Arc<tokio::sync::Semaphore>,
}

impl RequestLimits {
    pub fn new(body_idle_timeout: std::time::Duration, max_concurrent_uploads: usize) -> Self {
        Self {
            body_idle_timeout,
            upload_slots: Arc::new(tokio::sync::Semaphore::new(max_concurrent_uploads)),
        }
    }
}

pub fn router(state: AppState) -> axum::Router {
    use axum::routing::{any, get};
    axum::Router::new()
        .route("/v2", any(api::dispatch))
        .route("/v2/", any(api::dispatch))
        .route("/v2/{*path}", any(api::dispatch))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(metrics::render))
        .route("/berth/v1/cache", get(cache_admin::list))
        .route("/berth/v1/cache/pin", axum::routing::post(cache_admin::pin))
        .route("/berth/v1/replication/feed", get(replication_admin::feed))
        .route(
            "/berth/v1/replication/snapshot",
            get(replication_admin::snapshot),
        )
        .route(
            "/berth/v1/replication/status",
            get(replication_admin::status),
        )
        .route("/berth/v1/replication/state", get(replication_admin::state))
        .route(
            "/berth/v1/replication/peers/{peer}/{action}",
            axum::routing::post(replication_admin::pause),
        )
        .route(
            "/berth/v1/region/serving",
            axum::routing::post(replication_admin::serving),
        )
        .route("/berth/v1/tags/history", get(tags_admin::history))
        .route(
            "/berth/v1/tags/restore",
            axum::routing::post(tags_admin::restore),
        )
        .route("/berth/v1/gc", axum::routing::post(gc::run))
        .route("/berth/v1/compact", axum::routing::post(compaction::run))
        .route("/berth/v1/scrub", axum::routing::post(scrub::run))
        .route("/berth/v1/backups", get(backup::list).post(backup::create))
        .route(
            "/berth/v1/backups/verify",
            axum::routing::post(backup::verify),
        )
        .route(
            "/berth/v1/backups/restore",
            axum::routing::post(backup::restore),
        )
        .route("/berth/v1/trash", get(trash_admin::list))
        .route("/berth/v1/retention/plan", get(retention::plan))
        .route(
            "/berth/v1/retention/apply",
            axum::routing::post(retention::apply),
        )
        .route(
            "/berth/v1/undelete",
            axum::routing::post(trash_admin::undelete),
        )
        .route(
            "/berth/v1/tokens",
            get(token_admin::list).post(token_admin::create),
        )
        .route(
            "/berth/v1/tokens/{name}",
            axum::routing::delete(token_admin::revoke),
        )
        .route("/berth/v1/auth/keys", get(token_admin::keys))
        .route(
            "/berth/v1/auth/keys/rotate",
            axum::routing::post(token_admin::rotate),
        )
        .route(access::TOKEN_PATH, any(token::token))
        .route(access::JWKS_PATH, get(token::jwks))
        .merge(ui::routes())
        .fallback(api::not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            security::guard,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::observe,
        ))
        .with_state(state)
}
