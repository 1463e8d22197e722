//! Crash safety (kill -9) and graceful shutdown (SIGTERM).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::Method;
use tokio::sync::mpsc;

use crate::support::*;

#[tokio::test]
async fn acknowledged_pushes_survive_kill_9_and_restart() {
    let mut reg = Registry::start().await;
    let mut blobs = Vec::new();
    for i in 0..5 {
        let data = random_bytes(fresh_seed(), 1000 + i * 50_000);
        let d = reg.push_blob("dur/basic", &data).await;
        blobs.push((d, data));
    }
    let img = Image::oci(fresh_seed(), 3, 10_000);
    img.push(&reg, "dur/basic", Some("v1")).await;
    let idx_child = Image::docker(fresh_seed(), 1, 100);
    idx_child.push(&reg, "dur/other", None).await;
    let list = index_json(
        DOCKER_LIST,
        vec![idx_child.descriptor()],
        serde_json::json!({}),
    );
    let list_digest = reg
        .push_manifest("dur/other", "multi", DOCKER_LIST, &list)
        .await;
    // A tag deletion and a blob deletion must also be durable.
    reg.push_manifest("dur/basic", "gone", OCI_MANIFEST, &img.manifest)
        .await;
    assert_eq!(reg.delete("/v2/dur/basic/manifests/gone").await.status, 202);
    let (deleted_digest, _) = blobs.pop().unwrap();
    assert_eq!(
        reg.delete(&format!("/v2/dur/basic/blobs/{deleted_digest}"))
            .await
            .status,
        202
    );

    reg.kill9();
    reg.restart().await;

    for (d, data) in &blobs {
        assert!(
            reg.blob_bytes("dur/basic", d).await == *data,
            "blob {d} after restart"
        );
    }
    for b in img.blobs() {
        assert!(reg.blob_bytes("dur/basic", &sha256_digest(b)).await == b);
    }
    let r = reg.get("/v2/dur/basic/manifests/v1").await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert!(r.body == img.manifest);
    assert_eq!(r.header("content-type").as_deref(), Some(OCI_MANIFEST));
    let r = reg
        .get(&format!("/v2/dur/other/manifests/{list_digest}"))
        .await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert!(r.body == list);
    assert_eq!(r.header("content-type").as_deref(), Some(DOCKER_LIST));
    assert_eq!(reg.tags("dur/basic").await, vec!["v1"]);
    assert_eq!(reg.tags("dur/other").await, vec!["multi"]);
    let r = reg
        .head(&format!("/v2/dur/basic/blobs/{deleted_digest}"))
        .await;
    assert_eq!(r.status, 404, "deleted blob came back after restart");

    // Restarting again (gracefully) keeps everything as well.
    reg.restart().await;
    assert!(reg.get("/v2/dur/basic/manifests/v1").await.body == img.manifest);
}

#[tokio::test]
async fn upload_session_state_survives_restart_or_is_cleanly_unknown() {
    let mut reg = Registry::start().await;
    let data = random_bytes(fresh_seed(), 20_000);
    let digest = sha256_digest(&data);
    let loc = reg.start_upload("dur/session").await;
    let r = reg
        .patch_bytes(&loc, Some("0-9999"), data[..10_000].to_vec())
        .await;
    assert_eq!(r.status, 202);
    let loc = path_and_query(&reg.resolve(&r.header("location").unwrap()));
    reg.kill9();
    reg.restart().await;
    let loc = reg.resolve(&loc);
    let r = reg.get(&loc).await;
    match r.status {
        204 => {
            // Resumable: the acknowledged range must be intact.
            assert_eq!(r.header("range").as_deref(), Some("0-9999"));
            let r = reg
                .put_bytes(
                    &with_query(&loc, "digest", &digest),
                    "application/octet-stream",
                    data[10_000..].to_vec(),
                )
                .await;
            assert_eq!(r.status, 201, "{}", r.describe());
            assert!(reg.blob_bytes("dur/session", &digest).await == data);
        }
        404 => expect_error(&r, 404, &["BLOB_UPLOAD_UNKNOWN"]),
        _ => panic!("upload status after restart: {}", r.describe()),
    }
}

/// Starts a streaming request whose body is fed through a channel; returns the sender
/// and the request's join handle.
fn streaming_request(
    reg: &Registry,
    method: Method,
    url: &str,
) -> (
    mpsc::Sender<Bytes>,
    tokio::task::JoinHandle<Result<Resp, reqwest::Error>>,
) {
    let (tx, rx) = mpsc::channel::<Bytes>(2);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<Bytes, std::io::Error>(b), rx))
    });
    let rb = reg
        .req(method, url)
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(stream));
    // Sent once: a streamed body cannot be replayed.
    let handle = tokio::spawn(try_send_once(rb));
    (tx, handle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_streaming_upload_leaves_no_visible_blob() {
    let mut reg = Registry::start().await;
    let seed = fresh_seed();
    let total: u64 = 256 * 1024 * 1024;
    let digest = pattern_digest(seed, total);

    // Monolithic PUT whose body is still being sent when the server dies.
    let loc = reg.start_upload("dur/crash").await;
    let (tx, handle) = streaming_request(&reg, Method::PUT, &with_query(&loc, "digest", &digest));
    let chunk = 1024 * 1024;
    let mut sent = 0u64;
    while sent < 64 * 1024 * 1024 {
        let mut buf = vec![0u8; chunk];
        fill_pattern(seed, sent, &mut buf);
        tx.send(Bytes::from(buf))
            .await
            .expect("request ended early");
        sent += chunk as u64;
    }
    reg.kill9();
    drop(tx);
    let res = tokio::time::timeout(Duration::from_secs(30), handle)
        .await
        .expect("request did not end after kill -9")
        .unwrap();
    if let Ok(r) = &res {
        assert_ne!(
            r.status,
            201,
            "an incomplete upload was accepted: {}",
            r.describe()
        );
    }

    // Streamed PATCH (chunked session) interrupted the same way, in a second run.
    reg.restart().await;
    let r = reg.head(&format!("/v2/dur/crash/blobs/{digest}")).await;
    assert_eq!(
        r.status,
        404,
        "partial blob visible after restart: {}",
        r.describe()
    );
    let r = reg
        .post(&format!("/v2/dur/crash2/blobs/uploads/?mount={digest}"))
        .await;
    assert_eq!(r.status, 202, "partial blob mountable: {}", r.describe());

    let loc = reg.start_upload("dur/crash").await;
    let (tx, handle) = streaming_request(&reg, Method::PATCH, &loc);
    let mut sent = 0u64;
    while sent < 32 * 1024 * 1024 {
        let mut buf = vec![0u8; chunk];
        fill_pattern(seed, sent, &mut buf);
        tx.send(Bytes::from(buf))
            .await
            .expect("request ended early");
        sent += chunk as u64;
    }
    reg.kill9();
    drop(tx);
    let _ = tokio::time::timeout(Duration::from_secs(30), handle).await;
    reg.restart().await;
    let r = reg.head(&format!("/v2/dur/crash/blobs/{digest}")).await;
    assert_eq!(r.status, 404, "{}", r.describe());
    // The interrupted session is either gone or reports a consistent prefix.
    let s = reg.get(&path_and_query(&loc)).await;
    match s.status {
        404 => expect_error(&s, 404, &["BLOB_UPLOAD_UNKNOWN"]),
        204 => {
            let range = s.header("range").unwrap_or_default();
            let end: u64 = range
                .strip_prefix("0-")
                .and_then(|e| e.parse().ok())
                .unwrap_or_else(|| panic!("bad Range {range:?}"));
            assert!(
                end < sent,
                "session claims more bytes than were sent: {range}"
            );
        }
        _ => panic!("interrupted session: {}", s.describe()),
    }

    // The registry works normally.
    let data = random_bytes(fresh_seed(), 100_000);
    let d = reg.push_blob("dur/crash", &data).await;
    assert!(reg.blob_bytes("dur/crash", &d).await == data);
    let img = Image::oci(fresh_seed(), 1, 1000);
    img.push(&reg, "dur/crash", Some("ok")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_push_acknowledged_before_kill_9_is_intact_after_restart() {
    let mut reg = Registry::start().await;
    let url = reg.url();
    let client = reg.client().clone();
    // (kind, reference or digest, bytes) of every acknowledged push.
    type Acked = Vec<(String, String, Vec<u8>)>;
    let acked: Arc<Mutex<Acked>> = Arc::new(Mutex::new(Vec::new()));
    let acked2 = acked.clone();
    // kind, reference/digest, bytes
    let pusher = tokio::spawn(async move {
        let mut i = 0u64;
        loop {
            let data = random_bytes(fresh_seed(), 10_000 + (i as usize % 7) * 20_000);
            let digest = sha256_digest(&data);
            let post = client
                .post(format!("{url}/v2/dur/loop/blobs/uploads/"))
                .header("content-length", "0")
                .send()
                .await;
            let Ok(post) = post else { break };
            if post.status().as_u16() != 202 {
                break;
            }
            let loc = post.headers()["location"].to_str().unwrap().to_string();
            let loc = reqwest::Url::parse(&format!("{url}/"))
                .unwrap()
                .join(&loc)
                .unwrap();
            let put = client
                .put(with_query(loc.as_str(), "digest", &digest))
                .header("content-type", "application/octet-stream")
                .body(data.clone())
                .send()
                .await;
            match put {
                Ok(r) if r.status().as_u16() == 201 => {
                    acked2
                        .lock()
                        .unwrap()
                        .push(("blob".into(), digest.clone(), data.clone()));
                }
                _ => break,
            }
            // A manifest using that blob as config (any bytes are a valid config blob).
            let manifest = to_bytes(&serde_json::json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": descriptor(OCI_CONFIG, &data),
                "layers": [],
                "annotations": {"i": i.to_string()},
            }));
            let tag = format!("t{i}");
            let put = client
                .put(format!("{url}/v2/dur/loop/manifests/{tag}"))
                .header("content-type", OCI_MANIFEST)
                .body(manifest.clone())
                .send()
                .await;
            match put {
                Ok(r) if r.status().as_u16() == 201 => {
                    acked2
                        .lock()
                        .unwrap()
                        .push(("manifest".into(), tag, manifest));
                }
                _ => break,
            }
            i += 1;
        }
    });
    // Let it run, then pull the plug.
    let start = Instant::now();
    while acked.lock().unwrap().len() < 20 && start.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    reg.kill9();
    let _ = tokio::time::timeout(Duration::from_secs(30), pusher).await;
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= 20,
        "too few pushes before the kill: {}",
        acked.len()
    );

    reg.restart().await;
    for (kind, reference, bytes) in &acked {
        if kind == "blob" {
            let r = reg.get(&format!("/v2/dur/loop/blobs/{reference}")).await;
            assert_eq!(
                r.status,
                200,
                "acknowledged blob {reference} lost: {}",
                r.describe()
            );
            assert!(r.body == *bytes, "acknowledged blob {reference} corrupted");
        } else {
            let r = reg
                .get(&format!("/v2/dur/loop/manifests/{reference}"))
                .await;
            assert_eq!(
                r.status,
                200,
                "acknowledged manifest {reference} lost: {}",
                r.describe()
            );
            assert!(
                r.body == *bytes,
                "acknowledged manifest {reference} corrupted"
            );
        }
    }
    // The registry accepts new pushes afterwards.
    reg.push_blob("dur/loop", b"after the crash").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_upload_and_exits_zero() {
    let mut reg = Registry::start_with(Options::new().flag("--shutdown-grace-secs", 30)).await;
    let seed = fresh_seed();
    let chunk = 256 * 1024;
    let chunks = 16u64;
    let total = chunk as u64 * chunks;
    let digest = pattern_digest(seed, total);
    let loc = reg.start_upload("dur/drain").await;
    let (tx, handle) = streaming_request(&reg, Method::PUT, &with_query(&loc, "digest", &digest));

    let feeder = tokio::spawn(async move {
        for i in 0..chunks {
            let mut buf = vec![0u8; chunk];
            fill_pattern(seed, i * chunk as u64, &mut buf);
            if tx.send(Bytes::from(buf)).await.is_err() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        true
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(reg.is_running());
    reg.sigterm();

    // Readiness must drop (503) or the listener must be closed; never 200 any more.
    let probe = berth_client();
    let ready_url = format!("{}/readyz", reg.url());
    let not_ready = eventually(Duration::from_secs(2), || {
        let probe = probe.clone();
        let ready_url = ready_url.clone();
        async move {
            match probe
                .get(&ready_url)
                .timeout(Duration::from_secs(1))
                .send()
                .await
            {
                Ok(r) => r.status().as_u16() == 503,
                Err(_) => true,
            }
        }
    })
    .await;
    assert!(not_ready, "/readyz still 200 two seconds after SIGTERM");

    assert!(
        feeder.await.unwrap(),
        "the server stopped reading the upload body"
    );
    let res = tokio::time::timeout(Duration::from_secs(30), handle)
        .await
        .expect("in-flight upload did not finish")
        .unwrap()
        .expect("in-flight upload failed during drain");
    assert_eq!(
        res.status,
        201,
        "in-flight upload during drain: {}",
        res.describe()
    );

    let status = reg
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("berth did not exit after SIGTERM");
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status:?}"
    );

    reg.restart().await;
    let r = reg.head(&format!("/v2/dur/drain/blobs/{digest}")).await;
    assert_eq!(
        r.status,
        200,
        "blob uploaded during drain is missing: {}",
        r.describe()
    );
    assert_eq!(r.content_length(), Some(total));
}

#[tokio::test]
async fn sigterm_on_idle_server_exits_zero_quickly() {
    let mut reg = Registry::start().await;
    reg.push_blob("dur/idle", b"x").await;
    let t = Instant::now();
    reg.sigterm();
    let status = reg
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("berth did not exit after SIGTERM");
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "idle shutdown took {:?}",
        t.elapsed()
    );
}
