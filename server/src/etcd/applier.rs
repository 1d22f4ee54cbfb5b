//! Applies what the mirror reads from etcd to the replica's [`State`]: watch events
//! revision by revision, and full reads page by page. Its only I/O is the read of
//! affiliates' data the mirror injects ([`Applier::apply`]'s `fetch`).
//!
//! Besides the copies the state keeps, it allocates nothing per change (keys are
//! parsed in place, ids decoded into a buffer kept between watch responses), and a full
//! read reuses its buffers: short-lived scraps between the copies the state keeps would
//! stay resident as heap fragments.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::Mutex;

use bytes::Bytes;

use super::clock;
use super::keys::{AffiliateValue, EndpointValue, HexId, Key, Layout};
use super::proto::mvccpb;
use crate::state::{Affiliate, Affiliates, Burst, Change, Endpoint, State};

/// Rounds of reading affiliates' data for one watch response ([`Applier::apply`]): a
/// cluster first watched during a round's reads is asked for in the next.
const FETCH_ROUNDS: usize = 3;

#[derive(Debug)]
pub struct Applier {
    state: State,
    layout: Layout,
    scratch: Mutex<Scratch>,
}

/// Buffers of [`Applier::apply`], kept between calls: allocated anew for every watch
/// response, they would leave holes between the copies the state keeps.
#[derive(Debug, Default)]
struct Scratch {
    /// Every id of the events, decoded.
    ids: String,
    /// The changes, in the order they are applied.
    order: Vec<Pending>,
}

/// One change to apply, its ids as ranges of [`Scratch::ids`].
#[derive(Debug)]
struct Pending {
    revision: i64,
    cluster: Range<usize>,
    /// Its place among the events.
    seq: usize,
    change: Change<Range<usize>>,
}

impl Scratch {
    /// What one large response needed is not kept for the next.
    fn shrink(&mut self) {
        const KEEP: usize = 64 * 1024;
        if self.ids.capacity() > KEEP {
            self.ids = String::new();
        }
        if self.order.capacity() * std::mem::size_of::<Pending>() > KEEP {
            self.order = Vec::new();
        }
    }
}

impl Applier {
    pub fn new(state: State, layout: Layout) -> Self {
        Self {
            state,
            layout,
            scratch: Mutex::default(),
        }
    }

    /// The state it applies to.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Replaces the state with a finished full read.
    pub fn reset(&self, read: Rebuild) {
        self.state.reset_all(read.finish());
    }

    /// Moves the clock anchor onto the wall clock if it has stepped, and the state's
    /// expiries with it, before converting more stored times. Done here, where every
    /// watch response passes (a quiet replica still gets its own marker writes), so no
    /// conversion of the mirror's runs on the old scale meanwhile.
    fn follow_wall_clock(&self) {
        if !clock::stepped() {
            return;
        }
        let back_ms = clock::rebase();
        self.state.map_expiries(|t| clock::shift(t, back_ms));
        tracing::warn!(
            drift_ms = back_ms,
            "the wall clock moved against the monotonic clock (stepped, or the machine slept); \
             expiries are now counted on the new time"
        );
    }

    /// Applies events in order, one revision and one cluster at a time, as one
    /// [`Burst`]: they came together, so their number says nothing about a watcher's
    /// pace. Watchers are told each change with the affiliate's data, which the mirror
    /// does not hold: a revision that wrote the affiliate's key carries it; one that
    /// changed only endpoints (a lease took some, or the overdue pass) does not, and
    /// `fetch` reads it from etcd at that revision, for watched clusters only. Returns
    /// how many clusters' watchers were ended because it could not (they start again
    /// from a snapshot). A cluster first watched while `fetch` runs is asked for in a
    /// further round, up to [`FETCH_ROUNDS`], so a Watch that began meanwhile is not
    /// ended for want of data nobody had asked for.
    ///
    /// Allocates nothing per change beyond the reads of data: the events are decoded
    /// into buffers kept from one call to the next, and their list is freed before the
    /// state allocates what it keeps (its place is then free for it, not a hole among
    /// its copies). The changes' data stay slices of the response's receive buffer
    /// until applied.
    pub async fn apply<F, Fut>(&self, events: Vec<mvccpb::Event>, mut fetch: F) -> usize
    where
        F: FnMut(Vec<Wanted>) -> Fut,
        Fut: Future<Output = Fetched>,
    {
        // Out of its lock while `fetch` runs; only the mirror's one task applies.
        let mut scratch =
            std::mem::take(&mut *self.scratch.lock().unwrap_or_else(|e| e.into_inner()));
        self.follow_wall_clock();
        let Scratch { ids, order } = &mut scratch;
        ids.clear();
        order.clear();
        for (seq, e) in events.iter().enumerate() {
            let Some(kv) = e.kv.as_ref() else {
                continue;
            };
            let Some(key) = self.layout.parse(&kv.key) else {
                continue;
            };
            let mut push = |id: HexId<'_>| {
                let start = ids.len();
                id.push_to(ids);
                start..ids.len()
            };
            let cluster = push(key.cluster());
            let id = key.affiliate().map_or(0..0, &mut push);
            let Some(change) = change_of(e, kv, key, id) else {
                continue;
            };
            order.push(Pending {
                revision: kv.mod_revision,
                cluster,
                seq,
                change,
            });
        }
        drop(events);
        let ids = ids.as_str();
        for revision in order.chunk_by_mut(|a, b| a.revision == b.revision) {
            // Grouped by cluster, each cluster's changes in etcd's order (clusters are
            // independent: a watcher follows one).
            revision.sort_unstable_by(|a, b| {
                (&ids[a.cluster.clone()], a.seq).cmp(&(&ids[b.cluster.clone()], b.seq))
            });
        }
        let mut fetched = Fetched::new();
        let mut asked = HashSet::new();
        for _ in 0..FETCH_ROUNDS {
            let mut wanted = self.wanted(ids, order);
            wanted.retain(|w| !asked.contains(w));
            if wanted.is_empty() {
                break;
            }
            asked.extend(wanted.iter().cloned());
            fetched.extend(fetch(wanted).await);
        }
        let burst = Burst::new();
        let mut cut = 0;
        for revision in order.chunk_by(|a, b| a.revision == b.revision) {
            for cluster in
                revision.chunk_by(|a, b| ids[a.cluster.clone()] == ids[b.cluster.clone()])
            {
                let changes = cluster
                    .iter()
                    .map(|p| p.change.map_id(|id| &ids[id.clone()]));
                let cluster_id = &ids[cluster[0].cluster.clone()];
                let data_of = |affiliate: &str| {
                    let key = Wanted {
                        cluster: cluster_id.to_owned(),
                        affiliate: affiliate.to_owned(),
                        revision: cluster[0].revision,
                    };
                    fetched.get(&key).cloned()
                };
                if self.state.apply(cluster_id, changes, burst, &data_of) {
                    cut += 1;
                    tracing::warn!(
                        cluster = cluster_id,
                        revision = cluster[0].revision,
                        "cannot read an affiliate's data from etcd for its watchers; they start again from a snapshot"
                    );
                }
            }
        }
        // The changes' data are slices of the response's receive buffer: kept, they
        // would hold it until the next response.
        order.clear();
        scratch.shrink();
        *self.scratch.lock().unwrap_or_else(|e| e.into_inner()) = scratch;
        cut
    }

    /// The affiliates of watched clusters whose endpoints a revision changed without
    /// writing their key: their data must be read to tell the watchers.
    fn wanted(&self, ids: &str, order: &[Pending]) -> Vec<Wanted> {
        let mut wanted = Vec::new();
        for revision in order.chunk_by(|a, b| a.revision == b.revision) {
            for cluster in
                revision.chunk_by(|a, b| ids[a.cluster.clone()] == ids[b.cluster.clone()])
            {
                let endpoints_only = cluster.iter().any(|p| {
                    matches!(
                        p.change,
                        Change::PutEndpoint { .. } | Change::DeleteEndpoint { .. }
                    )
                });
                let cluster_id = &ids[cluster[0].cluster.clone()];
                if !endpoints_only || !self.state.cluster(cluster_id).is_some_and(|c| c.watched()) {
                    continue;
                }
                // The affiliates whose key this revision wrote or deleted, sorted.
                let mut written: Vec<&str> = cluster
                    .iter()
                    .filter_map(|p| match &p.change {
                        Change::PutAffiliate { id, .. } | Change::DeleteAffiliate { id } => {
                            Some(&ids[id.clone()])
                        }
                        _ => None,
                    })
                    .collect();
                written.sort_unstable();
                for p in cluster {
                    let (Change::PutEndpoint { id, .. } | Change::DeleteEndpoint { id, .. }) =
                        &p.change
                    else {
                        continue;
                    };
                    let id = &ids[id.clone()];
                    if written.binary_search(&id).is_ok() {
                        continue;
                    }
                    wanted.push(Wanted {
                        cluster: cluster_id.to_owned(),
                        affiliate: id.to_owned(),
                        revision: p.revision,
                    });
                }
            }
        }
        // An affiliate's endpoints come together: one read each.
        wanted.dedup();
        wanted
    }
}

/// An affiliate's data wanted as it was at one revision ([`Applier::apply`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Wanted {
    pub cluster: String,
    pub affiliate: String,
    pub revision: i64,
}

/// What was read of the data wanted; what could not be read is missing.
pub type Fetched = HashMap<Wanted, Bytes>;

fn change_of<Id>(
    e: &mvccpb::Event,
    kv: &mvccpb::KeyValue,
    key: Key<'_>,
    id: Id,
) -> Option<Change<Id>> {
    let put = e.r#type == mvccpb::event::EventType::Put as i32;
    Some(match key {
        Key::Guard { .. } => Change::Guard {
            revision: if put { kv.mod_revision } else { 0 },
        },
        Key::Affiliate { .. } if put => {
            // A value this server never writes no longer holds an affiliate it knows:
            // gone, as a full read (which skips it) would find it.
            let Some(v) = decode_affiliate(&kv.value, &kv.key) else {
                return Some(Change::DeleteAffiliate { id });
            };
            Change::PutAffiliate {
                id,
                data: v.data,
                data_set: v.data_set,
                expiry: clock::instant(v.expiry_ms),
                revision: kv.mod_revision,
            }
        }
        Key::Affiliate { .. } => Change::DeleteAffiliate { id },
        Key::Endpoint { blob, .. } if put => {
            let v = decode_endpoint(&kv.value, &kv.key)?;
            Change::PutEndpoint {
                id,
                blob,
                expiry: clock::instant(v.expiry_ms),
                ordinal: v.ordinal,
            }
        }
        Key::Endpoint { blob, .. } => Change::DeleteEndpoint { id, blob },
    })
}

/// A full read turned into clusters page by page, holding nothing of the keyspace
/// beyond the page at hand. etcd returns keys in order, so a cluster's affiliate keys
/// (`a/…`) come before its endpoint keys (`e/…`), and one affiliate's endpoint keys are
/// together: each affiliate's endpoints are gathered, then put in creation order.
///
/// An endpoint key can outlive its affiliate's key by up to a bucket (their leases are
/// separate). Its affiliate may be created again meanwhile: the watch dropped the old
/// endpoints with the old affiliate, so the read skips a key not written since the
/// affiliate's creation; one the new affiliate wrote again kept its old creation
/// revision, so it counts as created with the affiliate, where the watch put it.
#[derive(Debug, Default)]
pub struct Rebuild {
    clusters: HashMap<String, (Affiliates, i64)>,
    /// The affiliate whose endpoints are being gathered, and those endpoints:
    /// (creation revision, ordinal, endpoint).
    run_cluster: String,
    run_affiliate: String,
    run: Vec<(i64, u16, Endpoint)>,
    /// Creation revisions of the affiliates of cluster `created_in` (the one being
    /// read), by a hash of their id; reused from cluster to cluster.
    created: HashMap<u64, i64>,
    created_in: String,
    /// Reused to decode ids for lookups.
    cluster: String,
    affiliate: String,
}

fn id_hash(id: HexId<'_>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    id.hash(&mut h);
    h.finish()
}

impl Rebuild {
    pub fn add(&mut self, layout: &Layout, kv: &mvccpb::KeyValue) {
        match layout.parse(&kv.key) {
            Some(Key::Guard { cluster }) => {
                self.flush();
                self.in_cluster(cluster, |c| c.1 = kv.mod_revision);
            }
            Some(Key::Affiliate { cluster, affiliate }) => {
                self.flush();
                let Some(v) = decode_affiliate(&kv.value, &kv.key) else {
                    return;
                };
                let expiry = clock::instant(v.expiry_ms);
                let mut a = Affiliate::new(expiry);
                a.set_stored(expiry, kv.mod_revision);
                if cluster.decode_into(&mut self.cluster) != self.created_in {
                    self.created.clear();
                    std::mem::swap(&mut self.created_in, &mut self.cluster);
                }
                self.created.insert(id_hash(affiliate), kv.create_revision);
                let id = affiliate.decode().into_boxed_str();
                self.in_cluster(cluster, |c| {
                    c.0.insert(id, a);
                });
            }
            Some(Key::Endpoint {
                cluster,
                affiliate,
                blob,
            }) => {
                let Some(v) = decode_endpoint(&kv.value, &kv.key) else {
                    return;
                };
                let (c, a) = (
                    cluster.decode_into(&mut self.cluster),
                    affiliate.decode_into(&mut self.affiliate),
                );
                let born = if c == self.created_in {
                    self.created.get(&id_hash(affiliate)).copied()
                } else {
                    None
                };
                if born.is_some_and(|born| kv.mod_revision < born) {
                    return; // Left from the affiliate's earlier life.
                }
                if c != self.run_cluster || a != self.run_affiliate {
                    self.flush();
                    std::mem::swap(&mut self.run_cluster, &mut self.cluster);
                    std::mem::swap(&mut self.run_affiliate, &mut self.affiliate);
                }
                let e = Endpoint {
                    blob,
                    expiry: clock::instant(v.expiry_ms),
                    ordinal: v.ordinal,
                };
                let created = born.map_or(kv.create_revision, |b| kv.create_revision.max(b));
                self.run.push((created, v.ordinal, e));
            }
            None => {}
        }
    }

    /// Runs `f` on the cluster being built, creating it on first sight.
    fn in_cluster(&mut self, cluster: HexId<'_>, f: impl FnOnce(&mut (Affiliates, i64))) {
        let id = cluster.decode_into(&mut self.cluster);
        match self.clusters.get_mut(id) {
            Some(c) => f(c),
            None => f(self.clusters.entry(id.to_owned()).or_default()),
        }
    }

    /// Puts the gathered endpoints on their affiliate (if it exists), in creation
    /// order; endpoints created by one transaction share a revision and keep the
    /// request's order by their ordinal.
    fn flush(&mut self) {
        if self.run.is_empty() {
            return;
        }
        self.run
            .sort_by_key(|(created, ordinal, _)| (*created, *ordinal));
        let affiliate = self
            .clusters
            .get_mut(self.run_cluster.as_str())
            .and_then(|(affiliates, _)| affiliates.get_mut(self.run_affiliate.as_str()));
        if let Some(a) = affiliate {
            a.reserve_endpoints(self.run.len());
            for (_, _, e) in &self.run {
                a.put_endpoint(e.blob, e.expiry, e.ordinal);
            }
        }
        self.run.clear();
    }

    fn finish(mut self) -> HashMap<String, (Affiliates, i64)> {
        self.flush();
        self.clusters
    }
}

/// Values this layout never writes are skipped with a warning: only another program
/// writing under our prefix produces them.
pub(super) fn decode_affiliate(v: &Bytes, key: &[u8]) -> Option<AffiliateValue> {
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

#[cfg(test)]
mod tests {
    use super::*;

    const EXPIRY_MS: i64 = 4_000_000_000_000;

    fn kv(key: Vec<u8>, value: Vec<u8>, created: i64) -> mvccpb::KeyValue {
        mvccpb::KeyValue {
            key: key.into(),
            value: value.into(),
            create_revision: created,
            mod_revision: created + 100,
            ..Default::default()
        }
    }

    fn affiliate(l: &Layout, c: &str, a: &str, data: &str) -> mvccpb::KeyValue {
        let v = AffiliateValue {
            data_set: true,
            expiry_ms: EXPIRY_MS,
            data: Bytes::copy_from_slice(data.as_bytes()),
        };
        kv(l.affiliate(c, a), v.encode(), 1)
    }

    fn endpoint(
        l: &Layout,
        c: &str,
        a: &str,
        blob: &str,
        created: i64,
        ordinal: u16,
    ) -> mvccpb::KeyValue {
        let v = EndpointValue {
            ordinal,
            expiry_ms: EXPIRY_MS,
        };
        kv(l.endpoint(c, a, blob.as_bytes()), v.encode(), created)
    }

    /// What a full read returns: every key, in etcd's (byte) order.
    fn keyspace(l: &Layout) -> Vec<mvccpb::KeyValue> {
        let mut kvs = vec![
            affiliate(l, "c1", "n1", "one"),
            affiliate(l, "c1", "n2", "two"),
            // Listed by creation, then by the request's order within one transaction,
            // not by key.
            endpoint(l, "c1", "n1", "zz", 3, 0),
            endpoint(l, "c1", "n1", "aa", 5, 1),
            endpoint(l, "c1", "n1", "bb", 5, 0),
            endpoint(l, "c1", "n2", "e", 7, 0),
            // An endpoint whose affiliate is gone (it expired first) is dropped.
            endpoint(l, "c1", "gone", "x", 2, 0),
            kv(l.guard("c1"), Vec::new(), 9),
            kv(l.guard("c2"), Vec::new(), 11),
            affiliate(l, "c3", "n1", "three"),
            endpoint(l, "c3", "n1", "e", 4, 0),
            // Not ours: ignored.
            kv(b"p/c/zz/g".to_vec(), Vec::new(), 1),
            kv(l.sentinel(), Vec::new(), 1),
        ];
        kvs.sort_by(|a, b| a.key.cmp(&b.key));
        kvs
    }

    type Summary = Vec<(String, i64, Vec<(String, String, Vec<String>)>)>;

    fn rebuilt(l: &Layout, pages: &[&[mvccpb::KeyValue]]) -> Summary {
        let mut r = Rebuild::default();
        for page in pages {
            for kv in *page {
                r.add(l, kv);
            }
        }
        let mut out: Summary = r
            .finish()
            .into_iter()
            .map(|(cluster, (affiliates, guard))| {
                let mut list: Vec<_> = affiliates
                    .iter()
                    .map(|(id, a)| {
                        let eps = a
                            .endpoints()
                            .iter()
                            .map(|e| String::from_utf8_lossy(e.blob.as_slice()).into_owned())
                            .collect();
                        // No data: the revision to read it at.
                        assert!(a.data().is_empty(), "the mirror holds no data");
                        (id.to_string(), a.revision().to_string(), eps)
                    })
                    .collect();
                list.sort();
                (cluster, guard, list)
            })
            .collect();
        out.sort();
        out
    }

    fn s(v: &str) -> String {
        v.to_owned()
    }

    #[test]
    fn a_full_read_rebuilds_clusters_with_endpoints_in_creation_order() {
        let l = Layout::new("p/");
        let all = keyspace(&l);
        assert_eq!(
            rebuilt(&l, &[&all]),
            vec![
                (
                    s("c1"),
                    109,
                    vec![
                        (s("n1"), s("101"), vec![s("zz"), s("bb"), s("aa")]),
                        (s("n2"), s("101"), vec![s("e")]),
                    ]
                ),
                (s("c2"), 111, vec![]),
                (s("c3"), 0, vec![(s("n1"), s("101"), vec![s("e")])]),
            ]
        );
    }

    /// An endpoint key left from an affiliate's earlier life (its lease ends a little
    /// after the affiliate's): the watch dropped it with the old affiliate, so the read
    /// skips it unless the new affiliate wrote it again, and then counts it as created
    /// with the new affiliate, in the order of that transaction.
    #[test]
    fn endpoints_left_from_an_earlier_life_are_skipped_or_ordered_as_rewritten() {
        let l = Layout::new("p/");
        let at = |mut kv: mvccpb::KeyValue, created: i64, modified: i64| {
            kv.create_revision = created;
            kv.mod_revision = modified;
            kv
        };
        let mut kvs = vec![
            at(affiliate(&l, "c", "n", "new life"), 50, 50),
            // Created in the earlier life, never written since: gone from the watch.
            at(endpoint(&l, "c", "n", "stale", 0, 0), 10, 20),
            // Created then, written again by the new affiliate's creation.
            at(endpoint(&l, "c", "n", "kept", 0, 1), 10, 50),
            at(endpoint(&l, "c", "n", "fresh", 0, 0), 50, 50),
            at(endpoint(&l, "c", "n", "later", 0, 0), 60, 60),
        ];
        kvs.sort_by(|a, b| a.key.cmp(&b.key));
        assert_eq!(
            rebuilt(&l, &[&kvs]),
            vec![(
                s("c"),
                0,
                vec![(s("n"), s("50"), vec![s("fresh"), s("kept"), s("later")])]
            )]
        );
    }

    #[test]
    fn a_full_read_rebuilds_the_same_however_it_is_paged() {
        let l = Layout::new("p/");
        let all = keyspace(&l);
        let whole = rebuilt(&l, &[&all]);
        for split in 0..=all.len() {
            assert_eq!(
                rebuilt(&l, &[&all[..split], &all[split..]]),
                whole,
                "split at {split}"
            );
        }
        let one_per_page: Vec<&[mvccpb::KeyValue]> = all.chunks(1).collect();
        assert_eq!(rebuilt(&l, &one_per_page), whole);
    }

    fn event(kv: mvccpb::KeyValue, revision: i64, put: bool) -> mvccpb::Event {
        let r#type = if put {
            mvccpb::event::EventType::Put
        } else {
            mvccpb::event::EventType::Delete
        };
        mvccpb::Event {
            r#type: r#type as i32,
            kv: Some(mvccpb::KeyValue {
                mod_revision: revision,
                ..kv
            }),
            prev_kv: None,
        }
    }

    /// What a watcher heard: `id data [endpoints]`, or `-id` for a deletion.
    fn heard(sub: &mut crate::state::Subscription) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(n) = sub.try_recv().unwrap() {
            out.push(match &*n {
                crate::state::Notification::Update(v) => {
                    let eps: Vec<_> = v
                        .endpoints
                        .iter()
                        .map(|e| String::from_utf8_lossy(e))
                        .collect();
                    format!(
                        "{} {} [{}]",
                        v.id,
                        String::from_utf8_lossy(&v.data),
                        eps.join(",")
                    )
                }
                crate::state::Notification::Deleted(id) => format!("-{id}"),
            });
        }
        out
    }

    /// A watch response may carry several revisions, each touching several clusters
    /// in any order: each cluster's watchers hear once per affiliate per revision,
    /// after all of that revision's changes to it, and keys or values this layout
    /// never writes are skipped.
    #[tokio::test]
    async fn watch_events_apply_per_revision_and_cluster_in_etcd_order() {
        let l = Layout::new("p/");
        let applier = Applier::new(State::new(), l.clone());
        let (_, mut c1) = applier.state().watch("c1", 32);
        let (_, mut c2) = applier.state().watch("c2", 32);
        let events = vec![
            // One batch of three updates, interleaving the two clusters.
            event(affiliate(&l, "c2", "a1", "one"), 10, true),
            event(kv(l.guard("c2"), Vec::new(), 0), 10, true),
            event(affiliate(&l, "c1", "b", "bee"), 10, true),
            event(endpoint(&l, "c2", "a1", "e1", 10, 0), 10, true),
            event(kv(b"p/c/zz/g".to_vec(), Vec::new(), 0), 10, true),
            event(endpoint(&l, "c1", "b", "x", 10, 0), 10, true),
            event(affiliate(&l, "c2", "a2", "two"), 10, true),
            event(kv(l.affiliate("c2", "bad"), b"?".to_vec(), 0), 10, true),
            event(endpoint(&l, "c2", "a1", "e2", 10, 1), 10, true),
            // Leases ending: an endpoint of one cluster, an affiliate of the other.
            event(kv(l.endpoint("c2", "a1", b"e1"), Vec::new(), 0), 11, false),
            event(kv(l.affiliate("c1", "b"), Vec::new(), 0), 11, false),
            event(kv(l.endpoint("c1", "b", b"x"), Vec::new(), 0), 11, false),
        ];
        // Revision 11 took an endpoint of c2's a1 without writing a1's key: its
        // data is read at that revision, since the mirror holds none.
        let a1_at_11 = Wanted {
            cluster: s("c2"),
            affiliate: s("a1"),
            revision: 11,
        };
        let asked = std::sync::Mutex::new(Vec::new());
        let fetch = |wanted: Vec<Wanted>| {
            asked.lock().unwrap().extend(wanted.clone());
            let data = Bytes::from_static(b"one");
            async move { wanted.into_iter().map(|w| (w, data.clone())).collect() }
        };
        assert_eq!(applier.apply(events, fetch).await, 0, "no watcher ended");
        assert_eq!(*asked.lock().unwrap(), [a1_at_11]);
        assert_eq!(heard(&mut c1), ["b bee [x]", "-b"]);
        assert_eq!(
            heard(&mut c2),
            ["a1 one [e1,e2]", "a2 two []", "a1 one [e2]"]
        );
        assert_eq!(applier.state().write_view("c2", "a1").guard_revision, 10);
        assert!(applier.state().list("c1").is_empty());
    }

    /// A Watch that begins while the data of another cluster's change is being read
    /// is told its own cluster's change, read in a further round, and not ended; what
    /// cannot be read at all ends the watchers that needed it.
    #[tokio::test]
    async fn a_cluster_first_watched_while_data_is_read_is_read_for_too() {
        let l = Layout::new("p/");
        let applier = Applier::new(State::new(), l.clone());
        let mut setup = Vec::new();
        for c in ["c1", "c2", "c3"] {
            setup.push(event(affiliate(&l, c, "a", "data"), 10, true));
            setup.push(event(endpoint(&l, c, "a", "e1", 10, 0), 10, true));
            setup.push(event(endpoint(&l, c, "a", "e2", 10, 1), 10, true));
        }
        let nothing = |_| async { Fetched::new() };
        assert_eq!(applier.apply(setup, nothing).await, 0);
        let (_, mut c1) = applier.state().watch("c1", 32);
        // A lease takes an endpoint of each cluster's affiliate, in one revision.
        let leases_end = || {
            ["c1", "c2", "c3"]
                .map(|c| event(kv(l.endpoint(c, "a", b"e1"), Vec::new(), 0), 11, false))
                .to_vec()
        };
        let late = std::sync::Mutex::new(None);
        let rounds = std::sync::Mutex::new(Vec::new());
        let fetch = |wanted: Vec<Wanted>| {
            let mut clusters: Vec<_> = wanted.iter().map(|w| w.cluster.clone()).collect();
            clusters.sort();
            rounds.lock().unwrap().push(clusters);
            // c2's Watch begins during the first round's reads.
            let mut late = late.lock().unwrap();
            if late.is_none() {
                *late = Some(applier.state().watch("c2", 32).1);
            }
            async move {
                wanted
                    .into_iter()
                    .map(|w| (w, Bytes::from_static(b"data")))
                    .collect()
            }
        };
        assert_eq!(
            applier.apply(leases_end(), fetch).await,
            0,
            "no watcher ended"
        );
        assert_eq!(*rounds.lock().unwrap(), [vec![s("c1")], vec![s("c2")]]);
        assert_eq!(heard(&mut c1), ["a data [e2]"]);
        let mut c2 = late.into_inner().unwrap().unwrap();
        assert_eq!(heard(&mut c2), ["a data [e2]"]);
        drop(c2);

        // The data cannot be read: the watchers of the watched clusters are ended.
        let (_, mut c3) = applier.state().watch("c3", 32);
        let again = |c: &str| event(kv(l.endpoint(c, "a", b"e2"), Vec::new(), 0), 12, false);
        let cut = applier
            .apply(vec![again("c1"), again("c2"), again("c3")], nothing)
            .await;
        assert_eq!(cut, 2, "c1 and c3 are watched (c2's watcher was dropped)");
        assert!(c1.try_recv().is_err() && c3.try_recv().is_err());
    }

    /// Nothing of a watch response (its receive buffer) is held once it is applied,
    /// even while etcd stays quiet and a watcher has not read the change: the
    /// notification's data is a copy.
    #[tokio::test]
    async fn nothing_of_an_applied_response_is_held() {
        let l = Layout::new("p/");
        let applier = Applier::new(State::new(), l.clone());
        let (_, mut sub) = applier.state().watch("c", 32);
        let mut kv = affiliate(&l, "c", "a", "data");
        let received = Bytes::from(kv.value.to_vec());
        kv.value = received.clone();
        let fetch = |_| async { Fetched::new() };
        assert_eq!(applier.apply(vec![event(kv, 5, true)], fetch).await, 0);
        assert_eq!(applier.state().list("c").len(), 1);
        assert!(
            received.is_unique(),
            "the response's bytes are still shared"
        );
        assert_eq!(heard(&mut sub), ["a data []"]);
    }
}
