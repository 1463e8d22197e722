//! Where metadata and blobs live: the engine URLs and how to reach etcd.

use std::path::PathBuf;
use std::time::Duration;

use super::ConfigError;

/// Where metadata lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Metadata {
    /// redb, in `<data_dir>/meta.redb`.
    Redb,
    /// An etcd cluster: client endpoints and the key prefix of this registry.
    Etcd {
        endpoints: Vec<String>,
        prefix: String,
    },
}

impl Metadata {
    /// Parses `redb` or `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]`.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let invalid = |why: &str| ConfigError::Metadata(format!("{s:?}: {why}"));
        if s == "redb" {
            return Ok(Metadata::Redb);
        }
        let Some(rest) = s.strip_prefix("etcd://") else {
            return Err(invalid(
                "expected `redb` or `etcd://HOST:PORT,...[/PREFIX]`",
            ));
        };
        let (hosts, prefix) = match rest.split_once('/') {
            Some((hosts, prefix)) => (hosts, prefix),
            None => (rest, "berth"),
        };
        let prefix = prefix.trim_matches('/');
        if prefix.is_empty() {
            return Err(invalid("the key prefix must not be empty"));
        }
        let endpoints: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| format!("http://{h}"))
            .collect();
        if endpoints.is_empty() {
            return Err(invalid("no etcd endpoint given"));
        }
        Ok(Metadata::Etcd {
            endpoints,
            prefix: format!("/{prefix}/"),
        })
    }
}

/// Where blobs live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Storage {
    /// Files under the data directory.
    Fs,
    /// An S3-compatible bucket, with a key prefix (empty or ending in `/`).
    S3 { bucket: String, prefix: String },
}

impl Storage {
    /// Parses `fs` or `s3://BUCKET[/PREFIX]`.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        if s == "fs" {
            return Ok(Storage::Fs);
        }
        let invalid = |why: &str| ConfigError::Storage(format!("{s:?}: {why}"));
        let Some(rest) = s.strip_prefix("s3://") else {
            return Err(invalid("expected `fs` or `s3://BUCKET[/PREFIX]`"));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        // S3's bucket naming rules.
        let valid_bucket = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !valid_bucket {
            return Err(invalid("not a valid bucket name"));
        }
        let prefix = prefix.trim_matches('/');
        Ok(Storage::S3 {
            bucket: bucket.to_string(),
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
        })
    }
}

/// How this node connects to etcd, beyond the endpoints.
#[derive(Clone, Default)]
pub struct EtcdAccess {
    pub timeout: Duration,
    pub user: Option<(String, String)>,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

// Never print the password.
impl std::fmt::Debug for EtcdAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdAccess")
            .field("timeout", &self.timeout)
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .field("ca_file", &self.ca_file)
            .field("client_cert", &self.client_cert)
            .finish()
    }
}
