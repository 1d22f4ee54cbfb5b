//! Per-client-IP token buckets that throttle rather than reject (§4.9).
//!
//! A request takes a token if one is there, otherwise it waits for the next one, but
//! only if that wait ends before the request's deadline; else it fails at once without
//! consuming anything. A request abandoned while waiting gives its token back. Buckets
//! are sharded by IP, so the check takes no global lock.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use dashmap::DashMap;

/// Refill rate and bucket size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: u32,
}

impl Default for Rate {
    fn default() -> Self {
        Self {
            per_second: crate::limits::IP_RATE_REQUESTS_PER_SECOND_MAX,
            burst: crate::limits::IP_RATE_BURST_SIZE_MAX,
        }
    }
}

/// The wait would pass the deadline (or the request was abandoned).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("rate limit exceeds request timeout")]
pub struct Exceeded;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn advance(&mut self, now: Instant, rate: Rate) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_second).min(f64::from(rate.burst));
        self.last = self.last.max(now);
    }
}

#[derive(Debug)]
pub struct IpRateLimiter {
    rate: Rate,
    buckets: DashMap<IpAddr, Bucket>,
}

impl IpRateLimiter {
    pub fn new(rate: Rate) -> Self {
        Self {
            rate,
            buckets: DashMap::new(),
        }
    }

    /// Takes a token at `now` and says how long to wait before using it, or refuses
    /// without taking anything if that wait would exceed `max_wait`.
    pub fn reserve(
        &self,
        ip: IpAddr,
        now: Instant,
        max_wait: Option<Duration>,
    ) -> Result<Duration, Exceeded> {
        let rate = self.rate;
        let mut b = self.buckets.entry(ip).or_insert(Bucket {
            tokens: f64::from(rate.burst),
            last: now,
        });
        b.advance(now, rate);
        let tokens = b.tokens - 1.0;
        let wait = if tokens >= 0.0 {
            Duration::ZERO
        } else if rate.per_second <= 0.0 {
            return Err(Exceeded);
        } else {
            // Saturates for absurd rates instead of panicking.
            Duration::try_from_secs_f64(-tokens / rate.per_second).unwrap_or(Duration::MAX)
        };
        if max_wait.is_some_and(|m| wait > m) {
            return Err(Exceeded);
        }
        b.tokens = tokens;
        Ok(wait)
    }

    /// Returns a token taken by [`Self::reserve`] that was not used.
    fn give_back(&self, ip: IpAddr) {
        if let Some(mut b) = self.buckets.get_mut(&ip) {
            b.tokens = (b.tokens + 1.0).min(f64::from(self.rate.burst));
        }
    }

    /// Waits for a token for `ip` within `deadline`. An unknown client is never limited;
    /// without a deadline the wait is unbounded, as upstream.
    pub async fn wait(
        &self,
        ip: Option<IpAddr>,
        deadline: Option<Instant>,
    ) -> Result<(), Exceeded> {
        let Some(ip) = ip else { return Ok(()) };
        let now = Instant::now();
        let max_wait = deadline.map(|d| d.saturating_duration_since(now));
        let wait = self.reserve(ip, now, max_wait)?;
        if wait.is_zero() {
            return Ok(());
        }
        // If the request is dropped while sleeping (client cancelled), the guard
        // returns the token.
        let guard = GiveBack { limiter: self, ip };
        // Boxed: only throttled calls pay for the timer, and every call's future stays
        // small (it is allocated per RPC; past 1 KiB glibc's malloc takes a slow path).
        Box::pin(tokio::time::sleep(wait)).await;
        std::mem::forget(guard);
        Ok(())
    }

    /// Drops idle buckets (full ones behave exactly like a fresh bucket).
    pub fn collect(&self, now: Instant) {
        let rate = self.rate;
        self.buckets.retain(|_, b| {
            b.advance(now, rate);
            b.tokens < f64::from(rate.burst)
        });
    }

    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

/// Returns the token when dropped; forgotten once the wait is over.
struct GiveBack<'a> {
    limiter: &'a IpRateLimiter,
    ip: IpAddr,
}

impl Drop for GiveBack<'_> {
    fn drop(&mut self) {
        self.limiter.give_back(self.ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn default_rate_is_fifteen_per_second_burst_sixty() {
        assert_eq!(
            Rate::default(),
            Rate {
                per_second: 15.0,
                burst: 60,
            }
        );
        // And the limiter built from it behaves so: 60 at once, then one per 1/15 s.
        let l = IpRateLimiter::new(Rate::default());
        let t0 = Instant::now();
        for _ in 0..60 {
            assert_eq!(l.reserve(IP, t0, Some(Duration::ZERO)), Ok(Duration::ZERO));
        }
        assert_eq!(l.reserve(IP, t0, Some(Duration::ZERO)), Err(Exceeded));
        let wait = l.reserve(IP, t0, None).unwrap();
        assert!(
            wait.abs_diff(Duration::from_secs(1) / 15) < Duration::from_micros(1),
            "{wait:?}"
        );
    }

    #[test]
    fn burst_then_deadline_bounded_wait() {
        // Upstream's test: 1 rps, burst 60, 1 s deadline → 60 pass, the 61st fails.
        let l = IpRateLimiter::new(Rate {
            per_second: 1.0,
            burst: 60,
        });
        let t0 = Instant::now();
        let within = Some(Duration::from_millis(999));
        for _ in 0..60 {
            assert_eq!(l.reserve(IP, t0, within), Ok(Duration::ZERO));
        }
        assert_eq!(l.reserve(IP, t0, within), Err(Exceeded));
        // A refused request took nothing: with a longer deadline it waits one second.
        assert_eq!(
            l.reserve(IP, t0, Some(Duration::from_secs(2))),
            Ok(Duration::from_secs(1))
        );
        // Without a deadline it queues behind that one.
        assert_eq!(l.reserve(IP, t0, None), Ok(Duration::from_secs(2)));
    }

    #[test]
    fn refill_and_per_ip_isolation() {
        let l = IpRateLimiter::new(Rate {
            per_second: 15.0,
            burst: 60,
        });
        let t0 = Instant::now();
        for _ in 0..60 {
            l.reserve(IP, t0, Some(Duration::ZERO)).unwrap();
        }
        assert!(l.reserve(IP, t0, Some(Duration::ZERO)).is_err());
        let other: IpAddr = "::1".parse().unwrap();
        assert!(l.reserve(other, t0, Some(Duration::ZERO)).is_ok());
        assert!(
            l.reserve(IP, t0 + Duration::from_millis(70), Some(Duration::ZERO))
                .is_ok()
        );
    }

    #[test]
    fn gc_drops_only_full_buckets() {
        let l = IpRateLimiter::new(Rate {
            per_second: 15.0,
            burst: 60,
        });
        let t0 = Instant::now();
        l.reserve(IP, t0, None).unwrap();
        l.collect(t0);
        assert_eq!(l.len(), 1);
        l.collect(t0 + Duration::from_secs(1));
        assert!(l.is_empty());
    }

    #[tokio::test]
    async fn abandoned_wait_gives_the_token_back() {
        let l = IpRateLimiter::new(Rate {
            per_second: 1.0,
            burst: 1,
        });
        l.wait(Some(IP), None).await.unwrap();
        let waiting = l.wait(Some(IP), None);
        // Dropped before the token arrives: like a client cancelling.
        assert!(
            tokio::time::timeout(Duration::from_millis(10), waiting)
                .await
                .is_err()
        );
        let t = Instant::now();
        assert_eq!(
            l.reserve(IP, t, Some(Duration::from_secs(5)))
                .map(|w| w <= Duration::from_secs(1)),
            Ok(true)
        );
        assert_eq!(
            l.wait(None, Some(t)).await,
            Ok(()),
            "unknown clients are not limited"
        );
    }
}
