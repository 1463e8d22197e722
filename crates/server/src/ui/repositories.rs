//! `/ui/repositories` (search and list, with size and last push),
//! `/ui/repositories/NAME` (its tags, newest first, with digest, size and
//! platforms) and `/ui/repositories/NAME/-/history/TAG` (where a tag
//! pointed, and who moved it). A viewer sees the repositories it may pull;
//! a tag's history is its repository administrator's, as on the API.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use berth_oci::{Digest, RepositoryName};
use futures_util::StreamExt;
use http::StatusCode;
use maud::{Markup, html};
use serde::Deserialize;

use super::format::{ago, bytes, encode, short_digest, time};
use super::manifest::{self, Summary};
use super::{Form, Nav, PAGE_ROWS, Viewer, error_page, unavailable};
use crate::AppState;

/// Repository names one request looks at, at most (a search that finds
/// little offers a link to go on).
const MAX_EXAMINED: usize = 10_000;

#[derive(Deserialize, Default)]
pub struct ListQuery {
    #[serde(default)]
    q: String,
    /// The last name of the previous page.
    #[serde(default)]
    after: Option<String>,
}

pub async fn list(
    State(state): State<AppState>,
    viewer: Viewer,
    uri: http::Uri,
    Query(query): Query<ListQuery>,
) -> Response {
    if !viewer.allowed(&berth_auth::Requirement::Catalog) {
        return viewer.refuse(uri.path());
    }
    let needle = query.q.trim().to_string();
    if needle.len() > 256 {
        return error_page(
            &viewer,
            StatusCode::BAD_REQUEST,
            "Bad request",
            "A search is at most 256 characters.",
        );
    }
    // Names are visible only if the viewer may pull them: read batches
    // until a page of visible names is full, the names end, or this
    // request has looked at MAX_EXAMINED of them (then a link goes on).
    let mut names = Vec::new();
    let mut cursor = query
        .after
        .clone()
        .filter(|a| RepositoryName::parse(a).is_ok());
    let mut examined = 0;
    let next_after: Option<String> = loop {
        let batch = match state
            .registry
            .search_batch(&needle, cursor.as_deref(), 500)
            .await
        {
            Ok(b) => b,
            Err(e) => return unavailable(&viewer, "the repositories", e),
        };
        examined += 500;
        let mut full = false;
        for name in batch.matches {
            if viewer.may_list(&name) {
                if names.len() == PAGE_ROWS {
                    full = true;
                    break;
                }
                names.push(name);
            }
        }
        if full {
            break names.last().cloned();
        }
        if batch.ended {
            break None;
        }
        cursor = batch.last;
        if examined >= MAX_EXAMINED {
            break cursor.clone();
        }
    };
    let registry = state.registry.clone();
    let summaries: Vec<_> = futures_util::stream::iter(names.clone())
        .map(|name| {
            let registry = registry.clone();
            async move {
                let parsed = RepositoryName::parse(&name).ok()?;
                registry.repository_summary(&parsed).await.ok()
            }
        })
        .buffered(16)
        .collect()
        .await;
    let next = next_after.map(|after| {
        format!(
            "/ui/repositories?q={}&after={}",
            encode(&needle),
            encode(&after)
        )
    });
    let body = html! {
        h1 { "Repositories" }
        form.search method="get" action="/ui/repositories" role="search" {
            input #q type="search" name="q" value=(needle) placeholder="Search names" aria-label="Search repositories";
            button type="submit" { "Search" }
        }
        @if names.is_empty() && next.is_some() {
            p.muted #none-yet { "None in the first " (MAX_EXAMINED) " names looked at; the next link looks further." }
        } @else if names.is_empty() {
            p.muted #no-repositories { @if needle.is_empty() { "No repositories you may pull." } @else { "No repository you may pull matches." } }
        } @else {
            table #repositories {
                thead { tr { th { "Name" } th.num { "Tags" } th.num { "Size" } th { "Last push" } } }
                tbody {
                    @for (name, summary) in names.iter().zip(summaries.iter()) {
                        tr {
                            td { a href=(format!("/ui/repositories/{name}")) { (name) } }
                            @match summary {
                                Some(s) => {
                                    td.num { (s.tags) @if s.truncated { "+" } }
                                    td.num { (bytes(s.size)) @if s.truncated { "+" } }
                                    td { (ago(s.last_push_ms)) }
                                }
                                None => { td.num { "?" } td.num { "?" } td { "?" } }
                            }
                        }
                    }
                }
            }
        }
        div.pager {
            @if query.after.is_some() { a href=(format!("/ui/repositories?q={}", encode(&needle))) { "First page" } }
            @if let Some(next) = next { a #next-page href=(next) { "Next page" } }
        }
    };
    super::page(&viewer, "Repositories", Nav::Repositories, false, body)
}

/// A pager over numbered pages (`prefix` ends in `?` or `&`).
pub fn pager(prefix: &str, page: usize, pages: usize) -> Markup {
    html! {
        @if pages > 1 {
            div.pager {
                @if page > 0 { a href=(format!("{prefix}page={}", page - 1)) { "Previous" } }
                span.muted { "page " (page + 1) " of " (pages) }
                @if page + 1 < pages { a.next href=(format!("{prefix}page={}", page + 1)) { "Next" } }
            }
        }
    }
}

#[derive(Deserialize, Default)]
pub struct RepoQuery {
    #[serde(default)]
    page: usize,
}

/// `NAME`, `NAME/manifests/DIGEST` or `NAME/-/history/TAG`.
enum Target {
    Tags(RepositoryName),
    Manifest(RepositoryName, Digest),
    History(RepositoryName, String),
}

fn parse_target(rest: &str) -> Option<Target> {
    let rest = rest.trim_end_matches('/');
    if let Some((name, tag)) = rest.split_once("/-/history/") {
        let tag = berth_oci::Tag::parse(tag).ok()?;
        return Some(Target::History(
            RepositoryName::parse(name).ok()?,
            tag.to_string(),
        ));
    }
    // A digest holds a `:`, which no repository name does.
    if let Some((name, digest)) = rest.rsplit_once("/manifests/")
        && digest.contains(':')
    {
        return Some(Target::Manifest(
            RepositoryName::parse(name).ok()?,
            digest.parse().ok()?,
        ));
    }
    Some(Target::Tags(RepositoryName::parse(rest).ok()?))
}

pub async fn dispatch(
    State(state): State<AppState>,
    viewer: Viewer,
    uri: http::Uri,
    Path(rest): Path<String>,
    Query(query): Query<RepoQuery>,
) -> Response {
    let Some(target) = parse_target(&rest) else {
        return error_page(
            &viewer,
            StatusCode::NOT_FOUND,
            "Not found",
            "That is not a repository, manifest or tag history address.",
        );
    };
    let name = match &target {
        Target::Tags(n) | Target::Manifest(n, _) | Target::History(n, _) => n.clone(),
    };
    if !viewer.may_pull(name.as_str()) {
        return viewer.refuse(uri.path());
    }
    match target {
        Target::Tags(name) => tags(&state, &viewer, &name, query.page).await,
        Target::Manifest(name, digest) => manifest::page(&state, &viewer, &name, &digest).await,
        Target::History(name, tag) => {
            if !viewer.may_administer(name.as_str()) {
                return viewer.refuse(uri.path());
            }
            history(&state, &viewer, &name, &tag).await
        }
    }
}

async fn tags(state: &AppState, viewer: &Viewer, name: &RepositoryName, page: usize) -> Response {
    match state.registry.repository_exists(name).await {
        Ok(true) => {}
        Ok(false) => {
            return error_page(
                viewer,
                StatusCode::NOT_FOUND,
                "Not found",
                &format!("No repository {name}."),
            );
        }
        Err(e) => return unavailable(viewer, "the repository", e),
    }
    let listing = match state.registry.tags_newest_first(name).await {
        Ok(l) => l,
        Err(e) => return unavailable(viewer, "the tags", e),
    };
    let pages = listing.tags.len().div_ceil(PAGE_ROWS).max(1);
    let page = page.min(pages - 1);
    let shown: Vec<_> = listing
        .tags
        .iter()
        .skip(page * PAGE_ROWS)
        .take(PAGE_ROWS)
        .collect();
    let registry = state.registry.clone();
    let digests: Vec<Digest> = shown.iter().map(|t| t.record.digest.clone()).collect();
    let summaries: Vec<Option<Arc<Summary>>> = futures_util::stream::iter(digests)
        .map(|digest| {
            let registry = registry.clone();
            let name = name.clone();
            async move {
                manifest::summarize(&registry, &name, &digest)
                    .await
                    .ok()
                    .flatten()
            }
        })
        .buffered(16)
        .collect()
        .await;
    let history = viewer.may_administer(name.as_str());
    // The trash is its administrator's to read, as on the API.
    let trash = if history {
        match state.registry.trash(Some(name)).await {
            Ok(t) => t,
            Err(e) => return unavailable(viewer, "the trash", e),
        }
    } else {
        Vec::new()
    };
    let may_undelete = viewer.may(name.as_str(), berth_auth::Action::Push);
    let body = html! {
        h1 { (name) }
        p.muted { (listing.tags.len()) @if listing.truncated { "+" } " tags, newest first" }
        @if shown.is_empty() {
            p.muted { "No tags (untagged manifests stay reachable by digest)." }
        } @else {
            table #tags {
                thead { tr { th { "Tag" } th { "Digest" } th.num { "Size" } th { "Platforms" } th { "Pushed" } @if history { th { "History" } } } }
                tbody {
                    @for (t, summary) in shown.iter().zip(summaries.iter()) {
                        tr data-tag=(t.tag) {
                            td { strong { (t.tag) } }
                            td.mono { a href=(format!("/ui/repositories/{name}/manifests/{}", t.record.digest)) { (short_digest(&t.record.digest.to_string())) } }
                            @match summary {
                                Some(s) => { td.num { (bytes(s.size)) @if s.partial { "+" } } td { (s.platforms.join(", ")) } }
                                None => { td.num { "?" } td { "?" } }
                            }
                            td { span title=(time(t.record.updated_ms)) { (ago(t.record.updated_ms)) } }
                            @if history { td { a href=(format!("/ui/repositories/{name}/-/history/{}", t.tag)) { "history" } } }
                        }
                    }
                }
            }
            (pager(&format!("/ui/repositories/{name}?"), page, pages))
        }
        @if !trash.is_empty() {
            h2 { "Trash" span.muted { " (deleted, kept until garbage collection may take them)" } }
            table #trash {
                thead { tr { th { "What" } th { "Digest" } th.num { "Size" } th { "Deleted" } th { "By" } th { "Kept until" } @if may_undelete { th { "Action" } } } }
                tbody {
                    @for e in trash.iter().take(PAGE_ROWS) {
                        @let reference = e.tag.clone().unwrap_or_else(|| e.digest.to_string());
                        tr data-reference=(reference) {
                            td { @match &e.tag { Some(t) => { "tag " strong { (t) } } None => { "manifest" @if !e.tags.is_empty() { " with " (e.tags.join(", ")) } } } }
                            td.mono { (short_digest(&e.digest.to_string())) }
                            td.num { (e.size.map_or("?".into(), bytes)) }
                            td { (ago(e.deleted_ms)) }
                            td { (e.by.as_deref().unwrap_or("-")) }
                            td { (time(e.expires_ms)) }
                            @if may_undelete {
                                td {
                                    form.inline method="post" action=(format!("/ui/repositories/{name}/-/undelete")) {
                                        input type="hidden" name="csrf" value=(viewer.csrf);
                                        input type="hidden" name="reference" value=(reference);
                                        button.undelete type="submit" { "Undelete" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    super::page(viewer, name.as_str(), Nav::Repositories, false, body)
}

#[derive(Deserialize)]
pub struct UndeleteForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    reference: String,
}

/// `POST /ui/repositories/NAME/-/undelete`: brings a deleted tag or
/// manifest back (a push, as `berth undelete` is).
pub async fn act(
    State(state): State<AppState>,
    viewer: Viewer,
    headers: http::HeaderMap,
    Path(rest): Path<String>,
    Form(form): Form<UndeleteForm>,
) -> Response {
    let not_found = || {
        error_page(
            &viewer,
            StatusCode::NOT_FOUND,
            "Not found",
            "No console action has this address.",
        )
    };
    let Some(name) = rest
        .strip_suffix("/-/undelete")
        .and_then(|n| RepositoryName::parse(n).ok())
    else {
        return not_found();
    };
    let path = format!("/ui/repositories/{name}/-/undelete");
    if !viewer.may(name.as_str(), berth_auth::Action::Push) {
        return viewer.refuse(&path);
    }
    if let Some(refused) = viewer.forged(&headers, &form.csrf) {
        return refused;
    }
    let Ok(reference) = berth_oci::Reference::parse(&form.reference) else {
        return error_page(
            &viewer,
            StatusCode::BAD_REQUEST,
            "Bad request",
            "The reference is a tag or a digest.",
        );
    };
    let by = viewer.auth_enabled().then(|| viewer.name());
    match state
        .registry
        .undelete(&name, &reference, by.as_deref())
        .await
    {
        Ok(_) => {}
        Err(berth_registry::RegistryError::ManifestUnknown) => {
            return error_page(
                &viewer,
                StatusCode::NOT_FOUND,
                "Not found",
                &format!("{} is not in the trash of {name}.", form.reference),
            );
        }
        Err(e) => return unavailable(&viewer, "the trash", e),
    }
    let mut event = viewer.audit_event(path, "undelete", "push");
    event.repository = Some(name.to_string());
    event.reference = Some(form.reference.clone());
    event.detail = "console".into();
    state.security.audit.record(event);
    axum::response::Redirect::to(&format!("/ui/repositories/{name}")).into_response()
}

async fn history(state: &AppState, viewer: &Viewer, name: &RepositoryName, tag: &str) -> Response {
    let entries = match state.registry.tag_history(name, tag).await {
        Ok(e) => e,
        Err(e) => return unavailable(viewer, "the tag's history", e),
    };
    let current = berth_oci::Tag::parse(tag).ok();
    let current = match current {
        Some(t) => state.registry.find_tag(name, &t).await.ok().flatten(),
        None => None,
    };
    let body = html! {
        h1 { (name) ":" (tag) " history" }
        p { "Now: " @match &current {
            Some(d) => a.mono href=(format!("/ui/repositories/{name}/manifests/{d}")) { (d) },
            None => span.muted { "not tagged (deleted)" },
        } }
        @if entries.is_empty() {
            p.muted { "No earlier values are kept." }
        } @else {
            table #history {
                thead { tr { th { "When" } th { "Digest" } th { "Region" } th { "By" } } }
                tbody {
                    @for e in entries.iter().rev() {
                        tr {
                            td { (time(berth_registry::stamp_ms(&e.stamp))) }
                            td.mono { a href=(format!("/ui/repositories/{name}/manifests/{}", e.digest)) { (short_digest(&e.digest.to_string())) } }
                            td { (if e.stamp.origin.is_empty() { "-" } else { &e.stamp.origin }) }
                            td { (e.by.as_deref().unwrap_or("-")) }
                        }
                    }
                }
            }
            p.note { "To move the tag back: " code { "berth tags restore " (name) ":" (tag) " DIGEST" } }
        }
    };
    super::page(
        viewer,
        &format!("{name}:{tag}"),
        Nav::Repositories,
        false,
        body,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse() {
        assert!(
            matches!(parse_target("team/app"), Some(Target::Tags(n)) if n.as_str() == "team/app")
        );
        assert!(matches!(parse_target("team/app/"), Some(Target::Tags(_))));
        let digest = format!("sha256:{}", "a".repeat(64));
        assert!(matches!(
            parse_target(&format!("team/app/manifests/{digest}")),
            Some(Target::Manifest(n, d)) if n.as_str() == "team/app" && d.to_string() == digest
        ));
        // A repository may be called `manifests`.
        assert!(
            matches!(parse_target("team/manifests/x"), Some(Target::Tags(n)) if n.as_str() == "team/manifests/x")
        );
        assert!(matches!(
            parse_target("team/app/-/history/v1.2"),
            Some(Target::History(n, t)) if n.as_str() == "team/app" && t == "v1.2"
        ));
        assert!(parse_target("Team/App").is_none());
        assert!(parse_target("team/app/manifests/sha256:zz").is_none());
        assert!(parse_target("team/app/-/history/bad tag").is_none());
    }
}
