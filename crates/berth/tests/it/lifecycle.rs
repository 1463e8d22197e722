//! Garbage collection over the real binary: what `berth gc` removes and
//! reports, and a race of the collector against pushes, mounts, deletes and
//! re-pushes that must never take a referenced byte. In the cluster pass
//! the same tests run on etcd and Garage.

use std::collections::HashMap;
use std::fs;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::*;

/// Blob files under the data directory (fs engine), by hex digest.
fn blob_files(reg: &Registry) -> Vec<String> {
    let mut out = Vec::new();
    let root = reg.data_dir().join("blobs").join("sha256");
    for prefix in fs::read_dir(&root).into_iter().flatten().flatten() {
        for entry in fs::read_dir(prefix.path()).into_iter().flatten().flatten() {
            out.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    out
}

fn hex(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap()
}

/// `berth gc` with `args`; its report as JSON.
fn gc_json(reg: &Registry, args: &[&str]) -> Value {
    let out = berth_cli()
        .args(["gc", "--json", "--registry", &reg.url()])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "berth gc {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// An image whose first layers are `shared` and whose last is its own.
fn image_with(seed: u64, shared: &[Vec<u8>]) -> Image {
    let mut image = Image::oci(seed, 1, 4096 + (seed % 512) as usize);
    let own = image.layers.pop().unwrap();
    let mut layers: Vec<Vec<u8>> = shared.to_vec();
    layers.push(own);
    let diff_ids: Vec<String> = layers.iter().map(|l| sha256_digest(l)).collect();
    image.config = to_bytes(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Labels": { "seed": seed.to_string() } },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    }));
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, &image.config),
        "layers": layers.iter().map(|l| descriptor(OCI_LAYER_GZIP, l)).collect::<Vec<_>>(),
    });
    image.layers = layers;
    image.manifest = to_bytes(&manifest);
    image.digest = sha256_digest(&image.manifest);
    image
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_removes_and_reports_only_what_nothing_references() {
    // No trash: a deleted image is garbage at once.
    let reg = Registry::start_with(
        Options::new()
            .flag("--link-refresh-secs", 1)
            .flag("--trash-retention-days", 0),
    )
    .await;
    let kept = Image::oci(fresh_seed(), 2, 3000);
    let deleted = Image::oci(fresh_seed(), 2, 5000);
    kept.push(&reg, "gc/app", Some("1")).await;
    deleted.push(&reg, "gc/app", Some("2")).await;
    let stray = random_bytes(fresh_seed(), 7000);
    let stray_digest = reg.push_blob("gc/app", &stray).await;
    let r = reg
        .delete(&format!("/v2/gc/app/manifests/{}", deleted.digest))
        .await;
    assert_eq!(r.status, 202, "{}", r.describe());
    // An upload in progress is not garbage.
    let upload = reg.start_upload("gc/app").await;

    // Within the default grace period (an hour) nothing goes.
    let report = gc_json(&reg, &[]);
    assert_eq!(report["links_removed"], 0, "{report}");
    assert_eq!(report["blobs_removed"], 0, "{report}");

    // Past the second for which a link counts as confirmed.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let garbage_bytes =
        (deleted.config.len() + 2 * 5000 + stray.len() + deleted.manifest.len()) as u64;
    let dry = gc_json(&reg, &["--dry-run", "--grace", "0"]);
    assert_eq!(dry["dry_run"], true);
    // The deleted image's config and two layers, and the stray blob.
    assert_eq!(dry["links_removed"], 4, "{dry}");
    // Those four and the deleted manifest's own bytes.
    assert_eq!(dry["blobs_removed"], 5, "{dry}");
    assert_eq!(dry["bytes_removed"], garbage_bytes, "{dry}");
    // (A GET: a HEAD would confirm the link, as for a client about to
    // reuse the blob, and keep it another grace period.)
    let r = reg.get(&format!("/v2/gc/app/blobs/{stray_digest}")).await;
    assert_eq!(r.status, 200, "a dry run removes nothing");

    // The plain output, with the progress on stderr.
    let out = berth_cli()
        .args(["gc", "--grace", "0", "--registry", &reg.url()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    eprintln!("berth gc --grace 0 printed:\n{stdout}");
    assert!(
        stdout.contains("removed 4 links, 5 blobs"),
        "berth gc printed: {stdout}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("collecting garbage"));

    for digest in deleted
        .blobs()
        .iter()
        .map(|b| sha256_digest(b))
        .chain([stray_digest.clone()])
    {
        let r = reg.head(&format!("/v2/gc/app/blobs/{digest}")).await;
        assert_eq!(r.status, 404, "{digest} still linked");
        if !blobs_in_s3() {
            assert!(!blob_files(&reg).contains(&hex(&digest).to_string()));
        }
    }
    if !blobs_in_s3() {
        assert!(!blob_files(&reg).contains(&hex(&deleted.digest).to_string()));
    }
    // A blob a client was just told is present stays for a grace period,
    // whatever references it.
    let reused = reg
        .push_blob("gc/app", &random_bytes(fresh_seed(), 300))
        .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        reg.head(&format!("/v2/gc/app/blobs/{reused}")).await.status,
        200
    );
    let report = gc_json(&reg, &["--grace", "0"]);
    assert_eq!(report["links_removed"], 0, "{report}");
    assert_eq!(
        reg.head(&format!("/v2/gc/app/blobs/{reused}")).await.status,
        200
    );

    // The kept image pulls whole and byte-identical.
    let r = reg.get("/v2/gc/app/manifests/1").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.as_ref(), kept.manifest.as_slice());
    for blob in kept.blobs() {
        assert_eq!(reg.blob_bytes("gc/app", &sha256_digest(blob)).await, blob);
    }
    // The upload goes on and completes.
    let data = random_bytes(fresh_seed(), 100);
    let digest = sha256_digest(&data);
    let r = reg
        .put_bytes(
            &with_query(&upload, "digest", &digest),
            "application/octet-stream",
            data,
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.describe());

    let metrics = reg.get("/metrics").await;
    let text = String::from_utf8_lossy(&metrics.body);
    for line in [
        "berth_gc_blobs_removed_total 5",
        "berth_gc_links_removed_total 4",
        &format!("berth_gc_bytes_removed_total {garbage_bytes}"),
        "berth_gc_runs_total{outcome=\"ok\"} 3",
        "berth_gc_runs_total{outcome=\"dry_run\"} 1",
    ] {
        assert!(text.contains(line), "no {line:?} in /metrics");
    }
    // Bad input gets the spec's error shape, on every operator job.
    for (path, names) in [
        ("/berth/v1/gc?grace_secs=soon", "grace_secs"),
        ("/berth/v1/gc?dry_run=maybe", "dry_run"),
        ("/berth/v1/gc?bogus=1", "bogus"),
        ("/berth/v1/compact?dry_run=maybe", "dry_run"),
        ("/berth/v1/compact?grace_secs=1", "grace_secs"),
        ("/berth/v1/scrub?now=1", "now"),
        ("/berth/v1/scrub?repair=maybe", "repair"),
        ("/berth/v1/backups?to=/x&bogus=1", "bogus"),
        ("/berth/v1/backups/restore?adopt=maybe", "adopt"),
        (
            "/berth/v1/backups/restore?force=true",
            "force goes with repository",
        ),
        (
            "/berth/v1/backups/restore?repository=a/**&adopt=true",
            "adopt goes with a whole restore",
        ),
        ("/berth/v1/backups/restore?at=yesterday", "RFC 3339"),
        (
            "/berth/v1/backups/restore?at=latest&id=20261201T000000000Z",
            "not with id or repository",
        ),
    ] {
        let r = reg.post(path).await;
        assert_eq!(r.status, 400, "{path}: {}", r.describe());
        assert_eq!(r.json()["errors"][0]["code"], "UNSUPPORTED", "{path}");
        assert!(r.text().contains(names), "{path}: {}", r.describe());
    }
}

/// One pusher's view of what it did.
#[derive(Default)]
struct Ledger {
    /// Image digest → (repository, image, live after the last operation).
    images: HashMap<String, (String, Arc<Image>, bool)>,
    pushes: u64,
    retries: u64,
    mounts: u64,
    deletes: u64,
    repushes: u64,
}

/// Uploads a blob the way clients do: HEAD first and skip it if present,
/// or mount it from `from`, else upload. Returns false on a retryable
/// failure.
async fn put_blob(reg: &Registry, repo: &str, from: Option<&str>, bytes: &[u8]) -> bool {
    let digest = sha256_digest(bytes);
    if let Some(from) = from {
        let r = reg
            .post(&format!(
                "/v2/{repo}/blobs/uploads/?mount={digest}&from={from}"
            ))
            .await;
        if r.status == 201 {
            return true;
        }
    } else if reg.head(&format!("/v2/{repo}/blobs/{digest}")).await.status == 200 {
        return true;
    }
    let r = send(
        reg.req(
            Method::POST,
            &format!("/v2/{repo}/blobs/uploads/?digest={digest}"),
        )
        .header("content-type", "application/octet-stream")
        .body(bytes.to_vec()),
    )
    .await;
    match r.status {
        201 => true,
        503 => false,
        _ => panic!("blob upload to {repo}: {}", r.describe()),
    }
}

/// Pushes an image until it is acknowledged: a collector racing a push may
/// make it fail with a retryable error (a blob collected between its HEAD
/// and the manifest), never with a lost acknowledged write.
async fn push_until_acknowledged(
    reg: &Registry,
    repo: &str,
    from: Option<&str>,
    image: &Image,
    ledger: &mut Ledger,
) {
    for attempt in 0..50 {
        if attempt > 0 {
            ledger.retries += 1;
        }
        let mut complete = true;
        for blob in image.blobs() {
            complete &= put_blob(reg, repo, from, blob).await;
        }
        if !complete {
            continue;
        }
        let r = reg
            .put_bytes(
                &format!("/v2/{repo}/manifests/{}", image.digest),
                OCI_MANIFEST,
                image.manifest.clone(),
            )
            .await;
        match r.status {
            201 => return,
            // MANIFEST_BLOB_UNKNOWN: a blob went between HEAD and PUT.
            400 if r.text().contains("MANIFEST_BLOB_UNKNOWN") => {}
            503 => {}
            _ => panic!("manifest push to {repo}: {}", r.describe()),
        }
    }
    panic!("{repo}@{} never acknowledged", image.digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_racing_pushes_mounts_and_deletes_never_takes_a_referenced_byte() {
    let reg = Arc::new(
        Registry::start_with(
            Options::new()
                .flag("--link-refresh-secs", 1)
                .flag("--trash-retention-days", 0),
        )
        .await,
    );
    let seconds: u64 = std::env::var("BERTH_IT_GC_RACE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    let base: Vec<Vec<u8>> = (0..4)
        .map(|_| random_bytes(fresh_seed(), 64 * 1024))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));

    // The collector, with no grace at all: as hostile as it can be.
    let collector = {
        let (reg, stop) = (reg.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut runs, mut links, mut blobs) = (0u64, 0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let r = reg.post("/berth/v1/gc?grace_secs=0").await;
                assert_eq!(r.status, 200, "{}", r.describe());
                let last = r.text().lines().last().unwrap_or_default().to_string();
                let value: Value = serde_json::from_str(&last).unwrap();
                let report = &value["report"];
                assert!(report.is_object(), "collection failed: {last}");
                runs += 1;
                links += report["links_removed"].as_u64().unwrap();
                blobs += report["blobs_removed"].as_u64().unwrap();
            }
            (runs, links, blobs)
        })
    };

    let deadline = Instant::now() + Duration::from_secs(seconds);
    let seeds = Arc::new(AtomicU64::new(fresh_seed()));
    let pushers: Vec<_> = (0..3)
        .map(|worker| {
            let (reg, base, seeds) = (reg.clone(), base.clone(), seeds.clone());
            tokio::spawn(async move {
                let mut ledger = Ledger::default();
                let repos = ["race/a", "race/b", "race/c"];
                let mut round = 0usize;
                while Instant::now() < deadline {
                    round += 1;
                    let seed = seeds.fetch_add(1, Ordering::Relaxed);
                    let repo = repos[(worker + round) % repos.len()];
                    let shared = [
                        base[round % base.len()].clone(),
                        base[(round + worker + 1) % base.len()].clone(),
                    ];
                    let image = Arc::new(image_with(seed, &shared));
                    // Every third push mounts its blobs from another
                    // repository (where they may or may not be).
                    let from = round
                        .is_multiple_of(3)
                        .then(|| repos[(worker + round + 1) % repos.len()]);
                    if from.is_some() {
                        ledger.mounts += 1;
                    }
                    push_until_acknowledged(&reg, repo, from, &image, &mut ledger).await;
                    ledger.pushes += 1;
                    ledger.images.insert(
                        image.digest.clone(),
                        (repo.to_string(), image.clone(), true),
                    );
                    match round % 8 {
                        // Delete it again.
                        1 | 3 | 5 => {
                            let r = reg
                                .delete(&format!("/v2/{repo}/manifests/{}", image.digest))
                                .await;
                            assert_eq!(r.status, 202, "{}", r.describe());
                            ledger.deletes += 1;
                            if let Some(entry) = ledger.images.get_mut(&image.digest) {
                                entry.2 = false;
                            }
                        }
                        // Push a deleted image again, byte for byte.
                        2 | 6 => {
                            let dead = ledger
                                .images
                                .iter()
                                .find(|(_, (_, _, live))| !live)
                                .map(|(d, (r, i, _))| (d.clone(), r.clone(), i.clone()));
                            if let Some((digest, repo, image)) = dead {
                                push_until_acknowledged(&reg, &repo, None, &image, &mut ledger)
                                    .await;
                                ledger.repushes += 1;
                                if let Some(entry) = ledger.images.get_mut(&digest) {
                                    entry.2 = true;
                                }
                            }
                        }
                        _ => {}
                    }
                }
                ledger
            })
        })
        .collect();
    let mut ledgers = Vec::new();
    for pusher in pushers {
        ledgers.push(pusher.await.unwrap());
    }
    stop.store(true, Ordering::Relaxed);
    let (runs, links, blobs) = collector.await.unwrap();

    // Every acknowledged, undeleted image pulls byte-identical.
    let mut live_blobs = std::collections::HashSet::new();
    let mut checked = 0;
    for ledger in &ledgers {
        for (digest, (repo, image, live)) in &ledger.images {
            if !live {
                continue;
            }
            let r = reg.get(&format!("/v2/{repo}/manifests/{digest}")).await;
            assert_eq!(r.status, 200, "{repo}@{digest}: {}", r.describe());
            assert_eq!(r.body.as_ref(), image.manifest.as_slice());
            for blob in image.blobs() {
                let digest = sha256_digest(blob);
                assert_eq!(reg.blob_bytes(repo, &digest).await, blob, "{repo}@{digest}");
                live_blobs.insert(digest);
            }
            checked += 1;
        }
    }
    // Once the grace period (none here, and the second a link counts as
    // confirmed) has passed, what was deleted is gone: its manifest's bytes
    // and its own layer and config.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let report = gc_json(&reg, &["--grace", "0"]);
    let files = if blobs_in_s3() {
        Vec::new()
    } else {
        blob_files(&reg)
    };
    let mut gone = 0;
    for ledger in &ledgers {
        for (digest, (repo, image, live)) in &ledger.images {
            if *live {
                continue;
            }
            let r = reg.get(&format!("/v2/{repo}/manifests/{digest}")).await;
            assert_eq!(r.status, 404);
            for blob in [image.config.as_slice(), image.layers.last().unwrap()] {
                let digest = sha256_digest(blob);
                if live_blobs.contains(&digest) {
                    continue;
                }
                let r = reg.head(&format!("/v2/{repo}/blobs/{digest}")).await;
                assert_eq!(r.status, 404, "{repo}@{digest} outlived its image");
                assert!(!files.contains(&hex(&digest).to_string()));
                gone += 1;
            }
        }
    }
    let total = |f: fn(&Ledger) -> u64| ledgers.iter().map(f).sum::<u64>();
    eprintln!(
        "gc race over {seconds} s: {} pushes ({} retried attempts), {} with mounts, {} deletes, {} re-pushes; \
         {runs} collections removed {links} links and {blobs} blobs meanwhile; {checked} live images \
         verified, {gone} blobs of deleted images gone; the last run: {report}",
        total(|l| l.pushes),
        total(|l| l.retries),
        total(|l| l.mounts),
        total(|l| l.deletes),
        total(|l| l.repushes),
    );
    assert!(runs > 1 && checked > 0 && gone > 0);
}

/// A registry whose `v*` tags of `prod/**` are immutable.
async fn with_immutable_release_tags() -> Registry {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("berth.toml");
    fs::write(
        &config,
        "[[immutable]]\nrepositories = [\"prod/**\"]\ntags = [\"v*\"]\n",
    )
    .unwrap();
    let reg = Registry::start_with(Options::new().flag("--config", config.display())).await;
    // The file is read at startup only.
    drop(dir);
    reg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immutable_tags_are_pushed_once_and_never_moved_or_deleted() {
    let reg = with_immutable_release_tags().await;
    let first = Image::oci(fresh_seed(), 1, 1000);
    let second = Image::oci(fresh_seed(), 1, 1000);
    first.push(&reg, "prod/app", Some("v1")).await;
    // The same manifest again is no move: a retried push succeeds.
    first.push(&reg, "prod/app", Some("v1")).await;
    second.push_blobs(&reg, "prod/app").await;
    let moved = reg
        .put_bytes(
            "/v2/prod/app/manifests/v1",
            OCI_MANIFEST,
            second.manifest.clone(),
        )
        .await;
    assert_eq!(moved.status, 403, "{}", moved.describe());
    assert_eq!(moved.error_codes(), vec!["DENIED"]);
    assert!(moved.text().contains("immutable"), "{}", moved.describe());
    let deleted = reg.delete("/v2/prod/app/manifests/v1").await;
    assert_eq!(deleted.status, 403, "{}", deleted.describe());
    // Deleting the manifest would delete the tag with it.
    let by_digest = reg
        .delete(&format!("/v2/prod/app/manifests/{}", first.digest))
        .await;
    assert_eq!(by_digest.status, 403, "{}", by_digest.describe());
    let r = reg.get("/v2/prod/app/manifests/v1").await;
    assert_eq!(r.body.as_ref(), first.manifest.as_slice());

    // Tags no rule names move and go as ever.
    first.push(&reg, "prod/app", Some("latest")).await;
    reg.push_manifest("prod/app", "latest", OCI_MANIFEST, &second.manifest)
        .await;
    assert_eq!(
        reg.delete("/v2/prod/app/manifests/latest").await.status,
        202
    );
    first.push(&reg, "dev/app", Some("v1")).await;
    second.push(&reg, "dev/app", Some("v1")).await;
    assert_eq!(reg.delete("/v2/dev/app/manifests/v1").await.status, 202);
    // A manifest no immutable tag points at can be deleted.
    assert_eq!(
        reg.delete(&format!("/v2/prod/app/manifests/{}", second.digest))
            .await
            .status,
        202
    );
}

fn cli(reg: &Registry, args: &[&str]) -> std::process::Output {
    berth_cli()
        .args(args)
        .args(["--registry", &reg.url()])
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_history_shows_every_push_and_restore_moves_a_tag_back() {
    let reg = Registry::start().await;
    let first = Image::oci(fresh_seed(), 1, 1000);
    let second = Image::oci(fresh_seed(), 1, 1000);
    first.push(&reg, "team/app", Some("v1")).await;
    second.push(&reg, "team/app", Some("v1")).await;

    let out = cli(&reg, &["tags", "history", "team/app:v1", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let history: Value = serde_json::from_slice(&out.stdout).unwrap();
    let digests: Vec<&str> = history["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["digest"].as_str().unwrap())
        .collect();
    assert_eq!(digests, vec![first.digest.as_str(), second.digest.as_str()]);
    assert_eq!(history["current"], second.digest.as_str());
    // Who pushed, when the registry knows who is calling.
    let by = history["history"][0]["by"].clone();
    if secure_pass() {
        assert_eq!(by, format!("user:{SECURE_USER}"));
    } else {
        assert!(by.is_null(), "{history}");
    }
    let at = history["history"][1]["at_ms"].as_u64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(now.abs_diff(at) < 60_000, "pushed at {at}, now {now}");

    // An overwrite undone.
    let out = cli(&reg, &["tags", "restore", "team/app:v1", &first.digest]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("moved from"));
    let r = reg.get("/v2/team/app/manifests/v1").await;
    assert_eq!(r.body.as_ref(), first.manifest.as_slice());
    let out = cli(&reg, &["tags", "history", "team/app:v1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), 4, "{text}");
    assert!(
        text.lines().last().unwrap().contains(&first.digest)
            && text.lines().last().unwrap().contains("(current)"),
        "{text}"
    );

    // A deleted manifest cannot be brought back this way (that is the
    // trash's job).
    let r = reg
        .delete(&format!("/v2/team/app/manifests/{}", second.digest))
        .await;
    assert_eq!(r.status, 202);
    let out = cli(&reg, &["tags", "restore", "team/app:v1", &second.digest]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("manifest unknown"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&reg, &["tags", "restore", "team/app:v1", "sha256:nothex"]);
    assert!(!out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_images_wait_in_the_trash_and_come_back_byte_identical() {
    let reg = Registry::start_with(Options::new().flag("--link-refresh-secs", 1)).await;
    let image = Image::oci(fresh_seed(), 2, 2000);
    let other = Image::oci(fresh_seed(), 1, 2000);
    image.push(&reg, "team/app", Some("v1")).await;
    image.push(&reg, "team/app", Some("v2")).await;
    other.push(&reg, "team/app", Some("b")).await;
    let r = reg
        .delete(&format!("/v2/team/app/manifests/{}", image.digest))
        .await;
    assert_eq!(r.status, 202);
    assert_eq!(reg.get("/v2/team/app/manifests/v1").await.status, 404);
    assert_eq!(reg.delete("/v2/team/app/manifests/b").await.status, 202);

    let out = cli(&reg, &["trash", "ls", "team/app", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let trash: Value = serde_json::from_slice(&out.stdout).unwrap();
    let entries = trash["trash"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{trash}");
    let manifest = entries.iter().find(|e| e["tag"].is_null()).unwrap();
    assert_eq!(manifest["digest"], image.digest.as_str());
    let mut tags: Vec<&str> = manifest["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    tags.sort();
    assert_eq!(tags, vec!["v1", "v2"]);
    let day = 86_400_000;
    let kept_for =
        manifest["expires_ms"].as_u64().unwrap() - manifest["deleted_ms"].as_u64().unwrap();
    assert_eq!(kept_for, 7 * day, "the default retention");

    // Garbage collection leaves what the trash holds.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let report = gc_json(&reg, &["--grace", "0"]);
    assert_eq!(report["blobs_removed"], 0, "{report}");
    assert_eq!(report["links_removed"], 0, "{report}");

    let out = cli(&reg, &["undelete", &format!("team/app@{}", image.digest)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("is back"));
    for tag in ["v1", "v2"] {
        let r = reg.get(&format!("/v2/team/app/manifests/{tag}")).await;
        assert_eq!(r.status, 200, "{tag}: {}", r.describe());
        assert_eq!(r.body.as_ref(), image.manifest.as_slice());
    }
    for blob in image.blobs() {
        assert_eq!(reg.blob_bytes("team/app", &sha256_digest(blob)).await, blob);
    }
    let out = cli(&reg, &["undelete", "team/app:b"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = reg.get("/v2/team/app/manifests/b").await;
    assert_eq!(r.body.as_ref(), other.manifest.as_slice());
    // Out of the trash once back; a second undelete finds nothing.
    let out = cli(&reg, &["trash", "ls", "team/app", "--json"]);
    let trash: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(trash["trash"].as_array().unwrap().len(), 0, "{trash}");
    assert!(!cli(&reg, &["undelete", "team/app:b"]).status.success());

    // With the trash off, a delete is final: the next collection takes it.
    let final_reg = Registry::start_with(
        Options::new()
            .flag("--link-refresh-secs", 1)
            .flag("--trash-retention-days", 0),
    )
    .await;
    image.push(&final_reg, "team/app", Some("v1")).await;
    let r = final_reg
        .delete(&format!("/v2/team/app/manifests/{}", image.digest))
        .await;
    assert_eq!(r.status, 202);
    let out = cli(&final_reg, &["trash", "ls", "--json"]);
    let trash: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(trash["trash"].as_array().unwrap().len(), 0);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let report = gc_json(&final_reg, &["--grace", "0"]);
    assert_eq!(report["blobs_removed"], 4, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_plans_and_applies_its_rules_to_the_trash() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("berth.toml");
    fs::write(
        &config,
        "retention_interval_secs = 0\n\
         [[retention]]\nrepositories = [\"ci/**\"]\nkeep_last = 1\nkeep_tags = [\"latest\"]\n\
         [[immutable]]\nrepositories = [\"ci/**\"]\ntags = [\"v*\"]\n",
    )
    .unwrap();
    let reg = Registry::start_with(Options::new().flag("--config", config.display())).await;
    let mut images = Vec::new();
    for tag in ["v1", "t1", "t2", "latest", "t3"] {
        let image = Image::oci(fresh_seed(), 1, 500);
        image.push(&reg, "ci/app", Some(tag)).await;
        images.push(image);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let kept = Image::oci(fresh_seed(), 1, 500);
    kept.push(&reg, "prod/app", Some("t0")).await;

    let out = cli(&reg, &["retention", "plan", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut tags: Vec<&str> = plan["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["tag"].as_str().unwrap())
        .collect();
    tags.sort();
    // t3 is the newest, latest is kept by name, v1 is immutable.
    assert_eq!(tags, vec!["t1", "t2"], "{plan}");
    assert_eq!(plan["immutable_kept"], 1);
    let text = cli(&reg, &["retention", "plan"]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("2 tags and 0 untagged manifests"));

    let out = cli(&reg, &["retention", "apply"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("deleted 2 tags"));
    let mut left = reg.tags("ci/app").await;
    left.sort();
    assert_eq!(left, vec!["latest", "t3", "v1"]);
    assert_eq!(reg.tags("prod/app").await, vec!["t0"]);
    // What a rule deleted waits in the trash like a client's delete.
    let out = cli(&reg, &["undelete", "ci/app:t1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = reg.get("/v2/ci/app/manifests/t1").await;
    assert_eq!(r.body.as_ref(), images[1].manifest.as_slice());
}
