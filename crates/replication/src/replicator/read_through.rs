//! Read-through: on a local miss, fetching from the peers that are up.

use berth_oci::{Digest, Reference, RepositoryName};
use berth_proxy::{BlobAnswer, Target};

use super::Replicator;
use crate::glob;
use crate::metrics::ReplicationMetrics;

impl Replicator {
    pub(super) fn targets(&self, name: &RepositoryName) -> Vec<Target> {
        let selected = |ns: &str| {
            self.options
                .peers
                .iter()
                .find(|p| p.name == ns)
                .is_some_and(|p| glob::selected(&p.include, &p.exclude, name.as_str()))
        };
        self.peers_cache
            .namespaces()
            .filter(|ns| !self.peers_cache.is_down(ns) && selected(ns))
            .map(|ns| Target {
                namespace: ns.to_string(),
                remote: name.to_string(),
                local: name.clone(),
                via_mirror_default: false,
            })
            .collect()
    }

    pub(super) fn note_read_through(&self, peer: &str) {
        self.metrics
            .read_throughs
            .get_or_create(&ReplicationMetrics::peer(peer))
            .inc();
    }

    /// On a local miss of a manifest: fetches it from the first peer (that
    /// is up) which has it, stores it by digest, and returns the digest to
    /// serve. Tags are not set here: they arrive by replication, stamped.
    pub async fn read_through_manifest(
        &self,
        name: &RepositoryName,
        reference: &Reference,
    ) -> Option<Digest> {
        for target in self.targets(name) {
            let result = match reference {
                Reference::Digest(d) => self
                    .peers_cache
                    .ensure_manifest(&target, reference)
                    .await
                    .map(|()| d.clone()),
                Reference::Tag(t) => self.peers_cache.read_through_tag(&target, t).await,
            };
            match result {
                Ok(digest) => {
                    self.note_read_through(&target.namespace);
                    return Some(digest);
                }
                Err(e) => {
                    tracing::debug!(peer = %target.namespace, repository = %name, error = %e, "read-through miss")
                }
            }
        }
        None
    }

    /// On a local miss of a blob: the same, streaming it while it is stored.
    pub async fn read_through_blob(
        &self,
        name: &RepositoryName,
        digest: &Digest,
        head: bool,
        ranged: bool,
    ) -> Option<BlobAnswer> {
        for target in self.targets(name) {
            match self.peers_cache.blob(&target, digest, head, ranged).await {
                Ok(answer) => {
                    self.note_read_through(&target.namespace);
                    return Some(answer);
                }
                Err(e) => {
                    tracing::debug!(peer = %target.namespace, repository = %name, %digest, error = %e, "read-through miss")
                }
            }
        }
        None
    }
}
