//! Writing a stream to a file: hashed and written in pipelined batches,
//! with the disk's writeback started as the bytes arrive.

use std::fs::File;
use std::io::{self, Write};

use bytes::Bytes;
use futures_util::StreamExt;

use super::ContentHash;
use crate::StoreError;
use crate::blob::{ByteStream, PutError};

/// Incoming frames are gathered up to this size for one pair of blocking
/// tasks; with one batch in flight and one filling, an upload holds about
/// 1 MiB.
pub(super) const WRITE_BATCH: usize = 512 * 1024;

/// Streams `body` into `file` (from its current position) through `hasher`,
/// pipelined: while one batch is hashed and written on blocking threads, the
/// next one is received. Hashing and writing a batch run on two threads at
/// once (the hash is the larger cost: SHA-256 runs at about 2 GB/s, the copy
/// into the page cache several times faster). Each batch is its own short
/// pair of blocking tasks, so a slow client never holds a blocking thread
/// while the registry waits for its bytes.
/// Stops with `TooLarge` once `already + received` exceeds `max_total`.
pub(super) async fn write_stream(
    file: File,
    hasher: Option<ContentHash>,
    mut body: ByteStream,
    already: u64,
    max_total: u64,
) -> Result<(File, Option<ContentHash>, u64), PutError> {
    type Hashed = tokio::task::JoinHandle<Option<ContentHash>>;
    type Written = tokio::task::JoinHandle<io::Result<File>>;
    fn write_batch(
        file: File,
        hasher: Option<ContentHash>,
        batch: Vec<Bytes>,
    ) -> (Written, Hashed) {
        let hashed = {
            let batch = batch.clone();
            tokio::task::spawn_blocking(move || {
                let mut hasher = hasher;
                if let Some(h) = hasher.as_mut() {
                    for chunk in &batch {
                        h.update(chunk);
                    }
                }
                hasher
            })
        };
        let written = tokio::task::spawn_blocking(move || {
            let mut file = file;
            for chunk in &batch {
                file.write_all(chunk)?;
            }
            start_writeback(&file);
            Ok(file)
        });
        (written, hashed)
    }
    /// The file is either free, or owned by the tasks writing a batch to it.
    // One per upload, on its task's stack: the hash state's size is no concern.
    #[allow(clippy::large_enum_variant)]
    enum Writer {
        Idle(File, Option<ContentHash>),
        Busy(Written, Hashed),
    }
    impl Writer {
        async fn ready(self) -> Result<(File, Option<ContentHash>), PutError> {
            match self {
                Writer::Idle(file, hasher) => Ok((file, hasher)),
                Writer::Busy(written, hashed) => {
                    // Both are awaited even if one failed: a batch's tasks
                    // must not outlive the upload that owns the file.
                    let (written, hashed) = tokio::join!(written, hashed);
                    let file = written.map_err(StoreError::from)?.map_err(StoreError::Io)?;
                    Ok((file, hashed.map_err(StoreError::from)?))
                }
            }
        }
    }

    let mut writer = Writer::Idle(file, hasher);
    let mut received: u64 = 0;
    let mut batch: Vec<Bytes> = Vec::new();
    let mut batch_len = 0usize;
    let mut failure: Option<PutError> = None;
    loop {
        let frame = match body.next().await {
            None => break,
            Some(Err(e)) => {
                failure = Some(PutError::Body(e));
                break;
            }
            Some(Ok(f)) => f,
        };
        received += frame.len() as u64;
        if already.saturating_add(received) > max_total {
            failure = Some(PutError::TooLarge { limit: max_total });
            break;
        }
        batch_len += frame.len();
        batch.push(frame);
        if batch_len >= WRITE_BATCH {
            let (file, hasher) = writer.ready().await?;
            let (written, hashed) = write_batch(file, hasher, std::mem::take(&mut batch));
            writer = Writer::Busy(written, hashed);
            batch_len = 0;
        }
    }
    let (file, hasher) = writer.ready().await?;
    if let Some(e) = failure {
        return Err(e);
    }
    let (file, hasher) = if batch.is_empty() {
        (file, hasher)
    } else {
        let (written, hashed) = write_batch(file, hasher, batch);
        Writer::Busy(written, hashed).ready().await?
    };
    Ok((file, hasher, received))
}

/// Starts writing the file's dirty pages to the disk now, without waiting.
/// Without it the kernel keeps an upload in the page cache and the `fsync`
/// before the answer writes all of it at once, after the last byte arrived
/// (for 64 MiB, about as long again as receiving it); this way the disk works
/// while the rest of the body arrives and that `fsync` finds little left.
/// Durability is still the `fsync`'s: this is a hint, and its failure is
/// harmless (the `fsync` reports any write error).
fn start_writeback(file: &File) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd as _;
        // SAFETY: the descriptor is open for as long as `file` is borrowed;
        // offset 0 and length 0 mean the whole file.
        unsafe {
            libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = file;
}
