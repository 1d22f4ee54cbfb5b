//! Plugins seal and open through the host (`cluster-crypto`), never holding the
//! key: a probe plugin compiled to wasm reports what the host gave it, and the
//! test checks that against its own AES with the configured secret. The
//! capability is a grant: without it every call fails with an error naming it.

mod common;

use std::time::Duration;

use common::{Daemon, RAW_AFFILIATES, SECRET, json, plugin};
use discoveryd::crypto::ClusterKey;

fn probe_result(cluster: &str, granted: bool) -> serde_json::Value {
    probe_run(cluster, granted).1
}

/// Runs the probe; returns the daemon (to read its log) and the probe's report.
fn probe_run(cluster: &str, granted: bool) -> (Daemon, serde_json::Value) {
    let config = format!(
        "{cluster}\nnode: {{stateDir: state, nodename: self-node, addresses: [10.1.0.1]}}\n\
         plugins: {{probe: {{path: {}, grants: {{crypto: {granted}}}}}}}\n",
        plugin("crypto-probe").display()
    );
    let daemon = Daemon::start(&config);
    let (mut watcher, events) = daemon.cli_stream(&[RAW_AFFILIATES, &["-w"]].concat());
    let line = events.wait_for("the probe's report", Duration::from_secs(30), |line| {
        json(line)["metadata"]["id"] == "probe/probe-peer"
    });
    let _ = watcher.kill();
    let _ = watcher.wait();
    let report = json(&line)["spec"].clone();
    (daemon, report)
}

#[test]
fn plugins_seal_and_open_with_the_cluster_key_held_by_the_host() {
    let report = probe_result(
        &format!("cluster: {{id: probe-cluster, secret: {SECRET}}}"),
        true,
    );
    assert_eq!(report["operatingSystem"], "ok", "{report}");
    assert_eq!(report["hostname"], "probe-cluster");
    // The sealed endpoint is exactly what Sidero's client makes with this key.
    let key = ClusterKey::from_secret(SECRET).unwrap();
    let expected = hex::encode(key.seal_endpoint("192.168.3.4:51820".parse().unwrap()));
    assert_eq!(report["nodename"], expected.as_str());
}

#[test]
fn without_a_cluster_identity_crypto_fails_cleanly() {
    let report = probe_result("", true);
    assert_eq!(report["hostname"], "", "no cluster ID to report");
    let verdict = report["operatingSystem"].as_str().unwrap();
    assert!(
        verdict.contains("no cluster identity is configured"),
        "{verdict}"
    );
}

#[test]
fn without_the_grant_every_call_fails_naming_the_capability() {
    let (daemon, report) = probe_run(
        &format!("cluster: {{id: probe-cluster, secret: {SECRET}}}"),
        false,
    );
    assert_eq!(
        report["hostname"], "",
        "the cluster ID is part of the grant"
    );
    let verdict = report["operatingSystem"].as_str().unwrap();
    assert!(
        verdict.contains(
            "capability cluster-crypto is not granted to plugin probe (plugins.probe.grants.crypto)"
        ),
        "{verdict}"
    );
    // The daemon says once which plugin asked for what (possibly before it said it
    // was running, which starting it waited for).
    daemon
        .log
        .wait_logged("the denial in the log", Duration::from_secs(10), |l| {
            l.contains("plugin called a capability it was not granted") && l.contains("probe")
        });
    let denials = daemon
        .log
        .dump()
        .lines()
        .filter(|l| l.contains("not granted"))
        .count();
    assert_eq!(denials, 1, "{}", daemon.log.dump());
}
