//! The fake's state: Nodes, the revision counter, the retained history of changes (the
//! "etcd window"), open watches, and what the fake has observed (requests, patches).
//!
//! Everything sits behind one mutex, so a change, its history entry and its delivery to every
//! open watch happen in resourceVersion order.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};

use crate::node::{object_rv, set_object_rv};
use crate::selector::Filter;
use crate::{AuthMode, Verb};

/// The type of a watch event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change in the history window.
#[derive(Debug, Clone)]
pub(crate) struct HistEvent {
    pub rv: u64,
    pub kind: EventType,
    /// The new object; for a deletion, the last state with the deletion's resourceVersion.
    pub object: Value,
    /// The previous object (MODIFIED and DELETED).
    pub old: Option<Value>,
}

/// What a watch stream receives.
#[derive(Debug)]
pub(crate) enum WatchMsg {
    /// One serialised event line (with its trailing newline).
    Line(Bytes),
    /// End the stream cleanly (as on `timeoutSeconds`).
    End,
}

pub(crate) struct Watcher {
    pub tx: mpsc::UnboundedSender<WatchMsg>,
    pub filter: Filter,
    pub bookmarks: bool,
    /// The connection serving this watch.
    pub conn: u64,
    /// Set when that connection is being cut: nothing more is sent, even by a poll that was
    /// already running when the cut was asked for.
    pub cut: bool,
}

/// A request the fake answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// HTTP method.
    pub method: String,
    /// Path, without the query.
    pub path: String,
    /// Raw query string (empty when none).
    pub query: String,
    /// The API verb, for requests on Nodes (`None` for discovery, `/version`, unknown paths).
    pub verb: Option<Verb>,
    /// HTTP status of the answer (200 for a watch stream, even one that carries an ERROR event).
    pub status: u16,
    /// The `User-Agent` header.
    pub user_agent: String,
}

/// A PATCH the fake received (whatever its outcome).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatchRecord {
    /// Node name from the path.
    pub name: String,
    /// The `Content-Type` header as sent.
    pub content_type: String,
    /// The body as sent (lossy UTF-8).
    pub body: String,
    /// HTTP status of the answer.
    pub status: u16,
}

/// A point-in-time view of what the fake has observed, for [`crate::FakeApiServer::wait_for`].
#[derive(Debug, Clone)]
pub struct Observed {
    /// The current resourceVersion (etcd revision) of the fake.
    pub resource_version: u64,
    /// Watch streams open now.
    pub open_watches: usize,
    /// Watch streams ever opened (including those that only carried an ERROR event).
    pub watches_started: u64,
    /// Every request answered so far, oldest first.
    pub requests: Vec<RequestRecord>,
    /// Every PATCH received so far, oldest first.
    pub patches: Vec<PatchRecord>,
    /// Current Nodes by name.
    pub nodes: BTreeMap<String, Value>,
}

pub(crate) struct Store {
    pub rv: u64,
    pub nodes: BTreeMap<String, Value>,
    /// Changes with rv > compacted_rv, oldest first.
    pub history: Vec<HistEvent>,
    pub compacted_rv: u64,
    /// The Nodes as of `compacted_rv`.
    pub base: BTreeMap<String, Value>,
    pub watchers: HashMap<u64, Watcher>,
    pub next_watcher: u64,
    pub watches_started: u64,
    pub requests: Vec<RequestRecord>,
    pub patches: Vec<PatchRecord>,
    pub auth: HashMap<Verb, AuthMode>,
    pub delay: Duration,
    pub refuse_connections: bool,
}

impl Store {
    pub(crate) fn new() -> Store {
        Store {
            // etcd starts at revision 1.
            rv: 1,
            nodes: BTreeMap::new(),
            history: Vec::new(),
            compacted_rv: 1,
            base: BTreeMap::new(),
            watchers: HashMap::new(),
            next_watcher: 1,
            watches_started: 0,
            requests: Vec::new(),
            patches: Vec::new(),
            auth: HashMap::new(),
            delay: Duration::ZERO,
            refuse_connections: false,
        }
    }

    pub(crate) fn auth(&self, verb: Verb) -> AuthMode {
        self.auth.get(&verb).cloned().unwrap_or(AuthMode::Ok)
    }

    /// Records a change: bumps the revision, stores, appends history, tells every watch.
    /// `new` is `None` for a deletion. Returns the stored object (or the deleted one).
    pub(crate) fn commit(&mut self, name: &str, new: Option<Value>) -> Value {
        self.rv += 1;
        let rv = self.rv;
        let old = self.nodes.get(name).cloned();
        let (kind, object) = match new {
            Some(mut obj) => {
                set_object_rv(&mut obj, rv);
                self.nodes.insert(name.to_string(), obj.clone());
                let kind = if old.is_some() {
                    EventType::Modified
                } else {
                    EventType::Added
                };
                (kind, obj)
            }
            None => {
                let mut obj = self.nodes.remove(name).expect("deleting a stored node");
                set_object_rv(&mut obj, rv);
                (EventType::Deleted, obj)
            }
        };
        let ev = HistEvent {
            rv,
            kind,
            object: object.clone(),
            old,
        };
        self.dispatch(&ev);
        self.history.push(ev);
        object
    }

    fn dispatch(&mut self, ev: &HistEvent) {
        self.watchers.retain(|_, w| {
            if w.cut {
                return true;
            }
            match translate(&w.filter, ev) {
                Some(line) => w.tx.send(WatchMsg::Line(line)).is_ok(),
                None => true,
            }
        });
    }

    /// Drops the history up to now: watches resuming from an older resourceVersion get 410.
    pub(crate) fn compact(&mut self) -> u64 {
        self.compacted_rv = self.rv;
        self.base = self.nodes.clone();
        self.history.clear();
        self.rv
    }

    /// The Nodes as of revision `at` (`compacted_rv <= at <= rv`).
    pub(crate) fn snapshot_at(&self, at: u64) -> BTreeMap<String, Value> {
        if at >= self.rv {
            return self.nodes.clone();
        }
        let mut nodes = self.base.clone();
        for ev in self.history.iter().take_while(|e| e.rv <= at) {
            let name = ev
                .object
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            match ev.kind {
                EventType::Deleted => {
                    nodes.remove(&name);
                }
                _ => {
                    nodes.insert(name, ev.object.clone());
                }
            }
        }
        nodes
    }

    /// Sends a BOOKMARK at the current revision to one watch (if it asked for bookmarks).
    pub(crate) fn bookmark(&mut self, id: u64) {
        let rv = self.rv;
        if let Some(w) = self.watchers.get(&id)
            && w.bookmarks
            && !w.cut
        {
            let _ = w.tx.send(WatchMsg::Line(bookmark_line(rv, false)));
        }
    }

    pub(crate) fn observed(&self) -> Observed {
        Observed {
            resource_version: self.rv,
            open_watches: self.watchers.len(),
            watches_started: self.watches_started,
            requests: self.requests.clone(),
            patches: self.patches.clone(),
            nodes: self.nodes.clone(),
        }
    }
}

/// One watch event as a line of JSON.
pub(crate) fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut v = serde_json::to_vec(&json!({"type": kind, "object": object})).expect("json");
    v.push(b'\n');
    Bytes::from(v)
}

/// A BOOKMARK: a Node carrying only `metadata.resourceVersion` (and, closing the initial
/// events of a `sendInitialEvents` watch, the `k8s.io/initial-events-end` annotation).
pub(crate) fn bookmark_line(rv: u64, initial_events_end: bool) -> Bytes {
    let mut metadata = serde_json::Map::new();
    metadata.insert("resourceVersion".into(), json!(rv.to_string()));
    if initial_events_end {
        metadata.insert(
            "annotations".into(),
            json!({"k8s.io/initial-events-end": "true"}),
        );
    }
    event_line(
        "BOOKMARK",
        &json!({"kind": "Node", "apiVersion": "v1", "metadata": metadata}),
    )
}

/// How one change looks to a watch with `filter`: objects entering the selection are ADDED,
/// objects leaving it DELETED, as the real watch cache reports them.
pub(crate) fn translate(filter: &Filter, ev: &HistEvent) -> Option<Bytes> {
    let now = filter.matches(&ev.object);
    let before = ev.old.as_ref().is_some_and(|o| filter.matches(o));
    let kind = match ev.kind {
        EventType::Added => now.then_some(EventType::Added),
        EventType::Deleted => before.then_some(EventType::Deleted),
        EventType::Modified => match (before, now) {
            (true, true) => Some(EventType::Modified),
            (false, true) => Some(EventType::Added),
            (true, false) => Some(EventType::Deleted),
            (false, false) => None,
        },
    }?;
    Some(event_line(kind.as_str(), &ev.object))
}

/// The store plus the means to wait for it to change (blocking or async).
pub(crate) struct Shared {
    store: Mutex<Store>,
    changed_cv: Condvar,
    changed_async: Notify,
}

impl Shared {
    pub(crate) fn new() -> Shared {
        Shared {
            store: Mutex::new(Store::new()),
            changed_cv: Condvar::new(),
            changed_async: Notify::new(),
        }
    }

    /// Reads the store.
    pub(crate) fn read<T>(&self, f: impl FnOnce(&Store) -> T) -> T {
        f(&self.lock())
    }

    /// Changes the store and wakes whoever waits on it.
    pub(crate) fn write<T>(&self, f: impl FnOnce(&mut Store) -> T) -> T {
        let out = f(&mut self.lock());
        self.changed_cv.notify_all();
        self.changed_async.notify_waiters();
        out
    }

    fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn wait_blocking(
        &self,
        timeout: Duration,
        pred: impl Fn(&Observed) -> bool,
    ) -> Result<Observed, Observed> {
        let deadline = std::time::Instant::now() + timeout;
        let mut guard = self.lock();
        loop {
            let seen = guard.observed();
            if pred(&seen) {
                return Ok(seen);
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return Err(seen);
            }
            guard = self
                .changed_cv
                .wait_timeout(guard, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    pub(crate) async fn wait_async(
        &self,
        timeout: Duration,
        pred: impl Fn(&Observed) -> bool,
    ) -> Result<Observed, Observed> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed_async.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let seen = self.read(Store::observed);
            if pred(&seen) {
                return Ok(seen);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(self.read(Store::observed));
            }
        }
    }
}

/// Deregisters a watch when its stream is dropped (client gone, connection aborted, ended).
pub(crate) struct WatchGuard {
    pub shared: std::sync::Arc<Shared>,
    pub id: u64,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        let id = self.id;
        self.shared.write(|s| {
            s.watchers.remove(&id);
        });
    }
}

/// The resourceVersion of an object as stored.
pub(crate) fn rv_of(obj: &Value) -> u64 {
    object_rv(obj)
}
