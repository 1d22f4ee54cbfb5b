//! Named limits and timings of the daemon, in one place.

use std::time::Duration;

use base64::Engine as _;

/// Default memory cap of one plugin instance.
pub const PLUGIN_MEMORY_MIB: u64 = 64;
/// The largest memory cap an operator may configure.
pub const PLUGIN_MEMORY_MIB_MAX: u64 = 4096;
/// Default wall-clock time a plugin may be busy between waits for an event.
pub const PLUGIN_CPU_BUDGET_MS: u64 = 1000;
/// Default CPU share of one plugin: at most this percentage of one core's time
/// busy over any window of `PLUGIN_CPU_SHARE_WINDOW`.
pub const PLUGIN_CPU_SHARE_PERCENT: u32 = 10;
pub const PLUGIN_CPU_SHARE_PERCENT_RANGE: std::ops::RangeInclusive<u64> = 1..=100;
pub const PLUGIN_CPU_SHARE_WINDOW: Duration = Duration::from_secs(10);
pub const PLUGIN_CPU_SHARE_WINDOW_MS_RANGE: std::ops::RangeInclusive<u64> = 1_000..=600_000;
/// Default cap on the host resources one plugin holds at once (open files,
/// directory streams, pollables, streams): each may be a host file descriptor.
pub const PLUGIN_RESOURCES: usize = 256;
pub const PLUGIN_RESOURCES_RANGE: std::ops::RangeInclusive<u64> = 16..=4096;
/// Default time a plugin may keep failing before its raw affiliates are withdrawn.
pub const PLUGIN_WITHDRAW_AFTER: Duration = Duration::from_secs(300);
pub const PLUGIN_WITHDRAW_AFTER_SECONDS_RANGE: std::ops::RangeInclusive<u64> = 1..=86_400;
/// Threads in one plugin's blocking pool (its WASI file operations): what a
/// plugin whose calls hang can pin at most.
pub const PLUGIN_BLOCKING_THREADS: usize = 2;
/// The most random bytes a plugin gets from one WASI call.
pub const PLUGIN_RANDOM_BYTES_MAX: u64 = 64 << 10;
/// How often the epoch ticker bumps the engine: the granularity of CPU deadlines,
/// and how often a busy plugin yields to other tasks.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);
/// Guest-to-host copies allowed per host call (wasmtime's hostcall fuel).
pub const PLUGIN_HOSTCALL_BYTES: usize = 32 << 20;
/// The longest a plugin may wait in one `next-event` call, and the most
/// affiliates one `publish` takes: the plugin boundary's limits, shared with the SDK.
pub use discovery_common::registry_limits::{NEXT_EVENT_MAX_WAIT, PUBLISH_MAX};

/// Restart backoff of a failing plugin: doubles from the first value up to the cap.
pub const RESTART_BACKOFF_FIRST: Duration = Duration::from_millis(500);
pub const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A plugin that ran this long without failing starts over at the first backoff.
pub const RESTART_BACKOFF_RESET_AFTER: Duration = Duration::from_secs(120);
/// How long plugins get to return from `run` after the shutdown event.
pub const PLUGIN_SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// How long the daemon waits for every plugin thread to end after the shutdown
/// event; a plugin still running then is abandoned. With the rest of the
/// shutdown this keeps a stop under 5 s, whatever the plugins do.
pub const PLUGIN_STOP_DEADLINE: Duration = Duration::from_millis(3500);
/// How long `discoveryd cluster create` waits for every node to see all members,
/// and how long its processes get to stop before they are killed.
pub const CLUSTER_CREATE_WAIT: Duration = Duration::from_secs(60);
pub const CLUSTER_STOP_WAIT: Duration = Duration::from_secs(10);
/// How long `discoveryd leave` waits for the daemon to stop.
pub const LEAVE_WAIT: Duration = Duration::from_secs(10);
/// How long the daemon's runtime waits for its own blocking tasks at exit.
pub const EXIT_BLOCKING_GRACE: Duration = Duration::from_millis(500);

/// How often local addresses are re-read from the interfaces.
pub const ADDRESS_POLL_INTERVAL: Duration = Duration::from_secs(5);

/// Rejections of one publish written to the log; the rest are only counted.
pub const REJECTIONS_LOGGED: usize = 10;
/// Node IDs become part of resource IDs and of the discovery service's affiliate
/// IDs, which the service limits to 256 bytes.
pub const NODE_ID_MAX: usize = discovery_common::sidero_limits::AFFILIATE_ID_MAX;
/// Hostnames, nodenames and similar text fields (a DNS name is at most 253).
pub const NAME_MAX: usize = 253;
pub const OPERATING_SYSTEM_MAX: usize = 256;
/// Addresses or prefixes per affiliate list. With the other limits this bounds a
/// plugin's accepted output to a few MiB.
pub const ADDRESSES_MAX: usize = 64;
/// The discovery service stores at most 64 endpoints per affiliate.
pub const ENDPOINTS_MAX: usize = discovery_common::sidero_limits::AFFILIATE_ENDPOINTS_MAX;
/// Plugin log lines and status notes are cut here.
pub const MESSAGE_MAX: usize = 4096;
/// Log lines a plugin may write per second, and in one burst; the rest are dropped
/// and counted.
pub const PLUGIN_LOG_PER_SECOND: f64 = 50.0;
pub const PLUGIN_LOG_BURST: f64 = 200.0;

/// How many changes a store watcher may lag behind before it has to resynchronise.
pub const STORE_WATCH_BUFFER: usize = 4096;
/// How many events a slow CLI watcher may have in flight on the local API.
pub const API_WATCH_QUEUE: usize = 256;

/// Raw affiliates' first-seen times survive their resources and restarts
/// (`first-seen.yaml`) for node IDs seen in the last day, at most this many.
pub const FIRST_SEEN_NODES_MAX: usize = 10_000;
pub const FIRST_SEEN_FORGET_AFTER: Duration = Duration::from_secs(24 * 3600);
/// The first-seen file is written at most this often (changes in between are
/// written together), and refreshed at least this often while last-seen times
/// move on.
pub const FIRST_SEEN_SAVE_MIN_INTERVAL: Duration = Duration::from_secs(5);
pub const FIRST_SEEN_REFRESH: Duration = Duration::from_secs(3600);

/// Table elements (function references) a plugin may hold in all its tables.
pub const PLUGIN_TABLE_ELEMENTS_MAX: usize = 100_000;
/// A Rust wasip2 component has one memory and a few tables and instances.
pub const PLUGIN_INSTANCES_MAX: usize = 32;
pub const PLUGIN_TABLES_MAX: usize = 16;
pub const PLUGIN_MEMORIES_MAX: usize = 4;

/// gRPC for plugins: how long a connection may take to open, the client
/// keepalive (never faster than the discovery service's 10 s minimum, and the
/// reference's 20 s ping timeout), and what one plugin may hold at once.
pub const GRPC_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub const GRPC_KEEPALIVE_MIN: Duration = Duration::from_secs(10);
pub const GRPC_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
pub const GRPC_CHANNELS_MAX: usize = 8;
pub const GRPC_CALLS_MAX: usize = 8;
/// The largest gRPC message either way (grpc-go's default receive limit, which
/// a full discovery-service snapshot fits in).
pub const GRPC_MESSAGE_MAX: usize = 4 << 20;

/// Kubernetes for plugins: calls one plugin may hold open, and how long one
/// request (list, get, patch) may take.
pub const KUBE_CALLS_MAX: usize = 8;
pub const KUBE_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The local API socket in the state directory.
pub const SOCKET_NAME: &str = "discoveryd.sock";
/// The compiled-plugin cache in the state directory.
pub const CACHE_DIR_NAME: &str = "plugin-cache";

/// Plugin names and raw-affiliate prefixes: lowercase letters, digits and '-'.
pub fn is_registry_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= REGISTRY_NAME_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// A WireGuard public key: base64 of 32 bytes.
pub fn is_wireguard_key(key: &str) -> bool {
    base64::engine::general_purpose::STANDARD
        .decode(key)
        .is_ok_and(|k| k.len() == 32)
}

/// Plugin names and raw-affiliate prefixes are at most this long (a DNS label's
/// limit).
pub const REGISTRY_NAME_MAX: usize = 63;
/// The smallest memory cap an operator may configure.
pub const PLUGIN_MEMORY_MIB_MIN: u64 = 1;
/// The CPU budget an operator may configure, in milliseconds: at least one
/// `EPOCH_TICK` (the granularity of CPU deadlines), at most a minute.
pub const PLUGIN_CPU_BUDGET_MS_MIN: u64 = 10;
pub const PLUGIN_CPU_BUDGET_MS_MAX: u64 = 60_000;
