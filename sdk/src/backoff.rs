//! A retry backoff for plugins: Sidero's client's (cenkalti/backoff v4
//! defaults, reference §8.2), which Talos also uses to restart its registries:
//! 500 ms growing ×1.5 to at most 60 s, each delay randomized by ±50 %, never
//! giving up. Reset it after a success.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

const INITIAL: Duration = Duration::from_millis(500);
const MULTIPLIER: f64 = 1.5;
const MAX_INTERVAL: Duration = Duration::from_secs(60);
const RANDOMIZATION: f64 = 0.5;

pub struct Backoff {
    interval: Duration,
    random: Random,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            interval: INITIAL,
            random: Random::seeded(),
        }
    }
}

impl Backoff {
    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let spread = self.interval.as_secs_f64() * RANDOMIZATION;
        let low = self.interval.as_secs_f64() - spread;
        let delay = low + self.random.unit() * 2.0 * spread;
        self.interval = self.interval.mul_f64(MULTIPLIER).min(MAX_INTERVAL);
        Duration::from_secs_f64(delay)
    }

    pub fn reset(&mut self) {
        self.interval = INITIAL;
    }
}

/// A small xorshift generator for jitter, seeded from the host's randomness
/// (std's `RandomState` draws its keys from WASI's random source).
struct Random(u64);

impl Random {
    fn seeded() -> Random {
        let seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Random(seed | 1)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_by_half_within_jitter_up_to_a_minute_and_resets() {
        let mut backoff = Backoff::default();
        let mut interval = 0.5;
        for _ in 0..30 {
            let delay = backoff.next_delay().as_secs_f64();
            assert!(
                delay >= interval * 0.5 - 1e-9 && delay <= interval * 1.5 + 1e-9,
                "{delay} for interval {interval}"
            );
            interval = (interval * 1.5f64).min(60.0);
        }
        backoff.reset();
        let first = backoff.next_delay().as_secs_f64();
        assert!((0.25..=0.75).contains(&first), "{first}");
    }
}
