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
}
