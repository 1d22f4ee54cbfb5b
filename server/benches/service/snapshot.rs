//! Where a snapshot save and load of the 100k-affiliate state spend their time,
//! measured in this process on the same state (built with the library's `State`,
//! same shape as the gRPC load): encoding alone, the write into the page cache, the
//! fsync, rename + directory fsync, and the real `Storage::save` / `Storage::load`
//! end to end. The file lives under Cargo's target tmp dir, on the project's disk.
//! "dd-like" is the already-encoded bytes written in one `write()` and then fsynced,
//! what `dd conv=fsync` does: the disk only starts at the fsync, which the real save
//! avoids by starting the writeback while it encodes, so it can beat that figure.
//! Each step runs several times; the median is printed.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use discovery_service::metrics::Metrics;
use discovery_service::snapshot::storage::Storage;
use discovery_service::snapshot::{decode, encode};
use discovery_service::state::{State, Update};
use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};

use crate::client;
use crate::report::{Figure, Target};

const REPEAT: usize = 5;

/// Writes back every dirty page of the machine, so a timed fsync waits for its own
/// file only. The pause first lets the previous save's deferred close of the file it
/// replaced finish (production saves are minutes apart, never back to back).
pub fn sync_all() {
    std::thread::sleep(Duration::from_millis(300));
    nix::unistd::sync();
}

/// Drops a (clean) file from the page cache, for a cold read.
pub fn evict(path: &Path) {
    let f = File::open(path).unwrap();
    f.sync_all().unwrap();
    posix_fadvise(&f, 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED).unwrap();
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let r = f();
    (r, t.elapsed())
}

/// 1000 clusters × 100 affiliates, as the gRPC load makes them.
pub fn hundred_thousand() -> State {
    let state = State::new();
    let exp = Instant::now() + Duration::from_secs(30 * 60);
    for r in client::updates(1000, 100) {
        let u = Update {
            affiliate_id: &r.affiliate_id,
            data: r.affiliate_data.as_deref().unwrap_or_default(),
            endpoints: &r.affiliate_endpoints,
        };
        state.update(&r.cluster_id, &u, exp).unwrap();
    }
    state
}

/// One save by hand, step by step as `Storage::save` does it (encode, write, fsync,
/// rename, directory fsync), each step timed. With `hold`, the previous file stays open
/// until the rename is durable, as `Storage::save` does; without, it is freed by the
/// rename itself (the code before this bench).
struct Steps {
    encode: Duration,
    write: Duration,
    fsync: Duration,
    rename: Duration,
    release: Duration,
}

fn save_by_steps(state: &State, dir: &Path, buf: &mut Vec<u8>, hold: bool) -> Steps {
    let path = dir.join("inproc.binpb");
    let tmp = dir.join("inproc.binpb.tmp");
    buf.clear();
    let (_, encode) = timed(|| encode::export(state, Instant::now(), buf).unwrap());
    sync_all();
    let mut f = File::create(&tmp).unwrap();
    let (_, write) = timed(|| f.write_all(buf).unwrap());
    let (_, fsync) = timed(|| f.sync_all().unwrap());
    drop(f);
    let (previous, rename) = timed(|| {
        let previous = hold.then(|| File::open(&path).ok()).flatten();
        fs::rename(&tmp, &path).unwrap();
        File::open(dir).unwrap().sync_all().unwrap();
        previous
    });
    let (_, release) = timed(|| drop(previous));
    Steps {
        encode,
        write,
        fsync,
        rename,
        release,
    }
}

pub fn run(dir: &Path) -> Vec<Figure> {
    let state = hundred_thousand();
    let path = dir.join("inproc.binpb");
    let storage = Storage::new(
        &path,
        state.clone(),
        Arc::new(Metrics::new(state.clone(), true)),
    );
    storage.save().unwrap(); // So every timed save replaces a file, as in production.

    let mut buf = Vec::new();
    let (mut held, mut freed) = (vec![], vec![]);
    for _ in 0..REPEAT {
        held.push(save_by_steps(&state, dir, &mut buf, true));
        freed.push(save_by_steps(&state, dir, &mut buf, false));
    }
    let size = buf.len();
    drop(buf);
    let med = |v: &[Steps], f: fn(&Steps) -> Duration| median(v.iter().map(f).collect());
    let encode = med(&held, |s| s.encode);
    let write = med(&held, |s| s.write);
    let fsync = med(&held, |s| s.fsync);
    let rename = med(&held, |s| s.rename);
    let release = med(&held, |s| s.release);
    let rename_freed = med(&freed, |s| s.rename);
    let floor = med(&held, |s| s.write + s.fsync);

    let mut save = vec![];
    for _ in 0..REPEAT {
        sync_all();
        save.push(timed(|| storage.save().unwrap()).1);
    }

    let load = |cold: bool| {
        let mut v = vec![];
        for _ in 0..REPEAT {
            if cold {
                evict(&path);
            }
            let fresh = State::new();
            let s = Storage::new(
                &path,
                fresh.clone(),
                Arc::new(Metrics::new(fresh.clone(), true)),
            );
            let (loaded, d) = timed(|| s.load());
            assert!(loaded.error.is_none() && loaded.stats.affiliates == 100_000);
            v.push(d);
            drop(s);
            // Freeing 100k affiliates is not part of a load.
            drop(fresh);
        }
        median(v)
    };
    let load_warm = load(false);
    let load_cold = load(true);

    let (mut read, mut dec) = (vec![], vec![]);
    for _ in 0..REPEAT {
        let (bytes, d) = timed(|| fs::read(&path).unwrap());
        read.push(d);
        let fresh = State::new();
        let (r, d) = timed(|| {
            decode::import(
                &fresh,
                &mut bytes.as_slice(),
                Instant::now(),
                SystemTime::now(),
            )
        });
        assert!(r.1.is_ok());
        dec.push(d);
    }

    vec![
        Figure::new(
            "In-process snapshot save (Storage::save)",
            "ms",
            ms(median(save)),
        )
        .target(Target::AtMost(200.0)),
        Figure::new("  encode into memory", "ms", ms(encode)),
        Figure::new("  write: one write() into the page cache", "ms", ms(write)),
        Figure::new("  fsync of the file", "ms", ms(fsync)),
        Figure::new("  rename + dir fsync, previous file held", "ms", ms(rename)),
        Figure::new(
            "  close of the previous file, after that",
            "ms",
            ms(release),
        ),
        Figure::new(
            "  rename + dir fsync, previous freed at once",
            "ms",
            ms(rename_freed),
        ),
        Figure::new(
            "  sum of the steps, one after the other",
            "ms",
            ms(encode + write + fsync + rename + release),
        ),
        Figure::new("  dd-like: write() all, then fsync", "ms", ms(floor)),
        Figure::new(
            "  dd-like throughput",
            "MB/s",
            size as f64 / 1e6 / floor.as_secs_f64(),
        ),
        Figure::new(
            "In-process snapshot load, page cache (warm)",
            "ms",
            ms(load_warm),
        )
        .target(Target::AtMost(300.0)),
        Figure::new("  load, file evicted (cold)", "ms", ms(load_cold)),
        Figure::new("  read the file into memory (warm)", "ms", ms(median(read))),
        Figure::new("  decode + insert from memory", "ms", ms(median(dec))),
    ]
}
