//! Loopback ports for the etcd members tests and benchmarks start (etcd takes its
//! ports as flags, so they are picked before it binds them).

use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A port free on 127.0.0.1 a moment ago, outside the kernel's ephemeral range: a
/// port from that range (what binding port 0 gives) can be taken by any outgoing
/// connection as its source port before etcd binds it, and etcd then fails to start.
pub fn free_port() -> u16 {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let (lo, hi) = ephemeral_range();
    // Below the range if there is room, else above it.
    let (first, count) = if lo > 11_000 {
        (10_000, u64::from(lo) - 10_000)
    } else {
        (u32::from(hi) + 1, 65_535 - u64::from(hi))
    };
    // Spread over the candidates, so that test processes running at once rarely try
    // the same ports.
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()));
    let seed = nanos
        ^ (u64::from(std::process::id()) << 20)
        ^ CALLS.fetch_add(1, Ordering::Relaxed).wrapping_mul(7_919);
    if count > 0 {
        for i in 0..count.min(2_000) {
            let port = first as u64 + (seed.wrapping_add(i.wrapping_mul(7_919))) % count;
            let port = port as u16;
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The kernel's ephemeral port range (Linux's default if it cannot be read).
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32_768, 60_999))
}
