//! OCI image layouts (image-spec `image-layout.md`): a directory with
//! `oci-layout`, `index.json` and `blobs/ALG/HEX`, or the same as a tar
//! file. Exports write one, imports read one (ours, or skopeo's `oci:` and
//! `oci-archive:`). Images are named in `index.json` by the
//! `org.opencontainers.image.ref.name` annotation: `REPOSITORY:TAG`.

use std::collections::{HashMap, HashSet};
use std::io::SeekFrom;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use berth_oci::Digest;
use berth_store::ByteStream;
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::{MAX_MANIFEST, Sink, Source, TransferError};

pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
/// Largest `index.json` read.
const MAX_INDEX: u64 = 16 << 20;

fn blob_name(digest: &Digest) -> String {
    format!("blobs/{}/{}", digest.algorithm().as_str(), digest.encoded())
}

/// Whether a path names a tar: the layout goes into one file.
pub fn is_tar(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "tar")
}

enum Writer {
    Dir(PathBuf),
    /// The tar being written (`FILE.tar.part` until it is complete) and
    /// what it holds.
    Tar {
        file: tokio::fs::File,
        part: PathBuf,
        done: PathBuf,
        written: HashSet<Digest>,
    },
}

/// A layout being written.
pub struct LayoutSink {
    writer: tokio::sync::Mutex<Writer>,
    /// `index.json`'s manifests: what was in a directory already, then
    /// what this export added.
    entries: std::sync::Mutex<Vec<Value>>,
}

fn io(what: &str, e: impl std::fmt::Display) -> TransferError {
    TransferError::Destination(format!("{what}: {e}"))
}

/// A tar header for a regular file.
fn tar_header(name: &str, size: u64) -> Result<[u8; 512], TransferError> {
    let mut header = tar::Header::new_ustar();
    header.set_path(name).map_err(|e| io(name, e))?;
    header.set_size(size);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    let mut out = [0u8; 512];
    out.copy_from_slice(header.as_bytes());
    Ok(out)
}

impl LayoutSink {
    /// Opens `path` for writing: a directory (created, or added to), or a
    /// new `.tar` file.
    pub async fn create(path: &Path) -> Result<Self, TransferError> {
        let mut entries = Vec::new();
        let writer = if is_tar(path) {
            let part = path.with_extension("tar.part");
            let file = tokio::fs::File::create(&part)
                .await
                .map_err(|e| io(&part.display().to_string(), e))?;
            Writer::Tar {
                file,
                part,
                done: path.to_path_buf(),
                written: HashSet::new(),
            }
        } else {
            for alg in ["sha256", "sha512"] {
                tokio::fs::create_dir_all(path.join("blobs").join(alg))
                    .await
                    .map_err(|e| io(&path.display().to_string(), e))?;
            }
            if let Ok(bytes) = tokio::fs::read(path.join("index.json")).await {
                let index: Value =
                    serde_json::from_slice(&bytes).map_err(|e| io("the existing index.json", e))?;
                entries = index["manifests"].as_array().cloned().unwrap_or_default();
            }
            Writer::Dir(path.to_path_buf())
        };
        Ok(Self {
            writer: tokio::sync::Mutex::new(writer),
            entries: std::sync::Mutex::new(entries),
        })
    }

    /// Writes `index.json` and `oci-layout`: the layout is complete (a
    /// tar is renamed into place only now).
    pub async fn finish(self) -> Result<(), TransferError> {
        let entries = self.entries.lock().map(|e| e.clone()).unwrap_or_default();
        let index =
            json!({ "schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": entries });
        let index = serde_json::to_vec_pretty(&index).map_err(|e| io("index.json", e))?;
        let marker = br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec();
        match self.writer.into_inner() {
            Writer::Dir(dir) => {
                for (name, bytes) in [("oci-layout", marker), ("index.json", index)] {
                    let tmp = dir.join(format!(".{name}.tmp"));
                    let mut file = tokio::fs::File::create(&tmp)
                        .await
                        .map_err(|e| io(name, e))?;
                    file.write_all(&bytes).await.map_err(|e| io(name, e))?;
                    file.sync_all().await.map_err(|e| io(name, e))?;
                    tokio::fs::rename(&tmp, dir.join(name))
                        .await
                        .map_err(|e| io(name, e))?;
                }
                Ok(())
            }
            Writer::Tar {
                mut file,
                part,
                done,
                ..
            } => {
                for (name, bytes) in [("oci-layout", marker), ("index.json", index)] {
                    file.write_all(&tar_header(name, bytes.len() as u64)?)
                        .await
                        .map_err(|e| io(name, e))?;
                    file.write_all(&bytes).await.map_err(|e| io(name, e))?;
                    pad(&mut file, bytes.len() as u64).await?;
                }
                // The end of the archive: two zero blocks.
                file.write_all(&[0u8; 1024])
                    .await
                    .map_err(|e| io("tar", e))?;
                file.sync_all().await.map_err(|e| io("tar", e))?;
                tokio::fs::rename(&part, &done)
                    .await
                    .map_err(|e| io(&done.display().to_string(), e))?;
                Ok(())
            }
        }
    }

    /// Names an exported image in `index.json`.
    pub fn name_image(&self, name: &str, digest: &Digest, media_type: &str, size: u64) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.retain(|e| e["annotations"][REF_NAME] != name);
            entries.push(json!({
                "mediaType": media_type,
                "digest": digest.to_string(),
                "size": size,
                "annotations": { REF_NAME: name },
            }));
        }
    }

    async fn write_blob(
        &self,
        digest: &Digest,
        size: u64,
        body: ByteStream,
    ) -> Result<(), TransferError> {
        let mut writer = self.writer.lock().await;
        let name = blob_name(digest);
        match &mut *writer {
            Writer::Dir(dir) => {
                let path = dir.join(&name);
                let tmp = dir.join(format!("{name}.tmp"));
                let mut file = tokio::fs::File::create(&tmp)
                    .await
                    .map_err(|e| io(&name, e))?;
                let written = async {
                    let mut body = body;
                    while let Some(chunk) = body.next().await {
                        file.write_all(&chunk?).await?;
                    }
                    file.sync_all().await
                }
                .await;
                if let Err(e) = written {
                    let _ = tokio::fs::remove_file(&tmp).await;
                    return Err(io(&name, e));
                }
                tokio::fs::rename(&tmp, &path)
                    .await
                    .map_err(|e| io(&name, e))?;
                Ok(())
            }
            Writer::Tar { file, written, .. } => {
                if written.contains(digest) {
                    return Ok(());
                }
                file.write_all(&tar_header(&name, size)?)
                    .await
                    .map_err(|e| io(&name, e))?;
                let mut body = body;
                while let Some(chunk) = body.next().await {
                    // A failure mid-entry leaves the tar unusable: the
                    // export stops, and the `.part` file is never renamed.
                    let chunk = chunk.map_err(|e| io(&name, e))?;
                    file.write_all(&chunk).await.map_err(|e| io(&name, e))?;
                }
                pad(file, size).await?;
                written.insert(digest.clone());
                Ok(())
            }
        }
    }
}

/// Whether the file at `path` is `size` bytes hashing to `digest`.
async fn file_matches(path: &Path, digest: &Digest, size: u64) -> bool {
    if !tokio::fs::metadata(path)
        .await
        .is_ok_and(|m| m.is_file() && m.len() == size)
    {
        return false;
    }
    let Ok(file) = tokio::fs::File::open(path).await else {
        return false;
    };
    let mut stream = tokio_util::io::ReaderStream::new(file);
    let mut hasher = digest.algorithm().hasher();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) => hasher.update(&chunk),
            Err(_) => return false,
        }
    }
    hasher.finish() == *digest
}

async fn pad(file: &mut tokio::fs::File, size: u64) -> Result<(), TransferError> {
    let rest = (512 - size % 512) % 512;
    file.write_all(&vec![0u8; rest as usize])
        .await
        .map_err(|e| io("tar", e))
}

#[async_trait]
impl Sink for LayoutSink {
    async fn has_blob(
        &self,
        _repo: &str,
        digest: &Digest,
        size: u64,
    ) -> Result<bool, TransferError> {
        let writer = self.writer.lock().await;
        Ok(match &*writer {
            // A blob left by an earlier export counts only if it hashes
            // right: a damaged one is written again.
            Writer::Dir(dir) => file_matches(&dir.join(blob_name(digest)), digest, size).await,
            Writer::Tar { written, .. } => written.contains(digest),
        })
    }

    async fn put_blob(
        &self,
        _repo: &str,
        digest: &Digest,
        size: u64,
        body: ByteStream,
    ) -> Result<(), TransferError> {
        self.write_blob(digest, size, body).await
    }

    async fn manifest_digest(
        &self,
        _repo: &str,
        _reference: &str,
    ) -> Result<Option<Digest>, TransferError> {
        // An export writes every manifest it is asked for (a tag may
        // have moved since a previous export into the same directory).
        Ok(None)
    }

    async fn put_manifest(
        &self,
        _repo: &str,
        _reference: &str,
        _media_type: &str,
        bytes: Bytes,
    ) -> Result<(), TransferError> {
        let digest = Digest::sha256_of(&bytes);
        let size = bytes.len() as u64;
        if self.has_blob("", &digest, size).await? {
            return Ok(());
        }
        let body: ByteStream = Box::pin(futures_util::stream::iter([Ok(bytes)]));
        self.write_blob(&digest, size, body).await
    }
}

/// Where a layout's entries are.
enum Reader {
    Dir(PathBuf),
    /// The tar file and each member's offset and size.
    Tar(PathBuf, HashMap<String, (u64, u64)>),
}

/// A layout being read.
pub struct LayoutSource {
    reader: Reader,
    /// `index.json`'s manifests.
    pub entries: Vec<Value>,
}

impl LayoutSource {
    pub async fn open(path: &Path) -> Result<Self, TransferError> {
        let reader = if is_tar(path) {
            let file = path.to_path_buf();
            let members = tokio::task::spawn_blocking(move || index_tar(&file))
                .await
                .map_err(|e| TransferError::Source(e.to_string()))??;
            Reader::Tar(path.to_path_buf(), members)
        } else {
            Reader::Dir(path.to_path_buf())
        };
        let mut source = Self {
            reader,
            entries: Vec::new(),
        };
        let index = source.read_whole("index.json", MAX_INDEX).await?;
        let index: Value = serde_json::from_slice(&index)
            .map_err(|e| TransferError::Invalid(format!("index.json: {e}")))?;
        source.entries = index["manifests"].as_array().cloned().unwrap_or_default();
        Ok(source)
    }

    /// A member's bytes as a stream, and its size.
    async fn open_member(&self, name: &str) -> Result<Option<(ByteStream, u64)>, TransferError> {
        let (path, offset, size) = match &self.reader {
            Reader::Dir(dir) => {
                let path = dir.join(name);
                match tokio::fs::symlink_metadata(&path).await {
                    // Only plain files of the layout: no links out of it,
                    // no devices or pipes that would hang a read.
                    Ok(m) if !m.is_file() => {
                        return Err(TransferError::Invalid(format!(
                            "{name} in the layout is not a plain file"
                        )));
                    }
                    Ok(m) => (path, 0, m.len()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(e.into()),
                }
            }
            Reader::Tar(file, members) => match members.get(name) {
                Some((offset, size)) => (file.clone(), *offset, *size),
                None => return Ok(None),
            },
        };
        let mut file = tokio::fs::File::open(&path).await?;
        file.seek(SeekFrom::Start(offset)).await?;
        let stream = tokio_util::io::ReaderStream::new(file.take(size));
        Ok(Some((Box::pin(stream), size)))
    }

    async fn read_whole(&self, name: &str, max: u64) -> Result<Vec<u8>, TransferError> {
        let (mut stream, size) = self
            .open_member(name)
            .await?
            .ok_or_else(|| TransferError::Invalid(format!("the layout has no {name}")))?;
        if size > max {
            return Err(TransferError::Invalid(format!(
                "{name} is larger than {max} bytes"
            )));
        }
        let mut out = Vec::with_capacity(size as usize);
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    }

    /// The digest `index.json` names `reference` by (a `ref.name`, whole or
    /// as `REPOSITORY:TAG`), or the reference itself if it is a digest.
    fn resolve(&self, repo: &str, reference: &str) -> Option<(Digest, String)> {
        if let Ok(digest) = reference.parse::<Digest>() {
            let media_type = self
                .entries
                .iter()
                .find(|e| e["digest"] == reference)
                .and_then(|e| e["mediaType"].as_str())
                .unwrap_or_default()
                .to_string();
            return Some((digest, media_type));
        }
        let full = format!("{repo}:{reference}");
        self.entries.iter().find_map(|e| {
            let name = e["annotations"][REF_NAME].as_str()?;
            if name != full && !(repo.is_empty() && name == reference) {
                return None;
            }
            Some((
                e["digest"].as_str()?.parse().ok()?,
                e["mediaType"].as_str().unwrap_or_default().to_string(),
            ))
        })
    }
}

/// Each regular member of a tar: its offset and size (reading headers
/// only, seeking past the data).
fn index_tar(path: &Path) -> Result<HashMap<String, (u64, u64)>, TransferError> {
    let file = std::fs::File::open(path)?;
    let mut archive = tar::Archive::new(file);
    let mut members = HashMap::new();
    for entry in archive.entries_with_seek()? {
        let entry = entry?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let name = entry
            .path()?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string();
        members.insert(name, (entry.raw_file_position(), entry.size()));
    }
    Ok(members)
}

#[async_trait]
impl Source for LayoutSource {
    async fn manifest(
        &self,
        repo: &str,
        reference: &str,
    ) -> Result<(Bytes, String), TransferError> {
        let (digest, listed_type) = self.resolve(repo, reference).ok_or_else(|| {
            TransferError::Source(format!("the layout has no image {repo}:{reference}"))
        })?;
        let bytes = self.read_whole(&blob_name(&digest), MAX_MANIFEST).await?;
        if Digest::of(digest.algorithm(), &bytes) != digest {
            return Err(TransferError::Digest(format!(
                "the layout's manifest {digest}"
            )));
        }
        let media_type = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v["mediaType"].as_str().map(str::to_string))
            .unwrap_or(listed_type);
        Ok((Bytes::from(bytes), media_type))
    }

    async fn blob(
        &self,
        _repo: &str,
        digest: &Digest,
        _size: u64,
    ) -> Result<ByteStream, TransferError> {
        match self.open_member(&blob_name(digest)).await? {
            Some((stream, _)) => Ok(stream),
            None => Err(TransferError::Source(format!(
                "the layout has no blob {digest}"
            ))),
        }
    }
}
