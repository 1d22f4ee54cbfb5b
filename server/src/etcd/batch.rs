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
use crate::limits::{
    ETCD_BATCH_BYTES, ETCD_BATCH_OPS, ETCD_BATCHES_IN_FLIGHT, ETCD_HELD_MAX, ETCD_QUEUE_MAX,
};

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
    let mut former = Former::default();
    loop {
        // A batch forms while the previous ones are in flight.
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let first = loop {
            let m = match held.pop_front() {
                Some(m) => m,
                None => match rx.recv().await {
                    Some(m) => m,
                    None => return,
                },
            };
            if !m.abandoned() {
                break m;
            }
        };
        let batch = former.form(first, &mut held, || rx.try_recv().ok());
        let client = client.clone();
        tokio::spawn(async move {
            commit(&client, batch).await;
            drop(permit);
        });
    }
}

impl Member {
    /// The caller gave up (its RPC ended): there is nothing to commit for it.
    fn abandoned(&self) -> bool {
        self.reply.is_closed()
    }

    fn ops(&self) -> usize {
        self.txn.compare.len().max(self.txn.success.len())
    }
}

/// Forms batches; its key sets are kept between batches for their capacity.
#[derive(Default)]
struct Former {
    /// Keys compared, and written, by the members taken or held so far: a later
    /// member that would write one, or compare one written, waits behind them, so
    /// updates to one key reach etcd in the order they came.
    compared: HashSet<u64>,
    written: HashSet<u64>,
}

impl Former {
    /// The batch that starts with `first`: the members held from earlier batches
    /// first, in order, then new ones from `incoming` until the batch is full or
    /// [`ETCD_HELD_MAX`] are held back, so that what waits beyond the queue's own bound
    /// stays bounded. Two members may compare the same key (a read), but no key may be
    /// written by one and compared or written by another: such members are held for a
    /// later batch, and so are those that touch a key of a held one. Abandoned members
    /// are dropped.
    fn form(
        &mut self,
        first: Member,
        held: &mut VecDeque<Member>,
        mut incoming: impl FnMut() -> Option<Member>,
    ) -> Vec<Member> {
        self.compared.clear();
        self.written.clear();
        self.compared.extend(compared_keys(&first.txn));
        self.written.extend(written_keys(&first.txn));
        let mut ops = first.ops();
        let mut bytes = first.bytes;
        let mut batch = vec![first];
        let mut full = false;
        let mut still_held = VecDeque::new();
        // Says whether the batch is full: `m` did not fit.
        let mut take = |m: Member, still_held: &mut VecDeque<Member>| {
            if m.abandoned() {
                return false;
            }
            let fits = ops + m.ops() <= ETCD_BATCH_OPS && bytes + m.bytes <= ETCD_BATCH_BYTES;
            let clash = written_keys(&m.txn)
                .any(|k| self.compared.contains(&k) || self.written.contains(&k))
                || compared_keys(&m.txn).any(|k| self.written.contains(&k));
            self.compared.extend(compared_keys(&m.txn));
            self.written.extend(written_keys(&m.txn));
            if fits && !clash {
                ops += m.ops();
                bytes += m.bytes;
                batch.push(m);
            } else {
                still_held.push_back(m);
            }
            !fits
        };
        while let Some(m) = held.pop_front() {
            full |= take(m, &mut still_held);
        }
        while !full && still_held.len() < ETCD_HELD_MAX {
            let Some(m) = incoming() else {
                break;
            };
            full |= take(m, &mut still_held);
        }
        *held = still_held;
        batch
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A member comparing `compare` and writing `write`, and its caller's receiver
    /// (dropping it abandons the member).
    fn member(
        compare: &[&str],
        write: &[&str],
    ) -> (Member, oneshot::Receiver<Result<Outcome, CallError>>) {
        let txn = pb::TxnRequest {
            compare: compare
                .iter()
                .map(|k| pb::Compare {
                    key: Bytes::copy_from_slice(k.as_bytes()),
                    ..Default::default()
                })
                .collect(),
            success: write
                .iter()
                .map(|k| pb::RequestOp {
                    request: Some(request_op::Request::RequestPut(pb::PutRequest {
                        key: Bytes::copy_from_slice(k.as_bytes()),
                        ..Default::default()
                    })),
                })
                .collect(),
            failure: Vec::new(),
        };
        let (reply, rx) = oneshot::channel();
        let m = Member {
            bytes: size_of(&txn),
            txn,
            reply,
        };
        (m, rx)
    }

    fn written(batch: &[Member]) -> Vec<u64> {
        batch.iter().flat_map(|m| written_keys(&m.txn)).collect()
    }

    #[test]
    fn members_comparing_one_key_share_a_batch_and_a_writer_of_it_waits() {
        let (first, _r0) = member(&["guard"], &["a"]);
        let (reader, _r1) = member(&["guard"], &["b"]);
        let (writer, _r2) = member(&["c"], &["guard"]);
        // Popped from the end: the reader comes first.
        let mut incoming = vec![writer, reader];
        let mut held = VecDeque::new();
        let batch = Former::default().form(first, &mut held, || incoming.pop());
        assert_eq!(written(&batch), [key_hash(b"a"), key_hash(b"b")]);
        assert_eq!(held.len(), 1);
        assert_eq!(written_keys(&held[0].txn).next(), Some(key_hash(b"guard")));
    }

    #[test]
    fn a_member_touching_a_key_of_a_held_one_waits_behind_it() {
        let (first, _r0) = member(&[], &["guard"]);
        // Clashes with the first (the guard), and compares "k".
        let (held, _r1) = member(&["k"], &["guard", "a"]);
        // Clashes with nothing in the batch, but writes "k": it must not overtake.
        let (writer, _r2) = member(&[], &["k"]);
        let (other, _r3) = member(&[], &["b"]);
        let mut incoming = vec![other, writer, held];
        let mut held_back = VecDeque::new();
        let batch = Former::default().form(first, &mut held_back, || incoming.pop());
        assert_eq!(written(&batch), [key_hash(b"guard"), key_hash(b"b")]);
        let order: Vec<Vec<u64>> = held_back
            .iter()
            .map(|m| written_keys(&m.txn).collect())
            .collect();
        assert_eq!(
            order,
            [
                vec![key_hash(b"guard"), key_hash(b"a")],
                vec![key_hash(b"k")]
            ]
        );
    }

    #[test]
    fn held_members_go_first_and_abandoned_ones_are_dropped() {
        let (first, _r0) = member(&[], &["a"]);
        let (kept, _r1) = member(&[], &["b"]);
        let (gone, r2) = member(&[], &["c"]);
        drop(r2);
        let (new, _r3) = member(&[], &["d"]);
        let (gone_new, r4) = member(&[], &["e"]);
        drop(r4);
        let mut held = VecDeque::from([gone, kept]);
        let mut incoming = vec![gone_new, new];
        let batch = Former::default().form(first, &mut held, || incoming.pop());
        assert_eq!(
            written(&batch),
            [key_hash(b"a"), key_hash(b"b"), key_hash(b"d")]
        );
        assert!(held.is_empty());
    }

    #[test]
    fn a_full_batch_takes_no_more_from_the_queue() {
        let keys: Vec<String> = (0..1000).map(|i| format!("k{i}")).collect();
        let (first, _r) = member(&[], &["first"]);
        let mut receivers = Vec::new();
        let mut incoming = keys.iter().map(|k| {
            let (m, r) = member(&[], &[k.as_str()]);
            receivers.push(r);
            m
        });
        let mut pulled = 0;
        let mut held = VecDeque::new();
        let batch = Former::default().form(first, &mut held, || {
            pulled += 1;
            incoming.next()
        });
        assert_eq!(batch.len(), ETCD_BATCH_OPS);
        assert_eq!(
            held.len(),
            1,
            "the one that did not fit waits, first in line"
        );
        assert_eq!(pulled, ETCD_BATCH_OPS, "nothing more left the queue");
    }

    #[test]
    fn members_held_for_clashing_never_exceed_the_bound() {
        // Creations in one cluster all rewrite its guard key: one per batch.
        let (first, _r) = member(&[], &["guard"]);
        let mut receivers = Vec::new();
        let mut incoming = std::iter::repeat_with(|| {
            let (m, r) = member(&[], &["guard"]);
            receivers.push(r);
            m
        })
        .take(10_000);
        let mut pulled = 0;
        let mut held = VecDeque::new();
        let mut former = Former::default();
        let batch = former.form(first, &mut held, || {
            pulled += 1;
            incoming.next()
        });
        assert_eq!(batch.len(), 1);
        assert_eq!((held.len(), pulled), (ETCD_HELD_MAX, ETCD_HELD_MAX));
        // The next batch takes one of them and pulls one more.
        let first = held.pop_front().unwrap();
        let batch = former.form(first, &mut held, || {
            pulled += 1;
            incoming.next()
        });
        assert_eq!(batch.len(), 1);
        assert_eq!((held.len(), pulled), (ETCD_HELD_MAX, ETCD_HELD_MAX + 1));
    }
}
