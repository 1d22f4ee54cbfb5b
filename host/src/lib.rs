//! `discoveryd`: the node daemon. It knows this node's identity, publishes it
//! through registry plugins (WebAssembly components), merges what the registries
//! report into affiliates, and approves them as members.
//!
//! Data flows one way: config and identity → local affiliate → plugins → raw
//! affiliates (`cluster-raw`) → merged affiliates → members (`cluster`) → API.
//!
//! Where things live:
//! - [`config`] reads the YAML file; [`identity`] keeps the node ID; [`specs`] are
//!   the resource types (Talos's field names); [`local_addresses`] and
//!   [`local_affiliate`] describe this node.
//! - [`runtime`] runs the plugins: one engine, a sandbox per plugin on its own
//!   thread, the host API in our own types with one module per WIT version
//!   (`runtime::wit`), output validation and supervision. [`capabilities`] is the
//!   one place where what an operator granted a plugin is decided and checked.
//! - [`store`] holds resources with versions, first/last-seen times and watches (a
//!   plugin writes only its own raw prefix, through a `RawWriter`); [`first_seen`]
//!   keeps raw affiliates' first-seen times across restarts; [`merge`], [`members`]
//!   and [`reconcile`] turn raw affiliates into members; [`crypto`] and [`payload`]
//!   are Sidero's sealing and wire encoding; [`timestamp`] prints times as RFC 3339.
//! - [`api`] is the local gRPC API on a unix socket, [`cli`] the commands that use
//!   it, [`daemon`] wires everything together.
//! - Named limits and timings are in [`limits`]; those shared with the discovery
//!   service and the SDK are in the `discovery-common` crate.

pub mod api;
pub mod base62;
pub mod builtin_plugins;
pub mod capabilities;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod daemon;
pub mod first_seen;
pub mod identity;
pub mod limits;
pub mod local_addresses;
pub mod local_affiliate;
pub mod members;
pub mod merge;
pub mod payload;
pub mod private_dir;
pub mod public_addresses;
pub mod reconcile;
pub mod runtime;
pub mod specs;
pub mod store;
pub mod timestamp;
