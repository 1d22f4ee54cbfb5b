//! The load client, the same code for both servers: tonic over loopback, TCP_NODELAY
//! (tonic's default), requests shaped like Talos's (44-character IDs, 1 KiB data,
//! 2 endpoint blobs, 30 min TTL).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use discovery_service::proto::server::AffiliateUpdateRequest;
use discovery_service::proto::server::cluster_client::ClusterClient;
use tonic::transport::{Channel, Endpoint};

/// Bound on any single RPC or connection attempt.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

pub type Client = ClusterClient<Channel>;

/// One HTTP/2 connection.
pub async fn connect(addr: SocketAddr) -> Client {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .tcp_nodelay(true)
        .connect_timeout(CALL_TIMEOUT)
        .timeout(CALL_TIMEOUT);
    let channel = tokio::time::timeout(CALL_TIMEOUT, endpoint.connect())
        .await
        .expect("connect timed out")
        .expect("connect");
    ClusterClient::new(channel)
}

/// Deterministic filler bytes (they look random, like the encrypted blobs).
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn cluster_id(c: usize) -> String {
    format!("{c:0>44}")
}

/// An update of affiliate `a` in cluster `c`: 1 KiB data, 16- and 32-byte endpoints.
pub fn update(c: usize, a: usize, data: Bytes) -> AffiliateUpdateRequest {
    let seed = (c * 100_003 + a) as u64;
    AffiliateUpdateRequest {
        cluster_id: cluster_id(c),
        affiliate_id: format!("affiliate-{a:0>34}"),
        affiliate_data: Some(data),
        affiliate_endpoints: vec![
            Bytes::from(noise(seed, 16)),
            Bytes::from(noise(seed + 1, 32)),
        ],
        ttl: Some(prost_types::Duration {
            seconds: 30 * 60,
            nanos: 0,
        }),
    }
}

/// `clusters` × `per_cluster` updates, interleaved across clusters.
pub fn updates(clusters: usize, per_cluster: usize) -> Vec<AffiliateUpdateRequest> {
    let data = Bytes::from(noise(7, 1024));
    (0..per_cluster)
        .flat_map(|a| (0..clusters).map(move |c| (c, a)))
        .map(|(c, a)| update(c, a, data.clone()))
        .collect()
}

/// What a closed-loop run measured.
#[derive(Debug, Default)]
pub struct Run {
    pub calls: u64,
    pub errors: u64,
    pub elapsed: Duration,
    /// Per-call latency in microseconds.
    pub latencies: Vec<u32>,
    /// When each successful call completed, and its latency (what a server logs as the
    /// call's `duration`, give or take the loopback); for the log volume model.
    pub completions: Vec<(Instant, Duration)>,
}

impl Run {
    /// Adds `other`'s calls, errors, time and latencies to this run.
    pub fn absorb(&mut self, other: Run) {
        self.calls += other.calls;
        self.errors += other.errors;
        self.elapsed += other.elapsed;
        self.latencies.extend(other.latencies);
        self.completions.extend(other.completions);
    }
}

/// When a closed-loop run ends.
#[derive(Debug, Clone, Copy)]
pub enum Until {
    Elapsed(Duration),
    /// Every request index below this sent once.
    Sent(usize),
}

/// Keeps `in_flight` AffiliateUpdate calls going over `client` until `duration` has
/// passed (or, with `once`, until every request of `pool` was sent once).
pub async fn closed_loop(
    client: &Client,
    pool: Arc<Vec<AffiliateUpdateRequest>>,
    in_flight: usize,
    duration: Duration,
    once: bool,
) -> Run {
    let until = if once {
        Until::Sent(pool.len())
    } else {
        Until::Elapsed(duration)
    };
    let client = client.clone();
    closed_loop_of(in_flight, until, move |_, i| {
        let mut client = client.clone();
        let req = pool[i % pool.len()].clone();
        async move { client.affiliate_update(req).await.is_ok() }
    })
    .await
}

/// The load generator for any call: `in_flight` tasks, each calling `call(task, i)` for
/// the next request index `i` as soon as its previous call returned, each call bounded
/// by [`CALL_TIMEOUT`]; a call succeeded if it returns true.
pub async fn closed_loop_of<F, Fut>(in_flight: usize, until: Until, call: F) -> Run
where
    F: Fn(usize, usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = bool> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..in_flight)
        .map(|task| {
            let call = call.clone();
            let next = next.clone();
            tokio::spawn(async move {
                let mut run = Run::default();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let over = match until {
                        Until::Elapsed(d) => start.elapsed() >= d,
                        Until::Sent(n) => i >= n,
                    };
                    if over {
                        break;
                    }
                    let t = Instant::now();
                    let r = tokio::time::timeout(CALL_TIMEOUT, call(task, i)).await;
                    let done = Instant::now();
                    let latency = done - t;
                    run.latencies
                        .push(latency.as_micros().min(u32::MAX as u128) as u32);
                    if matches!(r, Ok(true)) {
                        run.calls += 1;
                        run.completions.push((done, latency));
                    } else {
                        run.errors += 1;
                    }
                }
                run
            })
        })
        .collect();
    let mut total = Run::default();
    for t in tasks {
        total.absorb(t.await.unwrap());
    }
    // The tasks ran side by side: the run took the wall time, not the sum of theirs.
    total.elapsed = start.elapsed();
    total
}

/// The `q` quantile (0..=1) of unsorted samples.
pub fn quantile<T: Copy + Ord>(samples: &mut [T], q: f64) -> T {
    samples.sort_unstable();
    let i = ((samples.len() - 1) as f64 * q).round() as usize;
    samples[i]
}
