//! Whether a transaction this replica sent has landed, learned from the watch.
//!
//! When a member commits an update but its answer is lost (slow, or cut off on the way
//! back), the update is sent again to the next member, whose condition fails: either
//! because the first attempt landed or because another write came first. The mirror's
//! view tells them apart only while nothing else has written the affiliate since; once
//! another replica has, the update would be written a second time, after the other
//! write, and undo it. A witness holds the transaction's puts, and the applier marks it
//! when one revision carries them all: that revision is the transaction (or a write of
//! exactly the same keys and values, which leaves what it would have).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;

use super::proto::etcdserverpb::{self as pb, request_op};
use super::proto::mvccpb::{self, event::EventType};

/// The witnesses of the transactions in flight, by their first put's key.
#[derive(Debug, Default)]
pub struct Witnesses {
    /// How many are registered: the applier looks at nothing while there are none.
    waiting: AtomicUsize,
    by_key: Mutex<HashMap<Bytes, Vec<Arc<Witness>>>>,
}

#[derive(Debug)]
struct Witness {
    /// (key, value) of every put, the first one's key indexing it.
    puts: Vec<(Bytes, Bytes)>,
    landed: AtomicBool,
}

/// One transaction watched for; unregistered when dropped.
#[derive(Debug)]
pub struct Watching<'a> {
    witnesses: &'a Witnesses,
    witness: Arc<Witness>,
}

impl Watching<'_> {
    /// Whether a revision applied since registering carried every put.
    pub fn landed(&self) -> bool {
        self.witness.landed.load(Ordering::Acquire)
    }
}

impl Drop for Watching<'_> {
    fn drop(&mut self) {
        let key = &self.witness.puts[0].0;
        let mut map = self.witnesses.map();
        if let Some(list) = map.get_mut(key) {
            list.retain(|w| !Arc::ptr_eq(w, &self.witness));
            if list.is_empty() {
                map.remove(key);
            }
        }
        self.witnesses.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Witnesses {
    fn map(&self) -> MutexGuard<'_, HashMap<Bytes, Vec<Arc<Witness>>>> {
        // Nothing panics while holding it; a poisoned map is still a valid map.
        self.by_key.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Watches for `txn`'s puts, from now on: call it before sending. `None` for a
    /// transaction that puts nothing (its landing changes nothing).
    pub fn watch(&self, txn: &pb::TxnRequest) -> Option<Watching<'_>> {
        let puts: Vec<(Bytes, Bytes)> = txn
            .success
            .iter()
            .filter_map(|op| match &op.request {
                Some(request_op::Request::RequestPut(p)) => Some((p.key.clone(), p.value.clone())),
                _ => None,
            })
            .collect();
        let key = puts.first()?.0.clone();
        let witness = Arc::new(Witness {
            puts,
            landed: AtomicBool::new(false),
        });
        self.map().entry(key).or_default().push(witness.clone());
        self.waiting.fetch_add(1, Ordering::Relaxed);
        Some(Watching {
            witnesses: self,
            witness,
        })
    }

    /// Marks the witnesses whose puts one revision of `events` carries. The events of a
    /// revision are never split between two calls (a watch response ends on a revision
    /// boundary, and fragments are joined first).
    pub fn observe(&self, events: &[mvccpb::Event]) {
        if self.waiting.load(Ordering::Relaxed) == 0 {
            return;
        }
        let map = self.map();
        // Every put of the response by (key, revision), built once a first put
        // matches: a batch of k updates of e endpoints each is then checked in
        // k × e lookups, not k × e scans of the whole response.
        let mut index: Option<PutIndex<'_>> = None;
        for e in events {
            let Some(kv) = put_of(e) else {
                continue;
            };
            let Some(list) = map.get(&kv.key) else {
                continue;
            };
            for w in list {
                if w.landed.load(Ordering::Relaxed) || w.puts[0].1 != kv.value {
                    continue;
                }
                let index = index.get_or_insert_with(|| {
                    let puts = events.iter().filter_map(put_of);
                    puts.map(|p| ((&p.key[..], p.mod_revision), &p.value[..]))
                        .collect()
                });
                let carried = w.puts[1..].iter().all(|(key, value)| {
                    index.get(&(&key[..], kv.mod_revision)) == Some(&&value[..])
                });
                if carried {
                    w.landed.store(true, Ordering::Release);
                }
            }
        }
    }
}

/// A response's puts: (key, revision) → value.
type PutIndex<'a> = HashMap<(&'a [u8], i64), &'a [u8]>;

fn put_of(e: &mvccpb::Event) -> Option<&mvccpb::KeyValue> {
    if e.r#type != EventType::Put as i32 {
        return None;
    }
    e.kv.as_ref()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn txn(puts: &[(&str, &str)]) -> pb::TxnRequest {
        pb::TxnRequest {
            success: puts
                .iter()
                .map(|(k, v)| pb::RequestOp {
                    request: Some(request_op::Request::RequestPut(pb::PutRequest {
                        key: Bytes::copy_from_slice(k.as_bytes()),
                        value: Bytes::copy_from_slice(v.as_bytes()),
                        ..Default::default()
                    })),
                })
                .collect(),
            ..Default::default()
        }
    }

    fn put(k: &str, v: &str, revision: i64) -> mvccpb::Event {
        mvccpb::Event {
            r#type: EventType::Put as i32,
            kv: Some(mvccpb::KeyValue {
                key: Bytes::copy_from_slice(k.as_bytes()),
                value: Bytes::copy_from_slice(v.as_bytes()),
                mod_revision: revision,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// A transaction has landed when one revision carries all its puts: not when
    /// another write put the same affiliate value without its endpoints, nor when its
    /// puts are spread over revisions.
    #[test]
    fn a_witness_lands_only_with_every_put_in_one_revision() {
        let w = Witnesses::default();
        let ours = txn(&[("a/n", "v2"), ("e/n/x", "1"), ("e/n/y", "1")]);
        let watching = w.watch(&ours).unwrap();
        w.observe(&[put("a/n", "v2", 5), put("e/n/x", "1", 5)]);
        assert!(!watching.landed(), "without one of its endpoints");
        w.observe(&[
            put("a/n", "v2", 6),
            put("e/n/x", "1", 6),
            put("e/n/y", "1", 7),
        ]);
        assert!(!watching.landed(), "spread over two revisions");
        w.observe(&[
            put("a/n", "other", 8),
            put("e/n/x", "1", 8),
            put("e/n/y", "1", 8),
        ]);
        assert!(!watching.landed(), "another value");
        w.observe(&[
            put("a/m", "v", 9),
            put("e/n/y", "1", 9),
            put("a/n", "v2", 9),
            put("e/n/x", "1", 9),
        ]);
        assert!(
            watching.landed(),
            "in a batch with another update, in any order"
        );
    }

    /// Registrations come and go: two for one affiliate are told apart, and once both
    /// are dropped nothing is left and the applier looks at nothing.
    #[test]
    fn witnesses_of_one_key_are_separate_and_dropped_cleanly() {
        let w = Witnesses::default();
        let first = w.watch(&txn(&[("a/n", "v1")])).unwrap();
        let second = w.watch(&txn(&[("a/n", "v2")])).unwrap();
        assert!(
            w.watch(&pb::TxnRequest::default()).is_none(),
            "puts nothing"
        );
        w.observe(&[put("a/n", "v2", 3)]);
        assert!(!first.landed() && second.landed());
        drop(second);
        w.observe(&[put("a/n", "v1", 4)]);
        assert!(first.landed());
        drop(first);
        assert_eq!(w.waiting.load(Ordering::Relaxed), 0);
        assert!(w.map().is_empty());
    }
}
