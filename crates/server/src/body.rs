//! Request bodies: blob content streamed in with an idle timeout, small
//! bodies read within a bound, and bodies left unread (a refusal, a size
//! limit) drained in the background so the client still reads the answer.

use std::time::Duration;

use axum::body::Body;
use berth_oci::ErrorCode;
use berth_store::ByteStream;
use futures_util::StreamExt;

use crate::AppState;
use crate::error::ApiError;

/// How much of an abandoned request body is read and discarded, so that a
/// client still sending can read the error response instead of a reset.
const DRAIN_CAP: u64 = 16 * 1024 * 1024;

/// Blob content from the client: counted, and abandoned if the client stops
/// sending for longer than the idle timeout (a stalled upload must not hold
/// its slot and its file forever).
pub fn body_stream(state: &AppState, body: Body) -> ByteStream {
    let idle = state.limits.body_idle_timeout;
    let counter = state.metrics.bytes_in.clone();
    Box::pin(futures_util::stream::unfold(
        Some(body.into_data_stream()),
        move |frames| {
            let counter = counter.clone();
            async move {
                let mut frames = frames?;
                match tokio::time::timeout(idle, frames.next()).await {
                    Ok(Some(Ok(chunk))) => {
                        counter.inc_by(chunk.len() as u64);
                        Some((Ok(chunk), Some(frames)))
                    }
                    Ok(Some(Err(e))) => Some((Err(std::io::Error::other(e)), None)),
                    Ok(None) => None,
                    Err(_) => Some((
                        Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("client sent nothing for {}s", idle.as_secs()),
                        )),
                        None,
                    )),
                }
            }
        },
    ))
}

/// A request body that may be dropped before its end (a size limit, a digest
/// or storage error). The client is then still sending: if nobody reads, it
/// fails with a broken pipe and never sees the error response. So a dropped
/// body is drained in the background, up to a cap and the idle timeout.
pub struct UnreadBody {
    frames: Option<axum::body::BodyDataStream>,
    idle: std::time::Duration,
}

impl UnreadBody {
    pub fn new(body: Body, idle: Duration) -> UnreadBody {
        UnreadBody {
            frames: Some(body.into_data_stream()),
            idle,
        }
    }
}

/// Reads and discards what is left of a body the answer does not need, in
/// the background, up to [`DRAIN_CAP`] and the idle timeout.
pub fn drain(body: Body, idle: Duration) {
    drop(UnreadBody::new(body, idle));
}

impl futures_util::Stream for UnreadBody {
    type Item = Result<bytes::Bytes, axum::Error>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let Some(frames) = self.frames.as_mut() else {
            return std::task::Poll::Ready(None);
        };
        let next = std::pin::Pin::new(frames).poll_next(cx);
        if matches!(next, std::task::Poll::Ready(None)) {
            self.frames = None; // fully read: nothing to drain
        }
        next
    }
}

impl Drop for UnreadBody {
    fn drop(&mut self) {
        let (Some(mut frames), Ok(runtime)) =
            (self.frames.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let idle = self.idle;
        runtime.spawn(async move {
            let mut seen = 0u64;
            while seen <= DRAIN_CAP {
                match tokio::time::timeout(idle, frames.next()).await {
                    Ok(Some(Ok(chunk))) => seen += chunk.len() as u64,
                    _ => break,
                }
            }
        });
    }
}

/// Reads a body of at most `limit` bytes. `None` if it is longer (dropping
/// the rest, which `UnreadBody` drains). Counted in the request-bytes metric;
/// a client idle for the body idle timeout fails it.
pub async fn read_bounded(
    state: &AppState,
    body: Body,
    limit: u64,
) -> Result<Option<bytes::Bytes>, ApiError> {
    let idle = state.limits.body_idle_timeout;
    let mut stream = body.into_data_stream();
    let mut buf = bytes::BytesMut::new();
    loop {
        let next = tokio::time::timeout(idle, stream.next())
            .await
            .map_err(|_| {
                ApiError::new(ErrorCode::ManifestInvalid)
                    .message(format!("client sent nothing for {}s", idle.as_secs()))
            })?;
        let Some(chunk) = next else {
            return Ok(Some(buf.freeze()));
        };
        let chunk = chunk.map_err(|e| {
            ApiError::new(ErrorCode::ManifestInvalid)
                .message(format!("reading the request body failed: {e}"))
        })?;
        state.metrics.bytes_in.inc_by(chunk.len() as u64);
        if (buf.len() + chunk.len()) as u64 > limit {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk);
    }
}
