//! The cache's Prometheus metrics, registered with the server's.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServeLabels {
    pub upstream: String,
    /// `manifest` or `blob`.
    pub kind: &'static str,
    /// `hit`, `revalidated`, `miss` or `stale`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub upstream: String,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: String,
}

#[derive(Default)]
pub struct CacheMetrics {
    pub served: Family<ServeLabels, Counter>,
    pub upstream_errors: Family<ErrorLabels, Counter>,
    pub fetched_bytes: Family<UpstreamLabels, Counter>,
    pub evicted_images: Counter,
    pub evicted_bytes: Counter,
}

impl CacheMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "cache_requests",
            "Pull-through cache requests by upstream, kind (manifest, blob) and result (hit, revalidated, miss, stale)",
            self.served.clone(),
        );
        registry.register(
            "cache_upstream_errors",
            "Failed upstream requests by upstream and kind (connect, timeout, server_error, rate_limited, not_found, unauthorized, corrupt, too_large, other)",
            self.upstream_errors.clone(),
        );
        registry.register(
            "cache_fetched_bytes",
            "Bytes fetched from upstreams and stored",
            self.fetched_bytes.clone(),
        );
        registry.register(
            "cache_evicted_images",
            "Cached manifests evicted to keep the cache under its size limit",
            self.evicted_images.clone(),
        );
        registry.register(
            "cache_evicted_bytes",
            "Bytes of evicted images (as counted against the limit)",
            self.evicted_bytes.clone(),
        );
    }

    /// How many requests of `kind` for `upstream` ended as `result`.
    pub fn served_count(&self, upstream: &str, kind: &'static str, result: &'static str) -> u64 {
        self.served
            .get_or_create(&ServeLabels {
                upstream: upstream.to_string(),
                kind,
                result,
            })
            .get()
    }

    pub fn served(&self, upstream: &str, kind: &'static str, result: &'static str) {
        self.served
            .get_or_create(&ServeLabels {
                upstream: upstream.to_string(),
                kind,
                result,
            })
            .inc();
    }

    pub fn upstream_error(&self, upstream: &str, kind: &'static str) {
        self.upstream_errors
            .get_or_create(&ErrorLabels {
                upstream: upstream.to_string(),
                kind,
            })
            .inc();
    }

    pub fn fetched(&self, upstream: &str, bytes: u64) {
        self.fetched_bytes
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_string(),
            })
            .inc_by(bytes);
    }
}
