//! Configuration: command-line flags override `BERTH_*` environment variables
//! (clap reads both), which override the TOML file, which overrides defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde::Deserialize;

mod backup;
mod cache;
mod engines;
mod lifecycle;
mod replication;
mod security;

pub use backup::{BackupArgs, BackupSettings};
use cache::upstreams;
pub use cache::{CacheSettings, FileUpstream};
pub use engines::{EtcdAccess, Metadata, Storage};
pub use lifecycle::{LifecycleArgs, LifecycleSettings, RetentionSetting};
use replication::replication;
pub use replication::{FilePeer, ReplicationSettings};
pub use security::{SecurityArgs, SecuritySettings};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `berth serve` options. Every option can also be set in the TOML file under
/// the same name with underscores (e.g. `data_dir = "/var/lib/berth"`).
#[derive(Args, Default)]
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
    /// Seconds one etcd call may take before it fails (and a write gets
    /// 503) [default: 3].
    #[arg(long, env = "BERTH_ETCD_TIMEOUT_SECS")]
    pub etcd_timeout_secs: Option<u64>,
    /// etcd user name, when etcd authentication is on.
    #[arg(long, env = "BERTH_ETCD_USER")]
    pub etcd_user: Option<String>,
    /// etcd password (prefer the environment variable).
    #[arg(long, env = "BERTH_ETCD_PASSWORD", hide_env_values = true)]
    pub etcd_password: Option<String>,
    /// CA certificate (PEM) for TLS to etcd; turns endpoints to https.
    #[arg(long, env = "BERTH_ETCD_CA_FILE")]
    pub etcd_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for etcd, with --etcd-key-file.
    #[arg(long, env = "BERTH_ETCD_CERT_FILE")]
    pub etcd_cert_file: Option<PathBuf>,
    /// Client key (PEM) for etcd.
    #[arg(long, env = "BERTH_ETCD_KEY_FILE")]
    pub etcd_key_file: Option<PathBuf>,
    /// Blob engine: `fs` (files in the data directory) or
    /// `s3://BUCKET[/PREFIX]`, configured by the standard AWS variables
    /// (AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY) [default: fs].
    #[arg(long, env = "BERTH_STORAGE")]
    pub storage: Option<String>,
    /// Seconds one object-storage request may take before it is retried or
    /// fails [default: 10].
    #[arg(long, env = "BERTH_STORAGE_TIMEOUT_SECS")]
    pub storage_timeout_secs: Option<u64>,
    /// With S3 storage, answer blob GETs with a redirect to a pre-signed URL
    /// valid this many seconds; 0 serves the bytes through Berth [default: 0].
    #[arg(long, env = "BERTH_STORAGE_REDIRECT_SECS")]
    pub storage_redirect_secs: Option<u64>,
    /// With S3 storage, keep connections to it open for later requests;
    /// `false` opens one per request (for servers without TCP_NODELAY, such
    /// as Garage 2.5, see docs/cluster.md) [default: true].
    #[arg(long, env = "BERTH_STORAGE_REUSE_CONNECTIONS")]
    pub storage_reuse_connections: Option<bool>,
    /// This node's name in its cluster [default: HOSTNAME-PORT].
    #[arg(long, env = "BERTH_NODE_NAME")]
    pub node_name: Option<String>,
    /// This node's zone (shown by `berth cluster status`) [default: none].
    #[arg(long, env = "BERTH_ZONE")]
    pub zone: Option<String>,
    /// URL at which other nodes and operators reach this node
    /// [default: http://LISTEN].
    #[arg(long, env = "BERTH_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
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
    /// Requests streaming blob content in at once; more get 429 [default:
    /// 512 with files, 64 with S3].
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
    /// A pull-through cache upstream, `NAMESPACE=URL` (repeatable), e.g.
    /// `docker.io=https://registry-1.docker.io`: `HOST/docker.io/library/alpine`
    /// is then served from that registry's `library/alpine`. Credentials go
    /// in the configuration file.
    #[arg(long = "upstream", env = "BERTH_UPSTREAMS", value_delimiter = ',')]
    pub upstreams: Vec<String>,
    /// The upstream namespace that serves repositories not found here, for
    /// Docker's `registry-mirrors` (requests for `library/alpine`).
    #[arg(long, env = "BERTH_CACHE_MIRROR_DEFAULT")]
    pub cache_mirror_default: Option<String>,
    /// Seconds a cached tag is served before the upstream is asked again
    /// (a HEAD) [default: 300].
    #[arg(long, env = "BERTH_CACHE_TAG_TTL_SECS")]
    pub cache_tag_ttl_secs: Option<u64>,
    /// Size limit of cached images in bytes; least recently used unpinned
    /// images are evicted past it; 0 for none [default: 0].
    #[arg(long, env = "BERTH_CACHE_MAX_BYTES")]
    pub cache_max_bytes: Option<u64>,
    /// How often the eviction job runs [default: 300].
    #[arg(long, env = "BERTH_CACHE_EVICT_INTERVAL_SECS")]
    pub cache_evict_interval_secs: Option<u64>,
    /// Seconds an upstream request (or each read of a blob from it) may take
    /// [default: 10].
    #[arg(long, env = "BERTH_UPSTREAM_TIMEOUT_SECS")]
    pub upstream_timeout_secs: Option<u64>,
    /// This region's name, for geo-replication (turns the change log on).
    #[arg(long, env = "BERTH_REGION")]
    pub region: Option<String>,
    /// A peer region, `NAME=URL` (repeatable): its changes are replicated
    /// here, and local misses read through to it.
    #[arg(long = "peer", env = "BERTH_PEERS", value_delimiter = ',')]
    pub peers: Vec<String>,
    /// The secret regions present to each other's change feeds.
    #[arg(long, env = "BERTH_REPLICATION_SECRET", hide_env_values = true)]
    pub replication_secret: Option<String>,
    /// Milliseconds a read-through to a peer may take [default: 1000].
    #[arg(long, env = "BERTH_READ_THROUGH_TIMEOUT_MS")]
    pub read_through_timeout_ms: Option<u64>,
    #[command(flatten)]
    pub security: SecurityArgs,
    #[command(flatten)]
    pub lifecycle: LifecycleArgs,
    #[command(flatten)]
    pub backup: BackupArgs,
}

/// The TOML file: the same options, all optional.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    metadata: Option<String>,
    etcd_timeout_secs: Option<u64>,
    etcd_user: Option<String>,
    etcd_password: Option<String>,
    etcd_ca_file: Option<PathBuf>,
    etcd_cert_file: Option<PathBuf>,
    etcd_key_file: Option<PathBuf>,
    storage: Option<String>,
    storage_timeout_secs: Option<u64>,
    storage_redirect_secs: Option<u64>,
    storage_reuse_connections: Option<bool>,
    node_name: Option<String>,
    zone: Option<String>,
    advertise_url: Option<String>,
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
    #[serde(default)]
    upstream: Vec<FileUpstream>,
    cache_mirror_default: Option<String>,
    cache_tag_ttl_secs: Option<u64>,
    cache_max_bytes: Option<u64>,
    cache_evict_interval_secs: Option<u64>,
    upstream_timeout_secs: Option<u64>,
    region: Option<String>,
    #[serde(default)]
    peer: Vec<FilePeer>,
    replication_secret: Option<String>,
    read_through_timeout_ms: Option<u64>,
    #[serde(flatten)]
    security: security::FileSecurity,
    #[serde(flatten)]
    lifecycle: lifecycle::FileLifecycle,
    #[serde(flatten)]
    backup: backup::FileBackup,
}

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub metadata: Metadata,
    pub etcd: EtcdAccess,
    pub storage: Storage,
    pub storage_timeout: Duration,
    pub storage_redirect: Option<Duration>,
    pub storage_reuse_connections: bool,
    pub node_name: String,
    pub zone: String,
    pub advertise_url: String,
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
    pub cache: CacheSettings,
    pub replication: Option<ReplicationSettings>,
    pub security: SecuritySettings,
    pub lifecycle: LifecycleSettings,
    pub backup: BackupSettings,
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
    #[error("invalid storage engine {0}")]
    Storage(String),
    #[error("{0}")]
    Invalid(String),
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "berth".into())
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
        let listen = args
            .listen
            .or(file.listen)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 5000)));
        let etcd_user = args.etcd_user.or(file.etcd_user);
        let etcd_password = args.etcd_password.or(file.etcd_password);
        let user = match (etcd_user, etcd_password) {
            (Some(user), Some(password)) => Some((user, password)),
            (None, None) => None,
            _ => {
                return Err(ConfigError::Invalid(
                    "etcd_user and etcd_password go together".into(),
                ));
            }
        };
        let client_cert = match (
            args.etcd_cert_file.or(file.etcd_cert_file),
            args.etcd_key_file.or(file.etcd_key_file),
        ) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => {
                return Err(ConfigError::Invalid(
                    "etcd_cert_file and etcd_key_file go together".into(),
                ));
            }
        };
        let storage = Storage::parse(
            args.storage
                .as_deref()
                .or(file.storage.as_deref())
                .unwrap_or("fs"),
        )?;
        // An upload into S3 may hold up to 24 MiB of parts in flight, one
        // into files about 1 MiB.
        let default_uploads = match storage {
            Storage::Fs => 512,
            Storage::S3 { .. } => 64,
        };
        let cache = CacheSettings {
            upstreams: upstreams(&args.upstreams, &file.upstream)?,
            mirror_default: args.cache_mirror_default.or(file.cache_mirror_default),
            tag_ttl: Duration::from_secs(
                args.cache_tag_ttl_secs
                    .or(file.cache_tag_ttl_secs)
                    .unwrap_or(300),
            ),
            max_bytes: args.cache_max_bytes.or(file.cache_max_bytes).unwrap_or(0),
            evict_interval: secs(
                "cache_evict_interval_secs",
                args.cache_evict_interval_secs
                    .or(file.cache_evict_interval_secs)
                    .unwrap_or(300),
            )?,
            upstream_timeout: secs(
                "upstream_timeout_secs",
                args.upstream_timeout_secs
                    .or(file.upstream_timeout_secs)
                    .unwrap_or(10),
            )?,
        };
        if let Some(default) = &cache.mirror_default
            && !cache.upstreams.iter().any(|u| &u.namespace == default)
        {
            return Err(ConfigError::Invalid(format!(
                "cache_mirror_default {default:?} is not a configured upstream"
            )));
        }
        let replication = replication(
            args.region.or(file.region),
            args.replication_secret.or(file.replication_secret),
            &args.peers,
            &file.peer,
            args.read_through_timeout_ms
                .or(file.read_through_timeout_ms)
                .unwrap_or(1000),
        )?;
        let security = security::resolve(args.security, file.security, listen)?;
        let lifecycle = lifecycle::resolve(args.lifecycle, file.lifecycle)?;
        let backup = backup::resolve(args.backup, file.backup)?;
        let scheme = if security.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let config = ServeConfig {
            security,
            lifecycle,
            backup,
            cache,
            replication,
            listen,
            etcd: EtcdAccess {
                timeout: secs(
                    "etcd_timeout_secs",
                    args.etcd_timeout_secs
                        .or(file.etcd_timeout_secs)
                        .unwrap_or(3),
                )?,
                user,
                ca_file: args.etcd_ca_file.or(file.etcd_ca_file),
                client_cert,
            },
            storage: storage.clone(),
            storage_timeout: secs(
                "storage_timeout_secs",
                args.storage_timeout_secs
                    .or(file.storage_timeout_secs)
                    .unwrap_or(10),
            )?,
            storage_redirect: match args
                .storage_redirect_secs
                .or(file.storage_redirect_secs)
                .unwrap_or(0)
            {
                0 => None,
                s => Some(Duration::from_secs(s)),
            },
            storage_reuse_connections: args
                .storage_reuse_connections
                .or(file.storage_reuse_connections)
                .unwrap_or(true),
            node_name: args
                .node_name
                .or(file.node_name)
                .unwrap_or_else(|| format!("{}-{}", hostname(), listen.port())),
            zone: args.zone.or(file.zone).unwrap_or_default(),
            advertise_url: args
                .advertise_url
                .or(file.advertise_url)
                .unwrap_or_else(|| format!("{scheme}://{listen}")),
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
                .unwrap_or(default_uploads),
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
        backup::check_apart(&config.backup, &config.data_dir, &config.storage)?;
        let name_ok = !config.node_name.is_empty()
            && config.node_name.len() <= 64
            && config
                .node_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !name_ok {
            return Err(ConfigError::Invalid(format!(
                "node name {:?}: use 1-64 letters, digits, '-', '_' or '.'",
                config.node_name
            )));
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
    fn storage_engines_parse() {
        assert_eq!(Storage::parse("fs").unwrap(), Storage::Fs);
        assert_eq!(
            Storage::parse("s3://berth-blobs").unwrap(),
            Storage::S3 {
                bucket: "berth-blobs".into(),
                prefix: String::new()
            }
        );
        assert_eq!(
            Storage::parse("s3://berth-blobs/eu/prod/").unwrap(),
            Storage::S3 {
                bucket: "berth-blobs".into(),
                prefix: "eu/prod/".into()
            }
        );
        for bad in ["", "s3://", "s3://A_B", "gs://x", "s3://ab"] {
            assert!(Storage::parse(bad).is_err(), "{bad:?}");
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
