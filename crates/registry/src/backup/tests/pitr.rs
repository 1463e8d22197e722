//! Point-in-time restore: a timeline of pushes, tag moves and deletes,
//! restored at each recorded instant into a fresh registry, whose state
//! must equal the state recorded then.

use super::*;
use crate::now_ms;

/// Sleeps past the current millisecond, so that changes and recorded
/// instants fall on distinct milliseconds.
async fn tick() {
    tokio::time::sleep(std::time::Duration::from_millis(4)).await;
}

/// The registry's state digest now, and the instant it stands for.
async fn record(registry: &Registry) -> (u64, String) {
    tick().await;
    let at = now_ms();
    let state = registry.state_summary(false).await.unwrap().digest;
    tick().await;
    (at, state)
}

async fn restored_at(target: &Target, at: At) -> (Registry, tempfile::TempDir, RestoreReport) {
    let dir = tempfile::tempdir().unwrap();
    let fresh = registry(dir.path());
    let report = fresh
        .restore(target, None, false, Some(at), None)
        .await
        .unwrap();
    (fresh, dir, report)
}

#[tokio::test]
async fn a_restore_at_any_recorded_instant_gives_the_state_of_that_instant() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let source = registry(dirs[0].path());
    let target = target(dirs[1].path());
    push(&source, "team/app", "v1", b"app one").await;
    let first = source
        .backup(&target, &CreateOptions::default(), None)
        .await
        .unwrap();
    let archiver = Archiver::new(target.clone());

    let mut timeline = vec![record(&source).await];
    // A new repository, a new tag, a tag moved, a tag deleted, a manifest
    // deleted by digest (with its tag), and a repository pushed again.
    let (db, _) = push(&source, "team/db", "v1", b"db one").await;
    timeline.push(record(&source).await);
    push(&source, "team/app", "v2", b"app two").await;
    timeline.push(record(&source).await);
    // Archived halfway: segments end and start between the instants.
    archiver.catch_up(&source).await.unwrap();
    push(&source, "team/app", "v1", b"app one again").await;
    timeline.push(record(&source).await);
    source
        .delete_manifest(
            &repo("team/app"),
            &Reference::Tag(Tag::parse("v2").unwrap()),
        )
        .await
        .unwrap();
    timeline.push(record(&source).await);
    // A second backup: moments after it restore from it.
    let second = source
        .backup(&target, &CreateOptions::default(), None)
        .await
        .unwrap();
    timeline.push(record(&source).await);
    source
        .delete_manifest(&repo("team/db"), &Reference::Digest(db.clone()))
        .await
        .unwrap();
    timeline.push(record(&source).await);
    let (web, web_layer) = push(&source, "team/web", "latest", b"web one").await;
    timeline.push(record(&source).await);
    archiver.catch_up(&source).await.unwrap();

    // Every instant's state differs from the others but for the backup's
    // (which changed nothing), so a restore to the wrong instant is caught.
    let distinct: std::collections::HashSet<_> = timeline.iter().map(|(_, s)| s).collect();
    assert_eq!(
        distinct.len(),
        timeline.len() - 1,
        "one step (the backup) changes nothing"
    );

    for (i, (at, state)) in timeline.iter().enumerate() {
        let (restored, _dir, report) = restored_at(&target, At::Time(*at)).await;
        let base = if i >= 5 { &second.id } else { &first.id };
        assert_eq!(&report.id, base, "instant {i}");
        assert_eq!(report.replayed.as_ref().unwrap().restored_to_ms, *at);
        assert_eq!(
            &restored.state_summary(false).await.unwrap().digest,
            state,
            "instant {i}: {:?}",
            restored.state_summary(true).await.unwrap().lines
        );
    }

    // A restore killed during its replay (here: a finished one marked as
    // such) is resumed by running it again, and the base records its
    // replay removed (a tag deleted, a manifest deleted) stay removed.
    let (at, state) = timeline.last().unwrap();
    let (resumed, _dir, done) = restored_at(&target, At::Time(*at)).await;
    let marker = serde_json::json!({ "backup": done.id, "at_ms": at, "replaying": true });
    resumed
        .meta_store()
        .commit(Txn::new().put(RESTORE_STATE, marker.to_string()))
        .await
        .unwrap();
    let again = resumed
        .restore(&target, None, false, None, None)
        .await
        .unwrap();
    assert!(again.resumed);
    assert_eq!(
        (again.records, again.existing),
        (0, 0),
        "no record written again"
    );
    assert_eq!(&resumed.state_summary(false).await.unwrap().digest, state);

    // The newest state, byte-identical, with the tag history of the
    // source; and a later write in the restored registry wins over every
    // replayed one.
    let (latest, _dir, _) = restored_at(&target, At::Latest).await;
    assert_eq!(
        latest.state_summary(false).await.unwrap().digest,
        source.state_summary(false).await.unwrap().digest
    );
    assert_eq!(
        read_all(&latest, "team/web", &web_layer).await,
        b"web one".to_vec()
    );
    assert_eq!(
        manifest_of(&latest, &web).await,
        manifest_of(&source, &web).await
    );
    assert_eq!(history(&latest).await, history(&source).await);
    assert_eq!(history(&latest).await.len(), 2);
    let (moved, _) = push(&latest, "team/app", "v1", b"after the restore").await;
    assert_eq!(
        latest
            .find_tag(&repo("team/app"), &Tag::parse("v1").unwrap())
            .await
            .unwrap(),
        Some(moved)
    );
}

#[tokio::test]
async fn a_moment_the_archive_does_not_know_is_refused_before_anything_is_written() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let source = registry(dirs[0].path());
    let target = target(dirs[1].path());
    let before_any = now_ms();
    tick().await;
    push(&source, "team/app", "v1", b"app one").await;
    source
        .backup(&target, &CreateOptions::default(), None)
        .await
        .unwrap();
    let fresh = registry(dirs[2].path());
    // Before the first backup.
    let early = fresh
        .restore(&target, None, false, Some(At::Time(before_any)), None)
        .await
        .unwrap_err();
    assert!(early.to_string().contains("taken before"), "{early}");
    // After what the archive knows (nothing was archived since the backup).
    push(&source, "team/app", "v2", b"app two").await;
    let later = fresh
        .restore(
            &target,
            None,
            false,
            Some(At::Time(now_ms() + 60_000)),
            None,
        )
        .await
        .unwrap_err();
    assert!(
        later.to_string().contains("knows its changes up to"),
        "{later}"
    );
    assert!(fresh.state_summary(false).await.unwrap().tags == 0);
    // Archived, the same moment's changes are there.
    Archiver::new(target.clone())
        .catch_up(&source)
        .await
        .unwrap();
    let report = fresh
        .restore(&target, None, false, Some(At::Latest), None)
        .await
        .unwrap();
    assert_eq!(report.replayed.unwrap().events, 1);
    assert_eq!(
        fresh.state_summary(false).await.unwrap().digest,
        source.state_summary(false).await.unwrap().digest
    );
}

#[tokio::test]
async fn pruning_keeps_the_log_a_kept_backup_replays_and_what_it_names() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    // No trash and links confirmed for a millisecond: deleted content is
    // collected at once.
    let source = Registry::new(
        Arc::new(RedbMetaStore::open(&dirs[0].path().join("meta.redb")).unwrap()),
        Arc::new(FsBlobStore::open(dirs[0].path(), FsOptions { verify_reads: true }).unwrap()),
        Limits {
            trash_retention_ms: 0,
            link_refresh_ms: 1,
            ..Limits::default()
        },
    );
    let target = target(dirs[1].path());
    let archiver = Archiver::new(target.clone());
    push(&source, "team/app", "v1", b"app one").await;
    source
        .backup(&target, &CreateOptions::default(), None)
        .await
        .unwrap();
    // Archived after the first backup only: removed with it.
    push(&source, "team/app", "v2", b"app two").await;
    archiver.catch_up(&source).await.unwrap();
    tick().await;
    source
        .backup(&target, &CreateOptions::default(), None)
        .await
        .unwrap();
    // Archived after the second: what a restore from it replays, and a
    // layer only that log names (deleted before the next backup).
    let (gone, gone_layer) = push(&source, "team/tmp", "v1", b"only in the log").await;
    archiver.catch_up(&source).await.unwrap();
    let at = now_ms();
    tick().await;
    source
        .delete_manifest(&repo("team/tmp"), &Reference::Digest(gone))
        .await
        .unwrap();
    archiver.catch_up(&source).await.unwrap();
    // Collected in the registry, so no backup after this holds the layer:
    // only the archived log names it.
    tick().await;
    let gc = crate::GcOptions {
        dry_run: false,
        grace_ms: 0,
    };
    source.collect_garbage(gc, None).await.unwrap();
    assert_eq!(source.stored_blob_size(&gone_layer).await.unwrap(), None);
    tick().await;
    let options = CreateOptions {
        keep: Some(2),
        prune_grace_ms: Some(0),
        ..CreateOptions::default()
    };
    let report = source.backup(&target, &options, None).await.unwrap();
    let pruned = report.pruned.unwrap();
    assert_eq!(
        (pruned.backups.len(), pruned.segments),
        (1, 1),
        "{pruned:?}"
    );
    assert!(target.blobs.stat(&gone_layer).await.unwrap().is_some());

    let fresh = registry(dirs[2].path());
    fresh
        .restore(&target, None, false, Some(At::Time(at)), None)
        .await
        .unwrap();
    assert_eq!(
        read_all(&fresh, "team/tmp", &gone_layer).await,
        b"only in the log".to_vec()
    );
}

async fn history(registry: &Registry) -> Vec<Digest> {
    registry
        .tag_history(&repo("team/app"), "v1")
        .await
        .unwrap()
        .into_iter()
        .map(|h| h.digest)
        .collect()
}

async fn manifest_of(registry: &Registry, digest: &Digest) -> (String, Bytes) {
    let content = registry
        .get_manifest(
            &repo("team/web"),
            &Reference::Digest(digest.clone()),
            &["*/*".to_string()],
        )
        .await
        .unwrap();
    (content.media_type, content.bytes)
}

#[tokio::test]
async fn a_replicating_regions_backup_is_not_replayed_to_a_moment() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let source = registry(dirs[0].path()).with_region("eu".into());
    let target = target(dirs[1].path());
    push(&source, "team/app", "v1", b"app one").await;
    let options = CreateOptions {
        region: Some("eu".into()),
        ..CreateOptions::default()
    };
    source.backup(&target, &options, None).await.unwrap();
    let fresh = registry(dirs[2].path());
    // Its log lacks what the peers wrote: refused, and nothing written.
    let refused = fresh
        .restore(&target, None, false, Some(At::Latest), None)
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("replicating region"),
        "{refused}"
    );
    assert_eq!(fresh.state_summary(false).await.unwrap().tags, 0);
    // A restore of the backup itself is what it offers.
    fresh
        .restore(&target, None, false, None, None)
        .await
        .unwrap();
    assert_eq!(fresh.state_summary(false).await.unwrap().tags, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pushes_all_land_once_each_in_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let source = Arc::new(registry(dir.path()));
    push(&source, "team/app", "base", b"shared layer").await;
    let head = source.changes_after(u64::MAX, 1).await.unwrap().head;
    // 32 pushers at once on one registry: the log's head is one guarded
    // key, and none of them may fail for it.
    let pushes = (0..32).map(|i| {
        let source = source.clone();
        tokio::spawn(async move {
            for j in 0..8 {
                push(&source, "team/app", &format!("t{i}-{j}"), b"shared layer").await;
            }
        })
    });
    for push in futures_util::future::join_all(pushes).await {
        push.unwrap();
    }
    let page = source.changes_after(head, 10_000).await.unwrap();
    assert_eq!(page.events.len(), 32 * 8);
    let seqs: Vec<u64> = page.events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (head + 1..=head + 256).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_replay_that_failed_midway_resumes_where_it_was_going_without_undoing_its_deletes() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let source = registry(dirs[0].path());
    let target = target(dirs[1].path());
    let archiver = Archiver::new(target.clone());
    push(&source, "team/app", "v1", b"app one").await;
    source
        .backup(&target, &CreateOptions::default(), None)
        .await
        .unwrap();
    // Three segments: a delete of a tag the backup holds, a push, a push.
    source
        .delete_manifest(
            &repo("team/app"),
            &Reference::Tag(Tag::parse("v1").unwrap()),
        )
        .await
        .unwrap();
    archiver.catch_up(&source).await.unwrap();
    push(&source, "team/db", "v1", b"db one").await;
    archiver.catch_up(&source).await.unwrap();
    push(&source, "team/web", "v1", b"web one").await;
    archiver.catch_up(&source).await.unwrap();
    let mut segments: Vec<_> = std::fs::read_dir(dirs[1].path().join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().contains('-'))
        .collect();
    segments.sort();
    assert_eq!(segments.len(), 3, "{segments:?}");

    // The middle segment unreadable: the replay applies the first (the
    // delete) and stops there, its marker left behind.
    let middle = std::fs::read(&segments[1]).unwrap();
    std::fs::write(&segments[1], b"{ not a segment").unwrap();
    let fresh = registry(dirs[2].path());
    let failed = fresh
        .restore(&target, None, false, Some(At::Latest), None)
        .await
        .unwrap_err();
    assert!(failed.to_string().contains("segment"), "{failed}");
    assert_eq!(
        fresh
            .find_tag(&repo("team/app"), &Tag::parse("v1").unwrap())
            .await
            .unwrap(),
        None,
        "the delete was replayed"
    );

    // Mended, and run again without --at: it goes to the same end, writes
    // no record of the backup again (the deleted tag stays deleted), and
    // equals the source.
    std::fs::write(&segments[1], middle).unwrap();
    let resumed = fresh
        .restore(&target, None, false, None, None)
        .await
        .unwrap();
    assert!(resumed.resumed);
    assert_eq!((resumed.records, resumed.existing), (0, 0));
    assert_eq!(resumed.replayed.unwrap().events, 3);
    assert_eq!(
        fresh.state_summary(false).await.unwrap().digest,
        source.state_summary(false).await.unwrap().digest
    );
}
