//! Tag history, restore and undelete across regions: history holds the
//! values written in every region, and a restore or an undelete in one
//! region replicates like a push.

use super::*;

async fn post(reg: &Registry, path: &str) {
    let r = send(reg.req(reqwest::Method::POST, path)).await;
    assert_eq!(r.status, 200, "POST {path}: {}", r.describe());
}

#[tokio::test]
async fn a_restore_and_an_undelete_in_one_region_reach_every_region() {
    let regions = Regions::start(&["eu", "us"]).await;
    let (eu, us) = (&regions.regs[0], &regions.regs[1]);
    let seed = fresh_seed();
    let first = Image::oci(seed, 2, 2_000);
    let second = Image::oci(seed + 1, 1, 2_000);
    first.push(eu, "team/app", Some("v1")).await;
    regions.converge(Duration::from_secs(30)).await;
    second.push(us, "team/app", Some("v1")).await;
    regions.converge(Duration::from_secs(30)).await;

    // Both regions' writes are in both regions' history.
    for reg in [eu, us] {
        let r = reg
            .get("/berth/v1/tags/history?repository=team/app&tag=v1")
            .await;
        assert_eq!(r.status, 200, "{}", r.describe());
        let history = r.json();
        let written: Vec<(String, String)> = history["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["region"].as_str().unwrap().to_string(),
                    e["digest"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(
            written,
            [
                ("eu".to_string(), first.digest.clone()),
                ("us".to_string(), second.digest.clone())
            ],
            "{history:#}"
        );
    }

    // Restored in eu: the tag moves back in us too.
    post(
        eu,
        &format!(
            "/berth/v1/tags/restore?repository=team/app&tag=v1&digest={}",
            first.digest
        ),
    )
    .await;
    regions.converge(Duration::from_secs(30)).await;
    assert_eq!(
        tag_digest(us, "team/app", "v1").await,
        Some(first.digest.clone())
    );

    // Deleted in eu: gone everywhere. Undeleted in eu: back everywhere,
    // byte-identical, with its tag.
    let r = eu
        .delete(&format!("/v2/team/app/manifests/{}", first.digest))
        .await;
    assert_eq!(r.status, 202, "{}", r.describe());
    regions.converge(Duration::from_secs(30)).await;
    let r = local_get(us, &format!("/v2/team/app/manifests/{}", first.digest)).await;
    assert_eq!(r.status, 404, "{}", r.describe());
    post(
        eu,
        &format!(
            "/berth/v1/undelete?repository=team/app&reference={}",
            first.digest
        ),
    )
    .await;
    regions.converge(Duration::from_secs(30)).await;
    for reg in [eu, us] {
        expect_local_image(reg, "team/app", "v1", &first).await;
        expect_local_image(reg, "team/app", &first.digest, &first).await;
    }
    // The second image stays pullable by digest in both.
    for reg in [eu, us] {
        expect_local_image(reg, "team/app", &second.digest, &second).await;
    }
}
