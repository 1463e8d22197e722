//! The embedded metadata engine: one redb file, fsynced on every commit.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use super::{Compare, KeyValue, LeaseId, MetaStore, Op, Snapshot, Txn};
use crate::StoreError;

/// Values are stored as an 8-byte big-endian version followed by the payload.
const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");
const SYSTEM: TableDefinition<&str, u64> = TableDefinition::new("system");
const REVISION: &str = "revision";
/// Keys written under a lease, and the lease. Leases live in this process
/// only (it alone holds the database), so these keys are deleted at open.
const LEASED: TableDefinition<&[u8], i64> = TableDefinition::new("leased");

type LeaseTable = HashMap<LeaseId, (Duration, Instant)>;

pub struct RedbMetaStore {
    db: Arc<Database>,
    /// Live leases: id, TTL and deadline.
    leases: Arc<Mutex<LeaseTable>>,
    next_lease: AtomicI64,
}

fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Database(e.to_string())
}

fn decode(key: &[u8], stored: &[u8]) -> Result<KeyValue, StoreError> {
    if stored.len() < 8 {
        return Err(StoreError::Database(format!(
            "corrupt record for key {:?}",
            String::from_utf8_lossy(key)
        )));
    }
    let (version, value) = stored.split_at(8);
    let mut v = [0u8; 8];
    v.copy_from_slice(version);
    Ok(KeyValue {
        key: key.to_vec(),
        value: value.to_vec(),
        version: u64::from_be_bytes(v),
    })
}

fn compare_holds(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    compare: &Compare,
) -> Result<bool, StoreError> {
    Ok(match compare {
        Compare::Absent(key) => table.get(key.as_slice()).map_err(db_err)?.is_none(),
        Compare::Version(key, version) => match table.get(key.as_slice()).map_err(db_err)? {
            Some(v) => decode(key, v.value())?.version == *version,
            None => false,
        },
    })
}

impl RedbMetaStore {
    /// Opens (or creates) the database at `path`. Blocking: call at startup.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(db_err)?;
        let txn = db.begin_write().map_err(db_err)?;
        {
            let mut kv = txn.open_table(KV).map_err(db_err)?;
            txn.open_table(SYSTEM).map_err(db_err)?;
            let mut leased = txn.open_table(LEASED).map_err(db_err)?;
            let stale: Vec<Vec<u8>> = leased
                .iter()
                .map_err(db_err)?
                .map(|entry| entry.map(|(k, _)| k.value().to_vec()))
                .collect::<Result<_, _>>()
                .map_err(db_err)?;
            for key in stale {
                kv.remove(key.as_slice()).map_err(db_err)?;
                leased.remove(key.as_slice()).map_err(db_err)?;
            }
        }
        txn.commit().map_err(db_err)?;
        Ok(Self {
            db: Arc::new(db),
            leases: Arc::new(Mutex::new(HashMap::new())),
            next_lease: AtomicI64::new(1),
        })
    }

    /// Deletes the keys of leases whose deadline passed; the caller holds
    /// the lease table. Blocking (writes only when a lease lapsed).
    fn expire_leases(db: &Database, leases: &mut LeaseTable) -> Result<(), StoreError> {
        let now = Instant::now();
        let expired: Vec<LeaseId> = leases
            .iter()
            .filter(|(_, (_, deadline))| *deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for lease in expired {
            leases.remove(&lease);
            Self::delete_lease_keys(db, lease)?;
        }
        Ok(())
    }

    fn delete_lease_keys(db: &Database, lease: LeaseId) -> Result<(), StoreError> {
        let mut write = db.begin_write().map_err(db_err)?;
        write
            .set_durability(Durability::Immediate)
            .map_err(db_err)?;
        {
            let mut kv = write.open_table(KV).map_err(db_err)?;
            let mut leased = write.open_table(LEASED).map_err(db_err)?;
            let keys: Vec<Vec<u8>> = leased
                .iter()
                .map_err(db_err)?
                .filter_map(|entry| match entry {
                    Ok((k, v)) if v.value() == lease => Some(Ok(k.value().to_vec())),
                    Ok(_) => None,
                    Err(e) => Some(Err(e)),
                })
                .collect::<Result<_, _>>()
                .map_err(db_err)?;
            for key in keys {
                kv.remove(key.as_slice()).map_err(db_err)?;
                leased.remove(key.as_slice()).map_err(db_err)?;
            }
        }
        write.commit().map_err(db_err)?;
        Ok(())
    }

    fn get_blocking(db: &Database, key: &[u8]) -> Result<Option<KeyValue>, StoreError> {
        let txn = db.begin_read().map_err(db_err)?;
        let table = txn.open_table(KV).map_err(db_err)?;
        match table.get(key).map_err(db_err)? {
            Some(v) => Ok(Some(decode(key, v.value())?)),
            None => Ok(None),
        }
    }

    fn get_many_blocking(
        db: &Database,
        keys: &[Vec<u8>],
    ) -> Result<Vec<Option<KeyValue>>, StoreError> {
        let txn = db.begin_read().map_err(db_err)?;
        let table = txn.open_table(KV).map_err(db_err)?;
        keys.iter()
            .map(|key| match table.get(key.as_slice()).map_err(db_err)? {
                Some(v) => Ok(Some(decode(key, v.value())?)),
                None => Ok(None),
            })
            .collect()
    }

    fn scan_blocking(
        db: &Database,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let txn = db.begin_read().map_err(db_err)?;
        Self::scan_in(&txn, prefix, start_after, limit)
    }

    fn scan_in(
        txn: &redb::ReadTransaction,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let table = txn.open_table(KV).map_err(db_err)?;
        let start: &[u8] = match start_after {
            Some(after) if after > prefix => after,
            _ => prefix,
        };
        let mut out = Vec::new();
        for entry in table.range(start..).map_err(db_err)? {
            if out.len() >= limit {
                break;
            }
            let (k, v) = entry.map_err(db_err)?;
            let key = k.value();
            if !key.starts_with(prefix) {
                break;
            }
            if start_after.is_some_and(|after| key <= after) {
                continue;
            }
            out.push(decode(key, v.value())?);
        }
        Ok(out)
    }

    fn compares_hold(db: &Database, txn: &Txn) -> Result<bool, StoreError> {
        let read = db.begin_read().map_err(db_err)?;
        let table = read.open_table(KV).map_err(db_err)?;
        for compare in &txn.compares {
            if !compare_holds(&table, compare)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn commit_blocking(db: &Database, txn: Txn) -> Result<bool, StoreError> {
        let mut write = db.begin_write().map_err(db_err)?;
        write
            .set_durability(Durability::Immediate)
            .map_err(db_err)?;
        {
            let mut table = write.open_table(KV).map_err(db_err)?;
            for compare in &txn.compares {
                if !compare_holds(&table, compare)? {
                    drop(table);
                    write.abort().map_err(db_err)?;
                    return Ok(false);
                }
            }
            let mut system = write.open_table(SYSTEM).map_err(db_err)?;
            let revision = system
                .get(REVISION)
                .map_err(db_err)?
                .map_or(0, |v| v.value())
                + 1;
            system.insert(REVISION, revision).map_err(db_err)?;
            let mut leased = write.open_table(LEASED).map_err(db_err)?;
            let mut buf = Vec::new();
            for op in &txn.ops {
                match op {
                    Op::Put(key, value) | Op::PutLeased(key, value, _) => {
                        buf.clear();
                        buf.extend_from_slice(&revision.to_be_bytes());
                        buf.extend_from_slice(value);
                        table
                            .insert(key.as_slice(), buf.as_slice())
                            .map_err(db_err)?;
                        match op {
                            Op::PutLeased(_, _, lease) => {
                                leased.insert(key.as_slice(), *lease).map_err(db_err)?;
                            }
                            _ => {
                                leased.remove(key.as_slice()).map_err(db_err)?;
                            }
                        }
                    }
                    Op::Delete(key) => {
                        table.remove(key.as_slice()).map_err(db_err)?;
                        leased.remove(key.as_slice()).map_err(db_err)?;
                    }
                }
            }
        }
        write.commit().map_err(db_err)?;
        Ok(true)
    }
}

#[async_trait]
impl MetaStore for RedbMetaStore {
    async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, StoreError> {
        // Reads hit redb's page cache and take microseconds: not worth a
        // thread hop on the hot manifest path.
        Self::get_blocking(&self.db, key)
    }

    async fn get_many(&self, keys: &[Vec<u8>]) -> Result<Vec<Option<KeyValue>>, StoreError> {
        // One read transaction, in place as `get` is.
        Self::get_many_blocking(&self.db, keys)
    }

    async fn scan(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let db = self.db.clone();
        let prefix = prefix.to_vec();
        let start_after = start_after.map(<[u8]>::to_vec);
        tokio::task::spawn_blocking(move || {
            Self::scan_blocking(&db, &prefix, start_after.as_deref(), limit)
        })
        .await?
    }

    async fn commit(&self, txn: Txn) -> Result<bool, StoreError> {
        if txn.ops.is_empty() && txn.compares.is_empty() {
            return Ok(true);
        }
        if txn.ops.is_empty() {
            // A compare-only transaction (a check of what a read saw) needs
            // no write, so no fsync.
            let db = self.db.clone();
            return tokio::task::spawn_blocking(move || Self::compares_hold(&db, &txn)).await?;
        }
        let leased = txn.ops.iter().any(|op| matches!(op, Op::PutLeased(..)));
        if leased {
            // The lease check and the write happen under the lease table's
            // lock, so a lease cannot lapse between them.
            let db = self.db.clone();
            let leases = self.leases.clone();
            return tokio::task::spawn_blocking(move || {
                let mut table = leases.lock().unwrap_or_else(|p| p.into_inner());
                Self::expire_leases(&db, &mut table)?;
                for op in &txn.ops {
                    if let Op::PutLeased(_, _, lease) = op
                        && !table.contains_key(lease)
                    {
                        return Err(StoreError::Database(format!("lease {lease} not found")));
                    }
                }
                Self::commit_blocking(&db, txn)
            })
            .await?;
        }
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || Self::commit_blocking(&db, txn)).await?
    }

    async fn snapshot(&self) -> Result<Box<dyn Snapshot>, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().map_err(db_err)?;
            let revision = txn
                .open_table(SYSTEM)
                .map_err(db_err)?
                .get(REVISION)
                .map_err(db_err)?
                .map_or(0, |v| v.value());
            Ok(Box::new(RedbSnapshot {
                txn: Arc::new(txn),
                revision,
            }) as Box<dyn Snapshot>)
        })
        .await?
    }

    async fn check_health(&self) -> Result<(), StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().map_err(db_err)?;
            txn.open_table(KV).map_err(db_err)?;
            Ok(())
        })
        .await?
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let ttl = ttl.max(Duration::from_secs(2));
        let id = self.next_lease.fetch_add(1, Ordering::Relaxed);
        self.leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, (ttl, Instant::now() + ttl));
        Ok(id)
    }

    async fn keep_lease_alive(&self, lease: LeaseId) -> Result<bool, StoreError> {
        let db = self.db.clone();
        let leases = self.leases.clone();
        tokio::task::spawn_blocking(move || {
            let mut table = leases.lock().unwrap_or_else(|p| p.into_inner());
            Self::expire_leases(&db, &mut table)?;
            Ok(match table.get_mut(&lease) {
                Some((ttl, deadline)) => {
                    *deadline = Instant::now() + *ttl;
                    true
                }
                None => false,
            })
        })
        .await?
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&lease);
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || Self::delete_lease_keys(&db, lease)).await?
    }
}

/// A redb read transaction: it sees the database as it was when it began.
/// While it lives, redb keeps the pages later commits replaced, so the file
/// may grow during a long backup; they are reused once it ends.
struct RedbSnapshot {
    txn: Arc<redb::ReadTransaction>,
    revision: u64,
}

#[async_trait]
impl Snapshot for RedbSnapshot {
    fn revision(&self) -> u64 {
        self.revision
    }

    async fn scan(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let txn = self.txn.clone();
        let prefix = prefix.to_vec();
        let start_after = start_after.map(<[u8]>::to_vec);
        tokio::task::spawn_blocking(move || {
            RedbMetaStore::scan_in(&txn, &prefix, start_after.as_deref(), limit)
        })
        .await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passes_the_metastore_suite() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbMetaStore::open(&dir.path().join("meta.redb")).unwrap();
        crate::testsuite::metastore_suite(&store).await;
    }

    #[tokio::test]
    async fn data_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        {
            let store = RedbMetaStore::open(&path).unwrap();
            assert!(store.commit(Txn::new().put("k", "v")).await.unwrap());
        }
        let store = RedbMetaStore::open(&path).unwrap();
        assert_eq!(store.get(b"k").await.unwrap().unwrap().value, b"v");
    }
}
