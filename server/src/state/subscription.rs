//! A watcher's subscription to one cluster (reference §4.6, §4.8).
//!
//! Delivery is a non-blocking send into a bounded buffer so one slow watcher can never
//! stall a cluster's writers. A watcher is behind when, as a [`Burst`] of changes
//! begins, it has [`WATCH_BUFFER`] notifications waiting and has read none of them for
//! [`WATCH_STALL`]: it is unsubscribed at once and its next receive reports [`Lost`],
//! even if older notifications are still buffered (Q9: end right away, the client
//! resyncs anyway). A burst (changes made together: one update, one GC pass over a
//! cluster, one etcd watch response, where one batched transaction can change dozens of
//! a cluster's affiliates) is delivered whole to a watcher that was not behind when it
//! began, as are bursts that follow each other faster than a watcher can be scheduled:
//! their size says nothing about its pace. Past [`WATCH_BURST_MAX`] more than the
//! buffer, a watcher is cut anyway, so one that never reads holds a bounded queue.
//!
//! [`WATCH_BUFFER`]: crate::limits::WATCH_BUFFER

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::cluster::Cluster;
use crate::limits::{WATCH_BURST_MAX, WATCH_STALL};

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
pub struct Burst {
    id: u64,
    at: Instant,
}

impl Burst {
    /// A burst beginning now, which no earlier one equals.
    pub fn new() -> Self {
        Self::at(Instant::now())
    }

    /// A burst beginning at `at` (tests move time on with it).
    pub fn at(at: Instant) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Self {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            at,
        }
    }
}

impl Default for Burst {
    fn default() -> Self {
        Self::new()
    }
}

/// When a watcher last read, shared by its two ends: nanoseconds from a base instant.
#[derive(Debug)]
struct LastRead(AtomicU64);

static BASE: LazyLock<Instant> = LazyLock::new(Instant::now);

impl LastRead {
    fn now() -> Self {
        let r = Self(AtomicU64::new(0));
        r.mark(Instant::now());
        r
    }

    fn mark(&self, t: Instant) {
        let nanos = t.saturating_duration_since(*BASE).as_nanos();
        self.0
            .store(u64::try_from(nanos).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn get(&self) -> Instant {
        *BASE + Duration::from_nanos(self.0.load(Ordering::Relaxed))
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
    /// Notifications waiting that, unread for [`WATCH_STALL`], make the watcher behind.
    behind: usize,
    /// The burst of the last delivery: the watcher was not behind when it began.
    burst: Burst,
    /// When the oldest burst still waiting began (its queue was empty then).
    waiting_since: Instant,
    read: Arc<LastRead>,
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
            if waiting == 0 {
                self.waiting_since = burst.at;
            } else if waiting >= self.behind {
                let stuck_since = self.waiting_since.max(self.read.get());
                if burst.at.saturating_duration_since(stuck_since) >= WATCH_STALL {
                    self.lost.store(true, Ordering::Release);
                    return false;
                }
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
    read: Arc<LastRead>,
    cluster: Arc<Cluster>,
}

/// Creates both ends: the watcher is behind with `capacity` notifications waiting
/// unread for [`WATCH_STALL`].
pub(super) fn channel(
    id: u64,
    capacity: usize,
    cluster: Arc<Cluster>,
) -> (Subscriber, Subscription) {
    let behind = capacity.max(1);
    // The channel allocates its slots as they fill, so this bound costs nothing unused.
    let (tx, rx) = mpsc::channel(behind + WATCH_BURST_MAX);
    let lost = Arc::new(AtomicBool::new(false));
    let read = Arc::new(LastRead::now());
    (
        Subscriber {
            id,
            tx,
            lost: lost.clone(),
            behind,
            burst: Burst { id: 0, at: *BASE },
            waiting_since: *BASE,
            read: read.clone(),
        },
        Subscription {
            id,
            rx,
            lost,
            read,
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
        self.read.mark(Instant::now());
        Ok(n)
    }

    /// Non-blocking variant of [`Self::recv`], for tests and draining.
    pub fn try_recv(&mut self) -> Result<Option<Arc<Notification>>, Lost> {
        self.check()?;
        let n = self.rx.try_recv().ok();
        if n.is_some() {
            self.read.mark(Instant::now());
        }
        Ok(n)
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
