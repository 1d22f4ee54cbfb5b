//! The replica's copy of etcd: one watch on the whole prefix, applied revision by
//! revision to a [`State`], which serves List, Watch and the pages.
//!
//! On start, and whenever the watch cannot resume (the revision it needs was compacted
//! away), the mirror reads everything at one revision and replaces the state with it,
//! ending every subscription so watchers get a fresh snapshot instead of silently
//! missing changes. Otherwise a broken watch resumes from the next revision on another
//! member, and nothing is skipped or applied twice. The [`applier`](super::applier)
//! turns what this reads into state.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::applier::{Applier, Rebuild};
use super::client::{CallError, EtcdClient, Unavailable};
use super::keys::Layout;
use super::proto::etcdserverpb as pb;
use super::proto::mvccpb;
use crate::limits::{
    ETCD_ATTEMPT_TIMEOUT, ETCD_BARRIER_TIMEOUT, ETCD_QUIET_TRIM, ETCD_RANGE_PAGE,
    ETCD_WATCH_BUFFER_KEEP,
};
use crate::state::State;

#[derive(Debug)]
pub struct Mirror {
    layout: Layout,
    client: EtcdClient,
    applier: Applier,
    /// The last etcd revision fully applied to `state`. It moves only with events of
    /// our prefix: etcd 3.4's progress notifications can run ahead of events still in
    /// flight (etcd#15220), so they are not asked for.
    applied: watch::Sender<i64>,
    /// A caller saw the watch stall: nothing was applied for a whole attempt's time,
    /// from the instant given, while a later revision was committed; the revision is
    /// the one applied all along. The watch leaves its member if it has received
    /// nothing in that time either (a catch-up in fragments is progress too).
    stalled: watch::Sender<(i64, tokio::time::Instant)>,
    /// With nothing applied for this long, the mirror writes the sentinel itself, so
    /// `applied` stays recent even when nobody writes: a watch that breaks then can
    /// resume after etcd compacted the quiet stretch, instead of reading everything
    /// again and restarting every watcher.
    quiet_mark: Duration,
    marks: Marks,
    resyncs: AtomicU64,
    resumes: AtomicU64,
    read_restarts: AtomicU64,
    data_misses: AtomicU64,
}

/// Sentinel writes shared by barriers: a barrier waits for the first write sent after
/// it began (one is in flight at a time, so it waits for at most two), and a wave of
/// Lists and Watches (the watchers of a lost replica coming back) costs etcd a write
/// per round trip rather than one per call.
#[derive(Debug)]
struct Marks {
    /// Barriers begun so far; each takes the next number.
    begun: AtomicU64,
    /// Held while a write is in flight: the last write's outcome, and the barriers it
    /// serves (those begun before it was sent).
    last: tokio::sync::Mutex<(u64, Result<i64, Unavailable>)>,
}

/// How the mirror follows etcd, for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// The last etcd revision applied.
    pub applied: i64,
    /// Full reads after the watch could not resume (each restarts every watcher).
    pub resyncs: u64,
    /// Watches that broke (a member lost, stalled or restarted); each resumes from the
    /// next revision, with nothing skipped.
    pub resumes: u64,
    /// Full reads begun again because etcd compacted the revision they read at.
    pub read_restarts: u64,
    /// Clusters whose watchers started again from a snapshot because an affiliate's
    /// data, needed to tell them a change, could not be read from etcd.
    pub data_misses: u64,
}

/// Why the watch loop stopped feeding: resume on another member, read everything
/// again, or open a new watch to drop a receive buffer grown by a large message.
enum Interrupted {
    Resume(String),
    Resync(String),
    Reopen,
}

impl Mirror {
    pub fn new(
        state: State,
        layout: Layout,
        client: EtcdClient,
        quiet_mark: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            applier: Applier::new(state, layout.clone()),
            layout,
            client,
            applied: watch::Sender::new(0),
            stalled: watch::Sender::new((0, tokio::time::Instant::now())),
            // A mark per moment would be a write loop.
            quiet_mark: quiet_mark.max(Duration::from_millis(100)),
            marks: Marks {
                begun: AtomicU64::new(0),
                last: tokio::sync::Mutex::new((0, Ok(0))),
            },
            resyncs: AtomicU64::new(0),
            resumes: AtomicU64::new(0),
            read_restarts: AtomicU64::new(0),
            data_misses: AtomicU64::new(0),
        })
    }

    pub fn progress(&self) -> Progress {
        Progress {
            applied: self.applied(),
            resyncs: self.resyncs.load(Ordering::Relaxed),
            resumes: self.resumes.load(Ordering::Relaxed),
            read_restarts: self.read_restarts.load(Ordering::Relaxed),
            data_misses: self.data_misses.load(Ordering::Relaxed),
        }
    }

    /// The replica's copy of etcd's state.
    pub fn state(&self) -> &State {
        self.applier.state()
    }

    pub fn applied(&self) -> i64 {
        *self.applied.borrow()
    }

    /// Reads everything once; the server calls this before it opens its ports.
    pub async fn load(&self) -> Result<i64, Unavailable> {
        self.read_all().await
    }

    /// Feeds the state from etcd until `stop`; call [`Self::load`] first.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        tokio::join!(self.follow_until(&stop), self.mark_when_quiet(&stop));
    }

    /// Writes the sentinel whenever nothing has been applied for `quiet_mark`: one
    /// small write per quiet stretch, shared by every replica of the prefix (each sees
    /// the others' marks).
    async fn mark_when_quiet(&self, stop: &CancellationToken) {
        let mut applied = self.applied.subscribe();
        loop {
            let quiet = tokio::select! {
                _ = stop.cancelled() => return,
                moved = tokio::time::timeout(self.quiet_mark, applied.changed()) => match moved {
                    Ok(Ok(())) => continue,
                    Ok(Err(_)) => return,
                    Err(_) => true,
                },
            };
            if quiet {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    marked = self.mark() => if let Err(e) = marked {
                        tracing::debug!(error = %e, "cannot mark a quiet stretch in etcd");
                    },
                }
            }
        }
    }

    async fn follow_until(&self, stop: &CancellationToken) {
        let mut backoff = Duration::from_millis(50);
        let mut resync = false;
        loop {
            if resync {
                // A full read can be thousands of pages: shutting down does not wait.
                let read = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = self.read_all() => r,
                };
                match read {
                    Ok(revision) => {
                        resync = false;
                        self.resyncs.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            revision,
                            "re-read the state from etcd; watchers were restarted with a fresh snapshot"
                        );
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot re-read the state from etcd; retrying");
                        if sleep_or_stop(stop, &mut backoff).await {
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
                    if sleep_or_stop(stop, &mut backoff).await {
                        return;
                    }
                }
            }
        }
    }

    /// One watch stream, from the revision after the last applied, until it breaks or
    /// is to be reopened. A reopened watch resumes from a revision of our own last
    /// burst, a moment old, so only a compaction keeping less than that could make it
    /// re-read everything.
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
        // Kicks from before this watch opened were for another.
        let mut stalled = self.stalled.subscribe();
        let (turn, member, mut stream) = match self.client.watch(requests).await {
            Ok(s) => s,
            Err(e) => return Interrupted::Resume(e.to_string()),
        };
        let leave = |why: String| {
            self.client.leave(turn);
            self.resumes.fetch_add(1, Ordering::Relaxed);
            Interrupted::Resume(why)
        };
        // When it last received anything: a stall is a whole window without.
        let mut heard = tokio::time::Instant::now();
        tracing::debug!(%member, start, "watching etcd");
        // Fragments of one response, applied together once the last one arrives.
        let mut pending: Vec<mvccpb::Event> = Vec::new();
        let mut burst = false;
        // Bytes carried since the watch opened: its receive buffer may have grown to
        // as much (several messages can wait in it at once), and never shrinks.
        let mut carried = 0;
        loop {
            let next = tokio::select! {
                m = stream.message() => m,
                // Once etcd goes quiet after a burst, return what the burst freed.
                _ = tokio::time::sleep(ETCD_QUIET_TRIM), if burst => {
                    if carried > ETCD_WATCH_BUFFER_KEEP && pending.is_empty() {
                        return Interrupted::Reopen;
                    }
                    give_back_heap();
                    burst = false;
                    continue;
                }
                Ok(()) = stalled.changed() => {
                    let (at, since) = *stalled.borrow_and_update();
                    if at != self.applied() || since < heard {
                        continue; // Progress since, or a window begun before it.
                    }
                    return leave(format!(
                        "{member} sent nothing for {ETCD_ATTEMPT_TIMEOUT:?} while later \
                         revisions were committed (applied {at})"
                    ));
                }
            };
            let resp = match next {
                Ok(Some(r)) => r,
                Ok(None) => return leave(format!("{member} ended the watch")),
                Err(s) => return leave(format!("{member}: {}", s.message())),
            };
            heard = tokio::time::Instant::now();
            *backoff = Duration::from_millis(50);
            carried += prost::Message::encoded_len(&resp);
            if resp.compact_revision > 0 {
                return Interrupted::Resync(format!(
                    "revision {} was compacted (etcd keeps from {})",
                    self.applied() + 1,
                    resp.compact_revision
                ));
            }
            if resp.canceled {
                return leave(format!(
                    "{member} canceled the watch: {}",
                    resp.cancel_reason
                ));
            }
            if resp.fragment {
                pending.extend(resp.events);
                continue;
            }
            // A whole response needs no second list (fragments are rare).
            let events = if pending.is_empty() {
                resp.events
            } else {
                pending.extend(resp.events);
                std::mem::take(&mut pending)
            };
            let Some(last) = events.last().map(revision_of) else {
                continue;
            };
            let fetch = |wanted| super::data::at_revisions(&self.client, &self.layout, wanted);
            let missed = self.applier.apply(events, fetch).await;
            self.data_misses.fetch_add(missed as u64, Ordering::Relaxed);
            burst = true;
            if last > self.applied() {
                self.applied.send_replace(last);
            }
        }
    }

    /// Reads every key at one revision and replaces the state with it, building it page
    /// by page; returns that revision.
    async fn read_all(&self) -> Result<i64, Unavailable> {
        // A compaction between two pages removes the revision being read: read again
        // at the latest one. Compactions are minutes apart, so a few tries suffice.
        let mut tries = 0;
        loop {
            match self.read_all_at_one_revision().await {
                Err(CallError::Rejected(s)) if s.code() == tonic::Code::OutOfRange && tries < 3 => {
                    tries += 1;
                    self.read_restarts.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(reason = %s.message(), "etcd compacted during a full read; reading again");
                }
                r => return r.map_err(|e| Unavailable(e.to_string())),
            }
        }
    }

    async fn read_all_at_one_revision(&self) -> Result<i64, CallError> {
        let (start, end) = self.layout.all();
        let mut key = start;
        let mut revision = 0;
        let mut read = Rebuild::default();
        loop {
            let req = pb::RangeRequest {
                key: key.clone().into(),
                range_end: end.clone().into(),
                limit: ETCD_RANGE_PAGE,
                revision,
                // Unsorted is etcd's key order (its index is a B-tree), which paging
                // and the rebuild rely on. Asking for that order explicitly would
                // make etcd read the whole range for every page, to sort it.
                ..Default::default()
            };
            let resp = self.client.range(req).await?;
            if revision == 0 {
                revision = resp.header.as_ref().map(|h| h.revision).unwrap_or(0);
            }
            if let Some(last) = resp.kvs.last() {
                key = last.key.to_vec();
                key.push(0);
            }
            for kv in &resp.kvs {
                read.add(&self.layout, kv);
            }
            if !resp.more {
                break;
            }
        }
        self.applier.reset(read);
        // The whole keyspace passed through the heap once: give it back.
        give_back_heap();
        self.applied.send_replace(revision);
        Ok(revision)
    }

    /// Waits until the mirror holds everything etcd had committed when this was called:
    /// after it, List and Watch on this replica see every acknowledged write, whichever
    /// replica took it. A write to the sentinel key (watched, never parsed) marks the
    /// point, since its event is certain to arrive. Fails when etcd has no quorum or
    /// this replica cannot catch up.
    pub async fn barrier(&self) -> Result<(), Unavailable> {
        let revision = self.shared_mark().await?;
        self.wait_for(revision).await
    }

    /// The revision of a sentinel write sent after this call began, shared with every
    /// other call begun before that write was sent.
    async fn shared_mark(&self) -> Result<i64, Unavailable> {
        let me = self.marks.begun.fetch_add(1, Ordering::SeqCst) + 1;
        let mut last = self.marks.last.lock().await;
        if last.0 >= me {
            return last.1.clone();
        }
        // Read before the write is sent: every barrier counted here began before it.
        let serves = self.marks.begun.load(Ordering::SeqCst);
        let outcome = self.mark().await;
        *last = (serves, outcome.clone());
        outcome
    }

    /// Writes the sentinel key; returns the revision of that write.
    async fn mark(&self) -> Result<i64, Unavailable> {
        let req = pb::PutRequest {
            key: self.layout.sentinel().into(),
            ..Default::default()
        };
        let resp = self
            .client
            .put(req)
            .await
            .map_err(|e| Unavailable(e.to_string()))?;
        Ok(resp.header.map(|h| h.revision).unwrap_or(0))
    }

    /// Waits until revision `revision`, which changed a key of ours, is applied. If
    /// nothing is applied for a whole attempt's time meanwhile, the watch's member is
    /// taken to be stalled (hung, or cut off without its connection closing, which
    /// keepalives notice only later): the watch moves to another member.
    pub async fn wait_for(&self, revision: i64) -> Result<(), Unavailable> {
        let deadline = tokio::time::Instant::now() + ETCD_BARRIER_TIMEOUT;
        let mut rx = self.applied.subscribe();
        loop {
            let applied = *rx.borrow_and_update();
            if applied >= revision {
                return Ok(());
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(Unavailable(format!(
                    "this replica has applied etcd revision {applied} but {revision} is \
                     committed; its watch on etcd is not keeping up"
                )));
            }
            let window = now + ETCD_ATTEMPT_TIMEOUT;
            match tokio::time::timeout_at(window.min(deadline), rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(Unavailable("the etcd mirror stopped".into())),
                // A whole window without progress (not one cut short by the deadline).
                Err(_) if window <= deadline => {
                    self.stalled.send_replace((applied, now));
                }
                Err(_) => {}
            }
        }
    }
}

fn revision_of(e: &mvccpb::Event) -> i64 {
    e.kv.as_ref().map(|kv| kv.mod_revision).unwrap_or(0)
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
