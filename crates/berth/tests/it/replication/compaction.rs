//! Bounded metadata across regions: the change log is compacted once every
//! live peer has applied it and the window passed; a peer kept away past the
//! window resynchronizes by itself and converges to the same state.

use std::time::Duration;

use serde_json::Value;

use super::*;

/// The window the regions here keep their log, tombstones and history,
/// and how far apart their clocks may be (both on one machine here).
const WINDOW_SECS: &str = "2";
const SKEW_SECS: &str = "1";

fn compact(reg: &Registry, dry_run: bool) -> Value {
    let mut cmd = berth_cli();
    cmd.args(["compact", "--json", "--registry", &reg.url()]);
    if dry_run {
        cmd.arg("--dry-run");
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "berth compact: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

async fn peer_status(reg: &Registry, peer: &str) -> Value {
    let r = reg.get("/berth/v1/replication/status").await;
    assert_eq!(r.status, 200, "{}", r.describe());
    r.json()["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["peer"] == peer)
        .cloned()
        .unwrap()
}

async fn delete_manifest(reg: &Registry, repo: &str, digest: &str) {
    let r = reg.delete(&format!("/v2/{repo}/manifests/{digest}")).await;
    assert_eq!(r.status, 202, "{}", r.describe());
}

#[tokio::test]
async fn a_peer_paused_past_the_compacted_window_resynchronizes_and_converges() {
    let regions = Regions::start_with_flags(
        &["eu", "us"],
        &[
            ("--log-retention-secs", WINDOW_SECS),
            ("--max-clock-skew-secs", SKEW_SECS),
            ("--compaction-interval-secs", "0"),
        ],
    )
    .await;
    let (eu, us) = (&regions.regs[0], &regions.regs[1]);
    let seed = fresh_seed();
    // Both regions hold these, written in eu, and one written in us.
    let gone = Image::oci(seed, 1, 3_000);
    let gone_digest = gone.push(eu, "team/gone", Some("v1")).await;
    let moved = Image::oci(seed + 1, 1, 3_000);
    moved.push(eu, "team/moved", Some("v1")).await;
    let untagged = Image::oci(seed + 2, 1, 3_000);
    untagged.push(eu, "team/untagged", Some("v1")).await;
    let us_made = Image::oci(seed + 7, 1, 3_000);
    us_made.push(us, "team/us-made", Some("v1")).await;
    regions.converge(Duration::from_secs(30)).await;

    // us stops reading eu; eu deletes (also what us wrote), moves and adds
    // while it is away.
    set_paused(us, "eu", true).await;
    delete_manifest(eu, "team/gone", &gone_digest).await;
    let moved_again = Image::oci(seed + 3, 1, 3_000);
    moved_again.push(eu, "team/moved", Some("v1")).await;
    let r = eu.delete("/v2/team/untagged/manifests/v1").await;
    assert_eq!(r.status, 202, "{}", r.describe());
    let r = eu.delete("/v2/team/us-made/manifests/v1").await;
    assert_eq!(r.status, 202, "{}", r.describe());
    let added = Image::oci(seed + 4, 2, 3_000);
    added.push(eu, "team/added", Some("v1")).await;
    // And us writes: eu, reading it live, must not need a resync.
    let from_us = Image::oci(seed + 5, 1, 3_000);
    from_us.push(us, "team/from-us", Some("v1")).await;

    // Past the window, us has not acknowledged eu's log for longer than
    // it: eu compacts all of it. The tombstones of eu's deletes stay until
    // us has applied them.
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let dry = compact(eu, true);
    assert!(dry["log_entries"].as_u64().unwrap() >= 5, "{dry:#}");
    let report = compact(eu, false);
    eprintln!("eu compacted: {report:#}");
    assert_eq!(report["log_entries"], dry["log_entries"], "{report:#}");
    assert!(report.get("acknowledged_through").is_none(), "{report:#}");
    assert_eq!(report["after"]["change_log"]["records"], 0, "{report:#}");
    // The manifest delete's and the two untags' (the tag the delete hid
    // keeps the tag's own older stamp, which us had applied).
    let pinned = report["after"]["tombstones"]["records"].as_u64().unwrap();
    assert!(pinned >= 3, "{report:#}");
    // team/moved:v1 had two values: the first goes, the current stays;
    // deleted tags' history goes.
    assert!(
        report["history_entries"].as_u64().unwrap() >= 3,
        "{report:#}"
    );
    let history = eu
        .get("/berth/v1/tags/history?repository=team/moved&tag=v1")
        .await;
    assert_eq!(history.status, 200, "{}", history.describe());
    assert_eq!(
        history.json()["history"].as_array().map(Vec::len),
        Some(1),
        "{}",
        history.describe()
    );
    // A reader that does not say who it is (an older berth) would not
    // notice the gap: it is told instead.
    let r = send(region_control(
        eu.req(reqwest::Method::GET, "/berth/v1/replication/feed?after=1"),
    ))
    .await;
    assert_eq!(r.status, 410, "{}", r.describe());
    // A second run finds nothing more.
    let again = compact(eu, false);
    assert_eq!(again["log_entries"], 0, "{again:#}");
    assert_eq!(again["history_entries"], 0, "{again:#}");

    // eu read us's log all along: what eu applied goes from us's log
    // without eu resynchronizing.
    let us_report = compact(us, false);
    assert!(
        us_report["log_entries"].as_u64().unwrap() >= 1,
        "{us_report:#}"
    );
    assert!(us_report["acknowledged_through"].as_u64().unwrap() >= 1);

    // us comes back: its cursor is behind eu's compacted log, so it
    // copies eu's state, deletes included, and the regions converge.
    set_paused(us, "eu", false).await;
    regions.converge(Duration::from_secs(60)).await;
    // The status is saved after the cursor: wait for it.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while peer_status(us, "eu").await["resyncs"] != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "{:#}",
            peer_status(us, "eu").await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(peer_status(eu, "us").await["resyncs"], 0);
    for reg in [eu, us] {
        expect_local_image(reg, "team/moved", "v1", &moved_again).await;
        expect_local_image(reg, "team/added", "v1", &added).await;
        expect_local_image(reg, "team/from-us", "v1", &from_us).await;
        let r = local_get(reg, &format!("/v2/team/gone/manifests/{gone_digest}")).await;
        assert_eq!(r.status, 404, "{}", r.describe());
        assert_eq!(tag_digest(reg, "team/gone", "v1").await, None);
        assert_eq!(tag_digest(reg, "team/untagged", "v1").await, None);
        assert_eq!(tag_digest(reg, "team/us-made", "v1").await, None);
    }
    // And replication goes on from the log after the resync.
    let later = Image::oci(seed + 6, 1, 3_000);
    later.push(eu, "team/later", Some("v1")).await;
    regions.converge(Duration::from_secs(30)).await;
    expect_local_image(us, "team/later", "v1", &later).await;
    assert_eq!(peer_status(us, "eu").await["resyncs"], 1);

    // Now that us has applied eu's deletes (and said so), and past the
    // window again, their tombstones go in both regions.
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    let report = compact(eu, false);
    assert!(
        report["tombstones"].as_u64().unwrap() >= pinned,
        "{report:#}"
    );
    assert_eq!(report["after"]["tombstones"]["records"], 0, "{report:#}");
    let report = compact(us, false);
    assert_eq!(report["after"]["tombstones"]["records"], 0, "{report:#}");
    assert_eq!(regions.converge(Duration::from_secs(30)).await.len(), 64);
}

/// What the metadata weighs per image and per tag before and after
/// compaction, written to `docs/lifecycle.md` by `scripts/metadata-figures`:
/// 200 tags in 20 repositories, each pushed 5 times (1,000 images), 40 of
/// them deleted, in eu with us replicating; compacted past the window.
#[tokio::test]
async fn metadata_figures() {
    let Ok(report) = std::env::var("BERTH_METADATA_REPORT") else {
        eprintln!("SKIPPED: set BERTH_METADATA_REPORT=FILE (scripts/metadata-figures)");
        return;
    };
    let regions = Regions::start_with_flags(
        &["eu", "us"],
        &[
            ("--log-retention-secs", WINDOW_SECS),
            ("--max-clock-skew-secs", SKEW_SECS),
            ("--compaction-interval-secs", "0"),
        ],
    )
    .await;
    let eu = &regions.regs[0];
    let seed = fresh_seed();
    let (repos, tags_per_repo, pushes) = (20u64, 10u64, 5u64);
    let mut images = 0u64;
    for round in 0..pushes {
        for r in 0..repos {
            for t in 0..tags_per_repo {
                let n = (round * repos + r) * tags_per_repo + t;
                Image::oci(seed + n, 1, 100)
                    .push(eu, &format!("fig/app{r}"), Some(&format!("v{t}")))
                    .await;
                images += 1;
            }
        }
    }
    let mut deleted = 0u64;
    for r in 0..repos {
        for t in 0..2 {
            let path = format!("/v2/fig/app{r}/manifests/v{t}");
            assert_eq!(eu.delete(&path).await.status, 202);
            deleted += 1;
        }
    }
    regions.converge(Duration::from_secs(120)).await;
    let tags = repos * tags_per_repo - deleted;
    let measured = compact(eu, true);
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let compacted = compact(eu, false);
    let kinds = [
        "change_log",
        "tombstones",
        "tag_history",
        "tags",
        "manifests",
    ];
    let mut table = String::from(
        "| metadata in eu | records before | bytes before | records after | bytes after |\n|---|---:|---:|---:|---:|\n",
    );
    let (mut total_before, mut total_after) = (0, 0);
    for kind in kinds {
        let b = &measured["before"][kind];
        let a = &compacted["after"][kind];
        total_before += b["bytes"].as_u64().unwrap();
        total_after += a["bytes"].as_u64().unwrap();
        table.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            kind.replace('_', " "),
            b["records"],
            b["bytes"],
            a["records"],
            a["bytes"]
        ));
    }
    table.push_str(&format!(
        "| **all of these, per image** ({images} images) | | {} | | {} |\n| **per tag** ({tags} tags) | | {} | | {} |\n",
        total_before / images,
        total_after / images,
        total_before / tags,
        total_after / tags,
    ));
    println!("{table}");
    let doc = std::fs::read_to_string(&report).unwrap_or_default();
    let (begin, end) = ("<!-- metadata:begin -->", "<!-- metadata:end -->");
    let doc = match (doc.find(begin), doc.find(end)) {
        (Some(b), Some(e)) => format!("{}{begin}\n{table}{}", &doc[..b], &doc[e..]),
        _ => format!("{doc}\n{begin}\n{table}{end}\n"),
    };
    std::fs::write(&report, doc).unwrap();
}

/// Three regions sharing one replication secret: each reader is known by
/// its own name (the secret alone names only the first peer holding it), so
/// the log is kept for both, up to what both have applied.
#[tokio::test]
async fn each_reader_acknowledges_as_itself_with_a_shared_secret() {
    let regions = Regions::start_with_flags(
        &["eu", "us", "ap"],
        &[
            ("--log-retention-secs", "10"),
            ("--compaction-interval-secs", "0"),
        ],
    )
    .await;
    let eu = &regions.regs[0];
    let seed = fresh_seed();
    for i in 0..3 {
        Image::oci(seed + i, 1, 2_000)
            .push(eu, "team/app", Some(&format!("v{i}")))
            .await;
    }
    regions.converge(Duration::from_secs(30)).await;
    // Both have asked for what follows v2 at least once since.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let report = compact(eu, true);
    let peers = report["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 2, "{report:#}");
    for peer in peers {
        assert_eq!(peer["live"], true, "{report:#}");
        assert_eq!(peer["seq"], 3, "{report:#}");
    }
    assert_eq!(report["acknowledged_through"], 3, "{report:#}");
}
