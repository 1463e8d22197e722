//! `berth token`: API tokens for machines (create, list, revoke) and the
//! token service's signing keys (list, rotate), through a running
//! registry's admin API.

use crate::admin::AdminError;
use crate::client::Api;

/// Parses `90d`, `12h`, `30m`, `3600s` (or a bare number of seconds).
pub fn parse_lifetime(s: &str) -> Result<u64, String> {
    let secs = match s.trim().parse::<u64>() {
        Ok(n) => n,
        Err(_) => humantime::parse_duration(s)
            .map_err(|e| format!("{s:?}: {e} (use e.g. 90d, 12h, 30m)"))?
            .as_secs(),
    };
    if secs == 0 {
        return Err("a token lifetime must be positive".into());
    }
    Ok(secs)
}

fn date(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

pub async fn create(
    api: &Api,
    name: &str,
    repositories: &[String],
    actions: &[String],
    expires_secs: Option<u64>,
) -> Result<bool, AdminError> {
    let body = serde_json::json!({
        "name": name,
        "repositories": repositories,
        "actions": actions,
        "expires_secs": expires_secs,
    });
    let created = api
        .json(reqwest::Method::POST, "/berth/v1/tokens", Some(&body), None)
        .await?;
    let secret = created["secret"].as_str().unwrap_or_default();
    eprintln!(
        "token {name}: {} on {}{}",
        created["actions"]
            .as_array()
            .map(|a| a
                .iter()
                .filter_map(|v| v.as_str())
                .collect::<Vec<_>>()
                .join(","))
            .unwrap_or_default(),
        repositories.join(", "),
        match created["expires_ms"].as_u64() {
            Some(ms) => format!(", expires {}", date(ms)),
            None => ", never expires (revoke with `berth token revoke`)".into(),
        }
    );
    eprintln!("the secret below is shown once; use it as the password (any user name):");
    println!("{secret}");
    Ok(true)
}

pub async fn list(api: &Api, json: bool) -> Result<bool, AdminError> {
    let body = api
        .json(reqwest::Method::GET, "/berth/v1/tokens", None, None)
        .await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&body).unwrap_or_default()
        );
        return Ok(true);
    }
    let tokens = body["tokens"].as_array().cloned().unwrap_or_default();
    println!(
        "{:<24} {:<20} {:<32} {:<20} {:<20} CREATED BY",
        "NAME", "ACTIONS", "REPOSITORIES", "CREATED", "EXPIRES"
    );
    let list = |v: &serde_json::Value| {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default()
    };
    for t in &tokens {
        println!(
            "{:<24} {:<20} {:<32} {:<20} {:<20} {}",
            t["name"].as_str().unwrap_or(""),
            list(&t["actions"]),
            list(&t["repositories"]),
            date(t["created_ms"].as_u64().unwrap_or(0)),
            match t["expires_ms"].as_u64() {
                Some(ms) if t["expired"].as_bool() == Some(true) => format!("EXPIRED {}", date(ms)),
                Some(ms) => date(ms),
                None => "never".into(),
            },
            t["created_by"].as_str().unwrap_or("")
        );
    }
    println!("{} tokens", tokens.len());
    Ok(true)
}

pub async fn revoke(api: &Api, name: &str) -> Result<bool, AdminError> {
    api.json(
        reqwest::Method::DELETE,
        &format!("/berth/v1/tokens/{}", berth_oci::query::encode(name)),
        None,
        None,
    )
    .await?;
    println!(
        "token {name} revoked; every node of the region refuses it within {} s",
        crate::security::TOKEN_REFRESH.as_secs()
    );
    Ok(true)
}

pub async fn keys(api: &Api) -> Result<bool, AdminError> {
    let body = api
        .json(reqwest::Method::GET, "/berth/v1/auth/keys", None, None)
        .await?;
    println!("{:<18} {:<22} SIGNING", "KEY ID", "CREATED");
    for k in body["keys"].as_array().cloned().unwrap_or_default() {
        println!(
            "{:<18} {:<22} {}",
            k["kid"].as_str().unwrap_or(""),
            date(k["created_ms"].as_u64().unwrap_or(0)),
            if k["signing"].as_bool() == Some(true) {
                "yes"
            } else {
                ""
            }
        );
    }
    Ok(true)
}

pub async fn rotate(api: &Api) -> Result<bool, AdminError> {
    let body = api
        .json(
            reqwest::Method::POST,
            "/berth/v1/auth/keys/rotate",
            None,
            None,
        )
        .await?;
    println!(
        "new signing key {}: it signs in {} ms, once every node knows it; older keys verify until their tokens expire",
        body["kid"].as_str().unwrap_or("?"),
        body["signs_after_ms"]
    );
    Ok(true)
}

#[cfg(test)]
mod tests {
    #[test]
    fn lifetimes() {
        assert_eq!(super::parse_lifetime("90d").unwrap(), 90 * 86_400);
        assert_eq!(super::parse_lifetime("12h").unwrap(), 43_200);
        assert_eq!(super::parse_lifetime("3600").unwrap(), 3600);
        assert!(super::parse_lifetime("0").is_err());
        assert!(super::parse_lifetime("soon").is_err());
    }
}
