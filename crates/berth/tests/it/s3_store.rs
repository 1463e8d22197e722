//! The storage suite that every blob engine must pass, run against a real
//! S3 server (Garage) when the cluster-engine pass provides one.

use berth_store::{S3BlobStore, S3Options};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_passes_the_blobstore_suite() {
    let vars = s3_env();
    if vars.is_empty() {
        eprintln!("skipping: BERTH_IT_S3 is not set");
        return;
    }
    let mut options = S3Options::new("berth");
    options.prefix = format!("suite-{}", fresh_seed());
    let store = S3BlobStore::from_vars(options, vars).expect("S3 store");
    berth_store::testsuite::blobstore_suite(&store).await;
}

/// With `--storage-redirect-secs`, a blob GET answers 307 to a pre-signed
/// URL that serves exactly the blob; HEAD and manifests are unaffected.
#[tokio::test]
async fn s3_blob_gets_can_redirect_to_presigned_urls() {
    if !blobs_in_s3() {
        eprintln!("skipping: BERTH_IT_S3 is not set");
        return;
    }
    let reg = Registry::start_with(Options::new().flag("--storage-redirect-secs", 60)).await;
    let data = random_bytes(fresh_seed(), 300_000);
    let digest = reg.push_blob("s3/redirect", &data).await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = client
        .get(format!("{}/v2/s3/redirect/blobs/{digest}", reg.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 307);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    assert!(location.contains("X-Amz-Signature"), "{location}");
    let fetched = client.get(&location).send().await.unwrap();
    assert_eq!(fetched.status(), 200);
    assert_eq!(fetched.bytes().await.unwrap().as_ref(), &data[..]);
    // Not visible in another repository: no redirect, no leak.
    let other = reg.get(&format!("/v2/s3/other/blobs/{digest}")).await;
    expect_error(&other, 404, &["BLOB_UNKNOWN"]);
    let head = reg.head(&format!("/v2/s3/redirect/blobs/{digest}")).await;
    assert_eq!(head.status, 200);
}
