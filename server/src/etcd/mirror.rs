//! The replica's copy of etcd: one watch on the whole prefix, applied revision by
//! revision to a [`State`], which serves List, Watch and the pages.
//!
//! On start, and whenever the watch cannot resume (the revision it needs was compacted
//! away), the mirror reads everything at one revision and replaces the state with it,
//! ending every subscription so watchers get a fresh snapshot instead of silently
//! missing changes. Otherwise a broken watch resumes from the next revision on another
//! member, and nothing is skipped or applied twice.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::client::{EtcdClient, Unavailable};
use super::clock;
use super::keys::{AffiliateValue, EndpointValue, Key, Layout};
use super::proto::etcdserverpb as pb;
use super::proto::mvccpb;
use crate::limits::{ETCD_BARRIER_TIMEOUT, ETCD_QUIET_TRIM, ETCD_RANGE_PAGE};
use crate::state::{Affiliate, Blob, Change, Endpoint, State};

#[derive(Debug)]
pub struct Mirror {
    state: State,
    layout: Layout,
    client: EtcdClient,
    /// The last etcd revision fully applied to `state`. It moves only with events of
    /// our prefix: etcd 3.4's progress notifications can run ahead of events still in
    /// flight (etcd#15220), so they are not asked for.
    applied: watch::Sender<i64>,
}

/// Why the watch loop stopped feeding: resume on another member, or read everything
/// again.
enum Interrupted {
    Resume(String),
    Resync(String),
}

impl Mirror {
    pub fn new(state: State, layout: Layout, client: EtcdClient) -> Arc<Self> {
        Arc::new(Self {
            state,
            layout,
            client,
            applied: watch::Sender::new(0),
        })
    }

    /// The replica's copy of etcd's state.
    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn applied(&self) -> i64 {
        *self.applied.borrow()
    }

    /// Reads everything once; the server calls this before it opens its ports.
    pub async fn load(&self) -> Result<i64, Unavailable> {
        let revision = self.read_all().await?;
        self.applied.send_replace(revision);
        Ok(revision)
    }

    /// Feeds the state from etcd until `stop`; call [`Self::load`] first.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(50);
        let mut resync = false;
        loop {
            if resync {
                match self.read_all().await {
                    Ok(revision) => {
                        self.applied.send_replace(revision);
                        resync = false;
                        tracing::warn!(
                            revision,
                            "re-read the state from etcd; watchers were restarted with a fresh snapshot"
                        );
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot re-read the state from etcd; retrying");
                        if sleep_or_stop(&stop, &mut backoff).await {
                            return;
                        }
                        continue;
                    }
                }
            }
            let result = tokio::select! {
                _ = stop.cancelled() => return,
                r = self.follow(&mut backoff) => r,
            };
            match result {
                Interrupted::Resync(why) => {
                    tracing::warn!(reason = %why, applied = self.applied(), "etcd watch cannot resume; re-reading everything");
                    resync = true;
                }
                Interrupted::Resume(why) => {
                    tracing::warn!(reason = %why, applied = self.applied(), "etcd watch interrupted; resuming on another member");
                    self.client.rotate();
                    if sleep_or_stop(&stop, &mut backoff).await {
                        return;
                    }
                }
            }
        }
    }

    /// One watch stream, from the revision after the last applied, until it breaks.
    async fn follow(&self, backoff: &mut Duration) -> Interrupted {
        let (key, range_end) = self.layout.all();
        let start = self.applied() + 1;
        let create = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                pb::WatchCreateRequest {
                    key: key.into(),
                    range_end: range_end.into(),
                    start_revision: start,
                    // A watch catching up can owe etcd's batch of 1000 revisions: in
                    // fragments, none over the message limit.
                    fragment: true,
                    ..Default::default()
                },
            )),
        };
        // One request, then the request side stays open for the life of the stream.
        let requests = futures::stream::once(async { create }).chain(futures::stream::pending());
        let (member, mut stream) = match self.client.watch(requests).await {
            Ok(s) => s,
            Err(e) => return Interrupted::Resume(e.to_string()),
        };
        tracing::debug!(%member, start, "watching etcd");
        // Fragments of one response, applied together once the last one arrives.
        let mut pending: Vec<mvccpb::Event> = Vec::new();
        let mut burst = false;
        loop {
            // Once etcd goes quiet after a burst, return what the burst freed.
            let next = if burst {
                tokio::select! {
                    m = stream.message() => m,
                    _ = tokio::time::sleep(ETCD_QUIET_TRIM) => {
                        give_back_heap();
                        burst = false;
                        continue;
                    }
                }
            } else {
                stream.message().await
            };
            let resp = match next {
                Ok(Some(r)) => r,
                Ok(None) => return Interrupted::Resume(format!("{member} ended the watch")),
                Err(s) => return Interrupted::Resume(format!("{member}: {}", s.message())),
            };
            *backoff = Duration::from_millis(50);
            if resp.compact_revision > 0 {
                return Interrupted::Resync(format!(
                    "revision {} was compacted (etcd keeps from {})",
                    self.applied() + 1,
                    resp.compact_revision
                ));
            }
            if resp.canceled {
                return Interrupted::Resume(format!(
                    "{member} canceled the watch: {}",
                    resp.cancel_reason
                ));
            }
            pending.extend(resp.events);
            if resp.fragment {
                continue;
            }
            let events = std::mem::take(&mut pending);
            let Some(last) = events.last().map(revision_of) else {
                continue;
            };
            self.apply(&events);
            burst = true;
            if last > self.applied() {
                self.applied.send_replace(last);
            }
        }
    }

    /// Applies events in order, one revision and one cluster at a time.
    fn apply(&self, events: &[mvccpb::Event]) {
        let mut i = 0;
        while i < events.len() {
            let rev = revision_of(&events[i]);
            let mut j = i;
            // One revision's changes, grouped by cluster in first-seen order.
            let mut by_cluster: Vec<(String, Vec<Change>)> = Vec::new();
            while j < events.len() && revision_of(&events[j]) == rev {
                if let Some((cluster, change)) = self.change_of(&events[j]) {
                    match by_cluster.iter_mut().find(|(c, _)| *c == cluster) {
                        Some((_, v)) => v.push(change),
                        None => by_cluster.push((cluster, vec![change])),
                    }
                }
                j += 1;
            }
            for (cluster, changes) in by_cluster {
                self.state.apply(&cluster, &changes);
            }
            i = j;
        }
    }

    fn change_of(&self, e: &mvccpb::Event) -> Option<(String, Change)> {
        let kv = e.kv.as_ref()?;
        let key = self.layout.parse(&kv.key)?;
        let put = e.r#type == mvccpb::event::EventType::Put as i32;
        Some(match key {
            Key::Guard { cluster } => (
                cluster,
                Change::Guard {
                    revision: if put { kv.mod_revision } else { 0 },
                },
            ),
            Key::Affiliate { cluster, affiliate } if put => {
                let v = decode_affiliate(&kv.value, &kv.key)?;
                (
                    cluster,
                    Change::PutAffiliate {
                        id: affiliate,
                        data: v.data,
                        data_set: v.data_set,
                        expiry: clock::instant(v.expiry_ms),
                        revision: kv.mod_revision,
                    },
                )
            }
            Key::Affiliate { cluster, affiliate } => {
                (cluster, Change::DeleteAffiliate { id: affiliate })
            }
            Key::Endpoint {
                cluster,
                affiliate,
                blob,
            } => {
                let blob = Blob::new(&blob)?;
                if put {
                    let v = decode_endpoint(&kv.value, &kv.key)?;
                    (
                        cluster,
                        Change::PutEndpoint {
                            id: affiliate,
                            blob,
                            expiry: clock::instant(v.expiry_ms),
                            ordinal: v.ordinal,
                        },
                    )
                } else {
                    (
                        cluster,
                        Change::DeleteEndpoint {
                            id: affiliate,
                            blob,
                        },
                    )
                }
            }
        })
    }

    /// Reads every key at one revision and replaces the state with it.
    async fn read_all(&self) -> Result<i64, Unavailable> {
        let (start, end) = self.layout.all();
        let mut key = start;
        let mut revision = 0;
        let mut kvs: Vec<mvccpb::KeyValue> = Vec::new();
        loop {
            let req = pb::RangeRequest {
                key: key.clone().into(),
                range_end: end.clone().into(),
                limit: ETCD_RANGE_PAGE,
                revision,
                ..Default::default()
            };
            let resp = self
                .client
                .range(req)
                .await
                .map_err(|e| Unavailable(e.to_string()))?;
            if revision == 0 {
                revision = resp.header.as_ref().map(|h| h.revision).unwrap_or(0);
            }
            let more = resp.more;
            if let Some(last) = resp.kvs.last() {
                key = last.key.to_vec();
                key.push(0);
            }
            kvs.extend(resp.kvs);
            if !more {
                break;
            }
        }
        self.state.reset_all(self.assemble(kvs));
        // The whole keyspace passed through the heap once: give it back.
        give_back_heap();
        Ok(revision)
    }

    /// Builds clusters from keys: endpoints join their affiliate in creation order.
    fn assemble(
        &self,
        kvs: Vec<mvccpb::KeyValue>,
    ) -> HashMap<String, (Vec<(String, Affiliate)>, i64)> {
        type Eps = Vec<(i64, u16, Endpoint)>;
        let mut guards: HashMap<String, i64> = HashMap::new();
        let mut affiliates: HashMap<String, HashMap<String, (Affiliate, Eps)>> = HashMap::new();
        let mut endpoints: Vec<(String, String, i64, u16, Endpoint)> = Vec::new();
        for kv in kvs {
            match self.layout.parse(&kv.key) {
                Some(Key::Guard { cluster }) => {
                    guards.insert(cluster, kv.mod_revision);
                }
                Some(Key::Affiliate { cluster, affiliate }) => {
                    let Some(v) = decode_affiliate(&kv.value, &kv.key) else {
                        continue;
                    };
                    let expiry = clock::instant(v.expiry_ms);
                    let mut a = Affiliate::new(expiry);
                    a.set_stored(&v.data, expiry, kv.mod_revision);
                    affiliates
                        .entry(cluster)
                        .or_default()
                        .insert(affiliate, (a, Vec::new()));
                }
                Some(Key::Endpoint {
                    cluster,
                    affiliate,
                    blob,
                }) => {
                    let (Some(v), Some(blob)) =
                        (decode_endpoint(&kv.value, &kv.key), Blob::new(&blob))
                    else {
                        continue;
                    };
                    let e = Endpoint {
                        blob,
                        expiry: clock::instant(v.expiry_ms),
                        ordinal: v.ordinal,
                    };
                    endpoints.push((cluster, affiliate, kv.create_revision, v.ordinal, e));
                }
                None => {}
            }
        }
        for (cluster, affiliate, created, ordinal, e) in endpoints {
            if let Some((_, eps)) = affiliates
                .get_mut(&cluster)
                .and_then(|c| c.get_mut(&affiliate))
            {
                eps.push((created, ordinal, e));
            }
        }
        let mut out: HashMap<String, (Vec<(String, Affiliate)>, i64)> = HashMap::new();
        for (cluster, list) in affiliates {
            let mut v = Vec::with_capacity(list.len());
            for (id, (mut a, mut eps)) in list {
                eps.sort_by_key(|(created, ordinal, _)| (*created, *ordinal));
                for (_, _, e) in eps {
                    a.put_endpoint(e.blob, e.expiry, e.ordinal);
                }
                v.push((id, a));
            }
            let guard = guards.remove(&cluster).unwrap_or(0);
            out.insert(cluster, (v, guard));
        }
        for (cluster, guard) in guards {
            out.entry(cluster).or_insert((Vec::new(), guard));
        }
        out
    }

    /// Waits until the mirror holds everything etcd had committed when this was called:
    /// after it, List and Watch on this replica see every acknowledged write, whichever
    /// replica took it. A write to the sentinel key (watched, never parsed) marks the
    /// point, since its event is certain to arrive. Fails when etcd has no quorum or
    /// this replica cannot catch up.
    pub async fn barrier(&self) -> Result<(), Unavailable> {
        let req = pb::PutRequest {
            key: self.layout.sentinel().into(),
            ..Default::default()
        };
        let resp = self
            .client
            .put(req)
            .await
            .map_err(|e| Unavailable(e.to_string()))?;
        let revision = resp.header.map(|h| h.revision).unwrap_or(0);
        self.wait_for(revision).await
    }

    /// Waits until revision `revision`, which changed a key of ours, is applied.
    pub async fn wait_for(&self, revision: i64) -> Result<(), Unavailable> {
        let mut rx = self.applied.subscribe();
        let caught_up = rx.wait_for(|applied| *applied >= revision);
        match tokio::time::timeout(ETCD_BARRIER_TIMEOUT, caught_up).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(Unavailable("the etcd mirror stopped".into())),
            Err(_) => Err(Unavailable(format!(
                "this replica has applied etcd revision {} but {revision} is committed; \
                 its watch on etcd is not keeping up",
                self.applied()
            ))),
        }
    }
}

fn revision_of(e: &mvccpb::Event) -> i64 {
    e.kv.as_ref().map(|kv| kv.mod_revision).unwrap_or(0)
}

/// Values this layout never writes are skipped with a warning: only another program
/// writing under our prefix produces them.
fn decode_affiliate(v: &Bytes, key: &[u8]) -> Option<AffiliateValue> {
    let d = AffiliateValue::decode(v);
    if d.is_none() {
        tracing::warn!(key = %String::from_utf8_lossy(key), "ignoring an affiliate value this server did not write");
    }
    d
}

fn decode_endpoint(v: &[u8], key: &[u8]) -> Option<EndpointValue> {
    let d = EndpointValue::decode(v);
    if d.is_none() {
        tracing::warn!(key = %String::from_utf8_lossy(key), "ignoring an endpoint value this server did not write");
    }
    d
}

/// Returns freed heap memory to the system. Applying etcd's changes interleaves
/// short-lived buffers (responses, keys) with the copies the mirror keeps; without this
/// the holes they leave stay resident (about 90 bytes per affiliate in the benchmark).
fn give_back_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory; it takes the allocator's locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Sleeps for the backoff (doubling it, up to 2 s); true if stopped meanwhile.
async fn sleep_or_stop(stop: &CancellationToken, backoff: &mut Duration) -> bool {
    let d = *backoff;
    *backoff = (*backoff * 2).min(Duration::from_secs(2));
    tokio::select! {
        _ = stop.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}
