//! Reading objects: a download as one streamed, resumable GET; an upload's
//! parts read back in windows; and the digest check that withholds a
//! stream's last chunk until the whole matched.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use berth_oci::{Digest, Hasher};
use bytes::Bytes;
use futures_util::StreamExt;
use object_store::aws::AmazonS3;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

use super::is_not_found;
use crate::blob::ByteStream;

/// Bytes fetched per read request when an upload's parts are read back to
/// be joined. One window is prefetched while the previous one is written.
const READ_WINDOW: u64 = 4 * 1024 * 1024;
/// Attempts for one read window, or failures in a row of one download.
const READ_ATTEMPTS: usize = 3;

/// A download: one GET for the whole range, its body passed on as it
/// arrives (so a download holds what the socket delivered, not windows of
/// megabytes; with pull storms of hundreds of downloads, windows cost
/// gigabytes, and smaller windows cost the storage a request each). A body
/// that breaks off is resumed from where it stopped, with a range GET that
/// must match the same object (`If-Match` its ETag), up to `READ_ATTEMPTS`
/// times in a row.
pub(super) fn streamed(
    store: Arc<AmazonS3>,
    key: Path,
    range: Range<u64>,
    e_tag: Option<String>,
) -> ByteStream {
    struct State {
        store: Arc<AmazonS3>,
        key: Path,
        pos: u64,
        end: u64,
        e_tag: Option<String>,
        body: Option<futures_util::stream::BoxStream<'static, object_store::Result<Bytes>>>,
        failures: usize,
    }
    let state = State {
        store,
        key,
        pos: range.start,
        end: range.end,
        e_tag,
        body: None,
        failures: 0,
    };
    Box::pin(futures_util::stream::try_unfold(
        state,
        |mut state| async move {
            loop {
                if state.pos >= state.end {
                    return Ok(None);
                }
                if state.failures > 0 {
                    if state.failures >= READ_ATTEMPTS {
                        return Err(std::io::Error::other(format!(
                            "reading {} failed {} times in a row",
                            state.key, state.failures
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(50 << state.failures)).await;
                }
                let Some(body) = state.body.as_mut() else {
                    let options = object_store::GetOptions {
                        range: Some(object_store::GetRange::Bounded(state.pos..state.end)),
                        if_match: state.e_tag.clone(),
                        ..Default::default()
                    };
                    match state.store.get_opts(&state.key, options).await {
                        Ok(result) => state.body = Some(result.into_stream()),
                        Err(e) if is_not_found(&e) => {
                            return Err(std::io::Error::new(std::io::ErrorKind::NotFound, e));
                        }
                        // Replaced since the download began: its rest would be
                        // another object's bytes.
                        Err(e @ object_store::Error::Precondition { .. }) => {
                            return Err(std::io::Error::other(e));
                        }
                        Err(e) => {
                            tracing::debug!(key = %state.key, error = %e, "blob read failed; retrying");
                            state.failures += 1;
                        }
                    }
                    continue;
                };
                match body.next().await {
                    Some(Ok(chunk)) => {
                        let left = state.end - state.pos;
                        let chunk = if chunk.len() as u64 > left {
                            chunk.slice(..left as usize)
                        } else {
                            chunk
                        };
                        if chunk.is_empty() {
                            continue;
                        }
                        state.pos += chunk.len() as u64;
                        state.failures = 0;
                        return Ok(Some((chunk, state)));
                    }
                    Some(Err(e)) => {
                        tracing::debug!(key = %state.key, error = %e, "blob read broke off; resuming");
                        state.body = None;
                        state.failures += 1;
                    }
                    // Ended short of the range: ask again for the rest.
                    None => {
                        state.body = None;
                        state.failures += 1;
                    }
                }
            }
        },
    ))
}

/// A whole object or a range of it as a stream of windows, each window one
/// bounded, retried request, the next one prefetched.
pub(super) fn windowed(store: Arc<AmazonS3>, key: Path, range: Range<u64>) -> ByteStream {
    let windows: Vec<Range<u64>> = (range.start..range.end)
        .step_by(READ_WINDOW as usize)
        .map(|start| start..(start + READ_WINDOW).min(range.end))
        .collect();
    Box::pin(
        futures_util::stream::iter(windows)
            .map(move |window| {
                let store = store.clone();
                let key = key.clone();
                async move { fetch_window(&store, &key, window).await }
            })
            .buffered(2),
    )
}

async fn fetch_window(
    store: &AmazonS3,
    key: &Path,
    window: Range<u64>,
) -> Result<Bytes, std::io::Error> {
    let mut last = None;
    for attempt in 0..READ_ATTEMPTS {
        match store.get_range(key, window.clone()).await {
            Ok(bytes) if bytes.len() as u64 == window.end - window.start => return Ok(bytes),
            Ok(bytes) => {
                last = Some(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "object storage returned {} bytes of a {}-byte window",
                        bytes.len(),
                        window.end - window.start
                    ),
                ));
            }
            Err(e) if is_not_found(&e) => {
                return Err(std::io::Error::new(std::io::ErrorKind::NotFound, e));
            }
            Err(e) => last = Some(std::io::Error::other(e)),
        }
        tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("read failed")))
}

/// Passes a stream through, withholding its last chunk until the whole has
/// hashed to `digest`: a client never receives a complete corrupt blob.
pub(super) fn verified(
    stream: ByteStream,
    digest: Digest,
    on_match: Box<dyn FnOnce() + Send>,
) -> ByteStream {
    struct State {
        inner: ByteStream,
        hasher: Option<Hasher>,
        pending: Option<Bytes>,
        digest: Digest,
        on_match: Option<Box<dyn FnOnce() + Send>>,
    }
    let state = State {
        inner: stream,
        hasher: Some(digest.algorithm().hasher()),
        pending: None,
        digest,
        on_match: Some(on_match),
    };
    Box::pin(futures_util::stream::try_unfold(
        state,
        |mut state| async move {
            loop {
                match state.inner.next().await {
                    Some(Ok(chunk)) => {
                        if let Some(h) = state.hasher.as_mut() {
                            h.update(&chunk);
                        }
                        if let Some(previous) = state.pending.replace(chunk) {
                            return Ok(Some((previous, state)));
                        }
                    }
                    Some(Err(e)) => return Err(e),
                    None => {
                        let Some(last) = state.pending.take() else {
                            return Ok(None);
                        };
                        if let Some(h) = state.hasher.take()
                            && h.finish() != state.digest
                        {
                            tracing::error!(digest = %state.digest, "stored blob is corrupt; refusing to serve it");
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::InvalidData,
                                format!("stored blob {} is corrupt", state.digest),
                            ));
                        }
                        if let Some(on_match) = state.on_match.take() {
                            on_match();
                        }
                        return Ok(Some((last, state)));
                    }
                }
            }
        },
    ))
}
