//! Every limit and timing of the service, in one place (reference §4.1, §10).
//!
//! Values are the reference's; changing one changes what real Talos nodes observe.

use std::time::Duration;

/// Sidero's wire limits, shared with the daemon and the plugin SDK.
pub use discovery_common::sidero_limits::*;

/// Notifications a watcher may have waiting when a burst of changes begins; with this
/// many, the oldest [`WATCH_STALL`] old, it is behind, and its stream is aborted (see
/// `state::subscription`).
pub const WATCH_BUFFER: usize = 32;
/// How long the oldest of [`WATCH_BUFFER`] waiting notifications may wait before its
/// watcher is behind: longer than a busy server takes to schedule a watcher, short
/// enough that one lagging resyncs from a snapshot rather than wading through a backlog.
pub const WATCH_STALL: Duration = Duration::from_millis(200);
/// Notifications a watcher that is not behind may have waiting beyond [`WATCH_BUFFER`]
/// before it is cut anyway: twice a full cluster, so only a whole cluster changing more
/// than twice over faster than the watcher reads (a watch catching up after a long
/// stall) cuts a watcher that keeps reading. Bounds what one that never reads holds.
pub const WATCH_BURST_MAX: usize = 2 * CLUSTER_AFFILIATES_MAX;

/// Largest `ClusterSnapshot` record accepted on load (upstream's `MaxClusterSize`). It is
/// generous: the exact encoded size of 1024 affiliates with 256-byte IDs, 2048-byte data,
/// 64 endpoints each sized like data (2048 bytes) and 12-byte TTLs, under a 256-byte
/// cluster ID.
pub const MAX_CLUSTER_SNAPSHOT_SIZE: u64 = 137_912_579;

/// Deadline of the final snapshot on shutdown.
pub const FINAL_SAVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Grace period each HTTP server gets on shutdown.
pub const HTTP_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/1 header read timeout (slowloris guard).
pub const READ_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Minimum interval between client keepalive pings (gRPC enforcement policy `MinTime`).
pub const KEEPALIVE_MIN_TIME: Duration = Duration::from_secs(10);
/// Too-frequent pings tolerated before GOAWAY (grpc-go's `maxPingStrikes`).
pub const MAX_PING_STRIKES: u32 = 2;
/// TLS handshakes that take longer are dropped, so a stalled client cannot hold a task.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `/stats` answers from its cache.
pub const STATS_CACHE_TTL: Duration = Duration::from_secs(3600);
/// How often certificate files are checked for changes.
pub const TLS_RELOAD_POLL: Duration = Duration::from_secs(2);
/// Distinct `client_version` labels of the Hello counter. The label is derived from
/// what unauthenticated clients send (up to about 240,000 normalized values);
/// past this many, new versions count as `unknown` so the metric stays small.
pub const HELLO_VERSION_LABELS_MAX: usize = 64;
/// Longest ID logged as is: IDs are validated after logging starts, and a 4 MiB
/// cluster ID must not become a 4 MiB log line.
pub const LOGGED_ID_MAX: usize = 256;

/// Width of an etcd lease bucket: keys expiring in the same bucket share one lease, and
/// expire at its end, so at most this late. 30-minute TTLs need 360 leases per replica.
pub const LEASE_BUCKET: Duration = Duration::from_secs(5);
/// Connecting to one etcd member.
pub const ETCD_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// One etcd call on one member; past it the call moves to the next member.
pub const ETCD_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// All attempts of one etcd call: past it the RPC fails with UNAVAILABLE. Kept under
/// Talos's 10 s per-call timeout so a node sees the code, not its own deadline.
pub const ETCD_CALL_DEADLINE: Duration = Duration::from_secs(8);
/// All the etcd work of one RPC; past it the RPC fails with UNAVAILABLE, under
/// Talos's 10 s per-call timeout.
pub const ETCD_RPC_DEADLINE: Duration = Duration::from_secs(9);
/// How long List and Watch wait for this replica's mirror to reach etcd's revision.
pub const ETCD_BARRIER_TIMEOUT: Duration = Duration::from_secs(5);
/// Keys per range read when the mirror reads everything.
pub const ETCD_RANGE_PAGE: i64 = 2000;
/// Most operations (conditions or writes) in one batched etcd transaction: etcd's
/// default `--max-txn-ops` is 128.
pub const ETCD_BATCH_OPS: usize = 128;
/// Most bytes in one batched etcd transaction: etcd's default request limit is 1.5 MiB.
pub const ETCD_BATCH_BYTES: usize = 1 << 20;
/// Batched etcd transactions one replica keeps in flight at once.
pub const ETCD_BATCHES_IN_FLIGHT: usize = 4;
/// Updates one replica lets wait for etcd; past it, updates fail with UNAVAILABLE.
pub const ETCD_QUEUE_MAX: usize = 4096;
/// Updates held back for a later batch (each shares a key with an update before it)
/// at most; while this many are held, no more leave the queue, which stays bounded.
pub const ETCD_HELD_MAX: usize = ETCD_BATCH_OPS;
/// How long past its lease bucket's end a key must still be in etcd before a GC pass
/// deletes it itself (its lease outlived it: etcd restarted the lease's TTL). Well past
/// etcd's own lease expiry checks and the clock skew NTP leaves between replicas.
pub const ETCD_OVERDUE_GRACE: Duration = Duration::from_secs(10);
/// How far the wall clock may move against the monotonic one (a step, or the machine
/// sleeping) before a replica moves its clock anchor, and its mirror's expiries, onto
/// it. NTP's slewing moves both alike; only steps and sleep reach this.
pub const CLOCK_STEP_MAX: Duration = Duration::from_secs(1);
/// A replica that has applied nothing from etcd for this long writes a marker key, so
/// its watch position stays recent: a watch that breaks after a quiet stretch longer
/// than etcd's compaction retention then resumes instead of re-reading everything.
pub const ETCD_QUIET_MARK: Duration = Duration::from_secs(60);
/// A mirror whose etcd watch has been quiet this long after a burst of changes gives
/// freed heap memory back to the system.
pub const ETCD_QUIET_TRIM: Duration = Duration::from_millis(250);
/// A watch stream's receive buffer grows to the most it ever held at once and never
/// shrinks; once quiet, a mirror whose watch has carried more than this opens a new
/// watch (from the next revision) to give that buffer back: at most one watch creation
/// per this many bytes of changes.
pub const ETCD_WATCH_BUFFER_KEEP: usize = 64 * 1024;
