//! Another registry (CNCF Distribution, Harbor, Zot, a cloud registry) as
//! a source for `berth import --from`, through the pull-through cache's
//! upstream client: its token dance, basic authentication and TLS.

use async_trait::async_trait;
use berth_oci::Digest;
use berth_proxy::UpstreamClient;
use berth_store::ByteStream;
use bytes::Bytes;
use futures_util::StreamExt;

use super::{MAX_MANIFEST, Source, TransferError};

pub struct Upstream {
    pub client: UpstreamClient,
}

#[async_trait]
impl Source for Upstream {
    async fn manifest(
        &self,
        repo: &str,
        reference: &str,
    ) -> Result<(Bytes, String), TransferError> {
        let fetched = self
            .client
            .get_manifest(repo, reference, MAX_MANIFEST)
            .await
            .map_err(|e| TransferError::Source(format!("{repo}:{reference}: {e}")))?;
        if let Some(claimed) = &fetched.claimed
            && Digest::of(claimed.algorithm(), &fetched.bytes) != *claimed
        {
            return Err(TransferError::Digest(format!(
                "{repo}:{reference} (the registry claims {claimed})"
            )));
        }
        Ok((fetched.bytes, fetched.content_type.unwrap_or_default()))
    }

    async fn blob(
        &self,
        repo: &str,
        digest: &Digest,
        _size: u64,
    ) -> Result<ByteStream, TransferError> {
        let response = self
            .client
            .get_blob(repo, digest)
            .await
            .map_err(|e| TransferError::Source(format!("{repo}@{digest}: {e}")))?;
        Ok(Box::pin(
            response
                .bytes_stream()
                .map(|r| r.map_err(std::io::Error::other)),
        ))
    }
}
