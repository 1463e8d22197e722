//! Reading a long job's answer (garbage collection, scrub): JSON lines of
//! progress while it runs, then the report or an error (see the server's
//! `progress` module).

use futures_util::StreamExt;
use serde::de::DeserializeOwned;

use crate::admin::AdminError;
use crate::client::{Api, error_message};

fn failed(what: &str, e: impl std::fmt::Display) -> AdminError {
    AdminError::Failed(format!("{what}: {e}"))
}

/// POSTs `path` and follows the job: `progress` sees each progress line;
/// the report is returned. `job` names it in errors.
pub async fn follow<T: DeserializeOwned>(
    api: &Api,
    path: &str,
    job: &str,
    mut progress: impl FnMut(&T),
) -> Result<T, AdminError> {
    let what = format!("POST {}", api.url(path.split('?').next().unwrap_or(path)));
    let response = api
        .request(reqwest::Method::POST, path)
        .send()
        .await
        .map_err(|e| failed(&what, e))?;
    let status = response.status();
    if !status.is_success() {
        let bytes = response.bytes().await.unwrap_or_default();
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        return Err(AdminError::Failed(format!(
            "HTTP {status}: {}",
            error_message(&value, &bytes)
        )));
    }
    let mut body = response.bytes_stream();
    let mut pending = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| failed(&what, e))?;
        pending.extend_from_slice(&chunk);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let value: serde_json::Value =
                serde_json::from_slice(&line).map_err(|e| failed("the registry's answer", e))?;
            if let Some(error) = value.get("error") {
                return Err(AdminError::Failed(format!(
                    "{job} failed: {}",
                    error.as_str().unwrap_or_default()
                )));
            }
            if let Some(done) = value.get("report") {
                return serde_json::from_value::<T>(done.clone())
                    .map_err(|e| failed("the registry's report", e));
            }
            if let Some(p) = value.get("progress")
                && let Ok(p) = serde_json::from_value::<T>(p.clone())
            {
                progress(&p);
            }
        }
    }
    Err(AdminError::Failed(format!(
        "the registry closed the connection before the {job} finished (it goes on there; run again to see the result)"
    )))
}
