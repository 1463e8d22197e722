//! Copying a manifest and its blobs from a peer, verified by digest.

use std::time::Duration;

use berth_oci::{Digest, Manifest, RepositoryName};
use berth_registry::{RegistryError, Stamp};
use berth_store::ByteStream;
use futures_util::StreamExt;

use super::{
    COPY_CONCURRENCY, MANIFEST_ACCEPT, MAX_DEPTH, PeerConfig, Replicator, Result, is_gone,
};

impl Replicator {
    /// Copies a manifest (an index's children, then blobs, then the
    /// manifest) from the peer unless it is here or deleted here later.
    /// `false` when the peer no longer has it.
    pub(super) fn ensure_manifest<'a>(
        &'a self,
        peer: &'a PeerConfig,
        name: &'a RepositoryName,
        digest: &'a Digest,
        stamp: &'a Stamp,
        depth: usize,
        copied: &'a mut u64,
    ) -> futures_util::future::BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            if self
                .registry
                .manifest_deleted_after(name, digest, stamp)
                .await?
            {
                return Ok(true);
            }
            let url = format!(
                "{}/v2/{name}/manifests/{digest}",
                peer.url.trim_end_matches('/')
            );
            let limit = self.registry.limits().max_manifest_bytes;
            let response = self
                .http
                .get(&url)
                .headers(Self::credentials(peer))
                .header("accept", MANIFEST_ACCEPT)
                .header("x-berth-local-only", "1")
                .timeout(Duration::from_secs(30))
                .send()
                .await
                .map_err(|e| Self::peer_error(peer, format!("manifest {digest}: {e}")))?;
            if is_gone(response.status()) {
                return Ok(false);
            }
            if !response.status().is_success() {
                return Err(Self::peer_error(
                    peer,
                    format!("manifest {digest}: HTTP {}", response.status()),
                ));
            }
            let content_type = response
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .map(berth_oci::media_type::essence);
            if response.content_length().is_some_and(|n| n > limit) {
                return Err(RegistryError::TooLarge { limit }.into());
            }
            let mut bytes = bytes::BytesMut::new();
            let mut body = response.bytes_stream();
            while let Some(chunk) = body.next().await {
                let chunk =
                    chunk.map_err(|e| Self::peer_error(peer, format!("manifest {digest}: {e}")))?;
                if (bytes.len() + chunk.len()) as u64 > limit {
                    return Err(RegistryError::TooLarge { limit }.into());
                }
                bytes.extend_from_slice(&chunk);
            }
            let bytes = bytes.freeze();
            if Digest::of(digest.algorithm(), &bytes) != *digest {
                return Err(Self::peer_error(
                    peer,
                    format!("manifest {digest}: content does not match its digest"),
                ));
            }
            *copied += bytes.len() as u64;
            let manifest = Manifest::parse(content_type.as_deref(), &bytes)
                .map_err(|e| Self::peer_error(peer, format!("manifest {digest}: {e}")))?;
            if depth < MAX_DEPTH {
                for child in manifest.children() {
                    // A child gone at the origin (deleted there) does not
                    // hold the index back: the origin has the index
                    // without it too.
                    if berth_oci::ManifestKind::from_media_type(&child.media_type).is_some() {
                        self.ensure_manifest(peer, name, &child.digest, stamp, depth + 1, copied)
                            .await?;
                    }
                }
            }
            let blobs: Vec<Digest> = manifest
                .required_blobs()
                .map(|d| d.digest.clone())
                .collect();
            for chunk in blobs.chunks(COPY_CONCURRENCY) {
                let mut copies = Vec::with_capacity(chunk.len());
                for d in chunk {
                    copies.push(self.ensure_blob(peer, name, d));
                }
                for result in futures_util::future::join_all(copies).await {
                    match result? {
                        Some(n) => *copied += n,
                        None => return Ok(false),
                    }
                }
            }
            self.registry
                .store_replicated_manifest(name, digest, content_type.as_deref(), bytes, stamp)
                .await?;
            Ok(true)
        })
    }

    /// Copies a blob from the peer unless it is here. The bytes copied, or
    /// `None` when the peer no longer has it.
    pub(super) async fn ensure_blob(
        &self,
        peer: &PeerConfig,
        name: &RepositoryName,
        digest: &Digest,
    ) -> Result<Option<u64>> {
        // Confirmed, not only looked up: the manifest committed after the
        // copies relies on the link, so a collector must not take it.
        match self.registry.confirm_blob(name, digest).await {
            Ok(_) => return Ok(Some(0)),
            Err(RegistryError::BlobUnknown(_)) => {}
            Err(e) => return Err(e.into()),
        }
        if self
            .registry
            .mount_blob(name, digest, None)
            .await?
            .is_some()
        {
            return Ok(Some(0));
        }
        let url = format!(
            "{}/v2/{name}/blobs/{digest}",
            peer.url.trim_end_matches('/')
        );
        let response = self
            .http
            .get(&url)
            .headers(Self::credentials(peer))
            .header("x-berth-local-only", "1")
            .send()
            .await
            .map_err(|e| Self::peer_error(peer, format!("blob {digest}: {e}")))?;
        // A blob the peer lacks while it has the manifest (its blob was
        // deleted there) is an error to retry, not a reason to skip.
        if !response.status().is_success() {
            return Err(Self::peer_error(
                peer,
                format!("blob {digest}: HTTP {}", response.status()),
            ));
        }
        let body: ByteStream = Box::pin(
            response
                .bytes_stream()
                .map(|r| r.map_err(std::io::Error::other)),
        );
        // Verified against the digest before it becomes visible.
        let size = self.registry.put_blob(name, digest, body).await?;
        Ok(Some(size))
    }
}
