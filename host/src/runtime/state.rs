//! What a plugin holds: [`PluginContext`], shared by all its incarnations, and
//! [`PluginState`], the data of one incarnation's wasmtime Store.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::cpu_budget::BusyClock;
use super::cpu_share::CpuShare;
use super::host_calls::HostCalls;
use super::memory_cap::{HostMemory, MemoryCap};
use super::plugin_log::PluginLog;
use super::status::PluginStatuses;
use crate::capabilities::grpc::{Channels, GrpcChannels};
use crate::capabilities::kube::KubeClient;
use crate::capabilities::{Granter, Grants};
use crate::config::{PluginConfig, PluginLimits};
use crate::public_addresses::PublicAddresses;
use crate::specs::AffiliateSpec;
use crate::store::{RawWriter, Store};

/// What a plugin may see and touch, shared by all its incarnations.
pub struct PluginContext {
    pub name: String,
    /// Where its raw affiliates go. `None` while the plugin is only being asked to
    /// `describe` itself: then it may not publish or wait.
    pub raw: Option<RawWriter>,
    pub local: watch::Receiver<Option<AffiliateSpec>>,
    pub local_node_id: String,
    pub granter: Arc<Granter>,
    pub limits: PluginLimits,
    pub statuses: Arc<PluginStatuses>,
    pub shutdown: CancellationToken,
    /// Busy time over the CPU-share window, across restarts.
    pub share: Arc<CpuShare>,
    /// Host memory charged to the plugin (what it published, messages for it).
    pub host_memory: Arc<HostMemory>,
    /// Its gRPC channels, one per endpoint, kept across restarts.
    pub channels: Channels,
    /// Its Kubernetes client, made on first use, kept across restarts.
    pub kube: Arc<KubeClient>,
    pub leaving: Arc<AtomicBool>,
    pub public_addresses: Arc<PublicAddresses>,
    /// One log for all incarnations, so restarts do not refill its rate limit.
    pub log: Arc<PluginLog>,
}

/// What the contexts of all plugins share: the daemon's side of them.
#[derive(Clone)]
pub struct SharedContext {
    pub store: Arc<Store>,
    pub local: watch::Receiver<Option<AffiliateSpec>>,
    pub node_id: String,
    pub statuses: Arc<PluginStatuses>,
    pub shutdown: CancellationToken,
    /// Set before `shutdown` when the node leaves the cluster (`discoveryd leave`).
    pub leaving: Arc<AtomicBool>,
    pub public_addresses: Arc<PublicAddresses>,
}

impl SharedContext {
    /// The context of one plugin. Without a prefix it is a probe: no raw writer
    /// and no grants, for `describe`.
    pub fn context(&self, plugin: &PluginConfig, prefix: Option<&str>) -> Arc<PluginContext> {
        let grants = match prefix {
            Some(_) => plugin.grants.clone(),
            None => Grants::none(),
        };
        Arc::new(PluginContext {
            name: plugin.name.clone(),
            raw: prefix.map(|p| RawWriter::new(self.store.clone(), p)),
            local: self.local.clone(),
            local_node_id: self.node_id.clone(),
            granter: Arc::new(Granter::new(&plugin.name, grants)),
            limits: plugin.limits.clone(),
            statuses: self.statuses.clone(),
            shutdown: self.shutdown.clone(),
            share: Arc::new(CpuShare::new(
                plugin.limits.cpu_share_percent,
                plugin.limits.cpu_share_window,
            )),
            host_memory: Arc::default(),
            channels: Channels::default(),
            kube: Arc::default(),
            leaving: self.leaving.clone(),
            public_addresses: self.public_addresses.clone(),
            log: PluginLog::new(&plugin.name),
        })
    }
}

/// The data of one plugin Store.
pub struct PluginState {
    pub ctx: Arc<PluginContext>,
    pub(super) wasi: WasiCtx,
    pub(super) table: ResourceTable,
    pub memory: MemoryCap,
    /// Busy time since the last wait for an event, against the CPU budget.
    pub clock: Arc<BusyClock>,
    /// Its host calls (gRPC, Kubernetes); dropped (and cancelled) with the Store.
    pub(super) calls: HostCalls,
    pub(super) grpc: GrpcChannels,
    /// `shutdown` was delivered; later waits deliver only `ready` or `timeout`.
    pub(super) shutdown_delivered: bool,
    pub(super) local: watch::Receiver<Option<AffiliateSpec>>,
    /// A hash of the last publish's rejections, to log them only when they change.
    pub(super) last_rejections: u64,
}

impl PluginState {
    pub fn new(ctx: Arc<PluginContext>, wasi: WasiCtx) -> PluginState {
        let local = ctx.local.clone();
        let mut table = ResourceTable::new();
        table.set_max_capacity(ctx.limits.resources);
        PluginState {
            memory: MemoryCap::new(ctx.limits.memory, ctx.host_memory.clone()),
            clock: BusyClock::new(),
            calls: HostCalls::new(ctx.host_memory.clone()),
            grpc: GrpcChannels::new(&ctx.name),
            shutdown_delivered: false,
            ctx,
            wasi,
            table,
            local,
            last_rejections: 0,
        }
    }

    pub fn cpu_budget(&self) -> Duration {
        self.ctx.limits.cpu_budget
    }

    /// The resource table, for host functions that hand out resources.
    pub fn table(&mut self) -> &mut ResourceTable {
        &mut self.table
    }
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}
