//! Log output: JSON lines on stdout, with repeated lines sampled the way upstream's
//! logger (zap's production configuration) samples them.
//!
//! Every RPC logs a line (reference §4.12, "Logging"). Written in full, that is hundreds
//! of megabytes an hour under ordinary load; upstream's zap logger keeps, per one-second
//! window and per (level, message), the first [`FIRST`] lines and then every
//! [`THEREAFTER`]th. [`Sampler`] is that rule as a tracing-subscriber [`Layer`], with
//! one change: WARN and ERROR are never sampled (zap samples them too). The per-RPC
//! lines all carry the method name as their message, so each method is one key.
//!
//! The lines themselves are tracing-subscriber's own JSON (`flatten_event`, so
//! `message` and the fields sit at the top level of the object). `--debug` or
//! `MODE=dev` switches to human-readable text at debug level, unsampled (zap's
//! development logger does not sample either). `RUST_LOG` filters both; sampling
//! applies only to what the filter lets through.

use std::fmt::{self, Write as _};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt as _};
use tracing_subscriber::util::SubscriberInitExt as _;

/// Lines kept at the start of each window, per (level, message).
pub const FIRST: u64 = 100;
/// After [`FIRST`], one line in this many is kept.
pub const THEREAFTER: u64 = 100;
/// The sampling window.
pub const TICK: Duration = Duration::from_secs(1);
/// Counters per level; messages are hashed onto them (zap's number).
const COUNTERS_PER_LEVEL: usize = 4096;
/// INFO, DEBUG and TRACE; WARN and ERROR are never sampled.
const SAMPLED_LEVELS: usize = 3;

/// Sets up the process-wide subscriber (see the module docs).
pub fn init(debug: bool) {
    let dev = debug || std::env::var("MODE").is_ok_and(|m| m == "dev");
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(if dev { "debug" } else { "info" }));
    if dev {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    } else {
        tracing_subscriber::registry()
            .with(filter)
            .with(Sampler::new())
            .with(json_layer())
            .init();
    }
}

/// The JSON lines: `timestamp`, `level`, `message` and the event's fields, `target`,
/// all at the top level of one object per line, written to stdout.
pub fn json_layer<S>() -> tracing_subscriber::fmt::Layer<
    S,
    tracing_subscriber::fmt::format::JsonFields,
    tracing_subscriber::fmt::format::Format<tracing_subscriber::fmt::format::Json>,
>
where
    S: Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_subscriber::fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(false)
}

/// One (level, message hash) slot: how many lines its window has seen, and when the
/// window ends (nanoseconds on the sampler's clock).
#[derive(Debug, Default)]
struct Counter {
    reset_at: AtomicU64,
    count: AtomicU64,
}

impl Counter {
    /// Counts one line and returns its number within the current window, starting a new
    /// window if the last one is over. Concurrent callers may race at a window's start
    /// and miscount by a line or two, as zap's counter does; nothing is lost but
    /// precision.
    fn inc_check_reset(&self, now: u64, tick: u64) -> u64 {
        let reset_at = self.reset_at.load(Ordering::Acquire);
        if reset_at > now {
            return self.count.fetch_add(1, Ordering::Relaxed) + 1;
        }
        self.count.store(1, Ordering::Relaxed);
        let next = now.saturating_add(tick);
        if self
            .reset_at
            .compare_exchange(reset_at, next, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            // Another thread started the window (and reset the count) first.
            return self.count.fetch_add(1, Ordering::Relaxed) + 1;
        }
        1
    }
}

/// FNV-1a (32 bits) over everything written to it: zap's key hash, fed the formatted
/// message without building a string.
struct Fnv32a(u32);

impl Fnv32a {
    fn new() -> Self {
        Self(0x811c_9dc5)
    }
}

impl fmt::Write for Fnv32a {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            self.0 ^= u32::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0193);
        }
        Ok(())
    }
}

impl Visit for Fnv32a {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            let _ = self.write_str(value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // A formatted message (`"{method}"`) arrives here; its Debug is its Display.
        if field.name() == "message" {
            let _ = write!(self, "{value:?}");
        }
    }
}

/// Nanoseconds on a monotonic clock (since the first call).
fn monotonic_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let elapsed = START.get_or_init(Instant::now).elapsed();
    u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX)
}

/// zap's sampler as a [`Layer`]: drops an INFO, DEBUG or TRACE event that is past the
/// [`FIRST`] of its (level, message) in the current [`TICK`] and not a multiple of
/// [`THEREAFTER`] beyond it. Placed before the formatting layer, a dropped event is never
/// formatted.
pub struct Sampler<C = fn() -> u64> {
    counters: Box<[Counter]>,
    clock: C,
    dropped: AtomicU64,
}

impl Sampler {
    pub fn new() -> Self {
        Self::with_clock(monotonic_ns)
    }
}

impl Default for Sampler {
    fn default() -> Self {
        Self::new()
    }
}

impl<C: Fn() -> u64> Sampler<C> {
    /// A sampler reading `clock` (nanoseconds, never going back) for each event.
    pub fn with_clock(clock: C) -> Self {
        Self {
            counters: (0..SAMPLED_LEVELS * COUNTERS_PER_LEVEL)
                .map(|_| Counter::default())
                .collect(),
            clock,
            dropped: AtomicU64::new(0),
        }
    }

    /// Events dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Whether an event of `level` whose message hashes to `hash`, seen at `now`, is kept.
    fn keep(&self, level: Level, hash: u32, now: u64) -> bool {
        let row = match level {
            Level::INFO => 0,
            Level::DEBUG => 1,
            Level::TRACE => 2,
            _ => return true, // WARN and ERROR: always.
        };
        let slot = row * COUNTERS_PER_LEVEL + hash as usize % COUNTERS_PER_LEVEL;
        let tick = u64::try_from(TICK.as_nanos()).unwrap_or(u64::MAX);
        let n = self.counters[slot].inc_check_reset(now, tick);
        let keep = n <= FIRST || (n - FIRST).is_multiple_of(THEREAFTER);
        if !keep {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        keep
    }
}

impl<C> fmt::Debug for Sampler<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sampler")
            .field("dropped", &self.dropped.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<S, C> Layer<S> for Sampler<C>
where
    S: Subscriber,
    C: Fn() -> u64 + Send + Sync + 'static,
{
    fn event_enabled(&self, event: &Event<'_>, _: Context<'_, S>) -> bool {
        let level = *event.metadata().level();
        if level <= Level::WARN {
            return true;
        }
        let mut hash = Fnv32a::new();
        event.record(&mut hash);
        self.keep(level, hash.0, (self.clock)())
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use super::*;

    const SECOND: u64 = 1_000_000_000;

    fn kept_of(s: &Sampler<impl Fn() -> u64>, level: Level, key: &str, n: u64, now: u64) -> u64 {
        let mut h = Fnv32a::new();
        h.write_str(key).unwrap();
        (0..n).filter(|_| s.keep(level, h.0, now)).count() as u64
    }

    #[test]
    fn first_hundred_then_one_in_a_hundred_per_window() {
        let s = Sampler::with_clock(|| 0);
        // Lines 1–100 and then 200, 300, … 1000 of the same second.
        assert_eq!(kept_of(&s, Level::INFO, "m", 1000, 5), 109);
        assert_eq!(s.dropped(), 891);
        // Still the same window just before its end: 1001..=1100 adds one (1100).
        assert_eq!(kept_of(&s, Level::INFO, "m", 100, 5 + SECOND - 1), 1);
        // A new window starts with the first line at or after the end.
        assert_eq!(kept_of(&s, Level::INFO, "m", 150, 5 + SECOND), 100);
    }

    #[test]
    fn keys_are_level_and_message() {
        let s = Sampler::with_clock(|| 0);
        assert_eq!(kept_of(&s, Level::INFO, "a", 100, 0), 100);
        assert_eq!(kept_of(&s, Level::INFO, "a", 99, 0), 0);
        // Another message, the same message at another level: their own windows.
        assert_eq!(kept_of(&s, Level::INFO, "b", 100, 0), 100);
        assert_eq!(kept_of(&s, Level::DEBUG, "a", 100, 0), 100);
        assert_eq!(kept_of(&s, Level::TRACE, "a", 100, 0), 100);
    }

    #[test]
    fn warnings_and_errors_are_never_sampled() {
        let s = Sampler::with_clock(|| 0);
        assert_eq!(kept_of(&s, Level::WARN, "w", 10_000, 0), 10_000);
        assert_eq!(kept_of(&s, Level::ERROR, "e", 10_000, 0), 10_000);
        assert_eq!(s.dropped(), 0);
    }

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// The production stack (filter, sampler, JSON) writing to a capture, on a clock the
    /// test moves.
    fn lines_of(emit: impl FnOnce(&AtomicU64)) -> Vec<serde_json::Value> {
        let out = Capture::default();
        let writer = out.clone();
        let clock = Arc::new(AtomicU64::new(0));
        let c = clock.clone();
        let subscriber = tracing_subscriber::registry()
            .with(EnvFilter::new("info"))
            .with(Sampler::with_clock(move || c.load(Ordering::Relaxed)))
            .with(json_layer().with_writer(move || writer.clone()));
        tracing::subscriber::with_default(subscriber, || emit(&clock));
        let bytes = out.0.lock().unwrap().clone();
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn the_layer_samples_formatted_messages_and_keeps_fields_at_the_top_level() {
        let method = |m: &str| format!("/sidero.discovery.server.Cluster/{m}");
        let lines = lines_of(|clock| {
            tracing::info!(server = "grpc", address = "127.0.0.1:3000", "listening");
            for i in 0..1000 {
                let m = method(if i % 2 == 0 { "Hello" } else { "List" });
                tracing::info!(code = "OK", n = i, "{m}");
                tracing::debug!("filtered out, never counted");
                tracing::error!(code = "Internal", n = i, "{m}");
            }
            clock.store(SECOND, Ordering::Relaxed);
            tracing::info!(code = "OK", n = 1000, "{}", method("Hello"));
        });

        let listening = &lines[0];
        assert_eq!(listening["message"], "listening");
        assert_eq!(listening["server"], "grpc");
        assert_eq!(listening["address"], "127.0.0.1:3000");
        assert_eq!(listening["level"], "INFO");
        assert!(listening.get("fields").is_none(), "{listening}");

        let of = |level: &str, m: &str| -> Vec<i64> {
            lines
                .iter()
                .filter(|v| v["level"] == level && v["message"] == method(m))
                .map(|v| v["n"].as_i64().unwrap())
                .collect()
        };
        // 500 each: the first 100, then the 200th, 300th, 400th and 500th.
        let hello = of("INFO", "Hello");
        assert_eq!(hello.len(), 100 + 4 + 1, "{hello:?}");
        assert_eq!(hello[99], 198);
        assert_eq!(hello[100..104], [398, 598, 798, 998]);
        assert_eq!(hello[104], 1000, "a new window keeps the next line");
        assert_eq!(of("INFO", "List").len(), 104);
        assert_eq!(of("ERROR", "Hello").len(), 500);
        assert_eq!(of("ERROR", "List").len(), 500);
    }
}
