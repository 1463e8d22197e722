//! Where backups live: a directory on the node, or a bucket prefix
//! (`s3://BUCKET/PREFIX`, with the node's AWS variables). Blobs (layers,
//! manifests and the metadata chunks) are content-addressed under `blobs/`
//! and shared by every backup in the target; each backup is one index
//! document under `backups/`, written last; the archived change log is
//! under `log/`.

use std::path::Path;
use std::sync::Arc;

use berth_store::blob::fs::FsOptions;
use berth_store::{BlobStore, DirDocuments, Documents, FsBlobStore, S3BlobStore, S3Options};
use bytes::Bytes;

use super::{BackupError, BackupIndex};

#[derive(Clone)]
pub struct Target {
    url: String,
    pub(super) blobs: Arc<dyn BlobStore>,
    docs: Arc<dyn Documents>,
    /// The archived change log (`log/`), see `archive`.
    pub(super) log: Arc<dyn Documents>,
}

const INDEX_SUFFIX: &str = ".json";
/// Names the registry whose backups the target holds.
const OWNER: &str = "OWNER";

impl Target {
    /// Opens (creating) the target that `url` names: an absolute directory
    /// path, or `s3://BUCKET[/PREFIX]`. Blocking for a directory (it lays
    /// out the blob tree): call from a blocking context or at startup.
    pub fn open(url: &str) -> Result<Self, BackupError> {
        let invalid = |why: &str| BackupError::Target(format!("{url}: {why}"));
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(invalid("no bucket"));
            }
            let mut options = S3Options::new(bucket);
            options.prefix = prefix.to_string();
            // Every whole read re-hashes: a backup is read to restore.
            options.verify_reads = true;
            // Long enough for an 8 MiB part on a slow link.
            options.request_timeout = std::time::Duration::from_secs(60);
            let store = S3BlobStore::from_env(options)?;
            let docs = store.documents("backups");
            let log = store.documents("log");
            return Ok(Self {
                url: url.to_string(),
                blobs: Arc::new(store),
                docs: Arc::new(docs),
                log: Arc::new(log),
            });
        }
        let dir = Path::new(url.strip_prefix("file://").unwrap_or(url));
        if !dir.is_absolute() {
            return Err(invalid(
                "a directory target must be an absolute path (or s3://BUCKET/PREFIX)",
            ));
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| invalid(&format!("cannot create the directory: {e}")))?;
        let blobs = FsBlobStore::open(dir, FsOptions { verify_reads: true })?;
        let docs = DirDocuments::open(&dir.join("backups"))?;
        let log = DirDocuments::open(&dir.join("log"))?;
        Ok(Self {
            url: url.to_string(),
            blobs: Arc::new(blobs),
            docs: Arc::new(docs),
            log: Arc::new(log),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Makes sure the target holds this registry's backups (claiming it
    /// when new): a prune counts and removes what it finds, so a target
    /// shared by two registries would lose one's backups to the other.
    pub(super) async fn claim(&self, registry: &str) -> Result<(), BackupError> {
        match self.owner().await? {
            Some(owner) if owner == registry => Ok(()),
            Some(owner) => Err(BackupError::Target(format!(
                "{} holds the backups of another registry ({owner}, in its {OWNER} document): a target holds one registry's backups; use another, or remove {OWNER} if that registry is gone",
                self.url
            ))),
            None => {
                let doc = serde_json::json!({ "registry": registry, "since_ms": crate::now_ms() });
                self.docs.put(OWNER, Bytes::from(doc.to_string())).await?;
                Ok(())
            }
        }
    }

    /// The registry the target belongs to, if it was claimed.
    pub(super) async fn owner(&self) -> Result<Option<String>, BackupError> {
        let Some(bytes) = self.docs.get(OWNER).await? else {
            return Ok(None);
        };
        let doc: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| BackupError::Corrupt(format!("{OWNER} document: {e}")))?;
        Ok(doc["registry"].as_str().map(str::to_string))
    }

    /// Makes the backup listed: the last write of a backup, after every
    /// blob it names is durable in the target.
    pub(super) async fn publish(&self, index: &BackupIndex) -> Result<(), BackupError> {
        let bytes = serde_json::to_vec_pretty(index)
            .map_err(|e| BackupError::Corrupt(format!("encoding the index: {e}")))?;
        self.docs
            .put(&format!("{}{INDEX_SUFFIX}", index.id), Bytes::from(bytes))
            .await?;
        Ok(())
    }

    /// Every listed backup, oldest first. An index that does not parse is
    /// skipped with a warning (it names no backup this version can read).
    pub async fn list(&self) -> Result<Vec<BackupIndex>, BackupError> {
        let mut out = Vec::new();
        for name in self.docs.list().await? {
            let Some(id) = name.strip_suffix(INDEX_SUFFIX) else {
                continue;
            };
            match self.index(id).await {
                Ok(index) => out.push(index),
                Err(e) => {
                    tracing::warn!(target = %self.url, backup = id, error = %e, "skipping a backup index that cannot be read")
                }
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// One backup's index.
    pub async fn index(&self, id: &str) -> Result<BackupIndex, BackupError> {
        if !berth_store::documents::valid_name(id) {
            return Err(BackupError::NotFound(id.to_string()));
        }
        let Some(bytes) = self.docs.get(&format!("{id}{INDEX_SUFFIX}")).await? else {
            return Err(BackupError::NotFound(id.to_string()));
        };
        let index: BackupIndex = serde_json::from_slice(&bytes)
            .map_err(|e| BackupError::Corrupt(format!("index of backup {id}: {e}")))?;
        if index.format != super::FORMAT {
            return Err(BackupError::Corrupt(format!(
                "backup {id} has format {}, this version reads {}",
                index.format,
                super::FORMAT
            )));
        }
        Ok(index)
    }

    /// The named backup, or the newest when `id` is `None`.
    pub async fn pick(&self, id: Option<&str>) -> Result<BackupIndex, BackupError> {
        match id {
            Some(id) => self.index(id).await,
            None => self
                .list()
                .await?
                .pop()
                .ok_or_else(|| BackupError::NotFound("(none in the target)".into())),
        }
    }

    /// Every listed backup, oldest first, failing on any index that cannot
    /// be read: what a prune needs before it removes blobs (an index it
    /// cannot read may still name them).
    pub(super) async fn list_all(&self) -> Result<Vec<BackupIndex>, BackupError> {
        let mut out = Vec::new();
        for name in self.docs.list().await? {
            if let Some(id) = name.strip_suffix(INDEX_SUFFIX) {
                out.push(self.index(id).await?);
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// A metadata chunk's records, verified against its digest.
    pub(super) async fn chunk(
        &self,
        chunk: &super::ChunkRef,
    ) -> Result<Vec<super::dump::Record>, BackupError> {
        let bytes = self
            .blobs
            .read_small(&chunk.digest, super::dump::MAX_CHUNK)
            .await
            .map_err(|e| BackupError::Corrupt(format!("metadata chunk {}: {e}", chunk.digest)))?
            .ok_or_else(|| {
                BackupError::Corrupt(format!("metadata chunk {} is missing", chunk.digest))
            })?;
        super::dump::parse(&bytes)
    }

    pub(super) async fn unpublish(&self, id: &str) -> Result<(), BackupError> {
        self.docs.delete(&format!("{id}{INDEX_SUFFIX}")).await?;
        Ok(())
    }
}

/// A backup target as a source of good bytes for `berth scrub --repair`:
/// its store re-hashes what it reads, and the registry verifies again as
/// it writes.
#[async_trait::async_trait]
impl crate::BlobSource for Target {
    fn describe(&self) -> String {
        format!("backup {}", self.url)
    }

    async fn fetch(
        &self,
        digest: &berth_oci::Digest,
        _repository: Option<&str>,
    ) -> Result<Option<berth_store::ByteStream>, String> {
        match self.blobs.read(digest, None).await {
            Ok(Some(read)) => Ok(Some(read.stream)),
            Ok(None) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }
}
