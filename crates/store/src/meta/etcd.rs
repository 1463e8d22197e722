//! The cluster metadata engine: etcd, through `etcd-client`.
//!
//! Versions are etcd's `mod_revision`, so a compare-and-swap is an etcd
//! transaction comparing `mod_revision` (or `create_revision == 0` for
//! "absent"). Every key lives under a prefix, so one etcd cluster can hold
//! several registries.
//!
//! **Reads survive the loss of quorum.** A read is first tried linearizable
//! (through the quorum). If etcd cannot answer that way, the store serves
//! reads for a few seconds as *serializable* reads: any surviving member
//! answers from its own copy, possibly slightly behind. That is what lets
//! pulls go on when two of three members are gone; content is addressed by
//! digest, so the worst a stale read does is resolve a tag to its previous
//! manifest. Writes always need the quorum and fail fast without it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, ConnectOptions, GetOptions, SortOrder, SortTarget,
    Txn as EtcdTxn, TxnOp,
};

use super::{Compare, KeyValue, LeaseId, MetaStore, Op, Snapshot, Txn};
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
    /// etcd authentication: user name and password.
    pub user: Option<(String, String)>,
    /// TLS to the members (use `https://` endpoints).
    pub tls: Option<EtcdTls>,
}

/// PEM material for TLS to etcd.
#[derive(Clone, Debug)]
pub struct EtcdTls {
    /// The CA that signed the members' certificates.
    pub ca_pem: Vec<u8>,
    /// A client certificate and key, when the members require one.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl EtcdOptions {
    pub fn new(endpoints: Vec<String>, prefix: impl Into<String>) -> Self {
        Self {
            endpoints,
            prefix: prefix.into(),
            request_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(3),
            user: None,
            tls: None,
        }
    }

    fn connect_options(&self) -> ConnectOptions {
        let mut connect = ConnectOptions::new()
            .with_timeout(self.request_timeout)
            .with_connect_timeout(self.connect_timeout)
            // Notice a half-open connection in seconds, not at TCP's pace.
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        if let Some((user, password)) = &self.user {
            connect = connect.with_user(user.clone(), password.clone());
        }
        if let Some(tls) = &self.tls {
            let mut config = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(&tls.ca_pem));
            if let Some((cert, key)) = &tls.client {
                config = config.identity(etcd_client::Identity::from_pem(cert, key));
            }
            connect = connect.with_tls(config);
        }
        connect
    }
}

pub struct EtcdMetaStore {
    /// All endpoints: writes and linearizable reads.
    client: Client,
    /// One client per endpoint, for serializable reads: the balanced client
    /// keeps sending to dead endpoints, so the fallback picks its own.
    members: Vec<Client>,
    /// The member that last answered a serializable read.
    preferred_member: AtomicUsize,
    /// Until when (ms since the epoch) reads skip the quorum.
    degraded_until_ms: AtomicU64,
    prefix: Vec<u8>,
}

/// How long a linearizable read may take before the store falls back.
const LINEARIZABLE_READ_TIMEOUT: Duration = Duration::from_secs(1);
/// How long reads stay serializable after the quorum failed to answer.
const DEGRADED_WINDOW: Duration = Duration::from_secs(5);

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
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

/// Attempts on other endpoints after a connection was refused.
const CONNECT_RETRIES: usize = 4;

/// Whether the call failed before reaching any server.
fn never_connected(e: &etcd_client::Error) -> bool {
    let text = e.to_string();
    text.contains("tcp connect error") || text.contains("Connection refused")
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
        let connect = options.connect_options();
        let client = Client::connect(&options.endpoints, Some(connect.clone()))
            .await
            .map_err(etcd_err)?;
        let mut members = Vec::new();
        for endpoint in &options.endpoints {
            let single = connect
                .clone()
                .with_timeout(LINEARIZABLE_READ_TIMEOUT)
                .with_connect_timeout(LINEARIZABLE_READ_TIMEOUT);
            members.push(
                Client::connect([endpoint], Some(single))
                    .await
                    .map_err(etcd_err)?,
            );
        }
        Ok(Self {
            client,
            members,
            preferred_member: AtomicUsize::new(0),
            degraded_until_ms: AtomicU64::new(0),
            prefix: options.prefix.into_bytes(),
        })
    }

    /// A read: through the quorum when it answers, else from any member.
    async fn read(
        &self,
        key: Vec<u8>,
        options: GetOptions,
    ) -> Result<etcd_client::GetResponse, StoreError> {
        if now_ms() >= self.degraded_until_ms.load(Ordering::Relaxed) {
            let attempt = tokio::time::timeout(LINEARIZABLE_READ_TIMEOUT, async {
                let mut attempts = 0;
                loop {
                    let mut client = self.client.clone();
                    match client.get(key.clone(), Some(options.clone())).await {
                        Err(e) if attempts < CONNECT_RETRIES && never_connected(&e) => {
                            attempts += 1
                        }
                        other => break other,
                    }
                }
            })
            .await;
            let error = match attempt {
                Ok(Ok(resp)) => return Ok(resp),
                Ok(Err(e)) => match etcd_err(e) {
                    StoreError::Unavailable(why) => why,
                    other => return Err(other),
                },
                Err(_) => "linearizable read timed out".to_string(),
            };
            tracing::warn!(error = %error, "etcd quorum not answering; serving reads from any member");
            self.degraded_until_ms.store(
                now_ms() + DEGRADED_WINDOW.as_millis() as u64,
                Ordering::Relaxed,
            );
        }
        self.serializable_read(key, options).await
    }

    async fn serializable_read(
        &self,
        key: Vec<u8>,
        options: GetOptions,
    ) -> Result<etcd_client::GetResponse, StoreError> {
        let options = options.with_serializable();
        let count = self.members.len();
        let first = self.preferred_member.load(Ordering::Relaxed);
        let mut last_error = StoreError::Unavailable("no etcd endpoint".into());
        for i in 0..count {
            let index = (first + i) % count;
            let mut member = self.members[index].clone();
            match member.get(key.clone(), Some(options.clone())).await {
                Ok(resp) => {
                    self.preferred_member.store(index, Ordering::Relaxed);
                    return Ok(resp);
                }
                Err(e) => last_error = etcd_err(e),
            }
        }
        Err(last_error)
    }

    fn full_key(&self, key: &[u8]) -> Vec<u8> {
        let mut full = Vec::with_capacity(self.prefix.len() + key.len());
        full.extend_from_slice(&self.prefix);
        full.extend_from_slice(key);
        full
    }

    fn range_maker(&self) -> RangeMaker {
        RangeMaker {
            prefix: self.prefix.clone(),
        }
    }

    fn scan_range(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Option<(Vec<u8>, GetOptions)> {
        self.range_maker().scan_range(prefix, start_after, limit)
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
        let resp = self.read(self.full_key(key), GetOptions::new()).await?;
        Ok(resp.kvs().first().map(|kv| self.to_key_value(kv)))
    }

    async fn scan(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let Some((start, options)) = self.scan_range(prefix, start_after, limit) else {
            return Ok(Vec::new());
        };
        let resp = self.read(start, options).await?;
        Ok(resp.kvs().iter().map(|kv| self.to_key_value(kv)).collect())
    }

    async fn snapshot(&self) -> Result<Box<dyn Snapshot>, StoreError> {
        // A linearizable read's header names the revision every later
        // commit is above: the snapshot's moment.
        let mut client = self.client.clone();
        let resp = client
            .get(
                self.full_key(b"\0snapshot"),
                Some(GetOptions::new().with_count_only()),
            )
            .await
            .map_err(etcd_err)?;
        let revision = resp.header().map_or(0, |h| h.revision()).max(0) as u64;
        Ok(Box::new(EtcdSnapshot {
            client: self.client.clone(),
            range: self.range_maker(),
            revision,
        }))
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
                Op::PutLeased(key, value, lease) => TxnOp::put(
                    self.full_key(key),
                    value.clone(),
                    Some(etcd_client::PutOptions::new().with_lease(*lease)),
                ),
                Op::Delete(key) => TxnOp::delete(self.full_key(key), None),
            })
            .collect();
        let txn = EtcdTxn::new().when(compares).and_then(ops);
        // The balanced client keeps picking endpoints that refuse
        // connections. A request that never connected was never delivered,
        // so retrying it (even a compare-and-swap) is safe.
        let mut attempts = 0;
        let resp = loop {
            let mut client = self.client.clone();
            match client.txn(txn.clone()).await {
                Ok(resp) => break resp,
                Err(e) if attempts < CONNECT_RETRIES && never_connected(&e) => attempts += 1,
                Err(e) => return Err(etcd_err(e)),
            }
        };
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

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let secs = i64::try_from(ttl.as_secs().max(2)).unwrap_or(i64::MAX);
        let mut client = self.client.clone();
        let resp = client.lease_grant(secs, None).await.map_err(etcd_err)?;
        Ok(resp.id())
    }

    async fn keep_lease_alive(&self, lease: LeaseId) -> Result<bool, StoreError> {
        let gone = |e: &etcd_client::Error| matches!(e, etcd_client::Error::LeaseKeepAliveError(m) if m.contains("not found"));
        let mut client = self.client.clone();
        let (mut keeper, mut responses) = match client.lease_keep_alive(lease).await {
            Ok(pair) => pair,
            Err(e) if gone(&e) => return Ok(false),
            Err(e) => return Err(etcd_err(e)),
        };
        keeper.keep_alive().await.map_err(etcd_err)?;
        let message = match responses.message().await {
            Err(e) if gone(&e) => return Ok(false),
            other => other.map_err(etcd_err)?,
        };
        match message {
            // etcd answers an expired or unknown lease with a TTL of zero.
            Some(resp) => Ok(resp.ttl() > 0),
            None => Err(StoreError::Unavailable(
                "etcd closed the lease keep-alive stream".into(),
            )),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut client = self.client.clone();
        match client.lease_revoke(lease).await {
            Ok(_) => Ok(()),
            // Already expired: its keys are gone, which is what was asked.
            Err(etcd_client::Error::GRpcStatus(status))
                if status.message().contains("not found") =>
            {
                Ok(())
            }
            Err(e) => Err(etcd_err(e)),
        }
    }
}

/// What `berth cluster status` shows about one etcd member.
#[derive(Clone, Debug)]
pub struct MemberStatus {
    pub name: String,
    pub endpoint: String,
    /// Whether the member answered a status call.
    pub reachable: bool,
    pub is_leader: bool,
    pub raft_term: u64,
}

impl EtcdMetaStore {
    /// The members of the etcd cluster, which of them answer, and which
    /// one leads. `options` are those the store was opened with.
    pub async fn members(&self, options: &EtcdOptions) -> Result<Vec<MemberStatus>, StoreError> {
        let mut client = self.client.clone();
        let list = client.member_list().await.map_err(etcd_err)?;
        let mut out = Vec::new();
        for member in list.members() {
            let endpoint = member.client_urls().first().cloned().unwrap_or_default();
            let status = match Client::connect(
                [endpoint.as_str()],
                Some(
                    options
                        .connect_options()
                        .with_timeout(LINEARIZABLE_READ_TIMEOUT)
                        .with_connect_timeout(LINEARIZABLE_READ_TIMEOUT),
                ),
            )
            .await
            {
                Ok(mut single) => single.status().await.ok(),
                Err(_) => None,
            };
            out.push(MemberStatus {
                name: member.name().to_string(),
                endpoint,
                reachable: status.is_some(),
                is_leader: status.as_ref().is_some_and(|s| s.leader() == member.id()),
                raft_term: status.as_ref().map_or(0, |s| s.raft_term()),
            });
        }
        Ok(out)
    }
}

/// Turns a scan's arguments into an etcd range under the store's prefix.
#[derive(Clone)]
struct RangeMaker {
    prefix: Vec<u8>,
}

impl RangeMaker {
    fn full_key(&self, key: &[u8]) -> Vec<u8> {
        let mut full = Vec::with_capacity(self.prefix.len() + key.len());
        full.extend_from_slice(&self.prefix);
        full.extend_from_slice(key);
        full
    }

    /// The range's start and options; `None` when it is empty.
    fn scan_range(
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
struct EtcdSnapshot {
    client: Client,
    range: RangeMaker,
    revision: u64,
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

/// Tests against real etcd servers, started on loopback and killed on drop.
#[cfg(test)]
mod etcd_tests {
    use std::net::TcpListener;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use super::*;
    use crate::Txn;

    struct Member {
        name: String,
        client_url: String,
        peer_url: String,
        child: Option<Child>,
    }

    /// An etcd cluster of one or more members.
    struct Cluster {
        members: Vec<Member>,
        initial_cluster: String,
        dir: tempfile::TempDir,
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port")
    }

    impl Cluster {
        /// `size` members, ready to serve; `None` (test skipped) when etcd is
        /// not installed and `BERTH_REQUIRE_ETCD` is unset.
        async fn start(size: usize) -> Option<Cluster> {
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
            let members: Vec<Member> = (0..size)
                .map(|i| Member {
                    name: format!("m{i}"),
                    client_url: format!("http://127.0.0.1:{}", free_port()),
                    peer_url: format!("http://127.0.0.1:{}", free_port()),
                    child: None,
                })
                .collect();
            let initial_cluster = members
                .iter()
                .map(|m| format!("{}={}", m.name, m.peer_url))
                .collect::<Vec<_>>()
                .join(",");
            let mut cluster = Cluster {
                members,
                initial_cluster,
                dir: tempfile::tempdir().expect("temp dir"),
            };
            for i in 0..size {
                cluster.start_member(i);
            }
            let probe = EtcdMetaStore::connect(cluster.options("/probe/"))
                .await
                .ok()?;
            eventually(Duration::from_secs(30), || probe.check_health()).await;
            Some(cluster)
        }

        fn start_member(&mut self, i: usize) {
            let m = &mut self.members[i];
            let child = Command::new("etcd")
                .args(["--name", &m.name, "--data-dir"])
                .arg(self.dir.path().join(&m.name))
                .args(["--listen-client-urls", &m.client_url])
                .args(["--advertise-client-urls", &m.client_url])
                .args(["--listen-peer-urls", &m.peer_url])
                .args(["--initial-advertise-peer-urls", &m.peer_url])
                .args(["--initial-cluster", &self.initial_cluster])
                .args(["--heartbeat-interval", "100", "--election-timeout", "500"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn etcd");
            m.child = Some(child);
        }

        fn kill_member(&mut self, i: usize) {
            if let Some(mut child) = self.members[i].child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }

        fn options(&self, prefix: &str) -> EtcdOptions {
            let endpoints = self.members.iter().map(|m| m.client_url.clone()).collect();
            EtcdOptions::new(endpoints, prefix)
        }
    }

    impl Drop for Cluster {
        fn drop(&mut self) {
            for i in 0..self.members.len() {
                self.kill_member(i);
            }
        }
    }

    /// Runs `f` until it succeeds or `limit` passes.
    async fn eventually<T, F, Fut>(limit: Duration, mut f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let deadline = Instant::now() + limit;
        loop {
            match f().await {
                Ok(v) => return v,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "did not succeed in {limit:?}: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    #[tokio::test]
    async fn passes_the_metastore_suite() {
        let Some(etcd) = Cluster::start(1).await else {
            return;
        };
        let store = EtcdMetaStore::connect(etcd.options("/berth/suite/"))
            .await
            .unwrap();
        crate::testsuite::metastore_suite(&store).await;
    }

    #[tokio::test]
    async fn prefixes_isolate_registries_sharing_one_etcd() {
        let Some(etcd) = Cluster::start(1).await else {
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
        let Some(mut etcd) = Cluster::start(1).await else {
            return;
        };
        let store = EtcdMetaStore::connect(etcd.options("/berth/down/"))
            .await
            .unwrap();
        assert!(store.commit(Txn::new().put("k", "v")).await.unwrap());
        etcd.kill_member(0);
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
        // And so do reads, once no member is left to serve them.
        assert!(matches!(
            store.get(b"k").await,
            Err(StoreError::Unavailable(_))
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_survive_the_loss_of_quorum_and_writes_resume_with_it() {
        let Some(mut cluster) = Cluster::start(3).await else {
            return;
        };
        let store = EtcdMetaStore::connect(cluster.options("/berth/quorum/"))
            .await
            .unwrap();
        assert!(store.commit(Txn::new().put("tag/a", "v1")).await.unwrap());
        assert!(store.commit(Txn::new().put("tag/b", "v2")).await.unwrap());

        // Two of three members die: no quorum.
        cluster.kill_member(1);
        cluster.kill_member(2);

        // Reads go on, served by the survivor.
        for _ in 0..5 {
            let kv = tokio::time::timeout(Duration::from_secs(10), store.get(b"tag/a"))
                .await
                .expect("a read without quorum must not hang")
                .expect("a read without quorum must be served");
            assert_eq!(kv.unwrap().value, b"v1");
            let all = store
                .scan(b"tag/", None, 10)
                .await
                .expect("scan without quorum");
            assert_eq!(all.len(), 2);
        }
        // Writes fail, fast and retryably; readiness reports the lost quorum.
        let write = tokio::time::timeout(
            Duration::from_secs(30),
            store.commit(Txn::new().put("tag/a", "v3")),
        )
        .await
        .expect("a write without quorum must not hang");
        assert!(
            matches!(write, Err(StoreError::Unavailable(_))),
            "{write:?}"
        );
        assert!(store.check_health().await.is_err());

        // One member returns: quorum is back, and so are writes, untouched.
        cluster.start_member(1);
        eventually(Duration::from_secs(60), || {
            store.commit(Txn::new().put("tag/a", "v3"))
        })
        .await;
        eventually(Duration::from_secs(30), || store.check_health()).await;
        assert_eq!(store.get(b"tag/a").await.unwrap().unwrap().value, b"v3");
    }

    /// Runs `openssl` with `args` in `dir`.
    fn openssl(dir: &std::path::Path, args: &[&str]) {
        let out = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A CA, a server certificate for 127.0.0.1 and a client certificate.
    fn make_certificates(dir: &std::path::Path) {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-subj",
                "/CN=berth-test-ca",
            ],
        );
        for (name, cn, ext) in [
            (
                "server",
                "127.0.0.1",
                "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
            ),
            ("client", "berth-client", "extendedKeyUsage=clientAuth\n"),
        ] {
            std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
            openssl(
                dir,
                &[
                    "req",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.csr"),
                    "-subj",
                    &format!("/CN={cn}"),
                ],
            );
            openssl(
                dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &format!("{name}.csr"),
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-days",
                    "2",
                    "-out",
                    &format!("{name}.pem"),
                    "-extfile",
                    &format!("{name}.ext"),
                ],
            );
        }
    }

    /// etcd over TLS with client certificates and password authentication:
    /// the options that `--etcd-ca-file`, `--etcd-cert-file`,
    /// `--etcd-key-file`, `--etcd-user` and `--etcd-password` set.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tls_with_client_certificates_and_password_authentication() {
        let Some(plain) = Cluster::start(1).await else {
            return;
        };
        drop(plain);
        let dir = tempfile::tempdir().unwrap();
        make_certificates(dir.path());
        let client_port = free_port();
        let peer = format!("http://127.0.0.1:{}", free_port());
        let endpoint = format!("https://127.0.0.1:{client_port}");
        let mut etcd = Command::new("etcd")
            .current_dir(dir.path())
            .args(["--name", "tls", "--data-dir", "data"])
            .args([
                "--listen-client-urls",
                &endpoint,
                "--advertise-client-urls",
                &endpoint,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("tls={peer}")])
            .args(["--cert-file", "server.pem", "--key-file", "server.key"])
            .args(["--trusted-ca-file", "ca.pem", "--client-cert-auth"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn etcd");
        let read = |f: &str| std::fs::read(dir.path().join(f)).unwrap();
        let tls = EtcdTls {
            ca_pem: read("ca.pem"),
            client: Some((read("client.pem"), read("client.key"))),
        };
        let mut options = EtcdOptions::new(vec![endpoint.clone()], "/tls/");
        options.tls = Some(tls.clone());

        // Enable authentication with a root user, over TLS.
        let admin = eventually(Duration::from_secs(30), || {
            let options = options.clone();
            async move {
                let store = EtcdMetaStore::connect(options).await?;
                store.check_health().await?;
                Ok(store)
            }
        })
        .await;
        let mut client = admin.client.clone();
        client.user_add("root", "s3cret", None).await.unwrap();
        client.user_grant_role("root", "root").await.unwrap();
        client.auth_enable().await.unwrap();

        // With the password, everything works.
        let mut authed = options.clone();
        authed.user = Some(("root".into(), "s3cret".into()));
        let store = eventually(Duration::from_secs(10), || {
            let authed = authed.clone();
            async move {
                let store = EtcdMetaStore::connect(authed).await?;
                store.check_health().await?;
                Ok(store)
            }
        })
        .await;
        crate::testsuite::metastore_suite(&store).await;

        // A wrong password, no client certificate, or plain HTTP: refused.
        let mut wrong = options.clone();
        wrong.user = Some(("root".into(), "wrong".into()));
        let refused = match EtcdMetaStore::connect(wrong).await {
            Ok(store) => store.check_health().await.is_err(),
            Err(_) => true,
        };
        assert!(refused, "a wrong password must be refused");
        let mut no_cert = authed.clone();
        no_cert.tls = Some(EtcdTls {
            ca_pem: tls.ca_pem.clone(),
            client: None,
        });
        let refused = match EtcdMetaStore::connect(no_cert).await {
            Ok(store) => store.check_health().await.is_err(),
            Err(_) => true,
        };
        assert!(refused, "a client without a certificate must be refused");
        let mut plain_http = authed.clone();
        plain_http.tls = None;
        plain_http.endpoints = vec![format!("http://127.0.0.1:{client_port}")];
        plain_http.request_timeout = Duration::from_secs(1);
        plain_http.connect_timeout = Duration::from_secs(1);
        let refused = match EtcdMetaStore::connect(plain_http).await {
            Ok(store) => store.check_health().await.is_err(),
            Err(_) => true,
        };
        assert!(refused, "plain HTTP to a TLS member must fail");
        let _ = etcd.kill();
        let _ = etcd.wait();
    }
}
