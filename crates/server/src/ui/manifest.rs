//! `/ui/repositories/NAME/manifests/DIGEST`: one manifest. An image's
//! config and layers with their sizes, an index's platforms, the
//! manifest's subject and its referrers (signatures, SBOMs), the tags that
//! point at it, and the exact pull command to copy.

use std::sync::Arc;

use berth_oci::{Digest, Manifest, RepositoryName};
use berth_registry::Registry;
use http::StatusCode;
use maud::html;

use super::format::{bytes, short_digest, time};
use super::{Nav, Viewer, error_page, unavailable};
use crate::AppState;

/// Children of an index whose manifests are read for its size, at most.
const MAX_CHILDREN_READ: usize = 64;
/// Platforms of an index listed, at most.
const MAX_PLATFORM_ROWS: usize = 256;
/// Tags pointing at the manifest shown, at most (newest first).
const SHOWN_TAGS: usize = 50;
/// The raw manifest shown on the page, at most.
const MAX_SHOWN_BYTES: usize = 64 * 1024;

/// What a tag row shows of the manifest it points at.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// The manifest and every blob it references (an index: its children's).
    pub size: u64,
    /// `linux/amd64`, ... for an index; empty for a single image.
    pub platforms: Vec<String>,
    /// Only some children were read: the size is a minimum.
    pub partial: bool,
}

fn platform_name(os: &str, architecture: &str) -> String {
    format!("{os}/{architecture}")
}

fn image_size(manifest_bytes: usize, parsed: &Manifest) -> u64 {
    manifest_bytes as u64 + parsed.required_blobs().map(|d| d.size).sum::<u64>()
}

/// The size and platforms of the manifest `digest` of `name`, if it is
/// there. An index's children are read one level deep.
pub async fn summarize(
    registry: &Registry,
    name: &RepositoryName,
    digest: &Digest,
) -> Result<Option<Arc<Summary>>, berth_registry::RegistryError> {
    let Some((record, bytes)) = registry.manifest_by_digest(name, digest).await? else {
        return Ok(None);
    };
    let Ok(parsed) = Manifest::parse(Some(&record.media_type), &bytes) else {
        return Ok(Some(Arc::new(Summary {
            size: bytes.len() as u64,
            ..Summary::default()
        })));
    };
    if !parsed.kind.is_index() {
        return Ok(Some(Arc::new(Summary {
            size: image_size(bytes.len(), &parsed),
            ..Summary::default()
        })));
    }
    let mut size = bytes.len() as u64;
    // Bounded: an index may list thousands of children.
    for child in parsed.children().iter().take(MAX_CHILDREN_READ) {
        size += match registry.manifest_by_digest(name, &child.digest).await? {
            Some((r, b)) => Manifest::parse(Some(&r.media_type), &b)
                .map_or(b.len() as u64, |p| image_size(b.len(), &p)),
            None => child.size,
        };
    }
    // The rest count by their manifests alone.
    size += parsed
        .children()
        .iter()
        .skip(MAX_CHILDREN_READ)
        .map(|c| c.size)
        .sum::<u64>();
    let platforms = record
        .platforms
        .iter()
        .map(|p| platform_name(&p.os, &p.architecture))
        .collect();
    Ok(Some(Arc::new(Summary {
        size,
        platforms,
        partial: parsed.children().len() > MAX_CHILDREN_READ,
    })))
}

pub async fn page(
    state: &AppState,
    viewer: &Viewer,
    name: &RepositoryName,
    digest: &Digest,
) -> Response {
    let registry = &state.registry;
    let (record, raw) = match registry.manifest_by_digest(name, digest).await {
        Ok(Some(found)) => found,
        Ok(None) => {
            return error_page(
                viewer,
                StatusCode::NOT_FOUND,
                "Not found",
                &format!("No manifest {digest} in {name}."),
            );
        }
        Err(e) => return unavailable(viewer, "the manifest", e),
    };
    let parsed = Manifest::parse(Some(&record.media_type), &raw).ok();
    let summary = summarize(registry, name, digest).await.ok().flatten();
    let tags: Vec<String> = match registry.tags_newest_first(name).await {
        Ok(listing) => listing
            .tags
            .into_iter()
            .filter(|t| &t.record.digest == digest)
            .map(|t| t.tag)
            .collect(),
        Err(e) => return unavailable(viewer, "the tags", e),
    };
    let more_tags = tags.len().saturating_sub(SHOWN_TAGS);
    let (referrers, more_referrers) = match registry.referrers(name, digest, None, None).await {
        Ok(found) => found,
        Err(e) => return unavailable(viewer, "the referrers", e),
    };
    let pull = format!("{}/{name}@{digest}", viewer.host);
    let platforms: std::collections::HashMap<&Digest, String> = record
        .platforms
        .iter()
        .map(|p| (&p.digest, platform_name(&p.os, &p.architecture)))
        .collect();
    let shown = String::from_utf8_lossy(&raw[..raw.len().min(MAX_SHOWN_BYTES)]).into_owned();
    let body = html! {
        h1 { (name) span.mono { "@" (short_digest(&digest.to_string())) } }
        dl.facts {
            dt { "Digest" } dd.mono #digest { (digest) }
            dt { "Media type" } dd.mono { (record.media_type) }
            @if let Some(a) = &record.artifact_type { dt { "Artifact type" } dd.mono { (a) } }
            dt { "Size" } dd #size {
                (summary.as_ref().map_or("?".into(), |s| bytes(s.size)))
                @if summary.as_ref().is_some_and(|s| s.partial) { "+" }
                span.muted { " (manifest " (bytes(record.size)) ")" }
            }
            dt { "Stored" } dd { (time(record.created_ms)) }
            dt { "Tags" } dd #manifest-tags {
                @if tags.is_empty() { span.muted { "none" } }
                @for t in tags.iter().take(SHOWN_TAGS) { a href=(format!("/ui/repositories/{name}/-/history/{t}")) { (t) } " " }
                @if more_tags > 0 { span.muted { "and " (more_tags) " more (newest first)" } }
            }
            @if let Some(subject) = &record.subject {
                dt { "Refers to" } dd.mono { a href=(format!("/ui/repositories/{name}/manifests/{subject}")) { (subject) } }
            }
        }
        h2 { "Pull" }
        pre.pull #pull-command { "docker pull " (pull) }
        @match &parsed {
            Some(m) if m.kind.is_index() => {
                h2 { "Platforms" }
                table #platforms {
                    thead { tr { th { "Platform" } th { "Manifest" } th.num { "Manifest size" } } }
                    tbody {
                        @for child in m.children().iter().take(MAX_PLATFORM_ROWS) {
                            @let platform = platforms.get(&child.digest).cloned().unwrap_or_else(|| "-".into());
                            tr {
                                td { (platform) }
                                td.mono { a href=(format!("/ui/repositories/{name}/manifests/{}", child.digest)) { (short_digest(&child.digest.to_string())) } }
                                td.num { (bytes(child.size)) }
                            }
                        }
                    }
                }
                @if m.children().len() > MAX_PLATFORM_ROWS {
                    p.muted { "and " (m.children().len() - MAX_PLATFORM_ROWS) " more" }
                }
            }
            Some(m) => {
                @if let Some(config) = &m.config {
                    h2 { "Config" }
                    p.mono #config { (config.media_type) " " (short_digest(&config.digest.to_string())) " (" (bytes(config.size)) ")" }
                }
                h2 { "Layers" span.muted { " (" (m.layers.len()) ", " (bytes(m.layers.iter().map(|l| l.size).sum())) ")" } }
                table #layers {
                    thead { tr { th.num { "#" } th { "Media type" } th { "Digest" } th.num { "Size" } } }
                    tbody {
                        @for (i, layer) in m.layers.iter().enumerate() {
                            tr {
                                td.num { (i + 1) }
                                td.mono { (layer.media_type) }
                                td.mono { (short_digest(&layer.digest.to_string())) }
                                td.num { (bytes(layer.size)) }
                            }
                        }
                    }
                }
            }
            None => p.error { "The manifest does not parse as an image or an index." }
        }
        h2 { "Referrers" span.muted { " (signatures, SBOMs, attestations)" } }
        @if referrers.is_empty() {
            p.muted #no-referrers { "None." }
        } @else {
            table #referrers {
                thead { tr { th { "Artifact type" } th { "Manifest" } th.num { "Size" } th { "Created" } } }
                tbody {
                    @for r in &referrers {
                        tr {
                            td.mono { (r.artifact_type.as_deref().unwrap_or(&r.media_type)) }
                            td.mono { a href=(format!("/ui/repositories/{name}/manifests/{}", r.digest)) { (short_digest(&r.digest.to_string())) } }
                            td.num { (bytes(r.size)) }
                            td { (r.annotations.as_ref().and_then(|a| a.get("org.opencontainers.image.created")).map_or("-", String::as_str)) }
                        }
                    }
                }
            }
            @if more_referrers { p.muted { "More referrers exist than fit here." } }
        }
        details {
            summary { "Manifest JSON" }
            pre.mono { (shown) }
            @if raw.len() > MAX_SHOWN_BYTES { p.muted { "(first " (bytes(MAX_SHOWN_BYTES as u64)) " shown)" } }
        }
    };
    super::page(
        viewer,
        &format!("{name}@{}", short_digest(&digest.to_string())),
        Nav::Repositories,
        false,
        body,
    )
}

use axum::response::Response;
