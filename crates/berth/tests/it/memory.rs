//! Large blobs are streamed: the server's resident memory stays bounded.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt as _;
use reqwest::Method;
use sha2::{Digest as _, Sha256};

use crate::support::*;

const RSS_LIMIT_KB: u64 = 100 * 1024;

struct RssSampler {
    stop: Arc<AtomicBool>,
    max_kb: Arc<AtomicU64>,
    handle: tokio::task::JoinHandle<()>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let max_kb = Arc::new(AtomicU64::new(0));
        let (s, m) = (stop.clone(), max_kb.clone());
        let handle = tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                if let Some(kb) = proc_status_kb(pid, "VmRSS") {
                    m.fetch_max(kb, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        RssSampler {
            stop,
            max_kb,
            handle,
        }
    }

    async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.handle.await;
        self.max_kb.load(Ordering::Relaxed)
    }
}

/// Streams `len` pattern bytes as a request body while hashing them.
fn hashing_body(seed: u64, len: u64, hasher: Arc<std::sync::Mutex<Sha256>>) -> reqwest::Body {
    const CHUNK: usize = 1024 * 1024;
    let stream = futures_util::stream::unfold(0u64, move |off| {
        let hasher = hasher.clone();
        async move {
            if off >= len {
                return None;
            }
            let n = ((len - off) as usize).min(CHUNK);
            let mut buf = vec![0u8; n];
            fill_pattern(seed, off, &mut buf);
            hasher.lock().unwrap().update(&buf);
            Some((
                Ok::<Bytes, std::io::Error>(Bytes::from(buf)),
                off + n as u64,
            ))
        }
    });
    reqwest::Body::wrap_stream(stream)
}

/// GETs a blob as a stream; returns (digest, length).
async fn pull_hashing(reg: &Registry, path: &str) -> (String, u64) {
    let resp = reg
        .req(Method::GET, path)
        .send()
        .await
        .expect("GET large blob");
    assert_eq!(resp.status().as_u16(), 200);
    let mut h = Sha256::new();
    let mut n = 0u64;
    let mut s = resp.bytes_stream();
    while let Some(chunk) = s.next().await {
        let chunk = chunk.expect("reading large blob");
        n += chunk.len() as u64;
        h.update(&chunk);
    }
    (finish_digest(h), n)
}

fn check_peak(pid: u32, sampled_kb: u64, what: &str) {
    let hwm = proc_status_kb(pid, "VmHWM").unwrap_or(0);
    eprintln!("{what}: server peak RSS sampled {sampled_kb} kB, VmHWM {hwm} kB");
    assert!(
        sampled_kb < RSS_LIMIT_KB && hwm < RSS_LIMIT_KB,
        "{what}: server RSS too high (sampled max {sampled_kb} kB, VmHWM {hwm} kB, limit {RSS_LIMIT_KB} kB)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_gib_blob_streams_through_with_server_rss_under_100_mib() {
    let reg = Registry::start_with(Options::new().env("BERTH_LOG", "warn")).await;
    let pid = reg.pid();
    let seed = fresh_seed();
    // Larger than 2^32, so any 32-bit size or offset arithmetic would show.
    let len: u64 = 4 * 1024 * 1024 * 1024 + 4097;
    let repo = "mem/big";
    let sampler = RssSampler::start(pid);
    let t = Instant::now();

    // Push: one streamed PATCH (chunked transfer encoding), hashing as we send.
    let loc = reg.start_upload(repo).await;
    let hasher = Arc::new(std::sync::Mutex::new(Sha256::new()));
    let r = send(
        reg.req(Method::PATCH, &loc)
            .header("content-type", "application/octet-stream")
            .body(hashing_body(seed, len, hasher.clone())),
    )
    .await;
    assert_eq!(r.status, 202, "streamed PATCH of 4 GiB: {}", r.describe());
    assert_eq!(
        r.header("range").as_deref(),
        Some(format!("0-{}", len - 1).as_str())
    );
    let digest = {
        let h = std::mem::take(&mut *hasher.lock().unwrap());
        finish_digest(h)
    };
    let loc = reg.resolve(&r.header("location").unwrap());
    let r = send(
        reg.req(Method::PUT, &with_query(&loc, "digest", &digest))
            .body(Vec::new()),
    )
    .await;
    assert_eq!(r.status, 201, "closing PUT: {}", r.describe());
    eprintln!("pushed 4 GiB in {:?}", t.elapsed());

    let r = reg.head(&format!("/v2/{repo}/blobs/{digest}")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.content_length(), Some(len));

    // Pull it back as a stream.
    let t = Instant::now();
    let (got, n) = pull_hashing(&reg, &format!("/v2/{repo}/blobs/{digest}")).await;
    assert_eq!(n, len, "pulled length");
    assert_eq!(got, digest, "pulled digest");
    eprintln!("pulled 4 GiB in {:?}", t.elapsed());

    // A range near the end of the blob.
    let start = len - 1_000_000;
    let r = send(
        reg.req(Method::GET, &format!("/v2/{repo}/blobs/{digest}"))
            .header("range", format!("bytes={start}-")),
    )
    .await;
    assert_eq!(r.status, 206, "{}", r.describe());
    let mut want = vec![0u8; 1_000_000];
    fill_pattern(seed, start, &mut want);
    assert!(r.body == want, "range at the end of a 4 GiB blob");
    assert_eq!(
        r.header("content-range").as_deref(),
        Some(format!("bytes {start}-{}/{len}", len - 1).as_str())
    );

    let sampled = sampler.finish().await;
    check_peak(pid, sampled, "4 GiB streamed push+pull");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monolithic_512_mib_put_and_pull_keep_server_rss_under_100_mib() {
    let reg = Registry::start_with(Options::new().env("BERTH_LOG", "warn")).await;
    let pid = reg.pid();
    let seed = fresh_seed();
    let len: u64 = 512 * 1024 * 1024;
    let digest = pattern_digest(seed, len);
    let repo = "mem/mono";
    let sampler = RssSampler::start(pid);

    // Monolithic PUT with a known Content-Length.
    let loc = reg.start_upload(repo).await;
    let r = send(
        reg.req(Method::PUT, &with_query(&loc, "digest", &digest))
            .header("content-type", "application/octet-stream")
            .header("content-length", len.to_string())
            .body(pattern_body(seed, len, 1024 * 1024)),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.describe());

    // Single-POST upload of the same size into another repository.
    let r = send(
        reg.req(
            Method::POST,
            &format!("/v2/mem/mono-post/blobs/uploads/?digest={digest}"),
        )
        .header("content-type", "application/octet-stream")
        .header("content-length", len.to_string())
        .body(pattern_body(seed, len, 1024 * 1024)),
    )
    .await;
    assert!(
        r.status == 201 || r.status == 202,
        "single POST of 512 MiB: {}",
        r.describe()
    );

    // Two concurrent pulls.
    let path = format!("/v2/{repo}/blobs/{digest}");
    let (a, b) = tokio::join!(pull_hashing(&reg, &path), pull_hashing(&reg, &path));
    assert_eq!(a, (digest.clone(), len));
    assert_eq!(b, (digest.clone(), len));

    let sampled = sampler.finish().await;
    check_peak(pid, sampled, "512 MiB monolithic push + 2 pulls");
}
