//! The `berth` process under test: options, start and restart, kills, logs, HTTP helpers.

use super::*;

#[derive(Clone, Debug, Default)]
pub struct Options {
    pub args: Vec<String>,
    pub data_dir: Option<PathBuf>,
    pub env: Vec<(String, String)>,
    /// Listen on this port, also after restarts (peers know it).
    pub port: Option<u16>,
    /// The registry serves HTTPS (its flags name the certificate): URLs use
    /// https and clients trust the shared test CA.
    pub tls: bool,
    /// A client certificate (PEM key and chain) the readiness probe and the
    /// default client present, for registries that require one.
    pub client_identity: Option<Vec<u8>>,
}

impl Options {
    /// A client for a registry started with these options (outside the
    /// secure pass).
    fn own_client(&self) -> Client {
        let mut builder = client_builder_trusting(self.tls);
        if let Some(pem) = &self.client_identity {
            builder = builder.identity(reqwest::Identity::from_pem(pem).expect("client identity"));
        }
        builder.build().expect("client")
    }

    pub fn new() -> Self {
        Self::default()
    }
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }
    pub fn flag(self, name: &str, value: impl ToString) -> Self {
        self.arg(name).arg(value.to_string())
    }
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }
    /// Serve HTTPS with the shared test CA's server certificate.
    pub fn tls(mut self) -> Self {
        let server = crate::pki::shared_server();
        self.tls = true;
        self.flag("--tls-cert", server.cert.display())
            .flag("--tls-key", server.key.display())
    }
    /// Present this client certificate (PEM key and chain).
    pub fn client_identity(mut self, pem: Vec<u8>) -> Self {
        self.client_identity = Some(pem);
        self
    }
    /// Serve HTTPS with these files (the test rotates them).
    pub fn tls_files(mut self, cert: &Path, key: &Path) -> Self {
        self.tls = true;
        self.flag("--tls-cert", cert.display())
            .flag("--tls-key", key.display())
    }
    pub fn data_dir(mut self, d: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(d.into());
        self
    }
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.to_string(), v.to_string()));
        self
    }
}

pub struct Registry {
    tls: bool,
    workdir: tempfile::TempDir,
    data_dir: PathBuf,
    log_path: PathBuf,
    opts: Options,
    child: Option<Child>,
    port: u16,
    client: Client,
    exit_status: Option<ExitStatus>,
}

pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

impl Registry {
    pub async fn start() -> Registry {
        Self::start_with(Options::new()).await
    }

    pub async fn start_with(opts: Options) -> Registry {
        let workdir = tempfile::Builder::new()
            .prefix("berth-it-")
            .tempdir()
            .expect("tempdir");
        let data_dir = opts
            .data_dir
            .clone()
            .unwrap_or_else(|| workdir.path().join("data"));
        fs::create_dir_all(&data_dir).expect("create data dir");
        let log_path = workdir.path().join("berth.log");
        let pass = secure_pass() && !self_secured(&opts.args);
        let tls = opts.tls || pass;
        let client = if pass {
            berth_client()
        } else {
            opts.own_client()
        };
        let mut r = Registry {
            tls,
            workdir,
            data_dir,
            log_path,
            opts,
            child: None,
            port: 0,
            client,
            exit_status: None,
        };
        r.spawn_and_wait().await;
        r
    }

    async fn spawn_and_wait(&mut self) {
        let mut last_err = String::new();
        for _attempt in 0..4 {
            let port = self.opts.port.unwrap_or_else(free_port);
            self.port = port;
            self.exit_status = None;
            let mut log = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log_path)
                .expect("open log");
            writeln!(log, "===== berth-it: starting berth on port {port} =====").ok();
            let log2 = log.try_clone().expect("clone log");
            let args = if secure_pass() {
                secure_args(self.workdir.path(), &self.opts.args)
            } else {
                self.opts.args.clone()
            };
            let mut cmd = Command::new(BIN);
            cmd.arg("serve")
                .arg("--listen")
                .arg(format!("127.0.0.1:{port}"))
                .arg("--data-dir")
                .arg(&self.data_dir)
                .args(&args)
                .args(self.engine_args())
                .stdin(Stdio::null())
                .stdout(Stdio::from(log))
                .stderr(Stdio::from(log2));
            if !self.opts.env.iter().any(|(k, _)| k == "BERTH_LOG") {
                cmd.env("BERTH_LOG", "info");
            }
            for (k, v) in s3_env() {
                cmd.env(k, v);
            }
            for (k, v) in &self.opts.env {
                cmd.env(k, v);
            }
            // Make sure the server dies with the test process even if it aborts.
            unsafe {
                use std::os::unix::process::CommandExt as _;
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            let child = cmd
                .spawn()
                .unwrap_or_else(|e| panic!("failed to spawn {BIN}: {e}"));
            self.child = Some(child);
            match self.wait_ready(Duration::from_secs(15)).await {
                Ok(()) => {
                    // In the etcd pass the embedded database must not exist:
                    // otherwise the pass would silently test redb again.
                    if self.engine_args().iter().any(|a| a == "--metadata") {
                        assert!(
                            !self.data_dir.join("meta.redb").exists(),
                            "BERTH_IT_ETCD is set but berth created meta.redb"
                        );
                    }
                    return;
                }
                Err(e) => {
                    last_err = e;
                    let exited = self.exit_status.is_some();
                    if !exited {
                        break;
                    }
                    // The port may have been taken in between; try another one.
                }
            }
        }
        panic!(
            "berth did not become ready: {last_err}\n--- log tail ---\n{}",
            self.log_tail(80)
        );
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let url = format!("{}/readyz", self.url());
        let probe = if secure_pass() && !self_secured(&self.opts.args) {
            berth_client()
        } else {
            self.opts.own_client()
        };
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(st)) = child.try_wait()
            {
                self.exit_status = Some(st);
                self.child = None;
                return Err(format!("berth exited early with {st}"));
            }
            if let Ok(r) = probe.get(&url).timeout(Duration::from_secs(2)).send().await
                && r.status().as_u16() == 200
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill9();
                return Err(format!("/readyz not 200 within {timeout:?}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The engines of the etcd + S3 pass, unless the test chose its own.
    fn engine_args(&self) -> Vec<String> {
        let has = |flag: &str| self.opts.args.iter().any(|a| a == flag);
        let mut out = Vec::new();
        if !has("--metadata") {
            out.extend(etcd_metadata_args(&self.data_dir));
        }
        if !has("--storage") {
            out.extend(s3_storage_args(&self.data_dir));
        }
        out
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub fn tls(&self) -> bool {
        self.tls
    }

    pub fn host_port(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The client the helpers (`get`, `push_blob`, `Image::push`...) use:
    /// a security test makes it an administrator's.
    pub fn set_client(&mut self, client: Client) {
        self.client = client;
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("berth is not running").id()
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn workdir(&self) -> &Path {
        self.workdir.path()
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            None => false,
            Some(c) => match c.try_wait() {
                Ok(Some(st)) => {
                    self.exit_status = Some(st);
                    self.child = None;
                    false
                }
                _ => true,
            },
        }
    }

    /// SIGKILL the server and reap it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe {
                libc::kill(c.id() as libc::pid_t, libc::SIGKILL);
            }
            self.exit_status = c.wait().ok();
        }
    }

    /// Sends SIGTERM (does not wait).
    pub fn sigterm(&self) {
        if let Some(c) = self.child.as_ref() {
            unsafe {
                libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
            }
        }
    }

    /// Waits for the process to exit; returns its status or None on timeout.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.as_mut() {
                None => return self.exit_status,
                Some(c) => {
                    if let Ok(Some(st)) = c.try_wait() {
                        self.exit_status = Some(st);
                        self.child = None;
                        return Some(st);
                    }
                }
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Restarts the server on the same data directory (gracefully stopping it first
    /// if it is still running). The port changes.
    pub async fn restart(&mut self) {
        if self.is_running() {
            self.sigterm();
            if self.wait_exit(Duration::from_secs(30)).await.is_none() {
                self.kill9();
            }
        }
        self.client = if secure_pass() && !self_secured(&self.opts.args) {
            berth_client()
        } else {
            self.opts.own_client()
        };
        self.spawn_and_wait().await;
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let start = lines.len().saturating_sub(n);
        lines[start..].join("\n")
    }

    // ----- HTTP helpers -----

    /// `path` may be absolute (`http://...`) or a path (resolved against the base URL).
    pub fn resolve(&self, location: &str) -> String {
        let base = reqwest::Url::parse(&format!("{}/", self.url())).unwrap();
        base.join(location)
            .unwrap_or_else(|e| panic!("cannot resolve location {location:?}: {e}"))
            .to_string()
    }

    pub fn req(&self, method: Method, path: &str) -> RequestBuilder {
        let url = if path.starts_with("http://") || path.starts_with("https://") {
            path.to_string()
        } else {
            format!("{}{}", self.url(), path)
        };
        self.client.request(method, url)
    }

    pub async fn get(&self, path: &str) -> Resp {
        send(self.req(Method::GET, path)).await
    }

    pub async fn head(&self, path: &str) -> Resp {
        send(self.req(Method::HEAD, path)).await
    }

    pub async fn delete(&self, path: &str) -> Resp {
        send(self.req(Method::DELETE, path)).await
    }

    pub async fn post(&self, path: &str) -> Resp {
        send(
            self.req(Method::POST, path)
                .header("content-length", "0")
                .body(Vec::new()),
        )
        .await
    }

    pub async fn put_bytes(&self, path: &str, content_type: &str, body: Vec<u8>) -> Resp {
        send(
            self.req(Method::PUT, path)
                .header("content-type", content_type)
                .body(body),
        )
        .await
    }

    pub async fn patch_bytes(&self, path: &str, range: Option<&str>, body: Vec<u8>) -> Resp {
        let mut rb = self
            .req(Method::PATCH, path)
            .header("content-type", "application/octet-stream");
        if let Some(r) = range {
            rb = rb.header("content-range", r);
        }
        send(rb.body(body)).await
    }

    /// POST /v2/<repo>/blobs/uploads/ and return the absolute upload URL.
    pub async fn start_upload(&self, repo: &str) -> String {
        let r = self.post(&format!("/v2/{repo}/blobs/uploads/")).await;
        assert_eq!(r.status, 202, "POST upload: {}", r.describe());
        let loc = r
            .header("location")
            .unwrap_or_else(|| panic!("POST upload without Location: {}", r.describe()));
        self.resolve(&loc)
    }

    /// Monolithic POST + PUT upload; returns the digest.
    pub async fn push_blob(&self, repo: &str, bytes: &[u8]) -> String {
        let digest = sha256_digest(bytes);
        let loc = self.start_upload(repo).await;
        let r = self
            .put_bytes(
                &with_query(&loc, "digest", &digest),
                "application/octet-stream",
                bytes.to_vec(),
            )
            .await;
        assert_eq!(r.status, 201, "PUT blob upload: {}", r.describe());
        assert!(
            r.header("location").is_some(),
            "201 without Location: {}",
            r.describe()
        );
        digest
    }

    pub async fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> String {
        let digest = sha256_digest(bytes);
        let r = self
            .put_bytes(
                &format!("/v2/{repo}/manifests/{reference}"),
                media_type,
                bytes.to_vec(),
            )
            .await;
        assert_eq!(
            r.status,
            201,
            "PUT manifest {repo}:{reference}: {}",
            r.describe()
        );
        assert_eq!(
            r.digest_header().as_deref(),
            Some(digest.as_str()),
            "Docker-Content-Digest of manifest PUT: {}",
            r.describe()
        );
        digest
    }

    pub async fn blob_bytes(&self, repo: &str, digest: &str) -> Vec<u8> {
        let r = self.get(&format!("/v2/{repo}/blobs/{digest}")).await;
        assert_eq!(r.status, 200, "GET blob {repo}@{digest}: {}", r.describe());
        r.body.to_vec()
    }

    /// The digest `repo:reference` resolves to (a HEAD), if it does.
    pub async fn manifest_digest(&self, repo: &str, reference: &str) -> Option<String> {
        let r = self
            .req(Method::HEAD, &format!("/v2/{repo}/manifests/{reference}"))
            .header("accept", MANIFEST_ACCEPT)
            .send()
            .await
            .expect("HEAD manifest");
        if !r.status().is_success() {
            return None;
        }
        r.headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    pub async fn tags(&self, repo: &str) -> Vec<String> {
        let r = self.get(&format!("/v2/{repo}/tags/list")).await;
        assert_eq!(r.status, 200, "tags/list {repo}: {}", r.describe());
        let v = r.json();
        match v.get("tags") {
            Some(Value::Array(a)) => a.iter().map(|t| t.as_str().unwrap().to_string()).collect(),
            Some(Value::Null) | None => Vec::new(),
            other => panic!("bad tags field {other:?}"),
        }
    }

    /// Sends a raw HTTP/1.1 request over a fresh TCP connection and reads the response
    /// until the server closes the connection (or `timeout`).
    pub async fn raw(&self, request: &[u8], timeout: Duration) -> RawResp {
        raw_request_to(&self.host_port(), self.tls, request, timeout).await
    }

    /// An open connection for hand-written requests (TLS when it serves
    /// TLS).
    pub async fn raw_stream(&self) -> RawConn {
        raw_connect(&self.host_port(), self.tls).await
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- berth log tail ({}) ---\n{}\n--- end of berth log ---",
                self.log_path.display(),
                self.log_tail(60)
            );
        }
        self.kill9();
    }
}
