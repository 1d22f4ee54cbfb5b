//! Wall-clock milliseconds, as stored in etcd (replicas share them), and the process's
//! monotonic `Instant`s, which the mirror's [`State`](crate::state::State) uses: one
//! anchor taken at start converts between them in both directions.

use std::sync::LazyLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

struct Anchor {
    instant: Instant,
    unix_ms: i64,
}

static ANCHOR: LazyLock<Anchor> = LazyLock::new(|| Anchor {
    instant: Instant::now(),
    unix_ms: SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0),
});

/// Now, in Unix milliseconds, on the anchor's scale.
pub fn now_ms() -> i64 {
    unix_ms(Instant::now())
}

/// The Unix milliseconds of an `Instant` of this process.
pub fn unix_ms(t: Instant) -> i64 {
    let a = &*ANCHOR;
    if t >= a.instant {
        a.unix_ms
            .saturating_add(t.duration_since(a.instant).as_millis() as i64)
    } else {
        a.unix_ms
            .saturating_sub(a.instant.duration_since(t).as_millis() as i64)
    }
}

/// The `Instant` of Unix milliseconds `ms`, clamped to what `Instant` can hold.
pub fn instant(ms: i64) -> Instant {
    let a = &*ANCHOR;
    let delta = ms.saturating_sub(a.unix_ms);
    let d = Duration::from_millis(delta.unsigned_abs());
    if delta >= 0 {
        a.instant.checked_add(d).unwrap_or(a.instant)
    } else {
        a.instant.checked_sub(d).unwrap_or(a.instant)
    }
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
}
