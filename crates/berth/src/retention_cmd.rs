//! `berth retention plan` and `berth retention apply`: what the
//! `[[retention]]` rules of a running registry delete, through its HTTP API.

use crate::admin::AdminError;
use crate::client::Api;
use crate::tags_cmd::rfc3339;

/// Prints what the rules would delete today.
pub async fn plan(api: &Api, json: bool) -> Result<bool, AdminError> {
    let value = api
        .json(reqwest::Method::GET, "/berth/v1/retention/plan", None, None)
        .await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
        return Ok(true);
    }
    let tags = value["tags"].as_array().cloned().unwrap_or_default();
    let manifests = value["manifests"].as_array().cloned().unwrap_or_default();
    println!(
        "{} repositories under retention rules: {} tags and {} untagged manifests would be deleted (to the trash)",
        value["repositories"],
        tags.len(),
        manifests.len()
    );
    for t in &tags {
        println!(
            "  tag       {}:{}  pushed {}  ({})",
            t["repository"].as_str().unwrap_or_default(),
            t["tag"].as_str().unwrap_or_default(),
            rfc3339(t["pushed_ms"].as_u64().unwrap_or(0)),
            t["digest"].as_str().unwrap_or_default(),
        );
    }
    for m in &manifests {
        println!(
            "  manifest  {}@{}  created {}",
            m["repository"].as_str().unwrap_or_default(),
            m["digest"].as_str().unwrap_or_default(),
            rfc3339(m["created_ms"].as_u64().unwrap_or(0)),
        );
    }
    if let Some(n) = value["immutable_kept"].as_u64().filter(|n| *n > 0) {
        println!("  ({n} tags kept by immutable rules)");
    }
    Ok(true)
}

/// Applies the rules now.
pub async fn apply(api: &Api) -> Result<bool, AdminError> {
    let value = api
        .json(
            reqwest::Method::POST,
            "/berth/v1/retention/apply",
            None,
            None,
        )
        .await?;
    println!(
        "deleted {} tags and {} untagged manifests (to the trash); {} changed since planned and were left alone",
        value["tags_deleted"], value["manifests_deleted"], value["changed"]
    );
    Ok(true)
}
