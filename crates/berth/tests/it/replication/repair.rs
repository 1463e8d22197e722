//! `berth scrub --repair` heals a blob lost in one region from a peer
//! region that has it, verified, while both serve.

use std::time::Duration;

use super::*;
use crate::scrub::{lose_blob, repaired};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_lost_in_one_region_is_repaired_from_a_peer() {
    let regions = Regions::start(&["eu", "us"]).await;
    let (eu, us) = (&regions.regs[0], &regions.regs[1]);
    let image = Image::oci(fresh_seed(), 2, 40_000);
    image.push(eu, "team/app", Some("v1")).await;
    regions.converge(Duration::from_secs(30)).await;
    let lost = sha256_digest(&image.layers[0]);
    lose_blob(us, &lost).await;
    let local = local_get(us, &format!("/v2/team/app/blobs/{lost}")).await;
    assert_ne!(local.status, 200, "the lost blob is still served locally");

    let out = berth_cli()
        .args(["scrub", "--repair", "--json", "--registry", &us.url()])
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no report ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    assert_eq!(repaired(&report), [(lost.clone(), "region eu".to_string())]);
    let local = local_get(us, &format!("/v2/team/app/blobs/{lost}")).await;
    assert_eq!(local.status, 200, "{}", local.describe());
    assert_eq!(sha256_digest(&local.body), lost);
}
