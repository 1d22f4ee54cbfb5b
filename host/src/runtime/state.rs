//! What one plugin instance holds in its wasmtime Store, and the host functions it
//! may call: log, local affiliate, publish, status, events and sealed crypto.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::{cluster_crypto, host, types};
use super::busy::BusyClock;
use super::convert;
use super::limiter::MemoryCap;
use super::plugin_log::{PluginLog, sanitize};
use super::status::PluginStatuses;
use crate::affiliate::AffiliateSpec;
use crate::crypto::ClusterKey;
use crate::limits;
use crate::payload;
use crate::store::{Kind, Namespace, Spec, Store};

/// What a plugin may see and touch, shared by all its incarnations.
pub struct PluginContext {
    pub name: String,
    /// Raw affiliates are stored as `<prefix>/<node-id>`. Empty while the plugin
    /// is only being asked to `describe` itself: then it may not publish or wait.
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
    /// Busy time since the last wait for an event, against `cpu_budget`.
    pub busy: Arc<BusyClock>,
    pub cpu_budget: Duration,
    log: Arc<PluginLog>,
    local: watch::Receiver<Option<AffiliateSpec>>,
    /// The rejections of the last publish, to log only what changes.
    /// A hash of the last publish's rejections, to log them only when they change.
    last_rejections: u64,
}

impl PluginState {
    pub fn new(
        ctx: Arc<PluginContext>,
        wasi: WasiCtx,
        memory: MemoryCap,
        cpu_budget: Duration,
        log: Arc<PluginLog>,
    ) -> PluginState {
        let local = ctx.local.clone();
        PluginState {
            ctx,
            wasi,
            table: ResourceTable::new(),
            memory,
            busy: BusyClock::new(),
            cpu_budget,
            log,
            local,
            last_rejections: 0,
        }
    }

    fn is_probe(&self) -> bool {
        self.ctx.prefix.is_empty()
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
        let level = match level {
            types::LogLevel::Trace => tracing::Level::TRACE,
            types::LogLevel::Debug => tracing::Level::DEBUG,
            types::LogLevel::Info => tracing::Level::INFO,
            types::LogLevel::Warn => tracing::Level::WARN,
            types::LogLevel::Error => tracing::Level::ERROR,
        };
        self.log.emit(level, "log", &message);
        Ok(())
    }

    async fn local_affiliate(&mut self) -> wasmtime::Result<Option<types::Affiliate>> {
        let local = self.local.borrow_and_update().as_ref().map(convert::to_wit);
        Ok(local)
    }

    async fn publish(
        &mut self,
        affiliates: Vec<types::Affiliate>,
    ) -> wasmtime::Result<Vec<host::Rejection>> {
        if self.is_probe() {
            wasmtime::bail!("publish called from describe: only run may publish");
        }
        let (accepted, rejected) = convert::validate_all(affiliates, &self.ctx.local_node_id);
        let summary = {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            for r in &rejected {
                (r.index, &r.reason).hash(&mut hasher);
            }
            hasher.finish()
        };
        if summary != self.last_rejections {
            // Through the plugin's rate-limited log, and only the first few: a
            // plugin must not flood the daemon's log by publishing garbage.
            for r in rejected.iter().take(limits::REJECTIONS_LOGGED) {
                let message = format!(
                    "rejected affiliate {} (node-id {:?}): {}",
                    r.index, r.node_id, r.reason
                );
                self.log.emit(tracing::Level::WARN, "publish", &message);
            }
            if let Some(more) = rejected.len().checked_sub(limits::REJECTIONS_LOGGED)
                && more > 0
            {
                let message = format!("{more} more affiliates rejected in the same publish");
                self.log.emit(tracing::Level::WARN, "publish", &message);
            }
            self.last_rejections = summary;
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
        Ok(rejected)
    }

    async fn set_status(&mut self, healthy: bool, message: String) -> wasmtime::Result<()> {
        let message = sanitize(&message);
        self.ctx.statuses.update(&self.ctx.name, |s| {
            s.healthy = healthy;
            s.message = message;
        });
        Ok(())
    }

    async fn next_event(&mut self, timeout_ms: u32) -> wasmtime::Result<host::Event> {
        if self.is_probe() {
            wasmtime::bail!("next-event called from describe: describe must return at once");
        }
        let wait = Duration::from_millis(timeout_ms.into()).min(limits::NEXT_EVENT_MAX_WAIT);
        self.busy.wait_begins();
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
        let idled = timeout_ms > 0 || !matches!(event, host::Event::Timeout);
        self.busy.wait_ends(idled);
        Ok(event)
    }
}

impl cluster_crypto::Host for PluginState {
    async fn cluster_id(&mut self) -> wasmtime::Result<Option<String>> {
        let id = self.ctx.cluster_id.clone();
        Ok(id)
    }

    async fn seal(&mut self, plaintext: Vec<u8>) -> wasmtime::Result<Result<Vec<u8>, String>> {
        let sealed = self.key().map(|k| k.seal(&plaintext));
        Ok(sealed)
    }

    async fn open(&mut self, sealed: Vec<u8>) -> wasmtime::Result<Result<Vec<u8>, String>> {
        let opened = self
            .key()
            .and_then(|k| k.open(&sealed).map_err(|e| e.to_string()));
        Ok(opened)
    }

    async fn seal_affiliate(
        &mut self,
        affiliate: types::Affiliate,
    ) -> wasmtime::Result<Result<Vec<u8>, String>> {
        let sealed = self.key().and_then(|k| {
            let spec = convert::validate(affiliate)?;
            Ok(k.seal(&payload::encode(&spec)))
        });
        Ok(sealed)
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
        Ok(opened)
    }

    async fn seal_endpoint(
        &mut self,
        endpoint: types::Endpoint,
    ) -> wasmtime::Result<Result<Vec<u8>, String>> {
        let sealed = self
            .key()
            .map(|k| k.seal_endpoint(convert::endpoint_from_wit(endpoint)));
        Ok(sealed)
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
        Ok(opened)
    }
}
