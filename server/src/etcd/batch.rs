//! Concurrent updates committed together: while one transaction is in flight, the
//! next ones queue, and go to etcd as one transaction. etcd commits (and fsyncs) a
//! transaction of 60 updates about as fast as a single put, so a replica's update rate
//! is not bounded by etcd's per-request rate.
//!
//! A batch holds each key at most once (etcd refuses a transaction that writes a key
//! twice, and two creations in one cluster both rewrite its guard key, which is what
//! keeps them from both taking the last free place). Its conditions are all of its
//! members' conditions, so when one fails the whole batch does: its members are then
//! retried one by one, and only the one whose condition failed hears "conflict".

use std::collections::{HashSet, VecDeque};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::client::{CallError, EtcdClient};
use super::proto::etcdserverpb::{self as pb, request_op};
use crate::limits::{ETCD_BATCH_BYTES, ETCD_BATCH_OPS};

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
    keys: Vec<Bytes>,
    bytes: usize,
    reply: oneshot::Sender<Result<Outcome, CallError>>,
}

/// The sending side; the batching task ends when every handle is dropped.
#[derive(Debug, Clone)]
pub struct Batcher {
    queue: mpsc::UnboundedSender<Member>,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member")
            .field("keys", &self.keys.len())
            .finish()
    }
}

fn keys_of(txn: &pb::TxnRequest) -> Vec<Bytes> {
    let mut keys: Vec<Bytes> = txn.compare.iter().map(|c| c.key.clone()).collect();
    for op in &txn.success {
        match &op.request {
            Some(request_op::Request::RequestPut(p)) => keys.push(p.key.clone()),
            Some(request_op::Request::RequestDeleteRange(d)) => keys.push(d.key.clone()),
            _ => {}
        }
    }
    keys.sort();
    keys.dedup();
    keys
}

fn size_of(txn: &pb::TxnRequest) -> usize {
    prost::Message::encoded_len(txn)
}

impl Batcher {
    pub fn start(client: EtcdClient) -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(client, rx));
        Self { queue }
    }

    /// Commits `txn` (conditions and puts only), alone or with others.
    pub async fn commit(&self, txn: pb::TxnRequest) -> Result<Outcome, CallError> {
        let (reply, rx) = oneshot::channel();
        let member = Member {
            keys: keys_of(&txn),
            bytes: size_of(&txn),
            txn,
            reply,
        };
        let closed = || CallError::Rejected(tonic::Status::unavailable("shutting down"));
        self.queue.send(member).map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }
}

async fn run(client: EtcdClient, mut rx: mpsc::UnboundedReceiver<Member>) {
    // Members that shared a key with a batch wait for the next one, first in line.
    let mut held: VecDeque<Member> = VecDeque::new();
    loop {
        let first = match held.pop_front() {
            Some(m) => m,
            None => match rx.recv().await {
                Some(m) => m,
                None => return,
            },
        };
        let mut keys: HashSet<Bytes> = first.keys.iter().cloned().collect();
        let mut ops = first.txn.compare.len().max(first.txn.success.len());
        let mut bytes = first.bytes;
        let mut batch = vec![first];
        let mut next_held = VecDeque::new();
        let mut take = |m: Member, batch: &mut Vec<Member>, next_held: &mut VecDeque<Member>| {
            let m_ops = m.txn.compare.len().max(m.txn.success.len());
            let fits = ops + m_ops <= ETCD_BATCH_OPS && bytes + m.bytes <= ETCD_BATCH_BYTES;
            if fits && !m.keys.iter().any(|k| keys.contains(k)) {
                keys.extend(m.keys.iter().cloned());
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
            take(m, &mut batch, &mut next_held);
        }
        held = next_held;
        commit(&client, batch).await;
    }
}

/// One transaction for the whole batch; if it does not go through, each member alone.
async fn commit(client: &EtcdClient, batch: Vec<Member>) {
    if batch.len() == 1 {
        let m = batch.into_iter().next().unwrap_or_else(|| unreachable!());
        let r = one(client, m.txn).await;
        let _ = m.reply.send(r);
        return;
    }
    // Each member's failure branch only matters when it runs alone.
    let mut txn = pb::TxnRequest::default();
    for m in &batch {
        txn.compare.extend(m.txn.compare.iter().cloned());
        txn.success.extend(m.txn.success.iter().cloned());
    }
    if let Ok(Outcome::Committed(revision)) = one(client, txn).await {
        for m in batch {
            let _ = m.reply.send(Ok(Outcome::Committed(revision)));
        }
        return;
    }
    for m in batch {
        let r = one(client, m.txn).await;
        let _ = m.reply.send(r);
    }
}

/// The conditions' keys are read back when they fail (the writer puts range reads of
/// them in the failure branch), so a conflict says which revision to wait for.
async fn one(client: &EtcdClient, txn: pb::TxnRequest) -> Result<Outcome, CallError> {
    let expected: Vec<(Bytes, bool)> = txn
        .compare
        .iter()
        .map(|c| {
            let present = !matches!(
                c.target_union,
                Some(pb::compare::TargetUnion::ModRevision(0)) | None
            );
            (c.key.clone(), present)
        })
        .collect();
    let r = client.txn(txn).await?;
    if r.succeeded {
        return Ok(Outcome::Committed(
            r.header.map(|h| h.revision).unwrap_or(0),
        ));
    }
    let mut latest = 0;
    let mut found: HashSet<Bytes> = HashSet::new();
    for op in &r.responses {
        if let Some(pb::response_op::Response::ResponseRange(range)) = &op.response {
            for kv in &range.kvs {
                latest = latest.max(kv.mod_revision);
                found.insert(kv.key.clone());
            }
        }
    }
    let gone = expected
        .iter()
        .any(|(k, present)| *present && !found.contains(k));
    Ok(Outcome::Conflict((!gone).then_some(latest)))
}
