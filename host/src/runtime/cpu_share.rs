//! The CPU share: how much busy time a plugin may use over a sliding window
//! (10 % of one core over any 10 s by default), whatever the length of each busy
//! stretch. The CPU budget stops one long stretch; this stops a plugin that works
//! 900 ms, waits 1 ms and repeats from holding a core.
//!
//! A plugin over its share is throttled: its waits are stretched and its running
//! wasm is paused at the next epoch tick until enough of its busy time has left
//! the window. One share per plugin, kept across restarts, so crashing does not
//! reset it either.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

pub struct CpuShare {
    /// Busy time allowed within any `window`.
    allowance: Duration,
    window: Duration,
    slices: Mutex<Slices>,
}

/// Busy time, oldest first. Busy time recorded within `window / SLICES` of a
/// slice's opening joins that slice, which then expires with its latest part
/// (a little late: never in the plugin's favour), so the list stays short.
#[derive(Default)]
struct Slices {
    list: VecDeque<Slice>,
    total: Duration,
}

struct Slice {
    opened: Instant,
    /// When its last busy time ended: it leaves the window `window` after that.
    at: Instant,
    busy: Duration,
}

/// The resolution of the window.
const SLICES: u32 = 100;

impl CpuShare {
    /// `percent` of one core over `window`.
    pub fn new(percent: u32, window: Duration) -> CpuShare {
        CpuShare {
            allowance: window * percent / 100,
            window,
            slices: Mutex::new(Slices::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slices> {
        self.slices.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `busy` time that ended now.
    pub fn add(&self, busy: Duration) {
        if busy.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut slices = self.lock();
        slices.total += busy;
        let merge_within = self.window / SLICES;
        match slices.list.back_mut() {
            Some(slice) if now.saturating_duration_since(slice.opened) < merge_within => {
                slice.at = now;
                slice.busy += busy;
            }
            _ => slices.list.push_back(Slice {
                opened: now,
                at: now,
                busy,
            }),
        }
    }

    /// Busy time within the window that ends now.
    pub fn used(&self) -> Duration {
        let mut slices = self.lock();
        self.expire(&mut slices, Instant::now());
        slices.total
    }

    /// `None` while the plugin is within its share; otherwise when it will be
    /// again, if it stays idle until then.
    pub fn held_until(&self) -> Option<Instant> {
        let now = Instant::now();
        let mut slices = self.lock();
        self.expire(&mut slices, now);
        let mut excess = slices.total.checked_sub(self.allowance)?;
        if excess.is_zero() {
            return None;
        }
        for slice in &slices.list {
            if slice.busy >= excess {
                return Some(slice.at + self.window);
            }
            excess -= slice.busy;
        }
        // Unreachable while `total` is the sum of the slices; waiting out the
        // whole window is always enough.
        Some(now + self.window)
    }

    fn expire(&self, slices: &mut Slices, now: Instant) {
        while let Some(slice) = slices.list.front() {
            if now.saturating_duration_since(slice.at) < self.window {
                break;
            }
            slices.total -= slice.busy;
            slices.list.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    async fn busy(share: &CpuShare, time: Duration) {
        tokio::time::sleep(time).await;
        share.add(time);
    }

    #[tokio::test(start_paused = true)]
    async fn a_duty_cycle_is_held_to_its_share_of_any_window() {
        // 10 % of 10 s: 1 s of busy time in any 10 s.
        let share = CpuShare::new(10, Duration::from_secs(10));
        let start = Instant::now();
        busy(&share, 900 * MS).await;
        assert_eq!(share.held_until(), None, "0.9 s is within the share");
        busy(&share, 900 * MS).await;
        // 1.8 s used: held until the first 0.9 s leaves the window.
        let until = share.held_until().expect("over the share");
        assert_eq!(until - start, Duration::from_millis(900 + 10_000));
        tokio::time::sleep_until(until).await;
        assert_eq!(share.held_until(), None);
        assert_eq!(share.used(), 900 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn many_short_stretches_add_up() {
        let share = CpuShare::new(10, Duration::from_secs(10));
        for _ in 0..100 {
            busy(&share, 10 * MS).await;
            tokio::time::sleep(MS).await;
        }
        assert_eq!(share.used(), Duration::from_secs(1));
        assert_eq!(share.held_until(), None, "exactly the allowance");
        busy(&share, MS).await;
        let until = share.held_until().expect("one millisecond over");
        assert!(until > Instant::now() + Duration::from_secs(8), "{until:?}");
        assert!(share.lock().list.len() <= SLICES as usize + 1);
    }

    #[tokio::test(start_paused = true)]
    async fn busy_time_leaves_the_window() {
        let share = CpuShare::new(50, Duration::from_secs(2));
        busy(&share, Duration::from_secs(1)).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(share.used(), Duration::ZERO);
    }
}
