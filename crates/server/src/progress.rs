//! Long operator jobs (garbage collection, scrub) answer with their
//! progress as JSON lines: one a second while they run, then `{"report":
//! ...}` or `{"error": ...}`, so that the command shows progress on a long
//! run and a load balancer's idle timeout does not cut it off. The job goes
//! on if the caller goes away: finishing is what the caller asked for.

use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{StatusCode, header};
use serde::Serialize;

/// How often a running job reports progress to its caller.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

fn line(value: &serde_json::Value) -> Bytes {
    let mut text = value.to_string();
    text.push('\n');
    Bytes::from(text)
}

/// Streams `task`'s progress (published on `watching`) and its outcome.
/// `what` names the job in an error line.
pub fn stream<T, E>(
    task: tokio::task::JoinHandle<Result<T, E>>,
    watching: tokio::sync::watch::Receiver<T>,
    what: &'static str,
) -> Response
where
    T: Serialize + Clone + Send + Sync + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let stream = futures_util::stream::unfold(
        (Some(task), watching),
        move |(task, mut watching)| async move {
            let mut task = task?;
            tokio::select! {
                finished = &mut task => {
                    let value = match finished {
                        Ok(Ok(report)) => serde_json::json!({ "report": report }),
                        Ok(Err(e)) => serde_json::json!({ "error": e.to_string() }),
                        Err(e) => serde_json::json!({ "error": format!("the {what} stopped: {e}") }),
                    };
                    Some((Ok::<_, std::io::Error>(line(&value)), (None, watching)))
                }
                _ = tokio::time::sleep(PROGRESS_EVERY) => {
                    let now = watching.borrow_and_update().clone();
                    Some((Ok(line(&serde_json::json!({ "progress": now }))), (Some(task), watching)))
                }
            }
        },
    );
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response()
}
