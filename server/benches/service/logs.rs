//! Log volume under the AffiliateUpdate load of `throughput.rs`: bytes per 1,000 calls
//! that our server wrote to stdout during its rounds (measured from the file), against
//! what upstream's logger would have written for the same calls, computed here.
//!
//! The upstream-like baseline is zap's production logger (its `NewProductionConfig`):
//! the JSON encoder (`level` lowercase, `ts` as epoch seconds, `caller` as a short
//! `dir/file.go:line`, `msg`, then the fields in order, `duration` in float seconds)
//! behind zap's sampler (per (level, message), a window opens at the first entry after
//! the previous one closed and lasts one second; entries 1–100 of a window are kept,
//! then entry n whenever (n − 100) is a multiple of 100). It is replayed over the
//! instants at which our client saw each call complete, with the message and fields our
//! server logs for that call (the method name, `grpc.method`, `duration`, `code`,
//! `peer.address`, `cluster_id`, `affiliate_id`). This is written from zap's documented
//! rule and encoder settings, independently of the server's own sampler.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use discovery_service::proto::server::AffiliateUpdateRequest;

/// zap's production sampling: `Initial`, `Thereafter`, and the tick.
const ZAP_FIRST: u64 = 100;
const ZAP_THEREAFTER: u64 = 100;
const ZAP_TICK: Duration = Duration::from_secs(1);

/// The per-RPC message (and `grpc.method`) of an AffiliateUpdate.
pub const UPDATE_METHOD: &str = "/sidero.discovery.server.Cluster/AffiliateUpdate";

/// A representative `caller` for the request logger (`ShortCallerEncoder`: the last
/// directory, the file and the line).
const ZAP_CALLER: &str = "grpclog/grpclog.go:58";

/// zap's counter for one (level, message): `IncCheckReset`, single-threaded.
#[derive(Default)]
struct Counter {
    reset_at: Option<Instant>,
    count: u64,
}

impl Counter {
    fn inc_check_reset(&mut self, t: Instant) -> u64 {
        match self.reset_at {
            Some(r) if r > t => {
                self.count += 1;
            }
            _ => {
                self.count = 1;
                self.reset_at = Some(t + ZAP_TICK);
            }
        }
        self.count
    }
}

/// zap's sampler over entries of one level (info, as every successful call is).
#[derive(Default)]
pub struct ZapSampler {
    counters: HashMap<String, Counter>,
}

impl ZapSampler {
    pub fn keep(&mut self, message: &str, t: Instant) -> bool {
        let n = self
            .counters
            .entry(message.to_owned())
            .or_default()
            .inc_check_reset(t);
        // zap's test, as written there: drop past the first, unless a multiple beyond.
        let dropped = n > ZAP_FIRST && !(n - ZAP_FIRST).is_multiple_of(ZAP_THEREAFTER);
        !dropped
    }
}

/// A Go `strconv.FormatFloat(f, 'f', -1, 64)`: the shortest decimal that reads back
/// as `f`, never in exponent form (as Rust's `Display` for `f64`).
fn go_float(f: f64) -> String {
    format!("{f}")
}

/// The line zap's production JSON encoder writes for a successful call.
pub fn zap_line(
    at: SystemTime,
    duration: Duration,
    cluster_id: &str,
    affiliate_id: &str,
) -> String {
    let ts = at
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let s = |v: &str| serde_json::to_string(v).unwrap();
    format!(
        "{{\"level\":\"info\",\"ts\":{},\"caller\":{},\"msg\":{},\"grpc.method\":{},\"duration\":{},\"code\":\"OK\",\"peer.address\":\"127.0.0.1\",\"cluster_id\":{},\"affiliate_id\":{}}}\n",
        go_float(ts),
        s(ZAP_CALLER),
        s(UPDATE_METHOD),
        s(UPDATE_METHOD),
        go_float(duration.as_secs_f64()),
        s(cluster_id),
        s(affiliate_id),
    )
}

/// What the upstream-like logger writes for these calls.
#[derive(Debug, Default, Clone, Copy)]
pub struct Volume {
    pub lines: u64,
    pub bytes: u64,
    /// Bytes if every call had its line (no sampling).
    pub unsampled_bytes: u64,
}

impl Volume {
    pub fn per_thousand(n: u64, calls: u64) -> f64 {
        n as f64 * 1000.0 / calls.max(1) as f64
    }
}

/// Replays `completions` (in any order) through zap's sampler and encoder. The IDs are
/// the pool's, whose lengths are all alike; each line uses the first request's.
pub fn upstream_like(
    completions: &[(Instant, Duration)],
    sample: &AffiliateUpdateRequest,
) -> Volume {
    let mut calls: Vec<(Instant, Duration)> = completions.to_vec();
    calls.sort_unstable_by_key(|c| c.0);
    let (now_i, now_s) = (Instant::now(), SystemTime::now());
    let wall = |t: Instant| now_s - now_i.saturating_duration_since(t);
    let mut sampler = ZapSampler::default();
    let mut v = Volume::default();
    for (t, d) in calls {
        let len = zap_line(wall(t), d, &sample.cluster_id, &sample.affiliate_id).len() as u64;
        v.unsampled_bytes += len;
        if sampler.keep(UPDATE_METHOD, t) {
            v.lines += 1;
            v.bytes += len;
        }
    }
    v
}

/// Lines and bytes of the server's per-call lines for `method` in `log` (a stretch of
/// its stdout), and all bytes of that stretch.
pub fn count_lines(log: &[u8], method: &str) -> (u64, u64) {
    let needle = format!("\"message\":\"{method}\"");
    let mut lines = 0;
    let mut bytes = 0;
    for line in log.split_inclusive(|&b| b == b'\n') {
        if std::str::from_utf8(line).is_ok_and(|l| l.contains(&needle)) {
            lines += 1;
            bytes += line.len() as u64;
        }
    }
    (lines, bytes)
}
