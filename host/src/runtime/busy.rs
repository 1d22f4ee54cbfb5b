//! How long a plugin has been busy since it last waited for an event.
//!
//! The CPU budget is wall time between `next-event` calls. A pure wasm loop, a
//! loop through other host calls and a blocking WASI call (a sleep, a read from a
//! FIFO) all count; only waiting in `next-event` does not. The epoch callback
//! checks it while wasm runs, and a watchdog beside the call checks it while the
//! plugin is blocked in the host, so no kind of hang escapes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

// Tokio's clock, so tests can pause time; outside a runtime it is the system clock.
use tokio::time::Instant;

pub struct BusyClock {
    base: Instant,
    /// Nanoseconds after `base` when the plugin last stopped waiting.
    since_ns: AtomicU64,
    waiting: AtomicBool,
}

impl BusyClock {
    /// A clock that starts busy now.
    pub fn new() -> Arc<BusyClock> {
        Arc::new(BusyClock {
            base: Instant::now(),
            since_ns: AtomicU64::new(0),
            waiting: AtomicBool::new(false),
        })
    }

    pub fn wait_begins(&self) {
        self.waiting.store(true, Ordering::Release);
    }

    /// The wait is over. A wait that returned nothing at once (`next-event(0)` with
    /// no event pending) is a poll, not idle time: the clock keeps running, so a
    /// plugin spinning on such polls still runs out of budget.
    pub fn wait_ends(&self, idled: bool) {
        if !idled {
            self.waiting.store(false, Ordering::Release);
            return;
        }
        let now = self.base.elapsed().as_nanos() as u64;
        self.since_ns.store(now, Ordering::Release);
        self.waiting.store(false, Ordering::Release);
    }

    /// How long the plugin has been busy, or `None` while it waits for an event.
    pub fn busy_for(&self) -> Option<Duration> {
        if self.waiting.load(Ordering::Acquire) {
            return None;
        }
        let since = Duration::from_nanos(self.since_ns.load(Ordering::Acquire));
        Some(self.base.elapsed().saturating_sub(since))
    }

    /// Resolves once the plugin has been busy longer than `budget`, with how long.
    pub async fn exceeded(&self, budget: Duration) -> Duration {
        loop {
            let next_check = match self.busy_for() {
                Some(busy) if busy > budget => return busy,
                Some(busy) => budget - busy,
                None => budget,
            };
            tokio::time::sleep(next_check + Duration::from_millis(1)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waiting_stops_the_clock_and_busy_time_trips_it() {
        let clock = BusyClock::new();
        clock.wait_begins();
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(clock.busy_for(), None);
        clock.wait_ends(true);
        let budget = Duration::from_millis(200);
        let busy = tokio::time::timeout(Duration::from_secs(5), clock.exceeded(budget))
            .await
            .expect("the watchdog fires");
        assert!(busy > budget);
    }

    #[tokio::test(start_paused = true)]
    async fn polls_that_return_at_once_do_not_reset_the_clock() {
        let clock = BusyClock::new();
        tokio::time::sleep(Duration::from_millis(150)).await;
        clock.wait_begins();
        clock.wait_ends(false);
        let busy = clock.busy_for().expect("busy after a poll");
        assert!(busy >= Duration::from_millis(150), "{busy:?}");
        clock.wait_begins();
        clock.wait_ends(true);
        assert!(clock.busy_for().unwrap() < Duration::from_millis(150));
    }
}
