//! `berth trash ls` and `berth undelete`: what clients deleted and is still
//! kept, and bringing it back, through a running registry's HTTP API.

use crate::admin::AdminError;
use crate::client::Api;
use crate::tags_cmd::{rfc3339, urlencode};

/// `REPO@DIGEST` or `REPO:TAG` into the repository and the reference.
fn parse_reference(image: &str) -> Result<(String, String), AdminError> {
    if let Some((repository, digest)) = image.split_once('@') {
        return Ok((repository.to_string(), digest.to_string()));
    }
    crate::tags_cmd::parse_image(image).map_err(|_| {
        AdminError::Failed(format!(
            "{image:?}: expected REPOSITORY:TAG or REPOSITORY@DIGEST"
        ))
    })
}

pub async fn list(api: &Api, repository: Option<&str>, json: bool) -> Result<bool, AdminError> {
    let path = match repository {
        Some(r) => format!("/berth/v1/trash?repository={}", urlencode(r)),
        None => "/berth/v1/trash".to_string(),
    };
    let value = api.json(reqwest::Method::GET, &path, None, None).await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
        return Ok(true);
    }
    let entries = value["trash"].as_array().cloned().unwrap_or_default();
    if entries.is_empty() {
        println!("the trash is empty");
        return Ok(true);
    }
    println!(
        "{:<20}  {:<20}  {:<40}  {:<16}  DELETED BY",
        "DELETED (UTC)", "EXPIRES (UTC)", "WHAT", "TAGS"
    );
    for e in entries {
        let repository = e["repository"].as_str().unwrap_or_default();
        let digest = e["digest"].as_str().unwrap_or_default();
        let what = match e["tag"].as_str() {
            Some(tag) => format!("{repository}:{tag} ({})", short(digest)),
            None => format!("{repository}@{}", short(digest)),
        };
        let tags: Vec<&str> = e["tags"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t.as_str())
            .collect();
        println!(
            "{:<20}  {:<20}  {:<40}  {:<16}  {}",
            rfc3339(e["deleted_ms"].as_u64().unwrap_or(0)),
            rfc3339(e["expires_ms"].as_u64().unwrap_or(0)),
            what,
            if tags.is_empty() {
                "-".to_string()
            } else {
                tags.join(",")
            },
            e["by"].as_str().unwrap_or("-"),
        );
    }
    Ok(true)
}

/// `sha256:0123456789ab…`
fn short(digest: &str) -> String {
    match digest.split_once(':') {
        Some((alg, hex)) if hex.len() > 12 => format!("{alg}:{}…", &hex[..12]),
        _ => digest.to_string(),
    }
}

pub async fn undelete(api: &Api, image: &str) -> Result<bool, AdminError> {
    let (repository, reference) = parse_reference(image)?;
    let path = format!(
        "/berth/v1/undelete?repository={}&reference={}",
        urlencode(&repository),
        urlencode(&reference)
    );
    let value = api.json(reqwest::Method::POST, &path, None, None).await?;
    let digest = value["digest"].as_str().unwrap_or_default();
    let tags: Vec<&str> = value["tags"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t.as_str())
        .collect();
    println!(
        "{repository}@{digest} is back{}",
        if tags.is_empty() {
            String::new()
        } else {
            format!(", tagged {}", tags.join(", "))
        }
    );
    for skipped in value["skipped"].as_array().into_iter().flatten() {
        println!(
            "  {repository}:{} points elsewhere now and was left alone (berth tags restore moves it)",
            skipped.as_str().unwrap_or_default()
        );
    }
    Ok(true)
}
