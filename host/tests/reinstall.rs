//! End to end through the real binary: a node reinstalled with a new identity
//! while its old one lingers in the registries. Two static-file plugin instances
//! play two registries; the newer identity must become the member, the
//! affiliates must show which registries saw each node and when, and the choice
//! must survive a restart.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

use common::{Daemon, RAW_AFFILIATES, json, json_lines, plugin};
use discoveryd::{first_seen, timestamp};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

/// The old identity, which sorts after the new one: only the first-seen rule can
/// prefer the new one (the old one is also seen by more registries).
const OLD: &str = "- {nodeId: old-id, hostname: worker-1.old, nodename: worker-1, machineType: worker, addresses: [10.5.0.21]}\n";
const NEW: &str = "- {nodeId: new-id, hostname: worker-1.new, nodename: worker-1, machineType: worker, addresses: [10.5.0.31]}\n";
/// Sorts after worker-1, so its member appears after any worker-1 change made in
/// the same pass.
const MARKER: &str =
    "- {nodeId: marker-id, nodename: zz-marker, machineType: worker, addresses: [10.5.0.99]}\n";

fn config(dir: &Path) -> String {
    let instance = |name: &str| {
        format!(
            "  {name}:\n    path: {plugin}\n    prefix: {name}\n    config: {{path: /peers/peers.yaml}}\n    grants:\n      files: [{{host: {peers}, guest: /peers}}]\n",
            plugin = plugin("static-file").display(),
            peers = dir.join(name).display(),
        )
    };
    format!(
        "node:\n  stateDir: state\n  nodename: self-node\n  machineType: controlplane\n  addresses: [10.5.0.10]\nplugins:\n{}{}",
        instance("peers-a"),
        instance("peers-b"),
    )
}

/// Replaces a registry's file the way editors do: write aside, then rename.
fn write_peers(dir: &Path, registry: &str, text: &str) {
    let tmp = dir.join(registry).join(".peers.yaml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, dir.join(registry).join("peers.yaml")).unwrap();
}

/// Follows a `get -o json -w` stream: ID → latest resource.
fn apply(state: &mut BTreeMap<String, Value>, line: &str) {
    let event = json(line);
    let id = event["metadata"]["id"].as_str().unwrap().to_string();
    if event["event"] == "destroyed" {
        state.remove(&id);
    } else {
        state.insert(id, event);
    }
}

fn member_node_id<'a>(members: &'a BTreeMap<String, Value>, nodename: &str) -> Option<&'a str> {
    members.get(nodename)?["spec"]["nodeId"].as_str()
}

fn time(text: &Value) -> SystemTime {
    let text = text
        .as_str()
        .unwrap_or_else(|| panic!("not a string: {text}"));
    assert!(text.ends_with('Z') && !text.contains('.'), "{text}");
    timestamp::parse(text).unwrap_or_else(|| panic!("not RFC 3339 UTC: {text}"))
}

/// Waits until the raw affiliates are exactly `ids`.
fn wait_for_raw(daemon: &Daemon, ids: &[&str]) {
    let (mut watcher, events) = daemon.cli_stream(&[RAW_AFFILIATES, &["-w"]].concat());
    let mut raw = BTreeMap::new();
    events.wait_for(&format!("raw affiliates {ids:?}"), WAIT, |line| {
        apply(&mut raw, line);
        raw.keys().map(String::as_str).eq(ids.iter().copied())
    });
    let _ = watcher.kill();
    let _ = watcher.wait();
}

#[test]
fn a_reinstalled_node_replaces_its_old_identity_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    for registry in ["peers-a", "peers-b"] {
        std::fs::create_dir(dir.path().join(registry)).unwrap();
        write_peers(dir.path(), registry, OLD);
    }
    let config = config(dir.path());
    let daemon = Daemon::start_in(dir, &config);

    // Before the reinstall: the old identity, seen by both registries.
    wait_for_raw(&daemon, &["peers-a/old-id", "peers-b/old-id"]);
    let (mut watcher, events) = daemon.cli_stream(&["get", "members", "-o", "json", "-w"]);
    let mut members = BTreeMap::new();
    events.wait_for("worker-1 as old-id", WAIT, |line| {
        apply(&mut members, line);
        member_node_id(&members, "worker-1") == Some("old-id")
    });

    // The reinstalled node shows up in one registry under its old nodename.
    write_peers(daemon.dir.path(), "peers-b", &format!("{OLD}{NEW}"));
    events.wait_for("worker-1 to become new-id", WAIT, |line| {
        apply(&mut members, line);
        member_node_id(&members, "worker-1") == Some("new-id")
    });
    let warning = daemon
        .log
        .wait_for("the duplicate nodename warning", WAIT, |l| {
            l.contains("duplicate nodename")
        });
    assert!(
        warning.contains("worker-1") && warning.contains("kept=new-id"),
        "{warning}"
    );
    assert!(warning.contains("old-id"), "{warning}");
    let _ = watcher.kill();
    let _ = watcher.wait();

    // Which registries saw each node, and when.
    let affiliates: BTreeMap<String, Value> =
        json_lines(&daemon.cli(&["get", "affiliates", "-o", "json"]))
            .into_iter()
            .map(|a| (a["metadata"]["id"].as_str().unwrap().to_string(), a))
            .collect();
    assert_eq!(
        affiliates
            .keys()
            .filter(|id| id.ends_with("-id"))
            .collect::<Vec<_>>(),
        ["new-id", "old-id"]
    );
    let registries = |id: &str| -> Vec<String> {
        affiliates[id]["sources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["registry"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(registries("old-id"), ["peers-a", "peers-b"]);
    assert_eq!(registries("new-id"), ["peers-b"]);
    let local: Vec<&Value> = affiliates
        .values()
        .filter(|a| a["spec"]["nodename"] == "self-node")
        .collect();
    assert_eq!(local.len(), 1);
    assert_eq!(
        local[0]["sources"],
        serde_json::json!([{"registry": "local"}])
    );
    let source = |id: &str, i: usize| affiliates[id]["sources"][i].clone();
    for (id, i) in [("old-id", 0), ("old-id", 1), ("new-id", 0)] {
        let s = source(id, i);
        assert!(time(&s["firstSeen"]) <= time(&s["lastSeen"]), "{s}");
    }
    assert!(time(&source("new-id", 0)["firstSeen"]) >= time(&source("old-id", 1)["firstSeen"]));
    // Talos's spec keys are untouched; the sources sit beside them.
    let keys: Vec<&String> = affiliates["new-id"].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["metadata", "spec", "sources"]);
    assert!(affiliates["new-id"]["spec"].get("sources").is_none());

    // Raw affiliates carry their own times in their metadata.
    for raw in json_lines(&daemon.cli(RAW_AFFILIATES)) {
        let metadata = &raw["metadata"];
        assert!(
            time(&metadata["firstSeen"]) <= time(&metadata["lastSeen"]),
            "{raw}"
        );
        assert!(raw.get("sources").is_none(), "{raw}");
    }

    // The table: talosctl's columns, then SEEN BY.
    let table = daemon.cli(&["get", "affiliates"]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "ID",
            "VERSION",
            "HOSTNAME",
            "MACHINE",
            "TYPE",
            "ADDRESSES",
            "SEEN",
            "BY"
        ]
    );
    let row = |id: &str| {
        table
            .lines()
            .find(|l| l.starts_with(id))
            .unwrap_or_else(|| panic!("no row {id}:\n{table}"))
            .to_string()
    };
    assert!(row("old-id").ends_with("   peers-a,peers-b"), "{table}");
    assert!(row("new-id").ends_with("   peers-b"), "{table}");
    assert_eq!(
        table.lines().filter(|l| l.ends_with("   local")).count(),
        1,
        "{table}"
    );

    // A restart: the first-seen times come back from the state dir.
    let (status, dir) = daemon.shutdown();
    assert!(status.success());
    let text =
        std::fs::read_to_string(dir.path().join("state").join(first_seen::FILE_NAME)).unwrap();
    let saved = first_seen::parse(&text).unwrap();
    assert_eq!(
        saved.keys().collect::<Vec<_>>(),
        ["peers-a/old-id", "peers-b/new-id", "peers-b/old-id"],
        "{text}"
    );
    assert!(
        saved["peers-b/new-id"].first > saved["peers-a/old-id"].first,
        "{text}"
    );

    let daemon = Daemon::start_in(dir, &config);
    wait_for_raw(
        &daemon,
        &["peers-a/old-id", "peers-b/new-id", "peers-b/old-id"],
    );
    let (mut watcher, events) = daemon.cli_stream(&["get", "members", "-o", "json", "-w"]);
    // Any pass that sees the marker has seen every raw affiliate above, and shows
    // worker-1 before zz-marker: once the marker is there, worker-1 is final.
    write_peers(daemon.dir.path(), "peers-a", &format!("{OLD}{MARKER}"));
    let mut members = BTreeMap::new();
    events.wait_for("the marker member", WAIT, |line| {
        apply(&mut members, line);
        members.contains_key("zz-marker")
    });
    assert_eq!(
        member_node_id(&members, "worker-1"),
        Some("new-id"),
        "after a restart the old identity must not win again: {members:?}"
    );
    let _ = watcher.kill();
    let _ = watcher.wait();
    let affiliates = json_lines(&daemon.cli(&["get", "affiliates", "-o", "json"]));
    let new = affiliates
        .iter()
        .find(|a| a["metadata"]["id"] == "new-id")
        .unwrap();
    assert_eq!(
        new["sources"][0]["firstSeen"],
        timestamp::format(saved["peers-b/new-id"].first),
        "restored, not the time of the restart"
    );
}
