//! The WebAssembly plugin runtime: one engine, a sandboxed Store per plugin
//! incarnation on the plugin's own thread, the host API in our own types with one
//! module per WIT version on top, output validation and supervision.

mod api_version;
mod cpu_budget;
mod cpu_share;
pub mod engine;
mod host_api;
pub mod host_calls;
mod memory_cap;
mod plugin_log;
pub mod plugin_thread;
mod sandbox;
pub mod state;
pub mod status;
mod stdio;
pub mod supervisor;
pub mod validate;
pub mod wit;

pub use cpu_share::CpuShare;
pub use engine::PluginEngine;
pub use memory_cap::HostMemory;
pub use plugin_log::PluginLog;
pub use state::{PluginContext, PluginState, SharedContext};
pub use status::{PluginStatus, PluginStatuses, RunState};
pub use supervisor::{PreparedPlugin, prepare, supervise};
