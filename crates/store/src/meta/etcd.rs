//! The cluster metadata engine: etcd, through `etcd-client`.
//!
//! Versions are etcd's `mod_revision`, so a compare-and-swap is an etcd
//! transaction comparing `mod_revision` (or `create_revision == 0` for
//! "absent"). Every key lives under a prefix, so one etcd cluster can hold
//! several registries.

use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, ConnectOptions, GetOptions, SortOrder, SortTarget,
    Txn as EtcdTxn, TxnOp,
};

use super::{Compare, KeyValue, MetaStore, Op, Txn};
use crate::StoreError;

#[derive(Clone, Debug)]
pub struct EtcdOptions {
    /// Client endpoints, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Prepended to every key.
    pub prefix: String,
    /// Bound on every call. Without it, a call to a cluster without quorum
    /// fails only after about 11 s, on the server's own timeout.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
}

impl EtcdOptions {
    pub fn new(endpoints: Vec<String>, prefix: impl Into<String>) -> Self {
        Self {
            endpoints,
            prefix: prefix.into(),
            request_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(3),
        }
    }
}

pub struct EtcdMetaStore {
    client: Client,
    prefix: Vec<u8>,
}

fn etcd_err(e: etcd_client::Error) -> StoreError {
    use etcd_client::Error;
    let retryable = match &e {
        // A connection that broke mid-call surfaces as `Unknown` with a
        // transport message; it is as retryable as a refused connection.
        Error::GRpcStatus(status) => match i32::from(status.code()) {
            GRPC_CANCELLED
            | GRPC_DEADLINE_EXCEEDED
            | GRPC_RESOURCE_EXHAUSTED
            | GRPC_UNAVAILABLE => true,
            GRPC_UNKNOWN => status.message().contains("transport"),
            _ => false,
        },
        Error::TransportError(_) | Error::IoError(_) => true,
        _ => false,
    };
    if retryable {
        StoreError::Unavailable(e.to_string())
    } else {
        StoreError::Database(e.to_string())
    }
}

/// gRPC status codes (the etcd client does not re-export tonic's `Code`).
const GRPC_CANCELLED: i32 = 1;
const GRPC_UNKNOWN: i32 = 2;
const GRPC_DEADLINE_EXCEEDED: i32 = 4;
const GRPC_RESOURCE_EXHAUSTED: i32 = 8;
const GRPC_UNAVAILABLE: i32 = 14;

/// The smallest key greater than every key starting with `prefix` (etcd's
/// range end for a prefix); `[0]` means "to the end of the keyspace".
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl EtcdMetaStore {
    pub async fn connect(options: EtcdOptions) -> Result<Self, StoreError> {
        // Without a prefix the registry would own the whole keyspace, and the
        // range arithmetic needs a non-empty key.
        if options.prefix.is_empty() {
            return Err(StoreError::Database(
                "the etcd key prefix must not be empty".into(),
            ));
        }
        let connect = ConnectOptions::new()
            .with_timeout(options.request_timeout)
            .with_connect_timeout(options.connect_timeout)
            // Notice a half-open connection in seconds, not at TCP's pace.
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        let client = Client::connect(options.endpoints, Some(connect))
            .await
            .map_err(etcd_err)?;
        Ok(Self {
            client,
            prefix: options.prefix.into_bytes(),
        })
    }

    fn full_key(&self, key: &[u8]) -> Vec<u8> {
        let mut full = Vec::with_capacity(self.prefix.len() + key.len());
        full.extend_from_slice(&self.prefix);
        full.extend_from_slice(key);
        full
    }

    fn to_key_value(&self, kv: &etcd_client::KeyValue) -> KeyValue {
        KeyValue {
            key: kv
                .key()
                .get(self.prefix.len()..)
                .unwrap_or_default()
                .to_vec(),
            value: kv.value().to_vec(),
            version: kv.mod_revision().max(0) as u64,
        }
    }
}

#[async_trait]
impl MetaStore for EtcdMetaStore {
    async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, StoreError> {
        let mut client = self.client.clone();
        let resp = client
            .get(self.full_key(key), None)
            .await
            .map_err(etcd_err)?;
        Ok(resp.kvs().first().map(|kv| self.to_key_value(kv)))
    }

    async fn scan(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
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
            return Ok(Vec::new());
        }
        let options = GetOptions::new()
            .with_range(end)
            .with_limit(i64::try_from(limit).unwrap_or(i64::MAX))
            .with_sort(SortTarget::Key, SortOrder::Ascend);
        let mut client = self.client.clone();
        let resp = client.get(start, Some(options)).await.map_err(etcd_err)?;
        Ok(resp.kvs().iter().map(|kv| self.to_key_value(kv)).collect())
    }

    async fn commit(&self, txn: Txn) -> Result<bool, StoreError> {
        if txn.ops.is_empty() && txn.compares.is_empty() {
            return Ok(true);
        }
        let compares: Vec<EtcdCompare> = txn
            .compares
            .iter()
            .map(|c| match c {
                Compare::Absent(key) => {
                    EtcdCompare::create_revision(self.full_key(key), CompareOp::Equal, 0)
                }
                Compare::Version(key, version) => EtcdCompare::mod_revision(
                    self.full_key(key),
                    CompareOp::Equal,
                    i64::try_from(*version).unwrap_or(i64::MAX),
                ),
            })
            .collect();
        let ops: Vec<TxnOp> = txn
            .ops
            .iter()
            .map(|op| match op {
                Op::Put(key, value) => TxnOp::put(self.full_key(key), value.clone(), None),
                Op::Delete(key) => TxnOp::delete(self.full_key(key), None),
            })
            .collect();
        let mut client = self.client.clone();
        let resp = client
            .txn(EtcdTxn::new().when(compares).and_then(ops))
            .await
            .map_err(etcd_err)?;
        Ok(resp.succeeded())
    }

    async fn check_health(&self) -> Result<(), StoreError> {
        // A linearizable read needs a quorum: exactly what "can serve writes"
        // means for this node.
        let mut client = self.client.clone();
        client
            .get(self.full_key(b"\0health"), None)
            .await
            .map_err(etcd_err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"abc"), b"abd");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }
}

/// Real etcd servers for tests, started on loopback and killed on drop.
#[cfg(test)]
mod etcd_tests {
    use std::net::TcpListener;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use super::*;
    use crate::Txn;

    struct Etcd {
        child: Child,
        endpoint: String,
        _dir: tempfile::TempDir,
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port")
    }

    impl Etcd {
        /// A single-member etcd, or `None` (test skipped) when etcd is not
        /// installed and `BERTH_REQUIRE_ETCD` is unset.
        async fn start() -> Option<Etcd> {
            if Command::new("etcd").arg("--version").output().is_err() {
                assert!(
                    std::env::var_os("BERTH_REQUIRE_ETCD").is_none(),
                    "etcd is not installed but BERTH_REQUIRE_ETCD is set"
                );
                eprintln!(
                    "SKIPPED: etcd is not installed (set BERTH_REQUIRE_ETCD to fail instead)"
                );
                return None;
            }
            let dir = tempfile::tempdir().expect("temp dir");
            let (client, peer) = (free_port(), free_port());
            let endpoint = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let child = Command::new("etcd")
                .args(["--name", "t", "--data-dir"])
                .arg(dir.path().join("etcd"))
                .args([
                    "--listen-client-urls",
                    &endpoint,
                    "--advertise-client-urls",
                    &endpoint,
                ])
                .args([
                    "--listen-peer-urls",
                    &peer_url,
                    "--initial-advertise-peer-urls",
                    &peer_url,
                ])
                .args(["--initial-cluster", &format!("t={peer_url}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn etcd");
            let etcd = Etcd {
                child,
                endpoint,
                _dir: dir,
            };
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(store) = EtcdMetaStore::connect(etcd.options("/probe/")).await
                    && store.check_health().await.is_ok()
                {
                    return Some(etcd);
                }
                assert!(Instant::now() < deadline, "etcd did not become ready");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }

        fn options(&self, prefix: &str) -> EtcdOptions {
            EtcdOptions::new(vec![self.endpoint.clone()], prefix)
        }

        fn kill(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    impl Drop for Etcd {
        fn drop(&mut self) {
            self.kill();
        }
    }

    #[tokio::test]
    async fn passes_the_metastore_suite() {
        let Some(etcd) = Etcd::start().await else {
            return;
        };
        let store = EtcdMetaStore::connect(etcd.options("/berth/suite/"))
            .await
            .unwrap();
        crate::testsuite::metastore_suite(&store).await;
    }

    #[tokio::test]
    async fn prefixes_isolate_registries_sharing_one_etcd() {
        let Some(etcd) = Etcd::start().await else {
            return;
        };
        let a = EtcdMetaStore::connect(etcd.options("/berth/a/"))
            .await
            .unwrap();
        let b = EtcdMetaStore::connect(etcd.options("/berth/b/"))
            .await
            .unwrap();
        assert!(a.commit(Txn::new().put("k", "from a")).await.unwrap());
        assert!(b.get(b"k").await.unwrap().is_none());
        assert!(
            b.commit(Txn::new().require_absent("k").put("k", "from b"))
                .await
                .unwrap()
        );
        assert_eq!(a.get(b"k").await.unwrap().unwrap().value, b"from a");
        let all_of_a = a.scan(b"", None, 100).await.unwrap();
        assert_eq!(all_of_a.len(), 1);
        assert_eq!(all_of_a[0].key, b"k");
    }

    #[tokio::test]
    async fn an_unreachable_etcd_fails_fast_as_unavailable() {
        let Some(mut etcd) = Etcd::start().await else {
            return;
        };
        let store = EtcdMetaStore::connect(etcd.options("/berth/down/"))
            .await
            .unwrap();
        assert!(store.commit(Txn::new().put("k", "v")).await.unwrap());
        etcd.kill();
        // Bounded only to catch a hang; the client's own timeout is 3 s.
        let outcome = tokio::time::timeout(
            Duration::from_secs(30),
            store.commit(Txn::new().put("k", "w")),
        )
        .await
        .expect("a write to a dead etcd must not hang");
        assert!(
            matches!(outcome, Err(StoreError::Unavailable(_))),
            "{outcome:?}"
        );
        assert!(matches!(
            store.check_health().await,
            Err(StoreError::Unavailable(_))
        ));
    }
}
