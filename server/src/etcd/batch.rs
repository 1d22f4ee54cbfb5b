//! Concurrent updates committed together: while transactions are in flight (a few at
//! most), the next updates queue, and go to etcd as one transaction. etcd commits (and fsyncs) a
//! transaction of 60 updates about as fast as a single put, so a replica's update rate
//! is not bounded by etcd's per-request rate.
//!
//! A batch writes each key at most once and never compares a key it writes (etcd
//! refuses a transaction that writes a key twice, and two creations in one cluster both
//! rewrite its guard key, which is what keeps them from both taking the last free
//! place); members that only compare a key (a refresh that changes nothing) share it. Its conditions are all of its
//! members' conditions, so when one fails the whole batch does: its members are then
//! retried one by one, and only the one whose condition failed hears "conflict".

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};

use bytes::Bytes;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

use super::client::{CallError, EtcdClient, Unavailable};
use super::proto::etcdserverpb::{self as pb, request_op};
use crate::limits::{ETCD_BATCH_BYTES, ETCD_BATCH_OPS, ETCD_BATCHES_IN_FLIGHT, ETCD_QUEUE_MAX};

/// What became of one member's transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Committed at this revision.
    Committed(i64),
    /// A condition did not hold: the mirror was behind. Carries the revision the
    /// mirror must reach to have seen the change (the latest modification of the
    /// compared keys), or `None` when a compared key is gone (its deletion revision is
    /// unknown, so the caller must catch up with everything).
    Conflict(Option<i64>),
}

/// One update's transaction, waiting for a batch.
struct Member {
    txn: pb::TxnRequest,
    bytes: usize,
    reply: oneshot::Sender<Result<Outcome, CallError>>,
}

/// The sending side; the batching task ends when every handle is dropped.
#[derive(Debug, Clone)]
pub struct Batcher {
    queue: mpsc::Sender<Member>,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member")
            .field("compared", &compared_keys(&self.txn).count())
            .field("written", &written_keys(&self.txn).count())
            .finish()
    }
}

/// Keys are compared for clashes as hashes: two keys that collide only make one
/// member wait for the next batch.
fn key_hash(key: &[u8]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}

/// Keys the member only compares.
fn compared_keys(txn: &pb::TxnRequest) -> impl Iterator<Item = u64> {
    txn.compare.iter().map(|c| key_hash(&c.key))
}

/// Keys the member writes (or deletes from).
fn written_keys(txn: &pb::TxnRequest) -> impl Iterator<Item = u64> {
    txn.success.iter().filter_map(|op| match &op.request {
        Some(request_op::Request::RequestPut(p)) => Some(key_hash(&p.key)),
        Some(request_op::Request::RequestDeleteRange(d)) => Some(key_hash(&d.key)),
        _ => None,
    })
}

fn size_of(txn: &pb::TxnRequest) -> usize {
    prost::Message::encoded_len(txn)
}

impl Batcher {
    pub fn start(client: EtcdClient) -> Self {
        let (queue, rx) = mpsc::channel(ETCD_QUEUE_MAX);
        tokio::spawn(run(client, rx));
        Self { queue }
    }

    /// Commits `txn` (conditions and puts only), alone or with others.
    pub async fn commit(&self, txn: pb::TxnRequest) -> Result<Outcome, CallError> {
        let (reply, rx) = oneshot::channel();
        let member = Member {
            bytes: size_of(&txn),
            txn,
            reply,
        };
        let closed = || CallError::Unavailable(Unavailable("the server is shutting down".into()));
        // A full queue means etcd is not keeping up: refuse now rather than pile up
        // work the callers will have given up on.
        self.queue.try_send(member).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => CallError::Unavailable(Unavailable(format!(
                "{ETCD_QUEUE_MAX} updates are already waiting for etcd on this replica"
            ))),
            mpsc::error::TrySendError::Closed(_) => closed(),
        })?;
        rx.await.map_err(|_| closed())?
    }
}

async fn run(client: EtcdClient, mut rx: mpsc::Receiver<Member>) {
    // Members that shared a key with a batch wait for the next one, first in line.
    let mut held: VecDeque<Member> = VecDeque::new();
    let in_flight = Arc::new(Semaphore::new(ETCD_BATCHES_IN_FLIGHT));
    // Keys of the batch being formed; kept between batches for their capacity.
    let (mut compared, mut written) = (HashSet::new(), HashSet::new());
    loop {
        // A batch forms while the previous ones are in flight.
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let first = match held.pop_front() {
            Some(m) => m,
            None => match rx.recv().await {
                Some(m) => m,
                None => return,
            },
        };
        // Two members may compare the same key (a read), but no key may be written by
        // one and compared or written by another.
        compared.clear();
        written.clear();
        compared.extend(compared_keys(&first.txn));
        written.extend(written_keys(&first.txn));
        let mut ops = first.txn.compare.len().max(first.txn.success.len());
        let mut bytes = first.bytes;
        let mut batch = vec![first];
        let mut next_held = VecDeque::new();
        let mut take = |m: Member, batch: &mut Vec<Member>, next_held: &mut VecDeque<Member>| {
            let m_ops = m.txn.compare.len().max(m.txn.success.len());
            let fits = ops + m_ops <= ETCD_BATCH_OPS && bytes + m.bytes <= ETCD_BATCH_BYTES;
            let clash = written_keys(&m.txn).any(|k| compared.contains(&k) || written.contains(&k))
                || compared_keys(&m.txn).any(|k| written.contains(&k));
            if fits && !clash {
                compared.extend(compared_keys(&m.txn));
                written.extend(written_keys(&m.txn));
                ops += m_ops;
                bytes += m.bytes;
                batch.push(m);
            } else {
                next_held.push_back(m);
            }
        };
        while let Some(m) = held.pop_front() {
            take(m, &mut batch, &mut next_held);
        }
        while let Ok(m) = rx.try_recv() {
            // The caller gave up (its RPC ended): nothing to commit for it.
            if m.reply.is_closed() {
                continue;
            }
            take(m, &mut batch, &mut next_held);
        }
        held = next_held;
        let client = client.clone();
        tokio::spawn(async move {
            commit(&client, batch).await;
            drop(permit);
        });
    }
}

/// The revision each compared key must still have.
fn expected(txn: &pb::TxnRequest) -> impl Iterator<Item = (&Bytes, i64)> {
    txn.compare.iter().map(|c| {
        let revision = match c.target_union {
            Some(pb::compare::TargetUnion::ModRevision(r)) => r,
            _ => 0,
        };
        (&c.key, revision)
    })
}

/// The batch as one transaction; when a condition fails, it reads every compared key
/// back, which tells exactly whose conditions failed.
fn combined(batch: &[Member]) -> pb::TxnRequest {
    let compares = batch.iter().map(|m| m.txn.compare.len()).sum();
    let mut txn = pb::TxnRequest {
        compare: Vec::with_capacity(compares),
        success: Vec::with_capacity(batch.iter().map(|m| m.txn.success.len()).sum()),
        failure: Vec::with_capacity(compares),
    };
    let mut read: HashSet<&Bytes> = HashSet::with_capacity(compares);
    for m in batch {
        txn.compare.extend(m.txn.compare.iter().cloned());
        txn.success.extend(m.txn.success.iter().cloned());
        for c in &m.txn.compare {
            if read.insert(&c.key) {
                txn.failure.push(pb::RequestOp {
                    request: Some(request_op::Request::RequestRange(pb::RangeRequest {
                        key: c.key.clone(),
                        keys_only: true,
                        ..Default::default()
                    })),
                });
            }
        }
    }
    txn
}

/// Commits the batch. When conditions fail, the members whose conditions failed hear
/// "conflict" (with the revision that explains it) and the others go again, up to a few
/// rounds; then each alone.
async fn commit(client: &EtcdClient, mut batch: Vec<Member>) {
    for _ in 0..3 {
        if batch.is_empty() {
            return;
        }
        let r = match client.txn(combined(&batch)).await {
            Ok(r) => r,
            // A request etcd refuses (say, a lease that just ended) fails only its own
            // member: find it by sending each alone.
            Err(CallError::Rejected(_)) if batch.len() > 1 => break,
            Err(e) => {
                for m in batch {
                    let _ = m.reply.send(Err(e.clone()));
                }
                return;
            }
        };
        if r.succeeded {
            let revision = r.header.map(|h| h.revision).unwrap_or(0);
            for m in batch {
                let _ = m.reply.send(Ok(Outcome::Committed(revision)));
            }
            return;
        }
        let mut current: HashMap<Bytes, i64> = HashMap::new();
        for op in &r.responses {
            if let Some(pb::response_op::Response::ResponseRange(range)) = &op.response {
                for kv in &range.kvs {
                    current.insert(kv.key.clone(), kv.mod_revision);
                }
            }
        }
        let mut holding = Vec::with_capacity(batch.len());
        for m in batch {
            let now = |k: &Bytes| current.get(k).copied().unwrap_or(0);
            if expected(&m.txn).all(|(k, want)| now(k) == want) {
                holding.push(m);
                continue;
            }
            // A key expected present is gone: its deletion's revision is unknown.
            let gone = expected(&m.txn).any(|(k, want)| want != 0 && !current.contains_key(k));
            let seen = expected(&m.txn).map(|(k, _)| now(k)).max().unwrap_or(0);
            let _ = m.reply.send(Ok(Outcome::Conflict((!gone).then_some(seen))));
        }
        batch = holding;
    }
    // Independent of each other: in parallel.
    let alone = batch.into_iter().map(|m| async move {
        let r = Box::pin(commit(client, vec![m]));
        r.await
    });
    futures::future::join_all(alone).await;
}
