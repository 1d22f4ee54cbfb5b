//! `discovery-service`: the binary. Parses flags, sets up logging, runs the server until
//! SIGTERM/SIGINT, and exits non-zero if the final snapshot could not be written.

use std::process::ExitCode;

use discovery_service::{Config, Server, logging, shutdown};

fn main() -> ExitCode {
    let config = Config::from_args(std::env::args());
    logging::init(config.debug);
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
