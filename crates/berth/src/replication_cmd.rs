//! `berth replication`: a region's replication status, pausing a peer, and
//! turning serving off and on for failover drills, through the running
//! registry's HTTP API. With authentication these need an administrator;
//! on an open registry, pausing and serving need the replication secret.

use crate::admin::AdminError;
use crate::client::Api;

/// Prints each peer's state. Exits 1 if a peer has an error or serving is
/// off.
pub async fn status(api: &Api, json: bool) -> Result<bool, AdminError> {
    let body = api
        .json(
            reqwest::Method::GET,
            "/berth/v1/replication/status",
            None,
            None,
        )
        .await?;
    let state = api
        .json(
            reqwest::Method::GET,
            "/berth/v1/replication/state",
            None,
            None,
        )
        .await?;
    if json {
        let both = serde_json::json!({ "status": body, "state": state });
        println!(
            "{}",
            serde_json::to_string_pretty(&both).unwrap_or_default()
        );
        return Ok(true);
    }
    let serving = body["serving"].as_bool().unwrap_or(true);
    println!(
        "region {}: serving {}; state {} ({} tags, {} manifests, {} blobs)",
        body["region"].as_str().unwrap_or("?"),
        if serving { "on" } else { "OFF" },
        &state["digest"].as_str().unwrap_or("?")
            [..16.min(state["digest"].as_str().unwrap_or("?").len())],
        state["tags"],
        state["manifests"],
        state["blobs"],
    );
    println!(
        "{:<12} {:>10} {:>10} {:>8} {:>9} {:>14} {:<7} LAST ERROR",
        "PEER", "CURSOR", "HEAD", "BEHIND", "SECONDS", "BYTES COPIED", "PAUSED"
    );
    let mut healthy = serving;
    for peer in body["peers"].as_array().cloned().unwrap_or_default() {
        let error = peer["last_error"].as_str().unwrap_or("-");
        if error != "-" {
            healthy = false;
        }
        println!(
            "{:<12} {:>10} {:>10} {:>8} {:>9.1} {:>14} {:<7} {}",
            peer["peer"].as_str().unwrap_or("?"),
            peer["cursor"],
            peer["head"],
            peer["events_behind"],
            peer["seconds_behind"].as_f64().unwrap_or(0.0),
            peer["bytes_copied"],
            if peer["paused"].as_bool() == Some(true) {
                "yes"
            } else {
                "no"
            },
            error
        );
    }
    Ok(healthy)
}

pub async fn pause(
    api: &Api,
    secret: Option<&str>,
    peer: &str,
    paused: bool,
) -> Result<bool, AdminError> {
    let action = if paused { "pause" } else { "resume" };
    api.json(
        reqwest::Method::POST,
        &format!(
            "/berth/v1/replication/peers/{}/{action}",
            berth_oci::query::encode(peer)
        ),
        None,
        secret,
    )
    .await?;
    println!(
        "replication from {peer}: {}",
        if paused { "paused" } else { "resumed" }
    );
    Ok(true)
}

pub async fn serving(api: &Api, secret: Option<&str>, enabled: bool) -> Result<bool, AdminError> {
    api.json(
        reqwest::Method::POST,
        &format!("/berth/v1/region/serving?enabled={enabled}"),
        None,
        secret,
    )
    .await?;
    println!(
        "serving {}: /readyz {}",
        if enabled { "on" } else { "off" },
        if enabled {
            "passes again"
        } else {
            "fails on every node of this region"
        }
    );
    Ok(true)
}
