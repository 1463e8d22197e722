//! `berth replication`: a region's replication status, pausing a peer, and
//! turning serving off and on for failover drills, through the running
//! registry's HTTP API.

use std::time::Duration;

use crate::admin::AdminError;

async fn call(
    method: reqwest::Method,
    url: &str,
    secret: Option<&str>,
) -> Result<serde_json::Value, AdminError> {
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| AdminError::Failed(format!("HTTP client: {e}")))?;
    let mut request = client.request(method.clone(), url);
    if let Some(secret) = secret {
        request = request.bearer_auth(secret);
    }
    let response = request
        .send()
        .await
        .map_err(|e| AdminError::Failed(format!("{method} {url}: {e}")))?;
    let status = response.status();
    let bytes = response
        .bytes()
        .await
        .map_err(|e| AdminError::Failed(format!("{method} {url}: {e}")))?;
    let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    if !status.is_success() {
        let message = body["errors"][0]["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
        return Err(AdminError::Failed(format!("HTTP {status}: {message}")));
    }
    Ok(body)
}

/// Prints each peer's state. Exits 1 if a peer has an error or serving is
/// off.
pub async fn status(base: &str, json: bool) -> Result<bool, AdminError> {
    let base = base.trim_end_matches('/');
    let body = call(
        reqwest::Method::GET,
        &format!("{base}/berth/v1/replication/status"),
        None,
    )
    .await?;
    let state = call(
        reqwest::Method::GET,
        &format!("{base}/berth/v1/replication/state"),
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
    base: &str,
    secret: Option<&str>,
    peer: &str,
    paused: bool,
) -> Result<bool, AdminError> {
    let action = if paused { "pause" } else { "resume" };
    call(
        reqwest::Method::POST,
        &format!(
            "{}/berth/v1/replication/peers/{peer}/{action}",
            base.trim_end_matches('/')
        ),
        secret,
    )
    .await?;
    println!(
        "replication from {peer}: {}",
        if paused { "paused" } else { "resumed" }
    );
    Ok(true)
}

pub async fn serving(base: &str, secret: Option<&str>, enabled: bool) -> Result<bool, AdminError> {
    call(
        reqwest::Method::POST,
        &format!(
            "{}/berth/v1/region/serving?enabled={enabled}",
            base.trim_end_matches('/')
        ),
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
