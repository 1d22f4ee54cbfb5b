//! A plugin's stdout and stderr go to the daemon's log, one line per record,
//! tagged with the plugin's name.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

use super::convert::sanitize;
use crate::limits;

#[derive(Clone)]
pub struct LogOutput {
    plugin: Arc<str>,
    stream: &'static str,
}

impl LogOutput {
    pub fn new(plugin: &str, stream: &'static str) -> LogOutput {
        LogOutput {
            plugin: plugin.into(),
            stream,
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
            let text = sanitize(&String::from_utf8_lossy(&self.line));
            let (plugin, stream) = (&*self.output.plugin, self.output.stream);
            // stderr carries panics and errors; stdout is chatter.
            if stream == "stderr" {
                tracing::warn!(plugin, stream, "{text}");
            } else {
                tracing::info!(plugin, stream, "{text}");
            }
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
