//! `/ui/`: is the region up? This node, the region's nodes and the jobs
//! they lead, etcd's members and quorum, storage, request rates, and a line
//! on replication and the cache. Rendered from the background look of
//! `region` (at most a few seconds old), so it answers at once even when
//! etcd does not.

use axum::extract::State;
use axum::response::Response;
use maud::{Markup, html};

use super::format::{ago, rate, time};
use super::{Nav, Viewer};
use crate::AppState;
use crate::region::RegionStatus;

pub async fn page(State(state): State<AppState>, viewer: Viewer, uri: http::Uri) -> Response {
    if viewer.auth_enabled() && !viewer.signed_in() {
        return viewer.refuse(uri.path());
    }
    let latest = state.region.latest();
    let admin = viewer.may_admin();
    let body = html! {
        h1 { "Overview" }
        p.muted #rendered { "As of " (super::format::time(berth_registry::now_ms())) }
        (this_node(&state, latest.as_deref(), admin))
        @if admin {
            (traffic(&state))
            @match latest.as_deref() {
                Some(status) => {
                    (nodes(status))
                    (members(status))
                }
                None => p.muted { "Looking at the region (the first look takes a few seconds)." }
            }
            (replication(&state).await)
            (cache(&state))
        } @else {
            p.note { "Region status, traffic, replication and the cache are for administrators. "
                a href="/ui/repositories" { "Browse the repositories you may pull." } }
        }
    };
    super::page(&viewer, "Overview", Nav::Overview, true, body)
}

fn this_node(state: &AppState, latest: Option<&RegionStatus>, admin: bool) -> Markup {
    let source = &state.region_source;
    html! {
        dl.facts {
            dt { "This node" } dd #node-name { (source.as_ref().map_or("-".to_string(), |s| s.this_node())) }
            dt { "Version" } dd { (env!("CARGO_PKG_VERSION")) }
            dt { "Region" } dd #region-name { (state.registry.region().unwrap_or("- (no replication)")) }
            dt { "Stores" } dd { (source.as_ref().map_or(String::new(), |s| s.engines())) }
            dt { "Ready" }
            dd #node-ready {
                @match latest.map(|s| &s.ready) {
                    Some(Ok(())) => span.ok { "ready" },
                    Some(Err(why)) if admin => span.bad { "not ready: " (why) },
                    Some(Err(_)) => span.bad { "not ready" },
                    None => span.muted { "not looked at yet" },
                }
                @if let Some(s) = latest { " " span.muted { "(" (ago(s.collected_ms)) ")" } }
            }
        }
    }
}

fn traffic(state: &AppState) -> Markup {
    let now = berth_registry::now_ms();
    let rates = state.region.rates(now, state.metrics.traffic.counts());
    let card = |id: &str, label: &str, value: String, class: &str| {
        html! {
            div.card {
                div.label { (label) }
                div.value.(class) id=(id) { (value) }
            }
        }
    };
    let bad = |r: f64| if r > 0.0 { "bad" } else { "" };
    html! {
        h2 { "Traffic on this node" span.muted { " (last " (rates.window_secs.round()) " s)" } }
        div.cards {
            (card("rate-pulls", "Pulls (manifests and blobs)", rate(rates.pulls), ""))
            (card("rate-pushes", "Pushes (manifests)", rate(rates.pushes), ""))
            (card("rate-requests", "All requests", rate(rates.requests), ""))
            (card("rate-4xx", "Client errors", rate(rates.client_errors), ""))
            (card("rate-5xx", "Server errors", rate(rates.server_errors), bad(rates.server_errors)))
            (card("storage-errors", "Storage errors since start", state.metrics.storage_errors.get().to_string(),
                bad(state.metrics.storage_errors.get() as f64)))
        }
    }
}

fn nodes(status: &RegionStatus) -> Markup {
    html! {
        h2 { "Nodes" }
        @match &status.nodes {
            Err(e) => p.error { "Cannot list the nodes: " (e) },
            Ok(nodes) => {
                @let ready = nodes.iter().filter(|n| n.ready).count();
                p #nodes-summary { (ready) " of " (nodes.len()) " ready" }
                table #nodes {
                    thead { tr { th { "Name" } th { "Zone" } th { "Version" } th { "Address" } th { "Ready" } th { "Leads" } th { "Started" } } }
                    tbody {
                        @for n in nodes {
                            tr {
                                td { (n.name) @if n.this_node { " " span.muted { "(this node)" } } }
                                td { (if n.zone.is_empty() { "-" } else { &n.zone }) }
                                td { (n.version) }
                                td.mono { (n.address) }
                                td {
                                    @if n.ready { span.ok { "ready" } }
                                    @else { span.bad { "no" } " " span.muted { (n.detail) } }
                                }
                                td { (n.leads.join(", ")) }
                                td { (time(n.started_ms)) }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn members(status: &RegionStatus) -> Markup {
    let Some(members) = &status.members else {
        return html! {
            h2 { "Metadata" }
            p { "Embedded (redb): this node is its own quorum." }
        };
    };
    html! {
        h2 { "etcd members" }
        @match members {
            Err(e) => p.error #etcd-summary { "No etcd member answers: " (e) },
            Ok(members) => {
                @if let Some((reachable, total, ok)) = status.quorum() {
                    p #etcd-summary {
                        @if ok { span.ok { "quorum" } } @else { span.bad { "NO QUORUM" } }
                        ": " (reachable) " of " (total) " reachable, " (total / 2 + 1) " needed"
                    }
                }
                table #etcd-members {
                    thead { tr { th { "Name" } th { "Endpoint" } th { "Reachable" } th { "Role" } } }
                    tbody {
                        @for m in members {
                            tr {
                                td { (m.name) }
                                td.mono { (m.endpoint) }
                                td { @if m.reachable { span.ok { "yes" } } @else { span.bad { "UNREACHABLE" } } }
                                td { @if m.leader { "leader (term " (m.raft_term) ")" } }
                            }
                        }
                    }
                }
            }
        }
    }
}

async fn replication(state: &AppState) -> Markup {
    let Some(replicator) = &state.replication else {
        return html! {};
    };
    // Bounded: the overview must answer while etcd does not.
    let peers = match tokio::time::timeout(super::STORE_WAIT, replicator.status()).await {
        Ok(p) => p.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {:?}", super::STORE_WAIT)),
    };
    html! {
        h2 { a href="/ui/replication" { "Replication" } }
        @match peers {
            Err(e) => p.error { "Cannot read replication status: " (e) },
            Ok(peers) if peers.is_empty() => p.muted { "This region serves a feed and has no peers of its own." },
            Ok(peers) => {
                ul {
                    @for p in &peers {
                        li {
                            strong { (p.peer) } ": "
                            @if p.paused { span.warn { "paused" } ", " }
                            (p.events_behind) " events, " (format!("{:.1}", p.seconds_behind)) " s behind"
                            @if p.last_error.is_some() && p.last_error_ms > p.caught_up_ms { ", " span.bad { "failing" } }
                        }
                    }
                }
            }
        }
    }
}

fn cache(state: &AppState) -> Markup {
    let Some(cache) = &state.cache else {
        return html! {};
    };
    html! {
        h2 { a href="/ui/cache" { "Pull-through cache" } }
        ul {
            @for ns in cache.namespaces() {
                li { strong { (ns) } ": "
                    @if cache.is_down(ns) { span.bad { "upstream failing" } " (serving what is cached)" }
                    @else { span.ok { "up" } }
                }
            }
        }
    }
}
