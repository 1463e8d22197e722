//! A client for one upstream registry: the requests a pull-through cache
//! needs (manifest HEAD and GET, blob HEAD and GET), authenticated by the
//! registry token flow or basic auth, with every failure classified so that
//! the cache knows whether to fall back to what it holds.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use berth_oci::{Digest, media_type};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};
use serde::Deserialize;

use crate::challenge::{self, Challenge};

/// Everything a client may accept, so that the upstream answers with what it
/// holds (an index stays an index) and the cache can negotiate locally.
pub const MANIFEST_ACCEPT: &str = concat!(
    "application/vnd.oci.image.index.v1+json, ",
    "application/vnd.docker.distribution.manifest.list.v2+json, ",
    "application/vnd.oci.image.manifest.v1+json, ",
    "application/vnd.docker.distribution.manifest.v2+json"
);

/// Largest token response accepted.
const MAX_TOKEN_RESPONSE: usize = 64 * 1024;

/// Tokens kept per upstream.
const MAX_TOKENS: usize = 4096;

/// Lifetime assumed for a token that does not say (the token spec's
/// default).
const DEFAULT_TOKEN_SECS: u64 = 60;

#[derive(Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

// Never print a password.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({:?}, <password>)", self.username)
    }
}

/// How an outgoing HTTPS client verifies servers and proves who it is:
/// extra CA certificates trusted besides the system's, and a client
/// certificate (mTLS, as a peer region presents to another).
#[derive(Clone, Default)]
pub struct ClientTls {
    /// PEM certificates (a bundle).
    pub ca_pem: Option<Vec<u8>>,
    /// A PEM private key and certificate chain.
    pub identity_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("extra_ca", &self.ca_pem.is_some())
            .field("client_certificate", &self.identity_pem.is_some())
            .finish()
    }
}

impl ClientTls {
    /// Applies the settings to a client being built.
    pub fn apply(&self, builder: reqwest::ClientBuilder) -> Result<reqwest::ClientBuilder, String> {
        let mut builder = builder;
        if let Some(ca) = &self.ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(ca)
                .map_err(|e| format!("invalid CA certificate file: {e}"))?;
            if certs.is_empty() {
                return Err("the CA certificate file holds no certificate".into());
            }
            builder = builder.tls_certs_merge(certs);
        }
        if let Some(identity) = &self.identity_pem {
            builder = builder.identity(
                reqwest::Identity::from_pem(identity)
                    .map_err(|e| format!("invalid client certificate or key: {e}"))?,
            );
        }
        Ok(builder)
    }
}

/// One upstream registry, as configured.
#[derive(Clone)]
pub struct UpstreamConfig {
    /// The local namespace it is served under, e.g. `docker.io`.
    pub namespace: String,
    /// Its base URL, e.g. `https://registry-1.docker.io`.
    pub url: String,
    pub credentials: Option<Credentials>,
    /// A fixed bearer token sent with every request (replication peers
    /// authenticate with a shared secret).
    pub bearer: Option<String>,
    /// Headers sent with every request.
    pub headers: Vec<(String, String)>,
    /// Time allowed for a metadata request (manifest, HEAD, token) in all,
    /// and for each read of a blob body.
    pub timeout: Duration,
    pub tls: ClientTls,
}

impl std::fmt::Debug for UpstreamConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamConfig")
            .field("namespace", &self.namespace)
            .field("url", &self.url)
            .field("credentials", &self.credentials)
            .field("bearer", &self.bearer.as_ref().map(|_| "<secret>"))
            .field("timeout", &self.timeout)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl UpstreamConfig {
    /// Docker Hub keeps official images under `library/`; `docker.io/alpine`
    /// means `library/alpine` there.
    fn remote_name(&self, name: &str) -> String {
        let hub = self.bearer.is_none()
            && (self.namespace == "docker.io" || self.url.contains("docker.io"));
        if hub && !name.contains('/') {
            format!("library/{name}")
        } else {
            name.to_string()
        }
    }
}

/// How an upstream request failed. The first four mean "unavailable": the
/// cache serves what it holds instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    Connect,
    Timeout,
    ServerError,
    RateLimited,
    NotFound,
    Unauthorized,
    /// The upstream sent content that is not what it claimed.
    Corrupt,
    TooLarge,
    Other,
}

impl FailureKind {
    pub fn label(self) -> &'static str {
        match self {
            FailureKind::Connect => "connect",
            FailureKind::Timeout => "timeout",
            FailureKind::ServerError => "server_error",
            FailureKind::RateLimited => "rate_limited",
            FailureKind::NotFound => "not_found",
            FailureKind::Unauthorized => "unauthorized",
            FailureKind::Corrupt => "corrupt",
            FailureKind::TooLarge => "too_large",
            FailureKind::Other => "other",
        }
    }
}

#[derive(Clone, Debug, thiserror::Error)]
#[error("upstream {namespace} ({url}): {message}")]
pub struct UpstreamError {
    pub namespace: String,
    pub url: String,
    pub kind: FailureKind,
    pub message: String,
}

impl UpstreamError {
    /// Down, overloaded or refusing for now: serve from the cache.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self.kind,
            FailureKind::Connect
                | FailureKind::Timeout
                | FailureKind::ServerError
                | FailureKind::RateLimited
        )
    }
}

struct Token {
    value: String,
    valid_until: Instant,
}

#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// A manifest as the upstream describes it in a HEAD.
pub struct ManifestHead {
    pub digest: Option<Digest>,
}

/// A manifest as fetched.
pub struct FetchedManifest {
    pub bytes: Bytes,
    pub content_type: Option<String>,
    /// The digest the upstream claims (`Docker-Content-Digest`).
    pub claimed: Option<Digest>,
}

pub struct UpstreamClient {
    config: UpstreamConfig,
    base: String,
    http: reqwest::Client,
    /// Bearer tokens by scope, until they expire.
    tokens: Mutex<HashMap<String, Token>>,
    /// The upstream asked for basic auth: send it from the start.
    basic: AtomicBool,
}

impl UpstreamClient {
    pub fn new(config: UpstreamConfig) -> Result<Self, UpstreamError> {
        let fail = |message: String| UpstreamError {
            namespace: config.namespace.clone(),
            url: config.url.clone(),
            kind: FailureKind::Other,
            message,
        };
        let builder = reqwest::Client::builder()
            .connect_timeout(config.timeout.min(Duration::from_secs(5)))
            .read_timeout(config.timeout)
            .user_agent(concat!(
                "berth/",
                env!("CARGO_PKG_VERSION"),
                " (pull-through cache)"
            ));
        let http = config
            .tls
            .apply(builder)
            .map_err(fail)?
            .build()
            .map_err(|e| fail(format!("cannot build an HTTP client: {e}")))?;
        Ok(Self {
            base: config.url.trim_end_matches('/').to_string(),
            config,
            http,
            tokens: Mutex::new(HashMap::new()),
            basic: AtomicBool::new(false),
        })
    }

    pub fn config(&self) -> &UpstreamConfig {
        &self.config
    }

    fn error(&self, kind: FailureKind, message: impl Into<String>) -> UpstreamError {
        UpstreamError {
            namespace: self.config.namespace.clone(),
            url: self.base.clone(),
            kind,
            message: message.into(),
        }
    }

    fn transport_error(&self, e: &reqwest::Error) -> UpstreamError {
        let kind = if e.is_timeout() {
            FailureKind::Timeout
        } else if e.is_connect() {
            FailureKind::Connect
        } else if e.is_body() || e.is_decode() || e.is_request() {
            // A connection that broke mid-way: the upstream is not answering.
            FailureKind::Connect
        } else {
            FailureKind::Other
        };
        let mut message = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        self.error(kind, message)
    }

    fn status_error(&self, status: StatusCode, what: &str) -> UpstreamError {
        let kind = match status {
            StatusCode::NOT_FOUND => FailureKind::NotFound,
            StatusCode::TOO_MANY_REQUESTS => FailureKind::RateLimited,
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => FailureKind::Unauthorized,
            s if s.is_server_error() => FailureKind::ServerError,
            _ => FailureKind::Other,
        };
        self.error(kind, format!("{what}: HTTP {status}"))
    }

    /// `repository:NAME:pull`, the scope every request of ours needs.
    fn scope(remote: &str) -> String {
        format!("repository:{remote}:pull")
    }

    fn basic_header(&self) -> Option<HeaderValue> {
        let c = self.config.credentials.as_ref()?;
        let encoded = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", c.username, c.password));
        HeaderValue::from_str(&format!("Basic {encoded}")).ok()
    }

    fn cached_token(&self, scope: &str) -> Option<HeaderValue> {
        let tokens = self.tokens.lock().ok()?;
        let token = tokens
            .get(scope)
            .filter(|t| t.valid_until > Instant::now())?;
        HeaderValue::from_str(&format!("Bearer {}", token.value)).ok()
    }

    fn authorization(&self, scope: &str) -> Option<HeaderValue> {
        if let Some(bearer) = &self.config.bearer {
            return HeaderValue::from_str(&format!("Bearer {bearer}")).ok();
        }
        if self.basic.load(Ordering::Relaxed) {
            return self.basic_header();
        }
        self.cached_token(scope)
    }

    /// Fetches a token from the realm a challenge names, with our
    /// credentials when we have them (anonymous otherwise).
    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<(), UpstreamError> {
        let mut url = format!(
            "{realm}{}scope={}",
            if realm.contains('?') { '&' } else { '?' },
            berth_oci::query::encode(scope)
        );
        if let Some(service) = service {
            url.push_str("&service=");
            url.push_str(&berth_oci::query::encode(service));
        }
        let mut request = self.http.get(&url).timeout(self.config.timeout);
        if let Some(basic) = self.basic_header() {
            request = request.header(header::AUTHORIZATION, basic);
        }
        let response = request.send().await.map_err(|e| self.transport_error(&e))?;
        if !response.status().is_success() {
            return Err(self.status_error(response.status(), "token request"));
        }
        let body = read_limited(response, MAX_TOKEN_RESPONSE as u64)
            .await
            .map_err(|e| match e {
                ReadError::Transport(e) => self.transport_error(&e),
                ReadError::TooLarge => self.error(FailureKind::Other, "token response too large"),
            })?;
        let parsed: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| self.error(FailureKind::Other, format!("invalid token response: {e}")))?;
        let value = parsed
            .token
            .or(parsed.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| self.error(FailureKind::Other, "token response without a token"))?;
        // Renew a little early: a token must not expire on its way.
        let secs = parsed.expires_in.unwrap_or(DEFAULT_TOKEN_SECS).max(1);
        let valid = Duration::from_millis(secs.min(86_400 * 365) * 900);
        if let Ok(mut tokens) = self.tokens.lock() {
            tokens.retain(|_, t| t.valid_until > Instant::now());
            // One token per repository asked for: bounded, since clients
            // choose the names.
            if tokens.len() >= MAX_TOKENS {
                tokens.clear();
            }
            tokens.insert(
                scope.to_string(),
                Token {
                    value,
                    valid_until: Instant::now() + valid,
                },
            );
        }
        Ok(())
    }

    /// Sends a request for `remote`, answering one authentication challenge.
    /// `timeout` bounds the whole request (None for blob bodies, whose reads
    /// are bounded one by one instead).
    async fn send(
        &self,
        method: Method,
        remote: &str,
        path: &str,
        accept: Option<&str>,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response, UpstreamError> {
        self.send_scoped(
            method,
            &format!("{remote}/{path}"),
            &Self::scope(remote),
            accept,
            timeout,
        )
        .await
    }

    /// As `send`, for any path under `/v2/` and the token scope it needs.
    async fn send_scoped(
        &self,
        method: Method,
        path: &str,
        scope: &str,
        accept: Option<&str>,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let url = format!("{}/v2/{path}", self.base);
        let scope = scope.to_string();
        let mut challenged = false;
        loop {
            let mut request = self.http.request(method.clone(), &url);
            if let Some(accept) = accept {
                request = request.header(header::ACCEPT, accept);
            }
            if let Some(timeout) = timeout {
                request = request.timeout(timeout);
            }
            if let Some(auth) = self.authorization(&scope) {
                request = request.header(header::AUTHORIZATION, auth);
            }
            for (name, value) in &self.config.headers {
                request = request.header(name.as_str(), value.as_str());
            }
            let response = request.send().await.map_err(|e| self.transport_error(&e))?;
            if response.status() != StatusCode::UNAUTHORIZED || challenged {
                return Ok(response);
            }
            challenged = true;
            let challenge = response
                .headers()
                .get_all(header::WWW_AUTHENTICATE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .find_map(challenge::parse);
            match challenge {
                Some(Challenge::Bearer { realm, service, .. }) => {
                    // Our own scope, not the challenge's: it names exactly
                    // what we ask for.
                    self.fetch_token(&realm, service.as_deref(), &scope).await?;
                }
                Some(Challenge::Basic) if self.config.credentials.is_some() => {
                    self.basic.store(true, Ordering::Relaxed);
                }
                _ => return Ok(response),
            }
        }
    }

    /// HEAD of a manifest: the digest a tag points at now, without
    /// downloading the manifest (Docker Hub does not count HEADs against its
    /// pull rate limit).
    pub async fn head_manifest(
        &self,
        name: &str,
        reference: &str,
    ) -> Result<ManifestHead, UpstreamError> {
        let remote = self.config.remote_name(name);
        let response = self
            .send(
                Method::HEAD,
                &remote,
                &format!("manifests/{reference}"),
                Some(MANIFEST_ACCEPT),
                Some(self.config.timeout),
            )
            .await?;
        if !response.status().is_success() {
            return Err(self.status_error(response.status(), "manifest HEAD"));
        }
        Ok(ManifestHead {
            digest: claimed_digest(response.headers()),
        })
    }

    /// GET of a manifest, at most `limit` bytes.
    pub async fn get_manifest(
        &self,
        name: &str,
        reference: &str,
        limit: u64,
    ) -> Result<FetchedManifest, UpstreamError> {
        let remote = self.config.remote_name(name);
        let response = self
            .send(
                Method::GET,
                &remote,
                &format!("manifests/{reference}"),
                Some(MANIFEST_ACCEPT),
                Some(self.config.timeout),
            )
            .await?;
        if !response.status().is_success() {
            return Err(self.status_error(response.status(), "manifest GET"));
        }
        let claimed = claimed_digest(response.headers());
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(media_type::essence);
        let bytes = read_limited(response, limit).await.map_err(|e| match e {
            ReadError::Transport(e) => self.transport_error(&e),
            ReadError::TooLarge => self.error(
                FailureKind::TooLarge,
                format!("manifest larger than the limit of {limit} bytes"),
            ),
        })?;
        Ok(FetchedManifest {
            bytes,
            content_type,
            claimed,
        })
    }

    /// HEAD of a blob: its size.
    pub async fn head_blob(&self, name: &str, digest: &Digest) -> Result<u64, UpstreamError> {
        let remote = self.config.remote_name(name);
        let response = self
            .send(
                Method::HEAD,
                &remote,
                &format!("blobs/{digest}"),
                None,
                Some(self.config.timeout),
            )
            .await?;
        if !response.status().is_success() {
            return Err(self.status_error(response.status(), "blob HEAD"));
        }
        response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| self.error(FailureKind::Other, "blob HEAD without a Content-Length"))
    }

    /// GET of a blob: the response, whose body the caller streams. Each read
    /// of the body is bounded by the timeout; the whole transfer is not.
    pub async fn get_blob(
        &self,
        name: &str,
        digest: &Digest,
    ) -> Result<reqwest::Response, UpstreamError> {
        let remote = self.config.remote_name(name);
        let response = self
            .send(Method::GET, &remote, &format!("blobs/{digest}"), None, None)
            .await?;
        if !response.status().is_success() {
            return Err(self.status_error(response.status(), "blob GET"));
        }
        Ok(response)
    }
}

/// Most names one listing (catalog, tags) may return: a bound on what a
/// remote registry can make us hold.
const MAX_LISTED: usize = 1_000_000;
/// Names asked for per page.
const LIST_PAGE: usize = 1000;

impl UpstreamClient {
    /// Every repository the upstream lists in its catalog (`/v2/_catalog`,
    /// followed page by page).
    pub async fn catalog(&self) -> Result<Vec<String>, UpstreamError> {
        self.list("_catalog", "registry:catalog:*", "repositories")
            .await
    }

    /// Every tag of a repository (`/v2/NAME/tags/list`, page by page).
    pub async fn tags(&self, name: &str) -> Result<Vec<String>, UpstreamError> {
        let remote = self.config.remote_name(name);
        self.list(
            &format!("{remote}/tags/list"),
            &Self::scope(&remote),
            "tags",
        )
        .await
    }

    async fn list(
        &self,
        path: &str,
        scope: &str,
        field: &str,
    ) -> Result<Vec<String>, UpstreamError> {
        let mut out: Vec<String> = Vec::new();
        let mut next = format!("{path}?n={LIST_PAGE}");
        loop {
            let response = self
                .send_scoped(Method::GET, &next, scope, None, Some(self.config.timeout))
                .await?;
            if !response.status().is_success() {
                return Err(self.status_error(response.status(), path));
            }
            let link = response
                .headers()
                .get(header::LINK)
                .and_then(|v| v.to_str().ok())
                .and_then(next_page);
            let body = read_limited(response, 16 << 20)
                .await
                .map_err(|e| match e {
                    ReadError::Transport(e) => self.transport_error(&e),
                    ReadError::TooLarge => {
                        self.error(FailureKind::TooLarge, format!("{path}: page too large"))
                    }
                })?;
            let page: serde_json::Value = serde_json::from_slice(&body)
                .map_err(|e| self.error(FailureKind::Other, format!("{path}: {e}")))?;
            let names = page[field].as_array().cloned().unwrap_or_default();
            let before = out.len();
            out.extend(names.iter().filter_map(|n| n.as_str().map(str::to_string)));
            if out.len() > MAX_LISTED {
                return Err(self.error(
                    FailureKind::TooLarge,
                    format!("{path}: more than {MAX_LISTED} names"),
                ));
            }
            match link {
                // A page that adds nothing ends it (a server looping on
                // its own link).
                Some(link) if out.len() > before => next = link,
                _ => return Ok(out),
            }
        }
    }
}

/// The path after `/v2/` of a `Link: <...>; rel="next"` header.
pub fn next_page(link: &str) -> Option<String> {
    link.split(',').find_map(|part| {
        let (target, params) = part.trim().split_once(';')?;
        if !params.split(';').any(|p| {
            let p = p.trim();
            p == "rel=\"next\"" || p == "rel=next"
        }) {
            return None;
        }
        let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        // Absolute or relative to the host.
        let path = match target.find("/v2/") {
            Some(at) => &target[at + 4..],
            None => return None,
        };
        (!path.is_empty()).then(|| path.to_string())
    })
}

fn claimed_digest(headers: &HeaderMap) -> Option<Digest> {
    headers
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

enum ReadError {
    Transport(reqwest::Error),
    TooLarge,
}

async fn read_limited(response: reqwest::Response, limit: u64) -> Result<Bytes, ReadError> {
    if response.content_length().is_some_and(|n| n > limit) {
        return Err(ReadError::TooLarge);
    }
    let mut stream = response.bytes_stream();
    let mut buf = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(ReadError::Transport)?;
        if (buf.len() + chunk.len()) as u64 > limit {
            return Err(ReadError::TooLarge);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(namespace: &str, url: &str) -> UpstreamConfig {
        UpstreamConfig {
            tls: ClientTls::default(),
            namespace: namespace.into(),
            url: url.into(),
            credentials: None,
            bearer: None,
            headers: Vec::new(),
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn the_next_page_comes_from_the_link_header() {
        assert_eq!(
            next_page("</v2/_catalog?last=b&n=2>; rel=\"next\"").as_deref(),
            Some("_catalog?last=b&n=2")
        );
        assert_eq!(
            next_page("<https://r.example/v2/a/tags/list?last=x&n=9>; rel=\"next\"").as_deref(),
            Some("a/tags/list?last=x&n=9")
        );
        assert_eq!(next_page("</v2/x>; rel=\"prev\""), None);
        assert_eq!(next_page("garbage"), None);
        assert_eq!(next_page("<>; rel=next"), None);
    }

    #[test]
    fn docker_hub_official_images_live_under_library() {
        let hub = config("docker.io", "https://registry-1.docker.io");
        assert_eq!(hub.remote_name("alpine"), "library/alpine");
        assert_eq!(hub.remote_name("library/alpine"), "library/alpine");
        assert_eq!(hub.remote_name("grafana/grafana"), "grafana/grafana");
        let ghcr = config("ghcr.io", "https://ghcr.io");
        assert_eq!(ghcr.remote_name("alpine"), "alpine");
    }

    #[test]
    fn only_outages_count_as_unavailable() {
        let e = |kind| UpstreamError {
            namespace: "n".into(),
            url: "u".into(),
            kind,
            message: String::new(),
        };
        for kind in [
            FailureKind::Connect,
            FailureKind::Timeout,
            FailureKind::ServerError,
            FailureKind::RateLimited,
        ] {
            assert!(e(kind).is_unavailable());
        }
        for kind in [
            FailureKind::NotFound,
            FailureKind::Unauthorized,
            FailureKind::Corrupt,
            FailureKind::TooLarge,
            FailureKind::Other,
        ] {
            assert!(!e(kind).is_unavailable());
        }
    }
}
