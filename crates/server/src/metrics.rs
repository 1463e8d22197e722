//! Prometheus metrics, rendered in the text exposition format on `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{StatusCode, header};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry as PromRegistry;

use crate::AppState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub method: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
    pub method: &'static str,
}

/// Plain counters of what the console shows as rates: cheaper to read
/// than the labelled families.
#[derive(Default)]
pub struct Traffic {
    pulls: AtomicU64,
    pushes: AtomicU64,
    client_errors: AtomicU64,
    server_errors: AtomicU64,
    requests: AtomicU64,
}

/// A reading of [`Traffic`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounts {
    /// Manifest and blob reads answered with content or a redirect.
    pub pulls: u64,
    /// Manifests stored.
    pub pushes: u64,
    pub client_errors: u64,
    pub server_errors: u64,
    pub requests: u64,
}

impl Traffic {
    pub fn record(&self, route: &str, method: &str, status: u16) {
        let count = |c: &AtomicU64| {
            c.fetch_add(1, Ordering::Relaxed);
        };
        count(&self.requests);
        match status {
            500.. => count(&self.server_errors),
            // A challenge is part of every first request, not an error.
            401 => {}
            400.. => count(&self.client_errors),
            _ => {}
        }
        if status < 400 {
            match (route, method) {
                ("manifest" | "blob", "GET") => count(&self.pulls),
                ("manifest", "PUT") => count(&self.pushes),
                _ => {}
            }
        }
    }

    pub fn counts(&self) -> TrafficCounts {
        let read = |c: &AtomicU64| c.load(Ordering::Relaxed);
        TrafficCounts {
            pulls: read(&self.pulls),
            pushes: read(&self.pushes),
            client_errors: read(&self.client_errors),
            server_errors: read(&self.server_errors),
            requests: read(&self.requests),
        }
    }
}

type HistogramFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: PromRegistry,
    pub requests: Family<RequestLabels, Counter>,
    pub latency: HistogramFamily,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    pub uploads_open: Gauge,
    pub storage_errors: Counter,
    pub traffic: Traffic,
}

fn latency_histogram() -> Histogram {
    // 250 µs to about 8 minutes.
    Histogram::new(exponential_buckets(0.00025, 2.0, 22))
}

impl Metrics {
    pub fn new() -> Self {
        Self::with_extra(|_| {})
    }

    /// The server's metrics, with others (the pull-through cache's,
    /// replication's) registered by `extra`.
    pub fn with_extra(extra: impl FnOnce(&mut PromRegistry)) -> Self {
        let mut registry = PromRegistry::with_prefix("berth");
        extra(&mut registry);
        let requests = Family::<RequestLabels, Counter>::default();
        let latency: HistogramFamily = Family::new_with_constructor(latency_histogram);
        let bytes_in = Counter::default();
        let bytes_out = Counter::default();
        let uploads_open = Gauge::default();
        let storage_errors = Counter::default();
        registry.register(
            "http_requests",
            "HTTP requests by route, method and status",
            requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time to produce a response's headers, by route and method",
            latency.clone(),
        );
        registry.register(
            "http_request_body_bytes",
            "Bytes received in request bodies",
            bytes_in.clone(),
        );
        registry.register(
            "http_response_body_bytes",
            "Bytes sent in response bodies",
            bytes_out.clone(),
        );
        registry.register(
            "upload_sessions_open",
            "Blob upload sessions in progress",
            uploads_open.clone(),
        );
        registry.register(
            "storage_errors",
            "Requests that failed on a storage error",
            storage_errors.clone(),
        );
        Self {
            registry,
            requests,
            latency,
            bytes_in,
            bytes_out,
            uploads_open,
            storage_errors,
            traffic: Traffic::default(),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

pub async fn render(State(state): State<AppState>) -> Response {
    match state.registry.open_uploads().await {
        Ok(n) => {
            state.metrics.uploads_open.set(n as i64);
        }
        Err(e) => tracing::warn!(error = %e, "could not count upload sessions"),
    }
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &state.metrics.registry) {
        return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        out,
    )
        .into_response()
}
