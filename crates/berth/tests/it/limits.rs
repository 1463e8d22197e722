//! Protection against slow and too many clients: the concurrent upload limit
//! (429 TOOMANYREQUESTS), the request body idle timeout, and chunks that are
//! not as long as announced.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

/// Path and query of an absolute upload URL, for raw requests.
fn path_of(url: &str) -> String {
    let parsed = reqwest::Url::parse(url).unwrap();
    match parsed.query() {
        Some(q) => format!("{}?{q}", parsed.path()),
        None => parsed.path().to_string(),
    }
}

/// Opens a PATCH that announces `announced` bytes but sends only `sent`, and
/// keeps the connection open.
async fn start_partial_patch(
    reg: &Registry,
    upload_url: &str,
    announced: usize,
    sent: usize,
) -> RawConn {
    let mut stream = reg.raw_stream().await;
    let head = format!(
        "PATCH {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\nContent-Length: {announced}\r\n\r\n",
        path_of(upload_url),
        reg.host_port()
    );
    stream
        .write_all(&with_credentials(head.as_bytes()))
        .await
        .unwrap();
    stream.write_all(&vec![b'x'; sent]).await.unwrap();
    stream.flush().await.unwrap();
    stream
}

async fn read_status(stream: &mut RawConn, within: Duration) -> Option<u16> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&buf);
    text.split_whitespace().nth(1)?.parse().ok()
}

#[tokio::test]
async fn uploads_beyond_the_concurrency_limit_get_429_until_a_slot_frees() {
    let reg = Registry::start_with(Options::new().flag("--max-concurrent-uploads", 1)).await;
    let first = reg.start_upload("limits/a").await;
    let second = reg.start_upload("limits/b").await;

    let mut slow = start_partial_patch(&reg, &first, 1000, 10).await;
    // Let the server admit the slow request before competing with it.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A body large enough that the client is still sending when the answer
    // comes: it reads the 429 only if the server drains what it refused.
    let refused = try_send(
        reg.req(reqwest::Method::PATCH, &second)
            .header("content-type", "application/octet-stream")
            .body(vec![1u8; 4 * 1024 * 1024]),
    )
    .await
    .expect("the refused client must get the 429, not a reset");
    assert_eq!(refused.status, 429, "{}", refused.describe());
    assert_eq!(refused.error_codes(), ["TOOMANYREQUESTS"]);
    assert_eq!(refused.header("retry-after").as_deref(), Some("1"));
    // Nothing was stored by the refused request.
    let status = reg.get(&second).await;
    assert_eq!(status.status, 204);
    assert_eq!(status.header("range").as_deref(), Some("0-0"));

    // Finishing the slow upload frees the slot.
    slow.write_all(&[b'x'; 990]).await.unwrap();
    assert_eq!(
        read_status(&mut slow, Duration::from_secs(10)).await,
        Some(202)
    );
    let admitted = reg.patch_bytes(&second, None, vec![1u8; 100]).await;
    assert_eq!(admitted.status, 202, "{}", admitted.describe());
    assert_eq!(admitted.header("range").as_deref(), Some("0-99"));
}

#[tokio::test]
async fn a_stalled_upload_body_is_abandoned_and_the_session_stays_resumable() {
    let reg = Registry::start_with(Options::new().flag("--body-idle-timeout-secs", 1)).await;
    let data = random_bytes(fresh_seed(), 3000);
    let upload = reg.start_upload("limits/stall").await;
    let first = reg
        .patch_bytes(&upload, Some("0-999"), data[..1000].to_vec())
        .await;
    assert_eq!(first.status, 202, "{}", first.describe());

    // A client that announces 2000 more bytes, sends 10, and goes silent.
    let mut stalled = start_partial_patch(&reg, &upload, 2000, 10).await;
    let answered = read_status(&mut stalled, Duration::from_secs(10)).await;
    assert!(
        answered.is_some_and(|s| (400..500).contains(&s)),
        "a stalled body must be refused with a 4xx, got {answered:?}"
    );

    // The partial chunk left no trace: the upload resumes from 1000.
    let status = reg.get(&upload).await;
    assert_eq!(status.status, 204, "{}", status.describe());
    assert_eq!(status.header("range").as_deref(), Some("0-999"));
    let rest = reg
        .patch_bytes(&upload, Some("1000-2999"), data[1000..].to_vec())
        .await;
    assert_eq!(rest.status, 202, "{}", rest.describe());
    let digest = sha256_digest(&data);
    let done = reg
        .put_bytes(
            &with_query(&upload, "digest", &digest),
            "application/octet-stream",
            Vec::new(),
        )
        .await;
    assert_eq!(done.status, 201, "{}", done.describe());
    assert_eq!(
        reg.get(&format!("/v2/limits/stall/blobs/{digest}"))
            .await
            .body
            .to_vec(),
        data
    );
}

#[tokio::test]
async fn a_chunk_shorter_than_its_content_range_is_rolled_back() {
    let reg = Registry::start().await;
    let upload = reg.start_upload("limits/short").await;
    // Chunked transfer encoding, so the only length the server knows is the
    // Content-Range's 100 bytes; the body has 40.
    let request = format!(
        "PATCH {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\nContent-Range: 0-99\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n28\r\n{}\r\n0\r\n\r\n",
        path_of(&upload),
        reg.host_port(),
        "y".repeat(40)
    );
    let resp = reg.raw(request.as_bytes(), Duration::from_secs(10)).await;
    assert_eq!(resp.status, 400, "{resp:?}");
    assert!(
        String::from_utf8_lossy(&resp.body).contains("SIZE_INVALID"),
        "{resp:?}"
    );
    let status = reg.get(&upload).await;
    assert_eq!(status.header("range").as_deref(), Some("0-0"));
    // The client can send the chunk again, whole.
    let again = reg
        .patch_bytes(&upload, Some("0-99"), vec![b'y'; 100])
        .await;
    assert_eq!(again.status, 202, "{}", again.describe());
}
