//! Log output: the same JSON lines on stdout, cheap enough for one line per RPC.
//!
//! Every RPC logs a line (reference §4.12, "Logging"). With tracing-subscriber's JSON
//! formatter and one `write(2)` per line, that line cost about a fifth of the server's
//! CPU per AffiliateUpdate (`cargo bench`). Two changes keep the lines byte for byte:
//!
//! - [`FastJson`] writes the JSON itself: the keys, their order and the escaping of
//!   `json().flatten_event(true).with_current_span(false)`, without going through serde
//!   one token at a time. Events inside a span and `log` records, which the server does
//!   not emit on its hot paths, go to the stock formatter.
//! - [`Stdout`] batches lines: WARN and ERROR lines (with everything before them), and any
//!   batch over [`BATCH_MAX`], are written at once; other lines at most [`FLUSH_DELAY`]
//!   later, from a background thread; all of them when [`Flush`] is dropped on exit.
//!   A SIGKILL can lose at most that delay's worth of INFO lines.

use std::fmt::{self, Write as _};
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::fmt::format::{Format, Json, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

/// Longest a buffered INFO line waits before it is written.
pub const FLUSH_DELAY: Duration = Duration::from_millis(10);
/// A batch this large is written at once by the thread that filled it.
pub const BATCH_MAX: usize = 64 * 1024;

/// The stock formatter [`FastJson`] reproduces (and falls back to).
pub fn stock_json<T>(timer: T) -> Format<Json, T> {
    tracing_subscriber::fmt::format()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_timer(timer)
}

/// JSON event formatter with the output of [`stock_json`].
#[derive(Debug)]
pub struct FastJson<T = SystemTime> {
    timer: T,
    stock: Format<Json, T>,
}

impl FastJson {
    pub fn new() -> Self {
        Self::with_timer(SystemTime)
    }
}

impl Default for FastJson {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: FormatTime + Clone> FastJson<T> {
    pub fn with_timer(timer: T) -> Self {
        Self {
            stock: stock_json(timer.clone()),
            timer,
        }
    }
}

/// Writes `s` as the inside of a JSON string, escaped exactly as serde_json does.
fn escape(w: &mut impl fmt::Write, s: &str) -> fmt::Result {
    // Nearly every string needs no escaping: check with a branch-free scan (which the
    // compiler vectorizes) and write it whole.
    let special = s.bytes().fold(false, |any, b| {
        any | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if !special {
        return w.write_str(s);
    }
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let short = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0..=0x1f => "",
            _ => continue,
        };
        w.write_str(&s[start..i])?;
        if short.is_empty() {
            write!(w, "\\u{b:04x}")?;
        } else {
            w.write_str(short)?;
        }
        start = i + 1;
    }
    w.write_str(&s[start..])
}

/// `fmt::Write` adapter escaping everything written through it.
struct Escaped<'a, W>(&'a mut W);

impl<W: fmt::Write> fmt::Write for Escaped<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        escape(self.0, s)
    }
}

/// Writes each field as `,"name":value` with serde_json's rendering of each type, as
/// tracing-serde's map visitor does.
struct Fields<'a, 'w> {
    w: &'a mut Writer<'w>,
    result: fmt::Result,
}

impl Fields<'_, '_> {
    fn entry(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_ok() {
            self.result = (|| {
                self.w.write_str(",\"")?;
                escape(self.w, field.name())?;
                self.w.write_str("\":")?;
                value(self.w)
            })();
        }
    }
}

impl Visit for Fields<'_, '_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.entry(field, |w| {
            w.write_char('"')?;
            write!(Escaped(w), "{value:?}")?;
            w.write_char('"')
        });
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.entry(field, |w| {
            w.write_char('"')?;
            escape(w, value)?;
            w.write_char('"')
        });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.entry(field, |w| write!(w, "{value}"));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.entry(field, |w| write!(w, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.entry(field, |w| write!(w, "{value}"));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // serde_json's float rendering (ryu, `null` for NaN and infinities); rare.
        self.entry(field, |w| {
            w.write_str(&serde_json::to_string(&value).map_err(|_| fmt::Error)?)
        });
    }
}

impl<S, N, T> FormatEvent<S, N> for FastJson<T>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    T: FormatTime,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let in_span = event
            .parent()
            .and_then(|id| ctx.span(id))
            .or_else(|| ctx.lookup_current())
            .is_some();
        // `log` records carry their real target and level in fields (tracing-log).
        let from_log = meta.fields().field("log.target").is_some();
        if in_span || from_log {
            return self.stock.format_event(ctx, w, event);
        }
        w.write_str("{\"timestamp\":\"")?;
        self.timer.format_time(&mut w)?;
        write!(w, "\",\"level\":\"{}\"", meta.level())?;
        let mut fields = Fields {
            w: &mut w,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        w.write_str(",\"target\":\"")?;
        escape(&mut w, meta.target())?;
        w.write_str("\"}\n")
    }
}

#[derive(Debug, Default)]
struct Pending {
    buf: Vec<u8>,
    stopped: bool,
}

#[derive(Debug)]
struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
    /// Where batches go: stdout, or a capture in tests.
    sink: fn(&[u8]),
}

fn stdout_sink(batch: &[u8]) {
    // Nowhere to report a failed log write; the lines are dropped, as before.
    let _ = io::stdout().lock().write_all(batch);
}

impl Shared {
    fn new(sink: fn(&[u8])) -> Self {
        Self {
            pending: Mutex::default(),
            wake: Condvar::new(),
            sink,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes the batch out. Called with the lock held, so batches keep their order.
    fn write_out(&self, p: &mut Pending) {
        if !p.buf.is_empty() {
            (self.sink)(&p.buf);
            p.buf.clear();
        }
    }

    fn push(&self, line: &[u8], urgent: bool) {
        let mut p = self.lock();
        let was_empty = p.buf.is_empty();
        p.buf.extend_from_slice(line);
        if urgent || p.stopped || p.buf.len() >= BATCH_MAX {
            self.write_out(&mut p);
        } else if was_empty {
            self.wake.notify_one();
        }
    }

    /// Background flusher: waits for a first line, lets more arrive for
    /// [`FLUSH_DELAY`], writes them all.
    fn run(&self) {
        loop {
            let mut p = self.lock();
            while p.buf.is_empty() && !p.stopped {
                p = self.wake.wait(p).unwrap_or_else(|e| e.into_inner());
            }
            if p.stopped {
                return;
            }
            drop(p);
            std::thread::sleep(FLUSH_DELAY);
            self.write_out(&mut self.lock());
        }
    }
}

/// Batched stdout for tracing (see the module docs).
#[derive(Debug, Clone)]
pub struct Stdout {
    shared: Arc<Shared>,
}

/// Writes whatever is still buffered and stops the background thread; lines logged
/// afterwards are written at once.
#[derive(Debug)]
pub struct Flush {
    shared: Arc<Shared>,
}

impl Drop for Flush {
    fn drop(&mut self) {
        let mut p = self.shared.lock();
        p.stopped = true;
        self.shared.write_out(&mut p);
        self.shared.wake.notify_one();
    }
}

impl Stdout {
    /// The writer and the guard that flushes it; keep the guard until exit.
    pub fn new() -> (Self, Flush) {
        let shared = Arc::new(Shared::new(stdout_sink));
        let s = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("log-flush".into())
            .spawn(move || s.run());
        if spawned.is_err() {
            // No thread: write every line at once rather than never.
            shared.lock().stopped = true;
        }
        (
            Self {
                shared: shared.clone(),
            },
            Flush { shared },
        )
    }
}

/// One event's writer; tracing-subscriber writes each formatted line in one call.
#[derive(Debug)]
pub struct LineWriter<'a> {
    shared: &'a Shared,
    urgent: bool,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.shared.push(buf, self.urgent);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Stdout {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter {
            shared: &self.shared,
            urgent: true,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        LineWriter {
            shared: &self.shared,
            urgent: *meta.level() <= Level::WARN,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tracing_subscriber::fmt::format::{JsonFields, Writer};

    use super::*;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn fixed_time(w: &mut Writer<'_>) -> fmt::Result {
        w.write_str("2024-01-02T03:04:05.678901Z")
    }

    #[derive(Debug)]
    struct Weird {
        #[allow(dead_code)]
        text: &'static str,
    }

    fn events() {
        let peer: std::net::IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        tracing::info!(
            grpc.method = "/sidero.discovery.server.Cluster/AffiliateUpdate",
            duration = ?Duration::from_micros(1234),
            code = "OK",
            peer.address = %peer,
            cluster_id = "c\"l\\u\n\r\t\u{8}\u{c}\u{1}\u{1f}\u{7f}é€𝄞",
            affiliate_id = Some("a"),
            client_version = None::<&str>,
            "finished call"
        );
        tracing::error!(
            n = 18_446_744_073_709_551_615u64,
            i = -42i64,
            yes = true,
            f = 1.5f64,
            big = 1e21f64,
            nan = f64::NAN,
            wide = u128::MAX,
            weird = ?Weird { text: "q\"\\\u{0}" },
            error = &io::Error::other("bad \"thing\"\n") as &dyn std::error::Error,
            "a {} message with \"quotes\"",
            "formatted"
        );
        tracing::warn!(target: "custom::target\"x", "only a message");
        tracing::info!(message = "explicit", extra = 1);
        let span = tracing::info_span!("outer", id = 7, name = "s\"p");
        let _g = span.enter();
        tracing::info!(inside = "a span", "delegated");
    }

    fn render<E>(format: E) -> String
    where
        E: FormatEvent<tracing_subscriber::Registry, JsonFields> + Send + Sync + 'static,
    {
        let out = Capture::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_writer(move || writer.clone())
            .event_format(format)
            .finish();
        tracing::subscriber::with_default(subscriber, events);
        let bytes = out.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn fast_json_writes_exactly_the_stock_lines() {
        let t = fixed_time as fn(&mut Writer<'_>) -> fmt::Result;
        let stock = render(stock_json(t));
        let fast = render(FastJson::with_timer(t));
        assert_eq!(stock.lines().count(), 5, "{stock}");
        for (s, f) in stock.lines().zip(fast.lines()) {
            assert_eq!(f, s);
            serde_json::from_str::<serde_json::Value>(f).unwrap();
        }
        assert_eq!(fast, stock);
    }

    #[test]
    fn escaping_matches_serde_json() {
        let all: String = (0u32..0x80).filter_map(char::from_u32).collect::<String>() + "é𝄞";
        let mut ours = String::from("\"");
        escape(&mut ours, &all).unwrap();
        ours.push('"');
        assert_eq!(ours, serde_json::to_string(&all).unwrap());
    }

    static WRITTEN: Mutex<Vec<u8>> = Mutex::new(Vec::new());

    fn capture_sink(batch: &[u8]) {
        WRITTEN.lock().unwrap().extend_from_slice(batch);
    }

    #[test]
    fn lines_are_batched_in_order_and_urgent_ones_flush_everything_before_them() {
        let shared = Arc::new(Shared::new(capture_sink));
        let written = || WRITTEN.lock().unwrap().clone();
        let mut want = String::new();
        for i in 0..1000 {
            let line = format!("{i}\n");
            shared.push(line.as_bytes(), false);
            want.push_str(&line);
        }
        assert!(written().is_empty(), "INFO lines wait for the flusher");
        shared.push(b"warn\n", true);
        want.push_str("warn\n");
        assert_eq!(written(), want.as_bytes());

        let s = shared.clone();
        let flusher = std::thread::spawn(move || s.run());
        shared.push(b"late\n", false);
        want.push_str("late\n");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while written().len() < want.len() {
            assert!(std::time::Instant::now() < deadline, "the flusher writes");
            std::thread::sleep(FLUSH_DELAY);
        }
        assert_eq!(written(), want.as_bytes());

        drop(Flush {
            shared: shared.clone(),
        });
        flusher.join().unwrap();
        shared.push(b"after\n", false);
        want.push_str("after\n");
        assert_eq!(
            written(),
            want.as_bytes(),
            "written at once after the flush"
        );
    }
}
