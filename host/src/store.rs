//! A small in-memory resource store in the manner of Talos's: resources live in a
//! namespace (`cluster`, `cluster-raw`), have a type and an ID, carry a version that
//! grows on every real change, and can be watched.
//!
//! Writers state what they want (`sync`), the store works out the difference, so
//! an unchanged spec never bumps a version or wakes a watcher.
//!
//! Every resource also carries when it was first and last seen (wall-clock time):
//! first-seen is set when it is created, last-seen by every write that states it,
//! changed or not. Moving last-seen alone is no change: plugins republish their
//! whole view often, and only a different spec is news.
//!
//! Raw affiliates are what registries report, and their first-seen is what the
//! member rule compares (`members`), so the store keeps it beyond a resource's
//! life: a destroyed raw affiliate is remembered (bounded), and when the same ID
//! comes back it starts from its remembered first-seen. The daemon seeds that
//! memory from the state dir at start (`first_seen`). What a registry reports in
//! its first publish since the start was there before the daemon looked, so,
//! unless remembered, it counts as first seen at the start: equal, not in the
//! random order in which registries happen to answer.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use tokio::sync::{broadcast, watch};

use crate::limits;
use crate::specs::{AddressStatusSpec, AffiliateSpec, IdentitySpec, MemberSpec};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Namespace {
    /// Identity, merged affiliates (and the local one), members.
    Cluster,
    /// Affiliates as each registry reported them: `<prefix>/<node-id>`.
    ClusterRaw,
}

impl Namespace {
    pub fn as_str(self) -> &'static str {
        match self {
            Namespace::Cluster => "cluster",
            Namespace::ClusterRaw => "cluster-raw",
        }
    }

    pub fn parse(text: &str) -> Option<Namespace> {
        match text {
            "cluster" => Some(Namespace::Cluster),
            "cluster-raw" => Some(Namespace::ClusterRaw),
            _ => None,
        }
    }
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Resource types, named as Talos names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Identity,
    Affiliate,
    Member,
    /// The public address a discovery service sees this node at.
    AddressStatus,
}

impl Kind {
    pub fn type_name(self) -> &'static str {
        match self {
            Kind::Identity => "Identities.cluster.talos.dev",
            Kind::Affiliate => "Affiliates.cluster.talos.dev",
            Kind::Member => "Members.cluster.talos.dev",
            Kind::AddressStatus => "AddressStatuses.net.talos.dev",
        }
    }

    pub fn from_type_name(name: &str) -> Option<Kind> {
        [
            Kind::Identity,
            Kind::Affiliate,
            Kind::Member,
            Kind::AddressStatus,
        ]
        .into_iter()
        .find(|k| k.type_name() == name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Spec {
    Identity(IdentitySpec),
    Affiliate(AffiliateSpec),
    Member(MemberSpec),
    AddressStatus(AddressStatusSpec),
}

impl Spec {
    pub fn kind(&self) -> Kind {
        match self {
            Spec::Identity(_) => Kind::Identity,
            Spec::Affiliate(_) => Kind::Affiliate,
            Spec::Member(_) => Kind::Member,
            Spec::AddressStatus(_) => Kind::AddressStatus,
        }
    }

    /// The spec as Talos prints it (camelCase keys).
    pub fn to_json(&self) -> serde_json::Value {
        let value = match self {
            Spec::Identity(s) => serde_json::to_value(s),
            Spec::Affiliate(s) => serde_json::to_value(s),
            Spec::Member(s) => serde_json::to_value(s),
            Spec::AddressStatus(s) => serde_json::to_value(s),
        };
        value.expect("specs serialize to JSON")
    }
}

#[derive(Clone, Debug)]
pub struct Resource {
    pub namespace: Namespace,
    pub id: String,
    /// Grows on every change of the spec, and only then.
    pub version: u64,
    pub spec: Arc<Spec>,
    /// When it was created; for a raw affiliate possibly earlier (see the module
    /// doc).
    pub first_seen: SystemTime,
    /// The last write that stated it, even unchanged.
    pub last_seen: SystemTime,
}

impl Resource {
    pub fn kind(&self) -> Kind {
        self.spec.kind()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    Created,
    Updated,
    Destroyed,
}

/// One change, as watchers see it. A destroyed resource carries its last spec.
#[derive(Clone, Debug)]
pub struct Change {
    pub kind: ChangeKind,
    pub resource: Resource,
}

/// When a resource was first and last seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    pub first: SystemTime,
    pub last: SystemTime,
}

type Table = BTreeMap<String, Resource>;

/// The wall clock, replaceable in tests.
pub type Clock = Box<dyn Fn() -> SystemTime + Send + Sync>;

#[derive(Default)]
struct Inner {
    tables: BTreeMap<(Namespace, Kind), Table>,
    /// Raw affiliates that do not exist now, by resource ID: destroyed ones, and
    /// those the daemon remembers from before its start.
    remembered: HashMap<String, Seen>,
    /// Registry prefixes that published something since the start.
    published: HashSet<String>,
}

pub struct Store {
    inner: Mutex<Inner>,
    changes: broadcast::Sender<Change>,
    /// Bumped after every change in `cluster-raw`: the merge waits on it.
    raw_generation: watch::Sender<u64>,
    clock: Clock,
    started: SystemTime,
}

impl Default for Store {
    fn default() -> Self {
        Store::with_clock(Box::new(SystemTime::now))
    }
}

impl Store {
    pub fn new() -> Arc<Store> {
        Arc::new(Store::default())
    }

    /// A store whose watchers lag after `changes` unread changes (for tests of
    /// the catch-up path).
    pub fn with_watch_buffer(changes: usize) -> Store {
        Store {
            changes: broadcast::channel(changes).0,
            ..Store::default()
        }
    }

    /// A store that reads the time from `clock`; it starts at the first reading.
    pub fn with_clock(clock: Clock) -> Store {
        Store {
            inner: Mutex::default(),
            changes: broadcast::channel(limits::STORE_WATCH_BUFFER).0,
            raw_generation: watch::channel(0).0,
            started: clock(),
            clock,
        }
    }

    /// When the store was made: the daemon's start.
    pub fn started(&self) -> SystemTime {
        self.started
    }

    /// The store's clock.
    pub fn now(&self) -> SystemTime {
        (self.clock)()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (every write is a
        // single map operation), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every resource of one type in one namespace, sorted by ID.
    pub fn list(&self, namespace: Namespace, kind: Kind) -> Vec<Resource> {
        self.lock()
            .tables
            .get(&(namespace, kind))
            .map(|t| t.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn get(&self, namespace: Namespace, kind: Kind, id: &str) -> Option<Resource> {
        self.lock()
            .tables
            .get(&(namespace, kind))
            .and_then(|t| t.get(id).cloned())
    }

    /// Remembers when raw affiliates that do not exist now were seen, so that
    /// they start from that first-seen if they come back. An ID that exists, or
    /// is remembered already, keeps what it has.
    pub fn remember_raw(&self, seen: impl IntoIterator<Item = (String, Seen)>) {
        let mut inner = self.lock();
        let Inner {
            tables, remembered, ..
        } = &mut *inner;
        let raw = tables.get(&(Namespace::ClusterRaw, Kind::Affiliate));
        for (id, seen) in seen {
            if !raw.is_some_and(|t| t.contains_key(&id)) {
                remembered.entry(id).or_insert(seen);
            }
        }
        bound_remembered(remembered);
    }

    /// When each raw affiliate was seen, by resource ID: the existing ones
    /// (`true`) and the remembered ones (`false`).
    pub fn raw_sightings(&self) -> BTreeMap<String, (Seen, bool)> {
        let inner = self.lock();
        let mut all: BTreeMap<String, (Seen, bool)> = inner
            .remembered
            .iter()
            .map(|(id, seen)| (id.clone(), (*seen, false)))
            .collect();
        if let Some(raw) = inner.tables.get(&(Namespace::ClusterRaw, Kind::Affiliate)) {
            all.extend(raw.values().map(|r| {
                let seen = Seen {
                    first: r.first_seen,
                    last: r.last_seen,
                };
                (r.id.clone(), (seen, true))
            }));
        }
        all
    }

    /// Forgets the remembered raw affiliates that `keep` refuses.
    pub fn forget_raw(&self, keep: impl Fn(&str, &Seen) -> bool) {
        self.lock().remembered.retain(|id, seen| keep(id, seen));
    }

    /// The current resources plus every later change, with no gap between them.
    pub fn watch(
        &self,
        namespace: Namespace,
        kind: Kind,
    ) -> (Vec<Resource>, broadcast::Receiver<Change>) {
        let inner = self.lock();
        let receiver = self.changes.subscribe();
        let current = inner
            .tables
            .get(&(namespace, kind))
            .map(|t| t.values().cloned().collect())
            .unwrap_or_default();
        (current, receiver)
    }

    /// Wakes after changes in `cluster-raw`.
    pub fn raw_changes(&self) -> watch::Receiver<u64> {
        self.raw_generation.subscribe()
    }

    /// Creates or updates one resource; returns whether anything changed.
    pub fn put(&self, namespace: Namespace, id: &str, spec: Spec) -> bool {
        let kind = spec.kind();
        self.sync_where(
            namespace,
            kind,
            |existing| existing == id,
            [(id.to_string(), spec)],
        ) > 0
    }

    /// Removes one resource; returns whether it existed.
    pub fn remove(&self, namespace: Namespace, kind: Kind, id: &str) -> bool {
        self.sync_where(namespace, kind, |existing| existing == id, []) > 0
    }

    /// Makes the resources of one type whose ID starts with `prefix` exactly
    /// `desired` (IDs in `desired` must start with `prefix`). Returns the number
    /// of resources created, updated or destroyed.
    pub fn sync(
        &self,
        namespace: Namespace,
        kind: Kind,
        prefix: &str,
        desired: impl IntoIterator<Item = (String, Spec)>,
    ) -> usize {
        self.sync_where(namespace, kind, |id| id.starts_with(prefix), desired)
    }

    /// `sync` over the resources that `owned` selects.
    pub fn sync_where(
        &self,
        namespace: Namespace,
        kind: Kind,
        owned: impl Fn(&str) -> bool,
        desired: impl IntoIterator<Item = (String, Spec)>,
    ) -> usize {
        self.sync_inner(namespace, kind, owned, desired.into_iter().collect(), None)
    }

    /// A registry's publish: `sync` of `cluster-raw/<prefix>…`, where the first
    /// one that states anything since the start dates what it creates back to the
    /// start (unless remembered).
    fn sync_raw(&self, prefix: &str, desired: Vec<(String, Spec)>) -> usize {
        self.sync_inner(
            Namespace::ClusterRaw,
            Kind::Affiliate,
            |id| id.starts_with(prefix),
            desired,
            Some(prefix),
        )
    }

    /// `sync_where`, for a registry's publish when `publisher` is its prefix.
    fn sync_inner(
        &self,
        namespace: Namespace,
        kind: Kind,
        owned: impl Fn(&str) -> bool,
        desired: Vec<(String, Spec)>,
        publisher: Option<&str>,
    ) -> usize {
        let now = (self.clock)();
        let mut inner = self.lock();
        let Inner {
            tables,
            remembered,
            published,
        } = &mut *inner;
        // What new resources that are not remembered count as first seen.
        let created_at = match publisher {
            Some(prefix) if !desired.is_empty() && published.insert(prefix.to_owned()) => {
                self.started
            }
            _ => now,
        };
        // Only raw affiliates are remembered beyond their life.
        let remember = namespace == Namespace::ClusterRaw;
        let table = tables.entry((namespace, kind)).or_default();
        let notify = self.changes.receiver_count() > 0;
        let mut changes = 0;
        let mut wanted = HashSet::new();
        for (id, spec) in desired {
            debug_assert!(owned(&id), "{id} is outside the synced set");
            debug_assert_eq!(spec.kind(), kind);
            let change = match table.get_mut(&id) {
                Some(existing) if *existing.spec == spec => {
                    existing.last_seen = now;
                    None
                }
                Some(existing) => {
                    existing.version += 1;
                    existing.spec = Arc::new(spec);
                    existing.last_seen = now;
                    Some((ChangeKind::Updated, existing.clone()))
                }
                None => {
                    let first_seen = match remember.then(|| remembered.remove(&id)).flatten() {
                        // A remembered time from a clock that ran ahead is no later
                        // than now.
                        Some(seen) => seen.first.min(now),
                        None => created_at.min(now),
                    };
                    let resource = Resource {
                        namespace,
                        id: id.clone(),
                        version: 1,
                        spec: Arc::new(spec),
                        first_seen,
                        last_seen: now,
                    };
                    table.insert(id.clone(), resource.clone());
                    Some((ChangeKind::Created, resource))
                }
            };
            wanted.insert(id);
            if let Some((kind, resource)) = change {
                changes += 1;
                if notify {
                    let _ = self.changes.send(Change { kind, resource });
                }
            }
        }
        let stale: Vec<String> = table
            .keys()
            .filter(|id| owned(id) && !wanted.contains(*id))
            .cloned()
            .collect();
        for id in stale {
            if let Some(resource) = table.remove(&id) {
                changes += 1;
                if remember {
                    let seen = Seen {
                        first: resource.first_seen,
                        last: resource.last_seen,
                    };
                    remembered.insert(id, seen);
                }
                if notify {
                    let _ = self.changes.send(Change {
                        kind: ChangeKind::Destroyed,
                        resource,
                    });
                }
            }
        }
        if remember {
            bound_remembered(remembered);
        }
        if changes > 0 && namespace == Namespace::ClusterRaw {
            self.raw_generation.send_modify(|g| *g += 1);
        }
        changes
    }
}

/// Keeps at most `FIRST_SEEN_NODES_MAX` remembered raw affiliates, the most
/// recently seen: trimmed only when twice as many, so the cost is amortised.
fn bound_remembered(remembered: &mut HashMap<String, Seen>) {
    let max = limits::FIRST_SEEN_NODES_MAX;
    if remembered.len() <= 2 * max {
        return;
    }
    let mut lasts: Vec<SystemTime> = remembered.values().map(|s| s.last).collect();
    let (_, cutoff, _) = lasts.select_nth_unstable_by(max - 1, |a, b| b.cmp(a));
    let cutoff = *cutoff;
    remembered.retain(|_, s| s.last >= cutoff);
    // Equal times at the cutoff may leave a few more; drop those arbitrarily.
    let excess = remembered.len().saturating_sub(max);
    let extra: Vec<String> = remembered
        .iter()
        .filter(|(_, s)| s.last == cutoff)
        .map(|(id, _)| id.clone())
        .take(excess)
        .collect();
    for id in extra {
        remembered.remove(&id);
    }
}

/// Write access to one registry's raw affiliates, `cluster-raw/<prefix>/<node-id>`,
/// and to nothing else: what a plugin's host functions get instead of the store,
/// so the one-way flow (plugins → cluster-raw → merge → members) holds by type.
pub struct RawWriter {
    store: Arc<Store>,
    /// `<prefix>/`
    prefix: String,
}

impl RawWriter {
    pub fn new(store: Arc<Store>, prefix: &str) -> RawWriter {
        RawWriter {
            store,
            prefix: format!("{prefix}/"),
        }
    }

    /// Makes this registry's raw affiliates exactly `affiliates`; returns how
    /// many resources changed. Every affiliate stated counts as seen now, changed
    /// or not.
    pub fn publish(&self, affiliates: Vec<AffiliateSpec>) -> usize {
        let desired = affiliates
            .into_iter()
            .map(|spec| {
                (
                    format!("{}{}", self.prefix, spec.node_id),
                    Spec::Affiliate(spec),
                )
            })
            .collect();
        self.store.sync_raw(&self.prefix, desired)
    }

    /// Removes every raw affiliate of this registry; returns how many there were.
    pub fn withdraw(&self) -> usize {
        self.publish(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn affiliate(node_id: &str, hostname: &str) -> Spec {
        Spec::Affiliate(AffiliateSpec {
            node_id: node_id.into(),
            hostname: hostname.into(),
            ..Default::default()
        })
    }

    #[test]
    fn versions_grow_only_on_real_changes() {
        let store = Store::new();
        assert!(store.put(Namespace::Cluster, "a", affiliate("a", "h1")));
        assert!(!store.put(Namespace::Cluster, "a", affiliate("a", "h1")));
        assert!(store.put(Namespace::Cluster, "a", affiliate("a", "h2")));
        let a = store.get(Namespace::Cluster, Kind::Affiliate, "a").unwrap();
        assert_eq!(a.version, 2);
        assert!(
            store
                .get(Namespace::ClusterRaw, Kind::Affiliate, "a")
                .is_none()
        );
    }

    #[test]
    fn sync_touches_only_its_prefix() {
        let store = Store::new();
        let raw = Namespace::ClusterRaw;
        store.sync(
            raw,
            Kind::Affiliate,
            "k8s/",
            [("k8s/a".into(), affiliate("a", "x"))],
        );
        let n = store.sync(
            raw,
            Kind::Affiliate,
            "static/",
            [
                ("static/a".into(), affiliate("a", "x")),
                ("static/b".into(), affiliate("b", "y")),
            ],
        );
        assert_eq!(n, 2);
        let n = store.sync(
            raw,
            Kind::Affiliate,
            "static/",
            [("static/b".into(), affiliate("b", "y"))],
        );
        assert_eq!(n, 1, "only static/a is destroyed");
        let ids: Vec<String> = store
            .list(raw, Kind::Affiliate)
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, ["k8s/a", "static/b"]);
    }

    #[tokio::test]
    async fn watchers_get_a_snapshot_then_every_change_in_order() {
        let store = Store::new();
        store.put(Namespace::Cluster, "a", affiliate("a", "h1"));
        let (snapshot, mut changes) = store.watch(Namespace::Cluster, Kind::Affiliate);
        assert_eq!(snapshot.len(), 1);
        store.put(Namespace::Cluster, "b", affiliate("b", "h1"));
        store.put(Namespace::Cluster, "a", affiliate("a", "h2"));
        store.remove(Namespace::Cluster, Kind::Affiliate, "b");
        let mut seen = Vec::new();
        for _ in 0..3 {
            let change = changes.recv().await.unwrap();
            seen.push((change.kind, change.resource.id, change.resource.version));
        }
        assert_eq!(
            seen,
            [
                (ChangeKind::Created, "b".to_string(), 1),
                (ChangeKind::Updated, "a".to_string(), 2),
                (ChangeKind::Destroyed, "b".to_string(), 1),
            ]
        );
    }

    #[test]
    fn a_raw_writer_writes_only_under_its_prefix() {
        let store = Store::new();
        store.put(Namespace::ClusterRaw, "k8s/a", affiliate("a", "x"));
        store.put(Namespace::Cluster, "a", affiliate("a", "x"));
        let writer = RawWriter::new(store.clone(), "static");
        let spec = |id: &str| AffiliateSpec {
            node_id: id.into(),
            ..Default::default()
        };
        assert_eq!(writer.publish(vec![spec("a"), spec("b")]), 2);
        let raw: Vec<String> = store
            .list(Namespace::ClusterRaw, Kind::Affiliate)
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(raw, ["k8s/a", "static/a", "static/b"]);
        assert_eq!(writer.withdraw(), 2);
        assert_eq!(store.list(Namespace::ClusterRaw, Kind::Affiliate).len(), 1);
        assert_eq!(store.list(Namespace::Cluster, Kind::Affiliate).len(), 1);
    }

    /// A store on a clock the test sets, in seconds since the epoch.
    fn store_at(start: u64) -> (Arc<Store>, Arc<std::sync::atomic::AtomicU64>) {
        use std::sync::atomic::{AtomicU64, Ordering};
        let now = Arc::new(AtomicU64::new(start));
        let clock = now.clone();
        let store = Store::with_clock(Box::new(move || {
            SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(clock.load(Ordering::SeqCst))
        }));
        (Arc::new(store), now)
    }

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(seconds)
    }

    fn set(clock: &std::sync::atomic::AtomicU64, seconds: u64) {
        clock.store(seconds, std::sync::atomic::Ordering::SeqCst);
    }

    fn raw(store: &Store, id: &str) -> Resource {
        store
            .get(Namespace::ClusterRaw, Kind::Affiliate, id)
            .unwrap()
    }

    fn spec(node_id: &str, hostname: &str) -> AffiliateSpec {
        AffiliateSpec {
            node_id: node_id.into(),
            hostname: hostname.into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn an_unchanged_republish_moves_last_seen_only() {
        let (store, clock) = store_at(10);
        let writer = RawWriter::new(store.clone(), "static");
        set(&clock, 100);
        writer.publish(vec![spec("a", "h")]);
        let (_, mut changes) = store.watch(Namespace::ClusterRaw, Kind::Affiliate);
        let mut merge = store.raw_changes();
        merge.borrow_and_update();

        set(&clock, 200);
        assert_eq!(writer.publish(vec![spec("a", "h")]), 0, "no change");
        let a = raw(&store, "static/a");
        assert_eq!((a.version, a.last_seen), (1, at(200)));
        assert!(
            matches!(
                changes.try_recv(),
                Err(broadcast::error::TryRecvError::Empty)
            ),
            "no watcher is woken"
        );
        assert!(!merge.has_changed().unwrap(), "nor the merge");

        // A real change is one: a new version, an event, and first-seen stays.
        set(&clock, 300);
        assert_eq!(writer.publish(vec![spec("a", "h2")]), 1);
        let a = raw(&store, "static/a");
        assert_eq!((a.version, a.last_seen), (2, at(300)));
        let change = changes.try_recv().unwrap();
        assert_eq!(change.kind, ChangeKind::Updated);
        assert_eq!(change.resource.last_seen, at(300));
        assert!(merge.has_changed().unwrap());
        assert_eq!(a.first_seen, at(10), "dated back to the start: see below");
    }

    #[test]
    fn a_registrys_first_publish_dates_back_to_the_start() {
        let (store, clock) = store_at(10);
        let first = RawWriter::new(store.clone(), "k8s");
        let second = RawWriter::new(store.clone(), "static");
        set(&clock, 50);
        // An empty publish is no view yet: what comes next is the first.
        second.publish(vec![]);
        first.publish(vec![spec("a", "h")]);
        set(&clock, 60);
        second.publish(vec![spec("a", "h")]);
        set(&clock, 70);
        first.publish(vec![spec("a", "h"), spec("b", "h")]);
        let seen = |id| {
            let r = raw(&store, id);
            (r.first_seen, r.last_seen)
        };
        assert_eq!(seen("k8s/a"), (at(10), at(70)));
        assert_eq!(seen("static/a"), (at(10), at(60)));
        assert_eq!(seen("k8s/b"), (at(70), at(70)), "later news is dated now");
        // Other writers (the merge's own) date what they create now.
        store.put(Namespace::Cluster, "a", affiliate("a", "h"));
        let merged = store.get(Namespace::Cluster, Kind::Affiliate, "a").unwrap();
        assert_eq!(merged.first_seen, at(70));
    }

    #[test]
    fn a_withdrawn_affiliate_that_comes_back_keeps_its_first_seen() {
        let (store, clock) = store_at(10);
        let writer = RawWriter::new(store.clone(), "static");
        writer.publish(vec![spec("z", "h")]);
        set(&clock, 100);
        writer.publish(vec![spec("a", "h")]);
        set(&clock, 200);
        assert_eq!(writer.withdraw(), 1);
        let remembered = store.raw_sightings();
        assert_eq!(
            remembered["static/a"],
            (
                Seen {
                    first: at(100),
                    last: at(100)
                },
                false
            )
        );
        set(&clock, 300);
        writer.publish(vec![spec("a", "h")]);
        let a = raw(&store, "static/a");
        assert_eq!((a.first_seen, a.last_seen), (at(100), at(300)));
        assert!(store.raw_sightings()["static/a"].1, "exists again");
    }

    #[test]
    fn remembered_times_seed_what_registries_report_after_a_restart() {
        let (store, clock) = store_at(1000);
        let seen = |first, last| Seen {
            first: at(first),
            last: at(last),
        };
        store.remember_raw([
            ("static/a".to_string(), seen(100, 900)),
            // A clock that ran ahead must not date anything into the future.
            ("static/b".to_string(), seen(5000, 5000)),
        ]);
        // Seeding twice keeps the first seed.
        store.remember_raw([("static/a".to_string(), seen(500, 950))]);
        set(&clock, 1100);
        let writer = RawWriter::new(store.clone(), "static");
        writer.publish(vec![spec("a", "h"), spec("b", "h"), spec("c", "h")]);
        assert_eq!(raw(&store, "static/a").first_seen, at(100));
        assert_eq!(raw(&store, "static/b").first_seen, at(1100));
        assert_eq!(raw(&store, "static/c").first_seen, at(1000), "the start");
        // An existing resource keeps its times.
        store.remember_raw([("static/a".to_string(), seen(1, 1))]);
        assert_eq!(raw(&store, "static/a").first_seen, at(100));
        store.forget_raw(|_, _| false);
        assert!(store.raw_sightings().values().all(|(_, exists)| *exists));
    }

    #[test]
    fn remembered_affiliates_are_bounded_keeping_the_latest() {
        let (store, _) = store_at(10);
        let max = limits::FIRST_SEEN_NODES_MAX as u64;
        store.remember_raw((0..2 * max + 1).map(|i| {
            let seen = Seen {
                first: at(i),
                last: at(i),
            };
            (format!("static/n{i}"), seen)
        }));
        let remembered = store.raw_sightings();
        assert_eq!(remembered.len() as u64, max);
        assert!(remembered.contains_key(&format!("static/n{}", 2 * max)));
        assert!(!remembered.contains_key(&format!("static/n{max}")));
    }

    #[tokio::test]
    async fn raw_changes_wake_the_merge() {
        let store = Store::new();
        let raw = store.raw_changes();
        store.put(Namespace::Cluster, "a", affiliate("a", "h"));
        assert!(!raw.has_changed().unwrap());
        store.put(Namespace::ClusterRaw, "static/a", affiliate("a", "h"));
        assert!(raw.has_changed().unwrap());
    }
}
