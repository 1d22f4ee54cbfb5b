//! Watch fan-out: 1000 watchers on one cluster, each on its own connection (one Talos
//! node per connection, as in production), and a writer on another connection. A round
//! is one AffiliateUpdate (1 KiB data, 2 endpoints) carrying a sequence number in its
//! data; its latency runs from just before the writer sends the call until the
//! 1000th watcher has received the notification (`message()` returned on the client).
//! Rounds alternate between the two servers, all watchers of both stay connected.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use discovery_service::proto::server::WatchRequest;
use futures::StreamExt;
use tokio::sync::Notify;

use crate::client::{self, CALL_TIMEOUT, Client};
use crate::report::{Figure, Target};

pub const WATCHERS: usize = 1000;
pub const WARM_UP_ROUNDS: usize = 30;
pub const ROUNDS: usize = 300;
const CLUSTER: usize = 999_999;

struct Shared {
    expected: AtomicU64,
    received: AtomicUsize,
    /// When the last watcher of the current round got its message.
    last: Mutex<Option<Instant>>,
    done: Notify,
    wrong: AtomicUsize,
}

/// 1000 watchers of one server and a writer (also used by `etcd.rs`).
pub struct Fleet {
    writer: Client,
    shared: Arc<Shared>,
    data: Vec<u8>,
}

impl Fleet {
    pub async fn connect(addr: SocketAddr) -> Self {
        let shared = Arc::new(Shared {
            expected: AtomicU64::new(u64::MAX),
            received: AtomicUsize::new(0),
            last: Mutex::new(None),
            done: Notify::new(),
            wrong: AtomicUsize::new(0),
        });
        let cluster_id = client::cluster_id(CLUSTER);
        // Connect and subscribe 50 at a time; each watcher is ready once its first
        // message (the snapshot) arrived.
        futures::stream::iter(0..WATCHERS)
            .map(|_| {
                let shared = shared.clone();
                let cluster_id = cluster_id.clone();
                async move {
                    let mut c = client::connect(addr).await;
                    let mut stream =
                        tokio::time::timeout(CALL_TIMEOUT, c.watch(WatchRequest { cluster_id }))
                            .await
                            .expect("watch timed out")
                            .expect("watch")
                            .into_inner();
                    tokio::time::timeout(CALL_TIMEOUT, stream.message())
                        .await
                        .expect("snapshot timed out")
                        .expect("snapshot");
                    tokio::spawn(async move {
                        let _keep = c;
                        while let Ok(Some(m)) = stream.message().await {
                            let seq = m
                                .affiliates
                                .first()
                                .and_then(|a| a.data.get(..8))
                                .map(|b| u64::from_le_bytes(b.try_into().unwrap()));
                            if seq != Some(shared.expected.load(Ordering::Acquire)) {
                                shared.wrong.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            if shared.received.fetch_add(1, Ordering::AcqRel) + 1 == WATCHERS {
                                *shared.last.lock().unwrap() = Some(Instant::now());
                                shared.done.notify_one();
                            }
                        }
                    });
                }
            })
            .buffer_unordered(50)
            .collect::<Vec<()>>()
            .await;
        Self {
            writer: client::connect(addr).await,
            shared,
            data: client::noise(11, 1024),
        }
    }

    /// Messages watchers got that were not the current round's.
    pub fn wrong(&self) -> usize {
        self.shared.wrong.load(Ordering::Relaxed)
    }

    /// One update and its fan-out; the update-to-last-watcher time in microseconds.
    pub async fn round(&mut self, seq: u64) -> u32 {
        self.shared.received.store(0, Ordering::Release);
        self.shared.expected.store(seq, Ordering::Release);
        self.data[..8].copy_from_slice(&seq.to_le_bytes());
        let req = client::update(CLUSTER, 0, Bytes::copy_from_slice(&self.data));
        let t0 = Instant::now();
        tokio::time::timeout(CALL_TIMEOUT, self.writer.affiliate_update(req))
            .await
            .expect("update timed out")
            .expect("update");
        tokio::time::timeout(CALL_TIMEOUT, self.shared.done.notified())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "round {seq}: only {} of {WATCHERS} watchers got the update",
                    self.shared.received.load(Ordering::Acquire)
                )
            });
        let last = self.shared.last.lock().unwrap().take().unwrap();
        last.duration_since(t0).as_micros() as u32
    }
}

pub async fn run(noop: SocketAddr, real: SocketAddr) -> Vec<Figure> {
    let mut base = Fleet::connect(noop).await;
    let mut ours = Fleet::connect(real).await;
    let (mut b, mut o) = (Vec::new(), Vec::new());
    for seq in 0..(WARM_UP_ROUNDS + ROUNDS) as u64 {
        // Alternate which server goes first so neither always follows the other.
        let (bt, ot) = if seq % 2 == 0 {
            (base.round(seq).await, ours.round(seq).await)
        } else {
            let ot = ours.round(seq).await;
            (base.round(seq).await, ot)
        };
        if seq >= WARM_UP_ROUNDS as u64 {
            b.push(bt);
            o.push(ot);
        }
    }
    for f in [&base, &ours] {
        assert_eq!(
            f.shared.wrong.load(Ordering::Relaxed),
            0,
            "unexpected messages"
        );
    }
    let mut figures = Vec::new();
    for (name, q) in [("p50", 0.5), ("p99", 0.99)] {
        let ov = client::quantile(&mut o, q);
        let bv = client::quantile(&mut b, q);
        let mut f = Figure::new(
            &format!("Watch fan-out to 1000, last watcher {name}"),
            "ms",
            f64::from(ov) / 1000.0,
        )
        .baseline(f64::from(bv) / 1000.0);
        if name == "p99" {
            f = f.target(Target::RatioAtMost(1.3));
        }
        figures.push(f);
    }
    figures
}
