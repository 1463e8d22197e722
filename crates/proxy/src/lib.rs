//! The pull-through cache. Third-party images (Docker Hub, ghcr.io, quay.io)
//! are served from Berth's own storage: fetched from their upstream once,
//! verified by digest, stored with the registry's ordinary records, and
//! served from there, also when the upstream is down, slow or rate-limiting.
//! The cache's own records (tag freshness, image sizes and access times,
//! pins) live in the MetaStore, so every node of a cluster shares them.

mod cache;
mod challenge;
mod fill;
mod metrics;
mod records;
mod upstream;

pub use cache::{
    BlobAnswer, CacheEntry, CacheError, CacheOptions, EvictionReport, PullThroughCache, Target,
    UpstreamState, parse_image, valid_namespace,
};
pub use metrics::CacheMetrics;
pub use upstream::{
    ClientTls, Credentials, FailureKind, MANIFEST_ACCEPT, UpstreamClient, UpstreamConfig,
    UpstreamError, next_page,
};
