//! Blob uploads: monolithic, single POST, chunked, streamed, cancel, mount, expiry.

use std::time::Duration;

use reqwest::Method;

use crate::support::*;

#[tokio::test]
async fn post_upload_returns_202_with_location_and_upload_uuid() {
    let reg = Registry::start().await;
    let r = reg.post("/v2/uploads/start/blobs/uploads/").await;
    assert_eq!(r.status, 202, "{}", r.describe());
    let loc = r.header("location").expect("Location header");
    let uuid = r
        .header("docker-upload-uuid")
        .expect("Docker-Upload-UUID header");
    assert!(!uuid.is_empty());
    assert!(
        loc.contains(&uuid),
        "Location {loc:?} should contain the upload id {uuid:?}"
    );
    // Location is either relative or absolute; once resolved it must point at this registry.
    let abs = reqwest::Url::parse(&reg.resolve(&loc)).unwrap();
    assert_eq!(abs.host_str(), Some("127.0.0.1"), "Location {loc:?}");
    assert_eq!(
        abs.port_or_known_default(),
        Some(reg.port()),
        "Location {loc:?}"
    );
    assert!(
        abs.path().starts_with("/v2/uploads/start/blobs/uploads/"),
        "Location path {loc:?}"
    );

    // Two sessions get distinct ids.
    let r2 = reg.post("/v2/uploads/start/blobs/uploads/").await;
    assert_eq!(r2.status, 202);
    assert_ne!(r2.header("docker-upload-uuid"), Some(uuid));
}

#[tokio::test]
async fn upload_location_works_both_absolute_and_as_path_only() {
    let reg = Registry::start().await;
    let data = random_bytes(fresh_seed(), 1000);
    let digest = sha256_digest(&data);

    // absolute form
    let abs = reg.start_upload("uploads/loc").await;
    let r = reg
        .patch_bytes(&abs, Some("0-499"), data[..500].to_vec())
        .await;
    assert_eq!(r.status, 202, "PATCH via absolute URL: {}", r.describe());
    // path-only (relative) form of the Location returned by the PATCH
    let loc = reg.resolve(&r.header("location").expect("PATCH Location"));
    let rel = path_and_query(&loc);
    let r = reg
        .put_bytes(
            &with_query(&rel, "digest", &digest),
            "application/octet-stream",
            data[500..].to_vec(),
        )
        .await;
    assert_eq!(r.status, 201, "PUT via path-only URL: {}", r.describe());
    assert!(reg.blob_bytes("uploads/loc", &digest).await == data);
}

#[tokio::test]
async fn monolithic_post_then_put_creates_pullable_blob() {
    let reg = Registry::start().await;
    let data = random_bytes(fresh_seed(), 65_537);
    let digest = sha256_digest(&data);
    let loc = reg.start_upload("uploads/mono").await;
    let r = reg
        .put_bytes(
            &with_query(&loc, "digest", &digest),
            "application/octet-stream",
            data.clone(),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.describe());
    assert_eq!(r.digest_header().as_deref(), Some(digest.as_str()));
    let blob_loc = reg.resolve(&r.header("location").expect("Location of the blob"));
    let r = reg.get(&blob_loc).await;
    assert_eq!(
        r.status,
        200,
        "GET blob Location {blob_loc}: {}",
        r.describe()
    );
    assert!(r.body == data);
    // The finished session is gone.
    let r = reg.get(&loc).await;
    expect_error(&r, 404, &["BLOB_UPLOAD_UNKNOWN"]);
}

#[tokio::test]
async fn single_post_with_digest_creates_blob() {
    let reg = Registry::start().await;
    let data = random_bytes(fresh_seed(), 10_000);
    let digest = sha256_digest(&data);
    let r = send(
        reg.req(
            Method::POST,
            &format!("/v2/uploads/single/blobs/uploads/?digest={digest}"),
        )
        .header("content-type", "application/octet-stream")
        .body(data.clone()),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.describe());
    assert_eq!(r.digest_header().as_deref(), Some(digest.as_str()));
    let blob_loc = reg.resolve(&r.header("location").expect("Location"));
    let got = reg.get(&blob_loc).await;
    assert_eq!(got.status, 200, "{}", got.describe());
    assert!(got.body == data);
}

#[tokio::test]
async fn chunked_upload_with_content_range_reports_progress_and_completes() {
    let reg = Registry::start().await;
    let data = random_bytes(fresh_seed(), 30_000);
    let digest = sha256_digest(&data);
    let r = reg.post("/v2/uploads/chunked/blobs/uploads/").await;
    assert_eq!(r.status, 202);
    let uuid = r.header("docker-upload-uuid").expect("Docker-Upload-UUID");
    let mut loc = reg.resolve(&r.header("location").unwrap());

    for (start, end) in [(0usize, 9_999usize), (10_000, 19_999), (20_000, 29_999)] {
        let r = reg
            .patch_bytes(
                &loc,
                Some(&format!("{start}-{end}")),
                data[start..=end].to_vec(),
            )
            .await;
        assert_eq!(r.status, 202, "PATCH {start}-{end}: {}", r.describe());
        assert_eq!(
            r.header("range").as_deref(),
            Some(format!("0-{end}").as_str()),
            "PATCH {start}-{end} Range: {}",
            r.describe()
        );
        loc = reg.resolve(&r.header("location").expect("PATCH Location"));

        // Status of the session.
        let s = reg.get(&loc).await;
        assert_eq!(s.status, 204, "GET upload status: {}", s.describe());
        assert_eq!(
            s.header("range").as_deref(),
            Some(format!("0-{end}").as_str())
        );
        assert_eq!(
            s.header("docker-upload-uuid").as_deref(),
            Some(uuid.as_str())
        );
        assert!(
            s.header("location").is_some(),
            "GET status without Location"
        );
    }

    // Close with an empty PUT.
    let r = send(
        reg.req(Method::PUT, &with_query(&loc, "digest", &digest))
            .header("content-length", "0")
            .body(Vec::new()),
    )
    .await;
    assert_eq!(r.status, 201, "closing PUT: {}", r.describe());
    assert_eq!(r.digest_header().as_deref(), Some(digest.as_str()));
    assert!(reg.blob_bytes("uploads/chunked", &digest).await == data);
}

#[tokio::test]
async fn out_of_order_chunk_returns_416_and_session_stays_usable() {
    let reg = Registry::start().await;
    let data = random_bytes(fresh_seed(), 30);
    let digest = sha256_digest(&data);
    let loc = reg.start_upload("uploads/order").await;
    let r = reg
        .patch_bytes(&loc, Some("0-9"), data[0..10].to_vec())
        .await;
    assert_eq!(r.status, 202, "{}", r.describe());
    let loc = reg.resolve(&r.header("location").unwrap());

    // Gap: starts at 20 instead of 10.
    let r = reg
        .patch_bytes(&loc, Some("20-29"), data[20..30].to_vec())
        .await;
    assert_eq!(r.status, 416, "gap chunk: {}", r.describe());
    assert_eq!(
        r.header("range").as_deref(),
        Some("0-9"),
        "416 should report the current Range: {}",
        r.describe()
    );
    // Overlap: starts at 5.
    let r = reg
        .patch_bytes(&loc, Some("5-14"), data[5..15].to_vec())
        .await;
    assert_eq!(r.status, 416, "overlapping chunk: {}", r.describe());
    // Restart from 0 on a non-empty session.
    let r = reg
        .patch_bytes(&loc, Some("0-9"), data[0..10].to_vec())
        .await;
    assert_eq!(r.status, 416, "chunk starting at 0 again: {}", r.describe());

    // The session still reports 0-9 and accepts the right chunk.
    let s = reg.get(&loc).await;
    assert_eq!(s.status, 204, "{}", s.describe());
    assert_eq!(s.header("range").as_deref(), Some("0-9"));
    let r = reg
        .patch_bytes(&loc, Some("10-19"), data[10..20].to_vec())
        .await;
    assert_eq!(r.status, 202, "{}", r.describe());
    assert_eq!(r.header("range").as_deref(), Some("0-19"));
    let loc = reg.resolve(&r.header("location").unwrap());
    let r = reg
        .put_bytes(
            &with_query(&loc, "digest", &digest),
            "application/octet-stream",
            data[20..].to_vec(),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.describe());
    assert!(reg.blob_bytes("uploads/order", &digest).await == data);
}

#[tokio::test]
async fn patch_without_content_range_appends_streamed_chunks() {
    let reg = Registry::start().await;
    let seed = fresh_seed();
    let len1: u64 = 3 * 1024 * 1024 + 17;
    let len2: u64 = 1024 * 1024;
    let whole = random_bytes(seed, (len1 + len2) as usize);
    let digest = sha256_digest(&whole);
    let loc = reg.start_upload("uploads/stream").await;

    // First chunk: a chunked-encoding stream without Content-Length / Content-Range.
    let body = pattern_body(seed, len1, 64 * 1024);
    let r = send(
        reg.req(Method::PATCH, &loc)
            .header("content-type", "application/octet-stream")
            .body(body),
    )
    .await;
    assert_eq!(r.status, 202, "streamed PATCH: {}", r.describe());
    assert_eq!(
        r.header("range").as_deref(),
        Some(format!("0-{}", len1 - 1).as_str())
    );
    let loc = reg.resolve(&r.header("location").unwrap());

    // Second chunk: plain body without Content-Range.
    let r = reg
        .patch_bytes(&loc, None, whole[len1 as usize..].to_vec())
        .await;
    assert_eq!(r.status, 202, "second PATCH: {}", r.describe());
    assert_eq!(
        r.header("range").as_deref(),
        Some(format!("0-{}", len1 + len2 - 1).as_str())
    );
    let loc = reg.resolve(&r.header("location").unwrap());
    let r = send(
        reg.req(Method::PUT, &with_query(&loc, "digest", &digest))
            .body(Vec::new()),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.describe());
    assert!(reg.blob_bytes("uploads/stream", &digest).await == whole);
}

#[tokio::test]
async fn closing_put_may_carry_the_final_chunk() {
    let reg = Registry::start().await;
    let data = random_bytes(fresh_seed(), 5000);
    let digest = sha256_digest(&data);

    // With Content-Range on the final chunk.
    let loc = reg.start_upload("uploads/final").await;
    let r = reg
        .patch_bytes(&loc, Some("0-2999"), data[..3000].to_vec())
        .await;
    assert_eq!(r.status, 202, "{}", r.describe());
    let loc = reg.resolve(&r.header("location").unwrap());
    let r = send(
        reg.req(Method::PUT, &with_query(&loc, "digest", &digest))
            .header("content-type", "application/octet-stream")
            .header("content-range", "3000-4999")
            .body(data[3000..].to_vec()),
    )
    .await;
    assert_eq!(r.status, 201, "PUT with final chunk: {}", r.describe());
    assert!(reg.blob_bytes("uploads/final", &digest).await == data);

    // Without Content-Range on the final chunk.
    let data2 = random_bytes(fresh_seed(), 4000);
    let digest2 = sha256_digest(&data2);
    let loc = reg.start_upload("uploads/final").await;
    let r = reg
        .patch_bytes(&loc, Some("0-999"), data2[..1000].to_vec())
        .await;
    assert_eq!(r.status, 202, "{}", r.describe());
    let loc = reg.resolve(&r.header("location").unwrap());
    let r = reg
        .put_bytes(
            &with_query(&loc, "digest", &digest2),
            "application/octet-stream",
            data2[1000..].to_vec(),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.describe());
    assert!(reg.blob_bytes("uploads/final", &digest2).await == data2);
}

#[tokio::test]
async fn delete_upload_returns_204_and_session_becomes_unknown() {
    let reg = Registry::start().await;
    let loc = reg.start_upload("uploads/cancel").await;
    let r = reg.patch_bytes(&loc, Some("0-3"), b"abcd".to_vec()).await;
    assert_eq!(r.status, 202, "{}", r.describe());
    let loc = reg.resolve(&r.header("location").unwrap());

    let r = reg.delete(&loc).await;
    assert_eq!(r.status, 204, "DELETE upload: {}", r.describe());

    let r = reg.get(&loc).await;
    expect_error(&r, 404, &["BLOB_UPLOAD_UNKNOWN"]);
    let r = reg.patch_bytes(&loc, Some("4-7"), b"efgh".to_vec()).await;
    expect_error(&r, 404, &["BLOB_UPLOAD_UNKNOWN"]);
    let r = reg
        .put_bytes(
            &with_query(&loc, "digest", &sha256_digest(b"abcd")),
            "application/octet-stream",
            Vec::new(),
        )
        .await;
    expect_error(&r, 404, &["BLOB_UPLOAD_UNKNOWN"]);
    let r = reg.delete(&loc).await;
    expect_error(&r, 404, &["BLOB_UPLOAD_UNKNOWN"]);
    // Nothing was stored.
    let r = reg
        .head(&format!(
            "/v2/uploads/cancel/blobs/{}",
            sha256_digest(b"abcd")
        ))
        .await;
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn unknown_upload_id_returns_404_blob_upload_unknown() {
    let reg = Registry::start().await;
    // Make the repository exist.
    reg.push_blob("uploads/unknown", b"x").await;
    let base = "/v2/uploads/unknown/blobs/uploads";
    for id in [
        "3f1c8a52-7b1e-4c8e-9a57-2b6b2c1e0f11",
        "00000000-0000-0000-0000-000000000000",
        "not-a-uuid",
    ] {
        let url = format!("{base}/{id}");
        let r = reg.get(&url).await;
        expect_error(&r, 404, &["BLOB_UPLOAD_UNKNOWN"]);
        let r = reg.patch_bytes(&url, Some("0-0"), b"x".to_vec()).await;
        expect_error(&r, 404, &["BLOB_UPLOAD_UNKNOWN"]);
        let r = reg
            .put_bytes(
                &format!("{url}?digest={}", sha256_digest(b"x")),
                "application/octet-stream",
                b"x".to_vec(),
            )
            .await;
        expect_error(&r, 404, &["BLOB_UPLOAD_UNKNOWN"]);
        let r = reg.delete(&url).await;
        expect_error(&r, 404, &["BLOB_UPLOAD_UNKNOWN"]);
    }
}

#[tokio::test]
async fn upload_session_of_one_repository_is_unknown_in_another() {
    let reg = Registry::start().await;
    let loc = reg.start_upload("uploads/owner").await;
    let other = loc.replace("/v2/uploads/owner/", "/v2/uploads/intruder/");
    assert_ne!(loc, other);
    let r = reg.get(&other).await;
    expect_error(&r, 404, &["BLOB_UPLOAD_UNKNOWN"]);
    let data = b"hijack".to_vec();
    let r = reg
        .put_bytes(
            &with_query(&other, "digest", &sha256_digest(&data)),
            "application/octet-stream",
            data.clone(),
        )
        .await;
    expect_error(&r, 404, &["BLOB_UPLOAD_UNKNOWN"]);
    // The owner's session still works.
    let r = reg.get(&loc).await;
    assert_eq!(r.status, 204, "{}", r.describe());
}

#[tokio::test]
async fn digest_mismatch_returns_400_digest_invalid_and_stores_nothing() {
    let reg = Registry::start().await;
    let data = random_bytes(fresh_seed(), 4096);
    let actual = sha256_digest(&data);
    let claimed = sha256_digest(b"something else entirely");

    // Monolithic PUT.
    let loc = reg.start_upload("uploads/mismatch").await;
    let r = reg
        .put_bytes(
            &with_query(&loc, "digest", &claimed),
            "application/octet-stream",
            data.clone(),
        )
        .await;
    expect_error(&r, 400, &["DIGEST_INVALID"]);

    // Single POST.
    let r = send(
        reg.req(
            Method::POST,
            &format!("/v2/uploads/mismatch/blobs/uploads/?digest={claimed}"),
        )
        .header("content-type", "application/octet-stream")
        .body(data.clone()),
    )
    .await;
    expect_error(&r, 400, &["DIGEST_INVALID"]);

    // Chunked, closed with the wrong digest.
    let loc = reg.start_upload("uploads/mismatch").await;
    let r = reg.patch_bytes(&loc, Some("0-4095"), data.clone()).await;
    assert_eq!(r.status, 202);
    let loc = reg.resolve(&r.header("location").unwrap());
    let r = send(
        reg.req(Method::PUT, &with_query(&loc, "digest", &claimed))
            .body(Vec::new()),
    )
    .await;
    expect_error(&r, 400, &["DIGEST_INVALID"]);

    for d in [&actual, &claimed] {
        let r = reg.head(&format!("/v2/uploads/mismatch/blobs/{d}")).await;
        assert_eq!(
            r.status,
            404,
            "blob {d} must not be stored: {}",
            r.describe()
        );
    }
    let r = reg
        .post(&format!("/v2/uploads/other/blobs/uploads/?mount={actual}"))
        .await;
    assert_eq!(
        r.status,
        202,
        "mount of a blob whose upload failed must not succeed: {}",
        r.describe()
    );
}

#[tokio::test]
async fn put_without_digest_parameter_is_rejected() {
    let reg = Registry::start().await;
    let loc = reg.start_upload("uploads/nodigest").await;
    let r = reg
        .put_bytes(&loc, "application/octet-stream", b"data".to_vec())
        .await;
    assert_eq!(r.status, 400, "{}", r.describe());
    let codes = check_error_body(&r);
    assert!(
        codes
            .iter()
            .any(|c| c == "DIGEST_INVALID" || c == "BLOB_UPLOAD_INVALID"),
        "{codes:?}"
    );
}

#[tokio::test]
async fn cross_repository_mount_returns_201_with_location() {
    let reg = Registry::start().await;
    let data = random_bytes(fresh_seed(), 3000);
    let digest = reg.push_blob("mount/source", &data).await;
    let r = reg
        .post(&format!(
            "/v2/mount/target/blobs/uploads/?mount={digest}&from=mount/source"
        ))
        .await;
    assert_eq!(r.status, 201, "{}", r.describe());
    let loc = reg.resolve(&r.header("location").expect("Location"));
    assert!(loc.contains("/v2/mount/target/blobs/"), "Location {loc}");
    if let Some(d) = r.digest_header() {
        assert_eq!(d, digest);
    }
    let got = reg.get(&loc).await;
    assert_eq!(got.status, 200, "{}", got.describe());
    assert!(got.body == data);
    let head = reg.head(&format!("/v2/mount/target/blobs/{digest}")).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.content_length(), Some(data.len() as u64));
}

#[tokio::test]
async fn mount_without_from_finds_blob_elsewhere_in_registry() {
    let reg = Registry::start().await;
    let data = random_bytes(fresh_seed(), 3000);
    let digest = reg.push_blob("mount/anywhere-src", &data).await;
    let r = reg
        .post(&format!(
            "/v2/mount/anywhere-dst/blobs/uploads/?mount={digest}"
        ))
        .await;
    if secure_pass() {
        // With authentication a mount must name a source the caller may
        // pull: without one, a digest alone would read any repository's
        // blob. The client gets an upload session instead.
        assert_eq!(r.status, 202, "{}", r.describe());
        return;
    }
    assert_eq!(r.status, 201, "{}", r.describe());
    assert!(reg.blob_bytes("mount/anywhere-dst", &digest).await == data);
}

#[tokio::test]
async fn mount_of_unknown_blob_falls_back_to_a_working_upload_session() {
    let reg = Registry::start().await;
    let data = random_bytes(fresh_seed(), 2500);
    let digest = sha256_digest(&data);
    reg.push_blob("mount/empty-src", b"unrelated").await;
    let r = reg
        .post(&format!(
            "/v2/mount/fallback/blobs/uploads/?mount={digest}&from=mount/empty-src"
        ))
        .await;
    assert_eq!(r.status, 202, "{}", r.describe());
    let loc = reg.resolve(&r.header("location").expect("Location"));
    assert!(r.header("docker-upload-uuid").is_some());
    let r = reg
        .put_bytes(
            &with_query(&loc, "digest", &digest),
            "application/octet-stream",
            data.clone(),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.describe());
    assert!(reg.blob_bytes("mount/fallback", &digest).await == data);
}

#[tokio::test]
async fn blob_larger_than_max_blob_bytes_is_rejected_and_not_stored() {
    const LIMIT: usize = 1024 * 1024;
    let reg = Registry::start_with(Options::new().flag("--max-blob-bytes", LIMIT)).await;
    let ok = random_bytes(fresh_seed(), LIMIT);
    reg.push_blob("uploads/limit", &ok).await;

    let big = random_bytes(fresh_seed(), 3 * LIMIT);
    let digest = sha256_digest(&big);
    let reply = |what: &'static str| {
        move |e: reqwest::Error| -> Resp {
            panic!(
                "{what}: the client never got a response ({e:?}); a server that rejects \
                 early must still drain the body or close lingeringly (RFC 9112 section 9.6)"
            )
        }
    };
    // Monolithic, just over the limit and well over it.
    for len in [LIMIT + 1, 3 * LIMIT] {
        let body = big[..len].to_vec();
        let d = sha256_digest(&body);
        let loc = reg.start_upload("uploads/limit").await;
        let r = try_send(
            reg.req(Method::PUT, &with_query(&loc, "digest", &d))
                .header("content-type", "application/octet-stream")
                .body(body),
        )
        .await
        .unwrap_or_else(reply("monolithic PUT over --max-blob-bytes"));
        assert!(
            r.status == 413 || r.status == 400,
            "oversized blob ({len} bytes): {}",
            r.describe()
        );
        check_error_body(&r);
        let h = reg.head(&format!("/v2/uploads/limit/blobs/{d}")).await;
        assert_eq!(h.status, 404, "oversized blob was stored");
    }
    // Streamed (no Content-Length) single POST.
    let r = try_send(
        reg.req(
            Method::POST,
            &format!("/v2/uploads/limit/blobs/uploads/?digest={digest}"),
        )
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            big.chunks(64 * 1024)
                .map(|c| Ok::<_, std::io::Error>(bytes::Bytes::copy_from_slice(c)))
                .collect::<Vec<_>>(),
        ))),
    )
    .await
    .unwrap_or_else(reply("streamed POST over --max-blob-bytes"));
    assert!(
        r.status == 413 || r.status == 400,
        "streamed oversized blob: {}",
        r.describe()
    );
    check_error_body(&r);
    // Chunked, each chunk under the limit but the total over it.
    let loc = reg.start_upload("uploads/limit").await;
    let half = LIMIT / 2 + 1;
    let r1 = reg
        .patch_bytes(&loc, Some(&format!("0-{}", half - 1)), big[..half].to_vec())
        .await;
    assert_eq!(r1.status, 202, "{}", r1.describe());
    let loc = reg.resolve(&r1.header("location").unwrap());
    let r2 = try_send(
        reg.req(Method::PATCH, &loc)
            .header("content-type", "application/octet-stream")
            .header("content-range", format!("{half}-{}", 2 * half - 1))
            .body(big[half..2 * half].to_vec()),
    )
    .await
    .unwrap_or_else(reply("PATCH taking the upload over --max-blob-bytes"));
    assert!(
        r2.status == 413 || r2.status == 400,
        "chunk taking the upload over the limit: {}",
        r2.describe()
    );
    check_error_body(&r2);
    let r = reg.head(&format!("/v2/uploads/limit/blobs/{digest}")).await;
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn upload_sessions_expire_after_ttl() {
    let reg = Registry::start_with(
        Options::new()
            .flag("--upload-ttl-secs", 1)
            .flag("--upload-reap-interval-secs", 1),
    )
    .await;
    let idle = reg.start_upload("uploads/ttl").await;
    let partial = reg.start_upload("uploads/ttl").await;
    let r = reg
        .patch_bytes(&partial, Some("0-1023"), vec![7u8; 1024])
        .await;
    assert_eq!(r.status, 202, "{}", r.describe());
    let partial = reg.resolve(&r.header("location").unwrap());

    let expired = eventually(Duration::from_secs(10), || async {
        reg.get(&idle).await.status == 404 && reg.get(&partial).await.status == 404
    })
    .await;
    assert!(expired, "upload sessions did not expire within 10 s");
    let r = reg.get(&idle).await;
    expect_error(&r, 404, &["BLOB_UPLOAD_UNKNOWN"]);
    let r = reg
        .patch_bytes(&partial, Some("1024-2047"), vec![7u8; 1024])
        .await;
    expect_error(&r, 404, &["BLOB_UPLOAD_UNKNOWN"]);
    let r = reg
        .put_bytes(
            &with_query(&partial, "digest", &sha256_digest(&[7u8; 1024])),
            "application/octet-stream",
            Vec::new(),
        )
        .await;
    expect_error(&r, 404, &["BLOB_UPLOAD_UNKNOWN"]);

    // New uploads still work.
    reg.push_blob("uploads/ttl", b"after expiry").await;
}

/// Two chunks racing for one offset (two clients, or a client retrying on
/// another node): exactly one is recorded, the other gets 416 and leaves no
/// trace, and the upload completes with the winner's bytes.
#[tokio::test]
async fn racing_chunks_for_one_offset_record_exactly_one() {
    let reg = Registry::start().await;
    for round in 0..5 {
        let loc = reg.start_upload("uploads/race").await;
        let first = random_bytes(fresh_seed(), 300_000);
        let second = random_bytes(fresh_seed(), 300_000);
        let (a, b) = tokio::join!(
            reg.patch_bytes(&loc, Some("0-299999"), first.clone()),
            reg.patch_bytes(&loc, Some("0-299999"), second.clone())
        );
        let statuses = [a.status, b.status];
        assert!(
            statuses.contains(&202) && statuses.contains(&416),
            "round {round}: {} / {}",
            a.describe(),
            b.describe()
        );
        let winner = if a.status == 202 { &first } else { &second };
        let status = reg.get(&loc).await;
        assert_eq!(status.header("range").as_deref(), Some("0-299999"));
        let digest = sha256_digest(winner);
        let r = reg
            .put_bytes(
                &with_query(&loc, "digest", &digest),
                "application/octet-stream",
                Vec::new(),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.describe());
        assert_eq!(&reg.blob_bytes("uploads/race", &digest).await, winner);
    }
}

/// A completing PUT retried after it succeeded (its response was lost) is
/// answered as a success, not as an unknown upload.
#[tokio::test]
async fn a_retried_completing_put_succeeds_again() {
    let reg = Registry::start().await;
    let loc = reg.start_upload("uploads/retry").await;
    let data = random_bytes(fresh_seed(), 100_000);
    let digest = sha256_digest(&data);
    let url = with_query(&loc, "digest", &digest);
    let r = reg
        .put_bytes(&url, "application/octet-stream", data.clone())
        .await;
    assert_eq!(r.status, 201, "{}", r.describe());
    let again = reg
        .put_bytes(&url, "application/octet-stream", data.clone())
        .await;
    assert_eq!(again.status, 201, "{}", again.describe());
    assert_eq!(again.digest_header().as_deref(), Some(digest.as_str()));
    // A different digest on the ended session is still unknown.
    let other = with_query(&loc, "digest", &sha256_digest(b"other"));
    let r = reg
        .put_bytes(&other, "application/octet-stream", Vec::new())
        .await;
    expect_error(&r, 404, &["BLOB_UPLOAD_UNKNOWN"]);
}
