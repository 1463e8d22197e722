//! Active-active geo-replication between regions.
//!
//! Each region logs its own writes (see the registry's change log) and
//! serves them as a change feed. A [`Replicator`] tails every peer's feed:
//! for each change it copies what is missing by digest from that peer
//! (verified on the way in), then applies the change by last-writer-wins on
//! hybrid-logical-clock stamps, so every region ends in the same state.
//! Cursors are durable; a restart resumes where it stopped. On a local miss,
//! [`Replicator::read_through_manifest`] and [`Replicator::read_through_blob`]
//! fetch from the peers that are up, within a short timeout.

mod glob;
mod metrics;
mod replicator;

pub use metrics::ReplicationMetrics;
pub use replicator::{
    FeedPage, FeedReader, PeerAck, PeerConfig, PeerStatus, ReplicationError, ReplicationOptions,
    Replicator, SnapshotPage,
};
