//! The pull-through cache, against a real upstream: Debian's
//! `docker-registry`, plain and with token authentication, behind a proxy
//! that counts, delays and corrupts.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::*;
use crate::upstream::*;

const ACCEPT_ALL: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

fn cached_berth(upstream_url: &str) -> Options {
    Options::new().flag("--upstream", format!("docker.io={upstream_url}"))
}

async fn manifest(berth: &Registry, repo: &str, reference: &str) -> Resp {
    send(
        berth
            .req(
                reqwest::Method::GET,
                &format!("/v2/{repo}/manifests/{reference}"),
            )
            .header("accept", ACCEPT_ALL),
    )
    .await
}

/// Pulls an image through Berth by `reference` and checks every byte.
async fn pull_verified(berth: &Registry, repo: &str, reference: &str, image: &Image) {
    let r = manifest(berth, repo, reference).await;
    assert_eq!(
        r.status,
        200,
        "manifest {repo}:{reference}: {}",
        r.describe()
    );
    assert_eq!(
        r.body.as_ref(),
        image.manifest.as_slice(),
        "manifest bytes of {repo}:{reference}"
    );
    assert_eq!(r.digest_header().as_deref(), Some(image.digest.as_str()));
    for blob in image.blobs() {
        let digest = sha256_digest(blob);
        let got = berth.blob_bytes(repo, &digest).await;
        assert!(got == blob, "blob {digest} of {repo} differs");
    }
}

async fn metric(berth: &Registry, needle: &str) -> u64 {
    let text = berth.get("/metrics").await.text();
    text.lines()
        .filter(|l| l.starts_with("berth_") && l.contains(needle))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

#[tokio::test]
async fn cached_images_and_indexes_keep_pulling_when_the_upstream_is_down() {
    if !distribution_available() {
        return;
    }
    let mut upstream = Distribution::start().await;
    let pusher = Pusher::new(&upstream.url(), None);
    let seed = fresh_seed();
    let image = Image::docker(seed, 3, 300_000);
    pusher.image("library/app", "1.0", &image).await;
    let (index, amd, arm) = two_platform_index(seed + 7);
    pusher
        .index("library/multi", "2", &index, &[&amd, &arm])
        .await;
    let uncached = Image::oci(seed + 50, 1, 1000);
    pusher.image("library/never-pulled", "1", &uncached).await;

    let mut berth =
        Registry::start_with(cached_berth(&upstream.url()).flag("--cache-tag-ttl-secs", 1)).await;
    // By tag, then by digest, through the namespace of the upstream.
    pull_verified(&berth, "docker.io/library/app", "1.0", &image).await;
    pull_verified(&berth, "docker.io/library/app", &image.digest, &image).await;
    // Docker Hub's short names: docker.io/app is library/app upstream.
    pull_verified(&berth, "docker.io/app", "1.0", &image).await;
    let r = manifest(&berth, "docker.io/library/multi", "2").await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(r.body.as_ref(), index.as_slice());
    pull_verified(&berth, "docker.io/library/multi", &amd.digest, &amd).await;
    pull_verified(&berth, "docker.io/library/multi", &arm.digest, &arm).await;
    assert!(metric(&berth, "result=\"miss\"").await > 0);
    // A client that takes no index gets the linux/amd64 image of a tag that
    // names one, as from a pushed index.
    let (old_index, old_amd, old_arm) = two_platform_index(seed + 300);
    pusher
        .index("library/old", "1", &old_index, &[&old_amd, &old_arm])
        .await;
    let r = send(
        berth
            .req(
                reqwest::Method::GET,
                "/v2/docker.io/library/old/manifests/1",
            )
            .header("accept", OCI_MANIFEST),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(r.digest_header().as_deref(), Some(old_amd.digest.as_str()));
    assert!(metric(&berth, "cache_fetched_bytes").await > 900_000);

    // A push into the upstream's namespace is refused with a spec error.
    let r = berth.post("/v2/docker.io/library/app/blobs/uploads/").await;
    expect_error(&r, 403, &["DENIED"]);
    let r = berth
        .put_bytes(
            "/v2/docker.io/library/app/manifests/x",
            &image.media_type,
            image.manifest.clone(),
        )
        .await;
    expect_error(&r, 403, &["DENIED"]);

    // The outage. The tag TTL passes, so tags are revalidated and served stale.
    upstream.stop();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..2 {
        pull_verified(&berth, "docker.io/library/app", "1.0", &image).await;
        pull_verified(&berth, "docker.io/library/app", &image.digest, &image).await;
        let r = manifest(&berth, "docker.io/library/multi", "2").await;
        assert_eq!(r.status, 200, "{}", r.describe());
        pull_verified(&berth, "docker.io/library/multi", &amd.digest, &amd).await;
        pull_verified(&berth, "docker.io/library/multi", &arm.digest, &arm).await;
    }
    assert!(
        metric(&berth, "result=\"stale\"").await >= 1,
        "stale serves are counted"
    );
    assert!(
        metric(&berth, "kind=\"connect\"").await >= 1,
        "upstream errors are counted"
    );

    // Uncached content fails fast with an error naming the upstream.
    let started = Instant::now();
    let r = manifest(&berth, "docker.io/library/never-pulled", "1").await;
    expect_error(&r, 503, &["UNAVAILABLE"]);
    assert!(
        r.text().contains(&upstream.url()),
        "the error names the upstream: {}",
        r.text()
    );
    let r = berth
        .get(&format!(
            "/v2/docker.io/library/never-pulled/blobs/{}",
            sha256_digest(&uncached.layers[0])
        ))
        .await;
    expect_error(&r, 503, &["UNAVAILABLE"]);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );

    // A restart during the outage still serves the whole cache.
    berth.restart().await;
    pull_verified(&berth, "docker.io/library/app", "1.0", &image).await;
    pull_verified(&berth, "docker.io/library/app", &image.digest, &image).await;
    let r = manifest(&berth, "docker.io/library/multi", "2").await;
    assert_eq!(r.status, 200, "{}", r.describe());
    pull_verified(&berth, "docker.io/library/multi", &amd.digest, &amd).await;
    pull_verified(&berth, "docker.io/library/multi", &arm.digest, &arm).await;
    // The cached tags are listed.
    assert_eq!(
        berth.tags("docker.io/library/app").await,
        vec!["1.0".to_string()]
    );
}

#[tokio::test]
async fn a_tag_moved_upstream_is_served_after_the_ttl_and_revalidation_downloads_nothing() {
    if !distribution_available() {
        return;
    }
    let upstream = Distribution::start().await;
    let proxy = TamperProxy::start(upstream.url()).await;
    let pusher = Pusher::new(&upstream.url(), None);
    let seed = fresh_seed();
    let first = Image::oci(seed, 1, 1000);
    let second = Image::oci(seed + 1, 1, 1000);
    pusher.image("team/app", "stable", &first).await;
    let berth =
        Registry::start_with(cached_berth(&proxy.url()).flag("--cache-tag-ttl-secs", 2)).await;

    pull_verified(&berth, "docker.io/team/app", "stable", &first).await;
    pusher.image("team/app", "stable", &second).await;
    // Within the TTL: the cached digest, without asking the upstream.
    let heads = proxy.count("HEAD /v2/team/app/manifests/stable");
    pull_verified(&berth, "docker.io/team/app", "stable", &first).await;
    assert_eq!(proxy.count("HEAD /v2/team/app/manifests/stable"), heads);
    // After it: the new digest.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    pull_verified(&berth, "docker.io/team/app", "stable", &second).await;
    // The old digest stays pullable by digest.
    pull_verified(&berth, "docker.io/team/app", &first.digest, &first).await;

    // Unchanged upstream: revalidation is one HEAD, no manifest download.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let gets = proxy.count("GET /v2/team/app/manifests/");
    let heads = proxy.count("HEAD /v2/team/app/manifests/stable");
    pull_verified(&berth, "docker.io/team/app", "stable", &second).await;
    assert_eq!(proxy.count("HEAD /v2/team/app/manifests/stable"), heads + 1);
    assert_eq!(
        proxy.count("GET /v2/team/app/manifests/"),
        gets,
        "nothing downloaded"
    );
    assert!(metric(&berth, "result=\"revalidated\"").await >= 1);

    // A tag deleted upstream is gone here too.
    let r = send(pusher_req(
        &upstream.url(),
        reqwest::Method::DELETE,
        &format!("/v2/team/app/manifests/{}", second.digest),
    ))
    .await;
    assert_eq!(r.status, 202, "{}", r.describe());
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = manifest(&berth, "docker.io/team/app", "stable").await;
    expect_error(&r, 404, &["MANIFEST_UNKNOWN"]);
}

fn pusher_req(base: &str, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
    new_client().request(method, format!("{base}{path}"))
}

#[tokio::test]
async fn corrupt_upstream_bytes_are_never_stored_and_fail_the_transfer() {
    if !distribution_available() {
        return;
    }
    let upstream = Distribution::start().await;
    let proxy = TamperProxy::start(upstream.url()).await;
    let pusher = Pusher::new(&upstream.url(), None);
    let image = Image::oci(fresh_seed(), 1, 3_000_000);
    pusher.image("team/tampered", "1", &image).await;
    let berth = Registry::start_with(cached_berth(&proxy.url())).await;
    let r = manifest(&berth, "docker.io/team/tampered", "1").await;
    assert_eq!(r.status, 200, "{}", r.describe());

    proxy
        .corrupt_blobs
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let layer = &image.layers[0];
    let digest = sha256_digest(layer);
    let path = format!("/v2/docker.io/team/tampered/blobs/{digest}");
    for _ in 0..2 {
        // The client sees a failed transfer, never a complete wrong body.
        match try_send_once(berth.req(reqwest::Method::GET, &path)).await {
            Ok(r) => {
                assert!(
                    r.status != 200 || r.body.len() < layer.len(),
                    "a corrupt blob was served whole: {}",
                    r.status
                );
                assert_ne!(r.body.as_ref(), layer.as_slice());
            }
            Err(e) => eprintln!("transfer failed as it must: {e}"),
        }
    }
    assert!(metric(&berth, "kind=\"corrupt\"").await >= 1);
    if !blobs_in_s3() {
        let hex = digest.trim_start_matches("sha256:");
        let file = berth
            .data_dir()
            .join("blobs/sha256")
            .join(&hex[..2])
            .join(hex);
        assert!(!file.exists(), "corrupt content must not be stored");
    }
    // Each attempt went to the upstream: nothing was served from a bad copy.
    let fetched = proxy.count(&format!("GET /v2/team/tampered/blobs/{digest}"));
    assert_eq!(fetched, 2);

    proxy
        .corrupt_blobs
        .store(false, std::sync::atomic::Ordering::SeqCst);
    assert!(berth.blob_bytes("docker.io/team/tampered", &digest).await == *layer);
    assert_eq!(
        proxy.count(&format!("GET /v2/team/tampered/blobs/{digest}")),
        3
    );
    // Stored now: served without the upstream.
    assert!(berth.blob_bytes("docker.io/team/tampered", &digest).await == *layer);
    assert_eq!(
        proxy.count(&format!("GET /v2/team/tampered/blobs/{digest}")),
        3
    );
}

#[tokio::test]
async fn concurrent_pulls_of_one_uncached_blob_make_one_upstream_fetch() {
    if !distribution_available() {
        return;
    }
    let upstream = Distribution::start().await;
    let proxy = TamperProxy::start(upstream.url()).await;
    let pusher = Pusher::new(&upstream.url(), None);
    let image = Image::oci(fresh_seed(), 1, 24 << 20);
    pusher.image("team/big", "1", &image).await;
    // The upstream answers slowly, so that every pull arrives mid-fetch.
    proxy
        .blob_delay_ms
        .store(500, std::sync::atomic::Ordering::SeqCst);
    let berth = Registry::start_with(cached_berth(&proxy.url())).await;
    let layer = image.layers[0].clone();
    let digest = sha256_digest(&layer);
    let pulls: Vec<_> = (0..8)
        .map(|_| {
            let request = berth.req(
                reqwest::Method::GET,
                &format!("/v2/docker.io/team/big/blobs/{digest}"),
            );
            tokio::spawn(async move { send(request).await })
        })
        .collect();
    for pull in pulls {
        let r = pull.await.unwrap();
        assert_eq!(r.status, 200, "{}", truncate(&r.describe(), 500));
        assert!(r.body.as_ref() == layer.as_slice(), "bytes differ");
    }
    assert_eq!(
        proxy.count(&format!("GET /v2/team/big/blobs/{digest}")),
        1,
        "one upstream fetch"
    );
}

#[tokio::test]
async fn token_authenticated_upstreams_are_pulled_with_the_configured_credentials() {
    if !distribution_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let issuer = TokenIssuer::start(&dir.path().join("issuer")).await;
    let upstream = Distribution::start_with_token(Some((issuer.realm(), issuer.cert()))).await;
    // The upstream does demand tokens.
    let r = send(new_client().get(format!("{}/v2/private/app/manifests/1", upstream.url()))).await;
    assert_eq!(r.status, 401);
    assert!(
        r.header("www-authenticate")
            .unwrap_or_default()
            .starts_with("Bearer")
    );

    let pusher = Pusher::new(
        &upstream.url(),
        Some(issuer.token("repository:private/app:pull,push")),
    );
    let image = Image::oci(fresh_seed(), 4, 50_000);
    pusher.image("private/app", "1", &image).await;

    let config = dir.path().join("berth.toml");
    std::fs::write(
        &config,
        format!(
            "[[upstream]]\nnamespace = \"private.example\"\nurl = \"{}\"\nusername = \"{TOKEN_USER}\"\npassword = \"{TOKEN_PASSWORD}\"\n",
            upstream.url()
        ),
    )
    .unwrap();
    let berth = Registry::start_with(Options::new().flag("--config", config.display())).await;
    let before = issuer.requests.load(std::sync::atomic::Ordering::SeqCst);
    pull_verified(&berth, "private.example/private/app", "1", &image).await;
    let tokens = issuer.requests.load(std::sync::atomic::Ordering::SeqCst) - before;
    // One token for the repository, reused for the manifest and 5 blobs.
    assert!((1..=2).contains(&tokens), "{tokens} token requests");

    // Without credentials the issuer refuses: a clear error, not a 500.
    let anonymous = Registry::start_with(
        Options::new().flag("--upstream", format!("private.example={}", upstream.url())),
    )
    .await;
    let r = manifest(&anonymous, "private.example/private/app", "1").await;
    assert!(r.status == 403 || r.status == 502, "{}", r.describe());
    assert!(
        r.text().contains("token"),
        "the error says what failed: {}",
        r.text()
    );
}

#[tokio::test]
async fn mirror_modes_warming_pinning_and_eviction() {
    if !distribution_available() {
        return;
    }
    let mut upstream = Distribution::start().await;
    let pusher = Pusher::new(&upstream.url(), None);
    let seed = fresh_seed();
    let (index, amd, arm) = two_platform_index(seed);
    pusher
        .index("library/multi", "1", &index, &[&amd, &arm])
        .await;
    let fillers: Vec<Image> = (0..3)
        .map(|i| Image::oci(seed + 10 + i, 1, 200_000))
        .collect();
    for (i, image) in fillers.iter().enumerate() {
        pusher
            .image(&format!("library/filler{i}"), "1", image)
            .await;
    }

    let berth = Registry::start_with(
        cached_berth(&upstream.url())
            .flag("--cache-mirror-default", "docker.io")
            .flag("--cache-max-bytes", 450_000)
            .flag("--cache-evict-interval-secs", 1),
    )
    .await;
    // A local repository stays local; an unknown one goes to the mirror
    // default (Docker's registry-mirrors); containerd's ?ns= picks one.
    let local = Image::oci(seed + 99, 1, 100);
    local.push(&berth, "library/ours", Some("1")).await;
    pull_verified(&berth, "library/ours", "1", &local).await;
    let r = manifest(&berth, "library/multi", "1").await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(r.body.as_ref(), index.as_slice());
    let r = manifest(&berth, "library/multi", "1?ns=docker.io").await;
    assert_eq!(r.status, 200, "{}", r.describe());

    // Warm one platform and pin it, with the operator command.
    let out = berth_cli()
        .args([
            "cache",
            "warm",
            "--registry",
            &berth.url(),
            "--platform",
            "linux/arm64",
            "--pin",
        ])
        .arg("docker.io/library/multi:1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "warm: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&arm.digest) && !stdout.contains(&amd.digest),
        "{stdout}"
    );
    // Off a terminal, no progress bar: no terminal escapes in its output.
    assert!(!out.stderr.contains(&0x1b), "plain output off a terminal");
    // On a terminal (a pseudo-terminal from util-linux's `script`), the
    // warm draws a bar with its bytes and rate.
    let cli = berth_cli();
    let cmdline = format!(
        "{BIN} cache warm --registry {} --platform linux/amd64 docker.io/library/multi:1",
        berth.url()
    );
    let out = std::process::Command::new("script")
        .args(["-qec", &cmdline, "/dev/null"])
        .envs(cli.get_envs().filter_map(|(k, v)| Some((k, v?))))
        .env("TERM", "xterm")
        .output()
        .expect("script (util-linux)");
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "warm on a terminal: {shown}");
    assert!(
        shown.contains(&amd.digest) && shown.contains("warming") && shown.contains("B/s"),
        "a bar with bytes and rate: {shown:?}"
    );

    // A push to a new local repository of an image whose layer is cached:
    // the pusher's HEAD probe is not answered by the mirror, so it uploads
    // the layer, and its manifest finds it.
    let config = to_bytes(
        &json!({"architecture": "arm64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}),
    );
    let arm_layer = sha256_digest(&arm.layers[0]);
    let r = berth
        .head(&format!("/v2/fresh/app/blobs/{arm_layer}"))
        .await;
    assert_eq!(r.status, 404, "{}", r.describe());
    berth.push_blob("fresh/app", &arm.layers[0]).await;
    berth.push_blob("fresh/app", &config).await;
    let manifest_bytes = to_bytes(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, &config),
        "layers": [descriptor(OCI_LAYER_GZIP, &arm.layers[0])],
    }));
    berth
        .push_manifest("fresh/app", "1", OCI_MANIFEST, &manifest_bytes)
        .await;
    // containerd's ?ns= for a registry without an upstream stays local.
    let r = manifest(&berth, "library/multi", "1?ns=quay.io").await;
    expect_error(&r, 404, &["MANIFEST_UNKNOWN", "NAME_UNKNOWN"]);

    // More than the limit: the least recently used unpinned images go.
    for (i, image) in fillers.iter().enumerate() {
        pull_verified(&berth, &format!("docker.io/library/filler{i}"), "1", image).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let listed = || async {
        let out = berth_cli()
            .args(["cache", "ls", "--json", "--registry", &berth.url()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ls: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["images"]
            .as_array()
            .unwrap()
            .clone()
    };
    let evicted = eventually(Duration::from_secs(15), || async {
        let images = listed().await;
        let total: u64 = images
            .iter()
            .filter(|i| i["pinned"] == false)
            .map(|i| i["size"].as_u64().unwrap())
            .sum();
        let pinned_size: u64 = images
            .iter()
            .filter(|i| i["pinned"] == true)
            .map(|i| i["size"].as_u64().unwrap())
            .sum();
        total + pinned_size <= 450_000 || images.iter().all(|i| i["pinned"] == true)
    })
    .await;
    assert!(
        evicted,
        "eviction did not bring the cache under its limit: {:#?}",
        listed().await
    );
    let images = listed().await;
    assert!(
        images
            .iter()
            .any(|i| i["digest"] == arm.digest.as_str() && i["pinned"] == true),
        "the pinned image stays: {images:#?}"
    );
    assert!(
        !images
            .iter()
            .any(|i| i["repository"] == "docker.io/library/filler0"),
        "the least recently used image is evicted: {images:#?}"
    );
    let filler0_layer = sha256_digest(&fillers[0].layers[0]);
    if !blobs_in_s3() {
        let hex = filler0_layer.trim_start_matches("sha256:");
        let file = berth
            .data_dir()
            .join("blobs/sha256")
            .join(&hex[..2])
            .join(hex);
        assert!(
            !file.exists(),
            "an evicted image's layer is removed from disk"
        );
    }
    assert!(metric(&berth, "cache_evicted_images").await >= 1);

    // Down upstream: the pinned platform still pulls whole; the evicted
    // image does not.
    upstream.stop();
    pull_verified(&berth, "docker.io/library/multi", &arm.digest, &arm).await;
    let r = berth
        .get(&format!(
            "/v2/docker.io/library/filler0/blobs/{filler0_layer}"
        ))
        .await;
    expect_error(&r, 503, &["UNAVAILABLE"]);
}

#[tokio::test]
async fn a_digest_alone_never_reads_another_repositorys_blob_through_the_cache() {
    if !distribution_available() {
        return;
    }
    let upstream = Distribution::start().await;
    let proxy = TamperProxy::start(upstream.url()).await;
    let pusher = Pusher::new(&upstream.url(), None);
    let seed = fresh_seed();
    let public = Image::oci(seed, 2, 1500);
    pusher.image("library/base", "1", &public).await;
    let berth = Registry::start_with(cached_berth(&proxy.url())).await;
    // A blob pushed to a local repository, and not upstream.
    let secret = random_bytes(seed + 1, 3000);
    let digest = berth.push_blob("private/vault", &secret).await;
    for method in [reqwest::Method::GET, reqwest::Method::HEAD] {
        let r = send(berth.req(
            method.clone(),
            &format!("/v2/docker.io/library/base/blobs/{digest}"),
        ))
        .await;
        assert_ne!(
            r.status,
            200,
            "{method} through the cache: {}",
            r.describe()
        );
        assert!(r.body.is_empty() || r.body != secret);
    }
    // The cache asked the upstream, which does not have it.
    assert!(proxy.count(&format!("/v2/library/base/blobs/{digest}")) >= 1);
    // Layers a cached manifest names are still linked from where they are
    // stored: a second repository sharing the base's layers fetches none.
    pull_verified(&berth, "docker.io/library/base", "1", &public).await;
    pusher.image("library/derived", "1", &public).await;
    let fetched = proxy.count("GET /v2/library/derived/blobs/");
    pull_verified(&berth, "docker.io/library/derived", "1", &public).await;
    assert_eq!(
        proxy.count("GET /v2/library/derived/blobs/"),
        fetched,
        "shared layers are linked, not fetched again"
    );
}
