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
    Etcd(Arc<EtcdState>),
}

/// A limit error as the wire has it (§4.2), for both backends.
pub(crate) fn limit(e: StateError) -> Status {
    Status::resource_exhausted(e.to_string())
}

impl Backend {
    /// The state List and Watch are served from, and the pages computed from.
    pub fn state(&self) -> &State {
        match self {
            Self::Memory(s) => s,
            Self::Etcd(etcd) => etcd.state(),
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
            Self::Etcd(etcd) => bounded(async { Ok(etcd.update(cluster, u, expiry).await?) }).await,
        }
    }

    pub async fn delete(&self, cluster: &str, affiliate: &str) -> Result<(), Status> {
        match self {
            Self::Memory(s) => {
                s.delete(cluster, affiliate);
                Ok(())
            }
            Self::Etcd(etcd) => bounded(async { Ok(etcd.delete(cluster, affiliate).await?) }).await,
        }
    }

    pub async fn list(&self, cluster: &str) -> Result<Vec<AffiliateView>, Status> {
        match self {
            Self::Memory(s) => Ok(s.list(cluster)),
            Self::Etcd(etcd) => bounded(async { Ok(etcd.list(cluster).await?) }).await,
        }
    }

    /// List for the inspect page: on etcd, what this replica's mirror holds, without
    /// catching up (which writes to etcd) for a page anyone may load.
    pub async fn inspect(&self, cluster: &str) -> Result<Vec<AffiliateView>, Status> {
        match self {
            Self::Memory(s) => Ok(s.list(cluster)),
            Self::Etcd(etcd) => bounded(async { Ok(etcd.list_as_mirrored(cluster).await?) }).await,
        }
    }

    pub async fn watch(
        &self,
        cluster: &str,
        capacity: usize,
    ) -> Result<(Vec<AffiliateView>, Subscription), Status> {
        match self {
            Self::Memory(s) => Ok(s.watch(cluster, capacity)),
            Self::Etcd(etcd) => bounded(async { Ok(etcd.watch(cluster, capacity).await?) }).await,
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
