//! A full disk: the registry answers 507 with a spec error body, stores
//! nothing partial, keeps what it had, and works again once space is free.
//!
//! Runs on a small tmpfs mounted for the test (needs root). Skipped with a
//! message when it cannot mount, unless `BERTH_REQUIRE_TMPFS` is set.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::*;

/// A tmpfs of a few MiB, unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size_mib: u64) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().expect("temp dir");
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            assert!(
                std::env::var_os("BERTH_REQUIRE_TMPFS").is_none(),
                "cannot mount a tmpfs but BERTH_REQUIRE_TMPFS is set"
            );
            eprintln!(
                "SKIPPED: cannot mount a tmpfs (needs root; set BERTH_REQUIRE_TMPFS to fail instead)"
            );
            return None;
        }
        Some(SmallDisk { dir })
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

fn files_under(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| entries.count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_gives_507_stores_nothing_and_recovers() {
    if blobs_in_s3() {
        eprintln!("skipping: blobs are in S3, not on the local disk");
        return;
    }
    let Some(disk) = SmallDisk::mount(24) else {
        return;
    };
    let reg = Registry::start_with(Options::new().data_dir(disk.path())).await;
    let kept = random_bytes(fresh_seed(), 2 * 1024 * 1024);
    let kept_digest = reg.push_blob("full/disk", &kept).await;

    // A monolithic push bigger than the free space.
    let big = random_bytes(fresh_seed(), 30 * 1024 * 1024);
    let big_digest = sha256_digest(&big);
    let r = reg
        .put_bytes(
            &with_query(&reg.start_upload("full/disk").await, "digest", &big_digest),
            "application/octet-stream",
            big.clone(),
        )
        .await;
    assert_eq!(r.status, 507, "{}", r.describe());
    check_error_body(&r);
    assert_eq!(
        reg.head(&format!("/v2/full/disk/blobs/{big_digest}"))
            .await
            .status,
        404
    );

    // A chunk that does not fit is rolled back: the session stays resumable.
    let upload = reg.start_upload("full/disk").await;
    let first = reg
        .patch_bytes(&upload, Some("0-999"), big[..1000].to_vec())
        .await;
    assert_eq!(first.status, 202, "{}", first.describe());
    let r = reg
        .patch_bytes(
            &upload,
            Some(&format!("1000-{}", big.len() - 1)),
            big[1000..].to_vec(),
        )
        .await;
    assert_eq!(r.status, 507, "{}", r.describe());
    let status = reg.get(&upload).await;
    assert_eq!(status.header("range").as_deref(), Some("0-999"));

    // What was there is intact, nothing partial is left in tmp/, and a push
    // that fits works.
    assert_eq!(reg.blob_bytes("full/disk", &kept_digest).await, kept);
    assert_eq!(files_under(&disk.path().join("tmp")), 0);
    let small = random_bytes(fresh_seed(), 1024 * 1024);
    let small_digest = reg.push_blob("full/disk", &small).await;
    assert_eq!(reg.blob_bytes("full/disk", &small_digest).await, small);
}
