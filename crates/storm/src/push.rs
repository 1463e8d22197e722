//! Pushing the storm's image: each blob by a monolithic upload (POST, then
//! PUT with the digest), the platform manifests by digest, the index by tag.

use reqwest::{Client, StatusCode, header};

use crate::image::{INDEX_TYPE, Image, MANIFEST_TYPE};
use crate::{Error, Target};

pub async fn push(client: &Client, target: &Target, image: &Image) -> Result<(), Error> {
    for blob in &image.blobs {
        let url = format!("{}/v2/{}/blobs/{}", target.base, target.name, blob.digest);
        let head = client.head(&url).send().await?;
        if head.status() == StatusCode::OK {
            continue;
        }
        let start = client
            .post(format!("{}/v2/{}/blobs/uploads/", target.base, target.name))
            .header(header::CONTENT_LENGTH, "0")
            .send()
            .await?;
        if start.status() != StatusCode::ACCEPTED {
            return Err(Error::Status("POST upload", start.status()));
        }
        let location = start
            .headers()
            .get(header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .ok_or(Error::Protocol("upload without a Location"))?;
        let mut put_url = if location.starts_with("http") {
            location.to_string()
        } else {
            format!("{}{}", target.base, location)
        };
        put_url.push(if put_url.contains('?') { '&' } else { '?' });
        put_url.push_str("digest=");
        put_url.push_str(&blob.digest);
        let put = client
            .put(put_url)
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .body(blob.bytes.clone())
            .send()
            .await?;
        if put.status() != StatusCode::CREATED {
            return Err(Error::Status("PUT blob", put.status()));
        }
    }
    for (digest, bytes) in &image.manifests {
        put_manifest(client, target, digest, MANIFEST_TYPE, bytes.clone()).await?;
    }
    let (_, index) = &image.index;
    put_manifest(client, target, &target.reference, INDEX_TYPE, index.clone()).await
}

async fn put_manifest(
    client: &Client,
    target: &Target,
    reference: &str,
    media_type: &str,
    bytes: bytes::Bytes,
) -> Result<(), Error> {
    let put = client
        .put(format!(
            "{}/v2/{}/manifests/{reference}",
            target.base, target.name
        ))
        .header(header::CONTENT_TYPE, media_type)
        .body(bytes)
        .send()
        .await?;
    if put.status() != StatusCode::CREATED {
        return Err(Error::Status("PUT manifest", put.status()));
    }
    Ok(())
}
