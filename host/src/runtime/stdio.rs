//! A plugin's stdout and stderr go to the daemon's log, one line per record,
//! through the plugin's rate-limited log.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;
use tracing::Level;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

use super::plugin_log::PluginLog;
use crate::limits;

#[derive(Clone)]
pub struct LogOutput {
    log: Arc<PluginLog>,
    stream: &'static str,
    /// stderr carries panics and errors; stdout is chatter.
    level: Level,
}

impl LogOutput {
    pub fn stdout(log: &Arc<PluginLog>) -> LogOutput {
        LogOutput {
            log: log.clone(),
            stream: "stdout",
            level: Level::INFO,
        }
    }

    pub fn stderr(log: &Arc<PluginLog>) -> LogOutput {
        LogOutput {
            log: log.clone(),
            stream: "stderr",
            level: Level::WARN,
        }
    }
}

impl IsTerminal for LogOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(LineWriter {
            output: self.clone(),
            line: Vec::new(),
        })
    }
}

struct LineWriter {
    output: LogOutput,
    line: Vec<u8>,
}

impl LineWriter {
    fn emit(&mut self) {
        if !self.line.is_empty() {
            let text = String::from_utf8_lossy(&self.line);
            self.output
                .log
                .emit(self.output.level, self.output.stream, &text);
            self.line.clear();
        }
    }
}

impl AsyncWrite for LineWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        for &byte in buf {
            if byte == b'\n' {
                self.emit();
            } else {
                self.line.push(byte);
                // A line without end must not grow without bound.
                if self.line.len() >= limits::MESSAGE_MAX {
                    self.emit();
                }
            }
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.emit();
        Poll::Ready(Ok(()))
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        self.emit();
    }
}
