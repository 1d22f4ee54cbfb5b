//! Runs one plugin for the life of the daemon: a fresh sandboxed Store per
//! incarnation, instantiated from the cached pre-instance; on a trap, a hang, a
//! memory bomb or an error, the Store is dropped and the plugin restarts after an
//! exponential backoff, while the other plugins carry on.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow};
use wasmtime::{Store, UpdateDeadline};
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

use super::busy::BusyClock;
use super::engine::{LoadedPlugin, PluginEngine};
use super::limiter::MemoryCap;
use super::plugin_log::{PluginLog, sanitize};
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
/// Errors here are configuration errors: the daemon does not start. `probe` must
/// have an empty prefix, so the plugin can neither publish nor wait meanwhile.
pub async fn prepare(
    engine: &Arc<PluginEngine>,
    config: &PluginConfig,
    probe: Arc<PluginContext>,
) -> Result<PreparedPlugin> {
    let at = || format!("plugins.{}: {}", config.name, config.path.display());
    let loaded = {
        // Compiling is seconds of CPU: keep it off the async workers.
        let (engine, path) = (engine.clone(), config.path.clone());
        tokio::task::spawn_blocking(move || engine.load(&path))
            .await?
            .with_context(at)?
    };
    let log = PluginLog::new(&config.name);
    let (mut store, busy) = new_store(engine, probe, config, &log).with_context(at)?;
    let info = within_budget(&busy, config.cpu_budget, async {
        let bindings = loaded
            .pre
            .instantiate_async(&mut store)
            .await
            .map_err(wasm_error)?;
        bindings
            .discovery_registry_registry()
            .call_describe(&mut store, &config.config_json)
            .await
            .map_err(wasm_error)
            .context("calling describe")
    })
    .await
    .with_context(at)?
    .map_err(|e| anyhow!("plugins.{}.config: {}", config.name, sanitize(&e)))?;
    let prefix = match &config.prefix {
        Some(prefix) => prefix.clone(),
        None if limits::is_registry_name(&info.prefix) => info.prefix,
        None => {
            return Err(anyhow!(
                "plugins.{}: the plugin declares prefix {:?}, which is not a valid name; set plugins.{0}.prefix",
                config.name,
                sanitize(&info.prefix),
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
    // One log for all incarnations, so restarts do not refill its rate limit.
    let log = PluginLog::new(&name);
    let mut backoff = Backoff::default();
    loop {
        let started = Instant::now();
        let outcome = run_once(&engine, &plugin, ctx.clone(), &log).await;
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
    log: &Arc<PluginLog>,
) -> Result<()> {
    let (name, statuses, shutdown) = (ctx.name.clone(), ctx.statuses.clone(), ctx.shutdown.clone());
    statuses.update(&name, |s| s.state = RunState::Starting);
    let (mut store, busy) = new_store(engine, ctx, &plugin.config, log)?;
    let budget = plugin.config.cpu_budget;
    let bindings = within_budget(&busy, budget, async {
        plugin
            .loaded
            .pre
            .instantiate_async(&mut store)
            .await
            .map_err(wasm_error)
    })
    .await?;
    statuses.update(&name, |s| s.state = RunState::Running);
    let run = within_budget(&busy, budget, async {
        bindings
            .discovery_registry_registry()
            .call_run(&mut store, &plugin.config.config_json)
            .await
            .map_err(wasm_error)
    });
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
    match finished? {
        Ok(()) => Ok(()),
        Err(message) => Err(anyhow!("run failed: {}", sanitize(&message))),
    }
}

/// Runs `call` unless the plugin stays busy longer than `budget` without waiting
/// for an event, whether in wasm or blocked in a host call; then the call (and
/// with it the Store) is abandoned.
async fn within_budget<T>(
    busy: &BusyClock,
    budget: Duration,
    call: impl Future<Output = Result<T>>,
) -> Result<T> {
    tokio::select! {
        result = call => result,
        busy_for = busy.exceeded(budget) => Err(budget_error(busy_for, budget)),
    }
}

fn budget_error(busy_for: Duration, budget: Duration) -> anyhow::Error {
    anyhow!(
        "CPU budget exceeded: busy {busy_for:?} without waiting for an event (limit {budget:?})"
    )
}

/// A Store with the plugin's sandbox: no environment, arguments or sockets, its
/// granted directories read-only, output to the log, memory capped, CPU
/// deadlines armed.
fn new_store(
    engine: &PluginEngine,
    ctx: Arc<PluginContext>,
    config: &PluginConfig,
    log: &Arc<PluginLog>,
) -> Result<(Store<PluginState>, Arc<BusyClock>)> {
    let mut wasi = WasiCtxBuilder::new();
    wasi.stdout(LogOutput::stdout(log))
        .stderr(LogOutput::stderr(log))
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
        log.clone(),
    );
    let busy = state.busy.clone();
    let mut store = Store::new(engine.engine(), state);
    store.limiter(|state| &mut state.memory);
    store.set_hostcall_fuel(limits::PLUGIN_HOSTCALL_BYTES);
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(|ctx| {
        let state = ctx.data();
        match state.busy.busy_for() {
            Some(busy) if busy > state.cpu_budget => Err(wasmtime::Error::from_anyhow(
                budget_error(busy, state.cpu_budget),
            )),
            // Yield every tick so a busy plugin never holds a runtime thread and
            // its watchdog gets to run.
            _ => Ok(UpdateDeadline::Yield(1)),
        }
    });
    Ok((store, busy))
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
