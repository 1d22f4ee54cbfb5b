//! When raw affiliates were first seen, kept across restarts in `first-seen.yaml`
//! in the state dir.
//!
//! The member rule prefers, among nodes claiming one nodename, the identity first
//! seen most recently (`members`). Without this file every restart would see all
//! of them at once, and a stale identity lingering in the registries could win
//! again. The store keeps first-seen times while the daemon runs (`store`); this
//! module seeds them at start and writes them back:
//!
//! - per node ID and registry, the first-seen and last-seen times (RFC 3339 UTC);
//! - only when that changed: a node or registry came or went, a first-seen moved,
//!   or a last-seen moved on by `FIRST_SEEN_REFRESH`; at most every
//!   `FIRST_SEEN_SAVE_MIN_INTERVAL`, and once more at shutdown;
//! - atomically (temp file, fsync, rename), like the node identity;
//! - bounded: a node ID no registry reports and none has reported for
//!   `FIRST_SEEN_FORGET_AFTER` is forgotten (times loaded from the file count from
//!   the daemon's start, so a long stop forgets nothing before the registries had
//!   a chance to report again), and at most `FIRST_SEEN_NODES_MAX` node IDs are
//!   kept, the reported and most recently seen first.
//!
//! A damaged or unreadable file is a warning, never a failure: the daemon starts
//! without remembered times and writes a good file at its next save.
//!
//! The pure core (`render`, `parse`, `prune`, `needs_save`) knows nothing of files
//! or clocks; `restore` and `run` are the I/O around it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::limits;
use crate::store::{Seen, Store};
use crate::timestamp;

pub const FILE_NAME: &str = "first-seen.yaml";

/// Raw affiliate ID (`<registry>/<node-id>`) → when it was seen.
pub type Sightings = BTreeMap<String, Seen>;

/// The file: node ID → registry → times.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBody {
    nodes: BTreeMap<String, BTreeMap<String, FileTimes>>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FileTimes {
    first_seen: String,
    last_seen: String,
}

const HEADER: &str =
    "# Written by discoveryd: when each node ID was first and last seen, per registry.\n";

/// The file's text. IDs that are no `<registry>/<node-id>` are left out.
pub fn render(sightings: &Sightings) -> String {
    let mut nodes: BTreeMap<String, BTreeMap<String, FileTimes>> = BTreeMap::new();
    for (id, seen) in sightings {
        if let Some((registry, node)) = split(id) {
            nodes.entry(node.to_owned()).or_default().insert(
                registry.to_owned(),
                FileTimes {
                    first_seen: timestamp::format_precise(seen.first),
                    last_seen: timestamp::format_precise(seen.last),
                },
            );
        }
    }
    let body = serde_norway::to_string(&FileBody { nodes }).expect("plain maps serialize");
    format!("{HEADER}{body}")
}

/// Reads what `render` writes; any damage makes the whole file unusable.
pub fn parse(text: &str) -> Result<Sightings, String> {
    let body: FileBody = serde_norway::from_str(text).map_err(|e| e.to_string())?;
    let mut sightings = Sightings::new();
    for (node, registries) in body.nodes {
        if node.is_empty()
            || node.len() > limits::NODE_ID_MAX
            || !node.bytes().all(|b| b.is_ascii_graphic() && b != b'/')
        {
            return Err(format!("{node:?} is not a node ID"));
        }
        for (registry, times) in registries {
            if !limits::is_registry_name(&registry) {
                return Err(format!(
                    "node {node}: {registry:?} is not a registry prefix"
                ));
            }
            let time = |text: &str| {
                timestamp::parse(text).ok_or_else(|| {
                    format!(
                        "node {node}, registry {registry}: {text:?} is not an RFC 3339 UTC time"
                    )
                })
            };
            let seen = Seen {
                first: time(&times.first_seen)?,
                last: time(&times.last_seen)?,
            };
            sightings.insert(format!("{registry}/{node}"), seen);
        }
    }
    Ok(sightings)
}

/// What to keep of `all` (raw affiliate ID → times and whether it exists now),
/// by node ID: see the module doc. `started` is the daemon's start.
pub fn prune(
    all: &BTreeMap<String, (Seen, bool)>,
    now: SystemTime,
    started: SystemTime,
) -> Sightings {
    struct Node {
        last: SystemTime,
        reported: bool,
    }
    let mut nodes: HashMap<&str, Node> = HashMap::new();
    for (id, (seen, exists)) in all {
        let node = nodes.entry(node_of(id)).or_insert(Node {
            last: seen.last,
            reported: false,
        });
        node.last = node.last.max(seen.last);
        node.reported |= *exists;
    }
    let cutoff = now.checked_sub(limits::FIRST_SEEN_FORGET_AFTER);
    let mut kept: Vec<(&str, Node)> = nodes
        .into_iter()
        .filter(|(_, n)| n.reported || cutoff.is_none_or(|c| n.last.max(started) >= c))
        .collect();
    if kept.len() > limits::FIRST_SEEN_NODES_MAX {
        kept.sort_unstable_by(|(a_id, a), (b_id, b)| {
            (b.reported, b.last, a_id).cmp(&(a.reported, a.last, b_id))
        });
        kept.truncate(limits::FIRST_SEEN_NODES_MAX);
    }
    let kept: BTreeSet<&str> = kept.into_iter().map(|(id, _)| id).collect();
    all.iter()
        .filter(|(id, _)| kept.contains(node_of(id)))
        .map(|(id, (seen, _))| (id.clone(), *seen))
        .collect()
}

/// Whether `current` differs from what was saved enough to write it: IDs or
/// first-seen times changed, or a last-seen moved by `FIRST_SEEN_REFRESH`.
pub fn needs_save(saved: &Sightings, current: &Sightings) -> bool {
    saved.len() != current.len()
        || saved
            .iter()
            .zip(current)
            .any(|((saved_id, saved), (id, seen))| {
                saved_id != id
                    || saved.first != seen.first
                    || distance(saved.last, seen.last) >= limits::FIRST_SEEN_REFRESH
            })
}

fn distance(a: SystemTime, b: SystemTime) -> Duration {
    a.duration_since(b)
        .or_else(|_| b.duration_since(a))
        .unwrap_or_default()
}

fn split(id: &str) -> Option<(&str, &str)> {
    id.split_once('/')
        .filter(|(registry, node)| !registry.is_empty() && !node.is_empty())
}

fn node_of(id: &str) -> &str {
    split(id).map_or(id, |(_, node)| node)
}

/// The file of a state dir and what it held when last read or written.
pub struct Persisted {
    path: PathBuf,
    /// `None` when the file is damaged: the next save rewrites it.
    saved: Option<Sightings>,
    /// The last save's error, to warn once rather than every time.
    last_error: Option<String>,
}

/// Reads the file in `state_dir` and seeds `store` with it.
pub fn restore(store: &Store, state_dir: &Path) -> Persisted {
    let path = state_dir.join(FILE_NAME);
    let saved = match std::fs::read_to_string(&path) {
        Ok(text) => parse(&text)
            .inspect_err(|e| {
                tracing::warn!(
                    "{} is damaged ({e}); starting without remembered first-seen times",
                    path.display()
                )
            })
            .ok(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Some(Sightings::new()),
        Err(e) => {
            tracing::warn!(
                "cannot read {} ({e}); starting without remembered first-seen times",
                path.display()
            );
            None
        }
    };
    if let Some(saved) = &saved {
        store.remember_raw(saved.iter().map(|(id, seen)| (id.clone(), *seen)));
        tracing::info!(raw_affiliates = saved.len(), "first-seen times restored");
    }
    Persisted {
        path,
        saved,
        last_error: None,
    }
}

/// Keeps the file in step with the store until shutdown, then saves once more.
pub async fn run(store: Arc<Store>, mut persisted: Persisted, shutdown: CancellationToken) {
    let mut raw = store.raw_changes();
    let mut refresh = tokio::time::interval(limits::FIRST_SEEN_REFRESH);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_save = tokio::time::Instant::now();
    loop {
        let mut stopping = tokio::select! {
            _ = raw.changed() => false,
            _ = refresh.tick() => false,
            _ = shutdown.cancelled() => true,
        };
        if !stopping {
            // Changes in quick succession are written together.
            stopping = tokio::select! {
                _ = tokio::time::sleep_until(next_save) => false,
                _ = shutdown.cancelled() => true,
            };
        }
        raw.borrow_and_update();
        if persisted.update(&store).await {
            next_save = tokio::time::Instant::now() + limits::FIRST_SEEN_SAVE_MIN_INTERVAL;
        }
        if stopping {
            return;
        }
    }
}

impl Persisted {
    /// Prunes the store's memory and writes the file if needed; returns whether
    /// it tried to write.
    async fn update(&mut self, store: &Store) -> bool {
        let current = prune(&store.raw_sightings(), store.now(), store.started());
        store.forget_raw(|id, _| current.contains_key(id));
        if self
            .saved
            .as_ref()
            .is_some_and(|saved| !needs_save(saved, &current))
        {
            return false;
        }
        let (path, text) = (self.path.clone(), render(&current));
        let written = tokio::task::spawn_blocking(move || write_atomically(&path, text.as_bytes()))
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e)));
        match written {
            Ok(()) => {
                self.saved = Some(current);
                self.last_error = None;
            }
            Err(e) => {
                let message = e.to_string();
                if self.last_error.as_ref() != Some(&message) {
                    tracing::warn!(
                        "cannot write {} ({message}); first-seen times will not survive a restart",
                        self.path.display()
                    );
                    self.last_error = Some(message);
                }
            }
        }
        true
    }
}

/// Temp file beside it, fsync, rename over it, fsync the directory: the name
/// always holds a complete file.
fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".first-seen")
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(seconds)
    }

    fn seen(first: u64, last: u64) -> Seen {
        Seen {
            first: at(first),
            last: at(last),
        }
    }

    const DAY: u64 = 24 * 3600;

    #[test]
    fn the_file_round_trips_grouped_by_node() {
        let mut sightings = Sightings::from([
            (
                "static/old-id".to_string(),
                seen(1_796_120_430, 1_796_120_500),
            ),
            ("k8s/old-id".to_string(), seen(1_796_120_000, 1_796_120_600)),
            (
                "static/new:id#1".to_string(),
                seen(1_796_121_000, 1_796_121_000),
            ),
        ]);
        let precise = SystemTime::UNIX_EPOCH + Duration::new(1_796_121_000, 123_456_789);
        sightings.get_mut("static/new:id#1").unwrap().first = precise;
        let text = render(&sightings);
        assert!(text.starts_with("# Written by discoveryd"), "{text}");
        assert!(
            text.contains(
                "  old-id:\n    k8s:\n      firstSeen: 2026-12-01T10:13:20Z\n      lastSeen: 2026-12-01T10:23:20Z\n    static:\n      firstSeen: 2026-12-01T10:20:30Z\n"
            ),
            "{text}"
        );
        assert_eq!(parse(&text), Ok(sightings), "sub-second times survive");
        // IDs that are no `<registry>/<node-id>` are not written.
        let odd = Sightings::from([("no-slash".to_string(), seen(1, 1))]);
        assert_eq!(parse(&render(&odd)), Ok(Sightings::new()));
    }

    #[test]
    fn a_damaged_file_is_refused_as_a_whole() {
        let good = "nodes:\n  a:\n    static: {firstSeen: 2026-12-01T10:20:30Z, lastSeen: 2026-12-01T10:20:30Z}\n";
        assert_eq!(parse(good).unwrap().len(), 1);
        for bad in [
            "",
            "{{{",
            "nodes: [1, 2]",
            "nodes: {}\nextra: 1",
            "nodes:\n  a:\n    static: {firstSeen: yesterday, lastSeen: 2026-12-01T10:20:30Z}\n",
            "nodes:\n  a:\n    Static: {firstSeen: 2026-12-01T10:20:30Z, lastSeen: 2026-12-01T10:20:30Z}\n",
            "nodes:\n  a/b:\n    static: {firstSeen: 2026-12-01T10:20:30Z, lastSeen: 2026-12-01T10:20:30Z}\n",
            "nodes:\n  a:\n    static: {firstSeen: 2026-12-01T10:20:30Z}\n",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn nodes_unseen_for_a_day_are_forgotten_unless_reported() {
        let now = 10 * DAY;
        // Running for two days.
        let started = 8 * DAY;
        let all = BTreeMap::from([
            // Reported now, whatever its last publish: kept.
            ("static/quiet".to_string(), (seen(1, 2), true)),
            // Gone for over a day: forgotten in every registry.
            ("static/gone".to_string(), (seen(1, now - DAY - 1), false)),
            ("k8s/gone".to_string(), (seen(1, now - DAY - 5), false)),
            // Gone, but seen within the day by one registry: kept in both.
            ("static/recent".to_string(), (seen(1, now - DAY - 5), false)),
            ("k8s/recent".to_string(), (seen(1, now - 60), false)),
        ]);
        let kept: Vec<String> = prune(&all, at(now), at(started)).into_keys().collect();
        assert_eq!(kept, ["k8s/recent", "static/quiet", "static/recent"]);

        // Right after a start, times loaded from an old file are still kept: the
        // registries have not had a chance to report them again.
        let loaded = BTreeMap::from([("static/old".to_string(), (seen(1, 2), false))]);
        assert_eq!(prune(&loaded, at(now), at(now - 60)).len(), 1);
        assert_eq!(prune(&loaded, at(now), at(now - DAY - 1)).len(), 0);
    }

    #[test]
    fn the_node_count_is_capped_keeping_reported_then_recent_ones() {
        let max = limits::FIRST_SEEN_NODES_MAX as u64;
        let now = 10 * DAY;
        let mut all = BTreeMap::new();
        for i in 0..max + 10 {
            // Node i was last seen at now - i seconds; two registries each.
            all.insert(format!("k8s/n{i}"), (seen(1, now - i), false));
            all.insert(format!("static/n{i}"), (seen(1, now - i), false));
        }
        // The oldest node is still reported, so it stays.
        all.insert(format!("static/n{}", max + 9), (seen(1, 1), true));
        let kept = prune(&all, at(now), at(now));
        let nodes: BTreeSet<&str> = kept.keys().map(|id| node_of(id)).collect();
        assert_eq!(nodes.len() as u64, max);
        assert_eq!(
            kept.len() as u64,
            2 * max,
            "a kept node keeps every registry"
        );
        assert!(nodes.contains(format!("n{}", max + 9).as_str()));
        assert!(nodes.contains("n0"));
        assert!(!nodes.contains(format!("n{}", max - 1).as_str()));
        assert!(!nodes.contains(format!("n{}", max + 8).as_str()));
    }

    #[test]
    fn only_real_changes_are_saved() {
        let saved = Sightings::from([("static/a".to_string(), seen(100, 200))]);
        let with = |id: &str, s: Seen| Sightings::from([(id.to_string(), s)]);
        assert!(!needs_save(&saved, &saved.clone()));
        let refresh = limits::FIRST_SEEN_REFRESH.as_secs();
        assert!(!needs_save(
            &saved,
            &with("static/a", seen(100, 200 + refresh - 1))
        ));
        assert!(needs_save(
            &saved,
            &with("static/a", seen(100, 200 + refresh))
        ));
        assert!(needs_save(&saved, &with("static/a", seen(99, 200))));
        assert!(needs_save(&saved, &with("static/b", seen(100, 200))));
        assert!(needs_save(&saved, &Sightings::new()));
    }

    fn store() -> Arc<Store> {
        Store::new()
    }

    fn affiliate(node_id: &str) -> crate::specs::AffiliateSpec {
        crate::specs::AffiliateSpec {
            node_id: node_id.into(),
            ..Default::default()
        }
    }

    /// Through the file: what one daemon saw, the next one starts from; a
    /// damaged file is a warning and is replaced by a good one.
    #[tokio::test]
    async fn first_seen_survives_a_restart_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let first = store();
        let mut persisted = restore(&first, dir.path());
        assert!(!dir.path().join(FILE_NAME).exists());
        let writer = crate::store::RawWriter::new(first.clone(), "static");
        writer.publish(vec![affiliate("old-id"), affiliate("new-id")]);
        assert!(persisted.update(&first).await, "a new file is written");
        assert!(!persisted.update(&first).await, "nothing changed since");
        let before = first.raw_sightings();
        let text = std::fs::read_to_string(dir.path().join(FILE_NAME)).unwrap();
        assert!(
            text.contains("old-id:") && text.contains("new-id:"),
            "{text}"
        );
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n != FILE_NAME)
            .collect();
        assert!(leftovers.is_empty(), "no temp file remains: {leftovers:?}");

        // The next daemon: the same affiliates start from the remembered times.
        let second = store();
        restore(&second, dir.path());
        let writer = crate::store::RawWriter::new(second.clone(), "static");
        writer.publish(vec![affiliate("new-id"), affiliate("old-id")]);
        for id in ["static/old-id", "static/new-id"] {
            let resource = second
                .get(
                    crate::store::Namespace::ClusterRaw,
                    crate::store::Kind::Affiliate,
                    id,
                )
                .unwrap();
            assert_eq!(resource.first_seen, before[id].0.first, "{id}");
        }

        // A damaged file: restored as nothing, rewritten at the next update.
        std::fs::write(dir.path().join(FILE_NAME), "nodes: [").unwrap();
        let third = store();
        let mut persisted = restore(&third, dir.path());
        assert!(third.raw_sightings().is_empty());
        assert!(
            persisted.update(&third).await,
            "the damaged file is replaced"
        );
        assert_eq!(
            parse(&std::fs::read_to_string(dir.path().join(FILE_NAME)).unwrap()),
            Ok(Sightings::new())
        );
    }

    #[tokio::test]
    async fn run_saves_on_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let store = store();
        let persisted = restore(&store, dir.path());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(store.clone(), persisted, shutdown.clone()));
        crate::store::RawWriter::new(store.clone(), "static").publish(vec![affiliate("a")]);
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("run ends at shutdown")
            .unwrap();
        let saved = parse(&std::fs::read_to_string(dir.path().join(FILE_NAME)).unwrap()).unwrap();
        assert_eq!(saved.keys().collect::<Vec<_>>(), ["static/a"]);
    }
}
