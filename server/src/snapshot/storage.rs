//! The snapshot file: atomic saves, best-effort loads, the periodic save loop.
//!
//! A save writes `<path>.tmp`, fsyncs it, renames it over `<path>` and fsyncs the
//! directory, so a crash at any point leaves either the old or the new snapshot, never
//! a torn one. Unlike upstream, a failed save removes the temp file and keeps the
//! previous snapshot (Q2), and an empty state writes an empty file (Q3).
//!
//! Saves and loads move a lot of bytes (115 MB for 100k affiliates), so their steps
//! overlap: a save encodes on one thread while another writes and starts the disk
//! writeback as it goes, and frees the replaced file only after the new one is durable;
//! a load decodes while a second thread reads ahead (`cargo bench` breaks both down).

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;

use super::Stats;
use super::decode::{self, DecodeError};
use super::encode;
use crate::metrics::Metrics;
use crate::state::State;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("failed to open snapshot: {0}")]
    Open(#[from] io::Error),
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// Outcome of a load: what was restored, and the error that stopped it, if any.
#[derive(Debug)]
pub struct Loaded {
    pub stats: Stats,
    pub error: Option<LoadError>,
    /// Where a corrupt file was moved, so the next save cannot destroy the evidence.
    pub moved_to: Option<PathBuf>,
}

#[derive(Debug)]
pub struct Storage {
    path: PathBuf,
    state: State,
    metrics: Arc<Metrics>,
    /// Serializes saves: the periodic save and the final one share one temp file.
    saving: Mutex<()>,
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// Chunks the encoder may get ahead of the writer (each [`encode::WRITE_CHUNK`]).
const CHUNKS_IN_FLIGHT: usize = 4;
/// The disk writeback of the file is started every this many bytes written (2 and
/// 8 MiB measured alike; without it the save took ~20 ms longer).
const WRITEBACK_STEP: u64 = 2 << 20;

/// Starts writing `len` bytes at `offset` back to disk without waiting for it, so that
/// the disk works while the rest is encoded and the final fsync only waits for the
/// tail. Only a head start: durability still comes from that fsync.
#[cfg(target_os = "linux")]
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain system call on an open descriptor; no memory is passed.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_: &File, _: u64, _: u64) {}

/// Encodes on this thread and writes on a second one, so encoding and copying into
/// the page cache overlap (and, with [`start_writeback`], the disk too).
fn write_pipelined(state: &State, now: Instant, file: &File) -> io::Result<Stats> {
    std::thread::scope(|scope| {
        let (full_tx, full_rx) = mpsc::sync_channel::<Vec<u8>>(CHUNKS_IN_FLIGHT);
        let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
        let writer = std::thread::Builder::new()
            .name("snapshot-write".into())
            .spawn_scoped(scope, move || -> io::Result<()> {
                let (mut written, mut started) = (0u64, 0u64);
                for mut chunk in full_rx {
                    (&*file).write_all(&chunk)?;
                    written += chunk.len() as u64;
                    if written - started >= WRITEBACK_STEP {
                        start_writeback(file, started, written - started);
                        started = written;
                    }
                    chunk.clear();
                    let _ = empty_tx.send(chunk);
                }
                Ok(())
            })?;
        let encoded = encode::export_chunks(state, now, |buf| {
            let empty = empty_rx
                .try_recv()
                .unwrap_or_else(|_| Vec::with_capacity(encode::WRITE_CHUNK));
            // Fails only if the writer stopped, on an error it returns below.
            full_tx
                .send(std::mem::replace(buf, empty))
                .map_err(|_| io::Error::other("snapshot writer stopped"))
        });
        drop(full_tx);
        let written = writer
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("snapshot writer panicked")));
        written?;
        encoded
    })
}

/// Size of each read of a snapshot being loaded.
const READ_CHUNK: usize = 1 << 20;

/// The decoder's side of [`read_pipelined`]: the file's bytes, chunk after chunk.
struct Chunks {
    full: mpsc::Receiver<io::Result<Vec<u8>>>,
    empty: mpsc::Sender<Vec<u8>>,
    current: Vec<u8>,
    pos: usize,
}

impl io::Read for Chunks {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.current.len() {
            let used = std::mem::take(&mut self.current);
            if used.capacity() > 0 {
                let _ = self.empty.send(used);
            }
            self.pos = 0;
            match self.full.recv() {
                Ok(chunk) => self.current = chunk?,
                // The reader is done: end of file (its errors come through `chunk`).
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.current.len() - self.pos);
        out[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Fills `buf` (up to [`READ_CHUNK`]) from `file`; an empty `buf` means end of file.
fn fill(file: &mut File, buf: &mut Vec<u8>) -> io::Result<()> {
    buf.resize(READ_CHUNK, 0);
    let mut n = 0;
    while n < buf.len() {
        match io::Read::read(file, &mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(n);
    Ok(())
}

/// Runs `decode` over the bytes of `file` while a second thread reads ahead, so that
/// on a cold start the disk and the decoder work at the same time instead of taking
/// turns. Stops reading as soon as `decode` returns.
fn read_pipelined<T>(mut file: File, decode: impl FnOnce(&mut Chunks) -> T) -> T {
    std::thread::scope(|scope| {
        let (full_tx, full_rx) = mpsc::sync_channel(CHUNKS_IN_FLIGHT);
        let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
        let reader = move || {
            loop {
                let mut buf = empty_rx.try_recv().unwrap_or_default();
                let read = fill(&mut file, &mut buf).map(|()| buf);
                let end = !matches!(&read, Ok(b) if !b.is_empty());
                // A closed channel means the decoder has finished.
                if full_tx.send(read).is_err() || end {
                    return;
                }
            }
        };
        let mut chunks = Chunks {
            full: full_rx,
            empty: empty_tx,
            current: Vec::new(),
            pos: 0,
        };
        let spawned = std::thread::Builder::new()
            .name("snapshot-read".into())
            .spawn_scoped(scope, reader);
        if let Err(e) = spawned {
            // Surfaces as a read error of the first byte.
            let (tx, rx) = mpsc::sync_channel(1);
            let _ = tx.send(Err(e));
            chunks.full = rx;
        }
        decode(&mut chunks)
        // `chunks` drops here, before the scope joins the reader: its next send fails.
    })
}

/// Closes the replaced snapshot on a short-lived thread. Closing frees its blocks
/// (and, on a disk mounted with `discard`, discards them): ~65-75 ms for a 115 MB
/// file here (`cargo bench`), which is housekeeping, not part of making the new
/// snapshot durable. If no thread can be started, the file closes here.
fn release(previous: Option<File>) {
    if let Some(f) = previous {
        let _ = std::thread::Builder::new()
            .name("snapshot-release".into())
            .spawn(move || drop(f));
    }
}

fn write_atomically(path: &Path, state: &State, now: Instant) -> io::Result<Stats> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir)?;
    let tmp = tmp_path(path);
    let result = (|| {
        let file = File::create(&tmp)?;
        let stats = write_pipelined(state, now, &file)?;
        file.sync_all()?;
        drop(file);
        // The rename drops the last name of the previous snapshot. Held open, its blocks
        // are not freed inside the journal commit the directory fsync waits for, but
        // when it is closed, after the new snapshot is durable (see `release`).
        let previous = File::open(path).ok();
        fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        File::open(&dir)?.sync_all()?;
        release(previous);
        Ok(stats)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

impl Storage {
    pub fn new(path: impl Into<PathBuf>, state: State, metrics: Arc<Metrics>) -> Self {
        Self {
            path: path.into(),
            state,
            metrics,
            saving: Mutex::new(()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Saves the state now (blocking file I/O), logging and counting the outcome.
    pub fn save(&self) -> io::Result<Stats> {
        let _guard = self.saving.lock().unwrap_or_else(|e| e.into_inner());
        let start = Instant::now();
        let result = write_atomically(&self.path, &self.state, start);
        let elapsed = start.elapsed();
        self.metrics
            .storage_operation("save", result.as_ref().ok(), elapsed);
        match &result {
            Ok(s) => tracing::info!(
                clusters = s.clusters,
                affiliates = s.affiliates,
                endpoints = s.endpoints,
                size_bytes = s.size_bytes,
                duration = ?elapsed,
                "state saved"
            ),
            Err(e) => {
                tracing::error!(error = %e, path = %self.path.display(), "failed to save state")
            }
        }
        result
    }

    /// Loads the snapshot into the state. Never fails the caller: a missing file is an
    /// empty start, a corrupt one keeps what decoded and is moved aside (Q4).
    pub fn load(&self) -> Loaded {
        let start = Instant::now();
        let (stats, error) = match File::open(&self.path) {
            Ok(f) => {
                let (stats, result) = read_pipelined(f, |r| {
                    decode::import(&self.state, r, start, SystemTime::now())
                });
                (stats, result.err().map(LoadError::from))
            }
            Err(e) => (Stats::default(), Some(LoadError::from(e))),
        };
        let elapsed = start.elapsed();
        let d = &stats.dropped;
        if !d.is_empty() {
            tracing::warn!(
                invalid_clusters = d.invalid_clusters,
                invalid_affiliates = d.invalid_affiliates,
                affiliates_over_limit = d.affiliates_over_limit,
                invalid_endpoints = d.invalid_endpoints,
                duplicate_endpoints = d.duplicate_endpoints,
                endpoints_over_limit = d.endpoints_over_limit,
                path = %self.path.display(),
                "snapshot entries no update could have stored were skipped"
            );
        }
        let missing =
            matches!(&error, Some(LoadError::Open(e)) if e.kind() == io::ErrorKind::NotFound);
        let mut moved_to = None;
        if let Some(e) = &error {
            tracing::warn!(error = %e, path = %self.path.display(), "failed to load state from storage");
            if matches!(e, LoadError::Decode(_)) {
                moved_to = self.move_aside();
            }
        }
        self.metrics
            .storage_operation("load", error.is_none().then_some(&stats), elapsed);
        if error.is_none() || !missing {
            tracing::info!(
                clusters = stats.clusters,
                affiliates = stats.affiliates,
                endpoints = stats.endpoints,
                size_bytes = stats.size_bytes,
                duration = ?elapsed,
                "state loaded"
            );
        }
        Loaded {
            stats,
            error,
            moved_to,
        }
    }

    fn move_aside(&self) -> Option<PathBuf> {
        let stamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let mut s = self.path.as_os_str().to_owned();
        s.push(format!(".corrupt-{stamp}"));
        let to = PathBuf::from(s);
        match fs::rename(&self.path, &to) {
            Ok(()) => {
                tracing::warn!(path = %to.display(), "moved corrupt snapshot aside");
                Some(to)
            }
            Err(e) => {
                tracing::warn!(error = %e, "failed to move corrupt snapshot aside");
                None
            }
        }
    }

    /// Saves every `interval` until `shutdown`; the first save comes one interval after
    /// start, and errors are logged and retried at the next tick.
    pub async fn run(self: Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        // A zero period would make the timer panic; treat it as "as often as possible".
        let interval = interval.max(Duration::from_millis(1));
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {
                    let this = self.clone();
                    let _ = tokio::task::spawn_blocking(move || this.save()).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Update;

    fn storage(dir: &Path) -> Storage {
        let state = State::new();
        let metrics = Arc::new(Metrics::new(state.clone(), true));
        Storage::new(dir.join("sub/state.binpb"), state, metrics)
    }

    #[test]
    fn save_creates_directory_and_empty_state_writes_empty_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = storage(dir.path());
        fs::create_dir_all(dir.path().join("sub")).unwrap();
        fs::write(s.path(), b"old snapshot").unwrap();
        s.save().unwrap();
        assert_eq!(
            fs::read(s.path()).unwrap().len(),
            0,
            "Q3: an empty state replaces the old file"
        );
        assert!(!tmp_path(s.path()).exists());
    }

    fn size_metric(metrics: &Metrics, operation: &str) -> Option<f64> {
        metrics.sample(&format!(
            "discovery_storage_last_snapshot_size_bytes{{operation=\"{operation}\"}}"
        ))
    }

    #[test]
    fn load_size_is_the_file_size_and_the_save_size() {
        let dir = tempfile::tempdir().unwrap();
        let s = storage(dir.path());
        let exp = Instant::now() + Duration::from_secs(60);
        let eps = [bytes::Bytes::from_static(b"e1")];
        for c in 0..5 {
            for a in 0..3 {
                let u = Update {
                    affiliate_id: &format!("a{a}"),
                    data: &[7; 300],
                    endpoints: &eps,
                };
                s.state.update(&format!("c{c}"), &u, exp).unwrap();
            }
        }
        let saved = s.save().unwrap();
        let file = fs::metadata(s.path()).unwrap().len();
        assert_eq!(saved.size_bytes, file);

        let fresh = storage(dir.path());
        let loaded = fresh.load();
        assert!(loaded.error.is_none(), "{:?}", loaded.error);
        assert_eq!(loaded.stats.clusters, 5);
        assert_eq!(loaded.stats.size_bytes, file);
        assert_eq!(size_metric(&fresh.metrics, "load"), Some(file as f64));
        assert_eq!(size_metric(&s.metrics, "save"), Some(file as f64));
    }

    fn add_affiliate(s: &Storage, cluster: &str) {
        let u = Update {
            affiliate_id: "a",
            data: b"d",
            endpoints: &[],
        };
        let expiry = Instant::now() + Duration::from_secs(60);
        s.state.update(cluster, &u, expiry).unwrap();
    }

    #[test]
    fn failed_save_keeps_previous_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let s = storage(dir.path());
        add_affiliate(&s, "c");
        s.save().unwrap();
        let good = fs::read(s.path()).unwrap();
        // A directory where the temp file should go makes the save fail.
        fs::create_dir(tmp_path(s.path())).unwrap();
        assert!(s.save().is_err());
        assert_eq!(fs::read(s.path()).unwrap(), good);
    }

    #[test]
    fn failed_save_removes_its_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = storage(dir.path());
        add_affiliate(&s, "c");
        // A non-empty directory at the snapshot path: the temp file is written in full,
        // then the rename over the directory fails.
        fs::create_dir_all(s.path().join("inside")).unwrap();
        let err = s.save().unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EISDIR), "{err}");
        assert!(!tmp_path(s.path()).exists(), "the temp file is gone");
        assert!(s.path().join("inside").is_dir(), "the target is untouched");
        assert!(
            s.metrics.render().contains(
                "discovery_storage_operations_total{operation=\"save\",status=\"error\"} 1"
            )
        );
    }

    #[test]
    fn corrupt_file_keeps_prefix_and_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let s = storage(dir.path());
        for c in ["c1", "c2"] {
            add_affiliate(&s, c);
        }
        s.save().unwrap();
        let mut bytes = fs::read(s.path()).unwrap();
        bytes.truncate(bytes.len() - 1);
        fs::write(s.path(), &bytes).unwrap();

        let fresh = storage(dir.path());
        let loaded = fresh.load();
        assert!(loaded.error.is_some());
        assert_eq!(loaded.stats.clusters, 1);
        assert_eq!(fresh.state.cluster_count(), 1);
        let moved = loaded.moved_to.unwrap();
        assert_eq!(fs::read(moved).unwrap(), bytes);
        assert!(!fresh.path().exists());
    }

    #[test]
    fn pipelined_write_is_the_encoding_and_reports_write_errors() {
        let dir = tempfile::tempdir().unwrap();
        let s = storage(dir.path());
        let now = Instant::now();
        let data = vec![7u8; 2000];
        for c in 0..1500 {
            let u = Update {
                affiliate_id: "a",
                data: &data,
                endpoints: &[],
            };
            s.state
                .update(&format!("c{c}"), &u, now + Duration::from_secs(60))
                .unwrap();
        }
        let mut want = Vec::new();
        let stats = encode::export(&s.state, now, &mut want).unwrap();
        assert!(want.len() > 2 * encode::WRITE_CHUNK, "several chunks");
        let path = dir.path().join("piped");
        let written = write_pipelined(&s.state, now, &File::create(&path).unwrap()).unwrap();
        assert_eq!(written, stats);
        assert_eq!(fs::read(&path).unwrap(), want);
        // A full disk fails the save instead of losing the error in the writer thread.
        if let Ok(full) = fs::OpenOptions::new().write(true).open("/dev/full") {
            let err = write_pipelined(&s.state, now, &full).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(28), "ENOSPC: {err}");
        }
    }

    #[test]
    fn pipelined_read_yields_the_file_and_stops_with_the_decoder() {
        use std::io::Read;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let bytes: Vec<u8> = (0..3 * READ_CHUNK + 123).map(|i| (i * 7) as u8).collect();
        fs::write(&path, &bytes).unwrap();
        let all = |r: &mut Chunks| {
            let mut v = Vec::new();
            r.read_to_end(&mut v).map(|_| v)
        };
        assert_eq!(
            read_pipelined(File::open(&path).unwrap(), all).unwrap(),
            bytes
        );
        // A decoder that stops early does not wait for the rest of the file.
        let first = read_pipelined(File::open(&path).unwrap(), |r| {
            let mut b = [0u8; 10];
            r.read_exact(&mut b).map(|_| b)
        });
        assert_eq!(first.unwrap(), bytes[..10]);
        fs::write(&path, b"").unwrap();
        assert!(
            read_pipelined(File::open(&path).unwrap(), all)
                .unwrap()
                .is_empty()
        );
        // Read errors reach the decoder (a directory cannot be read).
        let err = read_pipelined(File::open(dir.path()).unwrap(), all).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(21), "EISDIR: {err}");
    }

    #[test]
    fn missing_file_is_an_empty_start() {
        let dir = tempfile::tempdir().unwrap();
        let s = storage(dir.path());
        let loaded = s.load();
        assert!(matches!(loaded.error, Some(LoadError::Open(_))));
        assert!(loaded.moved_to.is_none());
        assert_eq!(s.state.cluster_count(), 0);
    }
}
