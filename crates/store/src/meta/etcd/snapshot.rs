//! Snapshots of an etcd store: reads at one revision, and the range
//! arithmetic they share with the store's scans.

use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{Client, GetOptions, SortOrder, SortTarget};

use super::{etcd_err, prefix_end};
use crate::StoreError;
use crate::meta::{KeyValue, Snapshot};

/// Turns a scan's arguments into an etcd range under the store's prefix.
#[derive(Clone)]
pub(super) struct RangeMaker {
    pub(super) prefix: Vec<u8>,
}

impl RangeMaker {
    fn full_key(&self, key: &[u8]) -> Vec<u8> {
        let mut full = Vec::with_capacity(self.prefix.len() + key.len());
        full.extend_from_slice(&self.prefix);
        full.extend_from_slice(key);
        full
    }

    /// The range's start and options; `None` when it is empty.
    pub(super) fn scan_range(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Option<(Vec<u8>, GetOptions)> {
        if limit == 0 {
            return None;
        }
        let full_prefix = self.full_key(prefix);
        let start = match start_after {
            // The first key after `after` is `after` followed by a zero byte.
            Some(after) if after >= prefix => {
                let mut k = self.full_key(after);
                k.push(0);
                k
            }
            _ => full_prefix.clone(),
        };
        let end = prefix_end(&full_prefix);
        if start >= end {
            return None;
        }
        let options = GetOptions::new()
            .with_range(end)
            .with_limit(i64::try_from(limit).unwrap_or(i64::MAX))
            .with_sort(SortTarget::Key, SortOrder::Ascend);
        Some((start, options))
    }
}

/// Reads at one etcd revision. etcd keeps old revisions until it is
/// compacted; a scan after a compaction past the revision fails, and the
/// backup reading it fails with it (and is taken again).
pub(super) struct EtcdSnapshot {
    pub(super) client: Client,
    pub(super) range: RangeMaker,
    pub(super) revision: u64,
}

/// Attempts of one snapshot scan: each is idempotent.
const SNAPSHOT_SCAN_ATTEMPTS: usize = 3;

#[async_trait]
impl Snapshot for EtcdSnapshot {
    fn revision(&self) -> u64 {
        self.revision
    }

    async fn scan(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let Some((start, options)) = self.range.scan_range(prefix, start_after, limit) else {
            return Ok(Vec::new());
        };
        let options = options.with_revision(i64::try_from(self.revision).unwrap_or(i64::MAX));
        let mut attempt = 0;
        let resp = loop {
            attempt += 1;
            let mut client = self.client.clone();
            match client.get(start.clone(), Some(options.clone())).await {
                Ok(resp) => break resp,
                Err(e) => match etcd_err(e) {
                    StoreError::Unavailable(_) if attempt < SNAPSHOT_SCAN_ATTEMPTS => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    other => return Err(other),
                },
            }
        };
        Ok(resp
            .kvs()
            .iter()
            .map(|kv| KeyValue {
                key: kv
                    .key()
                    .get(self.range.prefix.len()..)
                    .unwrap_or_default()
                    .to_vec(),
                value: kv.value().to_vec(),
                version: kv.mod_revision().max(0) as u64,
            })
            .collect())
    }
}
