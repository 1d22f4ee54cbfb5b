//! The host functions every plugin gets (log, local affiliate, publish, status,
//! events), in our own types. The WIT modules under `wit/` translate each
//! version's calls into these; nothing here knows a WIT type.

use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use super::cpu_budget::WaitEnd;
use super::host_calls::HandOver;
use super::plugin_log::sanitize;
use super::state::PluginState;
use super::status::RunState;
use super::validate::{self, Rejection};
use crate::capabilities::kube::{self, KubeRequest};
use crate::limits;
use crate::specs::AffiliateSpec;

/// What `next-event` hands a plugin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    Timeout,
    LocalChanged,
    Shutdown,
    /// A host resource with this handle has data.
    Ready(u32),
}

impl PluginState {
    fn is_probe(&self) -> bool {
        self.ctx.raw.is_none()
    }

    pub fn log(&mut self, level: tracing::Level, message: &str) {
        self.ctx.log.emit(level, "log", message);
    }

    pub fn local_affiliate(&mut self) -> Option<AffiliateSpec> {
        self.local.borrow_and_update().clone()
    }

    /// Replaces the plugin's raw affiliates with the valid entries of `entries`
    /// (each with the node ID the plugin gave and its conversion into our types);
    /// returns the rejected ones. What the host stores is charged to the plugin's
    /// memory cap.
    pub fn publish(
        &mut self,
        entries: impl IntoIterator<Item = (String, Result<AffiliateSpec, String>)>,
        total: usize,
    ) -> wasmtime::Result<Vec<Rejection>> {
        let ctx = self.ctx.clone();
        let Some(raw) = &ctx.raw else {
            wasmtime::bail!("publish called from describe: only run may publish");
        };
        let published = validate::publish(
            entries,
            total,
            &self.ctx.local_node_id,
            self.memory.room_to_publish(),
        );
        self.memory.set_published_bytes(published.bytes);
        let rejected = published.rejected;
        self.log_rejections(&rejected);
        let count = published.accepted.len();
        raw.publish(published.accepted);
        self.ctx.statuses.update(&self.ctx.name, |s| {
            s.published = count;
            s.withdrawn = false;
        });
        Ok(rejected)
    }

    /// Logs a publish's rejections when they differ from the last ones, through
    /// the plugin's rate-limited log and only the first few: a plugin must not
    /// flood the daemon's log by publishing garbage.
    fn log_rejections(&mut self, rejected: &[Rejection]) {
        let summary = {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            for r in rejected {
                (r.index, &r.reason).hash(&mut hasher);
            }
            hasher.finish()
        };
        if summary == self.last_rejections {
            return;
        }
        self.last_rejections = summary;
        for r in rejected.iter().take(limits::REJECTIONS_LOGGED) {
            let message = format!(
                "rejected affiliate {} (node-id {:?}): {}",
                r.index, r.node_id, r.reason
            );
            self.ctx.log.emit(tracing::Level::WARN, "publish", &message);
        }
        if let Some(more) = rejected.len().checked_sub(limits::REJECTIONS_LOGGED)
            && more > 0
        {
            let message = format!("{more} more affiliates rejected in the same publish");
            self.ctx.log.emit(tracing::Level::WARN, "publish", &message);
        }
    }

    pub fn set_status(&mut self, healthy: bool, message: &str) {
        let message = sanitize(message);
        self.ctx.statuses.update(&self.ctx.name, |s| {
            s.healthy = healthy;
            s.message = message;
        });
    }

    /// Waits for the next event, at most `timeout`. A plugin over its CPU share
    /// waits longer: until it is back within its share (events that arrive
    /// meanwhile are delivered after). Shutdown is delivered once; after it only
    /// `ready` events and timeouts, so a leaving plugin can finish its calls.
    pub async fn next_event(&mut self, timeout: Duration) -> wasmtime::Result<Event> {
        if self.is_probe() {
            wasmtime::bail!("next-event called from describe: describe must return at once");
        }
        let deadline = Instant::now() + timeout.min(limits::NEXT_EVENT_MAX_WAIT);
        self.ctx.share.add(self.clock.wait_begins());
        if let Some(until) = self.ctx.share.held_until() {
            let stopping = throttled(&self.ctx, until).await;
            self.clock.wait_ends(WaitEnd::Paused);
            if stopping && !self.shutdown_delivered {
                self.shutdown_delivered = true;
                return Ok(Event::Shutdown);
            }
            self.ctx.share.add(self.clock.wait_begins());
        }
        let stopping = self.shutdown_delivered;
        let event = tokio::select! {
            biased;
            _ = self.ctx.shutdown.cancelled(), if !stopping => Event::Shutdown,
            handle = self.calls.ready() => Event::Ready(handle),
            // The sender lives as long as the daemon; if it is gone we are stopping.
            changed = self.local.changed(), if !stopping => match changed {
                Ok(()) => Event::LocalChanged,
                Err(_) => Event::Shutdown,
            },
            _ = tokio::time::sleep_until(deadline) => Event::Timeout,
        };
        if event == Event::Shutdown {
            self.shutdown_delivered = true;
        }
        // A zero timeout that found nothing is a poll, not idle time.
        let polled = timeout.is_zero() && event == Event::Timeout;
        self.clock.wait_ends(if polled {
            WaitEnd::Polled
        } else {
            WaitEnd::Idled
        });
        Ok(event)
    }

    /// The public address a registry sees this node at, or none.
    pub fn set_public_address(&mut self, address: Option<IpAddr>) {
        if self.is_probe() {
            return;
        }
        self.ctx.public_addresses.set(&self.ctx.name, address);
        self.ctx
            .statuses
            .update(&self.ctx.name, |s| s.public_address = address);
    }

    /// Whether the daemon stops because the node leaves the cluster.
    pub fn leaving(&self) -> bool {
        self.ctx.leaving.load(Ordering::Acquire)
    }

    pub fn daemon_version(&self) -> String {
        format!("v{}", env!("CARGO_PKG_VERSION"))
    }

    /// Opens the channel to a granted endpoint.
    pub fn grpc_open_channel(
        &mut self,
        endpoint: &str,
        keepalive: Duration,
    ) -> Result<u32, String> {
        let grant = self.ctx.granter.grpc()?;
        self.grpc.open(
            &mut self.calls,
            grant,
            &self.ctx.channels,
            endpoint,
            keepalive,
        )
    }

    /// Starts a unary or server-streaming call on an open channel.
    pub fn grpc_start(
        &mut self,
        channel: u32,
        method: &str,
        request: Vec<u8>,
        timeout: Option<Duration>,
        streaming: bool,
    ) -> Result<u32, String> {
        self.ctx.granter.grpc()?;
        self.grpc.start(
            &mut self.calls,
            channel,
            method,
            request,
            timeout,
            streaming,
        )
    }

    /// Starts a Kubernetes Nodes call with the plugin's granted credentials.
    pub fn kube_start(&mut self, request: KubeRequest) -> Result<u32, String> {
        let grant = self.ctx.granter.kube()?.clone();
        kube::start(&mut self.calls, self.ctx.kube.clone(), grant, request)
    }

    /// The next result of a host call (gRPC or Kubernetes), of the type asked.
    pub fn call_next<E: HandOver>(&mut self, call: u32) -> Option<E> {
        self.calls.next(call)
    }

    pub fn call_close(&mut self, call: u32) {
        self.calls.close(call)
    }
}

/// Holds a plugin over its CPU share until `until`, showing it in its status.
/// Returns whether shutdown interrupted the hold.
pub async fn throttled(ctx: &super::PluginContext, until: Instant) -> bool {
    let mut before = RunState::Running;
    ctx.statuses.update(&ctx.name, |s| {
        before = s.state;
        s.state = RunState::Throttled;
        s.throttled += 1;
    });
    let stopping = tokio::select! {
        _ = ctx.shutdown.cancelled() => true,
        _ = tokio::time::sleep_until(until) => false,
    };
    ctx.statuses.update(&ctx.name, |s| {
        if s.state == RunState::Throttled {
            s.state = before;
        }
    });
    stopping
}
