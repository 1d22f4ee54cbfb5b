//! Nodes find each other through Kubernetes Node annotations: real `discoveryd`
//! daemons with the built-in kubernetes plugin, against
//! [`fake_kube_apiserver`], a **fake** Kubernetes API server (no real API server
//! can run on these machines). The fake serves core/v1 Nodes over HTTPS as
//! kube-apiserver 1.32 does (list, watch with resourceVersion, bookmarks and
//! 410 Gone, merge patches, RBAC and Node-authorizer refusals) and is itself
//! checked with kubectl and the `kube` crate in `tests/fake-kube`. The Talos
//! node in these tests is the annotations Talos writes (reference §9.5), set
//! on a Node by the test.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Child;
use std::time::Duration;

use common::{Daemon, Lines, RAW_AFFILIATES, SECRET, Service, json, json_lines};
use fake_kube_apiserver::{AuthMode, FakeApiServer, FakeOptions, NodeBuilder, Verb};
use serde_json::Value;

/// The eight keys Talos writes on its Node (reference §9.5).
const TALOS_KEYS: [&str; 8] = [
    "cluster.talos.dev/node-id",
    "networking.talos.dev/self-ips",
    "networking.talos.dev/api-server-port",
    "networking.talos.dev/kubespan-ip",
    "networking.talos.dev/kubespan-public-key",
    "networking.talos.dev/assigned-prefixes",
    "networking.talos.dev/kubespan-endpoints",
    "networking.talos.dev/kubespan-exclude-advertised-networks",
];

/// How long a watch may take to come back after the API returns: kube's
/// default watcher backoff grows to 30 s between attempts.
const RESUME: Duration = Duration::from_secs(60);

/// A fake API server with a Node for each of our daemons (`node-<n>`, as the
/// kubelet would have registered it) and its kubeconfig in `dir`.
fn fake_with_nodes(count: u8, dir: &Path) -> (FakeApiServer, String) {
    let fake = FakeApiServer::start_blocking(FakeOptions::default());
    for n in 1..=count {
        fake.put_node(
            NodeBuilder::new(format!("node-{n}"))
                .internal_ip(format!("127.0.0.{n}"))
                .hostname(format!("k8s-host-{n}"))
                .os_image("Talos (v1.9.0)"),
        );
    }
    let kubeconfig = dir.join("kubeconfig");
    fake.write_kubeconfig(&kubeconfig).unwrap();
    (fake, kubeconfig.to_str().unwrap().to_string())
}

/// A node's config: the kubernetes registry with the granted kubeconfig, and
/// the service registry too when `service` is given.
fn node_config(n: u8, kubeconfig: &str, service: Option<&str>) -> String {
    let service = service
        .map(|endpoint| format!("      service: {{endpoint: \"{endpoint}\"}}\n"))
        .unwrap_or_default();
    format!(
        "cluster:\n  id: k8s-cluster\n  secret: {SECRET}\n  discovery:\n    registries:\n      \
         kubernetes: {{}}\n{service}\
         node: {{stateDir: state, nodename: node-{n}, hostname: daemon-host-{n}, \
         addresses: [127.0.0.{n}]}}\n\
         plugins:\n  kubernetes:\n    grants: {{kubeconfig: \"{kubeconfig}\"}}\n"
    )
}

fn kubernetes_status(daemon: &Daemon) -> Value {
    json_lines(&daemon.cli(&["plugins", "-o", "json"]))
        .into_iter()
        .find(|p| p["name"] == "kubernetes")
        .expect("the kubernetes plugin is listed")
}

/// Follows `plugins -w` until the kubernetes plugin's status satisfies `done`.
fn wait_kubernetes_status(
    daemon: &Daemon,
    what: &str,
    timeout: Duration,
    mut done: impl FnMut(&Value) -> bool,
) -> Value {
    let (mut watcher, updates): (Child, Lines) =
        daemon.cli_stream(&["plugins", "-o", "json", "-w"]);
    let mut last = Value::Null;
    updates.wait_for(what, timeout, |line| {
        let status = json(line);
        if status["name"] != "kubernetes" {
            return false;
        }
        last = status;
        done(&last)
    });
    let _ = watcher.kill();
    let _ = watcher.wait();
    last
}

/// Follows the raw affiliates until `done` holds for the whole set.
fn wait_raw(
    daemon: &Daemon,
    what: &str,
    timeout: Duration,
    mut done: impl FnMut(&BTreeMap<String, Value>) -> bool,
) -> BTreeMap<String, Value> {
    let (mut watcher, events) = daemon.cli_stream(&[RAW_AFFILIATES, &["-w"]].concat());
    let mut raw = BTreeMap::new();
    events.wait_for(what, timeout, |line| {
        let event = json(line);
        let id = event["metadata"]["id"].as_str().unwrap().to_string();
        if event["event"] == "destroyed" {
            raw.remove(&id);
        } else {
            raw.insert(id, event["spec"].clone());
        }
        done(&raw)
    });
    let _ = watcher.kill();
    let _ = watcher.wait();
    raw
}

fn annotations(fake: &FakeApiServer, node: &str) -> BTreeMap<String, String> {
    let node = fake.node(node).expect("the Node exists");
    node["metadata"]["annotations"]
        .as_object()
        .map(|map| {
            map.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn two_daemons_find_each_other_through_node_annotations() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, kubeconfig) = fake_with_nodes(2, dir.path());
    // Something else's annotation on our Node must survive our patches.
    fake.patch_annotations("node-1", &[("example.com/owner", Some("ops"))]);
    let nodes: Vec<Daemon> = (1..=2)
        .map(|n| Daemon::start(&node_config(n, &kubeconfig, None)))
        .collect();
    for node in &nodes {
        node.wait_members(&["node-1", "node-2"], Duration::from_secs(20));
    }

    // Each daemon wrote its affiliate on its own Node, as Talos does.
    let written = annotations(&fake, "node-1");
    let identity = json_lines(&nodes[0].cli(&["get", "identities", "-o", "json"]));
    let node_id = identity[0]["spec"]["nodeId"].as_str().unwrap();
    assert_eq!(written["cluster.talos.dev/node-id"], node_id, "{written:?}");
    assert_eq!(written["networking.talos.dev/self-ips"], "127.0.0.1");
    assert_eq!(written["example.com/owner"], "ops", "{written:?}");
    // Only this registry's keys were ever patched, and only annotations.
    for patch in fake.patches() {
        let body = json(&patch.body);
        let metadata = body["metadata"].as_object().expect("a metadata patch");
        assert_eq!(
            metadata.keys().collect::<Vec<_>>(),
            ["annotations"],
            "{body}"
        );
        for key in body["metadata"]["annotations"].as_object().unwrap().keys() {
            assert!(TALOS_KEYS.contains(&key.as_str()), "patched {key}: {body}");
        }
        assert!(body.as_object().unwrap().len() == 1, "{body}");
    }

    // node-1 sees node-2 as k8s/<node-2's ID>, with §9.6's mapping.
    let raw = json_lines(&nodes[0].cli(RAW_AFFILIATES));
    assert_eq!(raw.len(), 1, "{raw:?}");
    let spec = &raw[0]["spec"];
    let node2_id = annotations(&fake, "node-2")["cluster.talos.dev/node-id"].clone();
    assert_eq!(raw[0]["metadata"]["id"], format!("k8s/{node2_id}"));
    assert_eq!(spec["nodename"], "node-2");
    assert_eq!(spec["hostname"], "k8s-host-2", "from status.addresses");
    assert_eq!(spec["operatingSystem"], "Talos (v1.9.0)", "from osImage");
    assert_eq!(spec["machineType"], "worker", "no control-plane label");
    assert_eq!(spec["addresses"], serde_json::json!(["127.0.0.2"]));

    let status = kubernetes_status(&nodes[0]);
    assert_eq!(status["state"], "running", "{status}");
    assert_eq!(status["healthy"], true, "{status}");
    assert_eq!(status["message"], "1 peers from 2 Nodes", "{status}");
}

/// A restart with the same settings sends nothing (the Node already says it
/// all); one with a new address patches only `self-ips`.
#[test]
fn patches_carry_only_what_differs() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, kubeconfig) = fake_with_nodes(1, dir.path());
    let daemon = Daemon::start(&node_config(1, &kubeconfig, None));
    fake.wait_for(Duration::from_secs(20), |o| {
        o.patches.iter().any(|p| p.name == "node-1")
    })
    .expect("the first patch");
    let (status, state) = daemon.shutdown();
    assert!(status.success());
    fake.clear_records();

    // Same settings: the daemon reads its Node and sends nothing. Its leave
    // (all keys deleted) is then the first patch the fake sees; the plugin
    // handles one event at a time, so a needless patch would come before it.
    let config = std::fs::read_to_string(state.path().join("config.yaml")).unwrap();
    let daemon = Daemon::start_in(state, &config);
    wait_kubernetes_status(&daemon, "the watch to sync", Duration::from_secs(20), |s| {
        s["healthy"] == true
    });
    fake.wait_for(Duration::from_secs(20), |o| {
        o.requests
            .iter()
            .any(|r| r.method == "GET" && r.path == "/api/v1/nodes/node-1")
    })
    .expect("the daemon reads its own Node");
    daemon.cli(&["leave"]);
    let seen = fake
        .wait_for(Duration::from_secs(10), |o| !o.patches.is_empty())
        .expect("the leave's patch");
    let first = &json(&seen.patches[0].body)["metadata"]["annotations"];
    let deleted: Vec<&str> = first
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, value)| value.is_null())
        .map(|(key, _)| key.as_str())
        .collect();
    assert_eq!(
        (deleted.len(), first.as_object().unwrap().len()),
        (TALOS_KEYS.len(), TALOS_KEYS.len()),
        "the first patch after a restart is the leave, deleting every key: {first}"
    );
    let (_, state) = daemon.shutdown();
    assert!(
        !annotations(&fake, "node-1").contains_key("cluster.talos.dev/node-id"),
        "leave removed the annotations"
    );

    // A new address: one patch, sent to restore everything the leave removed.
    // Then another restart with one more address patches only self-ips.
    let daemon = Daemon::start_in(state, &config);
    fake.wait_for(Duration::from_secs(20), |o| o.patches.len() >= 2)
        .expect("the annotations are written again");
    let (_, state) = daemon.shutdown();
    fake.clear_records();
    let config = config.replace(
        "addresses: [127.0.0.1]",
        "addresses: [127.0.0.1, 127.0.0.11]",
    );
    let _daemon = Daemon::start_in(state, &config);
    let seen = fake
        .wait_for(Duration::from_secs(20), |o| !o.patches.is_empty())
        .expect("a patch for the new address");
    let patch = &seen.patches[0];
    assert_eq!(patch.content_type, "application/merge-patch+json");
    assert_eq!(
        json(&patch.body),
        serde_json::json!({"metadata": {"annotations": {
            "networking.talos.dev/self-ips": "127.0.0.1,127.0.0.11"
        }}})
    );
}

/// With both registries, each peer shows as `k8s/…` and `service/…`; the
/// merged affiliate takes the `k8s/…` view as its base (it sorts first) and
/// lets the `service/…` view's non-empty scalars replace it (reference §9.7).
#[test]
fn service_and_kubernetes_views_merge_with_talos_rules() {
    let dir = tempfile::tempdir().unwrap();
    let (_fake, kubeconfig) = fake_with_nodes(2, dir.path());
    let service = Service::start(&[]);
    let endpoint = service.endpoint();
    let nodes: Vec<Daemon> = (1..=2)
        .map(|n| Daemon::start(&node_config(n, &kubeconfig, Some(&endpoint))))
        .collect();
    let raw = wait_raw(
        &nodes[0],
        "both views of node-2",
        Duration::from_secs(20),
        |raw| raw.len() == 2,
    );
    let ids: Vec<&String> = raw.keys().collect();
    assert!(
        ids[0].starts_with("k8s/") && ids[1].starts_with("service/"),
        "{ids:?}"
    );
    let (k8s, service_view) = (&raw[ids[0]], &raw[ids[1]]);
    assert_eq!(k8s["nodeId"], service_view["nodeId"]);
    assert_eq!(k8s["hostname"], "k8s-host-2");
    assert_eq!(service_view["hostname"], "daemon-host-2");

    // The merge, computed here from §9.7's table: k8s/ is the base.
    let mut expected = k8s.clone();
    for field in ["hostname", "nodename", "operatingSystem"] {
        if service_view[field].as_str().is_some_and(|s| !s.is_empty()) {
            expected[field] = service_view[field].clone();
        }
    }
    if service_view["machineType"] != "unknown" {
        expected["machineType"] = service_view["machineType"].clone();
    }
    let mut addresses = k8s["addresses"].as_array().unwrap().clone();
    for address in service_view["addresses"].as_array().unwrap() {
        if !addresses.contains(address) {
            addresses.push(address.clone());
        }
    }
    expected["addresses"] = Value::Array(addresses);

    let merged = json_lines(&nodes[0].cli(&["get", "affiliates", "-o", "json"]));
    let node2 = merged
        .iter()
        .find(|a| a["spec"]["nodename"] == "node-2")
        .expect("node-2 merged");
    for field in [
        "nodeId",
        "hostname",
        "nodename",
        "operatingSystem",
        "machineType",
        "addresses",
    ] {
        assert_eq!(node2["spec"][field], expected[field], "{field}: {node2}");
    }
    assert_eq!(
        node2["spec"]["hostname"], "daemon-host-2",
        "service/ replaces k8s/"
    );
}

/// The API server goes away while the service registry works: members stay
/// complete (a node that joins meanwhile is found through the service), the
/// last known Nodes are kept, the plugin says why, and when the API returns
/// the watch resumes without a restart.
#[test]
fn kubernetes_down_while_the_service_works() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, kubeconfig) = fake_with_nodes(3, dir.path());
    let service = Service::start(&[]);
    let endpoint = service.endpoint();
    let mut nodes: Vec<Daemon> = (1..=2)
        .map(|n| Daemon::start(&node_config(n, &kubeconfig, Some(&endpoint))))
        .collect();
    wait_raw(
        &nodes[0],
        "both views of node-2",
        Duration::from_secs(20),
        |raw| raw.len() == 2,
    );

    fake.stop();
    let status = wait_kubernetes_status(
        &nodes[0],
        "the outage in the status",
        Duration::from_secs(30),
        |s| s["healthy"] == false && s["message"].as_str().unwrap().contains("watching Nodes"),
    );
    eprintln!("while down: {status}");
    assert_eq!(status["state"], "running", "not a crash: {status}");
    // The last known Nodes stay.
    let raw = json_lines(&nodes[0].cli(RAW_AFFILIATES));
    assert!(
        raw.iter()
            .any(|a| a["metadata"]["id"].as_str().unwrap().starts_with("k8s/")),
        "{raw:?}"
    );

    nodes.push(Daemon::start(&node_config(3, &kubeconfig, Some(&endpoint))));
    for node in &nodes {
        node.wait_members(&["node-1", "node-2", "node-3"], Duration::from_secs(10));
    }

    fake.restart().unwrap();
    // node-3 writes its Node once the API is back, and node-1's watch,
    // resumed, sees it: k8s/ and service/ views of both peers.
    wait_raw(
        &nodes[0],
        "node-3's k8s view after the API returned",
        RESUME,
        |raw| raw.keys().filter(|id| id.starts_with("k8s/")).count() == 2 && raw.len() == 4,
    );
    wait_kubernetes_status(&nodes[0], "a healthy status", RESUME, |s| {
        s["healthy"] == true && s["message"] == "2 peers from 3 Nodes"
    });
    assert_eq!(kubernetes_status(&nodes[0])["restarts"], 0);
}

/// A Node annotated by a Talos control-plane node (the annotations written here
/// exactly as Talos writes them, §9.5's "mixed" and "controlplane" vectors) is
/// a member; a Node with broken annotations keeps what parses, and each bad
/// item is logged once.
#[test]
fn a_node_annotated_by_talos_is_a_member() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, kubeconfig) = fake_with_nodes(1, dir.path());
    let talos_id = "7x1SuC8Ege5BGXdAfTEff5iQnlWZLfv9h1LGMxA2pYkC";
    fake.put_node(
        NodeBuilder::new("talos-cp-1")
            .label("node-role.kubernetes.io/control-plane", "")
            .internal_ip("127.0.0.50")
            .hostname("talos-cp-1.example.com")
            .os_image("Talos (v1.9.0)")
            .annotation("cluster.talos.dev/node-id", talos_id)
            .annotation("networking.talos.dev/self-ips", "127.0.0.50,fd00::50")
            .annotation("networking.talos.dev/api-server-port", "6443")
            .annotation(
                "networking.talos.dev/kubespan-public-key",
                "PLPNBddmTgHJhtw0vxltq1ZBdPP9RNOEUd5JjJZzBRY=",
            )
            .annotation(
                "networking.talos.dev/kubespan-ip",
                "fd50:8d60:4238:6302:f857:23ff:fe21:d1e0",
            )
            .annotation("networking.talos.dev/assigned-prefixes", "10.244.3.1/24")
            .annotation(
                "networking.talos.dev/kubespan-endpoints",
                "127.0.0.50:51820,[fd00::50]:51820",
            ),
    );
    fake.put_node(
        NodeBuilder::new("broken")
            .hostname("broken")
            .annotation("cluster.talos.dev/node-id", "broken-node-id")
            .annotation("networking.talos.dev/self-ips", "127.0.0.60,not-an-ip")
            .annotation("networking.talos.dev/api-server-port", "https"),
    );
    // A Node without a node ID (a plain kubelet) is no affiliate.
    fake.put_node(NodeBuilder::new("plain").hostname("plain"));

    let daemon = Daemon::start(&node_config(1, &kubeconfig, None));
    daemon.wait_members(&["broken", "node-1", "talos-cp-1"], Duration::from_secs(20));
    let members = json_lines(&daemon.cli(&["get", "members", "-o", "json"]));
    let talos = members
        .iter()
        .find(|m| m["metadata"]["id"] == "talos-cp-1")
        .unwrap();
    assert_eq!(talos["spec"]["nodeId"], talos_id);
    assert_eq!(talos["spec"]["machineType"], "controlplane");
    assert_eq!(talos["spec"]["hostname"], "talos-cp-1.example.com");
    assert_eq!(talos["spec"]["operatingSystem"], "Talos (v1.9.0)");
    assert_eq!(
        talos["spec"]["addresses"],
        serde_json::json!(["127.0.0.50", "fd00::50"])
    );
    assert_eq!(talos["spec"]["controlPlane"]["port"], 6443, "{talos}");
    let raw = json_lines(&daemon.cli(RAW_AFFILIATES));
    let kubespan = &raw
        .iter()
        .find(|a| a["spec"]["nodeId"] == talos_id)
        .unwrap()["spec"]["kubespan"];
    assert_eq!(
        kubespan["endpoints"],
        serde_json::json!(["127.0.0.50:51820", "[fd00::50]:51820"]),
        "{kubespan}"
    );

    let broken = members
        .iter()
        .find(|m| m["metadata"]["id"] == "broken")
        .unwrap();
    assert_eq!(
        broken["spec"]["addresses"],
        serde_json::json!(["127.0.0.60"])
    );
    assert!(broken["spec"]["controlPlane"].is_null(), "{broken}");
    daemon
        .log
        .wait_for("the dropped item logged", Duration::from_secs(5), |l| {
            l.contains("\"broken\"") && l.contains("not-an-ip")
        });
    // Once only, though the Node is re-read on every change.
    fake.patch_annotations("broken", &[("example.com/touched", Some("1"))]);
    fake.put_node(
        NodeBuilder::new("later")
            .hostname("later")
            .annotation("cluster.talos.dev/node-id", "later-node-id"),
    );
    daemon.wait_members(
        &["broken", "later", "node-1", "talos-cp-1"],
        Duration::from_secs(20),
    );
    let logged = daemon.log.dump().matches("not-an-ip").count();
    assert_eq!(logged, 1, "{}", daemon.log.dump());
}

/// Refused credentials are a status with the fix, not a crash; a fixed
/// credential is picked up without a restart.
#[test]
fn refused_credentials_are_a_status_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, kubeconfig) = fake_with_nodes(2, dir.path());
    fake.patch_annotations(
        "node-2",
        &[("cluster.talos.dev/node-id", Some("node-2-id-from-talos"))],
    );
    // Kubernetes >= 1.32: a kubelet credential reads only its own Node.
    fake.set_auth(
        Verb::List,
        AuthMode::NodeCredential {
            node: "node-1".into(),
        },
    );
    fake.set_auth(
        Verb::Watch,
        AuthMode::NodeCredential {
            node: "node-1".into(),
        },
    );
    let daemon = Daemon::start(&node_config(1, &kubeconfig, None));
    let status = wait_kubernetes_status(
        &daemon,
        "the 403 in the status",
        Duration::from_secs(20),
        |s| s["message"].as_str().unwrap().contains("403"),
    );
    let message = status["message"].as_str().unwrap();
    assert!(message.contains("cannot read all nodes"), "{message}");
    assert!(
        message.contains("examples/kubernetes-rbac.yaml"),
        "{message}"
    );
    assert_eq!(status["healthy"], false);
    assert_eq!(status["state"], "running", "{status}");

    // Now no credential at all is accepted.
    fake.set_auth_all(AuthMode::Unauthorized);
    let status = wait_kubernetes_status(&daemon, "the 401 in the status", RESUME, |s| {
        s["message"].as_str().unwrap().contains("401")
    });
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains("check the granted kubeconfig"),
        "{status}"
    );

    // The credential is fixed (a ClusterRole bound): the watch resumes.
    fake.set_auth_all(AuthMode::Ok);
    daemon.wait_members(&["node-1", "node-2"], RESUME);
    wait_kubernetes_status(&daemon, "a healthy status", RESUME, |s| {
        s["healthy"] == true
    });
    assert_eq!(kubernetes_status(&daemon)["restarts"], 0);
}

/// A watch that cannot resume (its resourceVersion was compacted away while
/// the daemon was cut off: the API answers `410 Expired`) relists, and picks
/// up what changed in the gap.
#[test]
fn an_expired_watch_relists() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, kubeconfig) = fake_with_nodes(1, dir.path());
    let talos = |id: &str, ips: &str| {
        NodeBuilder::new("talos-1")
            .hostname("talos-1")
            .annotation("cluster.talos.dev/node-id", id)
            .annotation("networking.talos.dev/self-ips", ips)
    };
    fake.put_node(talos("talos-node-id", "127.0.0.70"));
    let daemon = Daemon::start(&node_config(1, &kubeconfig, None));
    daemon.wait_members(&["node-1", "talos-1"], Duration::from_secs(20));

    // Cut off: the change and the compaction happen while no watch is open.
    fake.set_refuse_connections(true);
    fake.drop_connections();
    fake.wait_for(Duration::from_secs(10), |o| o.open_watches == 0)
        .expect("the watch is cut");
    fake.put_node(talos("talos-node-id", "127.0.0.71"));
    fake.compact();
    fake.clear_records();
    fake.set_refuse_connections(false);

    wait_raw(&daemon, "the change made in the gap", RESUME, |raw| {
        raw.values()
            .any(|spec| spec["addresses"] == serde_json::json!(["127.0.0.71"]))
    });
    let requests = fake.requests();
    assert!(
        requests.iter().any(|r| r.verb == Some(Verb::List)),
        "relisted: {requests:?}"
    );
    assert_eq!(kubernetes_status(&daemon)["restarts"], 0);
}

/// A hostile (or just enormous) cluster: Nodes whose annotations add up to far
/// more than the plugin may hold. The bytes the host hands over count against
/// the plugin's memory cap, so the plugin fails and is restarted with backoff;
/// the daemon keeps answering.
#[test]
fn a_flood_of_node_data_costs_the_plugin_not_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, kubeconfig) = fake_with_nodes(1, dir.path());
    let blob = "x".repeat(200 * 1024);
    for n in 0..100 {
        fake.put_node(
            NodeBuilder::new(format!("big-{n}"))
                .annotation("cluster.talos.dev/node-id", format!("big-node-{n}"))
                .annotation("example.com/blob", blob.clone()),
        );
    }
    let config = node_config(1, &kubeconfig, None)
        .replace("    grants:", "    limits: {memoryMiB: 8}\n    grants:");
    let daemon = Daemon::start(&config);
    let status = wait_kubernetes_status(
        &daemon,
        "the plugin to fail on its memory cap",
        Duration::from_secs(30),
        |s| s["restarts"].as_u64().unwrap() >= 1,
    );
    eprintln!("{status}");
    assert!(
        status["lastError"].as_str().unwrap().contains("memory"),
        "{status}"
    );
    let members = json_lines(&daemon.cli(&["get", "members", "-o", "json"]));
    assert_eq!(members.len(), 1, "only this node: {members:?}");
    eprintln!("resident: {} KiB", daemon.resident_kib());
}

/// `examples/kubernetes-rbac.yaml` parses, binds its ClusterRole to its service
/// account, and grants every verb the registry uses on Nodes (as recorded by
/// the fake while a daemon runs, leaves included) and nothing beyond Nodes.
#[test]
fn the_rbac_example_grants_what_the_registry_uses() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/kubernetes-rbac.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let documents: Vec<Value> = serde_norway::Deserializer::from_str(&text)
        .map(|document| serde::Deserialize::deserialize(document).unwrap())
        .collect();
    let of_kind = |kind: &str| {
        documents
            .iter()
            .find(|d| d["kind"] == kind)
            .unwrap_or_else(|| panic!("a {kind} in {}", path.display()))
    };
    let role = of_kind("ClusterRole");
    let rules = role["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 1, "Nodes only: {rules:?}");
    assert_eq!(rules[0]["apiGroups"], serde_json::json!([""]));
    assert_eq!(rules[0]["resources"], serde_json::json!(["nodes"]));
    let granted: Vec<&str> = rules[0]["verbs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let binding = of_kind("ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    let account = of_kind("ServiceAccount");
    assert_eq!(binding["subjects"][0]["kind"], "ServiceAccount");
    assert_eq!(binding["subjects"][0]["name"], account["metadata"]["name"]);
    assert_eq!(
        binding["subjects"][0]["namespace"],
        account["metadata"]["namespace"]
    );

    let dir = tempfile::tempdir().unwrap();
    let (fake, kubeconfig) = fake_with_nodes(2, dir.path());
    let daemon = Daemon::start(&node_config(1, &kubeconfig, None));
    fake.wait_for(Duration::from_secs(20), |o| !o.patches.is_empty())
        .expect("a patch");
    daemon.cli(&["leave"]);
    let seen = fake
        .wait_for(Duration::from_secs(10), |o| o.patches.len() >= 2)
        .expect("the leave's patch");
    for request in seen
        .requests
        .iter()
        .filter(|r| r.path.starts_with("/api/v1/nodes"))
    {
        let verb = match request.verb.expect("a Node verb") {
            Verb::List => "list",
            Verb::Watch => "watch",
            Verb::Get => "get",
            Verb::Patch => "patch",
        };
        assert!(
            granted.contains(&verb),
            "{verb} is not granted: {request:?}"
        );
    }
}
