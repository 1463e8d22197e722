//! The processes of a drill: etcd members, Garage nodes, Berth nodes and
//! haproxy, one of each per zone, started, killed and inspected.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::Client;

use super::ZONES;
use crate::support::*;

pub(super) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub(super) fn garage_bin() -> Option<PathBuf> {
    let home = std::env::var("HOME").unwrap_or_default();
    [
        std::env::var("GARAGE_BIN").ok().map(PathBuf::from),
        Some(PathBuf::from(format!("{home}/.cargo/bin/garage"))),
    ]
    .into_iter()
    .flatten()
    .find(|p| p.exists())
}

pub(super) fn have(program: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The tools the topology needs, or why the test is skipped (a failure
/// when `BERTH_REQUIRE_CLUSTER=1`, as in CI).
pub(super) fn cluster_tools() -> Option<PathBuf> {
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
pub(super) struct Proc {
    pub(super) name: String,
    pub(super) program: PathBuf,
    pub(super) args: Vec<String>,
    pub(super) env: Vec<(String, String)>,
    pub(super) log: PathBuf,
    pub(super) child: Option<Child>,
}

impl Proc {
    pub(super) fn new(
        name: &str,
        program: impl Into<PathBuf>,
        args: Vec<String>,
        dir: &Path,
    ) -> Proc {
        Proc {
            name: name.to_string(),
            program: program.into(),
            args,
            env: Vec::new(),
            log: dir.join(format!("{name}.log")),
            child: None,
        }
    }

    pub(super) fn start(&mut self) {
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

    pub(super) fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for the process to exit on its own.
    pub(super) fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
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

    pub(super) fn log_tail(&self, n: usize) -> String {
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

pub(super) struct Topology {
    pub(super) dir: tempfile::TempDir,
    pub(super) etcd: Vec<Proc>,
    pub(super) garage: Vec<Proc>,
    pub(super) berth: Vec<Proc>,
    pub(super) berth_ports: Vec<u16>,
    pub(super) haproxy: Proc,
    pub(super) lb: String,
    pub(super) metadata: String,
    pub(super) s3_env: Vec<Vec<(String, String)>>,
}

pub(super) async fn wait_for(
    what: &str,
    timeout: Duration,
    mut ok: impl AsyncFnMut() -> bool,
) -> Duration {
    let start = Instant::now();
    while !ok().await {
        assert!(start.elapsed() < timeout, "{what} not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    start.elapsed()
}

pub(super) async fn http_ok(client: &Client, url: &str) -> bool {
    client
        .get(url)
        .timeout(Duration::from_secs(1))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

impl Topology {
    pub(super) async fn start(garage: &Path) -> Topology {
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

    pub(super) async fn wait_berth_ready(&self, i: usize) -> Duration {
        let client = new_client();
        let url = format!("http://127.0.0.1:{}/readyz", self.berth_ports[i]);
        let name = self.berth[i].name.clone();
        wait_for(&name, Duration::from_secs(30), async || {
            http_ok(&client, &url).await
        })
        .await
    }

    /// Runs `berth cluster status` with this topology's configuration.
    pub(super) fn cluster_status(&self) -> (bool, String) {
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
    pub(super) fn leader_of(&self, job: &str) -> Option<String> {
        let (_, text) = self.cluster_status();
        text.lines()
            .find(|l| l.trim_start().starts_with("berth-") && l.contains(job))
            .and_then(|l| l.split_whitespace().next())
            .map(str::to_string)
    }

    pub(super) fn describe(&self) -> String {
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
