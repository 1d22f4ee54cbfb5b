//! Wall-clock milliseconds, as stored in etcd (replicas share them), and the process's
//! monotonic `Instant`s, which the mirror's [`State`](crate::state::State) uses: an
//! anchor converts between them in both directions.
//!
//! The anchor follows the wall clock when it moves against the monotonic one (stepped
//! by NTP after the replica started, or the machine slept, which `Instant` does not
//! count): a replica kept on its start-time scale would write expiries off by the step
//! for the rest of its life, and other replicas compare them with their own. Moving it
//! is [`rebase`]'s caller's business: the mirror's `Instant`s must move with it.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::limits::CLOCK_STEP_MAX;

/// `unix_ms` is the wall clock's Unix milliseconds at `instant`, as last anchored.
#[derive(Debug)]
struct Anchor {
    instant: Instant,
    unix_ms: AtomicI64,
}

impl Anchor {
    fn new(instant: Instant, unix_ms: i64) -> Self {
        Self {
            instant,
            unix_ms: AtomicI64::new(unix_ms),
        }
    }

    fn unix_ms(&self, t: Instant) -> i64 {
        let at = self.unix_ms.load(Ordering::Relaxed);
        if t >= self.instant {
            at.saturating_add(t.duration_since(self.instant).as_millis() as i64)
        } else {
            at.saturating_sub(self.instant.duration_since(t).as_millis() as i64)
        }
    }

    fn instant(&self, ms: i64) -> Instant {
        let delta = ms.saturating_sub(self.unix_ms.load(Ordering::Relaxed));
        shift(self.instant, -delta)
    }

    /// Moves the scale so that `now` is `wall_ms`; returns by how many milliseconds
    /// the `Instant` of every Unix time moved back.
    fn rebase(&self, now: Instant, wall_ms: i64) -> i64 {
        let drift = wall_ms.saturating_sub(self.unix_ms(now));
        self.unix_ms.fetch_add(drift, Ordering::Relaxed);
        drift
    }
}

static ANCHOR: LazyLock<Anchor> = LazyLock::new(|| Anchor::new(Instant::now(), wall_ms()));

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `t` moved back by `back_ms` milliseconds (forward when negative), clamped to what
/// `Instant` can hold.
pub fn shift(t: Instant, back_ms: i64) -> Instant {
    let d = Duration::from_millis(back_ms.unsigned_abs());
    if back_ms >= 0 {
        t.checked_sub(d).unwrap_or(t)
    } else {
        t.checked_add(d).unwrap_or(t)
    }
}

/// Now, in Unix milliseconds, on the anchor's scale.
pub fn now_ms() -> i64 {
    unix_ms(Instant::now())
}

/// The Unix milliseconds of an `Instant` of this process.
pub fn unix_ms(t: Instant) -> i64 {
    ANCHOR.unix_ms(t)
}

/// The `Instant` of Unix milliseconds `ms`, clamped to what `Instant` can hold.
pub fn instant(ms: i64) -> Instant {
    ANCHOR.instant(ms)
}

/// How far the wall clock is from the anchor's scale, in milliseconds (positive: ahead).
pub fn drift_ms() -> i64 {
    wall_ms().saturating_sub(now_ms())
}

/// Whether the wall clock has moved from the anchor's scale by more than
/// [`CLOCK_STEP_MAX`]: stepped, or the machine slept, and the anchor not yet rebased.
pub fn stepped() -> bool {
    drift_ms().unsigned_abs() > CLOCK_STEP_MAX.as_millis() as u64
}

/// Puts the anchor back on the wall clock; returns by how many milliseconds every
/// Unix time's `Instant` moved back (see [`shift`]): whoever holds `Instant`s made
/// from Unix times must move them as much.
pub fn rebase() -> i64 {
    ANCHOR.rebase(Instant::now(), wall_ms())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_round_trip_to_the_millisecond() {
        let t = Instant::now() + Duration::from_secs(1800);
        let back = instant(unix_ms(t));
        let diff = if back > t { back - t } else { t - back };
        assert!(diff < Duration::from_millis(1), "{diff:?}");
        let ms = now_ms() - 5_000;
        assert_eq!(unix_ms(instant(ms)), ms);
    }

    /// The wall clock jumps an hour ahead (the machine slept an hour): after the
    /// rebase, now is the new wall time, and an expiry stored as Unix time maps to an
    /// `Instant` an hour earlier than before, which is where the moved one lands.
    #[test]
    fn a_rebase_follows_a_wall_clock_step_and_says_how_far_instants_move() {
        let start = Instant::now();
        let a = Anchor::new(start, 1_000_000_000);
        let expiry_ms = 1_000_000_000 + 3_600_000 + 1_800_000;
        let before = a.instant(expiry_ms);
        let now = start + Duration::from_secs(10);
        let moved = a.rebase(now, 1_000_000_000 + 3_600_000 + 10_000);
        assert_eq!(moved, 3_600_000);
        assert_eq!(a.unix_ms(now), 1_000_000_000 + 3_600_000 + 10_000);
        let after = a.instant(expiry_ms);
        assert_eq!(after, shift(before, moved));
        assert_eq!(a.unix_ms(after), expiry_ms);
        assert_eq!(
            after - now,
            Duration::from_secs(1_790),
            "30 min from the step, less 10 s"
        );
        // Stepped back as far: everything returns.
        assert_eq!(a.rebase(now, 1_000_000_000 + 10_000), -3_600_000);
        assert_eq!(a.instant(expiry_ms), before);
        assert_eq!(a.rebase(now, 1_000_000_000 + 10_000), 0, "nothing moved");
    }
}
