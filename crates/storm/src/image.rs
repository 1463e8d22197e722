//! The storm's image, generated from a seed: the same seed gives the same
//! bytes on the pushing and on the pulling side, so the pull knows every
//! blob's content without downloading it first.
//!
//! It is an OCI index of two platforms (`linux/amd64`, `linux/arm64`); the
//! hosts pull `linux/amd64`. Layers are pseudo-random, so nothing on the way
//! can compress them.

use std::collections::HashMap;

use bytes::Bytes;
use serde_json::json;
use sha2::Digest as _;

pub const INDEX_TYPE: &str = "application/vnd.oci.image.index.v1+json";
pub const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// What a downloaded blob must be: its length and the XXH3-128 of the bytes
/// whose SHA-256 is its digest (checked once, here, when the image was
/// generated). Comparing a download with it proves the same as hashing the
/// download with SHA-256, at a tenth of the cost, which keeps the load
/// generator cheaper than the server it measures.
#[derive(Clone, Copy, Debug)]
pub struct Expected {
    pub size: u64,
    pub xxh3: u128,
}

pub struct Blob {
    pub digest: String,
    pub bytes: Bytes,
}

pub struct Image {
    /// Config and layers of both platforms, in push order.
    pub blobs: Vec<Blob>,
    /// Platform manifests: (digest, bytes).
    pub manifests: Vec<(String, Bytes)>,
    pub index: (String, Bytes),
    /// The platform manifest the hosts pull.
    pub pulled: String,
    /// Every blob and manifest by digest.
    pub expected: HashMap<String, Expected>,
    /// Bytes one host downloads (both manifests, config, layers).
    pub pull_bytes: u64,
}

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// splitmix64: fast and well mixed, which is all pseudo-random layers need.
fn fill(seed: u64, len: usize) -> Bytes {
    let mut state = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

/// Parses sizes like `28M`, `512K`, `1G` or plain bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("not a size: {s:?}"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size too large: {s:?}"))
}

fn descriptor(media_type: &str, digest: &str, size: usize) -> serde_json::Value {
    json!({ "mediaType": media_type, "digest": digest, "size": size })
}

impl Image {
    pub fn generate(seed: u64, layer_sizes: &[u64]) -> Image {
        let mut blobs = Vec::new();
        let mut manifests = Vec::new();
        let mut platform_entries = Vec::new();
        for (p, arch) in ["amd64", "arm64"].into_iter().enumerate() {
            let mut layers = Vec::new();
            for (i, &size) in layer_sizes.iter().enumerate() {
                // The arm64 platform carries only the smallest layer of its
                // own: pushing the image stays cheap, the index stays real.
                if p == 1 && i + 1 < layer_sizes.len() {
                    continue;
                }
                let bytes = fill(seed ^ (((p as u64) << 32) | (i as u64 + 1)), size as usize);
                let digest = sha256(&bytes);
                layers.push(descriptor(LAYER_TYPE, &digest, bytes.len()));
                blobs.push(Blob { digest, bytes });
            }
            let diff_ids: Vec<_> = layers.iter().map(|l| l["digest"].clone()).collect();
            let config = Bytes::from(
                serde_json::to_vec(&json!({
                    "architecture": arch,
                    "os": "linux",
                    "config": { "Cmd": ["/bin/true"], "Labels": { "storm.seed": seed.to_string() } },
                    "rootfs": { "type": "layers", "diff_ids": diff_ids },
                }))
                .unwrap_or_default(),
            );
            let config_digest = sha256(&config);
            let manifest = Bytes::from(
                serde_json::to_vec(&json!({
                    "schemaVersion": 2,
                    "mediaType": MANIFEST_TYPE,
                    "config": descriptor(CONFIG_TYPE, &config_digest, config.len()),
                    "layers": layers,
                }))
                .unwrap_or_default(),
            );
            blobs.insert(
                blobs.len() - layers.len(),
                Blob {
                    digest: config_digest,
                    bytes: config,
                },
            );
            let manifest_digest = sha256(&manifest);
            let mut entry = descriptor(MANIFEST_TYPE, &manifest_digest, manifest.len());
            entry["platform"] = json!({ "architecture": arch, "os": "linux" });
            platform_entries.push(entry);
            manifests.push((manifest_digest, manifest));
        }
        let index = Bytes::from(
            serde_json::to_vec(&json!({
                "schemaVersion": 2,
                "mediaType": INDEX_TYPE,
                "manifests": platform_entries,
            }))
            .unwrap_or_default(),
        );
        let index = (sha256(&index), index);
        let mut expected = HashMap::new();
        let checksum = |bytes: &Bytes| Expected {
            size: bytes.len() as u64,
            xxh3: xxhash_rust::xxh3::xxh3_128(bytes),
        };
        for blob in &blobs {
            expected.insert(blob.digest.clone(), checksum(&blob.bytes));
        }
        for (digest, bytes) in manifests.iter().chain(std::iter::once(&index)) {
            expected.insert(digest.clone(), checksum(bytes));
        }
        let pulled = manifests[0].0.clone();
        let pull_bytes = index.1.len() as u64
            + manifests[0].1.len() as u64
            + blobs
                .iter()
                .take(layer_sizes.len() + 1)
                .map(|b| b.bytes.len() as u64)
                .sum::<u64>();
        Image {
            blobs,
            manifests,
            index,
            pulled,
            expected,
            pull_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_image_and_another_seed_another() {
        let a = Image::generate(7, &[4096, 1000]);
        let b = Image::generate(7, &[4096, 1000]);
        let c = Image::generate(8, &[4096, 1000]);
        assert_eq!(a.index.0, b.index.0);
        assert_ne!(a.index.0, c.index.0);
        // amd64: config + 2 layers; arm64: config + its own last layer.
        assert_eq!(a.blobs.len(), 5);
        assert_eq!(
            a.pull_bytes,
            (a.index.1.len() + a.manifests[0].1.len()) as u64
                + a.blobs[..3]
                    .iter()
                    .map(|b| b.bytes.len() as u64)
                    .sum::<u64>()
        );
        for blob in &a.blobs {
            assert_eq!(sha256(&blob.bytes), blob.digest);
        }
        let m: serde_json::Value = serde_json::from_slice(&a.manifests[0].1).unwrap();
        assert_eq!(m["config"]["digest"], a.blobs[0].digest.as_str());
        assert_eq!(m["layers"][1]["digest"], a.blobs[2].digest.as_str());
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("512K"), Ok(512 * 1024));
        assert_eq!(parse_size("28M"), Ok(28 << 20));
        assert_eq!(parse_size("100"), Ok(100));
        assert!(parse_size("x").is_err());
    }
}
