//! Prints the node daemon's figures against its targets:
//! plugin start from the compile cache (≤ 5 ms), publishing 1000 affiliates
//! across the plugin boundary (≤ 2 ms), merging 5000 raw affiliates from 3
//! registries (≤ 5 ms), resident memory with 3 plugins loaded (≤ 40 MiB).
//!
//! Run with `cargo bench -p discoveryd` after `scripts/setup` built the plugins.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use discoveryd::config::{self, PluginConfig};
use discoveryd::runtime::{self, PluginEngine, PluginStatuses, SharedContext};
use discoveryd::specs::{AffiliateSpec, MachineType};
use discoveryd::store::Store;
use discoveryd::{members, merge};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[path = "../tests/common/mod.rs"]
mod common;

use common::{Daemon, plugin};

/// A plugin's config; the CPU share is lifted so throttling does not enter the
/// figures (the bench measures the boundary, not the sandbox's limits).
fn plugin_config(name: &str, wasm: &Path, config_json: &str) -> PluginConfig {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "plugins: {{{name}: {{path: {}, config: {config_json}, limits: {{cpuSharePercent: 100}}}}}}",
        wasm.display()
    );
    config::parse(&yaml, dir.path()).unwrap().plugins[name].clone()
}

/// The local affiliate channel; its sender must outlive the plugins, or they see
/// the daemon stopping.
fn local_channel() -> (
    watch::Sender<Option<AffiliateSpec>>,
    watch::Receiver<Option<AffiliateSpec>>,
) {
    watch::channel(None)
}

/// The daemon's side of the plugin contexts, as `discoveryd run` builds it.
fn shared(
    statuses: &Arc<PluginStatuses>,
    shutdown: &CancellationToken,
    local: &watch::Receiver<Option<AffiliateSpec>>,
) -> SharedContext {
    SharedContext {
        store: Store::new(),
        local: local.clone(),
        node_id: "bench-self".into(),
        statuses: statuses.clone(),
        shutdown: shutdown.clone(),
        leaving: Arc::default(),
        public_addresses: Arc::default(),
    }
}

/// Set when a figure misses its target; the bench then exits non-zero.
static MISSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn report(what: &str, value: f64, unit: &str, target: f64) {
    let verdict = if value <= target {
        "ok"
    } else {
        MISSED.store(true, std::sync::atomic::Ordering::Relaxed);
        "OVER TARGET"
    };
    println!("{what:<48} {value:>9.3} {unit:<4} (target ≤ {target} {unit}) {verdict}");
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

async fn plugin_start(engine: &Arc<PluginEngine>) {
    let wasm = plugin("static-file");
    let config = plugin_config("static", &wasm, "{path: /x}");
    let statuses = Arc::new(PluginStatuses::default());
    let shutdown = CancellationToken::new();
    let (_local_tx, local) = local_channel();
    let shared = shared(&statuses, &shutdown, &local);
    // Warm the cache once; then every start loads the compiled artifact.
    runtime::prepare(engine, &config, shared.context(&config, None))
        .await
        .unwrap();
    let mut samples = Vec::new();
    for _ in 0..50 {
        let started = Instant::now();
        let ready = runtime::prepare(engine, &config, shared.context(&config, None))
            .await
            .unwrap();
        assert!(ready.loaded.cached);
        samples.push(started.elapsed().as_secs_f64() * 1e3);
    }
    report(
        "plugin start from compile cache (median of 50)",
        median(samples),
        "ms",
        5.0,
    );
}

async fn publish_1000(engine: Arc<PluginEngine>) {
    let config = plugin_config(
        "bench",
        &plugin("bench-publish"),
        "{count: 1000, rounds: 100}",
    );
    let statuses = Arc::new(PluginStatuses::default());
    let shutdown = CancellationToken::new();
    let (_local_tx, local) = local_channel();
    let shared = shared(&statuses, &shutdown, &local);
    let ready = runtime::prepare(&engine, &config, shared.context(&config, None))
        .await
        .unwrap();
    statuses.register("bench", "bench");
    let mut changes = statuses.subscribe();
    let ctx = shared.context(&config, Some("bench"));
    let task = tokio::spawn(runtime::supervise(engine, ready, ctx));
    let message = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            let status = statuses.list().pop().unwrap();
            if status.message.starts_with("publish ") {
                return status.message;
            }
            assert!(status.last_error.is_none(), "{:?}", status.last_error);
            changes.changed().await.unwrap();
        }
    })
    .await
    .expect("bench plugin reports within 2 minutes");
    shutdown.cancel();
    task.await.unwrap();
    let field = |key: &str| -> f64 {
        message
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
            .unwrap()
            .parse()
            .unwrap()
    };
    report(
        "publish 1000 affiliates across the boundary (median)",
        field("median_us") / 1e3,
        "ms",
        2.0,
    );
    println!("    {message}");
}

fn merge_5000() {
    let registries = ["k8s", "service", "static"];
    let nodes = 5000 / registries.len() + 1;
    let mut raw: Vec<(String, AffiliateSpec)> = Vec::new();
    for (r, registry) in registries.iter().enumerate() {
        for n in 0..nodes {
            if raw.len() == 5000 {
                break;
            }
            let node_id = format!("node-{n:05}-0123456789abcdefghijklmnopqrstu");
            raw.push((
                format!("{registry}/{node_id}"),
                AffiliateSpec {
                    node_id,
                    addresses: vec![
                        format!("10.{}.{}.{}", r, n >> 8, n & 255).parse().unwrap(),
                        format!("fd00::{n:x}").parse().unwrap(),
                    ],
                    hostname: format!("node-{n}.example"),
                    nodename: format!("node-{n}"),
                    operating_system: "Talos (v1.12.0)".into(),
                    machine_type: MachineType::Worker,
                    ..Default::default()
                },
            ));
        }
    }
    let samples: Vec<f64> = (0..30)
        .map(|_| {
            let started = Instant::now();
            let merged = merge::merge(raw.iter().map(|(id, spec)| (id.as_str(), spec)));
            let seen = members::Sighting {
                first_seen: Some(std::time::SystemTime::UNIX_EPOCH),
                registries: 1,
            };
            let result = members::members(merged.values(), "node-00000", |_| seen);
            assert_eq!(result.members.len(), nodes);
            started.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    report(
        "merge 5000 raw affiliates from 3 registries + members",
        median(samples),
        "ms",
        5.0,
    );
}

/// Starts the real daemon with three plugin instances and reads its RSS once
/// all three have published.
fn resident_memory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("peers")).unwrap();
    std::fs::write(
        dir.path().join("peers/peers.yaml"),
        "- {nodeId: a, nodename: a, addresses: [10.0.0.1]}\n- {nodeId: b, nodename: b, addresses: [10.0.0.2]}\n",
    )
    .unwrap();
    let mut yaml = String::from("node: {stateDir: state, nodename: bench}\nplugins:\n");
    for i in 1..=3 {
        yaml += &format!(
            "  static{i}: {{path: {}, prefix: static{i}, config: {{path: /peers/peers.yaml}}, grants: {{files: [{{host: {}, guest: /peers}}]}}}}\n",
            plugin("static-file").display(),
            dir.path().join("peers").display()
        );
    }
    let daemon = Daemon::start_in(dir, &yaml);
    let (mut watcher, updates) = daemon.cli_stream(&["plugins", "-o", "json", "-w"]);
    let mut published = std::collections::BTreeSet::new();
    updates.wait_for(
        "all three plugins to publish",
        Duration::from_secs(60),
        |line| {
            let value = common::json(line);
            if value["published"] == 2 {
                published.insert(value["name"].as_str().unwrap().to_string());
            }
            published.len() == 3
        },
    );
    let _ = watcher.kill();
    let _ = watcher.wait();
    report(
        "daemon resident memory, 3 plugins loaded",
        daemon.resident_kib() as f64 / 1024.0,
        "MiB",
        40.0,
    );
}

fn main() {
    // `cargo test --all-targets` runs this binary too; only `cargo bench` measures.
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("skipped: run with `cargo bench -p discoveryd`");
        return;
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let engine = Arc::new(PluginEngine::new(cache.path()).unwrap());
    runtime.block_on(plugin_start(&engine));
    runtime.block_on(publish_1000(engine));
    merge_5000();
    resident_memory();
    if MISSED.load(std::sync::atomic::Ordering::Relaxed) {
        std::process::exit(1);
    }
}
