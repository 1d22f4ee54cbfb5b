//! What one plugin instance holds in its wasmtime Store, and the host functions it
//! may call: log, local affiliate, publish, status, events and sealed crypto.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::{cluster_crypto, host, types};
use super::convert;
use super::limiter::MemoryCap;
use super::status::PluginStatuses;
use crate::affiliate::AffiliateSpec;
use crate::crypto::ClusterKey;
use crate::limits;
use crate::payload;
use crate::store::{Kind, Namespace, Spec, Store};

/// What a plugin may see and touch, shared by all its incarnations.
pub struct PluginContext {
    pub name: String,
    /// Raw affiliates are stored as `<prefix>/<node-id>`.
    pub prefix: String,
    pub store: Arc<Store>,
    pub local: watch::Receiver<Option<AffiliateSpec>>,
    pub local_node_id: String,
    pub cluster_id: Option<String>,
    pub key: Option<Arc<ClusterKey>>,
    pub statuses: Arc<PluginStatuses>,
    pub shutdown: CancellationToken,
}

/// The data of one plugin Store.
pub struct PluginState {
    pub ctx: Arc<PluginContext>,
    wasi: WasiCtx,
    table: ResourceTable,
    pub memory: MemoryCap,
    /// When the guest last got control back from the host; the CPU budget counts
    /// from here.
    pub guest_since: Instant,
    pub cpu_budget: Duration,
    local: watch::Receiver<Option<AffiliateSpec>>,
}

impl PluginState {
    pub fn new(
        ctx: Arc<PluginContext>,
        wasi: WasiCtx,
        memory: MemoryCap,
        cpu_budget: Duration,
    ) -> PluginState {
        let local = ctx.local.clone();
        PluginState {
            ctx,
            wasi,
            table: ResourceTable::new(),
            memory,
            guest_since: Instant::now(),
            cpu_budget,
            local,
        }
    }

    /// Marks the return to the guest; every host function ends with it.
    fn resume<T>(&mut self, value: T) -> wasmtime::Result<T> {
        self.guest_since = Instant::now();
        Ok(value)
    }

    /// Whether the guest has run longer than its budget without a host call.
    pub fn over_cpu_budget(&self) -> bool {
        self.guest_since.elapsed() > self.cpu_budget
    }

    fn key(&self) -> Result<&ClusterKey, String> {
        self.ctx
            .key
            .as_deref()
            .ok_or_else(|| "no cluster identity is configured (cluster.id, cluster.secret)".into())
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

impl types::Host for PluginState {}

impl host::Host for PluginState {
    async fn log(&mut self, level: types::LogLevel, message: String) -> wasmtime::Result<()> {
        let message = convert::sanitize(&message);
        let plugin = self.ctx.name.as_str();
        match level {
            types::LogLevel::Trace => tracing::trace!(plugin, "{message}"),
            types::LogLevel::Debug => tracing::debug!(plugin, "{message}"),
            types::LogLevel::Info => tracing::info!(plugin, "{message}"),
            types::LogLevel::Warn => tracing::warn!(plugin, "{message}"),
            types::LogLevel::Error => tracing::error!(plugin, "{message}"),
        }
        self.resume(())
    }

    async fn local_affiliate(&mut self) -> wasmtime::Result<Option<types::Affiliate>> {
        let local = self.local.borrow_and_update().as_ref().map(convert::to_wit);
        self.resume(local)
    }

    async fn publish(
        &mut self,
        affiliates: Vec<types::Affiliate>,
    ) -> wasmtime::Result<Vec<host::Rejection>> {
        if self.ctx.prefix.is_empty() {
            wasmtime::bail!("publish called from describe: only run may publish");
        }
        let (accepted, rejected) = convert::validate_all(affiliates, &self.ctx.local_node_id);
        for r in &rejected {
            tracing::warn!(plugin = %self.ctx.name, index = r.index, node_id = %convert::sanitize(&r.node_id), "rejected affiliate: {}", r.reason);
        }
        let prefix = format!("{}/", self.ctx.prefix);
        let count = accepted.len();
        let desired = accepted
            .into_iter()
            .map(|spec| (format!("{prefix}{}", spec.node_id), Spec::Affiliate(spec)));
        self.ctx
            .store
            .sync(Namespace::ClusterRaw, Kind::Affiliate, &prefix, desired);
        self.ctx
            .statuses
            .update(&self.ctx.name, |s| s.published = count);
        self.resume(rejected)
    }

    async fn set_status(&mut self, healthy: bool, message: String) -> wasmtime::Result<()> {
        let message = convert::sanitize(&message);
        self.ctx.statuses.update(&self.ctx.name, |s| {
            s.healthy = healthy;
            s.message = message;
        });
        self.resume(())
    }

    async fn next_event(&mut self, timeout_ms: u32) -> wasmtime::Result<host::Event> {
        let wait = Duration::from_millis(timeout_ms.into()).min(limits::NEXT_EVENT_MAX_WAIT);
        let event = tokio::select! {
            biased;
            _ = self.ctx.shutdown.cancelled() => host::Event::Shutdown,
            // The sender lives as long as the daemon; if it is gone we are stopping.
            changed = self.local.changed() => match changed {
                Ok(()) => host::Event::LocalChanged,
                Err(_) => host::Event::Shutdown,
            },
            _ = tokio::time::sleep(wait) => host::Event::Timeout,
        };
        self.resume(event)
    }
}

impl cluster_crypto::Host for PluginState {
    async fn cluster_id(&mut self) -> wasmtime::Result<Option<String>> {
        let id = self.ctx.cluster_id.clone();
        self.resume(id)
    }

    async fn seal(&mut self, plaintext: Vec<u8>) -> wasmtime::Result<Result<Vec<u8>, String>> {
        let sealed = self.key().map(|k| k.seal(&plaintext));
        self.resume(sealed)
    }

    async fn open(&mut self, sealed: Vec<u8>) -> wasmtime::Result<Result<Vec<u8>, String>> {
        let opened = self
            .key()
            .and_then(|k| k.open(&sealed).map_err(|e| e.to_string()));
        self.resume(opened)
    }

    async fn seal_affiliate(
        &mut self,
        affiliate: types::Affiliate,
    ) -> wasmtime::Result<Result<Vec<u8>, String>> {
        let sealed = self.key().and_then(|k| {
            let spec = convert::validate(affiliate)?;
            Ok(k.seal(&payload::encode(&spec)))
        });
        self.resume(sealed)
    }

    async fn open_affiliate(
        &mut self,
        sealed: Vec<u8>,
    ) -> wasmtime::Result<Result<types::Affiliate, String>> {
        let opened = self.key().and_then(|k| {
            let plain = k.open(&sealed).map_err(|e| e.to_string())?;
            let spec = payload::decode(&plain).map_err(|e| e.to_string())?;
            Ok(convert::to_wit(&spec))
        });
        self.resume(opened)
    }

    async fn seal_endpoint(
        &mut self,
        endpoint: types::Endpoint,
    ) -> wasmtime::Result<Result<Vec<u8>, String>> {
        let sealed = self
            .key()
            .map(|k| k.seal_endpoint(convert::endpoint_from_wit(endpoint)));
        self.resume(sealed)
    }

    async fn open_endpoint(
        &mut self,
        sealed: Vec<u8>,
    ) -> wasmtime::Result<Result<types::Endpoint, String>> {
        let opened = self.key().and_then(|k| {
            k.open_endpoint(&sealed)
                .map(convert::endpoint_to_wit)
                .map_err(|e| e.to_string())
        });
        self.resume(opened)
    }
}
