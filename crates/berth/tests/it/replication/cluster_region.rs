//! Geo-replication into a region that is a cluster of nodes on etcd and S3.

use std::time::Duration;

use super::*;

/// Region eu as 3 nodes of one cluster (one data directory, so one etcd
/// prefix and bucket prefix), region us a single node that tails eu through
/// eu's second node. The directory lives as long as the returned guard.
async fn start_eu_cluster_and_us() -> (tempfile::TempDir, Vec<Registry>, Registry) {
    let names = vec!["eu".to_string(), "us".to_string()];
    let eu_ports = [free_port(), free_port(), free_port()];
    let us_port = free_port();
    let shared = tempfile::tempdir().unwrap();
    let eu_dir = shared.path().join("eu");
    let mut eu_nodes = Vec::new();
    for port in eu_ports {
        eu_nodes.push(
            Registry::start_with(
                region_options(&names, &[port, us_port], 0)
                    .data_dir(&eu_dir)
                    .flag("--node-name", format!("eu-{port}")),
            )
            .await,
        );
    }
    let us = Registry::start_with(region_options(&names, &[eu_ports[1], us_port], 1)).await;
    (shared, eu_nodes, us)
}

/// Region eu as a 3-node cluster (etcd metadata, S3 blobs; the second pass
/// of `scripts/test`), region us a single node. Replication into eu runs on
/// one eu node; killing eu nodes moves it to the one left.
#[tokio::test]
async fn a_cluster_region_replicates_and_survives_losing_nodes() {
    if std::env::var_os("BERTH_IT_ETCD").is_none() || !blobs_in_s3() {
        eprintln!("SKIPPED: needs the cluster engines (BERTH_IT_ETCD and BERTH_IT_S3)");
        return;
    }
    let (_shared, mut eu_nodes, us) = start_eu_cluster_and_us().await;
    let seed = fresh_seed();
    let from_eu = Image::oci(seed, 2, 100_000);
    from_eu.push(&eu_nodes[0], "team/app", Some("1")).await;
    // At once from us, read through eu's second node.
    let r = us.get("/v2/team/app/manifests/1").await;
    assert_eq!(r.status, 200, "{}", r.describe());
    let synced = |a: &Registry, b: &Registry| {
        let (a, b) = (a.url(), b.url());
        async move {
            let client = berth_client();
            let get = |u: String| {
                let client = client.clone();
                async move {
                    client
                        .get(format!("{u}/berth/v1/replication/state"))
                        .send()
                        .await
                        .ok()?
                        .bytes()
                        .await
                        .ok()
                        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                }
            };
            let (x, y) = (get(a).await, get(b).await);
            x.is_some() && x == y
        }
    };
    assert!(eventually(Duration::from_secs(30), || synced(&eu_nodes[1], &us)).await);
    expect_local_image(&us, "team/app", "1", &from_eu).await;

    // Kill the eu node that replicates from us (the holder of its lease,
    // as its log says) and one more: the node left takes the work over.
    let leads = |node: &Registry| {
        node.log()
            .lines()
            .rfind(|l| l.contains("job=\"replication-us\""))
            .is_some_and(|l| l.contains("leading=true"))
    };
    assert!(
        eventually(Duration::from_secs(15), || async {
            eu_nodes.iter().any(&leads)
        })
        .await,
        "no eu node leads replication from us: {}",
        eu_nodes[0].log_tail(30)
    );
    let leader = (0..3)
        .find(|&i| leads(&eu_nodes[i]))
        .expect("a leader was found");
    let survivor = (leader + 1) % 3;
    for (i, node) in eu_nodes.iter_mut().enumerate() {
        if i != survivor {
            node.kill9();
        }
    }
    let from_us = Image::oci(seed + 1, 2, 100_000);
    from_us.push(&us, "team/app", Some("2")).await;
    let caught_up = eventually(Duration::from_secs(45), || async {
        local_get(&eu_nodes[survivor], "/v2/team/app/manifests/2")
            .await
            .status
            == 200
    })
    .await;
    assert!(
        caught_up,
        "eu's remaining node did not take replication over: {}",
        eu_nodes[survivor].log_tail(30)
    );
    assert!(
        leads(&eu_nodes[survivor]),
        "the survivor now holds the lease"
    );
    expect_local_image(&eu_nodes[survivor], "team/app", "2", &from_us).await;
}

/// Figures (`scripts/replication-figures`): the lag of geo-replication out of
/// a 3-node cluster region, for writes made on a node other than the one the
/// peer reads the change feed from. That node learns of them from its watch
/// of the log head in etcd; before that watch it polled every 250 ms.
#[tokio::test]
async fn cluster_region_lag_figures() {
    let Ok(report) = std::env::var("BERTH_REPL_REPORT") else {
        eprintln!("SKIPPED: set BERTH_REPL_REPORT=FILE (scripts/replication-figures)");
        return;
    };
    if std::env::var_os("BERTH_IT_ETCD").is_none() || !blobs_in_s3() {
        eprintln!("SKIPPED: needs the cluster engines (BERTH_IT_ETCD and BERTH_IT_S3)");
        return;
    }
    // us reads eu's feed from eu's second node; pushes go to the others.
    let (_shared, eu_nodes, us) = start_eu_cluster_and_us().await;
    let seed = fresh_seed();
    let samples = 200u64;
    let mut lags = Vec::new();
    for i in 0..samples {
        let image = Image::oci(seed + i, 1, 4_096);
        let node = &eu_nodes[if i % 2 == 0 { 0 } else { 2 }];
        image
            .push(node, "lag/cluster", Some(&format!("v{i}")))
            .await;
        let pushed = Instant::now();
        loop {
            if local_get(&us, &format!("/v2/lag/cluster/manifests/v{i}"))
                .await
                .status
                == 200
            {
                break;
            }
            assert!(pushed.elapsed() < Duration::from_secs(30), "not replicated");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        lags.push(pushed.elapsed().as_secs_f64() * 1000.0);
    }
    lags.sort_by(f64::total_cmp);
    let table = format!(
        "| measure (eu: 3 nodes on etcd + Garage; push on a node other than the one us reads from) | value |\n|---|---:|\n| small-image lag p50 (push acknowledged in eu → manifest in us's own storage) | {:.1} ms |\n| lag p90 | {:.1} ms |\n| lag p99 | {:.1} ms |\n| lag max | {:.1} ms |\n| samples | {samples} |\n",
        percentile(&lags, 0.5),
        percentile(&lags, 0.9),
        percentile(&lags, 0.99),
        lags[lags.len() - 1],
    );
    write_figures(&report, "cluster-figures", &table);
}
