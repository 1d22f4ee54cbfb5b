//! `discovery-service`: the binary. Parses flags, sets up logging, runs the server until
//! SIGTERM/SIGINT, and exits non-zero if the final snapshot could not be written.

use std::process::ExitCode;

use discovery_service::{Config, Server, logging, shutdown};
use tracing_subscriber::EnvFilter;

/// JSON lines on stdout (human-readable in dev mode), batched (see `logging`); the
/// returned guard writes out what is still buffered when dropped.
fn init_logging(debug: bool) -> logging::Flush {
    let dev = debug || std::env::var("MODE").is_ok_and(|m| m == "dev");
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(if dev { "debug" } else { "info" }));
    let (stdout, flush) = logging::Stdout::new();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(stdout);
    if dev {
        builder.init();
    } else {
        builder.json().event_format(logging::FastJson::new()).init();
    }
    flush
}

fn main() -> ExitCode {
    let config = Config::from_args(std::env::args());
    // Declared before the runtime, so dropped after it: the last lines get written.
    let _flush = init_logging(config.debug);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "failed to start the runtime");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let mut signals = match shutdown::Signals::install() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "failed to install signal handlers");
                return ExitCode::FAILURE;
            }
        };
        let server = match Server::start(config).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "failed to start");
                return ExitCode::FAILURE;
            }
        };
        // Only a signal stops the server: `shutdown` is what cancels serving.
        signals.recv().await;
        match server.shutdown().await {
            Ok(()) => {
                tracing::info!("stopped");
                ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "shutdown failed");
                ExitCode::FAILURE
            }
        }
    })
}
