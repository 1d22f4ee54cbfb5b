//! The replica's copy of etcd: one watch on the whole prefix, applied revision by
//! revision to a [`State`], which serves List, Watch and the pages.
//!
//! On start, and whenever the watch cannot resume (the revision it needs was compacted
//! away), the mirror reads everything at one revision and replaces the state with it,
//! ending every subscription so watchers get a fresh snapshot instead of silently
//! missing changes. Otherwise a broken watch resumes from the next revision on another
//! member, and nothing is skipped or applied twice. The [`applier`](super::applier)
//! applies what this receives, in order, on its own thread.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::applier::{Applier, Work, give_back_heap, revision_of};
use super::client::{EtcdClient, Unavailable};
use super::keys::Layout;
use super::proto::etcdserverpb as pb;
use super::proto::mvccpb;
use crate::limits::{
    ETCD_BARRIER_TIMEOUT, ETCD_QUIET_TRIM, ETCD_RANGE_PAGE, ETCD_WATCH_BUFFER_KEEP,
};
use crate::state::State;

#[derive(Debug)]
pub struct Mirror {
    state: State,
    layout: Layout,
    client: EtcdClient,
    /// Applies to `state`, and says which revision it has applied. That moves only
    /// with events of our prefix: etcd 3.4's progress notifications can run ahead of
    /// events still in flight (etcd#15220), so they are not asked for.
    applier: Applier,
    /// The last revision handed to the applier: a watch resumes after it.
    received: AtomicI64,
}

/// Why the watch loop stopped feeding: resume on another member, read everything
/// again, or open a new watch to drop a receive buffer grown by a large message.
enum Interrupted {
    Resume(String),
    Resync(String),
    Reopen,
}

impl Mirror {
    pub fn new(state: State, layout: Layout, client: EtcdClient) -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            applier: Applier::start(state.clone(), layout.clone())?,
            state,
            layout,
            client,
            received: AtomicI64::new(0),
        }))
    }

    /// The replica's copy of etcd's state.
    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn applied(&self) -> i64 {
        self.applier.applied()
    }

    /// Reads everything once; the server calls this before it opens its ports.
    pub async fn load(&self) -> Result<i64, Unavailable> {
        let revision = self.read_all().await?;
        self.wait_for(revision).await?;
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
                Interrupted::Reopen => {
                    tracing::debug!(
                        applied = self.applied(),
                        "reopening the etcd watch to free its receive buffer"
                    );
                    give_back_heap();
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
        let start = self.received.load(Ordering::Relaxed) + 1;
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
        // Bytes carried since the watch opened: its receive buffer may have grown to
        // as much (several messages can wait in it at once), and never shrinks.
        let mut carried = 0;
        loop {
            // Once etcd goes quiet after a burst, return what the burst freed.
            let next = if burst {
                tokio::select! {
                    m = stream.message() => m,
                    _ = tokio::time::sleep(ETCD_QUIET_TRIM) => {
                        if carried > ETCD_WATCH_BUFFER_KEEP && pending.is_empty() {
                            return Interrupted::Reopen;
                        }
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
            carried += prost::Message::encoded_len(&resp);
            if resp.compact_revision > 0 {
                return Interrupted::Resync(format!(
                    "revision {} was compacted (etcd keeps from {})",
                    self.received.load(Ordering::Relaxed) + 1,
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
            self.received.fetch_max(last, Ordering::Relaxed);
            self.applier.send(Work::Events(events));
            burst = true;
        }
    }

    /// Reads every key at one revision, handing the applier one page at a time, and
    /// has it replace the state with them; returns that revision.
    async fn read_all(&self) -> Result<i64, Unavailable> {
        let result = self.read_pages().await;
        match result {
            Ok(revision) => {
                self.received.store(revision, Ordering::Relaxed);
                self.applier.send(Work::ReadDone { revision });
            }
            Err(_) => self.applier.send(Work::ReadFailed),
        }
        result
    }

    async fn read_pages(&self) -> Result<i64, Unavailable> {
        let (start, end) = self.layout.all();
        let mut key = start;
        let mut revision = 0;
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
            self.applier.send(Work::ReadPage(resp.kvs));
            if !more {
                return Ok(revision);
            }
        }
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
        let mut rx = self.applier.applied_watch();
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

/// Sleeps for the backoff (doubling it, up to 2 s); true if stopped meanwhile.
async fn sleep_or_stop(stop: &CancellationToken, backoff: &mut Duration) -> bool {
    let d = *backoff;
    *backoff = (*backoff * 2).min(Duration::from_secs(2));
    tokio::select! {
        _ = stop.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}
