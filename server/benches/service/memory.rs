//! The real binary with 100,000 affiliates (1000 clusters × 100, 1 KiB data, 2
//! endpoints, TTL 30 min) loaded through the gRPC API: resident memory (VmRSS of the
//! server process), then the final snapshot it writes on SIGTERM and the load when it
//! restarts from that file, timed by the server itself (its `state saved` / `state
//! loaded` log lines, i.e. `Storage::save` / `Storage::load`). A second restart and
//! stop gives a save that replaces an existing snapshot (the production case), and a
//! third start, after evicting the file from the page cache, a cold load.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::client;
use crate::procs::{self, real_server};
use crate::report::{Figure, Target};
use crate::snapshot;

const MIB: f64 = 1024.0 * 1024.0;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn logged(lines: &[serde_json::Value], message: &str) -> (Duration, u64) {
    let v = lines
        .iter()
        .rev()
        .find(|v| v["message"] == message)
        .unwrap_or_else(|| panic!("no {message:?} log line"));
    assert_eq!(v["affiliates"], 100_000, "{message}: {v}");
    let d = procs::parse_debug_duration(v["duration"].as_str().unwrap()).unwrap();
    (d, v["size_bytes"].as_u64().unwrap_or(0))
}

pub async fn run(dir: &Path) -> Vec<Figure> {
    let path = dir.join("state.binpb");
    let server = real_server(dir, "memory.log", Some(&path));
    let (idle, _) = server.rss();
    let c = client::connect(server.addr).await;
    let pool = Arc::new(client::updates(1000, 100));
    let run = client::closed_loop(&c, pool, 64, Duration::ZERO, true).await;
    assert_eq!((run.calls, run.errors), (100_000, 0));
    drop(c);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss, hwm) = server.rss();

    // Flush other dirty pages (logs, earlier phases) so a save competes with nothing.
    snapshot::sync_all();
    let lines = server.terminate().expect("server did not stop cleanly");
    let (save_new, size) = logged(&lines, "state saved");

    // Restart from that file (still in the page cache), then stop again: this final
    // save replaces the previous snapshot, as every periodic save does in production.
    let restarted = real_server(dir, "restore.log", Some(&path));
    let (load_warm, _) = logged(&restarted.log_lines(), "state loaded");
    let (restored_rss, _) = restarted.rss();
    snapshot::sync_all();
    let lines = restarted.terminate().expect("server did not stop cleanly");
    let (save_replacing, _) = logged(&lines, "state saved");

    snapshot::evict(&path);
    let cold = real_server(dir, "restore-cold.log", Some(&path));
    let (load_cold, _) = logged(&cold.log_lines(), "state loaded");
    drop(cold);

    vec![
        Figure::new("Memory: RSS with 100k affiliates", "MiB", rss as f64 / MIB)
            .target(Target::AtMost(200.0)),
        Figure::new("  RSS idle before loading", "MiB", idle as f64 / MIB),
        Figure::new("  peak RSS (VmHWM)", "MiB", hwm as f64 / MIB),
        Figure::new(
            "  RSS after restart from the snapshot",
            "MiB",
            restored_rss as f64 / MIB,
        ),
        Figure::new(
            "  loading 100k via gRPC, 64 in flight",
            "calls/s",
            run.calls as f64 / run.elapsed.as_secs_f64(),
        ),
        Figure::new(
            "Snapshot save on SIGTERM, replacing the last",
            "ms",
            ms(save_replacing),
        )
        .target(Target::AtMost(200.0)),
        Figure::new(
            "Snapshot save on SIGTERM, first (new file)",
            "ms",
            ms(save_new),
        )
        .target(Target::AtMost(200.0)),
        Figure::new("  snapshot size", "MB", size as f64 / 1e6),
        Figure::new(
            "Snapshot load at start, file in page cache",
            "ms",
            ms(load_warm),
        )
        .target(Target::AtMost(300.0)),
        Figure::new(
            "Snapshot load at start, file evicted (cold)",
            "ms",
            ms(load_cold),
        )
        .target(Target::AtMost(300.0)),
    ]
}
