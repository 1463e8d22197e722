//! `berth export` and `berth import`: OCI image layouts (directory and
//! tar) round-tripped through skopeo, and a whole registry (CNCF
//! Distribution) imported, killed half-way and resumed.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::support::*;
use crate::upstream::{Distribution, Pusher, distribution_available};

async fn cli(reg: &Registry, args: &[&str]) -> (i32, String, String) {
    let mut cmd = berth_cli();
    cmd.args(args).args(["--registry", &reg.url()]);
    let out = tokio::process::Command::from(cmd).output().await.unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn skopeo(args: &[&str]) {
    let out = tokio::process::Command::new("skopeo")
        .arg("--insecure-policy")
        .args(args)
        .output()
        .await
        .expect("running skopeo");
    assert!(
        out.status.success(),
        "skopeo {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn skopeo_available() -> bool {
    let found = std::process::Command::new("skopeo")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found && std::env::var_os("BERTH_REQUIRE_SKOPEO").is_some() {
        panic!("skopeo is not on PATH but BERTH_REQUIRE_SKOPEO is set");
    }
    found
}

/// The registry's transport for skopeo (TLS verification off: the tests'
/// own CA in the secure pass).
fn docker(reg: &Registry, image: &str) -> String {
    format!("docker://{}/{image}", reg.host_port())
}

fn creds(reg: &Registry) -> Vec<String> {
    let _ = reg;
    if secure_pass() {
        vec![format!("--dest-creds={SECURE_USER}:{SECURE_PASSWORD}")]
    } else {
        Vec::new()
    }
}

/// The digest `repo:tag` resolves to.
async fn digest_of(reg: &Registry, repo: &str, tag: &str) -> Option<String> {
    reg.manifest_digest(repo, tag).await
}

fn layout_index(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_and_import_round_trip_oci_layouts_through_skopeo() {
    if !skopeo_available() {
        return;
    }
    let source = Registry::start().await;
    let dest = Registry::start().await;
    let seed = fresh_seed();
    let image = Image::oci(seed, 3, 40_000);
    image.push(&source, "team/app", Some("v1")).await;
    let (index, amd, arm) = two_platform_index(seed + 1);
    amd.push(&source, "team/multi", None).await;
    arm.push(&source, "team/multi", None).await;
    let index_digest = source
        .push_manifest("team/multi", "v1", OCI_INDEX, &index)
        .await;

    // Export into a directory: skopeo reads it, digests preserved.
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("layout");
    let (code, out, err) = cli(
        &source,
        &[
            "export",
            "team/app:v1",
            "team/multi:v1",
            "--to",
            dir.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(code, 0, "{out} {err}");
    let names: Vec<String> = layout_index(&dir)["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            m["annotations"]["org.opencontainers.image.ref.name"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(names, ["team/app:v1", "team/multi:v1"]);
    let mut args = vec![
        "copy".to_string(),
        "--all".into(),
        "--preserve-digests".into(),
        "--dest-tls-verify=false".into(),
    ];
    args.extend(creds(&dest));
    args.push(format!("oci:{}:team/multi:v1", dir.display()));
    args.push(docker(&dest, "via-skopeo/multi:v1"));
    skopeo(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert_eq!(
        digest_of(&dest, "via-skopeo/multi", "v1").await,
        Some(index_digest.clone())
    );

    // A layout skopeo wrote (ref name a bare tag) imports with --to.
    let skopeo_dir = work.path().join("from-skopeo");
    let mut args = vec!["copy".to_string(), "--src-tls-verify=false".into()];
    if secure_pass() {
        args.push(format!("--src-creds={SECURE_USER}:{SECURE_PASSWORD}"));
    }
    args.push(docker(&source, "team/app:v1"));
    args.push(format!("oci:{}:v1", skopeo_dir.display()));
    skopeo(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let (code, out, err) = cli(&dest, &["import", skopeo_dir.to_str().unwrap()]).await;
    assert_ne!(code, 0, "a bare tag needs --to: {out} {err}");
    assert!(out.contains("--to"), "{out}");
    let (code, out, err) = cli(
        &dest,
        &[
            "import",
            skopeo_dir.to_str().unwrap(),
            "--to",
            "imported/app",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out} {err}");
    // skopeo may rewrite the manifest: the imported one is the layout's.
    let imported = digest_of(&dest, "imported/app", "v1")
        .await
        .expect("imported/app:v1");
    let listed = layout_index(&skopeo_dir)["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(imported, listed);

    // Through a tar, both images, named as they were.
    let tar = work.path().join("images.tar");
    let (code, out, err) = cli(
        &source,
        &[
            "export",
            "team/app:v1",
            "team/multi:v1",
            "--to",
            tar.to_str().unwrap(),
            "--json",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out} {err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["images"], 2, "{report:#}");
    assert!(!work.path().join("images.tar.part").exists());
    let third = Registry::start().await;
    let (code, out, err) = cli(&third, &["import", tar.to_str().unwrap(), "--json"]).await;
    assert_eq!(code, 0, "{out} {err}");
    assert_eq!(
        digest_of(&third, "team/app", "v1").await,
        Some(image.digest.clone())
    );
    assert_eq!(
        digest_of(&third, "team/multi", "v1").await,
        Some(index_digest)
    );
    for layer in image.layers.iter().chain(&amd.layers).chain(&arm.layers) {
        let digest = sha256_digest(layer);
        let repo = if image.layers.contains(layer) {
            "team/app"
        } else {
            "team/multi"
        };
        assert_eq!(&third.blob_bytes(repo, &digest).await, layer);
    }
    // skopeo reads our tar too.
    let mut args = vec![
        "copy".to_string(),
        "--preserve-digests".into(),
        "--dest-tls-verify=false".into(),
    ];
    args.extend(creds(&dest));
    args.push(format!("oci-archive:{}:team/app:v1", tar.display()));
    args.push(docker(&dest, "via-archive/app:v1"));
    skopeo(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert_eq!(
        digest_of(&dest, "via-archive/app", "v1").await,
        Some(image.digest.clone())
    );
    // Importing again copies nothing.
    let (code, out, _) = cli(&third, &["import", tar.to_str().unwrap(), "--json"]).await;
    assert_eq!(code, 0);
    let again: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(again["blobs"], 0, "{again:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn importing_a_whole_registry_survives_a_kill_and_resumes() {
    if !distribution_available() {
        return;
    }
    let upstream = Distribution::start().await;
    let pusher = Pusher::new(&upstream.url(), None);
    let seed = fresh_seed();
    let mut pushed = Vec::new();
    for i in 0..12u64 {
        let repo = if i % 3 == 0 { "src/db" } else { "src/app" };
        let image = Image::oci(seed + i, 3, 1 << 20);
        pusher.image(repo, &format!("v{i}"), &image).await;
        pushed.push((repo, format!("v{i}"), image.digest.clone()));
    }
    let other = Image::oci(seed + 100, 1, 1000);
    pusher.image("elsewhere/x", "v1", &other).await;
    let dest = Registry::start().await;

    // Killed once it has imported something.
    let mut cmd = berth_cli();
    cmd.args([
        "import",
        "--from",
        &upstream.url(),
        "--repository",
        "src/**",
        "--registry",
        &dest.url(),
    ])
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    let mut running = tokio::process::Command::from(cmd).spawn().unwrap();
    let started = eventually(Duration::from_secs(60), || async {
        let mut done = 0;
        for (repo, tag, _) in &pushed {
            if digest_of(&dest, repo, tag).await.is_some() {
                done += 1;
            }
        }
        done >= 2
    })
    .await;
    assert!(started, "the import copied nothing");
    running.kill().await.unwrap();
    let mut before = 0;
    for (repo, tag, _) in &pushed {
        if digest_of(&dest, repo, tag).await.is_some() {
            before += 1;
        }
    }
    assert!(before < pushed.len(), "the import finished before the kill");

    let (code, out, err) = cli(
        &dest,
        &[
            "import",
            "--from",
            &upstream.url(),
            "--repository",
            "src/**",
            "--json",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out} {err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    eprintln!(
        "{before} of {} images were in before the resumed run: {report}",
        pushed.len()
    );
    assert_eq!(report["images"], pushed.len(), "{report:#}");
    assert!(
        report["skipped"].as_u64().unwrap() >= before as u64,
        "{report:#}"
    );
    for (repo, tag, digest) in &pushed {
        assert_eq!(
            digest_of(&dest, repo, tag).await.as_ref(),
            Some(digest),
            "{repo}:{tag}"
        );
    }
    assert_eq!(
        digest_of(&dest, "elsewhere/x", "v1").await,
        None,
        "a repository no glob matches came along"
    );
    // Every layer pulls byte-identical from the imported registry.
    let (repo, tag, _) = &pushed[0];
    let manifest: Value = dest
        .get(&format!("/v2/{repo}/manifests/{tag}"))
        .await
        .json();
    for layer in manifest["layers"].as_array().unwrap() {
        let digest = layer["digest"].as_str().unwrap();
        assert_eq!(sha256_digest(&dest.blob_bytes(repo, digest).await), digest);
    }
}
