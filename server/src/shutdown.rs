//! Process signals: SIGTERM (orchestrators) and SIGINT (Ctrl-C) both start a graceful
//! shutdown.
//!
//! Handlers are installed before the server starts: a SIGTERM that arrives while the
//! snapshot loads or the ports open must still trigger a graceful shutdown (with its
//! final save), not the default action of dying on the spot.

use tokio::signal::unix::{Signal, SignalKind, signal};

#[derive(Debug)]
pub struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    /// Installs the handlers now; from here on the signals are queued for [`Self::recv`].
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Resolves on the first SIGTERM or SIGINT.
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
            _ = self.int.recv() => tracing::info!(signal = "SIGINT", "shutting down"),
        }
    }
}
