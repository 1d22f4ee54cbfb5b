//! The sandbox of one plugin incarnation: a Store with no environment, arguments
//! or sockets, only the directories it was granted (read-only), output to its
//! log, a memory cap that covers what the host keeps for it, a cap on the host
//! resources it holds, and CPU limits armed on every epoch tick.

use std::sync::Arc;

use anyhow::Result;
use wasmtime::{Store, StoreContextMut, UpdateDeadline};
use wasmtime_wasi::WasiCtxBuilder;

use super::cpu_budget::WaitEnd;
use super::engine::PluginEngine;
use super::host_api::throttled;
use super::state::{PluginContext, PluginState};
use super::stdio::LogOutput;
use crate::capabilities::files;
use crate::limits;

pub fn new_store(engine: &PluginEngine, ctx: Arc<PluginContext>) -> Result<Store<PluginState>> {
    let mut wasi = WasiCtxBuilder::new();
    wasi.stdout(LogOutput::stdout(&ctx.log))
        .stderr(LogOutput::stderr(&ctx.log))
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .max_random_size(limits::PLUGIN_RANDOM_BYTES_MAX);
    files::preopen(&mut wasi, &ctx.granter.grants().files)?;
    // Every copy from the guest into the host (a call's arguments) counts against
    // this, so one call cannot make the host hold more than the plugin's cap.
    let hostcall_bytes = limits::PLUGIN_HOSTCALL_BYTES.min(ctx.limits.memory);
    let mut store = Store::new(engine.engine(), PluginState::new(ctx, wasi.build()));
    store.limiter(|state| &mut state.memory);
    store.set_hostcall_fuel(hostcall_bytes);
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(on_epoch_tick);
    Ok(store)
}

/// Runs every epoch tick while the plugin's wasm runs: charges the CPU share,
/// stops a plugin over its CPU budget, pauses one over its share, and otherwise
/// yields so a busy plugin never holds its thread and its watchdog gets to run.
fn on_epoch_tick(store: StoreContextMut<'_, PluginState>) -> wasmtime::Result<UpdateDeadline> {
    let state = store.data();
    let (clock, ctx) = (&state.clock, &state.ctx);
    ctx.share.add(clock.take_busy());
    if let Some(busy) = clock.busy_for()
        && busy > ctx.limits.cpu_budget
    {
        return Err(wasmtime::Error::from_anyhow(budget_error(
            busy,
            ctx.limits.cpu_budget,
        )));
    }
    if let Some(until) = ctx.share.held_until() {
        // The pause is neither busy time nor the idle time that ends a stretch.
        clock.wait_begins();
        let (clock, ctx) = (clock.clone(), ctx.clone());
        return Ok(UpdateDeadline::YieldCustom(
            1,
            Box::pin(async move {
                throttled(&ctx, until).await;
                clock.wait_ends(WaitEnd::Paused);
            }),
        ));
    }
    Ok(UpdateDeadline::Yield(1))
}

pub fn budget_error(busy_for: std::time::Duration, budget: std::time::Duration) -> anyhow::Error {
    anyhow::anyhow!(
        "CPU budget exceeded: busy {busy_for:?} without waiting for an event (limit {budget:?})"
    )
}
