//! `berth tags`: a tag's history and moving it back, through a running
//! registry's HTTP API.

use crate::admin::AdminError;
use crate::client::Api;

/// `REPO:TAG` into its parts (the repository may hold a registry port's
/// colon only before its first slash, which a repository name never has).
pub fn parse_image(image: &str) -> Result<(String, String), AdminError> {
    let slash = image.rfind('/').map_or(0, |i| i + 1);
    match image[slash..].rfind(':') {
        Some(i) => Ok((
            image[..slash + i].to_string(),
            image[slash + i + 1..].to_string(),
        )),
        None => Err(AdminError::Failed(format!(
            "{image:?}: expected REPOSITORY:TAG"
        ))),
    }
}

fn query(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", urlencode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub fn rfc3339(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Prints every digest the tag pointed to, oldest first.
pub async fn history(api: &Api, image: &str, json: bool) -> Result<bool, AdminError> {
    let (repository, tag) = parse_image(image)?;
    let path = format!(
        "/berth/v1/tags/history?{}",
        query(&[("repository", &repository), ("tag", &tag)])
    );
    let value = api.json(reqwest::Method::GET, &path, None, None).await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
        return Ok(true);
    }
    let current = value["current"].as_str().unwrap_or_default();
    println!(
        "{:<20}  {:<71}  {:<10}  BY",
        "WHEN (UTC)", "DIGEST", "REGION"
    );
    for entry in value["history"].as_array().into_iter().flatten() {
        let digest = entry["digest"].as_str().unwrap_or_default();
        let marker = if digest == current { " (current)" } else { "" };
        println!(
            "{:<20}  {:<71}  {:<10}  {}{marker}",
            rfc3339(entry["at_ms"].as_u64().unwrap_or(0)),
            digest,
            entry["region"]
                .as_str()
                .filter(|r| !r.is_empty())
                .unwrap_or("-"),
            entry["by"].as_str().unwrap_or("-"),
        );
    }
    if current.is_empty() {
        println!("{repository}:{tag} does not exist now");
    }
    Ok(true)
}

/// Points the tag back at `digest`.
pub async fn restore(api: &Api, image: &str, digest: &str) -> Result<bool, AdminError> {
    let (repository, tag) = parse_image(image)?;
    let path = format!(
        "/berth/v1/tags/restore?{}",
        query(&[
            ("repository", &repository),
            ("tag", &tag),
            ("digest", digest)
        ])
    );
    let value = api.json(reqwest::Method::POST, &path, None, None).await?;
    match value["previous"].as_str() {
        Some(previous) if previous == digest => {
            println!("{repository}:{tag} already points at {digest}")
        }
        Some(previous) => println!("{repository}:{tag} moved from {previous} back to {digest}"),
        None => println!("{repository}:{tag} restored to {digest}"),
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_and_dates() {
        assert_eq!(
            parse_image("team/app:v1").unwrap(),
            ("team/app".into(), "v1".into())
        );
        assert_eq!(
            parse_image("localhost:5000/app:v1").unwrap(),
            ("localhost:5000/app".into(), "v1".into())
        );
        assert!(parse_image("team/app").is_err());
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_796_000_000_000), "2026-11-30T00:53:20Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
    }
}
