//! Footprint checks for the hot paths (run with `--ignored`, ideally in release): 100k
//! affiliates with 1 KiB data stay well under 200 MiB, and a snapshot of them saves fast.
//! Ignored by default because RSS and timings depend on the machine and build profile.

use std::time::{Duration, Instant};

use bytes::Bytes;
use discovery_service::metrics::Metrics;
use discovery_service::snapshot::encode;
use discovery_service::snapshot::storage::Storage;
use discovery_service::state::{State, Update};

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[test]
#[ignore = "measures memory and time; run explicitly"]
fn hundred_thousand_affiliates() {
    let before = rss_bytes();
    let state = State::new();
    let now = Instant::now();
    let exp = now + Duration::from_secs(1800);
    let data = vec![0x5a; 1024];
    for c in 0..1000 {
        let cluster = format!("cluster-{c:04}-{}", "x".repeat(32));
        for a in 0..100 {
            let id = format!("{:0>44}", c * 100 + a);
            let eps = [
                Bytes::from(vec![a as u8; 32]),
                Bytes::from(vec![c as u8; 16]),
            ];
            let u = Update {
                affiliate_id: &id,
                data: &data,
                endpoints: &eps,
            };
            state.update(&cluster, &u, exp).unwrap();
        }
    }
    let grown = rss_bytes().saturating_sub(before);
    eprintln!(
        "RSS growth for 100k affiliates: {:.1} MiB",
        grown as f64 / 1048576.0
    );
    assert!(grown < 200 * 1024 * 1024);

    // The real save path: temp file, fsync, rename, fsync of the directory.
    let dir = tempfile::tempdir().unwrap();
    let metrics = std::sync::Arc::new(Metrics::new(state.clone(), true));
    let storage = Storage::new(dir.path().join("state.binpb"), state.clone(), metrics);
    let t = Instant::now();
    let stats = storage.save().unwrap();
    let took = t.elapsed();
    eprintln!(
        "saved {} affiliates, {} bytes in {took:?}",
        stats.affiliates, stats.size_bytes
    );
    let t = Instant::now();
    let _ = encode::export(&state, now, &mut std::io::sink()).unwrap();
    eprintln!("encoding alone: {:?}", t.elapsed());
    assert_eq!(stats.affiliates, 100_000);
}
