//! Prints the service registry's figures against the targets of issue 8:
//! - propagation of a change, from a node publishing it to another node's
//!   `get members -w`: p50 ≤ 10 ms, p99 ≤ 50 ms over loopback;
//! - an idle daemon with the service plugin: CPU < 0.5 % of one core over 60 s,
//!   resident memory ≤ 40 MiB;
//! - 100 daemons (real processes) converge within 10 s of their start.
//!
//! The discovery service runs in this process (the real server code, with the
//! per-IP rate limit lifted since every node connects from 127.0.0.1); the
//! daemons are the release `discoveryd` binary. The publishing node in the
//! propagation figure is a protocol-level peer (this process sealing with the
//! cluster key), because a daemon's own data changes only with its addresses
//! or config; the figure covers the service, the watching daemon's plugin, its
//! store and its local API.
//!
//! Run with `cargo bench -p discoveryd --bench service` after `scripts/setup`.
//! Without `--bench` (as `cargo test --all-targets` runs it, in a debug build) it
//! only says it was skipped: the figures mean something in a release build.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use discovery_service::proto::server::AffiliateUpdateRequest;
use discovery_service::proto::server::cluster_client::ClusterClient;
use discovery_service::server::Server;
use discoveryd::crypto::ClusterKey;
use discoveryd::specs::{AffiliateSpec, MachineType};
use discoveryd::store::{Kind, Namespace};

#[path = "../tests/common/mod.rs"]
mod common;

use common::{Daemon, SECRET, cpu_time, json};

const CLUSTER: &str = "bench-cluster";

static MISSED: AtomicBool = AtomicBool::new(false);

fn report(what: &str, value: f64, unit: &str, target: f64) {
    let verdict = if value <= target {
        "ok"
    } else {
        MISSED.store(true, Ordering::Relaxed);
        "OVER TARGET"
    };
    println!("{what:<58} {value:>9.3} {unit:<4} (target ≤ {target} {unit}) {verdict}");
}

fn node_config(cluster: &str, name: &str, address: &str, endpoint: &str) -> String {
    format!(
        "cluster:\n  id: {cluster}\n  secret: {SECRET}\n  discovery:\n    registries:\n      \
         service: {{endpoint: \"{endpoint}\"}}\n\
         node: {{stateDir: state, nodename: {name}, addresses: [{address}]}}\n"
    )
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("skipped: run with cargo bench -p discoveryd --bench service");
        return;
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = runtime.block_on(async {
        let mut config = discovery_service::config::Config::for_tests();
        config.rate_limit_per_second = 1e9;
        config.rate_limit_burst = 1_000_000;
        Server::start(config).await.unwrap()
    });
    let endpoint = format!("http://{}", server.grpc_addr);

    let watcher = Daemon::start(&node_config(CLUSTER, "watcher", "127.0.0.2", &endpoint));
    propagation(&runtime, &endpoint, &watcher);
    idle(&watcher);
    drop(watcher);
    hundred_nodes(&runtime, &endpoint);

    runtime.block_on(server.shutdown()).unwrap();
    if MISSED.load(Ordering::Relaxed) {
        std::process::exit(1);
    }
}

/// A peer publishes 200 changes one after another; each is timed until the
/// watching daemon's `get members -w` prints it.
fn propagation(runtime: &tokio::runtime::Runtime, endpoint: &str, watcher: &Daemon) {
    const SAMPLES: usize = 200;
    let key = ClusterKey::from_secret(SECRET).unwrap();
    let mut client = runtime
        .block_on(ClusterClient::connect(endpoint.to_string()))
        .unwrap();
    let update = |n: usize| {
        let spec = AffiliateSpec {
            node_id: "bench-peer-node-id".into(),
            hostname: format!("change-{n}"),
            nodename: "peer".into(),
            machine_type: MachineType::Worker,
            operating_system: "Talos (v1.12.0)".into(),
            addresses: vec!["10.5.0.9".parse().unwrap()],
            ..Default::default()
        };
        AffiliateUpdateRequest {
            cluster_id: CLUSTER.into(),
            affiliate_id: "bench-peer-node-id".into(),
            affiliate_data: Some(key.seal(&discoveryd::payload::encode(&spec)).into()),
            affiliate_endpoints: vec![],
            ttl: Some(prost_types::Duration {
                seconds: 600,
                nanos: 0,
            }),
        }
    };
    runtime
        .block_on(client.affiliate_update(update(0)))
        .unwrap();
    watcher.wait_members(&["peer", "watcher"], Duration::from_secs(30));
    let (mut cli, lines) = watcher.cli_stream(&["get", "members", "-o", "json", "-w"]);
    lines.wait_for("the watch to start", Duration::from_secs(10), |l| {
        json(l)["spec"]["hostname"] == "change-0"
    });
    let mut samples = Vec::with_capacity(SAMPLES);
    for n in 1..=SAMPLES {
        let started = Instant::now();
        runtime
            .block_on(client.affiliate_update(update(n)))
            .unwrap();
        let want = format!("change-{n}");
        lines.wait_for("the change", Duration::from_secs(10), |l| {
            json(l)["spec"]["hostname"] == want.as_str()
        });
        samples.push(started.elapsed().as_secs_f64() * 1e3);
    }
    let _ = cli.kill();
    let _ = cli.wait();
    samples.sort_by(f64::total_cmp);
    report(
        "propagation peer -> service -> daemon -> get -w, p50",
        percentile(&samples, 0.5),
        "ms",
        10.0,
    );
    report(
        "propagation peer -> service -> daemon -> get -w, p99",
        percentile(&samples, 0.99),
        "ms",
        50.0,
    );
}

/// An idle daemon with the service plugin connected and watching.
fn idle(daemon: &Daemon) {
    let window = Duration::from_secs(60);
    let pid = daemon.pid();
    let before = cpu_time(pid);
    let started = Instant::now();
    // The measurement is the wait: nothing happens on purpose.
    std::thread::sleep(window);
    let used = cpu_time(pid) - before;
    let share = used.as_secs_f64() / started.elapsed().as_secs_f64() * 100.0;
    report(
        "idle daemon with the service plugin, CPU over 60 s",
        share,
        "%",
        0.5,
    );
    report(
        "idle daemon with the service plugin, resident memory",
        daemon.resident_kib() as f64 / 1024.0,
        "MiB",
        40.0,
    );
}

/// 100 daemons, started together with a warm compile cache, until each lists
/// all 100 members.
fn hundred_nodes(runtime: &tokio::runtime::Runtime, endpoint: &str) {
    const NODES: usize = 100;
    // Warm one compile cache and copy it into every state dir: compiling the
    // plugin 100 times would measure Cranelift, not discovery.
    let warm = Daemon::start(&node_config(
        "warm-up",
        "warm-up",
        "127.0.1.1",
        "http://127.0.0.1:9",
    ));
    let cache = warm.dir.path().join("state/plugin-cache");
    let dirs: Vec<tempfile::TempDir> = (0..NODES)
        .map(|_| {
            let dir = tempfile::tempdir().unwrap();
            let state = dir.path().join("state");
            std::fs::create_dir(&state).unwrap();
            copy_private_dir(&cache, &state.join("plugin-cache"));
            std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .unwrap();
            dir
        })
        .collect();
    drop(warm);
    let started = Instant::now();
    let nodes: Vec<Daemon> = std::thread::scope(|scope| {
        let handles: Vec<_> = dirs
            .into_iter()
            .enumerate()
            .map(|(i, dir)| {
                // A cluster of their own: the propagation peer and watcher are
                // still on the service until their TTL.
                let config = node_config(
                    "hundred",
                    &format!("node-{i:03}"),
                    &format!("127.0.2.{}", i + 1),
                    endpoint,
                );
                scope.spawn(move || Daemon::start_in(dir, &config))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let all_running = started.elapsed();
    let sockets: Vec<_> = nodes.iter().map(Daemon::socket).collect();
    let converged = runtime.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let mut complete = 0;
            for socket in &sockets {
                let Ok(mut client) = discoveryd::api::client::connect(socket).await else {
                    continue;
                };
                let request = discoveryd::api::proto::ListRequest {
                    namespace: Namespace::Cluster.as_str().into(),
                    r#type: Kind::Member.type_name().into(),
                };
                if let Ok(list) = client.list(request).await
                    && list.into_inner().resources.len() == NODES
                {
                    complete += 1;
                }
            }
            if complete == NODES {
                return started.elapsed();
            }
            assert!(
                Instant::now() < deadline,
                "{complete}/{NODES} complete after 120 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    println!("    {NODES} daemons running after {all_running:?} (started together)");
    report(
        "100 daemons converge (every node lists 100 members), from start",
        converged.as_secs_f64(),
        "s",
        10.0,
    );
    let rss: Vec<u64> = nodes.iter().map(|n| n.resident_kib() / 1024).collect();
    println!(
        "    resident memory of the 100: {}..={} MiB",
        rss.iter().min().unwrap(),
        rss.iter().max().unwrap()
    );
}

fn copy_private_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir(to).unwrap();
    std::fs::set_permissions(to, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}
