//! The WebAssembly plugin runtime: one engine, a sandboxed Store per plugin
//! incarnation, host functions, output validation and supervision.

mod api_version;
mod bindings;
mod busy;
mod convert;
pub mod engine;
mod limiter;
mod plugin_log;
pub mod state;
pub mod status;
mod stdio;
pub mod supervisor;

pub use engine::PluginEngine;
pub use state::PluginContext;
pub use status::{PluginStatus, PluginStatuses, RunState};
pub use supervisor::{PreparedPlugin, prepare, supervise};
