//! The snapshot file: atomic saves, best-effort loads, the periodic save loop.
//!
//! A save writes `<path>.tmp`, fsyncs it, renames it over `<path>` and fsyncs the
//! directory, so a crash at any point leaves either the old or the new snapshot, never
//! a torn one. Unlike upstream, a failed save removes the temp file and keeps the
//! previous snapshot (Q2), and an empty state writes an empty file (Q3).

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
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

fn write_atomically(path: &Path, state: &State, now: Instant) -> io::Result<Stats> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir)?;
    let tmp = tmp_path(path);
    let result = (|| {
        let mut out = BufWriter::with_capacity(256 * 1024, File::create(&tmp)?);
        let stats = encode::export(state, now, &mut out)?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        File::open(&dir)?.sync_all()?;
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
                let mut r = BufReader::with_capacity(256 * 1024, f);
                let (stats, result) = decode::import(&self.state, &mut r, start, SystemTime::now());
                (stats, result.err().map(LoadError::from))
            }
            Err(e) => (Stats::default(), Some(LoadError::from(e))),
        };
        let elapsed = start.elapsed();
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

    #[test]
    fn failed_save_keeps_previous_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let s = storage(dir.path());
        s.state
            .update(
                "c",
                &Update {
                    affiliate_id: "a",
                    data: b"d",
                    endpoints: &[],
                },
                Instant::now() + Duration::from_secs(60),
            )
            .unwrap();
        s.save().unwrap();
        let good = fs::read(s.path()).unwrap();
        // A directory where the temp file should go makes the save fail.
        fs::create_dir(tmp_path(s.path())).unwrap();
        assert!(s.save().is_err());
        assert_eq!(fs::read(s.path()).unwrap(), good);
    }

    #[test]
    fn corrupt_file_keeps_prefix_and_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let s = storage(dir.path());
        for c in ["c1", "c2"] {
            s.state
                .update(
                    c,
                    &Update {
                        affiliate_id: "a",
                        data: b"d",
                        endpoints: &[],
                    },
                    Instant::now() + Duration::from_secs(60),
                )
                .unwrap();
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
    fn missing_file_is_an_empty_start() {
        let dir = tempfile::tempdir().unwrap();
        let s = storage(dir.path());
        let loaded = s.load();
        assert!(matches!(loaded.error, Some(LoadError::Open(_))));
        assert!(loaded.moved_to.is_none());
        assert_eq!(s.state.cluster_count(), 0);
    }
}
