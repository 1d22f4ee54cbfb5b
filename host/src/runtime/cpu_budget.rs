//! The CPU budget: how long a plugin has been busy since it last waited for an
//! event, and the busy time it owes its CPU share.
//!
//! Busy time is wall time between `next-event` calls. A pure wasm loop, a loop
//! through other host calls and a blocking WASI call (a sleep, a slow read) all
//! count; only waiting does not. The epoch callback checks it while wasm runs, and
//! a watchdog beside the call checks it while the plugin is blocked in the host,
//! so no kind of hang escapes. Wall time is an upper bound of the CPU a plugin
//! can burn, so limits on it are conservative.
//!
//! One clock per incarnation. Everything that reads or moves it runs on the
//! plugin's own thread, so the lock is never contended.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

// Tokio's clock, so tests can pause time; outside a runtime it is the system clock.
use tokio::time::Instant;

pub struct BusyClock {
    state: Mutex<State>,
}

/// How a wait ended, which decides what its length counts as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitEnd {
    /// The plugin waited for an event: the busy stretch is over.
    Idled,
    /// A `next-event(0)` poll that found nothing: not a rest, so its length is
    /// busy time, and a plugin spinning on polls still runs out of budget.
    Polled,
    /// Held back for the CPU share: neither busy time (the plugin is not to blame
    /// for it) nor a rest that ends the stretch.
    Paused,
}

struct State {
    /// Start of the current busy stretch, moved forward by waits that were not idle
    /// (polls, throttling) so that they count neither way.
    stretch_start: Instant,
    /// Set while the plugin waits.
    waiting_since: Option<Instant>,
    /// Busy time before this instant has been handed to the CPU share.
    accounted: Instant,
}

impl BusyClock {
    /// A clock that starts busy now.
    pub fn new() -> Arc<BusyClock> {
        let now = Instant::now();
        Arc::new(BusyClock {
            state: Mutex::new(State {
                stretch_start: now,
                waiting_since: None,
                accounted: now,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A wait begins; returns the busy time not yet accounted.
    pub fn wait_begins(&self) -> Duration {
        let now = Instant::now();
        let mut state = self.lock();
        if state.waiting_since.is_some() {
            return Duration::ZERO;
        }
        state.waiting_since = Some(now);
        let busy = now - state.accounted;
        state.accounted = now;
        busy
    }

    /// The wait is over; `end` says what its length counts as.
    pub fn wait_ends(&self, end: WaitEnd) {
        let now = Instant::now();
        let mut state = self.lock();
        let Some(since) = state.waiting_since.take() else {
            return;
        };
        match end {
            WaitEnd::Idled => {
                state.stretch_start = now;
                state.accounted = now;
            }
            // Still busy since the wait began: the share is charged for it later.
            WaitEnd::Polled => state.accounted = since,
            WaitEnd::Paused => {
                state.stretch_start += now - since;
                state.accounted = now;
            }
        }
    }

    /// Busy time since the last accounting, for the CPU share (zero while waiting).
    pub fn take_busy(&self) -> Duration {
        let now = Instant::now();
        let mut state = self.lock();
        if state.waiting_since.is_some() {
            return Duration::ZERO;
        }
        let busy = now - state.accounted;
        state.accounted = now;
        busy
    }

    /// How long the plugin has been busy, or `None` while it waits.
    pub fn busy_for(&self) -> Option<Duration> {
        let state = self.lock();
        match state.waiting_since {
            Some(_) => None,
            None => Some(Instant::now().saturating_duration_since(state.stretch_start)),
        }
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
        clock.wait_ends(WaitEnd::Idled);
        let budget = Duration::from_millis(200);
        let busy = tokio::time::timeout(Duration::from_secs(5), clock.exceeded(budget))
            .await
            .expect("the watchdog fires");
        assert!(busy > budget);
    }

    #[tokio::test(start_paused = true)]
    async fn polls_count_as_busy_time() {
        let clock = BusyClock::new();
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(clock.wait_begins(), Duration::from_millis(150));
        // A poll that took a timer tick to come back empty.
        tokio::time::sleep(Duration::from_millis(1)).await;
        clock.wait_ends(WaitEnd::Polled);
        assert_eq!(clock.busy_for(), Some(Duration::from_millis(151)));
        assert_eq!(
            clock.take_busy(),
            Duration::from_millis(1),
            "the share pays for it"
        );
        clock.wait_begins();
        clock.wait_ends(WaitEnd::Idled);
        assert_eq!(clock.busy_for(), Some(Duration::ZERO));
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_counts_neither_as_busy_nor_as_idle() {
        let clock = BusyClock::new();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(clock.wait_begins(), Duration::from_millis(300));
        tokio::time::sleep(Duration::from_secs(8)).await;
        clock.wait_ends(WaitEnd::Paused);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(clock.busy_for(), Some(Duration::from_millis(400)));
        assert_eq!(
            clock.take_busy(),
            Duration::from_millis(100),
            "the pause is not busy time for the share either"
        );
        assert_eq!(clock.take_busy(), Duration::ZERO);
    }
}
