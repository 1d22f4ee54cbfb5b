//! Nodes find each other through a discovery service: real `discoveryd`
//! daemons with the built-in service plugin, and our real `discovery-service`
//! binary, on loopback. Each daemon's config is a stock Talos block
//! (`registries: {service: {endpoint: ...}}`, no `plugins:` entry).

mod common;

use std::time::{Duration, Instant};

use common::{Daemon, SECRET, Service, json, json_lines};

/// A node's config: the Talos layout with one service registry; `extra` is
/// appended (more YAML for `node:` siblings, or whole documents).
fn node_config(n: u8, endpoint: &str, extra: &str) -> String {
    format!(
        "cluster:\n  id: e2e-cluster\n  secret: {SECRET}\n  discovery:\n    registries:\n      \
         service: {{endpoint: \"{endpoint}\"}}\n\
         node: {{stateDir: state, nodename: node-{n}, addresses: [127.0.0.{n}]}}\n{extra}"
    )
}

fn start_nodes(count: u8, endpoint: &str, extra: &str) -> Vec<Daemon> {
    (1..=count)
        .map(|n| Daemon::start(&node_config(n, endpoint, extra)))
        .collect()
}

fn names(count: u8) -> Vec<String> {
    (1..=count).map(|n| format!("node-{n}")).collect()
}

fn service_status(daemon: &Daemon) -> serde_json::Value {
    json_lines(&daemon.cli(&["plugins", "-o", "json"]))
        .into_iter()
        .find(|p| p["name"] == "service")
        .expect("the service plugin is listed")
}

#[test]
fn three_daemons_find_each_other_within_5_s() {
    let service = Service::start(&[]);
    let nodes = start_nodes(3, &service.endpoint(), "");
    let all = names(3);
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    for node in &nodes {
        let took = node.wait_members(&all, Duration::from_secs(5));
        eprintln!("converged after {took:?}");
    }
    // The built-in plugin was used, with the crypto grant and its endpoint.
    let status = service_status(&nodes[0]);
    assert_eq!(status["state"], "running", "{status}");
    assert_eq!(status["restarts"], 0, "{status}");
    assert_eq!(status["publicAddress"], "127.0.0.1", "{status}");
    // And as Talos's AddressStatus `cluster/service`.
    let addresses = json_lines(&nodes[0].cli(&["get", "addresses", "-o", "json"]));
    assert_eq!(addresses.len(), 1, "{addresses:?}");
    assert_eq!(addresses[0]["metadata"]["id"], "service");
    assert_eq!(addresses[0]["spec"]["address"], "127.0.0.1/32");
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .starts_with("2 peers; 1/1 services synced"),
        "{status}"
    );
    // Raw affiliates are service/<node-id>, keyed by the sealed node ID.
    let raw = json_lines(&nodes[0].cli(common::RAW_AFFILIATES));
    assert_eq!(raw.len(), 2);
    for affiliate in &raw {
        let id = affiliate["metadata"]["id"].as_str().unwrap();
        assert_eq!(
            id,
            format!("service/{}", affiliate["spec"]["nodeId"].as_str().unwrap())
        );
    }
}

#[test]
fn a_node_that_leaves_is_gone_from_the_others_within_2_s() {
    let service = Service::start(&[]);
    let mut nodes = start_nodes(3, &service.endpoint(), "");
    for node in &nodes {
        node.wait_members(&["node-1", "node-2", "node-3"], Duration::from_secs(10));
    }
    let leaving = nodes.pop().unwrap();
    let (mut watcher, events) = nodes[0].cli_stream(&["get", "members", "-o", "json", "-w"]);
    // The watch has started once it lists node-3; only then can it see it go.
    events.wait_for(
        "the watch to list node-3",
        Duration::from_secs(10),
        |line| json(line)["metadata"]["id"] == "node-3",
    );
    let asked = Instant::now();
    leaving.cli(&["leave"]);
    events.wait_for("node-3 to go", Duration::from_secs(2), |line| {
        let event = json(line);
        event["metadata"]["id"] == "node-3" && event["event"] == "destroyed"
    });
    eprintln!("gone from node-1 after {:?}", asked.elapsed());
    let _ = watcher.kill();
    let _ = watcher.wait();
    nodes[1].wait_members(&["node-1", "node-2"], Duration::from_secs(2));
    leaving
        .log
        .wait_for("the daemon to stop", Duration::from_secs(10), |l| {
            l.contains("stopped")
        });
}

/// A node that dies without leaving stays until its affiliate's TTL runs out on
/// the service (2 s here, with a 1 s GC), then disappears from the others.
#[test]
fn a_killed_node_is_gone_after_its_ttl() {
    let service = Service::start(&["--gc-interval", "1s"]);
    let short_ttl = "plugins:\n  service:\n    config: {ttlSeconds: 2}\n";
    let mut nodes = start_nodes(2, &service.endpoint(), short_ttl);
    nodes[0].wait_members(&["node-1", "node-2"], Duration::from_secs(10));
    let killed = Instant::now();
    nodes[1].kill();
    nodes[0].wait_members(&["node-1"], Duration::from_secs(10));
    let gone = killed.elapsed();
    eprintln!("gone after {gone:?}");
    assert!(
        gone >= Duration::from_secs(1),
        "gone before its TTL: {gone:?}"
    );
}

/// A reboot is not a departure: SIGTERM and a restart never drop the node from
/// the others' members.
#[test]
fn a_restart_does_not_flap_membership() {
    let service = Service::start(&[]);
    let mut nodes = start_nodes(2, &service.endpoint(), "");
    nodes[0].wait_members(&["node-1", "node-2"], Duration::from_secs(10));
    let (mut watcher, events) = nodes[0].cli_stream(&["get", "members", "-o", "json", "-w"]);
    let restarted = nodes.pop().unwrap();
    let (status, dir) = restarted.shutdown();
    assert!(status.success());
    let config = std::fs::read_to_string(dir.path().join("config.yaml")).unwrap();
    let again = Daemon::start_in(dir, &config);
    again.wait_members(&["node-1", "node-2"], Duration::from_secs(10));
    let status = service_status(&again);
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains("1/1 services synced"),
        "{status}"
    );
    // Every event node-1 saw: the two members at first, nothing destroyed.
    let _ = watcher.kill();
    let _ = watcher.wait();
    let seen = events.seen.lock().unwrap().clone();
    assert!(
        seen.iter().all(|l| json(l)["event"] != "destroyed"),
        "membership flapped: {seen:#?}"
    );
}

/// The service's state survives its restart (snapshot); the daemons reconnect
/// on their own, members never drop, and a node that joins afterwards sees the
/// others at once.
#[test]
fn a_service_restart_with_its_snapshot_keeps_the_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let snapshot = dir.path().join("state.binpb");
    let snapshot_args = [
        "--snapshot-path",
        snapshot.to_str().unwrap(),
        "--snapshot-interval",
        "1h",
    ];
    let mut service = Service::start(&snapshot_args);
    let addr = service.addr.to_string();
    let endpoint = service.endpoint();
    let nodes = start_nodes(2, &endpoint, "");
    nodes[0].wait_members(&["node-1", "node-2"], Duration::from_secs(10));
    let (mut watcher, events) = nodes[0].cli_stream(&["get", "members", "-o", "json", "-w"]);
    service.stop();
    assert!(snapshot.is_file(), "the final save wrote the snapshot");
    let _restarted = Service::start_on(&addr, &snapshot_args);
    let third = Daemon::start(&node_config(3, &endpoint, ""));
    third.wait_members(&["node-1", "node-2", "node-3"], Duration::from_secs(10));
    nodes[0].wait_members(&["node-1", "node-2", "node-3"], Duration::from_secs(10));
    let _ = watcher.kill();
    let _ = watcher.wait();
    let seen = events.seen.lock().unwrap().clone();
    assert!(
        seen.iter().all(|l| json(l)["event"] != "destroyed"),
        "a member dropped while the service restarted: {seen:#?}"
    );
}

/// A service that redirects sends the daemons to another one, where they
/// converge; the redirect target must be granted like any endpoint.
#[test]
fn a_redirect_moves_the_daemons_to_the_granted_service() {
    let second = Service::start(&[]);
    let target = second.addr.to_string();
    let mut first = Service::start(&["--redirect-endpoint", &target]);
    let granted = format!(
        "plugins:\n  service:\n    grants: {{endpoints: [\"{}\"]}}\n",
        second.endpoint()
    );
    let nodes = start_nodes(2, &first.endpoint(), &granted);
    nodes[0].wait_members(&["node-1", "node-2"], Duration::from_secs(10));
    nodes[0]
        .log
        .wait_for("the redirect", Duration::from_secs(10), |l| {
            l.contains("redirected to") && l.contains(&target)
        });
    // They are on the second service: with the first gone, a node that only
    // knows the second sees them.
    first.stop();
    let third = Daemon::start(&node_config(3, &second.endpoint(), ""));
    third.wait_members(&["node-1", "node-2", "node-3"], Duration::from_secs(10));

    // Without the grant the redirect is refused, naming the endpoint, and the
    // plugin stays on the service it was given.
    let third_service = Service::start(&["--redirect-endpoint", &target]);
    let lone = Daemon::start(&node_config(4, &third_service.endpoint(), ""));
    lone.log
        .wait_for("the refused redirect", Duration::from_secs(10), |l| {
            l.contains("not following the redirect")
                && l.contains(&format!(
                    "endpoint http://{target} is not granted to plugin service"
                ))
        });
}

/// Two discovery services (DiscoveryServiceConfig documents), one of them down:
/// the members stay complete through the other.
#[test]
fn two_services_one_down_keep_members_complete() {
    let up = Service::start(&[]);
    let down = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down_endpoint = format!("http://{}", down.local_addr().unwrap());
    drop(down);
    let documents = |n: u8| {
        format!(
            "cluster: {{id: e2e-cluster, secret: {SECRET}}}\n\
             node: {{stateDir: state, nodename: node-{n}, addresses: [127.0.0.{n}]}}\n\
             ---\napiVersion: v1alpha1\nkind: DiscoveryServiceConfig\nname: b-down\nendpoint: {down_endpoint}\n\
             ---\napiVersion: v1alpha1\nkind: DiscoveryServiceConfig\nname: a-up\nendpoint: {}\n",
            up.endpoint()
        )
    };
    let nodes: Vec<Daemon> = (1..=2).map(|n| Daemon::start(&documents(n))).collect();
    for node in &nodes {
        node.wait_members(&["node-1", "node-2"], Duration::from_secs(10));
    }
    let (mut watcher, updates) = nodes[0].cli_stream(&["plugins", "-o", "json", "-w"]);
    updates.wait_for(
        "the down service's error",
        Duration::from_secs(10),
        |line| {
            let p = json(line);
            p["name"] == "service"
                && p["message"].as_str().is_some_and(|m| {
                    m.contains("1/2 services synced") && m.contains("b-down: hello failed")
                })
        },
    );
    let _ = watcher.kill();
    let _ = watcher.wait();
}

/// Same cluster ID, another secret: that node sees nobody and nobody sees it,
/// and both sides log why, naming the affiliate.
#[test]
fn a_node_with_the_wrong_secret_is_not_shown_and_both_sides_say_why() {
    let service = Service::start(&[]);
    let nodes = start_nodes(2, &service.endpoint(), "");
    nodes[0].wait_members(&["node-1", "node-2"], Duration::from_secs(10));
    let wrong = node_config(3, &service.endpoint(), "")
        .replace(SECRET, "Ynl0ZXMgb2YgYW5vdGhlciBjbHVzdGVyIHNlY3JldCE=");
    let stranger = Daemon::start(&wrong);
    let stranger_id = json(&stranger.cli(&["get", "identities", "-o", "json"]))["spec"]["nodeId"]
        .as_str()
        .unwrap()
        .to_string();
    nodes[0]
        .log
        .wait_for("the decryption failure", Duration::from_secs(10), |l| {
            l.contains(&format!("affiliate {stranger_id:?}: decryption failure"))
        });
    stranger.log.wait_for(
        "the stranger's decryption failures",
        Duration::from_secs(10),
        |l| l.contains("decryption failure"),
    );
    assert_eq!(
        common::ids(&nodes[0].cli(&["get", "members", "-o", "json"])),
        ["node-1", "node-2"]
    );
    assert_eq!(
        common::ids(&stranger.cli(&["get", "members", "-o", "json"])),
        ["node-3"]
    );
    let status = service_status(&stranger);
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains("entries skipped"),
        "{status}"
    );
}

/// TLS with a self-signed certificate: with its CA granted the plugin connects;
/// without it the connection fails with a clear status, and the other plugins
/// carry on.
#[test]
fn tls_works_with_the_granted_ca_and_fails_clearly_without() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.path().join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), cert.key_pair.serialize_pem()).unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    let service = Service::start(&[
        "--certificate-path",
        cert_path.to_str().unwrap(),
        "--key-path",
        key_path.to_str().unwrap(),
    ]);
    let endpoint = format!("https://localhost:{}", service.addr.port());
    let with_ca = format!(
        "plugins:\n  service:\n    grants: {{caFile: {}}}\n",
        cert_path.display()
    );
    let nodes = start_nodes(2, &endpoint, &with_ca);
    nodes[0].wait_members(&["node-1", "node-2"], Duration::from_secs(10));

    // Without the CA, and beside a static-file plugin that must not notice.
    let peers = tempfile::tempdir().unwrap();
    std::fs::write(
        peers.path().join("peers.yaml"),
        "- {nodeId: static-peer, nodename: static-peer, addresses: [10.9.0.1]}\n",
    )
    .unwrap();
    let without_ca = format!(
        "plugins:\n  static:\n    config: {{path: /peers/peers.yaml}}\n    \
         grants: {{files: [{{host: {}, guest: /peers}}]}}\n",
        peers.path().display()
    );
    let mut config = node_config(3, &endpoint, &without_ca);
    config = config.replace("      service:", "      static: {}\n      service:");
    let untrusting = Daemon::start(&config);
    untrusting.wait_members(&["node-3", "static-peer"], Duration::from_secs(10));
    let (mut watcher, updates) = untrusting.cli_stream(&["plugins", "-o", "json", "-w"]);
    let line = updates.wait_for("the TLS failure", Duration::from_secs(15), |line| {
        let p = json(line);
        p["name"] == "service"
            && p["message"]
                .as_str()
                .is_some_and(|m| m.contains("hello failed"))
    });
    let _ = watcher.kill();
    let _ = watcher.wait();
    let message = json(&line)["message"].as_str().unwrap().to_string();
    assert!(
        message.to_lowercase().contains("certificate") || message.contains("UnknownIssuer"),
        "{message}"
    );
    let status = service_status(&untrusting);
    assert_eq!(
        status["restarts"], 0,
        "a refused handshake is not a crash: {status}"
    );
}

/// Servers that hang, reset connections or answer with garbage never crash the
/// daemon: the plugin keeps running, says what is wrong, and members stay
/// complete through the working service. The hung server keeps a Hello open for
/// its whole 10 s deadline: the plugin waits for it in `next-event`, idle, so its
/// 1 s CPU budget does not trip (no restart).
#[test]
fn broken_servers_do_not_crash_the_daemon() {
    use std::io::Write;
    let good = Service::start(&[]);
    let hang = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let reset = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let garbage = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoints = [
        ("hang", hang.local_addr().unwrap()),
        ("reset", reset.local_addr().unwrap()),
        ("garbage", garbage.local_addr().unwrap()),
    ];
    // Hang: accept and hold every connection. Reset: accept and drop. Garbage:
    // answer with bytes that are not HTTP/2.
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = held.clone();
    std::thread::spawn(move || {
        for stream in hang.incoming().flatten() {
            keep.lock().unwrap().push(stream);
        }
    });
    std::thread::spawn(move || for _ in reset.incoming() {});
    std::thread::spawn(move || {
        for mut stream in garbage.incoming().flatten() {
            let _ = stream.write_all(&[0xde, 0xad, 0xbe, 0xef].repeat(4096));
        }
    });
    let documents = |n: u8| {
        let mut config = format!(
            "cluster: {{id: e2e-cluster, secret: {SECRET}}}\n\
             node: {{stateDir: state, nodename: node-{n}, addresses: [127.0.0.{n}]}}\n\
             ---\nkind: DiscoveryServiceConfig\nname: good\nendpoint: {}\n",
            good.endpoint()
        );
        for (name, addr) in endpoints {
            config.push_str(&format!(
                "---\nkind: DiscoveryServiceConfig\nname: {name}\nendpoint: http://{addr}\n"
            ));
        }
        config
    };
    let nodes: Vec<Daemon> = (1..=2).map(|n| Daemon::start(&documents(n))).collect();
    nodes[0].wait_members(&["node-1", "node-2"], Duration::from_secs(10));
    let (mut watcher, updates) = nodes[0].cli_stream(&["plugins", "-o", "json", "-w"]);
    // The hung server is only noticed at the Hello deadline (10 s).
    updates.wait_for(
        "every broken server to be reported",
        Duration::from_secs(30),
        |line| {
            let p = json(line);
            let message = p["message"].as_str().unwrap_or("");
            p["name"] == "service"
                && [
                    "garbage: hello failed",
                    "hang: hello failed",
                    "reset: hello failed",
                ]
                .iter()
                .all(|m| message.contains(m))
        },
    );
    let _ = watcher.kill();
    let _ = watcher.wait();
    let status = service_status(&nodes[0]);
    assert_eq!(status["restarts"], 0, "{status}");
    assert_eq!(status["state"], "running", "{status}");
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains("1/4 services synced"),
        "{status}"
    );
    nodes[0].wait_members(&["node-1", "node-2"], Duration::from_secs(5));
}

/// A node reinstalled with a new identity and the same nodename, while its old
/// identity lingers on the service until its TTL: the member is the new one (the
/// identity first seen most recently), with a `duplicate nodename` warning, and
/// `get affiliates` shows which registry saw each identity.
#[test]
fn a_reinstalled_node_replaces_its_lingering_old_identity() {
    let service = Service::start(&[]);
    let nodes = start_nodes(2, &service.endpoint(), "");
    nodes[0].wait_members(&["node-1", "node-2"], Duration::from_secs(10));
    let id = |daemon: &Daemon| {
        json(&daemon.cli(&["get", "identities", "-o", "json"]))["spec"]["nodeId"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let mut nodes = nodes.into_iter();
    let (first, mut second) = (nodes.next().unwrap(), nodes.next().unwrap());
    let old_id = id(&second);
    // The reinstall: the machine dies (its affiliate stays on the service for
    // its 30 min TTL), its disk is wiped, it comes back under the same name.
    second.kill();
    let (_, dir) = second.shutdown();
    let config = std::fs::read_to_string(dir.path().join("config.yaml")).unwrap();
    let reset = std::process::Command::new(common::BIN)
        .args(["reset", "--config"])
        .arg(dir.path().join("config.yaml"))
        .output()
        .unwrap();
    assert!(reset.status.success(), "{reset:?}");
    let reinstalled = Daemon::start_in(dir, &config);
    let new_id = id(&reinstalled);
    assert_ne!(old_id, new_id);
    let (mut watcher, events) = first.cli_stream(&["get", "members", "-o", "json", "-w"]);
    events.wait_for(
        "node-2 to be the new identity",
        Duration::from_secs(10),
        |line| {
            let event = json(line);
            event["metadata"]["id"] == "node-2" && event["spec"]["nodeId"] == new_id.as_str()
        },
    );
    let _ = watcher.kill();
    let _ = watcher.wait();
    first
        .log
        .wait_for("the duplicate warning", Duration::from_secs(10), |l| {
            l.contains("duplicate nodename") && l.contains("node-2")
        });
    // Both identities are still affiliates, each seen by the service.
    let affiliates = json_lines(&first.cli(&["get", "affiliates", "-o", "json"]));
    for node_id in [&old_id, &new_id] {
        let affiliate = affiliates
            .iter()
            .find(|a| a["spec"]["nodeId"] == node_id.as_str())
            .unwrap_or_else(|| panic!("{node_id} in {affiliates:?}"));
        assert_eq!(
            affiliate["sources"][0]["registry"], "service",
            "{affiliate}"
        );
        assert!(
            affiliate["sources"][0]["firstSeen"].is_string(),
            "{affiliate}"
        );
    }
}
