//! `berth serve`: open the stores, recover, listen, drain on SIGTERM.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use berth_proxy::{CacheOptions, Credentials, PullThroughCache, UpstreamConfig};
use berth_registry::{Limits, Registry};
use berth_replication::{PeerConfig, ReplicationOptions, Replicator};
use berth_server::{
    AppState, BackupJob, Backups, Compactor, GarbageCollector, Metrics, RequestLimits, Retention,
    Scrubber, ServeOptions, Shared,
};
use berth_store::blob::fs::FsOptions;
use berth_store::meta::etcd::{EtcdOptions, EtcdTls};
use berth_store::{
    BlobStore, EtcdMetaStore, FsBlobStore, MetaStore, RedbMetaStore, S3BlobStore, S3Options,
};
use tracing_subscriber::EnvFilter;

use crate::cluster::{Node, NodeRecord};
use crate::config::{LogFormat, Metadata, ServeConfig, Storage};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot prepare data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot open storage in {path}: {source}")]
    Store {
        path: String,
        source: berth_store::StoreError,
    },
    #[error("startup recovery failed: {0}")]
    Recovery(berth_registry::RegistryError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("drain timed out with requests still in flight")]
    DrainTimeout,
    #[error("cannot start replication: {0}")]
    Replication(berth_replication::ReplicationError),
    #[error("cannot start the pull-through cache: {0}")]
    Cache(berth_proxy::CacheError),
    #[error("cannot join the cluster: {0}")]
    Cluster(crate::cluster::ClusterError),
    #[error(transparent)]
    Security(#[from] crate::security::SecurityError),
}

/// Opens the configured metadata engine.
pub async fn open_metadata(config: &ServeConfig) -> Result<Arc<dyn MetaStore>, ServeError> {
    Ok(match &config.metadata {
        Metadata::Redb => {
            let path = config.data_dir.join("meta.redb");
            Arc::new(
                RedbMetaStore::open(&path).map_err(|source| ServeError::Store {
                    path: path.display().to_string(),
                    source,
                })?,
            )
        }
        Metadata::Etcd { endpoints, prefix } => Arc::new(
            EtcdMetaStore::connect(etcd_options(config, endpoints, prefix)?)
                .await
                .map_err(|source| ServeError::Store {
                    path: format!("etcd {}", endpoints.join(",")),
                    source,
                })?,
        ),
    })
}

pub fn etcd_options(
    config: &ServeConfig,
    endpoints: &[String],
    prefix: &str,
) -> Result<EtcdOptions, ServeError> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|source| ServeError::DataDir {
            path: path.display().to_string(),
            source,
        })
    };
    let mut endpoints = endpoints.to_vec();
    let mut options = EtcdOptions::new(Vec::new(), prefix);
    options.request_timeout = config.etcd.timeout;
    options.user = config.etcd.user.clone();
    if let Some(ca) = &config.etcd.ca_file {
        for endpoint in &mut endpoints {
            if let Some(rest) = endpoint.strip_prefix("http://") {
                *endpoint = format!("https://{rest}");
            }
        }
        let client = match &config.etcd.client_cert {
            Some((cert, key)) => Some((read(cert)?, read(key)?)),
            None => None,
        };
        options.tls = Some(EtcdTls {
            ca_pem: read(ca)?,
            client,
        });
    }
    options.endpoints = endpoints;
    Ok(options)
}

/// Opens the configured blob engine.
pub fn open_blobs(config: &ServeConfig) -> Result<Arc<dyn BlobStore>, ServeError> {
    Ok(match &config.storage {
        Storage::Fs => Arc::new(
            FsBlobStore::open(
                &config.data_dir,
                FsOptions {
                    verify_reads: config.verify_blob_reads,
                },
            )
            .map_err(|source| ServeError::Store {
                path: config.data_dir.display().to_string(),
                source,
            })?,
        ),
        Storage::S3 { bucket, prefix } => {
            let mut options = S3Options::new(bucket.clone());
            options.prefix = prefix.clone();
            options.request_timeout = config.storage_timeout;
            options.verify_reads = config.verify_blob_reads;
            options.redirect_ttl = config.storage_redirect;
            options.reuse_connections = config.storage_reuse_connections;
            Arc::new(
                S3BlobStore::from_env(options).map_err(|source| ServeError::Store {
                    path: format!("s3://{bucket}/{prefix}"),
                    source,
                })?,
            )
        }
    })
}

/// Geo-replication, when this node's region is named.
fn open_replication(
    config: &ServeConfig,
    registry: &Arc<Registry>,
    meta: &Arc<dyn MetaStore>,
) -> Result<Option<Arc<Replicator>>, ServeError> {
    let Some(settings) = &config.replication else {
        return Ok(None);
    };
    for peer in &settings.peers {
        tracing::info!(region = %settings.region, peer = %peer.name, url = %peer.url, "replicating from peer");
    }
    let replicator = Replicator::new(
        registry.clone(),
        meta.clone(),
        ReplicationOptions {
            region: settings.region.clone(),
            tls: crate::security::peer_tls(config)?,
            peers: settings
                .peers
                .iter()
                .map(|p| PeerConfig {
                    name: p.name.clone(),
                    url: p.url.clone(),
                    secret: p.secret.clone(),
                    include: p.include.clone(),
                    exclude: p.exclude.clone(),
                })
                .collect(),
            read_through_timeout: settings.read_through_timeout,
            // A long poll answers at least this often, which is how often a
            // region learns it has caught up with a quiet peer (what lets
            // tombstones go): well inside the compaction window.
            feed_wait: (config.lifecycle.log_retention / 4).clamp(
                std::time::Duration::from_millis(200),
                std::time::Duration::from_secs(10),
            ),
            // Often enough that a reader that is up always looks live to
            // compaction, whose window is the measure.
            clock_margin: config.lifecycle.max_clock_skew,
            ack_refresh: (config.lifecycle.log_retention / 4).clamp(
                std::time::Duration::from_millis(200),
                std::time::Duration::from_secs(30),
            ),
            spool_dir: config.data_dir.join("replication-spool"),
        },
    )
    .map_err(ServeError::Replication)?;
    Ok(Some(Arc::new(replicator)))
}

/// The pull-through cache, when upstreams are configured.
fn open_cache(
    config: &ServeConfig,
    registry: &Arc<Registry>,
    meta: &Arc<dyn MetaStore>,
) -> Result<Option<Arc<PullThroughCache>>, ServeError> {
    let settings = &config.cache;
    if settings.upstreams.is_empty() {
        return Ok(None);
    }
    let tls = crate::security::upstream_tls(config)?;
    let upstreams = settings
        .upstreams
        .iter()
        .map(|u| UpstreamConfig {
            namespace: u.namespace.clone(),
            url: u.url.clone(),
            credentials: u
                .credentials
                .clone()
                .map(|(username, password)| Credentials { username, password }),
            bearer: None,
            headers: Vec::new(),
            timeout: settings.upstream_timeout,
            tls: tls.clone(),
        })
        .collect();
    let cache = PullThroughCache::new(
        registry.clone(),
        meta.clone(),
        upstreams,
        CacheOptions {
            tag_ttl: settings.tag_ttl,
            mirror_default: settings.mirror_default.clone(),
            max_bytes: settings.max_bytes,
            spool_dir: config.data_dir.join("cache-spool"),
            track_images: true,
            outage_backoff: std::time::Duration::from_secs(10),
        },
    )
    .map_err(ServeError::Cache)?;
    Ok(Some(Arc::new(cache)))
}

pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("BERTH_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a terminal: in files and journals they are noise
    // that breaks grep.
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

pub fn run(config: ServeConfig) -> Result<(), ServeError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)?
        .block_on(run_async(config))
}

async fn run_async(config: ServeConfig) -> Result<(), ServeError> {
    let data_dir = config.data_dir.clone();
    let shown = data_dir.display().to_string();
    std::fs::create_dir_all(&data_dir).map_err(|source| ServeError::DataDir {
        path: shown.clone(),
        source,
    })?;
    if matches!(config.metadata, Metadata::Etcd { .. }) && config.storage == Storage::Fs {
        tracing::warn!(
            "metadata in etcd but blobs in local files: only one node may use this metadata prefix; a cluster needs --storage s3://..."
        );
    }
    let meta = open_metadata(&config).await?;
    let blobs = open_blobs(&config)?;
    let mut registry = Registry::new(
        meta.clone(),
        blobs,
        Limits {
            max_manifest_bytes: config.max_manifest_bytes,
            max_blob_bytes: config.max_blob_bytes,
            manifest_cache_bytes: config.manifest_cache_bytes,
            upload_ttl_ms: config.upload_ttl.as_millis() as u64,
            link_refresh_ms: config.lifecycle.link_refresh.as_millis() as u64,
            trash_retention_ms: config.lifecycle.trash_retention.as_millis() as u64,
            max_clock_skew_ms: config.lifecycle.max_clock_skew.as_millis() as u64,
            ..Limits::default()
        },
    );
    if let Some(replication) = &config.replication {
        registry = registry.with_region(replication.region.clone());
    }
    if !config.lifecycle.immutable.is_empty() {
        let rules = config.lifecycle.immutable.clone();
        registry = registry.with_immutable_tags(Arc::new(move |name, tag| {
            rules.iter().any(|rule| rule.covers(name.as_str(), tag))
        }));
    }
    let registry = Arc::new(registry);
    // Changes other nodes of a cluster log wake this node's change feed at
    // once (geo-replication, continuous archiving) instead of at a poll.
    tokio::spawn({
        let registry = registry.clone();
        async move { registry.follow_log_of_other_nodes().await }
    });

    // An embedded node recovers from a crash before serving: it keeps live
    // upload sessions (clients resume them), drops expired ones and any data
    // without a session at once, since redb's lock proves it is alone with
    // its stores. In a cluster, the leader of the expiry job does this.
    let ttl_ms = config.upload_ttl.as_millis() as u64;
    if config.metadata == Metadata::Redb {
        let expired = registry
            .expire_uploads(ttl_ms, 0)
            .await
            .map_err(ServeError::Recovery)?;
        if expired > 0 {
            tracing::info!(expired, "expired stale upload sessions at startup");
        }
    }

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: config.listen,
            source,
        })?;
    let cache = open_cache(&config, &registry, &meta)?;
    let replicator = open_replication(&config, &registry, &meta)?;
    let security = crate::security::start(&config, &meta).await?;
    let ready = Arc::new(AtomicBool::new(false));
    let gc = Arc::new(GarbageCollector::new(
        registry.clone(),
        config.lifecycle.gc_grace,
    ));
    let retention = Arc::new(Retention::new(
        registry.clone(),
        retention_rules(&config.lifecycle.retention, &config.cache),
    ));
    let compactor = Arc::new(
        Compactor::new(
            registry.clone(),
            replicator.clone(),
            config.lifecycle.log_retention,
        )
        .keeping_unarchived(
            config
                .backup
                .every
                .and_then(|_| config.backup.targets.first().cloned()),
        ),
    );
    let scrubber = Arc::new(Scrubber::new(
        registry.clone(),
        config.backup.targets.clone(),
        replicator
            .as_ref()
            .map(|r| r.blob_sources())
            .unwrap_or_default(),
    ));
    let backups = Arc::new(Backups::new(
        registry.clone(),
        config.backup.targets.clone(),
        config.replication.as_ref().map(|r| r.region.clone()),
    ));
    let backup_job = config.backup.every.map(|every| {
        Arc::new(BackupJob::new(
            registry.clone(),
            backups.clone(),
            every,
            config.backup.keep,
        ))
    });
    let region = Arc::new(berth_server::region::RegionWatch::new());
    let region_view = open_region_view(&config, &meta).await?;
    let metrics = Metrics::with_extra(|prometheus| {
        region.register_metrics(prometheus);
        gc.register_metrics(prometheus);
        backups.register_metrics(prometheus);
        if let Some(job) = &backup_job {
            job.register_metrics(prometheus);
        }
        scrubber.register_metrics(prometheus);
        compactor.register_metrics(prometheus);
        retention.register_metrics(prometheus);
        security.security.register_metrics(prometheus);
        if let Some(tls) = &security.tls {
            tls.register_metrics(prometheus);
        }
        if let Some(cache) = &cache {
            cache.metrics().register(prometheus);
        }
        if let Some(replicator) = &replicator {
            replicator.metrics().register(prometheus);
        }
    });
    let state = AppState::new(Shared {
        registry: registry.clone(),
        metrics: Arc::new(metrics),
        cache: cache.clone(),
        replication: replicator.clone(),
        security: security.security.clone(),
        gc: gc.clone(),
        retention: retention.clone(),
        compactor: compactor.clone(),
        scrubber: scrubber.clone(),
        backups: backups.clone(),
        region: region.clone(),
        region_source: Some(region_view.clone()),
        sessions: Default::default(),
        ready: ready.clone(),
        limits: Arc::new(RequestLimits::new(
            config.body_idle_timeout,
            config.max_concurrent_uploads,
        )),
    });
    let app = berth_server::router(state.clone());

    let node = Node::join(
        meta.clone(),
        NodeRecord {
            name: config.node_name.clone(),
            zone: config.zone.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            address: config.advertise_url.clone(),
            started_ms: berth_registry::now_ms(),
            lease: 0,
            drain_requested: false,
        },
    )
    .await
    .map_err(ServeError::Cluster)?;
    let maintainer = tokio::spawn(node.clone().maintain());
    let reaper = tokio::spawn({
        let registry = registry.clone();
        node.clone()
            .run_as_leader("upload-expiry", config.upload_reap_interval, move || {
                let registry = registry.clone();
                async move {
                    if let Err(e) = registry
                        .expire_uploads(ttl_ms, berth_registry::ORPHAN_GRACE_MS)
                        .await
                    {
                        tracing::warn!(error = %e, "upload expiry failed; will retry");
                    }
                }
            })
    });

    // Garbage collection, on one node of the region, when configured.
    let collector = config.lifecycle.gc_interval.map(|interval| {
        let gc = gc.clone();
        tokio::spawn(node.clone().run_as_leader("gc", interval, move || {
            let gc = gc.clone();
            async move {
                let options = berth_registry::GcOptions {
                    dry_run: false,
                    grace_ms: gc.grace().as_millis() as u64,
                };
                // A failure is logged and counted by the collector; the
                // next interval runs again.
                let _ = gc.run(options, None).await;
            }
        }))
    });

    // Scrub of the blobs at rest, on one node of the region, when asked.
    let scrubbing = config.lifecycle.scrub_interval.map(|interval| {
        let scrubber = scrubber.clone();
        tokio::spawn(node.clone().run_as_leader("scrub", interval, move || {
            let scrubber = scrubber.clone();
            async move {
                // Logged and counted by the scrubber; the next interval
                // runs again. What it finds it repairs, from the backup
                // targets and the peers: bytes are verified before they
                // replace anything.
                let _ = scrubber.run(None, true).await;
            }
        }))
    });

    // Scheduled backups with their retention, and the change log archived
    // next to them as it is written, on one node of the region.
    let backing_up = backup_job.clone().map(|job| {
        tokio::spawn(node.clone().run_while_leader("backup".into(), move || {
            let job = job.clone();
            async move { job.turn().await }
        }))
    });

    // Metadata compaction, on one node of the region.
    let compaction = config.lifecycle.compaction_interval.map(|interval| {
        let compactor = compactor.clone();
        tokio::spawn(node.clone().run_as_leader("compaction", interval, move || {
            let compactor = compactor.clone();
            async move {
                // Logged and counted by the compactor; the next interval
                // runs again.
                let _ = compactor.run(false, false).await;
            }
        }))
    });

    // Retention rules, on one node of the region, when there are some.
    let retainer = config
        .lifecycle
        .retention_interval
        .filter(|_| retention.has_rules())
        .map(|interval| {
            let retention = retention.clone();
            tokio::spawn(node.clone().run_as_leader("retention", interval, move || {
                let retention = retention.clone();
                async move {
                    // Logged and counted by the service; the next interval
                    // runs again.
                    let _ = retention.apply().await;
                }
            }))
        });

    let evictor = cache
        .clone()
        .filter(|_| config.cache.max_bytes > 0)
        .map(|cache| {
            tokio::spawn(node.clone().run_as_leader(
                "cache-eviction",
                config.cache.evict_interval,
                move || {
                    let cache = cache.clone();
                    async move {
                        match cache.evict().await {
                            Ok(report) if report.images > 0 => tracing::info!(
                                images = report.images,
                                bytes = report.bytes,
                                blobs_removed = report.blobs_removed,
                                total_after = report.total_after,
                                "cache eviction"
                            ),
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "cache eviction failed; will retry")
                            }
                        }
                    }
                },
            ))
        });

    // One worker per peer region, on one node of the region (a lease).
    let mut workers = Vec::new();
    if let Some(replicator) = &replicator {
        let peers: Vec<String> = replicator.peers().map(str::to_string).collect();
        for peer in peers {
            let replicator = replicator.clone();
            workers.push(tokio::spawn(node.clone().run_while_leader(
                format!("replication-{peer}"),
                move || {
                    let replicator = replicator.clone();
                    let peer = peer.clone();
                    async move { replicator.run_round(&peer).await }
                },
            )));
        }
    }

    let local = listener.local_addr().unwrap_or(config.listen);
    let metadata = match &config.metadata {
        Metadata::Redb => "redb".to_string(),
        Metadata::Etcd { endpoints, prefix } => {
            format!("etcd {} under {prefix}", endpoints.join(","))
        }
    };
    let storage = match &config.storage {
        Storage::Fs => format!(
            "files in {}",
            std::path::absolute(&data_dir)
                .unwrap_or(data_dir.clone())
                .display()
        ),
        Storage::S3 { bucket, prefix } => format!("s3://{bucket}/{prefix}"),
    };
    for upstream in &config.cache.upstreams {
        tracing::info!(
            namespace = %upstream.namespace,
            url = %upstream.url,
            authenticated = upstream.credentials.is_some(),
            "pull-through cache upstream"
        );
    }
    let scheme = if security.tls.is_some() {
        "https"
    } else {
        "http"
    };
    tracing::info!(
        node = %node.name(),
        authentication = security.security.auth.enabled(),
        "berth {} listening on {scheme}://{local}, blobs in {storage}, metadata in {metadata}",
        env!("CARGO_PKG_VERSION"),
    );
    ready.store(true, Ordering::Release);
    // The console's overview and the availability gauges, from the moment
    // the node is ready (a first look before would say "starting").
    let looking = tokio::spawn(region.clone().run(state.clone(), region_view));

    let shutdown = {
        let ready = ready.clone();
        let node = node.clone();
        async move {
            tokio::select! {
                () = shutdown_signal() => {}
                () = node.drain_requested() => {}
            }
            ready.store(false, Ordering::Release);
            tracing::info!("draining: no new connections, finishing in-flight requests");
        }
    };
    let drained = berth_server::serve(
        listener,
        app,
        security.tls.clone(),
        ServeOptions {
            header_read_timeout: config.header_read_timeout,
            shutdown_grace: config.shutdown_grace,
        },
        shutdown,
    )
    .await;
    reaper.abort();
    for task in &security.tasks {
        task.abort();
    }
    for worker in workers {
        worker.abort();
    }
    for job in [
        evictor, collector, retainer, compaction, scrubbing, backing_up,
    ]
    .into_iter()
    .flatten()
    {
        job.abort();
    }
    maintainer.abort();
    looking.abort();
    node.leave().await;
    if drained {
        tracing::info!("drained; exiting");
        Ok(())
    } else {
        Err(ServeError::DrainTimeout)
    }
}

/// What the console and the availability gauges ask about the region.
async fn open_region_view(
    config: &ServeConfig,
    meta: &Arc<dyn MetaStore>,
) -> Result<Arc<dyn berth_server::region::ClusterSource>, ServeError> {
    let etcd = match &config.metadata {
        Metadata::Redb => None,
        Metadata::Etcd { endpoints, prefix } => {
            let options = etcd_options(config, endpoints, prefix)?;
            let store = EtcdMetaStore::connect(options.clone())
                .await
                .map_err(|source| ServeError::Store {
                    path: format!("etcd {}", endpoints.join(",")),
                    source,
                })?;
            Some((store, options))
        }
    };
    let tls = crate::security::peer_tls(config)?;
    let client = crate::region_view::RegionView::probe_client(&tls).map_err(|e| {
        ServeError::Security(crate::security::SecurityError::Invalid(format!(
            "the readiness probes' client: {e}"
        )))
    })?;
    let metadata = match &config.metadata {
        Metadata::Redb => "metadata in redb".to_string(),
        Metadata::Etcd { .. } => "metadata in etcd".to_string(),
    };
    let storage = match &config.storage {
        Storage::Fs => "blobs in local files",
        Storage::S3 { .. } => "blobs in S3",
    };
    Ok(Arc::new(crate::region_view::RegionView::new(
        meta.clone(),
        etcd,
        client,
        config.node_name.clone(),
        format!("{storage}, {metadata}"),
    )))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// The `[[retention]]` rules as the registry applies them. Repositories of
/// the pull-through cache are never retained by a rule: the cache evicts
/// by its own size limit and keeps what is pinned.
fn retention_rules(
    settings: &[crate::config::RetentionSetting],
    cache: &crate::config::CacheSettings,
) -> Vec<berth_registry::RetentionRule> {
    let cached: Vec<String> = cache
        .upstreams
        .iter()
        .map(|u| format!("{}/", u.namespace))
        .collect();
    settings
        .iter()
        .map(|rule| {
            let repositories = rule.repositories.clone();
            let cached = cached.clone();
            let keep_tags = rule.keep_tags.clone();
            berth_registry::RetentionRule {
                repositories: Arc::new(move |name: &str| {
                    !cached.iter().any(|ns| name.starts_with(ns.as_str()))
                        && repositories.iter().any(|g| g.matches(name))
                }),
                keep_last: rule.keep_last,
                keep_newer_than_ms: rule.keep_days.map(|d| d.saturating_mul(86_400_000)),
                keep_tags: Arc::new(move |tag: &str| keep_tags.iter().any(|g| g.matches(tag))),
                untagged_older_than_ms: rule.untagged_days.map(|d| d.saturating_mul(86_400_000)),
            }
        })
        .collect()
}
