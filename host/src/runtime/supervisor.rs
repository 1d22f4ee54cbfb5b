//! Runs one plugin for the life of the daemon: a fresh sandboxed Store per
//! incarnation, instantiated from the cached pre-instance; on a trap, a hang, a
//! memory bomb or an error, the Store is dropped and the plugin restarts after an
//! exponential backoff (stretched further while it is over its CPU share), while
//! the other plugins carry on. A plugin that keeps failing for `withdrawAfter`
//! loses its raw affiliates, so a crash loop cannot keep stale members alive.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow};
use tokio::time::Instant;
use wasmtime::component::ResourceTableError;

use super::cpu_budget::BusyClock;
use super::engine::{LoadedPlugin, PluginEngine};
use super::host_api::throttled;
use super::plugin_log::sanitize;
use super::sandbox::{budget_error, new_store};
use super::state::PluginContext;
use super::status::RunState;
use crate::config::PluginConfig;
use crate::limits;

/// A plugin compiled, type-checked and described, ready to supervise.
pub struct PreparedPlugin {
    pub config: PluginConfig,
    pub loaded: LoadedPlugin,
    /// The prefix the plugin declares, unless the config overrides it.
    pub prefix: String,
}

/// Compiles (or loads from the cache) a plugin, checks that it was granted what
/// it declares it needs, and asks it for its prefix. Errors here are
/// configuration errors: the daemon does not start. `probe` must have no raw
/// writer and no grants, so the plugin can neither publish, wait nor read
/// anything meanwhile.
pub async fn prepare(
    engine: &Arc<PluginEngine>,
    config: &PluginConfig,
    probe: Arc<PluginContext>,
) -> Result<PreparedPlugin> {
    let at = || format!("plugins.{}: {}", config.name, config.source);
    let loaded = {
        // Compiling is seconds of CPU: keep it off the async workers.
        let (engine, source) = (engine.clone(), config.source.clone());
        tokio::task::spawn_blocking(move || engine.load(&source))
            .await?
            .with_context(at)?
    };
    config
        .grants
        .check_needs(&config.name, &loaded.needs)
        .map_err(|e| anyhow!(e))?;
    let mut store = new_store(engine, probe).with_context(at)?;
    let clock = store.data().clock.clone();
    let info = within_budget(&clock, config.limits.cpu_budget, async {
        let instance = loaded
            .pre
            .instantiate(&mut store)
            .await
            .map_err(|e| wasm_error(e, config.limits.resources))?;
        instance
            .describe(&mut store, &config.config_json)
            .await
            .map_err(|e| wasm_error(e, config.limits.resources))
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
    let mut backoff = Backoff::default();
    let mut failing = FailingSince::default();
    loop {
        // A plugin over its CPU share does not get to start either.
        if let Some(until) = ctx.share.held_until()
            && throttled(&ctx, until).await
        {
            break;
        }
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
        let ran_for = started.elapsed();
        let delay = backoff.next(ran_for);
        let failing_since = failing.failed(started, ran_for);
        tracing::warn!(plugin = %name, error = %error, "plugin failed; restarting in {delay:?}");
        statuses.update(&name, |s| {
            s.state = RunState::Restarting;
            s.restarts += 1;
            s.last_error = Some(error);
        });
        let restart_at = Instant::now() + delay;
        let withdraw_at = failing_since + ctx.limits.withdraw_after;
        if withdraw_at < restart_at {
            tokio::select! {
                _ = tokio::time::sleep_until(withdraw_at) => withdraw(&ctx),
                _ = ctx.shutdown.cancelled() => break,
            }
        }
        tokio::select! {
            _ = tokio::time::sleep_until(restart_at) => {}
            _ = ctx.shutdown.cancelled() => break,
        }
    }
    statuses.update(&name, |s| s.state = RunState::Stopped);
}

/// Removes the raw affiliates of a plugin that keeps failing (again, if an
/// incarnation published since the last time).
fn withdraw(ctx: &PluginContext) {
    let Some(raw) = &ctx.raw else { return };
    let removed = raw.withdraw();
    ctx.host_memory
        .published
        .store(0, std::sync::atomic::Ordering::Relaxed);
    ctx.public_addresses.set(&ctx.name, None);
    if removed > 0 {
        tracing::warn!(
            plugin = %ctx.name,
            removed,
            "plugin has been failing for over {:?}; its raw affiliates are withdrawn until it publishes again",
            ctx.limits.withdraw_after
        );
    }
    ctx.statuses.update(&ctx.name, |s| {
        s.withdrawn = true;
        s.published = 0;
        s.public_address = None;
    });
}

/// One incarnation: instantiate, run, and on shutdown give the plugin a grace
/// period to return before its Store is dropped mid-call.
async fn run_once(
    engine: &PluginEngine,
    plugin: &PreparedPlugin,
    ctx: Arc<PluginContext>,
) -> Result<()> {
    let (name, statuses, shutdown) = (ctx.name.clone(), ctx.statuses.clone(), ctx.shutdown.clone());
    let (share, resources) = (ctx.share.clone(), ctx.limits.resources);
    let budget = ctx.limits.cpu_budget;
    statuses.update(&name, |s| s.state = RunState::Starting);
    let mut store = new_store(engine, ctx)?;
    let clock = store.data().clock.clone();
    let outcome = async {
        let instance = within_budget(&clock, budget, async {
            plugin
                .loaded
                .pre
                .instantiate(&mut store)
                .await
                .map_err(|e| wasm_error(e, resources))
        })
        .await?;
        statuses.update(&name, |s| s.state = RunState::Running);
        let run = within_budget(&clock, budget, async {
            instance
                .run(&mut store, &plugin.config.config_json)
                .await
                .map_err(|e| wasm_error(e, resources))
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
    .await;
    // The last busy stretch counts toward the share too.
    share.add(clock.wait_begins());
    outcome
}

/// Runs `call` unless the plugin stays busy longer than `budget` without waiting
/// for an event, whether in wasm or blocked in a host call; then the call (and
/// with it the Store) is abandoned.
async fn within_budget<T>(
    clock: &BusyClock,
    budget: Duration,
    call: impl Future<Output = Result<T>>,
) -> Result<T> {
    tokio::select! {
        result = call => result,
        busy_for = clock.exceeded(budget) => Err(budget_error(busy_for, budget)),
    }
}

/// Keeps the cause chain of a wasmtime error (trap reason, our limit messages),
/// and says plainly when the plugin hit its resource limit.
fn wasm_error(e: wasmtime::Error, resources: usize) -> anyhow::Error {
    if e.chain()
        .any(|c| matches!(c.downcast_ref(), Some(ResourceTableError::Full)))
    {
        return anyhow!(
            "resource limit exceeded: the plugin holds {resources} host resources (files, \
             streams, pollables), its limit"
        );
    }
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

/// When the current run of failures began: the start of the first incarnation
/// that failed since the last one that ran long enough to count as healthy.
#[derive(Default)]
struct FailingSince {
    since: Option<Instant>,
}

impl FailingSince {
    /// An incarnation started at `started` failed after `ran_for`.
    fn failed(&mut self, started: Instant, ran_for: Duration) -> Instant {
        if ran_for >= limits::RESTART_BACKOFF_RESET_AFTER {
            self.since = None;
        }
        *self.since.get_or_insert(started)
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

    #[tokio::test(start_paused = true)]
    async fn failing_runs_from_the_first_failure_until_a_healthy_run() {
        let mut failing = FailingSince::default();
        let first = Instant::now();
        assert_eq!(failing.failed(first, Duration::from_secs(1)), first);
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(
            failing.failed(Instant::now(), Duration::from_secs(1)),
            first
        );
        tokio::time::sleep(Duration::from_secs(300)).await;
        let healthy = Instant::now();
        assert_eq!(
            failing.failed(healthy, limits::RESTART_BACKOFF_RESET_AFTER),
            healthy,
            "a long run starts a new count"
        );
    }
}
