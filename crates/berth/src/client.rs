//! How operator commands reach a running registry: its URL, the CA that
//! signed its certificate, and the credentials (an htpasswd user or an API
//! token) that the registry's policy knows as an administrator.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::admin::AdminError;

#[derive(Args, Debug, Clone)]
pub struct Connection {
    /// The registry's URL (a node or the load balancer).
    #[arg(
        long,
        env = "BERTH_REGISTRY",
        default_value = "http://127.0.0.1:5000",
        global = true
    )]
    pub registry: String,
    /// User name for a registry with authentication (with an API token, any
    /// name; `token` when not given).
    #[arg(long, env = "BERTH_USERNAME", global = true)]
    pub username: Option<String>,
    /// The password, or an API token's secret (prefer the environment
    /// variable: flags show in the process list).
    #[arg(long, env = "BERTH_PASSWORD", hide_env_values = true, global = true)]
    pub password: Option<String>,
    /// CA certificate (PEM) that signed the registry's certificate.
    #[arg(long, env = "BERTH_CA_FILE", global = true)]
    pub ca_file: Option<PathBuf>,
}

/// A client for one registry.
pub struct Api {
    base: String,
    http: reqwest::Client,
}

fn failed(what: &str, e: impl std::fmt::Display) -> AdminError {
    AdminError::Failed(format!("{what}: {e}"))
}

impl Connection {
    /// A client whose reads of one response may idle `read_timeout`.
    pub fn api(&self, read_timeout: Duration) -> Result<Api, AdminError> {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(password) = &self.password {
            let user = self.username.as_deref().unwrap_or("token");
            let mut value = reqwest::header::HeaderValue::from_str(
                &berth_auth::header::basic_header(user, password),
            )
            .map_err(|_| {
                AdminError::Failed(
                    "the user name or password holds characters a header cannot carry".into(),
                )
            })?;
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        } else if self.username.is_some() {
            return Err(AdminError::Failed(
                "--username needs a password (BERTH_PASSWORD)".into(),
            ));
        }
        let mut builder = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(Duration::from_secs(5))
            .read_timeout(read_timeout);
        if let Some(ca) = &self.ca_file {
            let pem = std::fs::read(ca).map_err(|e| failed(&ca.display().to_string(), e))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| failed(&ca.display().to_string(), e))?;
            builder = builder.tls_certs_merge(certs);
        }
        let http = builder
            .build()
            .map_err(|e| failed("cannot build an HTTP client", e))?;
        Ok(Api {
            base: self.registry.trim_end_matches('/').to_string(),
            http,
        })
    }
}

impl Api {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, self.url(path))
    }

    /// A PUT to a URL the registry gave (an upload's `Location`).
    pub fn put_url(&self, url: &str) -> reqwest::RequestBuilder {
        self.http.put(url)
    }

    /// Calls an admin endpoint and returns its JSON answer, or the
    /// registry's error message.
    pub async fn json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&serde_json::Value>,
        bearer: Option<&str>,
    ) -> Result<serde_json::Value, AdminError> {
        self.json_within(method, path, body, bearer, Duration::from_secs(60))
            .await
    }

    /// [`Api::json`] for an endpoint that may take up to `timeout` to
    /// answer.
    pub async fn json_within(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&serde_json::Value>,
        bearer: Option<&str>,
        timeout: Duration,
    ) -> Result<serde_json::Value, AdminError> {
        let mut request = self.request(method.clone(), path).timeout(timeout);
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_string());
        }
        if let Some(secret) = bearer {
            request = request.bearer_auth(secret);
        }
        let what = format!("{method} {}", self.url(path));
        let response = request.send().await.map_err(|e| failed(&what, e))?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| failed(&what, e))?;
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        if !status.is_success() {
            return Err(AdminError::Failed(format!(
                "HTTP {status}: {}",
                error_message(&value, &bytes)
            )));
        }
        Ok(value)
    }
}

/// The message of a spec error body, or the body itself.
pub fn error_message(value: &serde_json::Value, bytes: &[u8]) -> String {
    value["errors"][0]["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| String::from_utf8_lossy(bytes).into_owned())
}
