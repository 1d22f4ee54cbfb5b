//! Where the state lives: in this process (`--state-backend memory`, the default), or
//! in etcd, shared by every replica (`--state-backend etcd`). The gRPC service talks to
//! this; both answer on the wire exactly alike.

use std::sync::Arc;
use std::time::Instant;

use tonic::Status;

use crate::etcd::EtcdState;
use crate::limits::ETCD_RPC_DEADLINE;
use crate::state::{AffiliateView, State, StateError, Subscription, Update};

#[derive(Debug, Clone)]
pub enum Backend {
    Memory(State),
    /// `State` is the replica's mirror of etcd.
    Etcd(State, Arc<EtcdState>),
}

/// The memory backend's limit errors; the etcd backend maps its own the same way.
fn limit(e: StateError) -> Status {
    Status::resource_exhausted(e.to_string())
}

impl Backend {
    /// The state List and Watch are served from, and the pages computed from.
    pub fn state(&self) -> &State {
        match self {
            Self::Memory(s) | Self::Etcd(s, _) => s,
        }
    }

    pub async fn update(
        &self,
        cluster: &str,
        u: &Update<'_>,
        expiry: Instant,
    ) -> Result<(), Status> {
        match self {
            Self::Memory(s) => s.update(cluster, u, expiry).map_err(limit),
            Self::Etcd(s, etcd) => {
                bounded(async { Ok(etcd.update(s, cluster, u, expiry).await?) }).await
            }
        }
    }

    pub async fn delete(&self, cluster: &str, affiliate: &str) -> Result<(), Status> {
        match self {
            Self::Memory(s) => {
                s.delete(cluster, affiliate);
                Ok(())
            }
            Self::Etcd(_, etcd) => {
                bounded(async { Ok(etcd.delete(cluster, affiliate).await?) }).await
            }
        }
    }

    pub async fn list(&self, cluster: &str) -> Result<Vec<AffiliateView>, Status> {
        match self {
            Self::Memory(s) => Ok(s.list(cluster)),
            Self::Etcd(s, etcd) => bounded(async { Ok(etcd.list(s, cluster).await?) }).await,
        }
    }

    pub async fn watch(
        &self,
        cluster: &str,
        capacity: usize,
    ) -> Result<(Vec<AffiliateView>, Subscription), Status> {
        match self {
            Self::Memory(s) => Ok(s.watch(cluster, capacity)),
            Self::Etcd(s, etcd) => {
                bounded(async { Ok(etcd.watch(s, cluster, capacity).await?) }).await
            }
        }
    }
}

/// One RPC's whole etcd work (lease grant, transaction, waiting for the mirror) ends
/// within [`ETCD_RPC_DEADLINE`], so a client sees UNAVAILABLE rather than its own
/// deadline.
async fn bounded<T>(work: impl Future<Output = Result<T, Status>>) -> Result<T, Status> {
    tokio::time::timeout(ETCD_RPC_DEADLINE, work)
        .await
        .unwrap_or_else(|_| {
            Err(Status::unavailable(format!(
                "etcd unavailable: no answer within {ETCD_RPC_DEADLINE:?}"
            )))
        })
}
