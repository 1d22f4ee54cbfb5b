//! One cluster: its affiliates and its watchers behind one lock (reference §4.4–§4.8).
//!
//! Every mutation and its notifications happen under the cluster's lock, so watchers see
//! changes in mutation order and a subscription taken together with the snapshot misses
//! nothing and sees nothing twice. The lock is a `std::sync::Mutex`: critical sections
//! are short, never await, and clusters never contend with each other.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::Bytes;

use super::StateError;
use super::affiliate::{Affiliate, Blob, Collected, Endpoint};
use super::subscription::{
    self, AffiliateView, Burst, Notification, StallClock, Subscriber, Subscription,
};
use crate::limits::CLUSTER_AFFILIATES_MAX;

/// An update as the state layer sees it, already validated by the RPC layer.
#[derive(Debug, Clone, Default)]
pub struct Update<'a> {
    pub affiliate_id: &'a str,
    /// Empty means "no data" (presence is ignored, as upstream).
    pub data: &'a [u8],
    pub endpoints: &'a [Bytes],
}

/// Counts of what one GC pass over a cluster removed and what remains.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ClusterCounts {
    pub affiliates: usize,
    pub endpoints: usize,
    pub subscriptions: usize,
}

impl std::ops::AddAssign for ClusterCounts {
    fn add_assign(&mut self, n: ClusterCounts) {
        self.affiliates += n.affiliates;
        self.endpoints += n.endpoints;
        self.subscriptions += n.subscriptions;
    }
}

/// One change of a cluster read back from etcd, decoded (etcd backend's mirror),
/// naming its affiliate by `Id`: the state applies changes whose ids are borrowed
/// (`&str`, from the applier's buffer of a whole watch response), so applying
/// allocates nothing per change beyond what the state keeps.
#[derive(Debug, Clone)]
pub enum Change<Id> {
    /// The affiliate's key was written: its whole stored value.
    PutAffiliate {
        id: Id,
        data: Bytes,
        /// The write carried data: watchers are told even if nothing else changed.
        data_set: bool,
        expiry: Instant,
        revision: i64,
    },
    DeleteAffiliate {
        id: Id,
    },
    PutEndpoint {
        id: Id,
        blob: Blob,
        expiry: Instant,
        ordinal: u16,
    },
    DeleteEndpoint {
        id: Id,
        blob: Blob,
    },
    Guard {
        revision: i64,
    },
}

impl<Id> Change<Id> {
    /// The affiliate it changes (none for the cluster's guard).
    fn affiliate(&self) -> Option<&Id> {
        match self {
            Change::PutAffiliate { id, .. }
            | Change::DeleteAffiliate { id }
            | Change::PutEndpoint { id, .. }
            | Change::DeleteEndpoint { id, .. } => Some(id),
            Change::Guard { .. } => None,
        }
    }

    /// The same change, its id named by `f` (the data is shared, not copied).
    pub fn map_id<J>(&self, f: impl FnOnce(&Id) -> J) -> Change<J> {
        match self {
            Change::PutAffiliate {
                id,
                data,
                data_set,
                expiry,
                revision,
            } => Change::PutAffiliate {
                id: f(id),
                data: data.clone(),
                data_set: *data_set,
                expiry: *expiry,
                revision: *revision,
            },
            Change::DeleteAffiliate { id } => Change::DeleteAffiliate { id: f(id) },
            Change::PutEndpoint {
                id,
                blob,
                expiry,
                ordinal,
            } => Change::PutEndpoint {
                id: f(id),
                blob: *blob,
                expiry: *expiry,
                ordinal: *ordinal,
            },
            Change::DeleteEndpoint { id, blob } => Change::DeleteEndpoint {
                id: f(id),
                blob: *blob,
            },
            Change::Guard { revision } => Change::Guard {
                revision: *revision,
            },
        }
    }
}

/// What an update transaction is planned from: the affiliate as the mirror holds it
/// and the cluster's size, with the revisions that make the plan conditional.
#[derive(Debug, Clone, Default)]
pub struct WriteView {
    pub affiliates: usize,
    pub guard_revision: i64,
    pub current: Option<Affiliate>,
}

/// An affiliate past its expiry, or some of its endpoints past theirs
/// ([`Cluster::overdue`]).
#[derive(Debug, Clone)]
pub struct Overdue {
    pub id: Box<str>,
    /// etcd's modification revision of the affiliate's key, as the mirror holds it.
    pub revision: i64,
    /// The overdue endpoints of a live affiliate; empty when the whole affiliate is.
    pub endpoints: Vec<Endpoint>,
}

/// The cluster was removed by GC after the caller looked it up; look it up again.
#[derive(Debug)]
pub(super) struct Removed;

/// A cluster's affiliates by id.
pub type Affiliates = HashMap<Box<str>, Affiliate>;

#[derive(Debug, Default)]
struct Inner {
    affiliates: Affiliates,
    subscribers: Vec<Subscriber>,
    next_subscriber: u64,
    /// Set by GC under the lock when the cluster leaves the map, so a writer that found
    /// it just before can retry instead of writing into a detached cluster.
    removed: bool,
    /// etcd's modification revision of the cluster's guard key (etcd backend only):
    /// creating an affiliate is conditional on it, so two replicas cannot both add the
    /// 1024th.
    guard_revision: i64,
}

impl Inner {
    fn views(&self) -> Vec<(AffiliateView, i64)> {
        let views = self.affiliates.iter();
        views.map(|(id, a)| (view(id, a), a.revision())).collect()
    }

    fn notify(&mut self, n: Notification, burst: Burst) {
        if self.subscribers.is_empty() {
            return;
        }
        let n = Arc::new(n);
        self.subscribers.retain_mut(|s| s.deliver(&n, burst));
    }
}

#[derive(Debug, Default)]
pub struct Cluster {
    inner: Mutex<Inner>,
}

fn view(id: &str, a: &Affiliate) -> AffiliateView {
    view_with(id, a, a.data().clone())
}

/// The affiliate as clients see it, with `data` (the etcd mirror holds none).
fn view_with(id: &str, a: &Affiliate, data: Bytes) -> AffiliateView {
    AffiliateView {
        id: id.to_owned(),
        data,
        endpoints: a.endpoint_blobs(),
    }
}

impl Cluster {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing panics while holding the lock; if something ever did, the data is
        // still consistent per affiliate, so keep serving rather than poison the cluster.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn live(&self) -> Result<MutexGuard<'_, Inner>, Removed> {
        let inner = self.lock();
        if inner.removed {
            Err(Removed)
        } else {
            Ok(inner)
        }
    }

    /// Applies an update (§4.4) with expiry `exp = now + ttl`. Limits are checked before
    /// anything changes, so a rejected request leaves no trace (Q6).
    pub(super) fn update(
        &self,
        u: &Update<'_>,
        exp: Instant,
    ) -> Result<Result<(), StateError>, Removed> {
        let mut inner = self.live()?;
        let created = match inner.affiliates.get(u.affiliate_id) {
            Some(a) => {
                if let Err(e) = a.check_endpoints(u.endpoints) {
                    return Ok(Err(e));
                }
                false
            }
            None => {
                if inner.affiliates.len() >= CLUSTER_AFFILIATES_MAX {
                    return Ok(Err(StateError::TooManyAffiliates));
                }
                let fresh = Affiliate::new(exp);
                if let Err(e) = fresh.check_endpoints(u.endpoints) {
                    return Ok(Err(e));
                }
                inner.affiliates.insert(u.affiliate_id.into(), fresh);
                true
            }
        };
        let watched = !inner.subscribers.is_empty();
        let Some(a) = inner.affiliates.get_mut(u.affiliate_id) else {
            return Ok(Ok(()));
        };
        let mut changed = created;
        if !u.data.is_empty() {
            a.set_data(u.data, exp);
            changed = true;
        }
        changed |= a.merge_endpoints(u.endpoints, exp);
        a.extend(exp);
        // Nobody to tell: no view to build.
        if changed && watched {
            let n = Notification::Update(view(u.affiliate_id, a));
            inner.notify(n, Burst::new());
        }
        Ok(Ok(()))
    }

    /// Removes an affiliate; a missing one is a silent success.
    pub fn delete(&self, affiliate_id: &str) {
        let mut inner = self.lock();
        if inner.affiliates.remove(affiliate_id).is_some() {
            inner.notify(Notification::Deleted(affiliate_id.to_owned()), Burst::new());
        }
    }

    /// Every affiliate, data-less ones included, in unspecified order, each with the
    /// etcd revision it was last written at (etcd mirror; 0 otherwise).
    pub fn list(&self) -> Vec<(AffiliateView, i64)> {
        self.lock().views()
    }

    /// Snapshot and subscription in one step under the lock: no gap, no duplicate. The
    /// snapshot's affiliates come with their revisions, as from [`Self::list`].
    #[cfg(test)]
    pub(super) fn subscribe(
        self: &Arc<Self>,
        capacity: usize,
    ) -> Result<(Vec<(AffiliateView, i64)>, Subscription), Removed> {
        self.subscribe_with(capacity, StallClock::Now)
    }

    pub(super) fn subscribe_with(
        self: &Arc<Self>,
        capacity: usize,
        clock: StallClock,
    ) -> Result<(Vec<(AffiliateView, i64)>, Subscription), Removed> {
        let mut inner = self.live()?;
        let snapshot = inner.views();
        let id = inner.next_subscriber;
        inner.next_subscriber += 1;
        let (subscriber, subscription) = subscription::channel(id, capacity, clock, self.clone());
        inner.subscribers.push(subscriber);
        Ok((snapshot, subscription))
    }

    pub(super) fn unsubscribe(&self, id: u64) {
        self.lock().subscribers.retain(|s| s.id != id);
    }

    /// Drops expired affiliates and endpoints at `now`; returns how many affiliates went.
    ///
    /// Upstream announces an affiliate that only lost endpoints as deleted (Q1), which
    /// makes clients drop a live peer; we send an update with what remains instead.
    pub fn collect(&self, now: Instant) -> usize {
        let mut inner = self.lock();
        let mut expired = Vec::new();
        let mut shrunk = Vec::new();
        for (id, a) in inner.affiliates.iter_mut() {
            match a.collect(now) {
                Collected::Unchanged => {}
                Collected::LostEndpoints => shrunk.push(view(id, a)),
                Collected::Expired => expired.push(id.clone()),
            }
        }
        for id in &expired {
            inner.affiliates.remove(id);
        }
        let burst = Burst::new();
        for v in shrunk {
            inner.notify(Notification::Update(v), burst);
        }
        for id in &expired {
            inner.notify(Notification::Deleted(id.to_string()), burst);
        }
        expired.len()
    }

    /// Applies the changes of one etcd revision, then tells watchers once per affiliate
    /// touched, as the memory backend does once per update: an intermediate state (the
    /// data before the endpoints written with it) is never seen.
    ///
    /// The mirror holds no data ([`Affiliate::set_stored`]): a notification takes its
    /// data from the revision's write of the affiliate key, or, when the revision
    /// changed only endpoints, from `data_of` (read from etcd at that revision). If
    /// that has none, the watchers are ended (they start again from a snapshot) rather
    /// than told a wrong affiliate; returns whether that happened.
    pub(super) fn apply<'c, I>(
        &self,
        changes: I,
        burst: Burst,
        data_of: &dyn Fn(&str) -> Option<Bytes>,
    ) -> Result<bool, Removed>
    where
        I: IntoIterator<Item = Change<&'c str>>,
        I::IntoIter: Clone,
    {
        let mut inner = self.live()?;
        // Affiliates touched, in first-touch order: (id, existed before, changed, the
        // data its key was written with here). Only watchers need them: with none,
        // nothing is tracked.
        let watched = !inner.subscribers.is_empty();
        let mut touched: Vec<(&str, bool, bool, Option<Bytes>)> = Vec::new();
        let mut rest = changes.into_iter();
        while let Some(c) = rest.next() {
            let t = match c.affiliate().copied() {
                Some(id) if watched => match touched.iter().position(|t| t.0 == id) {
                    Some(i) => Some(i),
                    None => {
                        touched.push((id, inner.affiliates.contains_key(id), false, None));
                        Some(touched.len() - 1)
                    }
                },
                _ => None,
            };
            let changed = match &c {
                Change::PutAffiliate {
                    id,
                    data,
                    data_set,
                    expiry,
                    revision,
                } => {
                    if let Some(t) = t {
                        touched[t].3 = Some(data.clone());
                    }
                    let created = match inner.affiliates.get_mut(*id) {
                        Some(a) => {
                            a.set_stored(*expiry, *revision);
                            false
                        }
                        None => {
                            let mut a = Affiliate::new(*expiry);
                            a.set_stored(*expiry, *revision);
                            // Its endpoints follow it in the transaction (after the
                            // guard): room for all of them at once, not one
                            // reallocation each.
                            let endpoints = rest
                                .clone()
                                .take_while(|c| match c {
                                    Change::Guard { .. } => true,
                                    Change::PutEndpoint { id: e, .. } => e == id,
                                    _ => false,
                                })
                                .filter(|c| matches!(c, Change::PutEndpoint { .. }))
                                .count();
                            a.reserve_endpoints(endpoints);
                            inner.affiliates.insert((*id).into(), a);
                            true
                        }
                    };
                    created || *data_set
                }
                Change::DeleteAffiliate { id } => {
                    inner.affiliates.remove(*id);
                    true
                }
                Change::PutEndpoint {
                    id,
                    blob,
                    expiry,
                    ordinal,
                } => {
                    // An endpoint outliving its affiliate is ignored, as on a resync.
                    inner
                        .affiliates
                        .get_mut(*id)
                        .is_some_and(|a| a.put_endpoint(*blob, *expiry, *ordinal))
                }
                Change::DeleteEndpoint { id, blob } => inner
                    .affiliates
                    .get_mut(*id)
                    .is_some_and(|a| a.remove_endpoint(blob)),
                Change::Guard { revision } => {
                    inner.guard_revision = *revision;
                    false
                }
            };
            if let Some(t) = t {
                touched[t].2 |= changed;
            }
        }
        for (id, existed, changed, data) in touched {
            if !changed {
                continue;
            }
            match inner.affiliates.get(id) {
                Some(a) => {
                    let Some(data) = data.or_else(|| data_of(id)) else {
                        for s in inner.subscribers.drain(..) {
                            s.cancel();
                        }
                        return Ok(true);
                    };
                    // A copy: the change's data is a slice of a whole etcd response,
                    // which a queued notification would otherwise keep.
                    let data = Bytes::copy_from_slice(&data);
                    let n = Notification::Update(view_with(id, a, data));
                    inner.notify(n, burst);
                }
                None if existed => inner.notify(Notification::Deleted(id.to_owned()), burst),
                None => {}
            }
        }
        Ok(false)
    }

    /// Replaces everything with what a full read of etcd returned and ends every
    /// subscription: changes between the old state and this one may be unknown (the
    /// mirror fell behind etcd's compaction), so watchers start again from a snapshot.
    /// Gives the affiliates back if GC removed the cluster meanwhile.
    pub(super) fn reset(
        &self,
        affiliates: Affiliates,
        guard_revision: i64,
    ) -> Result<(), Affiliates> {
        let Ok(mut inner) = self.live() else {
            return Err(affiliates);
        };
        inner.affiliates = affiliates;
        inner.guard_revision = guard_revision;
        for s in inner.subscribers.drain(..) {
            s.cancel();
        }
        Ok(())
    }

    /// What an etcd update of `affiliate_id` is planned from.
    pub fn write_view(&self, affiliate_id: &str) -> WriteView {
        let inner = self.lock();
        WriteView {
            affiliates: inner.affiliates.len(),
            guard_revision: inner.guard_revision,
            current: inner.affiliates.get(affiliate_id).cloned(),
        }
    }

    /// Marks the cluster removed if it has neither affiliates nor watchers; the caller
    /// takes it out of the map in the same step.
    pub(super) fn try_retire(&self) -> bool {
        let mut inner = self.lock();
        // A guard key still in etcd (etcd backend) keeps the cluster: creating an
        // affiliate is conditional on its revision, which the mirror must not forget.
        let empty = inner.affiliates.is_empty() && inner.guard_revision == 0;
        if inner.removed || (empty && inner.subscribers.is_empty()) {
            inner.removed = true;
            return true;
        }
        false
    }

    /// Applies `f` to every expiry of every affiliate ([`Affiliate::map_expiries`]).
    pub fn map_expiries(&self, f: impl Fn(Instant) -> Instant) {
        for a in self.lock().affiliates.values_mut() {
            a.map_expiries(&f);
        }
    }

    /// The guard revision of a cluster without affiliates whose guard key is still in
    /// etcd (etcd backend), for retiring that key.
    pub fn empty_guard(&self) -> Option<i64> {
        let inner = self.lock();
        (inner.affiliates.is_empty() && inner.guard_revision != 0).then_some(inner.guard_revision)
    }

    /// Affiliates, and endpoints of live affiliates, whose expiry is before `cutoff`
    /// (etcd backend: what a lease should have removed but has not), with what makes
    /// deleting them conditional. The expiry rules are [`Affiliate::collect`]'s.
    pub fn overdue(&self, cutoff: Instant) -> Vec<Overdue> {
        let inner = self.lock();
        let mut out = Vec::new();
        for (id, a) in &inner.affiliates {
            let endpoints: Vec<Endpoint> = if a.expired(cutoff) {
                Vec::new()
            } else {
                let e = a.endpoints().iter().filter(|e| e.expired(cutoff));
                let e: Vec<Endpoint> = e.cloned().collect();
                if e.is_empty() {
                    continue;
                }
                e
            };
            out.push(Overdue {
                id: id.clone(),
                revision: a.revision(),
                endpoints,
            });
        }
        out
    }

    /// Whether anyone watches the cluster.
    pub fn watched(&self) -> bool {
        !self.lock().subscribers.is_empty()
    }

    pub fn counts(&self) -> ClusterCounts {
        let inner = self.lock();
        ClusterCounts {
            affiliates: inner.affiliates.len(),
            endpoints: inner.affiliates.values().map(|a| a.endpoints().len()).sum(),
            subscriptions: inner.subscribers.len(),
        }
    }

    /// Runs `f` with every affiliate under one lock; the iterator can be walked twice
    /// (snapshot encoding sizes, then writes).
    pub fn with_affiliates<R>(
        &self,
        f: impl FnOnce(std::collections::hash_map::Iter<'_, Box<str>, Affiliate>) -> R,
    ) -> R {
        let inner = self.lock();
        f(inner.affiliates.iter())
    }

    /// Inserts restored affiliates under one lock, replacing any with the same id
    /// (snapshot load). As for updates, at most [`CLUSTER_AFFILIATES_MAX`] affiliates are
    /// kept: the first ones; returns how many new ones were dropped past the limit. The
    /// map is sized once and the ids are moved in, not copied.
    pub(super) fn restore(
        &self,
        affiliates: impl IntoIterator<Item = (String, Affiliate)>,
    ) -> usize {
        let affiliates = affiliates.into_iter();
        let mut inner = self.lock();
        let hint = affiliates.size_hint().0.min(CLUSTER_AFFILIATES_MAX);
        inner.affiliates.reserve(hint);
        let mut over_limit = 0;
        for (id, a) in affiliates {
            if inner.affiliates.len() >= CLUSTER_AFFILIATES_MAX
                && !inner.affiliates.contains_key(id.as_str())
            {
                over_limit += 1;
                continue;
            }
            inner.affiliates.insert(id.into_boxed_str(), a);
        }
        over_limit
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::limits::{WATCH_BURST_MAX, WATCH_STALL};

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn update(
        c: &Cluster,
        id: &str,
        data: &str,
        eps: &[&str],
        exp: Instant,
    ) -> Result<(), StateError> {
        let eps: Vec<Bytes> = eps.iter().map(|e| b(e)).collect();
        c.update(
            &Update {
                affiliate_id: id,
                data: data.as_bytes(),
                endpoints: &eps,
            },
            exp,
        )
        .unwrap()
    }

    /// A moved clock anchor moves the affiliate's expiry and every endpoint's alike.
    #[test]
    fn mapping_expiries_moves_the_affiliates_and_its_endpoints() {
        let c = Cluster::default();
        let t = Instant::now() + Duration::from_secs(3600);
        update(&c, "a", "d", &["x"], t).unwrap();
        update(&c, "a", "d", &["y"], t + Duration::from_secs(5)).unwrap();
        c.map_expiries(|e| e - Duration::from_secs(60));
        let a = c.write_view("a").current.unwrap();
        assert_eq!(
            a.expiry(),
            t + Duration::from_secs(5) - Duration::from_secs(60)
        );
        let eps: Vec<Instant> = a.endpoints().iter().map(|e| e.expiry).collect();
        assert_eq!(
            eps,
            [
                t - Duration::from_secs(60),
                t + Duration::from_secs(5) - Duration::from_secs(60)
            ]
        );
    }

    /// What is overdue follows GC's rules: an affiliate strictly after its expiry
    /// (then all of it), an endpoint of a live one at its own.
    #[test]
    fn overdue_names_expired_affiliates_whole_and_expired_endpoints_of_live_ones() {
        let c = Cluster::default();
        let t = Instant::now();
        let (soon, late) = (t + Duration::from_secs(1), t + Duration::from_secs(100));
        update(&c, "gone", "d", &["x"], soon).unwrap();
        update(&c, "alive", "d", &["old"], soon).unwrap();
        update(&c, "alive", "d", &["new"], late).unwrap();
        update(&c, "fresh", "d", &["e"], late).unwrap();
        let named = |cutoff: Instant| {
            let mut v: Vec<(String, Vec<String>)> = c
                .overdue(cutoff)
                .into_iter()
                .map(|o| {
                    let eps = o.endpoints.iter();
                    let eps = eps.map(|e| String::from_utf8_lossy(&e.blob).into_owned());
                    (o.id.into(), eps.collect())
                })
                .collect();
            v.sort();
            v
        };
        let s = |v: &str| v.to_owned();
        assert_eq!(
            named(t + Duration::from_secs(10)),
            [(s("alive"), vec![s("old")]), (s("gone"), vec![])]
        );
        assert_eq!(
            named(soon),
            [(s("alive"), vec![s("old")]), (s("gone"), vec![s("x")])]
        );
        assert!(named(t).is_empty());
    }

    fn upd(id: &str, data: &str, eps: &[&str]) -> Notification {
        Notification::Update(AffiliateView {
            id: id.into(),
            data: b(data),
            endpoints: eps.iter().map(|e| b(e)).collect(),
        })
    }

    fn drain(s: &mut Subscription) -> Vec<Notification> {
        let mut out = Vec::new();
        while let Ok(Some(n)) = s.try_recv() {
            out.push((*n).clone());
        }
        out
    }

    #[test]
    fn healthy_subscribers_get_every_notification_in_order_and_full_ones_are_cut() {
        let t0 = Instant::now();
        let exp = t0 + Duration::from_secs(60);
        let c = Arc::new(Cluster::default());
        let (snap, mut healthy) = c.subscribe(32).unwrap();
        assert!(snap.is_empty());
        let (_, mut tiny) = c.subscribe(1).unwrap();

        update(&c, "af1", "data1", &[], exp).unwrap();
        update(&c, "af2", "data2", &["e1"], exp).unwrap();
        update(&c, "af2", "", &["e2"], exp).unwrap();
        c.delete("af1");
        // What waits for `tiny` has waited a whole stall.
        c.apply(
            [put_aff("af3", "data3", true, exp, 9)],
            Burst::at(Instant::now() + WATCH_STALL),
            &no_data,
        )
        .unwrap();

        assert_eq!(
            drain(&mut healthy),
            vec![
                upd("af1", "data1", &[]),
                upd("af2", "data2", &["e1"]),
                upd("af2", "data2", &["e1", "e2"]),
                Notification::Deleted("af1".into()),
                upd("af3", "data3", &[]),
            ]
        );
        assert_eq!(tiny.try_recv().unwrap_err(), subscription::Lost);
        assert_eq!(
            c.counts().subscriptions,
            1,
            "the lost subscriber was removed"
        );
    }

    #[test]
    fn silent_refreshes_and_echoed_data_updates() {
        let t0 = Instant::now();
        let c = Arc::new(Cluster::default());
        update(&c, "af", "d", &["e1"], t0).unwrap();
        let (_, mut s) = c.subscribe(32).unwrap();
        // TTL-only refresh and re-sent endpoints are silent.
        update(&c, "af", "", &[], t0 + Duration::from_secs(5)).unwrap();
        update(&c, "af", "", &["e1"], t0 + Duration::from_secs(5)).unwrap();
        assert!(drain(&mut s).is_empty());
        // Identical data still notifies (Q10).
        update(&c, "af", "d", &[], t0).unwrap();
        assert_eq!(drain(&mut s), vec![upd("af", "d", &["e1"])]);
    }

    #[test]
    fn full_cluster_rejects_new_affiliates_but_updates_existing() {
        let t0 = Instant::now();
        let c = Arc::new(Cluster::default());
        for i in 0..CLUSTER_AFFILIATES_MAX {
            update(&c, &format!("af{i}"), "", &[], t0).unwrap();
        }
        assert_eq!(
            update(&c, "one-more", "d", &[], t0),
            Err(StateError::TooManyAffiliates)
        );
        update(&c, "af0", "d", &[], t0).unwrap();
        assert_eq!(c.counts().affiliates, CLUSTER_AFFILIATES_MAX);
    }

    #[test]
    fn too_many_endpoints_changes_nothing() {
        let t0 = Instant::now();
        let c = Arc::new(Cluster::default());
        let (_, mut s) = c.subscribe(32).unwrap();
        let many: Vec<String> = (0..65).map(|i| format!("e{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(
            update(&c, "af", "d", &many, t0),
            Err(StateError::TooManyEndpoints)
        );
        assert_eq!(
            c.counts().affiliates,
            0,
            "a rejected request creates nothing"
        );
        assert!(drain(&mut s).is_empty());
        update(&c, "af", "d", &many[..64], t0).unwrap();
        assert_eq!(
            update(&c, "af", "", &["e0", "x"], t0 + Duration::from_secs(9)),
            Err(StateError::TooManyEndpoints)
        );
        let listed = c.list();
        assert_eq!(listed[0].0.endpoints.len(), 64);
    }

    #[test]
    fn gc_sends_update_for_lost_endpoints_and_delete_for_expired_affiliates() {
        let t0 = Instant::now();
        let c = Arc::new(Cluster::default());
        update(&c, "af", "d", &["e1"], t0 + Duration::from_secs(10)).unwrap();
        update(&c, "af", "", &["e2"], t0 + Duration::from_secs(60)).unwrap();
        let (_, mut s) = c.subscribe(32).unwrap();
        assert_eq!(c.collect(t0 + Duration::from_secs(30)), 0);
        assert_eq!(drain(&mut s), vec![upd("af", "d", &["e2"])]);
        assert_eq!(c.collect(t0 + Duration::from_secs(61)), 1);
        assert_eq!(drain(&mut s), vec![Notification::Deleted("af".into())]);
    }

    #[test]
    fn snapshot_plus_notifications_always_equals_the_state() {
        // Subscribing while writers run: whatever the interleaving, a watcher that applies
        // its snapshot and then its notifications ends with exactly the final state: no
        // gap between snapshot and subscription, and no duplicate.
        let t0 = Instant::now();
        let c = Arc::new(Cluster::default());
        let writers: Vec<_> = (0..3)
            .map(|w| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for i in 0..300 {
                        let id = format!("af{}", i % 17);
                        if i % 5 == 4 {
                            c.delete(&id);
                        } else {
                            update(&c, &id, &format!("w{w}-{i}"), &[&format!("e{}", i % 7)], t0)
                                .unwrap();
                        }
                    }
                })
            })
            .collect();
        let mut watchers = Vec::new();
        for _ in 0..20 {
            watchers.push(c.subscribe(100_000).unwrap());
            std::thread::yield_now();
        }
        for w in writers {
            w.join().unwrap();
        }
        let mut want: Vec<AffiliateView> = c.list().into_iter().map(|(a, _)| a).collect();
        want.sort_by(|a, b| a.id.cmp(&b.id));
        for (snapshot, mut sub) in watchers {
            let mut view: std::collections::BTreeMap<String, AffiliateView> = snapshot
                .into_iter()
                .map(|(a, _)| (a.id.clone(), a))
                .collect();
            for n in drain(&mut sub) {
                match n {
                    Notification::Update(a) => {
                        view.insert(a.id.clone(), a);
                    }
                    Notification::Deleted(id) => {
                        view.remove(&id);
                    }
                }
            }
            assert_eq!(view.into_values().collect::<Vec<_>>(), want);
        }
    }

    #[test]
    fn retire_only_when_empty_and_unwatched() {
        let t0 = Instant::now();
        let c = Arc::new(Cluster::default());
        let (_, s) = c.subscribe(32).unwrap();
        assert!(!c.try_retire());
        drop(s);
        update(&c, "af", "", &[], t0).unwrap();
        assert!(!c.try_retire());
        c.delete("af");
        assert!(c.try_retire());
        assert!(
            c.subscribe(32).is_err(),
            "a retired cluster refuses new work"
        );
    }

    /// What the applier passes when it read nothing from etcd.
    fn no_data(_: &str) -> Option<Bytes> {
        None
    }

    fn blob(s: &str) -> Blob {
        Blob::new(s.as_bytes()).unwrap()
    }

    fn put_aff<'a>(
        id: &'a str,
        data: &str,
        data_set: bool,
        exp: Instant,
        revision: i64,
    ) -> Change<&'a str> {
        Change::PutAffiliate {
            id,
            data: b(data),
            data_set,
            expiry: exp,
            revision,
        }
    }

    fn put_ep<'a>(id: &'a str, e: &str, exp: Instant) -> Change<&'a str> {
        Change::PutEndpoint {
            id,
            blob: blob(e),
            expiry: exp,
            ordinal: 0,
        }
    }

    #[test]
    fn one_etcd_revision_is_one_notification_per_affiliate_as_one_update_is() {
        let exp = Instant::now() + Duration::from_secs(60);
        let c = Arc::new(Cluster::default());
        let (_, mut sub) = c.subscribe(32).unwrap();
        // The transaction of one update: the affiliate, the guard, two endpoints.
        c.apply(
            [
                put_aff("af", "d", true, exp, 5),
                Change::Guard { revision: 5 },
                put_ep("af", "e1", exp),
                put_ep("af", "e2", exp),
            ],
            Burst::new(),
            &no_data,
        )
        .unwrap();
        assert_eq!(drain(&mut sub), vec![upd("af", "d", &["e1", "e2"])]);
        let v = c.write_view("af");
        assert_eq!((v.affiliates, v.guard_revision), (1, 5));
        assert_eq!(v.current.unwrap().revision(), 5);
        // A refresh without data or new endpoints is silent; with data it is not.
        c.apply(
            [put_aff("af", "d", false, exp, 6), put_ep("af", "e1", exp)],
            Burst::new(),
            &no_data,
        )
        .unwrap();
        assert_eq!(drain(&mut sub), vec![]);
        c.apply([put_aff("af", "d", true, exp, 7)], Burst::new(), &no_data)
            .unwrap();
        assert_eq!(drain(&mut sub), vec![upd("af", "d", &["e1", "e2"])]);
        // An endpoint's lease ends: an update with what remains (Q1), its data read
        // from etcd at that revision (the mirror holds none).
        let lost_e1 = [Change::DeleteEndpoint {
            id: "af",
            blob: blob("e1"),
        }];
        let read = |id: &str| (id == "af").then(|| b("d"));
        assert!(!c.apply(lost_e1.clone(), Burst::new(), &read).unwrap());
        assert_eq!(drain(&mut sub), vec![upd("af", "d", &["e2"])]);
        // The affiliate's lease ends with its last endpoint's: one deletion.
        c.apply(
            [
                Change::DeleteAffiliate { id: "af" },
                Change::DeleteEndpoint {
                    id: "af",
                    blob: blob("e2"),
                },
            ],
            Burst::new(),
            &no_data,
        )
        .unwrap();
        assert_eq!(drain(&mut sub), vec![Notification::Deleted("af".into())]);
        // An endpoint outliving its affiliate is ignored.
        c.apply([put_ep("af", "late", exp)], Burst::new(), &no_data)
            .unwrap();
        assert_eq!(drain(&mut sub), vec![]);
        assert!(c.list().is_empty());
    }

    /// The mirror holds no data: a change that did not write the affiliate's key is
    /// told with data read from etcd, and when that read failed the watchers are ended
    /// (they start again from a snapshot) rather than told an affiliate without data.
    #[test]
    fn watchers_are_ended_when_an_endpoint_change_has_no_data_to_tell() {
        let exp = Instant::now() + Duration::from_secs(60);
        let c = Arc::new(Cluster::default());
        c.apply(
            [
                put_aff("af", "d", true, exp, 5),
                put_ep("af", "e1", exp),
                put_ep("af", "e2", exp),
            ],
            Burst::new(),
            &no_data,
        )
        .unwrap();
        let (snapshot, mut sub) = c.subscribe(32).unwrap();
        assert_eq!(snapshot[0].0.data, b(""), "the mirror keeps no data");
        assert_eq!(snapshot[0].1, 5, "but the revision to read it at");
        let lost_e1 = [Change::DeleteEndpoint {
            id: "af",
            blob: blob("e1"),
        }];
        assert!(c.apply(lost_e1, Burst::new(), &no_data).unwrap());
        assert_eq!(sub.try_recv(), Err(subscription::Lost));
        assert_eq!(c.counts().subscriptions, 0);
        // The change itself was applied.
        assert_eq!(c.list()[0].0.endpoints, vec![b("e2")]);
    }

    /// One etcd watch response (here 40 revisions of one cluster) is one burst: a
    /// watcher with room when it began gets all of it, however many more than its
    /// buffer, and so does the next burst right after (the watcher had no time to read);
    /// one with a buffer's worth waiting, the oldest for WATCH_STALL, when a burst
    /// begins is cut.
    #[test]
    fn a_burst_reaches_a_watcher_that_was_not_behind_whole() {
        let exp = Instant::now() + Duration::from_secs(60);
        let c = Arc::new(Cluster::default());
        let (_, mut sub) = c.subscribe(32).unwrap();
        let ids: Vec<String> = (0..40).map(|i| format!("af{i}")).collect();
        let burst = Burst::new();
        for (i, id) in ids.iter().enumerate() {
            c.apply([put_aff(id, "d", true, exp, 2 + i as i64)], burst, &no_data)
                .unwrap();
        }
        let got = drain(&mut sub);
        assert_eq!(got.len(), 40);
        assert_eq!(got[39], upd("af39", "d", &[]));

        // Two bursts back to back: 40 waiting when the second begins, none read yet.
        let t = Instant::now();
        let burst = Burst::at(t);
        for (i, id) in ids.iter().enumerate() {
            c.apply(
                [put_aff(id, "e", true, exp, 50 + i as i64)],
                burst,
                &no_data,
            )
            .unwrap();
        }
        c.apply([put_aff("af0", "f", true, exp, 99)], Burst::at(t), &no_data)
            .unwrap();
        assert_eq!(c.counts().subscriptions, 1, "back to back is not behind");
        // 41 waiting, the oldest for a stall: cut.
        c.apply(
            [put_aff("af1", "g", true, exp, 100)],
            Burst::at(t + WATCH_STALL),
            &no_data,
        )
        .unwrap();
        assert_eq!(sub.try_recv(), Err(subscription::Lost));
        assert_eq!(c.counts().subscriptions, 0);
    }

    /// 40 writes of one affiliate as one burst beginning at `at`, from revision `from`.
    fn burst(at: Instant, from: i64, c: &Cluster) {
        let exp = Instant::now() + Duration::from_secs(60);
        let b = Burst::at(at);
        for i in 0..40 {
            c.apply([put_aff("af", "d", true, exp, from + i)], b, &no_data)
                .unwrap();
        }
    }

    /// What counts is the age of the oldest notification still unread: a backlog read
    /// in full is forgotten, and a fresh one, however large, is not a stall.
    #[test]
    fn a_watcher_is_judged_by_its_oldest_unread_notification() {
        let c = Arc::new(Cluster::default());
        let (_, mut sub) = c.subscribe(32).unwrap();
        let t = Instant::now();
        burst(t, 0, &c);
        assert_eq!(drain(&mut sub).len(), 40, "read in full");
        // Long after, two bursts back to back: 40 waiting, but fresh.
        burst(t + 2 * WATCH_STALL, 100, &c);
        burst(t + 2 * WATCH_STALL, 200, &c);
        assert_eq!(c.counts().subscriptions, 1);
        // 30 of them read, 50 waiting, the oldest for a whole stall now.
        for _ in 0..30 {
            sub.try_recv().unwrap().expect("waiting");
        }
        burst(t + 3 * WATCH_STALL, 300, &c);
        assert_eq!(sub.try_recv(), Err(subscription::Lost));
    }

    /// A watcher whose snapshot is still being completed (the etcd backend reads its
    /// data from etcd) is not behind, however long that takes and however much waits
    /// meanwhile: its stall clock starts at its first receive, and from then on it is
    /// judged as any other.
    #[test]
    fn a_watcher_is_judged_from_its_first_receive_when_its_snapshot_is_completed_first() {
        let c = Arc::new(Cluster::default());
        let (_, mut sub) = c.subscribe_with(32, StallClock::FirstReceive).unwrap();
        let (_, mut judged) = c.subscribe(32).unwrap();
        let t = Instant::now();
        burst(t, 0, &c);
        // Many stalls later, nothing received yet: only the watcher already judged is cut.
        burst(t + 10 * WATCH_STALL, 100, &c);
        assert_eq!(judged.try_recv(), Err(subscription::Lost));
        assert_eq!(c.counts().subscriptions, 1);
        // It begins receiving: 79 waiting, the oldest now fresh.
        sub.try_recv().unwrap().expect("waiting");
        let started = Instant::now();
        burst(started + WATCH_STALL / 2, 200, &c);
        assert_eq!(c.counts().subscriptions, 1, "judged from its first receive");
        burst(started + WATCH_STALL, 300, &c);
        assert_eq!(sub.try_recv(), Err(subscription::Lost));
    }

    /// A burst's allowance is bounded: past WATCH_BURST_MAX more, the watcher is cut,
    /// so a watcher that never reads holds a bounded queue.
    #[test]
    fn a_burst_past_its_allowance_cuts_the_watcher() {
        let exp = Instant::now() + Duration::from_secs(60);
        let c = Arc::new(Cluster::default());
        let (_, mut sub) = c.subscribe(32).unwrap();
        let burst = Burst::new();
        for i in 0..32 + WATCH_BURST_MAX {
            c.apply(
                [put_aff("af", "d", true, exp, 2 + i as i64)],
                burst,
                &no_data,
            )
            .unwrap();
        }
        assert_eq!(c.counts().subscriptions, 1, "still within the allowance");
        c.apply([put_aff("af", "d", true, exp, 1 << 40)], burst, &no_data)
            .unwrap();
        assert_eq!(sub.try_recv(), Err(subscription::Lost));
        assert_eq!(c.counts().subscriptions, 0);
    }

    /// A GC pass that expires 40 affiliates of a cluster at once is one burst too.
    #[test]
    fn a_gc_pass_is_one_burst() {
        let t0 = Instant::now();
        let c = Arc::new(Cluster::default());
        for i in 0..40 {
            update(&c, &format!("af{i}"), "d", &[], t0 + Duration::from_secs(1)).unwrap();
        }
        let (_, mut sub) = c.subscribe(32).unwrap();
        assert_eq!(c.collect(t0 + Duration::from_secs(2)), 40);
        let got = drain(&mut sub);
        assert_eq!(got.len(), 40);
        assert!(got.iter().all(|n| matches!(n, Notification::Deleted(_))));
    }

    #[test]
    fn a_reset_replaces_everything_and_restarts_watchers() {
        let exp = Instant::now() + Duration::from_secs(60);
        let c = Arc::new(Cluster::default());
        c.apply([put_aff("old", "d", true, exp, 2)], Burst::new(), &no_data)
            .unwrap();
        let (_, mut sub) = c.subscribe(32).unwrap();
        let mut fresh = Affiliate::new(exp);
        fresh.set_stored(exp, 9);
        assert!(c.reset([("new".into(), fresh)].into(), 9).is_ok());
        assert_eq!(sub.try_recv(), Err(subscription::Lost));
        assert_eq!(c.counts().subscriptions, 0);
        let ids: Vec<String> = c.list().into_iter().map(|(a, _)| a.id).collect();
        assert_eq!(ids, ["new"]);
        assert_eq!(c.write_view("new").guard_revision, 9);
    }
}
