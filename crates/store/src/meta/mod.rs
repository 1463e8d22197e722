//! The metadata store: ordered keys, prefix scans, and transactions that
//! apply only if every comparison holds (compare-and-swap across keys).

pub mod etcd;
pub mod redb;

use std::time::Duration;

use async_trait::async_trait;

use crate::StoreError;

/// A stored value and its version. The version changes on every write of the
/// key (etcd's `mod_revision`), so it can guard a compare-and-swap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub version: u64,
}

#[derive(Clone, Debug)]
pub enum Compare {
    /// The key does not exist.
    Absent(Vec<u8>),
    /// The key exists with exactly this version.
    Version(Vec<u8>, u64),
}

#[derive(Clone, Debug)]
pub enum Op {
    Put(Vec<u8>, Vec<u8>),
    /// A put whose key is deleted when the lease expires or is revoked.
    PutLeased(Vec<u8>, Vec<u8>, LeaseId),
    Delete(Vec<u8>),
}

/// A lease: keys written with it live only while its holder keeps it alive
/// (etcd's lease). Node registrations and leadership of once-per-region jobs
/// hang on one, so they vanish on their own when a node dies.
pub type LeaseId = i64;

/// An atomic transaction: all `ops` apply if all `compares` hold, else none.
#[derive(Clone, Debug, Default)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub ops: Vec<Op>,
}

impl Txn {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn require_absent(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.compares.push(Compare::Absent(key.into()));
        self
    }

    pub fn require_version(mut self, key: impl Into<Vec<u8>>, version: u64) -> Self {
        self.compares.push(Compare::Version(key.into(), version));
        self
    }

    /// Guards on the state a read observed: absent if `seen` is None, else
    /// unchanged since that read.
    pub fn require_unchanged(self, key: impl Into<Vec<u8>>, seen: Option<&KeyValue>) -> Self {
        match seen {
            Some(kv) => self.require_version(key, kv.version),
            None => self.require_absent(key),
        }
    }

    pub fn put(mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        self.ops.push(Op::Put(key.into(), value.into()));
        self
    }

    pub fn put_leased(
        mut self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        lease: LeaseId,
    ) -> Self {
        self.ops
            .push(Op::PutLeased(key.into(), value.into(), lease));
        self
    }

    pub fn delete(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.ops.push(Op::Delete(key.into()));
        self
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// A consistent view of the whole store at one moment (a redb read
/// transaction, an etcd revision): every scan of it sees that moment,
/// whatever commits meanwhile. Backups read through one.
#[async_trait]
pub trait Snapshot: Send + Sync {
    /// The store's revision at the snapshot (a counter of commits).
    fn revision(&self) -> u64;

    /// As [`MetaStore::scan`], at the snapshot's moment.
    async fn scan(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError>;
}

#[async_trait]
pub trait MetaStore: Send + Sync + 'static {
    async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, StoreError>;

    /// Reads several keys, answering in their order (`None` for an absent
    /// one): each answer is what [`MetaStore::get`] would give. Engines
    /// that can answer them in one round trip do; the reads need not all
    /// see one moment of the store.
    async fn get_many(&self, keys: &[Vec<u8>]) -> Result<Vec<Option<KeyValue>>, StoreError> {
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            out.push(self.get(key).await?);
        }
        Ok(out)
    }

    /// Keys starting with `prefix`, in byte order, strictly after
    /// `start_after` when given, at most `limit` of them.
    async fn scan(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError>;

    /// Applies the transaction atomically and durably. Returns `false`, with
    /// nothing written, when a comparison failed.
    async fn commit(&self, txn: Txn) -> Result<bool, StoreError>;

    /// Opens a consistent view of the store as of now. It may pin old
    /// versions while it lives (redb keeps their pages, etcd may compact
    /// them away, failing later scans), so hold it only for one pass.
    async fn snapshot(&self) -> Result<Box<dyn Snapshot>, StoreError>;

    /// Whether the store can serve reads and writes now (for `/readyz`).
    async fn check_health(&self) -> Result<(), StoreError>;

    /// Grants a lease that expires `ttl` after it was granted or last kept
    /// alive (whole seconds, at least 2, as etcd requires).
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError>;

    /// Extends a lease by its TTL. `Ok(false)` if it has already expired or
    /// was revoked: its keys are gone.
    async fn keep_lease_alive(&self, lease: LeaseId) -> Result<bool, StoreError>;

    /// Ends a lease now, deleting its keys.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError>;

    /// A stream that yields each time `key` is written, by any process
    /// sharing the store. `None` when only this process writes it (an
    /// embedded database): its writers can signal its readers directly. The
    /// stream ends, or yields an error and ends, when the watch broke; watch
    /// again to go on (and re-read: writes in between were not seen).
    async fn watch_key(&self, _key: &[u8]) -> Result<Option<KeyWatch>, StoreError> {
        Ok(None)
    }
}

/// Writes of one key, as they happen (see [`MetaStore::watch_key`]).
pub type KeyWatch =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<(), StoreError>> + Send>>;
