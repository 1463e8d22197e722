//! What this node knows of its region: the nodes and the jobs they lead,
//! the etcd members, this node's own readiness and its recent traffic.
//! Collected every few seconds in the background, so that the console's
//! overview renders from memory in an outage (when asking a dead etcd
//! member would take seconds), and exported as gauges for the alerts.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry as PromRegistry;

use crate::AppState;
use crate::metrics::TrafficCounts;

/// How often the region is looked at.
pub const COLLECT_EVERY: Duration = Duration::from_secs(5);
/// The window of the request rates shown on the overview.
const RATE_WINDOW_MS: u64 = 60_000;
/// The longest one part of a look may take.
const LOOK_TIMEOUT: Duration = Duration::from_secs(4);

/// One node of the region, as its registration and its `/readyz` say.
#[derive(Clone, Debug, Default)]
pub struct NodeStatus {
    pub name: String,
    pub zone: String,
    pub version: String,
    pub address: String,
    pub started_ms: u64,
    pub ready: bool,
    /// Why it is not ready (or what `/readyz` said).
    pub detail: String,
    /// The region-wide jobs it leads (gc, backup, replication-us, ...).
    pub leads: Vec<String>,
    pub this_node: bool,
}

/// One etcd member.
#[derive(Clone, Debug, Default)]
pub struct MemberStatus {
    pub name: String,
    pub endpoint: String,
    pub reachable: bool,
    pub leader: bool,
    pub raft_term: u64,
}

/// Where the nodes and the metadata members come from: the cluster
/// registrations in the MetaStore and etcd's member list (implemented by
/// the binary, which owns both).
#[async_trait::async_trait]
pub trait ClusterSource: Send + Sync {
    /// Every registered node, with its readiness.
    async fn nodes(&self) -> Result<Vec<NodeStatus>, String>;
    /// The etcd members; `None` on the embedded engine.
    async fn members(&self) -> Option<Result<Vec<MemberStatus>, String>>;
    /// This node's name.
    fn this_node(&self) -> String;
    /// The stores, in words (`files in /data, metadata in redb`).
    fn engines(&self) -> String;
}

/// One look at the region.
#[derive(Clone, Debug)]
pub struct RegionStatus {
    pub collected_ms: u64,
    pub nodes: Result<Vec<NodeStatus>, String>,
    pub members: Option<Result<Vec<MemberStatus>, String>>,
    /// This node's readiness: `Err` holds why not.
    pub ready: Result<(), String>,
}

impl Default for RegionStatus {
    fn default() -> Self {
        RegionStatus {
            collected_ms: 0,
            nodes: Ok(Vec::new()),
            members: None,
            ready: Ok(()),
        }
    }
}

impl RegionStatus {
    /// Members that answer, of all; and whether they make a quorum with a
    /// leader.
    pub fn quorum(&self) -> Option<(usize, usize, bool)> {
        let members = self.members.as_ref()?.as_ref().ok()?;
        let reachable = members.iter().filter(|m| m.reachable).count();
        let ok = reachable > members.len() / 2 && members.iter().any(|m| m.leader);
        Some((reachable, members.len(), ok))
    }
}

/// Requests per second over the last minute.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Rates {
    pub pulls: f64,
    pub pushes: f64,
    pub client_errors: f64,
    pub server_errors: f64,
    pub requests: f64,
    /// The seconds the rates are over (less than a minute after start).
    pub window_secs: f64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    state: &'static str,
}

/// The latest look at the region, its gauges and the traffic samples.
pub struct RegionWatch {
    latest: ArcSwapOption<RegionStatus>,
    samples: std::sync::Mutex<VecDeque<(u64, TrafficCounts)>>,
    node_ready: Gauge,
    nodes: Family<NodeLabels, Gauge>,
    etcd_members: Gauge,
    etcd_reachable: Gauge,
    etcd_leader: Gauge,
    collected: Gauge,
}

impl Default for RegionWatch {
    fn default() -> Self {
        RegionWatch::new()
    }
}

impl RegionWatch {
    pub fn new() -> RegionWatch {
        RegionWatch {
            latest: ArcSwapOption::empty(),
            samples: std::sync::Mutex::new(VecDeque::new()),
            node_ready: Gauge::default(),
            nodes: Family::default(),
            etcd_members: Gauge::default(),
            etcd_reachable: Gauge::default(),
            etcd_leader: Gauge::default(),
            collected: Gauge::default(),
        }
    }

    pub fn register_metrics(&self, registry: &mut PromRegistry) {
        registry.register(
            "node_ready",
            "1 while this node answers /readyz with 200 (started, not draining, serving on, stores answering)",
            self.node_ready.clone(),
        );
        registry.register(
            "region_nodes",
            "Nodes registered in this region, by state (ready, not_ready), as this node sees them",
            self.nodes.clone(),
        );
        registry.register(
            "etcd_members",
            "Members of the etcd cluster (0 on the embedded engine)",
            self.etcd_members.clone(),
        );
        registry.register(
            "etcd_members_reachable",
            "etcd members that answered a status call from this node",
            self.etcd_reachable.clone(),
        );
        registry.register(
            "etcd_has_leader",
            "1 while a reachable etcd member reports a leader (always 1 on the embedded engine)",
            self.etcd_leader.clone(),
        );
        registry.register(
            "region_status_timestamp_seconds",
            "When this node last looked at its region (nodes, etcd members, readiness)",
            self.collected.clone(),
        );
    }

    /// The latest look, if one was taken.
    pub fn latest(&self) -> Option<Arc<RegionStatus>> {
        self.latest.load_full()
    }

    /// Looks at the region now: stores the result and sets the gauges.
    pub async fn collect(&self, state: &AppState, source: &dyn ClusterSource) {
        // Each part is bounded, so that a hung etcd cannot hold back the
        // others (this node's readiness gauge above all).
        let bounded = |what: &'static str| format!("{what} did not answer within {LOOK_TIMEOUT:?}");
        let (ready, nodes, members) = tokio::join!(
            tokio::time::timeout(LOOK_TIMEOUT, crate::health::readiness(state)),
            tokio::time::timeout(LOOK_TIMEOUT, source.nodes()),
            tokio::time::timeout(LOOK_TIMEOUT, source.members()),
        );
        let ready = ready.unwrap_or_else(|_| Err(bounded("the stores")));
        let nodes = nodes.unwrap_or_else(|_| Err(bounded("the node registrations")));
        let members = members.unwrap_or_else(|_| Some(Err(bounded("etcd"))));
        let status = RegionStatus {
            collected_ms: berth_registry::now_ms(),
            nodes,
            members,
            ready,
        };
        self.node_ready.set(i64::from(status.ready.is_ok()));
        if let Ok(nodes) = &status.nodes {
            let ready = nodes.iter().filter(|n| n.ready).count();
            self.nodes
                .get_or_create(&NodeLabels { state: "ready" })
                .set(ready as i64);
            self.nodes
                .get_or_create(&NodeLabels { state: "not_ready" })
                .set((nodes.len() - ready) as i64);
        }
        match &status.members {
            None => {
                self.etcd_members.set(0);
                self.etcd_reachable.set(0);
                self.etcd_leader.set(1);
            }
            Some(Ok(members)) => {
                self.etcd_members.set(members.len() as i64);
                self.etcd_reachable
                    .set(members.iter().filter(|m| m.reachable).count() as i64);
                self.etcd_leader
                    .set(i64::from(members.iter().any(|m| m.leader)));
            }
            // The member list itself failed: no member answered.
            Some(Err(_)) => {
                self.etcd_reachable.set(0);
                self.etcd_leader.set(0);
            }
        }
        self.collected.set((status.collected_ms / 1000) as i64);
        self.latest.store(Some(Arc::new(status)));
    }

    /// Takes a traffic sample; keeps a little more than the rate window.
    pub fn sample(&self, now_ms: u64, counts: TrafficCounts) {
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        samples.push_back((now_ms, counts));
        while samples
            .front()
            .is_some_and(|(t, _)| now_ms.saturating_sub(*t) > 2 * RATE_WINDOW_MS)
        {
            samples.pop_front();
        }
    }

    /// The rates between the oldest sample inside the window and `now`.
    pub fn rates(&self, now_ms: u64, now: TrafficCounts) -> Rates {
        let samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        let Some((then_ms, then)) = samples
            .iter()
            .find(|(t, _)| now_ms.saturating_sub(*t) <= RATE_WINDOW_MS)
            .or(samples.back())
            .copied()
        else {
            return Rates::default();
        };
        let secs = now_ms.saturating_sub(then_ms) as f64 / 1000.0;
        if secs <= 0.0 {
            return Rates::default();
        }
        let per_sec = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
        Rates {
            pulls: per_sec(now.pulls, then.pulls),
            pushes: per_sec(now.pushes, then.pushes),
            client_errors: per_sec(now.client_errors, then.client_errors),
            server_errors: per_sec(now.server_errors, then.server_errors),
            requests: per_sec(now.requests, then.requests),
            window_secs: secs,
        }
    }

    /// Looks at the region every [`COLLECT_EVERY`], forever.
    pub async fn run(self: Arc<Self>, state: AppState, source: Arc<dyn ClusterSource>) {
        let mut ticker = tokio::time::interval(COLLECT_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            self.sample(berth_registry::now_ms(), state.metrics.traffic.counts());
            self.collect(&state, source.as_ref()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(pulls: u64, requests: u64) -> TrafficCounts {
        TrafficCounts {
            pulls,
            requests,
            ..TrafficCounts::default()
        }
    }

    #[test]
    fn rates_are_over_the_last_minute() {
        let watch = RegionWatch::new();
        assert_eq!(watch.rates(1000, counts(5, 5)), Rates::default());
        watch.sample(0, counts(0, 0));
        watch.sample(50_000, counts(100, 100));
        watch.sample(100_000, counts(1100, 1200));
        // From the sample 50 s before, not the one 100 s before.
        let r = watch.rates(100_000, counts(1100, 1200));
        assert_eq!(r.window_secs, 50.0);
        assert_eq!(r.pulls, 20.0);
        assert_eq!(r.requests, 22.0);
        // Old samples go.
        watch.sample(300_000, counts(1100, 1200));
        assert_eq!(watch.samples.lock().unwrap().len(), 1);
    }

    #[test]
    fn quorum_needs_a_majority_and_a_leader() {
        let member = |reachable, leader| MemberStatus {
            reachable,
            leader,
            ..MemberStatus::default()
        };
        let mut status = RegionStatus {
            members: Some(Ok(vec![
                member(true, true),
                member(true, false),
                member(false, false),
            ])),
            ..RegionStatus::default()
        };
        assert_eq!(status.quorum(), Some((2, 3, true)));
        status.members = Some(Ok(vec![
            member(true, false),
            member(false, false),
            member(false, false),
        ]));
        assert_eq!(status.quorum(), Some((1, 3, false)));
        status.members = None;
        assert_eq!(status.quorum(), None);
    }
}
