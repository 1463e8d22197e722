//! Pull-through cache settings: upstreams by namespace.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;

/// An upstream in the TOML file (`[[upstream]]`).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileUpstream {
    pub namespace: String,
    pub url: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// A file holding the password (trailing newline ignored).
    pub password_file: Option<PathBuf>,
}

/// A configured upstream.
#[derive(Clone)]
pub struct UpstreamSetting {
    pub namespace: String,
    pub url: String,
    pub credentials: Option<(String, String)>,
}

// Never print a password.
impl std::fmt::Debug for UpstreamSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamSetting")
            .field("namespace", &self.namespace)
            .field("url", &self.url)
            .field("user", &self.credentials.as_ref().map(|(u, _)| u))
            .finish()
    }
}

/// The pull-through cache's settings.
#[derive(Debug, Clone, Default)]
pub struct CacheSettings {
    pub upstreams: Vec<UpstreamSetting>,
    pub mirror_default: Option<String>,
    pub tag_ttl: Duration,
    pub max_bytes: u64,
    pub evict_interval: Duration,
    pub upstream_timeout: Duration,
}

/// Upstreams from flags (`NAMESPACE=URL`) and the file; a flag replaces the
/// file's entry for the same namespace.
pub(super) fn upstreams(
    flags: &[String],
    file: &[FileUpstream],
) -> Result<Vec<UpstreamSetting>, ConfigError> {
    let mut out: Vec<UpstreamSetting> = Vec::new();
    for entry in file {
        let password = match (&entry.password, &entry.password_file) {
            (Some(p), None) => Some(p.clone()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Read {
                        path: path.clone(),
                        source,
                    })?
                    .trim_end_matches(['\n', '\r'])
                    .to_string(),
            ),
            (None, None) => None,
            (Some(_), Some(_)) => {
                return Err(ConfigError::Invalid(format!(
                    "upstream {}: password and password_file exclude each other",
                    entry.namespace
                )));
            }
        };
        let credentials = match (&entry.username, password) {
            (Some(u), Some(p)) => Some((u.clone(), p)),
            (None, None) => None,
            _ => {
                return Err(ConfigError::Invalid(format!(
                    "upstream {}: username and password go together",
                    entry.namespace
                )));
            }
        };
        out.push(UpstreamSetting {
            namespace: entry.namespace.clone(),
            url: entry.url.clone(),
            credentials,
        });
    }
    for flag in flags.iter().filter(|f| !f.is_empty()) {
        let Some((namespace, url)) = flag.split_once('=') else {
            return Err(ConfigError::Invalid(format!(
                "--upstream {flag:?}: expected NAMESPACE=URL, e.g. docker.io=https://registry-1.docker.io"
            )));
        };
        out.retain(|u| u.namespace != namespace);
        out.push(UpstreamSetting {
            namespace: namespace.to_string(),
            url: url.to_string(),
            credentials: None,
        });
    }
    for u in &out {
        if !berth_proxy::valid_namespace(&u.namespace) {
            return Err(ConfigError::Invalid(format!(
                "upstream namespace {:?}: use a repository path such as docker.io or ghcr.io",
                u.namespace
            )));
        }
        if !(u.url.starts_with("http://") || u.url.starts_with("https://")) {
            return Err(ConfigError::Invalid(format!(
                "upstream {} URL {:?} must start with http:// or https://",
                u.namespace, u.url
            )));
        }
    }
    Ok(out)
}
