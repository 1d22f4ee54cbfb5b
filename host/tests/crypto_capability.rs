//! Plugins seal and open through the host (`cluster-crypto`), never holding the
//! key: a probe plugin compiled to wasm reports what the host gave it, and the
//! test checks that against its own AES with the configured secret.

mod common;

use std::time::Duration;

use common::{Daemon, RAW_AFFILIATES, SECRET, json, plugin};
use discoveryd::crypto::ClusterKey;

fn probe_result(cluster: &str) -> serde_json::Value {
    let config = format!(
        "{cluster}\nnode: {{stateDir: state, nodename: self-node, addresses: [10.1.0.1]}}\nplugins: {{probe: {{path: {}}}}}\n",
        plugin("crypto-probe").display()
    );
    let daemon = Daemon::start(&config);
    let (mut watcher, events) = daemon.cli_stream(&[RAW_AFFILIATES, &["-w"]].concat());
    let line = events.wait_for("the probe's report", Duration::from_secs(30), |line| {
        json(line)["metadata"]["id"] == "probe/probe-peer"
    });
    let _ = watcher.kill();
    let _ = watcher.wait();
    json(&line)["spec"].clone()
}

#[test]
fn plugins_seal_and_open_with_the_cluster_key_held_by_the_host() {
    let report = probe_result(&format!("cluster: {{id: probe-cluster, secret: {SECRET}}}"));
    assert_eq!(report["operatingSystem"], "ok", "{report}");
    assert_eq!(report["hostname"], "probe-cluster");
    // The sealed endpoint is exactly what Sidero's client makes with this key.
    let key = ClusterKey::from_secret(SECRET).unwrap();
    let expected = hex::encode(key.seal_endpoint("192.168.3.4:51820".parse().unwrap()));
    assert_eq!(report["nodename"], expected.as_str());
}

#[test]
fn without_a_cluster_identity_crypto_fails_cleanly() {
    let report = probe_result("");
    assert_eq!(report["hostname"], "", "no cluster ID to report");
    let verdict = report["operatingSystem"].as_str().unwrap();
    assert!(
        verdict.contains("no cluster identity is configured"),
        "{verdict}"
    );
}
