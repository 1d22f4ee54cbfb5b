//! `discoveryd`: the node daemon. It knows this node's identity, publishes it
//! through registry plugins (WebAssembly components), merges what the registries
//! report into affiliates, and approves them as members.
//!
//! Data flows one way: config and identity → local affiliate → plugins → raw
//! affiliates (`cluster-raw`) → merged affiliates → members (`cluster`) → API.

pub mod affiliate;
pub mod api;
pub mod base62;
pub mod capabilities;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod daemon;
pub mod identity;
pub mod interfaces;
pub mod limits;
pub mod local_affiliate;
pub mod members;
pub mod merge;
pub mod payload;
pub mod private_dir;
pub mod reconcile;
pub mod runtime;
pub mod store;
