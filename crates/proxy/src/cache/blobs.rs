//! Blobs through the cache: served from storage, or fetched once (one
//! fill per blob however many clients ask) while streaming to the client.

use std::sync::Arc;

use berth_oci::{Digest, RepositoryName};
use berth_registry::{RegistryError, now_ms};
use berth_store::{ByteStream, Txn};
use futures_util::StreamExt;

use super::{
    BlobAnswer, CacheError, PullThroughCache, Result, TOUCH_INTERVAL_MS, TOUCH_MAP_LIMIT, Target,
    fill_error,
};
use crate::fill::{FillFailure, FillState, Fills, Joined};
use crate::records::{self, CachedImage};
use crate::upstream::{FailureKind, UpstreamError};

impl PullThroughCache {
    /// Records that an image was used, at most once a minute per node.
    pub(super) fn touch(&self, local: &RepositoryName, digest: &Digest) {
        let key = records::image(local, digest);
        let now = now_ms();
        {
            let Ok(mut touched) = self.touched.lock() else {
                return;
            };
            if touched
                .get(&key)
                .is_some_and(|t| now.saturating_sub(*t) < TOUCH_INTERVAL_MS)
            {
                return;
            }
            if touched.len() >= TOUCH_MAP_LIMIT {
                touched.clear();
            }
            touched.insert(key.clone(), now);
        }
        let meta = self.meta.clone();
        tokio::spawn(async move {
            let result = async {
                let Some(kv) = meta.get(key.as_bytes()).await? else {
                    return Ok(());
                };
                let Some(mut image) = records::decode::<CachedImage>(&kv.value) else {
                    return Ok(());
                };
                image.accessed_ms = now;
                // Lost to a concurrent update (a pin): the next touch wins.
                meta.commit(
                    Txn::new()
                        .require_version(key.clone(), kv.version)
                        .put(key.clone(), records::encode(&image)),
                )
                .await
                .map(|_| ())
            }
            .await;
            if let Err(e) = result {
                tracing::debug!(error = %e, "could not record a cache access");
            }
        });
    }

    /// Makes a blob servable: cached already, linked from elsewhere in this
    /// registry, or fetched (one download per blob on this node, however
    /// many clients ask).
    pub async fn blob(
        self: &Arc<Self>,
        target: &Target,
        digest: &Digest,
        head: bool,
        ranged: bool,
    ) -> Result<BlobAnswer> {
        let ns = target.namespace.as_str();
        match self.registry.stat_blob(&target.local, digest).await {
            Ok(_) => {
                self.metrics.served(ns, "blob", "hit");
                return Ok(BlobAnswer::Local);
            }
            Err(RegistryError::BlobUnknown(_)) => {}
            Err(e) => return Err(e.into()),
        }
        // The same content may be stored under another name already. It is
        // used only when a manifest cached in this repository names it:
        // the upstream repository then has it, and a digest alone never
        // reads another repository's blob through the cache.
        if self.registry.references_blob(&target.local, digest).await? {
            if head {
                // A HEAD links nothing: pushers probe with HEADs, and a link
                // in the cache's repository must not make them skip an
                // upload.
                if let Some(size) = self.registry.stored_blob_size(digest).await? {
                    self.metrics.served(ns, "blob", "hit");
                    return Ok(BlobAnswer::Remote { size });
                }
            } else if self
                .registry
                .mount_blob(&target.local, digest, None)
                .await?
                .is_some()
            {
                self.metrics.served(ns, "blob", "hit");
                return Ok(BlobAnswer::Local);
            }
        }
        let upstream = self.upstream(ns)?;
        if head {
            self.metrics.served(ns, "blob", "miss");
            return match upstream.client.head_blob(&target.remote, digest).await {
                Ok(size) => {
                    self.note_success(upstream);
                    Ok(BlobAnswer::Remote { size })
                }
                Err(e) => {
                    self.note_failure(upstream, &e);
                    Err(e.into())
                }
            };
        }
        self.metrics.served(ns, "blob", "miss");
        let fill = match self
            .fills
            .join(&(target.local.to_string(), digest.clone()))
            .map_err(|e| CacheError::Io(format!("cannot start a spool file: {e}")))?
        {
            Joined::Leader(fill) => {
                let cache = self.clone();
                let target = target.clone();
                let digest = digest.clone();
                let leader = fill.clone();
                // Detached: the download completes for the cache even if the
                // client that started it goes away.
                tokio::spawn(async move { cache.run_fill(leader, target, digest).await });
                fill
            }
            Joined::Follower(fill) => fill,
        };
        let progress = if ranged {
            // A part of a blob being fetched: served from the store once
            // stored.
            fill.finished().await
        } else {
            fill.started().await
        };
        match progress.state {
            FillState::Failed(f) => Err(fill_error(f)),
            FillState::Running { total } => Ok(BlobAnswer::Streaming {
                stream: fill.reader(),
                size: total,
            }),
            FillState::Done | FillState::Connecting => {
                // Fetched for this repository (fills are per repository),
                // and linked by the fill's end; linked again for a follower
                // that arrived after the end.
                self.registry
                    .mount_blob(&target.local, digest, None)
                    .await?;
                Ok(BlobAnswer::Local)
            }
        }
    }

    pub(super) async fn run_fill(
        self: Arc<Self>,
        fill: Arc<crate::fill::Fill>,
        target: Target,
        digest: Digest,
    ) {
        /// Ends the fill however `run_fill` ends, a panic included, so that
        /// nobody waits on it forever.
        struct Ending<'a> {
            fills: &'a Fills,
            fill: &'a crate::fill::Fill,
            key: crate::fill::FillKey,
        }
        impl Drop for Ending<'_> {
            fn drop(&mut self) {
                if !self.fill.is_finished() {
                    self.fill.set_state(FillState::Failed(FillFailure::Store(
                        "the download stopped unexpectedly".into(),
                    )));
                }
                self.fills.finish(&self.key);
            }
        }
        let _ending = Ending {
            fills: &self.fills,
            fill: &fill,
            key: (target.local.to_string(), digest.clone()),
        };
        let ns = target.namespace.clone();
        let outcome = async {
            let upstream = self
                .upstream(&ns)
                .map_err(|e| FillFailure::Store(e.to_string()))?;
            let response = match upstream.client.get_blob(&target.remote, &digest).await {
                Ok(r) => {
                    self.note_success(upstream);
                    r
                }
                Err(e) => {
                    self.note_failure(upstream, &e);
                    return Err(FillFailure::Upstream(e));
                }
            };
            let total = response.content_length();
            let limit = self.registry.limits().max_blob_bytes;
            if total.is_some_and(|t| t > limit) {
                return Err(FillFailure::TooLarge(limit));
            }
            fill.set_state(FillState::Running { total });
            let body: ByteStream = Box::pin(
                response
                    .bytes_stream()
                    .map(|r| r.map_err(std::io::Error::other)),
            );
            let stored = self
                .registry
                .put_blob(&target.local, &digest, fill.tee(body))
                .await;
            match stored {
                Ok(size) => {
                    self.metrics.fetched(&ns, size);
                    tracing::info!(repository = %target.local, %digest, size, "cached blob from upstream");
                    Ok(())
                }
                Err(RegistryError::DigestInvalid(message)) => {
                    self.metrics.upstream_error(&ns, FailureKind::Corrupt.label());
                    tracing::error!(repository = %target.local, %digest, "upstream sent a corrupt blob; nothing stored: {message}");
                    Err(FillFailure::Upstream(UpstreamError {
                        namespace: ns.clone(),
                        url: upstream.client.config().url.clone(),
                        kind: FailureKind::Corrupt,
                        message: format!("blob content does not match its digest: {message}"),
                    }))
                }
                Err(RegistryError::BlobUploadInvalid(message)) => {
                    // The body broke off: the upstream went away mid-transfer.
                    let e = UpstreamError {
                        namespace: ns.clone(),
                        url: upstream.client.config().url.clone(),
                        kind: FailureKind::Connect,
                        message,
                    };
                    self.note_failure(upstream, &e);
                    Err(FillFailure::Upstream(e))
                }
                Err(RegistryError::TooLarge { limit }) => Err(FillFailure::TooLarge(limit)),
                Err(RegistryError::Store(berth_store::StoreError::Unavailable(m))) => {
                    Err(FillFailure::Unavailable(m))
                }
                Err(e) => Err(FillFailure::Store(e.to_string())),
            }
        }
        .await;
        match outcome {
            Ok(()) => fill.set_state(FillState::Done),
            Err(f) => {
                tracing::warn!(repository = %target.local, %digest, failure = ?f, "blob fetch failed");
                fill.set_state(FillState::Failed(f));
            }
        }
    }
}
