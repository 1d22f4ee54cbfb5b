//! Snapshots: the upstream `StateSnapshot` file format (reference §4.11).
//!
//! The file is a plain sequence of `StateSnapshot.clusters` records (tag `0x0a`, varint
//! length, `ClusterSnapshot` bytes), written and read one cluster at a time so neither
//! side ever holds the whole state twice. Lifetimes are stored relative to the save, so
//! downtime does not eat into TTLs.

pub mod decode;
pub mod encode;
pub mod storage;

/// Totals of one save or load, for logs and metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub clusters: usize,
    pub affiliates: usize,
    pub endpoints: usize,
    pub size_bytes: u64,
    /// What a load left out because no request could have stored it (always zero for a
    /// save).
    pub dropped: Dropped,
}

/// Snapshot entries a load skipped under the rules every update obeys: the request
/// validators (IDs, data and endpoint sizes) and the state limits (endpoints
/// deduplicated, at most 64 per affiliate and 1024 affiliates per cluster).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    /// Clusters with an empty or too long ID.
    pub invalid_clusters: usize,
    /// Affiliates with an empty or too long ID, or data over the limit.
    pub invalid_affiliates: usize,
    /// Affiliates past the per-cluster limit.
    pub affiliates_over_limit: usize,
    /// Endpoints over the size limit.
    pub invalid_endpoints: usize,
    /// Endpoints byte-equal to an earlier one of the same affiliate (merged into it).
    pub duplicate_endpoints: usize,
    /// Distinct endpoints past the per-affiliate limit.
    pub endpoints_over_limit: usize,
}

impl Dropped {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}
