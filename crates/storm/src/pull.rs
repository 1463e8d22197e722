//! The storm: N hosts, each with its own connections, pull the image at the
//! same instant the way a container runtime does: the tag (an index), the
//! platform's manifest, then the config and the layers, three at a time
//! (containerd's and Docker's default). Every response is checked against
//! the content it must have; a host whose pull fails anywhere counts as a
//! failed pull (no retries: a retry would hide the failure being measured).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{StreamExt, TryStreamExt};
use reqwest::{Client, StatusCode, header};
use tokio::sync::Barrier;

use crate::image::{Expected, INDEX_TYPE, Image, MANIFEST_TYPE};
use crate::{Error, Target};

/// What a runtime accepts for a tag.
const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";
/// Layers one host downloads at once.
const PARALLEL_LAYERS: usize = 3;
/// The largest manifest read into memory.
const MAX_MANIFEST: u64 = 4 << 20;

pub struct Outcome {
    /// Per host: how long its pull took, or why it failed.
    pub pulls: Vec<Result<Duration, String>>,
    /// From the common start to the last host's end.
    pub wall: Duration,
    /// Bytes received, whole or not.
    pub bytes: u64,
}

pub async fn storm(
    target: Arc<Target>,
    image: Arc<Image>,
    hosts: usize,
    timeout: Duration,
) -> Result<Outcome, Error> {
    let barrier = Arc::new(Barrier::new(hosts + 1));
    let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(hosts);
    for _ in 0..hosts {
        // A client per host: its own connection pool, as separate machines.
        let client = Client::builder()
            .timeout(timeout)
            .pool_max_idle_per_host(PARALLEL_LAYERS)
            .build()?;
        let (target, image, barrier, received) = (
            target.clone(),
            image.clone(),
            barrier.clone(),
            received.clone(),
        );
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let start = Instant::now();
            let result = pull_one(&client, &target, &image, &received).await;
            result.map(|()| start.elapsed()).map_err(|e| e.to_string())
        }));
    }
    barrier.wait().await;
    let start = Instant::now();
    // Long storms show progress (on stderr; the result goes to stdout).
    let progress = {
        let received = received.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            tick.tick().await;
            loop {
                tick.tick().await;
                eprintln!(
                    "berth-storm: {:.0} s, {:.2} GB received",
                    start.elapsed().as_secs_f64(),
                    received.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e9
                );
            }
        })
    };
    let mut pulls = Vec::with_capacity(hosts);
    for task in tasks {
        pulls.push(
            task.await
                .unwrap_or_else(|e| Err(format!("host task failed: {e}"))),
        );
    }
    let wall = start.elapsed();
    progress.abort();
    Ok(Outcome {
        pulls,
        wall,
        bytes: received.load(std::sync::atomic::Ordering::Relaxed),
    })
}

async fn pull_one(
    client: &Client,
    target: &Target,
    image: &Image,
    received: &std::sync::atomic::AtomicU64,
) -> Result<(), Error> {
    let base = format!("{}/v2/{}", target.base, target.name);
    let index = fetch(
        client,
        &format!("{base}/manifests/{}", target.reference),
        Some(ACCEPT),
        &image.index.0,
        image,
        received,
        true,
    )
    .await?;
    let index: serde_json::Value = serde_json::from_slice(&index)?;
    if index["mediaType"] != INDEX_TYPE {
        return Err(Error::Protocol("the tag is not an index"));
    }
    let platform = index["manifests"]
        .as_array()
        .and_then(|m| {
            m.iter().find(|d| {
                d["platform"]["architecture"] == "amd64" && d["platform"]["os"] == "linux"
            })
        })
        .and_then(|d| d["digest"].as_str())
        .ok_or(Error::Protocol("no linux/amd64 manifest in the index"))?;
    if platform != image.pulled {
        return Err(Error::Protocol(
            "the index names another linux/amd64 manifest",
        ));
    }
    let manifest = fetch(
        client,
        &format!("{base}/manifests/{platform}"),
        Some(MANIFEST_TYPE),
        platform,
        image,
        received,
        true,
    )
    .await?;
    let manifest: serde_json::Value = serde_json::from_slice(&manifest)?;
    let mut blobs = vec![
        manifest["config"]["digest"]
            .as_str()
            .ok_or(Error::Protocol("manifest without a config"))?
            .to_string(),
    ];
    for layer in manifest["layers"].as_array().into_iter().flatten() {
        blobs.push(
            layer["digest"]
                .as_str()
                .ok_or(Error::Protocol("layer without a digest"))?
                .to_string(),
        );
    }
    let base = base.as_str();
    futures_util::stream::iter(blobs)
        .map(|digest| async move {
            fetch(
                client,
                &format!("{base}/blobs/{digest}"),
                None,
                &digest,
                image,
                received,
                false,
            )
            .await
            .map(drop)
        })
        .buffer_unordered(PARALLEL_LAYERS)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// GETs `url` and checks the body is `digest`'s content, streaming. Keeps
/// the body only when asked (manifests), bounded.
async fn fetch(
    client: &Client,
    url: &str,
    accept: Option<&str>,
    digest: &str,
    image: &Image,
    received: &std::sync::atomic::AtomicU64,
    keep: bool,
) -> Result<Vec<u8>, Error> {
    let Expected { size, xxh3 } = *image
        .expected
        .get(digest)
        .ok_or_else(|| Error::Unexpected(digest.to_string()))?;
    if keep && size > MAX_MANIFEST {
        return Err(Error::Protocol("manifest too large"));
    }
    let mut request = client.get(url);
    if let Some(accept) = accept {
        request = request.header(header::ACCEPT, accept);
    }
    let response = request.send().await?;
    if response.status() != StatusCode::OK {
        return Err(Error::Status("GET", response.status()));
    }
    let mut body = response.bytes_stream();
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut got = 0u64;
    let mut kept = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        received.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
        got += chunk.len() as u64;
        if got > size {
            return Err(Error::Mismatch(digest.to_string()));
        }
        hasher.update(&chunk);
        if keep {
            kept.extend_from_slice(&chunk);
        }
    }
    if got != size || hasher.digest128() != xxh3 {
        return Err(Error::Mismatch(digest.to_string()));
    }
    Ok(kept)
}
