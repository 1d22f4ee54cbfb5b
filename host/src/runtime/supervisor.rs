//! Runs one plugin for the life of the daemon: a fresh sandboxed Store per
//! incarnation, instantiated from the cached pre-instance; on a trap, a hang, a
//! memory bomb or an error, the Store is dropped and the plugin restarts after an
//! exponential backoff, while the other plugins carry on.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow};
use tokio_util::sync::CancellationToken;
use wasmtime::{Store, UpdateDeadline};
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

use super::engine::{LoadedPlugin, PluginEngine};
use super::limiter::MemoryCap;
use super::state::{PluginContext, PluginState};
use super::status::RunState;
use super::stdio::LogOutput;
use crate::config::PluginConfig;
use crate::limits;

/// A plugin compiled, type-checked and described, ready to supervise.
pub struct PreparedPlugin {
    pub config: PluginConfig,
    pub loaded: LoadedPlugin,
    /// The prefix the plugin declares, unless the config overrides it.
    pub prefix: String,
}

/// Compiles (or loads from the cache) a plugin and asks it for its prefix.
/// Errors here are configuration errors: the daemon does not start.
pub async fn prepare(
    engine: &PluginEngine,
    config: &PluginConfig,
    probe: Arc<PluginContext>,
) -> Result<PreparedPlugin> {
    let loaded = engine.load(&config.path)?;
    let mut store = new_store(engine, probe, config)?;
    let bindings = loaded
        .pre
        .instantiate_async(&mut store)
        .await
        .map_err(wasm_error)?;
    let info = bindings
        .discovery_registry_registry()
        .call_describe(&mut store)
        .await
        .map_err(wasm_error)
        .context("calling describe")?;
    let prefix = match &config.prefix {
        Some(prefix) => prefix.clone(),
        None if crate::limits::is_registry_name(&info.prefix) => info.prefix,
        None => {
            return Err(anyhow!(
                "the plugin declares prefix {:?}, which is not a valid name; set plugins.{}.prefix",
                info.prefix,
                config.name
            ));
        }
    };
    Ok(PreparedPlugin {
        config: config.clone(),
        loaded,
        prefix,
    })
}

/// Runs the plugin until `ctx.shutdown` fires, restarting it on failure.
pub async fn supervise(engine: Arc<PluginEngine>, plugin: PreparedPlugin, ctx: Arc<PluginContext>) {
    let name = ctx.name.clone();
    let statuses = ctx.statuses.clone();
    let mut backoff = Backoff::default();
    loop {
        statuses.update(&name, |s| s.state = RunState::Running);
        let started = Instant::now();
        let outcome = run_once(&engine, &plugin, ctx.clone()).await;
        if ctx.shutdown.is_cancelled() {
            if let Err(e) = &outcome {
                tracing::warn!(plugin = %name, "plugin ended badly while stopping: {e:#}");
            }
            break;
        }
        let error = match outcome {
            Ok(()) => "run returned before shutdown".to_string(),
            Err(e) => format!("{e:#}"),
        };
        let delay = backoff.next(started.elapsed());
        tracing::warn!(plugin = %name, error = %error, "plugin failed; restarting in {delay:?}");
        statuses.update(&name, |s| {
            s.state = RunState::Restarting;
            s.restarts += 1;
            s.last_error = Some(error);
        });
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = ctx.shutdown.cancelled() => break,
        }
    }
    statuses.update(&name, |s| s.state = RunState::Stopped);
}

/// One incarnation: instantiate, run, and on shutdown give the plugin a grace
/// period to return before its Store is dropped mid-call.
async fn run_once(
    engine: &PluginEngine,
    plugin: &PreparedPlugin,
    ctx: Arc<PluginContext>,
) -> Result<()> {
    let shutdown: CancellationToken = ctx.shutdown.clone();
    let mut store = new_store(engine, ctx, &plugin.config)?;
    let bindings = plugin
        .loaded
        .pre
        .instantiate_async(&mut store)
        .await
        .map_err(wasm_error)?;
    let run = bindings
        .discovery_registry_registry()
        .call_run(&mut store, &plugin.config.config_json);
    tokio::pin!(run);
    let finished = tokio::select! {
        finished = &mut run => finished,
        _ = shutdown.cancelled() => {
            match tokio::time::timeout(limits::PLUGIN_SHUTDOWN_GRACE, &mut run).await {
                Ok(finished) => finished,
                Err(_) => return Err(anyhow!("did not stop within {:?}", limits::PLUGIN_SHUTDOWN_GRACE)),
            }
        }
    };
    match finished.map_err(wasm_error)? {
        Ok(()) => Ok(()),
        Err(message) => Err(anyhow!(
            "run failed: {}",
            super::convert::sanitize(&message)
        )),
    }
}

/// A Store with the plugin's sandbox: no environment, arguments or sockets, its
/// granted directories read-only, output to the log, memory capped, CPU
/// deadlines armed.
fn new_store(
    engine: &PluginEngine,
    ctx: Arc<PluginContext>,
    config: &PluginConfig,
) -> Result<Store<PluginState>> {
    let mut wasi = WasiCtxBuilder::new();
    wasi.stdout(LogOutput::new(&config.name, "stdout"))
        .stderr(LogOutput::new(&config.name, "stderr"))
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false);
    for grant in &config.files {
        wasi.preopened_dir(&grant.host, &grant.guest, FsPerms::ReadOnly)
            .map_err(wasm_error)
            .with_context(|| format!("granting {}", grant.host.display()))?;
    }
    let state = PluginState::new(
        ctx,
        wasi.build(),
        MemoryCap::new(config.memory_limit),
        config.cpu_budget,
    );
    let mut store = Store::new(engine.engine(), state);
    store.limiter(|state| &mut state.memory);
    store.set_hostcall_fuel(limits::PLUGIN_HOSTCALL_BYTES);
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(|ctx| {
        let state = ctx.data();
        if state.over_cpu_budget() {
            wasmtime::bail!(
                "CPU budget exceeded: ran {:?} without calling the host (limit {:?})",
                state.guest_since.elapsed(),
                state.cpu_budget
            );
        }
        // Yield every tick so a busy plugin never holds a runtime thread.
        Ok(UpdateDeadline::Yield(1))
    });
    Ok(store)
}

/// Keeps the cause chain of a wasmtime error (trap reason, our limit messages).
fn wasm_error(e: wasmtime::Error) -> anyhow::Error {
    let causes: Vec<String> = e.chain().map(|c| c.to_string()).collect();
    // The first line of wasmtime's outermost message is a backtrace header; the
    // causes underneath say what happened.
    let useful: Vec<&str> = causes
        .iter()
        .map(|c| c.lines().next().unwrap_or(""))
        .filter(|c| !c.starts_with("error while executing at wasm backtrace"))
        .collect();
    anyhow!("{}", useful.join(": "))
}

/// Exponential restart delays, reset after a long healthy run.
#[derive(Default)]
struct Backoff {
    last: Option<Duration>,
}

impl Backoff {
    fn next(&mut self, ran_for: Duration) -> Duration {
        let delay = match self.last {
            Some(last) if ran_for < limits::RESTART_BACKOFF_RESET_AFTER => {
                (last * 2).min(limits::RESTART_BACKOFF_MAX)
            }
            _ => limits::RESTART_BACKOFF_FIRST,
        };
        self.last = Some(delay);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_and_resets_after_a_healthy_run() {
        let mut b = Backoff::default();
        let quick = Duration::from_millis(1);
        let delays: Vec<u64> = (0..10).map(|_| b.next(quick).as_millis() as u64).collect();
        assert_eq!(
            delays,
            [
                500, 1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000, 60000
            ]
        );
        assert_eq!(
            b.next(limits::RESTART_BACKOFF_RESET_AFTER),
            limits::RESTART_BACKOFF_FIRST
        );
    }
}
