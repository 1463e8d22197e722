//! The cluster blob engine: an S3-compatible bucket, through `object_store`.
//!
//! Layout: `<prefix>blobs/<alg>/<encoded>` for committed blobs and
//! `<prefix>uploads/<id>/<part>` for the chunks of upload sessions.
//!
//! S3 stores such as Garage have no conditional writes and no rename, so
//! nothing here decides a race: blob keys are content-addressed (two writers
//! of one key write the same bytes), part keys are unique per write, and the
//! MetaStore decides which parts form an upload. What S3 does give is an
//! invisible multipart upload: a blob's bytes are streamed into one, hashed
//! on the way, and the upload is completed (made visible under the blob's
//! key) only if the digest matches; otherwise it is aborted. Small blobs are
//! buffered up to one part and written with a single PUT after the check.
//!
//! Every request has a short timeout and idempotent ones are retried, so a
//! hung storage node costs a client seconds, not minutes. A download is one
//! GET whose body is passed on as it arrives, bounded per read and resumed
//! where it broke off (`read.rs`), so memory stays constant for any blob
//! size.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use berth_oci::{Algorithm, ByteRange, Digest};
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::signer::Signer;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
    WriteMultipart,
};

use super::{BlobRead, BlobStore, ByteStream, PutError, StoredBlob, StoredUpload, UploadPart};
use crate::StoreError;

mod read;

use read::{streamed, verified, windowed};

/// Size of one multipart part, and the most a small blob is buffered.
const PART_SIZE: usize = 8 * 1024 * 1024;
/// Parts of one write in flight at once: with one filling, at most
/// `(PART_CONCURRENCY + 1) * PART_SIZE` of a write is in memory.
const PART_CONCURRENCY: usize = 2;
/// A single-request copy is limited to 5 GiB on AWS S3; a larger part is
/// rewritten instead.
const MAX_COPY: u64 = 5 * 1024 * 1024 * 1024;
/// Timeout of one server-side copy.
const COPY_TIMEOUT: Duration = Duration::from_secs(600);
/// S3 allows 10,000 parts per multipart upload.
const MAX_OBJECT: u64 = 10_000 * PART_SIZE as u64;

#[derive(Clone, Debug)]
pub struct S3Options {
    pub bucket: String,
    /// Prefix of every key, so one bucket can hold several registries.
    pub prefix: String,
    /// Bound on one request (a part, a read window, a metadata call).
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// Retries of a failed idempotent request, within `request_timeout * 3`.
    pub max_retries: usize,
    /// Verify every whole-blob read against its digest.
    pub verify_reads: bool,
    /// Answer blob GETs with a redirect to a URL signed for this long.
    pub redirect_ttl: Option<Duration>,
    /// Keep connections open for later requests. A server that does not set
    /// TCP_NODELAY (Garage 2.5) writes a response's head and body as two
    /// segments; on a reused connection the client acknowledges the first
    /// late (delayed ACK, 40 ms on Linux) and the body waits that long. A
    /// new connection acknowledges at once.
    pub reuse_connections: bool,
}

impl S3Options {
    pub fn new(bucket: impl Into<String>) -> Self {
        Self {
            bucket: bucket.into(),
            prefix: String::new(),
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            max_retries: 3,
            verify_reads: true,
            redirect_ttl: None,
            reuse_connections: true,
        }
    }
}

pub struct S3BlobStore {
    store: Arc<AmazonS3>,
    /// The same bucket without a total request timeout, for downloads.
    reader: Arc<AmazonS3>,
    /// The same bucket with a long request timeout, for server-side copies
    /// (a copy of gigabytes is one request that may take minutes).
    copier: AmazonS3,
    prefix: String,
    options: S3Options,
    /// Objects a whole download verified since start, by digest (see
    /// `read`).
    verified: Arc<std::sync::Mutex<std::collections::HashMap<Digest, ObjectIdentity>>>,
}

/// Which stored object a read found: a blob written again (a repair, a
/// restore) is a new object, with a new modification time and, for other
/// bytes, another ETag.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ObjectIdentity {
    size: u64,
    e_tag: Option<String>,
    modified_ms: i64,
}

/// How many verified objects are remembered; when full, the set starts over.
const MAX_VERIFIED: usize = 16 * 1024;

fn unavailable(e: object_store::Error) -> StoreError {
    StoreError::Unavailable(format!("object storage: {e}"))
}

pub(super) fn is_not_found(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. })
}

impl S3BlobStore {
    /// Connects with the standard AWS variables (`AWS_ENDPOINT_URL`,
    /// `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, ...).
    /// A plain-HTTP endpoint is allowed when the endpoint says `http://`.
    pub fn from_env(options: S3Options) -> Result<Self, StoreError> {
        Self::from_vars(options, std::env::vars())
    }

    /// As `from_env`, with the variables given.
    pub fn from_vars(
        options: S3Options,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, StoreError> {
        let vars: HashMap<String, String> = vars
            .into_iter()
            .filter(|(k, _)| k.starts_with("AWS_"))
            .collect();
        let var = |k: &str| vars.get(k).cloned();
        let endpoint = var("AWS_ENDPOINT_URL")
            .or_else(|| var("AWS_ENDPOINT"))
            .unwrap_or_default();
        let allow_http =
            endpoint.starts_with("http://") || var("AWS_ALLOW_HTTP").is_some_and(|v| v == "true");
        // `with_client_options` replaces every client option, allow-http
        // included, so it is set here.
        let client = |timeout: Duration| {
            let client = ClientOptions::new()
                .with_allow_http(allow_http)
                .with_timeout(timeout)
                .with_connect_timeout(options.connect_timeout);
            if options.reuse_connections {
                client
            } else {
                client.with_pool_max_idle_per_host(0)
            }
        };
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_secs(1),
                base: 2.0,
            },
            max_retries: options.max_retries,
            retry_timeout: options.request_timeout * 3,
        };
        let mut builder = AmazonS3Builder::new();
        for (key, value) in &vars {
            if let Ok(config_key) = key.to_ascii_lowercase().parse() {
                builder = builder.with_config(config_key, value);
            }
        }
        let mut builder = builder.with_bucket_name(&options.bucket);
        if var("AWS_REGION").is_none() && var("AWS_DEFAULT_REGION").is_none() {
            builder = builder.with_region("us-east-1");
        }
        let build = |builder: AmazonS3Builder| {
            builder
                .build()
                .map_err(|e| StoreError::Unavailable(format!("object storage configuration: {e}")))
        };
        let store = build(
            builder
                .clone()
                .with_client_options(client(options.request_timeout))
                .with_retry(retry.clone()),
        )?;
        // Downloads are one GET each and last as long as the client takes:
        // bounded per read of the body (a stalled storage), not in total.
        let reader = build(
            builder
                .clone()
                .with_client_options(
                    client(options.request_timeout)
                        .with_timeout_disabled()
                        .with_read_timeout(options.request_timeout),
                )
                .with_retry(retry.clone()),
        )?;
        let copier = build(
            builder
                .with_client_options(client(COPY_TIMEOUT))
                .with_retry(RetryConfig {
                    retry_timeout: COPY_TIMEOUT * 2,
                    ..retry
                }),
        )?;
        let mut prefix = options.prefix.trim_matches('/').to_string();
        if !prefix.is_empty() {
            prefix.push('/');
        }
        Ok(Self {
            store: Arc::new(store),
            reader: Arc::new(reader),
            copier,
            prefix,
            options,
            verified: Arc::default(),
        })
    }

    /// Named documents under `<prefix><under>/` of the same bucket.
    pub fn documents(&self, under: &str) -> crate::S3Documents {
        crate::S3Documents {
            store: self.store.clone(),
            prefix: format!("{}{}/", self.prefix, under.trim_matches('/')),
        }
    }

    fn blob_key(&self, digest: &Digest) -> Path {
        Path::from(format!(
            "{}blobs/{}/{}",
            self.prefix,
            digest.algorithm().as_str(),
            digest.encoded()
        ))
    }

    fn uploads_root(&self) -> String {
        format!("{}uploads/", self.prefix)
    }

    fn upload_prefix(&self, upload: &str) -> Result<Path, StoreError> {
        if !valid_name(upload) {
            return Err(invalid("invalid upload id"));
        }
        Ok(Path::from(format!("{}{upload}", self.uploads_root())))
    }

    fn part_key(&self, upload: &str, part: &str) -> Result<Path, StoreError> {
        if !valid_name(part) {
            return Err(invalid("invalid upload part name"));
        }
        Ok(Path::from(format!(
            "{}/{part}",
            self.upload_prefix(upload)?
        )))
    }

    /// Streams `body` to `key`, hashing it with `algorithm`. The object
    /// becomes visible only if `accept` approves the digest; a failed or
    /// refused write leaves nothing.
    async fn write_object(
        &self,
        key: &Path,
        algorithm: Algorithm,
        expected_len: Option<u64>,
        mut body: ByteStream,
        max: u64,
        accept: impl FnOnce(&Digest, u64) -> Result<(), PutError>,
    ) -> Result<(Digest, u64), PutError> {
        let max = max.min(MAX_OBJECT);
        let mut hasher = algorithm.hasher();
        let mut received: u64 = 0;
        let mut buffered: Vec<Bytes> = Vec::new();
        let mut buffered_len = 0usize;
        let mut multipart: Option<WriteMultipart> = None;
        let failure = loop {
            let frame = match body.next().await {
                None => break None,
                Some(Err(e)) => break Some(PutError::Body(e)),
                Some(Ok(frame)) => frame,
            };
            received += frame.len() as u64;
            if received > max {
                break Some(PutError::TooLarge { limit: max });
            }
            hasher.update(&frame);
            match multipart.as_mut() {
                Some(upload) => {
                    if let Err(e) = upload.wait_for_capacity(PART_CONCURRENCY).await {
                        break Some(unavailable(e).into());
                    }
                    upload.put(frame);
                }
                None => {
                    buffered_len += frame.len();
                    buffered.push(frame);
                    if buffered_len >= PART_SIZE {
                        let upload = match self.store.put_multipart(key).await {
                            Ok(u) => u,
                            Err(e) => break Some(unavailable(e).into()),
                        };
                        let mut upload = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
                        for frame in buffered.drain(..) {
                            upload.put(frame);
                        }
                        multipart = Some(upload);
                    }
                }
            }
        };
        let checked = match failure {
            Some(e) => Err(e),
            None => match expected_len {
                Some(expected) if expected != received => {
                    Err(PutError::LengthMismatch { expected, received })
                }
                _ => {
                    let digest = hasher.finish();
                    accept(&digest, received).map(|()| digest)
                }
            },
        };
        let digest = match checked {
            Ok(d) => d,
            Err(e) => {
                if let Some(upload) = multipart
                    && let Err(abort) = upload.abort().await
                {
                    tracing::warn!(key = %key, error = %abort, "could not abort a multipart upload; the bucket's lifecycle rule must remove it");
                }
                return Err(e);
            }
        };
        match multipart {
            Some(upload) => {
                upload.finish().await.map_err(unavailable)?;
            }
            None => {
                let payload: PutPayload = buffered.into_iter().collect();
                self.store.put(key, payload).await.map_err(unavailable)?;
            }
        }
        Ok((digest, received))
    }

    async fn list_keys(&self, prefix: &str) -> Result<Vec<object_store::ObjectMeta>, StoreError> {
        let prefix = Path::from(prefix);
        self.store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(unavailable)
    }
}

fn valid_name(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

fn invalid(msg: &str) -> StoreError {
    StoreError::Io(std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        msg.to_string(),
    ))
}

#[async_trait]
impl BlobStore for S3BlobStore {
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        match self.store.head(&self.blob_key(digest)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn read(
        &self,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<Option<BlobRead>, StoreError> {
        let key = self.blob_key(digest);
        let meta = match self.store.head(&key).await {
            Ok(meta) => meta,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(unavailable(e)),
        };
        let size = meta.size;
        let identity = ObjectIdentity {
            size,
            e_tag: meta.e_tag.clone(),
            modified_ms: meta.last_modified.timestamp_millis(),
        };
        // As on files (docs/operations.md): an object a whole download
        // verified since start is served without hashing it again. Without
        // an ETag nothing ties a later GET to the object checked: verify.
        let already = identity.e_tag.is_some()
            && self
                .verified
                .lock()
                .map(|set| set.get(digest) == Some(&identity))
                .unwrap_or(false);
        let (start, end) = match range {
            Some(r) => (r.start.min(size), r.end.saturating_add(1).min(size)),
            None => (0, size),
        };
        let stream = streamed(self.reader.clone(), key, start..end, meta.e_tag.clone());
        let stream = if range.is_none() && self.options.verify_reads && !already {
            let set = self.verified.clone();
            let key = digest.clone();
            verified(
                stream,
                digest.clone(),
                Box::new(move || {
                    if let Ok(mut set) = set.lock() {
                        if set.len() >= MAX_VERIFIED {
                            set.clear();
                        }
                        set.insert(key, identity);
                    }
                }),
            )
        } else {
            stream
        };
        Ok(Some(BlobRead { size, stream }))
    }

    fn distrust(&self, digest: &Digest) {
        if let Ok(mut set) = self.verified.lock() {
            set.remove(digest);
        }
    }

    async fn read_small(&self, digest: &Digest, max: u64) -> Result<Option<Bytes>, StoreError> {
        let result = match self.store.get(&self.blob_key(digest)).await {
            Ok(r) => r,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(unavailable(e)),
        };
        if result.meta.size > max {
            return Err(StoreError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "blob {digest} is {} bytes, more than the {max} expected",
                    result.meta.size
                ),
            )));
        }
        let bytes = result.bytes().await.map_err(unavailable)?;
        if Digest::of(digest.algorithm(), &bytes) != *digest {
            tracing::error!(%digest, "stored manifest is corrupt; refusing to serve it");
            return Err(StoreError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("stored blob {digest} is corrupt"),
            )));
        }
        Ok(Some(bytes))
    }

    async fn put(&self, expected: &Digest, body: ByteStream, max: u64) -> Result<u64, PutError> {
        let key = self.blob_key(expected);
        let (_, size) = self
            .write_object(
                &key,
                expected.algorithm(),
                None,
                body,
                max,
                |computed, _| {
                    if computed == expected {
                        Ok(())
                    } else {
                        Err(PutError::DigestMismatch {
                            expected: expected.clone(),
                            computed: computed.clone(),
                        })
                    }
                },
            )
            .await?;
        Ok(size)
    }

    async fn delete(&self, digest: &Digest) -> Result<(), StoreError> {
        match self.store.delete(&self.blob_key(digest)).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn list(&self) -> Result<Vec<StoredBlob>, StoreError> {
        let root = format!("{}blobs/", self.prefix);
        let mut out: Vec<StoredBlob> = self
            .list_keys(&root)
            .await?
            .into_iter()
            .filter_map(|meta| {
                let rest = meta.location.as_ref().strip_prefix(&root)?.to_string();
                let (alg, encoded) = rest.split_once('/')?;
                Some(StoredBlob {
                    digest: format!("{alg}:{encoded}").parse().ok()?,
                    size: meta.size,
                    modified_ms: meta.last_modified.timestamp_millis().max(0) as u64,
                })
            })
            .collect();
        out.sort_by(|a, b| a.digest.cmp(&b.digest));
        Ok(out)
    }

    async fn write_part(
        &self,
        upload: &str,
        expected_len: Option<u64>,
        body: ByteStream,
        max: u64,
    ) -> Result<UploadPart, PutError> {
        let name = uuid::Uuid::new_v4().simple().to_string();
        let key = self.part_key(upload, &name)?;
        let (sha256, size) = self
            .write_object(&key, Algorithm::Sha256, expected_len, body, max, |_, _| {
                Ok(())
            })
            .await?;
        Ok(UploadPart { name, size, sha256 })
    }

    async fn commit_parts(
        &self,
        upload: &str,
        parts: &[UploadPart],
        expected: &Digest,
    ) -> Result<u64, PutError> {
        let target = self.blob_key(expected);
        if let [part] = parts
            && &part.sha256 == expected
            && part.size <= MAX_COPY
        {
            // Verified when written: a server-side copy, no second transfer.
            let source = self.part_key(upload, &part.name)?;
            match self.copier.copy(&source, &target).await {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => return Err(PutError::PartMissing(part.name.clone())),
                Err(e) => return Err(unavailable(e).into()),
            }
            // Some stores answer a failed copy with 200 and an error body:
            // the blob is only as good as what is really there.
            return match self.store.head(&target).await {
                Ok(meta) if meta.size == part.size => Ok(part.size),
                Ok(meta) => Err(PutError::Store(StoreError::Unavailable(format!(
                    "copy of {} left {} bytes, {} expected",
                    part.name, meta.size, part.size
                )))),
                Err(e) => Err(unavailable(e).into()),
            };
        }
        let mut keys = Vec::with_capacity(parts.len());
        for part in parts {
            keys.push((self.part_key(upload, &part.name)?, part.size));
        }
        let store = self.store.clone();

        let body: ByteStream = Box::pin(
            futures_util::stream::iter(keys)
                .map(move |(key, size)| windowed(store.clone(), key, 0..size))
                .flatten(),
        );
        self.put(expected, body, u64::MAX).await.map_err(|e| {
            super::part_read_failure(e, |e| {
                StoreError::Unavailable(format!("reading upload parts: {e}"))
            })
        })
    }

    async fn delete_part(&self, upload: &str, part: &UploadPart) -> Result<(), StoreError> {
        match self.store.delete(&self.part_key(upload, &part.name)?).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn delete_upload(&self, upload: &str) -> Result<(), StoreError> {
        let prefix = format!("{}/", self.upload_prefix(upload)?);
        for meta in self.list_keys(&prefix).await? {
            match self.store.delete(&meta.location).await {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(unavailable(e)),
            }
        }
        Ok(())
    }

    async fn list_uploads(&self) -> Result<Vec<StoredUpload>, StoreError> {
        let root = self.uploads_root();
        let mut newest: HashMap<String, u64> = HashMap::new();
        for meta in self.list_keys(&root).await? {
            let Some(rest) = meta.location.as_ref().strip_prefix(&root) else {
                continue;
            };
            let Some((id, _)) = rest.split_once('/') else {
                continue;
            };
            let modified = meta.last_modified.timestamp_millis().max(0) as u64;
            let entry = newest.entry(id.to_string()).or_default();
            *entry = (*entry).max(modified);
        }
        Ok(newest
            .into_iter()
            .map(|(id, modified_ms)| StoredUpload { id, modified_ms })
            .collect())
    }

    async fn redirect_url(&self, digest: &Digest) -> Result<Option<String>, StoreError> {
        let Some(ttl) = self.options.redirect_ttl else {
            return Ok(None);
        };
        let url = self
            .store
            .signed_url(http::Method::GET, &self.blob_key(digest), ttl)
            .await
            .map_err(unavailable)?;
        Ok(Some(url.to_string()))
    }

    async fn check_health(&self) -> Result<(), StoreError> {
        // A key that never exists: "not found" proves the bucket answers and
        // the credentials work.
        let probe = Path::from(format!("{}health-probe", self.prefix));
        match self.store.head(&probe).await {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
    }
}
