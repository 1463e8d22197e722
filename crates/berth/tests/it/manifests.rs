//! Manifests: push/pull by tag and digest for every supported media type, validation,
//! size limits, subject header and deletion.

use serde_json::json;

use crate::support::*;

/// GET and HEAD `reference` and check bytes, Content-Type, digest and length.
async fn assert_manifest(reg: &Registry, repo: &str, reference: &str, bytes: &[u8], mt: &str) {
    let digest = sha256_digest(bytes);
    let path = format!("/v2/{repo}/manifests/{reference}");
    let r = send(reg.req(reqwest::Method::GET, &path).header(
        "accept",
        format!("{OCI_MANIFEST}, {OCI_INDEX}, {DOCKER_MANIFEST}, {DOCKER_LIST}"),
    ))
    .await;
    assert_eq!(r.status, 200, "GET {path}: {}", r.describe());
    assert!(
        r.body == bytes,
        "GET {path}: bytes differ\n got: {}\nwant: {}",
        r.text(),
        String::from_utf8_lossy(bytes)
    );
    assert_eq!(
        r.header("content-type").as_deref(),
        Some(mt),
        "GET {path} Content-Type"
    );
    assert_eq!(
        r.digest_header().as_deref(),
        Some(digest.as_str()),
        "GET {path} Docker-Content-Digest"
    );
    assert_eq!(r.content_length(), Some(bytes.len() as u64), "GET {path}");

    let r = reg.head(&path).await;
    assert_eq!(r.status, 200, "HEAD {path}: {}", r.describe());
    assert!(r.body.is_empty());
    assert_eq!(r.header("content-type").as_deref(), Some(mt), "HEAD {path}");
    assert_eq!(
        r.digest_header().as_deref(),
        Some(digest.as_str()),
        "HEAD {path}"
    );
    assert_eq!(r.content_length(), Some(bytes.len() as u64), "HEAD {path}");
}

#[tokio::test]
async fn oci_image_manifest_put_by_tag_is_pullable_by_tag_and_digest() {
    let reg = Registry::start().await;
    let img = Image::oci(fresh_seed(), 3, 5000);
    img.push_blobs(&reg, "man/oci").await;
    let r = reg
        .put_bytes(
            "/v2/man/oci/manifests/v1",
            OCI_MANIFEST,
            img.manifest.clone(),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.describe());
    assert_eq!(r.digest_header().as_deref(), Some(img.digest.as_str()));
    let loc = reg.resolve(&r.header("location").expect("Location"));
    let got = reg.get(&loc).await;
    assert_eq!(
        got.status,
        200,
        "GET manifest Location {loc}: {}",
        got.describe()
    );
    assert!(got.body == img.manifest);

    assert_manifest(&reg, "man/oci", "v1", &img.manifest, OCI_MANIFEST).await;
    assert_manifest(&reg, "man/oci", &img.digest, &img.manifest, OCI_MANIFEST).await;
    assert_eq!(reg.tags("man/oci").await, vec!["v1".to_string()]);
}

#[tokio::test]
async fn manifest_put_by_digest_is_pullable_and_untagged() {
    let reg = Registry::start().await;
    let img = Image::oci(fresh_seed(), 1, 100);
    img.push(&reg, "man/bydigest", None).await;
    assert_manifest(
        &reg,
        "man/bydigest",
        &img.digest,
        &img.manifest,
        OCI_MANIFEST,
    )
    .await;
    let tags = reg.tags("man/bydigest").await;
    assert!(
        tags.is_empty(),
        "a digest push must not create tags: {tags:?}"
    );
}

#[tokio::test]
async fn manifest_bytes_are_stored_verbatim() {
    let reg = Registry::start().await;
    let img = Image::oci(fresh_seed(), 1, 10);
    img.push_blobs(&reg, "man/verbatim").await;
    // Unusual but valid formatting: compact, reordered keys, trailing whitespace, unicode.
    let cfg = &descriptor(OCI_CONFIG, &img.config);
    let layer = &descriptor(OCI_LAYER_GZIP, &img.layers[0]);
    let text = format!(
        "{{\"layers\":[{}],\"config\":{},  \"annotations\":{{\"note\":\"h\\u00e9llo wörld\"}},\"mediaType\":\"{OCI_MANIFEST}\",\"schemaVersion\":2}}\n\n",
        serde_json::to_string(layer).unwrap(),
        serde_json::to_string(cfg).unwrap()
    );
    let bytes = text.into_bytes();
    reg.push_manifest("man/verbatim", "odd", OCI_MANIFEST, &bytes)
        .await;
    assert_manifest(&reg, "man/verbatim", "odd", &bytes, OCI_MANIFEST).await;
}

#[tokio::test]
async fn oci_index_roundtrip_by_tag_and_digest() {
    let reg = Registry::start().await;
    let a = Image::oci(fresh_seed(), 1, 1000);
    let b = Image::oci(fresh_seed(), 2, 1000);
    a.push(&reg, "man/index", None).await;
    b.push(&reg, "man/index", None).await;
    let mut da = a.descriptor();
    da["platform"] = json!({"architecture": "amd64", "os": "linux"});
    let mut db = b.descriptor();
    db["platform"] = json!({"architecture": "arm64", "os": "linux", "variant": "v8"});
    let index = index_json(OCI_INDEX, vec![da, db], json!({}));
    let digest = reg
        .push_manifest("man/index", "multi", OCI_INDEX, &index)
        .await;
    assert_manifest(&reg, "man/index", "multi", &index, OCI_INDEX).await;
    assert_manifest(&reg, "man/index", &digest, &index, OCI_INDEX).await;
    // Children still pullable.
    assert_manifest(&reg, "man/index", &a.digest, &a.manifest, OCI_MANIFEST).await;
}

#[tokio::test]
async fn docker_schema2_manifest_roundtrip() {
    let reg = Registry::start().await;
    let img = Image::docker(fresh_seed(), 2, 2000);
    let digest = img.push(&reg, "man/docker", Some("latest")).await;
    assert_manifest(&reg, "man/docker", "latest", &img.manifest, DOCKER_MANIFEST).await;
    assert_manifest(&reg, "man/docker", &digest, &img.manifest, DOCKER_MANIFEST).await;
}

#[tokio::test]
async fn docker_manifest_list_roundtrip() {
    let reg = Registry::start().await;
    let a = Image::docker(fresh_seed(), 1, 500);
    let b = Image::docker(fresh_seed(), 1, 500);
    a.push(&reg, "man/dlist", None).await;
    b.push(&reg, "man/dlist", None).await;
    let mut da = a.descriptor();
    da["platform"] = json!({"architecture": "amd64", "os": "linux"});
    let mut db = b.descriptor();
    db["platform"] = json!({"architecture": "arm", "os": "linux", "variant": "v7"});
    let list = index_json(DOCKER_LIST, vec![da, db], json!({}));
    let digest = reg
        .push_manifest("man/dlist", "v2", DOCKER_LIST, &list)
        .await;
    assert_manifest(&reg, "man/dlist", "v2", &list, DOCKER_LIST).await;
    assert_manifest(&reg, "man/dlist", &digest, &list, DOCKER_LIST).await;
}

#[tokio::test]
async fn artifact_manifest_with_empty_config_roundtrip() {
    let reg = Registry::start().await;
    assert_eq!(sha256_digest(b"{}"), EMPTY_DIGEST);
    let empty = reg.push_blob("man/artifact", b"{}").await;
    assert_eq!(empty, EMPTY_DIGEST);
    let sbom = br#"{"spdxVersion":"SPDX-2.3"}"#;
    reg.push_blob("man/artifact", sbom).await;
    let m = artifact_manifest(
        "application/vnd.example.sbom.v1",
        &[("application/spdx+json", sbom)],
        None,
        Some(json!({"org.opencontainers.image.created": "2024-01-01T00:00:00Z"})),
    );
    let digest = reg
        .push_manifest("man/artifact", "sbom", OCI_MANIFEST, &m)
        .await;
    assert_manifest(&reg, "man/artifact", "sbom", &m, OCI_MANIFEST).await;
    assert_manifest(&reg, "man/artifact", &digest, &m, OCI_MANIFEST).await;

    // Artifact without any blob content: layers holds the empty descriptor.
    let m2 = to_bytes(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.marker",
        "config": { "mediaType": OCI_EMPTY, "digest": EMPTY_DIGEST, "size": 2, "data": "e30=" },
        "layers": [ { "mediaType": OCI_EMPTY, "digest": EMPTY_DIGEST, "size": 2 } ],
    }));
    reg.push_manifest("man/artifact", "marker", OCI_MANIFEST, &m2)
        .await;
    assert_manifest(&reg, "man/artifact", "marker", &m2, OCI_MANIFEST).await;
}

#[tokio::test]
async fn manifest_referencing_missing_blob_is_rejected_manifest_blob_unknown() {
    let reg = Registry::start().await;
    // Missing layer.
    let img = Image::oci(fresh_seed(), 2, 100);
    reg.push_blob("man/missing", &img.config).await;
    reg.push_blob("man/missing", &img.layers[0]).await;
    let r = reg
        .put_bytes(
            "/v2/man/missing/manifests/t",
            OCI_MANIFEST,
            img.manifest.clone(),
        )
        .await;
    expect_error(&r, 400, &["MANIFEST_BLOB_UNKNOWN"]);

    // Missing config.
    let img2 = Image::oci(fresh_seed(), 1, 100);
    reg.push_blob("man/missing", &img2.layers[0]).await;
    let r = reg
        .put_bytes(
            "/v2/man/missing/manifests/t",
            OCI_MANIFEST,
            img2.manifest.clone(),
        )
        .await;
    expect_error(&r, 400, &["MANIFEST_BLOB_UNKNOWN"]);

    // Blob that exists only in another repository.
    let img3 = Image::oci(fresh_seed(), 1, 100);
    img3.push_blobs(&reg, "man/elsewhere").await;
    let r = reg
        .put_bytes(
            &format!("/v2/man/missing/manifests/{}", img3.digest),
            OCI_MANIFEST,
            img3.manifest.clone(),
        )
        .await;
    expect_error(&r, 400, &["MANIFEST_BLOB_UNKNOWN"]);

    let r = reg.get("/v2/man/missing/manifests/t").await;
    assert_eq!(r.status, 404, "{}", r.describe());
    let r = reg
        .get(&format!("/v2/man/missing/manifests/{}", img.digest))
        .await;
    assert_eq!(r.status, 404, "{}", r.describe());
}

#[tokio::test]
async fn index_referencing_missing_child_manifest_is_rejected() {
    let reg = Registry::start().await;
    let present = Image::oci(fresh_seed(), 1, 100);
    present.push(&reg, "man/badindex", None).await;
    let absent = Image::oci(fresh_seed(), 1, 100);
    absent.push_blobs(&reg, "man/badindex").await; // blobs but no manifest
    let index = index_json(
        OCI_INDEX,
        vec![present.descriptor(), absent.descriptor()],
        json!({}),
    );
    let r = reg
        .put_bytes("/v2/man/badindex/manifests/multi", OCI_INDEX, index)
        .await;
    expect_error(&r, 400, &["MANIFEST_BLOB_UNKNOWN"]);
    let r = reg.get("/v2/man/badindex/manifests/multi").await;
    expect_error(&r, 404, &["MANIFEST_UNKNOWN"]);

    let list = index_json(DOCKER_LIST, vec![absent.descriptor()], json!({}));
    let r = reg
        .put_bytes("/v2/man/badindex/manifests/dlist", DOCKER_LIST, list)
        .await;
    expect_error(&r, 400, &["MANIFEST_BLOB_UNKNOWN"]);
}

#[tokio::test]
async fn put_by_digest_with_different_body_is_rejected_digest_invalid() {
    let reg = Registry::start().await;
    let a = Image::oci(fresh_seed(), 1, 100);
    let b = Image::oci(fresh_seed(), 1, 100);
    a.push_blobs(&reg, "man/digestmismatch").await;
    b.push_blobs(&reg, "man/digestmismatch").await;
    let r = reg
        .put_bytes(
            &format!("/v2/man/digestmismatch/manifests/{}", a.digest),
            OCI_MANIFEST,
            b.manifest.clone(),
        )
        .await;
    expect_error(&r, 400, &["DIGEST_INVALID"]);
    for d in [&a.digest, &b.digest] {
        let r = reg
            .head(&format!("/v2/man/digestmismatch/manifests/{d}"))
            .await;
        assert_eq!(r.status, 404, "manifest {d} must not be stored");
    }
}

#[tokio::test]
async fn malformed_manifest_is_rejected_manifest_invalid() {
    let reg = Registry::start().await;
    let img = Image::oci(fresh_seed(), 1, 100);
    img.push_blobs(&reg, "man/malformed").await;
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        (
            "truncated JSON",
            b"{\"schemaVersion\": 2, \"config\": {".to_vec(),
        ),
        ("not JSON", b"this is not json".to_vec()),
        ("JSON array", b"[1,2,3]".to_vec()),
        ("empty body", Vec::new()),
        (
            "missing config",
            to_bytes(&json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []})),
        ),
        (
            "schemaVersion 1",
            to_bytes(&json!({
                "schemaVersion": 1, "mediaType": OCI_MANIFEST,
                "config": descriptor(OCI_CONFIG, &img.config), "layers": []
            })),
        ),
        (
            "descriptor with invalid digest",
            to_bytes(&json!({
                "schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": "sha256:nothex", "size": 3},
                "layers": []
            })),
        ),
        (
            "layers is not an array",
            to_bytes(&json!({
                "schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": descriptor(OCI_CONFIG, &img.config), "layers": "nope"
            })),
        ),
        ("invalid UTF-8", vec![b'{', 0xff, 0xfe, b'}']),
    ];
    for (what, body) in bodies {
        let r = reg
            .put_bytes("/v2/man/malformed/manifests/bad", OCI_MANIFEST, body)
            .await;
        assert_eq!(r.status, 400, "{what}: {}", r.describe());
        let codes = check_error_body(&r);
        assert!(
            codes.iter().any(|c| c == "MANIFEST_INVALID"),
            "{what}: expected MANIFEST_INVALID, got {codes:?}"
        );
    }
    let r = reg.get("/v2/man/malformed/manifests/bad").await;
    assert_eq!(r.status, 404);
}

/// A syntactically valid OCI manifest of exactly `size` bytes (padded with an annotation).
fn manifest_of_size(img: &Image, size: usize) -> Vec<u8> {
    let base = |pad: &str| {
        to_bytes(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptor(OCI_CONFIG, &img.config),
            "layers": img.layers.iter().map(|l| descriptor(OCI_LAYER_GZIP, l)).collect::<Vec<_>>(),
            "annotations": {"pad": pad},
        }))
    };
    let empty_len = base("").len();
    assert!(size >= empty_len);
    let m = base(&"x".repeat(size - empty_len));
    assert_eq!(m.len(), size);
    m
}

#[tokio::test]
async fn manifest_over_4_mib_is_rejected_with_spec_error_and_4_mib_is_accepted() {
    let reg = Registry::start().await;
    let img = Image::oci(fresh_seed(), 1, 100);
    img.push_blobs(&reg, "man/size").await;

    let at_limit = manifest_of_size(&img, 4 * 1024 * 1024);
    reg.push_manifest("man/size", "max", OCI_MANIFEST, &at_limit)
        .await;
    assert_manifest(&reg, "man/size", "max", &at_limit, OCI_MANIFEST).await;

    let over = manifest_of_size(&img, 4 * 1024 * 1024 + 1);
    let r = try_send(
        reg.req(reqwest::Method::PUT, "/v2/man/size/manifests/over")
            .header("content-type", OCI_MANIFEST)
            .body(over),
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "PUT of a 4 MiB + 1 manifest: the client never got a response ({e:?}); \
             a server that rejects early must still drain the body or close lingeringly \
             (RFC 9112 section 9.6) so the client can read the 413"
        )
    });
    assert!(
        r.status == 413 || r.status == 400,
        "oversized manifest: {}",
        r.describe()
    );
    let codes = check_error_body(&r);
    assert!(
        codes
            .iter()
            .any(|c| c == "MANIFEST_INVALID" || c == "SIZE_INVALID"),
        "{codes:?}"
    );
    let r = reg.get("/v2/man/size/manifests/over").await;
    assert_eq!(r.status, 404);

    // Larger (6 MiB), streamed without Content-Length: still a clean 4xx.
    let r = try_send(
        reg.req(reqwest::Method::PUT, "/v2/man/size/manifests/huge")
            .header("content-type", OCI_MANIFEST)
            .body(pattern_body(fresh_seed(), 6 * 1024 * 1024, 256 * 1024)),
    )
    .await
    .unwrap_or_else(|e| {
        panic!("PUT of a streamed 6 MiB manifest: the client never got a response ({e:?})")
    });
    assert!(
        r.status == 413 || r.status == 400,
        "6 MiB streamed manifest: {}",
        r.describe()
    );
    check_error_body(&r);
}

#[tokio::test]
async fn max_manifest_bytes_flag_sets_the_limit() {
    let reg = Registry::start_with(Options::new().flag("--max-manifest-bytes", 2048)).await;
    let img = Image::oci(fresh_seed(), 1, 100);
    img.push_blobs(&reg, "man/limit").await;
    let ok = manifest_of_size(&img, 2048);
    reg.push_manifest("man/limit", "ok", OCI_MANIFEST, &ok)
        .await;
    let too_big = manifest_of_size(&img, 2049);
    let r = reg
        .put_bytes("/v2/man/limit/manifests/big", OCI_MANIFEST, too_big)
        .await;
    assert!(
        r.status == 413 || r.status == 400,
        "manifest over --max-manifest-bytes: {}",
        r.describe()
    );
    let codes = check_error_body(&r);
    assert!(
        codes
            .iter()
            .any(|c| c == "MANIFEST_INVALID" || c == "SIZE_INVALID"),
        "{codes:?}"
    );
}

#[tokio::test]
async fn manifest_with_subject_returns_oci_subject_header() {
    let reg = Registry::start().await;
    let base = Image::oci(fresh_seed(), 1, 100);
    base.push(&reg, "man/subject", Some("base")).await;
    reg.push_blob("man/subject", b"{}").await;
    let sig = b"signature bytes".to_vec();
    reg.push_blob("man/subject", &sig).await;
    let m = artifact_manifest(
        "application/vnd.example.signature",
        &[("application/octet-stream", &sig)],
        Some(base.descriptor()),
        None,
    );
    let r = reg
        .put_bytes(
            &format!("/v2/man/subject/manifests/{}", sha256_digest(&m)),
            OCI_MANIFEST,
            m.clone(),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.describe());
    assert_eq!(
        r.header("oci-subject").as_deref(),
        Some(base.digest.as_str()),
        "OCI-Subject: {}",
        r.describe()
    );

    // An image manifest (not an artifact) with a subject, pushed by tag.
    let img = Image::oci_with(fresh_seed(), 1, 50, json!({"subject": base.descriptor()}));
    img.push_blobs(&reg, "man/subject").await;
    let r = reg
        .put_bytes(
            "/v2/man/subject/manifests/with-subject",
            OCI_MANIFEST,
            img.manifest.clone(),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.describe());
    assert_eq!(
        r.header("oci-subject").as_deref(),
        Some(base.digest.as_str())
    );

    // Without subject, no header.
    let plain = Image::oci(fresh_seed(), 1, 50);
    plain.push_blobs(&reg, "man/subject").await;
    let r = reg
        .put_bytes(
            "/v2/man/subject/manifests/plain",
            OCI_MANIFEST,
            plain.manifest.clone(),
        )
        .await;
    assert_eq!(r.status, 201);
    assert!(r.header("oci-subject").is_none(), "{}", r.describe());
}

#[tokio::test]
async fn delete_manifest_by_digest_removes_it_and_its_tags() {
    let reg = Registry::start().await;
    let a = Image::oci(fresh_seed(), 1, 100);
    let b = Image::oci(fresh_seed(), 1, 100);
    a.push(&reg, "man/del", Some("t1")).await;
    reg.push_manifest("man/del", "t2", OCI_MANIFEST, &a.manifest)
        .await;
    b.push(&reg, "man/del", Some("t3")).await;
    assert_eq!(reg.tags("man/del").await, vec!["t1", "t2", "t3"]);

    let r = reg
        .delete(&format!("/v2/man/del/manifests/{}", a.digest))
        .await;
    assert_eq!(r.status, 202, "{}", r.describe());

    for reference in [a.digest.as_str(), "t1", "t2"] {
        let r = reg.get(&format!("/v2/man/del/manifests/{reference}")).await;
        expect_error(&r, 404, &["MANIFEST_UNKNOWN"]);
        let r = reg
            .head(&format!("/v2/man/del/manifests/{reference}"))
            .await;
        assert_eq!(r.status, 404, "HEAD {reference}");
    }
    assert_eq!(reg.tags("man/del").await, vec!["t3"]);
    assert_manifest(&reg, "man/del", "t3", &b.manifest, OCI_MANIFEST).await;

    // Deleting again is 404 MANIFEST_UNKNOWN.
    let r = reg
        .delete(&format!("/v2/man/del/manifests/{}", a.digest))
        .await;
    expect_error(&r, 404, &["MANIFEST_UNKNOWN"]);
    // And it can be pushed again.
    reg.push_manifest("man/del", "again", OCI_MANIFEST, &a.manifest)
        .await;
    assert_manifest(&reg, "man/del", &a.digest, &a.manifest, OCI_MANIFEST).await;
}

#[tokio::test]
async fn delete_by_tag_removes_only_the_tag() {
    let reg = Registry::start().await;
    let img = Image::oci(fresh_seed(), 1, 100);
    img.push(&reg, "man/deltag", Some("a")).await;
    reg.push_manifest("man/deltag", "b", OCI_MANIFEST, &img.manifest)
        .await;

    let r = reg.delete("/v2/man/deltag/manifests/a").await;
    assert_eq!(r.status, 202, "{}", r.describe());
    let r = reg.get("/v2/man/deltag/manifests/a").await;
    expect_error(&r, 404, &["MANIFEST_UNKNOWN"]);
    assert_manifest(&reg, "man/deltag", "b", &img.manifest, OCI_MANIFEST).await;
    assert_manifest(&reg, "man/deltag", &img.digest, &img.manifest, OCI_MANIFEST).await;
    assert_eq!(reg.tags("man/deltag").await, vec!["b"]);

    let r = reg.delete("/v2/man/deltag/manifests/nonexistent").await;
    expect_error(&r, 404, &["MANIFEST_UNKNOWN"]);
}

#[tokio::test]
async fn unknown_manifest_returns_404_manifest_unknown() {
    let reg = Registry::start().await;
    let img = Image::oci(fresh_seed(), 1, 100);
    img.push(&reg, "man/unknown", Some("exists")).await;
    let missing = sha256_digest(b"no such manifest");
    for reference in ["nope", missing.as_str()] {
        let r = reg
            .get(&format!("/v2/man/unknown/manifests/{reference}"))
            .await;
        expect_error(&r, 404, &["MANIFEST_UNKNOWN"]);
        let r = reg
            .head(&format!("/v2/man/unknown/manifests/{reference}"))
            .await;
        assert_eq!(r.status, 404);
        assert!(r.body.is_empty());
    }
    // A blob digest is not a manifest.
    let r = reg
        .get(&format!(
            "/v2/man/unknown/manifests/{}",
            sha256_digest(&img.layers[0])
        ))
        .await;
    expect_error(&r, 404, &["MANIFEST_UNKNOWN"]);
    // Repository that does not exist.
    let r = reg.get("/v2/man/no-such-repo/manifests/latest").await;
    assert_eq!(r.status, 404, "{}", r.describe());
    let codes = check_error_body(&r);
    assert!(
        codes
            .iter()
            .any(|c| c == "MANIFEST_UNKNOWN" || c == "NAME_UNKNOWN"),
        "{codes:?}"
    );
}

#[tokio::test]
async fn retagging_moves_the_tag_and_keeps_old_manifest_by_digest() {
    let reg = Registry::start().await;
    let a = Image::oci(fresh_seed(), 1, 100);
    let b = Image::oci(fresh_seed(), 1, 100);
    a.push(&reg, "man/retag", Some("latest")).await;
    // Pushing the same manifest to the same tag again is fine.
    reg.push_manifest("man/retag", "latest", OCI_MANIFEST, &a.manifest)
        .await;
    assert_manifest(&reg, "man/retag", "latest", &a.manifest, OCI_MANIFEST).await;
    b.push(&reg, "man/retag", Some("latest")).await;
    assert_manifest(&reg, "man/retag", "latest", &b.manifest, OCI_MANIFEST).await;
    assert_manifest(&reg, "man/retag", &a.digest, &a.manifest, OCI_MANIFEST).await;
    assert_eq!(reg.tags("man/retag").await, vec!["latest"]);
}

#[tokio::test]
async fn manifests_are_scoped_to_their_repository() {
    let reg = Registry::start().await;
    let img = Image::oci(fresh_seed(), 1, 100);
    img.push(&reg, "man/scope-a", Some("v1")).await;
    reg.push_blob("man/scope-b", b"make repo exist").await;
    let r = reg
        .get(&format!("/v2/man/scope-b/manifests/{}", img.digest))
        .await;
    assert_eq!(r.status, 404, "{}", r.describe());
    let r = reg.get("/v2/man/scope-b/manifests/v1").await;
    assert_eq!(r.status, 404, "{}", r.describe());
}

#[tokio::test]
async fn tag_of_exactly_128_characters_is_accepted() {
    let reg = Registry::start().await;
    let img = Image::oci(fresh_seed(), 1, 100);
    let tag = format!("A{}", "b_.-9".repeat(26))
        .chars()
        .take(128)
        .collect::<String>();
    assert_eq!(tag.len(), 128);
    img.push(&reg, "man/longtag", Some(&tag)).await;
    assert_manifest(&reg, "man/longtag", &tag, &img.manifest, OCI_MANIFEST).await;
    assert_eq!(reg.tags("man/longtag").await, vec![tag]);
}
