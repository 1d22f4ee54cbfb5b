//! AffiliateUpdate over loopback: 64 calls in flight on one HTTP/2 connection, 1 KiB
//! data, 2 endpoints, spread over 1000 clusters × 16 affiliates (so after warm-up
//! nearly every call updates an existing affiliate, the steady state of a registry).
//! The servers take turns in short rounds (the order rotating every round) so drift in
//! the machine's load hits them alike; CPU is each server process's utime + stime
//! over exactly its rounds, and log volume what its stdout grew by over them (see
//! `logs.rs` for the upstream-like baseline it is compared with).
//!
//! With `DISCOVERY_BENCH_BEFORE=<path to another discovery-service binary>`, that build
//! takes turns too, for a before/after comparison within one run.

use std::sync::Arc;
use std::time::Duration;

use discovery_service::proto::server::AffiliateUpdateRequest;

use crate::client::{self, Client, Run};
use crate::logs::{self, Volume};
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
    /// What the server's stdout grew by during its rounds.
    log_bytes: u64,
    /// Its stdout's offsets at the start and end of each of its rounds.
    log_ranges: Vec<std::ops::Range<u64>>,
}

impl Totals {
    fn rate(&self) -> f64 {
        self.run.calls as f64 / self.run.elapsed.as_secs_f64()
    }

    fn per_call_us(&self, cpu: Duration) -> f64 {
        cpu.as_secs_f64() * 1e6 / self.run.calls.max(1) as f64
    }

    fn log_per_thousand(&self) -> f64 {
        Volume::per_thousand(self.log_bytes, self.run.calls)
    }
}

struct Contender<'a> {
    server: &'a ServerProcess,
    client: Client,
    totals: Totals,
}

impl Contender<'_> {
    async fn round(&mut self, pool: &Arc<Vec<AffiliateUpdateRequest>>, d: Duration) {
        let (s0, c0, l0) = (self.server.cpu(), cpu_of("self"), self.server.log_len());
        let run = client::closed_loop(&self.client, pool.clone(), IN_FLIGHT, d, false).await;
        let (s1, c1, l1) = (self.server.cpu(), cpu_of("self"), self.server.log_len());
        let t = &mut self.totals;
        t.run.absorb(run);
        t.server_cpu += s1 - s0;
        t.client_cpu += c1 - c0;
        t.log_bytes += l1 - l0;
        t.log_ranges.push(l0..l1);
    }
}

pub async fn run(
    noop: &ServerProcess,
    real: &ServerProcess,
    before: Option<&ServerProcess>,
) -> Vec<Figure> {
    let pool = Arc::new(client::updates(1000, 16));
    let mut contenders = Vec::new();
    for s in [Some(noop), Some(real), before].into_iter().flatten() {
        contenders.push(Contender {
            server: s,
            client: client::connect(s.addr).await,
            totals: Totals::default(),
        });
    }
    for c in &mut contenders {
        c.round(&pool, WARM_UP).await;
        c.totals = Totals::default();
    }
    let n = contenders.len();
    for r in 0..ROUNDS {
        for i in 0..n {
            contenders[(r + i) % n].round(&pool, ROUND).await;
        }
    }
    let mut totals = contenders.into_iter().map(|c| c.totals);
    let mut base = totals.next().unwrap();
    let mut ours = totals.next().unwrap();
    let prev = totals.next();
    let errors = base.run.errors + ours.run.errors + prev.as_ref().map_or(0, |p| p.run.errors);
    assert_eq!(errors, 0, "calls failed");

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

    // Log volume: ours (measured) against the upstream-like logger (computed for the
    // same calls at the same instants).
    let upstream = logs::upstream_like(&ours.run.completions, &pool[0]);
    let (mut lines, mut line_bytes) = (0, 0);
    for range in &ours.log_ranges {
        let (l, b) = logs::count_lines(&real.log_bytes(range.clone()), logs::UPDATE_METHOD);
        lines += l;
        line_bytes += b;
    }
    let per_k = |n: u64| Volume::per_thousand(n, ours.run.calls);
    figures.push(
        Figure::new(
            "log bytes per 1,000 AffiliateUpdates",
            "B",
            ours.log_per_thousand(),
        )
        .baseline(per_k(upstream.bytes))
        .target(Target::RatioAtMost(2.0)),
    );
    figures.push(
        Figure::new(
            "  log lines per 1,000 AffiliateUpdates",
            "lines",
            per_k(lines),
        )
        .baseline(per_k(upstream.lines)),
    );
    figures.push(
        Figure::new(
            "  one line per call, unsampled (per 1,000)",
            "B",
            Volume::per_thousand(line_bytes, lines),
        )
        .baseline(per_k(upstream.unsampled_bytes)),
    );
    if let Some(prev) = prev {
        figures.push(
            Figure::new(
                "AffiliateUpdate throughput, this build",
                "calls/s",
                ours.rate(),
            )
            .baseline(prev.rate()),
        );
        figures.push(
            Figure::new(
                "  server CPU per call, this build",
                "µs",
                ours.per_call_us(ours.server_cpu),
            )
            .baseline(prev.per_call_us(prev.server_cpu)),
        );
        figures.push(
            Figure::new(
                "  previous build: throughput vs no-op",
                "calls/s",
                prev.rate(),
            )
            .baseline(base.rate()),
        );
        figures.push(
            Figure::new(
                "  previous build: log bytes per 1,000",
                "B",
                prev.log_per_thousand(),
            )
            .baseline(per_k(upstream.bytes)),
        );
    }
    figures
}
