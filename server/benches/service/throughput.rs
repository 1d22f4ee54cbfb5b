//! AffiliateUpdate over loopback: 64 calls in flight on one HTTP/2 connection, 1 KiB
//! data, 2 endpoints, spread over 1000 clusters × 16 affiliates (so after warm-up
//! nearly every call updates an existing affiliate, the steady state of a registry).
//! The two servers take turns in short rounds (order flipped every round) so drift in
//! the machine's load hits both alike; CPU is each server process's utime + stime
//! over exactly its rounds.

use std::sync::Arc;
use std::time::Duration;

use discovery_service::proto::server::AffiliateUpdateRequest;

use crate::client::{self, Client, Run};
use crate::procs::{ServerProcess, cpu_of};
use crate::report::{Figure, Target};

const IN_FLIGHT: usize = 64;
const ROUNDS: usize = 10;
const ROUND: Duration = Duration::from_secs(1);
const WARM_UP: Duration = Duration::from_secs(2);

#[derive(Default)]
struct Totals {
    run: Run,
    server_cpu: Duration,
    client_cpu: Duration,
}

impl Totals {
    fn add(&mut self, r: Run, server_cpu: Duration, client_cpu: Duration) {
        self.run.absorb(r);
        self.server_cpu += server_cpu;
        self.client_cpu += client_cpu;
    }

    fn rate(&self) -> f64 {
        self.run.calls as f64 / self.run.elapsed.as_secs_f64()
    }

    fn per_call_us(&self, cpu: Duration) -> f64 {
        cpu.as_secs_f64() * 1e6 / self.run.calls.max(1) as f64
    }
}

async fn round(
    server: &ServerProcess,
    client: &Client,
    pool: &Arc<Vec<AffiliateUpdateRequest>>,
    d: Duration,
) -> (Run, Duration, Duration) {
    let (s0, c0) = (server.cpu(), cpu_of("self"));
    let run = client::closed_loop(client, pool.clone(), IN_FLIGHT, d, false).await;
    (run, server.cpu() - s0, cpu_of("self") - c0)
}

pub async fn run(noop: &ServerProcess, real: &ServerProcess) -> Vec<Figure> {
    let pool = Arc::new(client::updates(1000, 16));
    let noop_client = client::connect(noop.addr).await;
    let real_client = client::connect(real.addr).await;
    for (s, c) in [(noop, &noop_client), (real, &real_client)] {
        round(s, c, &pool, WARM_UP).await;
    }
    let (mut base, mut ours) = (Totals::default(), Totals::default());
    for r in 0..ROUNDS {
        let order = if r % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for is_real in order {
            let (s, c, t) = if is_real {
                (real, &real_client, &mut ours)
            } else {
                (noop, &noop_client, &mut base)
            };
            let (run, sc, cc) = round(s, c, &pool, ROUND).await;
            t.add(run, sc, cc);
        }
    }
    assert_eq!(ours.run.errors + base.run.errors, 0, "calls failed");
    let mut figures = vec![
        Figure::new("AffiliateUpdate throughput", "calls/s", ours.rate())
            .baseline(base.rate())
            .target(Target::RatioAtLeast(0.85)),
        Figure::new(
            "AffiliateUpdate server CPU per call",
            "µs",
            ours.per_call_us(ours.server_cpu),
        )
        .baseline(base.per_call_us(base.server_cpu))
        .target(Target::RatioAtMost(1.3)),
        Figure::new(
            "  client CPU per call (bench process)",
            "µs",
            ours.per_call_us(ours.client_cpu),
        )
        .baseline(base.per_call_us(base.client_cpu)),
    ];
    for (name, q) in [("p50", 0.5), ("p99", 0.99)] {
        let o = client::quantile(&mut ours.run.latencies, q);
        let b = client::quantile(&mut base.run.latencies, q);
        figures.push(
            Figure::new(
                &format!("  AffiliateUpdate latency {name}"),
                "µs",
                f64::from(o),
            )
            .baseline(f64::from(b)),
        );
    }
    figures
}
