//! A small in-memory resource store in the manner of Talos's: resources live in a
//! namespace (`cluster`, `cluster-raw`), have a type and an ID, carry a version that
//! grows on every real change, and can be watched.
//!
//! Writers state what they want (`sync`), the store works out the difference, so
//! an unchanged spec never bumps a version or wakes a watcher.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{broadcast, watch};

use crate::limits;
use crate::specs::{AffiliateSpec, IdentitySpec, MemberSpec};

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
}

impl Kind {
    pub fn type_name(self) -> &'static str {
        match self {
            Kind::Identity => "Identities.cluster.talos.dev",
            Kind::Affiliate => "Affiliates.cluster.talos.dev",
            Kind::Member => "Members.cluster.talos.dev",
        }
    }

    pub fn from_type_name(name: &str) -> Option<Kind> {
        [Kind::Identity, Kind::Affiliate, Kind::Member]
            .into_iter()
            .find(|k| k.type_name() == name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Spec {
    Identity(IdentitySpec),
    Affiliate(AffiliateSpec),
    Member(MemberSpec),
}

impl Spec {
    pub fn kind(&self) -> Kind {
        match self {
            Spec::Identity(_) => Kind::Identity,
            Spec::Affiliate(_) => Kind::Affiliate,
            Spec::Member(_) => Kind::Member,
        }
    }

    /// The spec as Talos prints it (camelCase keys).
    pub fn to_json(&self) -> serde_json::Value {
        let value = match self {
            Spec::Identity(s) => serde_json::to_value(s),
            Spec::Affiliate(s) => serde_json::to_value(s),
            Spec::Member(s) => serde_json::to_value(s),
        };
        value.expect("specs serialize to JSON")
    }
}

#[derive(Clone, Debug)]
pub struct Resource {
    pub namespace: Namespace,
    pub id: String,
    pub version: u64,
    pub spec: Arc<Spec>,
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

type Table = BTreeMap<String, Resource>;

pub struct Store {
    tables: Mutex<BTreeMap<(Namespace, Kind), Table>>,
    changes: broadcast::Sender<Change>,
    /// Bumped after every change in `cluster-raw`: the merge waits on it.
    raw_generation: watch::Sender<u64>,
}

impl Default for Store {
    fn default() -> Self {
        Store {
            tables: Mutex::new(BTreeMap::new()),
            changes: broadcast::channel(limits::STORE_WATCH_BUFFER).0,
            raw_generation: watch::channel(0).0,
        }
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

    fn lock(&self) -> MutexGuard<'_, BTreeMap<(Namespace, Kind), Table>> {
        // A panic while holding the lock leaves consistent data (every write is a
        // single map operation), so a poisoned lock is still usable.
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every resource of one type in one namespace, sorted by ID.
    pub fn list(&self, namespace: Namespace, kind: Kind) -> Vec<Resource> {
        self.lock()
            .get(&(namespace, kind))
            .map(|t| t.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn get(&self, namespace: Namespace, kind: Kind, id: &str) -> Option<Resource> {
        self.lock()
            .get(&(namespace, kind))
            .and_then(|t| t.get(id).cloned())
    }

    /// The current resources plus every later change, with no gap between them.
    pub fn watch(
        &self,
        namespace: Namespace,
        kind: Kind,
    ) -> (Vec<Resource>, broadcast::Receiver<Change>) {
        let tables = self.lock();
        let receiver = self.changes.subscribe();
        let current = tables
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
        let mut tables = self.lock();
        let table = tables.entry((namespace, kind)).or_default();
        let notify = self.changes.receiver_count() > 0;
        let mut changes = 0;
        let mut wanted = std::collections::HashSet::new();
        for (id, spec) in desired {
            debug_assert!(owned(&id), "{id} is outside the synced set");
            debug_assert_eq!(spec.kind(), kind);
            let change = match table.get_mut(&id) {
                Some(existing) if *existing.spec == spec => None,
                Some(existing) => {
                    existing.version += 1;
                    existing.spec = Arc::new(spec);
                    Some((ChangeKind::Updated, existing.clone()))
                }
                None => {
                    let resource = Resource {
                        namespace,
                        id: id.clone(),
                        version: 1,
                        spec: Arc::new(spec),
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
                if notify {
                    let _ = self.changes.send(Change {
                        kind: ChangeKind::Destroyed,
                        resource,
                    });
                }
            }
        }
        if changes > 0 && namespace == Namespace::ClusterRaw {
            self.raw_generation.send_modify(|g| *g += 1);
        }
        changes
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
    /// many resources changed.
    pub fn publish(&self, affiliates: Vec<AffiliateSpec>) -> usize {
        let desired = affiliates.into_iter().map(|spec| {
            (
                format!("{}{}", self.prefix, spec.node_id),
                Spec::Affiliate(spec),
            )
        });
        self.store.sync(
            Namespace::ClusterRaw,
            Kind::Affiliate,
            &self.prefix,
            desired,
        )
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
