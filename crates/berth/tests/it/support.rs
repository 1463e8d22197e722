//! Test harness: spawns the `berth` binary on a free loopback port with its own data
//! directory and offers small HTTP helpers for the OCI distribution API.
#![allow(dead_code)]

use std::fs;
use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::header::HeaderMap;
use reqwest::{Client, Method, RequestBuilder};
use rustls_pki_types::pem::PemObject as _;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

pub const BIN: &str = env!("CARGO_BIN_EXE_berth");

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
pub const EMPTY_DIGEST: &str =
    "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// Error codes defined by the OCI distribution spec.
pub const SPEC_ERROR_CODES: &[&str] = &[
    "BLOB_UNKNOWN",
    "BLOB_UPLOAD_INVALID",
    "BLOB_UPLOAD_UNKNOWN",
    "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN",
    "MANIFEST_INVALID",
    "MANIFEST_UNKNOWN",
    "NAME_INVALID",
    "NAME_UNKNOWN",
    "SIZE_INVALID",
    "UNAUTHORIZED",
    "DENIED",
    "UNSUPPORTED",
    "TOOMANYREQUESTS",
];

// ---------------------------------------------------------------------------
// Digests and deterministic data
// ---------------------------------------------------------------------------

pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub fn finish_digest(h: Sha256) -> String {
    format!("sha256:{}", hex::encode(h.finalize()))
}

#[inline]
fn mix(seed: u64, word: u64) -> u64 {
    let mut z = seed ^ word.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills `buf` with the bytes at `offset..offset+len` of an infinite, seekable
/// pseudo-random stream identified by `seed`.
pub fn fill_pattern(seed: u64, offset: u64, buf: &mut [u8]) {
    let mut pos = offset;
    let mut i = 0;
    // unaligned head
    while i < buf.len() && !pos.is_multiple_of(8) {
        buf[i] = mix(seed, pos / 8).to_le_bytes()[(pos % 8) as usize];
        i += 1;
        pos += 1;
    }
    let first_word = pos / 8;
    for (word, chunk) in (first_word..).zip(buf[i..].chunks_mut(8)) {
        let w = mix(seed, word).to_le_bytes();
        let n = chunk.len();
        chunk.copy_from_slice(&w[..n]);
    }
}

pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill_pattern(seed, 0, &mut v);
    v
}

/// A seed that differs between calls (and between test processes).
pub fn fresh_seed() -> u64 {
    rand::random::<u64>()
}

/// Digest of `len` bytes of the pattern stream `seed`, computed chunk by chunk.
pub fn pattern_digest(seed: u64, len: u64) -> String {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < len {
        let n = ((len - off) as usize).min(buf.len());
        fill_pattern(seed, off, &mut buf[..n]);
        h.update(&buf[..n]);
        off += n as u64;
    }
    finish_digest(h)
}

/// A request body streaming `len` bytes of the pattern `seed`, in `chunk` sized pieces.
pub fn pattern_body(seed: u64, len: u64, chunk: usize) -> reqwest::Body {
    let stream = futures_util::stream::unfold(0u64, move |off| async move {
        if off >= len {
            return None;
        }
        let n = ((len - off) as usize).min(chunk);
        let mut buf = vec![0u8; n];
        fill_pattern(seed, off, &mut buf);
        Some((
            Ok::<Bytes, std::io::Error>(Bytes::from(buf)),
            off + n as u64,
        ))
    });
    reqwest::Body::wrap_stream(stream)
}

// ---------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response body is not JSON ({e}); status {}, body: {}",
                self.status,
                truncate(&self.text(), 2000)
            )
        })
    }

    /// The `Content-Length` header value (works for HEAD responses too).
    pub fn content_length(&self) -> Option<u64> {
        self.header("content-length")
            .and_then(|v| v.trim().parse().ok())
    }

    pub fn digest_header(&self) -> Option<String> {
        self.header("docker-content-digest")
    }

    /// Error codes in a spec error body; panics if the body is not a spec error body.
    pub fn error_codes(&self) -> Vec<String> {
        check_error_body(self)
    }

    pub fn describe(&self) -> String {
        format!(
            "status {} headers {:?} body {}",
            self.status,
            self.headers,
            truncate(&self.text(), 2000)
        )
    }
}

pub fn truncate(s: &str, n: usize) -> String {
    if s.len() <= n {
        s.to_string()
    } else {
        let mut end = n;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…({} bytes)", &s[..end], s.len())
    }
}

/// Validates the spec error body format and returns the codes.
pub fn check_error_body(r: &Resp) -> Vec<String> {
    let v: Value = serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("error response body is not JSON ({e}): {}", r.describe()));
    let errors = v
        .get("errors")
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("error body has no `errors` array: {}", r.describe()));
    assert!(
        !errors.is_empty(),
        "error body has an empty `errors` array: {}",
        r.describe()
    );
    let mut codes = Vec::new();
    for e in errors {
        let code = e
            .get("code")
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("error entry without string `code`: {}", r.describe()));
        assert!(
            !code.is_empty() && code.chars().all(|c| c.is_ascii_uppercase() || c == '_'),
            "error code {code:?} is not uppercase letters and underscores: {}",
            r.describe()
        );
        // Berth's documented extensions (docs/operations.md), for situations
        // the spec's table has no code for; each only with its own status.
        let extension_ok = match code {
            "UNKNOWN" => r.status >= 500,
            "UNAVAILABLE" => r.status == 503,
            "RANGE_INVALID" => r.status == 416,
            _ => false,
        };
        assert!(
            SPEC_ERROR_CODES.contains(&code) || extension_ok,
            "error code {code:?} is not one of the spec's codes (nor an extension with its status): {}",
            r.describe()
        );
        if let Some(m) = e.get("message") {
            assert!(
                m.is_string(),
                "error `message` must be a string: {}",
                r.describe()
            );
        }
        codes.push(code.to_string());
    }
    codes
}

/// Asserts the status and that the body is a spec error whose first code is one of `codes`.
#[track_caller]
pub fn expect_error(r: &Resp, status: u16, codes: &[&str]) {
    assert_eq!(r.status, status, "unexpected status: {}", r.describe());
    let got = check_error_body(r);
    assert!(
        got.iter().any(|c| codes.contains(&c.as_str())),
        "expected error code in {codes:?}, got {got:?}: {}",
        r.describe()
    );
}

/// Asserts the response is not a server error; for 4xx with a body it must be a spec error body.
#[track_caller]
pub fn expect_no_5xx(r: &Resp, what: &str) {
    assert!(r.status < 500, "{what}: server error: {}", r.describe());
}

pub async fn send(rb: RequestBuilder) -> Resp {
    try_send(rb)
        .await
        .unwrap_or_else(|e| panic!("request failed: {e:?}"))
}

/// Like [`send`], but returns transport errors instead of panicking.
///
/// Idempotent requests without a body (GET/HEAD) are retried once on a transport error,
/// as HTTP clients do when a pooled keep-alive connection was closed by the server
/// (RFC 9112 section 9.3.1); this keeps such races from making tests flaky.
pub async fn try_send(rb: RequestBuilder) -> Result<Resp, reqwest::Error> {
    let retry = rb.try_clone().filter(|c| {
        c.try_clone()
            .and_then(|c| c.build().ok())
            .is_some_and(|r| matches!(*r.method(), Method::GET | Method::HEAD))
    });
    match try_send_once(rb).await {
        Err(e) if retry.is_some() => {
            eprintln!("retrying idempotent request after transport error: {e:?}");
            try_send_once(retry.unwrap()).await
        }
        other => other,
    }
}

pub async fn try_send_once(rb: RequestBuilder) -> Result<Resp, reqwest::Error> {
    let resp = rb.send().await?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.bytes().await?;
    Ok(Resp {
        status,
        headers,
        body,
    })
}

/// What real clients send when fetching manifests: every manifest type berth stores.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.list.v2+json, */*";

fn client_builder() -> reqwest::ClientBuilder {
    client_builder_trusting(secure_pass())
}

/// A client builder that trusts the shared test CA when `trust_ca`.
pub fn client_builder_trusting(trust_ca: bool) -> reqwest::ClientBuilder {
    let mut headers = HeaderMap::new();
    headers.insert(
        reqwest::header::ACCEPT,
        reqwest::header::HeaderValue::from_static(MANIFEST_ACCEPT),
    );
    let builder = Client::builder()
        .default_headers(headers)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5));
    if trust_ca {
        let ca = fs::read(crate::pki::Pki::shared().ca()).unwrap();
        builder.tls_certs_merge(reqwest::Certificate::from_pem_bundle(&ca).unwrap())
    } else {
        builder
    }
}

/// A client without credentials (for upstreams, and anonymous requests).
pub fn new_client() -> Client {
    client_builder().build().expect("client")
}

/// A client for Berth: in the secure pass it trusts the test CA and signs
/// in as the pass's administrator.
pub fn berth_client() -> Client {
    let mut builder = client_builder();
    if secure_pass() {
        let mut headers = HeaderMap::new();
        headers.insert(
            reqwest::header::ACCEPT,
            reqwest::header::HeaderValue::from_static(MANIFEST_ACCEPT),
        );
        headers.insert(
            reqwest::header::AUTHORIZATION,
            reqwest::header::HeaderValue::from_str(&berth_auth::header::basic_header(
                SECURE_USER,
                SECURE_PASSWORD,
            ))
            .unwrap(),
        );
        builder = builder.default_headers(headers);
    }
    builder.build().expect("client")
}

// ---------------------------------------------------------------------------
// The secure pass
// ---------------------------------------------------------------------------

/// `BERTH_IT_SECURE=1` runs the suite again with TLS and authentication on
/// every registry: HTTPS with a test CA, an htpasswd user that the policy
/// makes administrator everywhere, and clients that sign in as it.
pub fn secure_pass() -> bool {
    std::env::var("BERTH_IT_SECURE").is_ok_and(|v| !v.is_empty() && v != "0")
}

pub const SECURE_USER: &str = "berth-it";
pub const SECURE_PASSWORD: &str = "berth-it-password";

pub fn scheme() -> &'static str {
    if secure_pass() { "https" } else { "http" }
}

const SECURE_POLICY: &str =
    "\n[[access]]\nrepositories = [\"**\"]\nusers = [\"berth-it\"]\nactions = [\"admin\"]\n";

/// The pass's flags added to a registry's own: TLS, the htpasswd file, the
/// CA for peers, and the policy (merged into the test's own configuration
/// file when it has one).
/// Whether a test configures security itself (the pass leaves it alone).
fn self_secured(args: &[String]) -> bool {
    args.iter()
        .any(|a| a == "--tls-cert" || a == "--htpasswd" || a == "--insecure-open")
}

fn secure_args(workdir: &Path, args: &[String]) -> Vec<String> {
    if self_secured(args) {
        return args.to_vec();
    }
    static HTPASSWD: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let pki = crate::pki::Pki::shared();
    let htpasswd = HTPASSWD.get_or_init(|| {
        let path = pki.dir().join("htpasswd");
        crate::pki::htpasswd(&path, &[(SECURE_USER, SECURE_PASSWORD)]);
        path
    });
    let server = crate::pki::shared_server();
    let mut out = Vec::new();
    let mut own_config = None;
    let mut iter = args.iter();
    while let Some(a) = iter.next() {
        if a == "--config" {
            own_config = iter.next().cloned();
        } else {
            out.push(a.clone());
        }
    }
    let mut config = match &own_config {
        Some(path) => fs::read_to_string(path).unwrap(),
        None => String::new(),
    };
    config.push_str(SECURE_POLICY);
    // Beside the PKI, not in the registry's directory (tests check what
    // appears there).
    let merged = pki
        .dir()
        .join(format!("config-{}.toml", unique_name(workdir)));
    fs::write(&merged, config).unwrap();
    for (flag, value) in [
        ("--config", merged.display().to_string()),
        ("--tls-cert", server.cert.display().to_string()),
        ("--tls-key", server.key.display().to_string()),
        ("--htpasswd", htpasswd.display().to_string()),
        ("--peer-ca-file", pki.ca().display().to_string()),
    ] {
        out.push(flag.into());
        out.push(value);
    }
    out
}

/// The `berth` binary for operator commands, pointed at the pass's CA and
/// credentials when it runs.
pub fn berth_cli() -> Command {
    let mut cmd = Command::new(BIN);
    if secure_pass() {
        cmd.env("BERTH_CA_FILE", crate::pki::Pki::shared().ca())
            .env("BERTH_USERNAME", SECURE_USER)
            .env("BERTH_PASSWORD", SECURE_PASSWORD);
    }
    cmd
}

/// Appends `key=value` to a URL that may already carry a query string.
pub fn with_query(url: &str, key: &str, value: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{key}={}", encode_query(value))
}

pub fn encode_query(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b':' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The path and query of an absolute or relative URL (for rebasing onto a new port).
pub fn path_and_query(url: &str) -> String {
    let u = reqwest::Url::parse(url)
        .or_else(|_| reqwest::Url::parse("http://x").unwrap().join(url))
        .unwrap_or_else(|e| panic!("bad url {url:?}: {e}"));
    match u.query() {
        Some(q) => format!("{}?{q}", u.path()),
        None => u.path().to_string(),
    }
}

/// Parses a query string into pairs (with percent-decoding).
pub fn query_pairs(url: &str) -> Vec<(String, String)> {
    let parsed = reqwest::Url::parse(url)
        .or_else(|_| reqwest::Url::parse("http://x").unwrap().join(url))
        .unwrap_or_else(|e| panic!("bad url {url:?}: {e}"));
    parsed
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

// ---------------------------------------------------------------------------
// The registry process
// ---------------------------------------------------------------------------

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
                .args(etcd_metadata_args(&self.data_dir))
                .args(s3_storage_args(&self.data_dir))
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
                    if !etcd_metadata_args(&self.data_dir).is_empty() {
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

// ---------------------------------------------------------------------------
// Raw HTTP (for requests reqwest would normalize or refuse to send)
// ---------------------------------------------------------------------------

#[derive(Debug)]
pub struct RawResp {
    /// 0 when no status line could be read (connection closed/reset first).
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl RawResp {
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            if k.trim().eq_ignore_ascii_case(name) {
                Some(v.trim().to_string())
            } else {
                None
            }
        })
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn as_resp(&self) -> Resp {
        let mut headers = HeaderMap::new();
        for l in self.head.lines().skip(1) {
            if let Some((k, v)) = l.split_once(':')
                && let (Ok(k), Ok(v)) = (
                    reqwest::header::HeaderName::from_bytes(k.trim().as_bytes()),
                    reqwest::header::HeaderValue::from_str(v.trim()),
                )
            {
                headers.append(k, v);
            }
        }
        let chunked = self
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        let body = if chunked {
            dechunk(&self.body)
        } else {
            self.body.clone()
        };
        Resp {
            status: self.status,
            headers,
            body: Bytes::from(body),
        }
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(pos) = data.windows(2).position(|w| w == b"\r\n") {
        let line = String::from_utf8_lossy(&data[..pos]);
        let size_str = line.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(size_str, 16) else {
            break;
        };
        data = &data[pos + 2..];
        if size == 0 || data.len() < size {
            out.extend_from_slice(&data[..size.min(data.len())]);
            break;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[(size + 2).min(data.len())..];
    }
    out
}

pub trait RawStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> RawStream for T {}
pub type RawConn = Box<dyn RawStream>;

/// A connection for raw requests: plain TCP, or TLS to the shared test CA's
/// certificate (HTTP/1.1).
pub async fn raw_connect(addr: &str, tls: bool) -> RawConn {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    if !tls {
        return Box::new(tcp);
    }
    let mut roots = rustls::RootCertStore::empty();
    let ca = fs::read(crate::pki::Pki::shared().ca()).unwrap();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&ca) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    Box::new(connector.connect(name, tcp).await.expect("TLS handshake"))
}

/// In the secure pass, the pass's credentials go after the request line.
pub fn with_credentials(request: &[u8]) -> Vec<u8> {
    if !secure_pass() {
        return request.to_vec();
    }
    match request.windows(2).position(|w| w == b"\r\n") {
        Some(i) => {
            let header = format!(
                "Authorization: {}\r\n",
                berth_auth::header::basic_header(SECURE_USER, SECURE_PASSWORD)
            );
            let mut out = request[..i + 2].to_vec();
            out.extend_from_slice(header.as_bytes());
            out.extend_from_slice(&request[i + 2..]);
            out
        }
        None => request.to_vec(),
    }
}

pub async fn raw_request(addr: &str, request: &[u8], timeout: Duration) -> RawResp {
    raw_request_to(addr, secure_pass(), request, timeout).await
}

pub async fn raw_request_to(addr: &str, tls: bool, request: &[u8], timeout: Duration) -> RawResp {
    let fut = async {
        let mut s = raw_connect(addr, tls).await;
        s.write_all(&with_credentials(request))
            .await
            .expect("write raw request");
        let mut buf = Vec::new();
        let mut tmp = [0u8; 16384];
        loop {
            match s.read(&mut tmp).await {
                Ok(0) => break,
                Ok(n) => {
                    buf.extend_from_slice(&tmp[..n]);
                    // Stop once a complete response with Content-Length has arrived.
                    if let Some(end) = find_head_end(&buf) {
                        let head = String::from_utf8_lossy(&buf[..end]).to_string();
                        if let Some(cl) = head.lines().find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.trim()
                                .eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse::<usize>().ok())
                                .flatten()
                        }) {
                            let is_head = request.starts_with(b"HEAD ");
                            if is_head || buf.len() >= end + 4 + cl {
                                break;
                            }
                        }
                    }
                }
                Err(_) => break,
            }
        }
        buf
    };
    let buf = match tokio::time::timeout(timeout, fut).await {
        Ok(b) => b,
        Err(_) => panic!(
            "raw request timed out after {timeout:?}: {}",
            truncate(&String::from_utf8_lossy(request), 300)
        ),
    };
    let Some(end) = find_head_end(&buf) else {
        return RawResp {
            status: 0,
            head: String::from_utf8_lossy(&buf).into_owned(),
            body: Vec::new(),
        };
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    RawResp {
        status,
        head,
        body: buf[end + 4..].to_vec(),
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n")
}

// ---------------------------------------------------------------------------
// Building manifests and images
// ---------------------------------------------------------------------------

pub fn descriptor(media_type: &str, bytes: &[u8]) -> Value {
    json!({
        "mediaType": media_type,
        "digest": sha256_digest(bytes),
        "size": bytes.len(),
    })
}

/// Merges the keys of `extra` (an object) into `base` (an object).
pub fn merge(mut base: Value, extra: Value) -> Value {
    if let (Some(b), Value::Object(e)) = (base.as_object_mut(), extra) {
        for (k, v) in e {
            b.insert(k, v);
        }
    }
    base
}

pub fn to_bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec_pretty(v).unwrap()
}

/// An index (OCI or Docker list) over the given manifest descriptors.
pub fn index_json(media_type: &str, manifests: Vec<Value>, extra: Value) -> Vec<u8> {
    let v = json!({
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": manifests,
    });
    to_bytes(&merge(v, extra))
}

#[derive(Clone, Debug)]
pub struct Image {
    pub media_type: String,
    pub config_media_type: String,
    pub config: Vec<u8>,
    pub layer_media_type: String,
    pub layers: Vec<Vec<u8>>,
    pub manifest: Vec<u8>,
    pub digest: String,
}

impl Image {
    /// An OCI image with `n_layers` random layers of `layer_size` bytes.
    pub fn oci(seed: u64, n_layers: usize, layer_size: usize) -> Image {
        Self::build(
            seed,
            n_layers,
            layer_size,
            OCI_MANIFEST,
            OCI_CONFIG,
            OCI_LAYER_GZIP,
            json!({}),
        )
    }

    /// Like [`Image::oci`] with extra top-level manifest fields (subject, annotations, ...).
    pub fn oci_with(seed: u64, n_layers: usize, layer_size: usize, extra: Value) -> Image {
        Self::build(
            seed,
            n_layers,
            layer_size,
            OCI_MANIFEST,
            OCI_CONFIG,
            OCI_LAYER_GZIP,
            extra,
        )
    }

    pub fn docker(seed: u64, n_layers: usize, layer_size: usize) -> Image {
        Self::build(
            seed,
            n_layers,
            layer_size,
            DOCKER_MANIFEST,
            DOCKER_CONFIG,
            DOCKER_LAYER,
            json!({}),
        )
    }

    pub fn build(
        seed: u64,
        n_layers: usize,
        layer_size: usize,
        media_type: &str,
        config_media_type: &str,
        layer_media_type: &str,
        extra: Value,
    ) -> Image {
        let layers: Vec<Vec<u8>> = (0..n_layers)
            .map(|i| random_bytes(seed.wrapping_add(i as u64 + 1), layer_size))
            .collect();
        let diff_ids: Vec<String> = layers.iter().map(|l| sha256_digest(l)).collect();
        let config = to_bytes(&json!({
            "architecture": "amd64",
            "os": "linux",
            "config": { "Labels": { "berth.test.seed": seed.to_string() } },
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
        }));
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": descriptor(config_media_type, &config),
            "layers": layers.iter().map(|l| descriptor(layer_media_type, l)).collect::<Vec<_>>(),
        });
        let manifest = to_bytes(&merge(manifest, extra));
        let digest = sha256_digest(&manifest);
        Image {
            media_type: media_type.to_string(),
            config_media_type: config_media_type.to_string(),
            config,
            layer_media_type: layer_media_type.to_string(),
            layers,
            manifest,
            digest,
        }
    }

    pub fn descriptor(&self) -> Value {
        json!({
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.manifest.len(),
        })
    }

    pub fn blobs(&self) -> Vec<&[u8]> {
        let mut v: Vec<&[u8]> = vec![&self.config];
        v.extend(self.layers.iter().map(|l| l.as_slice()));
        v
    }

    pub async fn push_blobs(&self, reg: &Registry, repo: &str) {
        for b in self.blobs() {
            reg.push_blob(repo, b).await;
        }
    }

    /// Pushes all blobs and the manifest under `reference` (a tag, or the digest when None).
    pub async fn push(&self, reg: &Registry, repo: &str, reference: Option<&str>) -> String {
        self.push_blobs(reg, repo).await;
        let reference = reference.unwrap_or(&self.digest).to_string();
        reg.push_manifest(repo, &reference, &self.media_type, &self.manifest)
            .await
    }
}

/// An OCI index over a linux/amd64 image (2 layers) and a linux/arm64 one (3
/// layers): the index bytes and the two images.
pub fn two_platform_index(seed: u64) -> (Vec<u8>, Image, Image) {
    let amd = Image::oci(seed, 2, 40_000);
    let arm = Image::oci(seed + 100, 3, 30_000);
    let platform = |arch: &str| json!({"platform": {"os": "linux", "architecture": arch}});
    let index = index_json(
        OCI_INDEX,
        vec![
            merge(amd.descriptor(), platform("amd64")),
            merge(arm.descriptor(), platform("arm64")),
        ],
        json!({}),
    );
    (index, amd, arm)
}

/// An artifact manifest (OCI image manifest with `artifactType` and the empty config).
pub fn artifact_manifest(
    artifact_type: &str,
    blobs: &[(&str, &[u8])],
    subject: Option<Value>,
    annotations: Option<Value>,
) -> Vec<u8> {
    let mut v = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": { "mediaType": OCI_EMPTY, "digest": EMPTY_DIGEST, "size": 2 },
        "layers": blobs.iter().map(|(mt, b)| descriptor(mt, b)).collect::<Vec<_>>(),
    });
    if let Some(s) = subject {
        v["subject"] = s;
    }
    if let Some(a) = annotations {
        v["annotations"] = a;
    }
    to_bytes(&v)
}

/// Runs `f` until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads a `Vm*` field (in kB) from /proc/<pid>/status.
pub fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

/// With `BERTH_IT_ETCD=HOST:PORT`, every registry keeps its metadata in that
/// etcd, under a prefix of its own derived from its data directory (so a
/// restart on the same directory finds its metadata again). This is how the
/// whole suite runs against the etcd engine.
/// A name unique to one test registry, for etcd prefixes and S3 key prefixes.
fn unique_name(data_dir: &Path) -> String {
    data_dir
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect::<String>()
        .trim_matches('-')
        .to_string()
}

/// With `BERTH_IT_S3=FILE` (an `s3.env` written by `scripts/garage.py`), the
/// registry keeps its blobs in that bucket, under a prefix of its own.
pub fn s3_env() -> Vec<(String, String)> {
    let Ok(path) = std::env::var("BERTH_IT_S3") else {
        return Vec::new();
    };
    if path.is_empty() {
        return Vec::new();
    }
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("BERTH_IT_S3={path}: {e}"));
    text.lines()
        .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn s3_storage_args(data_dir: &Path) -> Vec<String> {
    if s3_env().is_empty() {
        return Vec::new();
    }
    vec![
        "--storage".to_string(),
        format!("s3://berth/berth-it/{}", unique_name(data_dir)),
    ]
}

/// Whether blobs are in S3 (tests that inspect blob files skip then).
pub fn blobs_in_s3() -> bool {
    !s3_env().is_empty()
}

pub fn etcd_metadata_args(data_dir: &Path) -> Vec<String> {
    match std::env::var("BERTH_IT_ETCD") {
        Ok(endpoint) if !endpoint.is_empty() => {
            let unique = unique_name(data_dir);
            vec![
                "--metadata".to_string(),
                format!("etcd://{endpoint}/berth-it/{unique}"),
            ]
        }
        _ => Vec::new(),
    }
}
