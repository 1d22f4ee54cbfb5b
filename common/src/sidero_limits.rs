//! Sidero's discovery service limits (`pkg/limits`, reference §4.1), exact: the
//! service enforces them and clients stay inside them. Changing one changes what
//! real Talos nodes observe.

use std::time::Duration;

/// Maximum `cluster_id` length in bytes, in every RPC.
pub const CLUSTER_ID_MAX: usize = 256;
/// Maximum `affiliate_id` length in bytes.
pub const AFFILIATE_ID_MAX: usize = 256;
/// Maximum `affiliate_data` length in bytes (GCM plaintext can be at most 2020 bytes).
pub const AFFILIATE_DATA_MAX: usize = 2048;
/// Maximum length of one endpoint blob (at most two AES blocks).
pub const AFFILIATE_ENDPOINT_MAX: usize = 32;
/// Maximum TTL; only strictly greater values are rejected.
pub const TTL_MAX: Duration = Duration::from_secs(30 * 60);
/// Affiliates per cluster, checked only when one is created.
pub const CLUSTER_AFFILIATES_MAX: usize = 1024;
/// Distinct endpoints stored per affiliate.
pub const AFFILIATE_ENDPOINTS_MAX: usize = 64;

/// Token refill per client IP, per second.
pub const IP_RATE_REQUESTS_PER_SECOND_MAX: f64 = 15.0;
/// Token bucket size per client IP.
pub const IP_RATE_BURST_SIZE_MAX: u32 = 60;
/// How often idle (full) buckets are dropped.
pub const IP_RATE_GARBAGE_COLLECTION_PERIOD: Duration = Duration::from_secs(60);
