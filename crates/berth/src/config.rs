//! Configuration: command-line flags override `BERTH_*` environment variables
//! (clap reads both), which override the TOML file, which overrides defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde::Deserialize;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `berth serve` options. Every option can also be set in the TOML file under
/// the same name with underscores (e.g. `data_dir = "/var/lib/berth"`).
#[derive(Args, Debug, Default)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "BERTH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:5000].
    #[arg(long, env = "BERTH_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Directory for blobs and metadata [default: ./berth-data].
    #[arg(long, env = "BERTH_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Metadata engine: `redb` (embedded, in the data directory) or
    /// `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]` [default: redb].
    #[arg(long, env = "BERTH_METADATA")]
    pub metadata: Option<String>,
    /// Largest manifest accepted, in bytes [default: 4194304].
    #[arg(long, env = "BERTH_MAX_MANIFEST_BYTES")]
    pub max_manifest_bytes: Option<u64>,
    /// Largest blob accepted, in bytes [default: 1 TiB].
    #[arg(long, env = "BERTH_MAX_BLOB_BYTES")]
    pub max_blob_bytes: Option<u64>,
    /// Upload sessions idle longer than this are expired [default: 86400].
    #[arg(long, env = "BERTH_UPLOAD_TTL_SECS")]
    pub upload_ttl_secs: Option<u64>,
    /// How often expired upload sessions are removed [default: 600].
    #[arg(long, env = "BERTH_UPLOAD_REAP_INTERVAL_SECS")]
    pub upload_reap_interval_secs: Option<u64>,
    /// Memory for caching recently served manifests, in bytes; 0 disables
    /// [default: 67108864].
    #[arg(long, env = "BERTH_MANIFEST_CACHE_BYTES")]
    pub manifest_cache_bytes: Option<u64>,
    /// Verify blobs against their digest on every whole read [default: true].
    #[arg(long, env = "BERTH_VERIFY_BLOB_READS")]
    pub verify_blob_reads: Option<bool>,
    /// Seconds a request body may send nothing before it is abandoned
    /// [default: 60].
    #[arg(long, env = "BERTH_BODY_IDLE_TIMEOUT_SECS")]
    pub body_idle_timeout_secs: Option<u64>,
    /// Requests streaming blob content in at once; more get 429 [default: 512].
    #[arg(long, env = "BERTH_MAX_CONCURRENT_UPLOADS")]
    pub max_concurrent_uploads: Option<usize>,
    /// Seconds a client has to send request headers [default: 30].
    #[arg(long, env = "BERTH_HEADER_READ_TIMEOUT_SECS")]
    pub header_read_timeout_secs: Option<u64>,
    /// Seconds a drain waits for in-flight requests [default: 30].
    #[arg(long, env = "BERTH_SHUTDOWN_GRACE_SECS")]
    pub shutdown_grace_secs: Option<u64>,
    /// Log format [default: text].
    #[arg(long, env = "BERTH_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
}

/// The TOML file: the same options, all optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    metadata: Option<String>,
    max_manifest_bytes: Option<u64>,
    max_blob_bytes: Option<u64>,
    upload_ttl_secs: Option<u64>,
    upload_reap_interval_secs: Option<u64>,
    manifest_cache_bytes: Option<u64>,
    verify_blob_reads: Option<bool>,
    header_read_timeout_secs: Option<u64>,
    body_idle_timeout_secs: Option<u64>,
    max_concurrent_uploads: Option<usize>,
    shutdown_grace_secs: Option<u64>,
    log_format: Option<LogFormat>,
}

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

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub metadata: Metadata,
    pub max_manifest_bytes: u64,
    pub max_blob_bytes: u64,
    pub upload_ttl: Duration,
    pub upload_reap_interval: Duration,
    pub manifest_cache_bytes: u64,
    pub verify_blob_reads: bool,
    pub header_read_timeout: Duration,
    pub body_idle_timeout: Duration,
    pub max_concurrent_uploads: usize,
    pub shutdown_grace: Duration,
    pub log_format: LogFormat,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    #[error("invalid metadata engine {0}")]
    Metadata(String),
}

fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.to_path_buf(),
        source: Box::new(source),
    })
}

impl ServeConfig {
    pub fn resolve(args: ServeArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => load_file(path)?,
            None => FileConfig::default(),
        };
        let secs = |name: &'static str, v: u64| {
            if v == 0 {
                Err(ConfigError::Zero(name))
            } else {
                Ok(Duration::from_secs(v))
            }
        };
        let config = ServeConfig {
            listen: args
                .listen
                .or(file.listen)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 5000))),
            data_dir: args
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("berth-data")),
            metadata: Metadata::parse(
                args.metadata
                    .as_deref()
                    .or(file.metadata.as_deref())
                    .unwrap_or("redb"),
            )?,
            max_manifest_bytes: args
                .max_manifest_bytes
                .or(file.max_manifest_bytes)
                .unwrap_or(4 << 20),
            max_blob_bytes: args
                .max_blob_bytes
                .or(file.max_blob_bytes)
                .unwrap_or(1 << 40),
            upload_ttl: secs(
                "upload_ttl_secs",
                args.upload_ttl_secs
                    .or(file.upload_ttl_secs)
                    .unwrap_or(86_400),
            )?,
            upload_reap_interval: secs(
                "upload_reap_interval_secs",
                args.upload_reap_interval_secs
                    .or(file.upload_reap_interval_secs)
                    .unwrap_or(600),
            )?,
            manifest_cache_bytes: args
                .manifest_cache_bytes
                .or(file.manifest_cache_bytes)
                .unwrap_or(64 << 20),
            verify_blob_reads: args
                .verify_blob_reads
                .or(file.verify_blob_reads)
                .unwrap_or(true),
            header_read_timeout: secs(
                "header_read_timeout_secs",
                args.header_read_timeout_secs
                    .or(file.header_read_timeout_secs)
                    .unwrap_or(30),
            )?,
            body_idle_timeout: secs(
                "body_idle_timeout_secs",
                args.body_idle_timeout_secs
                    .or(file.body_idle_timeout_secs)
                    .unwrap_or(60),
            )?,
            max_concurrent_uploads: args
                .max_concurrent_uploads
                .or(file.max_concurrent_uploads)
                .unwrap_or(512),
            shutdown_grace: secs(
                "shutdown_grace_secs",
                args.shutdown_grace_secs
                    .or(file.shutdown_grace_secs)
                    .unwrap_or(30),
            )?,
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
        };
        if config.max_manifest_bytes == 0 {
            return Err(ConfigError::Zero("max_manifest_bytes"));
        }
        if config.max_concurrent_uploads == 0 {
            return Err(ConfigError::Zero("max_concurrent_uploads"));
        }
        if config.max_blob_bytes == 0 {
            return Err(ConfigError::Zero("max_blob_bytes"));
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_which_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("berth.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:6000\"\ndata_dir = \"/from/file\"\nupload_ttl_secs = 60\n",
        )
        .unwrap();
        let config = ServeConfig::resolve(ServeArgs {
            config: Some(path),
            data_dir: Some("/from/flag".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(config.listen.port(), 6000);
        assert_eq!(config.data_dir, PathBuf::from("/from/flag"));
        assert_eq!(config.upload_ttl, Duration::from_secs(60));
        assert_eq!(config.max_manifest_bytes, 4 << 20);
        assert!(config.verify_blob_reads);
    }

    #[test]
    fn metadata_engines_parse() {
        assert_eq!(Metadata::parse("redb").unwrap(), Metadata::Redb);
        assert_eq!(
            Metadata::parse("etcd://10.0.0.1:2379,10.0.0.2:2379/prod/eu").unwrap(),
            Metadata::Etcd {
                endpoints: vec!["http://10.0.0.1:2379".into(), "http://10.0.0.2:2379".into()],
                prefix: "/prod/eu/".into(),
            }
        );
        assert_eq!(
            Metadata::parse("etcd://127.0.0.1:2379").unwrap(),
            Metadata::Etcd {
                endpoints: vec!["http://127.0.0.1:2379".into()],
                prefix: "/berth/".into(),
            }
        );
        for bad in ["", "postgres://x", "etcd://", "etcd:///p", "etcd://h:1//"] {
            assert!(Metadata::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn unknown_keys_and_zero_durations_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("berth.toml");
        std::fs::write(&path, "lisen = \"127.0.0.1:6000\"\n").unwrap();
        assert!(matches!(
            ServeConfig::resolve(ServeArgs {
                config: Some(path),
                ..Default::default()
            }),
            Err(ConfigError::Parse { .. })
        ));
        assert!(matches!(
            ServeConfig::resolve(ServeArgs {
                upload_ttl_secs: Some(0),
                ..Default::default()
            }),
            Err(ConfigError::Zero(_))
        ));
    }
}
