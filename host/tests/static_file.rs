//! End to end through the real binary: the static-file plugin (compiled to wasm)
//! feeds peers from a file, and `discoveryd get` shows them as members.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::{Daemon, RAW_AFFILIATES, SECRET, ids, json, json_lines, plugin};
use serde::Deserialize;
use serde_json::Value;

const PEERS: &str = r#"
- nodeId: 7x1SuC8Ege5BGXdAfTEff5iQnlWZLfv9h1LGMxA2pYkC
  hostname: worker-1.example
  nodename: worker-1
  machineType: worker
  operatingSystem: Talos (v1.12.0)
  addresses: [10.5.0.11, "fd83:b1f7:fcb5:2802::11"]
- nodeId: NVtfu1bT1QjhNq5xJFUZl8f8I8LOCnnpGrZfPpdN9WlB
  hostname: worker-2.example
  nodename: worker-2
  machineType: worker
  operatingSystem: Talos (v1.12.0)
  addresses: [10.5.0.12]
"#;

fn config(dir: &Path) -> String {
    format!(
        r#"
cluster:
  id: e2e-cluster
  secret: {SECRET}
  discovery:
    registries:
      static: {{}}
node:
  stateDir: state
  nodename: self-node
  machineType: controlplane
  addresses: [10.5.0.10]
  controlPlane: {{apiServerPort: 6443}}
plugins:
  static:
    path: {plugin}
    config: {{path: /peers/peers.yaml}}
    grants:
      files: [{{host: {peers}, guest: /peers}}]
"#,
        plugin = plugin("static-file").display(),
        peers = dir.join("peers").display(),
    )
}

/// Replaces the file the way editors do: write aside, then rename over it.
fn write_peers(dir: &Path, text: &str) {
    let tmp = dir.join("peers/.peers.yaml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, dir.join("peers/peers.yaml")).unwrap();
}

/// Follows a `get -o json -w` stream, keeping the latest spec per ID.
fn apply(state: &mut BTreeMap<String, Value>, line: &str) {
    let event = json(line);
    let id = event["metadata"]["id"].as_str().unwrap().to_string();
    if event["event"] == "destroyed" {
        state.remove(&id);
    } else {
        state.insert(id, event["spec"].clone());
    }
}

#[test]
fn static_file_peers_become_members_and_follow_edits() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("peers")).unwrap();
    write_peers(dir.path(), PEERS);
    let config = config(dir.path());
    let daemon = Daemon::start_in(dir, &config);

    let (mut watcher, events) = daemon.cli_stream(&["get", "members", "-o", "json", "-w"]);
    let mut members = BTreeMap::new();
    events.wait_for("both peers as members", Duration::from_secs(30), |line| {
        apply(&mut members, line);
        members.contains_key("worker-1") && members.contains_key("worker-2")
    });

    let listed = json_lines(&daemon.cli(&["get", "members", "-o", "json"]));
    assert_eq!(
        ids(&daemon.cli(&["get", "members", "-o", "json"])),
        ["self-node", "worker-1", "worker-2"]
    );
    let identity = json_lines(&daemon.cli(&["get", "identities", "-o", "json"]));
    let node_id = identity[0]["spec"]["nodeId"].as_str().unwrap();
    assert_eq!(identity[0]["metadata"]["id"], "local");
    assert_eq!(listed[0]["metadata"]["namespace"], "cluster");
    assert_eq!(listed[0]["metadata"]["type"], "Members.cluster.talos.dev");
    assert_eq!(
        listed[0]["spec"],
        serde_json::json!({
            "nodeId": node_id,
            "addresses": ["10.5.0.10"],
            "hostname": listed[0]["spec"]["hostname"],
            "machineType": "controlplane",
            "operatingSystem": listed[0]["spec"]["operatingSystem"],
            "controlPlane": {"port": 6443},
        })
    );
    assert_eq!(
        listed[1]["spec"],
        serde_json::json!({
            "nodeId": "7x1SuC8Ege5BGXdAfTEff5iQnlWZLfv9h1LGMxA2pYkC",
            "addresses": ["10.5.0.11", "fd83:b1f7:fcb5:2802::11"],
            "hostname": "worker-1.example",
            "machineType": "worker",
            "operatingSystem": "Talos (v1.12.0)",
        })
    );
    assert_eq!(
        ids(&daemon.cli(RAW_AFFILIATES)),
        [
            "static/7x1SuC8Ege5BGXdAfTEff5iQnlWZLfv9h1LGMxA2pYkC",
            "static/NVtfu1bT1QjhNq5xJFUZl8f8I8LOCnnpGrZfPpdN9WlB"
        ]
    );

    // Edit: worker-1 leaves, worker-2 moves, worker-3 joins; one bad entry is skipped.
    let edited = PEERS
        .split("- nodeId: NVtfu")
        .nth(1)
        .map(|rest| format!("- nodeId: NVtfu{rest}"))
        .unwrap()
        .replace("10.5.0.12", "10.5.0.22")
        + &r#"
- nodeId: b3DebkPaCRLTLLWaeRF1ejGaR0lK3m79jRJcPn0mfA6C
  hostname: worker-3.example
  nodename: worker-3
  machineType: worker
  addresses: [10.5.0.13]
- nodeId: broken
  nodename: broken
  addresses: [not-an-ip]
- nodeId: multicast
  nodename: multicast
  addresses: [224.0.0.1]
- nodeId: {node_id}
  nodename: impostor
"#
        .replace("{node_id}", node_id);
    write_peers(daemon.dir.path(), &edited);
    let edited_at = std::time::Instant::now();
    events.wait_for(
        "the edit to reach the members",
        Duration::from_secs(30),
        |line| {
            apply(&mut members, line);
            !members.contains_key("worker-1")
                && members.contains_key("worker-3")
                && members
                    .get("worker-2")
                    .is_some_and(|m| m["addresses"] == serde_json::json!(["10.5.0.22"]))
        },
    );
    // The plugin polls every second; 2 s is the promise, the rest is slack for a
    // loaded machine.
    let took = edited_at.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "the edit took {took:?} to show"
    );
    assert_eq!(
        ids(&daemon.cli(&["get", "members", "-o", "json"])),
        ["self-node", "worker-2", "worker-3"]
    );
    let worker2 = json_lines(&daemon.cli(&["get", "members", "-o", "json"]))
        .into_iter()
        .find(|m| m["metadata"]["id"] == "worker-2")
        .unwrap();
    assert_eq!(worker2["metadata"]["version"], 2, "one update, one version");
    daemon.log.wait_for(
        "the skipped entry to be logged",
        Duration::from_secs(10),
        |l| {
            l.contains(
                r#"entry 2 (nodeId \"broken\"): addresses: invalid IP address \"not-an-ip\""#,
            ) || l
                .contains(r#"entry 2 (nodeId "broken"): addresses: invalid IP address "not-an-ip""#)
        },
    );

    // An entry the plugin accepts but the daemon refuses is named by the plugin;
    // this node's own entry is dropped without a word.
    daemon.log.wait_for(
        "the refused entry to be named",
        Duration::from_secs(10),
        |l| {
            l.contains("the daemon refused entry 3")
                && l.contains("multicast")
                && l.contains("224.0.0.1 is not a node address")
        },
    );
    assert!(!daemon.log.dump().contains("impostor"));

    // The table views match talosctl's columns.
    let header = |args: &[&str]| {
        let table = daemon.cli(args);
        let header = table.lines().next().unwrap_or_default().to_string();
        (
            header
                .split_whitespace()
                .map(String::from)
                .collect::<Vec<_>>(),
            table,
        )
    };
    let (members_header, table) = header(&["get", "members"]);
    assert_eq!(
        members_header,
        [
            "ID",
            "VERSION",
            "HOSTNAME",
            "MACHINE",
            "TYPE",
            "OS",
            "ADDRESSES"
        ]
    );
    assert!(table.contains(r#"["10.5.0.22"]"#), "{table}");
    let (affiliates_header, table) = header(&["get", "affiliates"]);
    assert_eq!(
        affiliates_header,
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
    assert!(table.contains(node_id), "{table}");
    let (identities_header, table) = header(&["get", "identities"]);
    assert_eq!(identities_header, ["ID", "VERSION", "ID"]);
    assert!(table.contains(node_id), "{table}");

    // `-o yaml` is the JSON form as YAML documents.
    let yaml = daemon.cli(&["get", "members", "-o", "yaml"]);
    let documents: Vec<Value> = serde_norway::Deserializer::from_str(&yaml)
        .map(|d| Value::deserialize(d).unwrap())
        .collect();
    assert_eq!(
        documents,
        json_lines(&daemon.cli(&["get", "members", "-o", "json"]))
    );

    // `--config` finds the daemon through its state dir, like `--socket`.
    let by_config = std::process::Command::new(common::BIN)
        .args(["get", "members", "-o", "json", "--config"])
        .arg(&daemon.config)
        .output()
        .unwrap();
    assert!(by_config.status.success());
    assert_eq!(
        ids(&String::from_utf8_lossy(&by_config.stdout)),
        ["self-node", "worker-2", "worker-3"]
    );
    let raw_members = std::process::Command::new(common::BIN)
        .args(["get", "members", "--namespace", "cluster-raw", "--socket"])
        .arg(daemon.socket())
        .output()
        .unwrap();
    assert!(!raw_members.status.success());
    assert!(String::from_utf8_lossy(&raw_members.stderr).contains("holds only affiliates"));
    let plugins = json_lines(&daemon.cli(&["plugins", "-o", "json"]));
    assert_eq!(plugins[0]["name"], "static");
    assert_eq!(plugins[0]["state"], "running");
    assert_eq!(plugins[0]["published"], 2);
    assert_eq!(plugins[0]["healthy"], false, "two entries were skipped");
    assert_eq!(
        plugins[0]["message"], "2 affiliates from /peers/peers.yaml, 2 skipped",
        "this node's own entry is neither published nor skipped"
    );
    let _ = watcher.kill();
    let _ = watcher.wait();
}

/// The identity survives restarts; `reset` makes the next start mint a new one.
#[test]
fn identity_is_kept_across_restarts_until_reset() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("peers")).unwrap();
    write_peers(dir.path(), "[]");
    let config = config(dir.path());
    let daemon = Daemon::start_in(dir, &config);
    let node_id = |d: &Daemon| {
        json_lines(&d.cli(&["get", "identities", "-o", "json"]))[0]["spec"]["nodeId"].clone()
    };
    let first = node_id(&daemon);
    let socket = daemon.socket();
    let (status, dir) = daemon.shutdown();
    assert!(status.success());
    assert!(!socket.exists(), "socket removed on shutdown");

    let daemon = Daemon::start_in(dir, &config);
    assert_eq!(node_id(&daemon), first);
    let log = daemon.log.dump();
    assert!(
        log.lines()
            .any(|l| l.contains("plugin loaded") && l.contains("cached=true")),
        "the restart should load the plugin from the compile cache:\n{log}"
    );
    let reset = |config: &Path| {
        std::process::Command::new(common::BIN)
            .args(["reset", "--config"])
            .arg(config)
            .output()
            .unwrap()
    };
    assert!(
        !reset(&daemon.config).status.success(),
        "reset must refuse while the daemon runs"
    );
    let config_file = daemon.config.clone();
    let (status, dir) = daemon.shutdown();
    assert!(status.success());
    let output = reset(&config_file);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let daemon = Daemon::start_in(dir, &config);
    assert_ne!(node_id(&daemon), first);
}

/// A broken config never starts anything: one error naming the field.
#[test]
fn bad_config_fails_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("not-a-component.wasm"), b"\0asm\x01\0\0\0").unwrap();
    // A plugin built against a future major of our WIT package.
    let wasm = std::fs::read(plugin("static-file")).unwrap();
    let future = replace_all(
        &wasm,
        b"discovery:registry/host@0.1.2",
        b"discovery:registry/host@0.2.0",
    );
    assert_ne!(future, wasm);
    std::fs::write(dir.path().join("future.wasm"), future).unwrap();
    let d = dir.path().display();
    let cases = [
        (
            format!("node: {{stateDir: {d}/s3}}\nplugins: {{future: {{path: {d}/future.wasm}}}}"),
            "plugin was built for discovery:registry@0.2.0; this daemon serves discovery:registry@0.1.2".to_string(),
        ),
        (
            format!(
                "node: {{stateDir: {d}/s4}}\nplugins: {{hang: {{path: {}, limits: {{cpuBudgetMs: 200}}}}}}",
                plugin("fault-describe").display()
            ),
            "plugins.hang:".to_string(),
        ),
        (
            // The plugin checks its own config in `describe`, before anything runs.
            format!(
                "node: {{stateDir: {d}/s5}}\nplugins: {{static: {{path: {}, config: {{pth: /x}}}}}}",
                plugin("static-file").display()
            ),
            "plugins.static.config: unknown field `pth`, expected `path`".to_string(),
        ),
        (
            // A plugin that declares it cannot work without a capability.
            format!(
                "node: {{stateDir: {d}/s6}}\nplugins: {{needy: {{path: {}}}}}",
                plugin("needs-crypto").display()
            ),
            "plugins.needy: the plugin needs the cluster-crypto capability, which is not granted \
             (set plugins.needy.grants.crypto)"
                .to_string(),
        ),
        (
            format!(
                "cluster: {{id: x, secret: 'c2hvcnQ='}}\nnode: {{stateDir: {}/s1}}",
                dir.path().display()
            ),
            "cluster.secret: secret must decode to 32 bytes (AES-256), got 5".to_string(),
        ),
        (
            format!(
                "node: {{stateDir: {d}/s2}}\nplugins: {{bad: {{path: {d}/not-a-component.wasm}}}}",
                d = dir.path().display()
            ),
            "plugins.bad:".to_string(),
        ),
    ];
    for (config, expected) in cases {
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, &config).unwrap();
        let output = std::process::Command::new(common::BIN)
            .args(["run", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success());
        assert!(
            stderr.contains(&expected),
            "want {expected:?} in:\n{stderr}"
        );
        if expected == "plugins.hang:" {
            assert!(stderr.contains("CPU budget exceeded"), "{stderr}");
        }
    }
    assert!(!dir.path().join("s2/discoveryd.sock").exists());
}

fn replace_all(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut i = 0;
    while i < haystack.len() {
        if haystack[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(haystack[i]);
            i += 1;
        }
    }
    out
}

/// Disabling every registry disables discovery: no plugin runs, no affiliate is
/// published, but the identity still shows.
#[test]
fn disabled_registries_disable_discovery() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("peers")).unwrap();
    write_peers(dir.path(), PEERS);
    let config = config(dir.path()).replace("static: {}", "static: {disabled: true}");
    let daemon = Daemon::start_in(dir, &config);
    assert_eq!(
        json_lines(&daemon.cli(&["get", "identities", "-o", "json"])).len(),
        1
    );
    assert!(daemon.cli(&["get", "affiliates", "-o", "json"]).is_empty());
    assert!(daemon.cli(&["get", "members", "-o", "json"]).is_empty());
    let plugins = json_lines(&daemon.cli(&["plugins", "-o", "json"]));
    assert_eq!(plugins[0]["state"], "disabled");
}

/// A plugin built against WIT 0.1.0 (static-file as it was built before 0.1.1
/// added gRPC, kept in `tests/fixtures`) still loads and works; and with no
/// `path`, `static` is the built-in plugin.
#[test]
fn a_plugin_built_for_wit_0_1_0_keeps_loading_and_static_is_built_in() {
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/static-file-v0.1.0.wasm");
    let wasm = std::fs::read(&fixture).unwrap();
    let needle = b"discovery:registry/host@0.1.0";
    assert!(
        wasm.windows(needle.len()).any(|w| w == needle),
        "the fixture imports host@0.1.0"
    );
    for path in [Some(fixture), None] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("peers")).unwrap();
        write_peers(dir.path(), PEERS);
        let mut text = config(dir.path());
        let built = format!("    path: {}\n", plugin("static-file").display());
        text = match &path {
            Some(old) => text.replace(&built, &format!("    path: {}\n", old.display())),
            None => text.replace(&built, ""),
        };
        let daemon = Daemon::start_in(dir, &text);
        daemon.wait_members(
            &["self-node", "worker-1", "worker-2"],
            Duration::from_secs(30),
        );
        let plugins = json_lines(&daemon.cli(&["plugins", "-o", "json"]));
        assert_eq!(plugins[0]["restarts"], 0, "{path:?}: {plugins:?}");
    }
}
