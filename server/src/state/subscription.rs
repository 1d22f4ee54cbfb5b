//! A watcher's subscription to one cluster (reference §4.6, §4.8).
//!
//! Delivery is a non-blocking send into a bounded buffer so one slow watcher can never
//! stall a cluster's writers. A watcher that already has [`WATCH_BUFFER`] notifications
//! waiting when a [`Burst`] begins is behind: it is unsubscribed at once and its next
//! receive reports [`Lost`], even if older notifications are still buffered (Q9: end
//! right away, the client resyncs anyway). A burst (changes made together: one update,
//! one GC pass over a cluster, one etcd watch response) is delivered whole to a watcher
//! that was not behind when it began, up to [`WATCH_BURST_MAX`] more: it had no chance
//! to read in the middle of one, so a large burst says nothing about its pace.
//!
//! [`WATCH_BUFFER`]: crate::limits::WATCH_BUFFER

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::cluster::Cluster;
use crate::limits::WATCH_BURST_MAX;

/// An affiliate as clients see it: id, data and endpoints in insertion order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AffiliateView {
    pub id: String,
    pub data: Bytes,
    pub endpoints: Vec<Bytes>,
}

/// One change of a cluster, shared by every subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notification {
    /// Created or changed; carries the full current affiliate.
    Update(AffiliateView),
    /// Removed; only the id is known.
    Deleted(String),
}

/// Notifications made together, delivered whole to a watcher that was not behind when
/// the first of them was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Burst(u64);

impl Burst {
    /// A burst no earlier one equals.
    pub fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Self(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

impl Default for Burst {
    fn default() -> Self {
        Self::new()
    }
}

/// The subscriber lost a notification because its buffer was full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("subscription canceled: lost update")]
pub struct Lost;

/// The cluster's end of a subscription.
#[derive(Debug)]
pub(super) struct Subscriber {
    pub id: u64,
    tx: mpsc::Sender<Arc<Notification>>,
    lost: Arc<AtomicBool>,
    /// Notifications waiting that make the watcher behind when a burst begins.
    behind: usize,
    /// The burst of the last delivery: the watcher was not behind when it began.
    burst: Burst,
}

impl Subscriber {
    /// Ends the subscription as if it had fallen behind: its next receive reports
    /// [`Lost`] and the client resubscribes, getting a fresh snapshot.
    pub fn cancel(&self) {
        self.lost.store(true, Ordering::Release);
    }

    /// Delivers without blocking; returns false when the subscriber must be dropped,
    /// either gone or too far behind (then flagged as lost).
    pub fn deliver(&mut self, n: &Arc<Notification>, burst: Burst) -> bool {
        if self.burst != burst {
            let waiting = self.tx.max_capacity() - self.tx.capacity();
            if waiting >= self.behind {
                self.lost.store(true, Ordering::Release);
                return false;
            }
            self.burst = burst;
        }
        match self.tx.try_send(n.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.lost.store(true, Ordering::Release);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

/// The watcher's end: receives notifications in cluster mutation order and
/// unsubscribes when dropped.
#[derive(Debug)]
pub struct Subscription {
    id: u64,
    rx: mpsc::Receiver<Arc<Notification>>,
    lost: Arc<AtomicBool>,
    cluster: Arc<Cluster>,
}

/// Creates both ends: the watcher is behind with `capacity` notifications waiting.
pub(super) fn channel(
    id: u64,
    capacity: usize,
    cluster: Arc<Cluster>,
) -> (Subscriber, Subscription) {
    let behind = capacity.max(1);
    // The channel allocates its slots as they fill, so this bound costs nothing unused.
    let (tx, rx) = mpsc::channel(behind + WATCH_BURST_MAX);
    let lost = Arc::new(AtomicBool::new(false));
    (
        Subscriber {
            id,
            tx,
            lost: lost.clone(),
            behind,
            burst: Burst(0),
        },
        Subscription {
            id,
            rx,
            lost,
            cluster,
        },
    )
}

impl Subscription {
    /// The next notification; `Ok(None)` if the cluster dropped the subscriber for a
    /// reason other than overflow (it never does while the subscription lives).
    pub async fn recv(&mut self) -> Result<Option<Arc<Notification>>, Lost> {
        self.check()?;
        let n = self.rx.recv().await;
        self.check()?;
        Ok(n)
    }

    /// Non-blocking variant of [`Self::recv`], for tests and draining.
    pub fn try_recv(&mut self) -> Result<Option<Arc<Notification>>, Lost> {
        self.check()?;
        Ok(self.rx.try_recv().ok())
    }

    fn check(&self) -> Result<(), Lost> {
        if self.lost.load(Ordering::Acquire) {
            Err(Lost)
        } else {
            Ok(())
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.cluster.unsubscribe(self.id);
    }
}
