//! Peer regions as sources of good bytes for `berth scrub --repair`: a
//! blob rotten or lost here is fetched from a peer that has it (its own
//! copy only, never read through again), and verified by digest on the
//! way in by the registry.

use std::sync::Arc;

use async_trait::async_trait;
use berth_oci::Digest;
use berth_registry::BlobSource;
use berth_store::ByteStream;
use futures_util::StreamExt;

use super::Replicator;

/// One peer region, as a repair source.
struct PeerBlobs {
    replicator: Arc<Replicator>,
    peer: usize,
}

impl Replicator {
    /// A repair source per peer, in the order they are configured.
    pub fn blob_sources(self: &Arc<Self>) -> Vec<Arc<dyn BlobSource>> {
        (0..self.options.peers.len())
            .map(|peer| {
                Arc::new(PeerBlobs {
                    replicator: self.clone(),
                    peer,
                }) as Arc<dyn BlobSource>
            })
            .collect()
    }
}

#[async_trait]
impl BlobSource for PeerBlobs {
    fn describe(&self) -> String {
        format!("region {}", self.replicator.options.peers[self.peer].name)
    }

    async fn fetch(
        &self,
        digest: &Digest,
        repository: Option<&str>,
    ) -> Result<Option<ByteStream>, String> {
        // A peer serves blobs by repository; one that links it here is
        // the likeliest to link it there.
        let Some(repository) = repository else {
            return Ok(None);
        };
        let peer = &self.replicator.options.peers[self.peer];
        let url = format!(
            "{}/v2/{repository}/blobs/{digest}",
            peer.url.trim_end_matches('/')
        );
        let response = self
            .replicator
            .http
            .get(&url)
            .headers(Replicator::credentials(peer))
            .header("x-berth-local-only", "1")
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !response.status().is_success() {
            return Err(format!("HTTP {}", response.status()));
        }
        Ok(Some(Box::pin(
            response
                .bytes_stream()
                .map(|r| r.map_err(std::io::Error::other)),
        )))
    }
}
