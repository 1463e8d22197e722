//! High availability in one region, on real processes: three zones (a, b,
//! c), each with an etcd member, a Garage node and a Berth node, behind
//! haproxy. Drills kill processes under continuous verified load and count
//! what failed, with and without client retries.
//!
//! Run alone with figures: `scripts/drill` (writes docs/AVAILABILITY.md).

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::*;

const ZONES: [&str; 3] = ["a", "b", "c"];

mod load;
mod topology;

use load::*;
// The drills' own image, not the support crate's.
use load::Image;
use topology::*;

/// Drill 5: garbage (stray blobs no manifest references) is collected by a
/// run on berth-a that is killed with `kill -9` halfway, while pushes and
/// pulls go on through haproxy; a second run through haproxy finishes, and
/// nothing referenced is lost (the final `verify_all`).
async fn gc_killed_mid_sweep(
    topo: &mut Topology,
    acked: Arc<Mutex<Vec<Image>>>,
    load_for: Duration,
) -> Figures {
    use futures_util::StreamExt as _;
    let client = new_client();
    let lb = topo.lb.clone();
    let strays: Vec<Vec<u8>> = (0..300).map(|_| random_bytes(fresh_seed(), 1024)).collect();
    let digests: Vec<String> = strays.iter().map(|b| sha256_digest(b)).collect();
    futures_util::stream::iter(strays.iter().zip(&digests))
        .for_each_concurrent(8, |(bytes, digest)| {
            let (client, lb) = (client.clone(), lb.clone());
            async move {
                let outcome =
                    with_retry(|| push_blob(&client, &lb, "drill/garbage", digest, bytes, false))
                        .await;
                assert!(!outcome.failed, "stray upload failed");
            }
        })
        .await;
    // Past the second a link counts as confirmed.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let remaining = async || {
        let mut n = 0;
        for digest in &digests {
            let r = send(client.get(format!("{lb}/v2/drill/garbage/blobs/{digest}"))).await;
            n += usize::from(r.status == 200);
        }
        n
    };

    let load = Load::start(&lb, acked, 4, 8);
    let node_a = format!("http://127.0.0.1:{}", topo.berth_ports[0]);
    // The run reports its phase every second: it is killed as soon as it
    // removes bytes (links done, blobs being marked and deleted).
    let (phases, mut phase) = tokio::sync::mpsc::unbounded_channel::<serde_json::Value>();
    let run = tokio::spawn({
        let client = client.clone();
        async move {
            let Ok(response) = client
                .post(format!("{node_a}/berth/v1/gc?grace_secs=0"))
                .send()
                .await
            else {
                return;
            };
            let mut body = response.bytes_stream();
            let mut pending = Vec::new();
            while let Some(Ok(chunk)) = body.next().await {
                pending.extend_from_slice(&chunk);
                while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    if let Ok(value) = serde_json::from_slice(&line) {
                        let _ = phases.send(value);
                    }
                }
            }
        }
    });
    let killed_at = loop {
        let value = tokio::time::timeout(Duration::from_secs(60), phase.recv())
            .await
            .expect("garbage collection progress")
            .expect("the collection ended without a word");
        assert!(
            value.get("report").is_none(),
            "the collection finished before it could be killed: {value}"
        );
        if value["progress"]["phase"] == "blobs" {
            break value;
        }
    };
    topo.berth[0].kill9();
    let _ = run.await;
    tokio::time::sleep(load_for).await;
    topo.berth[0].start();
    topo.wait_berth_ready(0).await;

    let out = Command::new(BIN)
        .args(["gc", "--json", "--grace", "0", "--registry", &lb])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "gc after the kill: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        topo.describe()
    );
    let second: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let tally = load.finish().await;
    let left = remaining().await;
    assert_eq!(left, 0, "strays left after the second run: {second}");
    Figures {
        name: "5. kill -9 a node mid garbage collection",
        writes_resumed_s: None,
        write_gap_s: None,
        note: format!(
            "killed in its blob phase, {} links removed by then; the next run (through haproxy, {} ms) removed {} links and the {} blobs left, none remained",
            killed_at["progress"]["links_removed"],
            second["duration_ms"],
            second["links_removed"],
            second["blobs_removed"]
        ),
        tally,
    }
}

/// One upload, each step on another node, directly (not through haproxy):
/// started and first chunk on berth-a, which is then killed; the next chunk
/// on berth-b; the status and the completing PUT on berth-c.
async fn upload_hops_nodes_and_outlives_the_one_that_started_it(topo: &mut Topology) {
    let client = new_client();
    let node = |i: usize| format!("http://127.0.0.1:{}", topo.berth_ports[i]);
    let data = random_bytes(fresh_seed(), 3 * 1024 * 1024 + 17);
    let digest = sha256_digest(&data);
    let split = 1024 * 1024 + 5;

    let started = send(client.post(format!("{}/v2/drill/hop/blobs/uploads/", node(0)))).await;
    assert_eq!(started.status, 202, "{}", started.describe());
    let path = path_and_query(&started.header("location").unwrap());
    let first = send(
        client
            .patch(format!("{}{path}", node(0)))
            .header("content-type", "application/octet-stream")
            .header("content-range", format!("0-{}", split - 1))
            .body(data[..split].to_vec()),
    )
    .await;
    assert_eq!(first.status, 202, "{}", first.describe());
    topo.berth[0].kill9();

    let path = path_and_query(&first.header("location").unwrap());
    let second = send(
        client
            .patch(format!("{}{path}", node(1)))
            .header("content-type", "application/octet-stream")
            .header("content-range", format!("{split}-{}", data.len() - 1))
            .body(data[split..].to_vec()),
    )
    .await;
    assert_eq!(second.status, 202, "{}", second.describe());
    let path = path_and_query(&second.header("location").unwrap());
    let status = send(client.get(format!("{}{path}", node(2)))).await;
    assert_eq!(status.status, 204, "{}", status.describe());
    assert_eq!(
        status.header("range"),
        Some(format!("0-{}", data.len() - 1))
    );
    let sep = if path.contains('?') { '&' } else { '?' };
    let done = send(client.put(format!("{}{path}{sep}digest={digest}", node(2)))).await;
    assert_eq!(done.status, 201, "{}", done.describe());
    let pulled = send(client.get(format!("{}/v2/drill/hop/blobs/{digest}", topo.lb))).await;
    assert_eq!(pulled.status, 200, "{}", pulled.describe());
    assert_eq!(sha256_digest(&pulled.body), digest);
    assert_eq!(pulled.body.len(), data.len());

    topo.berth[0].start();
    topo.wait_berth_ready(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_survives_node_zone_and_quorum_loss() {
    let Some(garage) = cluster_tools() else {
        return;
    };
    let mut topo = Topology::start(&garage).await;
    let client = new_client();
    let lb = topo.lb.clone();
    let acked: Arc<Mutex<Vec<Image>>> = Arc::new(Mutex::new(Vec::new()));
    let load_secs = |default: u64| {
        Duration::from_secs(
            std::env::var("BERTH_DRILL_SECS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(default),
        )
    };

    // Seed images to pull.
    for n in 0..12 {
        let image = make_image(100, n);
        let outcome = push_image(&client, &lb, &image).await;
        assert!(!outcome.failed, "seed push failed\n{}", topo.describe());
        acked.lock().unwrap().push(image);
    }
    let (healthy, status) = topo.cluster_status();
    assert!(healthy, "cluster status before the drills:\n{status}");
    assert_eq!(status.matches("berth-").count(), 3, "{status}");
    upload_hops_nodes_and_outlives_the_one_that_started_it(&mut topo).await;
    let mut report: Vec<Figures> = Vec::new();

    // Drill 0: drain one node (berth node drain): no failure at all.
    {
        let load = Load::start(&lb, acked.clone(), 4, 8);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let drain = Command::new(BIN)
            .args(["node", "drain", "berth-c", "--metadata", &topo.metadata])
            .output()
            .unwrap();
        assert!(
            drain.status.success(),
            "drain: {}{}",
            String::from_utf8_lossy(&drain.stdout),
            String::from_utf8_lossy(&drain.stderr)
        );
        let status = topo.berth[2].wait_exit(Duration::from_secs(15));
        assert!(
            status.is_some_and(|s| s.success()),
            "a drained node exits 0: {status:?}"
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
        let tally = load.finish().await;
        topo.berth[2].start();
        topo.wait_berth_ready(2).await;
        report.push(Figures {
            name: "0. drain berth-c",
            tally,
            writes_resumed_s: None,
            write_gap_s: None,
            note: "node exited 0".into(),
        });
    }

    // Drill 1: kill -9 the node leading the upload-expiry job.
    {
        let leader = topo
            .leader_of("upload-expiry")
            .unwrap_or_else(|| panic!("no leader\n{}", topo.cluster_status().1));
        let victim = ZONES
            .iter()
            .position(|z| format!("berth-{z}") == leader)
            .unwrap();
        let load = Load::start(&lb, acked.clone(), 4, 8);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let fault = load.since_start();
        topo.berth[victim].kill9();
        let mut successor = None;
        let takeover = Instant::now();
        while takeover.elapsed() < Duration::from_secs(20) {
            if let Some(l) = topo.leader_of("upload-expiry")
                && l != leader
            {
                successor = Some((l, takeover.elapsed()));
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let (successor, took) = successor.expect("another node takes over the job");
        tokio::time::sleep(load_secs(8).saturating_sub(takeover.elapsed())).await;
        let tally = load.finish().await;
        let resumed = writes_resumed(&tally, fault);
        let gap = write_gap(&tally, fault);
        topo.berth[victim].start();
        topo.wait_berth_ready(victim).await;
        report.push(Figures {
            name: "1. kill -9 one Berth node",
            writes_resumed_s: resumed,
            write_gap_s: gap,
            note: format!(
                "killed {leader} (job leader); {successor} took over upload-expiry in {:.1} s",
                took.as_secs_f64()
            ),
            tally,
        });
    }

    // Drill 2: lose zone a at once.
    {
        let load = Load::start(&lb, acked.clone(), 4, 8);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let fault = load.since_start();
        topo.berth[0].kill9();
        topo.etcd[0].kill9();
        topo.garage[0].kill9();
        tokio::time::sleep(load_secs(10)).await;
        let tally = load.finish().await;
        let resumed = writes_resumed(&tally, fault);
        let gap = write_gap(&tally, fault);
        report.push(Figures {
            name: "2. lose zone a (Berth, etcd, Garage)",
            writes_resumed_s: resumed,
            write_gap_s: gap,
            note: String::new(),
            tally,
        });
        // Zone a returns.
        topo.etcd[0].start();
        topo.garage[0].start();
        topo.berth[0].start();
        topo.wait_berth_ready(0).await;
    }

    // Drill 3: lose two etcd members, then one returns.
    {
        let load = Load::start(&lb, acked.clone(), 4, 8);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let fault = load.since_start();
        topo.etcd[1].kill9();
        topo.etcd[2].kill9();
        tokio::time::sleep(load_secs(8)).await;
        let returned = load.since_start();
        topo.etcd[1].start();
        tokio::time::sleep(Duration::from_secs(8)).await;
        let tally = load.finish().await;
        let resumed = writes_resumed(&tally, returned);
        let gap = write_gap(&tally, fault);
        // Pushes that began after the quorum was gone and ended before it
        // came back: there must be none.
        let without_quorum = tally
            .push_done
            .iter()
            .filter(|(began, done)| *began > fault && *done < returned)
            .count();
        assert_eq!(
            without_quorum, 0,
            "a push was acknowledged without an etcd quorum"
        );
        report.push(Figures {
            name: "3. lose 2 of 3 etcd members, then one returns",
            writes_resumed_s: resumed,
            write_gap_s: gap,
            note: "no push acknowledged without quorum; writes resumed counted from the member's return".into(),
            tally,
        });
    }

    // Drill 4: everything back; the cluster heals by itself.
    {
        topo.etcd[2].start();
        let healed_in = {
            let start = Instant::now();
            loop {
                let (healthy, status) = topo.cluster_status();
                if healthy {
                    break start.elapsed();
                }
                assert!(
                    start.elapsed() < Duration::from_secs(60),
                    "cluster did not heal:\n{status}\n{}",
                    topo.describe()
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        };
        let load = Load::start(&lb, acked.clone(), 4, 8);
        tokio::time::sleep(load_secs(6)).await;
        let tally = load.finish().await;
        assert_eq!(
            (tally.push_failed_first, tally.pull_failed_first),
            (0, 0),
            "a healed cluster serves without errors"
        );
        report.push(Figures {
            name: "4. everything back",
            writes_resumed_s: None,
            write_gap_s: None,
            note: format!(
                "`berth cluster status` healthy {:.1} s after the last member returned",
                healed_in.as_secs_f64()
            ),
            tally,
        });
    }

    // Drill 5: kill -9 a node in the middle of a garbage collection, under
    // load; the next run, on another node, finishes the work.
    report.push(gc_killed_mid_sweep(&mut topo, acked.clone(), load_secs(4)).await);

    // Every acknowledged push is there, byte for byte.
    let verified = verify_all(&client, &lb, &acked).await;

    let mut table = String::from(
        "| drill | pushes | failed pushes (no retry / retry) | pulls | failed pulls (no retry / retry) | pull p50 / p99 ms | writes resumed | longest write gap | notes |\n|---|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for figures in &mut report {
        table.push_str(&figures.row());
        table.push('\n');
    }
    table.push_str(&format!(
        "\nAfter the drills: {verified} acknowledged pushes pulled and compared byte for byte, all identical.\n"
    ));
    println!("{table}");
    if let Ok(path) = std::env::var("BERTH_DRILL_REPORT") {
        std::fs::write(path, &table).unwrap();
    }

    // The goals that are not timings: no pull fails (with retries) while a
    // node, a zone or the etcd quorum is lost.
    for figures in &report {
        assert_eq!(
            figures.tally.pull_failed, 0,
            "{}: pulls failed despite retries\n{table}",
            figures.name
        );
    }
}
