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
    Client, Compare as EtcdCompare, CompareOp, ConnectOptions, GetOptions, Txn as EtcdTxn, TxnOp,
    TxnOpResponse,
};

use super::{Compare, KeyValue, KeyWatch, LeaseId, MetaStore, Op, Snapshot, Txn};
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
        self.connect_options_without_timeout()
            .with_timeout(self.request_timeout)
    }

    /// For streams that live as long as the process (watches): the call
    /// timeout would cut them.
    fn connect_options_without_timeout(&self) -> ConnectOptions {
        let mut connect = ConnectOptions::new()
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
    /// For watches, which open their own connection.
    endpoints: Vec<String>,
    watch_options: ConnectOptions,
    /// Until when (ms since the epoch) reads skip the quorum.
    degraded_until_ms: AtomicU64,
    prefix: Vec<u8>,
}

/// How long a linearizable read may take before the store falls back.
const LINEARIZABLE_READ_TIMEOUT: Duration = Duration::from_secs(1);
/// How long reads stay serializable after the quorum failed to answer.
const DEGRADED_WINDOW: Duration = Duration::from_secs(5);
/// Reads per transaction of `get_many`: etcd refuses a transaction of more
/// operations than `--max-txn-ops` (128 by default).
const MAX_TXN_READS: usize = 64;

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
            endpoints: options.endpoints.clone(),
            // A watch held on a member cut off from the others would go
            // silent: etcd ends it instead when that member has no leader.
            watch_options: options
                .connect_options_without_timeout()
                .with_require_leader(true),
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
        self.read_with(|mut client, serializable| {
            let key = key.clone();
            let options = if serializable {
                options.clone().with_serializable()
            } else {
                options.clone()
            };
            async move { client.get(key, Some(options)).await }
        })
        .await
    }

    /// Runs a read (`call`, a get or a read-only transaction, serializable
    /// when told) through the quorum when it answers, else on any member.
    async fn read_with<T, F, Fut>(&self, call: F) -> Result<T, StoreError>
    where
        F: Fn(Client, bool) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        if now_ms() >= self.degraded_until_ms.load(Ordering::Relaxed) {
            let attempt = tokio::time::timeout(LINEARIZABLE_READ_TIMEOUT, async {
                let mut attempts = 0;
                loop {
                    match call(self.client.clone(), false).await {
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
        self.serializable_read(call).await
    }

    async fn serializable_read<T, F, Fut>(&self, call: F) -> Result<T, StoreError>
    where
        F: Fn(Client, bool) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let count = self.members.len();
        let first = self.preferred_member.load(Ordering::Relaxed);
        let mut last_error = StoreError::Unavailable("no etcd endpoint".into());
        for i in 0..count {
            let index = (first + i) % count;
            match call(self.members[index].clone(), true).await {
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

    async fn get_many(&self, keys: &[Vec<u8>]) -> Result<Vec<Option<KeyValue>>, StoreError> {
        if let [key] = keys {
            return Ok(vec![self.get(key).await?]);
        }
        let mut out = Vec::with_capacity(keys.len());
        // A read-only transaction of gets: one round trip, linearizable
        // unless every get in it is serializable (then any member answers),
        // so it falls back to the members as `get` does.
        for chunk in keys.chunks(MAX_TXN_READS) {
            let full: Vec<Vec<u8>> = chunk.iter().map(|k| self.full_key(k)).collect();
            let resp = self
                .read_with(|mut client, serializable| {
                    let ops: Vec<TxnOp> = full
                        .iter()
                        .map(|key| {
                            let options = if serializable {
                                GetOptions::new().with_serializable()
                            } else {
                                GetOptions::new()
                            };
                            TxnOp::get(key.clone(), Some(options))
                        })
                        .collect();
                    async move { client.txn(EtcdTxn::new().and_then(ops)).await }
                })
                .await?;
            let responses = resp.op_responses();
            if responses.len() != chunk.len() {
                return Err(StoreError::Database(format!(
                    "etcd answered {} of {} reads",
                    responses.len(),
                    chunk.len()
                )));
            }
            for response in responses {
                let TxnOpResponse::Get(get) = response else {
                    return Err(StoreError::Database(
                        "etcd answered a read with another operation".into(),
                    ));
                };
                out.push(get.kvs().first().map(|kv| self.to_key_value(kv)));
            }
        }
        Ok(out)
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

    async fn watch_key(&self, key: &[u8]) -> Result<Option<KeyWatch>, StoreError> {
        let mut client = Client::connect(&self.endpoints, Some(self.watch_options.clone()))
            .await
            .map_err(etcd_err)?;
        let stream = client
            .watch(self.full_key(key), None)
            .await
            .map_err(etcd_err)?;
        // The client lives as long as the stream; dropping both ends the
        // watch. (The first response, the watch's creation, wakes readers
        // once more: harmless.)
        let state = Some((stream, client));
        Ok(Some(Box::pin(futures_util::stream::unfold(
            state,
            |state| async move {
                let (mut stream, client) = state?;
                match stream.message().await {
                    Ok(Some(response)) if !response.canceled() => {
                        Some((Ok(()), Some((stream, client))))
                    }
                    Ok(Some(_)) => Some((
                        Err(StoreError::Unavailable(
                            "the etcd watch was canceled".into(),
                        )),
                        None,
                    )),
                    Ok(None) => None,
                    Err(e) => Some((Err(etcd_err(e)), None)),
                }
            },
        ))))
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

mod snapshot;
#[cfg(test)]
mod tests;

use snapshot::{EtcdSnapshot, RangeMaker};
