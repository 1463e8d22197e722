//! Verified load for the drills: pushes and pulls of images whose every
//! byte is checked, counted with and without client retries.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Client;
use serde_json::json;

use crate::support::*;

#[derive(Clone)]
pub(super) struct Image {
    pub(super) repo: String,
    pub(super) tag: String,
    pub(super) manifest: Vec<u8>,
    pub(super) digest: String,
    pub(super) blobs: Vec<(String, Arc<Vec<u8>>)>,
}

pub(super) fn make_image(worker: usize, n: u64) -> Image {
    let seed = fresh_seed();
    let layer_a = random_bytes(seed, 64 * 1024 + (seed % 1_000_000) as usize);
    let layer_b = random_bytes(seed ^ 0x5555, 16 * 1024 + (seed % 50_000) as usize);
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": []},
        "worker": worker, "n": n, "seed": seed,
    }))
    .unwrap();
    let blobs: Vec<(String, Arc<Vec<u8>>)> = [config, layer_a, layer_b]
        .into_iter()
        .map(|b| (sha256_digest(&b), Arc::new(b)))
        .collect();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": blobs[0].0, "size": blobs[0].1.len()},
        "layers": blobs[1..].iter().map(|(d, b)| json!({
            "mediaType": OCI_LAYER_GZIP, "digest": d, "size": b.len()
        })).collect::<Vec<_>>(),
    }))
    .unwrap();
    Image {
        repo: format!("drill/w{}", worker % 4),
        tag: format!("w{worker}-{n}"),
        digest: sha256_digest(&manifest),
        manifest,
        blobs,
    }
}

/// containerd retries a failed request a few times with backoff.
pub(super) const ATTEMPTS_WITH_RETRY: usize = 4;

#[derive(Default, Clone, Copy)]
pub(super) struct Outcome {
    /// Failed at the first attempt (what a client without retries sees).
    pub(super) failed_first: bool,
    /// Failed after every retry.
    pub(super) failed: bool,
}

impl Outcome {
    pub(super) fn merge(&mut self, other: Outcome) {
        self.failed_first |= other.failed_first;
        self.failed |= other.failed;
    }
}

/// Runs `attempt` up to `ATTEMPTS_WITH_RETRY` times with backoff.
pub(super) async fn with_retry<F, Fut>(mut attempt: F) -> Outcome
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let mut outcome = Outcome::default();
    for n in 0..ATTEMPTS_WITH_RETRY {
        match attempt().await {
            Ok(()) => return outcome,
            Err(_) => {
                if n == 0 {
                    outcome.failed_first = true;
                }
                tokio::time::sleep(Duration::from_millis(100 << n)).await;
            }
        }
    }
    outcome.failed = true;
    outcome
}

pub(super) async fn expect_status(
    rb: reqwest::RequestBuilder,
    want: u16,
) -> Result<reqwest::Response, String> {
    let resp = rb.send().await.map_err(|e| e.to_string())?;
    if resp.status().as_u16() == want {
        Ok(resp)
    } else {
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        Err(format!("{status}: {}", truncate(&body, 200)))
    }
}

pub(super) fn location(base: &str, resp: &reqwest::Response) -> Result<String, String> {
    let loc = resp
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .ok_or("no Location")?;
    Ok(if loc.starts_with("http") {
        loc.to_string()
    } else {
        format!("{base}{loc}")
    })
}

/// Pushes one blob: the first layer in two chunks (the load balancer sends
/// them to different nodes), the others in one request.
pub(super) async fn push_blob(
    client: &Client,
    lb: &str,
    repo: &str,
    digest: &str,
    bytes: &[u8],
    chunked: bool,
) -> Result<(), String> {
    if !chunked {
        expect_status(
            client
                .post(format!("{lb}/v2/{repo}/blobs/uploads/?digest={digest}"))
                .header("content-type", "application/octet-stream")
                .body(bytes.to_vec()),
            201,
        )
        .await?;
        return Ok(());
    }
    let started = expect_status(client.post(format!("{lb}/v2/{repo}/blobs/uploads/")), 202).await?;
    let mut url = location(lb, &started)?;
    let half = bytes.len() / 2;
    let patched = expect_status(
        client
            .patch(&url)
            .header("content-type", "application/octet-stream")
            .header("content-range", format!("0-{}", half - 1))
            .body(bytes[..half].to_vec()),
        202,
    )
    .await?;
    url = location(lb, &patched)?;
    let sep = if url.contains('?') { '&' } else { '?' };
    expect_status(
        client
            .put(format!("{url}{sep}digest={digest}"))
            .header("content-type", "application/octet-stream")
            .body(bytes[half..].to_vec()),
        201,
    )
    .await?;
    Ok(())
}

pub(super) async fn push_image(client: &Client, lb: &str, image: &Image) -> Outcome {
    let mut outcome = Outcome::default();
    for (i, (digest, bytes)) in image.blobs.iter().enumerate() {
        outcome
            .merge(with_retry(|| push_blob(client, lb, &image.repo, digest, bytes, i == 1)).await);
        if outcome.failed {
            return outcome;
        }
    }
    outcome.merge(
        with_retry(|| async {
            expect_status(
                client
                    .put(format!("{lb}/v2/{}/manifests/{}", image.repo, image.tag))
                    .header("content-type", OCI_MANIFEST)
                    .body(image.manifest.clone()),
                201,
            )
            .await
            .map(|_| ())
        })
        .await,
    );
    outcome
}

/// Pulls an image by tag and checks every byte. A mismatch is never a
/// transient failure: it panics.
pub(super) async fn pull_image(client: &Client, lb: &str, image: &Image) -> Outcome {
    let mut outcome = with_retry(|| async {
        let resp = expect_status(
            client
                .get(format!("{lb}/v2/{}/manifests/{}", image.repo, image.tag))
                .header("accept", OCI_MANIFEST),
            200,
        )
        .await?;
        let body = resp.bytes().await.map_err(|e| e.to_string())?;
        assert_eq!(
            sha256_digest(&body),
            image.digest,
            "{}:{} served the wrong manifest",
            image.repo,
            image.tag
        );
        Ok(())
    })
    .await;
    for (digest, bytes) in &image.blobs {
        if outcome.failed {
            break;
        }
        outcome.merge(
            with_retry(|| async {
                let resp = expect_status(
                    client.get(format!("{lb}/v2/{}/blobs/{digest}", image.repo)),
                    200,
                )
                .await?;
                // A transfer cut short is a failed pull, not corruption.
                let body = resp.bytes().await.map_err(|e| e.to_string())?;
                if body.len() != bytes.len() {
                    return Err(format!("{} of {} bytes", body.len(), bytes.len()));
                }
                assert_eq!(&sha256_digest(&body), digest, "blob bytes differ");
                Ok(())
            })
            .await,
        );
    }
    outcome
}

#[derive(Default)]
pub(super) struct Tally {
    pub(super) pushes: u64,
    pub(super) push_failed_first: u64,
    pub(super) push_failed: u64,
    pub(super) pulls: u64,
    pub(super) pull_failed_first: u64,
    pub(super) pull_failed: u64,
    pub(super) pull_ms: Vec<f64>,
    /// Start and completion of acknowledged pushes (since the load started).
    pub(super) push_done: Vec<(Duration, Duration)>,
}

pub(super) struct Load {
    pub(super) acked: Arc<Mutex<Vec<Image>>>,
    pub(super) tally: Arc<Mutex<Tally>>,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) started: Instant,
    pub(super) tasks: Vec<tokio::task::JoinHandle<()>>,
}

pub(super) static IMAGE_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Load {
    pub(super) fn start(
        lb: &str,
        acked: Arc<Mutex<Vec<Image>>>,
        pushers: usize,
        pullers: usize,
    ) -> Load {
        let tally = Arc::new(Mutex::new(Tally::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..pushers {
            let (lb, acked, tally, stop) =
                (lb.to_string(), acked.clone(), tally.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let client = new_client();
                while !stop.load(Ordering::Relaxed) {
                    let image = make_image(w, IMAGE_COUNTER.fetch_add(1, Ordering::Relaxed));
                    let began = started.elapsed();
                    let outcome = push_image(&client, &lb, &image).await;
                    let mut t = tally.lock().unwrap();
                    t.pushes += 1;
                    t.push_failed_first += u64::from(outcome.failed_first);
                    t.push_failed += u64::from(outcome.failed);
                    if !outcome.failed {
                        t.push_done.push((began, started.elapsed()));
                        acked.lock().unwrap().push(image);
                    }
                }
            }));
        }
        for p in 0..pullers {
            let (lb, acked, tally, stop) =
                (lb.to_string(), acked.clone(), tally.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let client = new_client();
                let mut n = p as u64 * 7919;
                while !stop.load(Ordering::Relaxed) {
                    let image = {
                        let acked = acked.lock().unwrap();
                        n = n
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        acked[(n >> 33) as usize % acked.len()].clone()
                    };
                    let t0 = Instant::now();
                    let outcome = pull_image(&client, &lb, &image).await;
                    let ms = t0.elapsed().as_secs_f64() * 1000.0;
                    let mut t = tally.lock().unwrap();
                    t.pulls += 1;
                    t.pull_failed_first += u64::from(outcome.failed_first);
                    t.pull_failed += u64::from(outcome.failed);
                    if !outcome.failed {
                        t.pull_ms.push(ms);
                    }
                }
            }));
        }
        Load {
            acked,
            tally,
            stop,
            started,
            tasks,
        }
    }

    pub(super) fn since_start(&self) -> Duration {
        self.started.elapsed()
    }

    pub(super) async fn finish(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let _ = self.acked;
        Arc::try_unwrap(self.tally)
            .ok()
            .expect("load tasks ended")
            .into_inner()
            .unwrap()
    }
}

pub(super) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// One drill's figures, as reported in docs/AVAILABILITY.md.
pub(super) struct Figures {
    pub(super) name: &'static str,
    pub(super) tally: Tally,
    /// From the fault to the first acknowledged push that started after it.
    pub(super) writes_resumed_s: Option<f64>,
    /// Longest time without an acknowledged push, from the fault on.
    pub(super) write_gap_s: Option<f64>,
    pub(super) note: String,
}

impl Figures {
    pub(super) fn row(&mut self) -> String {
        let t = &mut self.tally;
        t.pull_ms.sort_by(f64::total_cmp);
        format!(
            "| {} | {} | {} / {} | {} | {} / {} | {:.0} / {:.0} | {} | {} | {} |",
            self.name,
            t.pushes,
            t.push_failed_first,
            t.push_failed,
            t.pulls,
            t.pull_failed_first,
            t.pull_failed,
            percentile(&t.pull_ms, 0.5),
            percentile(&t.pull_ms, 0.99),
            self.writes_resumed_s
                .map_or("-".to_string(), |s| format!("{s:.1} s")),
            self.write_gap_s
                .map_or("-".to_string(), |s| format!("{s:.1} s")),
            self.note
        )
    }
}

/// From `fault` to the first acknowledged push that started after it (so
/// it did not merely finish in flight).
pub(super) fn writes_resumed(tally: &Tally, fault: Duration) -> Option<f64> {
    tally
        .push_done
        .iter()
        .filter(|(began, _)| *began >= fault)
        .map(|(_, done)| *done)
        .min()
        .map(|done| (done - fault).as_secs_f64())
}

/// The longest stretch from `fault` on without an acknowledged push.
pub(super) fn write_gap(tally: &Tally, fault: Duration) -> Option<f64> {
    let mut done: Vec<Duration> = tally
        .push_done
        .iter()
        .map(|(_, d)| *d)
        .filter(|d| *d >= fault)
        .collect();
    done.sort();
    let first = *done.first()?;
    let mut gap = first - fault;
    for pair in done.windows(2) {
        gap = gap.max(pair[1] - pair[0]);
    }
    Some(gap.as_secs_f64())
}

pub(super) async fn verify_all(client: &Client, lb: &str, acked: &Mutex<Vec<Image>>) -> usize {
    let images = acked.lock().unwrap().clone();
    for image in &images {
        let outcome = pull_image(client, lb, image).await;
        assert!(
            !outcome.failed,
            "acknowledged push {}:{} is not pullable",
            image.repo, image.tag
        );
    }
    images.len()
}
