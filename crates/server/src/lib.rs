//! Berth's HTTP layer: the OCI Distribution API on `/v2/`, health probes and
//! Prometheus metrics. Maps domain errors to the spec's JSON errors; knows
//! nothing about how content is stored.

mod api;
mod cache_admin;
mod error;
mod headers;
mod health;
mod metrics;
mod middleware;
mod replication_admin;
mod route;
mod serve;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use berth_proxy::PullThroughCache;
use berth_registry::Registry;
use berth_replication::Replicator;

pub use metrics::Metrics;
pub use serve::{ServeOptions, serve};

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    /// False while starting and while draining; `/readyz` reports it.
    pub ready: Arc<AtomicBool>,
    pub limits: Arc<RequestLimits>,
    /// The pull-through cache, when upstreams are configured.
    pub cache: Option<Arc<PullThroughCache>>,
    /// Geo-replication, when this region has peers or serves a feed.
    pub replication: Option<Arc<Replicator>>,
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
        .route("/berth/v1/tags/history", get(replication_admin::history))
        .fallback(api::not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::observe,
        ))
        .with_state(state)
}
