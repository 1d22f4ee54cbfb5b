//! In-memory state: cluster ID → [`Cluster`] (reference §4.7).
//!
//! The map is sharded ([`DashMap`]) and each cluster has its own lock, so the update path
//! takes no global lock: a shard lock is held only to find or insert the cluster's `Arc`,
//! never while a cluster is locked. GC removes a cluster only when it is empty and
//! unwatched, marking it removed under its own lock so a writer that raced with the
//! removal retries on a fresh cluster instead of writing into a detached one.

pub mod affiliate;
pub mod cluster;
pub mod gc;
pub mod subscription;

use std::sync::Arc;
use std::time::Instant;

use dashmap::DashMap;

pub use affiliate::{Affiliate, Blob, DroppedEndpoints, Endpoint};
pub use cluster::{Affiliates, Change, Cluster, ClusterCounts, Update, WriteView};
pub use gc::GcReport;
pub use subscription::{AffiliateView, Burst, Lost, Notification, StallClock, Subscription};

/// Errors of the state layer; the messages are part of the wire contract (§4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("too many affiliates in the cluster")]
    TooManyAffiliates,
    #[error("too many endpoints in the affiliate")]
    TooManyEndpoints,
}

/// A snapshot import found the same cluster twice.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cluster {0:?} already exists")]
pub struct DuplicateCluster(pub String);

/// What [`State::import_cluster`] kept, and how many affiliates it dropped past the
/// cluster limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Imported {
    pub affiliates: usize,
    pub endpoints: usize,
    pub over_limit: usize,
}

/// Cheap-to-clone handle to the shared state.
#[derive(Debug, Clone, Default)]
pub struct State {
    clusters: Arc<DashMap<Box<str>, Arc<Cluster>>>,
}

impl State {
    pub fn new() -> Self {
        Self::default()
    }

    fn get(&self, id: &str) -> Option<Arc<Cluster>> {
        self.clusters.get(id).map(|c| c.value().clone())
    }

    fn get_or_create(&self, id: &str) -> Arc<Cluster> {
        if let Some(c) = self.get(id) {
            return c;
        }
        self.clusters.entry(id.into()).or_default().value().clone()
    }

    /// Applies an update whose new entries expire at `exp` (request time + TTL);
    /// creates the cluster if needed.
    pub fn update(&self, cluster_id: &str, u: &Update<'_>, exp: Instant) -> Result<(), StateError> {
        // Repeats go before the cluster lock is taken (a request can carry millions).
        let endpoints = affiliate::distinct_endpoints(u.endpoints);
        let u = Update {
            endpoints: &endpoints,
            ..u.clone()
        };
        loop {
            if let Ok(result) = self.get_or_create(cluster_id).update(&u, exp) {
                return result;
            }
        }
    }

    /// Deletes an affiliate. Unlike upstream, a missing cluster is not created (Q5).
    pub fn delete(&self, cluster_id: &str, affiliate_id: &str) {
        if let Some(c) = self.get(cluster_id) {
            c.delete(affiliate_id);
        }
    }

    /// Lists a cluster's affiliates; a missing cluster is empty and is not created (Q5).
    pub fn list(&self, cluster_id: &str) -> Vec<AffiliateView> {
        without_revisions(self.list_stored(cluster_id))
    }

    /// [`Self::list`], each affiliate with the etcd revision it was last written at
    /// (etcd backend's mirror, whose views have no data yet).
    pub fn list_stored(&self, cluster_id: &str) -> Vec<(AffiliateView, i64)> {
        self.get(cluster_id).map(|c| c.list()).unwrap_or_default()
    }

    /// Snapshot plus subscription, atomically; creates the cluster so the subscription
    /// keeps it alive.
    pub fn watch(&self, cluster_id: &str, capacity: usize) -> (Vec<AffiliateView>, Subscription) {
        let (snapshot, subscription) = self.subscribe(cluster_id, capacity, StallClock::Now);
        (without_revisions(snapshot), subscription)
    }

    /// [`Self::watch`] for the etcd backend's mirror: the snapshot's affiliates with
    /// their revisions as from [`Self::list_stored`], their data still to be read, so
    /// the watcher's stall clock starts at its first receive.
    pub fn watch_stored(
        &self,
        cluster_id: &str,
        capacity: usize,
    ) -> (Vec<(AffiliateView, i64)>, Subscription) {
        self.subscribe(cluster_id, capacity, StallClock::FirstReceive)
    }

    fn subscribe(
        &self,
        cluster_id: &str,
        capacity: usize,
        clock: StallClock,
    ) -> (Vec<(AffiliateView, i64)>, Subscription) {
        loop {
            if let Ok(pair) = self
                .get_or_create(cluster_id)
                .subscribe_with(capacity, clock)
            {
                return pair;
            }
        }
    }

    /// Applies one etcd revision's changes to a cluster (etcd backend's mirror), as
    /// part of `burst` (every revision of one watch response); `data_of` gives the data
    /// of an affiliate whose key the revision did not write ([`Cluster::apply`]).
    /// Returns whether the cluster's watchers were ended for want of it.
    pub fn apply<'c, I>(
        &self,
        cluster_id: &str,
        changes: I,
        burst: Burst,
        data_of: &dyn Fn(&str) -> Option<bytes::Bytes>,
    ) -> bool
    where
        I: IntoIterator<Item = Change<&'c str>>,
        I::IntoIter: Clone,
    {
        let changes = changes.into_iter();
        loop {
            if let Ok(cut) = self
                .get_or_create(cluster_id)
                .apply(changes.clone(), burst, data_of)
            {
                return cut;
            }
        }
    }

    /// Replaces every cluster with a full read of etcd, ending every subscription
    /// (etcd backend's mirror, on start and after falling behind compaction).
    pub fn reset_all(&self, mut clusters: std::collections::HashMap<String, (Affiliates, i64)>) {
        for (id, cluster) in self.clusters() {
            let (affiliates, guard) = clusters.remove(&id).unwrap_or_default();
            // A cluster GC removed meanwhile has no subscribers left to end.
            if let Err(back) = cluster.reset(affiliates, guard)
                && (!back.is_empty() || guard != 0)
            {
                clusters.insert(id, (back, guard));
            }
        }
        for (id, (mut affiliates, guard)) in clusters {
            // GC may remove the cluster again before it is reset: it hands them back.
            while let Err(back) = self.get_or_create(&id).reset(affiliates, guard) {
                affiliates = back;
            }
        }
    }

    /// What an etcd update is planned from; never creates state.
    pub fn write_view(&self, cluster_id: &str, affiliate_id: &str) -> WriteView {
        self.get(cluster_id)
            .map(|c| c.write_view(affiliate_id))
            .unwrap_or_default()
    }

    /// Read-only access to one cluster, for `/inspect`; never creates state (Q26).
    pub fn cluster(&self, cluster_id: &str) -> Option<Arc<Cluster>> {
        self.get(cluster_id)
    }

    /// A point-in-time list of the clusters, so callers can lock them one at a time
    /// without holding any shard lock.
    /// Applies `f` to every expiry of every affiliate ([`Affiliate::map_expiries`]).
    pub fn map_expiries(&self, f: impl Fn(Instant) -> Instant) {
        for (_, c) in self.clusters() {
            c.map_expiries(&f);
        }
    }

    pub fn clusters(&self) -> Vec<(String, Arc<Cluster>)> {
        self.clusters
            .iter()
            .map(|e| (e.key().to_string(), e.value().clone()))
            .collect()
    }

    pub fn cluster_count(&self) -> usize {
        self.clusters.len()
    }

    /// Totals over every cluster, computed on demand (metrics are scraped, not pushed).
    pub fn counts(&self) -> ClusterCounts {
        let mut total = ClusterCounts::default();
        // The clusters first, so no shard lock is held while each is locked.
        let clusters: Vec<Arc<Cluster>> = self.clusters.iter().map(|e| e.value().clone()).collect();
        for c in clusters {
            total += c.counts();
        }
        total
    }

    /// Inserts a cluster decoded from a snapshot. The cluster is visible as soon as it
    /// is inserted, so a later decode error keeps what was loaded before it (Q4). At
    /// most [`CLUSTER_AFFILIATES_MAX`](crate::limits::CLUSTER_AFFILIATES_MAX) affiliates
    /// are kept, as for updates; the result says what was kept and what was dropped.
    pub fn import_cluster(
        &self,
        cluster_id: &str,
        affiliates: impl IntoIterator<Item = (String, Affiliate)>,
    ) -> Result<Imported, DuplicateCluster> {
        use dashmap::mapref::entry::Entry;
        let cluster = match self.clusters.entry(cluster_id.into()) {
            Entry::Occupied(_) => return Err(DuplicateCluster(cluster_id.to_owned())),
            Entry::Vacant(v) => v.insert(Arc::default()).value().clone(),
        };
        let over_limit = cluster.restore(affiliates);
        let counts = cluster.counts();
        Ok(Imported {
            affiliates: counts.affiliates,
            endpoints: counts.endpoints,
            over_limit,
        })
    }
}

fn without_revisions(views: Vec<(AffiliateView, i64)>) -> Vec<AffiliateView> {
    views.into_iter().map(|(v, _)| v).collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;

    fn up<'a>(id: &'a str, data: &'a [u8], eps: &'a [Bytes]) -> Update<'a> {
        Update {
            affiliate_id: id,
            data,
            endpoints: eps,
        }
    }

    #[test]
    fn reads_and_deletes_do_not_create_clusters() {
        let s = State::new();
        assert!(s.list("c").is_empty());
        s.delete("c", "af");
        assert!(s.cluster("c").is_none());
        assert_eq!(s.cluster_count(), 0);
    }

    #[test]
    fn update_then_endpoint_only_update_merges() {
        let s = State::new();
        let now = Instant::now();
        let e = |x: &str| Bytes::copy_from_slice(x.as_bytes());
        s.update(
            "c",
            &up("af1", b"data1", &[e("e1"), e("e2")]),
            now + Duration::from_secs(60),
        )
        .unwrap();
        s.update(
            "c",
            &up("af1", b"", &[e("e3"), e("e2")]),
            now + Duration::from_secs(60),
        )
        .unwrap();
        let l = s.list("c");
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].data, e("data1"));
        assert_eq!(l[0].endpoints, vec![e("e1"), e("e2"), e("e3")]);
    }

    /// Q9: 32 notifications may wait; with 32 waiting, the oldest for WATCH_STALL, the
    /// next change ends the watcher.
    #[test]
    fn a_watcher_may_fall_thirty_two_behind_and_a_stalled_one_is_ended() {
        use crate::limits::WATCH_BUFFER;
        assert_eq!(WATCH_BUFFER, 32, "the reference's watch buffer (§4.6, §10)");
        let s = State::new();
        let exp = Instant::now() + Duration::from_secs(60);
        let (snapshot, mut sub) = s.watch("c", WATCH_BUFFER);
        assert!(snapshot.is_empty());
        let data = |i: usize| format!("d{i}");
        for i in 0..32 {
            s.update("c", &up("af", data(i).as_bytes(), &[]), exp)
                .unwrap();
        }
        assert_eq!(s.counts().subscriptions, 1, "32 pending are fine");
        // All 32 are delivered, in order, and the watcher lives on.
        for i in 0..32 {
            let n = sub.try_recv().unwrap().expect("buffered");
            let Notification::Update(v) = &*n else {
                panic!("{n:?}")
            };
            assert_eq!(v.data, Bytes::from(data(i)));
        }
        assert_eq!(sub.try_recv(), Ok(None));
        // Fill it again, then one more.
        for i in 0..32 {
            s.update("c", &up("af", data(i).as_bytes(), &[]), exp)
                .unwrap();
        }
        assert_eq!(s.counts().subscriptions, 1);
        // A 33rd at once is not a stall (the watcher had no time to read).
        s.update("c", &up("af", b"33rd", &[]), exp).unwrap();
        assert_eq!(s.counts().subscriptions, 1);
        let stalled = Burst::at(Instant::now() + crate::limits::WATCH_STALL);
        let change = Change::PutAffiliate {
            id: "af",
            data: Bytes::from_static(b"34th"),
            data_set: true,
            expiry: exp,
            revision: 0,
        };
        s.apply("c", [change], stalled, &|_| None);
        assert_eq!(s.counts().subscriptions, 0, "the stall dropped the watcher");
        // Lost at once, although 33 notifications are still buffered (Q9).
        assert_eq!(sub.try_recv(), Err(Lost));
    }

    #[test]
    fn import_keeps_the_first_affiliates_up_to_the_cluster_limit() {
        use crate::limits::CLUSTER_AFFILIATES_MAX;
        let s = State::new();
        let exp = Instant::now() + Duration::from_secs(60);
        let affiliates = (0..CLUSTER_AFFILIATES_MAX + 10)
            .map(|i| (format!("af{i}"), Affiliate::new(exp)))
            // A repeated id replaces, it does not count twice.
            .chain([("af0".to_string(), Affiliate::new(exp))]);
        let imported = s.import_cluster("c", affiliates).unwrap();
        assert_eq!(
            imported,
            Imported {
                affiliates: CLUSTER_AFFILIATES_MAX,
                endpoints: 0,
                over_limit: 10,
            }
        );
        assert_eq!(s.counts().affiliates, CLUSTER_AFFILIATES_MAX);
        assert!(s.cluster("c").is_some());
        let ids: std::collections::HashSet<String> =
            s.list("c").into_iter().map(|a| a.id).collect();
        assert!(ids.contains("af1023") && !ids.contains("af1024"));
        // The cluster is full, as after updates: a new affiliate is refused.
        assert_eq!(
            s.update("c", &up("new", b"d", &[]), exp),
            Err(StateError::TooManyAffiliates)
        );
    }

    #[test]
    fn import_rejects_duplicate_cluster_and_keeps_the_first() {
        let s = State::new();
        let now = Instant::now();
        s.import_cluster("c", [("a".to_string(), Affiliate::new(now))])
            .unwrap();
        assert_eq!(
            s.import_cluster("c", []).unwrap_err().to_string(),
            "cluster \"c\" already exists"
        );
        assert_eq!(s.list("c").len(), 1);
    }
}
