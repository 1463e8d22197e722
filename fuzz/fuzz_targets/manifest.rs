//! Manifests and indexes, under every media type a client may claim.
#![no_main]

use libfuzzer_sys::fuzz_target;

const TYPES: [Option<&str>; 7] = [
    None,
    Some("application/vnd.oci.image.manifest.v1+json"),
    Some("application/vnd.oci.image.index.v1+json"),
    Some("application/vnd.docker.distribution.manifest.v2+json"),
    Some("application/vnd.docker.distribution.manifest.list.v2+json"),
    Some("application/json"),
    Some("text/plain; charset=utf-8"),
];

fuzz_target!(|data: &[u8]| {
    let Some((selector, body)) = data.split_first() else { return };
    let content_type = TYPES[*selector as usize % TYPES.len()];
    if let Ok(manifest) = berth_oci::Manifest::parse(content_type, body) {
        let _ = manifest.required_blobs().map(|d| d.is_foreign()).count();
        let _ = manifest.children().len();
        let _ = manifest.referrer_artifact_type();
    }
});
