//! A watcher's subscription to one cluster (reference §4.6, §4.8).
//!
//! Delivery is a non-blocking send into a bounded buffer so one slow watcher can never
//! stall a cluster's writers. When the buffer is full the watcher has lost an update: it
//! is unsubscribed at once and its next receive reports [`Lost`], even if older
//! notifications are still buffered (Q9: end right away, the client resyncs anyway).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::cluster::Cluster;

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
}

impl Subscriber {
    /// Ends the subscription as if it had fallen behind: its next receive reports
    /// [`Lost`] and the client resubscribes, getting a fresh snapshot.
    pub fn cancel(&self) {
        self.lost.store(true, Ordering::Release);
    }

    /// Delivers without blocking; returns false when the subscriber must be dropped,
    /// either gone or too far behind (then flagged as lost).
    pub fn deliver(&self, n: &Arc<Notification>) -> bool {
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

/// Creates both ends with a buffer of `capacity` notifications.
pub(super) fn channel(
    id: u64,
    capacity: usize,
    cluster: Arc<Cluster>,
) -> (Subscriber, Subscription) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let lost = Arc::new(AtomicBool::new(false));
    (
        Subscriber {
            id,
            tx,
            lost: lost.clone(),
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
