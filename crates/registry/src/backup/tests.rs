//! Backups on the embedded engines: round trip into a fresh registry,
//! incremental copies, verification finding damage, the hold on blob
//! removal, refusal of a non-empty registry, and pruning.

use std::path::Path;
use std::sync::Arc;

use berth_oci::{Digest, Reference, RepositoryName, Tag};
use berth_store::blob::fs::FsOptions;
use berth_store::{ByteStream, FsBlobStore, RedbMetaStore, Txn};
use bytes::Bytes;
use futures_util::StreamExt;

use super::*;
use crate::{Limits, Registry};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn registry(dir: &Path) -> Registry {
    let meta = Arc::new(RedbMetaStore::open(&dir.join("meta.redb")).unwrap());
    let blobs = Arc::new(FsBlobStore::open(dir, FsOptions { verify_reads: true }).unwrap());
    Registry::new(meta, blobs, Limits::default())
}

fn body(bytes: &[u8]) -> ByteStream {
    let bytes = Bytes::copy_from_slice(bytes);
    Box::pin(futures_util::stream::iter([Ok(bytes)]))
}

fn repo(name: &str) -> RepositoryName {
    RepositoryName::parse(name).unwrap()
}

/// Pushes an image of one layer; its manifest's digest and layer's.
async fn push(registry: &Registry, name: &str, tag: &str, layer: &[u8]) -> (Digest, Digest) {
    let config = Digest::sha256_of(b"{}");
    registry
        .put_blob(&repo(name), &config, body(b"{}"))
        .await
        .unwrap();
    let layer_digest = Digest::sha256_of(layer);
    registry
        .put_blob(&repo(name), &layer_digest, body(layer))
        .await
        .unwrap();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.to_string(), "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest.to_string(), "size": layer.len()}],
    })
    .to_string();
    let reference = Reference::Tag(Tag::parse(tag).unwrap());
    let digest = registry
        .put_manifest(
            &repo(name),
            &reference,
            Some(OCI_MANIFEST),
            Bytes::from(manifest),
        )
        .await
        .unwrap()
        .digest;
    (digest, layer_digest)
}

async fn read_all(registry: &Registry, name: &str, digest: &Digest) -> Vec<u8> {
    let (read, _) = registry.read_blob(&repo(name), digest, None).await.unwrap();
    let mut out = Vec::new();
    let mut stream = read.stream;
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    out
}

fn target(dir: &Path) -> Target {
    Target::open(dir.to_str().unwrap()).unwrap()
}

#[tokio::test]
async fn a_backup_restores_byte_identical_and_the_next_one_copies_only_what_is_new() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let source = registry(dirs[0].path());
    let (app, app_layer) = push(&source, "team/app", "v1", b"layer one").await;
    push(&source, "team/db", "v1", b"layer two").await;
    let target = target(dirs[1].path());

    let first = source
        .backup(&target, &CreateOptions::default(), None)
        .await
        .unwrap();
    assert!(first.clean());
    // Two layers, one shared config, two manifests.
    assert_eq!((first.blobs, first.copied_blobs), (5, 5));

    // Ids have millisecond resolution.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let (web, web_layer) = push(&source, "team/web", "v1", b"layer three").await;
    let second = source
        .backup(&target, &CreateOptions::default(), None)
        .await
        .unwrap();
    // Copied by the archive of the change log since the first backup
    // (taken first), or by the backup itself.
    let archived = second.archived.clone().unwrap();
    assert_eq!(
        (second.blobs, second.copied_blobs + archived.copied_blobs),
        (7, 2)
    );
    assert_eq!(
        second.copied_bytes + archived.copied_bytes,
        b"layer three".len() as u64 + source_manifest_size(&source, "team/web", &web).await
    );

    let listed = target.list().await.unwrap();
    assert_eq!(
        listed.iter().map(|i| i.id.clone()).collect::<Vec<_>>(),
        [first.id.clone(), second.id.clone()]
    );
    assert_eq!(
        (listed[1].repositories, listed[1].tags, listed[1].manifests),
        (3, 3, 3)
    );
    let verified = verify(&target, None, None).await.unwrap();
    assert!(verified.clean(), "{verified:?}");
    assert_eq!(verified.blobs_checked, 7);

    // The older backup restores the older state.
    let restored = registry(dirs[2].path());
    let report = restored
        .restore(&target, Some(&first.id), false, None, None)
        .await
        .unwrap();
    assert_eq!((report.blobs, report.copied_blobs), (5, 5));
    assert!(!report.resumed);
    let tag = Tag::parse("v1").unwrap();
    assert_eq!(
        restored.find_tag(&repo("team/app"), &tag).await.unwrap(),
        Some(app.clone())
    );
    assert_eq!(
        restored.find_tag(&repo("team/web"), &tag).await.unwrap(),
        None
    );
    assert_eq!(
        read_all(&restored, "team/app", &app_layer).await,
        b"layer one"
    );
    let manifest = restored
        .get_manifest(&repo("team/app"), &Reference::Digest(app.clone()), &[])
        .await
        .unwrap();
    assert_eq!(Digest::sha256_of(&manifest.bytes), app);
    // A registry with content is not restored into.
    let again = restored
        .restore(&target, None, false, None, None)
        .await
        .unwrap_err();
    assert!(matches!(again, BackupError::NotEmpty(_)), "{again}");
    drop(web_layer);
}

async fn source_manifest_size(registry: &Registry, name: &str, digest: &Digest) -> u64 {
    registry
        .get_manifest(&repo(name), &Reference::Digest(digest.clone()), &[])
        .await
        .unwrap()
        .bytes
        .len() as u64
}

#[tokio::test]
async fn verify_names_a_damaged_or_missing_blob_of_the_backup() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let source = registry(dirs[0].path());
    let (_, layer) = push(&source, "team/app", "v1", b"layer one").await;
    let (_, other) = push(&source, "team/db", "v1", b"layer two").await;
    let target = target(dirs[1].path());
    source
        .backup(&target, &CreateOptions::default(), None)
        .await
        .unwrap();
    let path = |d: &Digest| {
        dirs[1]
            .path()
            .join("blobs/sha256")
            .join(&d.encoded()[..2])
            .join(d.encoded())
    };
    std::fs::write(path(&layer), b"layer 0ne").unwrap();
    std::fs::remove_file(path(&other)).unwrap();
    let report = verify(&target, None, None).await.unwrap();
    assert_eq!(report.corrupt, [layer]);
    assert_eq!(report.missing, std::slice::from_ref(&other));
    // Each image lacks one layer.
    assert_eq!(report.dangling.len(), 2, "{:?}", report.dangling);
    assert!(
        report
            .dangling
            .iter()
            .any(|d| d.starts_with("team/db@") && d.ends_with(&other.to_string()))
    );
}

#[tokio::test]
async fn a_running_backup_holds_blob_removal_off() {
    let dir = tempfile::tempdir().unwrap();
    let registry = registry(dir.path());
    let digest = Digest::sha256_of(b"stray");
    registry
        .put_blob(&repo("a"), &digest, body(b"stray"))
        .await
        .unwrap();
    registry.delete_blob(&repo("a"), &digest).await.unwrap();
    let hold = hold::Hold::acquire(registry.meta_store().clone(), "test")
        .await
        .unwrap();
    // A second backup is refused while the first holds.
    let busy = hold::Hold::acquire(registry.meta_store().clone(), "other").await;
    assert!(matches!(busy, Err(BackupError::Busy(_))));
    let removed = registry
        .remove_unreferenced_blobs(std::slice::from_ref(&digest))
        .await
        .unwrap();
    assert_eq!(removed.blobs, 0);
    assert!(registry.blob_store().stat(&digest).await.unwrap().is_some());
    hold.release().await;
    let removed = registry
        .remove_unreferenced_blobs(std::slice::from_ref(&digest))
        .await
        .unwrap();
    assert_eq!(removed.blobs, 1);
    assert!(registry.blob_store().stat(&digest).await.unwrap().is_none());
}

#[tokio::test]
async fn a_killed_restore_resumes_and_a_different_one_waits_for_it() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let source = registry(dirs[0].path());
    let (app, _) = push(&source, "team/app", "v1", b"layer one").await;
    let target = target(dirs[1].path());
    let backup = source
        .backup(&target, &CreateOptions::default(), None)
        .await
        .unwrap();
    let restored = registry(dirs[2].path());
    // As a restore killed after its marker and some records.
    let marker = serde_json::json!({ "backup": backup.id }).to_string();
    restored
        .meta_store()
        .commit(
            Txn::new()
                .put("restore/state", marker)
                .put("repo/team/app", "{}"),
        )
        .await
        .unwrap();
    let other = restored
        .restore(&target, Some("20200101T000000000Z"), false, None, None)
        .await
        .unwrap_err();
    assert!(matches!(other, BackupError::NotFound(_)), "{other}");
    let report = restored
        .restore(&target, None, false, None, None)
        .await
        .unwrap();
    assert!(report.resumed);
    assert_eq!(report.existing, 1);
    assert_eq!(
        restored
            .find_tag(&repo("team/app"), &Tag::parse("v1").unwrap())
            .await
            .unwrap(),
        Some(app)
    );
    assert!(
        restored
            .meta_store()
            .get(b"restore/state")
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn pruning_keeps_the_newest_backups_and_the_blobs_they_name() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let source = registry(dirs[0].path());
    let target = target(dirs[1].path());
    let (gone, gone_layer) = push(&source, "team/app", "v1", b"layer one").await;
    source
        .backup(&target, &CreateOptions::default(), None)
        .await
        .unwrap();
    source
        .delete_manifest(&repo("team/app"), &Reference::Digest(gone.clone()))
        .await
        .unwrap();
    let (kept, kept_layer) = push(&source, "team/app", "v2", b"layer two").await;
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let options = CreateOptions {
        keep: Some(1),
        prune_grace_ms: Some(0),
        ..CreateOptions::default()
    };
    let report = source.backup(&target, &options, None).await.unwrap();
    let pruned = report.pruned.unwrap();
    assert_eq!(pruned.backups.len(), 1);
    let listed = target.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    let stored = |d: &Digest| {
        let target = &target;
        let d = d.clone();
        async move { target.blobs.stat(&d).await.unwrap().is_some() }
    };
    // The trash keeps the deleted manifest (and so its layer) for a week:
    // both are in the new backup and stay.
    assert!(stored(&gone_layer).await && stored(&kept_layer).await && stored(&kept).await);
    // The first backup's metadata chunk is not named by the kept one.
    assert!(pruned.blobs >= 1, "{pruned:?}");
    assert!(verify(&target, None, None).await.unwrap().clean());
}

#[test]
fn ids_sort_by_time_and_volatile_families_are_left_out() {
    let a = id_for(1_764_611_362_123);
    assert_eq!(a, "20251201T174922123Z");
    assert!(a < id_for(1_764_611_362_124));
    assert!(berth_store::documents::valid_name(&a));
    for key in [
        "tag/a:1",
        "manifest/a:sha256:x",
        "blob/sha256:x",
        "taghist/a:1/x",
        "trash/m/a@x",
        "auth/token/x",
        "cache/image/x",
    ] {
        assert!(backed_up(key.as_bytes()), "{key}");
    }
    for key in [
        "upload/x",
        "node/a",
        "leader/gc",
        "changelog/e/1",
        "repl/ack/us",
        "backup/hold",
        "restore/state",
    ] {
        assert!(!backed_up(key.as_bytes()), "{key}");
    }
}

fn blob_file(dir: &Path, digest: &Digest) -> std::path::PathBuf {
    dir.join("blobs/sha256")
        .join(&digest.encoded()[..2])
        .join(digest.encoded())
}

#[tokio::test]
async fn a_blob_the_backup_lacks_is_reported_by_the_restore_and_found_by_scrub() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let source = registry(dirs[0].path());
    let (app, lost) = push(&source, "team/app", "v1", b"layer one").await;
    let (_, kept) = push(&source, "team/db", "v1", b"layer two").await;
    std::fs::remove_file(blob_file(dirs[0].path(), &lost)).unwrap();
    let target = target(dirs[1].path());
    let report = source
        .backup(&target, &CreateOptions::default(), None)
        .await
        .unwrap();
    assert_eq!(report.missing, std::slice::from_ref(&lost));
    assert!(!report.clean());
    assert_eq!(
        target.list().await.unwrap()[0].missing,
        std::slice::from_ref(&lost)
    );

    let restored = registry(dirs[2].path());
    let done = restored
        .restore(&target, None, false, None, None)
        .await
        .unwrap();
    assert_eq!(done.missing, std::slice::from_ref(&lost), "{done:?}");
    // The registry is as the backup had it: the tag and the link are back,
    // no record claims the lost bytes, and scrub names the gap for a
    // repair.
    let tag = Tag::parse("v1").unwrap();
    assert_eq!(
        restored.find_tag(&repo("team/app"), &tag).await.unwrap(),
        Some(app)
    );
    assert_eq!(restored.stored_blob_size(&lost).await.unwrap(), None);
    assert_eq!(read_all(&restored, "team/db", &kept).await, b"layer two");
    let scrubbed = restored.scrub(None).await.unwrap();
    assert_eq!(scrubbed.missing, std::slice::from_ref(&lost));
    // Verify names the incomplete manifest.
    let verified = verify(&target, None, None).await.unwrap();
    assert!(
        verified.dangling.iter().any(|d| d.starts_with("team/app@")),
        "{verified:?}"
    );
}

#[tokio::test]
async fn a_target_belongs_to_one_registry_and_a_restored_one_carries_on_with_it_when_it_adopts_it()
{
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let source = registry(dirs[0].path());
    push(&source, "team/app", "v1", b"layer one").await;
    let target = target(dirs[1].path());
    source
        .backup(&target, &CreateOptions::default(), None)
        .await
        .unwrap();
    // Another registry may restore from it but not back up into it.
    let other = registry(dirs[2].path());
    push(&other, "other/app", "v1", b"layer two").await;
    let refused = other
        .backup(&target, &CreateOptions::default(), None)
        .await
        .unwrap_err();
    assert!(matches!(refused, BackupError::Target(_)), "{refused}");
    // A restored registry goes on with the target only when it adopts it
    // (a drill that restores must not take over production's target).
    let drill_dir = tempfile::tempdir().unwrap();
    let drill = registry(drill_dir.path());
    drill
        .restore(&target, None, false, None, None)
        .await
        .unwrap();
    let refused = drill
        .backup(&target, &CreateOptions::default(), None)
        .await
        .unwrap_err();
    assert!(matches!(refused, BackupError::Target(_)), "{refused}");
    let restored = registry(dirs[3].path());
    restored
        .restore(&target, None, true, None, None)
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    restored
        .backup(&target, &CreateOptions::default(), None)
        .await
        .unwrap();
    assert_eq!(target.list().await.unwrap().len(), 2);
}

#[tokio::test]
async fn no_backup_of_a_half_restored_registry_and_its_restore_resumes_without_an_id() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let source = registry(dirs[0].path());
    push(&source, "team/app", "v1", b"layer one").await;
    let target = target(dirs[1].path());
    let first = source
        .backup(&target, &CreateOptions::default(), None)
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    push(&source, "team/app", "v2", b"layer two").await;
    source
        .backup(&target, &CreateOptions::default(), None)
        .await
        .unwrap();
    let restored = registry(dirs[2].path());
    let marker = serde_json::json!({ "backup": first.id }).to_string();
    restored
        .meta_store()
        .commit(Txn::new().put(RESTORE_STATE, marker))
        .await
        .unwrap();
    let other = target_blobs_dir(dirs[2].path());
    let refused = restored
        .backup(&target_at(&other), &CreateOptions::default(), None)
        .await
        .unwrap_err();
    assert!(matches!(refused, BackupError::NotEmpty(_)), "{refused}");
    // Without an id it finishes the interrupted one, not the newest.
    let report = restored
        .restore(&target, None, false, None, None)
        .await
        .unwrap();
    assert!(report.resumed);
    assert_eq!(report.id, first.id);
    assert_eq!(
        restored
            .find_tag(&repo("team/app"), &Tag::parse("v2").unwrap())
            .await
            .unwrap(),
        None
    );
}

fn target_blobs_dir(dir: &Path) -> std::path::PathBuf {
    dir.join("elsewhere")
}

fn target_at(dir: &Path) -> Target {
    std::fs::create_dir_all(dir).unwrap();
    Target::open(dir.to_str().unwrap()).unwrap()
}

#[tokio::test]
async fn a_hold_dropped_without_release_lets_go() {
    let dir = tempfile::tempdir().unwrap();
    let registry = registry(dir.path());
    let meta = registry.meta_store().clone();
    let hold = hold::Hold::acquire(meta.clone(), "dropped").await.unwrap();
    assert!(registry.blob_removal_held().await.unwrap());
    drop(hold);
    let mut free = false;
    for _ in 0..100 {
        if !registry.blob_removal_held().await.unwrap() {
            free = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(free, "a dropped hold stayed");
}

#[tokio::test]
async fn scrub_repairs_a_rotten_and_a_lost_blob_from_a_backup() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let source = registry(dirs[0].path());
    let (_, rotten) = push(&source, "team/app", "v1", b"layer one").await;
    let (_, lost) = push(&source, "team/db", "v1", b"layer two").await;
    let target = Arc::new(target(dirs[1].path()));
    source
        .backup(&target, &CreateOptions::default(), None)
        .await
        .unwrap();
    std::fs::write(blob_file(dirs[0].path(), &rotten), b"layer 0ne").unwrap();
    std::fs::remove_file(blob_file(dirs[0].path(), &lost)).unwrap();
    let found = source.scrub(None).await.unwrap();
    assert_eq!(
        (found.corrupt.clone(), found.missing.clone()),
        (vec![rotten.clone()], vec![lost.clone()])
    );
    let bad: Vec<Digest> = found
        .corrupt
        .iter()
        .chain(&found.missing)
        .cloned()
        .collect();
    let sources: Vec<Arc<dyn crate::BlobSource>> = vec![target.clone()];
    let repaired = source.repair_blobs(&bad, &sources).await.unwrap().repaired;
    assert_eq!(repaired.len(), 2, "{repaired:?}");
    assert!(repaired.iter().all(|r| r.from.starts_with("backup ")));
    assert_eq!(read_all(&source, "team/app", &rotten).await, b"layer one");
    assert_eq!(read_all(&source, "team/db", &lost).await, b"layer two");
    assert!(source.scrub(None).await.unwrap().clean());
}

#[tokio::test]
async fn chosen_repositories_come_back_into_a_live_registry_without_undoing_newer_tags() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let meta = Arc::new(RedbMetaStore::open(&dirs[0].path().join("meta.redb")).unwrap());
    let blobs =
        Arc::new(FsBlobStore::open(dirs[0].path(), FsOptions { verify_reads: true }).unwrap());
    // No trash and links confirmed for a millisecond: deleted content is
    // collected at once, so the restore must bring the bytes back.
    let limits = Limits {
        trash_retention_ms: 0,
        link_refresh_ms: 1,
        ..Limits::default()
    };
    let live = Registry::new(meta, blobs, limits);
    let (v1, v1_layer) = push(&live, "team/app", "v1", b"app one").await;
    let (v2, _) = push(&live, "team/app", "v2", b"app two").await;
    let (db, db_layer) = push(&live, "team/db", "v1", b"db one").await;
    let (other, _) = push(&live, "other/x", "v1", b"other one").await;
    let target = target(dirs[1].path());
    live.backup(&target, &CreateOptions::default(), None)
        .await
        .unwrap();

    // After the backup: v1 and the db image deleted, v2 moved on, other/x
    // deleted; then collected.
    for (name, digest) in [("team/app", &v1), ("team/db", &db), ("other/x", &other)] {
        live.delete_manifest(&repo(name), &Reference::Digest(digest.clone()))
            .await
            .unwrap();
    }
    let (newer, _) = push(&live, "team/app", "v2", b"app three").await;
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let gc = crate::GcOptions {
        dry_run: false,
        grace_ms: 0,
    };
    live.collect_garbage(gc, None).await.unwrap();
    assert_eq!(live.stored_blob_size(&v1_layer).await.unwrap(), None);

    let chosen: crate::NameMatcher = Arc::new(|name: &str| name.starts_with("team/"));
    let report = live
        .restore_repositories(&target, None, &chosen, false, Some("user:alice"), None)
        .await
        .unwrap();
    assert!(report.failed.is_empty(), "{report:?}");
    assert_eq!(report.repositories, 2);
    assert_eq!(report.kept_newer, ["team/app:v2"]);
    assert!(report.blobs >= 2, "{report:?}");
    let tag = |t: &str| Tag::parse(t).unwrap();
    assert_eq!(
        live.find_tag(&repo("team/app"), &tag("v1")).await.unwrap(),
        Some(v1.clone())
    );
    assert_eq!(
        live.find_tag(&repo("team/app"), &tag("v2")).await.unwrap(),
        Some(newer)
    );
    assert_eq!(
        live.find_tag(&repo("team/db"), &tag("v1")).await.unwrap(),
        Some(db)
    );
    assert_eq!(
        live.find_tag(&repo("other/x"), &tag("v1")).await.unwrap(),
        None
    );
    assert_eq!(read_all(&live, "team/app", &v1_layer).await, b"app one");
    assert_eq!(read_all(&live, "team/db", &db_layer).await, b"db one");
    // The restored tag is an ordinary push: in history, by its author.
    let history = live.tag_history(&repo("team/app"), "v1").await.unwrap();
    assert!(
        history
            .iter()
            .any(|h| h.by.as_deref() == Some("user:alice")),
        "{history:?}"
    );
    // A garbage collection now takes nothing restored.
    live.collect_garbage(gc, None).await.unwrap();
    assert_eq!(read_all(&live, "team/app", &v1_layer).await, b"app one");

    // Forced, the moved tag goes back too; a second run changes nothing.
    let forced = live
        .restore_repositories(&target, None, &chosen, true, None, None)
        .await
        .unwrap();
    assert_eq!(forced.tags, 1, "{forced:?}");
    assert_eq!(
        live.find_tag(&repo("team/app"), &tag("v2")).await.unwrap(),
        Some(v2)
    );
    let again = live
        .restore_repositories(&target, None, &chosen, false, None, None)
        .await
        .unwrap();
    assert_eq!(
        (again.tags, again.manifests, again.blobs),
        (0, 0, 0),
        "{again:?}"
    );
}

mod pitr;
