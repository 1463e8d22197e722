//! One chunk in flight per HTTP response. hyper asks a body for its next chunk
//! while earlier ones still wait in its write queue (up to about 400 KiB or
//! 16 chunks per connection), so a body that produces on demand would have
//! several chunks alive per download; with hundreds of slow downloads at once
//! (a pull storm) that is hundreds of megabytes. A paced stream makes its
//! next chunk only once the connection let go of the last one (wrote it to
//! the socket), so a download holds one chunk, whatever the client's speed.
//!
//! Only for a consumer that lets go of each chunk in time (an HTTP response
//! body): one that keeps chunks (collects a whole stream) would wait forever
//! for its own chunk to be dropped.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::ByteStream;

/// A chunk and its stream's slot, released when the chunk is dropped.
struct Held {
    bytes: Bytes,
    _slot: OwnedSemaphorePermit,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

/// Ties `bytes` to `slot`: the slot is free again when the last clone of the
/// returned `Bytes` is dropped.
fn held(bytes: Bytes, slot: OwnedSemaphorePermit) -> Bytes {
    Bytes::from_owner(Held { bytes, _slot: slot })
}

/// `stream`, pulled for its next chunk only after the previous one was
/// dropped by whoever consumes the stream.
pub fn one_in_flight<E>(
    stream: impl futures_util::Stream<Item = Result<Bytes, E>> + Send + 'static,
) -> ByteStream
where
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = stream.map(|item| item.map_err(std::io::Error::other));
    let stream: ByteStream = Box::pin(stream);
    let slot = Arc::new(Semaphore::new(1));
    Box::pin(futures_util::stream::unfold(
        (stream, slot),
        |(mut stream, slot)| async move {
            let permit = match slot.clone().acquire_owned().await {
                Ok(permit) => permit,
                Err(e) => return Some((Err(std::io::Error::other(e)), (stream, slot))),
            };
            let item = stream.next().await?;
            Some((item.map(|bytes| held(bytes, permit)), (stream, slot)))
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_next_chunk_waits_until_the_last_is_dropped() {
        let chunks = (0..3u8).map(|i| Ok::<_, std::io::Error>(Bytes::from(vec![i; 4])));
        let mut paced = one_in_flight(futures_util::stream::iter(chunks));
        let first = paced.next().await.unwrap().unwrap();
        let next = tokio::time::timeout(std::time::Duration::from_millis(50), paced.next()).await;
        assert!(next.is_err(), "a second chunk while the first is alive");
        drop(first);
        let second = paced.next().await.unwrap().unwrap();
        assert_eq!(&second[..], &[1u8; 4]);
        drop(second);
        assert_eq!(&paced.next().await.unwrap().unwrap()[..], &[2u8; 4]);
        assert!(paced.next().await.is_none());
    }
}
