//! The embedded blob engine: files under a data directory.
//!
//! Layout: `blobs/<alg>/<2 hex>/<encoded>` for committed blobs,
//! `uploads/<id>/<part>` for the chunks of upload sessions and `tmp/` for
//! writes in flight. A blob or part reaches its final path only by `rename`
//! (or a hard link) after its bytes were fsynced and verified, and the
//! directory is fsynced after, so a crash at any point leaves either the whole
//! verified file or nothing under `blobs/` and `uploads/`.
//!
//! Reads are verified too. The content digest (SHA-256) was checked on the way
//! in; what a read must catch is corruption at rest, for which a fast
//! non-cryptographic checksum (XXH3-128, about ten times cheaper than SHA-256)
//! is as good. It is computed during the write and kept in an extended
//! attribute of the blob file, fsynced with it. A blob without the attribute
//! (a filesystem without xattrs) is verified against its digest instead.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use berth_oci::{Algorithm, ByteRange, Digest, Hasher};
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use xxhash_rust::xxh3::Xxh3;

use super::{BlobRead, BlobStore, ByteStream, PutError, StoredBlob, StoredUpload, UploadPart};
use crate::StoreError;

mod read;
mod write;

use read::{FileIdentity, ReadState, Reads, Verifier, read_stream};
use write::{WRITE_BATCH, write_stream};

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

pub struct FsBlobStore {
    root: PathBuf,
    options: FsOptions,
    tmp_counter: AtomicU64,
    reads: Arc<Reads>,
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
        let uploads = root.join("uploads");
        fs::create_dir_all(&uploads)?;
        // Uploads of the format before parts (one file per upload) cannot be
        // continued; their sessions fail and clients start them again.
        for entry in fs::read_dir(&uploads)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                tracing::warn!(upload = ?entry.file_name(), "discarding upload data of an older format");
                fs::remove_file(entry.path())?;
            }
        }
        sync_dir(root)?;
        Ok(Self {
            root: root.to_path_buf(),
            options,
            tmp_counter: AtomicU64::new(0),
            reads: Arc::default(),
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

    fn part_path(&self, upload: &str, part: &str) -> Result<PathBuf, StoreError> {
        if !valid_upload_id(part) {
            return Err(StoreError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                "invalid upload part name",
            )));
        }
        Ok(self.upload_path(upload)?.join(part))
    }

    fn tmp_path(&self, label: &str) -> PathBuf {
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{}-{label}-{n}", std::process::id()))
    }

    /// Streams `body` into a new file under `tmp/`, hashing it, and syncs it
    /// with its checksum attribute. The caller moves it into place; on error
    /// nothing is left behind.
    async fn write_synced_tmp(
        &self,
        label: &str,
        algorithm: Algorithm,
        expected_len: Option<u64>,
        body: ByteStream,
        max: u64,
    ) -> Result<SyncedTmp, PutError> {
        let tmp = self.tmp_path(label);
        let file = {
            let tmp = tmp.clone();
            tokio::task::spawn_blocking(move || File::create(tmp))
                .await
                .map_err(StoreError::from)?
                .map_err(StoreError::Io)?
        };
        let result: Result<SyncedTmp, PutError> = async {
            let (file, hasher, size) =
                write_stream(file, Some(ContentHash::new(algorithm)), body, 0, max).await?;
            if let Some(expected) = expected_len
                && expected != size
            {
                return Err(PutError::LengthMismatch {
                    expected,
                    received: size,
                });
            }
            let Some((digest, checksum)) = hasher.map(ContentHash::finish) else {
                return Err(PutError::Store(StoreError::Task("hash state lost".into())));
            };
            tokio::task::spawn_blocking(move || {
                store_checksum(&file, checksum);
                file.sync_all()
            })
            .await
            .map_err(StoreError::from)?
            .map_err(StoreError::Io)?;
            Ok(SyncedTmp {
                path: tmp.clone(),
                digest,
                size,
            })
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }
}

/// A fully written and synced file in `tmp/`, and what it hashed to.
struct SyncedTmp {
    path: PathBuf,
    digest: Digest,
    size: u64,
}

/// Moves a synced file to `target` and makes the rename durable.
async fn install(from: PathBuf, target: PathBuf) -> Result<(), StoreError> {
    let result = tokio::task::spawn_blocking({
        let from = from.clone();
        move || -> io::Result<()> {
            let dir = target.parent().unwrap_or(Path::new("."));
            fs::rename(&from, &target)?;
            sync_dir(dir)
        }
    })
    .await?;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&from).await;
    }
    Ok(result?)
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
        let reads = self.reads.clone();
        let wanted = digest.clone();
        let opened = tokio::task::spawn_blocking(move || {
            not_found_to_none(File::open(path).and_then(|f| {
                let meta = f.metadata()?;
                let identity = FileIdentity::of(&meta);
                // A file verified whole since start is not hashed again.
                let verify = verify && !reads.is_verified(&wanted, &identity);
                let checksum = if verify { load_checksum(&f) } else { None };
                Ok((f, meta.len(), verify.then_some((checksum, identity))))
            }))
        })
        .await??;
        let Some((file, size, verify)) = opened else {
            return Ok(None);
        };
        let (pos, end) = match range {
            Some(r) => (r.start.min(size), r.end.saturating_add(1).min(size)),
            None => (0, size),
        };
        let verifier = verify.map(|(checksum, identity)| {
            let verifier = match checksum {
                Some(expected) => Verifier::Checksum(Box::new(Xxh3::new()), expected),
                None => Verifier::Digest(digest.algorithm().hasher()),
            };
            (verifier, identity)
        });
        let stream = read_stream(ReadState::new(
            self.reads.clone(),
            file,
            (pos, end),
            verifier,
            digest.clone(),
        ));
        Ok(Some(BlobRead { size, stream }))
    }

    fn distrust(&self, digest: &Digest) {
        self.reads.distrust(digest);
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
        let written = self
            .write_synced_tmp(
                &expected.encoded()[..16],
                expected.algorithm(),
                None,
                body,
                max,
            )
            .await?;
        if &written.digest != expected {
            let _ = tokio::fs::remove_file(&written.path).await;
            return Err(PutError::DigestMismatch {
                expected: expected.clone(),
                computed: written.digest,
            });
        }
        install(written.path, self.blob_path(expected)).await?;
        Ok(written.size)
    }

    async fn delete(&self, digest: &Digest) -> Result<(), StoreError> {
        let path = self.blob_path(digest);
        tokio::task::spawn_blocking(move || not_found_to_none(fs::remove_file(path))).await??;
        Ok(())
    }

    async fn list(&self) -> Result<Vec<StoredBlob>, StoreError> {
        let root = self.root.join("blobs");
        tokio::task::spawn_blocking(move || -> Result<Vec<StoredBlob>, StoreError> {
            let mut out = Vec::new();
            for alg in [Algorithm::Sha256, Algorithm::Sha512] {
                let dir = match fs::read_dir(root.join(alg.as_str())) {
                    Ok(dir) => dir,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e.into()),
                };
                for prefix in dir {
                    for entry in fs::read_dir(prefix?.path())? {
                        let entry = entry?;
                        let name = entry.file_name();
                        let Ok(digest) =
                            format!("{}:{}", alg.as_str(), name.to_string_lossy()).parse()
                        else {
                            continue;
                        };
                        // Removed since the directory was read: not there.
                        let meta = match entry.metadata() {
                            Ok(m) => m,
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                            Err(e) => return Err(e.into()),
                        };
                        let modified_ms = meta
                            .modified()?
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_millis() as u64);
                        out.push(StoredBlob {
                            digest,
                            size: meta.len(),
                            modified_ms,
                        });
                    }
                }
            }
            out.sort_by(|a, b| a.digest.cmp(&b.digest));
            Ok(out)
        })
        .await?
    }

    async fn write_part(
        &self,
        upload: &str,
        expected_len: Option<u64>,
        body: ByteStream,
        max: u64,
    ) -> Result<UploadPart, PutError> {
        let name = uuid::Uuid::new_v4().simple().to_string();
        let target = self.part_path(upload, &name)?;
        let written = self
            .write_synced_tmp("part", Algorithm::Sha256, expected_len, body, max)
            .await?;
        let dir = self.upload_path(upload)?;
        let uploads = self.root.join("uploads");
        let created = tokio::task::spawn_blocking(move || -> io::Result<()> {
            if !dir.exists() {
                fs::create_dir_all(&dir)?;
                sync_dir(&uploads)?;
            }
            Ok(())
        })
        .await
        .map_err(StoreError::from)?;
        if let Err(e) = created {
            let _ = tokio::fs::remove_file(&written.path).await;
            return Err(StoreError::Io(e).into());
        }
        install(written.path, target).await?;
        Ok(UploadPart {
            name,
            size: written.size,
            sha256: written.digest,
        })
    }

    async fn commit_parts(
        &self,
        upload: &str,
        parts: &[UploadPart],
        expected: &Digest,
    ) -> Result<u64, PutError> {
        if let [part] = parts
            && &part.sha256 == expected
        {
            // Verified when written: link it into place, no second read.
            let source = self.part_path(upload, &part.name)?;
            let target = self.blob_path(expected);
            let name = part.name.clone();
            tokio::task::spawn_blocking(move || -> Result<(), PutError> {
                match fs::hard_link(&source, &target) {
                    Ok(()) => {}
                    // Content-addressed: an existing blob has these bytes.
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        return Err(PutError::PartMissing(name));
                    }
                    Err(e) => return Err(StoreError::Io(e).into()),
                }
                sync_dir(target.parent().unwrap_or(Path::new("."))).map_err(StoreError::Io)?;
                Ok(())
            })
            .await
            .map_err(StoreError::from)??;
            return Ok(part.size);
        }
        let mut paths = Vec::with_capacity(parts.len());
        for part in parts {
            paths.push((self.part_path(upload, &part.name)?, part.name.clone()));
        }
        let body: ByteStream = Box::pin(
            futures_util::stream::iter(paths)
                .then(|(path, name)| async move {
                    match tokio::fs::File::open(&path).await {
                        Ok(file) => Ok(tokio_util::io::ReaderStream::with_capacity(
                            file,
                            WRITE_BATCH,
                        )),
                        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(io::Error::new(
                            io::ErrorKind::NotFound,
                            format!("upload part {name} is missing"),
                        )),
                        Err(e) => Err(e),
                    }
                })
                .try_flatten(),
        );
        self.put(expected, body, u64::MAX)
            .await
            .map_err(|e| super::part_read_failure(e, StoreError::Io))
    }

    async fn delete_part(&self, upload: &str, part: &UploadPart) -> Result<(), StoreError> {
        let path = self.part_path(upload, &part.name)?;
        tokio::task::spawn_blocking(move || not_found_to_none(fs::remove_file(path))).await??;
        Ok(())
    }

    async fn delete_upload(&self, upload: &str) -> Result<(), StoreError> {
        let path = self.upload_path(upload)?;
        tokio::task::spawn_blocking(move || not_found_to_none(fs::remove_dir_all(path))).await??;
        Ok(())
    }

    async fn list_uploads(&self) -> Result<Vec<StoredUpload>, StoreError> {
        let dir = self.root.join("uploads");
        tokio::task::spawn_blocking(move || -> Result<Vec<StoredUpload>, StoreError> {
            let mut out = Vec::new();
            for entry in fs::read_dir(dir)? {
                let entry = entry?;
                let id = entry.file_name().to_string_lossy().into_owned();
                if !valid_upload_id(&id) {
                    continue;
                }
                // A part arriving renames into the directory, which updates
                // the directory's modification time.
                let modified_ms = entry
                    .metadata()?
                    .modified()?
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                out.push(StoredUpload { id, modified_ms });
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
    use super::read::{fully_resident, map_window, page_size};
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_verified_file_is_not_hashed_again_but_a_changed_one_is() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path(), FsOptions::default()).unwrap();
        let data: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let digest = Digest::sha256_of(&data);
        let body: ByteStream =
            Box::pin(futures_util::stream::iter([Ok(Bytes::from(data.clone()))]));
        store.put(&digest, body, u64::MAX).await.unwrap();
        assert_eq!(store.reads.verified_count(), 0);
        for round in 0..2 {
            let read = store.read(&digest, None).await.unwrap().unwrap();
            let got: Vec<Bytes> = read.stream.try_collect().await.unwrap();
            assert_eq!(got.concat(), data, "round {round}");
            assert_eq!(store.reads.verified_count(), 1, "round {round}");
        }
        // Distrusted (a scrub found it corrupt): the next read checks again.
        store.distrust(&digest);
        assert_eq!(store.reads.verified_count(), 0);
        let read = store.read(&digest, None).await.unwrap().unwrap();
        let got: Vec<Bytes> = read.stream.try_collect().await.unwrap();
        assert_eq!(got.concat(), data);
        assert_eq!(store.reads.verified_count(), 1);
        // A range read proves nothing about the whole.
        let path = store.blob_path(&digest);
        let fresh = FsBlobStore::open(dir.path(), FsOptions::default()).unwrap();
        let range = ByteRange { start: 0, end: 99 };
        let read = fresh.read(&digest, Some(range)).await.unwrap().unwrap();
        let got: Vec<Bytes> = read.stream.try_collect().await.unwrap();
        assert_eq!(got.concat(), data[..100]);
        assert_eq!(fresh.reads.verified_count(), 0);
        // Changed in place (same inode, new times): it is checked again, and
        // the corruption is caught.
        let mut bytes = fs::read(&path).unwrap();
        bytes[2 * 1024 * 1024] ^= 1;
        std::thread::sleep(std::time::Duration::from_millis(10));
        fs::write(&path, bytes).unwrap();
        assert_corrupt_read_fails(&store, &digest, data.len()).await;
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
        let first: ByteStream = Box::pin(futures_util::stream::iter([Ok(Bytes::from(
            data[..700_000].to_vec(),
        ))]));
        let first = store.write_part(id, None, first, u64::MAX).await.unwrap();
        let rest: ByteStream = Box::pin(futures_util::stream::iter([Ok(Bytes::from(
            data[700_000..].to_vec(),
        ))]));
        let rest = store.write_part(id, None, rest, u64::MAX).await.unwrap();
        store
            .commit_parts(id, &[first, rest], &digest)
            .await
            .unwrap();
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
