//! `berth serve`: open the stores, recover, listen, drain on SIGTERM.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use berth_registry::{Limits, Registry};
use berth_server::{AppState, Metrics, RequestLimits, ServeOptions};
use berth_store::blob::fs::FsOptions;
use berth_store::meta::etcd::EtcdOptions;
use berth_store::{EtcdMetaStore, FsBlobStore, MetaStore, RedbMetaStore};
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, Metadata, ServeConfig};

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
}

pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("BERTH_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
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
    let store_err = |source| ServeError::Store {
        path: shown.clone(),
        source,
    };
    let meta: Arc<dyn MetaStore> = match &config.metadata {
        Metadata::Redb => {
            Arc::new(RedbMetaStore::open(&data_dir.join("meta.redb")).map_err(store_err)?)
        }
        Metadata::Etcd { endpoints, prefix } => Arc::new(
            EtcdMetaStore::connect(EtcdOptions::new(endpoints.clone(), prefix.clone()))
                .await
                .map_err(|source| ServeError::Store {
                    path: format!("etcd {}", endpoints.join(",")),
                    source,
                })?,
        ),
    };
    let blobs = FsBlobStore::open(
        &data_dir,
        FsOptions {
            verify_reads: config.verify_blob_reads,
        },
    )
    .map_err(store_err)?;
    let registry = Arc::new(Registry::new(
        meta,
        Arc::new(blobs),
        Limits {
            max_manifest_bytes: config.max_manifest_bytes,
            max_blob_bytes: config.max_blob_bytes,
            manifest_cache_bytes: config.manifest_cache_bytes,
            upload_ttl_ms: config.upload_ttl.as_millis() as u64,
            ..Limits::default()
        },
    ));

    // Uploads interrupted by a crash: keep live sessions (clients resume
    // them), drop expired ones and any data without a session.
    let ttl_ms = config.upload_ttl.as_millis() as u64;
    let expired = registry
        .expire_uploads(ttl_ms, true)
        .await
        .map_err(ServeError::Recovery)?;
    if expired > 0 {
        tracing::info!(expired, "expired stale upload sessions at startup");
    }

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: config.listen,
            source,
        })?;
    let ready = Arc::new(AtomicBool::new(false));
    let state = AppState {
        registry: registry.clone(),
        metrics: Arc::new(Metrics::new()),
        ready: ready.clone(),
        limits: Arc::new(RequestLimits::new(
            config.body_idle_timeout,
            config.max_concurrent_uploads,
        )),
    };
    let app = berth_server::router(state);

    let reaper = tokio::spawn({
        let registry = registry.clone();
        let interval = config.upload_reap_interval;
        async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.tick().await;
            loop {
                ticker.tick().await;
                if let Err(e) = registry.expire_uploads(ttl_ms, false).await {
                    tracing::warn!(error = %e, "upload expiry failed; will retry");
                }
            }
        }
    });

    let local = listener.local_addr().unwrap_or(config.listen);
    let metadata = match &config.metadata {
        Metadata::Redb => "redb".to_string(),
        Metadata::Etcd { endpoints, prefix } => {
            format!("etcd {} under {prefix}", endpoints.join(","))
        }
    };
    tracing::info!(
        "berth {} listening on http://{local}, data in {}, metadata in {metadata}",
        env!("CARGO_PKG_VERSION"),
        std::path::absolute(&data_dir)
            .unwrap_or(data_dir.clone())
            .display()
    );
    ready.store(true, Ordering::Release);

    let shutdown = {
        let ready = ready.clone();
        async move {
            shutdown_signal().await;
            ready.store(false, Ordering::Release);
            tracing::info!("draining: no new connections, finishing in-flight requests");
        }
    };
    let drained = berth_server::serve(
        listener,
        app,
        ServeOptions {
            header_read_timeout: config.header_read_timeout,
            shutdown_grace: config.shutdown_grace,
        },
        shutdown,
    )
    .await;
    reaper.abort();
    if drained {
        tracing::info!("drained; exiting");
        Ok(())
    } else {
        Err(ServeError::DrainTimeout)
    }
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
