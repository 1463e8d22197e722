//! Blob pulls: GET/HEAD, ranges, repository scoping and deletion.

use crate::support::*;

#[tokio::test]
async fn blob_get_and_head_return_exact_bytes_digest_and_length() {
    let reg = Registry::start().await;
    let data = random_bytes(fresh_seed(), 100_003);
    let digest = reg.push_blob("blobs/get", &data).await;

    let r = reg.get(&format!("/v2/blobs/get/blobs/{digest}")).await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(r.body.len(), data.len());
    assert!(r.body == data, "GET blob returned different bytes");
    assert_eq!(r.digest_header().as_deref(), Some(digest.as_str()));
    assert_eq!(r.content_length(), Some(data.len() as u64));

    let r = reg.head(&format!("/v2/blobs/get/blobs/{digest}")).await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert!(r.body.is_empty(), "HEAD must not return a body");
    assert_eq!(r.digest_header().as_deref(), Some(digest.as_str()));
    assert_eq!(
        r.content_length(),
        Some(data.len() as u64),
        "HEAD Content-Length: {}",
        r.describe()
    );
}

#[tokio::test]
async fn empty_blob_can_be_pushed_and_pulled() {
    let reg = Registry::start().await;
    let digest = reg.push_blob("blobs/empty", b"").await;
    assert_eq!(
        digest,
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    let r = reg.get(&format!("/v2/blobs/empty/blobs/{digest}")).await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert!(r.body.is_empty());
    assert_eq!(r.content_length(), Some(0));
    let r = reg.head(&format!("/v2/blobs/empty/blobs/{digest}")).await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(r.content_length(), Some(0));
}

async fn range_get(reg: &Registry, path: &str, range: &str) -> Resp {
    send(reg.req(reqwest::Method::GET, path).header("range", range)).await
}

#[tokio::test]
async fn blob_range_requests_return_206_with_content_range() {
    let reg = Registry::start().await;
    let data = random_bytes(fresh_seed(), 1000);
    let digest = reg.push_blob("blobs/range", &data).await;
    let path = format!("/v2/blobs/range/blobs/{digest}");

    // (range header, expected first, expected last)
    let cases: &[(&str, usize, usize)] = &[
        ("bytes=0-0", 0, 0),
        ("bytes=0-99", 0, 99),
        ("bytes=100-199", 100, 199),
        ("bytes=999-999", 999, 999),
        ("bytes=500-", 500, 999),     // open-ended
        ("bytes=-10", 990, 999),      // suffix
        ("bytes=-5000", 0, 999),      // suffix longer than blob
        ("bytes=900-5000", 900, 999), // end beyond size is clamped
        ("bytes=0-999", 0, 999),
    ];
    for (range, first, last) in cases {
        let r = range_get(&reg, &path, range).await;
        assert_eq!(r.status, 206, "Range {range}: {}", r.describe());
        assert_eq!(
            r.header("content-range").as_deref(),
            Some(format!("bytes {first}-{last}/1000").as_str()),
            "Range {range}: {}",
            r.describe()
        );
        assert_eq!(
            r.content_length(),
            Some((last - first + 1) as u64),
            "Range {range} Content-Length"
        );
        assert!(
            r.body == data[*first..=*last],
            "Range {range}: wrong bytes (got {} bytes)",
            r.body.len()
        );
    }
}

#[tokio::test]
async fn blob_unsatisfiable_range_returns_416() {
    let reg = Registry::start().await;
    let data = random_bytes(fresh_seed(), 100);
    let digest = reg.push_blob("blobs/range416", &data).await;
    let path = format!("/v2/blobs/range416/blobs/{digest}");
    for range in ["bytes=100-", "bytes=100-200", "bytes=5000-6000"] {
        let r = range_get(&reg, &path, range).await;
        assert_eq!(r.status, 416, "Range {range}: {}", r.describe());
        if let Some(cr) = r.header("content-range") {
            assert_eq!(cr, "bytes */100", "Range {range}: Content-Range of a 416");
        }
    }
}

#[tokio::test]
async fn unknown_blob_returns_404_blob_unknown() {
    let reg = Registry::start().await;
    reg.push_blob("blobs/unknown", b"something").await;
    let missing = sha256_digest(b"never pushed");
    let r = reg.get(&format!("/v2/blobs/unknown/blobs/{missing}")).await;
    expect_error(&r, 404, &["BLOB_UNKNOWN"]);
    let r = reg
        .head(&format!("/v2/blobs/unknown/blobs/{missing}"))
        .await;
    assert_eq!(r.status, 404, "{}", r.describe());
    assert!(r.body.is_empty(), "HEAD must not return a body");
    // In a repository that does not exist at all.
    let r = reg.get(&format!("/v2/blobs/nowhere/blobs/{missing}")).await;
    assert_eq!(r.status, 404, "{}", r.describe());
    let codes = check_error_body(&r);
    assert!(
        codes
            .iter()
            .any(|c| c == "BLOB_UNKNOWN" || c == "NAME_UNKNOWN"),
        "{codes:?}"
    );
}

#[tokio::test]
async fn blob_in_one_repository_is_not_visible_in_another_until_mounted() {
    let reg = Registry::start().await;
    let data = random_bytes(fresh_seed(), 4096);
    let digest = reg.push_blob("scope/a", &data).await;
    // Make repo b exist with other content.
    reg.push_blob("scope/b", b"other content").await;

    let r = reg.get(&format!("/v2/scope/b/blobs/{digest}")).await;
    expect_error(&r, 404, &["BLOB_UNKNOWN"]);
    let r = reg.head(&format!("/v2/scope/b/blobs/{digest}")).await;
    assert_eq!(r.status, 404, "{}", r.describe());

    let r = reg
        .post(&format!(
            "/v2/scope/b/blobs/uploads/?mount={digest}&from=scope/a"
        ))
        .await;
    assert_eq!(r.status, 201, "mount: {}", r.describe());
    let r = reg.get(&format!("/v2/scope/b/blobs/{digest}")).await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert!(r.body == data);
    // Still in the original repository too.
    assert!(reg.blob_bytes("scope/a", &digest).await == data);
}

#[tokio::test]
async fn delete_blob_returns_202_then_404() {
    let reg = Registry::start().await;
    let data = random_bytes(fresh_seed(), 2048);
    let digest = reg.push_blob("blobs/delete", &data).await;
    // The same blob in another repository must survive the deletion.
    reg.push_blob("blobs/keep", &data).await;

    let r = reg
        .delete(&format!("/v2/blobs/delete/blobs/{digest}"))
        .await;
    assert_eq!(r.status, 202, "{}", r.describe());
    let r = reg.get(&format!("/v2/blobs/delete/blobs/{digest}")).await;
    expect_error(&r, 404, &["BLOB_UNKNOWN"]);
    let r = reg.head(&format!("/v2/blobs/delete/blobs/{digest}")).await;
    assert_eq!(r.status, 404, "{}", r.describe());

    // Deleting again: 404 BLOB_UNKNOWN.
    let r = reg
        .delete(&format!("/v2/blobs/delete/blobs/{digest}"))
        .await;
    expect_error(&r, 404, &["BLOB_UNKNOWN"]);

    assert!(reg.blob_bytes("blobs/keep", &digest).await == data);

    // It can be pushed again afterwards.
    reg.push_blob("blobs/delete", &data).await;
    assert!(reg.blob_bytes("blobs/delete", &digest).await == data);
}

#[tokio::test]
async fn blob_pushed_to_nested_repository_names_is_retrievable() {
    let reg = Registry::start().await;
    let data = random_bytes(fresh_seed(), 777);
    for repo in [
        "a",
        "a/b",
        "a/b/c/d/e",
        "x.y-z_w/0-9",
        "library/ubuntu",
        "registry.example.com/team/app",
    ] {
        let digest = reg.push_blob(repo, &data).await;
        assert!(reg.blob_bytes(repo, &digest).await == data, "repo {repo}");
    }
}

#[tokio::test]
async fn deleted_blob_can_no_longer_be_referenced_or_mounted_from_that_repository() {
    let reg = Registry::start().await;
    let img = Image::oci(fresh_seed(), 1, 500);
    img.push_blobs(&reg, "blobs/gone").await;
    let layer = sha256_digest(&img.layers[0]);
    let r = reg.delete(&format!("/v2/blobs/gone/blobs/{layer}")).await;
    assert_eq!(r.status, 202, "{}", r.describe());

    let r = reg
        .put_bytes(
            "/v2/blobs/gone/manifests/v1",
            OCI_MANIFEST,
            img.manifest.clone(),
        )
        .await;
    expect_error(&r, 400, &["MANIFEST_BLOB_UNKNOWN"]);

    let r = reg
        .post(&format!(
            "/v2/blobs/gone-target/blobs/uploads/?mount={layer}&from=blobs/gone"
        ))
        .await;
    assert_eq!(
        r.status,
        202,
        "mounting a deleted blob must fall back to an upload session: {}",
        r.describe()
    );
    let r = reg
        .head(&format!("/v2/blobs/gone-target/blobs/{layer}"))
        .await;
    assert_eq!(r.status, 404, "{}", r.describe());
}
