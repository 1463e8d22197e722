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
