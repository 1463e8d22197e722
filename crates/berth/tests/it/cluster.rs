//! High availability in one region, on real processes: three zones (a, b,
//! c), each with an etcd member, a Garage node and a Berth node, behind
//! haproxy. Drills kill processes under continuous verified load and count
//! what failed, with and without client retries.
//!
//! Run alone with figures: `scripts/drill` (writes docs/AVAILABILITY.md).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Client;
use serde_json::json;

use crate::support::*;

const ZONES: [&str; 3] = ["a", "b", "c"];

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn garage_bin() -> Option<PathBuf> {
    let home = std::env::var("HOME").unwrap_or_default();
    [
        std::env::var("GARAGE_BIN").ok().map(PathBuf::from),
        Some(PathBuf::from(format!("{home}/.cargo/bin/garage"))),
    ]
    .into_iter()
    .flatten()
    .find(|p| p.exists())
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The tools the topology needs, or why the test is skipped (a failure
/// when `BERTH_REQUIRE_CLUSTER=1`, as in CI).
fn cluster_tools() -> Option<PathBuf> {
    let garage = garage_bin();
    let missing: Vec<&str> = [
        ("garage", garage.is_some()),
        ("etcd", have("etcd")),
        ("haproxy", have("haproxy")),
    ]
    .into_iter()
    .filter(|(_, ok)| !ok)
    .map(|(name, _)| name)
    .collect();
    if missing.is_empty() {
        return garage;
    }
    assert!(
        std::env::var("BERTH_REQUIRE_CLUSTER").is_err(),
        "cluster test required but missing: {missing:?}"
    );
    eprintln!("skipping: missing {missing:?}");
    None
}

/// A server process of the topology, restartable with the same command.
struct Proc {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    fn new(name: &str, program: impl Into<PathBuf>, args: Vec<String>, dir: &Path) -> Proc {
        Proc {
            name: name.to_string(),
            program: program.into(),
            args,
            env: Vec::new(),
            log: dir.join(format!("{name}.log")),
            child: None,
        }
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log));
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        unsafe {
            use std::os::unix::process::CommandExt as _;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        self.child = Some(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("start {}: {e}", self.name)),
        );
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for the process to exit on its own.
    fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

struct Topology {
    dir: tempfile::TempDir,
    etcd: Vec<Proc>,
    garage: Vec<Proc>,
    berth: Vec<Proc>,
    berth_ports: Vec<u16>,
    haproxy: Proc,
    lb: String,
    metadata: String,
    s3_env: Vec<Vec<(String, String)>>,
}

async fn wait_for(what: &str, timeout: Duration, mut ok: impl AsyncFnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !ok().await {
        assert!(start.elapsed() < timeout, "{what} not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    start.elapsed()
}

async fn http_ok(client: &Client, url: &str) -> bool {
    client
        .get(url)
        .timeout(Duration::from_secs(1))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

impl Topology {
    async fn start(garage: &Path) -> Topology {
        let dir = tempfile::Builder::new()
            .prefix("berth-cluster-")
            .tempdir()
            .unwrap();
        let root = dir.path().to_path_buf();

        // etcd: one member per zone.
        let etcd_ports: Vec<u16> = ZONES.iter().map(|_| free_port()).collect();
        let peer_ports: Vec<u16> = ZONES.iter().map(|_| free_port()).collect();
        let initial: Vec<String> = ZONES
            .iter()
            .zip(&peer_ports)
            .map(|(z, p)| format!("etcd-{z}=http://127.0.0.1:{p}"))
            .collect();
        let mut etcd = Vec::new();
        for (i, zone) in ZONES.iter().enumerate() {
            let mut p = Proc::new(
                &format!("etcd-{zone}"),
                "etcd",
                vec![
                    format!("--name=etcd-{zone}"),
                    format!("--data-dir={}/etcd-{zone}", root.display()),
                    format!("--listen-client-urls=http://127.0.0.1:{}", etcd_ports[i]),
                    format!("--advertise-client-urls=http://127.0.0.1:{}", etcd_ports[i]),
                    format!("--listen-peer-urls=http://127.0.0.1:{}", peer_ports[i]),
                    format!(
                        "--initial-advertise-peer-urls=http://127.0.0.1:{}",
                        peer_ports[i]
                    ),
                    format!("--initial-cluster={}", initial.join(",")),
                    "--initial-cluster-state=new".into(),
                    "--initial-cluster-token=berth-drill".into(),
                ],
                &root,
            );
            p.start();
            etcd.push(p);
        }

        // Garage: one node per zone, replication factor 3.
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/garage.py");
        let garage_dir = root.join("garage");
        let out = Command::new("python3")
            .arg(&script)
            .args(["config", "--dir"])
            .arg(&garage_dir)
            .args(["--zones", "a,b,c"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let config: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut garages = Vec::new();
        let mut s3_ports = Vec::new();
        for node in config["nodes"].as_array().unwrap() {
            let zone = node["zone"].as_str().unwrap();
            let mut p = Proc::new(
                &format!("garage-{zone}"),
                garage,
                vec![
                    "-c".into(),
                    node["config"].as_str().unwrap().into(),
                    "server".into(),
                ],
                &root,
            );
            p.env.push(("RUST_LOG".into(), "warn".into()));
            p.start();
            garages.push(p);
            s3_ports.push(node["s3_port"].as_u64().unwrap());
        }
        let out = Command::new("python3")
            .arg(&script)
            .args(["setup", "--dir"])
            .arg(&garage_dir)
            .env("GARAGE_BIN", garage)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "garage setup: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let setup: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        // Each Berth node talks to the Garage node of its own zone.
        let s3_env: Vec<Vec<(String, String)>> = s3_ports
            .iter()
            .map(|port| {
                let mut env: Vec<(String, String)> = setup["env"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                    .collect();
                env.retain(|(k, _)| k != "AWS_ENDPOINT_URL");
                env.push((
                    "AWS_ENDPOINT_URL".into(),
                    format!("http://127.0.0.1:{port}"),
                ));
                env
            })
            .collect();

        // Berth: one node per zone.
        let metadata = format!(
            "etcd://{}/berth-drill",
            etcd_ports
                .iter()
                .map(|p| format!("127.0.0.1:{p}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        let berth_ports: Vec<u16> = ZONES.iter().map(|_| free_port()).collect();
        let mut berth = Vec::new();
        for (i, zone) in ZONES.iter().enumerate() {
            let mut p = Proc::new(
                &format!("berth-{zone}"),
                BIN,
                vec![
                    "serve".into(),
                    format!("--listen=127.0.0.1:{}", berth_ports[i]),
                    format!("--data-dir={}/berth-{zone}", root.display()),
                    format!("--metadata={metadata}"),
                    "--storage=s3://berth".into(),
                    format!("--node-name=berth-{zone}"),
                    format!("--zone={zone}"),
                    "--shutdown-grace-secs=10".into(),
                    // Stray links become collectable a second after their
                    // upload (drill 5).
                    "--link-refresh-secs=1".into(),
                ],
                &root,
            );
            p.env = s3_env[i].clone();
            p.env.push(("BERTH_LOG".into(), "info".into()));
            berth.push(p);
        }

        // haproxy: ready nodes first; if none is ready (no etcd quorum), the
        // live ones, which still serve pulls.
        let lb_port = free_port();
        let servers = |check: &str| {
            berth_ports
                .iter()
                .zip(ZONES)
                .map(|(p, z)| format!("  server berth-{z} 127.0.0.1:{p} check{check}\n"))
                .collect::<String>()
        };
        let haproxy_cfg = format!(
            "global\n  maxconn 4096\n\
             defaults\n  mode http\n  timeout connect 1s\n  timeout client 60s\n  timeout server 60s\n  \
             timeout http-request 30s\n  retries 3\n  option redispatch 1\n  \
             retry-on conn-failure empty-response response-timeout\n  \
             default-server inter 500ms fall 2 rise 2\n\
             frontend registry\n  bind 127.0.0.1:{lb_port}\n  \
             use_backend berth_live if {{ nbsrv(berth_ready) eq 0 }}\n  default_backend berth_ready\n\
             backend berth_ready\n  balance roundrobin\n  option httpchk GET /readyz\n  http-check expect status 200\n{}\
             backend berth_live\n  balance roundrobin\n  option httpchk GET /healthz\n  http-check expect status 200\n{}",
            servers(""),
            servers("")
        );
        let cfg_path = root.join("haproxy.cfg");
        std::fs::write(&cfg_path, haproxy_cfg).unwrap();
        let haproxy = Proc::new(
            "haproxy",
            "haproxy",
            vec!["-db".into(), "-f".into(), cfg_path.display().to_string()],
            &root,
        );

        let mut topology = Topology {
            dir,
            etcd,
            garage: garages,
            berth,
            berth_ports,
            haproxy,
            lb: format!("http://127.0.0.1:{lb_port}"),
            metadata,
            s3_env,
        };
        for i in 0..ZONES.len() {
            topology.berth[i].start();
        }
        for i in 0..ZONES.len() {
            topology.wait_berth_ready(i).await;
        }
        topology.haproxy.start();
        let client = new_client();
        let v2 = format!("{}/v2/", topology.lb);
        wait_for("haproxy", Duration::from_secs(10), async || {
            http_ok(&client, &v2).await
        })
        .await;
        topology
    }

    async fn wait_berth_ready(&self, i: usize) -> Duration {
        let client = new_client();
        let url = format!("http://127.0.0.1:{}/readyz", self.berth_ports[i]);
        let name = self.berth[i].name.clone();
        wait_for(&name, Duration::from_secs(30), async || {
            http_ok(&client, &url).await
        })
        .await
    }

    /// Runs `berth cluster status` with this topology's configuration.
    fn cluster_status(&self) -> (bool, String) {
        let out = Command::new(BIN)
            .args(["cluster", "status", "--metadata", &self.metadata])
            .arg("--storage=s3://berth")
            .arg(format!("--data-dir={}/status", self.dir.path().display()))
            .envs(self.s3_env[1].iter().cloned())
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// The node leading `job`, from `berth cluster status`.
    fn leader_of(&self, job: &str) -> Option<String> {
        let (_, text) = self.cluster_status();
        text.lines()
            .find(|l| l.trim_start().starts_with("berth-") && l.contains(job))
            .and_then(|l| l.split_whitespace().next())
            .map(str::to_string)
    }

    fn describe(&self) -> String {
        let mut out = String::new();
        for p in self
            .berth
            .iter()
            .chain(&self.etcd)
            .chain(&self.garage)
            .chain(std::iter::once(&self.haproxy))
        {
            out.push_str(&format!("--- {} ---\n{}\n", p.name, p.log_tail(15)));
        }
        out
    }
}

// ---------------------------------------------------------------------------
// Verified load
// ---------------------------------------------------------------------------

#[derive(Clone)]
struct Image {
    repo: String,
    tag: String,
    manifest: Vec<u8>,
    digest: String,
    blobs: Vec<(String, Arc<Vec<u8>>)>,
}

fn make_image(worker: usize, n: u64) -> Image {
    let seed = fresh_seed();
    let layer_a = random_bytes(seed, 64 * 1024 + (seed % 1_000_000) as usize);
    let layer_b = random_bytes(seed ^ 0x5555, 16 * 1024 + (seed % 50_000) as usize);
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": []},
        "worker": worker, "n": n, "seed": seed,
    }))
    .unwrap();
    let blobs: Vec<(String, Arc<Vec<u8>>)> = [config, layer_a, layer_b]
        .into_iter()
        .map(|b| (sha256_digest(&b), Arc::new(b)))
        .collect();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": blobs[0].0, "size": blobs[0].1.len()},
        "layers": blobs[1..].iter().map(|(d, b)| json!({
            "mediaType": OCI_LAYER_GZIP, "digest": d, "size": b.len()
        })).collect::<Vec<_>>(),
    }))
    .unwrap();
    Image {
        repo: format!("drill/w{}", worker % 4),
        tag: format!("w{worker}-{n}"),
        digest: sha256_digest(&manifest),
        manifest,
        blobs,
    }
}

/// containerd retries a failed request a few times with backoff.
const ATTEMPTS_WITH_RETRY: usize = 4;

#[derive(Default, Clone, Copy)]
struct Outcome {
    /// Failed at the first attempt (what a client without retries sees).
    failed_first: bool,
    /// Failed after every retry.
    failed: bool,
}

impl Outcome {
    fn merge(&mut self, other: Outcome) {
        self.failed_first |= other.failed_first;
        self.failed |= other.failed;
    }
}

/// Runs `attempt` up to `ATTEMPTS_WITH_RETRY` times with backoff.
async fn with_retry<F, Fut>(mut attempt: F) -> Outcome
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let mut outcome = Outcome::default();
    for n in 0..ATTEMPTS_WITH_RETRY {
        match attempt().await {
            Ok(()) => return outcome,
            Err(_) => {
                if n == 0 {
                    outcome.failed_first = true;
                }
                tokio::time::sleep(Duration::from_millis(100 << n)).await;
            }
        }
    }
    outcome.failed = true;
    outcome
}

async fn expect_status(
    rb: reqwest::RequestBuilder,
    want: u16,
) -> Result<reqwest::Response, String> {
    let resp = rb.send().await.map_err(|e| e.to_string())?;
    if resp.status().as_u16() == want {
        Ok(resp)
    } else {
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        Err(format!("{status}: {}", truncate(&body, 200)))
    }
}

fn location(base: &str, resp: &reqwest::Response) -> Result<String, String> {
    let loc = resp
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .ok_or("no Location")?;
    Ok(if loc.starts_with("http") {
        loc.to_string()
    } else {
        format!("{base}{loc}")
    })
}

/// Pushes one blob: the first layer in two chunks (the load balancer sends
/// them to different nodes), the others in one request.
async fn push_blob(
    client: &Client,
    lb: &str,
    repo: &str,
    digest: &str,
    bytes: &[u8],
    chunked: bool,
) -> Result<(), String> {
    if !chunked {
        expect_status(
            client
                .post(format!("{lb}/v2/{repo}/blobs/uploads/?digest={digest}"))
                .header("content-type", "application/octet-stream")
                .body(bytes.to_vec()),
            201,
        )
        .await?;
        return Ok(());
    }
    let started = expect_status(client.post(format!("{lb}/v2/{repo}/blobs/uploads/")), 202).await?;
    let mut url = location(lb, &started)?;
    let half = bytes.len() / 2;
    let patched = expect_status(
        client
            .patch(&url)
            .header("content-type", "application/octet-stream")
            .header("content-range", format!("0-{}", half - 1))
            .body(bytes[..half].to_vec()),
        202,
    )
    .await?;
    url = location(lb, &patched)?;
    let sep = if url.contains('?') { '&' } else { '?' };
    expect_status(
        client
            .put(format!("{url}{sep}digest={digest}"))
            .header("content-type", "application/octet-stream")
            .body(bytes[half..].to_vec()),
        201,
    )
    .await?;
    Ok(())
}

async fn push_image(client: &Client, lb: &str, image: &Image) -> Outcome {
    let mut outcome = Outcome::default();
    for (i, (digest, bytes)) in image.blobs.iter().enumerate() {
        outcome
            .merge(with_retry(|| push_blob(client, lb, &image.repo, digest, bytes, i == 1)).await);
        if outcome.failed {
            return outcome;
        }
    }
    outcome.merge(
        with_retry(|| async {
            expect_status(
                client
                    .put(format!("{lb}/v2/{}/manifests/{}", image.repo, image.tag))
                    .header("content-type", OCI_MANIFEST)
                    .body(image.manifest.clone()),
                201,
            )
            .await
            .map(|_| ())
        })
        .await,
    );
    outcome
}

/// Pulls an image by tag and checks every byte. A mismatch is never a
/// transient failure: it panics.
async fn pull_image(client: &Client, lb: &str, image: &Image) -> Outcome {
    let mut outcome = with_retry(|| async {
        let resp = expect_status(
            client
                .get(format!("{lb}/v2/{}/manifests/{}", image.repo, image.tag))
                .header("accept", OCI_MANIFEST),
            200,
        )
        .await?;
        let body = resp.bytes().await.map_err(|e| e.to_string())?;
        assert_eq!(
            sha256_digest(&body),
            image.digest,
            "{}:{} served the wrong manifest",
            image.repo,
            image.tag
        );
        Ok(())
    })
    .await;
    for (digest, bytes) in &image.blobs {
        if outcome.failed {
            break;
        }
        outcome.merge(
            with_retry(|| async {
                let resp = expect_status(
                    client.get(format!("{lb}/v2/{}/blobs/{digest}", image.repo)),
                    200,
                )
                .await?;
                // A transfer cut short is a failed pull, not corruption.
                let body = resp.bytes().await.map_err(|e| e.to_string())?;
                if body.len() != bytes.len() {
                    return Err(format!("{} of {} bytes", body.len(), bytes.len()));
                }
                assert_eq!(&sha256_digest(&body), digest, "blob bytes differ");
                Ok(())
            })
            .await,
        );
    }
    outcome
}

#[derive(Default)]
struct Tally {
    pushes: u64,
    push_failed_first: u64,
    push_failed: u64,
    pulls: u64,
    pull_failed_first: u64,
    pull_failed: u64,
    pull_ms: Vec<f64>,
    /// Start and completion of acknowledged pushes (since the load started).
    push_done: Vec<(Duration, Duration)>,
}

struct Load {
    acked: Arc<Mutex<Vec<Image>>>,
    tally: Arc<Mutex<Tally>>,
    stop: Arc<AtomicBool>,
    started: Instant,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

static IMAGE_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Load {
    fn start(lb: &str, acked: Arc<Mutex<Vec<Image>>>, pushers: usize, pullers: usize) -> Load {
        let tally = Arc::new(Mutex::new(Tally::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..pushers {
            let (lb, acked, tally, stop) =
                (lb.to_string(), acked.clone(), tally.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let client = new_client();
                while !stop.load(Ordering::Relaxed) {
                    let image = make_image(w, IMAGE_COUNTER.fetch_add(1, Ordering::Relaxed));
                    let began = started.elapsed();
                    let outcome = push_image(&client, &lb, &image).await;
                    let mut t = tally.lock().unwrap();
                    t.pushes += 1;
                    t.push_failed_first += u64::from(outcome.failed_first);
                    t.push_failed += u64::from(outcome.failed);
                    if !outcome.failed {
                        t.push_done.push((began, started.elapsed()));
                        acked.lock().unwrap().push(image);
                    }
                }
            }));
        }
        for p in 0..pullers {
            let (lb, acked, tally, stop) =
                (lb.to_string(), acked.clone(), tally.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let client = new_client();
                let mut n = p as u64 * 7919;
                while !stop.load(Ordering::Relaxed) {
                    let image = {
                        let acked = acked.lock().unwrap();
                        n = n
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        acked[(n >> 33) as usize % acked.len()].clone()
                    };
                    let t0 = Instant::now();
                    let outcome = pull_image(&client, &lb, &image).await;
                    let ms = t0.elapsed().as_secs_f64() * 1000.0;
                    let mut t = tally.lock().unwrap();
                    t.pulls += 1;
                    t.pull_failed_first += u64::from(outcome.failed_first);
                    t.pull_failed += u64::from(outcome.failed);
                    if !outcome.failed {
                        t.pull_ms.push(ms);
                    }
                }
            }));
        }
        Load {
            acked,
            tally,
            stop,
            started,
            tasks,
        }
    }

    fn since_start(&self) -> Duration {
        self.started.elapsed()
    }

    async fn finish(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let _ = self.acked;
        Arc::try_unwrap(self.tally)
            .ok()
            .expect("load tasks ended")
            .into_inner()
            .unwrap()
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// One drill's figures, as reported in docs/AVAILABILITY.md.
struct Figures {
    name: &'static str,
    tally: Tally,
    /// From the fault to the first acknowledged push that started after it.
    writes_resumed_s: Option<f64>,
    /// Longest time without an acknowledged push, from the fault on.
    write_gap_s: Option<f64>,
    note: String,
}

impl Figures {
    fn row(&mut self) -> String {
        let t = &mut self.tally;
        t.pull_ms.sort_by(f64::total_cmp);
        format!(
            "| {} | {} | {} / {} | {} | {} / {} | {:.0} / {:.0} | {} | {} | {} |",
            self.name,
            t.pushes,
            t.push_failed_first,
            t.push_failed,
            t.pulls,
            t.pull_failed_first,
            t.pull_failed,
            percentile(&t.pull_ms, 0.5),
            percentile(&t.pull_ms, 0.99),
            self.writes_resumed_s
                .map_or("-".to_string(), |s| format!("{s:.1} s")),
            self.write_gap_s
                .map_or("-".to_string(), |s| format!("{s:.1} s")),
            self.note
        )
    }
}

/// From `fault` to the first acknowledged push that started after it (so
/// it did not merely finish in flight).
fn writes_resumed(tally: &Tally, fault: Duration) -> Option<f64> {
    tally
        .push_done
        .iter()
        .filter(|(began, _)| *began >= fault)
        .map(|(_, done)| *done)
        .min()
        .map(|done| (done - fault).as_secs_f64())
}

/// The longest stretch from `fault` on without an acknowledged push.
fn write_gap(tally: &Tally, fault: Duration) -> Option<f64> {
    let mut done: Vec<Duration> = tally
        .push_done
        .iter()
        .map(|(_, d)| *d)
        .filter(|d| *d >= fault)
        .collect();
    done.sort();
    let first = *done.first()?;
    let mut gap = first - fault;
    for pair in done.windows(2) {
        gap = gap.max(pair[1] - pair[0]);
    }
    Some(gap.as_secs_f64())
}

async fn verify_all(client: &Client, lb: &str, acked: &Mutex<Vec<Image>>) -> usize {
    let images = acked.lock().unwrap().clone();
    for image in &images {
        let outcome = pull_image(client, lb, image).await;
        assert!(
            !outcome.failed,
            "acknowledged push {}:{} is not pullable",
            image.repo, image.tag
        );
    }
    images.len()
}

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
