//! A discovery service wire-compatible with Sidero's: nodes publish encrypted
//! affiliate blobs per cluster and watch each other's (see `server/README.md` and the
//! protocol reference).
//!
//! Layers, from the inside out: [`state`] (pure, clock passed in), [`snapshot`]
//! (file format and storage), [`grpc`] (validation, interceptors, service), [`http`]
//! (listeners, pages, metrics), and [`server::Server`] which wires them together and is
//! what tests, benchmarks and the binary start. Sidero's wire limits and Go's
//! address encoding come from the `discovery-common` crate, shared with the node
//! daemon and the plugin SDK; [`limits`] re-exports them beside the service's own.

pub mod backend;
pub mod config;
pub mod etcd;
pub mod grpc;
pub mod http;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod ratelimit;
pub mod server;
pub mod shutdown;
pub mod snapshot;
pub mod state;
pub mod tls;

/// Generated protobuf types and gRPC stubs.
pub mod proto {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]

    /// `sidero.discovery.server`: the wire API.
    pub mod server {
        tonic::include_proto!("sidero.discovery.server");
    }

    /// `sidero.discovery.storage`: the snapshot file format.
    pub mod storage {
        tonic::include_proto!("sidero.discovery.storage");
    }
}

pub use config::Config;
pub use server::Server;
