//! Error handling: invalid names, digests, tags, bodies, headers and paths must yield the
//! spec's JSON error bodies with the right codes, and never a 5xx.

use std::time::Duration;

use reqwest::Method;
use serde_json::json;

use crate::support::*;

fn invalid_names() -> Vec<String> {
    vec![
        "Upper/case".into(),
        "UPPER".into(),
        "a..b".into(),
        "a//b".into(),
        "-leading".into(),
        "trailing-".into(),
        "a/-b".into(),
        "a_/b".into(),
        "a%20b".into(),
        "a:b".into(),
        "a".repeat(256),
        format!("{}/{}", "a".repeat(200), "b".repeat(55)), // 256 chars with slash
    ]
}

#[tokio::test]
async fn invalid_repository_names_return_400_name_invalid() {
    let reg = Registry::start().await;
    let digest = sha256_digest(b"x");
    for name in invalid_names() {
        let short = truncate(&name, 40);
        let reqs: Vec<(&str, Resp)> = vec![
            ("tags/list", reg.get(&format!("/v2/{name}/tags/list")).await),
            (
                "GET manifest",
                reg.get(&format!("/v2/{name}/manifests/latest")).await,
            ),
            (
                "PUT manifest",
                reg.put_bytes(
                    &format!("/v2/{name}/manifests/latest"),
                    OCI_MANIFEST,
                    b"{}".to_vec(),
                )
                .await,
            ),
            (
                "GET blob",
                reg.get(&format!("/v2/{name}/blobs/{digest}")).await,
            ),
            (
                "POST upload",
                reg.post(&format!("/v2/{name}/blobs/uploads/")).await,
            ),
            (
                "referrers",
                reg.get(&format!("/v2/{name}/referrers/{digest}")).await,
            ),
        ];
        for (what, r) in reqs {
            assert_eq!(r.status, 400, "{what} on name {short:?}: {}", r.describe());
            let codes = check_error_body(&r);
            assert!(
                codes.iter().any(|c| c == "NAME_INVALID"),
                "{what} on name {short:?}: expected NAME_INVALID, got {codes:?}"
            );
        }
    }
}

#[tokio::test]
async fn leading_slash_in_repository_name_is_rejected() {
    let reg = Registry::start().await;
    for path in ["/v2//abc/tags/list", "/v2//abc/manifests/latest"] {
        let r = reg.get(path).await;
        expect_error(&r, 400, &["NAME_INVALID"]);
    }
    let r = reg.post("/v2//abc/blobs/uploads/").await;
    expect_error(&r, 400, &["NAME_INVALID"]);
}

#[tokio::test]
async fn repository_name_of_255_characters_is_valid() {
    let reg = Registry::start().await;
    let name = format!("{}/{}", "a".repeat(200), "b".repeat(54));
    assert_eq!(name.len(), 255);
    let r = reg.get(&format!("/v2/{name}/tags/list")).await;
    expect_error(&r, 404, &["NAME_UNKNOWN"]);
    let data = b"long name".to_vec();
    let digest = reg.push_blob(&name, &data).await;
    assert!(reg.blob_bytes(&name, &digest).await == data);
}

#[tokio::test]
async fn invalid_digests_return_400_digest_invalid() {
    let reg = Registry::start().await;
    let data = b"digest validation".to_vec();
    reg.push_blob("err/digest", &data).await;
    let bad = [
        "sha256:xyz",
        "sha256:abc",
        &format!("sha256:{}", "a".repeat(63)),
        &format!("sha256:{}", "a".repeat(65)),
        &format!("sha256:{}", "A".repeat(64)),
        "sha256:",
        ":abc",
        &format!("sha256{}", "a".repeat(64)), // no colon: a tag-like string for blobs
    ];
    for d in bad {
        for (what, r) in [
            (
                "GET blob",
                reg.get(&format!("/v2/err/digest/blobs/{d}")).await,
            ),
            (
                "DELETE blob",
                reg.delete(&format!("/v2/err/digest/blobs/{d}")).await,
            ),
            (
                "single POST",
                send(
                    reg.req(
                        Method::POST,
                        &format!("/v2/err/digest/blobs/uploads/?digest={d}"),
                    )
                    .header("content-type", "application/octet-stream")
                    .body(data.clone()),
                )
                .await,
            ),
        ] {
            expect_error(&r, 400, &["DIGEST_INVALID"]);
            let _ = what;
        }
        let r = reg.head(&format!("/v2/err/digest/blobs/{d}")).await;
        assert_eq!(r.status, 400, "HEAD blob {d}: {}", r.describe());

        let loc = reg.start_upload("err/digest").await;
        let r = reg
            .put_bytes(
                &with_query(&loc, "digest", d),
                "application/octet-stream",
                data.clone(),
            )
            .await;
        expect_error(&r, 400, &["DIGEST_INVALID"]);
    }
}

#[tokio::test]
async fn unknown_digest_algorithm_is_rejected_without_5xx() {
    let reg = Registry::start().await;
    let data = b"algorithms".to_vec();
    reg.push_blob("err/algo", &data).await;
    for d in [
        format!("md5:{}", "a".repeat(32)),
        format!("foo:{}", "a".repeat(64)),
        format!("sha1:{}", "a".repeat(40)),
    ] {
        let r = reg.get(&format!("/v2/err/algo/blobs/{d}")).await;
        assert!(
            r.status == 400 || r.status == 404,
            "GET blob {d}: {}",
            r.describe()
        );
        let codes = check_error_body(&r);
        assert!(
            codes
                .iter()
                .any(|c| c == "DIGEST_INVALID" || c == "BLOB_UNKNOWN"),
            "{d}: {codes:?}"
        );
        // Uploading with an unsupported algorithm can never be verified: must not succeed.
        let loc = reg.start_upload("err/algo").await;
        let r = reg
            .put_bytes(
                &with_query(&loc, "digest", &d),
                "application/octet-stream",
                data.clone(),
            )
            .await;
        expect_error(&r, 400, &["DIGEST_INVALID", "UNSUPPORTED"]);
    }
}

#[tokio::test]
async fn invalid_manifest_references_are_rejected() {
    let reg = Registry::start().await;
    let img = Image::oci(fresh_seed(), 1, 10);
    img.push(&reg, "err/ref", Some("ok")).await;
    let long_tag = "a".repeat(129);
    let bad_refs = [
        long_tag.as_str(),
        ".dot",
        "-dash",
        "sha256:xyz",
        "sha256:abc",
        "tag%21bang",
        "t@g",
    ];
    for reference in bad_refs {
        let r = reg
            .put_bytes(
                &format!("/v2/err/ref/manifests/{reference}"),
                OCI_MANIFEST,
                img.manifest.clone(),
            )
            .await;
        assert_eq!(
            r.status,
            400,
            "PUT manifest {reference:?}: {}",
            r.describe()
        );
        check_error_body(&r);
        let r = reg.get(&format!("/v2/err/ref/manifests/{reference}")).await;
        assert!(
            r.status == 400 || r.status == 404,
            "GET manifest {reference:?}: {}",
            r.describe()
        );
        check_error_body(&r);
        let r = reg
            .delete(&format!("/v2/err/ref/manifests/{reference}"))
            .await;
        assert!(
            r.status == 400 || r.status == 404,
            "DELETE manifest {reference:?}: {}",
            r.describe()
        );
        check_error_body(&r);
    }
    // Nothing was tagged by the rejected requests.
    assert_eq!(reg.tags("err/ref").await, vec!["ok"]);
}

#[tokio::test]
async fn wrong_or_missing_manifest_content_type_never_5xx() {
    let reg = Registry::start().await;
    let img = Image::oci(fresh_seed(), 1, 10);
    img.push_blobs(&reg, "err/ctype").await;
    let cases: Vec<(&str, Option<&str>)> = vec![
        ("missing", None),
        ("text/plain", Some("text/plain")),
        ("octet-stream", Some("application/octet-stream")),
        ("docker type for OCI body", Some(DOCKER_MANIFEST)),
        ("index type for manifest body", Some(OCI_INDEX)),
        ("garbage", Some("%%%/;;;")),
        (
            "with parameters",
            Some("application/vnd.oci.image.manifest.v1+json; charset=utf-8"),
        ),
    ];
    for (i, (what, ct)) in cases.into_iter().enumerate() {
        let tag = format!("ct{i}");
        let mut rb = reg
            .req(Method::PUT, &format!("/v2/err/ctype/manifests/{tag}"))
            .body(img.manifest.clone());
        if let Some(ct) = ct {
            rb = rb.header("content-type", ct);
        }
        let r = send(rb).await;
        assert!(
            r.status == 201 || (400..500).contains(&r.status),
            "{what}: {}",
            r.describe()
        );
        if r.status == 201 {
            // Accepted: what is served back must be the exact bytes and a manifest type.
            let g = reg.get(&format!("/v2/err/ctype/manifests/{tag}")).await;
            assert_eq!(g.status, 200);
            assert!(g.body == img.manifest, "{what}: bytes changed");
            let ct = g.header("content-type").unwrap_or_default();
            assert!(
                [OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX].contains(&ct.as_str()),
                "{what}: served with Content-Type {ct:?}"
            );
        } else {
            check_error_body(&r);
        }
    }
}

#[tokio::test]
async fn absurd_content_length_headers_never_5xx() {
    let reg = Registry::start_with(Options::new().flag("--max-blob-bytes", 1024 * 1024)).await;
    let loc = reg.start_upload("err/clen").await;
    let upload_path = path_and_query(&loc);
    let digest = sha256_digest(b"x");
    let put_path = with_query(&upload_path, "digest", &digest);
    let t = Duration::from_secs(15);

    // Unparseable or overflowing values: a 400 from the HTTP layer is fine.
    for cl in ["abc", "-1", "99999999999999999999999999", "1, 2", "0x10"] {
        for (method, path) in [
            ("PUT", put_path.as_str()),
            ("PUT", "/v2/err/clen/manifests/latest"),
            ("PATCH", upload_path.as_str()),
        ] {
            let req = format!(
                "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: {cl}\r\nConnection: close\r\n\r\n"
            );
            let r = reg.raw(req.as_bytes(), t).await;
            assert!(
                r.status == 0 || (400..500).contains(&r.status),
                "{method} {path} with Content-Length {cl:?}: {}",
                r.head
            );
        }
    }

    // Huge but valid values, with no body sent: the server must answer from the headers.
    let r = reg
        .raw(
            format!(
                "PUT /v2/err/clen/manifests/latest HTTP/1.1\r\nHost: x\r\nContent-Type: {OCI_MANIFEST}\r\nContent-Length: 1000000000000\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
            t,
        )
        .await;
    assert!(
        r.status == 413 || r.status == 400,
        "manifest PUT with Content-Length 1e12: {}",
        r.head
    );
    check_error_body(&r.as_resp());

    let r = reg
        .raw(
            format!(
                "PUT {put_path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: 1000000000000\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
            t,
        )
        .await;
    assert!(
        r.status == 413 || r.status == 400,
        "blob PUT with Content-Length 1e12 over --max-blob-bytes: {}",
        r.head
    );
    check_error_body(&r.as_resp());

    // Registry still healthy.
    reg.push_blob("err/clen", b"still fine").await;
}

#[tokio::test]
async fn absurd_or_malformed_range_headers_never_5xx() {
    let reg = Registry::start().await;
    let data = random_bytes(fresh_seed(), 100);
    let digest = reg.push_blob("err/range", &data).await;
    let path = format!("/v2/err/range/blobs/{digest}");
    for range in [
        "bytes=99999999999999999999999-",
        "bytes=0-99999999999999999999999",
        "bytes=-99999999999999999999999",
        "bytes=5-2",
        "bytes=abc",
        "bytes=",
        "bytes=-",
        "bytes=--1",
        "bytes=1-2-3",
        "bytes=0-1,3-4",
        "items=0-10",
        "garbage",
        "bytes=18446744073709551615-18446744073709551615",
        "bytes=-0",
    ] {
        let r = send(reg.req(Method::GET, &path).header("range", range)).await;
        assert!(
            [200, 206, 416].contains(&r.status),
            "Range {range:?}: {}",
            r.describe()
        );
        if r.status == 200 {
            assert!(
                r.body == data,
                "Range {range:?}: 200 must be the whole blob"
            );
        }
    }
}

#[tokio::test]
async fn malformed_content_range_on_patch_never_5xx() {
    let reg = Registry::start().await;
    for cr in [
        "abc",
        "9-0",
        "0-",
        "-9",
        "0-99999999999999999999999",
        "5-14", // does not start at 0
        "0-19", // length mismatch with the 10-byte body
        "0-4",  // length mismatch with the 10-byte body
    ] {
        let loc = reg.start_upload("err/crange").await;
        let r = reg.patch_bytes(&loc, Some(cr), vec![1u8; 10]).await;
        assert!(
            r.status == 400 || r.status == 416,
            "Content-Range {cr:?}: {}",
            r.describe()
        );
        if r.status == 400 {
            check_error_body(&r);
        }
    }
}

#[tokio::test]
async fn path_traversal_attempts_are_rejected() {
    let reg = Registry::start().await;
    reg.push_blob("err/trav", b"content").await;
    let digest = sha256_digest(b"content");
    let t = Duration::from_secs(10);
    let paths = [
        "/v2/../etc/passwd".to_string(),
        "/v2/../../../../etc/passwd".to_string(),
        "/v2/%2e%2e/%2e%2e/etc/passwd".to_string(),
        "/v2/%2E%2E/%2E%2E/%2E%2E/etc/passwd/tags/list".to_string(),
        "/v2/err/trav/../../../etc/passwd".to_string(),
        "/v2/err/trav/blobs/..%2f..%2f..%2fetc%2fpasswd".to_string(),
        "/v2/err/trav/blobs/sha256:..%2f..%2fetc%2fpasswd".to_string(),
        "/v2/err/trav/manifests/..%2f..%2f..%2fetc%2fpasswd".to_string(),
        "/v2/err/trav/manifests/../../../etc/passwd".to_string(),
        "/v2/err/trav/blobs/uploads/..%2f..%2f..%2fetc%2fpasswd".to_string(),
        "/v2/err/trav/blobs/uploads/../../../../etc/passwd".to_string(),
        "/v2/..%2f..%2fetc/tags/list".to_string(),
        "/v2/err%2f..%2f..%2fetc/tags/list".to_string(),
        format!("/v2/err/trav/../trav/blobs/{digest}"),
        "/v2/err/trav/tags/list/../../../../../../etc/passwd".to_string(),
        "/v2/%00/tags/list".to_string(),
        "/v2/err/trav/blobs/uploads/%00".to_string(),
        "/v2/err\\..\\..\\etc/tags/list".to_string(),
    ];
    for path in &paths {
        for method in ["GET", "HEAD", "DELETE", "PATCH", "PUT"] {
            let req = format!(
                "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            let r = reg.raw(req.as_bytes(), t).await;
            assert!(
                (400..500).contains(&r.status),
                "{method} {path}: expected 4xx, got {}\n{}",
                r.status,
                r.head
            );
            assert!(
                !r.body_text().contains("root:"),
                "{method} {path} leaked a file: {}",
                r.body_text()
            );
        }
    }
    // Nothing escaped the data dir: no stray files next to it.
    let parent = reg.data_dir().parent().unwrap();
    for entry in std::fs::read_dir(parent).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(
            name == "data" || name == "berth.log",
            "unexpected file {name:?} beside the data dir"
        );
    }
    // Registry still works.
    assert!(reg.blob_bytes("err/trav", &digest).await == b"content");
}

#[tokio::test]
async fn bad_pagination_parameters_never_5xx() {
    let reg = Registry::start().await;
    let img = Image::oci(fresh_seed(), 1, 10);
    img.push(&reg, "err/page", Some("a")).await;
    for q in [
        "n=-1",
        "n=abc",
        "n=99999999999999999999999",
        "n=",
        "last=",
        "n=1&n=2",
        "last=%00",
        "n=18446744073709551615",
    ] {
        for path in ["/v2/err/page/tags/list", "/v2/_catalog"] {
            let r = reg.get(&format!("{path}?{q}")).await;
            assert!(
                r.status == 200 || r.status == 400,
                "{path}?{q}: {}",
                r.describe()
            );
            if r.status == 400 {
                check_error_body(&r);
            }
        }
    }
}

#[tokio::test]
async fn unsupported_methods_never_5xx() {
    let reg = Registry::start().await;
    let img = Image::oci(fresh_seed(), 1, 10);
    img.push(&reg, "err/method", Some("a")).await;
    let blob = sha256_digest(&img.layers[0]);
    let cases = [
        ("PATCH", "/v2/err/method/manifests/a".to_string()),
        ("POST", "/v2/err/method/manifests/a".to_string()),
        ("PUT", format!("/v2/err/method/blobs/{blob}")),
        ("POST", format!("/v2/err/method/blobs/{blob}")),
        ("DELETE", "/v2/err/method/tags/list".to_string()),
        ("PUT", "/v2/_catalog".to_string()),
        ("DELETE", "/v2/".to_string()),
        ("OPTIONS", "/v2/".to_string()),
        ("TRACE", "/v2/".to_string()),
        ("BREW", "/v2/".to_string()),
    ];
    for (m, path) in cases {
        let r = send(
            reg.req(Method::from_bytes(m.as_bytes()).unwrap(), &path)
                .body(Vec::new()),
        )
        .await;
        assert!(
            r.status < 500 && r.status != 201 && r.status != 202,
            "{m} {path}: {}",
            r.describe()
        );
    }
    // The manifest is untouched.
    let r = reg.get("/v2/err/method/manifests/a").await;
    assert!(r.body == img.manifest);
}

#[tokio::test]
async fn garbage_requests_never_5xx() {
    let reg = Registry::start().await;
    reg.push_blob("err/fuzz", b"fuzz").await;
    let seed = fresh_seed();
    let mut rng = seed;
    let mut next = move || {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (rng >> 33) as usize
    };
    let segments = [
        "v2",
        "err",
        "fuzz",
        "blobs",
        "uploads",
        "manifests",
        "tags",
        "list",
        "referrers",
        "_catalog",
        "sha256:abc",
        "..",
        ".",
        "%2e",
        "%00",
        "",
        "latest",
        "A",
        "-",
        "_",
        "~",
        "%ff",
        "%",
        "x%zz",
        "ümlaut",
        "a@b",
        "a;b",
        "?",
        "#",
    ];
    let methods = ["GET", "HEAD", "PUT", "POST", "PATCH", "DELETE"];
    for _ in 0..150 {
        let n = 1 + next() % 6;
        let mut path = String::from("/v2");
        for _ in 0..n {
            path.push('/');
            path.push_str(segments[next() % segments.len()]);
        }
        if next() % 3 == 0 {
            path.push_str("?digest=sha256:zz&mount=..&from=/&n=-5&last=%ff");
        }
        let method = methods[next() % methods.len()];
        let body = if next() % 2 == 0 { "{\"x\":" } else { "" };
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {OCI_MANIFEST}\r\nContent-Range: {}\r\nRange: bytes={}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            ["0-4", "x", "5-1"][next() % 3],
            ["0-", "-1", "9-3", "a"][next() % 4],
            body.len()
        );
        let r = reg.raw(req.as_bytes(), Duration::from_secs(10)).await;
        assert!(
            r.status != 0 && r.status < 500,
            "seed {seed}: {method} {path}: {}",
            r.head
        );
    }
    reg.push_blob("err/fuzz", b"still alive").await;
}

#[tokio::test]
async fn error_bodies_are_spec_json_for_common_failures() {
    let reg = Registry::start().await;
    let img = Image::oci(fresh_seed(), 1, 10);
    img.push(&reg, "err/body", Some("a")).await;
    let cases: Vec<(Resp, u16, &str)> = vec![
        (
            reg.get(&format!("/v2/err/body/blobs/{}", sha256_digest(b"no")))
                .await,
            404,
            "BLOB_UNKNOWN",
        ),
        (
            reg.get("/v2/err/body/manifests/nope").await,
            404,
            "MANIFEST_UNKNOWN",
        ),
        (
            reg.get("/v2/err/nobody/tags/list").await,
            404,
            "NAME_UNKNOWN",
        ),
        (reg.get("/v2/ERR/tags/list").await, 400, "NAME_INVALID"),
        (
            reg.put_bytes("/v2/err/body/manifests/x", OCI_MANIFEST, b"{".to_vec())
                .await,
            400,
            "MANIFEST_INVALID",
        ),
        (
            reg.get("/v2/err/body/blobs/uploads/7e0b1f39-0000-4000-8000-000000000000")
                .await,
            404,
            "BLOB_UPLOAD_UNKNOWN",
        ),
    ];
    for (r, status, code) in cases {
        expect_error(&r, status, &[code]);
        let v = r.json();
        let e = &v["errors"][0];
        assert!(e["message"].is_string(), "message should be present: {v}");
    }
    // Valid JSON that is not a manifest.
    let r = reg
        .put_bytes(
            "/v2/err/body/manifests/b",
            OCI_MANIFEST,
            to_bytes(&json!({"schemaVersion": 2})),
        )
        .await;
    expect_error(&r, 400, &["MANIFEST_INVALID"]);
}
