//! Backups through the real binary: taken while pushes go on, listed only
//! when complete, incremental, surviving a `kill -9` mid-run, verified,
//! and restored into a registry on the other engines (files and redb one
//! way, etcd and S3 the other, depending on the pass) with every tag,
//! manifest and blob byte-identical, tag history and trash included, and
//! the same state digest.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::support::*;

/// Runs `berth backup ARGS --json` against `reg`: exit code and report.
async fn backup_cli(reg: &Registry, args: &[&str]) -> (i32, Value, String) {
    let mut cmd = berth_cli();
    cmd.arg("backup")
        .args(args)
        .args(["--json", "--registry", &reg.url()]);
    let out = tokio::process::Command::from(cmd).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), value, stderr)
}

async fn create(reg: &Registry) -> Value {
    let (code, report, stderr) = backup_cli(reg, &["create"]).await;
    assert_eq!(code, 0, "backup create: {report:#} {stderr}");
    report
}

async fn listed(reg: &Registry) -> Vec<String> {
    let (code, value, stderr) = backup_cli(reg, &["ls"]).await;
    assert_eq!(code, 0, "backup ls: {stderr}");
    value["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect()
}

/// The backup target of this pass: a directory, or a prefix of the test
/// bucket in the etcd + S3 pass.
fn target_url(dir: &Path) -> String {
    if blobs_in_s3() {
        format!("s3://berth/berth-it/backups-{}", unique_name(dir))
    } else {
        dir.display().to_string()
    }
}

/// The engines of the restored registry: the pair the source does not use.
fn other_engines(etcd: &Etcd, dir: &Path) -> Vec<String> {
    if blobs_in_s3() {
        vec![
            "--metadata".into(),
            "redb".into(),
            "--storage".into(),
            "fs".into(),
        ]
    } else {
        vec![
            "--metadata".into(),
            format!(
                "etcd://127.0.0.1:{}/restore-{}",
                etcd.port,
                unique_name(dir)
            ),
        ]
    }
}

/// Every repository's tags and what they point at.
async fn tag_map(reg: &Registry) -> Vec<(String, String, String)> {
    let catalog = reg.get("/v2/_catalog?n=10000").await.json();
    let mut out = Vec::new();
    for repo in catalog["repositories"].as_array().unwrap() {
        let repo = repo.as_str().unwrap();
        for tag in reg.tags(repo).await {
            let digest = reg
                .manifest_digest(repo, &tag)
                .await
                .unwrap_or_else(|| panic!("{repo}:{tag} is listed but does not resolve"));
            out.push((repo.to_string(), tag, digest));
        }
    }
    out.sort();
    out
}

async fn state_digest(reg: &Registry) -> Value {
    let r = reg.get("/berth/v1/replication/state").await;
    assert_eq!(r.status, 200, "{}", r.describe());
    r.json()
}

/// Pulls every tagged image of `reg` whole and checks each manifest and
/// blob against its digest; how many blobs it read.
async fn pull_all(reg: &Registry, tags: &[(String, String, String)]) -> usize {
    let mut blobs = 0;
    for (repo, _, digest) in tags {
        let r = reg
            .req(
                reqwest::Method::GET,
                &format!("/v2/{repo}/manifests/{digest}"),
            )
            .header("accept", MANIFEST_ACCEPT)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{repo}@{digest}");
        let bytes = r.bytes().await.unwrap();
        assert_eq!(&sha256_digest(&bytes), digest);
        let manifest: Value = serde_json::from_slice(&bytes).unwrap();
        let wanted = manifest["layers"]
            .as_array()
            .unwrap()
            .iter()
            .chain(std::iter::once(&manifest["config"]));
        for descriptor in wanted {
            let blob = descriptor["digest"].as_str().unwrap();
            let content = reg.blob_bytes(repo, blob).await;
            assert_eq!(sha256_digest(&content), blob, "{repo}@{blob}");
            blobs += 1;
        }
    }
    blobs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_push_load_restores_byte_identical_on_the_other_engines() {
    let Some(etcd) = start_etcd().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let target = target_url(dir.path());
    let source = Registry::start_with(Options::new().flag("--backup-to", &target)).await;
    let seed = fresh_seed();

    // Content with history: tags pushed, one moved, one deleted (to the
    // trash).
    let images: Vec<Image> = (0..6).map(|i| Image::oci(seed + i, 2, 50_000)).collect();
    for (i, image) in images.iter().enumerate() {
        let repo = if i % 2 == 0 { "team/app" } else { "team/db" };
        image.push(&source, repo, Some(&format!("v{i}"))).await;
    }
    images[4].push(&source, "team/app", Some("v0")).await;
    let deleted = source.delete("/v2/team/db/manifests/v5").await;
    assert_eq!(deleted.status, 202, "{}", deleted.describe());
    let before = tag_map(&source).await;

    // A backup while a client keeps pushing new images.
    let stop = AtomicBool::new(false);
    let pushing = async {
        let mut pushed = Vec::new();
        let mut i = 100;
        while !stop.load(Ordering::SeqCst) {
            let image = Image::oci(seed + i, 2, 30_000);
            image
                .push(&source, "load/app", Some(&format!("p{i}")))
                .await;
            pushed.push(image.digest.clone());
            i += 1;
        }
        pushed
    };
    let backing_up = async {
        let report = create(&source).await;
        stop.store(true, Ordering::SeqCst);
        report
    };
    let (pushed, first) = tokio::join!(pushing, backing_up);
    assert!(!pushed.is_empty(), "no push went on during the backup");
    eprintln!("{} pushes during the first backup: {first}", pushed.len());
    assert!(first["missing"].as_array().unwrap().is_empty(), "{first:#}");
    let first_id = first["id"].as_str().unwrap().to_string();
    assert_eq!(listed(&source).await, std::slice::from_ref(&first_id));

    // The next backups copy only what is new: after the pushes stopped,
    // nothing.
    let second = create(&source).await;
    assert!(
        second["copied_blobs"].as_u64().unwrap() < second["blobs"].as_u64().unwrap(),
        "{second:#}"
    );
    let third = create(&source).await;
    assert_eq!(third["copied_blobs"], 0, "{third:#}");
    assert_eq!(third["blobs"], second["blobs"]);
    let (code, verified, stderr) = backup_cli(&source, &["verify"]).await;
    assert_eq!(code, 0, "{verified:#} {stderr}");
    assert_eq!(verified["blobs_checked"], third["blobs"], "{verified:#}");
    let metrics = source.get("/metrics").await.text();
    assert!(
        metrics.contains("berth_backup_runs_total{outcome=\"clean\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("berth_backup_last_size_bytes {}", third["bytes"])),
        "{metrics}"
    );
    assert!(metrics.contains(&format!("berth_backup_last_blobs {}", third["blobs"])));
    assert_eq!(verified["id"], third["id"]);

    // Restored on the other engines: the newest backup equals the source
    // now, down to the state digest.
    let restored = Registry::start_with(
        other_engines(&etcd, dir.path())
            .into_iter()
            .fold(Options::new(), Options::arg)
            .flag("--backup-to", &target),
    )
    .await;
    let (code, report, stderr) = backup_cli(&restored, &["restore"]).await;
    assert_eq!(code, 0, "restore: {report:#} {stderr}");
    assert_eq!(report["id"], third["id"]);
    assert_eq!(report["blobs"], third["blobs"]);
    let now = tag_map(&source).await;
    assert_eq!(tag_map(&restored).await, now);
    assert_eq!(
        state_digest(&restored).await["digest"],
        state_digest(&source).await["digest"]
    );
    assert!(pull_all(&restored, &now).await >= 2 * now.len());
    for digest in &pushed {
        assert!(
            now.iter().any(|(_, _, d)| d == digest),
            "a push acknowledged during the backup is missing"
        );
    }
    // Tag history and the trash came along.
    let history = restored
        .get("/berth/v1/tags/history?repository=team%2Fapp&tag=v0")
        .await;
    assert_eq!(history.status, 200, "{}", history.describe());
    let values: Vec<String> = history.json()["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["digest"].as_str().unwrap().to_string())
        .collect();
    assert!(
        values.contains(&images[0].digest) && values.contains(&images[4].digest),
        "{values:?}"
    );
    let trash = restored.get("/berth/v1/trash").await.json();
    assert!(
        trash["trash"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["repository"] == "team/db" && e["tag"] == "v5"),
        "{trash:#}"
    );

    // The first backup restores the moment it was taken: everything
    // pushed before it, and a consistent subset of the concurrent pushes.
    let older = Registry::start_with(
        other_engines(&etcd, &dir.path().join("older"))
            .into_iter()
            .fold(Options::new(), Options::arg)
            .flag("--backup-to", &target),
    )
    .await;
    let (code, report, stderr) = backup_cli(&older, &["restore", &first_id]).await;
    assert_eq!(code, 0, "restore {first_id}: {report:#} {stderr}");
    let then = tag_map(&older).await;
    for entry in &before {
        assert!(
            then.contains(entry),
            "{entry:?} was pushed before the backup but is not in it"
        );
    }
    pull_all(&older, &then).await;
    // A restore goes into an empty registry only.
    let (code, _, stderr) = backup_cli(&older, &["restore"]).await;
    assert_ne!(code, 0);
    assert!(stderr.contains("not empty"), "{stderr}");
}

/// Blob files of a directory target.
fn target_blobs(dir: &Path) -> usize {
    walk(&dir.join("blobs"))
}

fn walk(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            let path = e.path();
            if path.is_dir() { walk(&path) } else { 1 }
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_killed_mid_run_is_never_listed_and_the_next_one_reuses_its_blobs() {
    // A directory target whatever the engines (in the etcd + S3 pass the
    // blobs come from S3): the partial state is watched there.
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().display().to_string();
    let mut source = Registry::start_with(Options::new().flag("--backup-to", &target)).await;
    let seed = fresh_seed();
    create(&source).await;
    let before = target_blobs(dir.path());
    // 96 MiB in 48 layers, copied eight at a time, each file fsynced:
    // the kill lands after some and before all of them.
    let image = Image::oci(seed, 48, 2 << 20);
    image.push(&source, "big/app", Some("v1")).await;

    let mut cmd = berth_cli();
    cmd.args(["backup", "create", "--registry", &source.url()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut running = tokio::process::Command::from(cmd).spawn().unwrap();
    assert!(
        eventually(Duration::from_secs(30), || async {
            target_blobs(dir.path()) > before
        })
        .await,
        "the backup copied nothing"
    );
    source.kill9();
    let _ = running.wait().await;
    let copied_before_kill = target_blobs(dir.path()) - before;
    assert_eq!(
        listed_after_restart(&mut source).await.len(),
        1,
        "a killed backup was listed"
    );

    // On etcd the dead backup's hold lapses with its lease (15 s).
    let mut next = Value::Null;
    for _ in 0..40 {
        let (code, report, stderr) = backup_cli(&source, &["create"]).await;
        if code == 0 {
            next = report;
            break;
        }
        assert!(stderr.contains("another backup is running"), "{stderr}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let total = image.layers.len() as u64 + 2;
    assert_eq!(next["missing"].as_array().unwrap().len(), 0, "{next:#}");
    // Copied by the backup itself, or by its archive of the change log
    // since the last one (which copies the pushed image first).
    let copied = next["copied_blobs"].as_u64().unwrap()
        + next["archived"]["copied_blobs"].as_u64().unwrap_or(0);
    eprintln!(
        "killed after {copied_before_kill} blob files; the next backup copied {copied} of {total}"
    );
    assert!(
        copied + copied_before_kill as u64 >= total && copied < total,
        "copied {copied} of {total} after the kill had left {copied_before_kill}: {next:#}"
    );
    assert_eq!(listed(&source).await.len(), 2);
    let (code, verified, stderr) = backup_cli(&source, &["verify"]).await;
    assert_eq!(code, 0, "{verified:#} {stderr}");
}

async fn listed_after_restart(source: &mut Registry) -> Vec<String> {
    source.restart().await;
    listed(source).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chosen_repositories_come_back_into_the_live_registry_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().display().to_string();
    let reg = Registry::start_with(Options::new().flag("--backup-to", &target)).await;
    let seed = fresh_seed();
    let app = Image::oci(seed, 2, 20_000);
    let other = Image::oci(seed + 1, 1, 20_000);
    app.push(&reg, "team/app", Some("v1")).await;
    other.push(&reg, "other/x", Some("v1")).await;
    create(&reg).await;
    for (repo, image) in [("team/app", &app), ("other/x", &other)] {
        let r = reg
            .delete(&format!("/v2/{repo}/manifests/{}", image.digest))
            .await;
        assert_eq!(r.status, 202, "{}", r.describe());
    }
    let (code, report, stderr) = backup_cli(&reg, &["restore", "--repository", "team/**"]).await;
    assert_eq!(code, 0, "{report:#} {stderr}");
    assert_eq!(report["tags"], 1, "{report:#}");
    assert_eq!(report["repositories"], 1, "{report:#}");
    let now = tag_map(&reg).await;
    assert!(
        now.contains(&("team/app".to_string(), "v1".to_string(), app.digest.clone())),
        "{now:?}"
    );
    assert!(!now.iter().any(|(repo, _, _)| repo == "other/x"), "{now:?}");
    pull_all(&reg, &now).await;
}

/// The moment `ms` as `--at` takes it.
fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The source's state now, and the instant it stands for (with a few
/// milliseconds either side, so that no change shares its millisecond).
async fn instant(reg: &Registry) -> (u64, Value, Vec<(String, String, String)>) {
    tokio::time::sleep(Duration::from_millis(5)).await;
    let at = now_ms();
    let state = state_digest(reg).await["digest"].clone();
    let tags = tag_map(reg).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    (at, state, tags)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_change_log_archived_as_it_is_written_restores_any_moment_on_the_other_engines() {
    let Some(etcd) = start_etcd().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let target = target_url(dir.path());
    // A schedule turns continuous archiving on; its first backup is an
    // hour away, so the one backup here is taken by hand.
    let source = Registry::start_with(
        Options::new()
            .flag("--backup-to", &target)
            .flag("--backup-every", "1h"),
    )
    .await;
    let seed = fresh_seed();
    let images: Vec<Image> = (0..4).map(|i| Image::oci(seed + i, 2, 20_000)).collect();
    images[0].push(&source, "team/app", Some("v1")).await;
    let base = create(&source).await;

    let mut timeline = vec![instant(&source).await];
    images[1].push(&source, "team/app", Some("v2")).await;
    images[2].push(&source, "team/db", Some("v1")).await;
    timeline.push(instant(&source).await);
    images[3].push(&source, "team/app", Some("v1")).await;
    let deleted = source.delete("/v2/team/app/manifests/v2").await;
    assert_eq!(deleted.status, 202, "{}", deleted.describe());
    timeline.push(instant(&source).await);
    let last = timeline.last().unwrap().0;

    // Archived within moments, with no backup taken: the metric says how
    // far the archive knows the registry.
    let mut archived_through = 0u64;
    for _ in 0..100 {
        let metrics = source.get("/metrics").await.text();
        archived_through = metrics
            .lines()
            .find_map(|l| l.strip_prefix("berth_backup_archived_through_timestamp_seconds "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map_or(0, |s| (s * 1000.0) as u64);
        if archived_through > last {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        archived_through > last,
        "the archive did not catch up: through {archived_through} ms, last change at {last} ms"
    );
    assert_eq!(listed(&source).await.len(), 1, "no backup but the base");

    for (i, (at, state, tags)) in timeline.iter().enumerate() {
        let restored_dir = tempfile::tempdir().unwrap();
        let restored = Registry::start_with(
            other_engines(&etcd, restored_dir.path())
                .into_iter()
                .fold(Options::new(), Options::arg)
                .flag("--backup-to", &target),
        )
        .await;
        let (code, report, stderr) =
            backup_cli(&restored, &["restore", "--at", &rfc3339(*at)]).await;
        assert_eq!(code, 0, "instant {i}: {report:#} {stderr}");
        assert_eq!(report["id"], base["id"], "instant {i}");
        assert_eq!(&tag_map(&restored).await, tags, "instant {i}");
        assert_eq!(
            &state_digest(&restored).await["digest"],
            state,
            "instant {i}"
        );
        pull_all(&restored, tags).await;
    }
    // A moment the archive cannot know yet is refused, and says which it
    // can.
    let refused = Registry::start_with(Options::new().flag("--backup-to", &target)).await;
    let (code, _, stderr) = backup_cli(
        &refused,
        &["restore", "--at", &rfc3339(now_ms() + 3_600_000)],
    )
    .await;
    assert_ne!(code, 0);
    assert!(stderr.contains("knows its changes up to"), "{stderr}");
}
