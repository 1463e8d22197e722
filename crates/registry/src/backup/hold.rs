//! The registry's backup hold: while `backup/hold` exists no blob bytes
//! are removed (see the module comment of `backup`). Held under a lease,
//! so the hold of a backup whose node died lapses within the lease's TTL.

use std::sync::Arc;
use std::time::Duration;

use berth_store::{MetaStore, Txn};

use super::BackupError;
use crate::keys;
use crate::now_ms;

/// The hold's lease, kept alive every third of it.
pub(super) const HOLD_TTL: Duration = Duration::from_secs(15);

pub(super) struct Hold {
    meta: Arc<dyn MetaStore>,
    lease: berth_store::LeaseId,
    /// The hold key's version as written: a hold whose lease lapsed and
    /// was taken again by someone else has another.
    version: u64,
    keeper: tokio::task::JoinHandle<()>,
    released: bool,
}

impl Hold {
    /// Takes the hold for `what` (a backup's id, a restore), or fails with
    /// `Busy` naming who holds it.
    pub(super) async fn acquire(meta: Arc<dyn MetaStore>, what: &str) -> Result<Self, BackupError> {
        let lease = meta.grant_lease(HOLD_TTL).await?;
        // A nonce tells this hold's value from an earlier holder's.
        let nonce = uuid::Uuid::new_v4().to_string();
        let value =
            serde_json::json!({ "for": what, "since_ms": now_ms(), "nonce": nonce }).to_string();
        let taken = meta
            .commit(Txn::new().require_absent(keys::BACKUP_HOLD).put_leased(
                keys::BACKUP_HOLD,
                value.clone(),
                lease,
            ))
            .await;
        let version = match taken {
            Ok(true) => own_version(meta.as_ref(), &value).await,
            Ok(false) | Err(_) => None,
        };
        let Some(version) = version else {
            let _ = meta.revoke_lease(lease).await;
            taken?;
            let holder = match meta.get(keys::BACKUP_HOLD.as_bytes()).await {
                Ok(Some(kv)) => String::from_utf8_lossy(&kv.value).into_owned(),
                _ => "it has just finished".into(),
            };
            return Err(BackupError::Busy(holder));
        };
        let keeper = {
            let meta = meta.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(HOLD_TTL / 3).await;
                    match meta.keep_lease_alive(lease).await {
                        Ok(true) => {}
                        // Gone: `check` finds out.
                        Ok(false) => break,
                        Err(e) => {
                            tracing::warn!(error = %e, "could not renew the backup hold; retrying")
                        }
                    }
                }
            })
        };
        Ok(Self {
            meta,
            lease,
            version,
            keeper,
            released: false,
        })
    }

    /// Fails unless the hold is still this one, asked through the store's
    /// own order (a compare: linearizable on etcd, where a lease can lapse
    /// unnoticed by its holder). Called before anything that relies on
    /// the hold having lasted: publishing a backup, ending a restore,
    /// pruning.
    pub(super) async fn check(&self) -> Result<(), BackupError> {
        let still = self
            .meta
            .commit(Txn::new().require_version(keys::BACKUP_HOLD, self.version))
            .await?;
        if still {
            Ok(())
        } else {
            Err(BackupError::HoldLost(
                "the hold on blob removal lapsed (the metadata store was unreachable for longer than its 15 s lease), so blobs may have been removed meanwhile; nothing was published or finished: run it again".into(),
            ))
        }
    }

    /// `txn`, applying only while this hold lasts.
    pub(super) fn guard(&self, txn: Txn) -> Txn {
        txn.require_version(keys::BACKUP_HOLD, self.version)
    }

    pub(super) async fn release(mut self) {
        self.released = true;
        self.keeper.abort();
        if let Err(e) = self.meta.revoke_lease(self.lease).await {
            tracing::warn!(error = %e, "could not release the backup hold; it lapses with its lease");
        }
    }
}

/// The version of the hold key written with `value`. A read may lag the
/// commit (etcd serves reads from any member while its quorum is slow),
/// so it is retried until it shows this value.
async fn own_version(meta: &dyn MetaStore, value: &str) -> Option<u64> {
    for _ in 0..20 {
        match meta.get(keys::BACKUP_HOLD.as_bytes()).await {
            Ok(Some(kv)) if kv.value == value.as_bytes() => return Some(kv.version),
            Ok(_) | Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    None
}

impl Drop for Hold {
    /// A backup or restore that panicked or whose future was dropped still
    /// lets go: garbage collection must not stay blocked.
    fn drop(&mut self) {
        if self.released {
            return;
        }
        self.keeper.abort();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let meta = self.meta.clone();
            let lease = self.lease;
            runtime.spawn(async move {
                let _ = meta.revoke_lease(lease).await;
            });
        }
    }
}
