//! Affiliates' data, which a replica's mirror does not hold: etcd is the copy, and
//! holding the data in every replica as well would make a replica larger than the
//! memory backend for the same clusters. It is read from etcd when something needs it:
//! a Watch's snapshot, a List or the inspect page ([`fill`]), watchers told of a
//! change that did not write the affiliate's key ([`at_revisions`]), and a refresh
//! that writes the stored data again ([`current`]).
//!
//! Every read names the version it wants by revision, so what it returns is the data
//! the mirror's view of the affiliate was written with, never a later one.

use std::collections::HashMap;

use bytes::Bytes;
use futures::StreamExt;

use super::applier::{Fetched, Wanted, decode_affiliate};
use super::client::{CallError, EtcdClient, Unavailable};
use super::keys::{Key, Layout};
use super::proto::etcdserverpb as pb;
use super::proto::mvccpb;
use crate::state::AffiliateView;

/// Reads issued at once by [`at_revisions`].
const CONCURRENT_READS: usize = 16;

/// Fills in the data of views taken from the mirror, each with the revision its
/// affiliate's key was written at. `seen` is a revision the mirror had applied before
/// they were taken: at any revision from the newest of the views' to the one the
/// mirror had applied when they were taken, every key holds the version the view was
/// taken from (the mirror skips no write of an affiliate key: one it cannot read ends
/// the affiliate), and reading at the later of `seen` and that newest one reads inside
/// that span, as recent as is known to be.
///
/// Reads the cluster's affiliate keys at the latest revision first, where usually
/// nothing changed since; if some key did, reads them all again at that revision. That
/// read fails with OUT_OF_RANGE if etcd compacted the revision away, which only
/// happens if the mirror is further behind than etcd keeps history: the caller takes
/// the views again once it has caught up.
pub async fn fill(
    client: &EtcdClient,
    layout: &Layout,
    cluster: &str,
    stored: Vec<(AffiliateView, i64)>,
    seen: i64,
) -> Result<Vec<AffiliateView>, CallError> {
    let Some(newest) = stored.iter().map(|(_, r)| *r).max() else {
        return Ok(Vec::new());
    };
    let as_seen = newest.max(seen);
    let mut stored = stored;
    let by_id: HashMap<String, usize> = stored
        .iter()
        .enumerate()
        .map(|(i, (v, _))| (v.id.clone(), i))
        .collect();
    let mut filled = vec![false; stored.len()];
    for at in [0, as_seen] {
        let kvs = affiliate_keys(client, layout, cluster, at).await?;
        let mut id = String::new();
        for kv in &kvs {
            let Some(Key::Affiliate { affiliate, .. }) = layout.parse(&kv.key) else {
                continue;
            };
            let Some(&i) = by_id.get(affiliate.decode_into(&mut id)) else {
                continue;
            };
            let (view, revision) = &mut stored[i];
            if kv.mod_revision != *revision || filled[i] {
                continue;
            }
            if let Some(value) = decode_affiliate(&kv.value, &kv.key) {
                view.data = value.data;
                filled[i] = true;
            }
        }
        if filled.iter().all(|f| *f) {
            return Ok(stored.into_iter().map(|(v, _)| v).collect());
        }
    }
    Err(CallError::Unavailable(Unavailable(format!(
        "cluster {cluster}: etcd has no version of some affiliate as this replica last saw it \
         (revision {as_seen})"
    ))))
}

/// The cluster's affiliate keys with their values at `revision` (0: the latest).
async fn affiliate_keys(
    client: &EtcdClient,
    layout: &Layout,
    cluster: &str,
    revision: i64,
) -> Result<Vec<mvccpb::KeyValue>, CallError> {
    let (key, range_end) = layout.affiliates(cluster);
    // At most the cluster limit of keys, each well under the message limit: one page.
    let req = pb::RangeRequest {
        key: key.into(),
        range_end: range_end.into(),
        revision,
        ..Default::default()
    };
    Ok(client.range(req).await?.kvs)
}

/// Reads each wanted affiliate's data as it was at its revision, some at a time. What
/// cannot be read (etcd away, compacted, the key gone) is left out: the applier then
/// ends the watchers that needed it.
pub async fn at_revisions(client: &EtcdClient, layout: &Layout, wanted: Vec<Wanted>) -> Fetched {
    futures::stream::iter(wanted)
        .map(|w| async move {
            let req = pb::RangeRequest {
                key: layout.affiliate(&w.cluster, &w.affiliate).into(),
                revision: w.revision,
                ..Default::default()
            };
            let kv = client.range(req).await.ok()?.kvs.into_iter().next()?;
            let value = decode_affiliate(&kv.value, &kv.key)?;
            // A copy: the response's buffer is not kept for it.
            Some((w, Bytes::copy_from_slice(&value.data)))
        })
        .buffer_unordered(CONCURRENT_READS)
        .filter_map(std::future::ready)
        .collect()
        .await
}

/// What the affiliate's key holds now, against the version the mirror saw.
#[derive(Debug, PartialEq, Eq)]
pub enum Current {
    /// Its latest version is the one written at the revision asked: its data.
    Data(Bytes),
    /// It changed or went since (the mirror is behind).
    Changed,
    /// Its latest value is none this server writes (another program's): the mirror
    /// takes it for no affiliate, and no update can be planned past it.
    Foreign,
}

/// The data of the affiliate's key if its latest version is the one written at
/// `revision`.
pub async fn current(
    client: &EtcdClient,
    layout: &Layout,
    cluster: &str,
    affiliate: &str,
    revision: i64,
) -> Result<Current, CallError> {
    let req = pb::RangeRequest {
        key: layout.affiliate(cluster, affiliate).into(),
        ..Default::default()
    };
    let Some(kv) = client.range(req).await?.kvs.into_iter().next() else {
        return Ok(Current::Changed);
    };
    Ok(match decode_affiliate(&kv.value, &kv.key) {
        None => Current::Foreign,
        Some(_) if kv.mod_revision != revision => Current::Changed,
        Some(v) => Current::Data(v.data),
    })
}
