//! Operator commands that act on a cluster through its stores:
//! `berth cluster status` and `berth node drain`. They take the same
//! configuration as `berth serve`, so they find the same etcd and bucket.

use std::fmt::Write as _;
use std::time::Duration;

use berth_store::meta::etcd::EtcdOptions;
use berth_store::{EtcdMetaStore, MetaStore};

use crate::cluster;
use crate::config::{Metadata, ServeConfig, Storage};
use crate::region_view;
use crate::serve::{ServeError, etcd_options, open_blobs};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "this command needs etcd metadata (--metadata etcd://...); an embedded node is a cluster of one: ask its /readyz"
    )]
    NotACluster,
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error(transparent)]
    Store(#[from] berth_store::StoreError),
    #[error("{0}")]
    Failed(String),
    #[error("no node named {0:?} is registered")]
    UnknownNode(String),
    #[error("node {0:?} did not leave within {1:?}")]
    DrainTimeout(String, Duration),
}

async fn connect(config: &ServeConfig) -> Result<(EtcdMetaStore, EtcdOptions), AdminError> {
    let Metadata::Etcd { endpoints, prefix } = &config.metadata else {
        return Err(AdminError::NotACluster);
    };
    let options = etcd_options(config, endpoints, prefix)?;
    let store = EtcdMetaStore::connect(options.clone()).await?;
    Ok((store, options))
}

/// Prints nodes (with readiness and the jobs they lead), etcd members and
/// their leader, and storage health. Returns whether everything is healthy.
pub async fn cluster_status(config: &ServeConfig) -> Result<bool, AdminError> {
    let (meta, options) = connect(config).await?;
    // Nodes serving TLS with a private CA: their CA is the peers' one.
    let tls = crate::security::peer_tls(config).map_err(|e| AdminError::Failed(e.to_string()))?;
    let builder = reqwest::Client::builder().timeout(Duration::from_secs(2));
    let client = tls
        .apply(builder)
        .map_err(AdminError::Failed)?
        .build()
        .map_err(|e| berth_store::StoreError::Unavailable(e.to_string()))?;
    let mut healthy = true;
    let mut out = String::new();

    let nodes = region_view::node_statuses(&meta, &client, "").await?;
    let leaders = cluster::leaders(&meta).await?;
    let _ = writeln!(out, "nodes ({}):", nodes.len());
    let _ = writeln!(
        out,
        "  {:<20} {:<8} {:<10} {:<28} {:<6} LEADS / DETAIL",
        "NAME", "ZONE", "VERSION", "ADDRESS", "READY"
    );
    for node in &nodes {
        healthy &= node.ready;
        let detail = if node.ready {
            node.leads.join(",")
        } else {
            node.detail.clone()
        };
        let _ = writeln!(
            out,
            "  {:<20} {:<8} {:<10} {:<28} {:<6} {}",
            node.name,
            if node.zone.is_empty() {
                "-"
            } else {
                &node.zone
            },
            node.version,
            node.address,
            if node.ready { "yes" } else { "no" },
            detail
        );
    }
    if nodes.is_empty() {
        healthy = false;
    }
    for (job, leader) in &leaders {
        if !nodes.iter().any(|n| n.name == leader.node) {
            let _ = writeln!(
                out,
                "  (job {job} led by unregistered node {})",
                leader.node
            );
        }
    }

    let members = meta.members(&options).await?;
    let reachable = members.iter().filter(|m| m.reachable).count();
    let quorum = members.len() / 2 + 1;
    let _ = writeln!(
        out,
        "etcd members ({reachable} of {} reachable, quorum {quorum}):",
        members.len()
    );
    for m in &members {
        let _ = writeln!(
            out,
            "  {:<20} {:<28} {:<12} {}",
            m.name,
            m.endpoint,
            if m.reachable {
                "reachable"
            } else {
                "UNREACHABLE"
            },
            if m.is_leader {
                format!("leader (term {})", m.raft_term)
            } else {
                String::new()
            }
        );
    }
    healthy &= reachable >= quorum && members.iter().any(|m| m.is_leader);

    match &config.storage {
        // Opening the file engine would clear its temporary directory under
        // a running node; each node checks its own files in /readyz.
        Storage::Fs => {
            let _ = writeln!(
                out,
                "storage: files on each node (see each node's readiness above)"
            );
        }
        Storage::S3 { bucket, prefix } => {
            let blobs = open_blobs(config)?;
            match blobs.check_health().await {
                Ok(()) => {
                    let _ = writeln!(out, "storage: s3://{bucket}/{prefix}: ok");
                }
                Err(e) => {
                    healthy = false;
                    let _ = writeln!(out, "storage: s3://{bucket}/{prefix}: FAILING: {e}");
                }
            }
        }
    }
    print!("{out}");
    Ok(healthy)
}

/// Asks node `name` to drain and waits until it has left the cluster.
pub async fn drain_node(
    config: &ServeConfig,
    name: &str,
    wait: Duration,
) -> Result<(), AdminError> {
    let (meta, _) = connect(config).await?;
    if !cluster::request_drain(&meta, name).await? {
        return Err(AdminError::UnknownNode(name.to_string()));
    }
    println!("drain of {name} requested; waiting for it to finish its requests and leave");
    let deadline = tokio::time::Instant::now() + wait;
    let key = cluster::node_key(name);
    loop {
        if meta.get(key.as_bytes()).await?.is_none() {
            println!("{name} drained and left the cluster");
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(AdminError::DrainTimeout(name.to_string(), wait));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
