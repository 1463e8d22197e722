//! A registry's HTTP API (this one, with the operator's credentials) as a
//! source (`berth export`) and as a destination (`berth import`).

use async_trait::async_trait;
use berth_oci::Digest;
use berth_store::ByteStream;
use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::{Method, StatusCode};

use super::{MAX_MANIFEST, Sink, Source, TransferError};
use crate::client::Api;

pub struct RegistryApi<'a> {
    pub api: &'a Api,
}

fn source_error(what: &str, e: impl std::fmt::Display) -> TransferError {
    TransferError::Source(format!("{what}: {e}"))
}

fn sink_error(what: &str, e: impl std::fmt::Display) -> TransferError {
    TransferError::Destination(format!("{what}: {e}"))
}

/// The registry's error message in a failed answer, shortened.
async fn describe(response: reqwest::Response) -> String {
    let status = response.status();
    let body = response.bytes().await.unwrap_or_default();
    let value: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    format!(
        "HTTP {status}: {}",
        crate::client::error_message(&value, &body)
    )
}

#[async_trait]
impl Source for RegistryApi<'_> {
    async fn manifest(
        &self,
        repo: &str,
        reference: &str,
    ) -> Result<(Bytes, String), TransferError> {
        let what = format!("GET {repo}:{reference}");
        let response = self
            .api
            .request(Method::GET, &format!("/v2/{repo}/manifests/{reference}"))
            .header("accept", berth_proxy::MANIFEST_ACCEPT)
            .send()
            .await
            .map_err(|e| source_error(&what, e))?;
        if !response.status().is_success() {
            return Err(source_error(&what, describe(response).await));
        }
        if response.content_length().is_some_and(|n| n > MAX_MANIFEST) {
            return Err(source_error(&what, "manifest too large"));
        }
        let media_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(berth_oci::media_type::essence)
            .unwrap_or_default();
        let mut body = response.bytes_stream();
        let mut bytes = bytes::BytesMut::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| source_error(&what, e))?;
            if (bytes.len() + chunk.len()) as u64 > MAX_MANIFEST {
                return Err(source_error(&what, "manifest too large"));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok((bytes.freeze(), media_type))
    }

    async fn blob(
        &self,
        repo: &str,
        digest: &Digest,
        _size: u64,
    ) -> Result<ByteStream, TransferError> {
        let what = format!("GET {repo}@{digest}");
        let response = self
            .api
            .request(Method::GET, &format!("/v2/{repo}/blobs/{digest}"))
            .send()
            .await
            .map_err(|e| source_error(&what, e))?;
        if !response.status().is_success() {
            return Err(source_error(&what, describe(response).await));
        }
        Ok(Box::pin(
            response
                .bytes_stream()
                .map(|r| r.map_err(std::io::Error::other)),
        ))
    }
}

#[async_trait]
impl Sink for RegistryApi<'_> {
    async fn has_blob(
        &self,
        repo: &str,
        digest: &Digest,
        size: u64,
    ) -> Result<bool, TransferError> {
        let what = format!("HEAD {repo}@{digest}");
        let response = self
            .api
            .request(Method::HEAD, &format!("/v2/{repo}/blobs/{digest}"))
            .send()
            .await
            .map_err(|e| sink_error(&what, e))?;
        match response.status() {
            StatusCode::NOT_FOUND => Ok(false),
            s if s.is_success() => Ok(response.content_length() == Some(size)),
            _ => Err(sink_error(&what, describe(response).await)),
        }
    }

    async fn put_blob(
        &self,
        repo: &str,
        digest: &Digest,
        size: u64,
        body: ByteStream,
    ) -> Result<(), TransferError> {
        let what = format!("upload of {repo}@{digest}");
        let response = self
            .api
            .request(Method::POST, &format!("/v2/{repo}/blobs/uploads/"))
            .header("content-length", "0")
            .send()
            .await
            .map_err(|e| sink_error(&what, e))?;
        if response.status() != StatusCode::ACCEPTED {
            return Err(sink_error(&what, describe(response).await));
        }
        let location = response
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| sink_error(&what, "no Location in the answer"))?
            .to_string();
        let url = if location.starts_with("http://") || location.starts_with("https://") {
            // The operator's credentials go to this registry only.
            if !location.starts_with(&self.api.url("/")) {
                return Err(sink_error(
                    &what,
                    format!("the upload was sent elsewhere ({location})"),
                ));
            }
            location
        } else {
            self.api.url(&location)
        };
        let separator = if url.contains('?') { '&' } else { '?' };
        let url = format!("{url}{separator}digest={digest}");
        // The registry verifies the digest before it answers 201.
        let response = self
            .api
            .put_url(&url)
            .header("content-type", "application/octet-stream")
            .header("content-length", size.to_string())
            .body(reqwest::Body::wrap_stream(body))
            .send()
            .await
            .map_err(|e| sink_error(&what, e))?;
        if response.status() != StatusCode::CREATED {
            return Err(sink_error(&what, describe(response).await));
        }
        Ok(())
    }

    async fn manifest_digest(
        &self,
        repo: &str,
        reference: &str,
    ) -> Result<Option<Digest>, TransferError> {
        let what = format!("HEAD {repo}:{reference}");
        let response = self
            .api
            .request(Method::HEAD, &format!("/v2/{repo}/manifests/{reference}"))
            .header("accept", berth_proxy::MANIFEST_ACCEPT)
            .send()
            .await
            .map_err(|e| sink_error(&what, e))?;
        match response.status() {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => Ok(response
                .headers()
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())),
            _ => Err(sink_error(&what, describe(response).await)),
        }
    }

    async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<(), TransferError> {
        let what = format!("PUT {repo}:{reference}");
        let response = self
            .api
            .request(Method::PUT, &format!("/v2/{repo}/manifests/{reference}"))
            .header("content-type", media_type)
            .body(bytes)
            .send()
            .await
            .map_err(|e| sink_error(&what, e))?;
        if response.status() != StatusCode::CREATED {
            return Err(sink_error(&what, describe(response).await));
        }
        Ok(())
    }
}
