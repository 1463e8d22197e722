//! Serving a file: mapped windows, verified on the way out.
//!
//! A whole read is checked against the blob's checksum the first time each
//! file is served since the process started; after that, the same file (same
//! device, inode, size and change time) is served without hashing it again.
//! Blob files are immutable once installed and a new write is a new file, so
//! what that skips is only re-checking bytes already proven good; rot at rest
//! after that is what `berth scrub` (which always hashes) is for. Hashing
//! every read cost about a fifth of the CPU of serving 64 MiB blobs.
//!
//! The windows that feed responses share a budget: each is smaller when many
//! downloads run at once (and a response has one chunk in flight at a time,
//! see `blob::pace`), so a pull storm of hundreds of downloads does not hold
//! hundreds of megabytes (mapped file pages count in the process's resident
//! memory as much as heap does). Large
//! windows are mapped (no copy); small ones are read, as a mapping's cost is
//! per call. Either is made on the async worker itself when the pages are
//! already in memory (the common case when many hosts pull one image), and on
//! a blocking thread when they must come from the disk.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::{fs::File, io};

use berth_oci::{Digest, Hasher};
use bytes::Bytes;
use xxhash_rust::xxh3::Xxh3;

use crate::blob::ByteStream;

pub(super) fn page_size() -> u64 {
    static PAGE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    // SAFETY: sysconf has no preconditions.
    *PAGE.get_or_init(|| match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as u64,
        _ => 4096,
    })
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
pub(super) fn map_window(file: &File, pos: u64, len: usize) -> io::Result<Bytes> {
    if len == 0 {
        return Ok(Bytes::new());
    }
    let page = page_size();
    let (map, skip) = map_pages(file, pos, len, true)?;
    if !fully_resident(&map, page) {
        tracing::warn!("blob pages could not be loaded; reading them instead of mapping");
        let mut buf = vec![0u8; len];
        std::os::unix::fs::FileExt::read_exact_at(file, &mut buf, pos)?;
        return Ok(Bytes::from(buf));
    }
    Ok(Bytes::from_owner(map).slice(skip..))
}

/// Whether every page of the mapping is in memory.
pub(super) fn fully_resident(map: &memmap2::Mmap, page: u64) -> bool {
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
pub(super) enum Verifier {
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

    /// Cheap enough per window to run on an async worker (XXH3 runs at about
    /// 10 GB/s; SHA-256, five times slower, goes to a blocking thread).
    fn is_cheap(&self) -> bool {
        matches!(self, Verifier::Checksum(..))
    }
}

/// Window bytes all concurrent downloads share.
const WINDOW_BUDGET: usize = 8 * 1024 * 1024;
/// The largest window: fewer, larger windows mean fewer unmaps (each costs
/// the other cores a TLB flush).
const MAX_WINDOW: usize = 1024 * 1024;
/// The smallest window, however many downloads run.
const MIN_WINDOW: usize = 16 * 1024;
/// Windows from this size on are mapped; smaller ones are read.
const MAP_FROM: usize = 256 * 1024;
/// How many verified files are remembered; when full, the set starts over
/// (a file forgotten is verified again on its next read, nothing worse).
const MAX_VERIFIED: usize = 16 * 1024;

/// Which file a read opened: a new write of a blob is a new file (a rename
/// installs it), so this tells a file already verified from any other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct FileIdentity {
    dev: u64,
    ino: u64,
    size: u64,
    ctime: (i64, i64),
    mtime: (i64, i64),
}

impl FileIdentity {
    pub(super) fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            mtime: (meta.mtime(), meta.mtime_nsec()),
        }
    }
}

/// What the reads of one store share: the files verified since start and
/// the number of downloads in flight.
#[derive(Default)]
pub(super) struct Reads {
    /// By digest: the file that was proven to hold it.
    verified: Mutex<HashMap<Digest, FileIdentity>>,
    active: AtomicUsize,
}

impl Reads {
    pub(super) fn is_verified(&self, digest: &Digest, file: &FileIdentity) -> bool {
        self.verified
            .lock()
            .map(|set| set.get(digest) == Some(file))
            .unwrap_or(false)
    }

    fn remember_verified(&self, digest: Digest, file: FileIdentity) {
        if let Ok(mut set) = self.verified.lock() {
            if set.len() >= MAX_VERIFIED {
                set.clear();
            }
            set.insert(digest, file);
        }
    }

    pub(super) fn distrust(&self, digest: &Digest) {
        if let Ok(mut set) = self.verified.lock() {
            set.remove(digest);
        }
    }

    /// The next window's size, by the downloads in flight now.
    fn window(&self) -> usize {
        let active = self.active.load(Ordering::Relaxed).max(1);
        let page = page_size() as usize;
        let size = (WINDOW_BUDGET / active).clamp(MIN_WINDOW, MAX_WINDOW);
        // At least a page (64 KiB on some kernels, more than MIN_WINDOW).
        (size - size % page).max(page)
    }

    #[cfg(test)]
    pub(super) fn verified_count(&self) -> usize {
        self.verified.lock().map(|set| set.len()).unwrap_or(0)
    }
}

/// Counts a download in flight for as long as its stream lives.
struct Active(Arc<Reads>);

impl Active {
    fn new(reads: Arc<Reads>) -> Self {
        reads.active.fetch_add(1, Ordering::Relaxed);
        Self(reads)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

pub(super) struct ReadState {
    file: Arc<File>,
    pos: u64,
    end: u64,
    verifier: Option<Verifier>,
    digest: Digest,
    /// Set when the read verifies: remembered once it matched.
    identity: Option<FileIdentity>,
    active: Active,
}

impl ReadState {
    pub(super) fn new(
        reads: Arc<Reads>,
        file: File,
        (pos, end): (u64, u64),
        verifier: Option<(Verifier, FileIdentity)>,
        digest: Digest,
    ) -> Self {
        let (verifier, identity) = verifier.map_or((None, None), |(v, id)| (Some(v), Some(id)));
        Self {
            file: Arc::new(file),
            pos,
            end,
            verifier,
            digest,
            identity,
            active: Active::new(reads),
        }
    }

    /// Takes `buf` (the window at `pos`) as served: checks it and, at the
    /// end of the file, the whole.
    fn advance(mut self, buf: Bytes) -> io::Result<(Bytes, ReadState)> {
        self.pos += buf.len() as u64;
        if let Some(v) = self.verifier.as_mut() {
            v.update(&buf);
        }
        if self.pos == self.end
            && let Some(v) = self.verifier.take()
        {
            if !v.matches(&self.digest) {
                tracing::error!(digest = %self.digest, "stored blob is corrupt; refusing to serve it");
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("stored blob {} is corrupt", self.digest),
                ));
            }
            if let Some(identity) = self.identity.take() {
                self.active
                    .0
                    .remember_verified(self.digest.clone(), identity);
            }
        }
        Ok((buf, self))
    }
}

/// Maps a window on the calling (async) thread when every page of it is
/// already in memory, which is the common case when many hosts pull the same
/// image: no blocking thread, no wait. `None` when a page would have to be
/// read from the disk (or the mapping failed: the blocking path reports why).
fn map_if_resident(file: &File, pos: u64, len: usize) -> Option<Bytes> {
    let (map, skip) = map_pages(file, pos, len, false).ok()?;
    fully_resident(&map, page_size()).then(|| Bytes::from_owner(map).slice(skip..))
}

/// Maps the pages holding `len` bytes at `pos` (populated when asked), and
/// where in the mapping `pos` falls.
fn map_pages(
    file: &File,
    pos: u64,
    len: usize,
    populate: bool,
) -> io::Result<(memmap2::Mmap, usize)> {
    let page = page_size();
    let aligned = pos - pos % page;
    let skip = (pos - aligned) as usize;
    let mut options = memmap2::MmapOptions::new();
    options.offset(aligned).len(skip + len);
    if populate {
        options.populate();
    }
    // SAFETY: blob files are immutable once installed (written to a temporary
    // name, synced, renamed) and are only ever unlinked, never truncated or
    // rewritten, so the mapped bytes cannot change or vanish under us.
    let map = unsafe { options.map(file)? };
    Ok((map, skip))
}

/// Reads a window on the calling (async) thread when every byte of it is in
/// the page cache (`RWF_NOWAIT`: the kernel refuses rather than wait for the
/// disk). `None` otherwise.
fn read_if_resident(file: &File, pos: u64, len: usize) -> Option<Bytes> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::fd::AsRawFd as _;
        let mut buf = vec![0u8; len];
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: len,
        };
        let offset = libc::off_t::try_from(pos).ok()?;
        // SAFETY: one iovec over `buf`, which lives and is `len` bytes long
        // for the whole call; the descriptor is open while `file` is borrowed.
        let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, offset, libc::RWF_NOWAIT) };
        // A short read (part resident) goes the blocking way, whole.
        (usize::try_from(n).ok() == Some(len)).then(|| Bytes::from(buf))
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = (file, pos, len);
        None
    }
}

/// Reads a window, waiting for the disk if need be (a blocking thread's job).
fn read_window(file: &File, pos: u64, len: usize) -> io::Result<Bytes> {
    let mut buf = vec![0u8; len];
    std::os::unix::fs::FileExt::read_exact_at(file, &mut buf, pos)?;
    Ok(Bytes::from(buf))
}

pub(super) fn read_stream(state: ReadState) -> ByteStream {
    Box::pin(futures_util::stream::try_unfold(
        state,
        |state| async move {
            if state.pos >= state.end {
                return Ok(None);
            }
            let len = (state.end - state.pos).min(state.active.0.window() as u64) as usize;
            if len == 0 {
                return Err(io::Error::other("a read window of no bytes"));
            }
            let map = len >= MAP_FROM;
            let cheap = state.verifier.as_ref().is_none_or(Verifier::is_cheap);
            let inline = match (cheap, map) {
                (false, _) => None,
                (true, true) => map_if_resident(&state.file, state.pos, len),
                (true, false) => read_if_resident(&state.file, state.pos, len),
            };
            if let Some(buf) = inline {
                return state.advance(buf).map(Some);
            }
            tokio::task::spawn_blocking(move || {
                let buf = if map {
                    map_window(&state.file, state.pos, len)?
                } else {
                    read_window(&state.file, state.pos, len)?
                };
                state.advance(buf).map(Some)
            })
            .await
            .map_err(io::Error::other)?
        },
    ))
}
