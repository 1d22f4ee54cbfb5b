//! Leases shared per expiry bucket: every key whose expiry falls in the same bucket
//! (`LEASE_BUCKET` wide, ending on a multiple of it in Unix time) carries the same
//! lease, so 100k affiliates need as many leases as there are buckets in the longest
//! TTL, not 100k. A key expires when its bucket ends: late by less than one bucket,
//! never early.
//!
//! Each replica grants its own lease per bucket (replicas need not agree on lease IDs)
//! and forgets it once the bucket has passed; etcd revokes it at the bucket's end.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::OnceCell;

use super::client::{CallError, EtcdClient};

/// The end of the bucket of width `width` seconds holding `expiry_ms`, in Unix seconds.
pub fn bucket_end(expiry_ms: i64, width: i64) -> i64 {
    let width = width.max(1);
    let secs = expiry_ms.div_euclid(1000) + i64::from(expiry_ms.rem_euclid(1000) != 0);
    secs.div_euclid(width) * width
        + if secs.rem_euclid(width) == 0 {
            0
        } else {
            width
        }
}

/// The TTL to grant at `now_ms` for a lease that must last until `end` (Unix
/// seconds): rounded up, and at least etcd's minimum.
pub fn grant_ttl(end: i64, now_ms: i64) -> i64 {
    let left_ms = end.saturating_mul(1000).saturating_sub(now_ms);
    (left_ms + 999).div_euclid(1000).max(ETCD_MIN_TTL)
}

/// etcd grants at least this many seconds whatever is asked.
const ETCD_MIN_TTL: i64 = 2;

#[derive(Debug)]
pub struct Leases {
    /// Bucket width in seconds.
    width: i64,
    /// Bucket end (Unix seconds) → its lease ID, once granted. The map's lock is
    /// never held across a call to etcd: writers to a bucket that has its lease go on
    /// while another bucket's grant is slow, and concurrent writers to a new bucket
    /// share its cell, so one grant.
    by_bucket: Mutex<BTreeMap<i64, Arc<OnceCell<i64>>>>,
}

impl Leases {
    pub fn new(width: std::time::Duration) -> Self {
        Self {
            width: (width.as_secs() as i64).max(1),
            by_bucket: Mutex::default(),
        }
    }

    pub fn width(&self) -> i64 {
        self.width
    }

    /// The end of the bucket holding `expiry_ms`, in Unix seconds.
    pub fn bucket_end(&self, expiry_ms: i64) -> i64 {
        bucket_end(expiry_ms, self.width)
    }

    /// The bucket whose lease a key expiring at `expiry_ms` gets at `now_ms`: an
    /// expiry already past gets the current bucket.
    fn lease_bucket(&self, expiry_ms: i64, now_ms: i64) -> i64 {
        self.bucket_end(expiry_ms.max(now_ms))
    }

    /// The lease for keys expiring at `expiry_ms`; an expiry already past gets the
    /// current bucket's, so the key lives for at most one bucket.
    pub async fn for_expiry(
        &self,
        client: &EtcdClient,
        expiry_ms: i64,
        now_ms: i64,
    ) -> Result<i64, CallError> {
        let end = self.lease_bucket(expiry_ms, now_ms);
        let cell = {
            let mut map = self.buckets();
            // Buckets that have ended are gone from etcd (one ending now may be too:
            // its write then fails with "lease not found" and is retried with a fresh
            // lease).
            let now_s = now_ms.div_euclid(1000);
            while map.first_key_value().is_some_and(|(&b, _)| b < now_s) {
                map.pop_first();
            }
            map.entry(end).or_default().clone()
        };
        // A grant that fails (or whose writer gives up) leaves the cell empty: the
        // next writer to the bucket grants.
        let id = cell
            .get_or_try_init(|| async {
                // Not from `now_ms`: this writer may have waited for another's grant,
                // and the grant may go to a second member after the first timed out.
                let granted = client.lease_grant_until(end).await?;
                if !granted.error.is_empty() {
                    return Err(CallError::Rejected(tonic::Status::internal(granted.error)));
                }
                Ok(granted.id)
            })
            .await?;
        Ok(*id)
    }

    fn buckets(&self) -> std::sync::MutexGuard<'_, BTreeMap<i64, Arc<OnceCell<i64>>>> {
        // Nothing panics while holding it; a poisoned map is still a valid map.
        self.by_bucket
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// After etcd answered "lease not found": forgets exactly the leases it no longer
    /// holds (revoked, or lost), never one another writer has just granted. Grants
    /// nothing: the next write to a bucket does. If etcd cannot list its leases, the
    /// buckets of `expiries` (as [`Self::for_expiry`] chose them at `now_ms`) are
    /// forgotten instead.
    pub async fn forget_unknown(
        &self,
        client: &EtcdClient,
        expiries: impl IntoIterator<Item = i64>,
        now_ms: i64,
    ) {
        // Leases granted while etcd lists its own are missing from the list: only
        // those known before asking can be judged by it.
        let known: HashSet<i64> = self
            .buckets()
            .values()
            .filter_map(|c| c.get())
            .copied()
            .collect();
        match client.lease_ids().await {
            Ok(held) => {
                let held: HashSet<i64> = held.into_iter().collect();
                self.buckets().retain(|_, cell| {
                    cell.get()
                        .is_none_or(|id| held.contains(id) || !known.contains(id))
                });
            }
            Err(_) => {
                let mut map = self.buckets();
                for expiry_ms in expiries {
                    let bucket = self.lease_bucket(expiry_ms, now_ms);
                    if map.get(&bucket).is_some_and(|cell| cell.initialized()) {
                        map.remove(&bucket);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::LEASE_BUCKET;

    #[test]
    fn buckets_end_on_multiples_and_never_before_the_expiry() {
        let w = LEASE_BUCKET.as_secs() as i64;
        assert_eq!(bucket_end(0, w), 0);
        assert_eq!(bucket_end(1, w), w);
        assert_eq!(bucket_end(w * 1000, w), w);
        assert_eq!(bucket_end(w * 1000 + 1, w), 2 * w);
        for ms in [1_700_000_000_001i64, 1_700_000_004_999, -1500] {
            let end = bucket_end(ms, w);
            assert!(end * 1000 >= ms, "{ms}");
            assert!(
                end * 1000 - ms < w * 1000,
                "late by less than one bucket: {ms}"
            );
            assert_eq!(end.rem_euclid(w), 0);
        }
    }

    #[test]
    fn grants_cover_the_bucket_and_respect_the_minimum() {
        assert_eq!(grant_ttl(100, 90_000), 10);
        assert_eq!(grant_ttl(100, 90_001), 10, "rounded up");
        assert_eq!(grant_ttl(100, 99_999), ETCD_MIN_TTL);
        assert_eq!(grant_ttl(100, 200_000), ETCD_MIN_TTL);
    }
}
