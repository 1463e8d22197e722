//! `/ui/replication`: each peer's lag, bytes copied and last error, with
//! pause/resume and serving on/off for those the policy lets control the
//! region (the same right as `berth replication pause`).

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Redirect, Response};
use http::{HeaderMap, StatusCode};
use maud::html;

use super::format::{ago, bytes};
use super::session::CsrfForm;
use super::{Form, Nav, Viewer, error_page, unavailable};
use crate::AppState;

pub async fn page(State(state): State<AppState>, viewer: Viewer, uri: http::Uri) -> Response {
    if !viewer.may_admin() {
        return viewer.refuse(uri.path());
    }
    let Some(replicator) = &state.replication else {
        let body = html! {
            h1 { "Replication" }
            p { "This region does not replicate (no " code { "--region" } " and " code { "--peer" } " configured)." }
        };
        return super::page(&viewer, "Replication", Nav::Replication, false, body);
    };
    let peers = match tokio::time::timeout(super::STORE_WAIT, replicator.status()).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return unavailable(&viewer, "the replication status", e),
        Err(_) => {
            return unavailable(
                &viewer,
                "the replication status",
                format!("no answer within {:?}", super::STORE_WAIT),
            );
        }
    };
    // Unknown when the store does not answer: neither state is claimed.
    let serving_off =
        match tokio::time::timeout(super::STORE_WAIT, replicator.serving_disabled()).await {
            Ok(Ok(off)) => Some(off),
            _ => None,
        };
    let control = viewer.may_control_region();
    let body = html! {
        h1 { "Replication" }
        p #serving {
            "Region " strong { (state.registry.region().unwrap_or("-")) } ": "
            @match serving_off {
                Some(true) => { span.bad { "serving OFF" } " (/readyz fails on every node, so load balancers and DNS send clients elsewhere)" }
                Some(false) => span.ok { "serving" },
                None => span.warn { "serving state unknown (the metadata store does not answer)" },
            }
            @if let (true, Some(off)) = (control, serving_off) {
                " "
                form.inline method="post" action="/ui/replication/serving" {
                    input type="hidden" name="csrf" value=(viewer.csrf);
                    input type="hidden" name="enabled" value=(if off { "true" } else { "false" });
                    @if off { button #serving-on type="submit" { "Turn serving on" } }
                    @else { button.danger #serving-off type="submit" { "Turn serving off" } }
                }
            }
        }
        @if peers.is_empty() {
            p.muted { "No peers: this region only serves its feed." }
        } @else {
            table #peers {
                thead { tr {
                    th { "Peer" } th.num { "Events behind" } th.num { "Seconds behind" } th.num { "Applied" }
                    th.num { "Bytes copied" } th.num { "Resyncs" } th { "Caught up" } th { "Last error" } th { "State" }
                    @if control { th { "Action" } }
                } }
                tbody {
                    @for p in &peers {
                        tr data-peer=(p.peer) {
                            td { strong { (p.peer) } br; span.mono.muted { (p.url) } }
                            td.num.events-behind { (p.events_behind) }
                            td.num { (format!("{:.1}", p.seconds_behind)) }
                            td.num { (p.applied) }
                            td.num { (bytes(p.bytes_copied)) }
                            td.num { (p.resyncs) }
                            td { (ago(p.caught_up_ms)) }
                            td {
                                @match &p.last_error {
                                    Some(e) if p.last_error_ms > p.caught_up_ms => { span.bad { (e) } br; span.muted { (ago(p.last_error_ms)) } }
                                    Some(e) => { span.muted { (e) " (" (ago(p.last_error_ms)) ", since recovered)" } }
                                    None => span.muted { "none" },
                                }
                            }
                            td.state { @if p.paused { span.warn { "paused" } } @else { span.ok { "running" } } }
                            @if control {
                                td {
                                    form.inline method="post" action=(format!("/ui/replication/peers/{}/{}", p.peer, if p.paused { "resume" } else { "pause" })) {
                                        input type="hidden" name="csrf" value=(viewer.csrf);
                                        @if p.paused { button.resume type="submit" { "Resume" } }
                                        @else { button.pause type="submit" { "Pause" } }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        @if !control {
            p.note #no-control {
                @if viewer.auth_enabled() { "Pausing peers and turning serving off need region administration." }
                @else { "On an open registry only a peer credential controls the region: use " code { "berth replication pause PEER" } " with the replication secret." }
            }
        }
    };
    super::page(&viewer, "Replication", Nav::Replication, true, body)
}

fn audit(state: &AppState, viewer: &Viewer, path: String, detail: String) {
    let mut event = viewer.audit_event(path, "admin", "admin");
    event.detail = detail;
    state.security.audit.record(event);
}

fn not_replicating(viewer: &Viewer) -> Response {
    error_page(
        viewer,
        StatusCode::NOT_FOUND,
        "Not found",
        "This region does not replicate.",
    )
}

pub async fn pause(
    State(state): State<AppState>,
    viewer: Viewer,
    headers: HeaderMap,
    Path((peer, action)): Path<(String, String)>,
    Form(form): Form<CsrfForm>,
) -> Response {
    let path = format!("/ui/replication/peers/{peer}/{action}");
    if !viewer.may_control_region() {
        return viewer.refuse(&path);
    }
    if let Some(refused) = viewer.forged(&headers, &form.csrf) {
        return refused;
    }
    let paused = match action.as_str() {
        "pause" => true,
        "resume" => false,
        _ => {
            return error_page(
                &viewer,
                StatusCode::NOT_FOUND,
                "Not found",
                "The action is pause or resume.",
            );
        }
    };
    let Some(replicator) = &state.replication else {
        return not_replicating(&viewer);
    };
    if !replicator.peers().any(|p| p == peer) {
        return error_page(
            &viewer,
            StatusCode::NOT_FOUND,
            "Not found",
            &format!("No peer is named {peer:?}."),
        );
    }
    if let Err(e) = replicator.set_paused(&peer, paused).await {
        return unavailable(&viewer, "the replication settings", e);
    }
    audit(
        &state,
        &viewer,
        path,
        format!("console: {action} replication from {peer}"),
    );
    Redirect::to("/ui/replication").into_response()
}

#[derive(serde::Deserialize)]
pub struct ServingForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    enabled: String,
}

pub async fn serving(
    State(state): State<AppState>,
    viewer: Viewer,
    headers: HeaderMap,
    Form(form): Form<ServingForm>,
) -> Response {
    if !viewer.may_control_region() {
        return viewer.refuse("/ui/replication/serving");
    }
    if let Some(refused) = viewer.forged(&headers, &form.csrf) {
        return refused;
    }
    let Some(enabled) = super::form_bool(&form.enabled) else {
        return error_page(
            &viewer,
            StatusCode::BAD_REQUEST,
            "Bad request",
            "enabled is true or false.",
        );
    };
    let Some(replicator) = &state.replication else {
        return not_replicating(&viewer);
    };
    if let Err(e) = replicator.set_serving(enabled).await {
        return unavailable(&viewer, "the region's serving switch", e);
    }
    audit(
        &state,
        &viewer,
        "/ui/replication/serving".into(),
        format!("console: serving {}", if enabled { "on" } else { "off" }),
    );
    Redirect::to("/ui/replication").into_response()
}
