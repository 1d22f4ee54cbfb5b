//! A small etcd v3 client over tonic: the handful of calls the backend needs, spread
//! over every member, with a deadline on each attempt.
//!
//! Written here rather than taken from the `etcd-client` crate because that crate's
//! build script needs a system `protoc`; these are the same generated stubs, compiled
//! with protox like the rest of the server. Each member gets its own lazily connected
//! channel; a call that fails on one member (down, partitioned, timed out) moves every
//! call on to the next, so losing a member costs at most one attempt per call in flight.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::proto::etcdserverpb::{
    self as pb, kv_client::KvClient, lease_client::LeaseClient, watch_client::WatchClient,
};
use crate::limits::{ETCD_ATTEMPT_TIMEOUT, ETCD_CALL_DEADLINE, ETCD_CONNECT_TIMEOUT};

/// How to reach etcd: the `--etcd-*` flags.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Client URLs, `http://host:port` or `https://host:port`.
    pub endpoints: Vec<String>,
    /// CA bundle that signed the members' certificates (PEM).
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM), for members that require client auth.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Width of a lease bucket (see [`super::leases`]).
    pub lease_bucket: Duration,
    /// How long a replica applies nothing before it marks the quiet stretch
    /// ([`crate::limits::ETCD_QUIET_MARK`]).
    pub quiet_mark: Duration,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            ca: None,
            cert: None,
            key: None,
            lease_bucket: crate::limits::LEASE_BUCKET,
            quiet_mark: crate::limits::ETCD_QUIET_MARK,
        }
    }
}

/// A failed etcd call, after every attempt: the gRPC layer answers UNAVAILABLE.
#[derive(Debug, Clone, thiserror::Error)]
#[error("etcd unavailable: {0}")]
pub struct Unavailable(pub String);

impl From<Unavailable> for tonic::Status {
    fn from(e: Unavailable) -> Self {
        tonic::Status::unavailable(e.to_string())
    }
}

#[derive(Debug, Clone)]
struct Member {
    url: String,
    channel: Channel,
}

/// Cheap to clone; all clones share the members and the rotation.
#[derive(Debug, Clone)]
pub struct EtcdClient {
    members: Arc<[Member]>,
    /// The member calls go to (modulo their number); moves on when a call fails there.
    current: Arc<AtomicUsize>,
}

/// Which member a call or watch went to: the value of the rotation it read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Turn(usize);

/// Largest message accepted from etcd: a watch catching up can batch many events.
const MAX_MESSAGE: usize = 64 << 20;

impl EtcdClient {
    /// Prepares a channel per endpoint; nothing connects until the first call.
    pub fn new(options: &EtcdOptions) -> anyhow::Result<Self> {
        if options.endpoints.is_empty() {
            anyhow::bail!("--etcd-endpoints is empty: give at least one etcd client URL");
        }
        let tls = tls_config(options)?;
        let mut members = Vec::new();
        for url in &options.endpoints {
            let https = url.starts_with("https://");
            if !https && !url.starts_with("http://") {
                anyhow::bail!("--etcd-endpoints: {url:?} is not an http:// or https:// URL");
            }
            let mut endpoint = Endpoint::from_shared(url.clone())
                .with_context(|| format!("--etcd-endpoints: bad URL {url:?}"))?
                .connect_timeout(ETCD_CONNECT_TIMEOUT)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
                .keep_alive_while_idle(true);
            if https {
                let Some(tls) = tls.clone() else {
                    anyhow::bail!(
                        "{url:?} is https://: give --etcd-ca (and --etcd-cert/--etcd-key if etcd checks clients)"
                    );
                };
                endpoint = endpoint
                    .tls_config(tls)
                    .with_context(|| format!("TLS for etcd endpoint {url}"))?;
            } else if tls.is_some() {
                anyhow::bail!(
                    "--etcd-ca/--etcd-cert/--etcd-key are set but {url:?} is plain http://; \
                     use https:// endpoints"
                );
            }
            members.push(Member {
                url: url.clone(),
                channel: endpoint.connect_lazy(),
            });
        }
        Ok(Self {
            members: members.into(),
            current: Arc::default(),
        })
    }

    /// The member calls go to now.
    fn member(&self) -> (Turn, &Member) {
        let turn = self.current.load(Ordering::Relaxed);
        (Turn(turn), &self.members[turn % self.members.len()])
    }

    /// Moves calls on from the member of `turn`, which failed; once only, however many
    /// calls saw it fail, so concurrent failures do not skip a working member.
    pub fn leave(&self, turn: Turn) {
        let _ = self.current.compare_exchange(
            turn.0,
            turn.0.wrapping_add(1),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// Runs `call` on one member after another until one answers, each attempt bounded
    /// by [`ETCD_ATTEMPT_TIMEOUT`] and all of them by [`ETCD_CALL_DEADLINE`]. Errors
    /// etcd gives for the request itself (not for its own availability) end at once.
    async fn call<T, F, Fut>(&self, what: &str, mut call: F) -> Result<T, CallError>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let deadline = tokio::time::Instant::now() + ETCD_CALL_DEADLINE;
        let mut last = String::new();
        let mut attempt = 0usize;
        while tokio::time::Instant::now() < deadline {
            let (turn, m) = self.member();
            let m = m.clone();
            let result = tokio::time::timeout(ETCD_ATTEMPT_TIMEOUT, call(m.channel)).await;
            match result {
                Ok(Ok(v)) => return Ok(v),
                // Every member refuses writes alike until an operator acts: nothing to
                // retry, but the service is unavailable, not the request at fault.
                Ok(Err(s)) if out_of_space(&s) => {
                    return Err(CallError::Unavailable(Unavailable(format!(
                        "{} ({}): {}; etcd needs its history compacted, defragmenting and \
                         its NOSPACE alarm disarmed",
                        m.url,
                        what,
                        s.message()
                    ))));
                }
                Ok(Err(s)) if !retryable(&s) => return Err(CallError::Rejected(s)),
                Ok(Err(s)) => last = format!("{} ({}): {}", m.url, what, s.message()),
                Err(_) => {
                    last = format!(
                        "{} ({}): no answer within {:?}",
                        m.url, what, ETCD_ATTEMPT_TIMEOUT
                    )
                }
            }
            tracing::debug!(error = %last, "etcd call failed; trying the next member");
            self.leave(turn);
            attempt += 1;
            // After a full round, pause a little so a lost quorum is not hammered.
            if attempt.is_multiple_of(self.members.len()) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Err(CallError::Unavailable(Unavailable(last)))
    }

    pub async fn range(&self, req: pb::RangeRequest) -> Result<pb::RangeResponse, CallError> {
        self.call("range", |ch| {
            let req = req.clone();
            async move { Ok(kv(ch).range(req).await?.into_inner()) }
        })
        .await
    }

    pub async fn put(&self, req: pb::PutRequest) -> Result<pb::PutResponse, CallError> {
        self.call("put", |ch| {
            let req = req.clone();
            async move { Ok(kv(ch).put(req).await?.into_inner()) }
        })
        .await
    }

    pub async fn txn(&self, req: pb::TxnRequest) -> Result<pb::TxnResponse, CallError> {
        self.call("txn", |ch| {
            let req = req.clone();
            async move { Ok(kv(ch).txn(req).await?.into_inner()) }
        })
        .await
    }

    pub async fn lease_grant(&self, ttl_seconds: i64) -> Result<pb::LeaseGrantResponse, CallError> {
        self.grant(|| ttl_seconds).await
    }

    /// A lease that ends at `end` (Unix seconds), never earlier: its TTL is computed as
    /// each attempt begins, so attempts that timed out on other members do not make it
    /// outlive `end` by their time (a connection the attempt must open first still
    /// can, by at most [`ETCD_CONNECT_TIMEOUT`]).
    pub async fn lease_grant_until(&self, end: i64) -> Result<pb::LeaseGrantResponse, CallError> {
        self.grant(|| super::leases::grant_ttl(end, super::clock::now_ms()))
            .await
    }

    async fn grant(&self, ttl: impl Fn() -> i64) -> Result<pb::LeaseGrantResponse, CallError> {
        self.call("lease grant", |ch| {
            let req = pb::LeaseGrantRequest { ttl: ttl(), id: 0 };
            async move { Ok(LeaseClient::new(ch).lease_grant(req).await?.into_inner()) }
        })
        .await
    }

    /// The IDs of every lease etcd holds.
    pub async fn lease_ids(&self) -> Result<Vec<i64>, CallError> {
        self.call("lease list", |ch| async move {
            // Every lease of the whole etcd, other users' too: more than tonic's
            // default 4 MiB once it holds a few hundred thousand.
            let r = LeaseClient::new(ch)
                .max_decoding_message_size(MAX_MESSAGE)
                .lease_leases(pb::LeaseLeasesRequest {})
                .await?;
            Ok(r.into_inner().leases.iter().map(|l| l.id).collect())
        })
        .await
    }

    /// How many leases etcd holds (tests and diagnostics).
    pub async fn lease_count(&self) -> Result<usize, CallError> {
        Ok(self.lease_ids().await?.len())
    }

    /// Compacts etcd's history up to `revision` (tests: a replica behind compaction).
    pub async fn compact(&self, revision: i64) -> Result<(), CallError> {
        self.call("compact", |ch| async move {
            let req = pb::CompactionRequest {
                revision,
                physical: true,
            };
            kv(ch).compact(req).await?;
            Ok(())
        })
        .await
    }

    /// A watch stream on the current member: the requests go out through `requests`.
    /// `hasleader` makes a member that lost its quorum end the stream instead of going
    /// silent, so the mirror notices and moves to another member. If it cannot be
    /// opened, calls have already moved on from that member; if it breaks later, the
    /// caller [leaves](Self::leave) the member of the returned turn.
    pub async fn watch(
        &self,
        requests: impl futures::Stream<Item = pb::WatchRequest> + Send + 'static,
    ) -> Result<(Turn, String, tonic::Streaming<pb::WatchResponse>), Unavailable> {
        let (turn, m) = self.member();
        let m = m.clone();
        let mut req = tonic::Request::new(requests);
        req.metadata_mut().insert(
            "hasleader",
            tonic::metadata::MetadataValue::from_static("true"),
        );
        let mut client = WatchClient::new(m.channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        match tokio::time::timeout(ETCD_ATTEMPT_TIMEOUT, client.watch(req)).await {
            Ok(Ok(stream)) => Ok((turn, m.url, stream.into_inner())),
            Ok(Err(s)) => {
                self.leave(turn);
                Err(Unavailable(format!("{} (watch): {}", m.url, s.message())))
            }
            Err(_) => {
                self.leave(turn);
                Err(Unavailable(format!(
                    "{} (watch): no answer within {:?}",
                    m.url, ETCD_ATTEMPT_TIMEOUT
                )))
            }
        }
    }
}

fn kv(ch: Channel) -> KvClient<Channel> {
    KvClient::new(ch)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

/// What a call ended with when it did not succeed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// No member answered in time.
    #[error(transparent)]
    Unavailable(#[from] Unavailable),
    /// A member answered with an error about the request itself.
    #[error("etcd refused the request: {}", .0.message())]
    Rejected(tonic::Status),
}

impl From<CallError> for tonic::Status {
    fn from(e: CallError) -> Self {
        match e {
            CallError::Unavailable(u) => u.into(),
            CallError::Rejected(s) => tonic::Status::internal(format!("etcd: {}", s.message())),
        }
    }
}

/// Whether another member (or a later attempt) may succeed where this one failed:
/// transport errors, a member without a leader, timeouts inside etcd.
fn retryable(s: &tonic::Status) -> bool {
    use tonic::Code;
    match s.code() {
        // etcd sheds load this way ("etcdserver: too many requests").
        Code::ResourceExhausted => s.message().contains("too many requests"),
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Unknown
        | Code::Cancelled
        | Code::Aborted => true,
        // etcd reports "no leader" and "request timed out" this way.
        Code::Internal | Code::FailedPrecondition => {
            let m = s.message();
            m.contains("leader") || m.contains("timed out") || m.contains("stopped")
        }
        _ => false,
    }
}

/// etcd's answer once its database reached its quota ("mvcc: database space
/// exceeded", "etcdserver: no space"): it takes no more writes until an operator frees
/// space and disarms the alarm.
fn out_of_space(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::ResourceExhausted && s.message().contains("space")
}

fn tls_config(o: &EtcdOptions) -> anyhow::Result<Option<ClientTlsConfig>> {
    if o.ca.is_none() && o.cert.is_none() && o.key.is_none() {
        return Ok(None);
    }
    let read = |p: &PathBuf, flag: &str| {
        std::fs::read(p).with_context(|| format!("{flag}: cannot read {}", p.display()))
    };
    let mut tls = ClientTlsConfig::new();
    if let Some(ca) = &o.ca {
        tls = tls.ca_certificate(Certificate::from_pem(read(ca, "--etcd-ca")?));
    }
    match (&o.cert, &o.key) {
        (Some(c), Some(k)) => {
            tls = tls.identity(Identity::from_pem(
                read(c, "--etcd-cert")?,
                read(k, "--etcd-key")?,
            ));
        }
        (None, None) => {}
        _ => anyhow::bail!("--etcd-cert and --etcd-key go together: give both or neither"),
    }
    Ok(Some(tls))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(n: usize) -> EtcdClient {
        let endpoints = (0..n)
            .map(|i| format!("http://127.0.0.1:{}", 1 + i))
            .collect();
        EtcdClient::new(&EtcdOptions {
            endpoints,
            ..EtcdOptions::default()
        })
        .unwrap()
    }

    #[test]
    fn etcd_errors_are_retried_refused_or_unavailable() {
        use tonic::{Code, Status};
        let shed = Status::new(Code::ResourceExhausted, "etcdserver: too many requests");
        assert!(retryable(&shed) && !out_of_space(&shed));
        let full = Status::new(Code::ResourceExhausted, "mvcc: database space exceeded");
        assert!(out_of_space(&full) && !retryable(&full));
        let no_space = Status::new(Code::ResourceExhausted, "etcdserver: no space");
        assert!(out_of_space(&no_space));
        let no_leader = Status::new(Code::Unavailable, "etcdserver: no leader");
        assert!(retryable(&no_leader));
        let compacted = Status::new(
            Code::OutOfRange,
            "etcdserver: mvcc: required revision has been compacted",
        );
        assert!(!retryable(&compacted) && !out_of_space(&compacted));
    }

    #[tokio::test]
    async fn a_failed_member_is_left_once_however_many_calls_saw_it_fail() {
        let c = client(3);
        let (turn, m) = c.member();
        assert_eq!(m.url, "http://127.0.0.1:1");
        // Three calls in flight on member 0 fail: calls move to member 1, not past it.
        for _ in 0..3 {
            c.leave(turn);
        }
        let (next, m) = c.member();
        assert_eq!(m.url, "http://127.0.0.1:2");
        // A late failure report for member 0 does not move them off member 1 either.
        c.leave(turn);
        assert_eq!(c.member().0, next);
        c.leave(next);
        assert_eq!(c.member().1.url, "http://127.0.0.1:3");
        c.leave(c.member().0);
        assert_eq!(c.member().1.url, "http://127.0.0.1:1", "round and round");
    }
}
