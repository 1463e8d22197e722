//! Interoperability with a real client: skopeo copies OCI layouts to and from berth.
//!
//! Skipped (with a message) when `skopeo` is not installed, unless `BERTH_REQUIRE_SKOPEO`
//! is set, in which case a missing skopeo fails the tests.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::*;

pub(crate) fn skopeo_available() -> bool {
    let found = std::process::Command::new("skopeo")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if found {
        return true;
    }
    if std::env::var_os("BERTH_REQUIRE_SKOPEO").is_some() {
        panic!("skopeo is not on PATH but BERTH_REQUIRE_SKOPEO is set");
    }
    eprintln!("SKIPPED: skopeo is not on PATH (set BERTH_REQUIRE_SKOPEO to make this a failure)");
    false
}

pub(crate) async fn skopeo(args: &[&str]) -> String {
    let mut cmd = tokio::process::Command::new("skopeo");
    cmd.arg("--insecure-policy").args(args).kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(300), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("skopeo {args:?} timed out"))
        .expect("running skopeo");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "skopeo {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

// ---------------------------------------------------------------------------
// Building an OCI image layout on disk
// ---------------------------------------------------------------------------

/// A ustar archive holding one regular file.
fn tar_with_file(name: &str, content: &[u8]) -> Vec<u8> {
    fn octal(field: &mut [u8], value: u64) {
        let s = format!("{:0width$o}\0", value, width = field.len() - 1);
        field.copy_from_slice(s.as_bytes());
    }
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    octal(&mut h[100..108], 0o644);
    octal(&mut h[108..116], 0);
    octal(&mut h[116..124], 0);
    octal(&mut h[124..136], content.len() as u64);
    octal(&mut h[136..148], 1_700_000_000);
    h[148..156].copy_from_slice(b"        ");
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[265..269].copy_from_slice(b"root");
    h[297..301].copy_from_slice(b"root");
    let sum: u32 = h.iter().map(|&b| b as u32).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());

    let mut out = Vec::with_capacity(content.len() + 2048);
    out.extend_from_slice(&h);
    out.extend_from_slice(content);
    let pad = (512 - content.len() % 512) % 512;
    out.extend(std::iter::repeat_n(0u8, pad + 1024));
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut table = [0u32; 256];
    for (i, e) in table.iter_mut().enumerate() {
        let mut c = i as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
        *e = c;
    }
    let mut crc = !0u32;
    for &b in data {
        crc = table[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// A valid gzip stream using stored (uncompressed) deflate blocks.
fn gzip_stored(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 65535 * 5 + 32);
    out.extend_from_slice(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff]);
    let mut chunks = data.chunks(65535).peekable();
    if data.is_empty() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(c) = chunks.next() {
        let last = chunks.peek().is_none();
        out.push(if last { 1 } else { 0 });
        let len = c.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(c);
    }
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

pub(crate) struct Layout {
    dir: PathBuf,
    refs: Vec<Value>,
}

impl Layout {
    pub(crate) fn new(dir: &Path) -> Layout {
        fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Layout {
            dir: dir.to_path_buf(),
            refs: Vec::new(),
        }
    }

    fn add_blob(&self, bytes: &[u8]) -> String {
        let hex = sha256_hex(bytes);
        fs::write(self.dir.join("blobs/sha256").join(&hex), bytes).unwrap();
        format!("sha256:{hex}")
    }

    /// Builds an image of `layer_sizes` random-file tar+gzip layers; returns the manifest bytes.
    pub(crate) fn add_image(&self, seed: u64, layer_sizes: &[usize], arch: &str) -> Vec<u8> {
        let mut layers = Vec::new();
        let mut diff_ids = Vec::new();
        for (i, &size) in layer_sizes.iter().enumerate() {
            let content = random_bytes(seed.wrapping_add(i as u64 * 7919), size);
            let tar = tar_with_file(&format!("layer{i}.bin"), &content);
            diff_ids.push(sha256_digest(&tar));
            let gz = gzip_stored(&tar);
            self.add_blob(&gz);
            layers.push(descriptor(OCI_LAYER_GZIP, &gz));
        }
        let config = to_bytes(&json!({
            "architecture": arch,
            "os": "linux",
            "created": "2024-01-01T00:00:00Z",
            "config": { "Labels": { "seed": seed.to_string() } },
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
            "history": layer_sizes.iter().map(|_| json!({"created_by": "berth test"})).collect::<Vec<_>>(),
        }));
        self.add_blob(&config);
        let manifest = to_bytes(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptor(OCI_CONFIG, &config),
            "layers": layers,
        }));
        self.add_blob(&manifest);
        manifest
    }

    pub(crate) fn tag(&mut self, tag: &str, media_type: &str, bytes: &[u8]) {
        let mut d = descriptor(media_type, bytes);
        d["annotations"] = json!({ "org.opencontainers.image.ref.name": tag });
        self.refs.push(d);
        let index = json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self.refs });
        fs::write(self.dir.join("index.json"), to_bytes(&index)).unwrap();
    }
}

/// All blobs of a layout, by digest.
fn layout_blobs(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut m = BTreeMap::new();
    for e in fs::read_dir(dir.join("blobs/sha256")).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        let bytes = fs::read(e.path()).unwrap();
        assert_eq!(
            sha256_hex(&bytes),
            name,
            "blob file {name} in {} does not match its digest",
            dir.display()
        );
        m.insert(format!("sha256:{name}"), bytes);
    }
    m
}

/// The descriptor tagged `tag` in a layout's index.json.
fn layout_ref(dir: &Path, tag: &str) -> Value {
    let idx: Value = serde_json::from_slice(&fs::read(dir.join("index.json")).unwrap()).unwrap();
    idx["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("tag {tag} not in {}", idx))
        .clone()
}

fn manifest_blobs(manifest: &Value) -> Vec<String> {
    let mut v = vec![manifest["config"]["digest"].as_str().unwrap().to_string()];
    for l in manifest["layers"].as_array().unwrap() {
        v.push(l["digest"].as_str().unwrap().to_string());
    }
    v
}

fn mib(n: usize) -> usize {
    n * 1024 * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_copy_preserving_digests_roundtrips_a_multi_layer_image() {
    if !skopeo_available() {
        return;
    }
    let reg = Registry::start_with(Options::new().env("BERTH_LOG", "warn")).await;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let mut layout = Layout::new(&src);
    let manifest = layout.add_image(fresh_seed(), &[mib(20), mib(24), mib(27), mib(30)], "amd64");
    layout.tag("1.0", OCI_MANIFEST, &manifest);
    let digest = sha256_digest(&manifest);
    let host = reg.host_port();
    let dest = format!("docker://{host}/team/app:1.0");

    skopeo(&[
        "copy",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &format!("oci:{}:1.0", src.display()),
        &dest,
    ])
    .await;

    // The registry holds the exact manifest and every blob.
    let r = reg.get("/v2/team/app/manifests/1.0").await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert!(
        r.body == manifest,
        "manifest bytes changed despite --preserve-digests"
    );
    assert_eq!(r.digest_header().as_deref(), Some(digest.as_str()));
    let mv: Value = serde_json::from_slice(&manifest).unwrap();
    let src_blobs = layout_blobs(&src);
    for d in manifest_blobs(&mv) {
        let got = reg.blob_bytes("team/app", &d).await;
        assert!(got == src_blobs[&d], "blob {d} differs in the registry");
    }

    // skopeo inspect sees the same digest and layers.
    let out = skopeo(&["inspect", "--tls-verify=false", &dest]).await;
    let info: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["Digest"], digest.as_str(), "{info}");
    let layers: Vec<String> = mv["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(info["Layers"], json!(layers), "{info}");
    assert_eq!(info["Architecture"], "amd64");
    let raw = skopeo(&["inspect", "--raw", "--tls-verify=false", &dest]).await;
    assert!(
        raw.as_bytes() == manifest.as_slice(),
        "inspect --raw differs"
    );

    // Copy back into a fresh layout and compare byte for byte.
    let back = tmp.path().join("back");
    skopeo(&[
        "copy",
        "--preserve-digests",
        "--src-tls-verify=false",
        &dest,
        &format!("oci:{}:1.0", back.display()),
    ])
    .await;
    let r = layout_ref(&back, "1.0");
    assert_eq!(r["digest"], digest.as_str(), "copied-back manifest digest");
    let back_blobs = layout_blobs(&back);
    for (d, bytes) in &src_blobs {
        let got = back_blobs
            .get(d)
            .unwrap_or_else(|| panic!("blob {d} missing after the round trip"));
        assert!(got == bytes, "blob {d} differs after the round trip");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_copy_without_preserve_digests_roundtrips_layers() {
    if !skopeo_available() {
        return;
    }
    let reg = Registry::start_with(Options::new().env("BERTH_LOG", "warn")).await;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let mut layout = Layout::new(&src);
    let manifest = layout.add_image(fresh_seed(), &[mib(21), mib(22), mib(25), mib(29)], "amd64");
    layout.tag("1.0", OCI_MANIFEST, &manifest);
    let host = reg.host_port();
    let dest = format!("docker://{host}/team/app-plain:1.0");

    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:1.0", src.display()),
        &dest,
    ])
    .await;

    // Whatever skopeo pushed is consistent: the manifest's digest header matches its
    // bytes and every blob it references is stored and matches its digest.
    let r = reg.get("/v2/team/app-plain/manifests/1.0").await;
    assert_eq!(r.status, 200, "{}", r.describe());
    let pushed_digest = sha256_digest(&r.body);
    assert_eq!(r.digest_header().as_deref(), Some(pushed_digest.as_str()));
    let pushed: Value = r.json();
    let mut registry_blobs = BTreeMap::new();
    for d in manifest_blobs(&pushed) {
        let bytes = reg.blob_bytes("team/app-plain", &d).await;
        assert_eq!(
            sha256_digest(&bytes),
            d,
            "registry blob {d} does not match its digest"
        );
        registry_blobs.insert(d, bytes);
    }
    // Already-compressed layers are pushed unchanged.
    let src_blobs = layout_blobs(&src);
    let orig: Value = serde_json::from_slice(&manifest).unwrap();
    for l in orig["layers"].as_array().unwrap() {
        let d = l["digest"].as_str().unwrap();
        assert!(
            registry_blobs.get(d) == src_blobs.get(d),
            "layer {d} not stored unchanged"
        );
    }

    let out = skopeo(&["inspect", "--tls-verify=false", &dest]).await;
    let info: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["Digest"], pushed_digest.as_str(), "{info}");

    let back = tmp.path().join("back");
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &dest,
        &format!("oci:{}:1.0", back.display()),
    ])
    .await;
    let back_ref = layout_ref(&back, "1.0");
    let back_blobs = layout_blobs(&back);
    let back_manifest: Value =
        serde_json::from_slice(&back_blobs[back_ref["digest"].as_str().unwrap()]).unwrap();
    for d in manifest_blobs(&back_manifest) {
        let got = &back_blobs[&d];
        assert!(
            registry_blobs.get(&d) == Some(got),
            "copied-back blob {d} differs from the registry's"
        );
    }
    // And the layer payloads equal the originals.
    for l in orig["layers"].as_array().unwrap() {
        let d = l["digest"].as_str().unwrap();
        assert!(
            back_blobs.get(d) == src_blobs.get(d),
            "layer {d} changed in the round trip"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_copy_all_roundtrips_a_multi_platform_index() {
    if !skopeo_available() {
        return;
    }
    let reg = Registry::start_with(Options::new().env("BERTH_LOG", "warn")).await;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let mut layout = Layout::new(&src);
    let amd = layout.add_image(fresh_seed(), &[mib(3), mib(2)], "amd64");
    let arm = layout.add_image(fresh_seed(), &[mib(4), mib(1)], "arm64");
    let mut d_amd = descriptor(OCI_MANIFEST, &amd);
    d_amd["platform"] = json!({"architecture": "amd64", "os": "linux"});
    let mut d_arm = descriptor(OCI_MANIFEST, &arm);
    d_arm["platform"] = json!({"architecture": "arm64", "os": "linux", "variant": "v8"});
    let index = index_json(OCI_INDEX, vec![d_amd, d_arm], json!({}));
    layout.add_blob(&index);
    layout.tag("multi", OCI_INDEX, &index);
    let index_digest = sha256_digest(&index);
    let host = reg.host_port();
    let dest = format!("docker://{host}/team/multi:1.0");

    skopeo(&[
        "copy",
        "--all",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &format!("oci:{}:multi", src.display()),
        &dest,
    ])
    .await;

    let r = reg.get("/v2/team/multi/manifests/1.0").await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert!(r.body == index, "index bytes changed");
    assert_eq!(r.header("content-type").as_deref(), Some(OCI_INDEX));
    for m in [&amd, &arm] {
        let r = reg
            .get(&format!("/v2/team/multi/manifests/{}", sha256_digest(m)))
            .await;
        assert_eq!(r.status, 200);
        assert!(r.body == *m);
    }

    let raw = skopeo(&["inspect", "--raw", "--tls-verify=false", &dest]).await;
    assert!(
        raw.as_bytes() == index.as_slice(),
        "inspect --raw of the index"
    );
    let out = skopeo(&[
        "inspect",
        "--tls-verify=false",
        "--override-arch",
        "arm64",
        "--override-os",
        "linux",
        &dest,
    ])
    .await;
    let info: Value = serde_json::from_str(&out).unwrap();
    // `Digest` is that of the top-level index; the rest describes the arm64 image.
    assert_eq!(info["Digest"], index_digest.as_str(), "{info}");
    assert_eq!(info["Architecture"], "arm64", "{info}");
    let arm_manifest: Value = serde_json::from_slice(&arm).unwrap();
    let arm_layers: Vec<Value> = arm_manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].clone())
        .collect();
    assert_eq!(info["Layers"], Value::Array(arm_layers), "{info}");

    let back = tmp.path().join("back");
    skopeo(&[
        "copy",
        "--all",
        "--preserve-digests",
        "--src-tls-verify=false",
        &dest,
        &format!("oci:{}:multi", back.display()),
    ])
    .await;
    assert_eq!(layout_ref(&back, "multi")["digest"], index_digest.as_str());
    let src_blobs = layout_blobs(&src);
    let back_blobs = layout_blobs(&back);
    for (d, bytes) in &src_blobs {
        let got = back_blobs
            .get(d)
            .unwrap_or_else(|| panic!("blob {d} missing after the --all round trip"));
        assert!(got == bytes, "blob {d} differs after the --all round trip");
    }
}

#[test]
fn gzip_stored_and_tar_helpers_are_well_formed() {
    // crc32 check value from the standard.
    assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    let gz = gzip_stored(b"");
    assert_eq!(&gz[..2], &[0x1f, 0x8b]);
    let tar = tar_with_file("f", b"hello");
    assert_eq!(tar.len() % 512, 0);
    assert_eq!(&tar[257..262], b"ustar");
}

/// skopeo pulls a multi-layer image and a multi-platform index through the
/// pull-through cache, by tag and by digest, also after the upstream died.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_pulls_through_the_cache_and_keeps_pulling_when_the_upstream_is_down() {
    if !skopeo_available() || !crate::upstream::distribution_available() {
        return;
    }
    let mut upstream = crate::upstream::Distribution::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let mut layout = Layout::new(&src);
    let single = layout.add_image(fresh_seed(), &[mib(2), mib(1), 70_000], "amd64");
    layout.tag("single", OCI_MANIFEST, &single);
    let amd = layout.add_image(fresh_seed(), &[mib(1), 90_000], "amd64");
    let arm = layout.add_image(fresh_seed(), &[mib(1), 50_000], "arm64");
    let mut d_amd = descriptor(OCI_MANIFEST, &amd);
    d_amd["platform"] = json!({"architecture": "amd64", "os": "linux"});
    let mut d_arm = descriptor(OCI_MANIFEST, &arm);
    d_arm["platform"] = json!({"architecture": "arm64", "os": "linux"});
    let index = index_json(OCI_INDEX, vec![d_amd, d_arm], json!({}));
    layout.add_blob(&index);
    layout.tag("multi", OCI_INDEX, &index);
    let up = upstream.url().trim_start_matches("http://").to_string();
    for (tag, all) in [("single", false), ("multi", true)] {
        let from = format!("oci:{}:{tag}", src.display());
        let to = format!("docker://{up}/library/{tag}:1");
        let mut args = vec!["copy", "--preserve-digests", "--dest-tls-verify=false"];
        if all {
            args.push("--all");
        }
        args.extend([from.as_str(), to.as_str()]);
        skopeo(&args).await;
    }
    let originals = layout_blobs(&src);

    let reg = Registry::start_with(
        Options::new()
            .env("BERTH_LOG", "warn")
            .flag("--upstream", format!("docker.io={}", upstream.url()))
            .flag("--cache-tag-ttl-secs", 1),
    )
    .await;
    let host = reg.host_port();
    let originals = &originals;
    let pull = |reference: String, all: bool, name: &str| {
        let dir = tmp.path().join(name);
        async move { pull_to_layout(&reference, all, &dir, originals).await }
    };
    let single_digest = sha256_digest(&single);
    let index_digest = sha256_digest(&index);
    for round in 0..2 {
        let got = pull(
            format!("docker://{host}/docker.io/library/single:1"),
            false,
            &format!("a{round}"),
        )
        .await;
        assert!(
            got.contains_key(&single_digest),
            "the image's manifest is pulled unchanged"
        );
        pull(
            format!("docker://{host}/docker.io/library/single@{single_digest}"),
            false,
            &format!("b{round}"),
        )
        .await;
        let got = pull(
            format!("docker://{host}/docker.io/library/multi:1"),
            true,
            &format!("c{round}"),
        )
        .await;
        for d in [&index_digest, &sha256_digest(&amd), &sha256_digest(&arm)] {
            assert!(got.contains_key(d), "{d} pulled with --all");
        }
        let manifests = [
            single_digest.clone(),
            index_digest.clone(),
            sha256_digest(&amd),
            sha256_digest(&arm),
        ];
        let single_manifest: serde_json::Value = serde_json::from_slice(&single).unwrap();
        let of_single: Vec<String> = std::iter::once(&single_manifest["config"])
            .chain(single_manifest["layers"].as_array().unwrap())
            .map(|d| d["digest"].as_str().unwrap().to_string())
            .collect();
        for (digest, bytes) in originals.iter().filter(|(d, _)| !manifests.contains(d)) {
            // Every blob of the layout came through the cache intact, each
            // from the repository whose image holds it.
            let repo = if of_single.contains(digest) {
                "single"
            } else {
                "multi"
            };
            let r = reg
                .get(&format!("/v2/docker.io/library/{repo}/blobs/{digest}"))
                .await;
            assert_eq!(r.status, 200, "{digest}: {}", truncate(&r.describe(), 300));
            assert!(r.body == *bytes);
        }
        pull(
            format!("docker://{host}/docker.io/library/multi@{index_digest}"),
            true,
            &format!("d{round}"),
        )
        .await;
        if round == 0 {
            // The second round runs with the upstream dead and the tag TTL
            // passed: all from the cache.
            upstream.stop();
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
    }
}

/// Copies `reference` into a new layout at `dir` and checks every blob that
/// is one of `originals` byte for byte.
async fn pull_to_layout(
    reference: &str,
    all: bool,
    dir: &Path,
    originals: &BTreeMap<String, Vec<u8>>,
) -> BTreeMap<String, Vec<u8>> {
    let to = format!("oci:{}:x", dir.display());
    let mut args = vec!["copy", "--src-tls-verify=false"];
    if all {
        args.push("--all");
    }
    args.extend([reference, to.as_str()]);
    skopeo(&args).await;
    let blobs = layout_blobs(dir);
    for (digest, bytes) in &blobs {
        if let Some(original) = originals.get(digest) {
            assert!(
                original == bytes,
                "{digest} differs after a pull through the cache"
            );
        }
    }
    blobs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_cannot_move_an_immutable_tag() {
    if !skopeo_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("berth.toml");
    fs::write(
        &config,
        "[[immutable]]\nrepositories = [\"prod/**\"]\ntags = [\"v*\"]\n",
    )
    .unwrap();
    let reg = Registry::start_with(
        Options::new()
            .flag("--config", config.display())
            .env("BERTH_LOG", "warn"),
    )
    .await;
    let src = tmp.path().join("src");
    let mut layout = Layout::new(&src);
    let one = layout.add_image(fresh_seed(), &[4096], "amd64");
    layout.tag("one", OCI_MANIFEST, &one);
    let two = layout.add_image(fresh_seed(), &[4096], "amd64");
    layout.tag("two", OCI_MANIFEST, &two);
    let host = reg.host_port();
    let copy = |tag: &str| {
        let mut cmd = std::process::Command::new("skopeo");
        cmd.args([
            "--insecure-policy",
            "copy",
            "--retry-times=0",
            "--preserve-digests",
            "--dest-tls-verify=false",
            &format!("oci:{}:{tag}", src.display()),
            &format!("docker://{host}/prod/app:v1"),
        ]);
        cmd
    };
    let first = copy("one").output().unwrap();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let second = copy("two").output().unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        !second.status.success(),
        "moving an immutable tag succeeded"
    );
    assert!(stderr.contains("immutable"), "skopeo shows why: {stderr}");
    let r = reg.get("/v2/prod/app/manifests/v1").await;
    assert!(r.body == one, "the tag still points at the first image");
    // skopeo delete is refused too.
    let out = std::process::Command::new("skopeo")
        .args([
            "delete",
            "--tls-verify=false",
            &format!("docker://{host}/prod/app:v1"),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(reg.get("/v2/prod/app/manifests/v1").await.status, 200);
}
