//! The region as `berth serve` and `berth cluster status` see it: the
//! registered nodes (each asked for its `/readyz`) with the jobs they
//! lead, and etcd's members. One implementation for both, so the console,
//! the availability gauges and the command never disagree.

use std::sync::Arc;
use std::time::Duration;

use berth_server::region::{ClusterSource, MemberStatus, NodeStatus};
use berth_store::meta::etcd::EtcdOptions;
use berth_store::{EtcdMetaStore, MetaStore};
use futures_util::StreamExt;

use crate::cluster;

/// How long a node has to answer its `/readyz`.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

pub struct RegionView {
    meta: Arc<dyn MetaStore>,
    /// A connection of its own for the member list (etcd only).
    etcd: Option<(EtcdMetaStore, EtcdOptions)>,
    client: reqwest::Client,
    node: String,
    engines: String,
}

impl RegionView {
    pub fn new(
        meta: Arc<dyn MetaStore>,
        etcd: Option<(EtcdMetaStore, EtcdOptions)>,
        client: reqwest::Client,
        node: String,
        engines: String,
    ) -> RegionView {
        RegionView {
            meta,
            etcd,
            client,
            node,
            engines,
        }
    }

    /// A client for the readiness probes: short timeouts, and the peers'
    /// CA for nodes that serve TLS with a private one.
    pub fn probe_client(tls: &berth_proxy::ClientTls) -> Result<reqwest::Client, String> {
        let builder = reqwest::Client::builder()
            .timeout(PROBE_TIMEOUT)
            .connect_timeout(PROBE_TIMEOUT);
        tls.apply(builder)?.build().map_err(|e| e.to_string())
    }
}

/// Asks a node's `/readyz`; the answer's first line, or why it failed.
pub async fn readiness(client: &reqwest::Client, address: &str) -> (bool, String) {
    match client.get(format!("{address}/readyz")).send().await {
        Ok(resp) => {
            let ok = resp.status().is_success();
            let text = resp.text().await.unwrap_or_default();
            (ok, text.lines().next().unwrap_or_default().to_string())
        }
        Err(e) => (false, format!("unreachable: {e}")),
    }
}

/// Every registered node with its readiness and the jobs it leads; nodes
/// are asked at once, so one dead node costs one timeout, not one each.
pub async fn node_statuses(
    meta: &dyn MetaStore,
    client: &reqwest::Client,
    this_node: &str,
) -> Result<Vec<NodeStatus>, berth_store::StoreError> {
    let nodes = cluster::nodes(meta).await?;
    let leaders = cluster::leaders(meta).await?;
    let addresses: Vec<String> = nodes.iter().map(|n| n.address.clone()).collect();
    let probes = futures_util::stream::iter(addresses)
        .map(|address| async move { readiness(client, &address).await })
        .buffered(16)
        .collect::<Vec<_>>()
        .await;
    Ok(nodes
        .iter()
        .zip(probes)
        .map(|(node, (ready, detail))| NodeStatus {
            name: node.name.clone(),
            zone: node.zone.clone(),
            version: node.version.clone(),
            address: node.address.clone(),
            started_ms: node.started_ms,
            ready,
            detail,
            leads: leaders
                .iter()
                .filter(|(_, l)| l.node == node.name && l.lease == node.lease)
                .map(|(job, _)| job.clone())
                .collect(),
            this_node: node.name == this_node,
        })
        .collect())
}

pub async fn member_statuses(
    etcd: &EtcdMetaStore,
    options: &EtcdOptions,
) -> Result<Vec<MemberStatus>, berth_store::StoreError> {
    Ok(etcd
        .members(options)
        .await?
        .into_iter()
        .map(|m| MemberStatus {
            name: m.name,
            endpoint: m.endpoint,
            reachable: m.reachable,
            leader: m.is_leader,
            raft_term: m.raft_term,
        })
        .collect())
}

#[async_trait::async_trait]
impl ClusterSource for RegionView {
    async fn nodes(&self) -> Result<Vec<NodeStatus>, String> {
        node_statuses(self.meta.as_ref(), &self.client, &self.node)
            .await
            .map_err(|e| e.to_string())
    }

    async fn members(&self) -> Option<Result<Vec<MemberStatus>, String>> {
        let (etcd, options) = self.etcd.as_ref()?;
        Some(
            member_statuses(etcd, options)
                .await
                .map_err(|e| e.to_string()),
        )
    }

    fn this_node(&self) -> String {
        self.node.clone()
    }

    fn engines(&self) -> String {
        self.engines.clone()
    }
}
