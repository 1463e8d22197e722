//! Geo-replication between regions: real `berth` processes on loopback, one
//! per region, full mesh.

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::support::*;

mod cluster_region;
mod compaction;
mod history;
mod repair;

const SECRET: &str = "replication-test-secret";

/// Regions started together, each knowing the others' addresses.
struct Regions {
    names: Vec<String>,
    regs: Vec<Registry>,
}

fn region_options(names: &[String], ports: &[u16], i: usize) -> Options {
    let mut options = Options::new()
        .port(ports[i])
        .flag("--region", &names[i])
        .flag("--replication-secret", SECRET);
    for (j, name) in names.iter().enumerate() {
        if j != i {
            options = options.flag(
                "--peer",
                format!("{name}={}://127.0.0.1:{}", scheme(), ports[j]),
            );
        }
    }
    options
}

impl Regions {
    async fn start(names: &[&str]) -> Regions {
        Regions::start_with_flags(names, &[]).await
    }

    /// Regions whose every node also gets `flags` (name, value).
    async fn start_with_flags(names: &[&str], flags: &[(&str, &str)]) -> Regions {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let ports: Vec<u16> = names.iter().map(|_| free_port()).collect();
        let mut regs = Vec::new();
        for i in 0..names.len() {
            let mut options = region_options(&names, &ports, i);
            for (name, value) in flags {
                options = options.flag(name, value);
            }
            regs.push(Registry::start_with(options).await);
        }
        Regions { names, regs }
    }

    async fn states(&self) -> Vec<String> {
        let mut out = Vec::new();
        for reg in &self.regs {
            out.push(state(reg).await);
        }
        out
    }

    /// Waits until every region reports the same state twice in a row.
    async fn converge(&self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut last = Vec::new();
        loop {
            let states = self.states().await;
            if states.iter().all(|s| s == &states[0]) && states == last {
                return states[0].clone();
            }
            if Instant::now() > deadline {
                let mut report = String::new();
                let mut all = Vec::new();
                for reg in &self.regs {
                    let r = reg
                        .get("/berth/v1/replication/state?lines=true")
                        .await
                        .json();
                    let lines: std::collections::BTreeSet<String> = r["lines"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|l| l.as_str().unwrap().to_string())
                        .collect();
                    all.push(lines);
                }
                for (i, lines) in all.iter().enumerate() {
                    let only: Vec<_> = lines.difference(&all[(i + 1) % all.len()]).collect();
                    report.push_str(&format!(
                        "{} has, {} lacks: {only:#?}\n",
                        self.names[i],
                        self.names[(i + 1) % all.len()]
                    ));
                }
                for (name, reg) in self.names.iter().zip(&self.regs) {
                    let status = reg.get("/berth/v1/replication/status").await.text();
                    report.push_str(&format!(
                        "{name}: {status}\n--- log ---\n{}\n",
                        reg.log_tail(20)
                    ));
                }
                panic!("regions did not converge: {states:?}\n{report}");
            }
            last = states;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A request that changes how a region serves: on an open registry it
/// carries the replication secret; with authentication (the secure pass)
/// the client's administrator credentials go instead, and the secret, a
/// peer's credential, would be refused.
fn region_control(rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    if secure_pass() {
        rb
    } else {
        rb.bearer_auth(SECRET)
    }
}

/// `berth replication ARGS` with the credential a region-control command
/// needs (see [`region_control`]).
fn control_command(args: &[&str]) -> std::process::Command {
    let mut cmd = berth_cli();
    cmd.args(args);
    if !secure_pass() {
        cmd.args(["--replication-secret", SECRET]);
    }
    cmd
}

/// Pauses or resumes, in `reg`'s region, replication from `peer`.
async fn set_paused(reg: &Registry, peer: &str, paused: bool) {
    let action = if paused { "pause" } else { "resume" };
    let r = send(region_control(reg.req(
        reqwest::Method::POST,
        &format!("/berth/v1/replication/peers/{peer}/{action}"),
    )))
    .await;
    assert_eq!(r.status, 200, "{}", r.describe());
}

impl Regions {
    /// Every region stops (or resumes) applying every other's changes.
    async fn isolate(&self, isolated: bool) {
        for (i, reg) in self.regs.iter().enumerate() {
            for (j, name) in self.names.iter().enumerate() {
                if i != j {
                    set_paused(reg, name, isolated).await;
                }
            }
        }
    }
}

async fn state(reg: &Registry) -> String {
    let r = reg.get("/berth/v1/replication/state").await;
    assert_eq!(r.status, 200, "{}", r.describe());
    r.json()["digest"].as_str().unwrap().to_string()
}

/// A GET that must be answered from this region's own storage.
async fn local_get(reg: &Registry, path: &str) -> Resp {
    send(
        reg.req(reqwest::Method::GET, path)
            .header("x-berth-local-only", "1")
            .header("accept", "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json"),
    )
    .await
}

async fn expect_local_image(reg: &Registry, repo: &str, reference: &str, image: &Image) {
    let r = local_get(reg, &format!("/v2/{repo}/manifests/{reference}")).await;
    assert_eq!(r.status, 200, "{repo}:{reference}: {}", r.describe());
    assert!(r.body.as_ref() == image.manifest.as_slice());
    for blob in image.blobs() {
        let r = local_get(reg, &format!("/v2/{repo}/blobs/{}", sha256_digest(blob))).await;
        assert_eq!(r.status, 200, "{}", r.describe());
        assert!(r.body.as_ref() == blob, "blob bytes");
    }
}

async fn tag_digest(reg: &Registry, repo: &str, tag: &str) -> Option<String> {
    let r = local_get(reg, &format!("/v2/{repo}/manifests/{tag}")).await;
    (r.status == 200).then(|| r.digest_header().unwrap())
}

#[tokio::test]
async fn a_push_in_one_region_pulls_at_once_in_another_and_all_regions_converge() {
    let regions = Regions::start(&["eu", "us", "ap"]).await;
    let (eu, us, ap) = (&regions.regs[0], &regions.regs[1], &regions.regs[2]);
    let image = Image::oci(fresh_seed(), 3, 200_000);
    // us is not applying eu's changes: what it serves comes by read-through.
    set_paused(us, "eu", true).await;
    image.push(eu, "team/app", Some("1.0")).await;
    // At once, in another region: read through, never "manifest unknown".
    let r = us.get("/v2/team/app/manifests/1.0").await;
    assert_eq!(r.status, 200, "{}", r.describe());
    assert!(r.body.as_ref() == image.manifest.as_slice());
    for blob in image.blobs() {
        assert!(us.blob_bytes("team/app", &sha256_digest(blob)).await == blob);
    }
    let metrics = us.get("/metrics").await.text();
    assert!(
        metrics.lines().any(|l| l
            .starts_with("berth_replication_read_throughs_total{peer=\"eu\"}")
            && !l.ends_with(" 0")),
        "served by read-through: {metrics}"
    );
    // A HEAD probe of a blob that is not here does not read through (a
    // pusher would skip its upload).
    let r = us
        .head(&format!(
            "/v2/team/other/blobs/{}",
            sha256_digest(&image.layers[0])
        ))
        .await;
    assert_eq!(r.status, 404, "{}", r.describe());
    set_paused(us, "eu", false).await;
    // An index pushed in a third region.
    let (index, amd, arm) = two_platform_index(fresh_seed());
    amd.push(ap, "team/multi", None).await;
    arm.push(ap, "team/multi", None).await;
    ap.push_manifest("team/multi", "2", OCI_INDEX, &index).await;

    regions.converge(Duration::from_secs(30)).await;
    for reg in &regions.regs {
        expect_local_image(reg, "team/app", "1.0", &image).await;
        expect_local_image(reg, "team/multi", &amd.digest, &amd).await;
        expect_local_image(reg, "team/multi", &arm.digest, &arm).await;
        let r = local_get(reg, "/v2/team/multi/manifests/2").await;
        assert_eq!(r.status, 200, "{}", r.describe());
        assert!(r.body.as_ref() == index.as_slice());
    }
    // Status and metrics show the work.
    let status = us.get("/berth/v1/replication/status").await.json();
    let peers = status["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 2);
    assert!(peers.iter().all(|p| p["events_behind"] == 0), "{status}");
    let copied: u64 = peers
        .iter()
        .map(|p| p["bytes_copied"].as_u64().unwrap())
        .sum();
    assert!(copied > 0, "{status}");
    let out = berth_cli()
        .args(["replication", "status", "--registry", &us.url()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("eu") && stdout.contains("ap"), "{stdout}");
    // The feed is for peers only.
    let r = send(new_client().get(format!("{}/berth/v1/replication/feed?after=0", eu.url()))).await;
    assert_eq!(r.status, 401, "{}", r.describe());
}

#[tokio::test]
async fn deletes_propagate_and_concurrent_tag_writes_agree_on_one_winner() {
    let regions = Regions::start(&["eu", "us", "ap"]).await;
    let (eu, us, ap) = (&regions.regs[0], &regions.regs[1], &regions.regs[2]);
    let seed = fresh_seed();
    let first = Image::oci(seed, 1, 1000);
    let second = Image::oci(seed + 1, 1, 1000);
    // The same tag written in two regions, neither seeing the other's write
    // before its own.
    regions.isolate(true).await;
    let (a, b) = tokio::join!(
        first.push(eu, "team/race", Some("latest")),
        second.push(us, "team/race", Some("latest"))
    );
    assert_ne!(a, b);
    assert_eq!(
        tag_digest(eu, "team/race", "latest").await.as_deref(),
        Some(first.digest.as_str())
    );
    assert_eq!(
        tag_digest(us, "team/race", "latest").await.as_deref(),
        Some(second.digest.as_str())
    );
    regions.isolate(false).await;
    regions.converge(Duration::from_secs(30)).await;
    let winner = tag_digest(eu, "team/race", "latest").await.unwrap();
    assert!(winner == first.digest || winner == second.digest);
    for reg in &regions.regs {
        assert_eq!(
            tag_digest(reg, "team/race", "latest").await.as_deref(),
            Some(winner.as_str())
        );
        let history = reg
            .get("/berth/v1/tags/history?repository=team/race&tag=latest")
            .await
            .json();
        let digests: Vec<&str> = history["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["digest"].as_str().unwrap())
            .collect();
        assert!(
            digests.contains(&first.digest.as_str()) && digests.contains(&second.digest.as_str()),
            "both values stay in the tag's history: {history}"
        );
        // The loser is still pullable by digest.
        expect_local_image(reg, "team/race", &first.digest, &first).await;
        expect_local_image(reg, "team/race", &second.digest, &second).await;
    }

    // A tag deleted in one region is deleted everywhere.
    let r = ap.delete("/v2/team/race/manifests/latest").await;
    assert_eq!(r.status, 202, "{}", r.describe());
    regions.converge(Duration::from_secs(30)).await;
    for reg in &regions.regs {
        assert_eq!(tag_digest(reg, "team/race", "latest").await, None);
    }
    // A manifest deleted by digest is deleted everywhere, with its tags.
    first.push(eu, "team/race", Some("v1")).await;
    regions.converge(Duration::from_secs(30)).await;
    let r = us
        .delete(&format!("/v2/team/race/manifests/{}", first.digest))
        .await;
    assert_eq!(r.status, 202, "{}", r.describe());
    regions.converge(Duration::from_secs(30)).await;
    for reg in &regions.regs {
        let r = local_get(reg, &format!("/v2/team/race/manifests/{}", first.digest)).await;
        assert_eq!(r.status, 404, "{}", r.describe());
        assert_eq!(tag_digest(reg, "team/race", "v1").await, None);
    }

    // Delete and tag move crossing: eu tags D, us (not seeing it) moves the
    // tag to E, then eu deletes D. The tag's last write is us's: it must
    // point at E everywhere, whichever order each region applies them in.
    let d = Image::oci(seed + 2, 1, 1000);
    let e = Image::oci(seed + 3, 1, 1000);
    e.push(us, "team/cross", None).await;
    regions.converge(Duration::from_secs(30)).await;
    regions.isolate(true).await;
    d.push(eu, "team/cross", Some("t")).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    e.push(us, "team/cross", Some("t")).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let r = eu
        .delete(&format!("/v2/team/cross/manifests/{}", d.digest))
        .await;
    assert_eq!(r.status, 202, "{}", r.describe());
    regions.isolate(false).await;
    regions.converge(Duration::from_secs(30)).await;
    for reg in &regions.regs {
        assert_eq!(
            tag_digest(reg, "team/cross", "t").await.as_deref(),
            Some(e.digest.as_str()),
            "the tag's last write wins, across the delete"
        );
        let r = local_get(reg, &format!("/v2/team/cross/manifests/{}", d.digest)).await;
        assert_eq!(r.status, 404, "{}", r.describe());
    }
}

#[tokio::test]
async fn a_region_that_was_down_catches_up_and_keeps_its_own_writes() {
    let mut regions = Regions::start(&["eu", "us", "ap"]).await;
    let seed = fresh_seed();
    // ap writes, and dies at once (kill -9), before anyone applied it.
    set_paused(&regions.regs[0], "ap", true).await;
    set_paused(&regions.regs[1], "ap", true).await;
    let own = Image::oci(seed, 2, 30_000);
    own.push(&regions.regs[2], "ap/own", Some("1")).await;
    regions.regs[2].kill9();
    set_paused(&regions.regs[0], "ap", false).await;
    set_paused(&regions.regs[1], "ap", false).await;
    // Many writes elsewhere meanwhile.
    let mut images = Vec::new();
    for i in 0..20u64 {
        let image = Image::oci(seed + 10 + i, 1, 5_000);
        let region = &regions.regs[(i % 2) as usize];
        image
            .push(
                region,
                &format!("team/app{}", i % 4),
                Some(&format!("v{i}")),
            )
            .await;
        images.push(image);
    }
    regions.regs[2].restart().await;
    regions.converge(Duration::from_secs(60)).await;
    for reg in &regions.regs {
        expect_local_image(reg, "ap/own", "1", &own).await;
        for (i, image) in images.iter().enumerate() {
            expect_local_image(reg, &format!("team/app{}", i % 4), &format!("v{i}"), image).await;
        }
    }
}

#[tokio::test]
async fn random_writes_in_every_region_with_kills_converge() {
    let mut regions = Regions::start(&["eu", "us", "ap"]).await;
    let seed = fresh_seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    eprintln!("chaos seed {seed}");
    let mut next = 0u64;
    let mut earlier: Vec<Image> = Vec::new();
    for round in 0..6 {
        let mut pushes = Vec::new();
        for region in 0..3 {
            for _ in 0..8 {
                let repo = format!("chaos/r{}", rng.random_range(0..3));
                let tag = format!("t{}", rng.random_range(0..4));
                let op = rng.random_range(0..10);
                next += 1;
                // Some writes push content pushed before (a re-push of a
                // digest, maybe deleted meanwhile, maybe under another tag).
                let image = if op == 2 && !earlier.is_empty() {
                    earlier[rng.random_range(0..earlier.len())].clone()
                } else {
                    Image::oci(seed + next, 1, 2_000)
                };
                pushes.push((region, repo, tag, op, image));
            }
        }
        let work = pushes.iter().map(|(region, repo, tag, op, image)| {
            let reg = &regions.regs[*region];
            async move {
                match op {
                    // Mostly writes; some tag and manifest deletes.
                    0 => {
                        let _ = reg.delete(&format!("/v2/{repo}/manifests/{tag}")).await;
                    }
                    1 => {
                        if let Some(d) = tag_digest(reg, repo, tag).await {
                            let _ = reg.delete(&format!("/v2/{repo}/manifests/{d}")).await;
                        }
                    }
                    _ => {
                        image.push(reg, repo, Some(tag)).await;
                    }
                }
            }
        });
        futures_util::future::join_all(work).await;
        earlier.extend(pushes.into_iter().map(|(_, _, _, _, image)| image));
        // A region dies mid-stream and comes back.
        let victim = round % 3;
        regions.regs[victim].kill9();
        tokio::time::sleep(Duration::from_millis(300)).await;
        regions.regs[victim].restart().await;
    }
    let state = regions.converge(Duration::from_secs(90)).await;
    eprintln!("converged on {state}");
    // Every tag resolves, locally, to a manifest whose blobs are all there.
    let r = local_get(&regions.regs[0], "/v2/_catalog").await;
    let repos: Vec<String> = r.json()["repositories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    for repo in repos {
        for reg in &regions.regs {
            let tags = reg.get(&format!("/v2/{repo}/tags/list")).await.json();
            for tag in tags["tags"].as_array().cloned().unwrap_or_default() {
                let tag = tag.as_str().unwrap();
                let r = local_get(reg, &format!("/v2/{repo}/manifests/{tag}")).await;
                assert_eq!(r.status, 200, "{repo}:{tag}: {}", r.describe());
                let manifest: Value = r.json();
                for layer in manifest["layers"].as_array().unwrap() {
                    let d = layer["digest"].as_str().unwrap();
                    let r = local_get(reg, &format!("/v2/{repo}/blobs/{d}")).await;
                    assert_eq!(r.status, 200, "{repo}@{d}: {}", r.describe());
                }
            }
        }
    }
}

#[tokio::test]
async fn a_hung_peer_does_not_hold_up_local_work() {
    // A peer that accepts connections and never answers.
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hung_port = hung.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut connections = Vec::new();
        loop {
            if let Ok((stream, _)) = hung.accept().await {
                connections.push(stream);
            }
        }
    });
    let reg = Registry::start_with(
        Options::new()
            .flag("--region", "eu")
            .flag("--replication-secret", SECRET)
            .flag("--peer", format!("us=http://127.0.0.1:{hung_port}")),
    )
    .await;
    for i in 0..5u64 {
        let image = Image::oci(fresh_seed() + i, 2, 20_000);
        image.push(&reg, "team/app", Some(&format!("v{i}"))).await;
        for blob in image.blobs() {
            assert!(reg.blob_bytes("team/app", &sha256_digest(blob)).await == blob);
        }
    }
    // A miss asks the hung peer, and gives up after the read-through timeout
    // instead of hanging with it.
    // Behaviour, not speed: the configured bound (1 s) with a wide margin.
    let started = Instant::now();
    let r = send(
        reg.req(reqwest::Method::GET, "/v2/team/missing/manifests/1")
            .timeout(Duration::from_secs(10)),
    )
    .await;
    expect_error(&r, 404, &["MANIFEST_UNKNOWN", "NAME_UNKNOWN"]);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a miss waited {:?} on the hung peer",
        started.elapsed()
    );
    // Local work meanwhile never waited on it: a local pull does not ask.
    let image = Image::oci(fresh_seed(), 1, 1000);
    image.push(&reg, "team/app", Some("after")).await;
    assert_eq!(reg.get("/v2/team/app/manifests/after").await.status, 200);
    held.abort();
}

/// Replication lag and blob throughput between two regions, written to
/// `docs/REPLICATION.md` by `scripts/replication-figures` (release build).
#[tokio::test]
async fn replication_figures() {
    let Ok(report) = std::env::var("BERTH_REPL_REPORT") else {
        eprintln!("SKIPPED: set BERTH_REPL_REPORT=FILE (scripts/replication-figures)");
        return;
    };
    let regions = Regions::start(&["eu", "us"]).await;
    let (eu, us) = (&regions.regs[0], &regions.regs[1]);
    let seed = fresh_seed();
    let samples = 200u64;
    let mut lags = Vec::new();
    for i in 0..samples {
        let image = Image::oci(seed + i, 1, 4_096);
        image.push(eu, "lag/app", Some(&format!("v{i}"))).await;
        let pushed = Instant::now();
        loop {
            let r = send(
                us.req(
                    reqwest::Method::HEAD,
                    &format!("/v2/lag/app/manifests/v{i}"),
                )
                .header("x-berth-local-only", "1"),
            )
            .await;
            if r.status == 200 {
                break;
            }
            assert!(pushed.elapsed() < Duration::from_secs(30), "not replicated");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        lags.push(pushed.elapsed().as_secs_f64() * 1000.0);
    }
    lags.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| percentile(&lags, p);
    let size = 256usize << 20;
    let big = Image::oci(seed + 10_000, 1, size);
    big.push(eu, "lag/big", Some("1")).await;
    let started = Instant::now();
    loop {
        let r = send(
            us.req(reqwest::Method::HEAD, "/v2/lag/big/manifests/1")
                .header("x-berth-local-only", "1"),
        )
        .await;
        if r.status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let table = format!(
        "| measure | value |\n|---|---:|\n| small-image lag p50 (push acknowledged in eu → manifest in us's own storage) | {:.1} ms |\n| lag p90 | {:.1} ms |\n| lag p99 | {:.1} ms |\n| lag max | {:.1} ms |\n| samples | {} |\n| 256 MiB blob, push acknowledged → pullable from us's own storage | {:.2} s ({:.0} MB/s) |\n",
        pct(0.5),
        pct(0.9),
        pct(0.99),
        lags[lags.len() - 1],
        samples,
        secs,
        size as f64 / secs / 1e6,
    );
    write_figures(&report, "figures", &table);
}

/// Puts `table` between `<!-- MARKER:begin -->` and `<!-- MARKER:end -->`
/// in the report (appended when the markers are not there yet).
fn write_figures(report: &str, marker: &str, table: &str) {
    println!("{table}");
    let doc = std::fs::read_to_string(report).unwrap_or_default();
    let (begin, end) = (
        format!("<!-- {marker}:begin -->"),
        format!("<!-- {marker}:end -->"),
    );
    let doc = match (doc.find(&begin), doc.find(&end)) {
        (Some(b), Some(e)) => format!("{}{begin}\n{table}{}", &doc[..b], &doc[e..]),
        _ => format!("{doc}\n{begin}\n{table}{end}\n"),
    };
    std::fs::write(report, doc).unwrap();
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::test]
async fn pausing_a_peer_and_turning_serving_off() {
    let regions = Regions::start(&["eu", "us"]).await;
    let (eu, us) = (&regions.regs[0], &regions.regs[1]);
    let out = control_command(&["replication", "pause", "eu", "--registry", &us.url()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image = Image::oci(fresh_seed(), 1, 1000);
    image.push(eu, "team/paused", Some("1")).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r = local_get(us, "/v2/team/paused/manifests/1").await;
    assert_eq!(r.status, 404, "paused: nothing applied: {}", r.describe());
    let status = us.get("/berth/v1/replication/status").await.json();
    assert_eq!(status["peers"][0]["paused"], true, "{status}");
    let out = control_command(&["replication", "resume", "eu", "--registry", &us.url()])
        .output()
        .unwrap();
    assert!(out.status.success());
    regions.converge(Duration::from_secs(30)).await;
    expect_local_image(us, "team/paused", "1", &image).await;

    // Without the secret (or an administrator), nobody turns a region off.
    let out = std::process::Command::new(BIN)
        .args(["replication", "serving", "off", "--registry", &eu.url()])
        .env_remove("BERTH_REPLICATION_SECRET")
        .env_remove("BERTH_PASSWORD")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(eu.get("/readyz").await.status, 200);
    // Serving off: /readyz fails (load balancers fail over); on again.
    let out = control_command(&["replication", "serving", "off", "--registry", &eu.url()])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(eu.get("/readyz").await.status, 503);
    let out = berth_cli()
        .args(["replication", "status", "--registry", &eu.url()])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "status fails while serving is off"
    );
    // Its feed is still served: peers keep up with it.
    let image2 = Image::oci(fresh_seed(), 1, 1000);
    image2.push(eu, "team/paused", Some("2")).await;
    regions.converge(Duration::from_secs(30)).await;
    control_command(&["replication", "serving", "on", "--registry", &eu.url()])
        .output()
        .unwrap();
    assert_eq!(eu.get("/readyz").await.status, 200);
}

#[tokio::test]
async fn peer_filters_choose_what_replicates() {
    let ports = [free_port(), free_port()];
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("us.toml");
    std::fs::write(
        &config,
        format!(
            "region = \"us\"\nreplication_secret = \"{SECRET}\"\n[[peer]]\nname = \"eu\"\nurl = \"{}://127.0.0.1:{}\"\ninclude = [\"team/*\"]\nexclude = [\"team/private*\"]\n",
            scheme(),
            ports[0]
        ),
    )
    .unwrap();
    let names = vec!["eu".to_string(), "us".to_string()];
    let eu = Registry::start_with(region_options(&names, &ports, 0)).await;
    let us = Registry::start_with(
        Options::new()
            .port(ports[1])
            .flag("--config", config.display()),
    )
    .await;
    let seed = fresh_seed();
    let images: Vec<Image> = (0..3).map(|i| Image::oci(seed + i, 1, 1000)).collect();
    images[0].push(&eu, "team/app", Some("1")).await;
    images[1].push(&eu, "team/private-x", Some("1")).await;
    images[2].push(&eu, "other/app", Some("1")).await;
    let marker = Image::oci(seed + 9, 1, 1000);
    marker.push(&eu, "team/marker", Some("1")).await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            local_get(&us, "/v2/team/marker/manifests/1").await.status == 200
        })
        .await
    );
    expect_local_image(&us, "team/app", "1", &images[0]).await;
    for repo in ["team/private-x", "other/app"] {
        let r = local_get(&us, &format!("/v2/{repo}/manifests/1")).await;
        assert_eq!(r.status, 404, "{repo} is filtered out: {}", r.describe());
    }
}
