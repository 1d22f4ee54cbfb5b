//! One affiliate: an opaque data blob and an ordered set of endpoint blobs, each with
//! its own expiry (reference §4.4, §4.7).
//!
//! The affiliate owns its invariants: endpoints are byte-exact deduplicated in insertion
//! order and never exceed [`AFFILIATE_ENDPOINTS_MAX`]. Time is always passed in, so the
//! rules can be tested without waiting.

use std::borrow::Cow;
use std::collections::HashSet;
use std::time::Instant;

use bytes::Bytes;

use super::StateError;
use crate::limits::{AFFILIATE_ENDPOINT_MAX, AFFILIATE_ENDPOINTS_MAX};

/// One endpoint blob (an AES-ECB ciphertext of at most two blocks), stored inline:
/// no heap allocation and no refcount per endpoint, which matters at 100k affiliates.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Blob {
    len: u8,
    bytes: [u8; AFFILIATE_ENDPOINT_MAX],
}

impl Blob {
    /// `None` if longer than [`AFFILIATE_ENDPOINT_MAX`] (the RPC layer rejects those).
    pub fn new(b: &[u8]) -> Option<Self> {
        let mut bytes = [0; AFFILIATE_ENDPOINT_MAX];
        bytes.get_mut(..b.len())?.copy_from_slice(b);
        Some(Self {
            len: b.len() as u8,
            bytes,
        })
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// A copy for a response; endpoints are tiny, so copying beats sharing.
    pub fn to_bytes(&self) -> Bytes {
        Bytes::copy_from_slice(self.as_slice())
    }
}

impl std::ops::Deref for Blob {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::fmt::Debug for Blob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Blob({:02x?})", self.as_slice())
    }
}

/// An endpoint blob and when it stops being announced.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub blob: Blob,
    pub expiry: Instant,
    /// etcd backend: the endpoint's place among those its update created (stored in
    /// etcd, so a full read orders them as the watch did); 0 otherwise. Fits in the
    /// padding: an `Endpoint` is no larger for it.
    pub ordinal: u16,
}

impl Endpoint {
    /// An endpoint expires at its expiry (`expiry <= now`), as upstream.
    pub fn expired(&self, now: Instant) -> bool {
        self.expiry <= now
    }
}

/// A request's endpoints without repeats, first occurrences in order, for
/// [`Affiliate::check_endpoints`] and [`Affiliate::merge_endpoints`], which then see at
/// most one more than [`AFFILIATE_ENDPOINTS_MAX`] blobs.
///
/// Called before the cluster lock is taken: a 4 MiB request can carry over a million
/// tiny endpoints, and comparing each with every stored one under the lock would stall
/// the cluster. Stops at the first distinct blob past the limit: the request is then
/// rejected whatever the affiliate holds, since it would end with more than the limit.
/// Merging the result is the same as merging `blobs` (a repeat only raises an expiry
/// to the same value), so codes, messages and notifications do not change. Requests
/// short enough to handle under the lock as they are pass through untouched.
pub fn distinct_endpoints(blobs: &[Bytes]) -> Cow<'_, [Bytes]> {
    const KEEP: usize = AFFILIATE_ENDPOINTS_MAX + 1;
    if blobs.len() <= KEEP {
        return Cow::Borrowed(blobs);
    }
    let mut seen: HashSet<&[u8]> = HashSet::with_capacity(KEEP);
    let mut out = Vec::with_capacity(KEEP);
    for blob in blobs {
        if seen.insert(blob.as_ref()) {
            out.push(blob.clone());
            if out.len() == KEEP {
                break;
            }
        }
    }
    Cow::Owned(out)
}

/// Endpoints a restore left out to keep the affiliate's invariants.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DroppedEndpoints {
    /// Byte-equal to an earlier endpoint (merged into it).
    pub duplicates: usize,
    /// New endpoints past [`AFFILIATE_ENDPOINTS_MAX`].
    pub over_limit: usize,
}

/// What garbage collection did to one affiliate.
#[derive(Debug, PartialEq, Eq)]
pub enum Collected {
    /// Nothing expired.
    Unchanged,
    /// The affiliate lives on but some endpoints expired: watchers need an update.
    LostEndpoints,
    /// The affiliate itself expired and must be removed.
    Expired,
}

/// Stored state of one affiliate. The id is the key of the cluster's map, not stored
/// twice, which keeps 100k affiliates compact.
#[derive(Debug, Clone)]
pub struct Affiliate {
    expiry: Instant,
    /// etcd's modification revision of the affiliate's key (etcd backend's mirror
    /// only; 0 otherwise): the update transaction is conditional on it.
    revision: i64,
    /// Copied out of the request buffer on store, so a retained blob never pins a whole
    /// decode buffer in memory. Always empty in the etcd backend's mirror
    /// ([`Self::set_stored`]).
    data: Bytes,
    endpoints: Vec<Endpoint>,
}

impl Affiliate {
    /// A fresh, empty affiliate expiring at `expiry`.
    pub fn new(expiry: Instant) -> Self {
        Self {
            expiry,
            revision: 0,
            data: Bytes::new(),
            endpoints: Vec::new(),
        }
    }

    /// An affiliate restored from a snapshot, under the same endpoint rules as an update:
    /// byte-equal endpoints are merged into the first (keeping the later expiry), in
    /// insertion order, and at most [`AFFILIATE_ENDPOINTS_MAX`] are kept. Says what was
    /// dropped, so a file no request could have produced is reported.
    pub fn restored(
        expiry: Instant,
        data: Bytes,
        mut endpoints: Vec<Endpoint>,
    ) -> (Self, DroppedEndpoints) {
        // In place: the endpoints kept so far are `endpoints[..kept]`.
        let mut dropped = DroppedEndpoints::default();
        let mut kept = 0;
        for i in 0..endpoints.len() {
            let e = endpoints[i].clone();
            if let Some(known) = endpoints[..kept].iter_mut().find(|k| k.blob == e.blob) {
                known.expiry = known.expiry.max(e.expiry);
                dropped.duplicates += 1;
            } else if kept >= AFFILIATE_ENDPOINTS_MAX {
                dropped.over_limit += 1;
            } else {
                endpoints[kept] = e;
                kept += 1;
            }
        }
        if kept < endpoints.len() {
            endpoints.truncate(kept);
            endpoints.shrink_to_fit();
        }
        let a = Self {
            expiry,
            revision: 0,
            data,
            endpoints,
        };
        (a, dropped)
    }

    pub fn expiry(&self) -> Instant {
        self.expiry
    }

    pub fn data(&self) -> &Bytes {
        &self.data
    }

    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// The endpoint blobs in insertion order, as sent to clients.
    pub fn endpoint_blobs(&self) -> Vec<Bytes> {
        self.endpoints.iter().map(|e| e.blob.to_bytes()).collect()
    }

    /// Checks that merging `blobs` would not exceed the endpoint limit, without changing
    /// anything. Upstream fails half-way through a merge (Q6); we reject the whole request
    /// up front instead, with the same code and message.
    pub fn check_endpoints(&self, blobs: &[Bytes]) -> Result<(), StateError> {
        let room = AFFILIATE_ENDPOINTS_MAX.saturating_sub(self.endpoints.len());
        // Distinct new blobs seen so far; bounded by `room + 1` because we stop there.
        let mut fresh: Vec<&[u8]> = Vec::new();
        for blob in blobs {
            let blob = blob.as_ref();
            if self.endpoints.iter().any(|e| e.blob.as_slice() == blob) || fresh.contains(&blob) {
                continue;
            }
            fresh.push(blob);
            if fresh.len() > room {
                return Err(StateError::TooManyEndpoints);
            }
        }
        Ok(())
    }

    /// Replaces the data and sets the expiry to `expiry`, even if that shortens it.
    ///
    /// Refreshes usually resend data of the same length; when nothing else holds the old
    /// bytes (no notification still queued with them), they are overwritten in place
    /// rather than freed and allocated again: a 1-2 KiB block per update that glibc's
    /// malloc serves from its slow path.
    pub fn set_data(&mut self, data: &[u8], expiry: Instant) {
        self.data = match std::mem::take(&mut self.data).try_into_mut() {
            Ok(mut old) if old.len() == data.len() => {
                old.copy_from_slice(data);
                old.freeze()
            }
            _ => Bytes::copy_from_slice(data),
        };
        self.expiry = expiry;
    }

    /// Merges endpoint blobs in order: a known blob only has its expiry raised (never
    /// lowered), a new one is appended. Returns whether any blob was new.
    ///
    /// Callers must run [`Self::check_endpoints`] first; the limit is still enforced here
    /// so the invariant holds even if they do not.
    pub fn merge_endpoints(&mut self, blobs: &[Bytes], expiry: Instant) -> bool {
        let mut changed = false;
        for blob in blobs {
            let full = self.endpoints.len() >= AFFILIATE_ENDPOINTS_MAX;
            let Some(blob) = Blob::new(blob) else {
                continue;
            };
            match self.endpoints.iter_mut().find(|e| e.blob == blob) {
                Some(known) => known.expiry = known.expiry.max(expiry),
                None if !full => {
                    // Exact growth: most affiliates hold 1–4 endpoints for hours, and
                    // doubling slack would cost more than the rare reallocation.
                    self.endpoints.reserve_exact(1);
                    self.endpoints.push(Endpoint {
                        blob,
                        expiry,
                        ordinal: 0,
                    });
                    changed = true;
                }
                None => {}
            }
        }
        changed
    }

    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// Mirrors a write read back from etcd: its expiry and revision. Not its data: a
    /// replica's mirror holds none (etcd is the copy), so the data does not take room
    /// in every replica; it is read from etcd when a snapshot, List or page needs it
    /// ([`EtcdState`](crate::etcd::EtcdState)), and notifications take it from the
    /// change itself.
    pub fn set_stored(&mut self, expiry: Instant, revision: i64) {
        self.expiry = expiry;
        self.revision = revision;
    }

    /// Makes room for `n` more endpoints at once, so putting them grows the list once.
    pub fn reserve_endpoints(&mut self, n: usize) {
        self.endpoints
            .reserve_exact(n.min(AFFILIATE_ENDPOINTS_MAX.saturating_sub(self.endpoints.len())));
    }

    /// Mirrors an endpoint key read back from etcd: its expiry is set as stored (not
    /// raised), a new one appended. Returns whether it was new. Past the limit (only a
    /// foreign writer could get there) it is ignored, keeping the invariant.
    pub fn put_endpoint(&mut self, blob: Blob, expiry: Instant, ordinal: u16) -> bool {
        if let Some(known) = self.endpoints.iter_mut().find(|e| e.blob == blob) {
            known.expiry = expiry;
            known.ordinal = ordinal;
            return false;
        }
        if self.endpoints.len() >= AFFILIATE_ENDPOINTS_MAX {
            return false;
        }
        // Exact growth, as in `merge_endpoints`.
        self.endpoints.reserve_exact(1);
        self.endpoints.push(Endpoint {
            blob,
            expiry,
            ordinal,
        });
        true
    }

    /// Removes an endpoint; returns whether it was there.
    pub fn remove_endpoint(&mut self, blob: &Blob) -> bool {
        let before = self.endpoints.len();
        self.endpoints.retain(|e| e.blob != *blob);
        self.endpoints.len() != before
    }

    /// Applies `f` to the affiliate's expiry and each endpoint's (etcd backend: the
    /// clock's anchor moved, and with it the `Instant` of every stored Unix time).
    pub fn map_expiries(&mut self, f: impl Fn(Instant) -> Instant) {
        self.expiry = f(self.expiry);
        for e in &mut self.endpoints {
            e.expiry = f(e.expiry);
        }
    }

    /// Raises the affiliate expiry to `expiry` if that is later.
    pub fn extend(&mut self, expiry: Instant) {
        self.expiry = self.expiry.max(expiry);
    }

    /// The affiliate expires strictly after its expiry (`expiry < now`), as upstream;
    /// an endpoint at it ([`Endpoint::expired`]).
    pub fn expired(&self, now: Instant) -> bool {
        self.expiry < now
    }

    /// Drops what expired at `now` ([`Self::expired`], [`Endpoint::expired`]).
    pub fn collect(&mut self, now: Instant) -> Collected {
        if self.expired(now) {
            return Collected::Expired;
        }
        let before = self.endpoints.len();
        self.endpoints.retain(|e| !e.expired(now));
        if self.endpoints.len() == before {
            return Collected::Unchanged;
        }
        // Give memory back after a burst of short-lived endpoints.
        if self.endpoints.capacity() > 8 && self.endpoints.capacity() > 2 * self.endpoints.len() {
            self.endpoints.shrink_to_fit();
        }
        Collected::LostEndpoints
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn blobs(a: &Affiliate) -> Vec<Bytes> {
        a.endpoint_blobs()
    }

    #[test]
    fn endpoints_are_deduplicated_in_insertion_order() {
        let t0 = Instant::now();
        let mut a = Affiliate::new(t0);
        assert!(a.merge_endpoints(&[b("e1"), b("e2")], t0));
        assert!(a.merge_endpoints(&[b("e3"), b("e2")], t0));
        assert_eq!(blobs(&a), vec![b("e1"), b("e2"), b("e3")]);
        assert!(
            !a.merge_endpoints(&[b("e1")], t0),
            "a re-sent endpoint is not a change"
        );
    }

    #[test]
    fn endpoint_expiry_is_raised_never_lowered() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(60);
        let mut a = Affiliate::new(later);
        a.merge_endpoints(&[b("e1")], later);
        a.merge_endpoints(&[b("e1")], t0);
        assert_eq!(a.endpoints()[0].expiry, later);
        let latest = later + Duration::from_secs(1);
        a.merge_endpoints(&[b("e1")], latest);
        assert_eq!(a.endpoints()[0].expiry, latest);
    }

    #[test]
    fn data_sets_expiry_even_shorter_and_extend_only_raises() {
        let t0 = Instant::now();
        let mut a = Affiliate::new(t0 + Duration::from_secs(100));
        a.set_data(b"d", t0 + Duration::from_secs(10));
        assert_eq!(a.expiry(), t0 + Duration::from_secs(10));
        a.extend(t0 + Duration::from_secs(5));
        assert_eq!(a.expiry(), t0 + Duration::from_secs(10));
        a.extend(t0 + Duration::from_secs(50));
        assert_eq!(a.expiry(), t0 + Duration::from_secs(50));
    }

    #[test]
    fn sixty_fifth_distinct_endpoint_is_rejected_before_any_change() {
        let t0 = Instant::now();
        let mut a = Affiliate::new(t0);
        let first: Vec<Bytes> = (0..64).map(|i| b(&format!("e{i}"))).collect();
        a.check_endpoints(&first).unwrap();
        a.merge_endpoints(&first, t0);
        // Known endpoints and duplicates inside the request do not count.
        a.check_endpoints(&first).unwrap();
        assert_eq!(
            a.check_endpoints(&[b("e1"), b("new")]),
            Err(StateError::TooManyEndpoints)
        );
        let mut fresh = Affiliate::new(t0);
        let many: Vec<Bytes> = (0..65).map(|i| b(&format!("x{i}"))).collect();
        assert_eq!(
            fresh.check_endpoints(&many),
            Err(StateError::TooManyEndpoints)
        );
        let dup: Vec<Bytes> = (0..200).map(|i| b(&format!("x{}", i % 64))).collect();
        fresh.check_endpoints(&dup).unwrap();
        fresh.merge_endpoints(&dup, t0);
        assert_eq!(fresh.endpoints().len(), 64);
    }

    #[test]
    fn distinct_endpoints_keep_first_occurrences_and_stop_past_the_limit() {
        let short: Vec<Bytes> = ["a", "b", "a"].iter().map(|s| b(s)).collect();
        assert!(matches!(distinct_endpoints(&short), Cow::Borrowed(_)));
        // Repeats of 64 values: the 64, in first-occurrence order.
        let values: Vec<Bytes> = (0..64).map(|i| b(&format!("v{}", i * 7 % 64))).collect();
        let many: Vec<Bytes> = (0..10_000).map(|i| values[i % 64].clone()).collect();
        assert_eq!(distinct_endpoints(&many).as_ref(), values.as_slice());
        // A 65th distinct value anywhere: the result ends with it (and nothing after).
        let mut over = many.clone();
        over.insert(5_000, b("new"));
        over.push(b("later"));
        let d = distinct_endpoints(&over);
        assert_eq!(d.len(), AFFILIATE_ENDPOINTS_MAX + 1);
        assert_eq!(d[64], b("new"));
        // Which an affiliate refuses whatever it holds, and which merges like the
        // original request otherwise.
        let t0 = Instant::now();
        let mut a = Affiliate::new(t0);
        assert_eq!(a.check_endpoints(&d), Err(StateError::TooManyEndpoints));
        a.merge_endpoints(&values, t0);
        assert_eq!(a.check_endpoints(&d), Err(StateError::TooManyEndpoints));
        let mut plain = Affiliate::new(t0);
        plain.merge_endpoints(&many, t0);
        let mut deduped = Affiliate::new(t0);
        deduped.merge_endpoints(&distinct_endpoints(&many), t0);
        assert_eq!(blobs(&plain), blobs(&deduped));
    }

    #[test]
    fn restore_dedupes_in_order_and_caps_endpoints() {
        let t0 = Instant::now();
        let ep = |s: &str, secs: u64| Endpoint {
            blob: Blob::new(s.as_bytes()).unwrap(),
            expiry: t0 + Duration::from_secs(secs),
            ordinal: 0,
        };
        let mut eps = vec![ep("e1", 10), ep("e2", 10), ep("e1", 50), ep("e1", 5)];
        eps.extend((0..70).map(|i| ep(&format!("x{i}"), 10)));
        eps.push(ep("e2", 60));
        let (a, dropped) = Affiliate::restored(t0, Bytes::new(), eps);
        assert_eq!(
            dropped,
            DroppedEndpoints {
                duplicates: 3,
                over_limit: 8,
            }
        );
        assert_eq!(a.endpoints().len(), AFFILIATE_ENDPOINTS_MAX);
        let mut want = vec![b("e1"), b("e2")];
        want.extend((0..62).map(|i| b(&format!("x{i}"))));
        assert_eq!(blobs(&a), want);
        // Merged duplicates keep the later expiry, as a re-sent endpoint does.
        assert_eq!(a.endpoints()[0].expiry, t0 + Duration::from_secs(50));
        assert_eq!(a.endpoints()[1].expiry, t0 + Duration::from_secs(60));
    }

    #[test]
    fn endpoint_expires_on_its_own_and_affiliate_strictly_after_expiry() {
        let t0 = Instant::now();
        let mut a = Affiliate::new(t0 + Duration::from_secs(60));
        a.merge_endpoints(&[b("old")], t0 + Duration::from_secs(10));
        a.merge_endpoints(&[b("new")], t0 + Duration::from_secs(60));
        assert_eq!(a.collect(t0 + Duration::from_secs(9)), Collected::Unchanged);
        assert_eq!(
            a.collect(t0 + Duration::from_secs(10)),
            Collected::LostEndpoints
        );
        assert_eq!(blobs(&a), vec![b("new")]);
        // At exactly its expiry the affiliate stays (strict comparison), its endpoint goes.
        assert_eq!(
            a.collect(t0 + Duration::from_secs(60)),
            Collected::LostEndpoints
        );
        assert!(a.endpoints().is_empty());
        assert_eq!(
            a.collect(t0 + Duration::from_secs(60) + Duration::from_nanos(1)),
            Collected::Expired
        );
    }

    #[test]
    fn blobs_are_inline_and_bounded() {
        assert_eq!(Blob::new(&[1; 32]).unwrap().as_slice(), &[1; 32]);
        assert!(Blob::new(&[1; 33]).is_none());
        assert_eq!(Blob::new(b"").unwrap().to_bytes(), Bytes::new());
        assert!(std::mem::size_of::<Endpoint>() <= 56);
    }

    #[test]
    fn stored_blobs_do_not_share_the_request_buffer() {
        let t0 = Instant::now();
        let request = Bytes::from(vec![7u8; 4096]);
        let mut a = Affiliate::new(t0);
        a.merge_endpoints(&[request.slice(0..16)], t0);
        a.set_data(&request[..100], t0);
        // A shared slice would point into the request allocation.
        let range = request.as_ptr_range();
        assert!(!range.contains(&a.data().as_ptr()));
        assert_eq!(a.endpoints()[0].blob.as_slice(), &request[..16]);
    }

    #[test]
    fn same_length_data_is_overwritten_in_place_unless_shared() {
        let t0 = Instant::now();
        let mut a = Affiliate::new(t0);
        a.set_data(b"first", t0);
        let at = a.data().as_ptr();
        a.set_data(b"other", t0);
        assert_eq!((a.data().as_ref(), a.data().as_ptr()), (&b"other"[..], at));
        let held = a.data().clone();
        a.set_data(b"third", t0);
        assert_eq!(
            held,
            Bytes::from_static(b"other"),
            "a held copy never changes"
        );
        assert_eq!(a.data().as_ref(), b"third");
        a.set_data(b"longer data", t0);
        assert_eq!(a.data().as_ref(), b"longer data");
    }
}
