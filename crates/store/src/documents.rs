//! Small named documents kept beside blobs (a backup's index): written
//! whole and durably, read whole, listed by name. Unlike blobs they are not
//! content-addressed, so a name can be replaced; a write is atomic (a
//! reader sees the old document or the new one, never part of one).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::TryStreamExt;
use object_store::ObjectStoreExt as _;
use object_store::aws::AmazonS3;

use crate::StoreError;

/// The most a document may hold: they are indexes, not data.
pub const MAX_DOCUMENT: u64 = 64 * 1024 * 1024;

#[async_trait]
pub trait Documents: Send + Sync + 'static {
    /// Writes `name` whole; durable when this returns.
    async fn put(&self, name: &str, bytes: Bytes) -> Result<(), StoreError>;

    /// The document, if there is one.
    async fn get(&self, name: &str) -> Result<Option<Bytes>, StoreError>;

    /// Every document's name, sorted.
    async fn list(&self) -> Result<Vec<String>, StoreError>;

    async fn delete(&self, name: &str) -> Result<(), StoreError>;
}

/// A document name is one path segment of safe characters, so that no name
/// leaves its directory or prefix.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn invalid(name: &str) -> StoreError {
    StoreError::Io(std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("invalid document name {name:?}"),
    ))
}

/// Documents as files in one directory, each written to a temporary file,
/// fsynced, renamed into place and the directory fsynced.
pub struct DirDocuments {
    dir: PathBuf,
}

impl DirDocuments {
    /// Opens (creating) the directory. Blocking: call at startup.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }
}

#[async_trait]
impl Documents for DirDocuments {
    async fn put(&self, name: &str, bytes: Bytes) -> Result<(), StoreError> {
        if !valid_name(name) {
            return Err(invalid(name));
        }
        let dir = self.dir.clone();
        let name = name.to_string();
        tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
            use std::io::Write as _;
            let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            std::fs::rename(&tmp, dir.join(&name))?;
            std::fs::File::open(&dir)?.sync_all()?;
            Ok(())
        })
        .await?
    }

    async fn get(&self, name: &str) -> Result<Option<Bytes>, StoreError> {
        if !valid_name(name) {
            return Err(invalid(name));
        }
        let path = self.dir.join(name);
        tokio::task::spawn_blocking(move || -> Result<Option<Bytes>, StoreError> {
            match std::fs::metadata(&path) {
                Ok(m) if m.len() > MAX_DOCUMENT => Err(StoreError::Database(format!(
                    "document {} is larger than {MAX_DOCUMENT} bytes",
                    path.display()
                ))),
                Ok(_) => Ok(Some(Bytes::from(std::fs::read(&path)?))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e.into()),
            }
        })
        .await?
    }

    async fn list(&self) -> Result<Vec<String>, StoreError> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || -> Result<Vec<String>, StoreError> {
            let mut names = Vec::new();
            for entry in std::fs::read_dir(&dir)? {
                let name = entry?.file_name();
                if let Some(name) = name.to_str()
                    && valid_name(name)
                {
                    names.push(name.to_string());
                }
            }
            names.sort();
            Ok(names)
        })
        .await?
    }

    async fn delete(&self, name: &str) -> Result<(), StoreError> {
        if !valid_name(name) {
            return Err(invalid(name));
        }
        let dir = self.dir.clone();
        let name = name.to_string();
        tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
            match std::fs::remove_file(dir.join(&name)) {
                Ok(()) => Ok(std::fs::File::open(&dir)?.sync_all()?),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e.into()),
            }
        })
        .await?
    }
}

/// Documents as objects under a prefix of a bucket. An S3 PUT is atomic
/// and durable when acknowledged.
pub struct S3Documents {
    pub(crate) store: Arc<AmazonS3>,
    /// Ends with `/` (or is empty).
    pub(crate) prefix: String,
}

fn unavailable(e: object_store::Error) -> StoreError {
    StoreError::Unavailable(format!("object storage: {e}"))
}

impl S3Documents {
    fn key(&self, name: &str) -> Result<object_store::path::Path, StoreError> {
        if !valid_name(name) {
            return Err(invalid(name));
        }
        Ok(object_store::path::Path::from(format!(
            "{}{name}",
            self.prefix
        )))
    }
}

#[async_trait]
impl Documents for S3Documents {
    async fn put(&self, name: &str, bytes: Bytes) -> Result<(), StoreError> {
        let key = self.key(name)?;
        self.store
            .put(&key, bytes.into())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn get(&self, name: &str) -> Result<Option<Bytes>, StoreError> {
        let key = self.key(name)?;
        match self.store.get(&key).await {
            Ok(got) => {
                if got.meta.size > MAX_DOCUMENT {
                    return Err(StoreError::Database(format!(
                        "document {name} is larger than {MAX_DOCUMENT} bytes"
                    )));
                }
                Ok(Some(got.bytes().await.map_err(unavailable)?))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn list(&self) -> Result<Vec<String>, StoreError> {
        use object_store::ObjectStore as _;
        let root = object_store::path::Path::from(self.prefix.trim_end_matches('/'));
        let listed: Vec<object_store::ObjectMeta> = self
            .store
            .list(Some(&root))
            .try_collect()
            .await
            .map_err(unavailable)?;
        let mut names: Vec<String> = listed
            .into_iter()
            .filter_map(|m| {
                let name = m.location.as_ref().strip_prefix(&self.prefix)?.to_string();
                valid_name(&name).then_some(name)
            })
            .collect();
        names.sort();
        Ok(names)
    }

    async fn delete(&self, name: &str) -> Result<(), StoreError> {
        let key = self.key(name)?;
        match self.store.delete(&key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn directory_documents_are_replaced_whole_listed_and_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let docs = DirDocuments::open(&dir.path().join("backups")).unwrap();
        assert!(docs.get("a.json").await.unwrap().is_none());
        docs.put("b.json", Bytes::from_static(b"1")).await.unwrap();
        docs.put("a.json", Bytes::from_static(b"2")).await.unwrap();
        docs.put("a.json", Bytes::from_static(b"3")).await.unwrap();
        assert_eq!(docs.get("a.json").await.unwrap().unwrap(), "3");
        assert_eq!(docs.list().await.unwrap(), ["a.json", "b.json"]);
        docs.delete("a.json").await.unwrap();
        docs.delete("a.json").await.unwrap();
        assert_eq!(docs.list().await.unwrap(), ["b.json"]);
        for bad in ["", "../x", "a/b", ".hidden", "a b"] {
            assert!(docs.put(bad, Bytes::new()).await.is_err(), "{bad}");
        }
    }
}
