//! Concurrent pushes of the same content and racing tag updates.

use std::collections::HashSet;

use futures_util::future::join_all;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_pushes_of_the_same_blob_all_succeed() {
    let reg = Registry::start().await;
    let data = random_bytes(fresh_seed(), 2 * 1024 * 1024 + 3);
    let digest = sha256_digest(&data);
    let futs = (0..16).map(|i| {
        let reg = &reg;
        let data = data.clone();
        let digest = digest.clone();
        async move {
            // Mix monolithic, single-POST and chunked uploads.
            match i % 3 {
                0 => {
                    let loc = reg.start_upload("conc/blob").await;
                    reg.put_bytes(
                        &with_query(&loc, "digest", &digest),
                        "application/octet-stream",
                        data,
                    )
                    .await
                }
                1 => {
                    send(
                        reg.req(
                            reqwest::Method::POST,
                            &format!("/v2/conc/blob/blobs/uploads/?digest={digest}"),
                        )
                        .header("content-type", "application/octet-stream")
                        .body(data),
                    )
                    .await
                }
                _ => {
                    let loc = reg.start_upload("conc/blob").await;
                    let half = data.len() / 2;
                    let r = reg
                        .patch_bytes(
                            &loc,
                            Some(&format!("0-{}", half - 1)),
                            data[..half].to_vec(),
                        )
                        .await;
                    assert_eq!(r.status, 202, "PATCH: {}", r.describe());
                    let loc = reg.resolve(&r.header("location").unwrap());
                    reg.put_bytes(
                        &with_query(&loc, "digest", &digest),
                        "application/octet-stream",
                        data[half..].to_vec(),
                    )
                    .await
                }
            }
        }
    });
    let results = join_all(futs).await;
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.status, 201, "push #{i}: {}", r.describe());
    }
    let r = reg.get(&format!("/v2/conc/blob/blobs/{digest}")).await;
    assert_eq!(r.status, 200);
    assert_eq!(sha256_digest(&r.body), digest);
    assert_eq!(r.content_length(), Some(data.len() as u64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_tag_puts_end_in_a_consistent_state() {
    let reg = Registry::start().await;
    let images: Vec<Image> = (0..16).map(|_| Image::oci(fresh_seed(), 1, 256)).collect();
    for img in &images {
        img.push_blobs(&reg, "conc/tag").await;
    }
    let futs = images.iter().map(|img| {
        let reg = &reg;
        async move {
            reg.put_bytes(
                "/v2/conc/tag/manifests/latest",
                OCI_MANIFEST,
                img.manifest.clone(),
            )
            .await
        }
    });
    let results = join_all(futs).await;
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.status, 201, "PUT #{i}: {}", r.describe());
        assert_eq!(
            r.digest_header().as_deref(),
            Some(images[i].digest.as_str())
        );
    }
    let pushed: HashSet<&str> = images.iter().map(|i| i.digest.as_str()).collect();
    // Repeated reads agree with each other and with the digest header.
    let mut seen = HashSet::new();
    for _ in 0..5 {
        let r = reg.get("/v2/conc/tag/manifests/latest").await;
        assert_eq!(r.status, 200, "{}", r.describe());
        let d = sha256_digest(&r.body);
        assert_eq!(
            r.digest_header().as_deref(),
            Some(d.as_str()),
            "header vs body"
        );
        assert!(
            pushed.contains(d.as_str()),
            "tag points to an unknown manifest {d}"
        );
        seen.insert(d);
        let h = reg.head("/v2/conc/tag/manifests/latest").await;
        assert_eq!(h.digest_header(), r.digest_header());
    }
    assert_eq!(seen.len(), 1, "tag flips between manifests: {seen:?}");
    assert_eq!(reg.tags("conc/tag").await, vec!["latest"]);
    // Every pushed manifest remains pullable by digest.
    for img in &images {
        let r = reg
            .get(&format!("/v2/conc/tag/manifests/{}", img.digest))
            .await;
        assert_eq!(r.status, 200);
        assert!(r.body == img.manifest);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_chunked_uploads_of_distinct_blobs_do_not_interfere() {
    let reg = Registry::start().await;
    let blobs: Vec<Vec<u8>> = (0..8)
        .map(|_| random_bytes(fresh_seed(), 300_000))
        .collect();
    let futs = blobs.iter().map(|data| {
        let reg = &reg;
        async move {
            let digest = sha256_digest(data);
            let mut loc = reg.start_upload("conc/chunks").await;
            for (i, chunk) in data.chunks(65_536).enumerate() {
                let start = i * 65_536;
                let end = start + chunk.len() - 1;
                let r = reg
                    .patch_bytes(&loc, Some(&format!("{start}-{end}")), chunk.to_vec())
                    .await;
                assert_eq!(r.status, 202, "{}", r.describe());
                assert_eq!(
                    r.header("range").as_deref(),
                    Some(format!("0-{end}").as_str())
                );
                loc = reg.resolve(&r.header("location").unwrap());
                tokio::task::yield_now().await;
            }
            let r = send(
                reg.req(reqwest::Method::PUT, &with_query(&loc, "digest", &digest))
                    .body(Vec::new()),
            )
            .await;
            assert_eq!(r.status, 201, "{}", r.describe());
            digest
        }
    });
    let digests = join_all(futs).await;
    for (data, digest) in blobs.iter().zip(digests) {
        assert!(reg.blob_bytes("conc/chunks", &digest).await == *data);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_manifest_pushes_to_many_repositories() {
    let reg = Registry::start().await;
    let futs = (0..16).map(|i| {
        let reg = &reg;
        async move {
            let repo = format!("conc/many-{i}");
            let img = Image::oci(fresh_seed(), 2, 1000);
            img.push(reg, &repo, Some("v1")).await;
            (repo, img)
        }
    });
    let pushed = join_all(futs).await;
    for (repo, img) in &pushed {
        let r = reg.get(&format!("/v2/{repo}/manifests/v1")).await;
        assert_eq!(r.status, 200);
        assert!(r.body == img.manifest, "{repo}");
    }
    let r = reg.get("/v2/_catalog").await;
    let v = r.json();
    let repos = v["repositories"].as_array().unwrap();
    assert_eq!(repos.len(), 16, "{v}");
}
