//! `/ui/cache`: the pull-through cache's upstreams (up, or failing since
//! when and why), what it served from where (hit, revalidated, stale,
//! miss), and the cached images with size, age, last use and pin, with pin
//! and unpin for administrators (the same right as `berth cache pin`).

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use http::{HeaderMap, StatusCode};
use maud::html;
use serde::Deserialize;

use super::format::{ago, bytes, short_digest};
use super::{Form, Nav, PAGE_ROWS, Viewer, error_page, unavailable};
use crate::AppState;

#[derive(Deserialize, Default)]
pub struct CacheQuery {
    #[serde(default)]
    page: usize,
}

const RESULTS: [&str; 4] = ["hit", "revalidated", "stale", "miss"];

pub async fn page(
    State(state): State<AppState>,
    viewer: Viewer,
    uri: http::Uri,
    Query(query): Query<CacheQuery>,
) -> Response {
    if !viewer.may_admin() {
        return viewer.refuse(uri.path());
    }
    let Some(cache) = &state.cache else {
        let body = html! {
            h1 { "Pull-through cache" }
            p { "No upstream is configured (see " code { "--upstream" } ")." }
        };
        return super::page(&viewer, "Cache", Nav::Cache, false, body);
    };
    let mut entries = match cache.list().await {
        Ok(e) => e,
        Err(e) => return unavailable(&viewer, "the cached images", e),
    };
    // Most recently used first: what a storm is pulling now.
    entries.sort_by(|a, b| {
        b.accessed_ms
            .cmp(&a.accessed_ms)
            .then_with(|| a.repository.cmp(&b.repository))
    });
    let total: u64 = entries.iter().map(|e| e.size).sum();
    let pages = entries.len().div_ceil(PAGE_ROWS).max(1);
    let page_no = query.page.min(pages - 1);
    let shown = entries.iter().skip(page_no * PAGE_ROWS).take(PAGE_ROWS);
    let metrics = cache.metrics();
    let body = html! {
        h1 { "Pull-through cache" }
        h2 { "Upstreams" }
        table #upstreams {
            thead { tr {
                th { "Namespace" } th { "Upstream" } th { "State" } th { "Last error" }
                @for r in RESULTS { th.num { (r) } }
            } }
            tbody {
                @for u in cache.upstream_states() {
                    tr data-namespace=(u.namespace) {
                        td { strong { (u.namespace) } }
                        td.mono { (u.url) }
                        td.state {
                            @if u.down {
                                span.bad { "failing" }
                                @if u.failing_since_ms > 0 { " since " (ago(u.failing_since_ms)) }
                                br; span.muted { "serving what is cached" }
                            }
                            @else { span.ok { "up" } }
                        }
                        td { @match &u.last_error { Some((at, e)) => { span.muted { (e) " (" (ago(*at)) ")" } } None => span.muted { "none" } } }
                        @for r in RESULTS {
                            td.num {
                                (metrics.served_count(&u.namespace, "manifest", r)) " / " (metrics.served_count(&u.namespace, "blob", r))
                            }
                        }
                    }
                }
            }
        }
        p.note { "Counts are manifests / blobs served by this node since it started." }
        h2 { "Cached images" span.muted { " (" (entries.len()) ", " (bytes(total)) ")" } }
        @if entries.is_empty() {
            p.muted { "Nothing cached yet." }
        } @else {
            table #cached {
                thead { tr { th { "Image" } th { "Digest" } th.num { "Size" } th { "Cached" } th { "Last used" } th { "Pinned" } th { "Action" } } }
                tbody {
                    @for e in shown {
                        @let image = match e.tags.first() { Some(t) => format!("{}:{t}", e.repository), None => format!("{}@{}", e.repository, e.digest) };
                        tr data-image=(image) {
                            td { a href=(format!("/ui/repositories/{}", e.repository)) { (e.repository) }
                                @if !e.tags.is_empty() { span.muted { " :" (e.tags.join(", :")) } } }
                            td.mono { a href=(format!("/ui/repositories/{}/manifests/{}", e.repository, e.digest)) { (short_digest(&e.digest)) } }
                            td.num { (bytes(e.size)) }
                            td { (ago(e.cached_ms)) }
                            td { (ago(e.accessed_ms)) }
                            td.pinned { @if e.pinned { span.ok { "pinned" } } @else { "-" } }
                            td {
                                form.inline method="post" action="/ui/cache/pin" {
                                    input type="hidden" name="csrf" value=(viewer.csrf);
                                    input type="hidden" name="image" value=(image);
                                    input type="hidden" name="pinned" value=(if e.pinned { "false" } else { "true" });
                                    @if e.pinned { button.unpin type="submit" { "Unpin" } } @else { button.pin type="submit" { "Pin" } }
                                }
                            }
                        }
                    }
                }
            }
            (super::repositories::pager("/ui/cache?", page_no, pages))
        }
    };
    // Not live: the list is read whole (it is bounded by the cache's size).
    super::page(&viewer, "Cache", Nav::Cache, false, body)
}

#[derive(Deserialize)]
pub struct PinForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    image: String,
    #[serde(default)]
    pinned: String,
}

pub async fn pin(
    State(state): State<AppState>,
    viewer: Viewer,
    headers: HeaderMap,
    Form(form): Form<PinForm>,
) -> Response {
    if !viewer.may_admin() {
        return viewer.refuse("/ui/cache/pin");
    }
    if let Some(refused) = viewer.forged(&headers, &form.csrf) {
        return refused;
    }
    let Some(cache) = &state.cache else {
        return error_page(
            &viewer,
            StatusCode::NOT_FOUND,
            "Not found",
            "No pull-through cache is configured.",
        );
    };
    let Some(pinned) = super::form_bool(&form.pinned) else {
        return error_page(
            &viewer,
            StatusCode::BAD_REQUEST,
            "Bad request",
            "pinned is true or false.",
        );
    };
    let bad_image = || {
        error_page(
            &viewer,
            StatusCode::BAD_REQUEST,
            "Bad request",
            "The image is NAME:TAG or NAME@DIGEST in an upstream's namespace.",
        )
    };
    let Some((name, reference)) = berth_proxy::parse_image(&form.image) else {
        return bad_image();
    };
    let target = match cache.route(&name, None).await {
        Ok(Some(t)) => t,
        Ok(None) => return bad_image(),
        Err(e) => return unavailable(&viewer, "the cache's routes", e),
    };
    match cache.pin(&target.local, &reference, pinned).await {
        Ok(_) => {}
        Err(berth_proxy::CacheError::Registry(berth_registry::RegistryError::ManifestUnknown)) => {
            return error_page(
                &viewer,
                StatusCode::NOT_FOUND,
                "Not found",
                &format!("{} is not cached.", form.image),
            );
        }
        Err(e) => return unavailable(&viewer, "the cached image", e),
    }
    let mut event = viewer.audit_event("/ui/cache/pin", "admin", "admin");
    event.repository = Some(target.local.to_string());
    event.detail = format!(
        "console: {} {}",
        if pinned { "pin" } else { "unpin" },
        form.image
    );
    state.security.audit.record(event);
    Redirect::to("/ui/cache").into_response()
}
