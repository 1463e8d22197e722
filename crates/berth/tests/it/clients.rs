//! The real clients against Berth over TLS with authentication: skopeo,
//! podman, buildah, containerd's `ctr` and oras (oras-py), each signing in,
//! pushing, pulling, and refused with a wrong password and with a user that
//! lacks push. Three ways: htpasswd users with Basic challenges, the same
//! users through the built-in token service, and API tokens.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::pki::{self, Pki};
use crate::security::{ALICE, BOB, ROOT, Secured, basic, client_with};
use crate::support::*;

fn have(tool: &str, arg: &str) -> bool {
    std::process::Command::new(tool)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The Python with oras-py (scripts/test makes a virtualenv for it).
fn oras_python() -> Option<String> {
    let python = std::env::var("BERTH_ORAS_PYTHON").ok()?;
    std::process::Command::new(&python)
        .args(["-c", "import oras.provider"])
        .status()
        .is_ok_and(|s| s.success())
        .then_some(python)
}

fn clients_available() -> bool {
    let missing: Vec<&str> = [
        ("skopeo", have("skopeo", "--version")),
        ("podman", have("podman", "--version")),
        ("buildah", have("buildah", "--version")),
        ("ctr", have("ctr", "--version")),
        ("containerd", have("containerd", "--version")),
        ("oras (BERTH_ORAS_PYTHON)", oras_python().is_some()),
        ("openssl/htpasswd", pki::tools_available()),
    ]
    .into_iter()
    .filter(|(_, ok)| !ok)
    .map(|(name, _)| name)
    .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var_os("BERTH_REQUIRE_SECURITY").is_some() {
        panic!("real clients missing: {missing:?}");
    }
    eprintln!("SKIPPED: missing {missing:?}");
    false
}

/// A command's outcome: exit status and what it printed.
struct Ran {
    ok: bool,
    output: String,
}

async fn run(program: &str, args: &[&str], env: &[(&str, &str)], cwd: &Path) -> Ran {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).current_dir(cwd).kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(180), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} timed out"))
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    Ran {
        ok: out.status.success(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Who pushes, who may only pull, and a credential that is wrong.
struct Cast {
    pusher: (String, String),
    puller: (String, String),
    wrong: (String, String),
}

/// Everything the clients need, under one directory.
struct Lab {
    dir: PathBuf,
    host: String,
    cert_dir: PathBuf,
    hosts_dir: PathBuf,
    containerd: tokio::process::Child,
    socket: PathBuf,
}

impl Lab {
    async fn start(dir: &Path, host: &str) -> Lab {
        let cert_dir = dir.join("certs");
        std::fs::create_dir_all(&cert_dir).unwrap();
        std::fs::copy(Pki::shared().ca(), cert_dir.join("ca.crt")).unwrap();
        // containerd with its own root, state and socket; no CRI.
        let ctd = dir.join("containerd");
        std::fs::create_dir_all(&ctd).unwrap();
        let socket = ctd.join("containerd.sock");
        std::fs::write(
            ctd.join("config.toml"),
            format!(
                "version = 2\nroot = \"{0}/root\"\nstate = \"{0}/state\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{1}\"\n[ttrpc]\n  address = \"{1}.ttrpc\"\n[plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{0}/opt\"\n",
                ctd.display(),
                socket.display()
            ),
        )
        .unwrap();
        let containerd = tokio::process::Command::new("containerd")
            .arg("--config")
            .arg(ctd.join("config.toml"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(ctd.join("containerd.log")).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        assert!(
            eventually(Duration::from_secs(20), || async { socket.exists() }).await,
            "containerd did not start"
        );
        // ctr uses plain HTTP for 127.0.0.1 unless a hosts.toml says TLS.
        let hosts_dir = dir.join("hosts");
        std::fs::create_dir_all(hosts_dir.join(host)).unwrap();
        std::fs::write(
            hosts_dir.join(host).join("hosts.toml"),
            format!(
                "server = \"https://{host}\"\n[host.\"https://{host}\"]\n  capabilities = [\"pull\", \"resolve\", \"push\"]\n  ca = \"{}\"\n",
                Pki::shared().ca().display()
            ),
        )
        .unwrap();
        std::fs::create_dir_all(dir.join("home")).unwrap();
        std::fs::write(dir.join("registries.conf"), "").unwrap();
        std::fs::write(dir.join("auth-default.json"), "{}").unwrap();
        Lab {
            dir: dir.to_path_buf(),
            host: host.to_string(),
            cert_dir,
            hosts_dir,
            containerd,
            socket,
        }
    }

    fn env(&self) -> Vec<(String, String)> {
        vec![
            (
                "CONTAINERS_REGISTRIES_CONF".into(),
                self.dir.join("registries.conf").display().to_string(),
            ),
            ("HOME".into(), self.dir.join("home").display().to_string()),
            (
                "REGISTRY_AUTH_FILE".into(),
                self.dir.join("auth-default.json").display().to_string(),
            ),
        ]
    }

    async fn tool(&self, program: &str, args: &[String]) -> Ran {
        let env = self.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run(program, &args, &env, &self.dir).await
    }

    fn storage(&self, tool: &str) -> Vec<String> {
        let mut out = vec![
            "--root".into(),
            self.dir.join(tool).join("root").display().to_string(),
            "--runroot".into(),
            self.dir.join(tool).join("run").display().to_string(),
            "--storage-driver".into(),
            "vfs".into(),
        ];
        if tool == "podman" {
            out.extend(
                ["--cgroup-manager", "cgroupfs", "--events-backend", "none"].map(String::from),
            );
        }
        out
    }

    async fn podman(&self, args: &[&str]) -> Ran {
        let mut all = self.storage("podman");
        all.extend(args.iter().map(|a| a.to_string()));
        self.tool("podman", &all).await
    }

    async fn buildah(&self, args: &[&str]) -> Ran {
        let mut all = self.storage("buildah");
        all.extend(args.iter().map(|a| a.to_string()));
        self.tool("buildah", &all).await
    }

    async fn skopeo(&self, args: &[&str]) -> Ran {
        self.tool(
            "skopeo",
            &args.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        )
        .await
    }

    async fn ctr(&self, args: &[&str]) -> Ran {
        let mut all = vec!["-a".to_string(), self.socket.display().to_string()];
        all.extend(args.iter().map(|a| a.to_string()));
        self.tool("ctr", &all).await
    }

    async fn oras(&self, args: &[&str]) -> Ran {
        let script = self.dir.join("oras_run.py");
        std::fs::write(&script, ORAS_SCRIPT).unwrap();
        let mut all = vec![script.display().to_string()];
        all.extend(args.iter().map(|a| a.to_string()));
        all.insert(1, Pki::shared().ca().display().to_string());
        self.tool(&oras_python().unwrap(), &all).await
    }

    /// `TOOL login` into `auth_file`: skopeo, podman and buildah share
    /// containers/common's login command.
    async fn login(&self, tool: &str, auth_file: &str, who: (&str, &str)) -> Ran {
        let cert_dir = self.cert_dir.display().to_string();
        let args = [
            "login",
            "--cert-dir",
            &cert_dir,
            "--authfile",
            auth_file,
            "-u",
            who.0,
            "-p",
            who.1,
            &self.host,
        ];
        match tool {
            "podman" => self.podman(&args).await,
            "buildah" => self.buildah(&args).await,
            _ => self.skopeo(&args).await,
        }
    }

    fn auth_file(&self, name: &str) -> String {
        self.dir
            .join(format!("auth-{name}.json"))
            .display()
            .to_string()
    }

    /// An image of the lab's own: a file tree imported into podman, also
    /// copied to an OCI layout (for skopeo) and an OCI archive (for ctr).
    async fn image(&self, name: &str) -> String {
        let rootfs = self.dir.join(format!("rootfs-{name}"));
        std::fs::create_dir_all(&rootfs).unwrap();
        std::fs::write(rootfs.join("payload"), random_bytes(fresh_seed(), 300_000)).unwrap();
        std::fs::write(rootfs.join("name.txt"), name).unwrap();
        let tar = self.dir.join(format!("{name}.tar"));
        let status = std::process::Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .status()
            .unwrap();
        assert!(status.success());
        let local = format!("localhost/lab/{name}:1");
        expect_ok(
            self.podman(&["import", "-q", tar.to_str().unwrap(), &local])
                .await,
            "import",
        );
        let storage = format!(
            "containers-storage:[vfs@{}+{}]{local}",
            self.dir.join("podman/root").display(),
            self.dir.join("podman/run").display()
        );
        let layout = format!(
            "oci:{}:1",
            self.dir.join(format!("{name}-layout")).display()
        );
        expect_ok(
            self.skopeo(&["copy", "-q", &storage, &layout]).await,
            "to layout",
        );
        let archive = format!(
            "oci-archive:{}:{}/team/{name}:1",
            self.dir.join(format!("{name}.oci.tar")).display(),
            self.host
        );
        expect_ok(
            self.skopeo(&["copy", "-q", &storage, &archive]).await,
            "to archive",
        );
        local
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.containerd.start_kill();
    }
}

const ORAS_SCRIPT: &str = r#"
import sys
import oras.provider
ca, op, host, user, password, backend, target, path = sys.argv[1:9]
registry = oras.provider.Registry(hostname=host, tls_verify=ca, auth_backend=backend)
registry.auth.set_basic_auth(user, password)
if op == "push":
    registry.push(target=target, files=[path], disable_path_validation=True)
else:
    print(registry.pull(target=target, outdir=path))
"#;

#[track_caller]
fn expect_ok(ran: Ran, what: &str) {
    assert!(ran.ok, "{what} must succeed:\n{}", ran.output);
}

#[track_caller]
fn expect_refused(ran: Ran, what: &str, any_of: &[&str]) {
    assert!(!ran.ok, "{what} must be refused:\n{}", ran.output);
    let text = ran.output.to_lowercase();
    assert!(
        any_of.iter().any(|needle| text.contains(needle)),
        "{what}: expected one of {any_of:?} in:\n{}",
        ran.output
    );
}

const WRONG: &[&str] = &[
    "unauthorized",
    "invalid username/password",
    "401",
    "authentication",
];
const NOT_ALLOWED: &[&str] = &["denied", "403", "may not push", "unauthorized"];

/// What every client does in one mode.
async fn every_client(s: &Secured, lab: &Lab, cast: &Cast, mode: &str, token_service: bool) {
    let host = lab.host.clone();
    let cert_dir = lab.cert_dir.display().to_string();
    let (pu, pp) = (cast.pusher.0.as_str(), cast.pusher.1.as_str());
    let (ru, rp) = (cast.puller.0.as_str(), cast.puller.1.as_str());
    let (xu, xp) = (cast.wrong.0.as_str(), cast.wrong.1.as_str());
    let push_creds = format!("{pu}:{pp}");
    let pull_creds = format!("{ru}:{rp}");
    let wrong_creds = format!("{xu}:{xp}");

    // --- skopeo
    lab.image(&format!("{mode}-sk")).await;
    let layout = format!(
        "oci:{}:1",
        lab.dir.join(format!("{mode}-sk-layout")).display()
    );
    let push_auth = lab.auth_file(&format!("{mode}-skopeo-push"));
    expect_ok(
        lab.login("skopeo", &push_auth, (pu, pp)).await,
        "skopeo login",
    );
    let target = format!("docker://{host}/team/{mode}-app:1");
    expect_ok(
        lab.skopeo(&[
            "copy",
            "--dest-cert-dir",
            &cert_dir,
            "--authfile",
            &push_auth,
            &layout,
            &target,
        ])
        .await,
        "skopeo push",
    );
    let out = format!("oci:{}:1", lab.dir.join(format!("{mode}-sk-out")).display());
    expect_ok(
        lab.skopeo(&[
            "copy",
            "--src-cert-dir",
            &cert_dir,
            "--src-creds",
            &pull_creds,
            &target,
            &out,
        ])
        .await,
        "skopeo pull",
    );
    let pushed = layout_blobs(&lab.dir.join(format!("{mode}-sk-layout")));
    let pulled = layout_blobs(&lab.dir.join(format!("{mode}-sk-out")));
    assert_eq!(
        pushed, pulled,
        "skopeo: what was pushed comes back byte for byte"
    );
    lab.image(&format!("{mode}-sk2")).await;
    let other_layout = format!(
        "oci:{}:1",
        lab.dir.join(format!("{mode}-sk2-layout")).display()
    );
    expect_refused(
        lab.skopeo(&[
            "copy",
            "--dest-cert-dir",
            &cert_dir,
            "--dest-creds",
            &pull_creds,
            &other_layout,
            &format!("docker://{host}/team/{mode}-app:nope"),
        ])
        .await,
        "skopeo push without push",
        NOT_ALLOWED,
    );
    expect_refused(
        lab.login(
            "skopeo",
            &lab.auth_file(&format!("{mode}-skopeo-bad")),
            (xu, xp),
        )
        .await,
        "skopeo login with a wrong password",
        WRONG,
    );

    // --- podman
    let pd = lab.image(&format!("{mode}-pd")).await;
    let pd_auth = lab.auth_file(&format!("{mode}-podman-push"));
    expect_ok(
        lab.login("podman", &pd_auth, (pu, pp)).await,
        "podman login",
    );
    let remote = format!("{host}/team/{mode}-pod:1");
    expect_ok(
        lab.podman(&[
            "push",
            "--cert-dir",
            &cert_dir,
            "--authfile",
            &pd_auth,
            &pd,
            &remote,
        ])
        .await,
        "podman push",
    );
    expect_ok(lab.podman(&["rmi", &pd]).await, "podman rmi");
    expect_ok(
        lab.podman(&[
            "pull",
            "--cert-dir",
            &cert_dir,
            "--creds",
            &pull_creds,
            &remote,
        ])
        .await,
        "podman pull",
    );
    let pd2 = lab.image(&format!("{mode}-pd2")).await;
    expect_refused(
        lab.podman(&[
            "push",
            "--cert-dir",
            &cert_dir,
            "--creds",
            &pull_creds,
            &pd2,
            &format!("{host}/team/{mode}-pod:nope"),
        ])
        .await,
        "podman push without push",
        NOT_ALLOWED,
    );
    expect_refused(
        lab.login(
            "podman",
            &lab.auth_file(&format!("{mode}-podman-bad")),
            (xu, xp),
        )
        .await,
        "podman login with a wrong password",
        WRONG,
    );

    // --- buildah
    let bd_auth = lab.auth_file(&format!("{mode}-buildah-push"));
    expect_ok(
        lab.login("buildah", &bd_auth, (pu, pp)).await,
        "buildah login",
    );
    let app = format!("{host}/team/{mode}-app:1");
    expect_ok(
        lab.buildah(&[
            "pull",
            "--policy",
            "always",
            "--cert-dir",
            &cert_dir,
            "--authfile",
            &bd_auth,
            &app,
        ])
        .await,
        "buildah pull",
    );
    expect_ok(
        lab.buildah(&[
            "push",
            "--cert-dir",
            &cert_dir,
            "--authfile",
            &bd_auth,
            &app,
            &format!("docker://{host}/team/{mode}-app:buildah"),
        ])
        .await,
        "buildah push",
    );
    let container = lab.buildah(&["from", "scratch"]).await;
    assert!(container.ok, "{}", container.output);
    let container = container.output.trim().lines().last().unwrap().to_string();
    let file = lab.dir.join(format!("{mode}-built.txt"));
    std::fs::write(&file, format!("built in {mode} {}", fresh_seed())).unwrap();
    expect_ok(
        lab.buildah(&["copy", &container, file.to_str().unwrap(), "/built.txt"])
            .await,
        "buildah copy",
    );
    expect_ok(
        lab.buildah(&["commit", "-q", &container, &format!("lab/{mode}-built:1")])
            .await,
        "buildah commit",
    );
    expect_refused(
        lab.buildah(&[
            "push",
            "--cert-dir",
            &cert_dir,
            "--creds",
            &pull_creds,
            &format!("lab/{mode}-built:1"),
            &format!("docker://{host}/team/{mode}-built:1"),
        ])
        .await,
        "buildah push without push",
        NOT_ALLOWED,
    );
    expect_ok(
        lab.buildah(&[
            "push",
            "--cert-dir",
            &cert_dir,
            "--authfile",
            &bd_auth,
            &format!("lab/{mode}-built:1"),
            &format!("docker://{host}/team/{mode}-built:1"),
        ])
        .await,
        "buildah push of a built image",
    );
    expect_refused(
        lab.buildah(&[
            "pull",
            "--policy",
            "always",
            "--cert-dir",
            &cert_dir,
            "--creds",
            &wrong_creds,
            &app,
        ])
        .await,
        "buildah pull with a wrong password",
        WRONG,
    );

    // --- containerd
    let hosts = lab.hosts_dir.display().to_string();
    expect_ok(
        lab.ctr(&[
            "images",
            "pull",
            "--snapshotter",
            "native",
            "--user",
            &pull_creds,
            "--hosts-dir",
            &hosts,
            &app,
        ])
        .await,
        "ctr pull",
    );
    lab.image(&format!("{mode}-ct")).await;
    let archive = lab.dir.join(format!("{mode}-ct.oci.tar"));
    expect_ok(
        lab.ctr(&[
            "images",
            "import",
            "--snapshotter",
            "native",
            archive.to_str().unwrap(),
        ])
        .await,
        "ctr import",
    );
    let ctr_ref = format!("{host}/team/{mode}-ct:1");
    expect_refused(
        lab.ctr(&[
            "images",
            "push",
            "--user",
            &pull_creds,
            "--hosts-dir",
            &hosts,
            &ctr_ref,
        ])
        .await,
        "ctr push without push",
        &["403", "denied", "401", "unauthorized"],
    );
    expect_ok(
        lab.ctr(&[
            "images",
            "push",
            "--user",
            &push_creds,
            "--hosts-dir",
            &hosts,
            &ctr_ref,
        ])
        .await,
        "ctr push",
    );
    expect_refused(
        lab.ctr(&[
            "images",
            "pull",
            "--snapshotter",
            "native",
            "--user",
            &wrong_creds,
            "--hosts-dir",
            &hosts,
            &ctr_ref,
        ])
        .await,
        "ctr pull with a wrong password",
        &["401", "unauthorized"],
    );

    // --- oras (oras-py); its Basic backend works in every mode, and its
    // token backend pulls (its pushes reuse a pull-only token: an oras-py
    // bug, oras-project/oras-py#187).
    let artifact = lab.dir.join(format!("{mode}-artifact.txt"));
    std::fs::write(&artifact, format!("an artifact for {mode}")).unwrap();
    let target = format!("{host}/team/{mode}-art:1");
    let art = artifact.file_name().unwrap().to_str().unwrap();
    expect_ok(
        lab.oras(&["push", &host, pu, pp, "basic", &target, art])
            .await,
        "oras push",
    );
    let out_dir = lab.dir.join(format!("{mode}-oras-out"));
    expect_ok(
        lab.oras(&[
            "pull",
            &host,
            ru,
            rp,
            "basic",
            &target,
            out_dir.to_str().unwrap(),
        ])
        .await,
        "oras pull",
    );
    assert_eq!(
        std::fs::read(out_dir.join(art)).unwrap(),
        std::fs::read(&artifact).unwrap()
    );
    if token_service {
        let out_dir = lab.dir.join(format!("{mode}-oras-token-out"));
        expect_ok(
            lab.oras(&[
                "pull",
                &host,
                ru,
                rp,
                "token",
                &target,
                out_dir.to_str().unwrap(),
            ])
            .await,
            "oras pull by token",
        );
    }
    expect_refused(
        lab.oras(&[
            "push",
            &host,
            ru,
            rp,
            "basic",
            &format!("{host}/team/{mode}-art:nope"),
            art,
        ])
        .await,
        "oras push without push",
        &["denied", "may not push"],
    );
    expect_refused(
        lab.oras(&[
            "pull",
            &host,
            xu,
            xp,
            "basic",
            &target,
            out_dir.to_str().unwrap(),
        ])
        .await,
        "oras pull with a wrong password",
        &["unauthorized", "401"],
    );

    // Every push landed; nothing failed on the server's side.
    for (repo, tag) in [
        (format!("team/{mode}-app"), "1"),
        (format!("team/{mode}-app"), "buildah"),
        (format!("team/{mode}-pod"), "1"),
        (format!("team/{mode}-built"), "1"),
        (format!("team/{mode}-ct"), "1"),
        (format!("team/{mode}-art"), "1"),
    ] {
        let r = send(
            client_with(Some(&basic(ROOT)))
                .get(format!("{}/v2/{repo}/manifests/{tag}", s.reg.url())),
        )
        .await;
        assert_eq!(r.status, 200, "{repo}:{tag}: {}", r.describe());
    }
    assert!(
        !s.reg.log().contains("request failed"),
        "a 5xx: {}",
        s.reg.log_tail(40)
    );
}

fn layout_blobs(dir: &Path) -> std::collections::BTreeSet<String> {
    std::fs::read_dir(dir.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn users() -> Cast {
    Cast {
        pusher: (ALICE.0.into(), ALICE.1.into()),
        puller: (BOB.0.into(), BOB.1.into()),
        wrong: (ALICE.0.into(), "not-alices-password".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_with_htpasswd_and_basic_challenges() {
    if !clients_available() {
        return;
    }
    let s = Secured::start(Options::new().flag("--token-service", "false")).await;
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::start(dir.path(), &s.reg.host_port()).await;
    every_client(&s, &lab, &users(), "basic", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_with_the_token_service() {
    if !clients_available() {
        return;
    }
    let s = Secured::start(Options::new()).await;
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::start(dir.path(), &s.reg.host_port()).await;
    every_client(&s, &lab, &users(), "token", true).await;
    // Tokens were issued along the way, to containerd's OAuth2 form too.
    let events = s.audit_events();
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "token_issued" && e["method"] == "POST")
    );
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "token_issued" && e["method"] == "GET")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_with_api_tokens() {
    if !clients_available() {
        return;
    }
    let s = Secured::start(Options::new()).await;
    let create = |name: &str, actions: &str| {
        let out = s
            .cli(ROOT)
            .args([
                "token",
                "create",
                name,
                "--repositories",
                "team/*",
                "--actions",
                actions,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let push = create("ci-push", "pull,push");
    let pull = create("ci-pull", "pull");
    let mut wrong = push.clone();
    wrong.replace_range(wrong.len() - 6.., "XXXXXX");
    let cast = Cast {
        pusher: ("ci".into(), push),
        puller: ("puller".into(), pull),
        wrong: ("ci".into(), wrong),
    };
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::start(dir.path(), &s.reg.host_port()).await;
    every_client(&s, &lab, &cast, "apitoken", true).await;
    let events = s.audit_events();
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "push" && e["identity"] == "token:ci-push")
    );
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "denied" && e["identity"] == "token:ci-pull")
    );
}
