//! Serving this region's change feed to its peers, remembering how far each
//! has durably applied it (the cursor it asks after), and what that allows
//! compaction to remove.

use std::time::{Duration, Instant};

use berth_registry::{RecordKind, now_ms};
use serde::{Deserialize, Serialize};

use super::{FeedPage, Replicator, Result, SnapshotPage};

/// An acknowledgement is written at most this often per reader while its
/// cursor moves (and every `ack_refresh` while it does not, so that a
/// reader that is up but idle stays live).
const ACK_EVERY: Duration = Duration::from_secs(1);

/// How far a reader region has applied this region's log, and when it
/// last said so.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(super) struct Ack {
    pub seq: u64,
    pub epoch: String,
    /// When it was written.
    pub ms: u64,
    /// Every write of this region's logged before this (wall-clock
    /// milliseconds, less the commit latency a margin covers) is applied
    /// there: the time of the entry at `seq`, or the time of the
    /// acknowledgement when `seq` was the head.
    #[serde(default)]
    pub through_ms: u64,
}

pub(super) fn ack_key(reader: &str) -> String {
    format!("repl/ack/{reader}")
}

/// How far a peer has applied this region's log, as it last said.
#[derive(Clone, Debug, Serialize)]
pub struct PeerAck {
    pub peer: String,
    /// The last change it applied (none: it never said).
    pub seq: Option<u64>,
    pub acknowledged_ms: u64,
    /// Said so within the window: compaction waits for it.
    pub live: bool,
}

/// Who is reading the feed, and in which of this region's logs its cursor
/// is.
pub struct FeedReader {
    pub region: String,
    pub epoch: String,
}

/// How often a waiting feed reads the log without being woken: only matters
/// while the watch of the log head (see `follow_log_of_other_nodes`) is down.
const FALLBACK_POLL: Duration = Duration::from_secs(1);

impl Replicator {
    /// This region's changes after `after`, waiting up to `wait` for some.
    /// A reader that is one of this region's peers acknowledges `after`:
    /// it asks after its durable cursor.
    pub async fn feed(
        &self,
        after: u64,
        limit: usize,
        wait: Duration,
        reader: Option<FeedReader>,
    ) -> Result<FeedPage> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Interest first, then the read: a write in between wakes us.
            let signal = self.registry.change_signal().notified();
            tokio::pin!(signal);
            signal.as_mut().enable();
            let read_at = now_ms();
            let page = self
                .registry
                .changes_after(after, limit.clamp(1, 1000))
                .await?;
            // On every pass of the wait (the acknowledgement throttles
            // itself), so a long wait keeps the reader live.
            if let Some(reader) = &reader
                && reader.epoch == page.epoch
            {
                self.acknowledge(&reader.region, after, &page.epoch, page.head, read_at)
                    .await;
            }
            let now = tokio::time::Instant::now();
            if !page.events.is_empty() || now >= deadline || page.compacted > after {
                return Ok(FeedPage {
                    region: self.options.region.clone(),
                    epoch: page.epoch,
                    head: page.head,
                    compacted: page.compacted,
                    events: page.events,
                });
            }
            // Woken by any node's write (the registry follows the log head);
            // the poll only covers a watch being restarted.
            let left = (deadline - now).min(FALLBACK_POLL);
            let _ = tokio::time::timeout(left, signal).await;
        }
    }

    /// Records that `reader` has applied this region's log through `seq`
    /// (throttled; a failure only delays compaction, so it is logged, not
    /// returned). `head` was read at `read_at` or later.
    async fn acknowledge(&self, reader: &str, seq: u64, epoch: &str, head: u64, read_at: u64) {
        if !self.options.peers.iter().any(|p| p.name == reader) || seq > head {
            // Not a peer, or past the head this node sees (a stale read, a
            // log restored backwards): it vouches for nothing.
            return;
        }
        {
            let mut last = self
                .acks
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let now = Instant::now();
            let every = ACK_EVERY.min(self.options.ack_refresh);
            if let Some((seen, at)) = last.get(reader) {
                let elapsed = now.duration_since(*at);
                // A cursor that went back is said at once.
                let back = seq < *seen;
                if !back
                    && ((*seen == seq && elapsed < self.options.ack_refresh) || elapsed < every)
                {
                    return;
                }
            }
            last.insert(reader.to_string(), (seq, now));
        }
        let key = ack_key(reader);
        let previous = self.load::<Ack>(&key).await.ok().flatten();
        let through_ms = if seq == head {
            // Caught up: every write logged before the head was read.
            read_at
        } else {
            match self.registry.change(seq).await {
                Ok(Some(event)) => event.ms,
                // Compacted (the reader is resynchronizing, from the cursor
                // it had): what it vouched for before still holds.
                _ => previous
                    .filter(|p| p.epoch == epoch && p.seq <= seq)
                    .map_or(0, |p| p.through_ms),
            }
        };
        let ack = Ack {
            seq,
            epoch: epoch.to_string(),
            ms: now_ms(),
            through_ms,
        };
        if let Err(e) = self.save(&key, &ack).await {
            tracing::debug!(reader, error = %e, "could not record a feed acknowledgement");
        }
    }

    /// How far each peer has said it applied this region's log.
    pub async fn peer_acks(&self, window: Duration) -> Result<Vec<PeerAck>> {
        let epoch = self.registry.changes_after(u64::MAX, 1).await?.epoch;
        let live_after = now_ms().saturating_sub(window.as_millis() as u64);
        let mut out = Vec::with_capacity(self.options.peers.len());
        for peer in &self.options.peers {
            let ack = self.load::<Ack>(&ack_key(&peer.name)).await?;
            out.push(match ack {
                Some(ack) => PeerAck {
                    peer: peer.name.clone(),
                    seq: Some(if ack.epoch == epoch { ack.seq } else { 0 }),
                    acknowledged_ms: ack.ms,
                    live: ack.ms >= live_after,
                },
                None => PeerAck {
                    peer: peer.name.clone(),
                    seq: None,
                    acknowledged_ms: 0,
                    live: false,
                },
            });
        }
        Ok(out)
    }

    /// The newest log sequence every live peer has applied (`u64::MAX`
    /// when no peer is live). A peer that has not acknowledged within
    /// `window` is not waited for: when it comes back, it finds its cursor
    /// behind the compacted log and resynchronizes.
    pub fn acknowledged_by_all(acks: &[PeerAck]) -> u64 {
        acks.iter()
            .filter(|a| a.live)
            .filter_map(|a| a.seq)
            .min()
            .unwrap_or(u64::MAX)
    }

    /// Before when tombstones may go, as (any tombstone, one of this
    /// region's own deletes). Every peer counts here, live or not, so a
    /// region away for long pins tombstones (few and small) but not the
    /// log:
    /// - no tombstone goes while a write older than it could still arrive:
    ///   it must be older, by a margin for clocks, than the last time this
    ///   region had applied all of each peer's changes;
    /// - a tombstone of this region's own delete also stays until every
    ///   peer has applied the delete, so a peer that resynchronizes finds it
    ///   in the snapshot.
    pub async fn tombstone_cutoffs(&self, window: Duration) -> Result<(u64, u64)> {
        let now = now_ms();
        let margin = self.options.clock_margin.as_millis() as u64;
        let epoch = self.registry.changes_after(u64::MAX, 1).await?.epoch;
        let mut any = now.saturating_sub(window.as_millis() as u64);
        let mut own = u64::MAX;
        for peer in &self.options.peers {
            let status = self.status_of(peer).await?;
            any = any.min(status.caught_up_ms.saturating_sub(margin));
            let through = match self.load::<Ack>(&ack_key(&peer.name)).await? {
                Some(ack) if ack.epoch == epoch => ack.through_ms,
                _ => 0,
            };
            own = own.min(through.saturating_sub(margin));
        }
        Ok((any, own.min(any)))
    }

    /// One page of this region's records of `kind`, for a peer
    /// resynchronizing, with the head this node had read before it (so the
    /// peer can tell a page from a member that lags). The reader, still at
    /// `cursor` meanwhile, stays live.
    pub async fn snapshot(
        &self,
        kind: RecordKind,
        after: Option<&str>,
        limit: usize,
        reader: Option<(FeedReader, u64)>,
    ) -> Result<SnapshotPage> {
        let limit = limit.clamp(1, 1000);
        let read_at = now_ms();
        let log = self.registry.changes_after(u64::MAX, 1).await?;
        if let Some((reader, cursor)) = &reader
            && reader.epoch == log.epoch
        {
            self.acknowledge(&reader.region, *cursor, &log.epoch, log.head, read_at)
                .await;
        }
        let page = self
            .registry
            .records_page(kind, after.map(str::as_bytes), limit)
            .await?;
        let done = page.len() < limit;
        let next = if done {
            None
        } else {
            page.last()
                .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
        };
        let mut records = Vec::with_capacity(page.len());
        for kv in page {
            let (Ok(key), Ok(value)) = (
                String::from_utf8(kv.key),
                serde_json::from_slice::<serde_json::Value>(&kv.value),
            ) else {
                continue;
            };
            records.push((key, value));
        }
        Ok(SnapshotPage {
            region: self.options.region.clone(),
            head: log.head,
            records,
            done,
            next,
        })
    }
}
