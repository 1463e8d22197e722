//! The referrers API (distribution-spec v1.1).

use serde_json::{Value, json};

use crate::support::*;

async fn referrers(reg: &Registry, repo: &str, digest: &str, query: &str) -> (Resp, Vec<Value>) {
    let r = reg
        .get(&format!("/v2/{repo}/referrers/{digest}{query}"))
        .await;
    assert_eq!(
        r.status,
        200,
        "referrers {repo}@{digest}{query}: {}",
        r.describe()
    );
    let ct = r.header("content-type").unwrap_or_default();
    assert_eq!(ct, OCI_INDEX, "referrers Content-Type");
    let v = r.json();
    assert_eq!(v["schemaVersion"], 2, "referrers body: {v}");
    assert_eq!(v["mediaType"], OCI_INDEX, "referrers body: {v}");
    let list = v["manifests"]
        .as_array()
        .unwrap_or_else(|| panic!("`manifests` must be an array: {v}"))
        .clone();
    (r, list)
}

fn find<'a>(list: &'a [Value], digest: &str) -> &'a Value {
    list.iter()
        .find(|d| d["digest"] == digest)
        .unwrap_or_else(|| panic!("{digest} not among referrers {list:?}"))
}

struct Fixture {
    subject: Image,
    sbom: Vec<u8>,
    sig: Vec<u8>,
    image_ref: Image,
    index_ref: Vec<u8>,
}

/// Pushes a subject image and four referrers of it to `repo`:
/// an SBOM artifact with annotations, a signature artifact, an image manifest with a
/// subject but no artifactType, and an index with a subject and artifactType.
async fn fixture(reg: &Registry, repo: &str) -> Fixture {
    let subject = Image::oci(fresh_seed(), 1, 200);
    subject.push(reg, repo, Some("v1")).await;
    reg.push_blob(repo, b"{}").await;
    let sbom_blob = format!("{{\"sbom\":{}}}", fresh_seed()).into_bytes();
    let sig_blob = format!("sig-{}", fresh_seed()).into_bytes();
    reg.push_blob(repo, &sbom_blob).await;
    reg.push_blob(repo, &sig_blob).await;

    let sbom = artifact_manifest(
        "application/vnd.example.sbom.v1",
        &[("application/spdx+json", &sbom_blob)],
        Some(subject.descriptor()),
        Some(json!({
            "org.opencontainers.image.created": "2024-05-01T10:00:00Z",
            "org.example.sbom.format": "spdx"
        })),
    );
    reg.push_manifest(repo, &sha256_digest(&sbom), OCI_MANIFEST, &sbom)
        .await;
    let sig = artifact_manifest(
        "application/vnd.example.signature.v1",
        &[("application/octet-stream", &sig_blob)],
        Some(subject.descriptor()),
        None,
    );
    reg.push_manifest(repo, &sha256_digest(&sig), OCI_MANIFEST, &sig)
        .await;

    let image_ref = Image::oci_with(
        fresh_seed(),
        1,
        64,
        json!({"subject": subject.descriptor(), "annotations": {"kind": "image-with-subject"}}),
    );
    image_ref.push(reg, repo, None).await;

    let child = Image::oci(fresh_seed(), 1, 64);
    child.push(reg, repo, None).await;
    let index_ref = index_json(
        OCI_INDEX,
        vec![child.descriptor()],
        json!({
            "artifactType": "application/vnd.example.bundle.v1",
            "subject": subject.descriptor(),
            "annotations": {"kind": "index-with-subject"}
        }),
    );
    reg.push_manifest(repo, &sha256_digest(&index_ref), OCI_INDEX, &index_ref)
        .await;

    // Unrelated manifest (no subject) and a referrer of a different subject.
    Image::oci(fresh_seed(), 1, 10)
        .push(reg, repo, Some("unrelated"))
        .await;
    let other_subject = Image::oci(fresh_seed(), 1, 10);
    other_subject.push(reg, repo, Some("other")).await;
    let other_ref = artifact_manifest(
        "application/vnd.example.sbom.v1",
        &[("application/spdx+json", &sbom_blob)],
        Some(other_subject.descriptor()),
        None,
    );
    reg.push_manifest(repo, &sha256_digest(&other_ref), OCI_MANIFEST, &other_ref)
        .await;

    Fixture {
        subject,
        sbom,
        sig,
        image_ref,
        index_ref,
    }
}

#[tokio::test]
async fn referrers_lists_descriptors_of_manifests_with_that_subject() {
    let reg = Registry::start().await;
    let f = fixture(&reg, "ref/list").await;
    let (_r, list) = referrers(&reg, "ref/list", &f.subject.digest, "").await;
    assert_eq!(list.len(), 4, "expected exactly 4 referrers: {list:#?}");

    let sbom = find(&list, &sha256_digest(&f.sbom));
    assert_eq!(sbom["mediaType"], OCI_MANIFEST);
    assert_eq!(sbom["size"], f.sbom.len());
    assert_eq!(sbom["artifactType"], "application/vnd.example.sbom.v1");
    assert_eq!(
        sbom["annotations"],
        json!({
            "org.opencontainers.image.created": "2024-05-01T10:00:00Z",
            "org.example.sbom.format": "spdx"
        })
    );

    let sig = find(&list, &sha256_digest(&f.sig));
    assert_eq!(sig["mediaType"], OCI_MANIFEST);
    assert_eq!(sig["size"], f.sig.len());
    assert_eq!(sig["artifactType"], "application/vnd.example.signature.v1");
    assert!(
        sig.get("annotations")
            .is_none_or(|a| a.is_null() || a == &json!({})),
        "signature has no annotations: {sig}"
    );

    // No artifactType: the config media type is used.
    let img = find(&list, &f.image_ref.digest);
    assert_eq!(img["mediaType"], OCI_MANIFEST);
    assert_eq!(img["size"], f.image_ref.manifest.len());
    assert_eq!(img["artifactType"], OCI_CONFIG);
    assert_eq!(img["annotations"], json!({"kind": "image-with-subject"}));

    let idx = find(&list, &sha256_digest(&f.index_ref));
    assert_eq!(idx["mediaType"], OCI_INDEX);
    assert_eq!(idx["size"], f.index_ref.len());
    assert_eq!(idx["artifactType"], "application/vnd.example.bundle.v1");
    assert_eq!(idx["annotations"], json!({"kind": "index-with-subject"}));
}

#[tokio::test]
async fn referrers_of_manifest_without_referrers_is_an_empty_index() {
    let reg = Registry::start().await;
    let img = Image::oci(fresh_seed(), 1, 100);
    img.push(&reg, "ref/none", Some("v1")).await;
    let (_r, list) = referrers(&reg, "ref/none", &img.digest, "").await;
    assert!(list.is_empty(), "{list:?}");
}

#[tokio::test]
async fn referrers_work_when_subject_was_never_pushed() {
    let reg = Registry::start().await;
    let ghost = Image::oci(fresh_seed(), 1, 100); // never pushed
    reg.push_blob("ref/ghost", b"{}").await;
    let blob = b"attestation".to_vec();
    reg.push_blob("ref/ghost", &blob).await;
    let m = artifact_manifest(
        "application/vnd.example.attestation",
        &[("application/octet-stream", &blob)],
        Some(ghost.descriptor()),
        None,
    );
    let r = reg
        .put_bytes(
            &format!("/v2/ref/ghost/manifests/{}", sha256_digest(&m)),
            OCI_MANIFEST,
            m.clone(),
        )
        .await;
    assert_eq!(
        r.status,
        201,
        "manifest with absent subject: {}",
        r.describe()
    );
    assert_eq!(
        r.header("oci-subject").as_deref(),
        Some(ghost.digest.as_str())
    );
    let (_r, list) = referrers(&reg, "ref/ghost", &ghost.digest, "").await;
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["digest"], sha256_digest(&m));
    assert_eq!(
        list[0]["artifactType"],
        "application/vnd.example.attestation"
    );

    // Pushing the subject afterwards keeps the referrer.
    ghost.push(&reg, "ref/ghost", Some("late")).await;
    let (_r, list) = referrers(&reg, "ref/ghost", &ghost.digest, "").await;
    assert_eq!(list.len(), 1, "{list:?}");
}

#[tokio::test]
async fn referrers_artifact_type_filter_sets_oci_filters_applied() {
    let reg = Registry::start().await;
    let f = fixture(&reg, "ref/filter").await;
    let (r, list) = referrers(
        &reg,
        "ref/filter",
        &f.subject.digest,
        &format!(
            "?artifactType={}",
            encode_query("application/vnd.example.sbom.v1")
        ),
    )
    .await;
    assert_eq!(
        r.header("oci-filters-applied").as_deref(),
        Some("artifactType"),
        "{}",
        r.describe()
    );
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["digest"], sha256_digest(&f.sbom));

    // Filter by the config media type (image manifest without artifactType).
    let (r, list) = referrers(
        &reg,
        "ref/filter",
        &f.subject.digest,
        &format!("?artifactType={}", encode_query(OCI_CONFIG)),
    )
    .await;
    assert_eq!(
        r.header("oci-filters-applied").as_deref(),
        Some("artifactType")
    );
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["digest"], f.image_ref.digest);

    // No match: empty list, header still set.
    let (r, list) = referrers(
        &reg,
        "ref/filter",
        &f.subject.digest,
        "?artifactType=application%2Fvnd.nothing",
    )
    .await;
    assert_eq!(
        r.header("oci-filters-applied").as_deref(),
        Some("artifactType")
    );
    assert!(list.is_empty(), "{list:?}");

    // No filter: no header.
    let (r, list) = referrers(&reg, "ref/filter", &f.subject.digest, "").await;
    assert!(
        r.header("oci-filters-applied").is_none(),
        "{}",
        r.describe()
    );
    assert_eq!(list.len(), 4);
}

#[tokio::test]
async fn deleting_a_referrer_removes_it_from_the_list() {
    let reg = Registry::start().await;
    let f = fixture(&reg, "ref/delete").await;
    let sig_digest = sha256_digest(&f.sig);
    let r = reg
        .delete(&format!("/v2/ref/delete/manifests/{sig_digest}"))
        .await;
    assert_eq!(r.status, 202, "{}", r.describe());
    let (_r, list) = referrers(&reg, "ref/delete", &f.subject.digest, "").await;
    assert_eq!(list.len(), 3, "{list:?}");
    assert!(list.iter().all(|d| d["digest"] != sig_digest.as_str()));

    let r = reg
        .delete(&format!("/v2/ref/delete/manifests/{}", f.image_ref.digest))
        .await;
    assert_eq!(r.status, 202, "{}", r.describe());
    let (_r, list) = referrers(&reg, "ref/delete", &f.subject.digest, "").await;
    assert_eq!(list.len(), 2, "{list:?}");
}

#[tokio::test]
async fn referrers_are_scoped_to_the_repository() {
    let reg = Registry::start().await;
    let f = fixture(&reg, "ref/scope-a").await;
    // Same subject pushed in another repository, without referrers there.
    f.subject.push(&reg, "ref/scope-b", Some("v1")).await;
    let (_r, list) = referrers(&reg, "ref/scope-b", &f.subject.digest, "").await;
    assert!(
        list.is_empty(),
        "referrers leaked across repositories: {list:?}"
    );
}

#[tokio::test]
async fn referrers_with_invalid_digest_returns_400() {
    let reg = Registry::start().await;
    let img = Image::oci(fresh_seed(), 1, 10);
    img.push(&reg, "ref/invalid", Some("v1")).await;
    for bad in ["sha256:xyz", "sha256:abc", "v1", "sha256:"] {
        let r = reg.get(&format!("/v2/ref/invalid/referrers/{bad}")).await;
        assert_eq!(r.status, 400, "referrers/{bad}: {}", r.describe());
        check_error_body(&r);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_referrers_are_paginated_with_link_headers_and_filters_kept() {
    let reg = Registry::start().await;
    let repo = "ref/many";
    let subject = Image::oci(fresh_seed(), 1, 100);
    reg.push_blob(repo, b"{}").await;
    // 1005 referrers: even ones are signatures, odd ones SBOMs.
    let total = 1005usize;
    let mut pushed = std::collections::BTreeSet::new();
    let mut pending = Vec::new();
    for i in 0..total {
        let kind = if i % 2 == 0 {
            "application/vnd.example.sig"
        } else {
            "application/vnd.example.sbom+json"
        };
        let m = artifact_manifest(
            kind,
            &[],
            Some(subject.descriptor()),
            Some(json!({ "n": i.to_string() })),
        );
        pushed.insert(sha256_digest(&m));
        let (client, url) = (
            reg.client().clone(),
            format!("{}/v2/{repo}/manifests/{}", reg.url(), sha256_digest(&m)),
        );
        pending.push(async move {
            let r = client
                .put(url)
                .header("content-type", OCI_MANIFEST)
                .body(m)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201);
        });
        if pending.len() == 16 {
            futures_util::future::join_all(pending.drain(..)).await;
        }
    }
    futures_util::future::join_all(pending).await;

    // Unfiltered: a full first page, then the rest through Link.
    let mut seen = Vec::new();
    let mut next = Some(format!("/v2/{repo}/referrers/{}", subject.digest));
    let mut pages = 0;
    while let Some(path) = next.take() {
        let r = reg.get(&path).await;
        assert_eq!(r.status, 200, "{}", r.describe());
        let list = r.json()["manifests"].as_array().unwrap().clone();
        pages += 1;
        if pages == 1 {
            assert_eq!(list.len(), 1000);
        }
        seen.extend(
            list.iter()
                .map(|d| d["digest"].as_str().unwrap().to_string()),
        );
        next = r.header("link").map(|l| {
            assert!(l.ends_with("; rel=\"next\""), "{l}");
            l[l.find('<').unwrap() + 1..l.find('>').unwrap()].to_string()
        });
    }
    assert_eq!(pages, 2);
    assert_eq!(seen.len(), total);
    assert_eq!(
        seen.iter()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>(),
        pushed
    );

    // Filtered: 502 SBOMs fit one page, so no Link; the filter is reported.
    let r = reg
        .get(&format!(
            "/v2/{repo}/referrers/{}?artifactType={}",
            subject.digest,
            encode_query("application/vnd.example.sbom+json")
        ))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("oci-filters-applied").as_deref(),
        Some("artifactType")
    );
    assert!(r.header("link").is_none());
    let list = r.json()["manifests"].as_array().unwrap().clone();
    assert_eq!(list.len(), 502);
    assert!(
        list.iter()
            .all(|d| d["artifactType"] == "application/vnd.example.sbom+json")
    );
}
