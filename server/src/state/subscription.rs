//! A watcher's subscription to one cluster (reference §4.6, §4.8).
//!
//! Delivery is a non-blocking send into a bounded buffer so one slow watcher can never
//! stall a cluster's writers. A watcher is behind when, as a [`Burst`] of changes
//! begins, it has [`WATCH_BUFFER`] notifications waiting and the oldest of them has
//! waited [`WATCH_STALL`]: it is unsubscribed at once and its next receive reports
//! [`Lost`], even if older notifications are still buffered (Q9: end right away, the
//! client resyncs anyway, from a fresh snapshot rather than through its backlog). A
//! burst (changes made together: one update, one GC pass over a cluster, one etcd
//! watch response, where one batched transaction can change dozens of a cluster's
//! affiliates) is delivered whole to a watcher that was not behind when it began, and
//! so are bursts that follow each other faster than a watcher can be scheduled: their
//! size says nothing about its pace. Past [`WATCH_BURST_MAX`] more than the buffer, a
//! watcher is cut anyway. A watcher whose snapshot must be completed first (the etcd
//! backend reads its data) is judged from its first receive ([`StallClock`]).
//!
//! [`WATCH_BUFFER`]: crate::limits::WATCH_BUFFER

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

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
    /// Notifications waiting that, the oldest [`WATCH_STALL`] old, make it behind.
    behind: usize,
    /// The burst of the last delivery: the watcher was not behind when it began.
    burst: Burst,
    /// Notifications sent so far.
    sent: u64,
    /// Notifications the watcher has received so far.
    received: Arc<AtomicU64>,
    /// The bursts not yet read in full, oldest first: when each began and how many
    /// had been sent before it. At most one per notification waiting.
    unread: VecDeque<(Instant, u64)>,
    /// When the watcher's stall clock started ([`StallClock`]); until then it is never
    /// behind (the allowance past its buffer still bounds what it holds).
    clock: Arc<OnceLock<Instant>>,
}

/// When a watcher's waiting notifications start to count against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StallClock {
    /// From the subscription: its snapshot is at hand to send.
    Now,
    /// From its first receive: its snapshot is still to be completed (the etcd
    /// backend reads the data from etcd first), and the time that takes is not the
    /// watcher's.
    FirstReceive,
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
            let received = self.received.load(Ordering::Acquire);
            // A burst is read in full once the watcher has received up to where the
            // next one (or the sending so far) begins.
            while !self.unread.is_empty() {
                let end = self.unread.get(1).map_or(self.sent, |next| next.1);
                if received < end {
                    break;
                }
                self.unread.pop_front();
            }
            let waiting = self.sent.saturating_sub(received);
            if let Some(&(oldest, _)) = self.unread.front()
                && let Some(&started) = self.clock.get()
                && waiting >= self.behind as u64
                && burst.at.saturating_duration_since(oldest.max(started)) >= WATCH_STALL
            {
                self.lost.store(true, Ordering::Release);
                return false;
            }
            self.unread.push_back((burst.at, self.sent));
            self.burst = burst;
        }
        match self.tx.try_send(n.clone()) {
            Ok(()) => {
                self.sent += 1;
                true
            }
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
    received: Arc<AtomicU64>,
    clock: Arc<OnceLock<Instant>>,
    cluster: Arc<Cluster>,
}

/// Creates both ends: the watcher is behind with `capacity` notifications waiting, the
/// oldest for [`WATCH_STALL`].
pub(super) fn channel(
    id: u64,
    capacity: usize,
    clock: StallClock,
    cluster: Arc<Cluster>,
) -> (Subscriber, Subscription) {
    let clock = Arc::new(match clock {
        StallClock::Now => OnceLock::from(Instant::now()),
        StallClock::FirstReceive => OnceLock::new(),
    });
    let behind = capacity.max(1);
    // The channel allocates its slots as they fill, so this bound costs nothing unused.
    let (tx, rx) = mpsc::channel(behind + WATCH_BURST_MAX);
    let lost = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    (
        Subscriber {
            id,
            tx,
            lost: lost.clone(),
            behind,
            burst: Burst {
                id: 0,
                at: Instant::now(),
            },
            sent: 0,
            received: received.clone(),
            unread: VecDeque::new(),
            clock: clock.clone(),
        },
        Subscription {
            id,
            rx,
            lost,
            received,
            clock,
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
        if n.is_some() {
            self.received.fetch_add(1, Ordering::Release);
        }
        Ok(n)
    }

    /// Non-blocking variant of [`Self::recv`], for tests and draining.
    pub fn try_recv(&mut self) -> Result<Option<Arc<Notification>>, Lost> {
        self.check()?;
        let n = self.rx.try_recv().ok();
        if n.is_some() {
            self.received.fetch_add(1, Ordering::Release);
        }
        Ok(n)
    }

    /// Starts the stall clock if it waited for the first receive, and reports
    /// whether the watcher was cut.
    fn check(&self) -> Result<(), Lost> {
        self.clock.get_or_init(Instant::now);
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
