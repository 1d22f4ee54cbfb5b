//! Write registry plugins for `discoveryd` as WebAssembly components.
//!
//! A registry plugin learns about the other nodes of a cluster from one source (a
//! discovery service, Kubernetes, a file...) and publishes what it found to the
//! daemon. The daemon owns the node identity, the cluster secret, merging and the
//! API; a plugin owns only its protocol. Implement [`Registry`], export it with
//! [`export_registry!`], and build with `cargo build --target wasm32-wasip2`.
//!
//! When the daemon starts it checks the plugin's config with
//! [`Registry::check_config`]. Then the SDK runs the event loop: it calls
//! [`Registry::on_local_change`] once at start
//! and whenever this node's data changes, [`Registry::on_timer`] every
//! [`Registry::poll_interval`], and [`Registry::on_shutdown`] before the plugin
//! stops. Returning an error restarts the plugin with backoff.
//!
//! The daemon treats every plugin as hostile, so a plugin lives within limits:
//! a memory cap (which counts what it publishes), a CPU budget per busy stretch
//! and a CPU share over a window (a plugin over it is throttled), a cap on open
//! files and other host resources. Capabilities beyond the basics are granted by
//! the operator: [`crypto`] needs `grants.crypto`; a plugin that cannot work
//! without one declares it (`export_registry!(T, needs = ["cluster-crypto"])`) and
//! is refused at start instead of failing later. Limits shared with the daemon
//! (such as [`PUBLISH_MAX`]) come from the `discovery-common` crate.
//!
//! # Example
//!
//! A registry that publishes one fixed peer:
//!
//! ```no_run
//! use discovery_sdk::{Affiliate, MachineType, Registry, export_registry, info, publish};
//!
//! struct OnePeer {
//!     peer: Affiliate,
//! }
//!
//! impl Registry for OnePeer {
//!     const PREFIX: &'static str = "one";
//!
//!     fn check_config(config: &str) -> Result<(), String> {
//!         // Runs when the daemon starts: a mistake stops it with a clear error.
//!         match config.starts_with('"') {
//!             true => Ok(()),
//!             false => Err(format!("expected the peer's nodename as a string, got {config}")),
//!         }
//!     }
//!
//!     fn new(config: &str) -> Result<Self, String> {
//!         // `config` is the plugin's config section from the daemon config, as JSON.
//!         let nodename = config.trim_matches(|c| c == '"').to_string();
//!         let peer = Affiliate {
//!             node_id: "5z3zDxA6XfwQd4ZhZ3LhJjLZmR1Y8VJ3pS4YmIwbG1Fq".into(),
//!             hostname: nodename.clone(),
//!             nodename,
//!             machine_type: MachineType::Worker,
//!             operating_system: "Talos (v1.12.0)".into(),
//!             addresses: vec!["10.0.0.7".parse().map_err(|e| format!("{e}"))?],
//!             kubespan: None,
//!             control_plane: None,
//!         };
//!         Ok(Self { peer })
//!     }
//!
//!     fn on_local_change(&mut self, _local: Option<Affiliate>) -> Result<(), String> {
//!         let rejected = publish(std::slice::from_ref(&self.peer));
//!         info!("published 1 peer, {} rejected", rejected.len());
//!         Ok(())
//!     }
//! }
//!
//! export_registry!(OnePeer);
//! ```

// The generated bindings name this crate by its public path, which must resolve
// inside the crate too.
extern crate self as discovery_sdk;

mod convert;

use std::time::{Duration, Instant};

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "registry-plugin",
        pub_export_macro: true,
        export_macro_name: "__export_bindings",
        default_bindings_module: "discovery_sdk::bindings",
        runtime_path: "discovery_sdk::bindings::__rt",
        additional_derives: [PartialEq, Eq, Hash],
    });
    #[doc(hidden)]
    pub use wit_bindgen::rt as __rt;
}

pub use bindings::discovery::registry::host::Rejection;
use bindings::discovery::registry::host::{self, Event};
pub use bindings::discovery::registry::types::{
    Affiliate, ControlPlane, Endpoint, IpAddress, IpPrefix, Kubespan, LogLevel, MachineType,
};
pub use convert::ParseError;

pub mod backoff;
pub mod grpc;
pub mod kube;

/// Sealing and opening through the host: the cluster key never enters the plugin.
pub mod crypto {
    pub use crate::bindings::discovery::registry::cluster_crypto::{
        cluster_id, open, open_affiliate, open_endpoint, seal, seal_affiliate, seal_endpoint,
    };
}

/// A registry plugin. Every callback that returns an error stops this run of the
/// plugin; the daemon logs the error and restarts the plugin with backoff.
pub trait Registry: Sized {
    /// Prefix of the raw affiliates this registry publishes, as in `static/<node-id>`.
    const PREFIX: &'static str;

    /// Checks the config section (JSON; `null` when absent) when the daemon starts,
    /// so a mistake stops the daemon with an error naming this plugin instead of
    /// restarting it forever. Parse only: no files, no host calls. The default
    /// accepts anything.
    fn check_config(config: &str) -> Result<(), String> {
        let _ = config;
        Ok(())
    }

    /// Builds the registry from its config section (JSON; `null` when absent).
    fn new(config: &str) -> Result<Self, String>;

    /// How often [`Registry::on_timer`] runs; `None` (the default) never.
    fn poll_interval(&self) -> Option<Duration> {
        None
    }

    /// Called once at start and whenever this node's own affiliate changes.
    fn on_local_change(&mut self, local: Option<Affiliate>) -> Result<(), String> {
        let _ = local;
        Ok(())
    }

    /// Called every [`Registry::poll_interval`].
    fn on_timer(&mut self) -> Result<(), String> {
        Ok(())
    }

    /// When [`Registry::on_deadline`] should run next, if ever: for timers that
    /// change (backoffs, refreshes). Asked again after every callback.
    fn next_deadline(&self) -> Option<Instant> {
        None
    }

    /// Called once [`Registry::next_deadline`] has passed.
    fn on_deadline(&mut self) -> Result<(), String> {
        Ok(())
    }

    /// Called when the gRPC call with this ID ([`grpc::Call::id`]) has something:
    /// take it with [`grpc::Call::next`].
    fn on_ready(&mut self, call: u32) -> Result<(), String> {
        let _ = call;
        Ok(())
    }

    /// Called before the plugin stops because the daemon shuts down. If
    /// [`leaving`] is true the node leaves the cluster: withdraw it from the
    /// registry ([`wait_ready`] delivers call results meanwhile).
    fn on_shutdown(&mut self) {}
}

/// True when the daemon stops because this node leaves the cluster
/// (`discoveryd leave`), rather than for a reboot.
pub fn leaving() -> bool {
    host::leaving()
}

/// The daemon's version (`v0.1.0`), to report as a client version.
pub fn daemon_version() -> String {
    host::daemon_version()
}

/// Reports the public address a registry sees this node at (none withdraws it).
pub fn set_public_address(address: Option<std::net::IpAddr>) {
    host::set_public_address(address.map(Into::into))
}

/// Waits up to `max` for a gRPC call to have something, returning its ID: for
/// [`Registry::on_shutdown`], where the event loop no longer runs.
pub fn wait_ready(max: Duration) -> Option<u32> {
    match host::next_event(wait_ms(max)) {
        Event::Ready(call) => Some(call),
        _ => None,
    }
}

/// A wait in whole milliseconds, rounded up: a zero timeout is a poll, which the
/// host does not count as idle.
fn wait_ms(wait: Duration) -> u32 {
    wait.min(MAX_WAIT).as_micros().div_ceil(1000) as u32
}

/// The most affiliates one [`publish`] takes; the excess gets one rejection.
pub use discovery_common::registry_limits::PUBLISH_MAX;

/// Replaces this plugin's published view of the other nodes; returns the entries
/// the daemon refused, with the reason (at most [`PUBLISH_MAX`] entries count).
pub fn publish(affiliates: &[Affiliate]) -> Vec<Rejection> {
    host::publish(affiliates)
}

/// Sets the health note shown by `discoveryd plugins`.
pub fn set_status(healthy: bool, message: &str) {
    host::set_status(healthy, message)
}

/// This node's own affiliate, if discovery publishes one.
pub fn local_affiliate() -> Option<Affiliate> {
    host::local_affiliate()
}

/// Writes a line to the daemon's log; prefer the [`info!`]-style macros.
pub fn log(level: LogLevel, message: &str) {
    host::log(level, message)
}

/// Logs at debug level, with `format!` arguments.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => { $crate::log($crate::LogLevel::Debug, &format!($($arg)*)) };
}

/// Logs at info level, with `format!` arguments.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::log($crate::LogLevel::Info, &format!($($arg)*)) };
}

/// Logs at warn level, with `format!` arguments.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { $crate::log($crate::LogLevel::Warn, &format!($($arg)*)) };
}

/// Logs at error level, with `format!` arguments.
#[macro_export]
macro_rules! error {
    ($($arg:tt)*) => { $crate::log($crate::LogLevel::Error, &format!($($arg)*)) };
}

/// Exports a [`Registry`] implementation as the plugin's entry point.
///
/// A plugin that cannot work without a capability the operator must grant says
/// so, and the daemon refuses to start it without the grant instead of letting it
/// fail at run time:
///
/// ```ignore
/// export_registry!(MyRegistry, needs = ["cluster-crypto"]);
/// ```
///
/// Capabilities: `cluster-crypto` (the [`crypto`] functions, `grants.crypto`) and
/// `files` (read-only directories, `grants.files`).
#[macro_export]
macro_rules! export_registry {
    ($registry:ty, needs = [$($need:literal),* $(,)?]) => {
        $crate::export_registry!($registry);

        // The declaration the daemon reads before compiling the plugin: one
        // capability name per line, in a custom section.
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            const NEEDS: &str = concat!($($need, "\n"),*);
            #[unsafe(link_section = "discovery:registry/needs")]
            #[used]
            static DISCOVERY_REGISTRY_NEEDS: [u8; NEEDS.len()] = $crate::needs_section(NEEDS);
        };
    };
    ($registry:ty) => {
        // Native builds (tests, clippy) type-check the export but do not emit it: the
        // component ABI's symbol names mean nothing to a native linker.
        #[allow(dead_code)]
        struct __DiscoveryRegistryExport;

        impl $crate::bindings::exports::discovery::registry::registry::Guest
            for __DiscoveryRegistryExport
        {
            fn describe(
                config: String,
            ) -> Result<$crate::bindings::exports::discovery::registry::registry::RegistryInfo, String>
            {
                <$registry as $crate::Registry>::check_config(&config)?;
                Ok($crate::bindings::exports::discovery::registry::registry::RegistryInfo {
                    prefix: <$registry as $crate::Registry>::PREFIX.to_string(),
                })
            }

            fn run(config: String) -> Result<(), String> {
                $crate::run::<$registry>(&config)
            }
        }

        #[cfg(target_arch = "wasm32")]
        $crate::bindings::__export_bindings!(
            __DiscoveryRegistryExport with_types_in $crate::bindings
        );

        // Natively, refer to the entry points so the plugin's code counts as used.
        #[cfg(not(target_arch = "wasm32"))]
        const _: () = {
            use $crate::bindings::exports::discovery::registry::registry::Guest as _;
            let _ = __DiscoveryRegistryExport::run;
            let _ = __DiscoveryRegistryExport::describe;
        };
    };
}

/// The bytes of the needs section, at compile time.
#[doc(hidden)]
pub const fn needs_section<const N: usize>(needs: &str) -> [u8; N] {
    let bytes = needs.as_bytes();
    let mut out = [0u8; N];
    let mut i = 0;
    while i < N {
        out[i] = bytes[i];
        i += 1;
    }
    out
}

/// The longest single wait; the loop simply waits again after it.
use discovery_common::registry_limits::NEXT_EVENT_MAX_WAIT as MAX_WAIT;

/// The event loop behind [`export_registry!`].
#[doc(hidden)]
pub fn run<R: Registry>(config: &str) -> Result<(), String> {
    let mut registry = R::new(config)?;
    registry.on_local_change(host::local_affiliate())?;
    let mut next_timer = registry.poll_interval().map(|every| Instant::now() + every);
    loop {
        let wake = [next_timer, registry.next_deadline()]
            .into_iter()
            .flatten()
            .min();
        let wait = wake
            .map(|at| at.saturating_duration_since(Instant::now()))
            .unwrap_or(MAX_WAIT);
        match host::next_event(wait_ms(wait)) {
            Event::Shutdown => {
                registry.on_shutdown();
                return Ok(());
            }
            Event::LocalChanged => registry.on_local_change(host::local_affiliate())?,
            Event::Ready(call) => registry.on_ready(call)?,
            Event::Timeout => {}
        }
        if registry
            .next_deadline()
            .is_some_and(|at| Instant::now() >= at)
        {
            registry.on_deadline()?;
        }
        if let Some(at) = next_timer
            && Instant::now() >= at
        {
            registry.on_timer()?;
            next_timer = registry.poll_interval().map(|every| Instant::now() + every);
        }
    }
}
