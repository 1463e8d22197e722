//! Single-flight blob fills. The first request for a blob that is not cached
//! starts one upstream download; it is written to an unnamed spool file as it
//! arrives and, in the same pass, into the blob store, which verifies the
//! digest before anything becomes visible. Every client asking for the blob
//! meanwhile, the first included, reads the spool file behind the download.
//! The last byte is held back until the digest is verified, so a client never
//! completes a transfer of bad content: its connection fails instead.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use berth_oci::Digest;
use berth_store::ByteStream;
use bytes::{Bytes, BytesMut};
use tokio::sync::watch;

use crate::upstream::UpstreamError;

/// Bytes gathered before a spool write: readers follow in steps this size.
const SPOOL_STEP: usize = 256 * 1024;

/// Largest read from the spool at once. Small: in a storm every host reads
/// the spool at once, each holding one step (responses are paced, see
/// `berth_store::blob::pace`).
const READ_STEP: u64 = 64 * 1024;

#[derive(Clone, Debug)]
pub enum FillState {
    /// Waiting for the upstream's response.
    Connecting,
    /// Downloading; `total` from the upstream's Content-Length.
    Running { total: Option<u64> },
    /// Verified and stored.
    Done,
    /// Failed; nothing was stored.
    Failed(FillFailure),
}

#[derive(Clone, Debug)]
pub enum FillFailure {
    Upstream(UpstreamError),
    /// Larger than the registry's blob limit.
    TooLarge(u64),
    /// The registry's storage is unavailable for now (retryable).
    Unavailable(String),
    /// The blob store refused the content (digest mismatch, too large) or
    /// failed; the message says which.
    Store(String),
}

#[derive(Clone, Debug)]
pub struct Progress {
    pub state: FillState,
    /// Bytes readable from the spool file.
    pub written: u64,
}

/// One download in progress.
pub struct Fill {
    spool: Arc<std::fs::File>,
    progress: watch::Sender<Progress>,
}

impl Fill {
    pub fn subscribe(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }

    pub fn is_finished(&self) -> bool {
        matches!(
            self.progress.borrow().state,
            FillState::Done | FillState::Failed(_)
        )
    }

    pub fn set_state(&self, state: FillState) {
        self.progress.send_modify(|p| p.state = state);
    }

    /// Wraps the upstream body so that each chunk is also appended to the
    /// spool (in steps) and announced to readers. Chunks pass on unchanged.
    pub fn tee(self: &Arc<Self>, body: ByteStream) -> ByteStream {
        struct Tee {
            fill: Arc<Fill>,
            body: ByteStream,
            pending: BytesMut,
            offset: u64,
            ended: bool,
        }
        let tee = Tee {
            fill: self.clone(),
            body,
            pending: BytesMut::new(),
            offset: 0,
            ended: false,
        };
        Box::pin(futures_util::stream::unfold(tee, |mut tee| async move {
            use futures_util::StreamExt;
            if tee.ended {
                return None;
            }
            let item = tee.body.next().await;
            let flush = match &item {
                Some(Ok(chunk)) => {
                    tee.pending.extend_from_slice(chunk);
                    tee.pending.len() >= SPOOL_STEP
                }
                Some(Err(_)) => false,
                None => true,
            };
            if flush && !tee.pending.is_empty() {
                let data = tee.pending.split().freeze();
                let len = data.len() as u64;
                let file = tee.fill.spool.clone();
                let offset = tee.offset;
                let written =
                    tokio::task::spawn_blocking(move || file.write_all_at(&data, offset)).await;
                match written {
                    Ok(Ok(())) => {
                        tee.offset += len;
                        let end = tee.offset;
                        tee.fill.progress.send_modify(|p| p.written = end);
                    }
                    Ok(Err(e)) => {
                        tee.ended = true;
                        return Some((Err(e), tee));
                    }
                    Err(e) => {
                        tee.ended = true;
                        return Some((Err(std::io::Error::other(e)), tee));
                    }
                }
            }
            item.map(|item| (item, tee))
        }))
    }

    /// The blob as the spool holds it, following the download. Ends with an
    /// error if the fill fails, before the last byte.
    pub fn reader(self: &Arc<Self>) -> ByteStream {
        struct Reader {
            fill: Arc<Fill>,
            progress: watch::Receiver<Progress>,
            position: u64,
        }
        let reader = Reader {
            progress: self.subscribe(),
            fill: self.clone(),
            position: 0,
        };
        Box::pin(futures_util::stream::unfold(
            Some(reader),
            |reader| async move {
                let mut reader = reader?;
                loop {
                    let progress = reader.progress.borrow_and_update().clone();
                    let readable = match &progress.state {
                        FillState::Failed(failure) => {
                            let message = match failure {
                                FillFailure::Upstream(e) => e.to_string(),
                                FillFailure::TooLarge(limit) => {
                                    format!("larger than the limit of {limit} bytes")
                                }
                                FillFailure::Unavailable(m) | FillFailure::Store(m) => m.clone(),
                            };
                            return Some((
                                Err(std::io::Error::other(format!(
                                    "blob transfer from upstream failed: {message}"
                                ))),
                                None,
                            ));
                        }
                        FillState::Done => progress.written,
                        // The last byte waits for the digest check.
                        _ => progress.written.saturating_sub(1),
                    };
                    if reader.position < readable {
                        let len = (readable - reader.position).min(READ_STEP) as usize;
                        let file = reader.fill.spool.clone();
                        let offset = reader.position;
                        let read = tokio::task::spawn_blocking(move || {
                            let mut buf = vec![0u8; len];
                            file.read_exact_at(&mut buf, offset).map(|()| buf)
                        })
                        .await
                        .map_err(std::io::Error::other)
                        .and_then(|r| r);
                        return match read {
                            Ok(buf) => {
                                reader.position += len as u64;
                                Some((Ok(Bytes::from(buf)), Some(reader)))
                            }
                            Err(e) => Some((Err(e), None)),
                        };
                    }
                    if matches!(progress.state, FillState::Done) {
                        return None;
                    }
                    if reader.progress.changed().await.is_err() {
                        return Some((
                            Err(std::io::Error::other(
                                "blob transfer from upstream was abandoned",
                            )),
                            None,
                        ));
                    }
                }
            },
        ))
    }

    /// Waits until the download has a response (or failed).
    pub async fn started(&self) -> Progress {
        let mut rx = self.subscribe();
        loop {
            let progress = rx.borrow_and_update().clone();
            if !matches!(progress.state, FillState::Connecting) {
                return progress;
            }
            if rx.changed().await.is_err() {
                return progress;
            }
        }
    }

    /// Waits until the download ended, stored or failed.
    pub async fn finished(&self) -> Progress {
        let mut rx = self.subscribe();
        loop {
            let progress = rx.borrow_and_update().clone();
            if matches!(progress.state, FillState::Done | FillState::Failed(_)) {
                return progress;
            }
            if rx.changed().await.is_err() {
                return progress;
            }
        }
    }
}

/// What a download is of: a blob of one repository. Requests for the same
/// digest from another repository do not follow it: each repository's
/// right to the content is its upstream's to confirm (a follower would
/// read, and then link, a blob it may have no right to).
pub type FillKey = (String, Digest);

/// The downloads in progress on this node, by repository and digest.
pub struct Fills {
    spool_dir: PathBuf,
    running: Mutex<HashMap<FillKey, Arc<Fill>>>,
}

pub enum Joined {
    /// Nobody was fetching it: the caller must run the download.
    Leader(Arc<Fill>),
    Follower(Arc<Fill>),
}

impl Fills {
    pub fn new(spool_dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&spool_dir)?;
        Ok(Self {
            spool_dir,
            running: Mutex::new(HashMap::new()),
        })
    }

    /// Joins the download of `key`, or starts one.
    pub fn join(&self, key: &FillKey) -> std::io::Result<Joined> {
        let mut running = self
            .running
            .lock()
            .map_err(|_| std::io::Error::other("fill registry poisoned"))?;
        if let Some(fill) = running.get(key) {
            return Ok(Joined::Follower(fill.clone()));
        }
        // Unnamed (O_TMPFILE): gone with the last reader, or with a crash.
        let spool = tempfile::tempfile_in(&self.spool_dir)?;
        let (progress, _) = watch::channel(Progress {
            state: FillState::Connecting,
            written: 0,
        });
        let fill = Arc::new(Fill {
            spool: Arc::new(spool),
            progress,
        });
        running.insert(key.clone(), fill.clone());
        Ok(Joined::Leader(fill))
    }

    /// Ends a download: later requests start afresh (or find the blob
    /// stored). Readers already following it keep their spool.
    pub fn finish(&self, key: &FillKey) {
        if let Ok(mut running) = self.running.lock() {
            running.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    async fn collect(mut s: ByteStream) -> Result<Vec<u8>, std::io::Error> {
        let mut out = Vec::new();
        while let Some(chunk) = s.next().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    }

    fn body(data: Vec<u8>) -> ByteStream {
        let chunks: Vec<Result<Bytes, std::io::Error>> = data
            .chunks(100_000)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        Box::pin(futures_util::stream::iter(chunks))
    }

    #[tokio::test]
    async fn readers_get_every_byte_only_after_success() {
        let dir = tempfile::tempdir().unwrap();
        let fills = Fills::new(dir.path().to_path_buf()).unwrap();
        let key = ("docker.io/a".to_string(), Digest::sha256_of(b"x"));
        let Joined::Leader(fill) = fills.join(&key).unwrap() else {
            panic!("first join must lead")
        };
        assert!(matches!(fills.join(&key).unwrap(), Joined::Follower(_)));
        // The same digest for another repository is a download of its own.
        let other = ("docker.io/b".to_string(), key.1.clone());
        assert!(matches!(fills.join(&other).unwrap(), Joined::Leader(_)));
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        fill.set_state(FillState::Running {
            total: Some(data.len() as u64),
        });
        let early = fill.reader();
        let consumed = collect(fill.tee(body(data.clone()))).await.unwrap();
        assert_eq!(consumed, data);
        let late = fill.reader();
        // Not yet verified: readers must not finish.
        let pending = tokio::spawn(collect(early));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!pending.is_finished());
        fill.set_state(FillState::Done);
        assert_eq!(pending.await.unwrap().unwrap(), data);
        assert_eq!(collect(late).await.unwrap(), data);
        fills.finish(&key);
        assert!(matches!(fills.join(&key).unwrap(), Joined::Leader(_)));
    }

    #[tokio::test]
    async fn a_failed_fill_fails_its_readers_before_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let fills = Fills::new(dir.path().to_path_buf()).unwrap();
        let Joined::Leader(fill) = fills
            .join(&("docker.io/a".to_string(), Digest::sha256_of(b"y")))
            .unwrap()
        else {
            panic!("first join must lead")
        };
        let data = vec![7u8; 600_000];
        fill.set_state(FillState::Running { total: None });
        let reader = fill.reader();
        collect(fill.tee(body(data.clone()))).await.unwrap();
        fill.set_state(FillState::Failed(FillFailure::Store(
            "digest mismatch".into(),
        )));
        let mut reader = reader;
        let mut got = 0usize;
        let mut failed = false;
        while let Some(chunk) = reader.next().await {
            match chunk {
                Ok(c) => got += c.len(),
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        assert!(failed, "the reader must end in an error");
        assert!(got < data.len(), "the last byte must be held back");
    }
}
