//! The etcd state backend (`--state-backend etcd`): replicas share clusters through
//! etcd, so any replica serves any cluster and losing a machine loses nothing.
//!
//! Writes go to etcd as transactions ([`writer`]), concurrent ones batched into one
//! ([`batch`]); every replica reads the prefix
//! back through one etcd watch into an in-memory mirror ([`mirror`], which the
//! [`applier`] turns into state), the same
//! [`State`](crate::state::State) the memory backend uses, from which it answers List
//! and Watch and computes `/metrics`, `/inspect` and `/stats`. Because the mirror applies
//! etcd's changes in revision order, a Watch's snapshot is the state at one revision and
//! every later change follows exactly once. The mirror holds no affiliate data, only
//! the revisions to read it at ([`data`]). TTLs are etcd leases shared per expiry
//! bucket ([`leases`]); the key and value layout is in [`keys`].

pub mod applier;
pub mod batch;
pub mod client;
pub mod clock;
pub mod data;
pub mod keys;
pub mod leases;
pub mod mirror;
pub mod writer;

pub use client::{EtcdClient, EtcdOptions};
pub use writer::EtcdState;

/// etcd's v3 API, generated from `proto/etcd`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod proto {
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    pub mod authpb {
        tonic::include_proto!("authpb");
    }
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
}
