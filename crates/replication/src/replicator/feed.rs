//! Serving this region's change feed to its peers.

use std::time::Duration;

use super::{FeedPage, Replicator, Result};

impl Replicator {
    /// This region's changes after `after`, waiting up to `wait` for some.
    pub async fn feed(&self, after: u64, limit: usize, wait: Duration) -> Result<FeedPage> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Interest first, then the read: a write in between wakes us.
            let signal = self.registry.change_signal().notified();
            tokio::pin!(signal);
            signal.as_mut().enable();
            let (events, head, epoch) = self
                .registry
                .changes_after(after, limit.clamp(1, 1000))
                .await?;
            let now = tokio::time::Instant::now();
            if !events.is_empty() || now >= deadline {
                return Ok(FeedPage {
                    region: self.options.region.clone(),
                    epoch,
                    head,
                    events,
                });
            }
            // Woken by a local write; polled for writes of other nodes.
            let left = (deadline - now).min(Duration::from_millis(250));
            let _ = tokio::time::timeout(left, signal).await;
        }
    }
}
