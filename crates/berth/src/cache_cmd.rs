//! `berth cache`: warm, list and pin the pull-through cache of a running
//! registry, through its HTTP API (so it works the same on an embedded node,
//! whose database the server holds locked, and on a cluster behind a load
//! balancer).

use std::time::Duration;

use berth_oci::{Digest, Manifest, Reference};
use futures_util::StreamExt;

use berth_proxy::MANIFEST_ACCEPT;

use crate::admin::AdminError;
use crate::client::Api;

/// Blobs fetched at once while warming.
const WARM_PARALLEL: usize = 4;

fn failed(what: &str, e: impl std::fmt::Display) -> AdminError {
    AdminError::Failed(format!("{what}: {e}"))
}

async fn error_text(response: reqwest::Response) -> String {
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    let message = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["errors"][0]["message"].as_str().map(str::to_string))
        .unwrap_or(body);
    format!("HTTP {status}: {message}")
}

/// A platform filter such as `linux/arm64` or `linux/arm/v7`.
fn platform_matches(filters: &[String], platform: Option<&serde_json::Value>) -> bool {
    if filters.is_empty() {
        return true;
    }
    let Some(p) = platform else { return false };
    let field = |k: &str| p.get(k).and_then(|v| v.as_str()).unwrap_or("");
    filters.iter().any(|f| {
        let mut parts = f.split('/');
        let (os, arch, variant) = (parts.next(), parts.next(), parts.next());
        os == Some(field("os"))
            && arch.is_none_or(|a| a == field("architecture"))
            && variant.is_none_or(|v| v == field("variant"))
    })
}

struct Warmer<'a> {
    api: &'a Api,
    blobs: u64,
    bytes: u64,
    progress: crate::progress::Progress,
}

impl Warmer<'_> {
    /// Fetches a manifest through the registry and checks its digest.
    async fn manifest(
        &self,
        name: &str,
        reference: &str,
    ) -> Result<(Digest, Manifest), AdminError> {
        let url = self.api.url(&format!("/v2/{name}/manifests/{reference}"));
        let response = self
            .api
            .request(
                reqwest::Method::GET,
                &format!("/v2/{name}/manifests/{reference}"),
            )
            .header("accept", MANIFEST_ACCEPT)
            .timeout(Duration::from_secs(120))
            .send()
            .await
            .map_err(|e| failed(&format!("GET {url}"), e))?;
        if !response.status().is_success() {
            return Err(failed(
                &format!("{name}:{reference}"),
                error_text(response).await,
            ));
        }
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let claimed = response
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<Digest>().ok());
        let bytes = response
            .bytes()
            .await
            .map_err(|e| failed(&format!("GET {url}"), e))?;
        let digest = match (reference.parse::<Digest>().ok(), claimed) {
            (Some(d), _) | (None, Some(d)) => d,
            (None, None) => Digest::sha256_of(&bytes),
        };
        if Digest::of(digest.algorithm(), &bytes) != digest {
            return Err(AdminError::Failed(format!(
                "{name}:{reference}: manifest does not match digest {digest}"
            )));
        }
        let manifest = Manifest::parse(content_type.as_deref(), &bytes)
            .map_err(|e| failed(&format!("{name}:{reference}"), e))?;
        Ok((digest, manifest))
    }

    /// Fetches a blob through the registry (which caches it) and verifies it.
    async fn blob(&self, name: &str, digest: &Digest) -> Result<u64, AdminError> {
        let url = self.api.url(&format!("/v2/{name}/blobs/{digest}"));
        let response = self
            .api
            .request(reqwest::Method::GET, &format!("/v2/{name}/blobs/{digest}"))
            .send()
            .await
            .map_err(|e| failed(&format!("GET {url}"), e))?;
        if !response.status().is_success() {
            return Err(failed(
                &format!("blob {digest}"),
                error_text(response).await,
            ));
        }
        let mut hasher = digest.algorithm().hasher();
        let mut size = 0u64;
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| failed(&format!("blob {digest}"), e))?;
            size += chunk.len() as u64;
            self.progress.advance(chunk.len() as u64);
            hasher.update(&chunk);
        }
        if &hasher.finish() != digest {
            return Err(AdminError::Failed(format!(
                "blob {digest}: content does not match"
            )));
        }
        Ok(size)
    }

    async fn image(
        &mut self,
        name: &str,
        digest: &Digest,
        manifest: &Manifest,
    ) -> Result<(), AdminError> {
        let blobs: Vec<Digest> = manifest
            .required_blobs()
            .map(|d| d.digest.clone())
            .collect();
        self.progress
            .add_total(manifest.required_blobs().map(|d| d.size).sum());
        let mut fetched = futures_util::stream::iter(blobs.iter().map(|d| self.blob(name, d)))
            .buffer_unordered(WARM_PARALLEL);
        let mut bytes = 0;
        while let Some(result) = fetched.next().await {
            bytes += result?;
        }
        drop(fetched);
        self.blobs += blobs.len() as u64;
        self.bytes += bytes;
        self.progress
            .say(&format!("  {digest}: {} blobs, {bytes} bytes", blobs.len()));
        Ok(())
    }

    async fn warm(&mut self, image: &str, platforms: &[String]) -> Result<(), AdminError> {
        let (name, reference) = berth_proxy::parse_image(image).ok_or_else(|| {
            AdminError::Failed(format!("{image:?}: expected NAME:TAG or NAME@DIGEST"))
        })?;
        let reference = match reference {
            Reference::Tag(t) => t.as_str().to_string(),
            Reference::Digest(d) => d.to_string(),
        };
        let (digest, manifest) = self.manifest(&name, &reference).await?;
        if manifest.kind.is_index() {
            let children: Vec<_> = manifest
                .children()
                .iter()
                .filter(|c| platform_matches(platforms, c.platform.as_ref()))
                .cloned()
                .collect();
            self.progress.say(&format!(
                "{image}: index {digest}, {} of {} manifests",
                children.len(),
                manifest.children().len()
            ));
            if children.is_empty() {
                return Err(AdminError::Failed(format!(
                    "{image}: no manifest for platform {}",
                    platforms.join(", ")
                )));
            }
            for child in children {
                let (child_digest, child_manifest) =
                    self.manifest(&name, &child.digest.to_string()).await?;
                if child_manifest.kind.is_index() {
                    continue; // nested indexes are rare; their images stay lazy
                }
                self.image(&name, &child_digest, &child_manifest).await?;
            }
        } else {
            self.progress.say(&format!("{image}: image {digest}"));
            self.image(&name, &digest, &manifest).await?;
        }
        Ok(())
    }
}

pub async fn pin(api: &Api, image: &str, pinned: bool) -> Result<bool, AdminError> {
    let path = format!(
        "/berth/v1/cache/pin?image={}&pinned={pinned}",
        berth_oci::query::encode(image)
    );
    let body = api
        .json(reqwest::Method::POST, &path, None, None)
        .await
        .map_err(|e| failed(image, e))?;
    println!(
        "{image}: {} ({} cached manifests changed)",
        if pinned { "pinned" } else { "unpinned" },
        body["changed"].as_u64().unwrap_or(0)
    );
    Ok(true)
}

pub async fn warm(
    api: &Api,
    images: &[String],
    platforms: &[String],
    pin_them: bool,
) -> Result<bool, AdminError> {
    let mut warmer = Warmer {
        api,
        blobs: 0,
        bytes: 0,
        progress: crate::progress::Progress::start("warming", Some(0), false),
    };
    let mut ok = true;
    for image in images {
        match warmer.warm(image, platforms).await {
            Ok(()) => {
                if pin_them {
                    pin(api, image, true).await?;
                }
            }
            Err(e) => {
                eprintln!("berth: {e}");
                ok = false;
            }
        }
    }
    warmer.progress.finish();
    println!("warmed {} blobs, {} bytes", warmer.blobs, warmer.bytes);
    Ok(ok)
}

fn age(now_ms: u64, then_ms: u64) -> String {
    let secs = now_ms.saturating_sub(then_ms) / 1000;
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

pub async fn list(api: &Api, json: bool) -> Result<bool, AdminError> {
    let body = api
        .json(reqwest::Method::GET, "/berth/v1/cache", None, None)
        .await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&body).unwrap_or_default()
        );
        return Ok(true);
    }
    let now = berth_registry::now_ms();
    let images = body["images"].as_array().cloned().unwrap_or_default();
    println!(
        "{:<40} {:<20} {:<19} {:>12} {:>7} {:>9} PINNED",
        "REPOSITORY", "TAGS", "DIGEST", "SIZE", "AGE", "LAST USE"
    );
    let mut total = 0u64;
    for image in &images {
        let tags: Vec<&str> = image["tags"]
            .as_array()
            .map(|t| t.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        let digest = image["digest"].as_str().unwrap_or("");
        let size = image["size"].as_u64().unwrap_or(0);
        total += size;
        println!(
            "{:<40} {:<20} {:<19} {:>12} {:>7} {:>9} {}",
            image["repository"].as_str().unwrap_or(""),
            if tags.is_empty() {
                "-".to_string()
            } else {
                tags.join(",")
            },
            &digest[..digest.len().min(19)],
            size,
            age(now, image["cached_ms"].as_u64().unwrap_or(0)),
            age(now, image["accessed_ms"].as_u64().unwrap_or(0)),
            if image["pinned"].as_bool() == Some(true) {
                "yes"
            } else {
                "no"
            }
        );
    }
    println!("{} images, {total} bytes", images.len());
    Ok(true)
}
