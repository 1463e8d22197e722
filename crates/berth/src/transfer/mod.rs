//! Copying images between registries and OCI image layouts, verified by
//! digest on every byte: `berth export` (a registry into a layout),
//! `berth import` (a layout, or another registry, into this one).
//!
//! A copy goes child-first: an index's children, then an image's config
//! and layers, then the manifest, so that the destination never holds a
//! manifest whose content is not there yet. Whatever the destination has
//! already is skipped, which is also what makes an interrupted import
//! resumable: running it again copies only what is missing.

pub mod layout;
pub mod registry;
pub mod upstream;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use berth_oci::{Digest, Manifest};
use berth_store::ByteStream;
use bytes::Bytes;
use futures_util::StreamExt;

/// Largest manifest read from any source.
pub const MAX_MANIFEST: u64 = 4 << 20;
/// Index nesting followed at most.
const MAX_DEPTH: usize = 4;
/// Children one index may name.
const MAX_CHILDREN: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("{0}")]
    Source(String),
    #[error("{0}")]
    Destination(String),
    #[error("{0} does not match its digest")]
    Digest(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Where images come from.
#[async_trait]
pub trait Source: Send + Sync {
    /// A manifest's bytes and media type.
    async fn manifest(&self, repo: &str, reference: &str)
    -> Result<(Bytes, String), TransferError>;
    /// A blob's bytes (verified by the caller as they stream).
    async fn blob(
        &self,
        repo: &str,
        digest: &Digest,
        size: u64,
    ) -> Result<ByteStream, TransferError>;
}

/// Where images go.
#[async_trait]
pub trait Sink: Send + Sync {
    // `put_blob`'s body is `verified`: a short or long body fails on the
    // way; one of the right length with the wrong bytes fails at its end,
    // which a file sink sees and an HTTP sink may not (it stops reading at
    // Content-Length): a registry checks the digest itself.
    async fn has_blob(&self, repo: &str, digest: &Digest, size: u64)
    -> Result<bool, TransferError>;
    /// Stores a blob; `body` fails at its end if the bytes do not match.
    async fn put_blob(
        &self,
        repo: &str,
        digest: &Digest,
        size: u64,
        body: ByteStream,
    ) -> Result<(), TransferError>;
    /// The digest `reference` (a tag or a digest) points at, if any.
    async fn manifest_digest(
        &self,
        repo: &str,
        reference: &str,
    ) -> Result<Option<Digest>, TransferError>;
    async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<(), TransferError>;
}

/// What a transfer moved, shared with the progress printer.
#[derive(Default)]
pub struct Totals {
    pub images: AtomicU64,
    pub manifests: AtomicU64,
    pub blobs: AtomicU64,
    pub bytes: AtomicU64,
    /// Blobs and manifests the destination had already.
    pub skipped: AtomicU64,
    /// Manifests this run has copied (or found there): an index naming a
    /// child many times, or many indexes sharing one, costs it once.
    pub done: std::sync::Mutex<std::collections::HashSet<Digest>>,
}

impl Totals {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Passes `body` through, hashing it: the stream fails at its end if the
/// bytes do not hash to `digest` or are not `size` long, so no sink can
/// keep a wrong blob as complete.
pub fn verified(body: ByteStream, digest: &Digest, size: u64, totals: Arc<Totals>) -> ByteStream {
    let expected = digest.clone();
    let hasher = Some(digest.algorithm().hasher());
    let stream =
        futures_util::stream::unfold((body, hasher, 0u64), move |(mut body, hasher, seen)| {
            let expected = expected.clone();
            let totals = totals.clone();
            async move {
                let mut hasher = hasher?;
                match body.next().await {
                    Some(Ok(chunk)) => {
                        let seen = seen + chunk.len() as u64;
                        if seen > size {
                            let e = std::io::Error::new(
                                std::io::ErrorKind::InvalidData,
                                format!("{expected} is longer than {size} bytes"),
                            );
                            return Some((Err(e), (body, None, seen)));
                        }
                        hasher.update(&chunk);
                        totals
                            .bytes
                            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                        Some((Ok(chunk), (body, Some(hasher), seen)))
                    }
                    Some(Err(e)) => Some((Err(e), (body, None, seen))),
                    None => {
                        if seen == size && hasher.finish() == expected {
                            None
                        } else {
                            let e = std::io::Error::new(
                                std::io::ErrorKind::InvalidData,
                                format!("{expected}: the bytes do not match the digest"),
                            );
                            Some((Err(e), (body, None, seen)))
                        }
                    }
                }
            }
        });
    Box::pin(stream)
}

/// Copies one image (`reference` of `from_repo` in `source`) to `to_repo`
/// in `sink`, under `reference` there too. Returns its digest.
pub async fn copy_image(
    source: &dyn Source,
    sink: &dyn Sink,
    from_repo: &str,
    to_repo: &str,
    reference: &str,
    totals: &Arc<Totals>,
) -> Result<Digest, TransferError> {
    let digest = copy_manifest(source, sink, from_repo, to_repo, reference, 0, totals).await?;
    totals.images.fetch_add(1, Ordering::Relaxed);
    Ok(digest)
}

fn copy_manifest<'a>(
    source: &'a dyn Source,
    sink: &'a dyn Sink,
    from_repo: &'a str,
    to_repo: &'a str,
    reference: &'a str,
    depth: usize,
    totals: &'a Arc<Totals>,
) -> futures_util::future::BoxFuture<'a, Result<Digest, TransferError>> {
    Box::pin(async move {
        if let Ok(asked) = reference.parse::<Digest>()
            && totals.done.lock().is_ok_and(|done| done.contains(&asked))
        {
            return Ok(asked);
        }
        let (bytes, media_type) = source.manifest(from_repo, reference).await?;
        let digest = Digest::sha256_of(&bytes);
        if let Ok(asked) = reference.parse::<Digest>()
            && Digest::of(asked.algorithm(), &bytes) != asked
        {
            return Err(TransferError::Digest(format!(
                "manifest {from_repo}@{asked}"
            )));
        }
        // Already there under this reference: nothing to do (an import run
        // again after a kill skips what it finished).
        if sink.manifest_digest(to_repo, reference).await? == Some(digest.clone()) {
            totals.skipped.fetch_add(1, Ordering::Relaxed);
            remember(totals, &digest);
            return Ok(digest);
        }
        let manifest = Manifest::parse(
            (!media_type.is_empty()).then_some(media_type.as_str()),
            &bytes,
        )
        .map_err(|e| TransferError::Invalid(format!("manifest {from_repo}:{reference}: {e}")))?;
        // The type the document is (whatever header a source sent with
        // it, or none for a layout's manifest without `mediaType`).
        let media_type = manifest.kind.media_type().to_string();
        if manifest.children().len() > MAX_CHILDREN {
            return Err(TransferError::Invalid(format!(
                "{from_repo}:{reference}: an index of more than {MAX_CHILDREN} children"
            )));
        }
        for child in manifest.children() {
            if berth_oci::ManifestKind::from_media_type(&child.media_type).is_some() {
                if depth >= MAX_DEPTH {
                    return Err(TransferError::Invalid(format!(
                        "{from_repo}:{reference}: indexes nested deeper than {MAX_DEPTH}"
                    )));
                }
                copy_manifest(
                    source,
                    sink,
                    from_repo,
                    to_repo,
                    &child.digest.to_string(),
                    depth + 1,
                    totals,
                )
                .await?;
            } else {
                copy_blob(
                    source,
                    sink,
                    from_repo,
                    to_repo,
                    &child.digest,
                    child.size,
                    totals,
                )
                .await?;
            }
        }
        for blob in manifest.required_blobs() {
            copy_blob(
                source,
                sink,
                from_repo,
                to_repo,
                &blob.digest,
                blob.size,
                totals,
            )
            .await?;
        }
        sink.put_manifest(to_repo, reference, &media_type, bytes)
            .await?;
        totals.manifests.fetch_add(1, Ordering::Relaxed);
        remember(totals, &digest);
        Ok(digest)
    })
}

fn remember(totals: &Totals, digest: &Digest) {
    if let Ok(mut done) = totals.done.lock() {
        done.insert(digest.clone());
    }
}

async fn copy_blob(
    source: &dyn Source,
    sink: &dyn Sink,
    from_repo: &str,
    to_repo: &str,
    digest: &Digest,
    size: u64,
    totals: &Arc<Totals>,
) -> Result<(), TransferError> {
    if sink.has_blob(to_repo, digest, size).await? {
        totals.skipped.fetch_add(1, Ordering::Relaxed);
        return Ok(());
    }
    let body = source.blob(from_repo, digest, size).await?;
    let body = verified(body, digest, size, totals.clone());
    sink.put_blob(to_repo, digest, size, body).await?;
    totals.blobs.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// `REPO:TAG` or `REPO@DIGEST` into the repository and the reference.
pub fn parse_image(image: &str) -> Result<(String, String), TransferError> {
    let invalid = || {
        TransferError::Invalid(format!(
            "{image:?}: expected REPOSITORY:TAG or REPOSITORY@DIGEST"
        ))
    };
    let (repo, reference) = match image.split_once('@') {
        Some((repo, digest)) => (repo, digest),
        None => {
            let slash = image.rfind('/').map_or(0, |i| i + 1);
            let colon = image[slash..]
                .find(':')
                .map(|i| i + slash)
                .ok_or_else(invalid)?;
            (&image[..colon], &image[colon + 1..])
        }
    };
    berth_oci::RepositoryName::parse(repo).map_err(|_| invalid())?;
    let ok = reference.parse::<Digest>().is_ok() || berth_oci::Tag::parse(reference).is_ok();
    if !ok {
        return Err(invalid());
    }
    Ok((repo.to_string(), reference.to_string()))
}

/// Shows totals while `work` runs, on stderr (JSON output stays clean on
/// stdout): a live bar on a terminal, a line every two seconds elsewhere.
pub async fn with_progress<T>(
    totals: Arc<Totals>,
    quiet: bool,
    work: impl std::future::Future<Output = T>,
) -> T {
    if quiet {
        return work.await;
    }
    let progress = crate::progress::Progress::start("transfer", None, quiet);
    let started = std::time::Instant::now();
    let ticker = async {
        let every = if progress.on_terminal() {
            std::time::Duration::from_millis(200)
        } else {
            std::time::Duration::from_secs(2)
        };
        let mut every = tokio::time::interval(every);
        every.tick().await;
        loop {
            every.tick().await;
            let bytes = Totals::get(&totals.bytes);
            let secs = started.elapsed().as_secs_f64().max(0.001);
            progress.update(bytes, || {
                format!(
                    "  {} images, {} blobs ({}, {}/s), {} already there",
                    Totals::get(&totals.images),
                    Totals::get(&totals.blobs),
                    crate::gc_cmd::human_bytes(bytes),
                    crate::gc_cmd::human_bytes((bytes as f64 / secs) as u64),
                    Totals::get(&totals.skipped)
                )
            });
        }
    };
    let out = tokio::select! {
        out = work => out,
        () = ticker => unreachable!("the ticker never ends"),
    };
    progress.finish();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names_split_at_the_tag_or_digest() {
        assert_eq!(
            parse_image("team/app:1.0").unwrap(),
            ("team/app".into(), "1.0".into())
        );
        let digest = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            parse_image(&format!("team/app@{digest}")).unwrap(),
            ("team/app".into(), digest)
        );
        for bad in [
            "team/app",
            "Team/app:1",
            "team/app:",
            "team/app@sha256:xyz",
            ":1",
        ] {
            assert!(parse_image(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_stream_that_does_not_match_its_digest_fails_at_its_end() {
        let body = |b: &'static [u8]| -> ByteStream {
            Box::pin(futures_util::stream::iter([Ok(Bytes::from_static(b))]))
        };
        let digest = Digest::sha256_of(b"good");
        let totals = Arc::new(Totals::default());
        let read = |s: ByteStream| async move {
            let mut s = s;
            let mut out = Vec::new();
            while let Some(chunk) = s.next().await {
                out.extend_from_slice(&chunk?);
            }
            Ok::<_, std::io::Error>(out)
        };
        assert_eq!(
            read(verified(body(b"good"), &digest, 4, totals.clone()))
                .await
                .unwrap(),
            b"good"
        );
        assert!(
            read(verified(body(b"bad!"), &digest, 4, totals.clone()))
                .await
                .is_err()
        );
        assert!(
            read(verified(body(b"good"), &digest, 3, totals.clone()))
                .await
                .is_err()
        );
        assert!(
            read(verified(body(b"goo"), &digest, 4, totals))
                .await
                .is_err()
        );
    }
}
