//! Building manifests and images; waiting; process and engine helpers.

use super::*;

pub fn descriptor(media_type: &str, bytes: &[u8]) -> Value {
    json!({
        "mediaType": media_type,
        "digest": sha256_digest(bytes),
        "size": bytes.len(),
    })
}

/// Merges the keys of `extra` (an object) into `base` (an object).
pub fn merge(mut base: Value, extra: Value) -> Value {
    if let (Some(b), Value::Object(e)) = (base.as_object_mut(), extra) {
        for (k, v) in e {
            b.insert(k, v);
        }
    }
    base
}

pub fn to_bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec_pretty(v).unwrap()
}

/// An index (OCI or Docker list) over the given manifest descriptors.
pub fn index_json(media_type: &str, manifests: Vec<Value>, extra: Value) -> Vec<u8> {
    let v = json!({
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": manifests,
    });
    to_bytes(&merge(v, extra))
}

#[derive(Clone, Debug)]
pub struct Image {
    pub media_type: String,
    pub config_media_type: String,
    pub config: Vec<u8>,
    pub layer_media_type: String,
    pub layers: Vec<Vec<u8>>,
    pub manifest: Vec<u8>,
    pub digest: String,
}

impl Image {
    /// An OCI image with `n_layers` random layers of `layer_size` bytes.
    pub fn oci(seed: u64, n_layers: usize, layer_size: usize) -> Image {
        Self::build(
            seed,
            n_layers,
            layer_size,
            OCI_MANIFEST,
            OCI_CONFIG,
            OCI_LAYER_GZIP,
            json!({}),
        )
    }

    /// Like [`Image::oci`] with extra top-level manifest fields (subject, annotations, ...).
    pub fn oci_with(seed: u64, n_layers: usize, layer_size: usize, extra: Value) -> Image {
        Self::build(
            seed,
            n_layers,
            layer_size,
            OCI_MANIFEST,
            OCI_CONFIG,
            OCI_LAYER_GZIP,
            extra,
        )
    }

    pub fn docker(seed: u64, n_layers: usize, layer_size: usize) -> Image {
        Self::build(
            seed,
            n_layers,
            layer_size,
            DOCKER_MANIFEST,
            DOCKER_CONFIG,
            DOCKER_LAYER,
            json!({}),
        )
    }

    pub fn build(
        seed: u64,
        n_layers: usize,
        layer_size: usize,
        media_type: &str,
        config_media_type: &str,
        layer_media_type: &str,
        extra: Value,
    ) -> Image {
        let layers: Vec<Vec<u8>> = (0..n_layers)
            .map(|i| random_bytes(seed.wrapping_add(i as u64 + 1), layer_size))
            .collect();
        let diff_ids: Vec<String> = layers.iter().map(|l| sha256_digest(l)).collect();
        let config = to_bytes(&json!({
            "architecture": "amd64",
            "os": "linux",
            "config": { "Labels": { "berth.test.seed": seed.to_string() } },
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
        }));
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": descriptor(config_media_type, &config),
            "layers": layers.iter().map(|l| descriptor(layer_media_type, l)).collect::<Vec<_>>(),
        });
        let manifest = to_bytes(&merge(manifest, extra));
        let digest = sha256_digest(&manifest);
        Image {
            media_type: media_type.to_string(),
            config_media_type: config_media_type.to_string(),
            config,
            layer_media_type: layer_media_type.to_string(),
            layers,
            manifest,
            digest,
        }
    }

    pub fn descriptor(&self) -> Value {
        json!({
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.manifest.len(),
        })
    }

    pub fn blobs(&self) -> Vec<&[u8]> {
        let mut v: Vec<&[u8]> = vec![&self.config];
        v.extend(self.layers.iter().map(|l| l.as_slice()));
        v
    }

    pub async fn push_blobs(&self, reg: &Registry, repo: &str) {
        for b in self.blobs() {
            reg.push_blob(repo, b).await;
        }
    }

    /// Pushes all blobs and the manifest under `reference` (a tag, or the digest when None).
    pub async fn push(&self, reg: &Registry, repo: &str, reference: Option<&str>) -> String {
        self.push_blobs(reg, repo).await;
        let reference = reference.unwrap_or(&self.digest).to_string();
        reg.push_manifest(repo, &reference, &self.media_type, &self.manifest)
            .await
    }
}

/// An OCI index over a linux/amd64 image (2 layers) and a linux/arm64 one (3
/// layers): the index bytes and the two images.
pub fn two_platform_index(seed: u64) -> (Vec<u8>, Image, Image) {
    let amd = Image::oci(seed, 2, 40_000);
    let arm = Image::oci(seed + 100, 3, 30_000);
    let platform = |arch: &str| json!({"platform": {"os": "linux", "architecture": arch}});
    let index = index_json(
        OCI_INDEX,
        vec![
            merge(amd.descriptor(), platform("amd64")),
            merge(arm.descriptor(), platform("arm64")),
        ],
        json!({}),
    );
    (index, amd, arm)
}

/// An artifact manifest (OCI image manifest with `artifactType` and the empty config).
pub fn artifact_manifest(
    artifact_type: &str,
    blobs: &[(&str, &[u8])],
    subject: Option<Value>,
    annotations: Option<Value>,
) -> Vec<u8> {
    let mut v = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": { "mediaType": OCI_EMPTY, "digest": EMPTY_DIGEST, "size": 2 },
        "layers": blobs.iter().map(|(mt, b)| descriptor(mt, b)).collect::<Vec<_>>(),
    });
    if let Some(s) = subject {
        v["subject"] = s;
    }
    if let Some(a) = annotations {
        v["annotations"] = a;
    }
    to_bytes(&v)
}

/// Runs `f` until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads a `Vm*` field (in kB) from /proc/<pid>/status.
pub fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

/// With `BERTH_IT_ETCD=HOST:PORT`, every registry keeps its metadata in that
/// etcd, under a prefix of its own derived from its data directory (so a
/// restart on the same directory finds its metadata again). This is how the
/// whole suite runs against the etcd engine.
/// A name unique to one test registry, for etcd prefixes and S3 key prefixes.
pub(crate) fn unique_name(data_dir: &Path) -> String {
    data_dir
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect::<String>()
        .trim_matches('-')
        .to_string()
}

/// With `BERTH_IT_S3=FILE` (an `s3.env` written by `scripts/garage.py`), the
/// registry keeps its blobs in that bucket, under a prefix of its own.
pub fn s3_env() -> Vec<(String, String)> {
    let Ok(path) = std::env::var("BERTH_IT_S3") else {
        return Vec::new();
    };
    if path.is_empty() {
        return Vec::new();
    }
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("BERTH_IT_S3={path}: {e}"));
    text.lines()
        .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn s3_storage_args(data_dir: &Path) -> Vec<String> {
    if s3_env().is_empty() {
        return Vec::new();
    }
    vec![
        "--storage".to_string(),
        format!("s3://berth/berth-it/{}", unique_name(data_dir)),
    ]
}

/// Whether blobs are in S3 (tests that inspect blob files skip then).
pub fn blobs_in_s3() -> bool {
    !s3_env().is_empty()
}

pub fn etcd_metadata_args(data_dir: &Path) -> Vec<String> {
    match std::env::var("BERTH_IT_ETCD") {
        Ok(endpoint) if !endpoint.is_empty() => {
            let unique = unique_name(data_dir);
            vec![
                "--metadata".to_string(),
                format!("etcd://{endpoint}/berth-it/{unique}"),
            ]
        }
        _ => Vec::new(),
    }
}
