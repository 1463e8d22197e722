//! The embedded blob engine: files under a data directory.
//!
//! Layout: `blobs/<alg>/<2 hex>/<encoded>` for committed blobs, `uploads/<id>`
//! for upload sessions and `tmp/` for monolithic writes in flight. A blob
//! reaches its final path only by `rename` after its bytes were fsynced and
//! verified, and the directory is fsynced after the rename, so a crash at any
//! point leaves either the whole verified blob or nothing under `blobs/`.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use berth_oci::{Algorithm, ByteRange, Digest, Hasher};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::{BlobRead, BlobStore, ByteStream, PutError};
use crate::StoreError;

/// Size of the file windows that feed a response. They are mapped, not
/// copied, so size costs no heap; each window is unmapped once sent, so a huge
/// download never keeps more than a window or two of it mapped.
const READ_CHUNK: usize = 512 * 1024;
/// Incoming bytes are batched to this size before a write to disk.
const WRITE_BATCH: usize = 512 * 1024;
/// Batches queued to the writer thread; bounds memory per upload.
const WRITE_QUEUE: usize = 4;

#[derive(Clone, Debug)]
pub struct FsOptions {
    /// Verify every whole-blob read against its digest.
    pub verify_reads: bool,
}

impl Default for FsOptions {
    fn default() -> Self {
        Self { verify_reads: true }
    }
}

/// Hash state of an upload, valid while `size` equals the file's length.
/// Lost on restart; the commit then re-hashes the file.
struct UploadHash {
    size: u64,
    hasher: Hasher,
}

type UploadSlot = Arc<tokio::sync::Mutex<Option<UploadHash>>>;

pub struct FsBlobStore {
    root: PathBuf,
    options: FsOptions,
    /// One lock per active upload serializes its chunks and keeps its hash.
    uploads: Mutex<HashMap<String, UploadSlot>>,
    tmp_counter: AtomicU64,
}

fn valid_upload_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

impl FsBlobStore {
    /// Opens the store under `root`, creating its layout, and clears `tmp/`
    /// (monolithic writes that a crash interrupted). Blocking: call at startup.
    pub fn open(root: &Path, options: FsOptions) -> Result<Self, StoreError> {
        for alg in [Algorithm::Sha256, Algorithm::Sha512] {
            let dir = root.join("blobs").join(alg.as_str());
            for prefix in 0..=255u8 {
                fs::create_dir_all(dir.join(format!("{prefix:02x}")))?;
            }
            sync_dir(&dir)?;
        }
        let tmp = root.join("tmp");
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fs::create_dir_all(&tmp)?;
        fs::create_dir_all(root.join("uploads"))?;
        sync_dir(root)?;
        Ok(Self {
            root: root.to_path_buf(),
            options,
            uploads: Mutex::new(HashMap::new()),
            tmp_counter: AtomicU64::new(0),
        })
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        let enc = digest.encoded();
        self.root
            .join("blobs")
            .join(digest.algorithm().as_str())
            .join(&enc[..2])
            .join(enc)
    }

    fn upload_path(&self, id: &str) -> Result<PathBuf, StoreError> {
        if !valid_upload_id(id) {
            return Err(StoreError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                "invalid upload id",
            )));
        }
        Ok(self.root.join("uploads").join(id))
    }

    fn upload_slot(&self, id: &str) -> UploadSlot {
        let mut map = self.uploads.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(id.to_string()).or_default().clone()
    }

    fn forget_upload(&self, id: &str) {
        let mut map = self.uploads.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(id);
    }
}

/// Streams `body` into `file` (from its current position) through `hasher`
/// on a blocking thread, pipelined with receiving. Stops with `TooLarge` once
/// `already + received` exceeds `max_total`.
async fn write_stream(
    file: File,
    hasher: Option<Hasher>,
    mut body: ByteStream,
    already: u64,
    max_total: u64,
) -> Result<(File, Option<Hasher>, u64), PutError> {
    let (tx, mut rx) = mpsc::channel::<Bytes>(WRITE_QUEUE);
    let writer = tokio::task::spawn_blocking(move || -> io::Result<(File, Option<Hasher>)> {
        let mut file = file;
        let mut hasher = hasher;
        while let Some(chunk) = rx.blocking_recv() {
            if let Some(h) = hasher.as_mut() {
                h.update(&chunk);
            }
            file.write_all(&chunk)?;
        }
        Ok((file, hasher))
    });

    let mut received: u64 = 0;
    let mut batch = BytesMut::new();
    let mut failure: Option<PutError> = None;
    while let Some(frame) = body.next().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                failure = Some(PutError::Body(e));
                break;
            }
        };
        received += frame.len() as u64;
        if already.saturating_add(received) > max_total {
            failure = Some(PutError::TooLarge { limit: max_total });
            break;
        }
        batch.extend_from_slice(&frame);
        if batch.len() >= WRITE_BATCH && tx.send(batch.split().freeze()).await.is_err() {
            break; // the writer failed; its error is reported below
        }
    }
    if failure.is_none() && !batch.is_empty() {
        let _ = tx.send(batch.freeze()).await;
    }
    drop(tx);
    let (file, hasher) = writer
        .await
        .map_err(StoreError::from)?
        .map_err(StoreError::Io)?;
    match failure {
        Some(e) => Err(e),
        None => Ok((file, hasher, received)),
    }
}

fn hash_file(path: &Path, algorithm: Algorithm) -> io::Result<Digest> {
    let mut file = File::open(path)?;
    let mut hasher = algorithm.hasher();
    let mut buf = vec![0u8; 1024 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(hasher.finish());
        }
        hasher.update(&buf[..n]);
    }
}

/// Maps `len` bytes of `file` at `pos` and returns them as `Bytes` that own the
/// mapping. The pages are populated here, on a blocking thread, so that
/// sending them never faults (and blocks) on an async worker.
fn map_window(file: &File, pos: u64, len: usize) -> io::Result<Bytes> {
    if len == 0 {
        return Ok(Bytes::new());
    }
    let page = 4096u64;
    let aligned = pos - pos % page;
    let skip = (pos - aligned) as usize;
    // SAFETY: blob files are immutable once installed (written to a temporary
    // name, synced, renamed) and are only ever unlinked, never truncated or
    // rewritten, so the mapped bytes cannot change or vanish under us.
    let map = unsafe {
        memmap2::MmapOptions::new()
            .offset(aligned)
            .len(skip + len)
            .populate()
            .map(file)?
    };
    Ok(Bytes::from_owner(map).slice(skip..))
}

struct ReadState {
    file: Arc<File>,
    pos: u64,
    end: u64,
    hasher: Option<Hasher>,
    digest: Digest,
}

fn read_stream(state: ReadState) -> ByteStream {
    Box::pin(futures_util::stream::try_unfold(
        state,
        |state| async move {
            if state.pos >= state.end {
                return Ok(None);
            }
            tokio::task::spawn_blocking(move || -> io::Result<Option<(Bytes, ReadState)>> {
            let mut state = state;
            let len = (state.end - state.pos).min(READ_CHUNK as u64) as usize;
            let buf = map_window(&state.file, state.pos, len)?;
            state.pos += len as u64;
            if let Some(h) = state.hasher.as_mut() {
                h.update(&buf);
            }
            if state.pos == state.end
                && let Some(h) = state.hasher.take()
            {
                let computed = h.finish();
                if computed != state.digest {
                    tracing::error!(digest = %state.digest, %computed, "stored blob is corrupt; refusing to serve it");
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("stored blob {} is corrupt", state.digest),
                    ));
                }
            }
            Ok(Some((buf, state)))
        })
        .await
        .map_err(io::Error::other)?
        },
    ))
}

fn not_found_to_none<T>(r: io::Result<T>) -> io::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[async_trait]
impl BlobStore for FsBlobStore {
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let path = self.blob_path(digest);
        let meta =
            tokio::task::spawn_blocking(move || not_found_to_none(fs::metadata(path))).await??;
        Ok(meta.map(|m| m.len()))
    }

    async fn read(
        &self,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<Option<BlobRead>, StoreError> {
        let path = self.blob_path(digest);
        let opened = tokio::task::spawn_blocking(move || {
            not_found_to_none(File::open(path).and_then(|f| {
                let len = f.metadata()?.len();
                Ok((f, len))
            }))
        })
        .await??;
        let Some((file, size)) = opened else {
            return Ok(None);
        };
        let (pos, end, hasher) = match range {
            Some(r) => (r.start.min(size), r.end.saturating_add(1).min(size), None),
            None => (
                0,
                size,
                self.options
                    .verify_reads
                    .then(|| digest.algorithm().hasher()),
            ),
        };
        let stream = read_stream(ReadState {
            file: Arc::new(file),
            pos,
            end,
            hasher,
            digest: digest.clone(),
        });
        Ok(Some(BlobRead { size, stream }))
    }

    async fn read_small(&self, digest: &Digest, max: u64) -> Result<Option<Bytes>, StoreError> {
        let path = self.blob_path(digest);
        let digest = digest.clone();
        tokio::task::spawn_blocking(move || -> Result<Option<Bytes>, StoreError> {
            let Some(mut file) = not_found_to_none(File::open(&path))? else {
                return Ok(None);
            };
            let len = file.metadata()?.len();
            if len > max {
                return Err(StoreError::Io(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("blob {digest} is {len} bytes, more than the {max} expected"),
                )));
            }
            let mut buf = Vec::with_capacity(len as usize);
            file.read_to_end(&mut buf)?;
            if Digest::of(digest.algorithm(), &buf) != digest {
                tracing::error!(%digest, "stored manifest is corrupt; refusing to serve it");
                return Err(StoreError::Io(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("stored blob {digest} is corrupt"),
                )));
            }
            Ok(Some(Bytes::from(buf)))
        })
        .await?
    }

    async fn put(&self, expected: &Digest, body: ByteStream, max: u64) -> Result<u64, PutError> {
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let tmp = self.root.join("tmp").join(format!(
            "{}-{}-{n}",
            std::process::id(),
            expected.encoded()
        ));
        let file = {
            let tmp = tmp.clone();
            tokio::task::spawn_blocking(move || File::create(tmp))
                .await
                .map_err(StoreError::from)?
                .map_err(StoreError::Io)?
        };
        let result: Result<u64, PutError> = async {
            let (file, hasher, size) =
                write_stream(file, Some(expected.algorithm().hasher()), body, 0, max).await?;
            let computed = hasher.map(Hasher::finish);
            if computed.as_ref() != Some(expected) {
                return Err(PutError::DigestMismatch {
                    expected: expected.clone(),
                    computed: computed.unwrap_or_else(|| Digest::sha256_of(b"")),
                });
            }
            let tmp = tmp.clone();
            let digest = expected.clone();
            let installed: io::Result<()> = tokio::task::spawn_blocking({
                let this_path = self.blob_path(&digest);
                move || {
                    file.sync_all()?;
                    drop(file);
                    fs::rename(&tmp, &this_path)?;
                    sync_dir(this_path.parent().unwrap_or(Path::new(".")))
                }
            })
            .await
            .map_err(StoreError::from)?;
            installed.map_err(StoreError::Io)?;
            Ok(size)
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }

    async fn delete(&self, digest: &Digest) -> Result<(), StoreError> {
        let path = self.blob_path(digest);
        tokio::task::spawn_blocking(move || not_found_to_none(fs::remove_file(path))).await??;
        Ok(())
    }

    async fn list(&self) -> Result<Vec<Digest>, StoreError> {
        let root = self.root.join("blobs");
        tokio::task::spawn_blocking(move || -> Result<Vec<Digest>, StoreError> {
            let mut out = Vec::new();
            for alg in [Algorithm::Sha256, Algorithm::Sha512] {
                for prefix in fs::read_dir(root.join(alg.as_str()))? {
                    for entry in fs::read_dir(prefix?.path())? {
                        let name = entry?.file_name();
                        if let Ok(d) =
                            format!("{}:{}", alg.as_str(), name.to_string_lossy()).parse()
                        {
                            out.push(d);
                        }
                    }
                }
            }
            out.sort();
            Ok(out)
        })
        .await?
    }

    async fn create_upload(&self, id: &str) -> Result<(), StoreError> {
        let path = self.upload_path(id)?;
        let dir = self.root.join("uploads");
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            let f = OpenOptions::new().write(true).create_new(true).open(path)?;
            f.sync_all()?;
            sync_dir(&dir)
        })
        .await??;
        *self.upload_slot(id).lock().await = Some(UploadHash {
            size: 0,
            hasher: Algorithm::Sha256.hasher(),
        });
        Ok(())
    }

    async fn upload_size(&self, id: &str) -> Result<Option<u64>, StoreError> {
        let path = self.upload_path(id)?;
        let meta =
            tokio::task::spawn_blocking(move || not_found_to_none(fs::metadata(path))).await??;
        Ok(meta.map(|m| m.len()))
    }

    async fn append_upload(
        &self,
        id: &str,
        offset: u64,
        body: ByteStream,
        max_total: u64,
    ) -> Result<u64, PutError> {
        let path = self.upload_path(id)?;
        let slot = self.upload_slot(id);
        let mut hash_state = slot.lock().await;
        let opened = tokio::task::spawn_blocking(move || {
            not_found_to_none(OpenOptions::new().append(true).open(path).and_then(|f| {
                let len = f.metadata()?.len();
                Ok((f, len))
            }))
        })
        .await
        .map_err(StoreError::from)?
        .map_err(StoreError::Io)?;
        let Some((file, current)) = opened else {
            return Err(PutError::UploadUnknown);
        };
        if offset != current {
            return Err(PutError::OffsetMismatch {
                current,
                requested: offset,
            });
        }
        let hasher = hash_state
            .as_ref()
            .filter(|h| h.size == current)
            .map(|h| h.hasher.clone());
        match write_stream(file, hasher, body, current, max_total).await {
            Ok((file, hasher, written)) => {
                tokio::task::spawn_blocking(move || file.sync_data())
                    .await
                    .map_err(StoreError::from)?
                    .map_err(StoreError::Io)?;
                let size = current + written;
                *hash_state = hasher.map(|hasher| UploadHash { size, hasher });
                Ok(size)
            }
            Err(e) => {
                // Roll the file back so a failed chunk leaves no trace and the
                // client can resume from the offset it last saw acknowledged.
                let path = self.upload_path(id)?;
                let truncated = tokio::task::spawn_blocking(move || {
                    OpenOptions::new().write(true).open(path)?.set_len(current)
                })
                .await
                .map_err(StoreError::from)?;
                if let Err(io) = truncated {
                    tracing::warn!(upload = id, error = %io, "could not roll back failed chunk");
                    *hash_state = None;
                }
                Err(e)
            }
        }
    }

    async fn commit_upload(&self, id: &str, expected: &Digest) -> Result<u64, PutError> {
        let path = self.upload_path(id)?;
        let slot = self.upload_slot(id);
        let hash_state = slot.lock().await;
        let size = match tokio::task::spawn_blocking({
            let path = path.clone();
            move || not_found_to_none(fs::metadata(path))
        })
        .await
        .map_err(StoreError::from)?
        .map_err(StoreError::Io)?
        {
            Some(m) => m.len(),
            None => return Err(PutError::UploadUnknown),
        };
        let cached = hash_state
            .as_ref()
            .filter(|h| h.size == size && h.hasher.algorithm() == expected.algorithm())
            .map(|h| h.hasher.clone().finish());
        let computed = match cached {
            Some(d) => d,
            None => {
                let path = path.clone();
                let alg = expected.algorithm();
                tokio::task::spawn_blocking(move || hash_file(&path, alg))
                    .await
                    .map_err(StoreError::from)?
                    .map_err(StoreError::Io)?
            }
        };
        drop(hash_state);
        if &computed != expected {
            self.delete_upload(id).await?;
            return Err(PutError::DigestMismatch {
                expected: expected.clone(),
                computed,
            });
        }
        let installed = tokio::task::spawn_blocking({
            let target = self.blob_path(expected);
            let uploads_dir = self.root.join("uploads");
            move || -> io::Result<()> {
                // Chunks were synced as they arrived; the rename is what must
                // now reach the disk, in both directories.
                fs::rename(&path, &target)?;
                sync_dir(target.parent().unwrap_or(Path::new(".")))?;
                sync_dir(&uploads_dir)
            }
        })
        .await
        .map_err(StoreError::from)?;
        self.forget_upload(id);
        installed.map_err(StoreError::Io)?;
        Ok(size)
    }

    async fn delete_upload(&self, id: &str) -> Result<(), StoreError> {
        let path = self.upload_path(id)?;
        tokio::task::spawn_blocking(move || not_found_to_none(fs::remove_file(path))).await??;
        self.forget_upload(id);
        Ok(())
    }

    async fn list_uploads(&self) -> Result<Vec<String>, StoreError> {
        let dir = self.root.join("uploads");
        tokio::task::spawn_blocking(move || -> Result<Vec<String>, StoreError> {
            let mut out = Vec::new();
            for entry in fs::read_dir(dir)? {
                let name = entry?.file_name().to_string_lossy().into_owned();
                if valid_upload_id(&name) {
                    out.push(name);
                }
            }
            Ok(out)
        })
        .await?
    }

    async fn check_health(&self) -> Result<(), StoreError> {
        let tmp = self.root.join("tmp");
        tokio::task::spawn_blocking(move || fs::metadata(tmp).map(|_| ())).await??;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passes_the_blobstore_suite() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path(), FsOptions::default()).unwrap();
        crate::testsuite::blobstore_suite(&store).await;
    }

    #[tokio::test]
    async fn corrupt_blob_is_never_served_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path(), FsOptions::default()).unwrap();
        let data = vec![7u8; 600 * 1024];
        let digest = Digest::sha256_of(&data);
        let body: ByteStream =
            Box::pin(futures_util::stream::iter([Ok(Bytes::from(data.clone()))]));
        store.put(&digest, body, u64::MAX).await.unwrap();
        // Flip one byte at rest.
        let path = store.blob_path(&digest);
        let mut bytes = fs::read(&path).unwrap();
        bytes[1000] ^= 1;
        fs::write(&path, bytes).unwrap();

        let read = store.read(&digest, None).await.unwrap().unwrap();
        let chunks: Vec<_> = read.stream.collect().await;
        assert!(chunks.last().unwrap().is_err(), "the last chunk must fail");
        let delivered: usize = chunks
            .iter()
            .filter_map(|c| c.as_ref().ok())
            .map(Bytes::len)
            .sum();
        assert!(delivered < data.len());
        assert!(store.read_small(&digest, u64::MAX).await.is_err());
    }

    #[tokio::test]
    async fn reopen_clears_interrupted_monolithic_writes() {
        let dir = tempfile::tempdir().unwrap();
        drop(FsBlobStore::open(dir.path(), FsOptions::default()).unwrap());
        fs::write(dir.path().join("tmp").join("partial"), b"half").unwrap();
        drop(FsBlobStore::open(dir.path(), FsOptions::default()).unwrap());
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }
}
