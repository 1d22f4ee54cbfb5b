//! Figures of issue 3 for the discovery service, each against its target. Run with
//! `cargo bench -p discovery-service`; without `--bench` (as `cargo test
//! --all-targets` runs it) it only prints that it was skipped.
//!
//! Client and servers share the machine's cores, so the gRPC targets are ratios
//! against a baseline started in the same run: a no-op tonic server for the same
//! `Cluster` service (see `noop.rs`). Both servers run as separate processes (the real
//! `discovery-service` binary, and this binary re-executed with `--noop-server`), so
//! each one's CPU time is read from `/proc/<pid>/stat` without instrumenting it, and
//! neither shares a runtime or an allocator with the client. The client is the same
//! code for both (tonic, TCP_NODELAY, a multi-thread tokio runtime in this process),
//! and their runs are interleaved so drift hits both alike.
//!
//! Phases (each file says exactly what it measures):
//! - `throughput.rs`: AffiliateUpdate calls/s and server CPU µs per call, 64 in flight,
//!   against the no-op (targets: ≥ 0.85× its throughput, ≤ 1.3× its CPU per call), and
//!   the log bytes the server wrote per 1,000 of those calls against an upstream-like
//!   sampling logger's for the same calls (`logs.rs`; target ≤ 2×).
//! - `fanout.rs`: update-to-last-of-1000-watchers latency, p50/p99 against the no-op
//!   (target: p99 ≤ 1.3×).
//! - `memory.rs`: the real binary's RSS with 100k affiliates (≤ 200 MiB), and its own
//!   timing of the snapshot save on SIGTERM (≤ 200 ms) and load at start (≤ 300 ms).
//! - `snapshot.rs`: the same save and load in this process, step by step, with the
//!   disk's own write + fsync speed for comparison.
//! - `etcd.rs`: the etcd state backend on a real etcd member started for it, side by
//!   side with the memory backend: AffiliateUpdate calls/s on 1 replica against etcd's
//!   own put rate (target ≥ 1.0×; 3 replicas and memory informational), watch fan-out
//!   p99 against the memory backend's (≤ 2×), RSS with 10k affiliates against the
//!   memory backend's (≤ 1.0×).
//!
//! `DISCOVERY_BENCH=throughput,fanout,memory,snapshot,etcd` picks phases (default: all);
//! `DISCOVERY_BENCH_KEEP=1` keeps the work directory (logs, snapshot files);
//! `DISCOVERY_BENCH_BEFORE=<discovery-service binary>` adds another build to the
//! throughput rounds, for before/after figures from one run.

mod client;
mod etcd;
mod fanout;
mod logs;
mod memory;
mod noop;
#[path = "../../tests/common/ports.rs"]
mod ports;
mod procs;
mod report;
mod snapshot;
mod throughput;

use report::Figure;

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == noop::FLAG) {
        return noop::main();
    }
    if !args.iter().any(|a| a == "--bench") {
        println!("skipped: run with cargo bench");
        return;
    }
    let phases = std::env::var("DISCOVERY_BENCH")
        .unwrap_or_else(|_| "throughput,fanout,memory,snapshot,etcd".into());
    let want = |p: &str| phases.split(',').any(|x| x.trim() == p);
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    println!("load average at start: {}", load_average());

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut failed = 0;
    let mut show = |figures: Vec<Figure>| {
        for f in figures {
            f.print();
            failed += usize::from(f.ok() == Some(false));
        }
    };
    if want("throughput") || want("fanout") {
        let noop = procs::noop_server(dir.path());
        let real = procs::real_server(dir.path(), "real.log", None);
        let before = want("throughput")
            .then(|| std::env::var_os("DISCOVERY_BENCH_BEFORE"))
            .flatten()
            .map(|bin| procs::before_server(std::path::Path::new(&bin), dir.path()));
        // For attaching a profiler (`perf record -p`).
        eprintln!(
            "no-op server pid {}, discovery-service pid {}",
            noop.pid(),
            real.pid()
        );
        if want("throughput") {
            show(rt.block_on(throughput::run(&noop, &real, before.as_ref())));
            drop(before);
        }
        if want("fanout") {
            show(rt.block_on(fanout::run(noop.addr, real.addr)));
        }
    }
    if want("memory") {
        show(rt.block_on(memory::run(dir.path())));
    }
    if want("snapshot") {
        show(snapshot::run(dir.path()));
    }
    if want("etcd") {
        show(rt.block_on(etcd::run(dir.path())));
    }
    println!("load average at end: {}", load_average());
    if std::env::var_os("DISCOVERY_BENCH_KEEP").is_some() {
        println!("kept {}", dir.keep().display());
    }
    println!(
        "{}",
        if failed == 0 {
            "all figures within target".to_owned()
        } else {
            format!("{failed} figure(s) OVER TARGET")
        }
    );
}
