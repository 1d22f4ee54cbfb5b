//! Garbage collection of expired affiliates, endpoints and empty clusters (§4.7).

use std::time::Instant;

use super::State;

/// What one pass removed and what remains, for logs and metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GcReport {
    pub removed_clusters: usize,
    pub removed_affiliates: usize,
    pub clusters: usize,
    pub affiliates: usize,
    pub endpoints: usize,
    pub subscriptions: usize,
}

impl State {
    /// One GC pass at `now`. A cluster goes only when it has neither affiliates nor
    /// watchers, checked and removed in one step so a watcher that subscribes before
    /// anyone publishes keeps its cluster.
    pub fn collect(&self, now: Instant) -> GcReport {
        self.gc(Some(now))
    }

    /// A GC pass that expires nothing and only drops empty, unwatched clusters: for the
    /// etcd backend's mirror, where etcd's leases expire affiliates and endpoints.
    pub fn retire_empty(&self) -> GcReport {
        self.gc(None)
    }

    fn gc(&self, now: Option<Instant>) -> GcReport {
        let mut report = GcReport::default();
        for (id, cluster) in self.clusters() {
            if let Some(now) = now {
                report.removed_affiliates += cluster.collect(now);
            }
            let removed = self
                .clusters
                .remove_if(id.as_str(), |_, c| {
                    std::sync::Arc::ptr_eq(c, &cluster) && c.try_retire()
                })
                .is_some();
            if removed {
                report.removed_clusters += 1;
                continue;
            }
            let n = cluster.counts();
            report.clusters += 1;
            report.affiliates += n.affiliates;
            report.endpoints += n.endpoints;
            report.subscriptions += n.subscriptions;
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;
    use crate::state::{Notification, Update};

    /// Stores affiliate `id` of cluster `c` with data and no endpoints.
    fn put(s: &State, id: &str, expiry: Instant) {
        let u = Update {
            affiliate_id: id,
            data: b"d",
            endpoints: &[],
        };
        s.update("c", &u, expiry).unwrap();
    }

    #[test]
    fn unrefreshed_endpoint_expires_alone_then_affiliate_at_its_expiry() {
        let s = State::new();
        let t0 = Instant::now();
        let e = |x: &str| Bytes::copy_from_slice(x.as_bytes());
        let short = [e("short")];
        let long = [e("long")];
        s.update(
            "c",
            &Update {
                affiliate_id: "af",
                data: b"d",
                endpoints: &short,
            },
            t0 + Duration::from_secs(10),
        )
        .unwrap();
        s.update(
            "c",
            &Update {
                affiliate_id: "af",
                data: b"",
                endpoints: &long,
            },
            t0 + Duration::from_secs(60),
        )
        .unwrap();
        let (_, mut sub) = s.watch("c", 32);

        let r = s.collect(t0 + Duration::from_secs(11));
        assert_eq!(
            (
                r.removed_affiliates,
                r.affiliates,
                r.endpoints,
                r.subscriptions
            ),
            (0, 1, 1, 1)
        );
        assert_eq!(s.list("c")[0].endpoints, vec![e("long")]);
        assert!(
            matches!(&*sub.try_recv().unwrap().unwrap(), Notification::Update(v) if v.endpoints == vec![e("long")])
        );

        let r = s.collect(t0 + Duration::from_secs(61));
        assert_eq!(
            (r.removed_affiliates, r.removed_clusters, r.clusters),
            (1, 0, 1),
            "a watched cluster stays"
        );
        assert_eq!(
            *sub.try_recv().unwrap().unwrap(),
            Notification::Deleted("af".into())
        );

        drop(sub);
        let r = s.collect(t0 + Duration::from_secs(62));
        assert_eq!((r.removed_clusters, r.clusters), (1, 0));
        assert_eq!(s.cluster_count(), 0);
    }

    #[test]
    fn zero_ttl_affiliate_goes_at_the_next_pass() {
        let s = State::new();
        let t0 = Instant::now();
        put(&s, "af", t0);
        assert_eq!(
            s.collect(t0).removed_affiliates,
            0,
            "expiry < now is strict"
        );
        assert_eq!(
            s.collect(t0 + Duration::from_millis(1)).removed_affiliates,
            1
        );
    }

    #[test]
    fn writer_racing_with_gc_never_loses_its_update() {
        let s = State::new();
        let t0 = Instant::now();
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for i in 0..2000 {
                        let id = format!("af{w}-{i}");
                        put(&s, &id, t0 + Duration::from_secs(60));
                        s.delete("c", &id);
                    }
                    let id = format!("last{w}");
                    put(&s, &id, t0 + Duration::from_secs(60));
                })
            })
            .collect();
        let gc = {
            let s = s.clone();
            std::thread::spawn(move || {
                for _ in 0..2000 {
                    s.collect(t0);
                }
            })
        };
        for w in writers {
            w.join().unwrap();
        }
        gc.join().unwrap();
        assert_eq!(
            s.list("c").len(),
            4,
            "every final update is in the live map"
        );
    }
}
