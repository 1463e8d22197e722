//! Interoperability with podman: push an image, drop it locally, pull it back
//! and compare the files inside byte for byte.
//!
//! Skipped (with a message) when `podman` is not installed, unless
//! `BERTH_REQUIRE_PODMAN` is set, in which case a missing podman fails.

use std::path::Path;
use std::time::Duration;

use crate::support::*;

fn podman_available() -> bool {
    let found = std::process::Command::new("podman")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return true;
    }
    if std::env::var_os("BERTH_REQUIRE_PODMAN").is_some() {
        panic!("podman is not on PATH but BERTH_REQUIRE_PODMAN is set");
    }
    eprintln!("SKIPPED: podman is not on PATH (set BERTH_REQUIRE_PODMAN to make this a failure)");
    false
}

/// A podman with its own storage in `dir`, so tests never share state.
struct Podman {
    root: std::path::PathBuf,
}

impl Podman {
    fn new(dir: &Path) -> Self {
        Self {
            root: dir.to_path_buf(),
        }
    }

    async fn run(&self, args: &[&str]) -> String {
        let mut cmd = tokio::process::Command::new("podman");
        cmd.arg("--root")
            .arg(self.root.join("root"))
            .arg("--runroot")
            .arg(self.root.join("run"))
            .args([
                "--storage-driver",
                "vfs",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "none",
            ])
            .args(args)
            .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(300), cmd.output())
            .await
            .unwrap_or_else(|_| panic!("podman {args:?} timed out"))
            .expect("running podman");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "podman {args:?} failed ({}):\nstdout: {stdout}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout.trim().to_string()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_push_and_pull_roundtrip_files_byte_for_byte() {
    if !podman_available() {
        return;
    }
    let reg = Registry::start().await;
    let work = tempfile::tempdir().unwrap();
    let rootfs = work.path().join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    let payload = random_bytes(fresh_seed(), 8 * 1024 * 1024 + 17);
    std::fs::write(rootfs.join("bin/payload"), &payload).unwrap();
    std::fs::write(rootfs.join("hello.txt"), b"hello from berth\n").unwrap();
    let tarball = work.path().join("rootfs.tar");
    let status = std::process::Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(&tarball)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());

    let podman = Podman::new(&work.path().join("podman"));
    let image_id = podman
        .run(&[
            "import",
            tarball.to_str().unwrap(),
            "localhost/berth-test:1",
        ])
        .await;
    let remote = format!("{}/team/podman-app:1.0", reg.host_port());
    podman
        .run(&[
            "push",
            "--tls-verify=false",
            "localhost/berth-test:1",
            &remote,
        ])
        .await;

    // The registry holds the tag, and its digest is what podman reports.
    let resp = reg
        .client()
        .get(format!("{}/v2/team/podman-app/manifests/1.0", reg.url()))
        .header(
            "Accept",
            "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let served_digest = resp.headers()["docker-content-digest"]
        .to_str()
        .unwrap()
        .to_string();
    let body = resp.bytes().await.unwrap();
    assert_eq!(sha256_digest(&body), served_digest);

    // Forget everything locally, then pull from berth.
    podman.run(&["rmi", "-a", "-f"]).await;
    podman.run(&["pull", "--tls-verify=false", &remote]).await;
    let pulled_id = podman
        .run(&["image", "inspect", "--format", "{{.Id}}", &remote])
        .await;
    assert!(
        image_id.ends_with(&pulled_id)
            || pulled_id.ends_with(image_id.trim_start_matches("sha256:")),
        "pulled image id {pulled_id} differs from pushed {image_id}"
    );
    let pulled_digest = podman
        .run(&["image", "inspect", "--format", "{{.Digest}}", &remote])
        .await;
    assert_eq!(pulled_digest, served_digest);

    let mount = podman.run(&["image", "mount", &remote]).await;
    let mount = Path::new(&mount);
    assert_eq!(std::fs::read(mount.join("bin/payload")).unwrap(), payload);
    assert_eq!(
        std::fs::read(mount.join("hello.txt")).unwrap(),
        b"hello from berth\n"
    );
    podman.run(&["image", "unmount", &remote]).await;
}
