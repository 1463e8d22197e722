//! Upstream registries for the pull-through cache tests: Debian's
//! `docker-registry` (CNCF Distribution) on loopback, optionally with token
//! authentication behind a small token issuer that signs real JWTs (RS256,
//! with `openssl`), and a forwarding proxy that counts requests and can
//! delay them or flip a byte of blob bodies.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether Distribution is installed; the tests that need it fail without
/// it when `BERTH_REQUIRE_SKOPEO` is set (scripts/test installs both).
pub fn distribution_available() -> bool {
    let found = Command::new("docker-registry")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found && std::env::var_os("BERTH_REQUIRE_SKOPEO").is_some() {
        panic!("docker-registry is not installed but real-client tests are required");
    }
    if !found {
        eprintln!("SKIPPED: docker-registry is not installed");
    }
    found
}

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Issues registry tokens (the Docker token spec) to `berth`/`secret`.
pub struct TokenIssuer {
    port: u16,
    dir: PathBuf,
    pub requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

pub const TOKEN_USER: &str = "berth";
pub const TOKEN_PASSWORD: &str = "secret";
pub const ISSUER: &str = "berth-test-issuer";
pub const SERVICE: &str = "berth-test-upstream";

fn openssl(args: &[&str], stdin: Option<&[u8]>) -> Vec<u8> {
    use std::io::Write as _;
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl is needed for the token issuer");
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input).unwrap();
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

impl TokenIssuer {
    pub async fn start(dir: &Path) -> TokenIssuer {
        std::fs::create_dir_all(dir).unwrap();
        let key = dir.join("issuer.key");
        let cert = dir.join("issuer.pem");
        openssl(
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=berth-test-issuer",
                "-keyout",
                key.to_str().unwrap(),
                "-out",
                cert.to_str().unwrap(),
            ],
            None,
        );
        let der = openssl(
            &["x509", "-in", cert.to_str().unwrap(), "-outform", "DER"],
            None,
        );
        let x5c = base64::engine::general_purpose::STANDARD.encode(der);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        let key_path = key.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                let key_path = key_path.clone();
                let x5c = x5c.clone();
                tokio::spawn(async move {
                    let Some((head, _)) = read_head(&mut stream).await else {
                        return;
                    };
                    let (status, body) = issue(&head, &key_path, &x5c);
                    let response = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                });
            }
        });
        TokenIssuer {
            port,
            dir: dir.to_path_buf(),
            requests,
            task,
        }
    }

    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    pub fn cert(&self) -> PathBuf {
        self.dir.join("issuer.pem")
    }

    /// A token for `scope`, as the issuer would give it, for the test's own
    /// pushes.
    pub fn token(&self, scope: &str) -> String {
        let x5c = base64::engine::general_purpose::STANDARD.encode(openssl(
            &[
                "x509",
                "-in",
                self.cert().to_str().unwrap(),
                "-outform",
                "DER",
            ],
            None,
        ));
        jwt(scope, &self.dir.join("issuer.key"), &x5c)
    }
}

impl Drop for TokenIssuer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn query_param(path: &str, name: &str) -> Option<String> {
    let query = path.split_once('?')?.1;
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| {
            let mut out = Vec::new();
            let b = v.as_bytes();
            let mut i = 0;
            while i < b.len() {
                if b[i] == b'%'
                    && let Some(x) = v
                        .get(i + 1..i + 3)
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    out.push(x);
                    i += 3;
                    continue;
                }
                out.push(if b[i] == b'+' { b' ' } else { b[i] });
                i += 1;
            }
            String::from_utf8_lossy(&out).into_owned()
        })
    })
}

fn issue(head: &Head, key: &Path, x5c: &str) -> (&'static str, String) {
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{TOKEN_USER}:{TOKEN_PASSWORD}"))
    );
    if head.header("authorization").as_deref() != Some(expected.as_str()) {
        return (
            "401 Unauthorized",
            r#"{"details":"credentials required"}"#.to_string(),
        );
    }
    let Some(scope) = query_param(&head.path, "scope") else {
        return ("400 Bad Request", r#"{"details":"no scope"}"#.to_string());
    };
    if query_param(&head.path, "service").as_deref() != Some(SERVICE) {
        return (
            "400 Bad Request",
            r#"{"details":"wrong service"}"#.to_string(),
        );
    }
    let token = jwt(&scope, key, x5c);
    (
        "200 OK",
        serde_json::json!({ "token": token, "access_token": token, "expires_in": 300 }).to_string(),
    )
}

/// A JWT as Distribution verifies it: RS256, the signing certificate in
/// `x5c` (trusted through the root bundle), issuer, audience and access.
fn jwt(scope: &str, key: &Path, x5c: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let access: Vec<serde_json::Value> = scope
        .split(' ')
        .filter_map(|s| {
            let mut parts = s.splitn(3, ':');
            let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
            Some(serde_json::json!({
                "type": kind, "name": name,
                "actions": actions.split(',').collect::<Vec<_>>(),
            }))
        })
        .collect();
    let header = serde_json::json!({ "typ": "JWT", "alg": "RS256", "x5c": [x5c] });
    let claims = serde_json::json!({
        "iss": ISSUER, "sub": TOKEN_USER, "aud": SERVICE,
        "exp": now + 300, "nbf": now - 10, "iat": now,
        "jti": format!("{now}-{}", fresh_seed()),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    );
    let signature = openssl(
        &["dgst", "-sha256", "-sign", key.to_str().unwrap()],
        Some(signing_input.as_bytes()),
    );
    format!("{signing_input}.{}", B64.encode(signature))
}

pub struct Head {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }
}

/// Reads a request head; returns it with any body bytes read past it.
async fn read_head(stream: &mut TcpStream) -> Option<(Head, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 || buf.len() > 64 * 1024 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let text = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = text.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let path = first.next()?.to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Some((
        Head {
            method,
            path,
            headers,
        },
        buf[end + 4..].to_vec(),
    ))
}

/// Debian's docker-registry on loopback.
pub struct Distribution {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    token: Option<(String, PathBuf)>,
    /// Serves HTTPS with this certificate (signed by the shared test CA).
    tls: Option<crate::pki::CertPair>,
}

impl Distribution {
    pub async fn start() -> Distribution {
        Self::start_with_token(None).await
    }

    /// With `Some((realm, root certificate))`, clients need tokens.
    pub async fn start_with_token(token: Option<(String, PathBuf)>) -> Distribution {
        let dir = tempfile::Builder::new()
            .prefix("berth-upstream-")
            .tempdir()
            .unwrap();
        let mut d = Distribution {
            port: free_port(),
            dir,
            child: None,
            token,
            tls: None,
        };
        d.spawn().await;
        d
    }

    /// Over HTTPS, with the shared test CA's server certificate.
    pub async fn start_tls() -> Distribution {
        let dir = tempfile::Builder::new()
            .prefix("berth-upstream-")
            .tempdir()
            .unwrap();
        let mut d = Distribution {
            port: free_port(),
            dir,
            child: None,
            token: None,
            tls: Some(crate::pki::shared_server()),
        };
        d.spawn().await;
        d
    }

    async fn spawn(&mut self) {
        let auth = match &self.token {
            Some((realm, cert)) => format!(
                "auth:\n  token:\n    realm: {realm}\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
                cert.display()
            ),
            None => String::new(),
        };
        let tls = match &self.tls {
            Some(pair) => format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                pair.cert.display(),
                pair.key.display()
            ),
            None => String::new(),
        };
        let config = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{}\n{tls}{auth}",
            self.dir.path().join("data").display(),
            self.port
        );
        let config_path = self.dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("registry.log"))
            .unwrap();
        let mut cmd = Command::new("docker-registry");
        cmd.arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log));
        unsafe {
            use std::os::unix::process::CommandExt as _;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        self.child = Some(cmd.spawn().expect("start docker-registry"));
        let client = client_builder_trusting(self.tls.is_some()).build().unwrap();
        let url = format!("{}/v2/", self.url());
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(r) = client.get(&url).send().await
                && matches!(r.status().as_u16(), 200 | 401)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not start: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Kills it (an outage).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and data.
    pub async fn resume(&mut self) {
        self.stop();
        self.spawn().await;
    }
}

impl Drop for Distribution {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Pushes to a registry at `base` over plain HTTP, with an optional bearer
/// token.
pub struct Pusher {
    pub base: String,
    pub token: Option<String>,
    client: reqwest::Client,
}

impl Pusher {
    pub fn new(base: &str, token: Option<String>) -> Pusher {
        Pusher {
            base: base.to_string(),
            token,
            client: client_builder_trusting(base.starts_with("https://"))
                .build()
                .unwrap(),
        }
    }

    fn req(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let rb = self.client.request(method, url);
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    pub async fn blob(&self, repo: &str, bytes: &[u8]) -> String {
        let digest = sha256_digest(bytes);
        let r = send(
            self.req(
                reqwest::Method::POST,
                &format!("{}/v2/{repo}/blobs/uploads/", self.base),
            )
            .header("content-length", "0"),
        )
        .await;
        assert_eq!(r.status, 202, "start upload: {}", r.describe());
        let location = r.header("location").unwrap();
        let location = if location.starts_with("http") {
            location
        } else {
            format!("{}{location}", self.base)
        };
        let url = with_query(&location, "digest", &digest);
        let r = send(
            self.req(reqwest::Method::PUT, &url)
                .header("content-type", "application/octet-stream")
                .body(bytes.to_vec()),
        )
        .await;
        assert_eq!(r.status, 201, "PUT blob: {}", r.describe());
        digest
    }

    pub async fn manifest(&self, repo: &str, reference: &str, media_type: &str, bytes: &[u8]) {
        let r = send(
            self.req(
                reqwest::Method::PUT,
                &format!("{}/v2/{repo}/manifests/{reference}", self.base),
            )
            .header("content-type", media_type)
            .body(bytes.to_vec()),
        )
        .await;
        assert_eq!(
            r.status,
            201,
            "PUT manifest {repo}:{reference}: {}",
            r.describe()
        );
    }

    /// Pushes the images by digest, then the index over them as `tag`.
    pub async fn index(&self, repo: &str, tag: &str, index: &[u8], images: &[&Image]) {
        for image in images {
            self.image(repo, &image.digest, image).await;
        }
        self.manifest(repo, tag, OCI_INDEX, index).await;
    }

    pub async fn image(&self, repo: &str, tag: &str, image: &Image) {
        for b in image.blobs() {
            self.blob(repo, b).await;
        }
        self.manifest(repo, tag, &image.media_type, &image.manifest)
            .await;
    }
}

/// A forwarding HTTP proxy in front of an upstream: counts requests by
/// `METHOD PATH`, and can delay blob responses or flip one byte of blob
/// bodies.
pub struct TamperProxy {
    pub port: u16,
    pub corrupt_blobs: Arc<AtomicBool>,
    pub blob_delay_ms: Arc<AtomicU64>,
    counts: Arc<Mutex<HashMap<String, usize>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TamperProxy {
    pub async fn start(upstream: String) -> TamperProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let corrupt_blobs = Arc::new(AtomicBool::new(false));
        let blob_delay_ms = Arc::new(AtomicU64::new(0));
        let counts: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let (c, d, n) = (corrupt_blobs.clone(), blob_delay_ms.clone(), counts.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (c, d, n, client, upstream) = (
                    c.clone(),
                    d.clone(),
                    n.clone(),
                    client.clone(),
                    upstream.clone(),
                );
                tokio::spawn(async move {
                    let _ = forward(stream, &client, &upstream, &c, &d, &n).await;
                });
            }
        });
        TamperProxy {
            port,
            corrupt_blobs,
            blob_delay_ms,
            counts,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Requests seen whose `METHOD PATH` contains `pattern`.
    pub fn count(&self, pattern: &str) -> usize {
        self.counts
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.contains(pattern))
            .map(|(_, v)| v)
            .sum()
    }
}

impl Drop for TamperProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(
    mut stream: TcpStream,
    client: &reqwest::Client,
    upstream: &str,
    corrupt: &AtomicBool,
    delay_ms: &AtomicU64,
    counts: &Mutex<HashMap<String, usize>>,
) -> Option<()> {
    let (head, _) = read_head(&mut stream).await?;
    *counts
        .lock()
        .unwrap()
        .entry(format!("{} {}", head.method, head.path))
        .or_default() += 1;
    let is_blob = head.path.contains("/blobs/sha256:");
    if is_blob {
        let delay = delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
    }
    let method = reqwest::Method::from_bytes(head.method.as_bytes()).ok()?;
    let mut rb = client.request(method.clone(), format!("{upstream}{}", head.path));
    for (k, v) in &head.headers {
        if !matches!(
            k.to_ascii_lowercase().as_str(),
            "host" | "connection" | "content-length"
        ) {
            rb = rb.header(k, v);
        }
    }
    let response = rb.send().await.ok()?;
    let status = response.status();
    let headers = response.headers().clone();
    let mut body = response.bytes().await.ok()?.to_vec();
    if is_blob
        && method == reqwest::Method::GET
        && status == 200
        && corrupt.load(Ordering::SeqCst)
        && !body.is_empty()
    {
        let mid = body.len() / 2;
        body[mid] ^= 0x5a;
    }
    let mut out = format!(
        "HTTP/1.1 {} {}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    for (k, v) in &headers {
        if !matches!(
            k.as_str(),
            "connection" | "content-length" | "transfer-encoding"
        ) {
            out.push_str(&format!("{k}: {}\r\n", v.to_str().unwrap_or("")));
        }
    }
    let length = headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| body.len().to_string());
    out.push_str(&format!(
        "content-length: {length}\r\nconnection: close\r\n\r\n"
    ));
    stream.write_all(out.as_bytes()).await.ok()?;
    if method != reqwest::Method::HEAD {
        stream.write_all(&body).await.ok()?;
    }
    stream.shutdown().await.ok()
}
