//! Updates and deletes as etcd transactions, planned from the mirror.
//!
//! An update reads the affiliate and the cluster's size from the mirror, checks the
//! limits exactly as the memory backend does, and writes the result in one transaction
//! that holds only if the affiliate's key is still at the revision the plan saw (and,
//! when it creates the affiliate, the cluster's guard key too: every creation rewrites
//! it, so two replicas cannot both pass the 1024 check). A failed condition means the
//! mirror was behind: wait until it has caught up with etcd and plan again (unless the
//! key holds a value another program wrote, which no attempt can pass). Nothing is
//! acknowledged before the mirror holds it, so a List or Watch on the same replica
//! right after sees the write.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio_util::sync::CancellationToken;

use super::batch::{Batcher, Outcome};
use super::client::{CallError, EtcdClient, EtcdOptions, Unavailable};
use super::clock;
use super::data;
use super::keys::{AffiliateValue, EndpointValue, Layout};
use super::leases::Leases;
use super::mirror::Mirror;
use super::proto::etcdserverpb::{self as pb, compare, request_op};
use super::proto::mvccpb;
use crate::limits::{CLUSTER_AFFILIATES_MAX, ETCD_CALL_DEADLINE, ETCD_OVERDUE_GRACE};
use crate::state::{AffiliateView, Blob, State, StateError, Subscription, Update, affiliate};

/// Why an update or delete did not happen.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Limit(#[from] StateError),
    #[error(transparent)]
    Unavailable(#[from] Unavailable),
    #[error("etcd refused the transaction: {0}")]
    Rejected(String),
}

impl From<WriteError> for tonic::Status {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Limit(e) => crate::backend::limit(e),
            WriteError::Unavailable(u) => u.into(),
            WriteError::Rejected(m) => {
                tonic::Status::internal(format!("etcd refused the request: {m}"))
            }
        }
    }
}

impl From<CallError> for WriteError {
    fn from(e: CallError) -> Self {
        match e {
            CallError::Unavailable(u) => Self::Unavailable(u),
            CallError::Rejected(s) => Self::Rejected(s.message().to_owned()),
        }
    }
}

/// The etcd backend of one replica: its client, its mirror and its leases.
#[derive(Debug)]
pub struct EtcdState {
    client: EtcdClient,
    layout: Layout,
    mirror: Arc<Mirror>,
    leases: Leases,
    batcher: Batcher,
}

impl EtcdState {
    /// Connects, reads everything once and starts following etcd; fails if etcd cannot
    /// be read before the deadline, naming the endpoints.
    pub async fn start(
        options: &EtcdOptions,
        prefix: &str,
        state: State,
        stop: CancellationToken,
    ) -> anyhow::Result<(Arc<Self>, tokio::task::JoinHandle<()>)> {
        let client = EtcdClient::new(options)?;
        let layout = Layout::new(prefix);
        let mirror = Mirror::new(state, layout.clone(), client.clone(), options.quiet_mark);
        let revision = mirror.load().await.map_err(|e| {
            anyhow::anyhow!(
                "cannot read the state from etcd at {}: {e}",
                options.endpoints.join(",")
            )
        })?;
        tracing::info!(revision, endpoints = %options.endpoints.join(","), prefix, "state loaded from etcd");
        let task = tokio::spawn(mirror.clone().run(stop));
        Ok((
            Arc::new(Self {
                client: client.clone(),
                layout,
                mirror,
                leases: Leases::new(options.lease_bucket),
                batcher: Batcher::start(client.clone()),
            }),
            task,
        ))
    }

    /// This replica's mirror of etcd: what List and Watch serve, and the pages show.
    pub fn state(&self) -> &State {
        self.mirror.state()
    }

    /// How the mirror follows etcd (for `/metrics`).
    pub fn progress(&self) -> super::mirror::Progress {
        self.mirror.progress()
    }

    /// AffiliateUpdate with expiry `expiry` (request time + TTL), same rules as memory.
    pub async fn update(
        &self,
        cluster: &str,
        u: &Update<'_>,
        expiry: Instant,
    ) -> Result<(), WriteError> {
        let endpoints = affiliate::distinct_endpoints(u.endpoints);
        let expiry_ms = clock::unix_ms(expiry);
        let mut last = String::new();
        // Every conflict means another update went through, so this ends; the
        // deadline only bounds a pathological pile-up on one cluster.
        let deadline = tokio::time::Instant::now() + ETCD_CALL_DEADLINE;
        let mut caught_up = false;
        while tokio::time::Instant::now() < deadline {
            let now_ms = clock::now_ms();
            let mut view = self.state().write_view(cluster, u.affiliate_id);
            let plan = match Plan::new(&view, u.data, &endpoints, expiry_ms, self.leases.width()) {
                Ok(plan) => plan,
                // The mirror may be behind a delete elsewhere: refuse only once it has
                // caught up with etcd.
                Err(e) if !caught_up => {
                    self.mirror.barrier().await?;
                    caught_up = true;
                    last = e.to_string();
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            // A write without data stores the affiliate's data again, which the
            // mirror does not hold: read it, as of the version the plan is for.
            if let Some(a) = view.current.as_mut().filter(|_| plan.rewrites_data()) {
                let read = data::current(
                    &self.client,
                    &self.layout,
                    cluster,
                    u.affiliate_id,
                    a.revision(),
                );
                let stored = match read.await? {
                    data::Current::Data(stored) => stored,
                    // The mirror is behind a later write: catch up, plan again.
                    data::Current::Changed => {
                        self.mirror.barrier().await?;
                        last = "the affiliate kept changing concurrently".into();
                        continue;
                    }
                    data::Current::Foreign => return Err(foreign(cluster, u.affiliate_id)),
                };
                let expiry = a.expiry();
                a.set_data(&stored, expiry);
            }
            let txn = self
                .transaction(cluster, u.affiliate_id, &view, &plan, now_ms)
                .await?;
            // The transaction, if it lands, lands after this revision.
            let sent_after = self.mirror.applied();
            match self.batcher.commit(txn).await {
                // Nothing written: the condition held, so the mirror already has it all.
                Ok(Outcome::Committed(_)) if plan.changes_nothing => return Ok(()),
                Ok(Outcome::Committed(revision)) => {
                    return Ok(self.mirror.wait_for(revision).await?);
                }
                Ok(Outcome::Conflict(seen)) => {
                    // The mirror was behind etcd: catch up, then plan again.
                    last = "the affiliate or its cluster kept changing concurrently".into();
                    match seen {
                        Some(revision) if revision > self.mirror.applied() => {
                            self.mirror.wait_for(revision).await?
                        }
                        // Already applied, or a key is gone: catch up with everything.
                        _ => self.mirror.barrier().await?,
                    }
                    // A condition also fails when this very write already landed: an
                    // attempt whose answer was lost (its member answered too late) was
                    // sent again. Then it is done; writing it again would tell watchers
                    // twice, and undo any write that came after it. The mirror shows
                    // a write without data; etcd's history of the key shows one with
                    // data (the mirror holds none), or one another write followed.
                    let now = self.state().write_view(cluster, u.affiliate_id);
                    if plan.landed(&now)
                        || self
                            .landed_in_history(cluster, u.affiliate_id, &view, &plan, sent_after)
                            .await
                    {
                        return Ok(());
                    }
                    // Caught up with the change that failed the condition, yet the
                    // mirror holds the same versions: it may have been a value the
                    // mirror takes for no affiliate (another program's). Then every
                    // attempt would fail the same way: say so now.
                    if seen.is_some()
                        && compared(&now) == compared(&view)
                        && data::current(&self.client, &self.layout, cluster, u.affiliate_id, 0)
                            .await?
                            == data::Current::Foreign
                    {
                        return Err(foreign(cluster, u.affiliate_id));
                    }
                }
                Err(CallError::Rejected(s)) if s.message().contains("lease not found") => {
                    last = s.message().to_owned();
                    self.leases
                        .forget_unknown(&self.client, plan.lease_expiries(), now_ms)
                        .await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(WriteError::Unavailable(Unavailable(format!(
            "no update went through within {ETCD_CALL_DEADLINE:?}: {last}"
        ))))
    }

    /// Whether the transaction of `plan` (planned from `view`) landed after revision
    /// `after`: some version of the affiliate's key since then holds exactly its value,
    /// and each endpoint it wrote holds its value at that same revision. Reads etcd's
    /// history of the key, newest first, for at most `HISTORY_STEPS` versions;
    /// anything it cannot read (compacted, deleted since, etcd away) counts as not
    /// landed, and the update is written again, as before this check. Only called
    /// after a conflict, so the common path reads nothing.
    async fn landed_in_history(
        &self,
        cluster: &str,
        affiliate_id: &str,
        view: &crate::state::WriteView,
        plan: &Plan<'_>,
        after: i64,
    ) -> bool {
        /// Writes to one affiliate between an attempt and its retry: a couple at most.
        const HISTORY_STEPS: usize = 8;
        let value = plan.affiliate_value(view);
        let key = Bytes::from(self.layout.affiliate(cluster, affiliate_id));
        let mut at = 0; // The latest revision.
        for _ in 0..HISTORY_STEPS {
            let Some(kv) = self.version_at(key.clone(), at).await else {
                return false;
            };
            if kv.mod_revision <= after {
                return false;
            }
            if kv.value == value[..]
                && self
                    .endpoints_written_at(cluster, affiliate_id, plan, kv.mod_revision)
                    .await
            {
                return true;
            }
            // The version before this one; revision 0 would mean the latest.
            at = kv.mod_revision - 1;
            if at <= after {
                return false;
            }
        }
        false
    }

    /// Whether each endpoint `plan` writes was written at `revision`, with its value.
    async fn endpoints_written_at(
        &self,
        cluster: &str,
        affiliate_id: &str,
        plan: &Plan<'_>,
        revision: i64,
    ) -> bool {
        for e in &plan.endpoints {
            let key = self.layout.endpoint(cluster, affiliate_id, &e.blob).into();
            let written = self.version_at(key, revision).await;
            if !written
                .is_some_and(|w| w.mod_revision == revision && w.value == e.value().encode()[..])
            {
                return false;
            }
        }
        true
    }

    /// The version of `key` at `revision` (0: the latest), if it existed and etcd could
    /// be read.
    async fn version_at(&self, key: Bytes, revision: i64) -> Option<mvccpb::KeyValue> {
        let req = pb::RangeRequest {
            key,
            revision,
            ..Default::default()
        };
        let r = self.client.range(req).await.ok()?;
        r.kvs.into_iter().next()
    }

    /// The update's transaction. Its keys and the endpoints' values are written into
    /// one buffer and shared from it: one allocation for all of them, and the
    /// batcher's copy of the request only counts references. The affiliate's value
    /// is built apart (see below).
    async fn transaction(
        &self,
        cluster: &str,
        affiliate_id: &str,
        view: &crate::state::WriteView,
        plan: &Plan<'_>,
        now_ms: i64,
    ) -> Result<pb::TxnRequest, WriteError> {
        let revision = view.current.as_ref().map_or(0, |a| a.revision());
        let layout = &self.layout;
        if plan.changes_nothing {
            // Only check that the affiliate is still what the plan saw: a read.
            let key = layout.affiliate(cluster, affiliate_id);
            return Ok(conditional(
                vec![mod_revision_is(key.into(), revision)],
                Vec::new(),
            ));
        }
        let aff_lease = self
            .leases
            .for_expiry(&self.client, plan.expiry_ms, now_ms)
            .await?;
        let creates = view.current.is_none();
        let len = layout.affiliate_len(cluster, affiliate_id)
            + if creates {
                layout.guard_len(cluster)
            } else {
                0
            }
            + plan
                .endpoints
                .iter()
                .map(|e| layout.endpoint_len(cluster, affiliate_id, &e.blob) + EndpointValue::LEN)
                .sum::<usize>();
        // Each piece is written, then split off the buffer (sharing it).
        let mut buf = BytesMut::with_capacity(len);
        layout.put_affiliate(&mut buf, cluster, affiliate_id);
        let aff_key = buf.split().freeze();
        // The value, up to the data limit, is built apart: the keys' buffer stays
        // small, and is freed with the request.
        let aff_value = Bytes::from(plan.affiliate_value(view));
        let mut compare = Vec::with_capacity(1 + usize::from(creates));
        let mut ops = Vec::with_capacity(1 + usize::from(creates) + plan.endpoints.len());
        compare.push(mod_revision_is(aff_key.clone(), revision));
        ops.push(put(aff_key, aff_value, aff_lease));
        if creates {
            layout.put_guard(&mut buf, cluster);
            let guard = buf.split().freeze();
            compare.push(mod_revision_is(guard.clone(), view.guard_revision));
            // No lease: a guard that expired while its cluster still had affiliates
            // would make "no guard" (revision 0) come back, and a creation planned
            // before a later one would then pass its check (ABA) and overrun the
            // limit. Only `retire_guards` deletes it, once the cluster is empty.
            ops.push(put(guard, Bytes::new(), 0));
        }
        for e in &plan.endpoints {
            // An endpoint never outlives its affiliate's lease: it goes with it, as in
            // the memory backend, and no orphan is left behind.
            let lease_expiry = e.expiry_ms.min(plan.expiry_ms);
            let lease = self
                .leases
                .for_expiry(&self.client, lease_expiry, now_ms)
                .await?;
            layout.put_endpoint(&mut buf, cluster, affiliate_id, &e.blob);
            let key = buf.split().freeze();
            e.value().put(&mut buf);
            ops.push(put(key, buf.split().freeze(), lease));
        }
        debug_assert!(buf.is_empty() && buf.capacity() == 0, "sized exactly");
        Ok(conditional(compare, ops))
    }

    /// AffiliateDelete: the affiliate and its endpoints, in one revision.
    pub async fn delete(&self, cluster: &str, affiliate_id: &str) -> Result<(), WriteError> {
        let (start, end) = self.layout.endpoints(cluster, affiliate_id);
        let txn = pb::TxnRequest {
            compare: Vec::new(),
            success: vec![
                delete(self.layout.affiliate(cluster, affiliate_id), Vec::new()),
                delete(start, end),
            ],
            failure: Vec::new(),
        };
        let r = self.client.txn(txn).await?;
        let deleted: i64 = r
            .responses
            .iter()
            .filter_map(|op| match &op.response {
                Some(pb::response_op::Response::ResponseDeleteRange(d)) => Some(d.deleted),
                _ => None,
            })
            .sum();
        // Deleting nothing makes no revision to wait for; the mirror may still hold
        // what another replica (or an earlier attempt of this call) deleted.
        if deleted == 0 {
            return Ok(self.mirror.barrier().await?);
        }
        let revision = r.header.map(|h| h.revision).unwrap_or(0);
        Ok(self.mirror.wait_for(revision).await?)
    }

    /// Deletes the guard key of every cluster this replica sees empty, each in a
    /// transaction that holds only while the cluster has no affiliate key and the
    /// guard is the one seen: a cluster in use keeps its guard for as long as it has
    /// affiliates, and an empty one leaves nothing in etcd. Every replica's GC pass does
    /// this; the first transaction deletes, the others find the guard gone.
    pub async fn retire_guards(&self) {
        for (cluster, c) in self.state().clusters() {
            let Some(revision) = c.empty_guard() else {
                continue;
            };
            let (start, end) = self.layout.affiliates(&cluster);
            let guard = self.layout.guard(&cluster);
            let txn = conditional(
                vec![
                    mod_revision_is(guard.clone().into(), revision),
                    pb::Compare {
                        result: compare::CompareResult::Equal as i32,
                        target: compare::CompareTarget::Create as i32,
                        key: start.into(),
                        range_end: end.into(),
                        target_union: Some(compare::TargetUnion::CreateRevision(0)),
                    },
                ],
                vec![delete(guard, Vec::new())],
            );
            match self.client.txn(txn).await {
                Ok(_) => {}
                // etcd is away: the next pass tries again.
                Err(CallError::Unavailable(e)) => {
                    tracing::debug!(error = %e, "cannot retire guard keys now");
                    return;
                }
                Err(e @ CallError::Rejected(_)) => {
                    tracing::warn!(cluster, error = %e, "cannot retire an empty cluster's guard key");
                }
            }
        }
    }

    /// Deletes what a lease should have removed but has not: each affiliate, or
    /// endpoint of a live one, whose stored expiry passed more than a bucket and
    /// [`ETCD_OVERDUE_GRACE`] ago. etcd restarts every lease's full TTL when its leader
    /// changes unless lease checkpointing is on (and persisted, which etcd 3.4
    /// cannot), so without this pass a node that left could be announced for up to the
    /// longest TTL longer. Each deletion holds only while what it deletes is as the
    /// mirror saw it: the affiliate key's revision, and each endpoint's stored value,
    /// so an update racing with it wins. Returns how many affiliates it deleted whole
    /// and how many endpoints of live ones.
    pub async fn expire_overdue(&self) -> (usize, usize) {
        // Until the mirror follows a step of the wall clock, its expiries are on the
        // old scale: after a step back, live affiliates would look overdue.
        if clock::stepped() {
            return (0, 0);
        }
        let grace = Duration::from_secs(self.leases.width().unsigned_abs()) + ETCD_OVERDUE_GRACE;
        let Some(cutoff) = Instant::now().checked_sub(grace) else {
            return (0, 0);
        };
        let (mut affiliates, mut endpoints) = (0, 0);
        for (cluster, c) in self.state().clusters() {
            for o in c.overdue(cutoff) {
                let key = self.layout.affiliate(&cluster, &o.id);
                let mut compare = vec![mod_revision_is(key.clone().into(), o.revision)];
                let ops = if o.endpoints.is_empty() {
                    let (start, end) = self.layout.endpoints(&cluster, &o.id);
                    vec![delete(key, Vec::new()), delete(start, end)]
                } else {
                    let mut ops = Vec::with_capacity(o.endpoints.len());
                    for e in &o.endpoints {
                        let key = self.layout.endpoint(&cluster, &o.id, &e.blob);
                        let stored = EndpointValue {
                            ordinal: e.ordinal,
                            expiry_ms: clock::unix_ms(e.expiry),
                        };
                        compare.push(value_is(key.clone().into(), stored.encode().into()));
                        ops.push(delete(key, Vec::new()));
                    }
                    ops
                };
                match self.client.txn(conditional(compare, ops)).await {
                    Ok(r) if r.succeeded && o.endpoints.is_empty() => affiliates += 1,
                    Ok(r) if r.succeeded => endpoints += o.endpoints.len(),
                    // Changed since the mirror saw it: the next pass looks again.
                    Ok(_) => {}
                    // etcd is away: the next pass tries again.
                    Err(CallError::Unavailable(e)) => {
                        tracing::debug!(error = %e, "cannot delete overdue keys now");
                        return (affiliates, endpoints);
                    }
                    Err(e @ CallError::Rejected(_)) => {
                        tracing::warn!(cluster, error = %e, "cannot delete an overdue affiliate's keys");
                    }
                }
            }
        }
        (affiliates, endpoints)
    }

    /// List, after catching up with etcd; the data read from etcd ([`data::fill`]).
    pub async fn list(&self, cluster: &str) -> Result<Vec<AffiliateView>, Unavailable> {
        self.mirror.barrier().await?;
        self.list_filled(cluster, true).await
    }

    /// List as this replica's mirror holds it, without catching up with etcd first:
    /// for the inspect page, which anyone may load, so loading it writes nothing to
    /// etcd (catching up writes a marker). The data is read from etcd all the same.
    pub async fn list_as_mirrored(&self, cluster: &str) -> Result<Vec<AffiliateView>, Unavailable> {
        self.list_filled(cluster, false).await
    }

    async fn list_filled(
        &self,
        cluster: &str,
        catch_up: bool,
    ) -> Result<Vec<AffiliateView>, Unavailable> {
        let take = || (self.state().list_stored(cluster), ());
        let (views, ()) = self.with_data(cluster, catch_up, take).await?;
        Ok(views)
    }

    /// Snapshot and subscription, after catching up with etcd; the snapshot's data
    /// read from etcd ([`data::fill`]).
    pub async fn watch(
        &self,
        cluster: &str,
        capacity: usize,
    ) -> Result<(Vec<AffiliateView>, Subscription), Unavailable> {
        self.mirror.barrier().await?;
        self.with_data(cluster, true, || {
            self.state().watch_stored(cluster, capacity)
        })
        .await
    }

    /// Takes views from the mirror with `take` and fills in their data. If etcd
    /// compacted the revision they were taken at meanwhile (a mirror far behind),
    /// takes them again, after catching up with etcd if `catch_up` (which writes a
    /// marker; the inspect page does not).
    async fn with_data<T>(
        &self,
        cluster: &str,
        catch_up: bool,
        take: impl Fn() -> (Vec<(AffiliateView, i64)>, T),
    ) -> Result<(Vec<AffiliateView>, T), Unavailable> {
        const TRIES: usize = 3;
        let mut tries = 0;
        loop {
            // Read before taking: the mirror had applied at least this much then.
            let seen = self.mirror.applied();
            let (stored, rest) = take();
            match data::fill(&self.client, &self.layout, cluster, stored, seen).await {
                Ok(views) => return Ok((views, rest)),
                Err(CallError::Rejected(s))
                    if s.code() == tonic::Code::OutOfRange && tries < TRIES =>
                {
                    tries += 1;
                    // A subscription taken with them ends now: its cluster is not
                    // watched while the replica catches up.
                    drop(rest);
                    if catch_up {
                        self.mirror.barrier().await?;
                    }
                }
                Err(e) => return Err(Unavailable(e.to_string())),
            }
        }
    }
}

/// The versions of the keys an update's condition compares, as the mirror holds them.
fn compared(view: &crate::state::WriteView) -> (Option<i64>, i64) {
    (
        view.current.as_ref().map(|a| a.revision()),
        view.guard_revision,
    )
}

/// An affiliate's key holds a value another program wrote, which the mirror takes for
/// no affiliate: no update of it goes through (it would overwrite what it cannot read)
/// until that value is deleted.
fn foreign(cluster: &str, affiliate: &str) -> WriteError {
    WriteError::Rejected(format!(
        "affiliate {affiliate:?} of cluster {cluster:?}: its key holds a value this server did \
         not write; is another program writing under the etcd prefix?"
    ))
}

/// One endpoint write of an update.
#[derive(Debug, Clone, PartialEq, Eq)]
struct EndpointWrite {
    blob: Blob,
    ordinal: u16,
    expiry_ms: i64,
}

impl EndpointWrite {
    /// What the endpoint's key holds once written.
    fn value(&self) -> EndpointValue {
        EndpointValue {
            ordinal: self.ordinal,
            expiry_ms: self.expiry_ms,
        }
    }
}

/// What an update writes, computed from the mirror's view with the memory backend's
/// rules (data replaces and sets the expiry; otherwise the expiry only rises; each
/// endpoint's expiry only rises; new endpoints are appended). Pure.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Plan<'d> {
    /// The request's data, when it carries some.
    data: Option<&'d [u8]>,
    expiry_ms: i64,
    endpoints: Vec<EndpointWrite>,
    /// A refresh that changes nothing etcd would see (no data, no new endpoint, every
    /// lease bucket the same): nothing is written, and watchers hear nothing, as in
    /// memory.
    changes_nothing: bool,
}

impl<'d> Plan<'d> {
    /// The affiliate key's value the plan writes, exactly its size. Without new data
    /// the stored data (read from etcd into the view) is written again.
    fn affiliate_value(&self, view: &crate::state::WriteView) -> Vec<u8> {
        let data = self
            .data
            .or_else(|| view.current.as_ref().map(|a| a.data().as_ref()))
            .unwrap_or_default();
        let mut value = Vec::with_capacity(AffiliateValue::len(data));
        AffiliateValue::put(&mut value, self.data.is_some(), self.expiry_ms, data);
        value
    }

    fn new(
        view: &crate::state::WriteView,
        data: &'d [u8],
        endpoints: &[bytes::Bytes],
        expiry_ms: i64,
        bucket_width: i64,
    ) -> Result<Self, StateError> {
        let bucket_end = |ms| super::leases::bucket_end(ms, bucket_width);
        let created;
        let current = match &view.current {
            Some(a) => a,
            None => {
                if view.affiliates >= CLUSTER_AFFILIATES_MAX {
                    return Err(StateError::TooManyAffiliates);
                }
                created = crate::state::Affiliate::new(clock::instant(expiry_ms));
                &created
            }
        };
        current.check_endpoints(endpoints)?;
        let data = (!data.is_empty()).then_some(data);
        let old_expiry = clock::unix_ms(current.expiry());
        let aff_expiry = if data.is_some() || view.current.is_none() {
            expiry_ms
        } else {
            old_expiry.max(expiry_ms)
        };
        let known = current.endpoints();
        let mut writes = Vec::new();
        let mut appended = 0u16;
        // Endpoints the request does not name keep their value, but their lease may
        // have to follow the affiliate's (it never outlives it).
        for e in known {
            let own = clock::unix_ms(e.expiry);
            let named = endpoints.iter().any(|b| b.as_ref() == e.blob.as_slice());
            let new_own = if named { own.max(expiry_ms) } else { own };
            let old_lease = bucket_end(own.min(old_expiry));
            let new_lease = bucket_end(new_own.min(aff_expiry));
            if new_lease != old_lease || (named && bucket_end(new_own) != bucket_end(own)) {
                // Its stored ordinal, unchanged: a full read orders endpoints by
                // creation revision, then ordinal.
                writes.push(EndpointWrite {
                    blob: e.blob,
                    ordinal: e.ordinal,
                    expiry_ms: new_own,
                });
            }
        }
        for b in endpoints {
            if known.iter().any(|e| e.blob.as_slice() == b.as_ref())
                || writes.iter().any(|w| w.blob.as_slice() == b.as_ref())
            {
                continue;
            }
            // The RPC layer refuses longer blobs; the memory backend skips them too.
            let Some(blob) = Blob::new(b) else {
                continue;
            };
            // Its place among the endpoints this update creates (they share a
            // creation revision).
            writes.push(EndpointWrite {
                blob,
                ordinal: appended,
                expiry_ms,
            });
            appended += 1;
        }
        let changes_nothing = view.current.is_some()
            && data.is_none()
            && writes.is_empty()
            && bucket_end(aff_expiry) == bucket_end(old_expiry);
        Ok(Self {
            data,
            expiry_ms: aff_expiry,
            endpoints: writes,
            changes_nothing,
        })
    }

    /// Whether the affiliate already holds everything this plan, which writes no data,
    /// writes: its expiry to the millisecond and every endpoint it writes with that
    /// endpoint's expiry. Another request's write matches only if it wrote the same at the same
    /// millisecond; then acknowledging leaves the state as writing would, with one
    /// notification fewer.
    fn landed(&self, view: &crate::state::WriteView) -> bool {
        let Some(a) = &view.current else {
            return false;
        };
        // The mirror holds no data: a write with data is looked for in etcd's history.
        self.data.is_none()
            && clock::unix_ms(a.expiry()) == self.expiry_ms
            && self.endpoints.iter().all(|w| {
                a.endpoints()
                    .iter()
                    .any(|e| e.blob == w.blob && clock::unix_ms(e.expiry) == w.expiry_ms)
            })
    }

    /// Whether the plan writes the affiliate's key without new data, so with the data
    /// it holds.
    fn rewrites_data(&self) -> bool {
        self.data.is_none() && !self.changes_nothing
    }

    /// The expiries whose leases this plan uses.
    fn lease_expiries(&self) -> Vec<i64> {
        let mut v = vec![self.expiry_ms];
        v.extend(
            self.endpoints
                .iter()
                .map(|e| e.expiry_ms.min(self.expiry_ms)),
        );
        v
    }
}

/// A transaction of conditions and writes; the batcher adds the read-back.
fn conditional(compare: Vec<pb::Compare>, success: Vec<pb::RequestOp>) -> pb::TxnRequest {
    pb::TxnRequest {
        compare,
        success,
        failure: Vec::new(),
    }
}

fn mod_revision_is(key: Bytes, revision: i64) -> pb::Compare {
    pb::Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Mod as i32,
        key,
        range_end: Default::default(),
        target_union: Some(compare::TargetUnion::ModRevision(revision)),
    }
}

fn value_is(key: Bytes, value: Bytes) -> pb::Compare {
    pb::Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Value as i32,
        key,
        range_end: Default::default(),
        target_union: Some(compare::TargetUnion::Value(value)),
    }
}

fn put(key: Bytes, value: Bytes, lease: i64) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(request_op::Request::RequestPut(pb::PutRequest {
            key,
            value,
            lease,
            ..Default::default()
        })),
    }
}

fn delete(key: Vec<u8>, range_end: Vec<u8>) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(request_op::Request::RequestDeleteRange(
            pb::DeleteRangeRequest {
                key: key.into(),
                range_end: range_end.into(),
                ..Default::default()
            },
        )),
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::state::{Affiliate, WriteView};

    const W: i64 = 5;
    const T0: i64 = 1_700_000_000_000;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    /// An affiliate as the mirror would hold it: expiry, endpoints with expiries, and
    /// no data.
    fn stored(expiry_ms: i64, eps: &[(&str, i64)]) -> Affiliate {
        let mut a = Affiliate::new(clock::instant(expiry_ms));
        a.set_stored(clock::instant(expiry_ms), 7);
        for (i, (e, exp)) in eps.iter().enumerate() {
            a.put_endpoint(
                crate::state::Blob::new(e.as_bytes()).unwrap(),
                clock::instant(*exp),
                i as u16,
            );
        }
        a
    }

    fn view(current: Option<Affiliate>, affiliates: usize) -> WriteView {
        WriteView {
            affiliates,
            guard_revision: 3,
            current,
        }
    }

    fn blobs(p: &Plan) -> Vec<(String, u16)> {
        p.endpoints
            .iter()
            .map(|e| (String::from_utf8(e.blob.to_vec()).unwrap(), e.ordinal))
            .collect()
    }

    #[test]
    fn a_new_affiliate_takes_the_request_as_is_in_order() {
        let p = Plan::new(&view(None, 0), b"d", &[b("e2"), b("e1")], T0, W).unwrap();
        assert_eq!(p.data, Some(&b"d"[..]));
        assert_eq!(p.expiry_ms, T0);
        assert_eq!(blobs(&p), [("e2".into(), 0), ("e1".into(), 1)]);
    }

    #[test]
    fn limits_are_the_memory_backends() {
        assert_eq!(
            Plan::new(&view(None, CLUSTER_AFFILIATES_MAX), b"d", &[], T0, W),
            Err(StateError::TooManyAffiliates)
        );
        let eps: Vec<(String, i64)> = (0..64).map(|i| (format!("e{i}"), T0)).collect();
        let eps: Vec<(&str, i64)> = eps.iter().map(|(e, t)| (e.as_str(), *t)).collect();
        let full = stored(T0, &eps);
        // A full cluster still updates an existing affiliate; a full affiliate refuses
        // a new endpoint but takes known ones.
        let v = view(Some(full), CLUSTER_AFFILIATES_MAX);
        assert!(Plan::new(&v, b"", &[b("e0")], T0, W).is_ok());
        assert_eq!(
            Plan::new(&v, b"", &[b("e0"), b("new")], T0, W),
            Err(StateError::TooManyEndpoints)
        );
    }

    #[test]
    fn data_sets_the_expiry_and_no_data_only_raises_it() {
        let a = stored(T0 + 60_000, &[]);
        let p = Plan::new(&view(Some(a.clone()), 1), b"new", &[], T0 + 10_000, W).unwrap();
        assert_eq!((p.data, p.expiry_ms), (Some(&b"new"[..]), T0 + 10_000));
        let p = Plan::new(&view(Some(a.clone()), 1), b"", &[], T0 + 10_000, W).unwrap();
        assert_eq!((p.data, p.expiry_ms), (None, T0 + 60_000));
        let p = Plan::new(&view(Some(a), 1), b"", &[], T0 + 90_000, W).unwrap();
        assert_eq!(p.expiry_ms, T0 + 90_000);
    }

    #[test]
    fn known_endpoints_are_rewritten_only_when_their_lease_bucket_moves() {
        let a = stored(T0 + 60_000, &[("e1", T0 + 60_000), ("e2", T0 + 60_000)]);
        // Same expiry again: nothing to rewrite, a new endpoint goes after the others.
        let p = Plan::new(
            &view(Some(a.clone()), 1),
            b"",
            &[b("e2"), b("e3")],
            T0 + 60_000,
            W,
        )
        .unwrap();
        assert_eq!(blobs(&p), [("e3".into(), 0)]);
        // A later expiry in another bucket: the named endpoint moves, keeping its
        // place; the unnamed one keeps its own expiry (raised, never lowered).
        let later = T0 + 60_000 + 10_000;
        let p = Plan::new(&view(Some(a.clone()), 1), b"", &[b("e2")], later, W).unwrap();
        assert_eq!(blobs(&p), [("e2".into(), 1)]);
        assert_eq!(p.endpoints[0].expiry_ms, later);
        // An earlier expiry never lowers an endpoint's.
        let p = Plan::new(&view(Some(a.clone()), 1), b"", &[b("e1")], T0, W).unwrap();
        assert!(p.endpoints.is_empty(), "{p:?}");
        assert!(
            p.changes_nothing,
            "a refresh within the same buckets writes nothing"
        );
        let p = Plan::new(&view(Some(a.clone()), 1), b"d", &[b("e1")], T0 + 60_000, W).unwrap();
        assert!(
            !p.changes_nothing,
            "data is always written: watchers are told"
        );
        let p = Plan::new(&view(Some(a), 1), b"", &[], later, W).unwrap();
        assert!(
            !p.changes_nothing,
            "a later bucket moves the affiliate's lease"
        );
    }

    #[test]
    fn a_rewritten_endpoint_keeps_its_stored_ordinal_not_its_index() {
        // p, q, r created together (ordinals 0, 1, 2); p expires, so r is second.
        let mut a = stored(
            T0 + 60_000,
            &[("p", T0 + 60_000), ("q", T0 + 60_000), ("r", T0 + 60_000)],
        );
        assert!(a.remove_endpoint(&crate::state::Blob::new(b"p").unwrap()));
        let later = T0 + 60_000 + 10_000;
        let p = Plan::new(&view(Some(a), 1), b"", &[b("r")], later, W).unwrap();
        // A full read then still orders q before r (same creation revision).
        assert_eq!(blobs(&p), [("r".into(), 2)]);
    }

    #[test]
    fn an_endpoint_lease_follows_its_affiliate_when_data_shortens_it() {
        // Data with a short TTL shortens the affiliate: its endpoints' leases must
        // not outlive it, so they are rewritten, with their own expiry unchanged.
        let a = stored(T0 + 600_000, &[("e1", T0 + 600_000)]);
        let short = T0 + 20_000;
        let p = Plan::new(&view(Some(a), 1), b"new", &[], short, W).unwrap();
        assert_eq!(p.expiry_ms, short);
        assert_eq!(blobs(&p), [("e1".into(), 0)]);
        assert_eq!(p.endpoints[0].expiry_ms, T0 + 600_000);
        assert_eq!(p.lease_expiries(), vec![short, short]);
    }

    #[test]
    fn a_plan_knows_when_its_own_write_is_already_stored() {
        let before = stored(T0, &[("e1", T0)]);
        let p = Plan::new(&view(Some(before.clone()), 1), b"", &[b("e2")], T0 + 9, W).unwrap();
        assert!(!p.landed(&view(Some(before.clone()), 1)));
        assert!(!p.landed(&view(None, 0)));
        // What etcd holds once this very transaction committed.
        let after = stored(T0 + 9, &[("e1", T0), ("e2", T0 + 9)]);
        assert!(p.landed(&view(Some(after.clone()), 1)));
        // Another request's write: another millisecond.
        let later = stored(T0 + 10, &[("e1", T0), ("e2", T0 + 10)]);
        assert!(!p.landed(&view(Some(later), 1)));
        // With data, the mirror cannot tell (it holds none): etcd's history does.
        let p = Plan::new(&view(Some(before), 1), b"new", &[b("e2")], T0 + 9, W).unwrap();
        assert!(!p.landed(&view(Some(after), 1)));
    }
}
