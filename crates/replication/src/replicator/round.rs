//! One round of replication from a peer: the feed page, each change
//! applied in order, the durable cursor.

use std::time::Duration;

use berth_oci::RepositoryName;
use berth_registry::{Applied, Change, ChangeEvent, RegistryError, now_ms};
use berth_store::Txn;

use super::{
    Cursor, FEED_BATCH, FeedPage, PeerConfig, ReplicationError, Replicator, Result, cursor_key,
    paused_key, status_key,
};
use crate::glob;
use crate::metrics::ReplicationMetrics;

impl Replicator {
    /// One round of replication from `peer`: fetch the next page of its
    /// feed (waiting for changes), copy and apply each change in order,
    /// advance the durable cursor. Errors end the round after a backoff.
    pub async fn run_round(&self, peer_name: &str) {
        let Ok(peer) = self.peer(peer_name) else {
            return;
        };
        let labels = ReplicationMetrics::peer(peer_name);
        let result = self.round(peer).await;
        if let Err(e) = &result {
            tracing::warn!(peer = peer_name, error = %e, "replication round failed");
            self.metrics.errors.get_or_create(&labels).inc();
            if let Ok(mut status) = self.status_of(peer).await {
                status.last_error = Some(e.to_string());
                status.last_error_ms = now_ms();
                status.updated_ms = now_ms();
                let _ = self.save(&status_key(peer_name), &status).await;
            }
        }
        let pause = self.backoff(peer_name, result.is_err());
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }

    pub(super) async fn round(&self, peer: &PeerConfig) -> Result<()> {
        let labels = ReplicationMetrics::peer(&peer.name);
        let mut status = self.status_of(peer).await?;
        if status.paused {
            tokio::time::sleep(Duration::from_secs(1)).await;
            return Ok(());
        }
        let cursor_seen = self
            .meta
            .get(cursor_key(&peer.name).as_bytes())
            .await
            .map_err(RegistryError::from)?;
        let saved = cursor_seen
            .as_ref()
            .map(|kv| Cursor::decode(&kv.value))
            .unwrap_or_default();
        // Before the request: the peer reads its head after this moment,
        // so every change of its committed before it is on the page or
        // before it.
        let requested_ms = now_ms();
        let mut page = self.fetch_feed(peer, saved.seq, &saved.epoch).await?;
        let mut cursor = saved.clone();
        if (!saved.epoch.is_empty() && !page.epoch.is_empty() && saved.epoch != page.epoch)
            || page.head < saved.seq
        {
            // The peer's log was rebuilt: start over (applying is idempotent).
            tracing::warn!(peer = %peer.name, "the peer's change log is new; replicating it from the start");
            cursor = Cursor::default();
            page = self.fetch_feed(peer, 0, &page.epoch).await?;
        }
        cursor.epoch = page.epoch.clone();
        // Paused while the feed request waited: apply nothing of it.
        if self
            .meta
            .get(paused_key(&peer.name).as_bytes())
            .await
            .map_err(RegistryError::from)?
            .is_some()
        {
            return Ok(());
        }
        if page.compacted > cursor.seq {
            // Changes this region has not applied are gone from the peer's
            // log: its state, read after the head was, covers them.
            tracing::warn!(
                peer = %peer.name,
                cursor = cursor.seq,
                compacted = page.compacted,
                "behind the peer's compacted change log; copying its state"
            );
            let copied = self.resync(peer, page.head, saved.seq, &page.epoch).await?;
            status.resyncs += 1;
            status.bytes_copied += copied;
            self.metrics.resyncs.get_or_create(&labels).inc();
            self.metrics
                .bytes_copied
                .get_or_create(&labels)
                .inc_by(copied);
            cursor.seq = page.head;
            page.events.clear();
        }
        status.head = page.head;
        status.oldest_pending_ms = page.events.first().map_or(0, |e| e.ms);
        let mut outcome = Ok(());
        for event in &page.events {
            if event.seq <= cursor.seq {
                continue;
            }
            match self.apply_event(peer, event).await {
                Ok(copied) => {
                    cursor.seq = event.seq;
                    status.applied += 1;
                    status.bytes_copied += copied;
                    self.metrics.events_applied.get_or_create(&labels).inc();
                    self.metrics
                        .bytes_copied
                        .get_or_create(&labels)
                        .inc_by(copied);
                }
                Err(e) => {
                    status.oldest_pending_ms = event.ms;
                    outcome = Err(e);
                    break;
                }
            }
        }
        if outcome.is_ok() {
            status.oldest_pending_ms = 0;
            status.last_error = None;
            if cursor.seq >= page.head {
                status.caught_up_ms = requested_ms;
            }
        }
        // Guarded by the cursor read at the start: if another node (a
        // former leader) moved it meanwhile, it is not moved back.
        let saved_now = self
            .meta
            .commit(
                Txn::new()
                    .require_unchanged(cursor_key(&peer.name), cursor_seen.as_ref())
                    .put(
                        cursor_key(&peer.name),
                        serde_json::to_vec(&cursor).unwrap_or_default(),
                    ),
            )
            .await
            .map_err(RegistryError::from)?;
        if !saved_now {
            return outcome;
        }
        status.cursor = cursor.seq;
        status.events_behind = status.head.saturating_sub(cursor.seq);
        status.updated_ms = now_ms();
        self.metrics
            .events_behind
            .get_or_create(&labels)
            .set(status.events_behind as i64);
        let behind_secs = if status.oldest_pending_ms == 0 {
            0
        } else {
            now_ms().saturating_sub(status.oldest_pending_ms) / 1000
        };
        self.metrics
            .seconds_behind
            .get_or_create(&labels)
            .set(behind_secs as i64);
        self.save(&status_key(&peer.name), &status).await?;
        outcome
    }

    pub(super) fn peer_error(peer: &PeerConfig, message: impl Into<String>) -> ReplicationError {
        ReplicationError::Peer {
            peer: peer.name.clone(),
            message: message.into(),
        }
    }

    /// The peer's feed after `after`, saying who reads it and in which of
    /// its logs (`epoch`) that cursor is, so that the peer can compact what
    /// this region has applied.
    pub(super) async fn fetch_feed(
        &self,
        peer: &PeerConfig,
        after: u64,
        epoch: &str,
    ) -> Result<FeedPage> {
        let wait = self.options.feed_wait;
        let mut url = reqwest::Url::parse(&format!(
            "{}/berth/v1/replication/feed",
            peer.url.trim_end_matches('/')
        ))
        .map_err(|e| Self::peer_error(peer, format!("feed: {e}")))?;
        url.query_pairs_mut()
            .append_pair("after", &after.to_string())
            .append_pair("limit", &FEED_BATCH.to_string())
            .append_pair("wait_ms", &wait.as_millis().to_string())
            .append_pair("reader", &self.options.region)
            .append_pair("epoch", epoch);
        let response = self
            .http
            .get(url)
            .headers(Self::credentials(peer))
            .timeout(wait + Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| Self::peer_error(peer, format!("feed: {e}")))?;
        if !response.status().is_success() {
            return Err(Self::peer_error(
                peer,
                format!("feed: HTTP {}", response.status()),
            ));
        }
        let bytes = response
            .bytes()
            .await
            .map_err(|e| Self::peer_error(peer, format!("feed: {e}")))?;
        let page: FeedPage = serde_json::from_slice(&bytes)
            .map_err(|e| Self::peer_error(peer, format!("feed: invalid page: {e}")))?;
        if page.region != peer.name {
            return Err(Self::peer_error(
                peer,
                format!("feed answered by region {:?}", page.region),
            ));
        }
        Ok(page)
    }

    /// Copies what a change needs and applies it. Returns the bytes copied.
    pub(super) async fn apply_event(&self, peer: &PeerConfig, event: &ChangeEvent) -> Result<u64> {
        match self.apply_event_once(peer, event).await {
            // Content this region can never take (over its limits, invalid):
            // retrying would block the peer forever. Skipped, and said so.
            Err(ReplicationError::Registry(
                e @ (RegistryError::ManifestInvalid(_)
                | RegistryError::TooLarge { .. }
                | RegistryError::DigestInvalid(_)
                | RegistryError::SizeInvalid(_)),
            )) => {
                tracing::error!(peer = %peer.name, seq = event.seq, error = %e, "skipping a change this region cannot take");
                Ok(0)
            }
            result => result,
        }
    }

    pub(super) async fn apply_event_once(
        &self,
        peer: &PeerConfig,
        event: &ChangeEvent,
    ) -> Result<u64> {
        let repository = event.change.repository();
        if !glob::selected(&peer.include, &peer.exclude, repository) {
            return Ok(0);
        }
        if event.stamp.origin != peer.name {
            // A peer serves only its own writes; anything else is not ours
            // to apply from it.
            return Ok(0);
        }
        let name = RepositoryName::parse(repository)
            .map_err(|e| RegistryError::ManifestInvalid(format!("invalid repository: {e}")))?;
        let mut copied = 0;
        match &event.change {
            Change::Manifest { digest, .. } | Change::Tag { digest, .. } => {
                let present = self
                    .ensure_manifest(peer, &name, digest, &event.stamp, 0, &mut copied)
                    .await?;
                if !present {
                    // Gone at the origin: a later change there says why.
                    tracing::info!(peer = %peer.name, repository, %digest, "skipping a change whose manifest the peer no longer has");
                }
                if present || matches!(event.change, Change::Tag { .. }) {
                    self.registry
                        .apply_change(&event.stamp, &event.change)
                        .await?;
                }
            }
            Change::Untag { .. } | Change::DeleteManifest { .. } => {
                let applied = self
                    .registry
                    .apply_change(&event.stamp, &event.change)
                    .await?;
                if applied == Applied::Changed {
                    tracing::debug!(peer = %peer.name, repository, "applied a delete");
                }
            }
        }
        Ok(copied)
    }
}
