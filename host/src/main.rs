use std::io::IsTerminal;

use clap::Parser;
use discoveryd::cli::{self, Cli, Command};
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // One TLS provider for the process: the Kubernetes client needs it set.
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("discoveryd: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run { config } => {
                let config = discoveryd::config::load(&config)?;
                discoveryd::daemon::run(config).await
            }
            Command::Get(args) => cli::get(args).await,
            Command::Plugins {
                target,
                output,
                watch,
            } => cli::plugins(target, output, watch).await,
            Command::Leave { target } => cli::leave(target).await,
            Command::Cluster(command) => cli::cluster::run(command).await,
            Command::Reset { config } => cli::reset(&config).await,
        }
    });
    // Dropping the runtime would wait for every blocking task, however stuck.
    runtime.shutdown_timeout(discoveryd::limits::EXIT_BLOCKING_GRACE);
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // `discoveryd get ... | head` closing the pipe is not an error.
        Err(e) if is_broken_pipe(&e) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("discoveryd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
