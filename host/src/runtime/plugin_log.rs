//! A plugin's log lines (its `log` calls and its stdout/stderr) on their way into
//! the daemon's log: made safe for one line, tagged with the plugin's name, and
//! rate-limited so a chatty plugin cannot flood the log.

use std::sync::{Arc, Mutex};

use tokio::time::Instant;
use tracing::Level;

use crate::limits;

pub struct PluginLog {
    plugin: Arc<str>,
    bucket: Mutex<Bucket>,
}

/// A token bucket of log lines; what it drops is counted and reported.
struct Bucket {
    tokens: f64,
    refilled: Instant,
    dropped: u64,
}

impl PluginLog {
    pub fn new(plugin: &str) -> Arc<PluginLog> {
        Arc::new(PluginLog {
            plugin: plugin.into(),
            bucket: Mutex::new(Bucket {
                tokens: limits::PLUGIN_LOG_BURST,
                refilled: Instant::now(),
                dropped: 0,
            }),
        })
    }

    /// Logs one line from the plugin, unless it is over its rate.
    pub fn emit(&self, level: Level, stream: &'static str, message: &str) {
        let dropped = {
            let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let refill =
                now.duration_since(bucket.refilled).as_secs_f64() * limits::PLUGIN_LOG_PER_SECOND;
            bucket.tokens = (bucket.tokens + refill).min(limits::PLUGIN_LOG_BURST);
            bucket.refilled = now;
            if bucket.tokens < 1.0 {
                bucket.dropped += 1;
                return;
            }
            bucket.tokens -= 1.0;
            std::mem::take(&mut bucket.dropped)
        };
        let plugin = &*self.plugin;
        if dropped > 0 {
            tracing::warn!(plugin, "dropped {dropped} log lines over the rate limit");
        }
        let message = sanitize(message);
        match level {
            Level::TRACE => tracing::trace!(plugin, stream, "{message}"),
            Level::DEBUG => tracing::debug!(plugin, stream, "{message}"),
            Level::INFO => tracing::info!(plugin, stream, "{message}"),
            Level::WARN => tracing::warn!(plugin, stream, "{message}"),
            Level::ERROR => tracing::error!(plugin, stream, "{message}"),
        }
    }
}

/// Makes plugin text safe for one log line or table cell: control and invisible
/// formatting characters (bidi overrides, zero-width) are replaced, and the
/// result is at most `MESSAGE_MAX` bytes.
pub fn sanitize(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(limits::MESSAGE_MAX));
    for c in text.chars() {
        let c = if c.is_control() || is_invisible_format(c) {
            '\u{FFFD}'
        } else {
            c
        };
        if out.len() + c.len_utf8() > limits::MESSAGE_MAX {
            break;
        }
        out.push(c);
    }
    out
}

/// Unicode format characters that reorder or hide text.
fn is_invisible_format(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{206F}' | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFB}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_text_cannot_forge_or_hide_log_content() {
        assert_eq!(sanitize("a\nb\x1b[31m"), "a\u{FFFD}b\u{FFFD}[31m");
        assert_eq!(sanitize("evil\u{202E}txt.exe"), "evil\u{FFFD}txt.exe");
        assert_eq!(sanitize(&"é".repeat(5000)).len(), limits::MESSAGE_MAX);
        assert!(sanitize(&"\n".repeat(5000)).len() <= limits::MESSAGE_MAX);
    }

    #[tokio::test(start_paused = true)]
    async fn a_chatty_plugin_is_cut_to_its_rate() {
        let log = PluginLog::new("chatty");
        for _ in 0..10_000 {
            log.emit(Level::INFO, "log", "spam");
        }
        let bucket = log.bucket.lock().unwrap();
        assert_eq!(bucket.dropped, 10_000 - limits::PLUGIN_LOG_BURST as u64);
    }
}
