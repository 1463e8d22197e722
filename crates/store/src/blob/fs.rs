//! The embedded blob engine: files under a data directory.
//!
//! Layout: `blobs/<alg>/<2 hex>/<encoded>` for committed blobs, `uploads/<id>`
//! for upload sessions and `tmp/` for monolithic writes in flight. A blob
//! reaches its final path only by `rename` after its bytes were fsynced and
//! verified, and the directory is fsynced after the rename, so a crash at any
//! point leaves either the whole verified blob or nothing under `blobs/`.
//!
//! Reads are verified too. The content digest (SHA-256) was checked on the way
//! in; what a read must catch is corruption at rest, for which a fast
//! non-cryptographic checksum (XXH3-128, about ten times cheaper than SHA-256)
//! is as good. It is computed during the write and kept in an extended
//! attribute of the blob file, fsynced with it. A blob without the attribute
//! (a filesystem without xattrs) is verified against its digest instead.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use berth_oci::{Algorithm, ByteRange, Digest, Hasher};
use bytes::Bytes;
use futures_util::StreamExt;
use xxhash_rust::xxh3::Xxh3;

use super::{BlobRead, BlobStore, ByteStream, PutError};
use crate::StoreError;

/// Size of the file windows that feed a response. They are mapped, not
/// copied, so size costs no heap; each window is unmapped once sent, so a huge
/// download never keeps more than a window or two of it mapped.
const READ_CHUNK: usize = 512 * 1024;
/// Incoming frames are gathered up to this size for one blocking write task;
/// with one batch in flight and one filling, an upload holds about 1 MiB.
const WRITE_BATCH: usize = 512 * 1024;

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

/// Extended attribute holding a blob's XXH3-128 checksum (16 bytes, big endian).
const CHECKSUM_XATTR: &str = "user.berth.xxh3_128";

/// What a write computes over the bytes: the content digest, checked against
/// the client's claim, and the fast checksum kept for verifying reads.
#[derive(Clone)]
struct ContentHash {
    digest: Hasher,
    checksum: Xxh3,
}

impl ContentHash {
    fn new(algorithm: Algorithm) -> Self {
        Self {
            digest: algorithm.hasher(),
            checksum: Xxh3::new(),
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        self.digest.update(bytes);
        self.checksum.update(bytes);
    }

    fn finish(self) -> (Digest, u128) {
        (self.digest.finish(), self.checksum.digest128())
    }
}

/// Records the checksum on the file. Best effort: without xattr support,
/// reads fall back to verifying the digest.
fn store_checksum(file: &File, checksum: u128) {
    if let Err(e) = xattr::FileExt::set_xattr(file, CHECKSUM_XATTR, &checksum.to_be_bytes()) {
        tracing::debug!(error = %e, "cannot store blob checksum; reads will verify the digest");
    }
}

fn load_checksum(file: &File) -> Option<u128> {
    let value = xattr::FileExt::get_xattr(file, CHECKSUM_XATTR).ok()??;
    Some(u128::from_be_bytes(value.try_into().ok()?))
}

/// Hash state of an upload, valid while `size` equals the file's length.
/// Lost on restart; the commit then re-hashes the file.
struct UploadHash {
    size: u64,
    hash: ContentHash,
}

/// What the store knows about an upload in progress, behind its lock.
#[derive(Default)]
struct UploadState {
    hash: Option<UploadHash>,
    /// A failed chunk could not be rolled back (nor its data deleted): the
    /// upload's bytes are unknown and it must never be committed.
    poisoned: bool,
}

type UploadSlot = Arc<tokio::sync::Mutex<UploadState>>;

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
        sync_dir(&root.join("blobs"))?;
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

    /// Deletes an upload's data; the caller holds the upload's lock.
    async fn remove_upload_file(&self, id: &str) -> Result<(), StoreError> {
        let path = self.upload_path(id)?;
        tokio::task::spawn_blocking(move || not_found_to_none(fs::remove_file(path))).await??;
        self.forget_upload(id);
        Ok(())
    }

    fn forget_upload(&self, id: &str) {
        let mut map = self.uploads.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(id);
    }
}

/// Streams `body` into `file` (from its current position) through `hasher`,
/// pipelined: while one batch is hashed and written on a blocking thread, the
/// next one is received. Each batch is its own short blocking task, so a slow
/// client never holds a blocking thread while the registry waits for its bytes.
/// Stops with `TooLarge` once `already + received` exceeds `max_total`.
async fn write_stream(
    file: File,
    hasher: Option<ContentHash>,
    mut body: ByteStream,
    already: u64,
    max_total: u64,
) -> Result<(File, Option<ContentHash>, u64), PutError> {
    type Written = io::Result<(File, Option<ContentHash>)>;
    fn write_batch(
        file: File,
        hasher: Option<ContentHash>,
        batch: Vec<Bytes>,
    ) -> tokio::task::JoinHandle<Written> {
        tokio::task::spawn_blocking(move || {
            let mut file = file;
            let mut hasher = hasher;
            for chunk in &batch {
                if let Some(h) = hasher.as_mut() {
                    h.update(chunk);
                }
                file.write_all(chunk)?;
            }
            Ok((file, hasher))
        })
    }
    /// The file is either free, or owned by the task writing a batch to it.
    // One per upload, on its task's stack: the hash state's size is no concern.
    #[allow(clippy::large_enum_variant)]
    enum Writer {
        Idle(File, Option<ContentHash>),
        Busy(tokio::task::JoinHandle<Written>),
    }
    impl Writer {
        async fn ready(self) -> Result<(File, Option<ContentHash>), PutError> {
            match self {
                Writer::Idle(file, hasher) => Ok((file, hasher)),
                Writer::Busy(task) => Ok(task
                    .await
                    .map_err(StoreError::from)?
                    .map_err(StoreError::Io)?),
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
            writer = Writer::Busy(write_batch(file, hasher, std::mem::take(&mut batch)));
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
        Writer::Busy(write_batch(file, hasher, batch))
            .ready()
            .await?
    };
    Ok((file, hasher, received))
}

fn hash_file(path: &Path, algorithm: Algorithm) -> io::Result<(Digest, u128)> {
    let mut file = File::open(path)?;
    let mut hasher = ContentHash::new(algorithm);
    let mut buf = vec![0u8; 1024 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(hasher.finish());
        }
        hasher.update(&buf[..n]);
    }
}

fn page_size() -> u64 {
    static PAGE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    // SAFETY: sysconf has no preconditions.
    *PAGE.get_or_init(|| match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as u64,
        _ => 4096,
    })
}

/// Appends one chunk to the upload file at `path`; the caller passes the
/// upload's locked state. See `BlobStore::append_upload`.
async fn append_locked(
    mut state: tokio::sync::OwnedMutexGuard<UploadState>,
    path: PathBuf,
    offset: u64,
    expected_len: Option<u64>,
    body: ByteStream,
    max_total: u64,
) -> Result<u64, PutError> {
    if state.poisoned {
        return Err(PutError::UploadUnknown);
    }
    let opened = tokio::task::spawn_blocking({
        let path = path.clone();
        move || {
            not_found_to_none(OpenOptions::new().append(true).open(path).and_then(|f| {
                let len = f.metadata()?.len();
                Ok((f, len))
            }))
        }
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
    let hasher = state
        .hash
        .as_ref()
        .filter(|h| h.size == current)
        .map(|h| h.hash.clone());
    let outcome = async {
        let (file, hasher, written) = write_stream(file, hasher, body, current, max_total).await?;
        if let Some(expected) = expected_len
            && expected != written
        {
            return Err(PutError::LengthMismatch {
                expected,
                received: written,
            });
        }
        // Only a synced chunk may be acknowledged. After a failed fsync the
        // kernel may already have dropped the dirty pages, so the chunk is
        // rolled back below and never retried over the same data.
        tokio::task::spawn_blocking(move || file.sync_data())
            .await
            .map_err(StoreError::from)?
            .map_err(StoreError::Io)?;
        Ok((hasher, written))
    }
    .await;
    match outcome {
        Ok((hasher, written)) => {
            let size = current + written;
            state.hash = hasher.map(|hash| UploadHash { size, hash });
            Ok(size)
        }
        Err(e) => {
            // Roll the file back so a failed chunk leaves no trace and the
            // client can resume from the offset it last saw acknowledged.
            let rolled_back = tokio::task::spawn_blocking({
                let path = path.clone();
                move || -> io::Result<()> {
                    let file = OpenOptions::new().write(true).open(path)?;
                    file.set_len(current)?;
                    file.sync_all()
                }
            })
            .await
            .map_err(StoreError::from)?;
            if let Err(io) = rolled_back {
                // The upload's content is now unknown: it must never be
                // committed. Poison it and try to drop its data; the client
                // starts over.
                tracing::error!(upload = %path.display(), error = %io, "could not roll back a failed chunk; discarding the upload");
                state.hash = None;
                state.poisoned = true;
                let _ = tokio::task::spawn_blocking(move || fs::remove_file(path)).await;
            }
            Err(e)
        }
    }
}

/// Maps `len` bytes of `file` at `pos` and returns them as `Bytes` that own the
/// mapping (no copy, no heap). The pages are populated here, on a blocking
/// thread, so that sending them never faults on an async worker.
///
/// A page that cannot be read (a media error) would raise SIGBUS, killing the
/// whole process, when touched. So the window is used only if every page came
/// in; otherwise it is read with `pread`, which turns the error into a failed
/// request. (Sending from the mapping is safe regardless: the kernel's copy
/// reports a bad page as EFAULT, it does not signal.)
fn map_window(file: &File, pos: u64, len: usize) -> io::Result<Bytes> {
    if len == 0 {
        return Ok(Bytes::new());
    }
    let page = page_size();
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
    if !fully_resident(&map, page) {
        tracing::warn!("blob pages could not be loaded; reading them instead of mapping");
        let mut buf = vec![0u8; len];
        std::os::unix::fs::FileExt::read_exact_at(file, &mut buf, pos)?;
        return Ok(Bytes::from(buf));
    }
    Ok(Bytes::from_owner(map).slice(skip..))
}

/// Whether every page of the mapping is in memory.
fn fully_resident(map: &memmap2::Mmap, page: u64) -> bool {
    let pages = (map.len() as u64).div_ceil(page) as usize;
    let mut residency = vec![0u8; pages];
    // SAFETY: the address and length are those of a live mapping we own, and
    // `residency` has one byte per page of it, as mincore requires.
    let rc = unsafe {
        libc::mincore(
            map.as_ptr() as *mut libc::c_void,
            map.len(),
            residency.as_mut_ptr(),
        )
    };
    rc == 0 && residency.iter().all(|r| r & 1 == 1)
}

/// How a whole-blob read checks the bytes it serves.
enum Verifier {
    Checksum(Box<Xxh3>, u128),
    Digest(Hasher),
}

impl Verifier {
    fn update(&mut self, bytes: &[u8]) {
        match self {
            Verifier::Checksum(h, _) => h.update(bytes),
            Verifier::Digest(h) => h.update(bytes),
        }
    }

    fn matches(self, digest: &Digest) -> bool {
        match self {
            Verifier::Checksum(h, expected) => h.digest128() == expected,
            Verifier::Digest(h) => &h.finish() == digest,
        }
    }
}

struct ReadState {
    file: Arc<File>,
    pos: u64,
    end: u64,
    verifier: Option<Verifier>,
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
            if let Some(v) = state.verifier.as_mut() {
                v.update(&buf);
            }
            if state.pos == state.end
                && let Some(v) = state.verifier.take()
                && !v.matches(&state.digest)
            {
                tracing::error!(digest = %state.digest, "stored blob is corrupt; refusing to serve it");
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("stored blob {} is corrupt", state.digest),
                ));
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
        let verify = range.is_none() && self.options.verify_reads;
        let opened = tokio::task::spawn_blocking(move || {
            not_found_to_none(File::open(path).and_then(|f| {
                let len = f.metadata()?.len();
                let checksum = if verify { load_checksum(&f) } else { None };
                Ok((f, len, checksum))
            }))
        })
        .await??;
        let Some((file, size, checksum)) = opened else {
            return Ok(None);
        };
        let (pos, end) = match range {
            Some(r) => (r.start.min(size), r.end.saturating_add(1).min(size)),
            None => (0, size),
        };
        let verifier = verify.then(|| match checksum {
            Some(expected) => Verifier::Checksum(Box::new(Xxh3::new()), expected),
            None => Verifier::Digest(digest.algorithm().hasher()),
        });
        let stream = read_stream(ReadState {
            file: Arc::new(file),
            pos,
            end,
            verifier,
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
            let (file, hasher, size) = write_stream(
                file,
                Some(ContentHash::new(expected.algorithm())),
                body,
                0,
                max,
            )
            .await?;
            let Some((computed, checksum)) = hasher.map(ContentHash::finish) else {
                return Err(PutError::Store(StoreError::Task("hash state lost".into())));
            };
            if &computed != expected {
                return Err(PutError::DigestMismatch {
                    expected: expected.clone(),
                    computed,
                });
            }
            let tmp = tmp.clone();
            let digest = expected.clone();
            let installed: io::Result<()> = tokio::task::spawn_blocking({
                let this_path = self.blob_path(&digest);
                move || {
                    store_checksum(&file, checksum);
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
        self.upload_slot(id).lock().await.hash = Some(UploadHash {
            size: 0,
            hash: ContentHash::new(Algorithm::Sha256),
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
        expected_len: Option<u64>,
        body: ByteStream,
        max_total: u64,
    ) -> Result<u64, PutError> {
        let path = self.upload_path(id)?;
        // The chunk runs in a task of its own that holds the upload's lock: if
        // the request is cancelled (a client reset, a shutdown), the write is
        // still completed or rolled back before the next chunk may start.
        let state = self.upload_slot(id).lock_owned().await;
        let chunk = tokio::spawn(append_locked(
            state,
            path,
            offset,
            expected_len,
            body,
            max_total,
        ));
        chunk.await.map_err(StoreError::from)?
    }

    async fn commit_upload(&self, id: &str, expected: &Digest) -> Result<u64, PutError> {
        let path = self.upload_path(id)?;
        let slot = self.upload_slot(id);
        let hash_state = slot.lock().await;
        if hash_state.poisoned {
            return Err(PutError::UploadUnknown);
        }
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
            .hash
            .as_ref()
            .filter(|h| h.size == size && h.hash.digest.algorithm() == expected.algorithm())
            .map(|h| h.hash.clone().finish());
        let (computed, checksum) = match cached {
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
        // The upload's lock stays held through the rename: a chunk racing the
        // commit must not append to a file that was just verified.
        if &computed != expected {
            self.remove_upload_file(id).await?;
            return Err(PutError::DigestMismatch {
                expected: expected.clone(),
                computed,
            });
        }
        let installed = tokio::task::spawn_blocking({
            let target = self.blob_path(expected);
            let uploads_dir = self.root.join("uploads");
            move || -> io::Result<()> {
                // Chunks were synced as they arrived; the checksum attribute
                // and the rename are what must now reach the disk.
                let file = File::open(&path)?;
                store_checksum(&file, checksum);
                file.sync_all()?;
                drop(file);
                fs::rename(&path, &target)?;
                sync_dir(target.parent().unwrap_or(Path::new(".")))?;
                sync_dir(&uploads_dir)
            }
        })
        .await
        .map_err(StoreError::from)?;
        drop(hash_state);
        self.forget_upload(id);
        installed.map_err(StoreError::Io)?;
        Ok(size)
    }

    async fn delete_upload(&self, id: &str) -> Result<(), StoreError> {
        // Under the upload's lock: never delete the file under a running chunk.
        let slot = self.upload_slot(id);
        let _guard = slot.lock().await;
        self.remove_upload_file(id).await
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
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

        // Caught by the stored checksum...
        assert!(load_checksum(&File::open(&path).unwrap()).is_some());
        assert_corrupt_read_fails(&store, &digest, data.len()).await;
        // ...and by the digest where there is no checksum attribute.
        xattr::remove(&path, CHECKSUM_XATTR).unwrap();
        assert_corrupt_read_fails(&store, &digest, data.len()).await;
        assert!(store.read_small(&digest, u64::MAX).await.is_err());
    }

    async fn assert_corrupt_read_fails(store: &FsBlobStore, digest: &Digest, len: usize) {
        let read = store.read(digest, None).await.unwrap().unwrap();
        let chunks: Vec<_> = read.stream.collect().await;
        assert!(chunks.last().unwrap().is_err(), "the last chunk must fail");
        let delivered: usize = chunks
            .iter()
            .filter_map(|c| c.as_ref().ok())
            .map(Bytes::len)
            .sum();
        assert!(delivered < len);
    }

    #[tokio::test]
    async fn mapped_windows_are_resident_and_match_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
        fs::write(&path, &data).unwrap();
        let file = File::open(&path).unwrap();
        for (pos, len) in [
            (0usize, 4096usize),
            (1, 10),
            (4095, 70_000),
            (999_000, 1000),
        ] {
            let window = map_window(&file, pos as u64, len).unwrap();
            assert_eq!(&window[..], &data[pos..pos + len]);
        }
        let page = page_size();
        let map = unsafe {
            memmap2::MmapOptions::new()
                .len(8192)
                .populate()
                .map(&file)
                .unwrap()
        };
        assert!(fully_resident(&map, page));
    }

    #[tokio::test]
    async fn chunked_uploads_record_a_checksum_that_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path(), FsOptions::default()).unwrap();
        let data = vec![3u8; 1_500_000];
        let digest = Digest::sha256_of(&data);
        let id = "2f1d0b8e-0000-4000-8000-0000000000aa";
        store.create_upload(id).await.unwrap();
        let first: ByteStream = Box::pin(futures_util::stream::iter([Ok(Bytes::from(
            data[..700_000].to_vec(),
        ))]));
        store
            .append_upload(id, 0, None, first, u64::MAX)
            .await
            .unwrap();
        let rest: ByteStream = Box::pin(futures_util::stream::iter([Ok(Bytes::from(
            data[700_000..].to_vec(),
        ))]));
        store
            .append_upload(id, 700_000, None, rest, u64::MAX)
            .await
            .unwrap();
        store.commit_upload(id, &digest).await.unwrap();
        let stored = load_checksum(&File::open(store.blob_path(&digest)).unwrap());
        assert_eq!(stored, Some(xxhash_rust::xxh3::xxh3_128(&data)));
        let read = store.read(&digest, None).await.unwrap().unwrap();
        let got: Vec<Bytes> = read.stream.map(|c| c.unwrap()).collect().await;
        assert_eq!(got.concat(), data);
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
