//! The gRPC API: validation, client address, interceptors and the service itself.

pub mod observe;
pub mod peer;
pub mod service;
pub mod validate;
pub mod version;

pub use service::{ClusterService, Options};
