//! Replication metrics, per peer.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub peer: String,
}

#[derive(Default)]
pub struct ReplicationMetrics {
    pub events_behind: Family<PeerLabels, Gauge>,
    pub seconds_behind: Family<PeerLabels, Gauge>,
    pub events_applied: Family<PeerLabels, Counter>,
    pub bytes_copied: Family<PeerLabels, Counter>,
    pub errors: Family<PeerLabels, Counter>,
    pub read_throughs: Family<PeerLabels, Counter>,
    pub resyncs: Family<PeerLabels, Counter>,
}

impl ReplicationMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "replication_events_behind",
            "Changes of a peer not applied here yet",
            self.events_behind.clone(),
        );
        registry.register(
            "replication_seconds_behind",
            "Age of the oldest change of a peer not applied here yet",
            self.seconds_behind.clone(),
        );
        registry.register(
            "replication_events_applied",
            "Changes of a peer applied here",
            self.events_applied.clone(),
        );
        registry.register(
            "replication_bytes_copied",
            "Bytes copied from a peer (manifests and blobs)",
            self.bytes_copied.clone(),
        );
        registry.register(
            "replication_errors",
            "Failed rounds of replication from a peer",
            self.errors.clone(),
        );
        registry.register(
            "replication_read_throughs",
            "Local misses served by fetching from a peer",
            self.read_throughs.clone(),
        );
        registry.register(
            "replication_resyncs",
            "Times this region fell behind a peer's compacted change log and copied its state",
            self.resyncs.clone(),
        );
    }

    pub fn peer(peer: &str) -> PeerLabels {
        PeerLabels {
            peer: peer.to_string(),
        }
    }
}
